"""The image models' crop stream (data_pipeline/image_stream.py) resumed from its saved state equals the
uninterrupted stream, image for image, at any point (mid-shard, at a pass's end, in the next pass), on
each data-parallel rank and with decoding workers, while decoding only the buffered samples again; each rank
decodes only its own part of a pass (its shards, or with fewer shards than ranks its samples); a checkpoint
without a state, of another world size or of an older version replays the stream; a shard that changed under
a saved buffer is refused, naming it."""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from pathlib import Path

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


KEPT = {1: [24], 2: [16, 8], 4: [6, 6, 6, 6]}
"""Kept images per pass of each rank: 3 shards of 9 samples, sample 4 of each without an image. At 2 ranks the
ranks split the shards (rank 0: shards 0 and 2), at 4 (more ranks than shards) the samples (rank r: r, r + 4, ...
counted over the shards: samples 4, 13 and 22 fall to ranks 0, 1 and 2, and rank 3 has 6 samples)."""
OWN = {2: [set(range(9)) | set(range(18, 27)), set(range(9, 18))], 4: [set(range(r, 27, 4)) for r in range(4)]}
"""The samples (by their number in the pass) each rank reads."""


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resumed_stream_equals_the_uninterrupted_one(shards, world, monkeypatch):
    decoded, real = [], image_stream.prepare_sample
    monkeypatch.setattr(image_stream, "prepare_sample", lambda raw, cfg: decoded.append(raw) or real(raw, cfg))
    for rank, per_pass in enumerate(KEPT[world]):
        uninterrupted = stream(shards, rank, world)
        expected = take(uninterrupted, 3 * per_pass)
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
            assert resumed.state_dict() == uninterrupted.state_dict(), (rank, cut)  # (its counts too: `kept`)


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_decodes_only_its_own_part_of_the_pass(shards, world, monkeypatch):
    """2 ranks, 3 shards: rank r decodes the shards r, r + 2, ... (webdataset's split_by_node); 4 ranks: the
    samples r, r + 4, ... counted over the shards (DistributedSampler's split). Either way a pass's samples are
    each decoded by one rank (besides the buffer, only the next pass's first batch is decoded ahead)."""
    decoded, real = [], image_stream.prepare_sample
    monkeypatch.setattr(image_stream, "prepare_sample",
                        lambda raw, cfg: decoded.append(raw["__key__"]) or real(raw, cfg))
    ranks, firsts = [stream(shards, rank, world) for rank in range(world)], []
    for rank, s in enumerate(ranks):
        take(s, KEPT[world][rank])  # one pass
        keys = [int(key[3:]) for key in decoded]
        decoded.clear()
        assert set(keys) == OWN[world][rank] and len(keys) < len(OWN[world][rank]) + image_stream.BATCH, rank
        firsts += keys[:len(OWN[world][rank])]
    assert sorted(firsts) == list(range(27))
    assert all(not s.buffer and s.shard == 3 for s in ranks)  # each at its pass's end, drained: KEPT was right


def test_a_rank_without_a_usable_image_is_refused_naming_its_part(shards, tmp_path):
    for rank in (4, 29):  # more ranks than shards: sample 4 has no image; there is no sample 29
        with pytest.raises(ValueError, match=rf"rank {rank} of 30 takes every 30-th of the 27 samples from sample "
                                             rf"{rank}, and none of them has a usable image"):
            take(stream(shards, rank, 30), 1)
    assert take(stream(shards, 2, 30), 3)  # (sample 2 has one: it comes again in every pass)
    samples = lf.synthetic_samples(2)
    samples[1][1].pop("jpg")
    for shard, part in enumerate(([samples[0]], [samples[1]])):
        lf.write_tar(tmp_path / "bare" / f"{shard:05d}.tar", part)
    with pytest.raises(ValueError, match=r"rank 1 of 2 takes the shards 1, 1 \+ 2, ... \(1 samples\), and none"):
        take(stream(str(tmp_path / "bare" / "{00000..00001}.tar"), 1, 2), 1)


