"""Python's garbage collector in a distributed training loop: automatic collections off, one every N steps.

    collector = StepCollection(cfg.train.gc_interval)   # before the first step (0: Python's automatic collection)
    ...after each step: collector.step_done(step)       # every rank at the same step
    collector.close()                                   # the rest collected; automatic collection as it was

Why: Python starts an automatic collection on each rank when that rank's allocations cross a threshold, at its
own moment, and a collection that reaches the oldest generation walks every object alive (~500k once torch,
megatron-core and DeepSpeed are imported: ~1-2 s). The other ranks wait for it at the next collective, so at
hundreds of ranks some rank's pause lands in most steps. With automatic collection off, every rank collects the
young generations at the same steps instead (what torchtitan's training.gc_freq does; Megatron-LM's --manual-gc
collects all of them). Garbage cycles that outlive two collections reach the oldest generation and wait for the
end of the loop, collected there (torchtitan's trade too: some host memory for no full walk in any step).
Processes forked meanwhile (data workers, an asynchronous checkpoint's writer) collect automatically again.
"""
from __future__ import annotations

import gc
import os

_CHILDREN_COLLECT = {"registered": False}


class StepCollection:
    def __init__(self, interval: int):
        self.interval, self.was_enabled = interval, gc.isenabled()
        if interval:
            if not _CHILDREN_COLLECT["registered"]:  # (a forked child would inherit the switch turned off)
                os.register_at_fork(after_in_child=gc.enable)
                _CHILDREN_COLLECT["registered"] = True
            gc.collect()  # (start clean: the build's garbage, once)
            gc.disable()

    def step_done(self, step: int) -> None:
        """After step `step` (every rank): the young generations collected every `interval` steps (the oldest
        one is left alone: a full walk per collection is the pause this avoids)."""
        if self.interval and step % self.interval == 0:
            gc.collect(1)

    def close(self) -> None:
        """At the loop's end: what it left in the oldest generation collected now (not in the middle of whatever
        the process does next, a later run's step in the same process: freed there, its memory muddled that
        step's measurements), and automatic collection as it was."""
        if self.interval:
            gc.collect()
            if self.was_enabled:
                gc.enable()
