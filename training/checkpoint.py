"""Checkpoints that resume on any layout: megatron-core dist_checkpointing of weights and optimizer state.

    save(engine, cfg, run_dir, step, trainer_state, keep=3)
    tag = latest_tag(run_dir)                         # None when there is no complete checkpoint
    trainer_state = load(engine, cfg, run_dir, tag)   # at this run's TP/PP/DP/ZeRO layout

Why dist_checkpointing rather than DeepSpeed's own checkpoints: DeepSpeed's native files are tied to the
DP size and, under a pipeline, to per-layer files; its universal conversion is an offline step and
needs TP patterns per parameter. megatron-core's dist_checkpointing stores each tensor once with its
global shape and the offsets of every shard, and reshards on load, so a checkpoint saved at
TP=2 x PP=2 x DP=2 loads at TP=1 x PP=1 x DP=1 (and back). What goes in:
- for every parameter, under its PartiModel name (the same at any PP, see `piece_names`): the fp32
  master weight and the optimizer state (AdamW's `exp_avg`, `exp_avg_sq`; Adafactor's statistics),
  assembled over ZeRO partitions with DeepSpeed's `safe_get_full_*` API and sharded over TP by
  megatron-core's `partition_dim` attribute (Adafactor's row/column statistics exist only per TP
  shard: they are stored per TP rank and reload at the same TP size);
- trainer_state.json: step, consumed samples (the sampler's state), optimizer step count, LR
  schedule, skipped steps, world layout, the resolved config;
- rng_rank{r}.pt: each rank's RNG states (restored only when the layout is unchanged).

Layout: run_dir/checkpoints/step_00000100/ and run_dir/checkpoints/latest, a one-line file naming the
newest complete tag, replaced atomically (write + rename) by rank 0 after every rank finished writing,
so a run killed while saving resumes from the previous checkpoint. A tag is complete when its
trainer_state.json exists (written last, atomically); `resume_tag` falls back to the newest complete
tag when `latest` is missing. A save that fails (a full disk) removes its partial folder, leaves
`latest` where it was and raises CheckpointError naming the cause.

Safety of what is read back: `verify` checks a checkpoint before anything is built: the tensor index
`.metadata` (a pickle that torch.distributed.checkpoint unpickles unrestricted) is first read with an
unpickler that admits only its own record classes, each `.distcp` file must hold every record the index
places in it, and rng_rank*.pt files load with torch.load(weights_only=True): a crafted file is
refused, naming it, instead of running code.

Checkpoints carry the id of the run that wrote them (`run_id`, kept over resumes): pruning deletes only
older complete checkpoints of the same run (and leftovers of killed saves), never another run's.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common.config import to_dict

OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (busy, or holding a run that would be overwritten);
    the message is one line naming the file and what to do."""


class CheckpointError(RunDirError):
    """A checkpoint cannot be read or written; the message is one line naming the file and the cause."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


TAG = re.compile(r"step_(\d+)")


def step_of(tag: str) -> int | None:
    match = TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def step_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder, complete or not, oldest first."""
    root = checkpoint_dir(run_dir)
    found = [(step_of(p.name), p) for p in root.glob("step_*") if p.is_dir()] if root.is_dir() else []
    return sorted((step, p) for step, p in found if step is not None)


