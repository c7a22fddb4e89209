"""Faults and stops: SIGKILL while saving, SIGUSR1 preemption, non-finite steps, refused layouts."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import STEPS, run
from training.checkpoint import latest_tag

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_until_gone(group: int, timeout: float = 30) -> bool:
    """Until no process of the process group is alive (zombies, dead but not reaped yet, hold no files);
    False if some still is after `timeout` seconds. Every thread is looked at: a killed multi-threaded
    process's main thread can be a zombie while its other threads still exit, holding its files (the run
    lock) until the last one has gone."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = False
        for stat in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
            try:
                state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            alive = alive or (int(pgrp) == group and state not in ("Z", "X"))
        if not alive:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_while_saving_keeps_previous_checkpoint(single_process, reference, tmp_path, mode):
    """Killed while writing step 4 (async: right after handing it to the background writer): `latest` stays on
    step 2 (with async saves, completed at a later step) and a resume gives the uninterrupted run's losses."""
    log = tmp_path / "crash.log"
    with open(log, "w") as out:  # a file, not a pipe: the killed process's helpers may keep a pipe open
        proc = subprocess.Popen([sys.executable, "-m", "tests.crash_during_save", str(tmp_path), "4", mode],
                                cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        returncode = proc.wait(timeout=300)
    if mode == "sync":  # its helpers (data workers, the checkpoint queue server) end by themselves
        assert wait_until_gone(proc.pid, timeout=20), "a helper process outlived the killed trainer"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned background writer (async)
    # forked checkpoint writers share the run directory's lock until they die
    assert wait_until_gone(proc.pid), "the killed run's processes are still alive"
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert (tmp_path / "checkpoints" / "step_00000004").is_dir()          # half-written
    assert latest_tag(tmp_path) == "step_00000002"                         # the pointer did not move
    resumed = run(str(tmp_path))                                           # continues from step 2
    assert len(resumed) == STEPS - 2
    assert resumed == pytest.approx(reference[0][2:], rel=1e-4, abs=1e-4)


def test_sigusr1_saves_and_exits_for_requeue(single_process, tmp_path):
    """The signal goes to every process of the run, as SLURM signals a job's: the helpers (data workers, the
    checkpoint queue server, up since the save at step 2) leave it to the trainer, which saves and exits."""
    from common.preemption import REQUEUE_EXIT_CODE

    cmd = [sys.executable, "-m", "training.train", "--config", "configs/train/debug.yaml",
           "--set", "train.steps=100000", "train.save_interval=2", "--run-dir", str(tmp_path)]
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while len(metrics(tmp_path)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGUSR1)
        returncode = proc.wait(timeout=240)
    assert returncode == REQUEUE_EXIT_CODE, log.read_text()[-3000:]
    assert "checkpoint saved; " + f"{tmp_path}/REQUEUE written; exit status 75: run again" in log.read_text()
    tag = latest_tag(tmp_path)
    state = json.loads((tmp_path / "checkpoints" / tag / "trainer_state.json").read_text())
    assert state["step"] == metrics(tmp_path)[-1]["step"] >= 3 and state["consumed_samples"] == state["step"] * 8
    # The requeued run resumes from it by itself.
    more = run(str(tmp_path), f"train.steps={state['step'] + 2}", "train.global_batch_size=8",
               "train.micro_batch_size=4")
    assert len(more) == 2 and all(map(lambda x: x == x, more))


def test_a_stop_request_restores_the_handlers_it_found():
    """USR1 ignored (as slurm/train.sbatch starts torchrun and so the trainers) stays ignored after a stop request
    is restored: the export written after the training loop must not die of a plain `scancel --signal=USR1`."""
    from common.preemption import StopRequest

    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        request = StopRequest()
        assert signal.getsignal(signal.SIGUSR1) == request._handle
        request.restore()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_stop_request_in_one_process_from_its_file_or_a_signal(tmp_path, monkeypatch):
    """StopRequest without a process group: the STOP file or a caught signal is a request (named by the file or
    the signal); start() removes a stale REQUEUE and honours a stop asked for at start-up (at the last step as a
    finished run: STOP removed, no REQUEUE, no Preempted); leave_for_requeue writes REQUEUE and raises; the exit
    status is 75, 0 under torchrun."""
    from common.preemption import REQUEUE_EXIT_CODE, Preempted, StopRequest, requeue_exit_code

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert requeue_exit_code() == REQUEUE_EXIT_CODE == 75
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert requeue_exit_code() == 0
    stop, requeue = tmp_path / "STOP", tmp_path / "REQUEUE"
    request = StopRequest(stop)
    try:
        requeue.write_text("step 1\n")
        request.start(tmp_path, 2, 4)
        assert not requeue.exists() and not request.requested() and request.name == "another rank"
        stop.touch()
        assert request.requested() and request.name == str(stop)
        with pytest.raises(Preempted, match=rf"^stopped by {stop} while starting, before step 3; nothing to save; "
                                            rf"{tmp_path}/REQUEUE written$") as raised:
            request.start(tmp_path, 2, 4)
        assert (raised.value.step, raised.value.run_dir) == (2, tmp_path)
        assert requeue.read_text() == "step 2\n" and not stop.exists()
        stop.touch()
        request.start(tmp_path, 4, 4)  # (a stop at the last step: the run is finished)
        assert not stop.exists() and not requeue.exists()
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested() and request.name == "SIGTERM"
        with pytest.raises(Preempted, match="^stopped by SIGTERM after step 3"):
            request.leave_for_requeue(tmp_path, 3)
        assert requeue.read_text() == "step 3\n"
        request.leave_for_requeue(tmp_path, 5, last=True)
        assert requeue.read_text() == "step 3\n"
    finally:
        request.restore()



def test_a_stop_request_from_its_time_limit(tmp_path, monkeypatch):
    """exit_after_minutes: counted from the process's start (here 10 s before the request is made), not a request
    before the limit, one after it (named by the setting), left out of start() (a start-up that outlasted it would
    requeue the run for ever without a step); 0: no limit."""
    import common.preemption as preemption

    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(preemption, "_process_age_s", lambda: 10.0)
    request, unlimited = preemption.StopRequest(tmp_path / "STOP", 0.5), preemption.StopRequest(None, 0)
    try:
        now[0] += 19
        assert not request.requested()
        now[0] += 1
        assert request.requested() and request.name == "train.exit_after_minutes=0.5"
        assert not request.requested(time_limit=False)
        request.start(tmp_path, 2, 4)  # (no Preempted: the first step comes first)
        now[0] += 1e9
        assert not unlimited.requested()
    finally:
        unlimited.restore()
        request.restore()

def test_the_time_limit_counts_from_the_process_start():
    """_process_age_s against a sleep at the top of a fresh process: the time before a StopRequest counts; a
    torchrun worker's (TORCHELASTIC_RUN_ID set) counts from its parent's start, the agent's, here 2 s before."""
    code = "import time; time.sleep(1.0); from common.preemption import _process_age_s; print(_process_age_s())"
    age = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                               cwd=ROOT).stdout)
    assert 1.0 <= age < 30
    agent = ("import os, subprocess, sys, time; time.sleep(2.0); sys.exit(subprocess.run([sys.executable, '-c', "
             f"{code!r}], env={{**os.environ, 'TORCHELASTIC_RUN_ID': 'x'}}).returncode)")
    age = float(subprocess.run([sys.executable, "-c", agent], check=True, capture_output=True, text=True,
                               cwd=ROOT).stdout)
    assert 3.0 <= age < 30


