"""The DeepSpeed trainer against its references: ZeRO-n = ZeRO-0, DP=2 = DP=1, TP=2 = TP=1,
PP=2 = PP=1, TP=2 x PP=2 = TP=1 x PP=1, resume = uninterrupted; with dropout on, every layout = one process.
The held-out loss: the exported model's on the same samples, equal at every layout, and training's losses the
same without it.

All runs: the debug model, fp32, 6 steps of global batch 8 (micro-batch 2), no dropout unless said, the
held-out loss at steps 3 and 6.
"""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import REFERENCE_EMA, STEPS, held_out_losses, run
from training.checkpoint import latest_tag


def grad_norms(run_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params_norms(run_dir) -> list[float]:
    return [json.loads(line)["params_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_metrics_are_written(reference):
    losses, path = reference
    assert losses[-1] < losses[0] - 0.3
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "tflops_per_gpu", "mfu", "mem_gb"):
        assert key in lines[0]
    assert lines[0]["grad_norm"] > 0 and lines[-1]["loss"] == pytest.approx(losses[-1])
    assert (path / "config.yaml").is_file() and list((path / "tensorboard").iterdir())
    assert (path / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_equal_zero0(pool2, reference, tmp_path, stage):
    losses = pool2.run(run, str(tmp_path), f"parallel.zero_stage={stage}")[0]
    assert losses == pytest.approx(reference[0], rel=1e-5, abs=1e-5)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(reference[1]), rel=1e-5)
    assert params_norms(tmp_path) == pytest.approx(params_norms(reference[1]), rel=1e-6)  # (each DP part once)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_communication_settings_leave_the_losses(pool2, reference, tmp_path, stage):
    """parallel.zero_*: reducing in the background of backward in small buckets (ZeRO-3: gathering ahead in small
    pieces, keeping no parameter gathered) changes when and in what pieces gradients and parameters travel, not
    their values: the reference run's losses."""
    knobs = ("parallel.zero_overlap_comm=true", "parallel.zero_bucket_size=5000", "parallel.zero3_prefetch_size=1000",
             "parallel.zero3_persistence_threshold=0")
    losses = pool2.run(run, str(tmp_path), f"parallel.zero_stage={stage}", *knobs, "train.eval_interval=0")[0]
    assert losses == pytest.approx(reference[0], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("stage", [0, 3])  # (ZeRO-3 partitioned every TP shard over the TP ranks too)
def test_tp2_equals_tp1(pool2, reference, tmp_path, stage):
    losses = pool2.run(run, str(tmp_path), "parallel.tp=2", f"parallel.zero_stage={stage}")[0]
    assert losses == pytest.approx(reference[0], rel=1e-5, abs=1e-5)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(reference[1]), rel=1e-5)
    assert params_norms(tmp_path) == pytest.approx(params_norms(reference[1]), rel=1e-6)  # (replicated ones once)


@pytest.mark.parametrize("layout", [("parallel.pp=2",), ("train.precision=bf16",)], ids=["fp32-pp2", "bf16"])
def test_grad_norm_is_logged_without_clipping(pool2, reference, tmp_path, layout):
    """DeepSpeed's fp32 ZeRO-0 step computes no norm when it does not clip (train.grad_clip=0): the first
    step's norm is still logged, the reference run's pre-clipping norm (bf16: its optimizer's own norm)."""
    pool2.run(run, str(tmp_path), "train.grad_clip=0", *layout, steps=1)
    bf16 = "train.precision=bf16" in layout
    assert grad_norms(tmp_path)[0] == pytest.approx(grad_norms(reference[1])[0], rel=2e-2 if bf16 else 1e-5)
    assert params_norms(tmp_path)[0] == pytest.approx(params_norms(reference[1])[0], rel=1e-4 if bf16 else 1e-6)


def test_deepspeed_does_not_synchronize_the_device_at_each_micro_batch(single_process, tmp_path, monkeypatch):
    """DeepSpeed's throughput timer, on unless configured, synchronizes the device as each micro-batch starts and
    steps (from the second step on): on a GPU the host could not queue the next one's work ahead. The trainer
    times its steps itself."""
    from deepspeed.accelerator import get_accelerator

    calls = []
    monkeypatch.setattr(get_accelerator(), "synchronize", lambda *args, **kwargs: calls.append(1))
    run(str(tmp_path), steps=3)  # (4 micro-batches a step)
    assert calls == []


def test_throughput_is_the_log_intervals_mean_step_without_saves_and_evaluation(single_process, tmp_path,
                                                                               monkeypatch):
    """samples/s (tokens/s, TFLOP/s and MFU follow from it) is the mean over every step since the last log line:
    it was the logging step's alone. Checkpoint saves and the held-out loss are left out, as Megatron-LM's
    interval timer leaves them out, and so is finishing a background save; waiting for a step's input counts in
    the step and is reported as its share (data_wait_pct). On a fake clock: step k takes k s after waiting 0.5 s
    for its input, a held-out loss 100 s, a save 1000 s, a check for finished background saves 10,000 s."""
    import types

    import common.metrics as metrics
    import training.engine as engine_module
    from training.trainer import Trainer

    now, steps = [0.0], []
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def slowed(real, seconds):
        def call(*args, **kwargs):
            now[0] += seconds()
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(engine_module, "train_step", slowed(engine_module.train_step,
                                                            lambda: steps.append(1) or len(steps)))
    monkeypatch.setattr(Trainer, "_with_samples", slowed(Trainer._with_samples, lambda: 0.5))
    monkeypatch.setattr(Trainer, "held_out_loss", slowed(Trainer.held_out_loss, lambda: 100))
    monkeypatch.setattr(Trainer, "save", slowed(Trainer.save, lambda: 1000))
    monkeypatch.setattr(Trainer, "complete_saves", slowed(Trainer.complete_saves, lambda: 10_000))  # (after each step)
    run(str(tmp_path), "train.log_interval=2", "train.save_interval=1", "train.eval_interval=2", steps=4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples_per_s"], r["data_wait_pct"]) for r in rows] == [(2, 8 / 2, 25), (4, 8 / 4, 12.5)]


def test_the_logged_rates_are_the_jobs_and_the_flops_each_gpus(monkeypatch):
    """samples/s and tokens/s are the whole job's (the global batch over the step time); TFLOP/s and MFU one GPU's
    (the job's FLOPs over the world size): at DP=2 with a 2 s step and 100 TFLOP/s peak, by hand."""
    import types

    from training.config import load_config
    import training.trainer as trainer_module
    from training.flops import train_flops_per_sample
    from training.trainer import Trainer

    cfg = load_config("configs/train/debug.yaml", ["train.global_batch_size=8"])
    rows = []
    fake = types.SimpleNamespace(cfg=cfg, world=2, peak_flops=100e12, step=7, consumed=56, log=types.SimpleNamespace(
        step=rows.append), nonfinite_guard=types.SimpleNamespace(skipped=0), engine=None)
    monkeypatch.setattr(trainer_module, "params_norm", lambda engine: 3.0)  # (no engine here)
    Trainer.log_step(fake, 1.5, 1e-3, 0.5, elapsed=2.0, waited=0.5)
    m = cfg.model
    tflops = train_flops_per_sample(m) * 8 / 2.0 / 2 / 1e12
    assert rows[0]["samples_per_s"] == 4.0 and rows[0]["tokens_per_s"] == 4.0 * (m.text_seq_len + m.image_seq_len)
    assert rows[0]["tflops_per_gpu"] == pytest.approx(tflops) and rows[0]["mfu"] == pytest.approx(tflops / 100)
    assert rows[0]["world_size"] == 2 and rows[0]["step"] == 7 and rows[0]["data_wait_pct"] == 25
    assert rows[0]["consumed_samples"] == 56


def ranks_values(values_by_rank: list[dict]) -> dict:
    """common.metrics.max_over_ranks of this rank's entry of `values_by_rank`."""
    import torch.distributed as dist

    from common.metrics import max_over_ranks

    return max_over_ranks(values_by_rank[dist.get_rank()], ranked=("wait", "mem"))


def test_max_over_ranks_gives_each_value_the_largest_rank_and_names_it(pool2):
    """Every rank gets each value's largest over the ranks, and for the keys asked for the rank holding it (the
    lower of two equal ones); one process gets its own values."""
    from common.metrics import max_over_ranks

    values = [{"wait": 1.5, "mem": 3.0, "other": 7.0}, {"wait": 40.0, "mem": 3.0, "other": -1.0}]
    first, second = pool2.run(ranks_values, values)
    assert first == second == {"wait": 40.0, "mem": 3.0, "other": 7.0, "wait_rank": 1, "mem_rank": 0}
    assert max_over_ranks({"wait": 1.5}, ranked=("wait",)) == {"wait": 1.5}


def run_with_slow_reads_on_rank_1(run_dir: str) -> list[float]:
    """`run` (2 steps, a log line each) where rank 1 takes 1 s longer to get each step's input."""
    import time

    import torch.distributed as dist

    from training.trainer import Trainer

    real = Trainer._with_samples

    def slow(self, micro_batches):
        if dist.get_rank() == 1:
            time.sleep(1.0)
        return real(self, micro_batches)

    Trainer._with_samples = slow
    try:
        return run(run_dir, "train.eval_interval=0", "train.save_interval=0", steps=2)
    finally:
        Trainer._with_samples = real


def test_the_logged_data_wait_is_the_slowest_readers_and_names_its_rank(pool2, tmp_path):
    """At DP=2 with rank 1's reads 1 s slower, data_wait_pct is rank 1's share of the step (rank 0 waited for
    nothing but rank 1, in the gradients' all-reduce, and said ~0) and data_wait_pct_rank says 1; the memory peak
    is the largest of the ranks', with its rank."""
    pool2.run(run_with_slow_reads_on_rank_1, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["data_wait_pct_rank"] == 1 and r["data_wait_pct"] > 50 for r in rows)
    assert all(r["mem_gb_rank"] in (0, 1) and r["mem_gb"] > 0 for r in rows)


def test_a_stop_at_a_measuring_step_still_measures(single_process, tmp_path, monkeypatch):
    """A stop requested at a step whose held-out loss is due (here every step) measures it before saving: the
    resumed run starts after that step and would never measure it."""
    import training.engine as engine_module
    from common.preemption import Preempted

    real_step = engine_module.train_step

    def step_then_stop(*args, **kwargs):
        (tmp_path / "STOP").touch()  # (during step 1; seen after it)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine_module, "train_step", step_then_stop)
    with pytest.raises(Preempted, match="after step 1"):
        run(str(tmp_path), "train.eval_interval=1", steps=2)
    assert list(held_out_losses(tmp_path)) == [1]


def test_a_run_past_exit_after_minutes_saves_after_a_step_and_leaves_for_requeue(single_process, tmp_path):
    """train.exit_after_minutes (Megatron-LM's --exit-duration-in-mins), here run out before the first step: the
    segment still takes one step (one whose start-up outlasted the limit would be requeued for ever), then saves
    and stops as a preemption does, naming the limit; the next segment goes on from that checkpoint."""
    from common.preemption import Preempted

    with pytest.raises(Preempted, match=r"^stopped by train.exit_after_minutes=1e-09 after step 1; checkpoint saved"):
        run(str(tmp_path), "train.exit_after_minutes=1e-9", "train.eval_interval=0", steps=3)
    assert (tmp_path / "REQUEUE").read_text() == "step 1\n" and latest_tag(tmp_path) == "step_00000001"
    assert len(run(str(tmp_path), "train.eval_interval=0", steps=3)) == 2 and not (tmp_path / "REQUEUE").exists()


def test_dist_timeout_minutes_reaches_the_process_groups(single_process, tmp_path, monkeypatch):
    """train.dist_timeout_minutes (Megatron-LM's --distributed-timeout-minutes) is the timeout the trainer joins
    the process group with and builds megatron-core's groups with."""
    from megatron.core import parallel_state as ps

    import training.trainer as trainer_module
    from model_parallel import state

    seen, real_world, real_groups = [], trainer_module.init_distributed, trainer_module.init_parallel
    monkeypatch.setattr(trainer_module, "init_distributed", lambda m: seen.append(("world", m)) or real_world(m))
    monkeypatch.setattr(trainer_module, "init_parallel",
                        lambda tp, pp, m: seen.append(("groups", m)) or real_groups(tp, pp, m))
    run(str(tmp_path), "train.dist_timeout_minutes=7", "train.eval_interval=0", steps=1)
    assert seen == [("world", 7), ("groups", 7)]
    built = []  # (megatron-core's groups, built anew: here only as far as the call)
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda **kw: built.append(kw["distributed_timeout_minutes"]))
    state.init_parallel(1, 1, 7)
    assert built == [7]


def test_held_out_loss_is_the_exported_models_and_leaves_training_alone(pool2, single_process, reference,
                                                                         dropout_reference, tmp_path):
    """The held-out loss at the last step is the exported weights' loss on the first eval_batches global batches
    of held-out samples (generated past the training set's), in eval mode: with dropout on it differs from the
    train-mode loss. Training without the measurements gives the same losses bit for bit (no dropout state or
    data order is touched), at DP=2 as with dropout on one process."""
    from data_pipeline.synthetic import SyntheticCodes
    from training.export import export, load_exported

    assert sorted(held_out_losses(reference[1])) == [3, STEPS]
    assert pool2.run(run, str(tmp_path / "no-eval"), "train.eval_interval=0")[0] == reference[0]
    assert held_out_losses(tmp_path / "no-eval") == {}
    assert run(str(tmp_path / "dropout-no-eval"), DROPOUT, "train.eval_interval=0") == dropout_reference[0]

    for run_dir, mode in ((reference[1], "plain"), (dropout_reference[1], "dropout")):
        model = load_exported(export(run_dir, out=tmp_path / f"export-{mode}"))
        held_out = SyntheticCodes(model.cfg, size=16, seed=1234, first=1024)  # debug.yaml's seed, 2 batches of 8
        assert all(not torch.equal(held_out[i][1], SyntheticCodes(model.cfg, seed=1234)[i][1]) for i in range(16))
        text, codes = map(torch.stack, zip(*(held_out[i] for i in range(16))))
        with torch.no_grad():
            model.eval()
            expected = model.loss(text, codes).item()
            model.train()
            in_train_mode = model.loss(text, codes).item()
        assert held_out_losses(run_dir)[STEPS] == pytest.approx(expected, rel=1e-5), mode
        # the logged norm of the weights: the exported ones' (Megatron-LM's --log-params-norm)
        weights = torch.cat([p.detach().double().flatten() for p in model.parameters()])  # (fp32's norm: 6e-6 off)
        assert params_norms(run_dir)[-1] == pytest.approx(weights.norm().item(), rel=1e-6), mode
        assert (in_train_mode != pytest.approx(expected, rel=1e-3)) == (mode == "dropout")


def held_out_rows(run_dir: str, out: str, *layouts: tuple[str, ...]) -> list[list[dict]]:
    """training.held_out's rows of every checkpoint of `run_dir` at each layout, appended to `out`."""
    from training.config import load_config
    from training.held_out import evaluate

    return [evaluate(load_config(f"{run_dir}/config.yaml", list(sets)), run_dir, "all", out) for sets in layouts]


def test_held_out_loss_of_checkpoints_at_other_layouts_is_the_one_logged_in_training(pool2, single_process,
                                                                                     reference, tmp_path, capsys,
                                                                                     monkeypatch):
    """training.held_out measures the reference run's checkpoints (trained at DP=2) at TP=2 and at PP=2, and one
    of them through its command line on one process: each the held-out loss the run logged at that step, drawn
    against the steps. A checkpoint that is not there, another network, and a run directory without config.yaml
    are refused naming them, before anything is written."""
    from matplotlib.axes import Axes

    from training.held_out import main, plot

    run_dir, logged, out = reference[1], held_out_losses(reference[1]), tmp_path / "rows.jsonl"
    tp2, pp2 = pool2.run(held_out_rows, str(run_dir), str(out), ("parallel.tp=2",), ("parallel.pp=2",))[0]
    for rows in (tp2, pp2):
        assert [(r["checkpoint"], r["step"], r["consumed_samples"]) for r in rows] == [("step_00000003", 3, 24),
                                                                                      ("step_00000006", 6, 48)]
        assert [r["valid_loss"] for r in rows] == pytest.approx([logged[3], logged[6]], rel=1e-5)
        assert rows[0]["eval_samples"] == 16 and rows[0]["valid_shards"] == "(synthetic)"
    assert "tp 2 x pp 1" in tp2[0]["layout"] and "tp 1 x pp 2" in pp2[0]["layout"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == tp2 + pp2  # (rank 0's rows, appended)
    # rows.png: the file's rows against their steps, one line per held-out set (a step measured again: its newest)
    drawn, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or real(self, x, y,
                                                                                                          *a, **k))
    with open(out, "a") as f:
        f.write('{"step": 9, "valid_loss": 1.0, "valid_sh')  # (a line cut short by a killed job)
    assert out.with_suffix(".png").stat().st_size > 10_000 and plot(out) == out.with_suffix(".png")
    assert drawn == [([3, 6], [r["valid_loss"] for r in pp2])]

    main(["--run-dir", str(run_dir), "--out", str(tmp_path / "one.jsonl")])  # (latest: step 6)
    (row,) = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert row["step"] == 6 and row["valid_loss"] == pytest.approx(logged[6], rel=1e-5)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    # --ema: the moving average's, which training measured beside the weights' (the reference keeps one)
    main(["--run-dir", str(run_dir), "--ema", "--out", str(tmp_path / "ema.jsonl")])
    (row,) = [json.loads(line) for line in (tmp_path / "ema.jsonl").read_text().splitlines()]
    logged_ema = held_out_losses(run_dir, "ema_valid_loss")
    assert sorted(logged_ema) == [3, 6] and logged_ema[6] != pytest.approx(logged[6], rel=1e-3)
    assert row["weights"] == "ema" and row["valid_loss"] == pytest.approx(logged_ema[6], rel=1e-5)
    # --checkpoints new: those without a row for this held-out data (step 3 here; then none; other samples: both)
    for sets, steps_then, nothing_new in (([], [6, 3], False), ([], [6, 3], True),
                                          (["--set", "train.eval_batches=1"], [6, 3, 3, 6], False)):
        main(["--run-dir", str(run_dir), "--checkpoints", "new", "--out", str(tmp_path / "one.jsonl"), *sets])
        rows = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == steps_then, sets
        assert ("nothing new to measure" in capsys.readouterr().out) == nothing_new
    assert [r["eval_samples"] for r in rows] == [16, 16, 8, 8]
    for args, says in [
        (["--checkpoints", "step_00000003,step_00000009"], "training.held_out: --checkpoints step_00000003,"
         "step_00000009: step_00000009 is neither a complete checkpoint of "),
        (["--set", "model.decoder_layers=3"], "the checkpoint holds another network (model.decoder_layers 2 -> 3)"),
        (["--config", str(tmp_path / "none.yaml")], f"config error: {tmp_path / 'none.yaml'}: no such file"),
    ]:
        with pytest.raises(SystemExit) as refused:
            main(["--run-dir", str(run_dir), "--out", str(tmp_path / "refused.jsonl"), *args])
        assert says in str(refused.value.code)
        assert not (tmp_path / "refused.jsonl").exists()


def test_held_out_new_measures_a_checkpoint_saved_again_by_a_run_resumed_before_it(single_process, reference,
                                                                                     tmp_path):
    """A run resumed from an earlier checkpoint (`latest` set back to step 3, step 4's batch read past, as after a
    loss spike) saves step 6 again under its tag: --checkpoints new measures the new save (the tag had a row, so it
    was passed over and the file kept the abandoned weights' loss as step 6's)."""
    from training.held_out import main

    run_dir, out = tmp_path / "r", tmp_path / "rows.jsonl"
    shutil.copytree(reference[1], run_dir)
    main(["--run-dir", str(run_dir), "--checkpoints", "new", "--out", str(out)])
    (run_dir / "checkpoints" / "latest").write_text("step_00000003\n")
    run(str(run_dir), REFERENCE_EMA, "train.skip_steps=4")
    main(["--run-dir", str(run_dir), "--checkpoints", "new", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 6] and len({r["save_id"] for r in rows}) == 3
    assert rows[2]["valid_loss"] == pytest.approx(held_out_losses(run_dir)[6], rel=1e-5)
    assert rows[2]["valid_loss"] != pytest.approx(rows[1]["valid_loss"], rel=1e-4)


def held_out_rows_or_error(run_dir: str, out: str) -> str:
    """training.held_out of every checkpoint of `run_dir` into `out`, or the error it raised on this rank."""
    from common.checkpoints import RunDirError

    try:
        return str(held_out_rows(run_dir, out, ())[0])
    except RunDirError as e:
        return f"RunDirError: {e}"


def test_held_out_loss_of_exports_is_their_models_loss(single_process, reference, tmp_path):
    """training.held_out --checkpoints EXPORT,...: an export of the step-6 checkpoint measures what the run logged
    at step 6; the average of the step-3 and step-6 checkpoints (training.export --average 2) measures its own
    model's loss on the held-out samples (generated past the training set's), computed here from the export
    loaded on its own. Their rows name the export and what it averages, with no step (sweep collect skips them)."""
    from data_pipeline.synthetic import SyntheticCodes
    from training.export import export, load_exported
    from training.held_out import main

    run_dir = reference[1]
    last, mean = export(run_dir, out=tmp_path / "last"), export(run_dir, out=tmp_path / "mean", average=2)
    main(["--run-dir", str(run_dir), "--checkpoints", f"{last},{mean}", "--out", str(tmp_path / "rows.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["export"], r["checkpoint"], r["averaged"], "step" in r) for r in rows] == [
        (str(last), "step_00000006", None, False), (str(mean), "step_00000006", "step_00000003,step_00000006", False)]
    assert rows[0]["valid_loss"] == pytest.approx(held_out_losses(run_dir)[6], rel=1e-5)
    model = load_exported(mean)
    held_out = SyntheticCodes(model.cfg, size=16, seed=1234, first=1024)  # (debug.yaml's seed, 2 batches of 8)
    text, codes = map(torch.stack, zip(*(held_out[i] for i in range(16))))
    with torch.no_grad():
        assert rows[1]["valid_loss"] == pytest.approx(model.loss(text, codes).item(), rel=1e-5)
    assert rows[1]["valid_loss"] != pytest.approx(rows[0]["valid_loss"], rel=1e-3)


def test_held_out_needs_no_training_data_and_checks_the_held_out_tokenizers_against_the_checkpoints(
        single_process, tmp_path):
    """A run on code shards measured after its training folder is gone: the held-out set's tokenizers are checked
    against those its checkpoint records (its training data's), and its loss is the one logged in training; a
    checkpoint that records other tokenizers is refused naming the held-out set, and so is measuring it beside one
    that records the run's."""
    from data_pipeline.synthetic import write_random_code_shards
    from training.held_out import main

    write_random_code_shards(tmp_path / "train", 4)
    write_random_code_shards(tmp_path / "valid", 6)  # (18 records: 2 global batches of 8)
    model = ["model.image_grid=2", "model.text_seq_len=4", "model.text_vocab_size=128", "model.image_vocab_size=64"]
    run_dir = tmp_path / "run"
    run(str(run_dir), *model, "data.synthetic=false", f"data.shards={tmp_path}/train",
        f"data.valid_shards={tmp_path}/valid")
    shutil.rmtree(tmp_path / "train")
    main(["--run-dir", str(run_dir), "--out", str(tmp_path / "rows.jsonl")])
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["valid_loss"] == pytest.approx(held_out_losses(run_dir)[STEPS], rel=1e-5)
    state_file = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["data_tokenizers"]["vq"]["hash"] = "another"
    state_file.write_text(json.dumps(state))
    with pytest.raises(SystemExit, match=r"data\.valid_shards=.*/valid': made with another image tokenizer"):
        main(["--run-dir", str(run_dir), "--out", str(tmp_path / "rows.jsonl")])
    with pytest.raises(SystemExit, match=r"step_00000006 was trained on data made with another image tokenizer than "
                                         r".*step_00000003: one held-out set cannot be measured for both"):
        main(["--run-dir", str(run_dir), "--checkpoints", "all", "--out", str(tmp_path / "rows.jsonl")])


def test_held_out_names_an_export_by_its_absolute_path_and_takes_one_with_a_comma(single_process, reference, tmp_path,
                                                                                  monkeypatch):
    """--checkpoints with a relative export path: its row names the folder absolutely (held_out.jsonl lies in the run
    folder, read from anywhere); an export folder whose name holds a comma is that folder (it was split in two)."""
    from training.export import export
    from training.held_out import main

    monkeypatch.chdir(tmp_path)
    export(reference[1], out=tmp_path / "last,of the run")
    for which in ("last,of the run", str(tmp_path / "last,of the run")):
        main(["--run-dir", str(reference[1]), "--checkpoints", which, "--out", str(tmp_path / "rows.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["export"] for r in rows] == [str(tmp_path / "last,of the run")] * 2


def test_held_out_refuses_an_unwritable_out_on_every_rank_before_measuring(pool2, reference, tmp_path):
    """--out that rank 0 cannot write (here a folder) is every rank's error, before any checkpoint is measured
    (rank 0 alone writes it: the others went on into the next checkpoint's collectives and waited there)."""
    errors = pool2.run(held_out_rows_or_error, str(reference[1]), str(tmp_path), timeout=60)
    assert errors[0] == errors[1] and errors[0].startswith(f"RunDirError: --out {tmp_path}: cannot be written")


def test_held_out_takes_zero3_for_a_run_started_from_a_text_encoder(single_process, reference, tmp_path):
    """model.init_text_encoder (and train.init_from) in the run's config.yaml are a training start's, not read
    here: the rules about them (no ZeRO-3 with model.init_text_encoder) do not refuse the measurement's layout."""
    import yaml

    from training.held_out import main

    run_dir, logged = reference[1], held_out_losses(reference[1])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"].update(init_text_encoder=str(tmp_path / "encoder_gone"), freeze_text_encoder=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    main(["--run-dir", str(run_dir), "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "rows.jsonl"),
          "--set", "parallel.zero_stage=3"])
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["step"] == 6 and row["valid_loss"] == pytest.approx(logged[6], rel=1e-5)


def test_dp1_equals_dp2_at_the_same_global_batch(single_process, reference, tmp_path):
    losses = run(str(tmp_path))
    assert losses == pytest.approx(reference[0], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_at_dp2_equal_dp1(single_process, pool2, tmp_path, stage):
    """bf16 with ZeRO 1-3 accumulates gradients in fp32 and reduces them in fp32: the first step's gradient
    norm over DP=2 ranks is DP=1's (the same global batch in 4 micro-batches) to fp32 precision. DeepSpeed's
    default casts what it reduces to bf16 (2e-5 apart here), and keeps bf16 gradients at ZeRO-2/3."""
    bf16 = ("train.precision=bf16", f"parallel.zero_stage={stage}")
    pool2.run(run, str(tmp_path / "dp2"), *bf16, steps=1)
    run(str(tmp_path / "dp1"), *bf16, steps=1)
    assert grad_norms(tmp_path / "dp2") == pytest.approx(grad_norms(tmp_path / "dp1"), rel=2e-6)
    assert params_norms(tmp_path / "dp2") == pytest.approx(params_norms(tmp_path / "dp1"), rel=1e-6)  # (the masters')


def test_resume_continues_the_uninterrupted_run(pool2, reference, tmp_path):
    first = pool2.run(run, str(tmp_path), steps=3)[0]
    second = pool2.run(run, str(tmp_path))[0]  # resumes from step 3
    assert len(first) == 3 and len(second) == STEPS - 3
    assert first + second == pytest.approx(reference[0], rel=1e-6, abs=1e-6)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(reference[1]), rel=1e-6)


def rank_bytes(checkpoint: Path) -> list[int]:
    """Bytes of tensor files each rank wrote into a checkpoint folder (torch_dist names them __<rank>_<n>.distcp)."""
    sizes: dict[int, int] = {}
    for f in checkpoint.glob("__*_*.distcp"):
        rank = int(f.name.split("_")[2])
        sizes[rank] = sizes.get(rank, 0) + f.stat().st_size
    return [sizes.get(r, 0) for r in range(max(sizes) + 1)]


@pytest.mark.parametrize("zero", [0, 1])
def test_async_save_resumes_and_ranks_write_equal_shares(pool2, reference, tmp_path, zero):
    """Saved in the background at DP=2, resumed synchronously: the uninterrupted run's losses. Each rank
    writes half the bytes: its own ZeRO-1 part, or at ZeRO-0 half of the whole tensors (fully parallel save)."""
    first = pool2.run(run, str(tmp_path), f"parallel.zero_stage={zero}", "train.async_save=true", steps=3)[0]
    assert latest_tag(tmp_path) == "step_00000003"  # the last save was waited for
    written = rank_bytes(tmp_path / "checkpoints" / "step_00000003")
    assert len(written) == 2 and written[0] == pytest.approx(sum(written) / 2, rel=0.1), written
    second = pool2.run(run, str(tmp_path), f"parallel.zero_stage={zero}")[0]
    assert first + second == pytest.approx(reference[0], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("extra", [("parallel.zero_stage=0",), ("parallel.zero_stage=1",),
                                   ("parallel.activation_checkpointing=full",)], ids=["zero0", "zero1", "recompute"])
def test_pp2_equals_pp1(pool2, reference, tmp_path, extra):
    losses = pool2.run(run, str(tmp_path), "parallel.pp=2", *extra)
    assert losses[0] == losses[1]  # every stage reports the pipeline's loss
    assert losses[0] == pytest.approx(reference[0], rel=1e-5, abs=1e-5)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(reference[1]), rel=1e-5)
    # The clipped gradient norm covers both stages' parameters, replicated ones included; so does the weights' norm.
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(reference[1]), rel=1e-5)
    assert params_norms(tmp_path) == pytest.approx(params_norms(reference[1]), rel=1e-6)


def test_tp2_pp2_on_four_processes_equals_tp1_pp1(pool4, reference, tmp_path):
    losses = pool4.run(run, str(tmp_path), "parallel.tp=2", "parallel.pp=2")
    assert losses[0] == pytest.approx(reference[0], rel=1e-5, abs=1e-5)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(reference[1]), rel=1e-5)
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(reference[1]), rel=1e-5)
    assert params_norms(tmp_path) == pytest.approx(params_norms(reference[1]), rel=1e-6)


@pytest.mark.parametrize("saved_at, resumed_at", [
    (("parallel.zero_stage=1",), None),           # DP=2 -> DP=1 (this one process)
    (("parallel.tp=2",), ()),
    (("parallel.pp=2",), ()),
    (("parallel.zero_stage=3",), ("parallel.zero_stage=3",)),
    ((), ("parallel.tp=2", "parallel.zero_stage=2")),
], ids=["dp2-zero1-to-dp1", "tp2-to-tp1", "pp2-to-pp1", "zero3-to-zero3", "tp1-to-tp2-zero2"])
def test_resume_on_another_layout(single_process, pool2, reference, tmp_path, saved_at, resumed_at):
    """Stop after 3 steps at one layout, continue at another: the losses of the uninterrupted run, and the moving
    average of the weights it kept (train.ema_decay: each rank's own part of it saved and loaded like Adam's
    moments) is the reference's at the end."""
    from safetensors.torch import load_file

    from training.export import export

    first = pool2.run(run, str(tmp_path), *saved_at, REFERENCE_EMA, steps=3)[0]
    if resumed_at is None:
        second = run(str(tmp_path), "parallel.zero_stage=1", REFERENCE_EMA)
    else:
        second = pool2.run(run, str(tmp_path), *resumed_at, REFERENCE_EMA)[0]
    assert first + second == pytest.approx(reference[0], rel=1e-4, abs=1e-4)
    state = json.loads((tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["consumed_samples"] == STEPS * 8 and state["step"] == STEPS
    ours, theirs = (load_file(str(export(folder, out=tmp_path / f"ema_{i}", ema=True) / "model.safetensors"))
                    for i, folder in enumerate((tmp_path, reference[1])))
    weights = load_file(str(export(reference[1], out=tmp_path / "weights") / "model.safetensors"))
    assert set(ours) == set(theirs) and any(not torch.equal(theirs[n], weights[n]) for n in weights)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_export_is_layout_independent_and_loads_without_deepspeed(single_process, pool2, reference, tmp_path):
    from safetensors.torch import load_file, save_file

    from training.export import export, load_exported, weight_groups

    tp2_dir = tmp_path / "tp2"
    pool2.run(run, str(tp2_dir), "parallel.tp=2", "parallel.zero_stage=1")
    a = load_file(str(export(reference[1], out=tmp_path / "a") / "model.safetensors"))
    b = load_file(str(export(tp2_dir, out=tmp_path / "b") / "model.safetensors"))
    # Written as read, 64 KiB of weights at a time: the bytes the safetensors library writes from all of them.
    groups = weight_groups({n: tuple(t.shape) for n, t in a.items()}, 1 << 16)
    tag = json.loads((tmp_path / "a" / "config.json").read_text())["checkpoint"]
    streamed = export(reference[1], out=tmp_path / "c", group_bytes=1 << 16) / "model.safetensors"
    save_file(a, str(tmp_path / "library.safetensors"), metadata={"checkpoint": tag})
    assert len(groups) > 3 and streamed.read_bytes() == (tmp_path / "library.safetensors").read_bytes()
    assert set(a) == set(b) and "decoder.1.cross_attn.fn.kv.weight" in a
    for name in a:  # the TP=2 run's shards come back whole, equal to the TP=1 run's weights
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)  # Adam-amplified fp32 noise
    (tmp_path / "c" / "config.json").write_text((tmp_path / "a" / "config.json").read_text().replace(tag, "step_1"))
    with pytest.raises(ValueError, match=rf"c: model.safetensors holds the weights of checkpoint {tag}, config.json "
                                         "describes step_1 .*; export again"):  # (a re-export stopped between them)
        load_exported(tmp_path / "c")
    model = load_exported(tmp_path / "a")
    # Trained, not random: on the run's own (synthetic) data the loss is below the first step's. (Uniformly
    # random codes would not tell: no model beats ln(vocabulary) on them.)
    from data_pipeline.synthetic import SyntheticCodes

    data = SyntheticCodes(model.cfg, size=1024, seed=1234)  # as configs/train/debug.yaml's run makes it
    text, codes = map(torch.stack, zip(*(data[i] for i in range(8))))
    with torch.no_grad():
        assert 0 < model.loss(text, codes).item() < reference[0][0] - 0.2


def test_bf16_layouts_agree(pool2, tmp_path):
    """bf16 runs are compared with each other (DeepSpeed keeps fp32 masters of bf16-rounded weights)."""
    bf16 = ("train.precision=bf16", "parallel.zero_stage=1")  # fp32 gradient accumulation
    dp2 = pool2.run(run, str(tmp_path / "dp2"), *bf16)[0]
    pp2 = pool2.run(run, str(tmp_path / "pp2"), *bf16, "parallel.pp=2")[0]
    assert all(x == x for x in dp2) and dp2[-1] < dp2[0] - 0.3
    assert pp2 == pytest.approx(dp2, rel=0, abs=5e-3)


def test_adafactor_trains_and_resumes(pool2, tmp_path):
    full = pool2.run(run, str(tmp_path / "full"), "train.optimizer=adafactor", "train.lr=0.1")[0]
    assert full[-1] < full[0] - 0.3
    first = pool2.run(run, str(tmp_path / "pp"), "train.optimizer=adafactor", "train.lr=0.1", "parallel.pp=2",
                      steps=3)[0]
    second = pool2.run(run, str(tmp_path / "pp"), "train.optimizer=adafactor", "train.lr=0.1")[0]
    assert first + second == pytest.approx(full, rel=1e-4, abs=1e-4)
    pool2.run(run, str(tmp_path / "tp"), "train.optimizer=adafactor", "parallel.tp=2", steps=3)
    with pytest.raises(RuntimeError, match="Adafactor's factored statistics are per tensor-parallel shard"):
        pool2.run(run, str(tmp_path / "tp"), "train.optimizer=adafactor")


# ----------------------------------------------------------------------------------------------
# Dropout keyed by sample: the same run at any layout.

DROPOUT = "model.dropout=0.1"


@pytest.fixture(scope="module")
def dropout_reference(single_process, tmp_path_factory):
    """The debug run with dropout 0.1 on one process (DP=TP=PP=1, ZeRO-0): (the losses every layout gives,
    its run directory)."""
    path = tmp_path_factory.mktemp("dropout")
    return run(str(path), DROPOUT), path


@pytest.mark.parametrize("pool, layout", [
    ("pool2", ()),
    ("pool2", ("parallel.zero_stage=3",)),
    ("pool2", ("parallel.pp=2", "parallel.activation_checkpointing=full")),
    ("pool2", ("parallel.tp=2", "parallel.sequence_parallel=true")),
    ("pool4", ("parallel.tp=2", "parallel.pp=2", "parallel.activation_checkpointing=selective")),
], ids=["dp2", "dp2-zero3", "pp2-full", "tp2-sp", "tp2-pp2-selective"])
def test_dropout_gives_the_same_losses_at_any_layout(request, dropout_reference, tmp_path, pool, layout):
    """The one-process dropout run's losses at every layout, the pipeline's with its layers recomputed (their
    masks drawn again in the backward pass, on the stage that holds them)."""
    for losses in request.getfixturevalue(pool).run(run, str(tmp_path), DROPOUT, *layout):
        assert losses == pytest.approx(dropout_reference[0], rel=1e-4, abs=1e-4)
    # measured in eval mode, without dropout, at every layout (the pipeline's eval_batch included)
    assert held_out_losses(tmp_path) == pytest.approx(held_out_losses(dropout_reference[1]), rel=1e-4)


def test_dropout_run_resumed_on_another_layout_continues(pool2, dropout_reference, reference, tmp_path):
    assert dropout_reference[0] != pytest.approx(reference[0], abs=1e-3)  # dropout is on
    first = pool2.run(run, str(tmp_path), DROPOUT, "parallel.pp=2", steps=3)[0]
    second = pool2.run(run, str(tmp_path), DROPOUT, "parallel.tp=2", "parallel.sequence_parallel=true")[0]
    assert first + second == pytest.approx(dropout_reference[0], rel=1e-4, abs=1e-4)


def test_compiled_layers_at_tp2_with_sequence_parallelism_give_the_eager_losses(pool2, dropout_reference, tmp_path):
    """kernels.compile: megatron's TP collectives and the sequence shards' keyed dropout inside compiled graphs,
    through the DeepSpeed engine, the attention core recomputed outside them (selective); the losses of the
    eager one-process run."""
    compiled = pool2.run(run, str(tmp_path), DROPOUT, "kernels.compile=true", "parallel.tp=2",
                         "parallel.sequence_parallel=true", "parallel.activation_checkpointing=selective")
    for losses in compiled:
        assert losses == pytest.approx(dropout_reference[0], rel=1e-4, abs=1e-4)


def keyed_dropout_loss(tp: int, sequence_parallel: bool) -> float:
    """The debug model's training loss on one batch with dropout and model.attention_dropout_invariant."""
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel
    from tests.conftest import debug_batch, debug_model_config

    init_parallel(tp=tp)
    cfg = debug_model_config(**{"model.dropout": 0.1, "model.attention_dropout": 0.1,
                                "model.attention_dropout_invariant": True})
    model = PartiModel(cfg, sequence_parallel=sequence_parallel, init_seed=5).train()
    text, codes = debug_batch(cfg, batch=4, seed=3)
    return model.loss(text, codes, sample_index=torch.arange(100, 104)).item()


def test_invariant_attention_dropout_is_the_same_at_tp2_with_sequence_parallelism(pool2):
    """Attention dropout keyed per head: TP=2 ranks hold different heads, yet draw TP=1's masks."""
    tp1 = pool2.run(keyed_dropout_loss, 1, False)[0]
    assert pool2.run(keyed_dropout_loss, 2, True) == pytest.approx([tp1, tp1], rel=1e-6, abs=1e-6)


def seeded_draws(tp: int, pp: int) -> tuple[list[float], list[float]]:
    """What this rank draws after seed_everything: from the default stream, and from the model-parallel one
    (attention dropout's, forked)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from model_parallel.state import init_parallel, seed_everything

    init_parallel(tp=tp, pp=pp)
    seed_everything(1234)
    default = torch.rand(4).tolist()
    with get_cuda_rng_tracker().fork():
        return default, torch.rand(4).tolist()


def test_each_pipeline_stage_draws_its_own_dropout_masks(pool2):
    """Both streams differ between pipeline stages (they were the same: stage 1's layers drew stage 0's attention
    dropout masks, micro-batch by micro-batch); within a TP group the default stream agrees, the other does not."""
    (default_0, parallel_0), (default_1, parallel_1) = pool2.run(seeded_draws, 1, 2)
    assert default_0 != default_1 and parallel_0 != parallel_1
    (default_0, parallel_0), (default_1, parallel_1) = pool2.run(seeded_draws, 2, 1)
    assert default_0 == default_1 and parallel_0 != parallel_1


def groups_after_run(run_dir: str, *overrides: str) -> int:
    from model_parallel.state import process_groups

    run(run_dir, *overrides, steps=1)
    return len(process_groups())


def megatron_gloo_groups() -> list[str]:
    from megatron.core import parallel_state as ps

    from model_parallel.state import init_parallel

    init_parallel(1, 1)
    return sorted(name for name in dir(ps) if name.endswith("_GLOO") and getattr(ps, name) is not None)


def test_megatron_makes_no_gloo_twins_of_its_data_parallel_groups(pool2):
    """Only megatron's own optimizer uses them (DeepSpeed's is used here); at DP=128 each rank would open a
    TCP connection to each of its 127 peers, with threads, at start."""
    assert pool2.run(megatron_gloo_groups) == [[], []]


def test_a_process_that_trains_again_does_not_keep_the_old_runs_process_groups(pool2, tmp_path):
    """Each run's DeepSpeed groups are destroyed when it ends, megatron's when the layout changes: a process
    that trains many layouts (these tests' workers, a sweep in one process) holds the groups of one run only.
    (Each gloo group keeps threads that wake on their own: ~50 leaked layouts cost a third of a core.)"""
    layouts = [("parallel.pp=2",), ("parallel.tp=2",), ("parallel.pp=2",), ("parallel.tp=2",)]
    counts = [pool2.run(groups_after_run, str(tmp_path / str(i)), *layout)[0] for i, layout in enumerate(layouts)]
    assert counts[2] == counts[0] and counts[3] == counts[1], counts


def fork_after_a_group_became_garbage() -> int | None:
    """A destroyed gloo group left in a reference cycle (garbage only the collector frees, as a finished run's
    engine leaves its groups), then a forked child that collects garbage: its exit code (None: still running)."""
    import gc
    import multiprocessing

    import torch.distributed as dist

    gc.disable()  # (the parent must not collect the cycle before the fork)
    try:
        group = dist.new_group([0, 1])
        dist.barrier(group=group)
        cycle = [group]
        cycle.append(cycle)
        dist.destroy_process_group(group)
        del group, cycle
        child = multiprocessing.get_context("fork").Process(target=gc.collect)
        child.start()
        child.join(20)
        if child.is_alive():
            child.kill()
            child.join()
            return None
        return child.exitcode
    finally:
        gc.enable()
        gc.collect()


def test_a_forked_child_never_finalizes_the_parents_process_groups(pool2):
    """A forked child (a DataLoader worker) that collected the parent's garbage finalized its gloo groups, joining
    threads it does not have: it hung for good (here, every time) or crashed, and the trainer's peers waited in a
    collective (a CI run timed out so). The parent's objects are out of the child's collector's reach."""
    assert pool2.run(fork_after_a_group_became_garbage) == [0, 0]


def test_a_worker_pool_that_never_started_closes():
    """The pool2/pool4 fixtures close their pool at the session's end, also in a session where no test ran on it
    (a test that asks for pool2 in one parametrization only): that was an AttributeError, an error at teardown."""
    from tests.distributed import WorkerPool

    WorkerPool(2).close()


# ----------------------------------------------------------------------------------------------
# The engine's pieces without an engine: DeepSpeed's config, the optimizer's parameter groups, the export's file


@pytest.mark.parametrize("zero, precision, fp32_grads", [(0, "bf16", False), (1, "bf16", True), (3, "bf16", True),
                                                         (1, "fp32", False)])
def test_deepspeed_config_states_the_batch_and_reduces_bf16_gradients_in_fp32_from_zero1(zero, precision, fp32_grads):
    """Accumulation steps = global batch / (micro-batch x DP); clipping and the ZeRO stage as configured; bf16
    gradients accumulated and communicated in fp32 at ZeRO 1-3 only (DeepSpeed has no fp32 accumulation for bf16
    at ZeRO-0); DeepSpeed's throughput timer (a device synchronisation per micro-batch) off."""
    from training.config import load_config
    from training.engine import deepspeed_config

    cfg = load_config("configs/train/debug.yaml", [f"parallel.zero_stage={zero}", f"train.precision={precision}",
                                                   "train.global_batch_size=16", "train.micro_batch_size=2",
                                                   "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, dp_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16, 2, 4)
    buckets = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000} if zero else {}
    zero3 = {"stage3_prefetch_bucket_size": 50_000_000, "stage3_param_persistence_threshold": 100_000}
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": zero, **buckets, **(zero3 if zero == 3 else {})}
    assert ds["bf16"] == {"enabled": precision == "bf16"}
    expected = "fp32" if fp32_grads else None
    assert ds["data_types"] == {"grad_accum_dtype": expected} and ds["communication_data_type"] == expected
    assert ds["timers"] == {"throughput": {"enabled": False}}


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_deepspeed_reads_the_configured_clipping_and_0_as_none(clip):
    """train.grad_clip reaches DeepSpeed as it is, 0 included: DeepSpeed clips at 1.0 where the key is absent
    (GRADIENT_CLIPPING_DEFAULT), so dropping a 0 (or replacing it) would clip a run configured not to."""
    from deepspeed.runtime.config import get_gradient_clipping

    from training.config import load_config
    from training.engine import deepspeed_config

    cfg = load_config("configs/train/debug.yaml", [f"train.grad_clip={clip}"])
    assert get_gradient_clipping(deepspeed_config(cfg, dp_size=1)) == clip


def test_fp32_zero0_clipping_keeps_the_norm_and_scales_only_above_the_limit(single_process):
    """clip_fp32_gradients_megatron_style on a stand-in engine: the norm of all gradients is kept where
    get_global_grad_norm reads it; the gradients are scaled to train.grad_clip when above it, left alone below
    it; without clipping (grad_clip=0: DeepSpeed calls no clipping) nothing is scaled and the norm is taken before
    the model step; behind a bf16 or ZeRO wrapper (which keeps its own norm) the model step is left alone."""
    from training.deepspeed_glue import clip_fp32_gradients_megatron_style

    def engine_with(clip: float, wrapper: str | None = None):
        module = torch.nn.Linear(2, 1)
        module.weight.grad, module.bias.grad = torch.tensor([[3.0, 0.0]]), torch.tensor([4.0])  # norm 5
        engine = types.SimpleNamespace(module=module, gradient_clipping=lambda: clip,
                                       fp16_enabled=lambda: wrapper == "fp16",
                                       bfloat16_enabled=lambda: wrapper == "bf16",
                                       zero_optimization=lambda: wrapper == "zero", _global_grad_norm=None,
                                       norms_at_step=[])
        engine._take_model_step = lambda *args, **kwargs: engine.norms_at_step.append(engine._global_grad_norm)
        clip_fp32_gradients_megatron_style(engine)
        return engine

    def grads(engine):
        return [engine.module.weight.grad.flatten().tolist(), engine.module.bias.grad.tolist()]

    engine = engine_with(clip=1.0)
    engine.clip_fp32_gradients()  # (as DeepSpeed's _take_model_step calls it when clipping)
    assert engine._global_grad_norm == pytest.approx(5.0)
    assert grads(engine) == [pytest.approx([0.6, 0.0]), pytest.approx([0.8])]
    engine = engine_with(clip=10.0)
    engine.clip_fp32_gradients()
    assert engine._global_grad_norm == pytest.approx(5.0) and grads(engine) == [[3.0, 0.0], [4.0]]
    engine = engine_with(clip=0.0)
    engine._take_model_step()
    assert engine.norms_at_step == [pytest.approx(5.0)] and grads(engine) == [[3.0, 0.0], [4.0]]
    for wrapper in ("fp16", "bf16", "zero"):
        engine = engine_with(clip=0.0, wrapper=wrapper)
        engine._take_model_step()
        assert engine.norms_at_step == [None], wrapper


def _norm_and_skip_over_two_tensor_parallel_ranks():
    """(global_grad_norm, the weight after a guarded step, the guard's count) on this rank of TP=2: a sharded
    parameter's gradient ([3, 0] on rank 0, [0, 4] on rank 1) and a replicated one's ([12] on both); a NaN in
    rank 0's gradient only."""
    import types

    from model_parallel.state import init_parallel
    from training.deepspeed_glue import NonFiniteGuard, global_grad_norm

    init_parallel(tp=2, pp=1)
    rank = torch.distributed.get_rank()
    shard, replicated = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    shard.tensor_model_parallel = True
    shard.grad = torch.tensor([3.0, 0.0] if rank == 0 else [0.0, 4.0])
    replicated.grad = torch.tensor([12.0])
    norm = global_grad_norm([shard, replicated]).item()
    w = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.tensor([float("nan") if rank == 0 else 1.0])
    guard = NonFiniteGuard(types.SimpleNamespace(skipped_steps=0, optimizer=optimizer))
    optimizer.step()
    guard.step_done()
    return norm, w.item(), guard.skipped


def test_the_gradient_norm_and_the_nonfinite_verdict_are_the_model_parallel_groups(pool2):
    """global_grad_norm counts each tensor-parallel shard once and a replicated parameter once (not once per TP
    rank): sqrt(3^2 + 4^2 + 12^2) = 13 on both ranks; a non-finite gradient on one rank skips the step on every
    rank (fp32 ZeRO-0's guard)."""
    assert pool2.run(_norm_and_skip_over_two_tensor_parallel_ranks) == [(pytest.approx(13.0), 1.0, 1)] * 2


def _dp_means(tp: int) -> float:
    """training.engine.dp_mean on this rank at TP=`tp` over 2 ranks, of micro-batch losses [r + 1, r + 3] on
    rank r (TP ranks hold different losses here only to show which group is averaged)."""
    from model_parallel.state import init_parallel
    from training.engine import dp_mean

    init_parallel(tp=tp, pp=1)
    r = torch.distributed.get_rank()
    return dp_mean([torch.tensor(r + 1.0), torch.tensor(r + 3.0)])


def test_the_loss_is_the_mean_over_micro_batches_and_data_parallel_ranks_only(pool2):
    """dp_mean: DP=2 averages the ranks' micro-batch means (2 and 3); at TP=2 (DP=1) each rank keeps its own:
    the tensor-parallel ranks are not summed in."""
    assert pool2.run(_dp_means, 1) == [pytest.approx(2.5)] * 2
    assert pool2.run(_dp_means, 2) == [pytest.approx(2.0), pytest.approx(3.0)]


def test_weight_decay_on_matrices_only_and_a_frozen_text_encoder_in_a_group_at_lr_0(single_process):
    """param_groups: [matrices and embedding tables at train.weight_decay, biases and norms at 0] over what trains,
    and with model.freeze_text_encoder the text encoder's parameters (and only those) in a third group at lr 0, no
    decay; every parameter in exactly one group. A zero.Init placeholder is sorted by its ds_shape."""
    from model_parallel.model import PartiModel, piece_names
    from model_parallel.pipeline import is_text_encoder
    from training.config import load_config
    from training.engine import decay_groups, param_groups

    for freeze in (False, True):
        cfg = load_config("configs/train/debug.yaml",
                          ["train.weight_decay=0.25", f"model.freeze_text_encoder={freeze}"])
        model = PartiModel(cfg.model)
        groups = param_groups(model, cfg)
        assert len(groups) == (3 if freeze else 2)
        (decayed, plain), frozen = groups[:2], (groups[2] if freeze else {"params": []})
        assert decayed["weight_decay"] == 0.25 and plain["weight_decay"] == 0.0
        assert decayed["params"] and all(p.ndim >= 2 for p in decayed["params"])
        assert plain["params"] and all(p.ndim == 1 for p in plain["params"])
        names = {id(p): n for n, p in model.named_parameters()}
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)
        encoder = {i for i, n in names.items() if is_text_encoder(n)}
        assert encoder and {id(p) for p in frozen["params"]} == (encoder if freeze else set())
        if freeze:
            assert (frozen["lr"], frozen["weight_decay"]) == (0.0, 0.0)
            assert not encoder & {id(p) for g in groups[:2] for p in g["params"]}
    # A pipeline stage names its pieces "0", "1", ... (the first stage here: the encoder and the image
    # embedding): the encoder is still told apart by its canonical names.
    stage = torch.nn.Module()
    for k, name in enumerate(piece_names(cfg.model)[:5]):
        stage.add_module(str(k), model.get_submodule(name))
    frozen = {id(p) for p in param_groups(stage, cfg)[2]["params"]}
    assert frozen == encoder and len(frozen) < len(list(stage.parameters()))
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([4, 4])
    assert [len(g["params"]) for g in decay_groups([placeholder], 0.1)] == [1, 0]


def test_export_groups_and_header(tmp_path):
    """weight_groups: sorted names in runs of at most `limit` fp32 bytes (a run that reaches the limit exactly
    stays one; a larger tensor alone). safetensors_header: 8-byte aligned, and with the tensors' bytes after it a
    file the safetensors library reads back, metadata included."""
    import struct

    from safetensors import safe_open

    from training.export import safetensors_header, weight_groups

    assert weight_groups({"c": (4,), "b": (2,), "a": (2,)}, limit=16) == [["a", "b"], ["c"]]
    assert weight_groups({"a": (1,), "big": (10,), "z": (1,)}, limit=8) == [["a"], ["big"], ["z"]]
    assert weight_groups({"big": (10,), "z": (1,)}, limit=8) == [["big"], ["z"]]  # (no empty group first)
    assert weight_groups({n: (2,) for n in "abcde"}, limit=16) == [["a", "b"], ["c", "d"], ["e"]]
    tensors = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([7.0]), "e": torch.zeros(0, 2)}
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    for metadata in ({"checkpoint": "step_00000003"}, {"checkpoint": "step_3"}):  # header lengths before padding differ
        head = safetensors_header(shapes, metadata)
        assert len(head) % 8 == 0 and struct.unpack("<Q", head[:8])[0] == len(head) - 8
    path = tmp_path / "m.safetensors"
    path.write_bytes(head + b"".join(tensors[n].numpy().tobytes() for n in sorted(tensors)))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


@pytest.fixture(scope="module")
def one_process_run(single_process, tmp_path_factory):
    """A one-process run (ZeRO-0) with checkpoints at steps 3 and 6, `latest` naming step 6."""
    path = tmp_path_factory.mktemp("one_process")
    run(str(path), "train.eval_interval=0")
    return path


def test_export_reads_the_checkpoint_asked_for_and_refuses_broken_ones(one_process_run, tmp_path):
    """Without a tag the latest checkpoint goes to RUN_DIR/export; with one, that checkpoint's weights; a run
    without a complete checkpoint, a trainer state without the run's config and a truncated .distcp are each
    refused naming the file, before anything is written."""
    import shutil

    from safetensors import safe_open

    from common.checkpoints import CheckpointError
    from training.export import export, open_checkpoint, read_weights

    latest = export(one_process_run)
    assert latest == one_process_run / "export"
    assert json.loads((latest / "config.json").read_text())["checkpoint"] == f"step_{STEPS:08d}"
    step3 = export(one_process_run, "step_00000003", tmp_path / "step3")
    assert json.loads((step3 / "config.json").read_text())["checkpoint"] == "step_00000003"
    opened = open_checkpoint(one_process_run, "step_00000003")
    weights, shapes = read_weights(opened), opened.shapes
    with safe_open(str(step3 / "model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(n), weights[n]) for n in shapes)
    with safe_open(str(latest / "model.safetensors"), "pt") as f:
        assert not all(torch.equal(f.get_tensor(n), weights[n]) for n in shapes)  # (step 6 trained on)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty' / 'checkpoints'} holds no complete checkpoint"):
        export(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(one_process_run / "checkpoints", broken / "checkpoints")
    state_file = broken / "checkpoints" / "step_00000003" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "config"}))
    with pytest.raises(CheckpointError, match=f"{state_file}: no config.model"):
        export(broken, "step_00000003", tmp_path / "out")
    distcp = min((broken / "checkpoints" / f"step_{STEPS:08d}").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{distcp} is truncated"):
        export(broken, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_average_is_the_mean_of_the_checkpoints_exports(one_process_run, tmp_path):
    """python -m training.export --average 2: the mean of the step-3 and step-6 exports' weights (to fp32
    rounding), tagged with both; it loads (training.held_out measures it: test_held_out_loss_of_exports_...).
    More checkpoints than the run holds, or 0, are refused before anything is written."""
    from safetensors.torch import load_file

    from training.export import export, load_exported, main

    step3, step6 = (load_file(str(export(one_process_run, tag, tmp_path / tag) / "model.safetensors"))
                    for tag in ("step_00000003", f"step_{STEPS:08d}"))
    main(["--run-dir", str(one_process_run), "--average", "2", "--out", str(tmp_path / "mean")])
    mean = load_file(str(tmp_path / "mean" / "model.safetensors"))
    assert mean.keys() == step6.keys() and any(not torch.equal(mean[n], step6[n]) for n in mean)
    for name, w in mean.items():
        assert torch.allclose(w, (step3[name].double() + step6[name].double()).div(2).float(), rtol=0, atol=0), name
    config = json.loads((tmp_path / "mean" / "config.json").read_text())
    assert (config["checkpoint"], config["averaged"]) == (f"step_{STEPS:08d}", f"step_00000003,step_{STEPS:08d}")
    assert load_exported(tmp_path / "mean").state_dict()["decoder.0.mlp.norm.weight"].equal(
        mean["decoder.0.mlp.norm.weight"])
    for average, says in (("3", "--average 3: .* holds 2 complete checkpoint\\(s\\) up to step_00000006 "
                                "\\(step_00000003, step_00000006\\); keep more"),
                          ("0", "--average 0: expected a number of checkpoints, at least 1")):
        with pytest.raises(SystemExit, match=says):
            main(["--run-dir", str(one_process_run), "--average", average, "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_export_average_names_a_checkpoint_pruned_while_read_and_an_incomplete_tag(one_process_run, tmp_path,
                                                                                   monkeypatch):
    """A run still training prunes its oldest checkpoints, the first an --average reads: one removed after it was
    opened is a one-line error naming it (it was torch's CheckpointException, a traceback), nothing written. A
    --tag that is no complete checkpoint is named as such (it was "holds 0 complete checkpoint(s) up to" it)."""
    import training.export as export_module

    run_dir = tmp_path / "run"
    shutil.copytree(one_process_run, run_dir)
    opened = export_module.open_checkpoint

    def open_then_prune(run, tag):
        checkpoint = opened(run, tag)
        if tag == f"step_{STEPS:08d}":  # (the last opened: the oldest is pruned before any is read)
            for f in (run_dir / "checkpoints" / "step_00000003").glob("*.distcp"):
                f.unlink()
        return checkpoint

    monkeypatch.setattr(export_module, "open_checkpoint", open_then_prune)
    with pytest.raises(SystemExit, match="training.export: .*step_00000003: cannot read its weights \\(No such file "
                                         "or directory \\(errno ENOENT\\)\\); pruned or damaged"):
        export_module.main(["--run-dir", str(run_dir), "--average", "2", "--out", str(tmp_path / "mean")])
    assert not (tmp_path / "mean" / "model.safetensors").exists() and not (tmp_path / "mean" / "config.json").exists()
    monkeypatch.undo()
    (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").unlink()
    with pytest.raises(SystemExit, match=f"--average 2: .*step_{STEPS:08d} is not a complete checkpoint \\(complete: "
                                         "step_00000003\\)"):
        export_module.main(["--run-dir", str(run_dir), "--tag", f"step_{STEPS:08d}", "--average", "2", "--out",
                            str(tmp_path / "mean")])


def test_export_in_bf16_holds_the_rounded_weights_in_half_the_bytes(one_process_run, tmp_path):
    """python -m training.export --dtype bf16: every tensor BF16, equal to the fp32 export's rounded to bf16, the
    tensors' bytes half the fp32 file's (written group by group as fp32 is); load_exported reads it (fp32 on
    CPU: the rounded weights); another dtype is refused."""
    from safetensors.torch import load_file

    from training.export import export, load_exported, main

    fp32 = export(one_process_run, "step_00000003", tmp_path / "fp32")
    main(["--run-dir", str(one_process_run), "--tag", "step_00000003", "--out", str(tmp_path / "bf16"),
          "--dtype", "bf16"])
    whole, half = load_file(fp32 / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert half.keys() == whole.keys() and {w.dtype for w in half.values()} == {torch.bfloat16}
    assert all(torch.equal(half[n], w.bfloat16()) for n, w in whole.items())
    elements = sum(w.numel() for w in whole.values())
    for file, itemsize in ((fp32 / "model.safetensors", 4), (tmp_path / "bf16" / "model.safetensors", 2)):
        head = 8 + int.from_bytes(file.read_bytes()[:8], "little")  # (the length, then the JSON header)
        assert file.stat().st_size == head + itemsize * elements
    regrouped = export(one_process_run, "step_00000003", tmp_path / "regrouped", group_bytes=1 << 14, dtype="bf16")
    assert (regrouped / "model.safetensors").read_bytes() == (tmp_path / "bf16" / "model.safetensors").read_bytes()
    loaded = load_exported(tmp_path / "bf16").state_dict()
    assert all(torch.equal(loaded[n], w.float()) for n, w in half.items())
    with pytest.raises(ValueError, match="--dtype fp16: expected one of fp32, bf16"):
        export(one_process_run, "step_00000003", tmp_path / "fp16", dtype="fp16")


def test_export_reads_group_by_group_and_a_failed_reexport_keeps_the_earlier_one(one_process_run, tmp_path,
                                                                                monkeypatch):
    """group_bytes reaches read_weights (one call per group, the same file), and the tensor index is read once
    (safely, by verify), not again by every group's read; a tensor read back in another dtype or shape stops the
    export naming it, and the export it was to replace is left as it was, no temporary file beside it."""
    from torch.distributed.checkpoint import FileSystemReader

    from training import checkpoint_verify
    from training import export as export_module

    out = export_module.export(one_process_run, "step_00000003", tmp_path / "export")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    read, calls, index_reads = export_module.read_weights, [], []
    monkeypatch.setattr(export_module, "read_weights",
                        lambda opened, names, *which: calls.append(len(names)) or read(opened, names, *which))
    for owner, name in ((FileSystemReader, "read_metadata"), (checkpoint_verify, "read_index")):
        monkeypatch.setattr(owner, name, lambda *a, real=getattr(owner, name): index_reads.append(1) or real(*a))
    streamed = export_module.export(one_process_run, "step_00000003", tmp_path / "streamed", group_bytes=1 << 16)
    assert len(calls) > 3 and (streamed / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert len(index_reads) == 1
    monkeypatch.undo()
    for damage in (lambda w: w.bfloat16(), lambda w: w.flatten()):
        def damaged(opened, names, *which, damage=damage):  # (which: read_weights' weights, passed on)
            weights = read(opened, names, *which)
            return {n: damage(w) if n == max(weights) else w for n, w in weights.items()}

        monkeypatch.setattr(export_module, "read_weights", damaged)
        with pytest.raises(ValueError, match=r"step_00000006: \S+ read back as .*the export's header says float32"):
            export_module.export(one_process_run, out=out)
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_export_refuses_an_out_folder_of_other_files_and_replaces_its_own(one_process_run, tmp_path):
    """--out on a folder whose config.json or model.safetensors no export wrote (a text encoder's folder: its
    config.json was replaced) is refused naming the file, before anything is written; an earlier export, or one
    stopped between its two files (the weights written, with their tag), is replaced."""
    from safetensors.torch import save_file

    from training.export import export

    encoder = tmp_path / "text_encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text('{"model": {}, "text_tokenizer": null}')
    with pytest.raises(FileExistsError, match=f"{encoder / 'config.json'}: not the config.json of an export"):
        export(one_process_run, out=encoder)
    assert sorted(p.name for p in encoder.iterdir()) == ["config.json"]
    assert (encoder / "config.json").read_text() == '{"model": {}, "text_tokenizer": null}'
    other = tmp_path / "other"
    other.mkdir()
    save_file({"x": torch.zeros(2)}, str(other / "model.safetensors"))
    with pytest.raises(FileExistsError, match=f"{other / 'model.safetensors'}: not the weights of an export"):
        export(one_process_run, out=other)
    out = export(one_process_run, "step_00000003", tmp_path / "export")
    assert export(one_process_run, out=out) == out
    assert json.loads((out / "config.json").read_text())["checkpoint"] == f"step_{STEPS:08d}"
    (out / "config.json").unlink()  # (stopped between the weights and config.json)
    export(one_process_run, "step_00000003", out)
    assert json.loads((out / "config.json").read_text())["checkpoint"] == "step_00000003"


# ----------------------------------------------------------------------------------------------
# The loop's schedule of logs, measurements, saves and stops, on a Trainer without a model (fast).


def loop_trainer(run_dir: Path, steps: int, *sets: str):
    """A Trainer without a model, engine or data for Trainer.run and its parts: `events` records what the loop
    did at which step (training.engine.train_step is to be replaced; see `fake_steps`)."""
    from common.preemption import StopRequest
    from data_pipeline.sampler import GlobalBatchSampler
    from training.config import load_config
    from training.profiling import StepProfiler
    from training.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = load_config("configs/train/debug.yaml", [f"train.steps={steps}", *sets])
    t.run_dir, t.step, t.consumed, t.events, t.device = Path(run_dir), 0, 0, [], "cpu"
    t.stop = StopRequest(t.run_dir / "STOP")
    t.nonfinite_guard = types.SimpleNamespace(step_done=lambda: None, consecutive=0, skipped=0)
    t.engine = types.SimpleNamespace(get_lr=lambda: [1e-3], train_batch_size=lambda: t.cfg.train.global_batch_size)
    t.sampler = GlobalBatchSampler(64, t.cfg.train.global_batch_size, t.cfg.train.seed)
    t._reader_at = lambda consumed: types.SimpleNamespace(next_step=list)
    t._with_samples = lambda micro_batches: micro_batches
    t.held_out_loss = lambda: t.events.append(("eval", t.step)) or 0.5
    t.log_step = lambda loss, lr, grad_norm, elapsed, waited, held_out=None, *rest: t.events.append(("log", t.step,
                                                                                                      held_out))
    t.profiler = StepProfiler(run_dir, 0, 1, 0, enabled=False, cuda=False)
    t.save = lambda: t.events.append(("save", t.step))
    t.complete_saves = lambda wait=False: wait and t.events.append(("wait", t.step))
    t.close = lambda: t.stop.restore() or t.events.append(("close", t.step))
    t.log = types.SimpleNamespace(info=lambda message: t.events.append(("info", message)))
    return t


@pytest.fixture
def fake_steps(monkeypatch):
    """training.engine.train_step replaced: the k-th call's loss is k (`[0]`: the calls so far)."""
    import training.engine as engine_module

    calls = [0]

    def train_step(engine, cfg, batches, device):
        calls[0] += 1
        return float(calls[0]), 1.0

    monkeypatch.setattr(engine_module, "train_step", train_step)
    return calls


def test_skipped_steps_are_neither_trained_logged_nor_measured_but_saved(tmp_path, fake_steps):
    """train.skip_steps=2-3,5 with a log line, a held-out loss and a save due at every step: steps 2, 3 and 5 are
    read past (NaN in the losses; no train_step), neither logged nor measured, and saved; the log names each range
    once, as it begins."""
    t = loop_trainer(tmp_path, 6, "train.skip_steps=2-3,5", "train.log_interval=1", "train.eval_interval=1",
                     "train.save_interval=1")
    assert [x != x for x in t.run()] == [False, True, True, False, True, False] and fake_steps[0] == 3
    told = "read past without training (train.skip_steps=2-3,5)"
    assert t.events == [("eval", 1), ("log", 1, 0.5), ("save", 1),
                        ("info", f"steps 2-3: their global batches are {told}"), ("save", 2), ("save", 3),
                        ("eval", 4), ("log", 4, 0.5), ("save", 4),
                        ("info", f"step 5: its global batch is {told}"), ("save", 5),
                        ("eval", 6), ("log", 6, 0.5), ("save", 6), ("wait", 6), ("close", 6)]


def test_a_loss_spike_is_warned_of_with_the_checkpoint_and_skip_steps_to_resume_without_it(tmp_path, monkeypatch):
    """train.loss_spike_factor=1.5: a loss 1.6x the median of the previous 100 steps' is warned of once, naming the
    newest complete checkpoint and the train.skip_steps from it to the spike; the steps after it that stay above the
    factor are the same spike (no warning each), and the first one below ends it (said so); one below the factor, a
    non-finite one and any before 100 steps are not warned of; factor 0 warns of none."""
    import training.engine as engine_module
    from common.metrics import LossSpikes

    # (10.0: warm-up, not a spike; the spike: steps 121-123, NaN at 124 neither continues nor ends it)
    losses = iter([10.0] * 20 + [1.0] * 100 + [1.6, 1.7, 1.55, float("nan"), 1.4, 1.0])
    monkeypatch.setattr(engine_module, "train_step", lambda engine, cfg, batches, device: (next(losses), 1.0))
    t = loop_trainer(tmp_path, 126, "train.save_interval=0", "train.eval_interval=0", "train.log_interval=1000")
    t.log.enabled = True
    (tmp_path / "checkpoints" / "step_00000100").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000100" / "trainer_state.json").write_text("{}")
    t.run()
    warnings = [e[1] for e in t.events if e[0] == "info"]
    assert warnings == ["warning: loss 1.6000 at step 121 is 1.60x the median of the previous 100 steps "
                        "(train.loss_spike_factor=1.5): a loss spike; if it does not recover, resume from "
                        "checkpoints/step_00000100 (the newest one saved) with --set train.skip_steps=101-121 (its "
                        "batches read past untrained, or a shorter range just before the spike, as PaLM did)",
                        "the loss spike of step 121 is over: loss 1.4000 at step 125 is below "
                        "train.loss_spike_factor=1.5 times the recent median, after 3 step(s) at or above it"]
    spikes, never = LossSpikes(1.5, window=4), LossSpikes(0, window=4)
    assert [spikes.seen(x) for x in (2, 2, 2, 9, 3.1, 2.9)] == [None] * 3 + [None, 1.55, None]  # (9: before 4 seen)
    assert spikes.recovered_after == 1  # (2.9 ended the spike of 3.1)
    assert [never.seen(x) for x in (2, 2, 2, 2, 100)] == [None] * 5


def test_the_last_step_is_logged_measured_and_saved_off_its_intervals(tmp_path, fake_steps):
    """Log every 2 steps, measure every 3, save every 2, 5 steps: step 3 is logged for its held-out loss, and the
    last step (no multiple of any) is logged, measured and saved, and its save waited for (async: the run ends)."""
    t = loop_trainer(tmp_path, 5, "train.log_interval=2", "train.eval_interval=3", "train.save_interval=2")
    assert t.run() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert t.events == [("log", 2, None), ("save", 2), ("eval", 3), ("log", 3, 0.5), ("log", 4, None), ("save", 4),
                        ("eval", 5), ("log", 5, 0.5), ("save", 5), ("wait", 5), ("close", 5)]
    t = loop_trainer(tmp_path, 3, "train.log_interval=2", "train.eval_interval=0", "train.save_interval=0")
    t.run()
    assert t.events == [("log", 2, None), ("log", 3, None), ("save", 3), ("wait", 3), ("close", 3)]


def test_a_stop_saves_waits_and_leaves_for_requeue_unless_at_the_last_step(tmp_path, fake_steps, monkeypatch):
    import training.engine as engine_module
    from common.preemption import Preempted

    real = engine_module.train_step

    def stop_in_step_2(*args):
        loss = real(*args)
        if loss[0] == 2:
            (tmp_path / "STOP").touch()
        return loss

    monkeypatch.setattr(engine_module, "train_step", stop_in_step_2)
    t = loop_trainer(tmp_path, 4, "train.save_interval=0", "train.eval_interval=0", "train.log_interval=10")
    with pytest.raises(Preempted, match="after step 2"):
        t.run()
    assert t.events == [("save", 2), ("wait", 2), ("close", 2)]
    assert (tmp_path / "REQUEUE").read_text() == "step 2\n" and not (tmp_path / "STOP").exists()
    (tmp_path / "REQUEUE").unlink()
    fake_steps[0] = 0
    t = loop_trainer(tmp_path, 2, "train.save_interval=0", "train.eval_interval=0", "train.log_interval=10")
    assert t.run() == [1.0, 2.0]  # (a stop at the last step: the run is finished, nothing to requeue)
    assert t.events == [("log", 2, None), ("save", 2), ("wait", 2), ("close", 2)]
    assert not (tmp_path / "REQUEUE").exists() and not (tmp_path / "STOP").exists()


def test_the_held_out_loss_is_the_mean_over_every_held_out_batch(monkeypatch):
    """train.eval_batches=3 global batches of each held-out set, each measured once (batch b's loss is b here, 10
    more in the second set): their mean, per set; logged as valid_loss_<name> and their mean as valid_loss."""
    from common.metrics import held_out_row
    import training.engine as engine_module
    import training.trainer as trainer_module
    from training.config import load_config
    from training.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = load_config("configs/train/debug.yaml", ["train.eval_batches=3"])
    t.role, t.dp_rank, t.dp_size, t.device, t.engine = engine_module.READ, 0, 1, "cpu", None
    t.held_out = {"coco": "held", "laion": "other"}
    t._with_samples = lambda micro_batches: micro_batches
    asked = []
    monkeypatch.setattr(trainer_module, "held_out_micro_batches",
                        lambda cfg, dataset, b, rank, size, read: asked.append((dataset, b, read)) or [(dataset, b)])
    monkeypatch.setattr(engine_module, "eval_step",
                        lambda engine, cfg, batches, device: batches[0][1] + 10.0 * (batches[0][0] == "other"))
    assert t.held_out_loss() == {"coco": 1.0, "laion": 11.0}
    assert asked == [(name, b, True) for name in ("held", "other") for b in range(3)]
    assert held_out_row(t.held_out_loss()) == {"valid_loss": 6.0, "valid_loss_coco": 1.0, "valid_loss_laion": 11.0}
    assert held_out_row({"": 2.5}) == {"valid_loss": 2.5}  # (an unnamed set: valid_loss alone, as before)


def test_garbage_is_collected_every_gc_interval_steps_with_automatic_collection_off(single_process, tmp_path,
                                                                                  monkeypatch):
    """train.gc_interval=2 over 5 steps: automatic collection is off in every step, the young generations are
    collected after steps 2 and 4 (every rank at the same steps), and it is on again after the run; a process
    forked meanwhile (a data worker, a checkpoint's writer) collects automatically. gc_interval=0 leaves it on."""
    import gc
    import os

    from common.collection import StepCollection
    from training import engine as engine_module

    real_step, real_collect, enabled, events = engine_module.train_step, gc.collect, [], []

    def step(*args, **kwargs):
        enabled.append(gc.isenabled())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine_module, "train_step", step)
    monkeypatch.setattr(gc, "collect", lambda *generation: events.append((len(enabled), *generation)) or
                        real_collect(*generation))
    run(str(tmp_path / "manual"), "train.gc_interval=2", "train.eval_interval=0", steps=5)
    assert enabled == [False] * 5 and gc.isenabled()
    assert [(steps, *g) for steps, *g in events if g == [1]] == [(2, 1), (4, 1)]
    enabled.clear()
    run(str(tmp_path / "automatic"), "train.gc_interval=0", "train.eval_interval=0", steps=2)
    assert enabled == [True, True]

    collection = StepCollection(3)
    read, write = os.pipe()
    if (child := os.fork()) == 0:  # (a child inherits the parent's switch; its own collection must be on)
        os.write(write, b"1" if gc.isenabled() else b"0")
        os._exit(0)
    os.waitpid(child, 0)
    assert (os.read(read, 1), gc.isenabled()) == (b"1", False)
    collection.close()
    assert gc.isenabled()


def test_profiled_steps_are_traced_without_changing_the_run(single_process, tmp_path, log_lines, monkeypatch):
    """train.profile_step/profile_steps: the traced steps' Chrome trace (gzip JSON holding the matmuls the steps
    ran) and operator table are written after the last of them and named in the log; the losses are those of
    the run without a profile. A run that ends inside the traced steps writes what it traced; one that fails
    there stops the profiler."""
    import gzip

    from training import trainer

    plain = run(str(tmp_path / "plain"), "train.eval_interval=0", steps=3)
    traced = run(str(tmp_path / "traced"), "train.eval_interval=0", "train.profile_step=2", steps=3)
    assert traced == plain
    folder = tmp_path / "traced" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0_steps2-3.json.gz", "rank0_steps2-3.txt"]
    events = json.loads(gzip.decompress((folder / "rank0_steps2-3.json.gz").read_bytes()))["traceEvents"]
    assert {"aten::addmm", "aten::mm"} & {e.get("name") for e in events}
    assert (folder / "rank0_steps2-3.txt").read_text().startswith("steps 2-3, rank 0, sorted by self_cpu_time_total")
    assert [line for line in log_lines if line.startswith("profile of steps 2-3 in ")] == [
        f"profile of steps 2-3 in {folder}: rank0_steps2-3.json.gz (a Chrome trace: ui.perfetto.dev opens it), "
        "top operators in rank0_steps2-3.txt"]
    # Traced steps past the run's end: the trace ends with the run. Steps the run does not take: a note.
    run(str(tmp_path / "end"), "train.eval_interval=0", "train.profile_step=3", "train.profile_steps=5", steps=3)
    assert sorted(p.name for p in (tmp_path / "end" / "profile").iterdir()) == ["rank0_steps3-3.json.gz",
                                                                                "rank0_steps3-3.txt"]
    run(str(tmp_path / "end"), "train.eval_interval=0", "train.profile_step=2", steps=4)  # (resumed at step 3)
    assert "note: train.profile_step=2 is not among the steps this run takes (4-4): nothing is traced" in log_lines
    assert len(list((tmp_path / "end" / "profile").iterdir())) == 2
    # A run that fails inside the traced steps stops the profiler (it would go on recording every operator).
    real, calls = trainer.engine.train_step, []

    def fail_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("failed in a traced step")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.engine, "train_step", fail_at_step_2)
    with pytest.raises(RuntimeError, match="failed in a traced step"):
        run(str(tmp_path / "failed"), "train.eval_interval=0", "train.profile_step=1", steps=3)
    assert not torch.autograd.profiler._is_profiler_enabled and not (tmp_path / "failed" / "profile").exists()


def test_a_run_initialised_from_another_starts_from_its_weights_at_another_layout(pool2, single_process, reference,
                                                                                  tmp_path):
    """train.init_from=<the reference run's directory> (its latest checkpoint, step 6; ZeRO-0, DP=2) at TP=2 with
    ZeRO-1 and learning rate 1e-12: the new run's checkpoint after its one step holds the reference's step-6 weights,
    its own step and optimizer count 1. A folder that holds no checkpoint, another network, a text-encoder warm
    start beside it and a checkpoint in the run directory that --resume overwrite moves aside are refused, naming
    the setting."""
    from training.config import ConfigError, load_config
    from training.export import open_checkpoint, read_weights
    from training.resume_plan import plan_resume

    def weights(run_dir, tag):
        return read_weights(open_checkpoint(run_dir, tag))

    run_dir = reference[1]
    pool2.run(run, str(tmp_path / "new"), f"train.init_from={run_dir}", "parallel.tp=2", "parallel.zero_stage=1",
              "train.lr=1e-12", "train.min_lr=1e-12", "train.eval_interval=0", steps=1)
    state = json.loads((tmp_path / "new" / "checkpoints" / "step_00000001" / "trainer_state.json").read_text())
    assert (state["step"], state["optimizer_steps"]) == (1, 1)
    start, before = weights(tmp_path / "new", "step_00000001"), weights(run_dir, f"step_{STEPS:08d}")
    assert start.keys() == before.keys()
    for name, value in before.items():  # (the step at learning rate 1e-12 moved them by ~1e-12)
        torch.testing.assert_close(start[name], value, rtol=0, atol=1e-10, msg=name)
    assert not all(torch.equal(before[n], w) for n, w in weights(run_dir, "step_00000003").items())  # (it trained)

    def refused(*sets):
        cfg = load_config("configs/train/debug.yaml", list(sets)).validate()
        return plan_resume(cfg, tmp_path / "other", "auto")

    with pytest.raises(ConfigError, match=rf"train.init_from={tmp_path}: neither a checkpoint folder"):
        refused(f"train.init_from={tmp_path}")
    with pytest.raises(ConfigError, match=rf"train.init_from={run_dir}/checkpoints/step_{STEPS:08d}: the checkpoint "
                                          r"holds another network \(model.hidden_size 64 -> 32"):
        refused(f"train.init_from={run_dir}", "model.hidden_size=32", "model.num_heads=2")
    with pytest.raises(ConfigError, match="train.init_from and model.init_text_encoder: set one"):
        refused(f"train.init_from={run_dir}", f"model.init_text_encoder={run_dir}")
    assert refused(f"train.init_from={run_dir}/checkpoints/step_00000003").init_from.name == "step_00000003"
    with pytest.raises(ConfigError, match="in the run directory whose checkpoints and export --resume overwrite moves"):
        plan_resume(load_config("configs/train/debug.yaml", [f"train.init_from={run_dir}"]), run_dir, "overwrite")


def test_a_branch_continues_another_runs_checkpoint_as_a_run_of_its_own(pool2, reference, tmp_path):
    """train.init_from=<the reference's step-3 checkpoint> with train.init_weights_only=false at TP=2 with ZeRO-1:
    steps 4-6 equal the reference's (its optimizer state, LR schedule and data positions continue), as a new run
    (its own run id and checkpoints; the reference's folder untouched); a second segment resumes the branch's own
    checkpoint. An export (weights alone), a missing init_from and a changed network are refused, naming them."""
    from training.config import ConfigError, load_config
    from training.resume_plan import plan_resume

    source, branch = reference[1] / "checkpoints" / "step_00000003", tmp_path / "branch"
    before = sorted(p.name for p in (reference[1] / "checkpoints").iterdir())
    branched = [f"train.init_from={source}", "train.init_weights_only=false", "parallel.tp=2",
                "parallel.zero_stage=1"]
    losses = pool2.run(run, str(branch), *branched)[0]
    assert losses == pytest.approx(reference[0][3:], rel=1e-4, abs=1e-4)
    state = json.loads((branch / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    reference_state = json.loads((source / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["run_id"] != reference_state["run_id"]
    assert sorted(p.name for p in (reference[1] / "checkpoints").iterdir()) == before
    (history,) = (branch / "config_history").iterdir()
    assert history.read_text().startswith(f"# segment 1 of run {state['run_id']}: a branch of {source}, ")
    assert [json.loads(line)["step"] for line in (branch / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [4, 5, 6]
    killed = branch.parent / "killed"  # (a branch whose first save was cut short: branched again, not step 0)
    (killed / "checkpoints" / "step_00000004").mkdir(parents=True)
    plan = plan_resume(load_config("configs/train/debug.yaml", branched).validate(), killed, "auto")
    assert (plan.branch, plan.step) == (True, 3) and plan.messages[0].endswith(": the branch starts anew")
    pool2.run(run, str(branch), *branched, steps=STEPS + 1)  # (a second segment resumes the branch, not its source)
    assert json.loads((branch / "checkpoints" / "step_00000007" / "trainer_state.json").read_text())["run_id"] == \
        state["run_id"]
    assert (branch / "config_history" / f"segment_002_step_{STEPS:08d}.yaml").read_text().startswith(
        f"# segment 2 of run {state['run_id']}: resumed from checkpoints/step_{STEPS:08d}, ")

    def plan(*sets):
        return plan_resume(load_config("configs/train/debug.yaml", list(sets)).validate(), tmp_path / "new", "auto")

    (tmp_path / "export").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "export" / name).write_text("{}")
    with pytest.raises(ConfigError, match=rf"train.init_from={tmp_path}/export: an export holds the weights alone"):
        plan(f"train.init_from={tmp_path}/export", "train.init_weights_only=false")
    with pytest.raises(ConfigError, match="train.init_weights_only=false continues train.init_from's checkpoint"):
        plan("train.init_weights_only=false")
    with pytest.raises(ConfigError, match=rf"cannot resume {source} with another network"):
        plan(f"train.init_from={source}", "train.init_weights_only=false", "model.hidden_size=32", "model.num_heads=2")


def test_a_run_initialised_from_an_export_starts_from_its_weights(pool4, single_process, reference, tmp_path):
    """train.init_from=<an export of the reference run> (one safetensors file of whole weights) at TP=2 with ZeRO-1
    over DP=2, each rank reading its TP slice's ZeRO part of the file: after one step at learning rate 1e-12 the
    new run's checkpoint holds the exported weights. An export of another network, a damaged one and one whose
    weights are not its config's (its checkpoint tag, a tensor missing or of another shape) are refused before
    anything is built, naming the file."""
    from safetensors.torch import load_file, save_file

    from common.checkpoints import CheckpointError
    from training.config import ConfigError, load_config
    from training.export import export, open_checkpoint, read_weights
    from training.resume_plan import plan_resume

    exported = export(reference[1], out=tmp_path / "export")
    pool4.run(run, str(tmp_path / "new"), f"train.init_from={exported}", "parallel.tp=2", "parallel.zero_stage=1",
              "train.lr=1e-12", "train.min_lr=1e-12", "train.eval_interval=0", steps=1)
    start = read_weights(open_checkpoint(tmp_path / "new", "step_00000001"))
    before = load_file(exported / "model.safetensors")
    assert start.keys() == before.keys()
    for name, value in before.items():  # (the step at learning rate 1e-12 moved them by ~1e-12)
        torch.testing.assert_close(start[name], value, rtol=0, atol=1e-10, msg=name)

    def plan(source, *sets):
        cfg = load_config("configs/train/debug.yaml", [f"train.init_from={source}", *sets]).validate()
        return plan_resume(cfg, tmp_path / "other", "auto")

    assert f"(an export of step_{STEPS:08d})" in " ".join(plan(exported).messages)
    with pytest.raises(ConfigError, match=rf"init_from={exported}: the export holds another network \(model.hidden"):
        plan(exported, "model.hidden_size=32", "model.num_heads=2")
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "checkpoint": "step_00000003"}))
    with pytest.raises(CheckpointError, match=rf"{edited}: model.safetensors holds the weights of checkpoint step_0"):
        plan(edited)
    weights = edited / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{weights}: cannot be read .*damaged or truncated"):
        plan(edited)
    for change, why in (("drop", "1 missing key\\(s\\): head.proj.weight"),
                        ("widen", "1 other shape\\(s\\): head.proj.weight \\(2, 64\\)")):
        # (each rank reads only its part of the file: a missing tensor or a wrong shape failed on the ranks
        # holding it alone, after the build, config.yaml written, the other ranks waiting in a collective)
        other = tmp_path / change
        shutil.copytree(exported, other)
        tensors = load_file(other / "model.safetensors")
        if change == "drop":
            del tensors["head.proj.weight"]
        else:
            tensors["head.proj.weight"] = tensors["head.proj.weight"][:2]
        save_file(tensors, other / "model.safetensors", metadata={"checkpoint": f"step_{STEPS:08d}"})
        with pytest.raises(CheckpointError, match=rf"{other / 'model.safetensors'} does not fit .*{why}"):
            plan(other)


def _run_failing_to_read_the_export_on_rank_1(run_dir: str, *overrides: str, **kwargs):
    """`run` with the export's read failing on rank 1 alone (an I/O error on one node)."""
    import errno
    import os

    import torch.distributed as dist

    from training import checkpoint

    real = checkpoint.fill_from_export

    def fail(blocks, file):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))

    checkpoint.fill_from_export = fail if dist.get_rank() == 1 else real
    try:
        return run(run_dir, *overrides, **kwargs)
    finally:
        checkpoint.fill_from_export = real


def test_a_failed_read_of_an_export_on_one_rank_stops_every_rank(pool2, reference, tmp_path):
    """train.init_from=<an export>: each rank reads its part of the file alone; a rank whose read fails must not
    leave the others waiting in the first step's collectives until the process group's timeout: every rank
    raises the CheckpointError naming the file."""
    from training.export import export

    exported = export(reference[1], out=tmp_path / "export")
    with pytest.raises(RuntimeError) as failed:
        pool2.run(_run_failing_to_read_the_export_on_rank_1, str(tmp_path / "new"), f"train.init_from={exported}",
                  "train.eval_interval=0", steps=1)
    assert "not every rank finished" not in str(failed.value)
    for rank in (0, 1):
        assert (f"rank {rank}:" in str(failed.value)), str(failed.value)[-2000:]
    assert str(failed.value).count(f"init_from={exported}: cannot read the export's weights (Input/output error "
                                   "(errno EIO))") == 2


def test_held_out_draws_a_line_per_set_sample_count_and_kind_of_weights():
    """held_out.png's series: rows of the same held-out set measured on other numbers of samples, or of the moving
    average of the weights (--ema), are lines of their own; a step measured again keeps its newest row; exports
    (no step) are not drawn."""
    from training.held_out import held_out_series

    rows = [{"checkpoint": "step_00000003", "step": 3, "valid_loss": 2.0, "valid_shards": "v", "eval_samples": 16},
            {"checkpoint": "step_00000003", "step": 3, "valid_loss": 2.1, "valid_shards": "v", "eval_samples": 32},
            {"checkpoint": "step_00000003", "step": 3, "valid_loss": 1.9, "valid_shards": "v", "eval_samples": 16,
             "weights": "ema"},
            {"checkpoint": "step_00000003", "step": 3, "valid_loss": 1.8, "valid_shards": "v", "eval_samples": 16},
            {"checkpoint": "step_00000006", "step": 6, "valid_loss": 1.5, "valid_loss_a": 1.4, "valid_loss_b": 1.6,
             "valid_shards": "a=x,b=y", "eval_samples": 16},
            {"export": "/e", "checkpoint": "step_00000006", "valid_loss": 1.0, "valid_shards": "v", "eval_samples": 16}]
    assert held_out_series(rows) == {"v, 16 samples": {3: 1.8}, "v, 32 samples": {3: 2.1},
                                     "v, 16 samples (ema)": {3: 1.9}, "a=x,b=y [a], 16 samples": {6: 1.4},
                                     "a=x,b=y [b], 16 samples": {6: 1.6}}


def test_held_out_chooses_each_checkpoint_once_and_appends_after_a_line_cut_short(tmp_path):
    """--checkpoints new,latest (or all,latest) names the newest once; a row appended after a last line a killed
    job cut short is on a line of its own (not lost with it)."""
    from common.files import json_rows
    from training.held_out import append_row, chosen_sources

    for step in (3, 6):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").write_text(json.dumps(
            {"step": step, "consumed_samples": 8 * step, "lr_scheduler": {}, "optimizer_steps": step, "layout": {}}))
    assert [p.name for p in chosen_sources(tmp_path, "new,latest", {("step_00000003", None)})] == ["step_00000006"]
    assert [p.name for p in chosen_sources(tmp_path, "all,latest")] == ["step_00000003", "step_00000006"]
    out = tmp_path / "held_out.jsonl"
    out.write_text('{"checkpoint": "step_00000003", "step": 3}\n{"checkpoint": "step_0')
    append_row(out, {"checkpoint": "step_00000006", "step": 6})
    assert [r["step"] for r in json_rows(out)] == [3, 6]


def test_a_loss_spike_names_a_checkpoint_before_it(tmp_path, monkeypatch):
    """A run resumed from an earlier checkpoint (step 50) leaves the abandoned trajectory's later ones (step 200):
    a spike at step 101 names step 50 and skip_steps=51-101, not step 200 and an empty 201-101."""
    import training.engine as engine_module

    losses = iter([1.0] * 100 + [1.6] + [1.0] * 3)
    monkeypatch.setattr(engine_module, "train_step", lambda engine, cfg, batches, device: (next(losses), 1.0))
    t = loop_trainer(tmp_path, 104, "train.save_interval=0", "train.eval_interval=0", "train.log_interval=1000")
    t.log.enabled = True
    for step in (50, 200):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    t.run()
    warning, over = [e[1] for e in t.events if e[0] == "info"]
    assert "checkpoints/step_00000050" in warning and "train.skip_steps=51-101 " in warning, warning
    assert over.startswith("the loss spike of step 101 is over: loss 1.0000 at step 102 "), over
