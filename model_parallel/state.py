"""Process groups and seeds: torch.distributed + megatron-core `parallel_state`, on GPU or CPU.

    from model_parallel.state import init_parallel, seed_everything
    init_parallel(tp=2, pp=1)        # under torchrun; a plain `python` gets a one-process group
    seed_everything(1234)

Rank order (megatron-core's, which DeepSpeed's topology follows too): TP fastest, then DP, then PP.
On a machine without CUDA the backend is gloo and `cpu_compat` is applied first.
"""
from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist

from model_parallel.cpu_compat import apply_cpu_compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's variables from SLURM's, for `srun` with one task per GPU (no torchrun):
    RANK, WORLD_SIZE, LOCAL_RANK from SLURM_PROCID/NTASKS/LOCALID; MASTER_ADDR the job's first node."""
    env = os.environ if env is None else env
    first_node = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                                check=True, capture_output=True, text=True).stdout.split()[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": env.get("MASTER_ADDR", first_node), "MASTER_PORT": env.get("MASTER_PORT", "29500")}


_OWN_GROUP_VARS: dict[str, str] = {}  # what init_distributed wrote into os.environ for a one-process group


def child_environment(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess (torchrun, another CLI) without the variables of this process's own
    one-process group: a child that inherited them would try to join it, or to bind its port."""
    env = {k: v for k, v in os.environ.items() if _OWN_GROUP_VARS.get(k) != v}
    return {**env, **extra}


def init_distributed(timeout_minutes: int = 30) -> None:
    """Join the process group named by torchrun's (or the deepspeed launcher's) variables, by SLURM's
    under a bare srun, or make a one-process group."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        os.environ.update(slurm_environment())
    if "RANK" not in os.environ:
        own = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        own["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
        _OWN_GROUP_VARS.update(own)
        os.environ.update(own)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def init_parallel(tp: int = 1, pp: int = 1) -> None:
    """Initialise torch.distributed and megatron-core's TP/PP/DP groups (idempotent for the same layout)."""
    from megatron.core import parallel_state as ps

    apply_cpu_compat()
    init_distributed()
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def seed_everything(seed: int) -> None:
    """Seed the default generators (same on every rank) and megatron's named RNG streams.

    The 'model-parallel-rng' stream differs per TP rank (dropout on split heads); the default stream
    is shared by a TP group (dropout on replicated activations must agree). Data order is seeded
    separately by the sampler, so DP ranks may share this seed.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = ps.get_tensor_model_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + tp_rank)

