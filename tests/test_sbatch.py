"""The sbatch scripts without a cluster: their #SBATCH resource requests, and what they hand to srun (the
command line and environment torchrun gets), run with stand-ins for srun, scontrol and nvidia-smi."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import add_config_args

ROOT = Path(__file__).resolve().parent.parent
SLURM_JOB = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]"}
GPU_JOB = {**SLURM_JOB, "SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "96"}


def sbatch_options(script: str) -> dict[str, str | None]:
    """The #SBATCH options of a script as sbatch reads them: from the top, up to the first command."""
    options = {}
    for line in (ROOT / "slurm" / script).read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            for word in shlex.split(line[len("#SBATCH"):]):
                name, _, value = word.partition("=")
                options[name] = value or None
    return options


@pytest.mark.parametrize("script", ["train.sbatch", "eval.sbatch"])
def test_multi_node_scripts_ask_for_whole_gpu_nodes(script):
    options = sbatch_options(script)
    assert options["--ntasks-per-node"] == "1"
    assert options["--gpus-per-node"] == "8"
    assert int(options["--cpus-per-task"]) >= 16
    assert "--exclusive" in options and options["--exclusive"] is None


def test_pretokenize_asks_for_a_gpu_per_array_task():
    options = sbatch_options("pretokenize.sbatch")
    assert options["--ntasks"] == "1" and options["--gpus-per-node"] == "1"
    assert int(options["--cpus-per-task"]) >= 2


# STUB_USR1_AT=hostnames|srun: SLURM's USR1 reaches the script (STUB_SCRIPT_PID) while it looks up the nodes, or
# while srun runs (which then goes on for a second). STUB_STOP_FILE: srun notes whether that file exists as it starts.
STUBS = {
    "srun": 'printf "%s\\0" "$@" > "$STUB_OUT/srun.args"; env -0 > "$STUB_OUT/srun.env"; '
            'if [ -f "${STUB_STOP_FILE:-/nonexistent}" ]; then touch "$STUB_OUT/stop.seen"; fi; '
            'if [ "${STUB_USR1_AT:-}" = srun ]; then kill -USR1 "$STUB_SCRIPT_PID"; sleep 1; fi; '
            'if [ -n "${STUB_REQUEUE:-}" ]; then echo "step 3" > "$STUB_REQUEUE"; fi; touch "$STUB_OUT/srun.done"',
    "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then '  # (the signal first: `| head -n 1` may end the stub)
                'if [ "${STUB_USR1_AT:-}" = hostnames ]; then kill -USR1 "$STUB_SCRIPT_PID"; fi; '
                'echo node-a; echo node-b; '
                'else echo "$*" >> "$STUB_OUT/scontrol.log"; exit "${STUB_SCONTROL_EXIT:-0}"; fi',
}


