"""The DeepSpeed engine around the Parti model: ZeRO stage, bf16, accumulation, clipping, optimizer, schedule.

    model = build_model(cfg, kernels, device, layout)   # layout: model_parallel.layout.ParallelLayout
    engine, guard = build_engine(model, cfg, kernels, layout)   # a TrainEngine: DeepSpeed's engine, the NonFiniteGuard
    loss, grad_norm = train_step(engine, cfg, micro_batches, device)
    held_out_loss = eval_step(engine, cfg, held_out_micro_batches, device)   # no dropout, no gradients
    guard.step_done()                                   # counts the step if it was skipped (non-finite gradients)
    guard.skipped                                       # optimizer steps skipped for non-finite gradients

megatron-core's process groups are handed to DeepSpeed as its `mpu` (through `MegatronMpu`, which
adds the `get_model_parallel_*` names DeepSpeed asks for), so ZeRO partitions and reduces over the
data-parallel group only and the gradient norm counts tensor-parallel shards once.
On CPU no DeepSpeed C++ op is compiled: the optimizer is a client torch optimizer from
model_parallel.kernels and DeepSpeed's shared-memory comm op is switched off.
What works around DeepSpeed's own behaviour (clipping, the non-finite guard, the bf16 ZeRO-0 step at
construction, ...) lives in training/deepspeed_glue.py, each piece with the DeepSpeed code it concerns.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from megatron.core import parallel_state as ps

from common.schedule import lr_lambda
from model_parallel.activation_checkpointing import apply_activation_checkpointing
from model_parallel.compile import compile_layers
from model_parallel.layers import allreduce_sequence_parallel_grads
from model_parallel.layout import ParallelConfig, ParallelLayout
from model_parallel.model import PartiModel, decoder_input, move_buffers
from model_parallel.pipeline import build_pipeline, canonical_parameters, is_text_encoder
from training.config import Config

# deepspeed is imported inside the functions that use it: it picks its accelerator (DS_ACCELERATOR) when
# first imported, after model_parallel.state.use_device has chosen the device.
from training.deepspeed_glue import (
    MegatronMpu,
    NonFiniteGuard,
    clip_fp32_gradients_megatron_style,
    init_deepspeed,
    no_optimizer_steps,
)


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    t = cfg.train
    fp32_grads = t.precision == "bf16" and cfg.parallel.zero_stage >= 1
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero_optimization(cfg.parallel),
        "bf16": {"enabled": t.precision == "bf16"},
        # bf16 with ZeRO 1-3: accumulate and reduce gradients in fp32, as Megatron does for bf16 (its main
        # grads): ZeRO-1 in DeepSpeed's BF16_Optimizer, ZeRO-2/3 in fp32 gradient partitions. DeepSpeed 0.19
        # has no fp32 accumulation for bf16 without ZeRO (_do_optimizer_sanity_check: "unsupported mix"), so
        # ZeRO-0 keeps bf16 gradients. It casts what it reduces to communication_data_type, bf16 for a bf16
        # run unless set (runtime/engine.py allreduce_bucket, the ZeRO optimizers): each rank's sum would be
        # rounded to 8 bits of mantissa and summed over DP in bf16. fp32 moves twice the gradient bytes.
        "data_types": {"grad_accum_dtype": "fp32" if fp32_grads else None},
        "communication_data_type": "fp32" if fp32_grads else None,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on unless configured) synchronizes the device as each micro-batch starts
        # and steps, so the host cannot queue work ahead of the GPU; the trainer times its steps itself.
        "timers": {"throughput": {"enabled": False}},
        # With a tensor-parallel topology only unpartitioned activations/gradients may cross stages
        # when more than the first tuple element needs a gradient (memory does).
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }


def zero_optimization(p: ParallelConfig) -> dict:
    """DeepSpeed's zero_optimization section: the stage and, from ZeRO-1 on, the communication settings of
    parallel.zero_* (when and in what pieces gradients are reduced and parameters gathered, never their values)."""
    if p.zero_stage == 0:
        return {"stage": 0}
    section = {"stage": p.zero_stage, "reduce_bucket_size": p.zero_bucket_size,
               "allgather_bucket_size": p.zero_bucket_size,
               **({"overlap_comm": p.zero_overlap_comm} if p.zero_overlap_comm is not None else {})}
    if p.zero_stage == 3:
        section.update(stage3_prefetch_bucket_size=p.zero3_prefetch_size,
                       stage3_param_persistence_threshold=p.zero3_persistence_threshold)
    return section


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Weight decay on matrices and embedding tables only, not on biases and norms (decay_groups). With
    model.freeze_text_encoder the text encoder's parameters form a group of their own at learning rate 0
    (the LR schedule multiplies it, so it stays 0; zero_frozen_gradients zeroes their gradients): they stay
    in the optimizer, so ZeRO partitions and checkpoints are those of any run, and never change."""
    trained, frozen = [], []
    for name, p in canonical_parameters(model, cfg.model).items():
        if p.requires_grad:
            (frozen if cfg.model.freeze_text_encoder and is_text_encoder(name) else trained).append(p)
    groups = decay_groups(trained, cfg.train.weight_decay)
    return groups + ([{"params": frozen, "weight_decay": 0.0, "lr": 0.0}] if frozen else [])


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """[matrices and embedding tables at `weight_decay`, biases and norms (1-D) at 0], as Megatron-LM and BERT
    decay them (also the text encoder's pre-training). A parameter partitioned by zero.Init holds a flat
    placeholder: its shape is `ds_shape`."""
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    return [{"params": [p for p, m in zip(params, matrix) if m], "weight_decay": weight_decay},
            {"params": [p for p, m in zip(params, matrix) if not m], "weight_decay": 0.0}]


