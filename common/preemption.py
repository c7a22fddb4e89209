"""Preemption: SIGUSR1, SIGTERM, a STOP file or the trainer's own time limit (train.exit_after_minutes) asks a
trainer to finish its step, save, and exit for a requeue.

    stop = StopRequest(run_dir / "STOP", cfg.train.exit_after_minutes)  # installs the handlers, before the build
    stop.start(run_dir, step, steps)            # before the first step (a stop asked for meanwhile: Preempted)
    ...after each step: if stop.requested(): save(); stop.leave_for_requeue(run_dir, step, last=step == steps)
    with command():  ...                        # common/cli.py: Preempted -> one line on rank 0, requeue_exit_code()
    python -m vq.train ... ; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID
    torchrun ... -m training.train ... ; [ -f RUN_DIR/REQUEUE ] && scontrol requeue $SLURM_JOB_ID

Every trainer uses it: training.train (Parti), training.text_encoder (its text encoder's pre-training),
vq.train and vq.finetune_decoder (the image tokenizers, the detokenizer), sr.train (the upsampler);
slurm/train.sbatch runs any of them (TRAINER=...).

The STOP file is how a batch script reaches trainers started by torchrun: a signal sent to a job step
reaches every process of it, checkpoint writer and data loader helpers included, while a file reaches only
the trainers (slurm/train.sbatch touches it when SLURM sends USR1 before the time limit).

After such a save rank 0 leaves run_dir/REQUEUE ("step N"), and a SLURM script requeues the job on it; the
rerun resumes from `latest` by itself and removes the REQUEUE when it starts (StopRequest.start). A stop asked
for at the last step ends the run as finished (no REQUEUE); one asked for while a trainer starts up (the
handlers are installed before its build and resume) is honoured before its first step, without a save.
The exit status: REQUEUE_EXIT_CODE (75, EX_TEMPFAIL of sysexits.h: "try again later") when the trainer was
started directly (python or srun), 0 under torchrun (requeue_exit_code): torchrun passes no status on (it
reports any non-zero one as a failed run with a traceback, exits 1, and with --max-restarts restarts the
workers), so there the REQUEUE file is the signal.
The request is agreed on by all ranks (an all-reduce of the flag after every step), so every rank
stops at the same step even when the signal reached only some of them.

torch is imported where it is used: common/cli.py imports this module for Preempted, and a command that fails
on its config does not wait for torch.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def launch_rank() -> int:
    """This process's global rank as its launcher set it, before the process group exists: RANK (torchrun), else
    SLURM_PROCID (a bare srun; model_parallel.state.init_distributed turns it into RANK later), else 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def requeue_exit_code() -> int:
    """The exit status after a requested stop's save: 75, or 0 under torchrun (its agent sets TORCHELASTIC_RUN_ID)."""
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else REQUEUE_EXIT_CODE


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """In a helper process (a DataLoader worker_init_fn): SLURM signals every process of a job step, and the
    stop is the trainer's to handle (it saves first, then ends its helpers). Left at the default action a
    worker would die, and the DataLoader would raise in the trainer wherever it is, its save included."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def start_helper(_worker_id: int = 0) -> None:
    """A forked helper's start (a DataLoader worker_init_fn): the job's stop signals and the run directory's
    lock stay the trainer's (ignore_stop_signals; common.checkpoints.drop_inherited_locks)."""
    from common.checkpoints import drop_inherited_locks

    ignore_stop_signals()
    drop_inherited_locks()


