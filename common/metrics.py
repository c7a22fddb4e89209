"""The one logging helper: rank 0 prints a line per log step and writes metrics.jsonl and TensorBoard.

    log = MetricsLogger(run_dir, enabled=rank == 0)
    log.step({"step": 10, "loss": 2.3, "lr": 1e-3, ...})     # a line, a JSON object, scalars
    log.info("text")                                         # a plain message (rank 0 only)

metrics.jsonl holds one JSON object per logged step with the fields of DESIGN.md: step, loss, lr,
grad_norm, samples_per_s, tokens_per_s, tflops_per_gpu, mfu, mem_gb, mem_reserved_gb (GPU only) (null where not
measurable).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import psutil
import torch

_FORMATS = {"loss": ".4f", "lr": ".3e", "grad_norm": ".3f", "samples_per_s": ".1f", "tokens_per_s": ".0f",
            "tflops_per_gpu": ".3f", "mfu": ".3f", "mem_gb": ".2f",
            "mem_reserved_gb": ".2f"}


def memory_gb() -> dict[str, float]:
    """{'mem_gb': peak GPU memory allocated by tensors since the last `reset_peak_memory`,
    'mem_reserved_gb': peak reserved by the caching allocator (what the GPU really gives up)};
    on CPU {'mem_gb': resident memory of this process}."""
    if torch.cuda.is_available():
        return {"mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"mem_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}


def reset_peak_memory() -> None:
    """Start the peaks of `memory_gb` afresh: called once the engine is built, so that the logged peak is
    training's, not construction's (the fp32 model before DeepSpeed casts it to bf16)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.log = logging.getLogger("parti")
        if not enabled:
            return
        if not self.log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            self.log.addHandler(handler)
            self.log.setLevel(logging.INFO)
            self.log.propagate = False
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def info(self, message: str) -> None:
        if self.enabled:
            self.log.info(message)

    def step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/inf: a non-finite value is written as null (the printed line still shows it).
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        step = metrics["step"]
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(f"train/{key}", value, step)
        parts = [f"step {step}"] + [f"{k} {format(v, _FORMATS.get(k, '.4g' if isinstance(v, float) else ''))}"
                                    for k, v in metrics.items() if k != "step" and v is not None]
        self.log.info(" | ".join(parts))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