def test_a_helper_started_by_a_trainer_ignores_its_stop_signals_and_lets_its_run_lock_go(tmp_path):
    """common.preemption.start_helper in a forked helper: USR1 and TERM ignored, its copy of the run lock closed."""
    from common.checkpoints import RunLock

    lock = RunLock(tmp_path).acquire()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from common.preemption import start_helper

            start_helper(0)
            ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR1, signal.SIGTERM))
            try:
                os.fstat(lock.file.fileno())
            except OSError:
                code = 0 if ignored else 2
        finally:
            os._exit(code)
    try:
        assert os.waitpid(pid, 0)[1] >> 8 == 0
    finally:
        lock.release()


def test_stops_at_start_up_at_the_last_step_and_stale_requeue_files(single_process, tmp_path, monkeypatch):
    """SIGUSR1 while the trainer starts up (here during its resume) is honoured before the first step: no step,
    no save, REQUEUE naming the step resumed from (the process is not killed: the handlers come first). A
    REQUEUE an earlier segment left is removed when a run starts (a wrapper would requeue a finished run
    forever); a stop asked for at the last step ends the run as finished: STOP removed, no REQUEUE."""
    from common.preemption import Preempted
    from training import trainer as trainer_module

    real_resume, handlers = trainer_module.Trainer.resume, []

    def resume_then_signal(self):
        handlers.append(signal.getsignal(signal.SIGUSR1))
        if handlers[-1] not in (signal.SIG_DFL, signal.SIG_IGN, None):  # (never kill the test process)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_resume(self)

    run(str(tmp_path), steps=2)
    monkeypatch.setattr(trainer_module.Trainer, "resume", resume_then_signal)
    with pytest.raises(Preempted, match="stopped by SIGUSR1 while starting, before step 3; nothing to save; "):
        run(str(tmp_path), steps=4)
    monkeypatch.undo()
    assert getattr(handlers[0], "__self__", None).__class__.__name__ == "StopRequest"
    assert (tmp_path / "REQUEUE").read_text() == "step 2\n" and latest_tag(tmp_path) == "step_00000002"
    assert len(metrics(tmp_path)) == 2  # (no step was taken)

    import training.engine as engine_module

    real_step = engine_module.train_step

    def step_then_stop(*args, **kwargs):
        (tmp_path / "STOP").touch()  # (during every step; seen after it)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine_module, "train_step", step_then_stop)
    assert len(run(str(tmp_path), steps=3)) == 1  # step 3, the last: the stop is served by finishing
    assert not (tmp_path / "STOP").exists() and not (tmp_path / "REQUEUE").exists()
    assert latest_tag(tmp_path) == "step_00000003"
    monkeypatch.undo()
    (tmp_path / "STOP").touch()  # a stop asked for as a finished run starts again: served by finishing, too
    assert run(str(tmp_path), steps=3) == []
    assert not (tmp_path / "STOP").exists() and not (tmp_path / "REQUEUE").exists()


