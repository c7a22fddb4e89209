"""Image tokens/s of KV-cache sampling against full recomputation of the prefix, in one run.

    python bench/sample.py [--preset parti-tiny] [--grid 32] [--batch 1] [--reference-tokens 256]

--grid 32 is a 1024-token image (Parti's). Full recomputation runs a forward pass over the whole prefix
for every token (quadratic), so it is timed over the first `--reference-tokens` tokens only, where it is
cheapest: the printed ratio understates the gain over a whole image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.sampling import SamplingConfig, sample  # noqa: E402
from model_parallel.model import PartiModel  # noqa: E402
from model_parallel.state import init_parallel, seed_everything  # noqa: E402
from training.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="parti-tiny")
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reference-tokens", type=int, default=256)
    args = parser.parse_args()
    init_parallel(1, 1)
    seed_everything(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.image_grid={args.grid}"]).model
    model = PartiModel(cfg).to(device).eval()
    text = torch.randint(4, cfg.text_vocab_size, (args.batch, cfg.text_seq_len), device=device)
    rates = {}
    for name, use_cache, n in (("KV cache", True, cfg.image_seq_len),
                               ("full recomputation", False, min(args.reference_tokens, cfg.image_seq_len))):
        start = time.perf_counter()
        sample(model, text, SamplingConfig(), torch.Generator().manual_seed(0), use_cache=use_cache, max_tokens=n)
        rates[name] = args.batch * n / (time.perf_counter() - start)
    print(f"{args.preset} d={cfg.hidden_size} layers={cfg.encoder_layers}+{cfg.decoder_layers}, "
          f"{cfg.image_seq_len}-token image, batch {args.batch}, {device}, threads {torch.get_num_threads()}")
    for name, r in rates.items():
        print(f"{name:>20}: {r:9.1f} image tokens/s")
    print(f"KV cache / full recomputation: {rates['KV cache'] / rates['full recomputation']:.1f}x")


if __name__ == "__main__":
    main()
