"""Endless training crops from LAION-style shards, for the image models (tokenizer, upsampler).

    stream = CropStream("laion/{00000..00099}.tar", crop=256, resize=288, rank=0, world=8, seed=1234, workers=8)
    image = next(stream)             # uint8 [3, 256, 256]
    state = stream.state_dict()      # where it is: saved with a checkpoint
    restore_stream(stream, saved_states, consumed, checkpoint)   # on resume (each rank takes its own)

Each rank reads and decodes only its own part of a pass over the shards, so its cost falls with the world
size: with at least as many shards as ranks, rank r of `world` takes the shards r, r + world, ... (as
webdataset's split_by_node: a rank takes floor or ceil of shards / world of them, and a LAION download has
thousands); with fewer (small datasets), it takes the samples r, r + world, ... counted over all shards (as
DistributedSampler splits indices), and reads the others' bytes without decoding them. Every kept image of
them (data_pipeline/images.py's filters) is resized (shorter side) and centre-cropped to `resize` (or `crop` when resize
is 0), then, through a 256-image shuffle buffer, randomly cropped to `crop` and flipped. The stream is a pure function
of (pattern, seed, rank, world), the same at any number of decoding `workers` (processes, started once per
stream, that decode and resize the next samples while the model trains; 0: in the training process).

A resumed trainer continues the stream from its saved state: the position in the shards, the shuffle
generator and which samples fill the buffer (those are decoded again, at most 256). Replaying the stream
from its start, as the trainers did before, decoded every image the run had ever seen: hours at step 100k of
a large batch. Replay remains for checkpoints without a state and for a resume at another world size.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from common.checkpoints import CheckpointError
from common.cli import exit_promptly
from common.preemption import start_helper
from data_pipeline.images import FilterConfig, ImageFilter, Prepared, PreparedSamples, in_turns, prepare_sample
from data_pipeline.laion import check_is_tar, expand_shards, read_shard

BUFFER = 256
"""Images in the shuffle buffer."""
BATCH = 16
"""Samples per message from a decoding worker (one message per sample cost a worker a fifth of its speed in
bench/image_stream.py)."""


class CropStream:
    def __init__(self, pattern: str, crop: int, resize: int, rank: int, world: int, seed: int, workers: int = 0,
                 min_size: int = 64):
        """`min_size`: images whose shorter side is below it are skipped (counted `too_small`); those between it and
        `resize` are enlarged to `resize` (the upsampler passes its high-resolution side: no interpolated images as
        targets)."""
        self.pattern, self.paths, self.crop = pattern, expand_shards(pattern), crop
        # The shards this rank reads, checked before the first step: a wrong file found hours in stopped the run
        # then. (Its own only: every rank opening all of LAION's 41,000 shards would be a metadata storm.)
        for shard, path in enumerate(self.paths):
            if not by_shard(len(self.paths), world) or shard % world == rank:
                check_is_tar(path)
        side = resize or crop
        self.prep = ImageFilter(image_size=side, min_size=min(min_size, side))
        self.rank, self.world = rank, world
        self.workers = workers
        self.rng = random.Random(seed * 1000 + rank)
        self.buffer: list[tuple[tuple[int, int], torch.Tensor]] = []  # ((shard, position in it), image)
        self.shard = self.position = 0  # the next raw sample to read
        # samples read before it in this pass (when the samples are split: rank r's have index % world == r)
        self.index = 0
        self.kept = 0  # this rank's kept images in this pass
        self._images = self._generate()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._images)

    def _generate(self) -> Iterator[torch.Tensor]:
        """The stream from the current state; the state is up to date whenever an image has been yielded."""
        samples = _RankSamples(self.paths, self.prep, self.rank, self.world, (self.shard, self.position, self.index))
        if self.workers:  # forked, as the training's read-ahead workers: they only decode (no CUDA, no collectives)
            exit_promptly()  # (they ignore SIGTERM: a process that leaves them running must still exit)
            loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=self.workers,
                                                 multiprocessing_context="fork", in_order=True,  # (the turns)
                                                 worker_init_fn=start_helper)  # (the trainer's to handle)
            decoded = itertools.chain.from_iterable(loader)
        else:
            decoded = itertools.chain.from_iterable(samples)
        for sample in decoded:
            if isinstance(sample, int):  # a pass over the shards ends: `sample` samples in it
                self._end_pass(sample)
                while self.buffer:  # drain the buffer, then start the next pass
                    yield self._take()
                self.shard = self.position = self.index = self.kept = 0
                continue
            (self.shard, self.position, self.index), image = sample
            if image is not None:
                self.kept += 1
                self.buffer.append(((self.shard, self.position), _owned(image)))
            self.position, self.index = self.position + 1, self.index + 1
            if len(self.buffer) >= BUFFER:
                yield self._take()

    def _end_pass(self, samples: int) -> None:
        if self.kept == 0:  # (else the stream would read the shards forever)
            part = (f"the shards {self.rank}, {self.rank} + {self.world}, ... ({samples} samples)"
                    if by_shard(len(self.paths), self.world) else
                    f"every {self.world}-th of the {samples} samples from sample {self.rank}")
            raise ValueError(f"{self.pattern}: data-parallel rank {self.rank} of {self.world} takes {part}, and none "
                             f"of them has a usable image (decodable, a shorter side of at least {self.prep.min_size} "
                             f"px, sides at most {self.prep.max_aspect:g}:1)")
        self.shard, self.position, self.index = len(self.paths), 0, samples

    def close(self) -> None:
        """Stop the decoding processes (none without workers); the stream ends."""
        self._images.close()

    def _decode(self, raws: Iterator[dict]) -> Iterator[torch.Tensor | None]:
        """Each raw sample's image (None if not kept), in order, by the decoding workers if there are any."""
        if self.workers == 0:
            prepared = (prepare_sample(raw, self.prep) for raw in raws)
        else:
            exit_promptly()
            batches = torch.utils.data.DataLoader(PreparedSamples(list(raws), self.prep), batch_size=BATCH,
                                                  collate_fn=list, num_workers=self.workers,
                                                  multiprocessing_context="fork", worker_init_fn=start_helper)
            prepared = itertools.chain.from_iterable(batches)
        return map(_kept_image, prepared)

    def _take(self) -> torch.Tensor:
        _, image = self.buffer.pop(self.rng.randrange(len(self.buffer)))
        return _random_crop(image, self.crop, self.rng)

    def state_dict(self) -> dict:
        """Plain data (checkpoints load with weights_only): the position, the generator, the buffer's samples."""
        version, internal, gauss = self.rng.getstate()
        return {"shards": len(self.paths), "names": self.names_hash(), "rank": self.rank, "world": self.world,
                "shard": self.shard,
                "position": self.position, "index": self.index, "kept": self.kept,
                "buffer": [list(ref) for ref, _ in self.buffer],
                "rng": [version, list(internal), gauss]}

    def names_hash(self) -> str:
        """What the saved state knows of the shards' identity: a hash of their file names (not the folder: data
        moved elsewhere is the same data)."""
        return hashlib.sha256("\n".join(path.name for path in self.paths).encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was; the buffer's samples are read and decoded again. ValueError if the
        state is another stream's (shard count, rank, world) or a buffered sample is no longer usable."""
        mine = {"shards": len(self.paths), "rank": self.rank, "world": self.world}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"the saved data stream is of {theirs}, this one of {mine}")
        wanted = {tuple(ref) for ref in state["buffer"]}
        images = {}
        for shard in sorted({s for s, _ in wanted}):
            raws = [(position, raw) for position, raw in enumerate(read_shard(self.paths[shard], Counter()))
                    if (shard, position) in wanted]
            for (position, raw), image in zip(raws, self._decode(raw for _, raw in raws), strict=True):
                if image is None:
                    raise ValueError(f"{self.paths[shard]}: sample {position} ({raw.get('__key__')}) was in the "
                                     "saved shuffle buffer but is now skipped: the shard changed")
                images[(shard, position)] = _owned(image)
        if missing := wanted - images.keys():
            raise ValueError(f"{self.paths[min(missing)[0]]}: sample {min(missing)[1]} of the saved shuffle buffer "
                             "is gone: the shard changed")
        self.buffer = [(ref, images[ref]) for ref in map(tuple, state["buffer"])]
        self.shard, self.position, self.index, self.kept = (state[k] for k in ("shard", "position", "index", "kept"))
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self._images.close()  # (its decoding processes, if it had started)
        self._images = self._generate()


