"""Weights & Biases beside TensorBoard (common/metrics.py): an offline run lands in the run directory holding the
logged values and the config; an online start without a server falls back to offline; no project, no W&B."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.metrics import MetricsLogger, wandb_mode
from model_parallel.state import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No W&B account, nothing written outside tmp_path (W&B's settings, cache and data folders)."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run directory wins over it
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    yield monkeypatch
    import wandb

    wandb.teardown()  # W&B reads the environment once per process, into a singleton: the next test gets a new one


@pytest.fixture
def said(caplog):
    """The "parti" logger's messages, each once (MetricsLogger stops it propagating: caplog listens on it directly)."""
    logger = logging.getLogger("parti")
    logger.addHandler(caplog.handler)
    propagate, logger.propagate = logger.propagate, False
    with caplog.at_level(logging.INFO, logger="parti"):
        yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def wandb_records(path: Path):
    """The records of a .wandb file (W&B's run log: LevelDB's log format, 32 KiB blocks of chunks with a 7-byte
    header: CRC, length, type 1 full / 2 first / 3 middle / 4 last; the file opens with ':W&B', magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while len(data) - pos >= 7:
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def logged_run(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(run record: project, name; config; history: one {name: value} per step) of the one W&B run in run_dir,
    whose file is complete (it holds the exit record)."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return logged_segment(path)


def logged_segment(path: Path) -> tuple[dict, dict, list[dict]]:
    """logged_run's answer for one offline segment's .wandb file (the run record also gives its id)."""
    run, config, history, kinds = {}, {}, [], set()
    for record in wandb_records(path):
        kinds.add(kind := record.WhichOneof("record_type"))
        if kind == "run":
            run = {"project": record.run.project, "name": record.run.display_name, "id": record.run.run_id}
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update if u.key != "_wandb"}
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    assert "exit" in kinds, f"{path}: no exit record, {sorted(kinds)}"
    return run, config, history


def log_three_steps(run_dir: Path, **wandb) -> None:
    log = MetricsLogger(run_dir, enabled=True, **wandb)
    for step in (1, 2, 3):
        log.step({"step": step, "loss": 4.0 / step, "lr": 1e-3 * step, "grad_norm": None, "mfu": math.nan,
                  **({"valid_loss": 3.0} if step == 2 else {})})
    log.close()


def test_offline_run_in_the_run_directory_holds_the_logged_values(wandb_env, said, tmp_path):
    config = {"train": {"lr": 0.003, "steps": 3}, "model": {"preset": "parti-debug"}}
    log_three_steps(tmp_path / "run", wandb_project="parti-test", run_name="debug-1", config=config)
    run, logged_config, history = logged_run(tmp_path / "run")
    assert {k: run[k] for k in ("project", "name")} == {"project": "parti-test", "name": "debug-1"}
    assert logged_config == config
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["train/loss"] for h in history] == pytest.approx([4.0, 2.0, 4 / 3])
    assert [h["train/lr"] for h in history] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert all(math.isnan(h["train/mfu"]) and "train/grad_norm" not in h for h in history)  # as TensorBoard gets them
    assert [h.get("valid/loss") for h in history] == [None, 3.0, None]  # a held-out loss, where one was measured
    lines = [r.getMessage() for r in said.records if "W&B" in r.getMessage()]
    assert len(lines) == 1 and "wandb sync " + str(tmp_path / "run" / "wandb" / "offline-run-") in lines[0], lines
    assert not (tmp_path / "elsewhere").exists()


def test_online_without_a_server_falls_back_to_offline(wandb_env, said, tmp_path):
    wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    wandb_env.setenv("WANDB_INIT_TIMEOUT", "2")
    assert wandb_mode() == "online"
    log_three_steps(tmp_path / "run", wandb_project="parti-test")
    assert "online start failed" in said.text and "logging offline instead" in said.text
    run, _, history = logged_run(tmp_path / "run")
    assert run["name"] == "run" and [h["_step"] for h in history] == [1, 2, 3]


def test_a_requeued_training_run_logs_its_segments_to_one_wandb_run(wandb_env, said, single_process, tmp_path):
    """Parti's trainer gives W&B the run's id (kept over resumes): a run stopped after its checkpoint of step 3
    and resumed leaves two offline segments of one W&B run (steps 1-3, then 4-6; `wandb sync` uploads them into
    that run in order, as the log line says); `--resume overwrite`, a new run, starts another W&B run."""
    from tests.conftest import run

    run(str(tmp_path), "train.wandb_project=parti-test", "train.log_interval=1", steps=3)
    run(str(tmp_path), "train.wandb_project=parti-test", "train.log_interval=1")
    run_id = json.loads((tmp_path / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())["run_id"]
    segments = [logged_segment(path) for path in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert [r["id"] for r, _, _ in segments] == [run_id, run_id]
    assert [[h["_step"] for h in history] for _, _, history in segments] == [[1, 2, 3], [4, 5, 6]]
    sync = [r.getMessage() for r in said.records if "wandb sync" in r.getMessage()]
    assert sync[-1].endswith(f"wandb sync {tmp_path / 'wandb'}/offline-run-*-{run_id}"), sync
    run(str(tmp_path), "train.wandb_project=parti-test", steps=3, resume="overwrite")
    ids = {logged_segment(path)[0]["id"] for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")}
    [moved] = tmp_path.glob("replaced_*")  # (the old run's W&B files went aside with it)
    old = {logged_segment(path)[0]["id"] for path in (moved / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(ids) == 1 and old == {run_id} and run_id not in ids


def test_mode_rule(wandb_env):
    assert wandb_mode() == "offline"
    wandb_env.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    wandb_env.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_no_project_no_wandb(tmp_path):
    """In a fresh interpreter: wandb is not imported and nothing of it is written."""
    code = ("import sys; from pathlib import Path; from tests.test_metrics_wandb import log_three_steps; "
            f"log_three_steps(Path({str(tmp_path)!r})); print('wandb' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
    assert not (tmp_path / "wandb").exists() and (tmp_path / "metrics.jsonl").is_file()


def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    """A segment killed at step 5 after its checkpoint of step 3 (its last line cut short by the kill): the rerun
    resumes at 3 and logs 4 and 5 again; metrics.jsonl and TensorBoard then hold each step once, the rerun's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        first.step({"step": step, "loss": 10.0 + step})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    # The rerun is a later process: its event file's name (the time in seconds first) sorts after the first's.
    # Here, in one process and maybe one second, TensorBoard's per-process file counter (.9, .10) could sort the
    # other way round and make the reader take the rerun's file first, depending on the tests run before.
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 2)
    again = MetricsLogger(tmp_path, enabled=True)
    again.resumed_at(3)
    for step in (4, 5):
        again.step({"step": step, "loss": 20.0 + step, **({"valid_loss": 7.0} if step == 4 else {})})
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0)]
    assert [(e.step, e.value) for e in events.Scalars("valid/loss")] == [(4, 7.0)]


