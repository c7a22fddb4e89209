"""Weight initialisation that draws only this rank's shard, with values that do not depend on the TP size.

    keys = InitKeys()
    init = ShardedNormalInit(0.02, keys)            # an `init_method` for megatron-core's TP layers
    out_init = ShardedNormalInit(0.02 / (2 * layers) ** 0.5, keys)

Why hand-written: megatron-core offers two initialisations, and neither gives both properties.
`use_cpu_initialization=True` draws every split weight's full master matrix on every rank and keeps
a slice (the same model at any TP size, but every rank pays for the whole model: ~20.5B draws and
~9.6 GiB of host memory per rank for parti-20b at TP=8); the default draws each shard from the rank's
own CUDA stream (cheap, but the weights then depend on the TP size). No library (torch, megatron-core,
DeepSpeed) draws a shard of a tensor as a slice of a layout-independent whole.

How. A weight is a sequence of slices along its partition dimension (`partition_dim`, which
megatron-core sets before it calls the init method): rows of a column-parallel weight or vocab-parallel
embedding, columns of a row-parallel weight; a weight without TP attributes is drawn whole, as rows.
Consecutive slices are grouped into tiles of c slices, and every tile is drawn on its own: by torch's
own `normal_` (what torch.nn.init.normal_ runs) from a CPU generator whose Mersenne-Twister state, all
624 words, comes from numpy's counter-based Philox generator with the weight's 128-bit key and the
counter tile * 2**64. So any tile can be drawn without the ones before it, and no two tiles of a
model share a stream (seeding the generator with torch's manual_seed would keep only 32 bits). c is a
power of two with c * 8 dividing the weight's number of slices and at most TILE_VALUES values per tile,
so the tiles nest in the shards of TP = 1, 2, 4, 8; at another TP size a rank also draws the whole
tiles its shard starts or ends inside. A rank fills a shard-sized CPU buffer with its tiles and copies
it to the parameter once (on a GPU: one host-to-device copy).

The key of a weight is (seed, n): `seed` is the default torch generator's seed when the parameter was
registered with its module, and n counts the weights initialised since that seed was set (the same
keys for a model's `init` and `out_init`: share one InitKeys). PartiModel and the pipeline seed the
default generator with init_seed + k before building piece k, so a weight's key depends on neither the
TP size (every layout makes the same init calls in the same order) nor on which pieces a rank builds.
The seed is read when the parameter is registered (a process-wide torch parameter-registration hook,
installed by the first ShardedNormalInit, records torch.initial_seed() and nothing else), not inside
the init call, because megatron-core calls `init_method` inside its model-parallel RNG fork, and on a
machine without a GPU that fork swaps the default generator's state (cpu_compat's tracker), seed
included, for the per-rank stream's. Nothing here draws from torch's default generators, so the fork's
streams are left as they were (and megatron-core's GPU fork sees no CPU RNG change to warn about).
"""
from __future__ import annotations

import functools
import math
import weakref

import numpy as np
import torch

TILE_VALUES = 1 << 16  # at most this many values per tile (a tile holds at least one slice)
TILE_ALIGN_TP = 8      # tiles nest exactly in the shards of every TP size that divides this

# Values drawn by this process, for tests and benchmarks: "split" for TP-partitioned weights (the
# rank's shard, plus the rest of any tile it starts or ends inside), "whole" for the others.
draw_counts = {"split": 0, "whole": 0}

_registered: tuple[weakref.ref, int] | None = None  # the latest registered parameter and the seed then
_hook = None


def _remember_seed(module, name, param):
    global _registered
    _registered = None if param is None else (weakref.ref(param), torch.initial_seed())


def _seed_of(tensor: torch.Tensor) -> int:
    """The default generator's seed outside any RNG fork: as it was when `tensor` was registered as a
    parameter (megatron-core registers a weight right before it forks and calls init_method), else now."""
    if _registered is not None and _registered[0]() is tensor:
        return _registered[1]
    return torch.initial_seed()


def _install_hook() -> None:
    global _hook
    if _hook is None:
        _hook = torch.nn.modules.module.register_module_parameter_registration_hook(_remember_seed)


class InitKeys:
    """Per-weight keys (seed, n): n counts the weights initialised since the seed last changed."""

    def __init__(self):
        self.seed: int | None = None
        self.n = 0

    def next(self, seed: int) -> tuple[int, int]:
        if seed != self.seed:
            self.seed, self.n = seed, 0
        key = (seed, self.n)
        self.n += 1
        return key


# torch's CPU generator state (CPUGeneratorImplState): initial seed (u64), left (i32), seeded (i32),
# next (u64), the 624 Mersenne-Twister words (each a u64 holding 32 bits), then the normal caches.
_MT_WORDS = slice(24, 24 + 624 * 8)


@functools.cache
def _mt_state_template() -> torch.Tensor:
    """A freshly seeded CPU generator state (left=1, next=0: the words are twisted before the first
    draw), after checking that its Mersenne-Twister words are where _MT_WORDS says."""
    template = torch.Generator().manual_seed(0).get_state()
    words = np.arange(1, 625, dtype=np.uint64) * 2654435761
    probe = template.clone()
    probe.numpy()[_MT_WORDS] = words.view(np.uint8)
    check = torch.Generator()
    check.set_state(probe)
    if not np.array_equal(check.get_state().numpy()[_MT_WORDS].view(np.uint64), words % 2**32):
        raise RuntimeError(f"torch {torch.__version__}: unexpected CPU generator state layout")
    return template