def complete_tags(run_dir: str | Path) -> list[str]:
    return [p.name for _, p in step_folders(run_dir) if is_complete(p)]


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether the run directory holds a `latest` pointer or any step folder (complete or not)."""
    return (checkpoint_dir(run_dir) / "latest").exists() or bool(step_folders(run_dir))


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag `checkpoints/latest` names; None when there is no pointer. A pointer that is not one line
    naming a complete step folder raises CheckpointError (one line, naming the file)."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    complete = complete_tags(run_dir)
    hint = (f"delete it to resume from the newest complete checkpoint ({complete[-1]})" if complete
            else "no complete checkpoint is left")
    try:
        raw = pointer.read_bytes()
        tag = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot be read as text ({_one_line(e)}); expected one line naming a "
                              f"checkpoint folder such as {tag_for(100)}; {hint}") from None
    if step_of(tag) is None:
        raise CheckpointError(f"{pointer}: expected one line naming a checkpoint folder such as {tag_for(100)}, "
                              f"found {tag[:60]!r}; {hint}")
    if not is_complete(checkpoint_dir(run_dir) / tag):
        raise CheckpointError(f"{pointer} names {tag}, but {checkpoint_dir(run_dir) / tag} is missing or incomplete "
                              f"(no trainer_state.json); {hint}")
    return tag


def resume_tag(run_dir: str | Path) -> tuple[str | None, str | None]:
    """(the tag to resume from or None, a note for the log or None): `latest`'s tag; when there is no
    `latest` (deleted, or lost with the file system's metadata) the newest complete step folder."""
    tag = latest_tag(run_dir)
    if tag is not None:
        return tag, None
    complete, folders = complete_tags(run_dir), step_folders(run_dir)
    pointer = checkpoint_dir(run_dir) / "latest"
    if complete:
        incomplete = [p.name for step, p in folders if p.name not in complete and step > step_of(complete[-1])]
        skipped = f" (skipping incomplete {', '.join(incomplete)})" if incomplete else ""
        return complete[-1], (f"{pointer} is missing: resuming from the newest complete checkpoint "
                              f"{checkpoint_dir(run_dir) / complete[-1]}{skipped}")
    if folders:
        return None, (f"{checkpoint_dir(run_dir)} holds only incomplete checkpoints "
                      f"({', '.join(p.name for _, p in folders)}): starting at step 0")
    return None, None


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read_trainer_state(path: Path) -> dict:
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot be read ({_one_line(e)}); expected the JSON trainer state "
                              "written with the checkpoint") from None
    missing = [key for key in ("step", "consumed_samples", "lr_scheduler", "optimizer_steps", "layout")
               if key not in state] if isinstance(state, dict) else ["(not an object)"]
    if missing:
        raise CheckpointError(f"{file}: not a trainer state (missing {', '.join(missing)})")
    return state


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint's files before anything is built from them


class _IndexUnpickler(pickle.Unpickler):
    """Reads torch.distributed.checkpoint's `.metadata` admitting only its record classes (dataclasses
    and enums of torch.distributed.checkpoint.metadata/planner, the filesystem writer's _StorageInfo),
    torch.Size, dtypes and layouts; anything else (builtins.exec, os.system, ...) is refused unrun."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        import dataclasses
        import enum
        import importlib

        allowed = False
        if module in self.MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            allowed = isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        elif (module, name) in (("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")):
            allowed = True
        elif module == "torch":
            allowed = isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_index(path: Path):
    """The torch.distributed.checkpoint Metadata of a checkpoint folder, read safely."""
    file = path / ".metadata"
    try:
        with open(file, "rb") as f:
            return _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "refused global" in str(e):
            raise CheckpointError(f"{file}: the tensor index would import {str(e).split('refused global ')[1]} "
                                  "when read (it may run code); refusing to load it (an index holds only "
                                  "torch.distributed.checkpoint records)") from None
        raise CheckpointError(f"{file}: corrupt tensor index ({_one_line(e)})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise CheckpointError(f"{file}: cannot read the tensor index ({type(e).__name__}: {_one_line(e)}); "
                              "expected torch.distributed.checkpoint's .metadata") from None


def load_rng_file(file: Path) -> dict:
    """A rng_rank*.pt file, loaded with weights_only=True (tensors and plain containers only)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, OSError
        text = _one_line(e)
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsupported:  # (torch names builtins without their module)
            name = unsupported.group(1) if "." in unsupported.group(1) else f"builtins.{unsupported.group(1)}"
            text = f"it would import {name} when loaded, which may run code"
        raise CheckpointError(f"{file}: not a plain RNG-state file ({text}); refusing to load it "
                              "(torch.load weights_only=True)") from None
    if not (isinstance(state, dict) and torch.is_tensor(state.get("torch")) and isinstance(state.get("tracker"), dict)):
        raise CheckpointError(f"{file}: expected {{'torch': ByteTensor, 'tracker': {{name: ByteTensor}}}}, "
                              f"found {type(state).__name__}")
    return state


