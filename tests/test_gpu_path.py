"""The CUDA path's logic, proven on CPU: device choice and the missing-GPU error, the GPU a process picks,
the peak FLOP/s table, the finiteness check, the memory-peak reset and ZeRO-3 construction under zero.Init.
(What needs a real GPU is measured by bench/gpu_check.py; tests/test_gpu_check.py keeps it runnable.)"""
from __future__ import annotations

import os
import re

import pytest
import torch

from model_parallel import state


def test_cuda_required_without_a_gpu_is_an_error_that_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(state, "driver_version", lambda: None)
    with pytest.raises(RuntimeError, match=r"device cuda was asked for.*CUDA .*needs NVIDIA driver >=.*SLURM"):
        state.use_device("cuda")
    assert state.use_device("auto") == "cpu"  # auto falls back, as documented


@pytest.mark.parametrize("module, argv", [
    ("training.train", ["--config", "configs/train/debug.yaml", "--run-dir", "{tmp}/run", "--set",
                        "train.device=cuda"]),
    ("training.text_encoder", ["--config", "configs/train/debug.yaml", "--run-dir", "{tmp}/run", "--set",
                               "train.device=cuda"]),
    ("vq.train", ["--data", "{tmp}/x.tar", "--run-dir", "{tmp}/run", "--set", "train.device=cuda"]),
    ("sr.train", ["--data", "{tmp}/x.tar", "--run-dir", "{tmp}/run", "--set", "train.device=cuda"]),
    ("evaluation.benchmark", ["--config", "configs/eval/partiprompts.yaml", "--set", "benchmark.device=cuda",
                              "model.checkpoint={tmp}/c", "model.vq={tmp}/v", "model.text_tokenizer={tmp}/t",
                              "benchmark.out={tmp}/run", "sampling.keep=0"]),
])
def test_every_command_asked_for_a_missing_gpu_says_so_in_one_line_and_writes_nothing(module, argv, tmp_path,
                                                                                        monkeypatch):
    """What the sbatch scripts pass (a device of cuda) on a machine without a usable GPU: one line naming the
    setting and why, before anything is written (and not hours on the CPU)."""
    import importlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(state, "driver_version", lambda: None)
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main([a.format(tmp=tmp_path) for a in argv])
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code, exit.value.code
    assert "device cuda was asked for" in exit.value.code and "no NVIDIA driver" in exit.value.code
    assert not (tmp_path / "run").exists()


def test_generate_and_pretokenize_asked_for_a_missing_gpu_say_so_in_one_line(tmp_path, monkeypatch):
    """--device cuda (pretokenize.sbatch's default) without a GPU: one line, before any output is written."""
    from data_pipeline import pretokenize
    from evaluation import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(state, "driver_version", lambda: None)
    monkeypatch.setattr(generate, "check_export", lambda *a: None)
    monkeypatch.setattr(generate, "read_prompts", lambda *a: ["a cat"])
    for main, argv in [(generate.main, ["--checkpoint", "c", "--vq", "v", "--text-tokenizer", "t", "--prompts", "p",
                                        "--out", str(tmp_path / "out"), "--device", "cuda"]),
                       (pretokenize.pretokenize, None)]:
        with pytest.raises((SystemExit, state.DeviceError)) as exit:
            if argv is None:
                main([], tmp_path / "out", _Tokenizer(), _Tokenizer(), None, device="cuda")
            else:
                main(argv)
        message = exit.value.code if isinstance(exit.value, SystemExit) else str(exit.value)
        assert "--device cuda was asked for" in message and "\n" not in message
        assert not (tmp_path / "out").exists()


