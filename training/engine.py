"""The DeepSpeed engine around the Parti model: ZeRO stage, bf16, accumulation, clipping, optimizer, schedule.

    engine = build_engine(model, cfg, kernels)
    loss = engine(text_ids, codes, return_loss=True); engine.backward(loss); engine.step()

megatron-core's process groups are handed to DeepSpeed as its `mpu` (through `MegatronMpu`, which
adds the `get_model_parallel_*` names DeepSpeed asks for), so ZeRO partitions and reduces over the
data-parallel group only and the gradient norm counts tensor-parallel shards once.
On CPU no DeepSpeed C++ op is compiled: the optimizer is a client torch optimizer from
model_parallel.kernels and DeepSpeed's shared-memory comm op is switched off.
"""
from __future__ import annotations

import contextlib
import math

import torch

from training.config import Config


class MegatronMpu:
    """megatron-core `parallel_state` under the names DeepSpeed's mpu protocol uses."""

    def __getattr__(self, name):
        from megatron.core import parallel_state as ps

        if name.startswith("get_model_parallel_"):
            name = name.replace("get_model_parallel_", "get_tensor_model_parallel_")
        return getattr(ps, name)


def data_parallel_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size()


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        # bf16 with ZeRO-1: accumulate and reduce gradients in fp32 (Megatron's main grads), DeepSpeed's
        # BF16_Optimizer. DeepSpeed 0.19 allows this for ZeRO-1 only; bf16 with ZeRO-0 keeps bf16 grads.
        "data_types": {"grad_accum_dtype": "fp32" if t.precision == "bf16" and cfg.parallel.zero_stage == 1 else None},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # With a tensor-parallel topology only unpartitioned activations/gradients may cross stages
        # when more than the first tuple element needs a gradient (memory does).
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embedding tables only, not on biases and norms (1-D parameters).
    A parameter partitioned by zero.Init holds a flat placeholder: its shape is `ds_shape`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    """Linear warmup to train.lr, then train.lr_decay (cosine, linear or constant) to train.min_lr."""
    t = cfg.train
    shape = {"cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)), "linear": lambda x: 1 - x,
             "constant": lambda x: 1.0}[t.lr_decay]

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return (t.min_lr + (t.lr - t.min_lr) * shape(progress)) / t.lr

    return factor


def init_deepspeed() -> None:
    """DeepSpeed's comm layer over the existing process group (idempotent). On CPU its shared-memory
    op is switched off first: it would be JIT-compiled (~36 s) and gloo does the job."""
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def build_model(cfg: Config, kernels, device: str):
    """PartiModel for pp=1, a DeepSpeed PipelineModule of the same pieces for pp>1; with the
    activation checkpointing of parallel.activation_checkpointing. At ZeRO-3 the model is built under
    `deepspeed.zero.Init`, which partitions each module's parameters over the data-parallel group as
    soon as the module is built, so no rank ever holds the whole model (parti-20b at TP=1 would need
    76.5 GiB of fp32 weights per GPU before the first step otherwise)."""
    from model_parallel.activation_checkpointing import apply_activation_checkpointing

    if cfg.parallel.pp > 1:
        from model_parallel.pipeline import build_pipeline

        init_deepspeed()
        model = build_pipeline(cfg.model, kernels, cfg.parallel.pp, cfg.train.seed, cfg.parallel.sequence_parallel)
    elif cfg.parallel.zero_stage == 3:
        import deepspeed

        from model_parallel.model import PartiModel

        init_deepspeed()
        with deepspeed.zero.Init(mpu=MegatronMpu(), config_dict_or_path=deepspeed_config(cfg, data_parallel_size())):
            model = PartiModel(cfg.model, kernels, sequence_parallel=cfg.parallel.sequence_parallel,
                               init_seed=cfg.train.seed)
    else:
        from model_parallel.model import PartiModel

        model = PartiModel(cfg.model, kernels, sequence_parallel=cfg.parallel.sequence_parallel,
                           init_seed=cfg.train.seed).to(device)
    return apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """2-norm of the gradients of the whole model: tensor-parallel shards counted on every TP rank,
    replicated parameters on TP rank 0 only, summed over the TP x PP ranks that hold the model.
    (megatron-core's get_grad_norm_fp32 does the same but allocates on CUDA.)"""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    squares = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            squares += p.grad.detach().float().square().sum()
    torch.distributed.all_reduce(squares, group=ps.get_model_parallel_group())
    return squares.sqrt()