def zero_frozen_gradients(model: torch.nn.Module, cfg: Config) -> None:
    """model.freeze_text_encoder: the encoder's gradients become zeros as they are made, so the clipped global
    norm (and the logged one) covers only what trains, as with requires_grad=False; the decoder's updates do not
    shrink by the encoder's norm. (They are still computed: skipping that backward would change what the
    pipeline stages exchange and which parameters DeepSpeed's reducers see gradients for.)"""
    if cfg.model.freeze_text_encoder:
        for name, p in canonical_parameters(model, cfg.model).items():
            if p.requires_grad and is_text_encoder(name):
                p.register_hook(torch.zeros_like)


def build_model(cfg: Config, kernels, device: str, layout: ParallelLayout, initialize: bool = True):
    """PartiModel for pp=1, a DeepSpeed PipelineModule of the same pieces for pp>1, split over `layout`'s
    tensor-parallel group; with the activation checkpointing of parallel.activation_checkpointing. Without
    `initialize` (a resume: the checkpoint fills every weight) the weights are not drawn: drawing them costs
    ~37 s per rank for parti-20b at TP=4, at every requeue. At
    ZeRO-3 the model is built under `deepspeed.zero.Init`, which partitions each module's parameters over
    the data-parallel group as soon as the module is built, so no rank ever holds the whole model
    (parti-20b at TP=1 would need 76.5 GiB of fp32 weights per GPU before the first step otherwise)."""
    import deepspeed

    tp_group, sp = layout.tp_group(), layout.sequence_parallel
    if layout.pp > 1:
        init_deepspeed()
        model = build_pipeline(cfg.model, kernels, layout.pp, cfg.train.seed, sp, tp_group, initialize)
    elif layout.zero_stage == 3:
        init_deepspeed()
        # data_parallel_group: zero.Init partitions over it, not over mpu's (DeepSpeed 0.19 defaults it to every
        # process), and at TP > 1 it split each TP shard over the TP ranks too: another model, and a hang at save.
        mpu = MegatronMpu()
        with deepspeed.zero.Init(mpu=mpu, data_parallel_group=mpu.get_data_parallel_group(),
                                 config_dict_or_path=deepspeed_config(cfg, layout.dp)):
            model = PartiModel(cfg.model, kernels, sp, init_seed=cfg.train.seed, tp_group=tp_group,
                               initialize=initialize)
        # DeepSpeed's engine moves no zero.Init model to its device (engine._configure_distributed_model)
        # and zero.Init places parameters only: the buffers (the dropout sites' keys, made on the CPU) are
        # moved here, as .to(device) does for the other layouts, so that no kernel mixes devices.
        move_buffers(model, device)
    else:
        model = PartiModel(cfg.model, kernels, sp, init_seed=cfg.train.seed, tp_group=tp_group,
                           initialize=initialize).to(device)
    if kernels.compile:
        compile_layers(model)  # first: recomputation then wraps the compiled layer
    return apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)


