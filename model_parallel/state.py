"""Process groups and seeds: torch.distributed + megatron-core `parallel_state`, on GPU or CPU.

    from model_parallel.state import init_parallel, seed_everything
    init_parallel(tp=2, pp=1)        # under torchrun; a plain `python` gets a one-process group
    seed_everything(1234)

Rank order (megatron-core's, which DeepSpeed's topology follows too): TP fastest, then DP, then PP.
On a machine without CUDA the backend is gloo and `cpu_compat` is applied first.
"""
from __future__ import annotations

import contextlib
import gc
import os
import random
import socket
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist

from model_parallel.cpu_compat import apply_cpu_compat
from model_parallel.layout import ParallelConfig, ParallelLayout


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive ports nothing listens on now, for a rendezvous (or daemons: the local SLURM
    cluster's) that processes started after this will bind. Taken below the kernel's ephemeral range
    (ip_local_port_range, 32768 up by default): a port the kernel handed out (bind to 0) went back to that range at
    once, where the outgoing connections of other processes (gloo's, a second test worker's) could take it before
    the rendezvous bound it (EADDRINUSE, seen in CI); a single one from the range when none below is free."""
    low = _ephemeral_ports_start() - count + 1  # (the last of the ports below the range too)
    for port in random.sample(range(20000, low), min(64, max(0, low - 20000))):
        with contextlib.ExitStack() as bound:
            try:
                for p in range(port, port + count):
                    bound.enter_context(socket.socket()).bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    if count > 1:
        raise RuntimeError(f"no {count} consecutive free ports below the ephemeral range ({low + count - 1})")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_ports_start() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768, its default, where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """torch.distributed's variables from SLURM's, for a task of `srun` with one task per GPU (no torchrun):
    RANK, WORLD_SIZE, LOCAL_RANK from SLURM_PROCID/STEP_NUM_TASKS/LOCALID; MASTER_ADDR the job's first node;
    MASTER_PORT (unless set) from the job and step ids, as the slurm/*.sbatch scripts derive theirs, so jobs
    sharing a node do not meet on one port. None outside a job step: a batch or salloc shell sets SLURM_PROCID
    and SLURM_NTASKS too (the allocation's), but no SLURM_STEP_ID, and a command run there is one process
    (it waited for ranks that never came)."""
    env = os.environ if env is None else env
    if "SLURM_STEP_ID" not in env or "SLURM_JOB_NODELIST" not in env:
        return None
    tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = env_int(tasks, env, minimum=1)
    found = {"RANK": str(env_int("SLURM_PROCID", env, below=(tasks, world))), "WORLD_SIZE": str(world),
             "LOCAL_RANK": str(env_int("SLURM_LOCALID", env))}
    if "MASTER_PORT" not in env:
        # (below Linux's ephemeral ports, 32768 and up, which the node hands out to any connection)
        found["MASTER_PORT"] = str(10000 + (env_int("SLURM_JOB_ID", env) * 997 + env_int("SLURM_STEP_ID", env)) % 22000)
    if "MASTER_ADDR" not in env:  # (scontrol only when needed: a container may have none)
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                                 capture_output=True, text=True, check=False)
        except OSError as e:
            raise LaunchError(f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r}: its first node (MASTER_ADDR) "
                              f"could not be asked of scontrol ({e}); export MASTER_ADDR") from None
        nodes = out.stdout.split()
        if out.returncode != 0 or not nodes:
            raise LaunchError(f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r}: scontrol show hostnames failed "
                              f"({out.stderr.strip() or 'no node'}); export MASTER_ADDR")
        found["MASTER_ADDR"] = nodes[0]
    return {**{k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT") if k in env}, **found}


# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA toolkit release notes,
# "minimum required driver version"); a torch build for CUDA 13 sees no GPU on a 570 driver.
MIN_DRIVER_FOR_CUDA = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def driver_version() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it, or None when there is no working driver."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def no_gpu_reason(driver: str | None = None) -> str:
    """Why this torch sees no GPU, as precisely as can be told: no CUDA build, no driver, a driver
    older than the build needs, or GPUs hidden from the process."""
    cuda = torch.version.cuda
    build = f"torch {torch.__version__} (built for CUDA {cuda or 'none'})"
    if not cuda:
        return f"{build} has no CUDA support: install a CUDA build of torch"
    needed = MIN_DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]))
    need = f"; CUDA {cuda} needs NVIDIA driver >= {needed}" if needed else ""
    if driver is None:
        return (f"{build} sees no GPU and no NVIDIA driver answers (nvidia-smi){need}. Under SLURM, request "
                "GPUs (--gpus-per-node / --gpus-per-task): a job that asked for none may see none")
    if needed and _version_tuple(driver) < _version_tuple(needed):
        return f"{build} sees no GPU: this machine's NVIDIA driver is {driver}{need}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{build} sees no GPU although driver {driver} is installed"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))


class DeviceError(RuntimeError):
    """The device asked for cannot be used (commands report it in one line)."""


class LaunchError(DeviceError):
    """The launcher's variables (torchrun's, srun's) name no process group this process can join (reported in
    one line, as a DeviceError is)."""


def env_int(name: str, env=None, minimum: int = 0, below: tuple[str, int] | None = None) -> int:
    """The whole number a launcher put in environment variable `name`, or a LaunchError naming the variable, its
    value and what was expected (int() said only "invalid literal for int() with base 10: ''"). `below`: the
    variable (name, value) it must be less than (a rank: the world size)."""
    env = os.environ if env is None else env
    value = env.get(name)
    if value is None:
        raise LaunchError(f"{name} is not set: expected a whole number >= {minimum}")
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise LaunchError(f"{name}={value!r}: expected a whole number >= {minimum}")
    if below is not None and number >= below[1]:
        raise LaunchError(f"{name}={value!r}: expected a number below {below[0]}={below[1]}")
    return number


# The launchers that start ranks without torchrun's variables: their world size (mpirun: OpenMPI's, MPICH's and
# Intel MPI's PMI, MVAPICH's), also what `deepspeed --launcher openmpi|mvapich` starts.
FOREIGN_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def use_device(wanted: str = "auto", key: str = "device") -> str:
    """'cuda' or 'cpu' for this process, as `train.device` asks (auto | cuda | cpu). Call it before
    anything touches CUDA: 'cpu' hides the GPUs (CUDA_VISIBLE_DEVICES) so that every part of the
    system, DeepSpeed's accelerator included, takes its CPU path; 'cuda' without a usable GPU is an
    error that says why (a torch build newer than the driver otherwise falls back to CPU silently)."""
    if wanted not in ("auto", "cuda", "cpu"):
        raise ValueError(f"{key} {wanted!r}: expected auto, cuda or cpu")
    if wanted == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
        if torch.cuda.is_available():
            raise DeviceError(f"{key} cpu: CUDA was initialised before the device was chosen, so the GPUs "
                               "cannot be hidden any more; start the process with CUDA_VISIBLE_DEVICES=")
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise DeviceError(f"{key} cuda was asked for, but {no_gpu_reason(driver_version())}")
    return "cpu"


def local_device_index(visible: int, local_rank: int, local_world: int | None = None) -> int:
    """The GPU this process drives among the `visible` ones: its LOCAL_RANK where every process of a node
    sees all of the node's GPUs (torchrun), 0 where each sees just its own (srun --gpus-per-task=1).
    `local_world`: the processes torchrun started on this node (LOCAL_WORLD_SIZE; None under a bare srun),
    which all see these GPUs: more of them than GPUs would share one, which NCCL refuses (later, and less
    clearly: "Duplicate GPU detected")."""
    if local_world is not None and local_world > visible:
        raise RuntimeError(f"{local_world} processes on this node (LOCAL_WORLD_SIZE) but {visible} visible GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): NCCL needs a "
                           "GPU of its own per process; start as many as there are GPUs (torchrun --nproc_per_node), "
                           "or train on the CPU (train.device=cpu)")
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise RuntimeError(f"LOCAL_RANK={local_rank}, but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per visible GPU")


_OWN_GROUP_VARS: dict[str, str] = {}  # what init_distributed wrote into os.environ for a one-process group


def child_environment(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess (torchrun, another CLI) without the variables of this process's own
    one-process group: a child that inherited them would try to join it, or to bind its port."""
    env = {k: v for k, v in os.environ.items() if _OWN_GROUP_VARS.get(k) != v}
    return {**env, **extra}


_FORKS_FREEZE = {"registered": False}


def freeze_collections_across_forks() -> None:
    """Forked children (the data loaders' workers, megatron-core's checkpoint writers, the checkpoint results
    queue's server) must never finalize the parent's objects. Their garbage collector would, for the parent's
    cyclic garbage, and a gloo process group finalized there joins threads the child does not have: it hung for
    good or crashed (SIGSEGV in a DataLoader worker, its trainer's peers then waiting in a collective). So the
    parent's objects are frozen while it forks (gc.freeze: out of the collector's reach, in the child for good)
    and thawed in the parent, which collects its garbage itself. Once per process."""
    if not _FORKS_FREEZE["registered"]:
        os.register_at_fork(before=gc.freeze, after_in_parent=gc.unfreeze)
        _FORKS_FREEZE["registered"] = True


def init_distributed(timeout_minutes: int = 30) -> None:
    """Join the process group named by torchrun's (or the deepspeed launcher's) variables, by SLURM's
    under a bare srun, or make a one-process group (and protect the groups from forked children:
    freeze_collections_across_forks). `timeout_minutes`: how long a collective may wait for the other ranks
    before it fails (train.dist_timeout_minutes)."""
    freeze_collections_across_forks()
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and (slurm := slurm_environment()) is not None:
        os.environ.update(slurm)
    if "RANK" not in os.environ:
        # Ranks started without RANK (mpirun, or WORLD_SIZE exported by hand) would each train alone, as rank 0 of
        # a group of their own, all writing one run directory.
        for name in ("WORLD_SIZE", *FOREIGN_WORLD_SIZES):
            if name in os.environ and os.environ[name].strip() not in ("", "1"):
                raise LaunchError(f"{name}={os.environ[name]!r} but RANK is not set: this process would train alone "
                                  "as rank 0 of 1; start the ranks with torchrun (or srun, one task per GPU)")
        own = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        own["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
        _OWN_GROUP_VARS.update(own)
        os.environ.update(own)
    world = env_int("WORLD_SIZE", minimum=1)
    env_int("RANK", below=("WORLD_SIZE", world))
    if torch.cuda.is_available():
        local_world = os.environ.get("LOCAL_WORLD_SIZE")
        if "LOCAL_RANK" not in os.environ and world > 1 and torch.cuda.device_count() > 1:
            # (a launcher that sets RANK but not LOCAL_RANK: every rank of a node would drive its GPU 0)
            raise LaunchError(f"RANK is set but LOCAL_RANK is not, and this process sees {torch.cuda.device_count()} "
                              "GPUs: each rank of a node would use the first one; set LOCAL_RANK (0 for one process "
                              "per node), or start the ranks with torchrun or srun")
        local_rank = env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        index = local_device_index(torch.cuda.device_count(), local_rank,
                                   env_int("LOCAL_WORLD_SIZE", minimum=1) if local_world else None)
        torch.cuda.set_device(index)
        # DeepSpeed's engine calls set_device(int(os.environ["LOCAL_RANK"])) itself: make it the same GPU.
        os.environ["LOCAL_RANK"] = str(index)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def init_parallel(tp: int = 1, pp: int = 1, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed and megatron-core's TP/PP/DP groups (idempotent for the same layout).
    Another layout replaces the groups: megatron's old ones, and any other group still alive, are destroyed."""
    from megatron.core import parallel_state as ps

    apply_cpu_compat()
    init_distributed(timeout_minutes)
    ParallelLayout.of(ParallelConfig(tp=tp, pp=pp), dist.get_world_size())  # its rules, stated there
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) == (tp, pp):
            return
        ps.destroy_model_parallel()  # (megatron forgets its groups, but does not destroy them)
        destroy_groups(process_groups())
    # No gloo twins of the data-parallel groups: only megatron's own optimizer uses them (DeepSpeed's is used
    # here), and each costs every rank a TCP connection to each peer (127 at DP=128) and threads at start.
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 create_gloo_process_groups=False, distributed_timeout_minutes=timeout_minutes)


def process_groups() -> set:
    """Every torch.distributed group this process holds, the default (world) group excepted. (torch has no
    public list of them: this reads its registry.)"""
    from torch.distributed import distributed_c10d as c10d

    return {group for group in c10d._world.pg_map if group is not c10d.GroupMember.WORLD}


def destroy_groups(groups) -> None:
    """Destroy process groups nothing will use again. Each gloo group keeps threads that wake on their own
    (a CPU process that built ~50 layouts spent a third of a core on them while idle); NCCL groups hold
    GPU memory and communicators. In the order of their names (as torch's own destroy_process_group() of
    all groups does: ncclCommAbort was collective in some NCCL versions), the same on every rank, not a set's."""
    from torch.distributed import distributed_c10d as c10d

    for group in sorted(groups, key=lambda g: c10d._world.pg_names[g]):
        dist.destroy_process_group(group)


def tensor_parallel_group():
    """This rank's tensor-parallel group, from megatron-core's `parallel_state` (after `init_parallel`):
    the one place it is read from there; the model and its layers get it passed in
    (ParallelLayout.tp_group, PartiModel(tp_group=...))."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def seed_everything(seed: int) -> None:
    """Seed the default generators and megatron's named RNG streams, from `seed` + 100 x the pipeline rank
    (as Megatron-LM does): each stage's layers draw their own masks, not those of the stage before.

    The 'model-parallel-rng' stream differs per TP rank (dropout on split heads); the default stream
    is shared by a TP group (dropout on replicated activations must agree). Data order is seeded
    separately by the sampler, so DP ranks may share this seed.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    seed += 100 * ps.get_pipeline_model_parallel_rank()
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

