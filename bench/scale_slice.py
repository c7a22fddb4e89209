"""A slice of parti-20b at its real width on CPU: memory per rank against the planner, and what building costs.

    python bench/scale_slice.py [--preset parti-20b --encoder-layers 1 --decoder-layers 1] [--tp 1,2]
                                [--recompute none,selective,full] [--precision bf16]

A few encoder and decoder layers at the preset's real width (parti-20b: d 4096, 64 heads, MLP 16384), with
its embeddings and head, micro-batch 1 and the full sequence (128 text + 1024 image tokens), built at each
TP size on that many gloo processes (fresh processes for every measurement). Prints, per rank:
- building: seconds and host memory to construct the slice (the shard-proportional initialisation of
  model_parallel/init.py: at TP=2 each rank should need about half of TP=1's), the memory as a ratio to the
  first --tp listed (TP=1 by default; the seconds are one build each, too noisy for a ratio);
- one forward + backward per recomputation mode: the peak resident memory above the built model (sampled
  every millisecond while it runs) during the forward pass against the planner's activations for the same
  slice (training/plan.py `activation_bytes` + `recomputed_layer_bytes`, the head's logits and loss
  included), and over forward + backward against activations + gradients, as ratios.
Resident memory is what the CPU allocator holds: each measuring process pins glibc's mmap threshold so that
large tensors are returned to the system when freed (glibc otherwise raises the threshold and keeps freed
blocks). bf16 where the CPU has bf16 matrix products (else fp32, said in the output). Minutes at parti-20b width
on 2 cores.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.cli import description  # noqa: E402
from common.config import ConfigError  # noqa: E402
from model_parallel.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from model_parallel.config import model_config  # noqa: E402
from model_parallel.model import PartiModel  # noqa: E402
from model_parallel.state import free_port, init_parallel, tensor_parallel_group  # noqa: E402
from training.plan import activation_bytes, recomputed_layer_bytes  # noqa: E402


M_MMAP_THRESHOLD = -3  # (glibc's malloc.h)


def pin_mmap_threshold(threshold: int = 64 << 10) -> None:
    """From here on, glibc maps tensors of `threshold` bytes or more and returns them to the system when freed (by
    default it raises the threshold as a process frees large blocks, and keeps them), and the free memory its
    heap holds is released now: resident memory then follows the live tensors, also in a process that allocated
    before (the tests' worker pool), as in a fresh one. Set in the process itself (an environment variable only
    reaches processes started after it). Nothing without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    libc.malloc_trim(0)