def test_images_without_a_usable_caption_are_kept(tmp_path):
    """The image trainers need the image alone: a shard without captions (or with empty, non-UTF-8 or very long
    ones) was refused as having 'no usable image', and in mixed data such images were dropped uncounted."""
    samples = lf.synthetic_samples(4)
    samples[0][1].pop("txt")
    samples[1][1]["txt"] = b""
    samples[2][1]["txt"] = b"\xff\xfe"
    samples[3][1]["txt"] = b"x" * 5000
    lf.write_tar(tmp_path / "nocaption.tar", samples)
    assert len(take(stream(str(tmp_path / "nocaption.tar")), 4)) == 4
    assert len(image_stream.center_crops(str(tmp_path / "nocaption.tar"), 32, 4)) == 4


def test_images_smaller_than_min_size_but_not_than_the_resize_side_are_kept(tmp_path):
    """min_size (64 by default) is lowered to the side images are resized to: a 48-pixel image trains a 40-pixel
    stream (only an image smaller than the side would be enlarged)."""
    samples = [(key, {**files, "jpg": lf.encode(lf.shape_image("red", "circle", size=48))})
               for key, files in lf.synthetic_samples(3)]
    lf.write_tar(tmp_path / "small.tar", samples)
    assert len(take(stream(str(tmp_path / "small.tar")), 3)) == 3


def test_a_file_that_is_no_tar_is_refused_up_front(shards, tmp_path):
    """A rank's last shard, only zeros (allocated, never written): refused when the stream is made (it failed
    when the rank reached it, maybe hours in), by the rank that reads it."""
    from data_pipeline.errors import DataError

    (tmp_path / "00003.tar").write_bytes(bytes(4 * 10240))
    with pytest.raises(DataError, match=r"00003.tar is not a tar archive \(40960 bytes beginning with zeros"):
        stream(str(tmp_path / "{00000..00003}.tar"), rank=1, world=2)
    stream(str(tmp_path / "{00000..00003}.tar"), rank=0, world=2).close()  # (its shards are 0 and 2)
    with pytest.raises(DataError, match=r"00003.tar is not a tar archive"):  # (5 ranks, 4 shards: each reads all)
        stream(str(tmp_path / "{00000..00003}.tar"), rank=0, world=5)


def test_a_tar_whose_tail_is_zeros_is_counted_as_truncated(tmp_path):
    """A copy that stopped after allocating the file: tarfile reads its zero tail as the end of a sound, shorter
    archive, and the end-of-archive check (the last two blocks are zeros) passes."""
    from collections import Counter

    from data_pipeline.laion import read_shard

    path = lf.write_tar(tmp_path / "whole.tar", lf.synthetic_samples(20))
    data = path.read_bytes()
    half = len(data) // 2 // 512 * 512
    (tmp_path / "cut.tar").write_bytes(data[:half] + bytes(len(data) - half))
    errors = Counter()
    assert len(list(read_shard(path, errors))) == 20 and errors == {}
    assert 0 < len(list(read_shard(tmp_path / "cut.tar", errors))) < 20 and errors == {"truncated_tar": 1}


@pytest.mark.parametrize("world", [2, 4])  # the ranks split the shards / the samples
def test_decoding_workers_give_the_same_stream_and_resume_it(shards, world):
    children = set(multiprocessing.active_children())  # (the session's worker pools, when they are up)
    expected = take(stream(shards, 1, world), 30)
    first = stream(shards, 1, world, workers=2)
    head = take(first, 9)
    resumed = stream(shards, 1, world, workers=2)
    restore_stream(resumed, [None, first.state_dict()] + [None] * (world - 2), 9, shards)
    # The buffered images are in the process's own memory, not the workers' shared memory (each shared one held
    # a file descriptor open: a full buffer neared the usual limit of 1024).
    assert first.buffer and resumed.buffer and not any(image.is_shared() for s in (first, resumed)
                                                       for _, image in s.buffer)
    first.close()
    tail = take(resumed, 21)
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(head + tail, expected, strict=True))
    assert set(multiprocessing.active_children()) <= children  # closed: no decoding processes left


