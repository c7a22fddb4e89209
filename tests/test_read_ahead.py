"""The read-ahead loader (data_pipeline/loader.py) against the synchronous reader: the same micro-batches
(text, codes, positions), step by step, before and after a resume, at DP=1 and DP=2, with workers reading.

The expectation is rebuilt here from the sampler and the dataset directly (not through loader.py), and the
training's own synchronous reference (training.trainer.rank_micro_batches) is checked against it too."""
from __future__ import annotations

import os

import pytest
import torch

GBS, MBS, SIZE, SEED, DROP = 8, 2, 37, 5, 0.4  # 37 samples: the stream crosses epochs within a few steps
OVERRIDES = ["model.preset=parti-debug", f"train.global_batch_size={GBS}", f"train.micro_batch_size={MBS}",
             f"train.seed={SEED}", f"model.caption_drop_prob={DROP}"]


def setting():
    from data_pipeline.sampler import GlobalBatchSampler
    from data_pipeline.synthetic import SyntheticCodes
    from training.config import load_config

    cfg = load_config(None, OVERRIDES)
    return cfg, SyntheticCodes(cfg.model, size=SIZE, seed=SEED), GlobalBatchSampler(SIZE, GBS, SEED)


def expected_step(cfg, dataset, sampler, consumed: int, dp_rank: int, dp_size: int) -> list[tuple]:
    """This rank's micro-batches of the global batch at `consumed`, from first principles: DP ranks take
    contiguous slices of the global batch, micro-batches contiguous pieces of those, and a sample's caption
    is dropped by a pure function of (seed, its stream position)."""
    from model_parallel.model import caption_drop_mask

    m = cfg.model
    ids = sampler.global_batch(consumed).tolist()
    per = GBS // dp_size
    out = []
    for start in range(dp_rank * per, (dp_rank + 1) * per, MBS):
        positions = torch.arange(consumed + start, consumed + start + MBS)
        text = torch.stack([dataset[i][0] for i in ids[start:start + MBS]])
        codes = torch.stack([dataset[i][1] for i in ids[start:start + MBS]])
        for row in caption_drop_mask(positions, cfg.train.seed, m.caption_drop_prob).nonzero().flatten().tolist():
            text[row] = m.text_pad_id
            text[row, 0] = m.text_eos_id
        out.append((text, codes, positions))
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) == 3 and all(torch.equal(u, v) for u, v in zip(x, y))
                                    for x, y in zip(a, b))


def read_with_workers(dp_rank: int | None = None, dp_size: int = 1, workers: int = 2, steps: int = 6,
                      resume_at: int = 3) -> dict:
    """A reader from step 0 for `steps` steps, and one made anew at step `resume_at` (a resume), both with
    `workers` workers, against the expectation; returns {step: [(text, codes, positions)...]} of both."""
    import torch.distributed as dist

    from data_pipeline.loader import ReadAhead
    from training.trainer import caption_drop, rank_micro_batches

    if dp_rank is None:
        dp_rank = dist.get_rank() if dp_size > 1 else 0
    cfg, dataset, sampler = setting()
    drop = caption_drop(cfg)
    first = ReadAhead(dataset, sampler, 0, steps, dp_rank, dp_size, MBS, drop, workers=workers)
    resumed = ReadAhead(dataset, sampler, resume_at * GBS, steps - resume_at, dp_rank, dp_size, MBS, drop,
                        workers=workers)
    try:
        assert first.loader.num_workers == workers and first.loader.pin_memory is False
        got = {"first": [first.next_step() for _ in range(steps)],
               "resumed": [resumed.next_step() for _ in range(steps - resume_at)]}
    finally:
        first.close()
        resumed.close()
    drops = 0
    for step in range(steps):
        want = expected_step(cfg, dataset, sampler, step * GBS, dp_rank, dp_size)
        sync = [tuple(mb) for mb in rank_micro_batches(cfg, dataset, sampler, step * GBS, dp_rank, dp_size)]
        assert same(sync, want), f"rank_micro_batches differs from the expectation at step {step}"
        assert same(got["first"][step], want), f"read-ahead differs from the synchronous reader at step {step}"
        if step >= resume_at:
            assert same(got["resumed"][step - resume_at], want), f"after the resume, at step {step}"
        drops += sum(int((mb[0][:, 1:] == cfg.model.text_pad_id).all(1).sum()) for mb in want)
    assert drops > 0  # some captions were dropped: the drops are part of what is compared
    return got