class PeakRSS:
    """The highest resident set size of this process while the block runs, sampled every `interval` s."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


def slice_config(args):
    return model_config(args.preset, {"encoder_layers": args.encoder_layers, "decoder_layers": args.decoder_layers})


def worker(rank: int, tp: int, port: int, args, recompute: str, out: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // tp))
    pin_mmap_threshold()
    init_parallel(tp, 1)
    cfg = slice_config(args)
    process = psutil.Process()
    before, start = process.memory_info().rss, time.perf_counter()
    model = PartiModel(cfg, tp_group=tensor_parallel_group(), init_seed=1)
    build_s, built = time.perf_counter() - start, process.memory_info().rss
    model = apply_activation_checkpointing(model.to(args.dtype), recompute)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, cfg.text_vocab_size, (1, cfg.text_seq_len), generator=g)
    codes = torch.randint(0, cfg.image_vocab_size, (1, cfg.image_seq_len), generator=g)
    baseline = process.memory_info().rss
    with PeakRSS() as forward:
        loss = model.loss(text, codes)
    with PeakRSS() as peak:
        loss.backward()
    params = sum(p.numel() for p in model.parameters())
    element = torch.finfo(args.dtype).bits // 8
    layers = (cfg.encoder_layers, cfg.decoder_layers)
    activations = (activation_bytes(cfg, 1, tp, element, recompute, layers, head=True)
                   + recomputed_layer_bytes(cfg, 1, tp, element, recompute, layers))
    if rank == 0:
        out.update(params=params, build_s=build_s, init_bytes=built - before, forward=forward.peak - baseline,
                   activations=activations, measured=max(forward.peak, peak.peak) - baseline,
                   planned=activations + params * element)


def measure(tp: int, args, recompute: str) -> dict:
    out = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(worker, args=(tp, free_port(), args, recompute, out), nprocs=tp)
    return dict(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--preset", default="parti-20b")
    parser.add_argument("--encoder-layers", type=int, default=1)
    parser.add_argument("--decoder-layers", type=int, default=1)
    parser.add_argument("--tp", default="1,2", help="comma-separated TP sizes (one gloo process per rank)")
    parser.add_argument("--recompute", default="none,selective,full")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    from model_parallel.activation_checkpointing import RECOMPUTE_MODES

    if unknown := sorted(set(args.recompute.split(",")) - set(RECOMPUTE_MODES)):
        parser.error(f"--recompute {args.recompute}: unknown {', '.join(unknown)}; "
                     f"choose from {', '.join(RECOMPUTE_MODES)}")
    try:
        sizes = [int(t) for t in args.tp.split(",")]
    except ValueError:
        parser.error(f"--tp {args.tp}: comma-separated integers")
    try:
        cfg = slice_config(args).validate()
    except ConfigError as e:
        parser.error(str(e))
    for tp in sizes:
        if tp < 1 or cfg.num_heads % tp or cfg.ffn_hidden_size % tp:
            parser.error(f"--tp {tp}: must be >= 1 and divide the heads ({cfg.num_heads}) and the MLP width "
                         f"({cfg.ffn_hidden_size})")
    bf16_matmul = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    args.dtype = torch.bfloat16 if args.precision == "bf16" and bf16_matmul else torch.float32
    print(f"{args.preset} slice: {cfg.encoder_layers} encoder + {cfg.decoder_layers} decoder layers, "
          f"d {cfg.hidden_size}, MLP {cfg.ffn_hidden_size}, {cfg.num_heads} heads, micro-batch 1, "
          f"{cfg.text_seq_len} + {cfg.image_seq_len} tokens, {str(args.dtype).removeprefix('torch.')}"
          + ("" if args.dtype == torch.bfloat16 or args.precision == "fp32" else " (no bf16 matmul on this CPU)"))
    versus = f"vs TP={sizes[0]}"  # (the ratios' reference: the first size listed)
    print(f"{'TP':>3} {'recompute':>10} {'params/rank':>14} {'build s':>8} {'init GB':>8} {versus:>8} "
          f"{'fwd GB':>7} {'planned':>8} {'ratio':>6} {'fwd+bwd GB':>11} {'planned':>8} {'ratio':>6}")
    first: dict[str, float] = {}
    for tp in sizes:
        for recompute in args.recompute.split(","):
            r = measure(tp, args, recompute)
            first.setdefault("init", r["init_bytes"])
            print(row(tp, recompute, r, first["init"]))


def row(tp: int, recompute: str, r: dict, first_init: int) -> str:
    """One line of the table: rank 0's measurements (worker's dict) in GB (2**30 bytes) and as ratios."""
    gb = {k: r[k] / 2**30 for k in ("init_bytes", "forward", "activations", "measured", "planned")}
    return (f"{tp:>3} {recompute:>10} {r['params']:>14,} {r['build_s']:>8.1f} {gb['init_bytes']:>8.2f} "
            f"{r['init_bytes'] / first_init:>8.2f} {gb['forward']:>7.2f} {gb['activations']:>8.2f} "
            f"{r['forward'] / r['activations']:>6.2f} {gb['measured']:>11.2f} {gb['planned']:>8.2f} "
            f"{r['measured'] / r['planned']:>6.2f}")


if __name__ == "__main__":
    main()