def test_decoding_workers_leave_a_stop_signal_to_the_trainer(shards):
    """SLURM signals every process of a job step (SIGUSR1 before the time limit, SIGTERM on a requeue): the
    trainer saves on it (common/preemption.py), and its decoding workers keep decoding instead of dying, which
    would end the trainer's stream (and its save) with 'DataLoader worker exited unexpectedly'."""
    children = set(multiprocessing.active_children())
    expected = take(stream(shards), 30)
    signalled = stream(shards, workers=2)
    # The workers run, started before any handler of the trainer's was installed; BATCH images need the second
    # worker's first list too (the first list fills the buffer alone: with 3 images, the second worker could still
    # be starting, its signals not yet set aside, and the check below failed on a busy machine)
    head = take(signalled, image_stream.BATCH)
    workers = set(multiprocessing.active_children()) - children
    assert len(workers) == 2
    # (Each has set its signals aside (its worker_init_fn) before its first list; read where the kernel keeps it:
    # a CI run once saw a worker die of the USR1 below, unexplained.)
    stop_signals = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGTERM - 1))
    for worker in workers:
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert int(status["SigIgn"], 16) & stop_signals == stop_signals, (worker.pid, status["SigIgn"])
    for worker in workers:
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGTERM)
    tail = take(signalled, 30 - len(head))
    signalled.close()
    assert all(torch.equal(a, b) for a, b in zip(head + tail, expected, strict=True))


def test_without_a_state_at_another_world_size_or_of_an_older_version_the_stream_is_replayed(shards):
    expected = take(stream(shards), 20)
    older = {k: v for k, v in stream(shards).state_dict().items() if k != "index"}  # split after decoding
    for saved, why in ((None, "the checkpoint has no stream state"),
                       ([stream(shards, 0, 2).state_dict()] * 2, "it was saved at world size 2"),
                       ([older], "it was saved by an older version")):
        resumed = stream(shards)
        assert f"replayed from its start (7 images per rank: {why}" in restore_stream(resumed, saved, 7, shards)
        assert all(torch.equal(a, b) for a, b in zip(take(resumed, 13), expected[7:], strict=True))


def test_other_data_starts_at_its_beginning_and_moved_data_continues(shards, tmp_path):
    """--data naming other shards (same count) used to continue at the saved positions of the old ones, as if
    the same files; the same files moved to another folder continue where they were."""
    import shutil

    first = stream(shards)
    take(first, 5)
    state = first.state_dict()
    other = tmp_path / "other"
    for s in range(3):
        lf.write_tar(other / f"part-{s}.tar", lf.synthetic_samples(9, offset=50 + 9 * s))
    other_pattern = str(other / "part-{0..2}.tar")
    resumed = stream(other_pattern)
    assert "started at the beginning of the data: its shards are not the checkpoint's" in \
        restore_stream(resumed, [state], 5, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 10), take(stream(other_pattern), 10), strict=True))
    moved = tmp_path / "moved"
    shutil.copytree(Path(shards.split("{")[0]), moved, ignore=shutil.ignore_patterns("other", "moved", "ckpt"))
    resumed = stream(str(moved / "{00000..00002}.tar"))
    assert restore_stream(resumed, [state], 5, tmp_path / "ckpt") == "data stream continued from its saved position"
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 10), take(stream(shards), 15)[5:], strict=True))


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
    with pytest.raises(ValueError, match="the saved data stream is of .*'rank': 1.* this one of .*'rank': 0"):
        stream(shards).load_state_dict({**state, "rank": 1})  # (another rank's state)
    # The same number of samples, the buffered one without its image now: skipped, refused naming it
    position = state["buffer"][0][1]
    samples = lf.synthetic_samples(9, offset=9 * shard)
    samples[position][1].pop("jpg")
    lf.write_tar(tmp_path / f"{shard:05d}.tar", samples)
    with pytest.raises(CheckpointError, match=rf"{shard:05d}.tar: sample {position} .* was in the saved shuffle "
                                              r"buffer but is now skipped: the shard changed"):
        restore_stream(stream(shards), [state], 2, tmp_path / "ckpt" / "state.pt")


