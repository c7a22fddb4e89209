"""The moving average of the weights (train.ema_decay, training/ema.py) against its definition: the average of
the fp32 weights each checkpoint holds, step by step, from the weights it started at; unchanged by a step not
taken; exported (--ema) and measured (training.held_out --ema) instead of the weights; started and left behind by
a resume. Its resume at other layouts is checked against the reference run's in tests/test_training.py."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import held_out_losses, run
from training.checkpoint import CheckpointError

DECAY = 0.75
EVERY_STEP = ("train.save_interval=1", "train.keep_checkpoints=0")  # (a checkpoint of each step, all kept)


def exported(run_dir, tmp_path, step: int, ema: bool) -> dict[str, torch.Tensor]:
    """The weights (or with `ema` their average) of run_dir's checkpoint at `step`, through training.export."""
    from safetensors.torch import load_file

    from training.export import export

    out = export(run_dir, f"step_{step:08d}", tmp_path / f"export_{step}_{ema}", ema=ema)
    return load_file(str(out / "model.safetensors"))


def test_the_average_follows_the_weights_step_by_step_and_is_exported_and_measured(single_process, tmp_path,
                                                                                       log_lines):
    """A run saved at every step: step 1 without an average; resumed with train.ema_decay, the average starts from
    step 1's weights W1 (said so) and is E2 = d W1 + (1 - d) W2 after step 2; step 3 is read past
    (train.skip_steps), so E3 = E2; E4 = d E2 + (1 - d) W4. A run that keeps one has the losses of a run that
    does not. Then resumed without it (noted): its checkpoints hold none, and --ema refuses them."""
    plain = run(str(tmp_path / "plain"), *EVERY_STEP, steps=4)
    run(str(tmp_path / "r"), *EVERY_STEP, steps=1)
    averaged = run(str(tmp_path / "r"), *EVERY_STEP, f"train.ema_decay={DECAY}", "train.skip_steps=3",
                   steps=4)
    assert any(f"holds no moving average of the weights: train.ema_decay={DECAY}'s starts from its weights at "
               "step 1" in line for line in log_lines)
    assert averaged[0] == pytest.approx(plain[1], rel=1e-6)
    assert averaged[1] != averaged[1]  # (step 3: read past)

    w = {s: exported(tmp_path / "r", tmp_path, s, ema=False) for s in (1, 2, 4)}
    e = {s: exported(tmp_path / "r", tmp_path, s, ema=True) for s in (2, 3, 4)}
    assert set(e[2]) == set(w[2]) and len(e[2]) > 10
    for name in w[1]:
        expected = DECAY * w[1][name].double() + (1 - DECAY) * w[2][name].double()
        torch.testing.assert_close(e[2][name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(e[3][name], e[2][name]), name  # (a step not taken leaves it)
        expected = DECAY * e[2][name].double() + (1 - DECAY) * w[4][name].double()
        torch.testing.assert_close(e[4][name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(e[4][n], w[4][n]) for n in w[4])  # (not the weights themselves)
    config = json.loads((tmp_path / "export_4_True" / "config.json").read_text())
    assert (config["weights"], config["ema_decay"], config["checkpoint"]) == ("ema", str(DECAY), "step_00000004")
    with pytest.raises(CheckpointError, match=r"--ema: .*step_00000001 holds no moving average of the weights"):
        exported(tmp_path / "r", tmp_path, 1, ema=True)

    log_lines.clear()
    run(str(tmp_path / "r"), *EVERY_STEP, steps=5)
    assert any(f"holds a moving average of the weights (train.ema_decay={DECAY}); train.ema_decay=0 leaves it "
               "behind" in line for line in log_lines)
    with pytest.raises(CheckpointError, match=r"step_00000005 holds no moving average"):
        exported(tmp_path / "r", tmp_path, 5, ema=True)

    # training.held_out --ema measures the average: the loss of its export, not the weights'
    from training.held_out import main

    rows_file, ema_export = tmp_path / "rows.jsonl", tmp_path / "export_4_True"
    main(["--run-dir", str(tmp_path / "r"), "--checkpoints", "step_00000004", "--ema", "--out", str(rows_file)])
    main(["--run-dir", str(tmp_path / "r"), "--checkpoints", f"step_00000004,{ema_export}", "--out", str(rows_file)])
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r.get("weights"), r.get("step")) for r in rows] == [("ema", 4), (None, 4), ("ema", None)]
    assert rows[0]["valid_loss"] == pytest.approx(rows[2]["valid_loss"], rel=1e-6)
    # training measured it too, at its last step, beside the weights' (and went on from the weights unchanged:
    # tests/test_training.py's runs without an average have the reference run's losses after its measurements)
    assert held_out_losses(tmp_path / "r", "ema_valid_loss") == {4: pytest.approx(rows[0]["valid_loss"], rel=1e-6)}
    assert held_out_losses(tmp_path / "r")[4] == pytest.approx(rows[1]["valid_loss"], rel=1e-6)
    assert rows[0]["valid_loss"] != pytest.approx(rows[1]["valid_loss"], rel=1e-4)
    for which, message in [(f"{ema_export}", "is an export, which holds one set of weights"),
                           ("step_00000001", "step_00000001 holds no moving average")]:
        with pytest.raises(SystemExit, match=message):
            main(["--run-dir", str(tmp_path / "r"), "--checkpoints", which, "--ema", "--out", str(rows_file)])


def test_a_warmed_up_decay_counts_the_updates_taken_and_goes_on_counting_after_a_resume(single_process, tmp_path):
    """train.ema_warmup: the (k+1)-th update's decay is min(d, (1 + k) / (10 + k)). Started at step 1's weights, with
    step 3 read past: E2 = 0.1 W1 + 0.9 W2 (k=0), E3 = E2; resumed at step 3, the count goes on from the
    checkpoint's (1 update): E4 = 2/11 E2 + 9/11 W4, E5 = 3/12 E4 + 9/12 W5 (with the count restarted, or taken as
    the step, E4 would use 0.1 or 3/12)."""
    from training.ema import ema_decay_after

    warm = (f"train.ema_decay={DECAY}", "train.ema_warmup=true", "train.eval_interval=0")
    run(str(tmp_path / "r"), *EVERY_STEP, "train.eval_interval=0", steps=1)
    run(str(tmp_path / "r"), *EVERY_STEP, *warm, "train.skip_steps=3", steps=3)
    run(str(tmp_path / "r"), *EVERY_STEP, *warm, steps=5)
    w = {s: exported(tmp_path / "r", tmp_path, s, ema=False) for s in (1, 2, 4, 5)}
    e = {s: exported(tmp_path / "r", tmp_path, s, ema=True) for s in (2, 3, 4, 5)}
    assert [ema_decay_after(k, DECAY, warmup=True) for k in (0, 1, 2, 100)] == [0.1, 2 / 11, 3 / 12, DECAY]
    assert ema_decay_after(0, DECAY, warmup=False) == DECAY
    for name in w[1]:
        expected = {2: 0.1 * w[1][name].double() + 0.9 * w[2][name].double()}
        expected[4] = 2 / 11 * e[2][name].double() + 9 / 11 * w[4][name].double()
        expected[5] = 3 / 12 * e[4][name].double() + 9 / 12 * w[5][name].double()
        for step, tensor in expected.items():
            torch.testing.assert_close(e[step][name].double(), tensor, rtol=1e-6, atol=1e-7, msg=f"{name} {step}")
        assert torch.equal(e[3][name], e[2][name]), name


def test_held_out_ema_new_and_all_take_the_checkpoints_that_hold_an_average(single_process, tmp_path, capsys):
    """A run that began keeping an average on a resume has checkpoints without one before it: training.held_out
    --ema --checkpoints new (or all) measures those that hold one (it refused them all, naming the first without),
    and a second `new` finds nothing left to measure."""
    from training.held_out import main

    run_dir, rows_file = tmp_path / "r", tmp_path / "rows.jsonl"
    run(str(run_dir), *EVERY_STEP, "train.eval_interval=0", steps=1)
    run(str(run_dir), *EVERY_STEP, "train.eval_interval=0", f"train.ema_decay={DECAY}", steps=2)
    main(["--run-dir", str(run_dir), "--checkpoints", "new", "--ema", "--out", str(rows_file)])
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r.get("weights"), r.get("step")) for r in rows] == [("ema", 2)]
    capsys.readouterr()
    main(["--run-dir", str(run_dir), "--checkpoints", "new", "--ema", "--out", str(rows_file)])
    assert "nothing new to measure" in capsys.readouterr().out
    main(["--run-dir", str(run_dir), "--checkpoints", "all", "--ema", "--out", str(rows_file)])
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r.get("weights"), r.get("step")) for r in rows] == [("ema", 2), ("ema", 2)]


