"""ViT-VQGAN encode throughput (images/s) at batch 1 and batch 32, side by side in one run.

    python bench/vq_encode.py [--preset small] [--image-size 256] [--repeats 3]

Random weights (speed does not depend on them); bf16 autocast on GPU, fp32 on CPU. After one warm-up call
each, the two batch sizes are timed in turn `--repeats` times (one batch-32 call against 4 batch-1 calls per
turn), so machine noise hits both alike; the medians are printed, and the ratio is the median of each turn's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.turns import ratio_over_turns  # noqa: E402
from common.cli import description, require_at_least  # noqa: E402
from vq.vit_vqgan import VIT_VQGAN_PRESETS, ViTVQGAN  # noqa: E402


def seconds(model, x: torch.Tensor, calls: int, device: str) -> float:
    """Seconds of `calls` encodes of x, between device synchronisations."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        model.encode(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rates(model, size: int, repeats: int, device: str, batches: dict[int, int] | None = None) -> dict:
    """Images/s of each batch size ({batch: encode calls per turn}), timed in turn `repeats` times after one
    warm-up call each: {batch: [images/s of each turn]}."""
    batches = batches or {1: 4, 32: 1}
    inputs = {b: torch.rand(b, 3, size, size, device=device) * 2 - 1 for b in batches}
    out = {b: [] for b in batches}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for b in batches:
            model.encode(inputs[b])  # warm-up
        for _ in range(repeats):
            for b, calls in batches.items():
                out[b].append(b * calls / seconds(model, inputs[b], calls, device))
    return out


def report(measured: dict[int, list[float]]) -> str:
    """A line per batch size ({batch: [images/s of each turn]}, 1 and 32 among them), then batch 32's images/s
    over batch 1's, turn by turn."""
    lines = [f"  batch {b:>2}: {statistics.median(r):8.2f} images/s (median of {len(r)}; min {min(r):.2f}, "
             f"max {max(r):.2f})" for b, r in measured.items()]
    return "\n".join([*lines, f"  batch 32 / batch 1: {ratio_over_turns(measured[32], measured[1])}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--preset", default="small", choices=list(VIT_VQGAN_PRESETS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="turns (each times both batch sizes)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("repeats",))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = ViTVQGAN(image_size=args.image_size, **VIT_VQGAN_PRESETS[args.preset]).to(device).eval()
    except (ValueError, AssertionError) as e:
        parser.error(f"--image-size {args.image_size}: {e}")
    measured = rates(model, args.image_size, args.repeats, device)
    print(f"ViT-VQGAN {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"{args.image_size}px -> {model.grid}x{model.grid} codes, {device}, threads {torch.get_num_threads()}")
    print(report(measured))


if __name__ == "__main__":
    main()
