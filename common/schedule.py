"""The learning-rate schedule of Parti's trainer, the text encoder's and the image tokenizers' (the upsampler
keeps WDSR's step halvings): a linear warmup to the peak, a stable phase at the peak, then a decay to a floor.

    check_schedule(cfg.train, "train")       # ConfigError naming the first bad field
    factor = lr_lambda(cfg.train)            # step -> multiple of train.lr (what torch's LambdaLR takes)
    lr = cfg.train.lr * factor(step)

The section (training's TrainConfig, the tokenizer trainer's VQTrainConfig, the text encoder's) has `lr`,
`min_lr`, `warmup_steps`, `lr_stable_steps`, `lr_decay` (DECAYS' shapes), `lr_decay_steps` and `steps`: the
decay starts lr_stable_steps after the warmup's end and runs for lr_decay_steps steps (0: until `steps`,
Megatron's --lr-decay-iters unset), and the rate stays where it ended (min_lr; lr with constant). A stable phase
makes it a warmup-stable-decay schedule (WSD: Megatron-LM's --lr-decay-style WSD, whose --lr-wsd-decay-style
are these shapes): one long run at the peak, its cool-downs branched from its checkpoints (training's
train.init_weights_only=false) with the decay set to start at the branch's step. The factor is a pure function
of the step, so a resumed run needs no scheduler state, only its step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from common.config import require

DECAYS: dict[str, Callable[[float], float]] = {
    "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
    "linear": lambda x: 1 - x,
    "minus_sqrt": lambda x: 1 - math.sqrt(x),  # (WSD's usual cool-down: Hägele et al. 2024, "1-sqrt")
    "exponential": lambda x: 2 * 0.5**x - 1,
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
                          ("lr_stable_steps", "steps at lr between the warmup and the decay"),
                          ("lr_decay_steps", "steps of the decay after the warmup, 0: until the last step")):
        require(getattr(t, name) >= 0, f"{prefix}.{name}={getattr(t, name)} must be >= 0 ({meaning})")


def lr_lambda(t) -> Callable[[int], float]:
    """step (0 for the first optimizer step) -> the multiple of t.lr to use at that step."""
    shape, decay_start = DECAYS[t.lr_decay], t.warmup_steps + t.lr_stable_steps
    decay_steps = t.lr_decay_steps or t.steps - decay_start

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, max(0, step - decay_start) / max(1, decay_steps))
        return (t.min_lr + (t.lr - t.min_lr) * shape(progress)) / t.lr

    return factor
