"""Everything that works around DeepSpeed 0.19.8 or reaches into its internals, in one place.

Written against deepspeed==0.19.8 (requirements.txt). Each piece names the DeepSpeed code it relies on or
works around (paths under deepspeed/); on an upgrade, check these first: tests/test_training.py (ZeRO-0..3,
TP, PP, bf16, resume across layouts), tests/test_optimizer_state.py (each optimizer's state and step count
through a resume, bf16 ZeRO-0 wrappers) and tests/test_faults.py (non-finite steps) exercise them.

The engine (training/engine.py uses these to build it):
- `MegatronMpu`: megatron-core's process groups under the names DeepSpeed's `mpu` protocol asks for.
- `init_deepspeed`: DeepSpeed's comm layer, without JIT-compiling its shared-memory op on CPU.
- `no_optimizer_steps`: DeepSpeed's bf16 ZeRO-0 wrappers run one real optimizer step at construction.
- `clip_fp32_gradients_megatron_style` (with `global_grad_norm`): fp32 ZeRO-0 clipping that keeps no norm
  (none at all without clipping) and miscounts under a pipeline.
- `NonFiniteGuard` (with `nonfinite_flag`): DeepSpeed's plain fp32 ZeRO-0 step goes on with non-finite
  gradients, and the steps its wrappers skip are counted only in its engine.
- `set_global_batch`: a new global batch (train.rampup_batch_size) whose accumulation boundaries DeepSpeed's
  micro-step counter would misplace.

Checkpoints (training/checkpoint.py writes and reads each rank's own part of the fp32 weights and optimizer state):
- `base_optimizer`, `optimizer_state_specs`, `local_shape`: the torch optimizer and shapes under ZeRO.
- `own_fragment`: where this rank's part of a parameter's fp32 master and optimizer state lies in DeepSpeed's
  ZeRO-1/2/3 partitions or ZeRO-0 wrappers; `refresh_working_weights`: the working weights from the masters.
- `params_norm`: the norm of the fp32 masters, from those parts (each value once).
- `ensure_optimizer_state`, `link_optimizer_fragments`: state that exists only after a first step, and
  ZeRO-1/2/bf16 fragment views that must be relinked once it does.
- `optimizer_step_count` / `set_optimizer_step_count`: where each optimizer keeps Adam's step count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import torch

OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")
EMA_KEY = "ema"
"""The optimizer-state key under which training/ema.py keeps the moving average of each fp32 tensor the optimizer
updates (checkpoints store it as optimizer.ema.<parameter>)."""


# ---------------------------------------------------------------------------------------------
# Building the engine


class MegatronMpu:
    """megatron-core `parallel_state` under the names DeepSpeed's mpu protocol uses (runtime/engine.py,
    runtime/utils.py ask for `get_model_parallel_*`; megatron-core calls them `get_tensor_model_parallel_*`)."""

    def __getattr__(self, name):
        from megatron.core import parallel_state as ps

        if name.startswith("get_model_parallel_"):
            name = name.replace("get_model_parallel_", "get_tensor_model_parallel_")
        return getattr(ps, name)


def init_deepspeed() -> None:
    """DeepSpeed's comm layer over the existing process group (idempotent). On CPU its shared-memory
    op is switched off first (comm/torch.py build_shm_op compiles it when `deepspeed.ops.__compatible_ops__`
    says it can: ~36 s of JIT); gloo does the job."""
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def set_global_batch(engine, size: int) -> None:
    """The engine's global batch from its next step on (train.rampup_batch_size): DeepSpeed's set_train_batch_size
    sets the accumulation steps (runtime/engine.py; the pipeline engine's micro_batches too, runtime/pipe/engine.py),
    but its managed accumulation finds a step's last micro-batch as (micro_steps + 1) % accumulation steps == 0
    (is_gradient_accumulation_boundary), and micro_steps, a multiple of the old count, need not be one of the new:
    the first step after a change would then reduce and step in the middle of its micro-batches. micro_steps is
    rounded up to a multiple of the new count (it counts nothing else the run reads)."""
    if size == engine.train_batch_size():
        return
    engine.set_train_batch_size(size)
    steps = engine.gradient_accumulation_steps()
    engine.micro_steps = -(-engine.micro_steps // steps) * steps


@contextlib.contextmanager
def no_optimizer_steps(optimizer: torch.optim.Optimizer):
    """Make `optimizer.step()` do nothing inside the block.

    DeepSpeed's ZeRO-0 low-precision wrappers (bf16 at parallel.zero_stage=0) create the optimizer
    state in their constructor by running one real optimizer step on zero gradients:
    `FP16_UnfusedOptimizer.initialize_optimizer_states` (runtime/fp16/unfused_optimizer.py, any torch
    optimizer) and `FP16_Optimizer.initialize_optimizer_states` (runtime/fp16/fused_optimizer.py, apex's
    and DeepSpeed's FusedAdam). For AdamW that step is not a no-op: it decays the fp32 masters
    once by lr*weight_decay (at the schedule's first rate; the bf16 working weights are not refreshed
    until the next step copies the decayed masters over) and counts a step, so Adam's bias correction
    is one step ahead for the whole run (the first real update is ~0.73*lr*sign(g) instead of
    lr*sign(g)) and bf16 ZeRO-0 drifts from bf16 ZeRO-1/2/3 and fp32. No other wrapper steps at
    construction (BF16_Optimizer, ZeRO-1/2/3 only set up buffers), so the state is created at the
    first real step everywhere, as for fp32 ZeRO-0; `ensure_optimizer_state` creates it before a load."""
    own = "step" in vars(optimizer)  # the LR scheduler's step-counting wrapper is an instance attribute
    previous = vars(optimizer).get("step")
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own:
            optimizer.step = previous
        else:
            del optimizer.step


def _reduction_device():
    """Where a rank without gradients puts a value it all-reduces: the GPU (NCCL reduces CUDA tensors only)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """2-norm of the gradients of the whole model: tensor-parallel shards counted on every TP rank,
    replicated parameters on TP rank 0 only, summed over the TP x PP ranks that hold the model.
    (megatron-core's get_grad_norm_fp32 does the same but allocates on CUDA.)"""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    squares = torch.zeros((), dtype=torch.float32, device=params[0].device if params else _reduction_device())
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            squares += p.grad.detach().float().square().sum()
    torch.distributed.all_reduce(squares, group=ps.get_model_parallel_group())
    return squares.sqrt()


def clip_fp32_gradients_megatron_style(engine) -> None:
    """Replace DeepSpeed's fp32 ZeRO-0 clipping (DeepSpeedEngine.clip_fp32_gradients in runtime/engine.py,
    which calls runtime/utils.clip_grad_norm_), which keeps no norm (get_global_grad_norm then returns
    None) and, under a pipeline, leaves replicated parameters of later stages out of it (it asks the
    pipe x tensor rank, not the tensor rank), by `global_grad_norm` and the same clipping rule. The
    method is replaced on the engine instance, and the norm stored where get_global_grad_norm reads it
    (`engine._global_grad_norm`). DeepSpeed calls it only when clipping (`_take_model_step`): without
    clipping, the wrapped `_take_model_step` computes the norm itself. (The bf16 and ZeRO optimizers keep
    their own norm, clipping or not.)"""

    def norm_and_clip():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params)
        if engine.gradient_clipping() > 0.0:
            coefficient = engine.gradient_clipping() / (norm + 1e-6)
            if coefficient < 1.0:
                for p in params:
                    p.grad.detach().mul_(coefficient)
        engine._global_grad_norm = float(norm)

    take_model_step = engine._take_model_step

    def take_model_step_with_norm(*args, **kwargs):
        if engine.gradient_clipping() <= 0.0:
            norm_and_clip()
        return take_model_step(*args, **kwargs)

    engine.clip_fp32_gradients = norm_and_clip
    if not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
        engine._take_model_step = take_model_step_with_norm


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if any gradient holds an inf or NaN, else 0.0, as a float32 tensor on the gradients' device,
    computed without a host synchronisation: one fused max-abs per tensor list (an inf-norm is inf or
    NaN exactly when the tensor has an inf or NaN, and cannot overflow), then one reduction."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=_reduction_device())
    norms = torch._foreach_norm(grads, float("inf"))
    return (~torch.stack(norms).isfinite()).any().float()


class NonFiniteGuard:
    """Counts the optimizer steps skipped for non-finite gradients (`skipped`, and `consecutive`: those in a row,
    for train.max_skipped_steps), and skips them where DeepSpeed would not.

    Why: DeepSpeed 0.19.8's wrappers (ZeRO 1-3: runtime/zero/stage_1_and_2.py and stage3.py `step`; bf16's
    runtime/bf16_optimizer.py `step`) skip a step whose global gradient norm is not finite (`overflow`,
    all-reduced, so every rank agrees), count it in the engine (`engine.skipped_steps`, runtime/engine.py
    `_take_model_step`, which then leaves the learning-rate schedule where it is), and tell no trainer. Without
    a wrapper (fp32 ZeRO-0) the engine steps the torch optimizer on whatever gradients it has. There the guard
    replaces that optimizer's `step` (an instance attribute; DeepSpeed calls it once a step, with every
    group): each rank checks its gradients, the verdict is all-reduced, every rank skips or steps together,
    and DeepSpeed zeroes the gradients as after any step. The guard then sets the optimizer's `overflow` as the
    wrappers set theirs: `_take_model_step` counts a skipped step and leaves the schedule where it is, as at every
    other stage and precision (it used to advance: a run then followed another schedule after a skip, and a
    checkpoint resumed at another stage neither run's). Not for the wrappers: they
    call the inner step once per parameter group (fp32 ZeRO-1/2) or sub-group (ZeRO-3), and only after
    their own check passed.

    `step_done()` after each optimizer step counts it."""

    def __init__(self, engine):
        self.engine, self.skipped, self.consecutive = engine, 0, 0
        self._engine_skips, self._skipped_here = engine.skipped_steps, False
        if hasattr(engine.optimizer, "overflow"):  # (a wrapper: it checks and skips by itself; before any step)
            return
        optimizer = base_optimizer(engine)
        inner_step = optimizer.step

        # (wraps: keeps the marker torch's LR scheduler put on the step it wrapped, so that it does not warn
        # that the step was replaced behind its back)
        @functools.wraps(inner_step)
        def guarded_step(*args, **kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.distributed.all_reduce(flag := nonfinite_flag(grads), op=torch.distributed.ReduceOp.MAX)
            skip = bool(flag.item())  # the one host synchronisation of the check
            engine.optimizer.overflow = self._skipped_here = skip  # (read by DeepSpeed's _take_model_step)
            return None if skip else inner_step(*args, **kwargs)

        optimizer.step = guarded_step

    def step_done(self) -> bool:
        """After an optimizer step: count it as skipped if the guard or DeepSpeed's wrapper skipped it; whether it
        was."""
        skipped = self._skipped_here or self.engine.skipped_steps != self._engine_skips
        self._engine_skips, self._skipped_here = self.engine.skipped_steps, False
        self.skipped += skipped
        self.consecutive = self.consecutive + 1 if skipped else 0
        return skipped


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients (train.max_skipped_steps)."""

    @classmethod
    def check(cls, step: int, consecutive: int, limit: int) -> None:
        """Raise after `limit` skipped steps in a row (`consecutive` of them up to `step`)."""
        if consecutive >= limit:
            raise cls(f"stopping at step {step}: the last {consecutive} steps had non-finite loss or gradients and "
                      f"were skipped (train.max_skipped_steps={limit}); lower train.lr or check the data")


# ---------------------------------------------------------------------------------------------
# Each rank's own part of the fp32 weights and optimizer state, for checkpoints


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO/bf16 wrapper (its `.optimizer`), or the client
    optimizer itself when DeepSpeed did not wrap it."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def local_shape(p: torch.nn.Parameter) -> torch.Size:
    """This TP rank's shape of a parameter (ZeRO-3's zero.Init leaves only a flat placeholder in p.data,
    the shape in `ds_shape`)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def optimizer_state_specs(engine, p, ema: bool = False) -> list[tuple[str, bool, tuple]]:
    """(state key, stored per TP rank, this rank's shape) of p's optimizer state, with the moving average of the
    weights (training/ema.py) when `ema`. Adam's moments and the average have p's shape; Adafactor's row/column
    statistics of a matrix are means over this rank's shard only."""
    shape = tuple(local_shape(p))
    averaged = [(EMA_KEY, False, shape)] if ema else []
    if isinstance(base_optimizer(engine), torch.optim.Adafactor):
        if len(shape) > 1:
            return [("row_var", True, shape[:-1] + (1,)), ("col_var", True, shape[:-2] + (1,) + shape[-1:])] + averaged
        return [("variance", False, shape)] + averaged
    return [(key, False, shape) for key in OPTIMIZER_MOMENTS] + averaged


# DeepSpeed's optimizer wrapper -> {id(low-precision param): (fp32 holder, offset)}; kept here, not on the
# wrapper, and dropped with it.
_HOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _optimizer_holder(engine, p) -> tuple[torch.Tensor, int | None]:
    """(the tensor the torch optimizer updates for p, p's offset in it or None when it is p's alone).
    DeepSpeed's ZeRO-0 bf16/fp16 wrappers keep an fp32 master per parameter (FP16_UnfusedOptimizer,
    runtime/fp16/unfused_optimizer.py: `fp32_groups`) or, for apex's and DeepSpeed's FusedAdam, one flat
    fp32 tensor per group (FP16_Optimizer, runtime/fp16/fused_optimizer.py: `fp32_groups_flat`, the
    group's parameters concatenated in order); without a wrapper the optimizer updates p itself."""
    opt = engine.optimizer
    if opt not in _HOLDERS:
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
        _HOLDERS[opt] = table
    return _HOLDERS[opt].get(id(p), (p, None))


def _view(tensor: torch.Tensor, offset: int | None, p) -> torch.Tensor:
    """p's part of `tensor` (the whole tensor when offset is None), shaped like p."""
    return tensor if offset is None else tensor.view(-1).narrow(0, offset, p.numel()).view(p.shape)


@dataclasses.dataclass
class Fragment:
    """The part of an fp32 tensor (a parameter's master weight or one of its optimizer states) that this
    rank holds: `data` (1-D, the live values, not a copy) is elements [start, start + numel) of the
    tensor flattened in row-major order, at this TP rank's shape. `whole`: the rank holds all of it and so
    does every data-parallel rank (ZeRO-0); else the data-parallel ranks hold disjoint parts (ZeRO-1/2/3)."""

    start: int
    data: torch.Tensor
    whole: bool


def own_fragment(engine, p, key: str | None) -> Fragment:
    """This rank's part of p's fp32 master weight (key None) or of its optimizer state `key`, as DeepSpeed
    keeps it, without gathering or copying:
    - ZeRO-3 (p has `ds_id`): each parameter is split evenly over the data-parallel ranks, the last part
      padded (runtime/zero/stage3.py: `get_local_fp32_param`; `set_full_hp_param` places rank r's part at
      r * partition size);
    - ZeRO-1/2 and BF16_Optimizer (p has `_hp_mapping`, None where this rank holds none of p): the flat
      partition of the group's parameters (utils/tensor_fragment.py: `lp_fragment_address` is the
      fragment's place in p, `get_hp_fragment(key)` its values);
    - ZeRO-0: the wrapper's fp32 master (or the fp32 parameter itself) and the optimizer's state, whole."""
    if hasattr(p, "ds_id"):
        optimizer = p._z3_optimizer
        local = optimizer.get_local_fp32_param(p, key)
        start = local.numel() * optimizer._get_param_partition_rank(p)
        return Fragment(start, local[:max(0, min(local.numel(), p.ds_numel - start))], whole=False)
    if hasattr(p, "_hp_mapping"):
        mapping = p._hp_mapping
        if mapping is None:
            return Fragment(0, torch.empty(0), whole=False)
        return Fragment(mapping.lp_fragment_address.start, mapping.get_hp_fragment(key).view(-1), whole=False)
    holder, offset = _optimizer_holder(engine, p)
    if key is None and holder.dtype != torch.float32:
        raise RuntimeError(f"no fp32 master weight found for a {holder.dtype} parameter of shape "
                           f"{tuple(p.shape)} in {type(engine.optimizer).__name__}: saving it would lose precision")
    tensor = (holder if key is None else base_optimizer(engine).state[holder][key]).detach().view(-1)
    return Fragment(0, tensor if offset is None else tensor.narrow(0, offset, p.numel()), whole=True)


def params_norm(engine) -> float:
    """2-norm of the fp32 master weights of the whole model (Megatron-LM's --log-params-norm: a run whose weights
    grow without bound shows it before its loss does), from each rank's own part (`own_fragment`), each value
    counted once: replicated parameters on TP rank 0, ZeRO-0's whole masters on DP rank 0; summed over all ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    squares = torch.zeros((), dtype=torch.float32, device=_reduction_device())
    first_dp_rank = ps.get_data_parallel_rank() == 0
    for p in engine.module.parameters():
        if param_is_not_tensor_parallel_duplicate(p):
            part = own_fragment(engine, p, None)
            if first_dp_rank or not part.whole:
                # (one pass, no squared copy of the fragment)
                squares += torch.linalg.vector_norm(part.data.detach(), dtype=torch.float32).square().to(squares.device)
    torch.distributed.all_reduce(squares)
    return float(squares.sqrt())


def refresh_working_weights(engine, params) -> None:
    """Copy the fp32 masters into the working (bf16, or fp32) weights the forward pass uses, after the
    masters were loaded: the ZeRO-3 partitions (as runtime/zero/stage3.py does after a step, fp16_ from
    fp32_partitioned_groups_flat), DeepSpeed's own `update_lp_params` (copy and all-gather over the
    data-parallel ranks) at ZeRO-1/2 and under BF16_Optimizer, each parameter from its master at ZeRO-0."""
    optimizer = engine.optimizer
    with torch.no_grad():
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):
            # ZeRO-3 keeps gathered whole the parameters below stage3_param_persistence_threshold (1e5 elements:
            # biases, norms) once a forward has gathered them, and re-gathers them only after a step: a refresh
            # in the middle of training (training/ema.py averaged_weights) left them at the old values. As
            # DeepSpeed does around a step and a checkpoint: release all, copy, gather the persistent ones.
            optimizer._partition_all_parameters()
            for low, master in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
                if low.data_ptr() != master.data_ptr():  # (fp32 runs update the masters in place)
                    low.copy_(master)
            optimizer.checkpoint_event_epilogue()  # (secondary partitions invalidated, persistent ones gathered)
        elif hasattr(optimizer, "update_lp_params"):
            optimizer.update_lp_params()
        else:
            for p in params:
                holder, offset = _optimizer_holder(engine, p)
                if holder is not p:
                    p.data.copy_(_view(holder.data, offset, p))


def ensure_optimizer_state(engine) -> None:
    """Create Adam's per-parameter state, which appears only at the first step, so that a load can
    overwrite it: zero moments and a step counter for every tensor the optimizer updates (ZeRO-3 keeps
    those in fp32_partitioned_groups_flat, runtime/zero/stage3.py; the others in param_groups). The
    counter is a tensor for torch's optimizers and an int for DeepSpeed's FusedAdam (ops/adam/fused_adam.py),
    which creates its own only for an empty state and passes it to its kernel as a number; apex's
    FusedAdam keeps its count in the param group only (`set_optimizer_step_count` sets it there), so its
    state gets none."""
    base = base_optimizer(engine)
    fused = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for p in optimizer_holders(engine):
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
    link_optimizer_fragments(engine)


def optimizer_holders(engine) -> list[torch.Tensor]:
    """The fp32 tensors the torch optimizer updates, which its state is keyed by: ZeRO-3's flat partitions
    (runtime/zero/stage3.py `fp32_partitioned_groups_flat`, put into the param groups only while it steps), else
    the param groups' tensors (ZeRO-1/2's flat partitions, a ZeRO-0 wrapper's masters, or the parameters)."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    return list(flat) if flat is not None else [p for g in base_optimizer(engine).param_groups for p in g["params"]]


