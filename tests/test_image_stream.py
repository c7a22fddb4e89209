"""The image models' crop stream (data_pipeline/image_stream.py) resumed from its saved state equals the
uninterrupted stream, image for image, at any point (mid-shard, at a pass's end, in the next pass), on
each data-parallel rank and with decoding workers, while decoding only the buffered samples again; each rank
decodes only its own samples; a checkpoint without a state, of another world size or of an older version
replays the stream; a shard that changed under a saved buffer is refused, naming it."""
from __future__ import annotations

import itertools
import multiprocessing

import pytest
import torch

from common.checkpoints import CheckpointError
from data_pipeline import image_stream
from data_pipeline.image_stream import CropStream, restore_stream
from tests import laion_fixtures as lf

BUFFER = 6  # small, so that the stream yields mid-shard long before a pass ends


@pytest.fixture
def shards(tmp_path, monkeypatch):
    """3 shards of 9 samples; one sample per shard has no image (read, counted in the position, not kept)."""
    monkeypatch.setattr(image_stream, "BUFFER", BUFFER)
    for s in range(3):
        samples = lf.synthetic_samples(9, offset=9 * s)
        samples[4][1].pop("jpg")
        lf.write_tar(tmp_path / f"{s:05d}.tar", samples)
    return str(tmp_path / "{00000..00002}.tar")


def stream(pattern: str, rank: int = 0, world: int = 1, workers: int = 0) -> CropStream:
    return CropStream(pattern, crop=32, resize=40, rank=rank, world=world, seed=3, workers=workers)


def take(s: CropStream, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(s, n))


@pytest.mark.parametrize("world", [1, 2])
def test_resumed_stream_equals_the_uninterrupted_one(shards, world, monkeypatch):
    decoded, real = [], image_stream.prepare_sample
    monkeypatch.setattr(image_stream, "prepare_sample", lambda raw, cfg: decoded.append(raw) or real(raw, cfg))
    per_pass = 24 // world  # kept images per pass and rank
    for rank in range(world):
        expected = take(stream(shards, rank, world), 3 * per_pass)
        for cut in (1, per_pass - 3, per_pass, per_pass + 2, 2 * per_pass + 1):  # mid-shard, draining, next pass
            first = stream(shards, rank, world)
            head = take(first, cut)
            state = first.state_dict()
            resumed, before = stream(shards, rank, world), len(decoded)
            assert restore_stream(resumed, [None] * rank + [state] + [None] * (world - rank - 1), cut, shards) \
                == "data stream continued from its saved position"
            assert len(decoded) - before == len(state["buffer"]) <= BUFFER  # only the buffer was decoded again
            tail = take(resumed, 3 * per_pass - cut)
            assert all(torch.equal(a, b) for a, b in zip(head + tail, expected, strict=True)), (rank, cut)


def test_each_rank_decodes_only_its_own_samples(shards, monkeypatch):
    """Rank r of 2 decodes the samples r, r + 2, ... of a pass (counted over the shards), not all of them: the
    ranks' decoding splits the pass, as DistributedSampler splits indices; their images add up to the pass's."""
    decoded, real = [], image_stream.prepare_sample
    monkeypatch.setattr(image_stream, "prepare_sample", lambda raw, cfg: decoded.append(raw["__key__"]) or real(raw, cfg))
    ranks, keys = [stream(shards, rank, 2) for rank in range(2)], []
    for s in ranks:  # a pass: 14 and 13 samples, of which rank 0 misses 2 images, rank 1 one: 12 and 12 images
        take(s, 12)
        keys.append([int(key[3:]) for key in decoded])
        decoded.clear()
    assert all(k % 2 == rank for rank in range(2) for k in keys[rank])  # only its own (and the next pass's first)
    assert sorted(keys[0][:14] + keys[1][:13]) == list(range(27))
    assert all(s.kept == 12 and not s.buffer and s.shard == 3 for s in ranks)  # both at their pass's end, drained
    for rank in (4, 29):  # sample 4 has no image; there is no sample 29
        with pytest.raises(ValueError, match=rf"rank {rank} of 30 takes every 30-th of the 27 samples from sample "
                                             rf"{rank}, and none of them has a usable image"):
            take(stream(shards, rank, 30), 1)
    assert take(stream(shards, 2, 30), 3)  # (sample 2 has one: it comes again in every pass)


def test_decoding_workers_give_the_same_stream_and_resume_it(shards):
    children = set(multiprocessing.active_children())  # (the session's worker pools, when they are up)
    expected = take(stream(shards, 1, 2), 30)
    first = stream(shards, 1, 2, workers=2)
    head = take(first, 9)
    resumed = stream(shards, 1, 2, workers=2)
    restore_stream(resumed, [None, first.state_dict()], 9, shards)
    first.close()
    tail = take(resumed, 21)
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(head + tail, expected, strict=True))
    assert set(multiprocessing.active_children()) <= children  # closed: no decoding processes left


def test_without_a_state_at_another_world_size_or_of_an_older_version_the_stream_is_replayed(shards):
    expected = take(stream(shards), 20)
    older = {k: v for k, v in stream(shards).state_dict().items() if k != "index"}  # split after decoding
    for saved in (None, [stream(shards, 0, 2).state_dict()] * 2, [older]):
        resumed = stream(shards)
        assert "replayed from its start (7 images per rank" in restore_stream(resumed, saved, 7, shards)
        assert all(torch.equal(a, b) for a, b in zip(take(resumed, 13), expected[7:], strict=True))


def test_a_shard_changed_under_the_saved_buffer_is_refused(shards, tmp_path):
    first = stream(shards)
    take(first, 2)
    state = first.state_dict()
    shard = state["buffer"][0][0]
    lf.write_tar(tmp_path / f"{shard:05d}.tar", lf.synthetic_samples(2, offset=100))  # fewer samples now
    with pytest.raises(CheckpointError, match=rf"ckpt/state.pt: .*{shard:05d}.tar: sample \d+ .*the shard changed"):
        restore_stream(stream(shards), [state], 2, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(CheckpointError, match="the saved data stream is of"):
        restore_stream(stream(shards), [{**state, "shards": 4}], 2, tmp_path / "ckpt" / "state.pt")
