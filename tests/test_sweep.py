"""slurm/sweep.py without a cluster: the grid of sbatch commands a sweep submits (combinations whose TP x PP
does not divide the processes are skipped), and the table and plots `collect` makes from run folders.
(tests/test_slurm.py submits a sweep to a real local cluster and collects what its job wrote.)"""
from __future__ import annotations

import csv
import json

import pytest

from common.config import ConfigError, save_config
from slurm.sweep import collect, submissions
from training.config import load_config
from training.flops import train_flops_per_sample


def test_the_grid_skips_layouts_that_do_not_split_the_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    jobs = submissions(["parti-debug"], [1, 2], ["tp1pp1z0", "tp2pp1z1"], "configs/train/debug.yaml", tmp_path,
                       6, ["train.lr=1e-3"], 0, ["--cpus-per-task=2"])
    assert [j["name"] for j in jobs] == ["parti-debug-n1-tp1pp1z0", "parti-debug-n2-tp1pp1z0",
                                         "parti-debug-n2-tp2pp1z1"]
    assert ("skipped parti-debug-n1-tp2pp1z1 (1 processes): world size 1 must be divisible by parallel.tp x "
            "parallel.pp" in capsys.readouterr().out)
    command = jobs[2]["command"]
    assert command[:7] == ["sbatch", "--parsable", "-N", "2", "--gpus-per-node=0", "--cpus-per-task=2",
                           "--job-name=parti-debug-n2-tp2pp1z1"]
    assert command[command.index("--set") + 1:] == ["model.preset=parti-debug", "parallel.tp=2", "parallel.pp=1",
                                                    "parallel.zero_stage=1", "train.steps=6", "train.lr=1e-3"]
    assert command[command.index("slurm/train.sbatch") + 2] == str(tmp_path / "parti-debug-n2-tp2pp1z1")
    with pytest.raises(ValueError, match="layout 'tp2': expected tpNppNzN"):
        submissions(["parti-debug"], [1], ["tp2"], "configs/train/debug.yaml", tmp_path, 6, [], 8)


def test_the_grid_skips_what_the_trainer_would_refuse_and_warns_of_a_sweep_inside_the_warm_up(tmp_path, capsys):
    """Every combination is checked as the trainer checks it on its process count (8 GPUs a node here), before
    anything is queued (4 GPUs a node here): debug's 4 heads do not split over TP=8, its global batch of 8 is less
    than micro-batch 4 x DP 4; runs shorter than the warm-up never reach the peak learning rate."""
    jobs = submissions(["parti-debug"], [1, 2], ["tp2pp1z1", "tp8pp1z1"], "configs/train/debug.yaml", tmp_path,
                       6, ["train.warmup_steps=10"], 4)
    out = capsys.readouterr().out
    assert [j["name"] for j in jobs] == ["parti-debug-n1-tp2pp1z1"], out
    assert ("skipped parti-debug-n2-tp8pp1z1 (8 processes): model.num_heads=4 must be divisible by parallel.tp=8"
            in out)
    assert ("skipped parti-debug-n2-tp2pp1z1 (8 processes): global batch 8 is not a multiple of micro-batch 4 x DP 4"
            in out)
    assert out.count("warning: parti-debug: train.warmup_steps=10 >= train.steps=6") == 1
    submissions(["parti-debug"], [1], ["tp1pp1z1"], "configs/train/debug.yaml", tmp_path, 6,
                ["train.steps=100", "train.warmup_steps=10"], 4)  # (the runs' steps: the override's)
    assert "warning" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.warmup_stpes"):  # (not "every combination skipped")
        submissions(["parti-debug"], [1], ["tp1pp1z1"], "configs/train/debug.yaml", tmp_path, 6,
                    ["train.warmup_stpes=10"], 4)


def test_a_sweep_is_not_submitted_into_the_runs_of_an_earlier_one(tmp_path, capsys):
    """A resubmitted sweep would resume (or find finished) the runs already in its folders instead of measuring:
    refused before any job is queued; nothing fitting at all is refused too."""
    from slurm.sweep import main

    args = ["submit", "--out", str(tmp_path), "--config", "configs/train/debug.yaml", "--models", "parti-debug",
            "--nodes", "1", "--gpus-per-node", "2", "--dry-run"]
    main([*args, "--layouts", "tp1pp1z1,tp2pp1z1"])
    assert "train.sbatch" in capsys.readouterr().out and (tmp_path / "jobs.json").is_file()
    (tmp_path / "parti-debug-n1-tp2pp1z1").mkdir()
    main([*args, "--layouts", "tp1pp1z1,tp2pp1z1"])  # (an empty folder is no run)
    (tmp_path / "parti-debug-n1-tp2pp1z1" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"parti-debug-n1-tp2pp1z1 already hold\(s\) a run: "
                                         r"submit the sweep into a new"):
        main([*args, "--layouts", "tp1pp1z1,tp2pp1z1"])
    with pytest.raises(SystemExit, match="no combination fits"):
        main([*args, "--layouts", "tp8pp1z1"])