@pytest.fixture
def nan_loss_on_calls(monkeypatch):
    """Make the loss NaN on the given forward calls (1-based) of the model (`.calls[0]`: those made so far)."""
    import model_parallel.model as model_module

    class Poisoned(set):
        calls = [0]

    real, poisoned = model_module.image_code_loss, Poisoned()

    def loss(logits, codes, *args):
        poisoned.calls[0] += 1
        value = real(logits, codes, *args)
        return value * float("nan") if poisoned.calls[0] in poisoned else value

    monkeypatch.setattr(model_module, "image_code_loss", loss)
    return poisoned


# fp32 ZeRO-0: the guard skips the step; ZeRO-1 and bf16: DeepSpeed's wrappers do, and the guard counts it
NONFINITE_PATHS = [(), ("parallel.zero_stage=1",), ("train.precision=bf16",)]


@pytest.mark.parametrize("sets", NONFINITE_PATHS, ids=["fp32-zero0", "fp32-zero1", "bf16-zero0"])
def test_nonfinite_step_is_skipped_and_counted(single_process, tmp_path, nan_loss_on_calls, sets):
    """The first step skipped (no optimizer state exists yet), then a save at every step: the first save
    (before any real step: Adam's moments are made for it) and the run go on."""
    nan_loss_on_calls.update({2})  # a micro-batch of step 1 (4 micro-batches per step)
    losses = run(str(tmp_path), *sets, "train.save_interval=1")
    assert losses[0] != losses[0] and all(x == x for x in losses[1:])  # NaN, then training goes on
    lines = metrics(tmp_path)
    assert [m["skipped_steps"] for m in lines] == [1] * 6
    assert lines[0]["grad_norm"] is None or lines[0]["grad_norm"] != lines[0]["grad_norm"]
    assert losses[-1] < losses[1]
    # The skipped step leaves the schedule where it is, on every path (fp32 ZeRO-0's advanced it): the first two
    # steps train at the first step's rate, and the checkpoint has counted 5 scheduler steps in 6.
    assert lines[0]["lr"] == lines[1]["lr"] < lines[2]["lr"]
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["lr_scheduler"]["last_epoch"] == 5


