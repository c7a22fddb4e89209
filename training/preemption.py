"""Preemption: SIGUSR1 or SIGTERM asks the trainer to finish its step, save, and exit for a requeue.

    stop = StopRequest()                  # installs the handlers (main thread)
    ...after each step: if stop.requested(): save; raise Preempted(step)
    python -m training.train ... ; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID

REQUEUE_EXIT_CODE (75, EX_TEMPFAIL of sysexits.h: "try again later") is the trainer's exit status
after such a save; a SLURM script requeues the job on it and the rerun resumes from `latest` by itself.
The request is agreed on by all ranks (an all-reduce of the flag after every step), so every rank
stops at the same step even when the signal reached only some of them.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised by the trainer after saving the checkpoint of a requested stop."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved")
        self.step, self.signal_name = step, signal_name


class StopRequest:
    def __init__(self):
        self.received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum  # only note it: the step in flight finishes first

    def requested(self) -> bool:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL needs CUDA tensors
        flag = torch.tensor(1.0 if self.received else 0.0, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "another rank's signal"

    def restore(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
