"""SLURM jobs on a real local cluster (a controller and two emulated nodes): training across 2 nodes,
requeue and preemption mid-run resuming to the uninterrupted result, an image tokenizer's training preempted
and resumed, a pre-tokenization job array.

The nodes have no GPUs, so every job overrides the scripts' GPU and CPU requests the way a user does on
CPU nodes (sbatch --gpus-per-node=0 --cpus-per-task=N, DEVICE=cpu for training, evaluation and pre-tokenization);
tests/test_sbatch.py checks the scripts' GPU defaults without a cluster. The last tests check LocalCluster's own logic
(its config, the commands it runs, /etc/hosts, job steps, waiting) without a cluster: the commands, the clock and
/etc/hosts are stand-ins there, so they run anywhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model_parallel.state import child_environment
from slurm import local_cluster as lc
from slurm.local_cluster import CPU_NODE_OPTIONS, CPUS_PER_NODE, HOSTS_LINE, PACKAGES, LocalCluster, available

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(Path(sys.executable))
ENV = {"PYTHON": PYTHON, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DEVICE": "cpu",
       "PYTHONFAULTHANDLER": "1"}  # (a job's process that crashes prints every thread's stack in its log: a rare
# SIGABRT at the end of the VQ job's segments was never caught with one)
TRAIN = ["--set", "train.steps=100", "train.save_interval=10", "train.log_interval=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if available() is not None:
        pytest.skip(f"no local SLURM cluster: {available()}")
    c = LocalCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def final_loss(run_dir: Path) -> tuple[int, float]:
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return last["step"], last["loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[int, float, Path]:
    """The same training (2 processes, DP=2) without SLURM and without interruption: (step, loss, run dir)."""
    run_dir = tmp_path_factory.mktemp("plain")
    subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "training.train", "--config", "configs/train/debug.yaml", "--run-dir", str(run_dir), *TRAIN],
                   cwd=ROOT, env=child_environment(**ENV), check=True, capture_output=True)
    return (*final_loss(run_dir), run_dir)


def wait_for_step(run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} did not reach step {step}")


def test_gpu_request_is_refused_on_nodes_without_gpus(cluster, tmp_path):
    """Why the jobs below override the scripts' defaults: SLURM refuses GPUs that no node has."""
    with pytest.raises(subprocess.CalledProcessError) as refused:
        cluster.sbatch(["-N", "1", f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch", "configs/train/debug.yaml",
                        str(tmp_path / "run")], cwd=ROOT, env=ENV)
    assert "gres" in refused.value.stderr.lower()