@pytest.mark.parametrize("sets", NONFINITE_PATHS[:2], ids=["fp32-zero0", "fp32-zero1"])
def test_many_nonfinite_steps_in_a_row_stop_the_run(single_process, tmp_path, nan_loss_on_calls, sets):
    """Also across a resume: the count in a row is saved (it began at 0 again, so a run requeued more often
    than train.max_skipped_steps steps never stopped)."""
    nan_loss_on_calls.update(range(5, 1000))  # (from step 2 on)
    with pytest.raises(RuntimeError, match="stopping at step 4: the last 3 steps had non-finite loss or gradients"):
        run(str(tmp_path / "a"), "train.max_skipped_steps=3", *sets)
    nan_loss_on_calls.calls[0] = 0  # (the second run counts its calls from 1)
    run(str(tmp_path / "b"), "train.max_skipped_steps=3", *sets, steps=3)  # (2 skipped in a row, saved at 3)
    with pytest.raises(RuntimeError, match="stopping at step 4: the last 3 steps had non-finite loss or gradients"):
        run(str(tmp_path / "b"), "train.max_skipped_steps=3", *sets)


def test_layout_that_does_not_fit_the_world_is_refused_before_work(single_process, tmp_path):
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="world size 1 must be divisible by parallel.tp x parallel.pp = 2"):
        run(str(tmp_path), "parallel.tp=2")
    assert not (tmp_path / "config.yaml").exists()


def test_a_rendezvous_port_is_free_and_outside_the_ephemeral_range(monkeypatch):
    """free_port: a port nothing listens on, below the kernel's ephemeral range (where another process's outgoing
    connection could take it before the rendezvous binds it); from the range only when none below is free."""
    import socket

    from model_parallel import state

    port = state.free_port()
    assert 20000 <= port < state._ephemeral_ports_start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    monkeypatch.setattr(state, "_ephemeral_ports_start", lambda: 20000)  # (nothing below to take)
    assert state.free_port() >= 1024


def test_consecutive_free_ports_skip_a_range_with_any_port_in_use_and_close_their_sockets(monkeypatch):
    """free_port(3) (the local SLURM cluster's controller and nodes): the first of 3 ports that all bind, below the
    ephemeral range (the cluster's took them up to 40000, inside it); every socket it opened is closed; none free
    below the range: an error, not ports from it."""
    import socket

    from model_parallel import state

    opened, busy, offered = [], {30002}, []

    class FakeSocket:
        def __init__(self):
            self.closed = False
            opened.append(self)

        def bind(self, address):
            if address[1] in busy:
                raise OSError("address in use")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.closed = True

    def sample(ports, k):
        offered.append(ports)
        return [30000, 31000][:k]

    monkeypatch.setattr(socket, "socket", FakeSocket)
    monkeypatch.setattr(state.random, "sample", sample)
    monkeypatch.setattr(state, "_ephemeral_ports_start", lambda: 32768)
    assert state.free_port(3) == 31000  # (30000-30002: the third is in use)
    assert opened and all(s.closed for s in opened) and offered[0] == range(20000, 32766)
    busy.update(range(20000, 50000))
    with pytest.raises(RuntimeError, match="no 3 consecutive free ports below the ephemeral range"):
        state.free_port(3)