def test_an_export_whose_weights_are_the_average_and_config_the_weights_is_refused(single_process, tmp_path):
    """A re-export with --ema into a folder that holds the plain export of the same checkpoint, stopped between its
    two files (the weights are written first), leaves the average under a config.json that says the weights: the
    checkpoint tags agree, so the tag check let it load, and export_identity recorded it as the weights."""
    import shutil

    from training.export import export, load_exported

    run(str(tmp_path / "r"), "train.eval_interval=0", f"train.ema_decay={DECAY}", steps=1)
    plain = export(tmp_path / "r", out=tmp_path / "plain")
    averaged = export(tmp_path / "r", out=tmp_path / "ema", ema=True)
    load_exported(plain), load_exported(averaged)
    shutil.copy(averaged / "model.safetensors", plain / "model.safetensors")
    with pytest.raises(ValueError, match=r"plain: model.safetensors holds other weights of checkpoint step_00000001 "
                                         r"than config.json describes \(weights ema in model.safetensors, \(none\) in "
                                         r"config.json: an export stopped"):
        load_exported(plain)


def test_the_average_measured_in_training_at_zero3_over_two_ranks_is_the_averages(pool2, tmp_path):
    """ZeRO-3 keeps the parameters below stage3_param_persistence_threshold (every one of the debug model's) gathered
    whole between steps: the held-out loss of the average must see them swapped too (it was the weights' loss), and
    training goes on after it as a run that keeps no average."""
    from training.held_out import main

    zero3 = ("parallel.zero_stage=3", "train.eval_interval=2")
    averaged = pool2.run(run, str(tmp_path / "r"), *zero3, f"train.ema_decay={DECAY}", steps=4)[0]
    plain = pool2.run(run, str(tmp_path / "plain"), *zero3, steps=4)[0]
    assert averaged == plain  # (bit-exact: the weights swapped back after each measurement)
    rows_file = tmp_path / "rows.jsonl"
    main(["--run-dir", str(tmp_path / "r"), "--checkpoints", "step_00000004", "--ema", "--out", str(rows_file)])
    (row,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    logged, logged_ema = held_out_losses(tmp_path / "r"), held_out_losses(tmp_path / "r", "ema_valid_loss")
    assert sorted(logged_ema) == [2, 4] and (row["weights"], row["step"]) == ("ema", 4)
    assert row["valid_loss"] == pytest.approx(logged_ema[4], rel=1e-5)
    assert logged_ema[4] != pytest.approx(logged[4], rel=1e-4)


def test_the_swap_with_the_average_copies_a_flat_partition_a_piece_at_a_time(monkeypatch):
    """ZeRO-1/2/3 and DeepSpeed's bf16 wrappers hand the optimizer flat fp32 tensors, each nearly the rank's whole
    part: averaged_weights' swap cloned each whole (a second copy of the part at every measurement); it exchanges
    SWAP_ELEMENTS at a time, the values swapped exactly."""
    import types

    from torch.profiler import ProfilerActivity, profile

    from training import ema

    monkeypatch.setattr(ema, "SWAP_ELEMENTS", 1000, raising=False)
    flat = torch.nn.Parameter(torch.randn(100_000))  # (a flat partition, as the optimizer of ZeRO-1 holds)
    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW([flat]))
    ema.start_ema(engine)
    with torch.no_grad():
        flat.add_(1.0)
    weights, average = flat.detach().clone(), engine.optimizer.state[flat]["ema"].clone()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ema._swap(engine)
    assert max(e.cpu_memory_usage for e in prof.events()) <= 4 * 1000
    assert torch.equal(flat.detach(), average) and torch.equal(engine.optimizer.state[flat]["ema"], weights)