def test_two_node_training_job_preempted_then_requeued(cluster, uninterrupted, tmp_path):
    """Interrupted twice on 2 nodes, both ways a cluster does it, the job ends where the uninterrupted
    one-machine run does: USR1 (what --signal=B:USR1@... sends before the time limit: the trainers save, the
    script requeues the job), then `scontrol requeue` (SLURM's SIGTERM: the trainers save before they go).
    A job that is never interrupted is the first part of this one: no case of its own."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch(["-N", "2", *CPU_NODE_OPTIONS, f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch",
                          "configs/train/debug.yaml", str(run_dir), *TRAIN], cwd=ROOT, env=ENV)

    def log() -> str:
        return "".join(p.read_text() for p in tmp_path.glob("job-*.out"))

    def interrupt_at(step: int, command: list[str], restart: int) -> None:
        wait_for_step(run_dir, step)
        cluster.run(*command, job)
        deadline = time.time() + 120  # the job goes back to the queue, then runs again
        while f"restart {restart}" not in log():
            assert time.time() < deadline, f"the job was not restarted after {command}"
            time.sleep(1)

    interrupt_at(20, ["scancel", "--signal=USR1", "--batch"], 1)
    preempted = log()  # torchrun saw the trainers exit 0: no failure report; rank 0 alone says why
    assert "requeueing job" in preempted and "ChildFailedError" not in preempted, preempted[-3000:]
    assert preempted.count("REQUEUE written") == 1, preempted[-3000:]
    interrupt_at(40, ["scontrol", "requeue"], 2)
    state = cluster.wait(job, timeout=600)
    assert state == "COMPLETED", log()[-3000:]
    requeued = log()[len(preempted):]  # SLURM's SIGTERM reached every process; the trainers saved before they went
    assert "stopped by SIGTERM" in requeued and "REQUEUE written" in requeued, requeued[-3000:]
    assert log().count("2 node(s) x 1, device cpu") == 3 and log().count("resumed from") >= 2
    assert final_loss(run_dir) == (100, pytest.approx(uninterrupted[1], rel=1e-5))
    assert not (run_dir / "REQUEUE").exists()


def test_image_tokenizer_job_preempted_by_usr1_resumes_and_exports(cluster, tmp_path):
    """TRAINER=vq.train: the same script runs the ViT-VQGAN's training on 2 nodes (DDP); USR1 before the time
    limit makes both ranks save at the same step, the job is requeued and the rerun resumes there, logs every
    step once and exports. (That a resumed VQ run equals the uninterrupted one: tests/test_vq.py.)"""
    from tests import laion_fixtures as lf

    lf.write_tar(tmp_path / "photos.tar", [(k, {"jpg": j, "txt": c.encode()}) for k, j, c in lf.coco_mini(128)])
    run_dir, steps = tmp_path / "run", 600  # ~12 ms a step here: seconds left for the signal to arrive
    job = cluster.sbatch(["-N", "2", *CPU_NODE_OPTIONS, f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch",
                          "configs/vq/vit-vqgan-small.yaml", str(run_dir), "--data", str(tmp_path / "photos.tar"),
                          "--set", "model.layers=1", "model.width=64", "model.image_size=32", "model.code_dim=8",
                          "model.codebook_size=32", "loss.perceptual=0", "loss.adversarial=0", "train.batch_size=4",
                          "train.resize=64", "train.data_workers=0", f"train.steps={steps}", "train.log_interval=1",
                          "train.save_interval=100000", "train.eval_interval=100000"],
                         cwd=ROOT, env={**ENV, "TRAINER": "vq.train"})
    wait_for_step(run_dir, 10)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    state = cluster.wait(job, timeout=600)
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert state == "COMPLETED", log[-3000:]
    assert "vq.train on 2 node(s) x 1, device cpu" in log and "restart 1" in log and "requeueing job" in log
    stopped = int(log.split("stopped by ")[1].split(" after step ")[1].split(";")[0])
    assert 10 <= stopped < steps and f"at step {stopped}" in log  # ("resumed from ... at step N")
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    assert (run_dir / "export.pt").is_file() and "ChildFailedError" not in log


def test_pretokenize_array_equals_one_run(cluster, tmp_path):
    from data_pipeline.laion import expand_shards
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from tests import laion_fixtures as lf
    from tests.test_data_pipeline import FILTERS
    from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

    for i in range(6):
        lf.write_tar(tmp_path / "laion" / f"{i:05d}.tar", lf.synthetic_samples(6, offset=10 * i))
    torch.manual_seed(0)
    save_image_tokenizer(ConvVQ(image_size=64, downsample=3, channels=16, code_dim=8, codebook_size=64),
                         tmp_path / "vq.pt")
    captions = [f"a {c} {s} on a white background" for c in lf.COLOURS for s in lf.SHAPES] * 20
    train_sentencepiece(captions, 60, tmp_path / "spm.model")
    pattern = str(tmp_path / "laion" / "{00000..00005}.tar")
    pretokenize(expand_shards(pattern), tmp_path / "local", load_image_tokenizer(tmp_path / "vq.pt"),
                TextTokenizer(tmp_path / "spm.model", 16), FILTERS)
    job = cluster.sbatch(["--array=0-3", *CPU_NODE_OPTIONS, f"--output={tmp_path}/array-%A_%a.out",
                          "slurm/pretokenize.sbatch", pattern, str(tmp_path / "array"), str(tmp_path / "vq.pt"),
                          str(tmp_path / "spm.model"), "--text-len", "16", "--min-size", "16", "--max-punsafe", "0.5"],
                         cwd=ROOT, env=ENV)
    deadline = time.time() + 300
    while cluster.run("squeue", "-h", "-j", job, check=False).strip():
        assert time.time() < deadline, "array job did not finish"
        time.sleep(1)
    for name in [f"{i:05d}" for i in range(6)]:
        assert (tmp_path / "array" / f"{name}.bin").read_bytes() == (tmp_path / "local" / f"{name}.bin").read_bytes()
    assert json.loads((tmp_path / "array" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "local" / "manifest.json").read_text())


def test_sweep_submits_runs_and_collects_table_and_plots(cluster, tmp_path):
    """`slurm.sweep submit` on the cluster: the grid's one combination that splits (TP=2 needs both nodes'
    processes) runs, and `collect` tabulates and plots what its job wrote. (The grid and the table from several
    runs: tests/test_sweep.py, without a cluster.)"""
    from slurm.sweep import collect

    out = tmp_path / "sweep"
    env = child_environment(**ENV, SLURM_CONF=str(cluster.conf))
    subprocess.run([PYTHON, "-m", "slurm.sweep", "submit", "--out", str(out), "--config", "configs/train/debug.yaml",
                    "--models", "parti-debug", "--nodes", "1,2", "--layouts", "tp2pp1z1", "--steps", "6",
                    "--gpus-per-node", "0", f"--sbatch-args=--cpus-per-task={CPUS_PER_NODE}"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    jobs = json.loads((out / "jobs.json").read_text())
    assert [job["name"] for job in jobs] == ["parti-debug-n2-tp2pp1z1"]  # TP=2 does not fit one node of one process
    assert cluster.wait(jobs[0]["job_id"], timeout=600) == "COMPLETED", \
        (out / f"{jobs[0]['name']}.out").read_text()[-2000:]
    (row,) = collect(out)
    assert (row["run"], row["gpus"], row["tp"], row["dp"], row["zero"], row["steps"]) == \
        ("parti-debug-n2-tp2pp1z1", 2, 2, 1, 1, 6)
    assert row["samples_per_s"] > 0 and row["mem_gb"] > 0
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("run,model,gpus,tp,pp,dp,zero,samples_per_s")
    for png in ("throughput.png", "memory.png", "loss_vs_compute.png"):
        assert (out / png).stat().st_size > 10_000


def test_two_node_eval_job_equals_one_local_run(cluster, uninterrupted, tmp_path):
    from data_pipeline.text_tokenizer import train_sentencepiece
    from vq.tokenizer import ConvVQ, save_image_tokenizer

    env = child_environment(**ENV)
    subprocess.run([PYTHON, "-m", "training.export", "--run-dir", str(uninterrupted[2]),
                    "--out", str(tmp_path / "export")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    torch.manual_seed(0)
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64),
                         tmp_path / "vq.pt")
    prompts = ["a red circle", "a blue square", "two green cats", "a kitchen", "a dog", "the sky at night"]
    train_sentencepiece(prompts * 40, 40, tmp_path / "spm.model")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    files = {"checkpoint": tmp_path / "export", "vq": tmp_path / "vq.pt", "text_tokenizer": tmp_path / "spm.model"}
    subprocess.run([PYTHON, "-m", "evaluation.generate", *[f"--{k.replace('_', '-')}={v}" for k, v in files.items()],
                    f"--prompts={tmp_path / 'prompts.txt'}",
                    f"--out={tmp_path / 'local'}", "--samples-per-prompt=2", "--guidance-scale=1.2", "--top-k=16"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    job = cluster.sbatch(["-N", "2", *CPU_NODE_OPTIONS, f"--output={tmp_path}/eval-%j.out", "slurm/eval.sbatch",
                          "configs/eval/partiprompts.yaml",
                          "--set", *[f"model.{k}={v}" for k, v in files.items()],
                          "benchmark.name=prompts", f"benchmark.prompts={tmp_path / 'prompts.txt'}",
                          f"benchmark.out={tmp_path / 'slurm'}", "sampling.samples_per_prompt=2", "sampling.keep=0",
                          "sampling.top_k=16"], cwd=ROOT, env=ENV)
    state = cluster.wait(job, timeout=300)
    assert state == "COMPLETED", "".join(p.read_text() for p in tmp_path.glob("eval-*.out"))[-3000:]
    local = sorted(p.name for p in (tmp_path / "local").glob("*.png"))
    assert len(local) == 12 and local == sorted(p.name for p in (tmp_path / "slurm" / "images").glob("*.png"))
    for name in local:  # two nodes, each a slice of the prompts: the same images as one process
        assert (tmp_path / "slurm" / "images" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert json.loads((tmp_path / "slurm" / "results.json").read_text())["prompts"] == 6


def test_stopping_one_local_cluster_leaves_another_running(cluster, tmp_path):
    """Two local clusters on one machine (two test sessions): stopping one kills its own job steps and leaves the
    other's jobs and the /etc/hosts line its nodes resolve through alone (it pkilled every slurmstepd). The other
    is started and stopped by hand (`python -m slurm.local_cluster start|stop ROOT`)."""
    ours = cluster.sbatch([*CPU_NODE_OPTIONS, f"--output={tmp_path}/ours-%j.out", "--wrap", "sleep 120"], cwd=tmp_path)
    with pytest.raises(SystemExit, match="2"):  # (an unknown action stopped the cluster)
        lc.main(["restart", str(tmp_path / "other")])
    lc.main(["start", str(tmp_path / "other")])
    other = LocalCluster(tmp_path / "other")  # (the same cluster: its folder names it)
    try:
        other.sbatch([*CPU_NODE_OPTIONS, f"--output={tmp_path}/other-%j.out", "--wrap", "sleep 120"], cwd=tmp_path)
        deadline = time.time() + 60
        while not (cluster.job_steps() and other.job_steps()) and time.time() < deadline:
            time.sleep(0.5)
        kept, killed = cluster.job_steps(), other.job_steps()
        assert kept and killed and not set(kept) & set(killed)
    finally:
        lc.main(["stop", str(tmp_path / "other")])
    time.sleep(1)

    def alive(pid: int) -> bool:  # (a killed process not yet reaped keeps its /proc entry, with an empty cmdline)
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"slurmstepd")
        except OSError:
            return False

    assert all(alive(pid) for pid in kept) and not any(alive(pid) for pid in killed)
    assert cluster.state(ours) == "RUNNING" and "n1 n2" in Path("/etc/hosts").read_text()
    cluster.run("scancel", ours)
    assert cluster.wait(ours, timeout=60) == "CANCELLED"


# --- LocalCluster without a cluster: FakeSlurm answers its commands; no daemon starts, /etc/hosts is a copy.

class FakeSlurm:
    """The SLURM commands (and pgrep, pkill, os.kill, the clock, /etc/hosts, /proc) LocalCluster uses. `calls`
    lists each command (a tuple), signal ("kill", pid, signal) and sleep ("sleep", s) in order; sinfo, squeue and
    scontrol answer their lists in turn (the last one for good); a command in `fail` exits 1."""

    def __init__(self, monkeypatch, tmp_path, sinfo=("idle\nidle\n",), squeue=("",), scontrol=("",), pgrep="",
                 fail=(), dead=()):
        self.calls, self.now, self.fail, self.dead = [], 1000.0, set(fail), set(dead)
        self.answers = {"sinfo": list(sinfo), "squeue": list(squeue), "scontrol": list(scontrol)}
        self.pgrep = pgrep
        self.hosts = tmp_path / "etc-hosts"
        self.hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost")  # (no newline at the end)
        self.proc = tmp_path / "proc"
        self.proc.mkdir()
        paths = {"/etc/hosts": self.hosts, "/proc": self.proc}
        monkeypatch.setattr(lc, "available", lambda: None)
        monkeypatch.setattr(lc, "ensure_installed", lambda: self.calls.append(("ensure_installed",)))
        monkeypatch.setattr(lc, "subprocess", type(subprocess)("subprocess"))
        lc.subprocess.run, lc.subprocess.CalledProcessError = self.run, subprocess.CalledProcessError
        monkeypatch.setattr(lc, "time", self)
        monkeypatch.setattr(lc, "Path", lambda p, *more: paths.get(str(p)) or Path(p, *more))
        monkeypatch.setattr(os, "kill", self.kill)

    def run(self, cmd, check=False, capture_output=False, text=False, **kwargs):
        self.calls.append(tuple(cmd))
        self.kwargs = kwargs
        if cmd[0] in self.fail:
            if check:
                raise subprocess.CalledProcessError(1, cmd, "", f"{cmd[0]}: error: it failed")
            return subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]}: error: it failed")
        out = {"sbatch": "42;partilocal\n", "pgrep": self.pgrep}.get(cmd[0], "")
        if cmd[0] in self.answers:
            answers = self.answers[cmd[0]]
            out = answers.pop(0) if len(answers) > 1 else answers[0]
        return subprocess.CompletedProcess(cmd, 0, out if text else out.encode(), "")

    def kill(self, pid, sig):
        self.calls.append(("kill", pid, sig))
        if pid in self.dead:
            raise ProcessLookupError(pid)

    def time(self):
        return self.now

    def sleep(self, seconds):
        assert self.now < 1000 + 3600, "waits for good"
        self.calls.append(("sleep", seconds))
        self.now += seconds

    def commands(self, name):
        return [c for c in self.calls if c[0] == name]


def test_config_gives_the_controller_and_each_node_a_port_of_their_own_and_keeps_files_under_the_root(tmp_path):
    lines = [dict(word.split("=", 1) for word in line.split()) for line in lc._config(tmp_path, 31000).splitlines()]
    settings = {k: v for line in lines if len(line) == 1 for k, v in line.items()}
    (nodes,) = [line for line in lines if "NodeName" in line]
    (partition,) = [line for line in lines if "PartitionName" in line]
    assert settings["SlurmctldPort"] == "31000" and nodes["Port"] == "[31001-31002]"  # the 3 ports free_port(3) gave
    assert nodes["NodeName"] == partition["Nodes"] == "n[1-2]" and HOSTS_LINE.split("#")[0].split()[1:] == ["n1", "n2"]
    assert nodes["CPUs"] == str(CPUS_PER_NODE) and partition["Default"] == "YES"
    assert settings["AuthInfo"] == "cred_expire=5"  # (a requeued job would wait 121 s by default)
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile",
                "SlurmdLogFile", "JobCompLoc"):
        assert settings[key].startswith(f"{tmp_path}/"), key
    assert settings["SlurmdPidFile"].endswith(".pid") and settings["SlurmctldPidFile"].endswith(".pid")  # (stop)


def test_start_writes_the_config_adds_the_hosts_line_once_and_waits_for_both_nodes_idle(monkeypatch, tmp_path):
    # ("idle*": idle but not responding, e.g. a slurmd that has not registered yet; it would take no job)
    fake = FakeSlurm(monkeypatch, tmp_path, sinfo=["", "idle\n", "idle\ndown*\n", "idle*\nidle\n", "idle\nidle\n"])
    before = fake.hosts.read_text()
    cluster = LocalCluster(tmp_path / "c", port=31000)
    assert cluster.start() is cluster
    conf = str(cluster.conf)
    assert fake.calls[0] == ("ensure_installed",)
    assert cluster.conf.read_text() == lc._config(cluster.root, 31000)
    assert all((cluster.root / d).is_dir() for d in ("state", "spool/n1", "spool/n2"))
    daemons = [c for c in fake.calls if c[0] in ("slurmctld", "slurmd")]
    assert daemons == [("slurmctld", "-f", conf, "-i"), ("slurmd", "-f", conf, "-N", "n1"),
                       ("slurmd", "-f", conf, "-N", "n2")]
    assert len(fake.commands("sinfo")) == 5  # until both nodes are idle and respond
    assert fake.hosts.read_text() == before + "\n" + HOSTS_LINE + "\n"
    LocalCluster(tmp_path / "other", port=32000).start()
    assert fake.hosts.read_text().count(HOSTS_LINE) == 1


def test_a_cluster_without_a_port_reserves_three_consecutive_ones(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(lc, "free_port", lambda count: asked.append(count) or 31000)
    assert LocalCluster(tmp_path).port == 31000 and asked == [3]  # (the controller's, then one per node)


def test_start_whose_nodes_never_come_up_stops_and_says_why(monkeypatch, tmp_path):
    fake = FakeSlurm(monkeypatch, tmp_path, sinfo=["down*\ndown*\n"])
    before = fake.hosts.read_text()
    cluster = LocalCluster(tmp_path / "c", port=31000)
    with pytest.raises(RuntimeError, match="did not become idle") as error:
        cluster.start()
    assert "down*" in str(error.value) and str(cluster.root) in str(error.value)
    assert ("pkill", "-KILL", "-f", str(cluster.conf)) in fake.calls
    assert fake.hosts.read_text().rstrip("\n") == before  # (the line it added is gone)


def test_stop_cancels_waits_for_the_queue_terms_then_kills_and_removes_the_hosts_line(monkeypatch, tmp_path):
    fake = FakeSlurm(monkeypatch, tmp_path, squeue=["7 R\n", "7 CG\n", ""], dead={222, 444})
    cluster = LocalCluster(tmp_path / "c", port=31000)
    cluster.root.mkdir()
    for name, text in [("slurmctld.pid", "111\n"), ("slurmd.n1.pid", "222\n"), ("slurmd.n2.pid", "")]:
        (cluster.root / name).write_text(text)  # (222 ended already; an empty pid file is skipped)
    monkeypatch.setattr(cluster, "job_steps", lambda: [333, 444])
    fake.hosts.write_text(f"127.0.0.1 localhost\n{HOSTS_LINE}\n10.0.0.1 db\n")
    cluster.stop()
    assert fake.calls[0] == ("scancel", "--full", "-u", "root") and len(fake.commands("squeue")) == 3
    kills = [c for c in fake.calls if c[0] in ("kill", "pkill")]
    assert sorted(kills[:2]) == [("kill", 111, signal.SIGTERM), ("kill", 222, signal.SIGTERM)]
    assert kills[2:] == [("pkill", "-KILL", "-f", str(cluster.conf)), ("kill", 333, signal.SIGKILL),
                         ("kill", 444, signal.SIGKILL)]
    term, pkill = fake.calls.index(kills[1]), fake.calls.index(kills[2])
    assert any(c[0] == "sleep" for c in fake.calls[term:pkill])  # the daemons get a moment to stop by themselves
    assert fake.hosts.read_text() == "127.0.0.1 localhost\n10.0.0.1 db\n"


def test_stop_gives_up_on_a_queue_that_never_empties_and_keeps_the_hosts_line_another_cluster_uses(
        monkeypatch, tmp_path):
    fake = FakeSlurm(monkeypatch, tmp_path, squeue=["7 R\n"], pgrep="4321\n")
    cluster = LocalCluster(tmp_path / "c", port=31000)
    cluster.root.mkdir()
    monkeypatch.setattr(cluster, "job_steps", list)
    fake.hosts.write_text(f"127.0.0.1 localhost\n{HOSTS_LINE}\n")
    cluster.stop()
    assert ("pkill", "-KILL", "-f", str(cluster.conf)) in fake.calls
    assert len(fake.commands("squeue")) <= 40  # (it waits some 15 s, of the fake clock)
    assert fake.commands("pgrep") == [("pgrep", "-x", "slurmd")] and HOSTS_LINE in fake.hosts.read_text()


def test_job_steps_are_this_clusters_slurmstepds_by_working_folder_or_open_file(monkeypatch, tmp_path):
    fake = FakeSlurm(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    cluster, other = LocalCluster("ours", port=31000), tmp_path / "other"  # (a relative root)
    ours = tmp_path / "ours"

    def process(pid, cmdline, cwd=None, fds=()):
        (fake.proc / str(pid) / "fd").mkdir(parents=True)
        (fake.proc / str(pid) / "cmdline").write_bytes(cmdline)
        if cwd:
            (fake.proc / str(pid) / "cwd").symlink_to(cwd)
        for i, target in enumerate(fds):
            (fake.proc / str(pid) / "fd" / str(i)).symlink_to(target)

    stepd = b"slurmstepd: [1.batch]\x00"
    process(101, stepd, cwd=ours / "spool" / "n1")
    process(102, stepd, cwd="/", fds=["/dev/null", "socket:[1234]", ours / "slurmd.n1.log"])
    process(103, stepd, cwd=other / "spool" / "n1", fds=[other / "slurmd.n1.log"])  # another cluster's
    process(104, b"sleep\x00120\x00", cwd=ours)  # the job itself, not a step
    process(106, b"slurmd\x00-f\x00" + bytes(ours / "slurm.conf") + b"\x00-N\x00n1\x00", cwd="/",
            fds=[ours / "slurmd.n1.log"])  # nor a daemon
    process(105, stepd, fds=[ours / "slurmd.n2.log"])  # ended meanwhile: no cwd to read
    (fake.proc / "uptime").write_text("1.0 1.0\n")
    assert sorted(cluster.job_steps()) == [101, 102]


def test_sbatch_returns_the_job_id_and_passes_the_callers_environment_over_the_clusters(monkeypatch, tmp_path):
    monkeypatch.setenv("DEVICE", "cuda")
    fake = FakeSlurm(monkeypatch, tmp_path)
    cluster = LocalCluster(tmp_path / "c", port=31000)
    assert cluster.sbatch(["-N", "2", "job.sbatch"], cwd=tmp_path, env={"DEVICE": "cpu"}) == "42"
    assert fake.calls == [("sbatch", "--parsable", "-N", "2", "job.sbatch")] and fake.kwargs["cwd"] == tmp_path
    assert fake.kwargs["env"]["DEVICE"] == "cpu" and fake.kwargs["env"]["SLURM_CONF"] == str(cluster.conf)


def test_state_reads_the_job_state_from_scontrols_line_and_unknown_without_one(monkeypatch, tmp_path):
    line = ("JobId=7 JobName=wrap UserId=root(0) Priority=1 JobState=RUNNING Reason=None Dependency=(null) "
            "NumNodes=1 TRES=cpu=2,mem=8000M,node=1,billing=2 Command=(null) WorkDir=/tmp\n")
    fake = FakeSlurm(monkeypatch, tmp_path, scontrol=[line])
    cluster = LocalCluster(tmp_path / "c", port=31000)
    assert cluster.state("7") == "RUNNING" and fake.calls == [("scontrol", "show", "job", "7", "-o")]
    fake.fail.add("scontrol")  # (a job SLURM no longer knows: exit 1, nothing on stdout)
    assert cluster.state("8") == "UNKNOWN"


def test_state_of_an_array_job_is_final_only_once_every_task_is_and_then_says_whether_any_did_not_complete(
        monkeypatch, tmp_path):
    """scontrol shows an array job as one record per task (the pending ones as one record): the job is done when
    the last of them is, and did not complete when any one did not."""
    def tasks(*states: str) -> str:
        return "".join(f"JobId={8 + i} ArrayJobId=7 ArrayTaskId={i} JobState={s} Reason=None\n"
                       for i, s in enumerate(states))

    answers = [tasks("COMPLETED", "RUNNING", "PENDING"), tasks("FAILED", "COMPLETED", "RUNNING"),
               tasks("COMPLETED", "FAILED", "COMPLETED"), tasks("COMPLETED", "COMPLETED", "COMPLETED")]
    fake = FakeSlurm(monkeypatch, tmp_path, scontrol=answers)
    cluster = LocalCluster(tmp_path / "c", port=31000)
    assert [cluster.state("7") for _ in answers] == ["RUNNING", "RUNNING", "FAILED", "COMPLETED"]
    fake.answers["scontrol"] = [tasks("RUNNING", "COMPLETED"), tasks("CANCELLED", "COMPLETED")]
    assert cluster.wait("7") == "CANCELLED" and len(fake.commands("sleep")) == 1  # (not the last task's COMPLETED)


@pytest.mark.parametrize("final", ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
                                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"])
def test_wait_returns_the_first_final_state(monkeypatch, tmp_path, final):
    fake = FakeSlurm(monkeypatch, tmp_path)
    cluster = LocalCluster(tmp_path / "c", port=31000)
    states = iter(["PENDING", "RUNNING", "COMPLETING", final, "UNKNOWN"])
    monkeypatch.setattr(cluster, "state", lambda job: next(states))
    assert cluster.wait("7") == final and len(fake.commands("sleep")) == 3


def test_wait_times_out_naming_the_job_and_its_state(monkeypatch, tmp_path):
    fake = FakeSlurm(monkeypatch, tmp_path)
    cluster = LocalCluster(tmp_path / "c", port=31000)
    monkeypatch.setattr(cluster, "state", lambda job: "PENDING")
    with pytest.raises(TimeoutError, match="job 7 still PENDING after 30 s"):
        cluster.wait("7", timeout=30)
    assert 25 <= len(fake.commands("sleep")) <= 31  # (the fake clock: about one look a second)


def test_with_block_starts_the_cluster_and_stops_it_on_the_way_out_even_on_error(monkeypatch, tmp_path):
    FakeSlurm(monkeypatch, tmp_path)
    cluster, events = LocalCluster(tmp_path / "c", port=31000), []
    monkeypatch.setattr(cluster, "start", lambda: events.append("start") or cluster)
    monkeypatch.setattr(cluster, "stop", lambda: events.append("stop"))
    with pytest.raises(KeyError), cluster as started:
        assert started is cluster
        raise KeyError("in the block")
    assert events == ["start", "stop"]


def test_available_and_ensure_installed(monkeypatch):
    installed = {"apt-get"}
    monkeypatch.setattr(lc.shutil, "which", lambda name: f"/usr/bin/{name}" if name in installed else None)
    monkeypatch.setattr(lc.os, "geteuid", lambda: 1000)
    assert "root" in available()
    monkeypatch.setattr(lc.os, "geteuid", lambda: 0)
    assert available() is None
    installed.clear()
    assert "not installed" in available()
    installed.add("slurmctld")  # (what ensure_installed needs besides it is missing, with nothing to install it)
    assert "slurmd, sbatch not installed" in available()
    installed.update({"slurmd", "sbatch"})
    assert available() is None
    installed.clear()
    runs, apt_says = [], {}

    def run(cmd, **kw):
        runs.append((cmd, kw["env"]["DEBIAN_FRONTEND"]))
        return subprocess.CompletedProcess(cmd, 100 if cmd[1] in apt_says else 0, "", apt_says.get(cmd[1], ""))

    monkeypatch.setattr(lc.subprocess, "run", run)
    lc.ensure_installed()
    assert [cmd[:2] for cmd, _ in runs] == [["apt-get", "update"], ["apt-get", "install"]]
    assert runs[1][0][-len(PACKAGES):] == PACKAGES and "-y" in runs[1][0] and runs[1][1] == "noninteractive"
    runs.clear()
    installed.update({"slurmctld", "apt-get"})  # (slurmd missing)
    lc.ensure_installed()
    assert len(runs) == 2
    runs.clear()
    apt_says["install"] = "E: Unable to locate package slurmctld\n"
    with pytest.raises(RuntimeError, match="apt-get install failed .*: E: Unable to locate package slurmctld$"):
        lc.ensure_installed()
    runs.clear()
    installed.update({"slurmctld", "slurmd", "sbatch"})
    lc.ensure_installed()
    assert runs == []


def test_start_whose_daemon_fails_stops_what_it_started_and_shows_why(monkeypatch, tmp_path):
    """slurmctld daemonizes: when a slurmd then fails, start stops it again (and takes the hosts line back) as
    when the nodes never come up, and says what the daemon said."""
    fake = FakeSlurm(monkeypatch, tmp_path, fail={"slurmd"})
    before = fake.hosts.read_text()
    cluster = LocalCluster(tmp_path / "c", port=31000)
    with pytest.raises(RuntimeError, match="slurmd: error: it failed") as error:
        cluster.start()
    assert str(cluster.root) in str(error.value)
    assert ("pkill", "-KILL", "-f", str(cluster.conf)) in fake.calls
    assert fake.hosts.read_text().rstrip("\n") == before


def test_a_relative_root_is_made_absolute_for_the_daemons_and_commands_run_elsewhere(monkeypatch, tmp_path):
    """SLURM_CONF and the config's paths are read by sbatch in the caller's cwd and by daemons that chdir."""
    monkeypatch.chdir(tmp_path)
    cluster = LocalCluster("rel", port=31000)
    assert cluster.root == tmp_path / "rel" and cluster.env["SLURM_CONF"] == str(tmp_path / "rel" / "slurm.conf")
    assert f"StateSaveLocation={tmp_path}/rel/state" in lc._config(cluster.root, cluster.port)