ZIP_RECORD = b"PK\x03\x04"  # torch.save's zip archive: every tensor record of a .distcp starts with one


def verify(path: Path) -> None:
    """Refuse (CheckpointError naming the file) a checkpoint folder whose files cannot be what its index
    says: index unreadable or unsafe, a .distcp file missing, shorter than its records reach, or without
    a tensor record where one should start; an RNG file that is not plain tensors. Reads the index, a
    few bytes per record and the small RNG files. (Bit flips inside a tensor's bytes are not detected:
    the format has no checksums.)"""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = read_index(path)
    files: dict[str, list[tuple[int, int, bool]]] = {}
    for where, info in getattr(index, "storage_data", {}).items():
        tensor = isinstance(index.state_dict_metadata.get(where.fqn), TensorStorageMetadata)
        plain = tensor and not getattr(info, "transform_descriptors", None)
        files.setdefault(info.relative_path, []).append((info.offset, info.length, plain))
    for name, records in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (the tensor index {path / '.metadata'} places records in it)")
        size, end = file.stat().st_size, max(offset + length for offset, length, _ in records)
        if size < end:
            raise CheckpointError(f"{file} is truncated: {size} bytes, its tensor index expects {end}")
        with open(file, "rb") as f:
            for offset, _, plain in sorted(records):
                f.seek(offset)
                if plain and f.read(4) != ZIP_RECORD:
                    raise CheckpointError(f"{file} is corrupt: no tensor record at byte {offset}, where its tensor "
                                          "index places one")
    for file in sorted(path.glob("rng_rank*.pt")):
        load_rng_file(file)


# ---------------------------------------------------------------------------------------------
# One run per run directory


class RunLock:
    """An exclusive lock on run_dir/.lock for a run's life, taken by rank 0 (the rank that writes the
    config, metrics, pointer and prunes): a second run started in the same run directory fails at once,
    naming the holder (pid, host, start time, written into the file).

    fcntl.flock: the kernel releases the lock when the holder's last file descriptor closes, i.e. when
    the process dies however it dies (SIGKILL, OOM, node reboot for local disks), so a stale .lock of a
    dead run never blocks, and a SLURM requeue of the same job (its previous processes are dead by then)
    takes it again. Child processes forked while it is held (checkpoint writer workers) share it until
    they exit. Limits: on a local disk it is exact. On NFS, Linux implements flock with NFS byte-range
    locks: it works across clients, but the lock of a crashed client is released only when the server's
    lease/grace period ends (~90 s for NFSv4), so a requeue right after a node failure may be refused for
    that long. Lustre mounted without `-o flock` (or with `localflock`) and other file systems without
    flock make the call fail or lock only per node: the run then goes on with a warning and nothing
    stops a second run on another node."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None
        self.warning: str | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise RunDirError(f"cannot use {self.path.parent} as the run directory: {e.strerror} "
                              f"({e.filename or self.path})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = " ".join(f.read().split()) or "holder unknown"
            f.close()
            raise RunDirError(f"{self.path} is held by another run ({holder}): two runs must not write to one run "
                              "directory; wait for it to end, stop it, or use another --run-dir") from None
        except OSError as e:
            f.close()
            self.warning = (f"warning: cannot lock {self.path} ({e.strerror}; a file system without flock): "
                            "nothing stops a second run from writing to this run directory")
            return self
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        import fcntl

        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "config_history", "tensorboard", "REQUEUE")


def set_aside(run_dir: str | Path) -> Path | None:
    """Move a previous run's files (RUN_FILES) into run_dir/replaced_<time>/ for `--resume overwrite`:
    renamed, not deleted, so no complete checkpoint of that run is lost. Returns the folder (None when
    there was nothing to move)."""
    run_dir = Path(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"replaced_{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"replaced_{stamp}_{n}"
    dest.mkdir()
    for name in present:
        os.replace(run_dir / name, dest / name)
    return dest


# ---------------------------------------------------------------------------------------------
# Parameters by layout-independent name, and their shards


def canonical_parameters(module: torch.nn.Module, model_cfg) -> dict[str, torch.nn.Parameter]:
    """PartiModel's parameter names for the parameters this rank holds (pipeline layer k -> piece k)."""
    from deepspeed.pipe import PipelineModule

    from model_parallel.model import piece_names

    if not isinstance(module, PipelineModule):
        return dict(module.named_parameters())
    names = piece_names(model_cfg)
    out = {}
    for name, p in module.named_parameters():
        index, rest = name.split(".", 1)
        out[f"{names[int(index)]}.{rest}"] = p
    return out


