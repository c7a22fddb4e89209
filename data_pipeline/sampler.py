"""The training sample order: a pure function of (seed, epoch, consumed samples).

    sampler = GlobalBatchSampler(dataset_len=len(ds), global_batch_size=64, seed=1234)
    idx = sampler.global_batch(consumed=640)                  # the 64 stream positions' sample ids
    mine = sampler.rank_slice(idx, dp_rank=1, dp_size=4)      # this DP rank's 16, in micro-batch order

Sample k of the stream is `permutation(seed, epoch=k // N)[k % N]`. A global batch is the same samples
whatever the data-parallel size (DP ranks take contiguous slices of it), so a run resumed on another
number of nodes continues the same stream; the sampler's whole state is `consumed`.
"""
from __future__ import annotations

from functools import lru_cache

import torch


class GlobalBatchSampler:
    def __init__(self, dataset_len: int, global_batch_size: int, seed: int):
        if dataset_len <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.global_batch_size, self.seed = dataset_len, global_batch_size, seed

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def stream(self, start: int, count: int) -> torch.Tensor:
        """Sample ids at stream positions start .. start+count-1 (across epoch boundaries)."""
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            sel = pos // self.n == epoch
            out[sel] = self._permutation(epoch)[pos[sel] % self.n]
        return out

    def global_batch(self, consumed: int) -> torch.Tensor:
        return self.stream(consumed, self.global_batch_size)

    @staticmethod
    def rank_slice(batch: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
        if len(batch) % dp_size:
            raise ValueError(f"global batch of {len(batch)} does not split over {dp_size} data-parallel ranks")
        per = len(batch) // dp_size
        return batch[dp_rank * per:(dp_rank + 1) * per]

    def state_dict(self, consumed: int) -> dict:
        return {"consumed": consumed, "seed": self.seed, "dataset_len": self.n,
                "global_batch_size": self.global_batch_size}
