"""A pool of gloo worker processes that stays up for the whole test session.

Starting a process and importing megatron-core/DeepSpeed costs seconds, so multi-process tests do
not spawn per test: `pool.run(fn, *args, **kwargs)` calls the module-level function `fn` on every rank of an
already-initialised process group and returns the per-rank results (or raises with each failing
rank's traceback). A worker that hangs past the timeout, or dies, takes the pool down with it: the hung
workers print their stacks first, and the next `run` starts a fresh pool, so one hang fails one test.
"""
from __future__ import annotations

import atexit
import faulthandler
import os
import queue
import signal
import time
import traceback

import torch.multiprocessing as mp

from model_parallel.state import free_port


class StandInGroup:
    """A process group as one of its ranks sees it, in one process: all that sharded initialisation and dropout
    sites read of their TP group is its size and this rank."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    faulthandler.enable()  # a crash (here or in a forked DataLoader worker) prints the Python stacks
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a hung worker's stacks, asked for by the pool
    # (USR2: USR1 is the trainers' stop signal)
    from common.cli import exit_promptly
    from model_parallel.cpu_compat import apply_cpu_compat
    from model_parallel.state import init_distributed

    apply_cpu_compat()
    init_distributed()
    exit_promptly()  # (3-5 s per worker at the session's end)
    while True:
        task = inbox.get()
        if task is None:
            return
        fn, args, kwargs = task
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # report every failure to the parent, keep serving
            outbox.put((rank, False, traceback.format_exc()))


class WorkerPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.procs, self.inboxes = [], []  # (a pool never used closes too: a session fixture asked for, not run)
        atexit.register(self.close, force=True)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self.outbox = ctx.Queue()
        port = free_port()
        # Not daemonic: workers start processes of their own (dist_checkpointing's writer queue).
        self.procs = [ctx.Process(target=_worker, args=(r, self.world_size, port, self.inboxes[r], self.outbox))
                      for r in range(self.world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 300, **kwargs):  # (runs take seconds: 12 s at most here)
        if not self.procs:  # first use, or the last run took the pool down
            self._start()
        for box in self.inboxes:
            box.put((fn, args, kwargs))
        results, errors = {}, []
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size:
            # Once a rank has failed, the others may wait forever in a collective: give them a
            # short grace period, then report the failure and take the pool down.
            if errors:
                deadline = min(deadline, time.monotonic() + 30)
            try:
                rank, ok, value = self.outbox.get(timeout=5)
            except queue.Empty:
                dead = [f"rank {r} exited with {p.exitcode}" for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self._take_down()
                    late = "within 30 s of the failure below" if errors else f"within {timeout} s"
                    why = "; ".join(dead) or f"not every rank finished {late} (stacks above)"
                    raise RuntimeError(f"{fn.__name__} failed: {why}\n" + "\n".join(errors))
                continue
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise RuntimeError(f"{fn.__name__} failed\n" + "\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def _take_down(self) -> None:
        """Print the stacks of the workers still alive (the test's captured stderr), then kill them all."""
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGUSR2)
                time.sleep(1)  # one at a time: the stacks would interleave
        self.close(force=True)

    def close(self, force: bool = False) -> None:
        for p, box in zip(self.procs, self.inboxes):
            if p.is_alive() and not force:
                box.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
        self.procs = []
