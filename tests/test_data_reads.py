"""Which ranks read training samples (training.engine.sample_role): TP rank 0 of the pipeline stages that take
inputs reads and broadcasts each step's samples to its TP group; the other TP ranks and the middle pipeline
stages read none and start no data workers. The losses stay those of the layouts that read everywhere.

Samples are counted where they are read (data_pipeline.loader.read_sample), in the training process and in its
forked data workers alike (a counter in shared memory), as are the data workers started. All runs: the debug
model of tests.conftest.run, 6 steps of global batch 8 (data.workers=2) and the held-out loss of 2 global batches
at steps 3 and 6: a rank that reads reads 6 x 8 / DP training samples and 2 x 2 x 8 / DP held-out ones.
"""
from __future__ import annotations

import multiprocessing

import pytest

from tests.conftest import STEPS, held_out_losses, run

READS = STEPS * 8 + 2 * 2 * 8
"""The samples a reading rank reads at DP=1: the training steps' and the held-out ones."""


def counted_run(run_dir: str, *overrides: str) -> dict:
    """tests.conftest.run, counting the samples this rank reads (its data workers' reads included) and the data
    workers it starts."""
    from common import preemption
    from data_pipeline import loader

    ctx = multiprocessing.get_context("fork")  # (the data workers are forked: they inherit the counters)
    reads, workers = ctx.Value("q", 0), ctx.Value("q", 0)
    real_read, real_start = loader.read_sample, loader.start_helper

    def read(*args, **kwargs):
        with reads.get_lock():
            reads.value += 1
        return real_read(*args, **kwargs)

    def started(*args, **kwargs):  # (the workers' worker_init_fn)
        with workers.get_lock():
            workers.value += 1
        return real_start(*args, **kwargs)

    loader.read_sample, loader.start_helper = read, started
    try:
        losses = run(run_dir, *overrides)
    finally:
        loader.read_sample, loader.start_helper = real_read, real_start
    assert real_start is preemption.start_helper
    return {"losses": losses, "reads": reads.value, "workers": workers.value}


def test_only_tensor_parallel_rank_0_reads(pool2, reference, tmp_path):
    """TP=2: rank 0 reads every sample and starts the data workers, rank 1 reads none; the losses and held-out
    losses are TP=1's (the reference, DP=2, with its caption drops)."""
    ranks = pool2.run(counted_run, str(tmp_path), "parallel.tp=2", "data.workers=2")
    assert [r["reads"] for r in ranks] == [READS, 0]
    assert [r["workers"] for r in ranks] == [2, 0]
    for r in ranks:
        assert r["losses"] == pytest.approx(reference[0], rel=1e-5, abs=1e-5)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(reference[1]), rel=1e-5)


def test_tp2_pp2_reads_on_tensor_parallel_rank_0_of_each_stage(pool4, reference, tmp_path):
    """TP=2 x PP=2 (ranks 0, 1: the first stage; 2, 3: the last): TP rank 0 of each stage reads."""
    ranks = pool4.run(counted_run, str(tmp_path), "parallel.tp=2", "parallel.pp=2", "data.workers=2")
    assert [r["reads"] for r in ranks] == [READS, 0, READS, 0]
    assert [r["workers"] for r in ranks] == [2, 0, 2, 0]
    assert ranks[0]["losses"] == pytest.approx(reference[0], rel=1e-5, abs=1e-5)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(reference[1]), rel=1e-5)


def test_middle_pipeline_stages_read_nothing(pool4, tmp_path):
    """PP=4: the middle stages (ranks 1 and 2) take no inputs and read nothing; with dropout on (keyed by the
    samples' positions, which reach them from the stage before) the losses are DP=4's, the held-out ones too."""
    model = ("model.decoder_layers=4", "model.dropout=0.1", "data.workers=2")
    dp4 = pool4.run(counted_run, str(tmp_path / "dp4"), *model)
    pp4 = pool4.run(counted_run, str(tmp_path / "pp4"), *model, "parallel.pp=4")
    assert [r["reads"] for r in dp4] == [READS // 4] * 4
    assert [r["reads"] for r in pp4] == [READS, 0, 0, READS]
    assert [r["workers"] for r in pp4] == [2, 0, 0, 2]
    for r in pp4:
        assert r["losses"] == pytest.approx(dp4[0]["losses"], rel=1e-4, abs=1e-4)
    assert held_out_losses(tmp_path / "pp4") == pytest.approx(held_out_losses(tmp_path / "dp4"), rel=1e-4)
