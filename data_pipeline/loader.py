"""This rank's micro-batches, read ahead by DataLoader workers while the model trains on earlier ones.

    drop = CaptionDrop(seed=1234, prob=0.1, pad_id=0, eos_id=3)
    reader = ReadAhead(dataset, sampler, consumed=640, steps=100, dp_rank=1, dp_size=4, micro_batch_size=4,
                       drop=drop, workers=2, read_ahead_steps=2, pin_memory=True)
    for _ in range(100):
        micro_batches = reader.next_step()   # [(text, codes, positions)], as rank_micro_batches(...) gives them
    reader.close()
    positions = StepPositions(sampler, consumed=640, steps=100, dp_rank=1, dp_size=4, micro_batch_size=4)
    positions.next_step()                    # [(None, None, positions)]: the same positions, no samples read

What a step reads is decided in the training process alone: `StepBatchSampler` turns (seed, epoch,
consumed) into this rank's micro-batches of (stream position, sample id) pairs, step after step, exactly
as `rank_micro_batches` (the synchronous reference) cuts them; the workers only fetch and stack those
samples and apply the caption drops, which are a pure function of (seed, stream position). The
DataLoader hands batches back in the sampler's order whatever the number of workers, so the batches
do not depend on `workers`, on the layout beyond the rank's slice, or on where a run was resumed: a
resume makes a new reader at the resumed `consumed`.

workers = 0 reads in the training process, when the step asks (no read-ahead). Workers are forked
from the training process (the dataset's index is shared copy-on-write, its read-only file descriptors are
inherited: records are read with os.pread, which shares no file position), live as long as the
reader, and leave stop signals to the training process (which saves, then closes the reader);
`pin_memory` puts batches in page-locked memory for faster copies to the GPU.
"""
from __future__ import annotations

import math
import multiprocessing
from typing import NamedTuple

import torch

from common.cli import exit_promptly
from common.preemption import start_helper
from model_parallel.model import caption_drop_mask, null_condition


class CaptionDrop(NamedTuple):
    """Classifier-free guidance's caption drops: which samples get the null caption [EOS, PAD, ...]."""

    seed: int
    prob: float
    pad_id: int
    eos_id: int


def rank_micro_batch_ids(sampler, consumed: int, dp_rank: int, dp_size: int,
                         micro_batch_size: int) -> list[torch.Tensor]:
    """This DP rank's micro-batches of the global batch starting at `consumed`, each an int64 [b, 2] of
    (position in the sample stream, sample id)."""
    return list(torch.stack(sampler.rank_batch(consumed, dp_rank, dp_size), 1).split(micro_batch_size))


