"""Training throughput and ZeRO memory, measured side by side in one run.

    python bench/train_throughput.py [--preset parti-tiny] [--nproc 2] [--turns 5] [--steps 1]

Starts `--nproc` gloo processes (CPU) or one per GPU and builds a trainer of the preset for each ZeRO stage 0-3 at
DP=nproc, with the real trainer pieces (DeepSpeed engine, megatron-core layers). After one warm-up step each, the
stages and a matmul are timed in `--turns` turns (each turn: every stage `--steps` training steps, then the matmul,
in an order rotated by one each turn, so machine noise hits every side of a turn alike). Prints:
- samples/s and achieved TFLOP/s per process (training/flops.py's formula) at each stage: the median turn's;
- against the matrix-multiply FLOP/s this machine reaches per process in the same turn (fp32 1024^3 matmuls on
  CPU, bf16 on GPU): the MFU against what this machine can do, and each stage's samples/s against ZeRO-0's;
  both the median of the turns' ratios, with their range;
- per-rank optimizer-state bytes (Adam moments + fp32 master copies ZeRO keeps) at each stage, as a
  ratio to ZeRO-0 (plain data parallel): ideally 1/DP for stages 1-3.
The four trainers are alive at once (one engine start-up each, not one per turn): memory holds the four stages'
parameters, gradients and optimizer states together (in fp32 at DP=2 about 3.5x ZeRO-0's alone; activations only
one stage's at a time). That is the price of timing them under the same noise: fine at parti-tiny, and a preset
whose ZeRO-0 needs more than a quarter of memory does not run here.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.turns import in_turns, ratio_over_turns
from common.cli import description, require_at_least

STAGES = (0, 1, 2, 3)
GLOBAL_BATCH = 16


def matmul_flops(device: str | None = None, n: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of n x n matrix products on this machine: bf16 on a GPU (n=8192), fp32 on CPU (n=1024);
    warmed up, timed between device synchronisations."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = n or (8192 if device == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def optimizer_state_bytes(engine) -> tuple[int, int]:
    """(Adam moments, fp32 master copies kept apart from the model's parameters) on this rank."""
    from training.deepspeed_glue import base_optimizer

    moments = sum(t.numel() * t.element_size() for state in base_optimizer(engine).state.values()
                  for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    opt = engine.optimizer
    master = sum(t.numel() * t.element_size()  # ZeRO-1/2 and ZeRO-3 keep fp32 partitions of their own
                 for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
                 for t in getattr(opt, name, None) or [])
    return moments, master


def build_trainer(preset: str, zero: int, stack: contextlib.ExitStack):
    """A Trainer of the preset at ZeRO `zero` in a temporary run directory, closed (and its directory removed) when
    `stack` closes."""
    from training.config import load_config
    from training.trainer import Trainer

    cfg = load_config(None, [f"model.preset={preset}", f"parallel.zero_stage={zero}",
                             f"train.global_batch_size={GLOBAL_BATCH}", "train.micro_batch_size=4",
                             "model.dropout=0.0"])
    run_dir = stack.enter_context(tempfile.TemporaryDirectory())
    trainer = Trainer(cfg, run_dir)
    # (closed last built first: each close destroys the process groups made since its own build began)
    stack.callback(trainer.close)
    return trainer


def stepper(tr) -> Callable[[int], float]:
    """A function that trains `steps` more steps and returns their samples/s (the batches read before the clock
    starts), called by all ranks at once: they meet first, so a rank's time is not its wait for another still on
    the side before."""
    from training.engine import train_step
    from training.trainer import rank_micro_batches

    consumed = 0

    def samples_per_s(steps: int) -> float:
        nonlocal consumed
        batches = [list(rank_micro_batches(tr.cfg, tr.dataset, tr.sampler, consumed + i * GLOBAL_BATCH, tr.dp_rank,
                                           tr.dp_size)) for i in range(steps)]
        consumed += steps * GLOBAL_BATCH
        torch.distributed.barrier()
        start = time.perf_counter()
        for step_batches in batches:
            train_step(tr.engine, tr.cfg, step_batches, tr.device)
        return GLOBAL_BATCH * steps / (time.perf_counter() - start)

    return samples_per_s


def rank_results(preset: str, steps: int, turns: int) -> dict:
    """This rank's measurements (every rank of the process group calls it: the trainers' collectives):
    {"samples_per_s": {stage: [each turn's]}, "flops_per_proc": {stage: [each turn's]}, "matmul": [each turn's
    FLOP/s], "opt_bytes": {stage: (moments, master)}}."""
    from training.flops import train_flops_per_sample

    def matmul() -> float:
        torch.distributed.barrier()
        return matmul_flops()

    with contextlib.ExitStack() as stack:
        trainers = {zero: build_trainer(preset, zero, stack) for zero in STAGES}
        steppers = {zero: stepper(tr) for zero, tr in trainers.items()}
        for step in steppers.values():
            step(1)  # warm-up
        timed = in_turns({**{zero: functools.partial(step, steps) for zero, step in steppers.items()},
                          "matmul": matmul}, turns)
        opt_bytes = {zero: optimizer_state_bytes(tr.engine) for zero, tr in trainers.items()}
        per_sample = {zero: train_flops_per_sample(tr.cfg.model) for zero, tr in trainers.items()}
    world = torch.distributed.get_world_size()
    return {"samples_per_s": {zero: timed[zero] for zero in STAGES},
            "flops_per_proc": {zero: [per_sample[zero] * s / world for s in timed[zero]] for zero in STAGES},
            "matmul": timed["matmul"], "opt_bytes": opt_bytes}


def worker(rank: int, nproc: int, port: int, preset: str, steps: int, turns: int) -> None:
    # DeepSpeed's accelerator must match where the batches go: cuda when this process has a GPU.
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", accelerator))
    torch.set_num_threads(1 if not torch.cuda.is_available() else torch.get_num_threads())
    import logging

    logging.getLogger("parti").setLevel(logging.WARNING)
    results = rank_results(preset, steps, turns)
    if rank == 0:
        print(report(preset, nproc, results))


def report(preset: str, nproc: int, results: dict) -> str:
    """rank_results' tables: throughput over the turns, then optimizer-state memory."""
    rates, flops, matmul = results["samples_per_s"], results["flops_per_proc"], results["matmul"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"\npreset={preset} processes={nproc} (DP={nproc}) device={device}, {len(matmul)} turns",
             f"measured matmul: {statistics.median(matmul) / 1e12:.4f} TFLOP/s per process (median turn)",
             f"{'ZeRO':>4} {'samples/s':>10} {'TFLOP/s/proc':>13}  {'vs matmul':<34} samples/s vs ZeRO-0"]
    for zero in rates:
        lines.append(f"{zero:>4} {statistics.median(rates[zero]):>10.1f} "
                     f"{statistics.median(flops[zero]) / 1e12:>13.4f}"
                     f"  {ratio_over_turns(flops[zero], matmul, digits=3):<34} "
                     f"{ratio_over_turns(rates[zero], rates[0])}")
    opt = results["opt_bytes"]
    base = sum(opt[0])
    lines.append(f"\n{'ZeRO':>4} {'moments MB':>11} {'+master MB':>11} {'total vs ZeRO-0':>16} "
                 f"{'moments vs ZeRO-0':>18}")
    for zero, (moments, master) in opt.items():
        lines.append(f"{zero:>4} {moments / 2**20:>11.2f} {master / 2**20:>11.2f} {(moments + master) / base:>16.3f} "
                     f"{moments / opt[0][0]:>18.3f}")
    lines.append("(fp32 ZeRO-0 updates the parameters in place; ZeRO 1-3 keep an fp32 partition beside them,\n"
                 " which is what bf16 training needs anyway, so the total ratio is (2 + 1) / (2 x DP) in fp32.)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--preset", default="parti-tiny")
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--turns", type=int, default=5, help="turns: each times every stage and the matmul")
    parser.add_argument("--steps", type=int, default=1, help="training steps per stage per turn")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("nproc", "turns", "steps"))
    from model_parallel.state import free_port

    port = free_port()
    torch.multiprocessing.spawn(worker, args=(args.nproc, port, args.preset, args.steps, args.turns),
                                nprocs=args.nproc)


if __name__ == "__main__":
    main()