def _owned(image: torch.Tensor) -> torch.Tensor:
    """The image in this process's memory. A decoding worker's tensor arrives in shared memory that keeps a file
    descriptor open while it lives: the shuffle buffer's 256 held 256 (near a common limit of 1024 open files,
    with the training's loaders beside it); a copy (0.2 MB) lets it go."""
    return image.clone() if image.is_shared() else image


def _kept_image(prepared: Prepared) -> torch.Tensor | None:
    return prepared.image if prepared.reason is None else None


def by_shard(shards: int, world: int) -> bool:
    """Whether the ranks split the shards (else the samples): when each gets at least one."""
    return shards >= world


class _RankSamples(torch.utils.data.IterableDataset):
    """One rank's samples from `start` = (shard, position, index) on, endlessly, in lists of BATCH: each
    ((shard, position, index), uint8 image or None when the filters drop it), and, where a pass over the shards
    ends, the number of samples it read (index counts them). DataLoader workers take the lists in turns (worker
    w of W the lists w, w + W, ...), the order in which the loader hands them back: the same stream at any number
    of workers. Each worker reads the rank's shards (the page cache shares them) and decodes only its lists."""

    def __init__(self, paths: list[str], prep: FilterConfig, rank: int, world: int, start: tuple[int, int, int]):
        super().__init__()
        self.paths, self.prep, self.rank, self.world, self.start = paths, prep, rank, world, start
        self.by_shard = by_shard(len(paths), world)

    def __iter__(self) -> Iterator[list]:
        for batch, mine in in_turns(self._raw(), BATCH):  # (the stream is endless)
            if mine:
                yield [item if isinstance(item, int) else (item[0], _kept_image(prepare_sample(item[1], self.prep)))
                       for item in batch]

    def _raw(self) -> Iterator[tuple[tuple[int, int, int], dict] | int]:
        first_shard, first_position, index = self.start
        while True:
            for shard in range(first_shard, len(self.paths)):
                if self.by_shard and shard % self.world != self.rank:
                    continue
                raws = itertools.islice(read_shard(self.paths[shard], Counter()), first_position, None)
                for position, raw in enumerate(raws, first_position):
                    if self.by_shard or index % self.world == self.rank:
                        yield (shard, position, index), raw
                    index += 1
                first_position = 0
            yield index
            first_shard = first_position = index = 0


