"""Training throughput and ZeRO memory, measured side by side in one run.

    python bench/train_throughput.py [--preset parti-tiny] [--nproc 2] [--steps 6]

Starts `--nproc` gloo processes (CPU) or one per GPU and, for ZeRO stage 0, 1, 2 and 3 in turn, trains
the preset with the real trainer pieces (DeepSpeed engine, megatron-core layers) at DP=nproc. Prints:
- samples/s and achieved TFLOP/s per process (training/flops.py's formula) at each stage;
- the matrix-multiply FLOP/s this machine reaches per process (fp32 1024^3 matmuls on CPU, bf16 on
  GPU), and the ratio achieved / measured: the MFU against what this machine can do;
- per-rank optimizer-state bytes (Adam moments + fp32 master copies ZeRO keeps) at each stage, as a
  ratio to ZeRO-0 (plain data parallel): ideally 1/DP for stages 1-3.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.cli import description, require_at_least


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


def measure(preset: str, zero: int, steps: int) -> dict:
    from training.config import load_config
    from training.engine import train_step
    from training.flops import train_flops_per_sample
    from training.trainer import Trainer, rank_micro_batches

    cfg = load_config(None, [f"model.preset={preset}", f"parallel.zero_stage={zero}", "train.global_batch_size=16",
                             "train.micro_batch_size=4", f"train.steps={steps}", "model.dropout=0.0"])
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(cfg, run_dir)
        times = []
        for step in range(steps):
            batches = list(rank_micro_batches(cfg, tr.dataset, tr.sampler, step * 16, tr.dp_rank, tr.dp_size))
            start = time.perf_counter()
            train_step(tr.engine, cfg, batches, tr.device)
            times.append(time.perf_counter() - start)
        tr.close()  # (the process groups DeepSpeed made for this stage too: the next stages' processes kept them)
    step_time = statistics.median(times[1:])  # the first step warms up
    samples_per_s = 16 / step_time
    return {"samples_per_s": samples_per_s,
            "flops_per_proc": train_flops_per_sample(cfg.model) * samples_per_s / torch.distributed.get_world_size(),
            "opt_bytes": optimizer_state_bytes(tr.engine)}  # (moments, master)


def worker(rank: int, nproc: int, port: int, preset: str, steps: int) -> None:
    # DeepSpeed's accelerator must match where the batches go: cuda when this process has a GPU.
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", accelerator))
    torch.set_num_threads(1 if not torch.cuda.is_available() else torch.get_num_threads())
    import logging

    logging.getLogger("parti").setLevel(logging.WARNING)
    results, peak = rank_results(preset, steps)
    if rank == 0:
        print(report(preset, nproc, results, peak))


def rank_results(preset: str, steps: int) -> tuple[dict, float]:
    """This rank's measurements at ZeRO 0-3 ({stage: measure's dict}) and its matmul FLOP/s (every rank of the
    process group calls it: the trainers' collectives)."""
    results = {zero: measure(preset, zero, steps) for zero in (0, 1, 2, 3)}
    return results, matmul_flops()


def report(preset: str, nproc: int, results: dict, peak: float) -> str:
    """rank_results' table."""
    base = sum(results[0]["opt_bytes"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"\npreset={preset} processes={nproc} (DP={nproc}) device={device}",
             f"measured matmul: {peak / 1e12:.4f} TFLOP/s per process",
             (f"{'ZeRO':>4} {'samples/s':>10} {'TFLOP/s/proc':>13} {'vs matmul':>10} {'moments MB':>11} "
              f"{'+master MB':>11} {'total vs ZeRO-0':>16} {'moments vs ZeRO-0':>18}")]
    for zero, r in results.items():
        moments, master = r["opt_bytes"]
        lines.append(f"{zero:>4} {r['samples_per_s']:>10.1f} {r['flops_per_proc'] / 1e12:>13.4f} "
                     f"{r['flops_per_proc'] / peak:>10.3f} {moments / 2**20:>11.2f} {master / 2**20:>11.2f} "
                     f"{(moments + master) / base:>16.3f} {moments / results[0]['opt_bytes'][0]:>18.3f}")
    lines.append("(fp32 ZeRO-0 updates the parameters in place; ZeRO 1-3 keep an fp32 partition beside them,\n"
                 " which is what bf16 training needs anyway, so the total ratio is (2 + 1) / (2 x DP) in fp32.)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--preset", default="parti-tiny")
    parser.add_argument("--nproc", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--steps", type=int, default=6, help="steps per measurement (at least 2: the first warms up)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("nproc",))
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first step warms up and is not timed)")
    from model_parallel.state import free_port

    port = free_port()
    torch.multiprocessing.spawn(worker, args=(args.nproc, port, args.preset, args.steps), nprocs=args.nproc)


if __name__ == "__main__":
    main()
