"""The learning-rate schedule of Parti's trainer, the text encoder's and the image tokenizers' (the upsampler
keeps WDSR's step halvings): a linear warmup to the peak, then a decay to a floor.

    check_schedule(cfg.train, "train")       # ConfigError naming the first bad field
    factor = lr_lambda(cfg.train)            # step -> multiple of train.lr (what torch's LambdaLR takes)
    lr = cfg.train.lr * factor(step)

The section (training's TrainConfig, the tokenizer trainer's VQTrainConfig, the text encoder's) has `lr`,
`min_lr`, `warmup_steps`, `lr_decay` (cosine | linear | constant), `lr_decay_steps` and `steps`: the decay
runs from the end of the warmup for lr_decay_steps steps (0: until `steps`, Megatron's --lr-decay-iters unset)
and the rate stays where it ended (min_lr; lr with constant). The factor is a pure function of the step, so a
resumed run needs no scheduler state, only its step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from common.config import require

DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
    "linear": lambda x: 1 - x,
    "constant": lambda x: 1.0,
}
"""Progress through the decay (0..1) -> the fraction of (lr - min_lr) left above min_lr."""


def check_schedule(t, prefix: str) -> None:
    """ConfigError naming `prefix`.field for the first schedule field that breaks its rule."""
    require(t.lr_decay in DECAYS, f"{prefix}.lr_decay={t.lr_decay!r} must be one of {', '.join(DECAYS)}")
    require(t.lr > 0, f"{prefix}.lr={t.lr} must be > 0 (the schedule is relative to it)")
    require(t.min_lr >= 0, f"{prefix}.min_lr={t.min_lr} must be >= 0")
    require(t.lr_decay == "constant" or t.min_lr <= t.lr,  # (megatron's scheduler asserts it too)
            f"{prefix}.min_lr={t.min_lr} must be <= {prefix}.lr={t.lr}: the {t.lr_decay} decay goes from lr down to "
            "min_lr (set a lower min_lr with a lower lr)")
    for name, meaning in (("warmup_steps", "linear warmup steps"),
                          ("lr_decay_steps", "steps of the decay after the warmup, 0: until the last step")):
        require(getattr(t, name) >= 0, f"{prefix}.{name}={getattr(t, name)} must be >= 0 ({meaning})")


def lr_lambda(t) -> Callable[[int], float]:
    """step (0 for the first optimizer step) -> the multiple of t.lr to use at that step."""
    shape = DECAYS[t.lr_decay]
    decay_steps = t.lr_decay_steps or t.steps - t.warmup_steps

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, decay_steps))
        return (t.min_lr + (t.lr - t.min_lr) * shape(progress)) / t.lr

    return factor
