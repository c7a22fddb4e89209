"""Activation recomputation: none, selective (the attention core) or full (whole transformer layers).

    apply_activation_checkpointing(model, "full")     # PartiModel or a PipelineModule of its pieces

Uses torch's non-reentrant checkpoint and, in addition, snapshots megatron-core's RNG-tracker states
at the forward pass and restores them for the recomputation, so that dropout under
`get_cuda_rng_tracker().fork()` (attention dropout on split heads) draws the same masks twice. Neither
torch's checkpoint (default generators only) nor DeepSpeed's (its own tracker) covers megatron's tracker.
Parameter names are unchanged (the layers' forward is wrapped in place).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from model_parallel.layers import Attention, DecoderLayer, EncoderLayer
from model_parallel.layout import RECOMPUTE_MODES


class _RestoreTracker:
    """Context for a recomputation: megatron's tracker states as they were at the forward pass.
    A class (not @contextmanager): a pipeline stage may recompute the same checkpoint more than once."""

    def __init__(self, tracker, states):
        self.tracker, self.states = tracker, states

    def __enter__(self):
        self.current = self.tracker.get_states()
        self.tracker.set_states(dict(self.states))

    def __exit__(self, *exc):
        self.tracker.set_states(self.current)


def _tracker_restoring_contexts():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    # fork() replaces the state tensors rather than mutating them, so this snapshot stays valid.
    return contextlib.nullcontext(), _RestoreTracker(tracker, tracker.get_states())


def checkpointed(function, *args, **kwargs):
    """function(*args, **kwargs) with its activations recomputed in the backward pass."""
    return checkpoint(function, *args, use_reentrant=False, context_fn=_tracker_restoring_contexts, **kwargs)


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"activation checkpointing {mode!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    for module in model.modules():
        if mode == "full" and isinstance(module, EncoderLayer | DecoderLayer):
            module.forward = functools.partial(checkpointed, module.forward)
        elif mode == "selective" and isinstance(module, Attention):
            # Kept out of a compiled layer's graph (kernels.compile): compiled checkpoints refuse the
            # context that restores megatron's RNG tracker for the fused kernel's attention dropout.
            module.attention = torch.compiler.disable(functools.partial(checkpointed, module.attention))
    return model
