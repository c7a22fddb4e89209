"""An exponential moving average of the fp32 weights (train.ema_decay; LlamaGen's --ema), kept where DeepSpeed keeps
Adam's moments: one more optimizer state per tensor the optimizer updates, under EMA_KEY.

    start_ema(engine)              # the average = the fp32 weights now (a new run's, or those a run loaded)
    update_ema(engine, decay)      # after each optimizer step taken: ema = decay x ema + (1 - decay) x weights
    ema_decay_after(n, 0.9999, warmup=True)  # the decay of update n + 1 (train.ema_warmup: lower at first)
    with averaged_weights(engine):  # the model runs with the average as its weights (the held-out loss of it)
        ...

Why there and not in a copy of the model (torch's AveragedModel, as vq/train.py keeps one): under ZeRO each rank
holds only its part of the fp32 masters (a flat partition, or ZeRO-3's), and a copy of the model would be whole on
every rank (80 GB at parti-20b). As an optimizer state the average is partitioned like the moments, updated in
place with one fused lerp over the rank's partitions, and saved and resumed at any layout by the code that saves
the moments (training/checkpoint.py: optimizer.ema.<parameter>), which `training.export --ema` and
`training.held_out --ema` read instead of the weights.
"""
from __future__ import annotations

import contextlib

import torch

from training.deepspeed_glue import (
    EMA_KEY,
    base_optimizer,
    ensure_optimizer_state,
    link_optimizer_fragments,
    optimizer_holders,
    refresh_working_weights,
)


def start_ema(engine) -> None:
    """Set the average to the fp32 weights the optimizer holds now. The moments are made first where there are
    none yet (DeepSpeed's FusedAdam creates its state only while the state is empty), and ZeRO-1/2's
    per-parameter views are relinked to include the new state (a checkpoint reads and writes through them)."""
    ensure_optimizer_state(engine)
    state = base_optimizer(engine).state
    with torch.no_grad():
        for holder in optimizer_holders(engine):
            state[holder][EMA_KEY] = holder.detach().clone()
    link_optimizer_fragments(engine)


def ema_decay_after(updates: int, decay: float, warmup: bool) -> float:
    """The decay of the update that follows `updates` earlier ones: `decay`, or with `warmup` (train.ema_warmup)
    min(decay, (1 + updates) / (10 + updates)): 0.1 at the first, so the average soon leaves its start behind."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def update_ema(engine, decay: float) -> None:
    """ema += (1 - decay) x (weights - ema) over every tensor of this rank's part, in place (one fused lerp)."""
    state = base_optimizer(engine).state
    holders = optimizer_holders(engine)
    with torch.no_grad():
        torch._foreach_lerp_([state[h][EMA_KEY] for h in holders], [h.detach() for h in holders], 1.0 - decay)


@contextlib.contextmanager
def averaged_weights(engine):
    """Inside the block the model's weights are the moving average: each fp32 tensor the optimizer updates is
    swapped with its average (SWAP_ELEMENTS at a time: no second copy of the rank's part) and the working (bf16)
    weights refreshed from them; after it, swapped back and refreshed again, so training goes on from exactly the
    weights it had (the working weights are the masters' rounding either way)."""
    params = list(engine.module.parameters())
    _swap(engine)
    refresh_working_weights(engine, params)
    try:
        yield
    finally:
        _swap(engine)
        refresh_working_weights(engine, params)


SWAP_ELEMENTS = 1 << 24
"""The elements `_swap` exchanges at a time (64 MiB of fp32): the tensors the optimizer updates are mostly flat ones
(ZeRO-1/2/3's and BF16_Optimizer's partitions, FP16_Optimizer's groups), each nearly the rank's whole part, so a copy
of one whole would be a second copy of the part (parti-3b at ZeRO-0 bf16, DP=1: 12 GB more at each measurement)."""


def _swap(engine) -> None:
    state = base_optimizer(engine).state
    with torch.no_grad():
        for holder in optimizer_holders(engine):
            average = state[holder][EMA_KEY]
            # (a tensor that is not contiguous, none of DeepSpeed's, is swapped whole: it has no flat view)
            flat = holder.is_contiguous() and average.is_contiguous()
            pairs = zip(holder.detach().view(-1).split(SWAP_ELEMENTS), average.view(-1).split(SWAP_ELEMENTS)) \
                if flat else [(holder.detach(), average)]
            for weights, averaged in pairs:
                kept = weights.clone()
                weights.copy_(averaged)
                averaged.copy_(kept)


def saved_ema_decay(trainer_state: dict) -> float:
    """The train.ema_decay a checkpoint was saved with (its trainer_state.json's config): > 0 when it holds an
    average (0 for checkpoints of runs without one, or saved before there was one)."""
    return float((trainer_state.get("config") or {}).get("train", {}).get("ema_decay", 0) or 0)