class Preempted(Exception):
    """Raised by a trainer after saving the checkpoint of a requested stop (StopRequest.leave_for_requeue), or
    for a stop asked for while it started up (`saved` False: the checkpoint it resumed from is the one to go on
    from, or none at step 0)."""

    def __init__(self, step: int, signal_name: str, run_dir: str | Path, saved: bool = True):
        done = (f"after step {step}; checkpoint saved" if saved else
                f"while starting, before step {step + 1}; nothing to save")
        super().__init__(f"stopped by {signal_name} {done}; {run_dir}/REQUEUE written")
        self.step, self.signal_name, self.run_dir = step, signal_name, Path(run_dir)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _process_age_s() -> float:
    """Seconds since this process started (its start as the kernel recorded it, so imports count too); a torchrun
    worker's, since its agent started (torchrun's own start, which a worker it restarts after a failure keeps)."""
    import psutil

    process = psutil.Process()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # (set by torchrun for its workers, its direct children)
        parent = process.parent()
        process = parent if parent is not None and parent.pid != 1 else process  # (1: the agent is gone)
    return max(0.0, time.time() - process.create_time())


class StopRequest:
    def __init__(self, stop_file: Path | None = None, exit_after_minutes: float = 0.0):
        self.received: int | None = None
        self.stop_file = stop_file
        # (a time limit of the trainer's own, Megatron-LM's --exit-duration-in-mins: a stop as SLURM's USR1 is,
        # where no signal comes, e.g. on another scheduler or a job whose limit the script cannot know)
        # (counted from the process's start, as a job's time limit counts from the job's: start-up, a long resume
        # or an image trainer's build before its loop use up the same minutes)
        self.exit_after_minutes = exit_after_minutes
        start = time.monotonic() - _process_age_s()
        self.deadline = start + 60 * exit_after_minutes if exit_after_minutes > 0 else None
        # (the handlers before, restored by restore(): e.g. USR1 ignored, as slurm/train.sbatch starts torchrun
        # and so its trainers, must stay ignored while an export is written after the loop)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum  # only note it: the step in flight finishes first

    def requested(self, time_limit: bool = True) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it after the same step), or, with
        `time_limit`, any rank's exit_after_minutes ran out."""
        import torch
        import torch.distributed as dist

        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL needs CUDA tensors
        asked = self.received or (self.stop_file is not None and self.stop_file.exists())
        asked = asked or (time_limit and self._out_of_time())
        flag = torch.tensor(1.0 if asked else 0.0, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def name(self) -> str:
        if self.received:
            return signal.Signals(self.received).name
        if self.stop_file is not None and self.stop_file.exists():
            return f"{self.stop_file}"
        return f"train.exit_after_minutes={self.exit_after_minutes:g}" if self._out_of_time() else "another rank"

    def start(self, run_dir: str | Path, step: int, steps: int) -> None:
        """Before the first step (every rank; the run directory is this run's): rank 0 removes a REQUEUE left
        by an earlier segment (only this run's stop may leave one: a wrapper script that requeues on it would
        requeue a finished run forever). A stop asked for while the trainer started up (the handlers are
        installed first) is honoured now, without a step or a save: the checkpoint resumed from is the one to
        continue from. The time limit is not looked at here: a segment whose start-up outlasted it would be
        requeued for ever without a step; it stops after its first step instead."""
        if _is_rank0():
            (Path(run_dir) / "REQUEUE").unlink(missing_ok=True)
        if self.requested(time_limit=False):
            self.leave_for_requeue(run_dir, step, last=step >= steps, saved=False)

    def leave_for_requeue(self, run_dir: str | Path, step: int, last: bool = False, saved: bool = True) -> None:
        """Once the stop's checkpoint is saved (every rank): rank 0 removes STOP and writes REQUEUE (a SLURM
        script requeues on it); every rank raises Preempted. `last`: the run reached train.steps, so there is
        nothing to requeue for: STOP is removed (the request is served) and the run ends as finished. `saved`: False
        for a stop honoured before the first step (start), which saved nothing."""
        import torch.distributed as dist

        reason, run_dir = self.name, Path(run_dir)
        if dist.is_initialized():
            dist.barrier()  # every rank has read the STOP file before it goes
        if _is_rank0():
            (run_dir / "STOP").unlink(missing_ok=True)
            if not last:
                (run_dir / "REQUEUE").write_text(f"step {step}\n")
        if not last:
            raise Preempted(step, reason, run_dir, saved)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # (None: set outside Python)
