"""Exact parameter counts of the model presets, built on the meta device (20B costs no memory).

    python -m model_parallel.param_count                    # every preset
    python -m model_parallel.param_count --model parti-20b

Per-rank counts for a TP/PP layout are the layout planner's job (training.plan).
"""
from __future__ import annotations

import argparse

import torch

from common.config import CONFIG_ROOT
from model_parallel.config import model_config

# Parti paper (Yu et al. 2022, table 1) sizes, in parameters.
PAPER_SIZES = {"parti-350m": 0.39e9, "parti-750m": 0.79e9, "parti-3b": 3.09e9, "parti-20b": 20.5e9}


def presets() -> list[str]:
    order = ["parti-debug", "parti-tiny", *PAPER_SIZES]
    found = {p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml")}
    return [p for p in order if p in found] + sorted(found - set(order))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by part of the model, and the total."""
    parts = {"embeddings": 0, "encoder": 0, "decoder": 0, "head": 0}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        part = {"encoder": "encoder", "encoder_norm": "encoder", "decoder": "decoder",
                "head": "head"}.get(top, "embeddings")
        parts[part] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def meta_model(preset: str):
    """The preset's PartiModel on the meta device, for the current TP group (one process: TP=1)."""
    from model_parallel.model import PartiModel

    cfg = model_config(preset)
    with torch.device("meta"):
        return PartiModel(cfg, meta=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="preset name (repeatable); default: all")
    args = parser.parse_args(argv)
    from model_parallel.state import init_parallel

    init_parallel(tp=1, pp=1)
    print(f"{'preset':<12} {'total':>16} {'embeddings':>14} {'encoder':>16} {'decoder':>16} {'head':>12}  paper")
    for preset in args.model or presets():
        c = count_parameters(meta_model(preset))
        paper = PAPER_SIZES.get(preset)
        note = f"{paper / 1e9:.2f}B ({(c['total'] / paper - 1) * 100:+.1f}%)" if paper else ""
        print(f"{preset:<12} {c['total']:>16,} {c['embeddings']:>14,} {c['encoder']:>16,} "
              f"{c['decoder']:>16,} {c['head']:>12,}  {note}")


if __name__ == "__main__":
    main()