class MicroBatch(NamedTuple):
    """One forward/backward's samples on this rank (text and codes: None on a rank that takes no inputs,
    a middle pipeline stage: `sample_role`)."""

    text: torch.Tensor | None
    """Caption ids [b, text_seq_len] int64 (dropped captions already replaced by the null caption)."""
    codes: torch.Tensor | None
    """Image codes [b, image_seq_len] int64."""
    positions: torch.Tensor
    """Each sample's position in the run's sample stream [b] int64 (consumed samples + its index in the global
    batch): the same at any layout, what per-sample randomness is keyed by."""


class TrainEngine(NamedTuple):
    """What build_engine gives the trainer."""

    engine: object
    """DeepSpeed's engine (a PipelineEngine when parallel.pp > 1): forward, backward, step, LR, norm."""
    nonfinite_guard: NonFiniteGuard
    """Skips and counts optimizer steps whose gradients are not finite (`skipped`, `consecutive`)."""


def build_engine(model: torch.nn.Module, cfg: Config, kernels, layout: ParallelLayout) -> TrainEngine:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    init_deepspeed()
    zero_frozen_gradients(model, cfg)
    t = cfg.train
    if t.optimizer == "adafactor":
        optimizer = torch.optim.Adafactor(param_groups(model, cfg), lr=t.lr)
    else:
        optimizer = kernels.optimizer(param_groups(model, cfg), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                      eps=t.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
    pipelined = isinstance(model, PipelineModule)  # the pipeline brings its own topology as mpu
    with no_optimizer_steps(optimizer):  # see no_optimizer_steps: DeepSpeed's bf16 ZeRO-0 wrappers step at init
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               mpu=None if pipelined else MegatronMpu(),
                                               config=deepspeed_config(cfg, layout.dp))
    clip_fp32_gradients_megatron_style(engine)
    return TrainEngine(engine, NonFiniteGuard(engine))


READ, RECEIVE, POSITIONS = "read", "receive", "positions"
"""What a rank does for its micro-batches' samples (`sample_role`)."""


def sample_role() -> str:
    """How this rank (after init_parallel) gets its micro-batches: READ reads their samples from the data,
    RECEIVE gets them from its TP group's rank 0 (`share_samples`), POSITIONS takes their stream positions only
    (from the sampler: no reads, no data workers). The one place that decides which ranks read.

    Why: the ranks of a TP group train on the same samples, so its rank 0 alone reads them and broadcasts them
    over the group, as Megatron-LM's tensor_parallel.broadcast_data does (each TP rank reading them was TP times
    the reads: at parti-20b's TP=8 x PP=8 x DP=8, 64 times). With a pipeline, DeepSpeed's engine asks for inputs
    on the first stage (text, decoder input, positions) and the last (the codes of the loss) only
    (PipelineEngine.set_dataiterator, _exec_load_micro_batch); a middle stage gets everything from the stage
    before it, the positions that key its dropout masks included, and needs of a step only how many
    micro-batches it has (the pipeline's eval schedule), which the positions give."""
    if not (ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)):
        return POSITIONS
    return READ if ps.get_tensor_model_parallel_rank() == 0 else RECEIVE


