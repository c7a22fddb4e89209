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
so a run killed while saving resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: str | Path) -> str | None:
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {tag!r}, but {checkpoint_dir(run_dir) / tag} is incomplete")
    return tag


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


def save(engine, cfg, run_dir: str | Path, step: int, trainer_state: dict, keep: int = 3) -> str:
    from megatron.core import dist_checkpointing

    from training.config import config_to_dict

    root, tag = checkpoint_dir(run_dir), tag_for(step)
    path = root / tag
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)  # a leftover of a save that was killed
        path.mkdir(parents=True)
    dist.barrier()
    state, _ = _state_dict(engine, cfg.model, tensors=True)
    dist_checkpointing.save(state, str(path))
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    full_state = {**trainer_state, "optimizer_steps": _optimizer_step_count(engine),
                  "lr_scheduler": engine.lr_scheduler.state_dict(), "layout": _layout(),
                  "config": config_to_dict(cfg)}
    dist.barrier()
    if rank == 0:
        # trainer_state.json last: its presence marks the tag complete; then the pointer moves.
        with open(path / "trainer_state.json", "w") as f:
            json.dump(full_state, f, indent=1)
        tmp = root / "latest.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, root / "latest")
        _prune(root, keep)
    dist.barrier()
    return tag


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(engine, cfg, run_dir: str | Path, tag: str) -> dict:
    from megatron.core import dist_checkpointing

    path = checkpoint_dir(run_dir) / tag
    state = json.loads((path / "trainer_state.json").read_text())
    if isinstance(base_optimizer(engine), torch.optim.Adafactor) and state["layout"]["tp"] != _layout()["tp"]:
        raise RuntimeError(f"{path}: Adafactor's factored statistics are per tensor-parallel shard; resume it "
                           f"at parallel.tp={state['layout']['tp']} (this run has {_layout()['tp']})")
    _ensure_optimizer_state(engine)
    template, params = _state_dict(engine, cfg.model, tensors=False)
    loaded = dist_checkpointing.load(template, str(path))
    for name, p in params.items():
        _set_full(engine, p, None, loaded["model"][name])
        for key, _, _ in optimizer_state_specs(engine, p):
            _set_full(engine, p, key, loaded["optimizer"][f"{key}.{name}"])
    _set_optimizer_step_count(engine, state["optimizer_steps"])
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state["lr_scheduler"])
    # load_state_dict restores the schedule's position, not the rate the optimizer holds.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if state["layout"] == _layout() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