def test_read_ahead_equals_synchronous_reader_dp1():
    got = read_with_workers(dp_size=1, workers=2)
    zero = read_with_workers(dp_size=1, workers=0)  # reading in this process gives the same too
    assert all(same(a, b) for a, b in zip(got["first"], zero["first"]))


def test_read_ahead_equals_synchronous_reader_dp2(pool2):
    ranks = pool2.run(read_with_workers, dp_size=2, workers=2)
    whole = read_with_workers(dp_size=1, workers=0)
    for step in range(6):  # the two ranks' micro-batches together are DP=1's, in order
        assert same(ranks[0]["first"][step] + ranks[1]["first"][step], whole["first"][step])


def captured_run(run_dir: str, *overrides: str, steps: int = 6) -> dict:
    """tests.conftest.run, recording what the Trainer hands the engine's step each step and the (consumed,
    workers) of each reader it opens."""
    from tests.conftest import run
    from training import engine, trainer

    seen, readers = [], []
    real_step, real_open = engine.train_step, trainer.open_reader

    def record(_engine, cfg, batches, device):
        assert all(isinstance(mb, engine.MicroBatch) for mb in batches)
        seen.append([tuple(t.clone() for t in mb) for mb in batches])
        return real_step(_engine, cfg, batches, device)

    def opened(cfg, dataset, sampler, consumed, *args, **kwargs):
        reader = real_open(cfg, dataset, sampler, consumed, *args, **kwargs)
        readers.append((consumed, reader.workers))
        return reader

    engine.train_step, trainer.open_reader = record, opened
    try:
        run(run_dir, *overrides, steps=steps)
    finally:
        engine.train_step, trainer.open_reader = real_step, real_open
    return {"batches": seen, "readers": readers, "pid": os.getpid()}


def check_trainer_batches(segments: list[dict], overrides: list[str], dp_rank: int, dp_size: int) -> None:
    from data_pipeline.sampler import GlobalBatchSampler
    from data_pipeline.training_data import training_dataset
    from training.config import load_config

    cfg = load_config("configs/train/debug.yaml", [f"train.global_batch_size={GBS}", f"train.micro_batch_size={MBS}",
                                                   *overrides])
    dataset = training_dataset(cfg.data, cfg.model, cfg.train.seed)
    sampler = GlobalBatchSampler(len(dataset), GBS, cfg.train.seed)
    got = [b for s in segments for b in s["batches"]]
    assert len(got) == 6
    assert [s["readers"] for s in segments] == [[(0, 2)], [(3 * GBS, 2)]]  # reopened at the resumed position
    for step, batches in enumerate(got):
        assert same(batches, expected_step(cfg, dataset, sampler, step * GBS, dp_rank, dp_size)), f"step {step}"


TRAINER = ["data.workers=2", "model.caption_drop_prob=0.4"]


def test_trainer_steps_on_the_read_ahead_batches_dp2(pool2, tmp_path):
    """3 steps, save, resume for 3 more at DP=2: each rank's steps got the synchronous reader's micro-batches."""
    segments = [pool2.run(captured_run, str(tmp_path), *TRAINER, steps=3),
                pool2.run(captured_run, str(tmp_path), *TRAINER)]
    for rank in range(2):
        check_trainer_batches([s[rank] for s in segments], TRAINER, rank, 2)


def test_trainer_steps_on_the_read_ahead_batches_dp1(single_process, tmp_path):
    segments = [captured_run(str(tmp_path), *TRAINER, steps=3), captured_run(str(tmp_path), *TRAINER)]
    check_trainer_batches(segments, TRAINER, 0, 1)


def test_data_workers_below_zero_or_no_read_ahead_step_is_refused():
    from common.config import ConfigError
    from data_pipeline.training_data import training_dataset
    from training.config import load_config

    cfg = load_config(None, ["data.workers=-1"])
    with pytest.raises(ConfigError, match=r"data\.workers=-1 must be >= 0"):
        training_dataset(cfg.data, cfg.model, cfg.train.seed)
    cfg = load_config(None, ["data.read_ahead_steps=0"])
    with pytest.raises(ConfigError, match=r"data\.read_ahead_steps=0 must be >= 1"):
        training_dataset(cfg.data, cfg.model, cfg.train.seed)