def test_the_shuffle_buffer_holds_buffer_images_and_random_crops_reach_every_offset(shards):
    """The first image is taken once BUFFER images are kept (then BUFFER - 1 wait); a random crop of a 10x10 image
    to 8 takes each of the 3 x 3 offsets, flipped or not: by enumeration of the offsets."""
    import random
    from collections import Counter

    s = stream(shards)
    next(s)
    assert (s.kept, len(s.buffer), s.position) == (BUFFER, BUFFER - 1, BUFFER + 1)  # (sample 4 has no image)
    assert {image.shape for _, image in s.buffer} == {(3, 40, 40)}  # (resized to `resize`, cropped when taken)
    take(s, KEPT[1][0])  # the first pass's last image, then the second pass's first: its counts start again
    assert (s.shard, s.kept, len(s.buffer), s.position) == (0, BUFFER, BUFFER - 1, BUFFER + 1)
    s.close()
    # Each rank and seed draws its own crops (ranks sharing a generator would crop and flip in step)
    rngs = [CropStream(shards, crop=32, resize=40, rank=r, world=2, seed=seed, workers=0).state_dict()["rng"]
            for r, seed in ((0, 3), (1, 3), (0, 4))]
    assert rngs[0] != rngs[1] and rngs[0] != rngs[2]
    image = torch.stack([torch.arange(10)[:, None].expand(10, 10), torch.arange(10)[None, :].expand(10, 10)])
    rng, seen = random.Random(0), Counter()
    for _ in range(500):
        crop = image_stream._random_crop(image, 8, rng)
        top, left = int(crop[0, 0, 0]), int(crop[1, 0].min())
        flipped = bool(crop[1, 0, 0] > crop[1, 0, -1])
        assert torch.equal(crop, image[:, top:top + 8, left:left + 8].flip(-1) if flipped else
                           image[:, top:top + 8, left:left + 8])
        seen[(top, left, flipped)] += 1
    assert set(seen) == {(t, l, f) for t in range(3) for l in range(3) for f in (False, True)}


def test_as_many_shards_as_ranks_split_by_shard_and_center_crops_are_the_first_kept_images(shards):
    """3 shards at world 3: each rank reads its own shard whole (rank 1: shard 1's 9 samples in order), not every
    third sample; center_crops gives the first `limit` kept images of the shards, in order (sample 4 has no
    image), each the prepared image of that sample."""
    from collections import Counter

    from data_pipeline.image_stream import _RankSamples, center_crops
    from data_pipeline.images import ImageFilter, prepare_sample
    from data_pipeline.laion import expand_shards, read_shard

    paths = expand_shards(shards)
    raw = _RankSamples(paths, ImageFilter(image_size=40, min_size=16), 1, 3, (0, 0, 0))._raw()
    assert [next(raw)[0] for _ in range(9)] == [(1, p, p) for p in range(9)] and next(raw) == 9
    crops = center_crops(shards, 24, 6, min_size=16)
    samples = list(read_shard(paths[0], Counter()))
    want = [prepare_sample(samples[i], ImageFilter(image_size=24, min_size=16)).image for i in (0, 1, 2, 3, 5, 6)]
    assert crops.shape == (6, 3, 24, 24) and torch.equal(crops, torch.stack(want))


def test_center_crops_of_shards_without_a_usable_image_are_refused_and_one_rank_gathers_its_own_state(shards,
                                                                                                     tmp_path):
    """center_crops of shards with no usable image: a ValueError naming them (not torch.stack's of an empty
    list); gather_stream_states at world size 1 needs no process group: the stream's own state."""
    from data_pipeline.image_stream import center_crops, gather_stream_states

    samples = lf.synthetic_samples(2)
    for _, files in samples:
        files.pop("jpg")
    lf.write_tar(tmp_path / "bare.tar", samples)
    with pytest.raises(ValueError, match=r"bare\.tar: no usable image \(decodable, a shorter side of at least 16 px"):
        center_crops(str(tmp_path / "bare.tar"), 24, 4, min_size=16)
    s = stream(shards)
    take(s, 2)
    assert gather_stream_states(s) == [s.state_dict()]
    s.close()
