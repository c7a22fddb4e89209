r"""Traces of chosen training steps with torch's profiler (train.profile_step, train.profile_steps): what a step
spends its time on, kernel by kernel, where MFU is lost.

    python -m training.train --config configs/train/parti-350m.yaml --run-dir runs/x \
        --set train.profile_step=20 train.profile_steps=3      # (after warm-up: compilation, allocator, caches)

writes, on rank 0 (every rank with train.profile_all_ranks=true), into <run_dir>/profile/:
- rank<r>_steps<a>-<b>.json.gz: a Chrome trace (Perfetto's ui.perfetto.dev or chrome://tracing open it as it
  is; TensorBoard's profiler plugin reads the folder): CPU operators, CUDA kernels on a GPU, shapes, memory;
- rank<r>_steps<a>-<b>.txt: the operators that took the most time, as a table (what a look at the trace would
  start with).
The log says where. Traced steps past train.steps end with the run's last step; a run stopped or failed
inside them writes none. The traced steps run slower (the profiler records every operator): the log line of
the interval holding them reports that; writing the trace is left out of the step times.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

FOLDER = "profile"
"""The run directory's folder of traces."""


class StepProfiler:
    """Traces steps [first, first + count) (numbered from 1, as logged) of this rank when `enabled`:
    `begin(step)` before each step, `end(step, run_ends)` after it; `end` writes the trace after the last traced
    step, or after the run's last step (`run_ends`) when that comes first, and returns the files it wrote."""

    def __init__(self, run_dir: str | Path, first: int, count: int, rank: int, enabled: bool, cuda: bool):
        self.folder, self.first, self.last, self.rank = Path(run_dir) / FOLDER, first, first + count - 1, rank
        self.enabled, self.cuda = enabled and first > 0, cuda
        self.active: profile | None = None

    def begin(self, step: int) -> None:
        if self.enabled and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities, record_shapes=True, profile_memory=True)
            self.active.__enter__()

    def end(self, step: int, run_ends: bool = False) -> list[Path]:
        if self.active is None or (step < self.last and not run_ends):
            return []
        self.last = step
        if self.cuda:
            torch.cuda.synchronize()  # (the last step's kernels are in the trace)
        self.active.__exit__(None, None, None)
        trace, self.active = self.active, None
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"rank{self.rank}_steps{self.first}-{self.last}"
        trace.export_chrome_trace(f"{stem}.json.gz")  # (gzip-compressed: the name's .gz says so to torch)
        order = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = trace.key_averages().table(sort_by=order, row_limit=30)
        stem.with_suffix(".txt").write_text(f"steps {self.first}-{self.last}, rank {self.rank}, sorted by {order}\n"
                                            f"{table}\n")
        return [Path(f"{stem}.json.gz"), stem.with_suffix(".txt")]

    def close(self) -> None:
        """A run that ends (or fails) inside the traced steps stops the profiler without writing."""
        if self.active is not None:
            self.active.__exit__(None, None, None)
            self.active = None