def test_slurm_environment(monkeypatch):
    from model_parallel import state

    fake = subprocess.CompletedProcess([], 0, stdout="gpu-a17\ngpu-a18\n")
    monkeypatch.setattr(state.subprocess, "run", lambda *a, **k: fake)
    # What a batch or salloc shell of a two-node, 16-task allocation sees (on a real cluster, slurm/local_cluster.py)
    shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
             "SLURM_JOB_ID": "4242"}
    assert state.slurm_environment(shell) is None  # a command run there is one process, not rank 0 of 16
    # ... and a task of an 8-task step in it
    task = {**shell, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "8"}
    port = 10000 + (4242 * 997 + 3) % 22000  # (as slurm/train.sbatch derives its port)
    assert state.slurm_environment(task) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                             "MASTER_ADDR": "gpu-a17", "MASTER_PORT": str(port)}
    assert state.slurm_environment({**task, "MASTER_PORT": "6000"})["MASTER_PORT"] == "6000"
    assert state.slurm_environment({**task, "MASTER_ADDR": "login-3"})["MASTER_ADDR"] == "login-3"
    no_nodes = {k: v for k, v in task.items() if k != "SLURM_JOB_NODELIST"}
    assert state.slurm_environment(no_nodes) is None


def test_slurm_environment_asks_scontrol_only_for_a_missing_master_and_names_a_malformed_variable(monkeypatch):
    """A container (pyxis, apptainer) started by srun may have no scontrol: with MASTER_ADDR exported by the batch
    script it is not needed (it was asked anyway: FileNotFoundError). SLURM's variables are read as numbers with
    errors that name them (int() named none)."""
    from model_parallel import state

    def no_scontrol(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "scontrol")

    monkeypatch.setattr(state.subprocess, "run", no_scontrol)
    task = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
            "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    found = state.slurm_environment({**task, "MASTER_ADDR": "gpu-a17"})
    assert found["MASTER_ADDR"] == "gpu-a17" and found["RANK"] == "1" and found["WORLD_SIZE"] == "2"
    with pytest.raises(state.LaunchError, match=r"SLURM_JOB_NODELIST='gpu-a\[17-18\]'.*scontrol.*export MASTER_ADDR"):
        state.slurm_environment(task)
    fake = subprocess.CompletedProcess([], 1, stdout="", stderr="slurm_load_node error: Unable to contact slurm\n")
    monkeypatch.setattr(state.subprocess, "run", lambda *a, **k: fake)
    with pytest.raises(state.LaunchError, match="Unable to contact slurm.*export MASTER_ADDR"):
        state.slurm_environment(task)
    for key, value, expected in [("SLURM_LOCALID", "", "SLURM_LOCALID='': expected a whole number >= 0"),
                                 ("SLURM_JOB_ID", "x", "SLURM_JOB_ID='x': expected a whole number >= 0"),
                                 ("SLURM_PROCID", "2", ("SLURM_PROCID='2': expected a number below "
                                                        "SLURM_STEP_NUM_TASKS=2")),
                                 ("SLURM_STEP_NUM_TASKS", "0", ("SLURM_STEP_NUM_TASKS='0': expected a whole number "
                                                                ">= 1"))]:
        with pytest.raises(state.LaunchError, match=re.escape(expected)):
            state.slurm_environment({**task, "MASTER_ADDR": "gpu-a17", key: value})