def link_optimizer_fragments(engine) -> None:
    """ZeRO-1/2 and bf16 keep per-parameter views into the flat optimizer state, made once and possibly
    before the state existed (then empty): DeepSpeedZeroOptimizer and BF16_Optimizer
    `_lazy_init_hp_params_optimizer_state` (runtime/zero/stage_1_and_2.py, runtime/bf16_optimizer.py) run
    only while `_hp_optimizer_states_linked` is False. Reset the flag and remake them, so that
    `own_fragment` (get_hp_fragment) sees the state as it is now."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _counts_steps_in_groups(optimizer) -> bool:
    """apex's FusedAdam keeps Adam's step count in each param group, not in the per-tensor state."""
    return type(optimizer).__module__.startswith("apex.")


def optimizer_step_count(engine) -> int:
    """Adam's step count (its bias correction), the largest count the optimizer holds: torch's optimizers
    keep it per tensor in the state, all equal; apex's FusedAdam per param group; DeepSpeed's FusedAdam
    (ops/adam/fused_adam.py) per tensor too, but it advances only the state of the last parameter of each
    group that has a gradient and passes that count to its kernel for the whole group (the others keep
    the count they were created with, `group.get('step', 0)`, and the group holds a 0), so the first
    count found can be 0 when the optimizer updates separate tensors (fp32 at ZeRO-0)."""
    base = base_optimizer(engine)
    counts = [int(holder["step"]) for holder in (*base.state.values(), *base.param_groups) if "step" in holder]
    return max(counts, default=0)


def set_optimizer_step_count(engine, count: int) -> None:
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