def local_shape(p: torch.nn.Parameter) -> torch.Size:
    """This TP rank's shape of a parameter (ZeRO-3 leaves only a placeholder in p.data)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def sharded(key: str, tensor: torch.Tensor, p: torch.nn.Parameter, per_tp_rank: bool = False):
    """A dist_checkpointing ShardedTensor: split along `partition_dim` over TP, replicated over DP.
    `per_tp_rank`: a statistic that only exists per TP shard, stored with a leading TP axis (it
    reloads at the same TP size only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedTensor

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    if per_tp_rank:
        return ShardedTensor.from_rank_offsets(key, tensor, (0, tp_rank, tp_size), replica_id=dp_rank,
                                               prepend_axis_num=1)
    if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
        return ShardedTensor.from_rank_offsets(key, tensor, (p.partition_dim, tp_rank, tp_size), replica_id=dp_rank)
    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(tp_rank, dp_rank))


# ---------------------------------------------------------------------------------------------
# Full (over ZeRO partitions) fp32 weights and moments, read and written through DeepSpeed's API


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO/bf16 wrapper (or the client optimizer itself)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _optimizer_holder(engine, p) -> tuple[torch.Tensor, int | None]:
    """(the tensor the torch optimizer updates for p, p's offset in it or None when it is p's alone).
    DeepSpeed's ZeRO-0 bf16/fp16 wrappers keep an fp32 master per parameter (FP16_UnfusedOptimizer:
    `fp32_groups`) or, for apex's and DeepSpeed's FusedAdam, one flat fp32 tensor per group
    (FP16_Optimizer: `fp32_groups_flat`, the group's parameters concatenated in order); without a
    wrapper the optimizer updates p itself."""
    opt = engine.optimizer
    if not hasattr(opt, "_holder_by_param"):
        table = {}
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups_flat"):
            for lps, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offset = 0
                for lp in lps:
                    table[id(lp)] = (flat, offset)
                    offset += lp.numel()
        elif hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
            table = {id(lp): (hp, None) for lps, hps in zip(opt.fp16_groups, opt.fp32_groups)
                     for lp, hp in zip(lps, hps)}
        opt._holder_by_param = table
    return opt._holder_by_param.get(id(p), (p, None))


def _view(tensor: torch.Tensor, offset: int | None, p) -> torch.Tensor:
    """p's part of `tensor` (the whole tensor when offset is None), shaped like p."""
    return tensor if offset is None else tensor.view(-1).narrow(0, offset, p.numel()).view(p.shape)


def optimizer_state_specs(engine, p) -> list[tuple[str, bool, tuple]]:
    """(state key, stored per TP rank, this rank's shape) of p's optimizer state. Adam's moments have
    p's shape; Adafactor's row/column statistics of a matrix are means over this rank's shard only."""
    shape = tuple(local_shape(p))
    if isinstance(base_optimizer(engine), torch.optim.Adafactor):
        if len(shape) > 1:
            return [("row_var", True, shape[:-1] + (1,)), ("col_var", True, shape[:-2] + (1,) + shape[-1:])]
        return [("variance", False, shape)]
    return [(key, False, shape) for key in OPTIMIZER_MOMENTS]


