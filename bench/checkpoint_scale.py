"""What a checkpoint costs each rank at ZeRO-1 over data parallelism: bytes, host memory, disk speed, async saves.

    python bench/checkpoint_scale.py [--preset parti-350m] [--layers 6,6|preset] [--dp 2] [--set KEY=VALUE]
                                     [--set ...] [--dir /fast/disk/tmp] [--steps-during 5]

Builds the preset at its real widths (by default with 6 of its 12 encoder and decoder layers: the whole
parti-350m at fp32 ZeRO-1 needs ~9 GB per rank, more than two ranks have on a 24 GB machine; short
sequences, so that a CPU step takes seconds: the sequence does not change what is saved) at ZeRO-1 on --dp gloo
processes through the trainer's own code (training.trainer's Trainer: model, DeepSpeed engine, data), trains two
steps, then measures per rank, side by side in one run:
- bytes written: the rank's .distcp files against the checkpoint's total / dp (each rank writes its own ZeRO
  partition: ratio ~1.0);
- host memory: the peak resident memory during a synchronous save above the level before it, against the
  rank's own partition (fp32 master weights + Adam's two moments of its part);
- speed: the save's wall time against writing the same number of bytes with plain file writes and fsync
  into the same directory, both ranks at once (the disk's raw speed, measured here and now); after a
  warm-up save (a process's first save also starts megatron-core's write-results queue, ~4 s once);
- async (train.async_save): how long the training loop is paused by the save call against the synchronous
  save's time, the median step time while the background writers run against the median step time without
  them, and that the save completes and moves `latest`; beside it, the median time of the first step after
  forking an idle child against steps without one (--steps-during of each, in turns): the writer is a fork
  of the trainer (megatron-core's TemporalAsyncCaller), and while it lives every page the training step
  writes is copied first (by the first step after the fork). On CPU the weights, gradients and
  optimizer state are such pages; on a GPU they live in device memory and the trainer's host pages barely change.
Results: a table on stdout; bench/README.md records a run.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale_slice import PeakRSS, pin_mmap_threshold  # noqa: E402
from common.cli import require_at_least  # noqa: E402
from model_parallel.state import free_port  # noqa: E402


def run_config(args, world: int):
    from training.config import load_config

    layers = [] if args.layers == "preset" else [f"model.encoder_layers={args.layers.split(',')[0]}",
                                                 f"model.decoder_layers={args.layers.split(',')[1]}"]
    return load_config(None, [f"model.preset={args.preset}", *layers, "model.text_seq_len=16", "model.image_grid=8",
                              "parallel.zero_stage=1", f"train.global_batch_size={world}", "train.micro_batch_size=1",
                              "train.steps=1000", "data.synthetic=true", "train.precision=fp32", *args.set])


def own_partition_bytes(trainer) -> int:
    """Bytes of this rank's fp32 masters and Adam moments (ZeRO-1: its flat partitions)."""
    from training.deepspeed_glue import base_optimizer

    opt = trainer.engine.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or []
    state = base_optimizer(trainer.engine).state
    return sum(t.numel() * 4 * (1 + len([v for v in state[t].values() if torch.is_tensor(v) and v.dim()]))
               for t in flats)


def raw_write_seconds(directory: Path, nbytes: int, rank: int) -> float:
    """Seconds to write `nbytes` with plain writes in 64 MiB pieces and fsync (all ranks at once)."""
    import torch.distributed as dist

    piece = os.urandom(1 << 20) * 64
    dist.barrier()
    start = time.perf_counter()
    with open(directory / f"raw_{rank}.bin", "wb") as f:
        left = nbytes
        while left > 0:
            f.write(piece[:min(left, len(piece))])
            left -= len(piece)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    (directory / f"raw_{rank}.bin").unlink()
    return seconds


