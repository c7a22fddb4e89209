"""A global batch that ramps up (train.rampup_batch_size, Megatron-LM's --rampup-batch-size) against runs at each
of its sizes: a run at the small batch resumed at the full one (a change a resume allows) trains the same samples
at the same sizes; also at DP=2 ZeRO-1, at PP=2 and cut in the middle of the ramp. The sizes by hand."""
from __future__ import annotations

import json

import pytest

from common.config import ConfigError
from data_pipeline.sampler import BatchRamp, GlobalBatchSampler
from tests.conftest import run

# Global batch 8 in micro-batches of 2 (tests/conftest.py's run): 4 samples a step while fewer than 12 are consumed
# (steps 1-3), then 8 (steps 4-6; 12 ends the ramp's one increment). At DP=1 that is 2 micro-batches a step, then 4:
# after 3 steps DeepSpeed has counted 6 micro-batches, no multiple of 4 (training/deepspeed_glue.set_global_batch).
RAMP = ("train.rampup_batch_size=4 4 12", "train.lr_decay=constant")


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_ramped_batch_trains_as_runs_at_each_size_at_any_layout_and_resumed(single_process, pool2, tmp_path):
    ramped = run(str(tmp_path / "ramp"), *RAMP)
    small = run(str(tmp_path / "sizes"), "train.global_batch_size=4", "train.lr_decay=constant", steps=3)
    full = run(str(tmp_path / "sizes"), "train.lr_decay=constant")  # (resumed at step 3 with the batch of 8)
    assert ramped == pytest.approx(small + full, rel=1e-6)
    logged = rows(tmp_path / "ramp")
    assert [r["global_batch_size"] for r in logged] == [4, 4, 4, 8, 8, 8]
    assert [r["consumed_samples"] for r in logged] == [4, 8, 12, 20, 28, 36]
    for layout in (("parallel.zero_stage=1",), ("parallel.pp=2",)):  # (DP=2: 1 micro-batch a step, then 2)
        losses = pool2.run(run, str(tmp_path / layout[0]), *RAMP, *layout)[0]
        assert losses == pytest.approx(ramped, rel=1e-5, abs=1e-5), layout
    cut = run(str(tmp_path / "cut"), *RAMP, steps=2) + run(str(tmp_path / "cut"), *RAMP)
    assert cut == pytest.approx(ramped, rel=1e-6)


def test_the_ramps_sizes_are_megatrons_and_bad_ramps_are_refused():
    """megatron-core's RampupBatchsizeNumMicroBatchesCalculator: start + floor(consumed / (samples / increments))
    x increment, the full batch once more than `samples` are consumed."""
    from training.config import load_config

    ramp = BatchRamp(32, 32, 300)  # (3 increments to 128: one every 100 samples)
    assert [ramp.size_at(c, 128) for c in (0, 99, 100, 199, 200, 299, 300, 301, 10**9)] == [
        32, 32, 64, 64, 96, 96, 128, 128, 128]
    sampler = GlobalBatchSampler(1000, 128, 1, ramp=ramp)
    assert [sampler.batch_size_at(c) for c in (0, 100)] == [32, 64] and len(sampler.global_batch(100)) == 64
    assert GlobalBatchSampler(1000, 128, 1).batch_size_at(0) == 128
    assert load_config("configs/train/debug.yaml", ["train.rampup_batch_size=4,4,12", "train.micro_batch_size=2"]
                       ).validate(world_size=2)
    for spec, says in (("4 4", "expected three whole numbers"), ("4 x 12", "expected three whole numbers"),
                       ("8 4 12", "START 8 must be below train.global_batch_size=8"),
                       ("2 4 12", "which INCREMENT 4 must reach from it"),
                       ("3 2 12", "which INCREMENT 2 must reach from it")):
        with pytest.raises(ConfigError, match=f"train.rampup_batch_size='{spec}': .*{says}"):
            load_config("configs/train/debug.yaml", [f"train.rampup_batch_size={spec}"]).validate()
    with pytest.raises(ConfigError, match="its START 2 must be a multiple of train.micro_batch_size x the "
                                          "data-parallel size = 4"):
        load_config("configs/train/debug.yaml", ["train.rampup_batch_size=2 2 12", "train.micro_batch_size=2"]
                    ).validate(world_size=2)


def test_throughput_of_a_log_interval_the_batch_grew_in_is_over_its_steps_sizes(single_process, tmp_path,
                                                                                monkeypatch):
    """A log row's samples/s is the interval's samples over its time: the interval of steps 1-5 trains 4 + 4 + 4 +
    8 + 8 samples (5.6 a step), not five steps of its last step's 8; global_batch_size is still the step's own."""
    from common import metrics

    monkeypatch.setattr(metrics.StepClock, "interval", lambda self: (self._restart(), (1.0, 0.0))[1])
    run(str(tmp_path / "r"), *RAMP, "train.log_interval=5", "train.eval_interval=0")
    logged = rows(tmp_path / "r")
    assert [(r["step"], r["global_batch_size"]) for r in logged] == [(5, 8), (6, 8)]
    assert [r["samples_per_s"] for r in logged] == pytest.approx([5.6, 8.0])


def test_held_out_measures_a_ramped_runs_checkpoints_at_a_micro_batch_the_ramp_does_not_divide(single_process,
                                                                                                 tmp_path):
    """training.held_out reads no ramp (each measurement is eval_batches global batches of train.global_batch_size):
    its rule that START and INCREMENT split into micro-batches over the data-parallel ranks refused a measurement at
    a micro-batch (or DP size) the training run's ramp does not divide."""
    from training.held_out import main

    run(str(tmp_path / "r"), *RAMP, "train.eval_interval=0", steps=1)
    rows_file = tmp_path / "rows.jsonl"
    main(["--run-dir", str(tmp_path / "r"), "--out", str(rows_file), "--set", "train.micro_batch_size=8"])
    (row,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert (row["step"], row["eval_samples"]) == (1, 16)