def test_a_run_resumed_after_a_skipped_step_equals_the_uninterrupted_one(single_process, tmp_path, nan_loss_on_calls):
    """Step 2 non-finite (calls 5-8: its 4 micro-batches), saved at 3, resumed to 6: the losses of the run that
    went through (Adam's step count restored as the optimizer's, not the trainer's: a skipped step did not
    update), and the skipped step counted in the checkpoint and the metrics of both."""
    nan_loss_on_calls.update(range(5, 9))
    whole = run(str(tmp_path / "whole"))
    nan_loss_on_calls.calls[0] = 0
    first = run(str(tmp_path / "cut"), steps=3)
    second = run(str(tmp_path / "cut"))
    assert whole[1] != whole[1] and first + second == pytest.approx(whole, rel=1e-6, nan_ok=True)
    for folder in ("whole", "cut"):
        state = json.loads((tmp_path / folder / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
        assert state["skipped_steps"] == 1 and state["optimizer_steps"] == 5, folder
        assert metrics(tmp_path / folder)[-1]["skipped_steps"] == 1


def test_steps_skipped_by_config_equal_steps_skipped_as_nonfinite(single_process, tmp_path, nan_loss_on_calls,
                                                                   log_lines):
    """train.skip_steps=3-4 (Megatron-LM's --iterations-to-skip) reads past the batches of steps 3 and 4 untrained:
    the run equals one whose steps 3 and 4 had non-finite losses (calls 9-16; the guard holds the weights and the LR
    schedule there) in every other step's loss, LR and held-out loss, and in the optimizer's step count; the
    skipped steps are neither logged nor counted as non-finite. Cut inside the range (saved at step 3) and
    resumed, it is the same run, and each segment says what it skips. Neither kind of skipped step moves the
    moving average of the weights (train.ema_decay): the three runs end with the same one."""
    every_6 = ("train.eval_interval=6", "train.ema_decay=0.5")  # (no held-out loss between the poisoned calls)
    nan_loss_on_calls.update(range(9, 17))
    guarded = run(str(tmp_path / "guarded"), *every_6)
    nan_loss_on_calls.clear()
    skipping = ("train.skip_steps=3-4", *every_6)
    skipped = run(str(tmp_path / "skipped"), *skipping)
    assert [x != x for x in skipped] == [False, False, True, True, False, False]
    assert skipped == pytest.approx(guarded, rel=1e-6, nan_ok=True)
    cut = run(str(tmp_path / "cut"), *skipping, steps=3) + run(str(tmp_path / "cut"), *skipping)
    assert cut == pytest.approx(skipped, rel=1e-6, nan_ok=True)
    assert "steps 3-4: their global batches are read past without training (train.skip_steps=3-4)" in log_lines
    assert "step 4: its global batch is read past without training (train.skip_steps=3-4)" in log_lines
    rows, reference = metrics(tmp_path / "skipped"), {m["step"]: m for m in metrics(tmp_path / "guarded")}
    assert [m["step"] for m in rows] == [1, 2, 5, 6]
    assert [m["step"] for m in metrics(tmp_path / "cut")] == [1, 2, 3, 5, 6]  # (3: its first segment's final losses)
    for m in rows:
        assert m["lr"] == reference[m["step"]]["lr"] and m["consumed_samples"] == 8 * m["step"]
    assert rows[-1]["valid_loss"] == pytest.approx(reference[6]["valid_loss"], rel=1e-6)
    assert rows[-1]["skipped_steps"] == 0 and reference[6]["skipped_steps"] == 2
    for folder in ("guarded", "skipped", "cut"):
        state = json.loads((tmp_path / folder / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
        assert state["optimizer_steps"] == 4 and state["consumed_samples"] == 48, folder
    import torch
    from safetensors.torch import load_file

    from training.export import export

    averages = {folder: load_file(str(export(tmp_path / folder, out=tmp_path / f"ema_{folder}", ema=True)
                                      / "model.safetensors")) for folder in ("guarded", "skipped", "cut")}
    for name, average in averages["guarded"].items():
        for folder in ("skipped", "cut"):
            torch.testing.assert_close(averages[folder][name], average, rtol=1e-5, atol=1e-6, msg=f"{folder} {name}")


def test_a_run_whose_last_step_is_read_past_still_measures_its_final_weights(single_process, tmp_path):
    """The last step read past (train.skip_steps) still gets the run's final held-out losses (a sweep reads the
    last one; it was step 3's alone), in a row without the rates of a step not trained: the weights and their
    average are step 3's, so are the losses."""
    run(str(tmp_path), "train.skip_steps=4", "train.ema_decay=0.5", steps=4)
    rows = metrics(tmp_path)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert set(rows[-1]) == {"step", "valid_loss", "ema_valid_loss", "consumed_samples"}
    assert rows[-1]["consumed_samples"] == 32
    for key in ("valid_loss", "ema_valid_loss"):
        assert rows[-1][key] == pytest.approx(rows[2][key], rel=1e-6)
    # the last step trained logs its row though no log step (log_interval) is due there: the run's last interval
    run(str(tmp_path / "late"), "train.skip_steps=5", "train.log_interval=3", "train.eval_interval=0", steps=5)
    assert [m["step"] for m in metrics(tmp_path / "late")] == [3, 4]
    from training.trainer import last_trained_step

    assert [last_trained_step(6, spans) for spans in ([], [(5, 6)], [(3, 4), (5, 6)], [(2, 9), (5, 6)], [(8, 9)])] == [
        6, 4, 2, 1, 6]


def test_steps_skipped_apart_do_not_stop_the_run(single_process, tmp_path, nan_loss_on_calls):
    """train.max_skipped_steps counts skipped steps in a row: a good step between two resets the count."""
    nan_loss_on_calls.update({*range(1, 5), *range(9, 13)})  # steps 1 and 3
    losses = run(str(tmp_path), "train.max_skipped_steps=2", "train.eval_interval=0")
    assert [x != x for x in losses] == [True, False, True, False, False, False]
    assert metrics(tmp_path)[-1]["skipped_steps"] == 2


def test_the_nonfinite_guard_counts_skips_in_a_row_and_skips_fp32_zero0_steps_itself(single_process):
    """NonFiniteGuard without an engine: behind a DeepSpeed wrapper (which has `overflow` and skips by itself) it
    counts the engine's skipped steps, and `consecutive` restarts at a good step; without one (fp32 ZeRO-0) it
    leaves the parameters alone on a non-finite gradient (any parameter of any group), says so in `overflow`, and
    steps on finite ones.
    NonFiniteStop stops at train.max_skipped_steps in a row, not before."""
    import types

    import torch

    from training.deepspeed_glue import NonFiniteGuard, NonFiniteStop

    engine = types.SimpleNamespace(skipped_steps=0, optimizer=types.SimpleNamespace(overflow=False))
    guard, seen = NonFiniteGuard(engine), []
    for skips in (0, 1, 2, 2, 3):
        engine.skipped_steps = skips
        guard.step_done()
        seen.append((guard.skipped, guard.consecutive))
    assert seen == [(0, 0), (1, 1), (2, 2), (2, 0), (3, 1)]

    w, u, v = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    optimizer = torch.optim.SGD([{"params": [u, v]}, {"params": [w]}], lr=1.0)
    engine = types.SimpleNamespace(skipped_steps=0, optimizer=optimizer)
    guard = NonFiniteGuard(engine)
    u.grad, v.grad, w.grad = torch.ones(2), torch.ones(2), torch.tensor([1.0, float("nan")])
    optimizer.step()
    guard.step_done()
    assert (all(torch.equal(p.detach(), torch.ones(2)) for p in (u, v, w)) and optimizer.overflow
            and (guard.skipped, guard.consecutive) == (1, 1))
    w.grad, v.grad = torch.zeros(2), torch.tensor([float("inf"), 1.0])  # (any parameter of a group, not its first)
    optimizer.step()
    guard.step_done()
    assert torch.equal(u.detach(), torch.ones(2)) and (guard.skipped, guard.consecutive) == (2, 2)
    u.grad = v.grad = None
    w.grad = torch.tensor([1.0, 1.0])
    optimizer.step()
    guard.step_done()
    assert torch.equal(w.detach(), torch.zeros(2)) and not optimizer.overflow
    assert (guard.skipped, guard.consecutive) == (2, 0)

    NonFiniteStop.check(7, 2, 3)
    with pytest.raises(NonFiniteStop, match=r"stopping at step 7: the last 3 steps .* \(train.max_skipped_steps=3\)"):
        NonFiniteStop.check(7, 3, 3)