def run_script(tmp_path: Path, script: str, args: list[str], env: dict, gpus: int | None = None):
    """Run slurm/<script> with stand-in commands; returns (exit code, output, srun argv, srun environment).
    gpus: how many GPUs the stand-in nvidia-smi lists (None: it fails, as where there is no driver)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    smi = "exit 9" if gpus is None else "; ".join(
        [f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"' for i in range(gpus)]
        + ['echo "  MIG 1g.10gb     Device  0: (UUID: MIG-0)"'] * (gpus > 0))
    for name, body in {**STUBS, "nvidia-smi": smi}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_OUT": str(out),
                "PYTHON": "python3", **env}
    proc = subprocess.run(["bash", "-c", 'export STUB_SCRIPT_PID=$$; exec bash "$@"', "bash",
                           str(ROOT / "slurm" / script), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=60)
    if not (out / "srun.args").exists():
        return proc.returncode, proc.stdout + proc.stderr, None, None
    argv = (out / "srun.args").read_text().split("\0")[:-1]
    srun_env = dict(item.split("=", 1) for item in (out / "srun.env").read_text().split("\0") if "=" in item)
    return proc.returncode, proc.stdout + proc.stderr, argv, srun_env


def train(tmp_path, *args, env=GPU_JOB, gpus=None):
    return run_script(tmp_path, "train.sbatch", ["configs/train/debug.yaml", str(tmp_path / "run"), *args], env, gpus)


def after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def trainer_args(argv: list[str], trainer: str = "training.train") -> argparse.Namespace:
    """The options the trainer module receives, parsed the way it parses its --config/--set."""
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    parser.add_argument("--run-dir")
    parser.add_argument("--resume")
    parser.add_argument("--data")
    return parser.parse_args(argv[argv.index(trainer) + 1:])


def test_train_job_runs_one_torchrun_per_node_for_its_gpus(tmp_path):
    code, log, argv, env = train(tmp_path)
    assert code == 0, log
    assert argv[:2] == ["--kill-on-bad-exit=1", "--cpus-per-task=96"]
    assert argv[argv.index("torch.distributed.run") - 2] == "python3"
    assert after(argv, "--nnodes") == "2" and after(argv, "--nproc_per_node") == "8"
    assert after(argv, "--rdzv_endpoint") == f"node-a:{10000 + 42 * 997 % 22000}" and after(argv, "--rdzv_id") == "42-0"
    # (job ids near 1250 gave ports from 39999 down into Linux's ephemeral range, 32768 and up; with a factor 16,
    # not prime to the 22000 ports, jobs 1000 and 2375 shared one)
    ports = []
    for job in (1249, 1250, 987654, 1000, 2375):
        _, _, argv, _ = train(tmp_path, env={**GPU_JOB, "SLURM_JOB_ID": str(job)})
        ports.append(int(after(argv, "--rdzv_endpoint").split(":")[1]))
    assert all(10000 <= port < 32768 for port in ports) and len(set(ports)) == len(ports)
    assert after(argv, "--shutdown-timeout") == "600"  # torchrun's default 30 s would kill a large model's stop save
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 trainers
    assert env["NCCL_DEBUG"] == "WARN"
    args = trainer_args(argv)
    assert args.set == ["train.device=cuda"] and args.config == "configs/train/debug.yaml"
    assert "training.train on 2 node(s) x 8, device cuda" in log


def test_torchrun_ignores_usr1_and_the_trainers_can_still_take_it(tmp_path):
    """`scancel --signal=USR1` without --batch reaches every process of the step: torchrun starts with USR1
    ignored (its default action would end the agent); a trainer installing its handler still gets it."""
    _, _, argv, _ = train(tmp_path)
    wrapper = argv[argv.index("bash"):argv.index("torch.distributed.run") - 2]
    assert wrapper[:2] == ["bash", "-c"] and "trap \"\" USR1" in wrapper[2]
    ignored = "import os, signal; os.kill(os.getpid(), signal.SIGUSR1); print('alive')"
    handled = ("import os, signal; signal.signal(signal.SIGUSR1, lambda *a: print('handled')); "
               "os.kill(os.getpid(), signal.SIGUSR1)")
    for program, expected in ((ignored, "alive"), (handled, "handled")):
        proc = subprocess.run([*wrapper, sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == expected, proc


def test_train_device_comes_before_the_callers_overrides(tmp_path):
    """Every --set group counts (the last value of a key wins): the script's train.device comes first, so the
    caller's own train.device=... wins, and none of the caller's groups is dropped."""
    _, _, argv, _ = train(tmp_path, "--set", "a.b=1", "--set", "parallel.tp=8", "train.device=auto")
    assert trainer_args(argv).set == ["train.device=cuda", "a.b=1", "parallel.tp=8", "train.device=auto"]
    _, _, argv, _ = train(tmp_path, "--set=parallel.tp=2")
    assert trainer_args(argv).set == ["train.device=cuda", "parallel.tp=2"]
    _, _, argv, _ = train(tmp_path, "--set", "parallel.tp=2", env={**GPU_JOB, "DEVICE": "cpu"})
    assert trainer_args(argv).set == ["train.device=cpu", "parallel.tp=2"]


def test_a_requeued_segment_continues_the_run_whatever_the_first_asked(tmp_path):
    """The first segment resumes as the caller asks; a requeued one (SLURM_RESTART_COUNT > 0) always continues:
    `--resume overwrite` must not start the run again on every requeue, nor `--resume none` refuse its checkpoint."""
    requeued = {**GPU_JOB, "SLURM_RESTART_COUNT": "1"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "OVERWRITTEN_BY").write_text("42\n")  # (the trainer's record: job 42 overwrote)
    for asked in (["--resume", "overwrite"], ["--resume=overwrite"], ["--resume=none"], []):
        _, _, argv, _ = train(tmp_path, *asked, "--set", "parallel.tp=2")
        assert trainer_args(argv).resume == (asked[-1].split("=")[-1] if asked else "auto")
        _, _, argv, _ = train(tmp_path, *asked, "--set", "parallel.tp=2", env=requeued)
        args = trainer_args(argv)
        assert args.resume == "auto" and args.set == ["train.device=cuda", "parallel.tp=2"]
        assert after(argv, "--rdzv_id") == "42-1"
    # A first segment that died before its trainer carried out the overwrite (no record of this job): asked again.
    (tmp_path / "run" / "OVERWRITTEN_BY").write_text("41\n")
    for asked in (["--resume", "overwrite"], ["--resume=overwrite"]):
        _, _, argv, _ = train(tmp_path, *asked, env=requeued)
        assert trainer_args(argv).resume == "overwrite"


@pytest.mark.parametrize("scontrol_exit, code", [(0, 0), (1, 75)])
def test_a_stopped_run_is_requeued_and_a_refused_requeue_fails_the_job(tmp_path, scontrol_exit, code):
    """The trainers left REQUEUE: the script requeues the job; when SLURM refuses, the job must not end as a
    success with the run unfinished."""
    env = {**GPU_JOB, "STUB_REQUEUE": str(tmp_path / "run" / "REQUEUE"), "STUB_SCONTROL_EXIT": str(scontrol_exit)}
    got, log, _, _ = train(tmp_path, env=env)
    assert got == code, log
    assert (tmp_path / "out" / "scontrol.log").read_text() == "requeue 42\n"
    assert ("scontrol requeue 42 failed; the run is saved (step 3): submit the command again with --resume auto"
            in log) == bool(scontrol_exit)


def test_a_usr1_before_the_trainers_start_is_passed_on_to_them(tmp_path):
    """SLURM's USR1 while the script still prepares (here: as it looks up the nodes) used to end the job unsaved
    (SIGUSR1's default action, exit 138): now the trainers find STOP when they start, and save and stop."""
    env = {**GPU_JOB, "STUB_USR1_AT": "hostnames", "STUB_STOP_FILE": str(tmp_path / "run" / "STOP")}
    code, log, argv, _ = train(tmp_path, env=env)
    assert code == 0 and argv is not None, log
    assert (tmp_path / "out" / "stop.seen").exists() and "USR1: asking the trainers to save and stop" in log


def test_a_segment_that_stops_where_the_last_one_did_is_not_requeued_again(tmp_path):
    """A job whose time runs out while its trainers start would stop at the same step every segment, forever."""
    run = tmp_path / "run"
    run.mkdir()
    env = {**GPU_JOB, "SLURM_RESTART_COUNT": "2", "STUB_REQUEUE": str(run / "REQUEUE")}
    (run / "REQUEUED").write_text("step 1\n")  # the previous segment stopped at step 1, this one at 3: requeued
    code, log, _, _ = train(tmp_path, env=env)
    assert code == 0 and (tmp_path / "out" / "scontrol.log").read_text() == "requeue 42\n", log
    assert (run / "REQUEUED").read_text() == "step 3\n"
    code, log, _, _ = train(tmp_path, env=env)  # ... and the next one at 3 again
    assert code == 75 and not (tmp_path / "out" / "scontrol.log").exists()
    assert "stopped at step 3 as the previous segment did" in log


# srun's stand-in sends SLURM's USR1 as its step ends: the trainers finished without seeing the request.
FINISH_AT_USR1 = 'kill -USR1 "$STUB_SCRIPT_PID"; exit 0'


@pytest.mark.parametrize("script", ["train.sbatch", "eval.sbatch"])
def test_a_usr1_as_the_step_ends_keeps_its_exit_status(tmp_path, monkeypatch, script):
    """wait returns 138 when the trap interrupts it; srun ending while the trap ran (a slow file system, a slow
    scontrol) made that the job's status: a finished run ended FAILED (and broke afterok dependencies)."""
    monkeypatch.setitem(STUBS, "srun", FINISH_AT_USR1)
    monkeypatch.setitem(STUBS, "touch", 'sleep 0.3; exec /usr/bin/touch "$@"')
    monkeypatch.setitem(STUBS, "scontrol", STUBS["scontrol"].replace("else echo", "else sleep 0.3; echo"))
    args = ["configs/train/debug.yaml", str(tmp_path / "run")] if script == "train.sbatch" else \
        ["configs/eval/partiprompts.yaml"]
    codes = [run_script(tmp_path, script, args, GPU_JOB)[0] for _ in range(3)]
    assert codes == [0, 0, 0]
    monkeypatch.setitem(STUBS, "srun", "exit 3")  # (the step's own status is the job's)
    assert run_script(tmp_path, script, args, GPU_JOB)[0] == 3
    # `scancel --batch --signal=USR1` signals the batch shell's children too: the group running srun (srun's parent
    # here) goes on waiting for it, and the job ends with srun's status, after the trainers' save
    monkeypatch.setitem(STUBS, "srun", 'kill -USR1 "$PPID" "$STUB_SCRIPT_PID"; sleep 1; exit 0')
    assert run_script(tmp_path, script, args, GPU_JOB)[0] == 0


def test_a_stop_request_the_trainers_never_served_is_not_left_behind(tmp_path, monkeypatch):
    """A USR1 during the final save: the run ends normally; the STOP the script made would stop a later
    continuation of the run at its start."""
    monkeypatch.setitem(STUBS, "srun", 'kill -USR1 "$STUB_SCRIPT_PID"; sleep 1; exit 0')
    code, log, _, _ = train(tmp_path)
    assert code == 0 and "USR1: asking the trainers to save and stop" in log
    assert not (tmp_path / "run" / "STOP").exists() and not (tmp_path / "out" / "scontrol.log").exists()
    (tmp_path / "run" / "STOP").touch()  # ... but a STOP the script did not make is left to its maker
    monkeypatch.setitem(STUBS, "srun", "exit 0")
    assert train(tmp_path)[0] == 0 and not (tmp_path / "run" / "STOP").exists()  # (cleared at the start)
    monkeypatch.setitem(STUBS, "srun", f'touch {tmp_path / "run" / "STOP"}; exit 0')
    assert train(tmp_path)[0] == 0 and (tmp_path / "run" / "STOP").exists()


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_train_device_from_environment(tmp_path, device):
    code, log, argv, _ = train(tmp_path, env={**GPU_JOB, "DEVICE": device})
    assert code == 0, log
    assert trainer_args(argv).set == [f"train.device={device}"]


def test_stop_grace_sets_torchruns_shutdown_timeout(tmp_path):
    code, log, argv, _ = train(tmp_path, env={**GPU_JOB, "STOP_GRACE": "1800"})
    assert code == 0, log
    assert after(argv, "--shutdown-timeout") == "1800"


def test_train_refuses_an_unknown_device(tmp_path):
    code, log, argv, _ = train(tmp_path, env={**GPU_JOB, "DEVICE": "gpu"})
    assert code == 2 and "DEVICE=gpu" in log and argv is None


def test_a_second_job_on_a_run_directory_in_use_keeps_its_stop_request(tmp_path):
    """The previous segment's STOP/REQUEUE are cleared under the run lock the trainer holds: a duplicate job
    started while the run is alive stops before srun and leaves the running job's stop request alone."""
    from common.checkpoints import RunLock

    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    try:
        (run / "STOP").touch()
        (run / "REQUEUE").write_text("step 7")
        code, log, argv, _ = train(tmp_path)
        assert code == 1 and argv is None, log
        assert f"{run}/.lock is held by another run (pid {os.getpid()} on" in log
        assert (run / "STOP").exists() and (run / "REQUEUE").read_text() == "step 7"
    finally:
        lock.release()
    code, log, argv, _ = train(tmp_path)  # the run ended: its requeued segment starts afresh
    assert code == 0 and argv is not None, log
    assert not (run / "STOP").exists() and not (run / "REQUEUE").exists()


@pytest.mark.parametrize("trainer", ["training.text_encoder", "vq.train", "vq.finetune_decoder", "sr.train"])
def test_train_job_runs_the_trainer_it_is_given(tmp_path, trainer):
    """TRAINER picks the module (each handles the STOP file and REQUEUE the script relies on); the script's own
    arguments and the caller's reach it as they reach Parti's trainer."""
    code, log, argv, _ = run_script(tmp_path, "train.sbatch", ["configs/vq/vqvae.yaml", str(tmp_path / "run"),
                                    "--data", "laion/{00000..00009}.tar"], {**GPU_JOB, "TRAINER": trainer})
    assert code == 0, log
    args = trainer_args(argv, trainer)
    assert (args.config, args.run_dir, args.resume) == ("configs/vq/vqvae.yaml", str(tmp_path / "run"), "auto")
    assert args.data == "laion/{00000..00009}.tar" and args.set == ["train.device=cuda"]
    assert argv[argv.index(trainer) - 1] == "-m" and "training.train" not in argv
    assert f"{trainer} on 2 node(s) x 8" in log
    code, log, argv, _ = train(tmp_path, env={**GPU_JOB, "TRAINER": "vq.tokenizer"})
    assert code == 2 and argv is None
    assert "TRAINER=vq.tokenizer: expected training.train, training.text_encoder, vq.train, vq.finetune_decoder " \
           "or sr.train" in log


@pytest.mark.parametrize("env, gpus, nproc, threads", [
    ({"SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_PER_TASK": "96"}, None, "4", "24"),
    ({"SLURM_CPUS_PER_TASK": "64"}, 2, "2", "32"),  # SLURM gave no GPU count: nvidia-smi's
    ({"SLURM_GPUS_PER_NODE": "0", "SLURM_CPUS_PER_TASK": "2"}, None, "1", "2"),  # a CPU node
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "4"}, None, "8", "1"),
    ({"SLURM_GPUS_ON_NODE": "8", "NPROC_PER_NODE": "3", "SLURM_CPUS_PER_TASK": "96", "OMP_NUM_THREADS": "5",
      "CUDA_DEVICE_MAX_CONNECTIONS": "32"}, None, "3", "5"),  # the caller's settings win
])
def test_processes_and_threads_per_node(tmp_path, env, gpus, nproc, threads):
    code, log, argv, srun_env = train(tmp_path, env={**SLURM_JOB, **env}, gpus=gpus)
    assert code == 0, log
    assert after(argv, "--nproc_per_node") == nproc and srun_env["OMP_NUM_THREADS"] == threads
    assert srun_env["CUDA_DEVICE_MAX_CONNECTIONS"] == env.get("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def test_eval_job_exports_the_same_settings_and_asks_for_the_gpu(tmp_path):
    """As train.sbatch: benchmark.device=cuda unless DEVICE says otherwise, before the caller's overrides."""
    code, log, argv, env = run_script(tmp_path, "eval.sbatch", ["configs/eval/partiprompts.yaml", "--set", "x=1"],
                                      GPU_JOB)
    assert code == 0, log
    assert "--cpus-per-task=96" in argv and after(argv, "--nproc_per_node") == "8"
    assert argv[argv.index("evaluation.benchmark") + 1:] == ["--config", "configs/eval/partiprompts.yaml", "--set",
                                                            "benchmark.device=cuda", "--set", "x=1"]
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["OMP_NUM_THREADS"] == "12" and env["NCCL_DEBUG"] == "WARN"
    _, _, argv, _ = run_script(tmp_path, "eval.sbatch", ["configs/eval/partiprompts.yaml"],
                               {**GPU_JOB, "DEVICE": "cpu"})
    assert trainer_args(["training.train", *argv[argv.index("evaluation.benchmark") + 1:]]).set == [
        "benchmark.device=cpu"]
    code, log, argv, _ = run_script(tmp_path, "eval.sbatch", ["configs/eval/partiprompts.yaml"],
                                    {**GPU_JOB, "DEVICE": "gpu"})
    assert code == 2 and "DEVICE=gpu" in log and argv is None


def test_eval_job_measures_held_out_losses_with_module(tmp_path):
    """MODULE=training.held_out runs training.held_out on the job's processes with train.device=cuda, the caller's
    arguments after it (parsed by its own parser); another module is refused before srun."""
    from training.held_out import main

    code, log, argv, _ = run_script(tmp_path, "eval.sbatch", ["runs/x/config.yaml", "--run-dir", "runs/x",
                                                              "--checkpoints", "all", "--set", "parallel.tp=8"],
                                    {**GPU_JOB, "MODULE": "training.held_out"})
    assert code == 0, log
    args = argv[argv.index("training.held_out") + 1:]
    assert args == ["--config", "runs/x/config.yaml", "--set", "train.device=cuda", "--run-dir", "runs/x",
                    "--checkpoints", "all", "--set", "parallel.tp=8"]
    with pytest.raises(SystemExit, match="runs/x/config.yaml: no such file"):  # (its parser takes them all)
        main(args)
    code, log, argv, _ = run_script(tmp_path, "eval.sbatch", ["c.yaml"], {**GPU_JOB, "MODULE": "training.train"})
    assert code == 2 and "MODULE=training.train: expected evaluation.benchmark or training.held_out" in log
    assert argv is None


@pytest.mark.parametrize("usr1_at", ["hostnames", "srun"])
def test_eval_job_requeues_on_usr1_and_waits_for_its_step(tmp_path, usr1_at):
    """USR1 requeues the evaluation (before or while it generates); when SLURM refuses, generation goes on to the
    time limit: the script waits for srun instead of ending the job with SIGUSR1's 138."""
    for refused in (0, 1):
        env = {**GPU_JOB, "STUB_USR1_AT": usr1_at, "STUB_SCONTROL_EXIT": str(refused)}
        code, log, _, _ = run_script(tmp_path, "eval.sbatch", ["configs/eval/partiprompts.yaml"], env)
        assert code == 0 and (tmp_path / "out" / "srun.done").exists(), log
        assert (tmp_path / "out" / "scontrol.log").read_text() == "requeue 42\n"
        assert ("generation goes on until the time limit" in log) == bool(refused)


def test_eval_is_requeued_at_most_max_requeues_times(tmp_path, monkeypatch):
    """A segment too short for rank 0's scoring (which starts over in each) would be requeued forever."""
    monkeypatch.setitem(STUBS, "srun", 'kill -USR1 "$STUB_SCRIPT_PID"; sleep 1; exit 143')
    for restarts, env, requeued in (("9", {}, True), ("10", {}, False), ("10", {"MAX_REQUEUES": "11"}, True)):
        _, log, _, _ = run_script(tmp_path, "eval.sbatch", ["configs/eval/coco30k.yaml"],
                                     {**GPU_JOB, "SLURM_RESTART_COUNT": restarts, **env})
        assert (tmp_path / "out" / "scontrol.log").exists() == requeued, log
        assert ("not requeued again" in log) != requeued


def test_pretokenize_task_asks_for_the_gpu(tmp_path):
    """pretokenize.sbatch passes --device cuda (DEVICE=cpu on CPU nodes); the caller's own --device wins."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_OUT/python.args"\n')
    stub.chmod(0o755)
    for env, extra, device in [({}, [], "cuda"), ({"DEVICE": "cpu"}, [], "cpu"), ({}, ["--device", "auto"], "auto")]:
        run_script(tmp_path, "pretokenize.sbatch", ["in/{0..1}.tar", "out", "vq.pt", "spm.model", *extra],
                   {"PYTHON": str(stub), "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", **env})
        argv = (tmp_path / "out" / "python.args").read_text().split("\0")[:-1]
        parser = argparse.ArgumentParser()
        parser.add_argument("--device")
        parser.add_argument("--shard-index")
        assert parser.parse_known_args(argv)[0].device == device, argv
        assert after(argv, "--shard-index") == "1" and after(argv, "--num-shards") == "4"


def test_pretokenize_array_numbered_otherwise_needs_num_tasks(tmp_path):
    """Array task ids are the split's indices: --array=1-32 (ids 1..32, 32 tasks) would leave split 0 undone
    and fail at 32, so it is refused unless NUM_TASKS gives the split; rerunning tasks 3 and 17 of a 0-31
    array with NUM_TASKS=32 does splits 3 and 17 of 32."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_OUT/python.args"\n')
    stub.chmod(0o755)
    args = ["in/{0..1}.tar", "out", "vq.pt", "spm.model"]
    one_to_32 = {"PYTHON": str(stub), "SLURM_ARRAY_TASK_ID": "32", "SLURM_ARRAY_TASK_COUNT": "32",
                 "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "32"}
    code, log, _, _ = run_script(tmp_path, "pretokenize.sbatch", args, one_to_32)
    assert code == 2 and "not numbered 0..N-1: set NUM_TASKS" in log
    assert not (tmp_path / "out" / "python.args").exists()
    rerun = {"PYTHON": str(stub), "SLURM_ARRAY_TASK_ID": "17", "SLURM_ARRAY_TASK_COUNT": "2",
             "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "17", "NUM_TASKS": "32"}
    code, log, _, _ = run_script(tmp_path, "pretokenize.sbatch", args, rerun)
    argv = (tmp_path / "out" / "python.args").read_text().split("\0")[:-1]
    assert code == 0 and after(argv, "--shard-index") == "17" and after(argv, "--num-shards") == "32", log


def test_a_requeue_after_another_jobs_overwrite_matches_the_whole_job_id(tmp_path):
    """OVERWRITTEN_BY names the job that carried out the overwrite: job 42 must not take job 142's record for its
    own (its overwrite was never done, so the requeued segment asks for it again)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "OVERWRITTEN_BY").write_text("142\n")
    _, _, argv, _ = train(tmp_path, "--resume", "overwrite", env={**GPU_JOB, "SLURM_RESTART_COUNT": "1"})
    assert trainer_args(argv).resume == "overwrite"


def test_a_run_directory_without_flock_still_has_its_stop_files_cleared(tmp_path, monkeypatch):
    """flock failing for another reason than a held lock (a file system without it): a warning, and the previous
    segment's REQUEUE/STOP are cleared as the trainer would go on there (a STOP left would stop the run at once)."""
    monkeypatch.setitem(STUBS, "flock", "exit 1")
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()
    (run / "REQUEUE").write_text("step 7")
    code, log, argv, _ = train(tmp_path)
    assert code == 0 and argv is not None, log
    assert "cannot lock" in log and not (run / "STOP").exists() and not (run / "REQUEUE").exists()


@pytest.mark.parametrize("script", ["train.sbatch", "eval.sbatch"])
def test_a_step_whose_status_was_never_written_fails_the_job(tmp_path, monkeypatch, script):
    """The group running srun killed before it wrote srun's status (no status file content): the job fails
    instead of ending as a success."""
    monkeypatch.setitem(STUBS, "srun", 'kill -KILL "$PPID"; sleep 0.5; exit 0')
    args = ["configs/train/debug.yaml", str(tmp_path / "run")] if script == "train.sbatch" else \
        ["configs/eval/partiprompts.yaml"]
    assert run_script(tmp_path, script, args, GPU_JOB)[0] == 1


def test_a_first_segment_is_requeued_whatever_an_earlier_job_recorded(tmp_path):
    """The same-step check is for a job's own requeued segments: a new job (a resubmission after exit 75, restart
    count 0) that stops where the earlier job's last segment did is still requeued."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "REQUEUED").write_text("step 3\n")
    code, log, _, _ = train(tmp_path, env={**GPU_JOB, "STUB_REQUEUE": str(run / "REQUEUE")})
    assert code == 0 and (tmp_path / "out" / "scontrol.log").read_text() == "requeue 42\n", log


@pytest.mark.parametrize("script", ["train.sbatch", "eval.sbatch"])
def test_bad_process_counts_are_refused_before_srun(tmp_path, script):
    """NPROC_PER_NODE=0 or a word ended in a division by zero and an unbound THREADS; more than one task per node
    (`--ntasks-per-node=8`, `--gpus-per-task=1`'s way) started several torchruns per node, each with every GPU."""
    args = ["configs/train/debug.yaml", str(tmp_path / "run")] if script == "train.sbatch" else \
        ["configs/eval/partiprompts.yaml"]
    for nproc in ("0", "eight"):
        code, log, argv, _ = run_script(tmp_path, script, args, {**GPU_JOB, "NPROC_PER_NODE": nproc})
        assert code == 2 and argv is None and f"NPROC_PER_NODE={nproc}: expected a number of processes" in log, log
    code, log, argv, _ = run_script(tmp_path, script, args, {**GPU_JOB, "SLURM_NTASKS": "16"})
    assert code == 2 and argv is None and "16 tasks on 2 node(s): this script runs one task per node" in log, log
    code, log, argv, _ = run_script(tmp_path, script, args, {**GPU_JOB, "SLURM_NTASKS": "2"})
    assert code == 0 and argv is not None, log


@pytest.mark.parametrize("env, gpus, nproc, threads", [
    ({"SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_PER_TASK": "96"}, None, "4", "24"),
    ({"SLURM_CPUS_PER_TASK": "64"}, 2, "2", "32"),  # SLURM gave no GPU count: nvidia-smi's
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "4"}, None, "8", "1"),
])
def test_eval_processes_threads_and_rendezvous_per_node(tmp_path, env, gpus, nproc, threads):
    """eval.sbatch counts processes and threads as train.sbatch does, and joins the nodes the same way: a
    rendezvous on the first node, on a port and id of this job and restart; a failed process ends the step."""
    code, log, argv, srun_env = run_script(tmp_path, "eval.sbatch", ["configs/eval/partiprompts.yaml"],
                                           {**SLURM_JOB, "SLURM_RESTART_COUNT": "1", **env}, gpus)
    assert code == 0, log
    assert after(argv, "--nproc_per_node") == nproc and srun_env["OMP_NUM_THREADS"] == threads
    assert argv[0] == "--kill-on-bad-exit=1" and after(argv, "--nnodes") == "2"
    assert after(argv, "--rdzv_endpoint") == f"node-a:{10000 + (42 * 997 + 1) % 22000}"
    assert after(argv, "--rdzv_id") == "42-1"


def test_eval_with_no_requeues_allowed_goes_on_to_the_time_limit(tmp_path, monkeypatch):
    """MAX_REQUEUES=0 on a first segment (SLURM sets no SLURM_RESTART_COUNT there): its USR1 trap ended the job
    FAILED on an unbound variable, killing the generation, instead of letting it go on."""
    monkeypatch.setitem(STUBS, "srun", 'kill -USR1 "$STUB_SCRIPT_PID"; sleep 1; touch "$STUB_OUT/srun.done"; exit 0')
    code, log, _, _ = run_script(tmp_path, "eval.sbatch", ["configs/eval/partiprompts.yaml"],
                                 {**GPU_JOB, "MAX_REQUEUES": "0"})
    assert code == 0 and (tmp_path / "out" / "srun.done").exists(), log
    assert "USR1 after 0 requeues (MAX_REQUEUES=0): not requeued again" in log
    assert not (tmp_path / "out" / "scontrol.log").exists()


def test_pretokenize_outside_an_array_does_the_whole_input(tmp_path):
    """A plain sbatch (no --array): one task, split 0 of 1; the image and text tokenizers reach their options."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$STUB_OUT/python.args"\n')
    stub.chmod(0o755)
    code, log, _, _ = run_script(tmp_path, "pretokenize.sbatch", ["in/{0..1}.tar", "out", "vq.pt", "spm.model"],
                                 {"PYTHON": str(stub)})
    argv = (tmp_path / "out" / "python.args").read_text().split("\0")[:-1]
    assert code == 0, log
    assert after(argv, "--shard-index") == "0" and after(argv, "--num-shards") == "1"
    assert after(argv, "--vq") == "vq.pt" and after(argv, "--text-tokenizer") == "spm.model"