def test_a_dry_run_keeps_the_record_of_queued_jobs_and_repeats_count_once(tmp_path, capsys):
    """A dry run into a sweep's folder used to rewrite jobs.json without its job ids: the real submission after it
    then queued every run a second time. A value given twice (nodes 1,1) queued two jobs into one run folder."""
    from slurm.sweep import main, submitted_before

    args = ["submit", "--out", str(tmp_path), "--config", "configs/train/debug.yaml", "--models", "parti-debug",
            "--gpus-per-node", "2", "--layouts", "tp1pp1z1,tp1pp1z1", "--dry-run"]
    main([*args, "--nodes", "1,1"])
    assert capsys.readouterr().out.count("train.sbatch") == 1
    assert len(json.loads((tmp_path / "jobs.json").read_text())) == 1
    (tmp_path / "jobs.json").write_text(json.dumps([{"name": "x", "run_dir": "x", "command": [], "job_id": "7"}]))
    with pytest.raises(SystemExit, match="records jobs submitted before, which may still be queued"):
        main([*args, "--nodes", "1"])
    assert submitted_before(tmp_path / "jobs.json")


def test_a_sweep_on_cpu_nodes_needs_a_device_that_is_not_cuda(tmp_path, monkeypatch, capsys):
    from slurm.sweep import main

    args = ["submit", "--out", str(tmp_path), "--config", "configs/train/debug.yaml", "--models", "parti-debug",
            "--nodes", "1", "--gpus-per-node", "0", "--layouts", "tp1pp1z1", "--dry-run"]
    monkeypatch.delenv("DEVICE", raising=False)
    with pytest.raises(SystemExit, match="--gpus-per-node 0 runs on CPU nodes: set DEVICE=cpu"):
        main(args)
    monkeypatch.setenv("DEVICE", "cpu")
    main(args)
    assert "train.sbatch" in capsys.readouterr().out


def test_a_refused_submission_says_why_and_records_the_jobs_queued_before_it(tmp_path, monkeypatch):
    """sbatch refusing the second job (a submit limit): its reason is shown, the first job is in jobs.json, and the
    sweep is not submitted again into that folder (its run folders do not exist until the jobs start)."""
    import subprocess

    from slurm import sweep

    def sbatch(command, **kwargs):
        if "--job-name=parti-debug-n1-tp2pp1z1" in command:
            raise subprocess.CalledProcessError(1, command, "", "sbatch: error: QOSMaxSubmitJobPerUserLimit\n")
        return subprocess.CompletedProcess(command, 0, "1001\n", "")

    monkeypatch.setattr(sweep.subprocess, "run", sbatch)
    args = ["submit", "--out", str(tmp_path), "--config", "configs/train/debug.yaml", "--models", "parti-debug",
            "--nodes", "1", "--gpus-per-node", "2", "--layouts", "tp1pp1z1,tp2pp1z1"]
    with pytest.raises(SystemExit, match=r"sbatch refused parti-debug-n1-tp2pp1z1 \(sbatch: error: "
                                         r"QOSMaxSubmitJobPerUserLimit\); the 1 job\(s\) queued before it "
                                         r"are recorded"):
        sweep.main(args)
    jobs = json.loads((tmp_path / "jobs.json").read_text())
    assert [j.get("job_id") for j in jobs] == ["1001", None]
    with pytest.raises(SystemExit, match="records jobs submitted before, which may still be queued"):
        sweep.main(args)