def _clip_fp32_gradients_megatron_style(engine) -> None:
    """Replace DeepSpeed's fp32 ZeRO-0 clipping (runtime/utils.clip_grad_norm_), which keeps no norm
    and, under a pipeline, leaves replicated parameters of later stages out of it (it asks the
    pipe x tensor rank, not the tensor rank), by `global_grad_norm` and the same clipping rule."""

    def clip():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params)
        coefficient = engine.gradient_clipping() / (norm + 1e-6)
        if coefficient < 1.0:
            for p in params:
                p.grad.detach().mul_(coefficient)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if any gradient holds an inf or NaN, else 0.0, as a float32 tensor on the gradients' device,
    computed without a host synchronisation: one fused max-abs per tensor list (an inf-norm is inf or
    NaN exactly when the tensor has an inf or NaN, and cannot overflow), then one reduction."""
    device = grads[0].device if grads else (torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch._foreach_norm(grads, float("inf"))
    return (~torch.stack(norms).isfinite()).any().float()


class NonFiniteGuard:
    """Skips optimizer updates whose gradients are not finite on some rank, and counts them.

    It wraps the step of the torch optimizer inside DeepSpeed's wrapper, where the gradients
    (ZeRO partitions or whole) are final: each rank checks its own, the verdict is all-reduced, and
    every rank skips or steps together. DeepSpeed then zeroes the gradients as after any step (the
    learning-rate schedule still advances)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skipped = 0
        self.consecutive = 0
        inner_step = optimizer.step

        def guarded_step(*args, **kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.distributed.all_reduce(flag := nonfinite_flag(grads), op=torch.distributed.ReduceOp.MAX)
            if flag.item():  # the one host synchronisation of the check
                self.skipped += 1
                self.consecutive += 1
                return None
            self.consecutive = 0
            return inner_step(*args, **kwargs)

        optimizer.step = guarded_step


@contextlib.contextmanager
def no_optimizer_steps(optimizer: torch.optim.Optimizer):
    """Make `optimizer.step()` do nothing inside the block.

    DeepSpeed's ZeRO-0 low-precision wrappers (bf16 at parallel.zero_stage=0) create the optimizer
    state in their constructor by running one real optimizer step on zero gradients:
    `FP16_UnfusedOptimizer.initialize_optimizer_states` (deepspeed/runtime/fp16/unfused_optimizer.py,
    any torch optimizer) and `FP16_Optimizer.initialize_optimizer_states` (fp16/fused_optimizer.py,
    apex's and DeepSpeed's FusedAdam). For AdamW that step is not a no-op: it decays the fp32 masters
    once by lr*weight_decay (at the schedule's first rate; the bf16 working weights are not refreshed
    until the next step copies the decayed masters over) and counts a step, so Adam's bias correction
    is one step ahead for the whole run (the first real update is ~0.73*lr*sign(g) instead of
    lr*sign(g)) and bf16 ZeRO-0 drifts from bf16 ZeRO-1/2/3 and fp32. No other wrapper steps at
    construction (BF16_Optimizer, ZeRO-1/2/3 only set up buffers), so the state is created at the
    first real step everywhere, as for fp32 ZeRO-0; training/checkpoint.py creates it before a load."""
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


def build_engine(model: torch.nn.Module, cfg: Config, kernels):
    import deepspeed
    from deepspeed.pipe import PipelineModule

    init_deepspeed()
    t = cfg.train
    if t.optimizer == "adafactor":
        optimizer = torch.optim.Adafactor(param_groups(model, t.weight_decay), lr=t.lr)
    else:
        optimizer = kernels.optimizer(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    pipelined = isinstance(model, PipelineModule)  # the pipeline brings its own topology as mpu
    with no_optimizer_steps(optimizer):  # see no_optimizer_steps: DeepSpeed's bf16 ZeRO-0 wrappers step at init
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               mpu=None if pipelined else MegatronMpu(),
                                               config=deepspeed_config(cfg, data_parallel_size()))
    _clip_fp32_gradients_megatron_style(engine)
    engine.nonfinite_guard = NonFiniteGuard(getattr(engine.optimizer, "optimizer", engine.optimizer))
    return engine


def train_step(engine, cfg: Config, micro_batches: list, device: str) -> tuple[float, float | None]:
    """One optimizer step over this DP rank's micro-batches [(text_ids, codes), ...].
    Returns the loss averaged over the global batch and the global gradient norm."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from megatron.core import parallel_state as ps

    from model_parallel.layers import allreduce_sequence_parallel_grads
    from model_parallel.model import decoder_input

    bos = cfg.model.image_vocab_size
    if isinstance(engine, PipelineEngine):
        batches = iter([((text.to(device), decoder_input(codes, bos).to(device)), codes.to(device))
                        for text, codes in micro_batches])
        loss = engine.train_batch(batches)  # averaged over micro-batches and DP, on every stage
        norm = engine.get_global_grad_norm()
        return float(loss), float(norm) if norm is not None else None
    losses = []
    for text, codes in micro_batches:
        loss = engine(text.to(device), codes.to(device), return_loss=True)
        engine.backward(loss)
        if cfg.parallel.sequence_parallel:
            allreduce_sequence_parallel_grads(engine.module)
        engine.step()
        losses.append(loss.detach().float())
    mean = torch.stack(losses).mean()  # on the device: NCCL reduces CUDA tensors only
    torch.distributed.all_reduce(mean, group=ps.get_data_parallel_group())
    norm = engine.get_global_grad_norm()
    return mean.item() / ps.get_data_parallel_world_size(), float(norm) if norm is not None else None