def test_held_out_data_is_refused_where_its_loss_would_not_be_a_held_out_one(tmp_path):
    """data.valid_shards: needed for train.eval_interval with prepared data; refused when it is a training folder,
    holds fewer samples than eval_batches x global_batch_size, or was made with another tokenizer (each error
    names data.valid_shards); read, with its samples, otherwise."""
    from common.config import ConfigError
    from data_pipeline.code_shards import data_tokenizers
    from data_pipeline.synthetic import write_random_code_shards
    from data_pipeline.training_data import held_out_dataset, held_out_sets, training_dataset
    from training.config import load_config

    write_random_code_shards(tmp_path / "train", 4)
    write_random_code_shards(tmp_path / "valid", 3)  # 9 records
    model = ["model.image_grid=2", "model.text_seq_len=4", "model.text_vocab_size=128", "model.image_vocab_size=64"]
    cfg = load_config("configs/train/debug.yaml", [*model, "data.synthetic=false", f"data.shards={tmp_path}/train"])
    trained_on = data_tokenizers(training_dataset(cfg.data, cfg.model, cfg.train.seed))
    with pytest.raises(ConfigError, match=r"data\.valid_shards='': train\.eval_interval needs held-out data"):
        held_out_dataset(cfg.data, cfg.model, 0, 8, trained_on)
    cfg.data.valid_shards = f"{tmp_path}/valid:1,{tmp_path}/train/../train:2"
    with pytest.raises(ConfigError, match=r"data\.valid_shards=.*/train is also in data\.shards"):
        held_out_dataset(cfg.data, cfg.model, 0, 8, trained_on)
    cfg.data.valid_shards = f"{tmp_path}/valid"
    with pytest.raises(ConfigError, match=r"data\.valid_shards=.*: holds 9 samples; .* need 16"):
        held_out_dataset(cfg.data, cfg.model, 0, 16, trained_on)
    other = {"vq": {"hash": "another"}, "text_tokenizer": {"hash": "t"}}
    with pytest.raises(ConfigError, match=r"data\.valid_shards=.*: made with another image tokenizer"):
        held_out_dataset(cfg.data, cfg.model, 0, 8, other)
    held_out = held_out_dataset(cfg.data, cfg.model, 0, 8, trained_on)
    assert len(held_out) == 9 and held_out[8][1].shape == (4,)
    assert len(held_out_dataset(cfg.data, cfg.model, 0, 9, trained_on)) == 9  # (exactly as many as needed)
    # Named sets: each by the same rules, refused naming its folder; a spec naming some sets only, or one twice.
    cfg.data.valid_shards = f"coco={tmp_path}/valid,laion={tmp_path}/valid"
    assert {n: len(d) for n, d in held_out_sets(cfg.data, cfg.model, 0, 8, trained_on).items()} == {"coco": 9,
                                                                                                   "laion": 9}
    cfg.data.valid_shards = f"coco={tmp_path}/valid,laion={tmp_path}/train"
    with pytest.raises(ConfigError, match=rf"data\.valid_shards='{tmp_path}/train': .*/train is also in data\.shards"):
        held_out_sets(cfg.data, cfg.model, 0, 8, trained_on)
    for spec, message in ((f"coco={tmp_path}/valid,{tmp_path}/valid", "name every held-out set"),
                          (f"a={tmp_path}/valid,a={tmp_path}/valid", "a set's name is given twice")):
        cfg.data.valid_shards = spec
        with pytest.raises(ConfigError, match=message):
            held_out_sets(cfg.data, cfg.model, 0, 8, trained_on)