def test_generation_waits_for_its_peers_longer_than_training(tmp_path, monkeypatch):
    """generate and benchmark join the process group with WAIT_FOR_PEERS_MINUTES: their barrier after
    generating may wait for hours on a rank that has more left to do (training's 30 minutes would not)."""
    from evaluation import benchmark, generate
    from evaluation.config import load_eval_config

    class Joined(Exception):
        pass

    def join(timeout_minutes=30):
        raise Joined(timeout_minutes)

    for module in (generate, benchmark):
        monkeypatch.setattr(module, "init_distributed", join)
    monkeypatch.setattr(generate, "check_export", lambda *a: None)
    monkeypatch.setattr(generate, "read_prompts", lambda *a: ["a cat"])
    with pytest.raises(Joined) as generating:
        generate.main(["--checkpoint", "c", "--vq", "v", "--text-tokenizer", "t", "--prompts", "p",
                       "--out", str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(Joined) as benchmarking:
        benchmark.run(load_eval_config("configs/eval/partiprompts.yaml", [
            f"benchmark.out={tmp_path / 'b'}", "benchmark.device=cpu", "model.checkpoint=c", "model.vq=v",
            "model.text_tokenizer=t", "clip.model=ViT-B-32", "clip.weights=random"]))
    assert generating.value.args == benchmarking.value.args == (generate.WAIT_FOR_PEERS_MINUTES,)
    assert generate.WAIT_FOR_PEERS_MINUTES >= 24 * 60


class _Tokenizer:
    codebook_size = vocab_size = 8


def test_missing_gpu_reasons_name_the_driver_the_build_needs(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    old = state.no_gpu_reason("570.86.10")
    assert "2.14.1+cu130" in old and "CUDA 13.0" in old and "driver is 570.86.10" in old and ">= 580.65.06" in old
    assert "no NVIDIA driver" in state.no_gpu_reason(None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES=''" in state.no_gpu_reason("580.95.05")  # new enough driver: GPUs were hidden
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "no CUDA support" in state.no_gpu_reason("580.95.05")


def test_device_cpu_hides_the_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert state.use_device("cpu") == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["DS_ACCELERATOR"] == "cpu"


def test_device_index_among_the_visible_gpus():
    assert state.local_device_index(visible=1, local_rank=3) == 0   # srun --gpus-per-task=1
    assert state.local_device_index(visible=8, local_rank=3) == 3   # torchrun, all GPUs visible
    with pytest.raises(RuntimeError, match="LOCAL_RANK=5, but this process sees 2 GPUs"):
        state.local_device_index(visible=2, local_rank=5)
    assert state.local_device_index(visible=8, local_rank=3, local_world=8) == 3
    # torchrun --nproc_per_node 2 on a one-GPU machine: both would drive GPU 0, which NCCL refuses.
    with pytest.raises(RuntimeError, match="2 processes on this node .* but 1 visible GPU"):
        state.local_device_index(visible=1, local_rank=1, local_world=2)


def test_init_distributed_sets_the_visible_gpu_and_tells_deepspeed(monkeypatch):
    """A bare srun task with one visible GPU and SLURM_LOCALID=3: device 0, and LOCAL_RANK=0 for
    DeepSpeed's engine (which calls set_device(LOCAL_RANK) itself)."""
    chosen = []
    monkeypatch.setattr(state.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(state.dist, "init_process_group", lambda backend, timeout: chosen.append(("init", backend)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.append(("device", index)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # (a bare srun: no torchrun)
    for key, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="x", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    state.init_distributed()
    assert chosen == [("device", 0), ("init", "nccl")] and os.environ["LOCAL_RANK"] == "0"
    # torchrun with 2 processes on this one-GPU node: refused before joining any group.
    chosen.clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match="NCCL needs a GPU of its own per process"):
        state.init_distributed()
    assert chosen == []


def test_a_failing_nvidia_smi_reports_no_driver(monkeypatch):
    """nvidia-smi without a working driver prints its complaint on stdout and exits non-zero: no version then."""
    import subprocess

    def smi(returncode, stdout):
        return lambda *a, **k: subprocess.CompletedProcess([], returncode, stdout=stdout)

    monkeypatch.setattr(state.subprocess, "run", smi(0, "580.95.05\n580.95.05\n"))
    assert state.driver_version() == "580.95.05"
    monkeypatch.setattr(state.subprocess, "run", smi(9, "NVIDIA-SMI has failed because it couldn't communicate "
                                                       "with the NVIDIA driver.\n"))
    assert state.driver_version() is None

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(state.subprocess, "run", missing)
    assert state.driver_version() is None


def test_the_minimum_driver_is_new_enough_and_an_unknown_cuda_needs_none(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "although driver 580.65.06 is installed" in state.no_gpu_reason("580.65.06")  # (exactly the minimum)
    monkeypatch.setattr(torch.version, "cuda", "14.0")  # (a CUDA this table does not know yet)
    assert "although driver 590.10.01 is installed" in state.no_gpu_reason("590.10.01")


def test_a_device_that_is_none_of_the_three_and_cpu_after_cuda_started_are_refused(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(ValueError, match="train.device 'gpu': expected auto, cuda or cpu"):
        state.use_device("gpu", key="train.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (CUDA initialised before the choice)
    with pytest.raises(state.DeviceError, match="train.device cpu: CUDA was initialised before"):
        state.use_device("cpu", key="train.device")


def test_a_local_rank_outside_the_visible_gpus_is_refused():
    for local_rank in (2, -1):  # (one past the last GPU; a negative index would count from the end)
        with pytest.raises(RuntimeError, match=f"LOCAL_RANK={local_rank}, but this process sees 2 GPUs"):
            state.local_device_index(visible=2, local_rank=local_rank)


def test_a_child_environment_drops_only_the_own_groups_variables(monkeypatch):
    monkeypatch.setattr(state, "_OWN_GROUP_VARS", {"RANK": "0", "MASTER_PORT": "4000"})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "5000")  # (set since, by someone else: kept)
    env = state.child_environment(SLURM_CONF="x", MASTER_PORT="6000")
    assert "RANK" not in env and env["MASTER_PORT"] == "6000" and env["SLURM_CONF"] == "x"
    assert state.child_environment()["MASTER_PORT"] == "5000"


def _joining(monkeypatch):
    """init_distributed with torch.distributed's join recorded (what the environment said then), not made."""
    joined = []
    monkeypatch.setattr(state.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(state.dist, "init_process_group", lambda backend, timeout: joined.append(
        (timeout, {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")})))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(state, "_OWN_GROUP_VARS", {})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # (so that what init_distributed sets is undone too: a delenv of an unset
        monkeypatch.delenv(key)      # variable records nothing to restore)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    return joined


def test_a_plain_process_makes_its_own_group_and_keeps_it_from_its_children(monkeypatch):
    from datetime import timedelta

    joined = _joining(monkeypatch)
    monkeypatch.setenv("MASTER_PORT", "")  # (an empty port is none: a free one is taken)
    state.init_distributed(timeout_minutes=7)
    (timeout, env), = joined
    assert timeout == timedelta(minutes=7)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"} & set(state.child_environment())


def test_torchrun_inside_a_slurm_step_keeps_torchruns_ranks(monkeypatch):
    """srun starting one torchrun per node: its workers have torchrun's RANK and the step's SLURM_PROCID (the node's
    index); RANK is the rank."""
    joined = _joining(monkeypatch)
    for key, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="n1", MASTER_PORT="1234",
                           SLURM_STEP_ID="0", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="9", SLURM_PROCID="1",
                           SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(state, "slurm_environment", lambda env=None: {"RANK": "1", "WORLD_SIZE": "2"})
    state.init_distributed()
    assert joined[0][1] == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_PORT": "1234"}


def test_each_pipeline_stage_is_seeded_100_apart_as_megatron_lm_does(single_process, monkeypatch):
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "get_pipeline_model_parallel_rank", lambda: 2)
    state.seed_everything(1234)
    assert torch.initial_seed() == 1434


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H200", "bf16", 989), ("NVIDIA H200 NVL", "bf16", 835), ("NVIDIA H200", "fp32", 494.5),
    ("NVIDIA H100 Something New", "bf16", None)])
def test_peak_flops_by_exact_device_name(name, precision, expected):
    from training.flops import peak_flops

    peak, source = peak_flops(precision, device_name=name)
    assert (peak and peak / 1e12) == expected
    assert ("train.peak_tflops" in source) == (expected is None)
    assert ("TF32" in source) == (precision == "fp32" and expected is not None)
    assert peak_flops(precision, override_tflops=700, device_name=name)[0] == 700e12  # the key wins


def test_enable_tf32_turns_on_matmuls_and_convolutions():
    """fp32 runs compute on TF32 tensor cores (what peak_flops divides an fp32 run's MFU by): matrix products
    and cuDNN convolutions both. (The switches are plain flags: settable without a GPU.)"""
    from training.flops import enable_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        enable_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_nonfinite_flag_is_one_reduction_on_the_device():
    from training.deepspeed_glue import nonfinite_flag

    finite = [torch.randn(5, dtype=torch.bfloat16), torch.full((3,), 3e38)]  # huge but finite: not flagged
    assert nonfinite_flag(finite).item() == 0.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        flag = nonfinite_flag(finite + [torch.tensor([1.0, bad])])
        assert flag.dim() == 0 and flag.item() == 1.0
    assert nonfinite_flag([]).item() == 0.0


def test_a_checkpoints_generators_are_restored_only_on_the_kind_of_device_that_saved_them(single_process):
    """megatron's RNG tracker holds CUDA generator states on a GPU and CPU ones here: a checkpoint's tracker
    states from the other kind of device (a GPU's, marked by its "cuda" state) are not set into it (they would
    fail at its first fork); this device's are. torch's CPU generator is restored either way."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from model_parallel.state import seed_everything
    from training.checkpoint import _rng_state, _set_rng_state

    seed_everything(5)  # (the tracker's generators)
    saved, tracker = _rng_state(), get_cuda_rng_tracker()
    with tracker.fork():
        first = torch.rand(3)  # (the tracker moves on)
    _set_rng_state({**saved, "cuda": torch.zeros(16, dtype=torch.uint8)})  # a GPU's checkpoint, resumed here
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    with tracker.fork():
        assert not torch.equal(torch.rand(3), first)  # the tracker kept its own state
    _set_rng_state(saved)  # a CPU checkpoint on a CPU
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    with tracker.fork():
        assert torch.equal(torch.rand(3), first)


def test_peak_memory_is_reset_after_the_engine_is_built(single_process, monkeypatch, tmp_path):
    """The logged peak is training's: construction (fp32 before the bf16 cast) happens before the reset."""
    from common import metrics
    from tests.conftest import run
    from training import engine

    calls = []
    build = engine.build_engine
    monkeypatch.setattr(engine, "build_engine", lambda *a, **k: (calls.append("engine"), build(*a, **k))[1])
    monkeypatch.setattr(metrics, "reset_peak_memory", lambda: calls.append("reset"))
    run(str(tmp_path), steps=1)
    assert calls == ["engine", "reset"]


def _build_zero3_model():
    from model_parallel.kernels import select_kernels
    from model_parallel.state import init_parallel
    from training.config import layout_of, load_config
    from training.engine import build_model

    init_parallel(1, 1)
    cfg = load_config("configs/train/debug.yaml", ["parallel.zero_stage=3"])
    # "meta" stands in for the GPU the engine would run on: parameters are zero.Init's to place, buffers follow it.
    model = build_model(cfg, select_kernels(cfg.kernels), "meta", layout_of(cfg, 2))
    return ({n: (p.ds_numel, p.ds_tensor.numel(), p.data.numel()) for n, p in model.named_parameters()},
            {n: str(b.device) for n, b in model.named_buffers()})


def test_zero3_model_is_built_partitioned(pool2):
    """Under zero.Init every parameter is partitioned as its module is built: a rank holds ~1/2 of each
    (the whole model never exists on one rank). The losses of such runs equal ZeRO-0's (test_training).
    The buffers (the dropout sites' keys) are on the training device: DeepSpeed moves no zero.Init model."""
    ranks = pool2.run(_build_zero3_model)
    params, buffers = ranks[0]
    assert params.keys() == ranks[1][0].keys() and len(params) > 10
    for name, (numel, local, placeholder) in params.items():
        assert placeholder == 0 and local == -(-numel // 2), name
    assert len(buffers) > 10 and set(buffers.values()) == {"meta"}, buffers


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK='': expected a whole"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "one"}, "LOCAL_RANK='one': expected a whole number >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "x"}, "LOCAL_WORLD_SIZE='x': expected"),
    ({"RANK": "", "WORLD_SIZE": "2"}, "RANK='': expected a whole number >= 0"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK='2': expected a number below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0': expected a whole number >= 1"),
    # Ranks started without RANK would each train alone, as rank 0 of 1, into one run directory:
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE='2' but RANK is not set"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, "PMI_SIZE='4' but RANK is not set"),  # (MPICH's, Intel MPI's mpirun)
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "1"}, "WORLD_SIZE='4' but RANK is not set"),
    # A launcher that sets RANK but not LOCAL_RANK, on a node of 2 GPUs: every rank drove GPU 0.
    ({"RANK": "1", "WORLD_SIZE": "4"}, "RANK is set but LOCAL_RANK is not, and this process sees 2 GPUs"),
])
def test_a_launchers_malformed_variable_is_named_before_joining(env, message, monkeypatch):
    """What int() said was "invalid literal for int() with base 10: ''", naming no variable; what mpirun starts
    (no RANK) made N one-process runs."""
    joined = _joining(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"MASTER_ADDR": "a", "MASTER_PORT": "1", **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(state.LaunchError, match=re.escape(message)):
        state.init_distributed()
    assert joined == []
    assert isinstance(state.LaunchError("x"), state.DeviceError)  # (commands report it in one line)


def test_a_single_process_mpirun_makes_its_own_group(monkeypatch):
    joined = _joining(monkeypatch)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    state.init_distributed()
    assert joined[0][1]["WORLD_SIZE"] == "1"