def _get_full(engine, p, key: str | None, shape=None) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if value is None:  # ZeRO-0: the fp32 master (or the fp32 parameter itself) and the optimizer's state
        holder, offset = _optimizer_holder(engine, p)
        if key is None and holder.dtype != torch.float32:
            raise RuntimeError(f"no fp32 master weight found for a {holder.dtype} parameter of shape "
                               f"{tuple(p.shape)} in {type(engine.optimizer).__name__}: saving it would lose "
                               "precision")
        value = _view(holder.detach() if key is None else base_optimizer(engine).state[holder][key], offset, p)
    return value.detach().float().cpu().reshape(shape or local_shape(p))


def _set_full(engine, p, key: str | None, value: torch.Tensor) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        if key is None:
            safe_set_full_fp32_param(p, value.to(p.device))
            # The low-precision working copy is refreshed from the master only at the next step.
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                with torch.no_grad():
                    p.data.copy_(value.reshape(p.data.shape).to(p.dtype))
        else:
            safe_set_full_optimizer_state(p, value.to(p.device), key)
        return
    holder, offset = _optimizer_holder(engine, p)
    targets = ([p.data, _view(holder.data, offset, p)] if key is None
               else [_view(base_optimizer(engine).state[holder][key], offset, p)])
    with torch.no_grad():
        for target in targets:
            target.copy_(value.reshape(target.shape).to(target.dtype))


def _ensure_optimizer_state(engine) -> None:
    """Create Adam's per-parameter state, which appears only at the first step, so that a load can
    overwrite it: zero moments and a step counter for every tensor the optimizer updates (ZeRO-3 keeps
    those in fp32_partitioned_groups_flat, the others in param_groups). The counter is a tensor for
    torch's optimizers and an int for DeepSpeed's FusedAdam, which creates its own only for an empty
    state and passes it to its kernel as a number; apex's FusedAdam keeps its count in the param group
    only (`_set_optimizer_step_count` sets it there), so its state gets none."""
    base = base_optimizer(engine)
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    holders = list(flat) if flat is not None else [p for g in base.param_groups for p in g["params"]]
    fused = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for p in holders:
        if base.state.get(p):  # (state is a defaultdict: test for content)
            continue
        if isinstance(base, torch.optim.Adafactor):
            state = {key: p.new_zeros(shape) for key, _, shape in optimizer_state_specs(engine, p)}
        else:
            state = {key: torch.zeros_like(p, memory_format=torch.preserve_format) for key in OPTIMIZER_MOMENTS}
        if isinstance(base, torch.optim.Adam | torch.optim.AdamW | torch.optim.Adafactor):
            state["step"] = torch.tensor(0.0, device=p.device if fused else "cpu")
        elif not _counts_steps_in_groups(base):
            state["step"] = 0
        base.state[p] = state
    _link_optimizer_fragments(engine)


