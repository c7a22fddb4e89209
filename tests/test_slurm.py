"""SLURM jobs on a real local cluster (a controller and two emulated nodes): training across 2 nodes,
requeue and preemption mid-run resuming to the uninterrupted result, an image tokenizer's training preempted
and resumed, a pre-tokenization job array.

The nodes have no GPUs, so every job overrides the scripts' GPU and CPU requests the way a user does on
CPU nodes (sbatch --gpus-per-node=0 --cpus-per-task=N, DEVICE=cpu for training, evaluation and pre-tokenization); tests/test_sbatch.py
checks the scripts' GPU defaults without a cluster."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model_parallel.state import child_environment
from slurm.local_cluster import CPU_NODE_OPTIONS, CPUS_PER_NODE, LocalCluster, available

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(Path(sys.executable))
ENV = {"PYTHON": PYTHON, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DEVICE": "cpu"}
TRAIN = ["--set", "train.steps=100", "train.save_interval=10", "train.log_interval=1"]

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no local SLURM cluster: {available()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
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
    job = cluster.sbatch(["--array=0-3", *CPU_NODE_OPTIONS, f"--output={tmp_path}/array-%A_%a.out", "slurm/pretokenize.sbatch",
                          pattern, str(tmp_path / "array"), str(tmp_path / "vq.pt"), str(tmp_path / "spm.model"),
                          "--text-len", "16", "--min-size", "16", "--max-punsafe", "0.5"], cwd=ROOT, env=ENV)
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
    assert cluster.wait(jobs[0]["job_id"], timeout=600) == "COMPLETED", (out / f"{jobs[0]['name']}.out").read_text()[-2000:]
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
    subprocess.run([PYTHON, "-m", "training.export", "--run-dir", str(uninterrupted[2]), "--out", str(tmp_path / "export")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    torch.manual_seed(0)
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64), tmp_path / "vq.pt")
    prompts = ["a red circle", "a blue square", "two green cats", "a kitchen", "a dog", "the sky at night"]
    train_sentencepiece(prompts * 40, 40, tmp_path / "spm.model")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    files = {"checkpoint": tmp_path / "export", "vq": tmp_path / "vq.pt", "text_tokenizer": tmp_path / "spm.model"}
    subprocess.run([PYTHON, "-m", "evaluation.generate", *[f"--{k.replace('_', '-')}={v}" for k, v in files.items()],
                    f"--prompts={tmp_path / 'prompts.txt'}",
                    f"--out={tmp_path / 'local'}", "--samples-per-prompt=2", "--guidance-scale=1.2", "--top-k=16"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    job = cluster.sbatch(["-N", "2", *CPU_NODE_OPTIONS, f"--output={tmp_path}/eval-%j.out", "slurm/eval.sbatch", "configs/eval/partiprompts.yaml",
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
    other's jobs and the /etc/hosts line its nodes resolve through alone (it pkilled every slurmstepd)."""
    ours = cluster.sbatch([*CPU_NODE_OPTIONS, f"--output={tmp_path}/ours-%j.out", "--wrap", "sleep 120"], cwd=tmp_path)
    other = LocalCluster(tmp_path / "other").start()
    try:
        other.sbatch([*CPU_NODE_OPTIONS, f"--output={tmp_path}/other-%j.out", "--wrap", "sleep 120"], cwd=tmp_path)
        deadline = time.time() + 60
        while not (cluster.job_steps() and other.job_steps()) and time.time() < deadline:
            time.sleep(0.5)
        kept, killed = cluster.job_steps(), other.job_steps()
        assert kept and killed and not set(kept) & set(killed)
    finally:
        other.stop()
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