def gather_stream_states(stream: CropStream) -> list[dict]:
    """Every rank's stream state, on every rank (a collective: all ranks call it before rank 0 saves)."""
    states = [None] * stream.world
    if stream.world > 1:
        dist.all_gather_object(states, stream.state_dict())
    else:
        states[0] = stream.state_dict()
    return states


def restore_stream(stream: CropStream, saved: list[dict] | None, consumed: int, checkpoint: Path) -> str:
    """Put the stream where `checkpoint` left it: from this rank's saved state when the checkpoint has one
    of this world size, else by replaying its first `consumed` images; from the start of the data when its shards
    have other file names than the saved stream's (other data: the saved positions mean nothing there). Returns
    how, for the log; a CheckpointError when the shards no longer hold what the saved state refers to."""
    names = {state.get("names") for state in saved or () if isinstance(state, dict)} - {None}  # (None: older)
    if names and names != {stream.names_hash()}:
        return ("data stream started at the beginning of the data: its shards are not the checkpoint's (other file "
                "names; the data changes from this step on)")
    if saved is not None and len(saved) == stream.world and "index" in saved[stream.rank]:
        try:
            stream.load_state_dict(saved[stream.rank])
        except ValueError as e:
            raise CheckpointError(f"{checkpoint}: {e}") from None
        return "data stream continued from its saved position"
    for _ in range(consumed):
        next(stream)
    why = ("the checkpoint has no stream state" if saved is None else f"it was saved at world size {len(saved)}"
           if len(saved) != stream.world else "it was saved by an older version that split the images after decoding")
    return f"data stream replayed from its start ({consumed} images per rank: {why})"


def _random_crop(image: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    top, left = rng.randint(0, image.shape[1] - size), rng.randint(0, image.shape[2] - size)
    crop = image[:, top:top + size, left:left + size]
    return crop.flip(-1) if rng.random() < 0.5 else crop


def center_crops(pattern: str, size: int, limit: int, min_size: int = 64) -> torch.Tensor:
    """The first `limit` kept images of the shards (shorter side >= min_size, or size if smaller), resized
    (shorter side) and centre-cropped to `size`: uint8 [N, 3, size, size], the same on every call (held-out
    evaluation images)."""
    prep, images = ImageFilter(image_size=size, min_size=min(min_size, size)), []
    for path in expand_shards(pattern):
        for raw in read_shard(path, Counter()):
            p = prepare_sample(raw, prep)
            if p.reason is None:
                images.append(p.image)
            if len(images) == limit:
                return torch.stack(images)
    if not images:
        raise ValueError(f"{pattern}: no usable image (decodable, a shorter side of at least {prep.min_size} px, "
                         f"sides at most {prep.max_aspect:g}:1)")
    return torch.stack(images)
