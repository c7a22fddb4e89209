"""Exact parameter counts of the model presets, built on the meta device (20B costs no memory).

    python -m model_parallel.param_count                    # every preset
    python -m model_parallel.param_count --model parti-20b

Per-rank counts for a TP/PP layout are the layout planner's job (training.plan).
"""
from __future__ import annotations

import argparse

import torch

from common.cli import command, description
from common.config import CONFIG_ROOT
from model_parallel.config import ModelConfig, model_config
from model_parallel.cpu_compat import apply_cpu_compat
from model_parallel.model import piece_classes, piece_context, piece_names
from model_parallel.state import init_distributed

# Parti paper (Yu et al. 2022, table 1) sizes, in parameters; DALL-E (Ramesh et al. 2021): "12-billion parameter".
PAPER_SIZES = {"parti-350m": 0.39e9, "parti-750m": 0.79e9, "parti-3b": 3.09e9, "parti-20b": 20.5e9, "dalle-12b": 12e9}


def presets() -> list[str]:
    order = ["parti-debug", "parti-tiny", "dalle-debug", *PAPER_SIZES]
    found = {p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml")}
    return [p for p in order if p in found] + sorted(found - set(order))


class SizingGroup:
    """A stand-in for rank 0 of a tensor-parallel group of `size`: what megatron-core's layers ask of a
    group (size, rank) to size their shards on the meta device. Nothing communicates through it."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def piece_params(cfg: ModelConfig, tp: int = 1) -> list[int]:
    """Parameters of each piece of the model (`piece_classes` order) on TP rank 0 of a TP group of `tp`,
    counted on the meta device: no memory is allocated, parti-20b included."""
    apply_cpu_compat()
    init_distributed()  # megatron-core sizes layers by the group only under torch.distributed (utils.get_pg_size)
    ctx = piece_context(cfg, meta=True, tp_group=SizingGroup(tp))
    with torch.device("meta"):
        return [sum(p.numel() for p in cls(ctx).parameters()) for _, cls in piece_classes(cfg)]


PART = {"text_embedding": "embeddings", "image_embedding": "embeddings", "embedding": "embeddings",
        "encoder": "encoder", "encoder_norm": "encoder", "decoder": "decoder", "head": "head"}


def count_parameters(cfg: ModelConfig, tp: int = 1) -> dict[str, int]:
    """Parameters by part of the model (per TP rank at `tp`), and the total."""
    parts = dict.fromkeys(("embeddings", "encoder", "decoder", "head"), 0)
    for name, n in zip(piece_names(cfg), piece_params(cfg, tp)):
        parts[PART[name.split(".")[0]]] += n
    parts["total"] = sum(parts.values())
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--model", action="append", help="preset name (repeatable); default: all")
    args = parser.parse_args(argv)
    with command():  # (an unknown preset: one line)
        configs = {preset: model_config(preset) for preset in args.model or presets()}
        print(f"{'preset':<12} {'total':>16} {'embeddings':>14} {'encoder':>16} {'decoder':>16} {'head':>12}  paper")
        for preset, cfg in configs.items():
            c = count_parameters(cfg)
            paper = PAPER_SIZES.get(preset)
            note = f"{paper / 1e9:.2f}B ({(c['total'] / paper - 1) * 100:+.1f}%)" if paper else ""
            print(f"{preset:<12} {c['total']:>16,} {c['embeddings']:>14,} {c['encoder']:>16,} "
                  f"{c['decoder']:>16,} {c['head']:>12,}  {note}")


if __name__ == "__main__":
    main()