def write_run(folder, tp: int, world: int, samples_per_s: list[float], consumed: list[int] | None = None) -> None:
    folder.mkdir()
    save_config(load_config("configs/train/debug.yaml", [f"parallel.tp={tp}"]), folder / "config.yaml")
    rows = [{"step": i + 1, "loss": 4.0 - i, "samples_per_s": s, "mem_gb": 0.5 + i, "world_size": world,
             **({"consumed_samples": consumed[i]} if consumed else {}),
             **({"valid_loss": 5.0 - i} if tp == 2 and i % 2 else {})}  # (b measures a held-out loss at steps 2, 4)
            for i, s in enumerate(samples_per_s)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_tabulates_medians_after_the_warmup_and_draws_the_plots(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []  # (kind, x, y) of every line and bar drawn: the plots' data, not only their files' sizes
    for kind in ("plot", "bar"):
        real = getattr(Axes, kind)
        monkeypatch.setattr(Axes, kind, lambda self, x, y, *a, _real=real, _kind=kind, **k:
                            drawn.append((_kind, list(x), list(y))) or _real(self, x, y, *a, **k))
    write_run(tmp_path / "a-n1-tp1pp1z0", 1, 1, [1.0, 50.0, 10.0, 30.0, 20.0], [8, 16, 24, 40, 56])  # (batch 16 at 4)
    write_run(tmp_path / "b-n2-tp2pp1z0", 2, 4, [2.0, 40.0, 60.0, 50.0])
    (tmp_path / "not-a-run").mkdir()
    measured = [{"step": 4, "valid_loss": 1.5}, {"step": 3, "valid_loss": 9.0}, {"step": 4, "valid_loss": 1.25}]
    (tmp_path / "b-n2-tp2pp1z0" / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in measured))
    rows = {r["run"]: r for r in collect(tmp_path, warmup=2)}
    assert set(rows) == {"a-n1-tp1pp1z0", "b-n2-tp2pp1z0"}
    a, b = rows["a-n1-tp1pp1z0"], rows["b-n2-tp2pp1z0"]
    assert (a["samples_per_s"], a["dp"], a["steps"], a["final_loss"], a["mem_gb"]) == (20.0, 1, 5, 0.0, 4.5)
    assert (b["samples_per_s"], b["samples_per_s_per_gpu"], b["gpus"], b["tp"], b["dp"]) == (55.0, 13.75, 4, 2, 2)
    debug = load_config("configs/train/debug.yaml")
    per_step = debug.train.global_batch_size * train_flops_per_sample(debug.model)
    assert b["curve"] == [(s * per_step, 4.0 - (s - 1)) for s in (1, 2, 3, 4)]
    assert b["valid_curve"] == [(s * per_step, 5.0 - (s - 1)) for s in (2, 4)] and b["final_valid_loss"] == 2.0
    assert a["valid_curve"] == [] and a["final_valid_loss"] is None
    assert a["held_out_loss"] is None and b["held_out_loss"] == 1.25  # (training.held_out's newest of the last step)
    per_sample = train_flops_per_sample(debug.model)  # (a's compute: its rows' consumed samples, not step x batch)
    assert [c for c, _ in a["curve"]] == [n * per_sample for n in (8, 16, 24, 40, 56)]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == ["a-n1-tp1pp1z0", "b-n2-tp2pp1z0"] and "curve" not in table[0]
    assert "valid_curve" not in table[0] and table[1]["final_valid_loss"] == "2.0"
    for png in ("throughput.png", "memory.png", "loss_vs_compute.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    # throughput per GPU against GPUs, one line per layout (no MFU line on CPU), then memory per run
    assert drawn[:2] == [("plot", [1], [20.0]), ("plot", [4], [13.75])]
    assert ("bar", [0, 1], [a["mem_gb"], b["mem_gb"]]) in drawn
    with pytest.raises(FileNotFoundError, match="no run folder"):
        collect(tmp_path / "not-a-run")


def test_held_out_loss_of_a_run_whose_last_steps_were_skipped_is_its_last_checkpoints(tmp_path):
    """A run whose last steps were train.skip_steps logs its last trained row before them (steps 1-4 of 6) and saves
    its last checkpoint at step 6: training.held_out's newest row of that checkpoint is its held_out_loss. The
    trainer's row of the final held-out losses at step 6 (no loss, no rates) gives the final valid loss, the step
    count, and leaves the final training loss, the curve and the world size to the trained rows."""
    from slurm.sweep import summarize

    write_run(tmp_path / "r", 1, 1, [1.0, 2.0, 3.0, 4.0])
    measured = [{"step": 6, "valid_loss": 1.5}, {"step": 3, "valid_loss": 9.0}, {"step": 6, "valid_loss": 1.25},
                {"step": 6, "valid_loss": 1.0, "weights": "ema"}]  # (--ema's: the moving average's, not the weights')
    (tmp_path / "r" / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in measured))
    assert summarize(tmp_path / "r", 0)["held_out_loss"] == 1.25
    assert summarize(tmp_path / "r", 0)["final_ema_valid_loss"] is None
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # (train.ema_decay's column)
        f.write(json.dumps({"step": 5, "loss": 1.0, "valid_loss": 2.0, "ema_valid_loss": 1.75}) + "\n")
    assert summarize(tmp_path / "r", 0)["final_ema_valid_loss"] == 1.75
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # (a segment resumed without it: its measurement has none)
        f.write(json.dumps({"step": 6, "loss": 1.0, "valid_loss": 1.9}) + "\n")
    assert summarize(tmp_path / "r", 0)["final_ema_valid_loss"] is None
    write_run(tmp_path / "s", 1, 2, [1.0, 2.0, 3.0, 4.0])  # (its last step read past: the trainer's final row
    with open(tmp_path / "s" / "metrics.jsonl", "a") as f:  # holds its held-out losses alone, no loss or rates)
        f.write(json.dumps({"step": 6, "valid_loss": 2.5, "consumed_samples": 48}) + "\n")
    summary = summarize(tmp_path / "s", 0)
    assert (summary["steps"], summary["final_loss"], summary["final_valid_loss"]) == (6, 1.0, 2.5)
    assert summary["gpus"] == 2 and [loss for _, loss in summary["curve"]] == [4.0, 3.0, 2.0, 1.0]


def test_collect_leaves_out_a_line_cut_short_and_bad_input_is_one_line(tmp_path):
    """A killed job's metrics.jsonl may end in half a line (collect ended in a JSONDecodeError naming no file);
    a missing folder, a node count that is not one, a layout of another form: one line each, no traceback."""
    from slurm.sweep import main

    write_run(tmp_path / "a-n1-tp1pp1z0", 1, 1, [1.0, 50.0, 10.0])
    with open(tmp_path / "a-n1-tp1pp1z0" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')
    assert [r["steps"] for r in collect(tmp_path, warmup=0)] == [3]
    submit = ["submit", "--out", str(tmp_path / "s"), "--config", "configs/train/debug.yaml", "--models",
              "parti-debug", "--gpus-per-node", "2", "--dry-run"]
    for argv, says in ((["collect", str(tmp_path / "nothere")], "nothere"),
                       ([*submit, "--nodes", "1,x", "--layouts", "tp1pp1z1"], "--nodes 1,x: expected node counts"),
                       ([*submit, "--nodes", "0", "--layouts", "tp1pp1z1"], "--nodes 0: expected node counts >= 1"),
                       ([*submit, "--nodes", "1", "--layouts", "tp1pp1"], "layout 'tp1pp1': expected tpNppNzN")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert isinstance(stop.value.code, str) and says in stop.value.code, stop.value.code


def test_submit_defaults_and_what_each_command_carries(tmp_path, monkeypatch, capsys):
    """Without --gpus-per-node (and no NPROC_PER_NODE) a job asks for 8 GPUs a node and trains --steps 200; a model
    given twice queues once; each job's log goes into the sweep's folder (made when missing, with jobs.json);
    --sbatch-args is split as a shell splits it (a quoted value stays one option)."""
    from slurm.sweep import main

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.delenv("DEVICE", raising=False)
    out = tmp_path / "new" / "s1"
    main(["submit", "--out", str(out), "--config", "configs/train/debug.yaml", "--models", "parti-debug,parti-debug",
          "--nodes", "1", "--layouts", "tp1pp1z1", "--sbatch-args", '--comment="two words" --partition=gpu',
          "--set", "train.micro_batch_size=1", "--dry-run"])
    assert capsys.readouterr().out.count("train.sbatch") == 1
    [job] = json.loads((out / "jobs.json").read_text())
    command = job["command"]
    assert "--gpus-per-node=8" in command and "train.steps=200" in command
    assert command[command.index("--gpus-per-node=8") + 1:][:2] == ["--comment=two words", "--partition=gpu"]
    assert f"--output={out}/parti-debug-n1-tp1pp1z1.out" in command


def test_a_damaged_jobs_record_counts_as_submitted_and_the_warm_up_hint_is_at_least_one(tmp_path, capsys):
    from slurm.sweep import submitted_before

    record = tmp_path / "jobs.json"
    for damaged in ('[{"name": "x", "job_id": "7"', "[1, 2]"):  # (cut short; not a list of jobs)
        record.write_text(damaged)
        assert submitted_before(record), damaged
    submissions(["parti-debug"], [1], ["tp1pp1z1"], "configs/train/debug.yaml", tmp_path, 6,
                ["train.warmup_steps=10"], 4)
    assert "add e.g. --set train.warmup_steps=1\n" in capsys.readouterr().out  # (6 // 10 = 0 would be no warm-up)


def write_rows(folder, overrides: list[str], rows: list[dict], config: bool = True) -> None:
    folder.mkdir()
    if config:
        save_config(load_config("configs/train/debug.yaml", overrides), folder / "config.yaml")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_takes_peaks_medians_and_pipeline_layouts_and_plots_node_counts_in_order(tmp_path, monkeypatch):
    """Peak memory is the largest row's (not the last); TFLOP/s and MFU are their own medians; DP divides the
    processes by TP x PP; a warm-up longer than the run leaves every row in; a folder without config.yaml and a
    row without a step are no data; lines are drawn in node order (n16 after n2, though its folder sorts first),
    with the MFU and the held-out loss drawn too; results.md holds the table's values."""
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot",
                        lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or real(self, x, y, *a, **k))
    for nodes in (1, 2, 16):
        rows = [{"step": i + 1, "loss": 3.0 - i, "samples_per_s": 123.456, "mem_gb": [3.0, 1.0, 2.0][i],
                 "tflops_per_gpu": [1.0, 2.0, 3.0][i], "mfu": [0.1, 0.2, 0.3][i], "world_size": 2 * nodes,
                 **({"valid_loss": 9.5} if i == 1 else {})} for i in range(3)]
        write_rows(tmp_path / f"e-n{nodes}-tp1pp2z0", ["parallel.pp=2"], [*rows[:2], {"loss": 1.0}, rows[2]])
    write_rows(tmp_path / "d-n1-tp1pp1z0", [], [{"step": 1, "loss": 1.0, "world_size": 1}], config=False)
    rows = {r["run"]: r for r in collect(tmp_path, warmup=10)}
    assert set(rows) == {"e-n1-tp1pp2z0", "e-n2-tp1pp2z0", "e-n16-tp1pp2z0"}
    r = rows["e-n2-tp1pp2z0"]
    assert (r["gpus"], r["pp"], r["dp"], r["mem_gb"], r["steps"]) == (4, 2, 2, 3.0, 3)
    assert (r["samples_per_s"], r["tflops_per_gpu"], r["mfu"]) == (123.456, 2.0, 0.2)
    assert drawn[0] == ([2, 4, 32], [123.456 / 2, 123.456 / 4, 123.456 / 32])  # throughput per GPU
    assert drawn[1] == ([2, 4, 32], [0.2, 0.2, 0.2])  # MFU
    assert [y for _, y in drawn].count([9.5]) == 3  # each run's held-out loss
    assert "| e-n2-tp1pp2z0 | parti-debug | 4 | 1 | 2 | 2 | 0 | 123.5 | 30.86 | 2 | 0.2 | 3 |" in \
        (tmp_path / "results.md").read_text()


def test_an_empty_model_name_and_bad_process_counts_are_one_line_before_anything_is_queued(tmp_path, monkeypatch):
    """A trailing comma in --models queued the config's model without its preset in a folder "-n1-tp1pp1z1";
    --gpus-per-node -1 was validated as world size -1 and queued; NPROC_PER_NODE=0 for CPU nodes ended in a
    ZeroDivisionError, and an empty NPROC_PER_NODE (train.sbatch's unset) in a traceback, `collect` included;
    a negative --warmup kept only the last rows; an NPROC_PER_NODE other than --gpus-per-node (the jobs would start
    that many per node, sbatch passing the environment on) is refused."""
    from slurm.sweep import main

    write_run(tmp_path / "a-n1-tp1pp1z0", 1, 1, [1.0, 50.0, 10.0])
    monkeypatch.setenv("NPROC_PER_NODE", "")
    main(["collect", str(tmp_path)])
    submit = ["submit", "--out", str(tmp_path / "s"), "--config", "configs/train/debug.yaml", "--nodes", "1",
              "--layouts", "tp1pp1z1", "--dry-run"]
    for env, argv, says in (
            ({}, ["--models", "parti-debug,", "--gpus-per-node", "2"], "--models parti-debug,: expected preset"),
            ({}, ["--models", "parti-debug", "--gpus-per-node", "-1"], "--gpus-per-node -1: expected GPUs"),
            ({"DEVICE": "cpu", "NPROC_PER_NODE": "0"}, ["--models", "parti-debug"], "NPROC_PER_NODE=0: expected"),
            ({"NPROC_PER_NODE": "x"}, ["--models", "parti-debug"], "NPROC_PER_NODE='x': expected a whole number"),
            ({"NPROC_PER_NODE": "4"}, ["--models", "parti-debug", "--gpus-per-node", "8"],
             "--gpus-per-node 8 but NPROC_PER_NODE=4 in the environment")):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as stop:
            main([*submit, *argv])
        assert isinstance(stop.value.code, str) and says in stop.value.code, stop.value.code
    assert not (tmp_path / "s").exists()
    monkeypatch.setenv("NPROC_PER_NODE", "")  # (empty: unset, as train.sbatch reads it: 8 GPUs a node)
    main([*submit, "--models", "parti-debug", "--set", "train.micro_batch_size=1"])
    assert "--gpus-per-node=8" in json.loads((tmp_path / "s" / "jobs.json").read_text())[0]["command"]
    with pytest.raises(SystemExit) as stop:
        main(["collect", str(tmp_path), "--warmup", "-1"])
    assert stop.value.code == 2


def test_cooldowns_branch_a_stable_run_at_its_checkpoints(tmp_path, monkeypatch, capsys):
    """`cooldowns`: from the run's checkpoint at each step S of --at, a branch of the run's own config.yaml that
    trains fraction x S steps more, the rate at its peak up to S and at min_lr after the last step; a step without a
    complete checkpoint, one inside the warm-up, a constant decay, a fraction outside (0, 1] and a layout the
    processes do not fit are refused naming them, before anything is queued."""
    from common.schedule import lr_lambda
    from slurm.sweep import cooldown_jobs, main

    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    stable = tmp_path / "stable"
    save_config(load_config("configs/train/debug.yaml", ["train.warmup_steps=5", "train.lr_decay=constant",
                                                         "train.steps=1000"]), stable / "config.yaml")
    for step in (40, 100, 3):
        (stable / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (stable / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    (stable / "checkpoints" / "step_00000060").mkdir()  # (a save that did not finish)
    jobs = cooldown_jobs(stable, [40, 100], 0.25, "minus_sqrt", tmp_path / "c", ["train.min_lr=1e-5"], 1, 2)
    assert [j["name"] for j in jobs] == ["cooldown-40", "cooldown-100"]
    command = jobs[1]["command"]
    assert command[command.index("slurm/train.sbatch") + 1:][:2] == [str(stable / "config.yaml"),
                                                                      str(tmp_path / "c" / "cooldown-100")]
    cfg = load_config(str(stable / "config.yaml"), command[command.index("--set") + 1:])
    assert cfg.train.init_from == str((stable / "checkpoints" / "step_00000100").resolve())
    assert (cfg.train.init_weights_only, cfg.train.steps, cfg.train.lr_decay) == (False, 125, "minus_sqrt")
    f = lr_lambda(cfg.train)
    assert f(99) == f(100) == 1.0 > f(101) > f(124) and cfg.train.lr * f(125) == pytest.approx(1e-5)

    def refused(at, fraction=0.2, decay="minus_sqrt", extra=(), gpus=2):
        cooldown_jobs(stable, at, fraction, decay, tmp_path / "c", list(extra), 1, gpus)

    with pytest.raises(ValueError, match=r"--at 60: .* holds no complete checkpoint of step 60 \(trainer_state.json; "
                                         r"complete: step_00000003, step_00000040, step_00000100\)"):
        refused([40, 60])
    with pytest.raises(ValueError, match=r"--at 3: inside the run's warm-up \(train.warmup_steps=5\)"):
        refused([3])
    with pytest.raises(ValueError, match="--decay 'constant': expected one of cosine, linear, minus_sqrt"):
        refused([40], decay="constant")
    with pytest.raises(ValueError, match=r"--fraction 1.5: expected"):
        refused([40], fraction=1.5)
    with pytest.raises(ConfigError, match="world size 2 must be divisible by parallel.tp x parallel.pp"):
        refused([40], extra=["parallel.tp=4"])
    with pytest.raises(FileNotFoundError, match=r"config.yaml: not found; --from takes the run directory"):
        cooldown_jobs(tmp_path / "c", [40], 0.2, "linear", tmp_path / "c", [], 1, 2)
    main(["cooldowns", "--out", str(tmp_path / "c"), "--from", str(stable), "--at", "40,100", "--gpus-per-node", "2",
          "--dry-run"])
    assert capsys.readouterr().out.count("slurm/train.sbatch") == 2
    assert [j["name"] for j in json.loads((tmp_path / "c" / "jobs.json").read_text())] == ["cooldown-40",
                                                                                           "cooldown-100"]