def _link_optimizer_fragments(engine) -> None:
    """ZeRO-1/2 and bf16 keep per-parameter views into the flat optimizer state, made once and possibly
    before the state existed (then empty); remake them so that safe_get/set_full_optimizer_state work."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _counts_steps_in_groups(optimizer) -> bool:
    """apex's FusedAdam keeps Adam's step count in each param group, not in the per-tensor state."""
    return type(optimizer).__module__.startswith("apex.")


def _optimizer_step_count(engine) -> int:
    """Adam's step count (its bias correction), the largest count the optimizer holds: torch's optimizers
    keep it per tensor in the state, all equal; apex's FusedAdam per param group; DeepSpeed's FusedAdam
    per tensor too, but it advances only the state of the last parameter of each group that has a
    gradient and passes that count to its kernel for the whole group (the others keep the count they
    were created with, `group.get('step', 0)`, and the group holds a 0), so the first count found can
    be 0 when the optimizer updates separate tensors (fp32 at ZeRO-0)."""
    base = base_optimizer(engine)
    counts = [int(holder["step"]) for holder in (*base.state.values(), *base.param_groups) if "step" in holder]
    return max(counts, default=0)


def _set_optimizer_step_count(engine, count: int) -> None:
    """Restore the step count wherever the optimizer keeps it; apex's FusedAdam keeps it in the param
    group (created at its first step), so it is set there too: otherwise Adam's bias correction would
    restart at every resume and the first update be ~2x too large."""
    def same_kind(old, new: int):  # a tensor keeps its dtype, device and shape (apex's capturable: [1])
        return torch.full_like(old, new) if torch.is_tensor(old) else new

    base = base_optimizer(engine)
    for state in base.state.values():
        if "step" in state:
            state["step"] = same_kind(state["step"], count)
    apex = _counts_steps_in_groups(base)
    for group in base.param_groups:
        if "step" in group or apex:
            group["step"] = same_kind(group.get("step", 0), count)


def _state_dict(engine, model_cfg, tensors: bool):
    """{'model': {name: ShardedTensor}, 'optimizer': {moment: {name: ShardedTensor}}} for this rank;
    with tensors=False the ShardedTensors hold empty buffers to be filled by a load."""
    params = canonical_parameters(engine.module, model_cfg)
    if tensors:
        _link_optimizer_fragments(engine)
    value = (lambda p, key, shape: _get_full(engine, p, key, shape)) if tensors else \
        (lambda p, key, shape: torch.empty(shape, dtype=torch.float32))
    state = {"model": {n: sharded(f"model.{n}", value(p, None, local_shape(p)), p) for n, p in params.items()},
             "optimizer": {}}
    for n, p in params.items():
        for key, per_tp_rank, shape in optimizer_state_specs(engine, p):
            state["optimizer"][f"{key}.{n}"] = sharded(f"optimizer.{key}.{n}", value(p, key, shape), p, per_tp_rank)
    return state, params


# ---------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size()}


def _from_rank0(value):
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_of_all(value):
    """The first rank's non-empty `value` (None when every rank has none), on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return next((v for v in out if v), None)


def _cause(e: BaseException) -> str:
    """One line for why a write failed: the OSError's own text when one is in the chain (also inside
    torch.distributed.checkpoint's CheckpointException, which carries each rank's failure, and in
    messages that only quote it, '[Errno 28] ...' after crossing a process boundary); else e's text."""
    stack, seen, texts = [e], set(), []
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return f"{x.strerror or os.strerror(x.errno)} (errno {errno.errorcode.get(x.errno, x.errno)})"
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack.extend(v[0] if isinstance(v, tuple) else v for v in failures.values())
        stack.extend((x.__cause__, x.__context__))
        texts.append(str(x))
    for text in texts:
        match = re.search(r"\[Errno (\d+)\]", text)
        if match:
            n = int(match.group(1))
            return f"{os.strerror(n)} (errno {errno.errorcode.get(n, n)})"
    return _one_line(e)


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free on its file system"
    except OSError:
        return "free space unknown"


def _run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _prepare_folder(path: Path, run_id: str | None) -> str | None:
    """Rank 0, before a save: an empty folder for the tag (None), or why not. A folder already there is a
    leftover of a killed save (incomplete) or this run's own checkpoint of the step: it is replaced; a
    complete checkpoint of another run is not."""
    try:
        if path.exists():
            owner = _run_id_of(path) if is_complete(path) else None
            if owner and run_id and owner != run_id:
                return (f"{path} holds a complete checkpoint of another run (run id {owner}; this run is {run_id}): "
                        "refusing to overwrite it; move it away or use another --run-dir")
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as e:
        return f"cannot prepare {path}: {_cause(e)} ({_free_space(path.parent)})"
    return None


