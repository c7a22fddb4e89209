"""What the GPU check's sections share (bench/gpu_sections.py, bench/gpu_mfu.py): the context a section runs in,
and short real training runs of the project's trainer."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.files import write_atomic


@dataclass
class Context:
    device: str
    quick: bool
    scratch: Path
    partial_file: Path | None = None
    partial: dict = field(default_factory=dict)

    def record(self, key: str, value):
        """Keep a finished part of the section's result: written at once, so that a section stopped by
        its time limit still reports what it measured, and printed to stderr as progress."""
        self.partial[key] = value
        if self.partial_file is not None:  # (whole or not at all: the parent may stop this process mid-write)
            write_atomic(self.partial_file, json.dumps(self.partial, indent=1, default=str), sync=False)
        print(f"[{key}] {json.dumps(value, default=str)[:400]}", file=sys.stderr, flush=True)
        return value


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_config(sets: list[str]):
    from training.config import load_config

    return load_config(None, sets).validate()


def train_run(run_dir: Path, sets: list[str], steps: int) -> tuple[list[float], list[dict]]:
    """A real training run (training.trainer.train, the DeepSpeed engine) for `steps` steps in this
    process (world size 1), resuming from run_dir's checkpoint if any: (losses, metrics lines)."""
    from training.trainer import train

    cfg = train_config(sets + [f"train.steps={steps}"])
    losses = train(cfg, run_dir, resume="auto")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return losses, lines


def tiny_run_sets(ctx: Context) -> list[str]:
    """parti-tiny (parti-debug when quick) in bf16 with dropout, a schedule that does not depend on
    train.steps (so a run stopped at step 3 and one of 6 steps share it), a checkpoint and a held-out loss
    (one global batch) every 3 steps."""
    return [f"model.preset={'parti-debug' if ctx.quick else 'parti-tiny'}", "train.precision=bf16",
            "model.dropout=0.1", "model.attention_dropout=0.1", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.lr=1e-3", "train.warmup_steps=2", "train.lr_decay=constant",
            "train.save_interval=3", "train.eval_interval=3", "train.eval_batches=1", f"train.device={ctx.device}"]


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