def worker(rank: int, world: int, port: int, args, root: str, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    pin_mmap_threshold()  # (freed tensors go back to the system: the resident memory measured follows them)
    import torch.distributed as dist

    from training import checkpoint, engine
    from training.trainer import Trainer

    run_dir = Path(root) / "run"
    cfg = run_config(args, world)
    trainer = Trainer(cfg, run_dir, resume="none")
    reader = trainer._reader_at(0)

    def step() -> float:
        start = time.perf_counter()
        batches = trainer._with_samples(reader.next_step())  # (TP rank 0 reads, its TP group receives)
        engine.train_step(trainer.engine, cfg, batches, trainer.device)
        trainer.step += 1
        trainer.consumed += cfg.train.global_batch_size
        return time.perf_counter() - start

    for _ in range(2):
        step()

    def save(**kwargs) -> str:
        state = {"step": trainer.step, "consumed_samples": trainer.consumed, "run_id": trainer.plan.run_id}
        return checkpoint.save(trainer.engine, cfg, trainer.layout, run_dir, trainer.step, state,
                               keep=checkpoint.Retention(0), **kwargs)  # (0: keep every one)

    save()  # warm-up: a process's first save starts megatron-core's write-results queue (a forked Manager)
    trainer.step += 1
    rss = psutil.Process().memory_info().rss
    dist.barrier()
    with PeakRSS(0.002) as peak:
        start = time.perf_counter()
        tag = save()
        save_s = time.perf_counter() - start
    written = sum(f.stat().st_size for f in (run_dir / "checkpoints" / tag).glob(f"__{rank}_*.distcp"))
    raw_s = raw_write_seconds(run_dir, written, rank)

    # The async writer is a forked copy of this process: while it lives, every page training writes is copied
    # first (copy-on-write), by the first step after the fork (the copied pages are then this process's own: a
    # second step beside the same child pays nothing, so two steps' median halved the cost). Steps next to an
    # idle forked child measure that cost alone: a fresh child before each, in turns with steps without one.
    quiet, beside_fork = [], []
    for _ in range(args.steps_during):
        quiet.append(step())
        idle = multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,))
        idle.start()
        beside_fork.append(step())
        idle.kill()
        idle.join()
    background = checkpoint.BackgroundSaves()
    dist.barrier()
    start = time.perf_counter()
    async_tag = save(background=background)
    blocking_s = time.perf_counter() - start
    during = []
    while background.in_flight and len(during) < 10 * args.steps_during:
        during.append(step())
        background.poll()
    background.poll(wait=True)
    completed = checkpoint.latest_tag(run_dir) == async_tag
    background.close()
    trainer.close()
    out[rank] = {"written": written, "own": own_partition_bytes(trainer), "extra_rss": peak.peak - rss,
                 "save_s": save_s, "raw_s": raw_s, "blocking_s": blocking_s, "step_s": statistics.median(quiet),
                 "step_during_s": statistics.median(during) if during else float("nan"),
                 "step_beside_fork_s": statistics.median(beside_fork),
                 "steps_during": len(during), "async_completed": completed}


def measure(args, root: str) -> list[dict]:
    """Each rank's measurements (worker's dict), from --dp spawned gloo processes writing under `root`."""
    out = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(worker, args=(args.dp, free_port(), args, root, out), nprocs=args.dp)
    return [out[r] for r in range(args.dp)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="parti-350m")
    parser.add_argument("--layers", default="6,6", help="encoder,decoder layers, or 'preset' for the preset's")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="a dotted config override (repeatable)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--steps-during", type=int, default=5, help="steps timed without a save in flight, and "
                        "as many each the first after forking an idle child, in turns")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("dp", "steps_during"))
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        results = measure(args, root)
    print(report(args, results))


def report(args, results: list[dict]) -> str:
    """The table main prints: each rank's measurements (worker's dict) as ratios."""
    total = sum(r["written"] for r in results)
    title = (f"{args.preset} (layers {args.layers} {' '.join(args.set)}), ZeRO-1, DP={args.dp}, fp32; "
             f"checkpoint {total / 2**30:.2f} GiB")
    header = ("rank  written/(total/dp)  extra host mem/own part  save s / raw write s   async: paused s/save s  "
              "step during/step (steps, step s)  step beside an idle fork/step")
    lines = [title, header]
    for rank, r in enumerate(results):
        lines.append(
            f"{rank:>4}  {r['written'] / (total / args.dp):>18.3f}  {r['extra_rss'] / r['own']:>23.3f}  "
            f"{r['save_s']:>6.2f} / {r['raw_s']:<5.2f} = {r['save_s'] / r['raw_s']:<5.2f}  "
            f"{r['blocking_s']:>6.2f} / {r['save_s']:<5.2f} = {r['blocking_s'] / r['save_s']:<5.2f}  "
            f"{r['step_during_s'] / r['step_s']:>6.3f} ({r['steps_during']}, {r['step_s']:.2f} s), "
            f"{'completed' if r['async_completed'] else 'NOT completed'}  "
            f"{r['step_beside_fork_s'] / r['step_s']:>6.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