def test_a_non_finite_value_is_null_in_metrics_jsonl_and_rows_without_a_whole_step_go_at_a_resume(tmp_path):
    """JSON has no NaN: metrics.jsonl holds null for it (strict JSON readers refuse NaN). resumed_at keeps the rows
    up to the step it resumes at, and drops a row whose step is not an integer."""
    log = MetricsLogger(tmp_path, enabled=True)
    log.step({"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": "2", "loss": 1.0}\n[2]\n')
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0], parse_constant=lambda c: 1 / 0)
    assert first == {"step": 1, "loss": None, "grad_norm": None}
    again = MetricsLogger(tmp_path, enabled=True)
    again.resumed_at(1)
    again.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [first]


def test_the_step_clock_averages_the_interval_leaving_out_paused_time(monkeypatch):
    """StepClock: (time since the interval began - paused time) / steps, and the next interval starts then; the
    time waiting for input, per step."""
    from common import metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    clock = metrics.StepClock()
    for _ in range(4):
        now[0] += 1.0
        clock.step_done()
    with clock.paused():
        now[0] += 10.0
    assert clock.seconds_per_step() == pytest.approx(1.0)
    now[0] += 3.0
    clock.step_done()
    assert clock.seconds_per_step() == pytest.approx(3.0)
    for _ in range(2):  # (time waiting for input: part of the step, and reported on its own)
        with clock.waiting():
            now[0] += 0.5
        now[0] += 1.5
        clock.step_done()
    assert clock.interval() == pytest.approx((2.0, 0.5))
    with clock.waiting():
        now[0] += 1.0
    now[0] += 3.0
    clock.step_done()
    assert clock.rates(8, "images") == pytest.approx({"images_per_s": 2.0, "data_wait_pct": 25.0})