def test_a_missing_data_folder_is_a_config_error_naming_its_key_and_a_named_held_out_folder_is_read(tmp_path):
    """A data.shards or data.valid_shards folder that is not there is a ConfigError naming the key (the one line
    a bad config gets, not a FileNotFoundError traceback); a data.valid_shards folder named beside synthetic
    training data is the held-out set (the generated one is only for none named)."""
    from common.config import ConfigError
    from data_pipeline.code_shards import CodeShardDataset
    from data_pipeline.synthetic import write_random_code_shards
    from data_pipeline.code_shards import data_tokenizers
    from data_pipeline.training_data import held_out_dataset, training_dataset
    from training.config import load_config

    write_random_code_shards(tmp_path / "train", 4)
    write_random_code_shards(tmp_path / "valid", 3)  # 9 records
    model = ["model.image_grid=2", "model.text_seq_len=4", "model.text_vocab_size=128", "model.image_vocab_size=64"]
    cfg = load_config("configs/train/debug.yaml", [*model, "data.synthetic=false", f"data.shards={tmp_path}/none"])
    with pytest.raises(ConfigError, match=r"^data\.shards='.*/none': .*/none is not a folder"):
        training_dataset(cfg.data, cfg.model, cfg.train.seed)
    cfg.data.shards = f"{tmp_path}/train"
    trained_on = data_tokenizers(training_dataset(cfg.data, cfg.model, cfg.train.seed))
    cfg.data.valid_shards = f"{tmp_path}/none"
    with pytest.raises(ConfigError, match=r"^data\.valid_shards='.*/none': .*/none is not a folder"):
        held_out_dataset(cfg.data, cfg.model, 0, 8, trained_on)
    cfg.data.synthetic, cfg.data.shards, cfg.data.valid_shards = True, "", f"{tmp_path}/valid"
    held_out = held_out_dataset(cfg.data, cfg.model, 0, 8, data_tokenizers(training_dataset(cfg.data, cfg.model, 0)))
    assert isinstance(held_out, CodeShardDataset) and len(held_out) == 9


def test_held_out_batches_spread_over_the_whole_held_out_set_the_same_every_time():
    """A blend lays its folders out one after the other: the held-out samples are a seeded spread over the whole
    set (both halves here), the same at every measurement, split over DP ranks as training's batches are."""
    from training.config import load_config
    from training.trainer import held_out_micro_batches

    cfg = load_config("configs/train/debug.yaml", ["train.global_batch_size=8", "train.micro_batch_size=2",
                                                   "train.eval_batches=2"])
    m = cfg.model

    class Indexed:  # sample i: every text id and code is i
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.full((m.text_seq_len,), i), torch.full((m.image_seq_len,), i)

    def ids(dp_rank, dp_size):
        return [int(i) for b in range(2) for mb in held_out_micro_batches(cfg, Indexed(), b, dp_rank, dp_size)
                for i in mb.codes[:, 0]]

    whole = ids(0, 1)
    assert len(set(whole)) == 16 and min(whole) < 32 <= max(whole) and ids(0, 1) == whole
    assert sorted(ids(0, 2) + ids(1, 2)) == sorted(whole)


def test_the_caption_drops_are_those_of_the_samples_stream_positions_far_into_a_run():
    """collate nulls the captions caption_drop_mask picks for each sample's position in the stream, billions of
    samples in too (a drop keyed by a wrapped position would repeat its pattern)."""
    from data_pipeline.loader import CaptionDrop, collate
    from model_parallel.model import caption_drop_mask

    positions = torch.arange(2**33 + 10**9, 2**33 + 10**9 + 4096)  # (beyond 2^32: the mask's high bits count)
    assert not torch.equal(caption_drop_mask(positions, 5, 0.25), caption_drop_mask(positions % 2**32, 5, 0.25))
    text = torch.full((len(positions), 4), 7)
    samples = [((t, torch.zeros(2, dtype=torch.long)), int(p)) for t, p in zip(text, positions)]
    nulled, _, got = collate(samples, CaptionDrop(seed=5, prob=0.25, pad_id=0, eos_id=3))
    dropped = nulled[:, 0] == 3
    assert torch.equal(got, positions) and torch.equal(dropped, caption_drop_mask(positions, 5, 0.25))
    assert 0.2 < dropped.float().mean() < 0.3 and not torch.equal(dropped[:1024], dropped[1024:2048])