def collate(samples: list, drop: CaptionDrop) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[((text, codes), position)...] -> (text [b, T] with dropped captions nulled, codes [b, I], positions [b])."""
    text = torch.stack([s[0][0] for s in samples])
    codes = torch.stack([s[0][1] for s in samples])
    positions = torch.tensor([s[1] for s in samples], dtype=torch.long)
    nulled = null_condition(text, caption_drop_mask(positions, drop.seed, drop.prob), drop.pad_id, drop.eos_id)
    return nulled, codes, positions


def read_sample(dataset, index: int, position: int):
    """Sample `index` of the dataset at stream position `position`: a blend (code_shards.MixedDataset) draws
    its datasets' records by the position's epoch too, so each epoch continues through them."""
    at_epoch = getattr(dataset, "at_epoch", None)
    return at_epoch(index, position // len(dataset)) if at_epoch else dataset[index]


def read_micro_batch(dataset, ids: torch.Tensor, drop: CaptionDrop):
    """One micro-batch, read now: `ids` an int64 [b, 2] of (position, sample id)."""
    return collate([(read_sample(dataset, int(i), int(p)), int(p)) for p, i in ids.tolist()], drop)


class StepBatchSampler(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: for `steps` steps from `consumed` on, this rank's micro-batches as
    lists of (position, sample id), in training order."""

    def __init__(self, sampler, consumed: int, steps: int, dp_rank: int, dp_size: int, micro_batch_size: int):
        self.sampler, self.consumed, self.steps = sampler, consumed, steps
        self.dp_rank, self.dp_size, self.micro_batch_size = dp_rank, dp_size, micro_batch_size
        # (the most a step takes: the full global batch's; fewer while it ramps up, sampler.batch_size_at)
        self.per_step = -(-sampler.global_batch_size // (dp_size * micro_batch_size))

    def step_ids(self, consumed: int) -> list[torch.Tensor]:
        return rank_micro_batch_ids(self.sampler, consumed, self.dp_rank, self.dp_size, self.micro_batch_size)

    def micro_batches_at(self, consumed: int) -> int:
        """How many micro-batches the step starting at `consumed` has on this rank."""
        return -(-self.sampler.batch_size_at(consumed) // (self.dp_size * self.micro_batch_size))

    def step_starts(self):
        """The stream position each of the steps starts at."""
        consumed = self.consumed
        for _ in range(self.steps):
            yield consumed
            consumed += self.sampler.batch_size_at(consumed)

    def __iter__(self):
        for start in self.step_starts():
            for chunk in self.step_ids(start):
                yield [tuple(pair) for pair in chunk.tolist()]

    def __len__(self) -> int:
        return sum(map(self.micro_batches_at, self.step_starts()))


class StepPositions:
    """ReadAhead's micro-batches without their samples, for a rank that reads none (training.engine.sample_role):
    each step's micro-batches as (None, None, positions), the positions from the sampler alone (no dataset, no
    workers); the same `next_step()` and `consumed`."""

    def __init__(self, sampler, consumed: int, steps: int, dp_rank: int, dp_size: int, micro_batch_size: int):
        self.batches = StepBatchSampler(sampler, consumed, steps, dp_rank, dp_size, micro_batch_size)
        self.consumed, self.left, self.workers = consumed, steps, 0

    def next_step(self) -> list[tuple[None, None, torch.Tensor]]:
        if self.left <= 0:
            raise RuntimeError(f"made for {self.batches.steps} steps from {self.batches.consumed}; all have been "
                               "given (or it was closed)")
        out = [(None, None, ids[:, 0].contiguous()) for ids in self.batches.step_ids(self.consumed)]
        self.consumed += self.batches.sampler.batch_size_at(self.consumed)
        self.left -= 1
        return out

    def close(self) -> None:
        self.left = 0


class _Samples(torch.utils.data.Dataset):
    """(position, sample id) -> ((text, codes), position): what `collate` stacks."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, pair):
        position, index = pair
        return read_sample(self.dataset, index, position), position


class _Collate:
    def __init__(self, drop: CaptionDrop):
        self.drop = drop

    def __call__(self, samples):
        return collate(samples, self.drop)


# Forked, not spawned (the default in a process that was itself spawned): a spawned worker imports the
# training stack again (seconds to a minute) and would be sent a copy of the dataset.
_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class ReadAhead:
    """This rank's micro-batches for `steps` steps from `consumed` on, read by `workers` DataLoader worker
    processes up to `read_ahead_steps` steps ahead of the one being trained (workers = 0: read in this
    process when asked). Reading starts when it is made. `next_step()` returns the next step's
    micro-batches; `consumed` is the stream position of the step it will return next."""

    def __init__(self, dataset, sampler, consumed: int, steps: int, dp_rank: int, dp_size: int,
                 micro_batch_size: int, drop: CaptionDrop, workers: int = 2, read_ahead_steps: int = 2,
                 pin_memory: bool = False):
        if workers < 0 or read_ahead_steps < 1:
            raise ValueError(f"workers={workers} must be >= 0 and read_ahead_steps={read_ahead_steps} >= 1")
        self.batches = StepBatchSampler(sampler, consumed, steps, dp_rank, dp_size, micro_batch_size)
        self.consumed, self.left, self.workers = consumed, steps, workers
        in_flight = read_ahead_steps * self.batches.per_step  # micro-batches requested ahead, over all workers
        if workers:  # (they ignore SIGTERM: a process that leaves them running, e.g. on an error, must still exit)
            exit_promptly()
        self.loader = torch.utils.data.DataLoader(
            _Samples(dataset), batch_sampler=self.batches, collate_fn=_Collate(drop), num_workers=workers,
            worker_init_fn=start_helper, multiprocessing_context=_FORK if workers else None,
            prefetch_factor=math.ceil(in_flight / workers) if workers else None, pin_memory=pin_memory,
            persistent_workers=False)  # one iterator spans the reader's life: the workers start once, here
        self._it = iter(self.loader) if steps > 0 else None  # reading ahead starts now

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.left <= 0 or self._it is None:
            raise RuntimeError(f"the reader was made for {self.batches.steps} steps from {self.batches.consumed}; "
                               "all have been read (or it was closed)")
        out = [next(self._it) for _ in range(self.batches.micro_batches_at(self.consumed))]
        self.consumed += self.batches.sampler.batch_size_at(self.consumed)
        self.left -= 1
        return out

    def close(self) -> None:
        """Stop the workers (what they read ahead is dropped)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ would call
        if shutdown is not None:
            shutdown()
