"""The training sample order: a pure function of (seed, epoch, consumed samples).

    sampler = GlobalBatchSampler(dataset_len=len(ds), global_batch_size=64, seed=1234)
    idx = sampler.global_batch(consumed=640)                  # the 64 stream positions' sample ids
    mine = sampler.rank_slice(idx, dp_rank=1, dp_size=4)      # this DP rank's 16, in micro-batch order
    ramped = GlobalBatchSampler(len(ds), 64, 1234, ramp=BatchRamp(16, 16, 100_000))
    ramped.batch_size_at(consumed=640)                        # 16: the global batch of the step starting there

Sample k of the stream is `permutation(seed, epoch=k // N)[k % N]`. A global batch is the same samples
whatever the data-parallel size (DP ranks take contiguous slices of it), so a run resumed on another
number of nodes continues the same stream; the sampler's whole state is `consumed`.

The permutation (`order="feistel"`) is computed where it is needed, position by position, by a keyed
Feistel network over [0, N): nothing is held per sample, so every rank's cost is that of its batches,
whatever N (a stored `torch.randperm` costs 8 bytes per sample per rank and epoch held: 3.2 GB at
LAION-400M, 32 GB at 4B samples). `order="randperm"`, the order of runs begun before, is kept for them
(their checkpoints record no order) so that they continue their own stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

ORDERS = ("feistel", "randperm")
_ROUNDS = 6  # Feistel rounds, 3 per half (a balanced network is pseudo-random from 4)


@dataclass(frozen=True)
class BatchRamp:
    """A global batch that grows with the samples consumed (train.rampup_batch_size; Megatron-LM's
    --rampup-batch-size START INCREMENT SAMPLES): `start` at first, `increment` more after each of the equal
    shares of the first `samples` consumed that take it to the full size (megatron-core's
    RampupBatchsizeNumMicroBatchesCalculator)."""

    start: int
    increment: int
    samples: int

    def size_at(self, consumed: int, full: int) -> int:
        """The global batch of the step that starts at `consumed` samples, the full one being `full`."""
        increments = (full - self.start) // self.increment
        if consumed > self.samples or increments <= 0:
            return full
        return min(full, self.start + int(consumed / (self.samples / increments)) * self.increment)


class GlobalBatchSampler:
    def __init__(self, dataset_len: int, global_batch_size: int, seed: int, order: str = "feistel",
                 ramp: BatchRamp | None = None):
        if dataset_len <= 0:
            raise ValueError("the dataset is empty")
        if order not in ORDERS:
            raise ValueError(f"sampler order {order!r}: expected one of {', '.join(ORDERS)}")
        self.n, self.global_batch_size, self.seed, self.order = dataset_len, global_batch_size, seed, order
        self.ramp = ramp

    def batch_size_at(self, consumed: int) -> int:
        """The global batch of the step that starts at `consumed` samples: global_batch_size, or less while the
        batch ramps up (`ramp`)."""
        return self.ramp.size_at(consumed, self.global_batch_size) if self.ramp else self.global_batch_size

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def permute(self, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """permutation(seed, epoch)[index] for int64 indices in [0, N)."""
        if self.order == "randperm":
            return self._permutation(epoch)[index]
        return feistel_permute(index, self.n, self.seed * 100_003 + epoch)

    def stream(self, start: int, count: int) -> torch.Tensor:
        """Sample ids at stream positions start .. start+count-1 (across epoch boundaries)."""
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            sel = pos // self.n == epoch
            out[sel] = self.permute(epoch, pos[sel] % self.n)
        return out

    def global_batch(self, consumed: int) -> torch.Tensor:
        return self.stream(consumed, self.batch_size_at(consumed))

    def rank_batch(self, consumed: int, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream positions, sample ids) of this DP rank's slice of the global batch at `consumed`:
        rank_slice of global_batch, computed for the rank's positions alone."""
        size = self.batch_size_at(consumed)
        if size % dp_size:
            raise ValueError(f"global batch of {size} does not split over {dp_size} data-parallel ranks")
        per = size // dp_size
        start = consumed + dp_rank * per
        return torch.arange(start, start + per), self.stream(start, per)

    @staticmethod
    def rank_slice(batch: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
        if len(batch) % dp_size:
            raise ValueError(f"global batch of {len(batch)} does not split over {dp_size} data-parallel ranks")
        per = len(batch) // dp_size
        return batch[dp_rank * per:(dp_rank + 1) * per]

    def state_dict(self, consumed: int) -> dict:
        return {"consumed": consumed, "seed": self.seed, "dataset_len": self.n,
                "global_batch_size": self.global_batch_size, "order": self.order}


def feistel_permute(index: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """A keyed bijection of [0, n) applied to `index`: a Feistel network on the bits of n - 1 (high and low
    halves, each round changing one half by a keyed hash of the other), cycle-walked: a value >= n is
    encrypted again until it lands below n (the domain is < 2n: a few passes). Written here because no
    library offers a stateless permutation of a range this size; hashes keep values below 2**32 before
    multiplying, so int64 never overflows."""
    low_bits = max(1, (n - 1).bit_length()) // 2
    high_mask, low_mask = (1 << (max(1, (n - 1).bit_length()) - low_bits)) - 1, (1 << low_bits) - 1
    keys = [_hash32(torch.tensor((key * _ROUNDS + r) & 0xFFFFFFFF)).item() for r in range(_ROUNDS)]

    def encrypt(x: torch.Tensor) -> torch.Tensor:
        high, low = x >> low_bits, x & low_mask
        for r, k in enumerate(keys):
            if r % 2:
                low = low ^ (_hash32(high ^ k) & low_mask)
            else:
                high = high ^ (_hash32(low ^ k) & high_mask)
        return (high << low_bits) | low

    out = encrypt(index.to(torch.int64))
    while (outside := out >= n).any():  # (whole-tensor passes: cheaper than indexing the few left each time)
        out = torch.where(outside, encrypt(out), out)
    return out


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function (multiply / xor-shift, as in common integer hashes) on int64 values."""
    x = x & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x
