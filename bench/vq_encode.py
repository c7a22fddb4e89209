"""ViT-VQGAN encode throughput (images/s) at batch 1 and batch 32, side by side in one run.

    python bench/vq_encode.py [--preset small] [--image-size 256] [--repeats 2]

Random weights (speed does not depend on them); bf16 autocast on GPU, fp32 on CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.cli import description  # noqa: E402
from vq.vit_vqgan import VIT_VQGAN_PRESETS, ViTVQGAN  # noqa: E402


def rate(model, batch: int, size: int, repeats: int, device: str) -> float:
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        model.encode(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model.encode(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--preset", default="small", choices=list(VIT_VQGAN_PRESETS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ViTVQGAN(image_size=args.image_size, **VIT_VQGAN_PRESETS[args.preset]).to(device).eval()
    rates = {b: rate(model, b, args.image_size, args.repeats if b > 1 else 4 * args.repeats, device) for b in (1, 32)}
    print(f"ViT-VQGAN {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"{args.image_size}px -> {model.grid}x{model.grid} codes, {device}, threads {torch.get_num_threads()}")
    for b, r in rates.items():
        print(f"  batch {b:>2}: {r:8.2f} images/s")
    print(f"  batch 32 / batch 1: {rates[32] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