def test_a_rank_that_reads_no_samples_steps_through_the_same_stream_positions():
    """StepPositions (training.engine.sample_role's ranks that read nothing) gives each step's micro-batches'
    stream positions, by hand: DP rank 1 of 2 at consumed 16, global batch 8, micro-batches of 2 holds
    positions 20..23, then 28..31; the same as the reading rank's ReadAhead gives with its samples."""
    from data_pipeline.loader import ReadAhead, StepPositions
    from training.trainer import caption_drop

    cfg, dataset, sampler = setting()
    positions = StepPositions(sampler, consumed=16, steps=2, dp_rank=1, dp_size=2, micro_batch_size=MBS)
    reader = ReadAhead(dataset, sampler, 16, 2, 1, 2, MBS, caption_drop(cfg), workers=0)
    try:
        for want in ([[20, 21], [22, 23]], [[28, 29], [30, 31]]):
            got, read = positions.next_step(), reader.next_step()
            assert [p.tolist() for _, _, p in got] == [p.tolist() for _, _, p in read] == want
            assert all(t is None and c is None for t, c, _ in got)
        assert positions.consumed == reader.consumed == 32
    finally:
        reader.close()


def test_a_blend_is_read_at_each_stream_positions_epoch():
    """A blend (code_shards.MixedDataset) draws its datasets' records by the epoch of the stream position: past the
    first epoch the read-ahead reader and the synchronous one (read_micro_batch: training's reference and held-out
    reads) give mix.at_epoch(id, position // len(mix)), which differs from epoch 0's draw for a dataset weighted
    below its size (each epoch continues through it)."""
    from data_pipeline.code_shards import MixedDataset
    from data_pipeline.loader import CaptionDrop, ReadAhead, rank_micro_batch_ids, read_micro_batch
    from data_pipeline.sampler import GlobalBatchSampler

    def records(first, n):
        return [(torch.full((4,), first + k), torch.full((2,), first + k)) for k in range(n)]

    mix = MixedDataset([records(0, 30), records(1000, 10)], [1, 3], size=12)  # 3 of 30 a epoch, 9 of 10
    sampler = GlobalBatchSampler(len(mix), GBS, SEED)
    drop = CaptionDrop(seed=SEED, prob=0.0, pad_id=0, eos_id=3)
    reader = ReadAhead(mix, sampler, 0, 6, 0, 1, MBS, drop, workers=0)
    changed = 0
    try:
        for step in range(6):
            sync = [read_micro_batch(mix, ids, drop) for ids in rank_micro_batch_ids(sampler, step * GBS, 0, 1, MBS)]
            for (_, codes, positions), (_, sync_codes, sync_positions) in zip(reader.next_step(), sync, strict=True):
                assert torch.equal(positions, sync_positions) and torch.equal(codes, sync_codes)
                ids = sampler.stream(int(positions[0]), len(positions)).tolist()
                want = [int(mix.at_epoch(i, int(p) // len(mix))[1][0]) for i, p in zip(ids, positions.tolist())]
                assert codes[:, 0].tolist() == want
                changed += sum(w != int(mix[i][1][0]) for i, w in zip(ids, want))
    finally:
        reader.close()
    assert changed > 0  # (the epochs past the first read other records than epoch 0 would)


def test_synthetic_held_out_samples_are_the_ones_past_the_training_set():
    """With synthetic data the held-out samples are samples SYNTHETIC_SIZE.. of the generator (a second path: one
    SyntheticCodes over both ranges), none of them a training sample."""
    from data_pipeline.synthetic import SyntheticCodes
    from data_pipeline.training_data import SYNTHETIC_SIZE, held_out_dataset, training_dataset
    from training.config import load_config

    cfg = load_config("configs/train/debug.yaml", [])
    train = training_dataset(cfg.data, cfg.model, cfg.train.seed)
    held = held_out_dataset(cfg.data, cfg.model, cfg.train.seed, 16, train)
    both = SyntheticCodes(cfg.model, size=SYNTHETIC_SIZE + 16, seed=cfg.train.seed)
    assert len(train) == SYNTHETIC_SIZE and len(held) == 16
    assert all(torch.equal(held[i][1], both[SYNTHETIC_SIZE + i][1]) and torch.equal(train[i][1], both[i][1])
               for i in range(16))
    assert not any(torch.equal(held[i][1], train[i][1]) for i in range(16))


def test_a_synthetic_caption_is_its_class_words_then_eos_and_decides_the_codes_but_a_tenth():
    """SyntheticCodes: each caption is 3 word ids (none of PAD/UNK/BOS/EOS), EOS, then PAD; samples of one caption
    share their codes but for about 10% of positions, samples of another caption differ in most; the last
    sample is size - 1; the word ids span the vocabulary above EOS; a text_seq_len of 2 holds one word and EOS."""
    import dataclasses

    from data_pipeline.synthetic import SyntheticCodes
    from training.config import load_config

    cfg = load_config("configs/train/debug.yaml", []).model
    ds = SyntheticCodes(cfg, size=64, seed=3)
    by_caption = {}
    for i in range(len(ds)):
        text, codes = ds[i]
        assert text[:3].min() >= SyntheticCodes.FIRST_WORD and text[3] == cfg.text_eos_id
        assert (text[4:] == cfg.text_pad_id).all()
        by_caption.setdefault(tuple(text[:3].tolist()), []).append(codes)
    assert len(by_caption) > 2
    same = torch.cat([(c != group[0]).float() for group in by_caption.values() for c in group[1:]]).mean()
    firsts = [group[0] for group in by_caption.values()]
    other = torch.stack([(a != b).float().mean() for a in firsts for b in firsts if a is not b]).mean()
    assert 0.1 < same < 0.3 and other > 0.8  # (two resampled: 1 - 0.9^2 = 0.19 apart)
    with pytest.raises(IndexError, match="sample 64 outside 0..63"):
        ds[64]
    words = SyntheticCodes(cfg, size=1, num_classes=4096).captions  # (12,288 draws: every word id, none below)
    assert (words.min(), words.max()) == (SyntheticCodes.FIRST_WORD, cfg.text_vocab_size - 1)
    text, _ = SyntheticCodes(dataclasses.replace(cfg, text_seq_len=2), size=1)[0]  # room for 1 word and EOS
    assert text[0] >= SyntheticCodes.FIRST_WORD and text[1] == cfg.text_eos_id

class Indexed:
    """Sample i: text ids and codes all i (so a batch says which samples it holds)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return torch.full((4,), i), torch.full((2,), i)


def test_every_sample_once_an_epoch_over_ranks_and_workers_and_a_resume_on_another_layout():
    """37 samples, global batch 8 (the epochs end inside a global batch): steps 0..3 read at DP=2 with 2 workers
    each, then a resume at step 4 (mid-epoch) at DP=4 with 1 worker and with none: the ranks' micro-batches,
    taken in rank order, are the stream's positions 0, 1, 2... without gap or repeat, and each epoch's 37
    positions hold each sample once."""
    from data_pipeline.loader import CaptionDrop, ReadAhead
    from data_pipeline.sampler import GlobalBatchSampler

    dataset, sampler = Indexed(SIZE), GlobalBatchSampler(SIZE, GBS, SEED)
    drop = CaptionDrop(seed=SEED, prob=0.0, pad_id=0, eos_id=3)

    def read(consumed: int, steps: int, dp_size: int, workers: int) -> tuple[list[int], list[int]]:
        readers = [ReadAhead(dataset, sampler, consumed, steps, r, dp_size, MBS, drop, workers=workers)
                   for r in range(dp_size)]
        positions, ids = [], []
        try:
            for _ in range(steps):
                for reader in readers:
                    for _, codes, where in reader.next_step():
                        positions += where.tolist()
                        ids += codes[:, 0].tolist()
            assert all(reader.consumed == consumed + steps * GBS for reader in readers)
        finally:
            for reader in readers:
                reader.close()
        return positions, ids

    before = read(0, 4, dp_size=2, workers=2)
    for workers in (1, 0):
        after = read(4 * GBS, 6, dp_size=4, workers=workers)
        positions, ids = before[0] + after[0], before[1] + after[1]
        assert positions == list(range(10 * GBS))
        assert ids == sampler.stream(0, 10 * GBS).tolist()
        for epoch in range(2):
            assert sorted(ids[epoch * SIZE:(epoch + 1) * SIZE]) == list(range(SIZE)), epoch
        assert ids[SIZE:2 * SIZE] != ids[:SIZE]  # (another order each epoch)


def test_a_reader_gives_the_steps_it_was_made_for_and_no_more():
    """Both readers (ReadAhead, in this process and with a worker, and StepPositions) refuse a step past the
    `steps` they were made for, and any step once closed, with a RuntimeError (not a StopIteration, which a loop
    would take for an end); a reader made for no step starts no worker."""
    import multiprocessing

    from data_pipeline.loader import CaptionDrop, ReadAhead, StepPositions
    from data_pipeline.sampler import GlobalBatchSampler

    dataset, sampler = Indexed(SIZE), GlobalBatchSampler(SIZE, GBS, SEED)
    drop = CaptionDrop(seed=SEED, prob=0.0, pad_id=0, eos_id=3)
    for make in (lambda: ReadAhead(dataset, sampler, 8, 2, 0, 1, MBS, drop, workers=0),
                 lambda: ReadAhead(dataset, sampler, 8, 2, 0, 1, MBS, drop, workers=1),
                 lambda: StepPositions(sampler, 8, 2, 0, 1, MBS)):
        reader = make()
        try:
            reader.next_step()
            reader.next_step()
            with pytest.raises(RuntimeError, match=r"made for 2 steps from 8; all have been"):
                reader.next_step()
        finally:
            reader.close()
        reader = make()
        reader.close()
        with pytest.raises(RuntimeError, match=r"or it was closed"):
            reader.next_step()
    before = set(multiprocessing.active_children())
    reader = ReadAhead(dataset, sampler, 8, 0, 0, 1, MBS, drop, workers=2)
    try:
        assert set(multiprocessing.active_children()) == before
        with pytest.raises(RuntimeError, match=r"made for 0 steps"):
            reader.next_step()
    finally:
        reader.close()


def test_the_workers_are_forked_keep_the_read_ahead_steps_requested_and_pin_memory_when_asked():
    """What the DataLoader is made with (a reader of no steps: nothing is read): forked workers (a spawned one
    would import the training stack again; the default where the process was itself spawned), at least
    read_ahead_steps x the micro-batches of a step requested over all workers (2 workers, 3 steps of 3
    micro-batches: 9, not fewer, not a round of the workers more), pinned memory when asked, and one batch per
    micro-batch of each step; workers < 0 and read_ahead_steps < 1 are refused."""
    from data_pipeline.loader import CaptionDrop, ReadAhead
    from data_pipeline.sampler import GlobalBatchSampler

    dataset, sampler = Indexed(SIZE), GlobalBatchSampler(SIZE, GBS, SEED)
    drop = CaptionDrop(seed=SEED, prob=0.0, pad_id=0, eos_id=3)
    reader = ReadAhead(dataset, GlobalBatchSampler(SIZE, 3 * MBS, SEED), 0, 0, 0, 1, MBS, drop, workers=2,
                       read_ahead_steps=3, pin_memory=True)
    loader = reader.loader
    assert loader.multiprocessing_context.get_start_method() == "fork"
    assert 9 <= loader.prefetch_factor * 2 < 9 + 2
    assert loader.pin_memory is True
    reader = ReadAhead(dataset, sampler, 0, 5, 1, 2, MBS, drop, workers=0)
    assert len(reader.loader) == 5 * (GBS // 2 // MBS) == sum(1 for _ in reader.batches)
    reader.close()
    for workers, ahead in ((-1, 2), (2, 0)):
        with pytest.raises(ValueError, match=rf"workers={workers} must be >= 0 and read_ahead_steps={ahead} >= 1"):
            ReadAhead(dataset, sampler, 0, 1, 0, 1, MBS, drop, workers=workers, read_ahead_steps=ahead)


def test_data_workers_leave_the_jobs_stop_signals_to_the_training_process():
    """SLURM signals every process of a job: a data worker ignores SIGTERM and SIGUSR1 (the trainer saves, then
    closes the reader; a worker that died of the signal would fail the step or the save); the training process
    keeps its own handlers."""
    import signal

    from data_pipeline.loader import CaptionDrop, ReadAhead
    from data_pipeline.sampler import GlobalBatchSampler

    class Probe(Indexed):  # text: 1 where the process reading the sample ignores both signals; codes: its pid
        def __getitem__(self, i):
            ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1))
            return torch.full((4,), int(ignored)), torch.full((2,), os.getpid())

    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
    sampler = GlobalBatchSampler(SIZE, GBS, SEED)
    reader = ReadAhead(Probe(SIZE), sampler, 0, 1, 0, 1, MBS, CaptionDrop(SEED, 0.0, 0, 3), workers=2)
    try:
        batches = reader.next_step()
    finally:
        reader.close()
    assert all((codes != os.getpid()).all() and (text == 1).all() for text, codes, _ in batches)
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == handlers
