"""Preemption: SIGUSR1, SIGTERM or a STOP file asks the trainer to finish its step, save, and exit for a requeue.

    stop = StopRequest(run_dir / "STOP")  # installs the handlers (main thread)
    ...after each step: if stop.requested(): save; raise Preempted(step)
    python -m training.train ... ; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID
    torchrun ... -m training.train ... ; [ -f RUN_DIR/REQUEUE ] && scontrol requeue $SLURM_JOB_ID

The STOP file is how a batch script reaches trainers started by torchrun: a signal sent to a job step
reaches every process of it, checkpoint writer helpers included, while a file reaches only the trainers
(slurm/train.sbatch touches it when SLURM sends USR1 before the time limit).

After such a save rank 0 leaves run_dir/REQUEUE ("step N"), and a SLURM script requeues the job on it; the
rerun resumes from `latest` by itself. The exit status: REQUEUE_EXIT_CODE (75, EX_TEMPFAIL of sysexits.h: "try
again later") when the trainer was started directly (python or srun), 0 under torchrun (requeue_exit_code):
torchrun passes no status on (it reports any non-zero one as a failed run with a traceback, exits 1, and
with --max-restarts restarts the workers), so there the REQUEUE file is the signal.
The request is agreed on by all ranks (an all-reduce of the flag after every step), so every rank
stops at the same step even when the signal reached only some of them.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def requeue_exit_code() -> int:
    """The exit status after a requested stop's save: 75, or 0 under torchrun (its agent sets TORCHELASTIC_RUN_ID)."""
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else REQUEUE_EXIT_CODE


class Preempted(Exception):
    """Raised by the trainer after saving the checkpoint of a requested stop."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved")
        self.step, self.signal_name = step, signal_name


class StopRequest:
    def __init__(self, stop_file=None):
        self.received: int | None = None
        self.stop_file = stop_file
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum  # only note it: the step in flight finishes first

    def requested(self) -> bool:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL needs CUDA tensors
        asked = self.received or (self.stop_file is not None and self.stop_file.exists())
        flag = torch.tensor(1.0 if asked else 0.0, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        if self.received:
            return signal.Signals(self.received).name
        return f"{self.stop_file}" if self.stop_file is not None and self.stop_file.exists() else "another rank"

    def restore(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