def share_samples(cfg: Config, micro_batches: list[MicroBatch], role: str, device: str) -> list[MicroBatch]:
    """One step's micro-batches with their samples on every rank of the TP group: `role` (sample_role) READ sends
    its text and codes, RECEIVE gets them in place of its None (its positions are the sampler's, as READ's are);
    POSITIONS ranks, and TP=1, are given theirs back. One broadcast a step, of every micro-batch's text and codes
    in one int64 tensor [samples, text_seq_len + image_seq_len] (the shapes the config fixes) on `device`
    (NCCL broadcasts CUDA tensors only, gloo CPU ones); the samples come back on it."""
    if role == POSITIONS or ps.get_tensor_model_parallel_world_size() == 1:
        return micro_batches
    text_len = cfg.model.text_seq_len
    sizes = [len(mb.positions) for mb in micro_batches]
    if role == READ:
        packed = torch.cat([torch.cat([to_device(mb.text, device), to_device(mb.codes, device)], 1)
                            for mb in micro_batches])
    else:
        packed = torch.empty(sum(sizes), text_len + cfg.model.image_seq_len, dtype=torch.long, device=device)
    torch.distributed.broadcast(packed, ps.get_tensor_model_parallel_src_rank(),
                                group=ps.get_tensor_model_parallel_group())
    return [MicroBatch(part[:, :text_len].contiguous(), part[:, text_len:].contiguous(), mb.positions)
            for part, mb in zip(packed.split(sizes), micro_batches)]


def pipeline_batches(cfg: Config, micro_batches: list, device: str):
    """The pipeline engine's inputs for these micro-batches: ((text, decoder input, positions), codes) each, made
    (and copied to the device) as the engine asks for them: it does so on the first and last stages only (the
    middle stages' micro-batches hold no samples: sample_role)."""
    bos = cfg.model.image_vocab_size
    move = functools.partial(to_device, device=device)
    return (((move(text), move(decoder_input(codes, bos)), move(positions)), move(codes))
            for text, codes, positions in micro_batches)


def to_device(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """A batch tensor on the training device, copied asynchronously (the read-ahead loader pins it on a GPU)."""
    return tensor.to(device, non_blocking=True)


def dp_mean(losses: list[torch.Tensor]) -> float:
    """The mean of this rank's micro-batch losses over every data-parallel rank (equal numbers of equal
    micro-batches: the global batch's mean)."""
    mean = torch.stack(losses).mean()  # on the device: NCCL reduces CUDA tensors only
    torch.distributed.all_reduce(mean, group=ps.get_data_parallel_group())
    return mean.item() / ps.get_data_parallel_world_size()


def train_step(engine, cfg: Config, micro_batches: list, device: str) -> tuple[float, float | None]:
    """One optimizer step over this DP rank's micro-batches (MicroBatch).
    Returns the loss averaged over the global batch and the global gradient norm."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        loss = engine.train_batch(pipeline_batches(cfg, micro_batches, device))  # (averaged over micro-batches
        # and DP, on every stage)
        norm = engine.get_global_grad_norm()
        return float(loss), float(norm) if norm is not None else None
    losses = []
    move = functools.partial(to_device, device=device)
    for text, codes, positions in micro_batches:
        # positions key the dropout masks: the same masks for these samples at any layout
        loss = engine(move(text), move(codes), return_loss=True, sample_index=move(positions))
        engine.backward(loss)
        if cfg.parallel.sequence_parallel and engine.is_gradient_accumulation_boundary():
            # Once per step, over the gradients accumulated from all micro-batches: summing after each
            # micro-batch would add the earlier micro-batches' (already summed) gradients in again.
            allreduce_sequence_parallel_grads(engine.module)
        engine.step()
        losses.append(loss.detach().float())
    norm = engine.get_global_grad_norm()
    return dp_mean(losses), float(norm) if norm is not None else None


def eval_step(engine, cfg: Config, micro_batches: list, device: str) -> float:
    """The loss of one global batch of held-out micro-batches (MicroBatch), averaged like train_step's, with
    the model in eval mode (no dropout) and no gradients; the engine is left in train mode (a pipeline's stages
    until its next train_batch, which sets it)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):  # (eval_batch puts the stages in eval mode; train_batch back in train)
        loss = engine.eval_batch(pipeline_batches(cfg, micro_batches, device), num_micro_batches=len(micro_batches))
        return float(loss)  # averaged over micro-batches and DP, broadcast to every stage
    engine.eval()
    try:
        with torch.no_grad():
            move = functools.partial(to_device, device=device)
            losses = [engine(move(text), move(codes), return_loss=True, sample_index=move(positions)).float()
                      for text, codes, positions in micro_batches]
    finally:
        engine.train()
    return dp_mean(losses)