def _tile_generator(key_words: np.ndarray, tile: int) -> torch.Generator:
    """A CPU generator whose Mersenne-Twister words are the first 624 outputs of Philox(key) from
    counter tile * 2**64 (so tiles' streams are disjoint)."""
    state = _mt_state_template().clone()
    state.numpy()[_MT_WORDS] = np.random.Philox(key=key_words, counter=tile << 64).random_raw(624).view(np.uint8)
    generator = torch.Generator()
    generator.set_state(state)
    return generator


def tile_slices(full: int, slice_values: int) -> int:
    """Slices per tile for a weight of `full` slices of `slice_values` values each (see the module doc)."""
    c = 1
    while 2 * c * slice_values <= TILE_VALUES and full % (2 * c * TILE_ALIGN_TP) == 0:
        c *= 2
    return c


def shard_runs(local: int, rank: int, world: int, stride: int = 1) -> list[tuple[int, int, int]]:
    """This rank's slices of a weight split over `world` ranks as megatron-core splits it (chunks of
    local/stride slices dealt round-robin): [(first local slice, first global slice, count)]."""
    chunk = local // stride
    return [(j * chunk, (rank + j * world) * chunk, chunk) for j in range(stride)]


def draw_slices(key: tuple[int, int], full: int, slice_values: int, runs, out: torch.Tensor,
                std: float = 1.0) -> int:
    """N(0, std) values of slices `runs` ([(first local, first global, count)]) of a weight with key
    `key` and `full` slices of `slice_values` values, into the rows of `out` (contiguous float32 [local
    slices, slice_values]). Returns how many values were drawn."""
    c = tile_slices(full, slice_values)
    key_words = np.array([key[0] % 2**64, key[1] % 2**64], dtype=np.uint64)
    flat = out.view(-1)
    drawn = 0
    for local_start, g0, count in runs:
        for t in range(g0 // c, -(-(g0 + count) // c)):
            first, end = t * c, min((t + 1) * c, full)  # tile t's slices; a tile is always drawn whole
            a, b = max(g0, first), min(g0 + count, end)  # those of them that this rank keeps
            dst = flat[(local_start + a - g0) * slice_values:(local_start + b - g0) * slice_values]
            generator = _tile_generator(key_words, t)
            if (a, b) == (first, end):
                dst.normal_(0.0, std, generator=generator)
            else:
                tile = out.new_empty((end - first) * slice_values).normal_(0.0, std, generator=generator)
                dst.copy_(tile[(a - first) * slice_values:(b - first) * slice_values])
            drawn += (end - first) * slice_values
    return drawn


def _layout(tensor: torch.Tensor, world: int, rank: int) -> tuple[int, int, list[tuple[int, int, int]], bool]:
    """(partition dim, full number of slices, this rank's runs of slices, whether TP-split)."""
    if tensor.dim() == 0:
        return 0, 1, [(0, 0, 1)], False
    if not getattr(tensor, "tensor_model_parallel", False):
        return 0, tensor.shape[0], [(0, 0, tensor.shape[0])], False
    dim, stride = tensor.partition_dim, getattr(tensor, "partition_stride", 1)
    local = tensor.shape[dim]
    return dim, local * world, shard_runs(local, rank, world, stride), True


class ShardedNormalInit:
    """An init method (`fn(tensor)`, as megatron-core calls it) that fills `tensor` with N(0, std)
    values: this rank's shard of a layout-independent whole (see the module doc). `tp_group`: the
    tensor-parallel group the split tensors are sharded over (None: one rank holds them whole)."""

    def __init__(self, std: float, keys: InitKeys | None = None, tp_group=None):
        self.std = float(std)
        self.keys = keys if keys is not None else InitKeys()
        self.tp_size, self.tp_rank = (tp_group.size(), tp_group.rank()) if tp_group is not None else (1, 0)
        _install_hook()

    def __repr__(self) -> str:
        return f"ShardedNormalInit(std={self.std:g})"

    @torch.no_grad()
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta:
            return tensor
        key = self.keys.next(_seed_of(tensor))
        dim, full, runs, split = _layout(tensor, self.tp_size, self.tp_rank)
        shape = tensor.shape or (1,)
        local = shape[dim]
        slice_values = math.prod(shape) // local if local else 0
        # Slice-major (partition dim first), float32 on the CPU, allocated through numpy: deepspeed.zero.Init
        # (ZeRO-3) replaces torch.empty & co. with factories that allocate on the GPU, where the CPU generators
        # cannot draw, and cast every floating result to the training dtype whatever dtype was asked for;
        # torch 2.11's CPU normal_ draws other values into bf16 than into float32 (2.14's agree), so the
        # weights of a bf16 ZeRO-3 run would not be those of ZeRO-0/1.
        buf = torch.from_numpy(np.empty((local, slice_values), dtype=np.float32))
        if buf.numel():
            drawn = draw_slices(key, full, slice_values, runs, buf, self.std)
            draw_counts["split" if split else "whole"] += drawn
        rest = [s for i, s in enumerate(shape) if i != dim]
        tensor.copy_(buf.view(local, *rest).movedim(0, dim).reshape(tensor.shape))
        return tensor


def ensure_model_parallel_rng(tp_rank: int) -> None:
    """megatron-core calls init methods inside `get_cuda_rng_tracker().fork()`, which fails unless the
    model-parallel stream was seeded (seed_everything does). If it was not, seed it as seed_everything
    would from the default generator's seed (the stream only matters for dropout in split regions;
    seed_everything replaces it). The values this module draws do not depend on it."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    if mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME not in tracker.get_states():
        seed = (torch.initial_seed() + 2718 + tp_rank) % 2**63
        tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed)
