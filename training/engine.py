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
        "gradient_clipping": 0.0 if _clips_itself(cfg) else t.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _clips_itself(cfg: Config) -> bool:
    """fp32 ZeRO-0: DeepSpeed clips without keeping the norm, so the trainer clips (same function)."""
    return cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"


def optimizer_step(engine, cfg: Config, boundary: bool) -> float | None:
    """engine.step() after a micro-batch's backward; at the accumulation boundary, return the global
    gradient norm (tensor-parallel shards counted once, replicated parameters once)."""
    norm = None
    if boundary and _clips_itself(cfg):
        from deepspeed.runtime.utils import clip_grad_norm_

        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        norm = float(clip_grad_norm_(engine.module.parameters(), max_norm, mpu=engine.mpu))
    engine.step()
    if boundary and norm is None:
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
    return norm


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embedding tables only, not on biases and norms (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    """Linear warmup to train.lr, then cosine decay to train.min_lr at train.steps."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return (t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / t.lr

    return factor


def _no_cpu_compiles() -> None:
    if not torch.cuda.is_available():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: torch.nn.Module, cfg: Config, kernels):
    import deepspeed

    _no_cpu_compiles()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    t = cfg.train
    optimizer = kernels.optimizer(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           mpu=MegatronMpu(), config=deepspeed_config(cfg, data_parallel_size()))
    return engine