def save(engine, cfg, run_dir: str | Path, step: int, trainer_state: dict, keep: int = 3) -> str:
    """Write the checkpoint of `step` (every rank), then rank 0 marks it complete, moves `latest` and
    prunes. A failed write (a full disk) leaves no partial folder and `latest` where it was, and raises
    CheckpointError with the cause on every rank."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)

    root, tag = checkpoint_dir(run_dir), tag_for(step)
    path = root / tag
    rank = dist.get_rank()
    run_id = trainer_state.get("run_id")
    problem = _from_rank0(_prepare_folder(path, run_id) if rank == 0 else None)
    if problem:
        raise CheckpointError(problem)
    error = None
    try:
        state, _ = _state_dict(engine, cfg.model, tensors=True)
        dist_checkpointing.save(state, str(path))
        torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must learn of any rank's failure
        error = _cause(e)
    full_state = {**trainer_state, "optimizer_steps": _optimizer_step_count(engine),
                  "lr_scheduler": engine.lr_scheduler.state_dict(), "layout": _layout(),
                  "config": to_dict(cfg)}
    error = _first_of_all(error)  # (also the barrier: every rank has finished writing)
    if rank == 0 and not error:
        # trainer_state.json last (write + rename): its presence marks the tag complete; then the pointer moves.
        try:
            tmp = path / "trainer_state.json.tmp"
            tmp.write_text(json.dumps(full_state, indent=1))
            os.replace(tmp, path / "trainer_state.json")
            tmp = root / "latest.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, root / "latest")
        except OSError as e:
            error = _cause(e)
            (root / "latest.tmp").unlink(missing_ok=True)
    error = _from_rank0(error)
    if error:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        previous = None
        try:
            previous = latest_tag(run_dir)
        except CheckpointError:
            pass
        dist.barrier()
        raise CheckpointError(f"saving {path} failed: {error} ({_free_space(root)}); removed the partial folder; "
                              f"{root / 'latest'} still names {previous or 'no checkpoint'}")
    if rank == 0:
        _prune(run_dir, keep, run_id, step)
    dist.barrier()
    return tag


def _prune(run_dir: str | Path, keep: int, run_id: str | None, step: int) -> None:
    """Keep this run's newest `keep` complete checkpoints up to `step` (just saved); delete its older ones
    and incomplete leftovers of killed saves below `step`. Another run's checkpoints (another run_id) and
    folders above `step` are left alone; checkpoints saved before run ids existed count as this run's."""
    if keep <= 0:
        return
    older = []
    for s, path in step_folders(run_dir):
        if s >= step:
            continue
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
        elif _run_id_of(path) in (None, run_id):
            older.append(path)
    for path in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)


def load(engine, cfg, run_dir: str | Path, tag: str) -> dict:
    """Load checkpoint `tag` into the engine at this run's layout; returns its trainer state. The LR
    schedule continues at the checkpoint's step with this run's train.lr/min_lr/warmup/decay/steps."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)

    path = checkpoint_dir(run_dir) / tag
    state = read_trainer_state(path)
    # (Adafactor's per-TP-shard statistics at another TP size are refused before, by training.train.plan_resume.)
    _ensure_optimizer_state(engine)
    template, params = _state_dict(engine, cfg.model, tensors=False)
    try:
        loaded = dist_checkpointing.load(template, str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - EOFError, RuntimeError from torch's unzip...
        raise CheckpointError(f"{path}: cannot read the checkpoint's tensors ({_cause(e)}); a .distcp file may be "
                              "corrupt (resume from an earlier checkpoint: delete this folder and "
                              f"{checkpoint_dir(run_dir) / 'latest'})") from None
    for name, p in params.items():
        _set_full(engine, p, None, loaded["model"][name])
        for key, _, _ in optimizer_state_specs(engine, p):
            _set_full(engine, p, key, loaded["optimizer"][f"{key}.{name}"])
    _set_optimizer_step_count(engine, state["optimizer_steps"])
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state["lr_scheduler"])
    # LambdaLR.load_state_dict restores the position (last_epoch) but also the saved base_lrs, the peak
    # rate the checkpoint's run had; the shape (lr_lambda, a closure over this run's cfg, not saved) is
    # this run's. Rates from the saved base would mix the two when train.lr changed on resume: take the
    # base from this run's optimizer (its initial_lr, = train.lr) and recompute the rate it holds.
    bases = [group.get("initial_lr", cfg.train.lr) for group in scheduler.optimizer.param_groups]
    scheduler.base_lrs = list(bases)
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(bases, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = list(rates)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if state["layout"] == _layout() and rng_file.is_file():
        _set_rng_state(load_rng_file(rng_file))
    return state
