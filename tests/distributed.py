"""A pool of gloo worker processes that stays up for the whole test session.

Starting a process and importing megatron-core/DeepSpeed costs seconds, so multi-process tests do
not spawn per test: `pool.run(fn, *args, **kwargs)` calls the module-level function `fn` on every rank of an
already-initialised process group and returns the per-rank results (or raises with each failing
rank's traceback). A worker that hangs past the timeout takes the pool down with it.
"""
from __future__ import annotations

import atexit
import os
import queue
import traceback

import torch.multiprocessing as mp

from model_parallel.state import free_port


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
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
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outbox = ctx.Queue()
        port = free_port()
        # Not daemonic: workers start processes of their own (dist_checkpointing's writer queue).
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.inboxes[r], self.outbox))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        atexit.register(self.close, force=True)

    def run(self, fn, *args, timeout: float = 600, **kwargs):
        for box in self.inboxes:
            box.put((fn, args, kwargs))
        results, errors = {}, []
        for _ in range(self.world_size):
            # Once a rank has failed, the others may wait forever in a collective: give them a
            # short grace period, then report the failure and take the pool down.
            wait = 30 if errors else timeout
            try:
                rank, ok, value = self.outbox.get(timeout=wait)
            except queue.Empty:
                self.close(force=True)
                if errors:
                    raise RuntimeError(f"{fn.__name__} failed (other ranks hung)\n" + "\n".join(errors)) from None
                raise TimeoutError(f"{fn.__name__} did not finish on all ranks within {timeout} s") from None
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise RuntimeError(f"{fn.__name__} failed\n" + "\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        for p, box in zip(self.procs, self.inboxes):
            if p.is_alive() and not force:
                box.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
