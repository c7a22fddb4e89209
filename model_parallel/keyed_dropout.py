"""Dropout keyed by sample: masks that are the same at any DP/TP/PP layout, and their compiled kernel.

    key = dropout_site_key(seed, piece, site)
    keep = keyed_keep_mask(sample_index, key, p, x.shape, batch_dim=1)   # bool, True with probability 1 - p
    y = keyed_dropout(x, keep, p)
    keep = compiled_keep_mask()(sample_index, key, p, x.shape, batch_dim=1)   # the same mask, one fused kernel

A keyed mask is a pure function of (seed, piece, site, the sample's position in the run's sample stream,
the element's index in the whole, unsharded tensor), like caption_drop_mask: no generator state, so a
sample gets the same mask whichever DP rank, pipeline stage or sequence shard computes it, in a resumed
run and in a recomputation (activation checkpointing). The hash is integer arithmetic on int64 tensors
on the activation's device (vectorised, no host sync, on GPU as on CPU), none when dropout is 0.

Why a compiled kernel (`kernels.dropout_mask`, model_parallel/kernels.py; `auto` picks it on a GPU): run
eagerly the hash is ~12 elementwise int64 operations over every element of a dropout site, each reading and
writing the whole tensor (228 bytes per element at batch 8, against 9 for applying the mask to bf16): on a
GPU, where such work runs at memory bandwidth, an estimated match for the layers' matmuls at parti-350m.
Compiled (inductor), the mask is one kernel that reads nothing per element and writes one byte.
bench/keyed_dropout.py counts the bytes and times both.
"""
from __future__ import annotations

import functools
import math

import torch

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (hash-prospector's 0x21f0aaad/0x735a2d97 finaliser) of values in [0, 2^32),
    on Python ints or int64 tensors alike. Both multipliers are below 2^31, so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def dropout_site_key(seed: int, piece: int, site: int) -> int:
    """The 32-bit key of dropout site `site` of model piece `piece` (model.piece_classes) under `seed`."""
    key = _mix32((seed & _M32) ^ 0x5EED0D20)
    for part in (seed >> 32 & _M32, piece, site):
        key = _mix32(key ^ _mix32(part + 0x9E3779B9 & _M32))
    return key


def keyed_keep_mask(sample_index: torch.Tensor, key: int | torch.Tensor, p: float, shape, batch_dim: int,
                    offsets=None, full=None) -> torch.Tensor:
    """Bool keep-mask of `shape` (True with probability 1 - p) for a tensor whose dimension `batch_dim`
    holds the samples `sample_index` (int64 [b], >= 0) and whose other dimensions are a shard of a whole
    of sizes `full` starting at `offsets` (default: the tensor is the whole). Each element's bit depends on
    (key, its sample's index, its index in the whole) only, so any slice of samples or of the whole gets
    the slice of the same mask."""
    full = list(full or shape)
    offsets = list(offsets or [0] * len(shape))
    per_sample = math.prod([n for dim, n in enumerate(full) if dim != batch_dim])  # (a list: compile traces it)
    if per_sample > 2**32:
        raise ValueError(f"keyed dropout indexes each sample's elements in 32 bits; {per_sample} is too many")
    device = sample_index.device
    index, stride = torch.zeros((), dtype=torch.long, device=device), 1
    for dim in reversed(range(len(shape))):
        if dim == batch_dim:
            continue
        view = [1] * len(shape)
        view[dim] = shape[dim]
        index = index + (torch.arange(shape[dim], device=device) + offsets[dim]).view(view) * stride
        stride *= full[dim]
    element = _mix32(index ^ key)  # (the tensor without its batch dimension: computed once for all samples)
    view = [1] * len(shape)
    view[batch_dim] = shape[batch_dim]
    samples = sample_index.to(device=device, dtype=torch.long).view(view)
    sample = _mix32(_mix32((samples & _M32) ^ _mix32(key ^ 0x2545F491)) ^ (samples >> 32))
    return _mix32(element ^ sample) >= round(p * 2**32)


@functools.cache
def compiled_keep_mask():
    """`keyed_keep_mask` through torch.compile (inductor): equal masks, one fused kernel per call. Dynamic
    shapes from the first call, so that the sites' shapes (encoder, decoder, attention probabilities;
    micro-batch sizes) share a few graphs instead of recompiling per shape. Inside a compiled layer
    (kernels.compile) dynamo traces through it as through the eager function."""
    return torch.compile(keyed_keep_mask, dynamic=True)


def keyed_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x where `keep`, else 0, scaled by 1/(1-p) (autograd keeps the bool mask, as F.dropout does)."""
    return torch.where(keep, x, 0.0) * (1.0 / (1.0 - p))
