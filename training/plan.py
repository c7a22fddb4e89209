r"""The layout planner: which TP x PP x DP, ZeRO stage, micro-batch and recomputation fit a model on a
cluster, fastest first.

    python -m training.plan --model parti-20b --nodes 64 --gpus-per-node 8 [--gpu-mem-gb 80] \
        [--global-batch 2048 --micro-batch 4 --precision bf16 --recompute full --ema]

For every candidate TP (dividing the GPUs of a node and the heads) and PP (dividing the decoder layers),
the model is built on the meta device at that TP (megatron-core layers sized for a TP group of that
size, no memory allocated) and its pieces are split over the stages as the pipeline engine does
(DeepSpeed's balanced partition of the decoder layers): exact parameters per rank. Memory per GPU is
then estimated as
  weights + gradients + optimizer state   (bytes per parameter below, divided by DP where ZeRO shards)
  + activations of the micro-batches in flight (1F1B keeps up to PP of them on the first stage),
with activations counted tensor by tensor as this model's layers save them for the backward pass
(`activation_bytes`; within 12% of the peaks measured on an H200, tests/test_plan.py), in GiB (2^30 bytes: an
"80 GB" H100 holds 80 GiB) where it says GB. The step time: the
FLOPs of training/flops.py plus what recomputation runs again, at `--hfu` of the peak, plus a fixed cost
per layer and micro-batch (`--overhead-ms`: host work and launches, which make small micro-batches slow;
both fitted to the H200's step times), over the 1F1B slots of the slowest stage (the bubble), plus
communication. Unless given, the micro-batch (powers of two) and the recomputation are chosen per layout:
the fastest that fits. A layout must also fit while it is built (`construction_bytes`: the fp32 model below
ZeRO-3; one layer at a time at ZeRO-3, built under deepspeed.zero.Init). Layouts that fit are printed
fastest first with the MFU their step time means; those that do not with why: memory over the GPU's by how
much (in training or while being built), or a global batch that no micro-batch x DP divides. For the fastest
layout it then says what the run asks of the file system (checkpoint size, write time at --fs-gbs, writers
and the host memory each needs) and of the data pipeline (samples/s and MB/s of code shards). Sizes, counts,
bandwidths and the utilisation must be positive (utilisation at most 1): anything else is one line naming
the flag, exit status 1.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass, replace

from common.cli import command, description
from data_pipeline.code_shards import record_dtype
from model_parallel.config import model_config
from model_parallel.layers import DecoderLayer, EncoderLayer
from model_parallel.layout import RECOMPUTE_MODES, ParallelLayout
from model_parallel.model import piece_classes
from model_parallel.param_count import piece_params
from training.flops import (
    TF32_FRACTION_OF_BF16,
    decoder_layer_flops,
    encoder_layer_flops,
    head_flops,
    recomputed_layer_flops,
    train_flops_per_sample,
)


def stage_pieces(model_cfg, pp: int) -> list[range]:
    """Which pieces of the model (`piece_classes`) each pipeline stage holds (DeepSpeed's 'type:DecoderLayerPipe')."""
    weights = tuple(1 if cls is DecoderLayer else 0 for _, cls in piece_classes(model_cfg))
    bounds = _partition_balanced(weights, pp)
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


@functools.cache
def _partition_balanced(weights: tuple[int, ...], parts: int) -> tuple[int, ...]:
    """DeepSpeed's own split (what PipelineModule builds), remembered: it takes ~0.15 s per call at parti-20b's
    depth, and a plan asks for the same few splits for every layout it weighs (parti-20b on 64 nodes: 92 calls,
    15 s of the plan's 16 s; 3.5 s in all remembered)."""
    from deepspeed.runtime.utils import partition_balanced

    return tuple(partition_balanced(weights=list(weights), num_parts=parts))


def params_per_stage(model_cfg, tp: int, pp: int, pieces: list[int] | None = None) -> list[int]:
    """Exact parameters of TP rank 0 of each pipeline stage."""
    counts = pieces or piece_params(model_cfg, tp)
    return [sum(counts[k] for k in stage) for stage in stage_pieces(model_cfg, pp)]


def activation_bytes(m, micro_batch: int, tp: int, element_bytes: int, recompute: str, layers: tuple[int, int],
                     head: bool = False, embeddings: bool = False) -> int:
    """Bytes saved for backward by `layers` = (encoder, decoder) layers of one micro-batch: the inputs of
    every norm and linear map, SDPA's q, k, v and output, the MLP's GeLU input and output (per layer, h
    = hidden, f = MLP width, T/N = text/image length), with model.dropout the residual dropouts' bool masks
    (a byte per element of each site; `embeddings`: the stage also holds the embeddings' dropout sites).
    Full recomputation keeps each layer's input only (and, once per stage, one layer's working set:
    `recomputed_layer_bytes`); selective recomputation (the attention core) drops SDPA's output only: q, k
    and v are the recomputed region's inputs and stay. `head`: the stage holds the output head, whose logits
    (in the model's dtype, an fp32 copy for the loss and the loss's fp32 softmax) are alive at the peak
    whatever the recomputation (measured at parti-20b width by bench/scale_slice.py, on CPU: megatron's plain
    loss; a GPU's kernels.cross_entropy=fused keeps the logits alone and, in the backward, their gradient, so
    there this is an upper bound by ~6 bytes a logit: ~6 GiB at parti-350m's micro-batch of 128). Decoder-only: a
    decoder layer over the whole stream S = T + N, no cross-attention; the head adds the caption's logits with a
    text loss."""
    b, h, f, T, N, V = (micro_batch, m.hidden_size, m.ffn_hidden_size, m.text_seq_len, m.image_seq_len,
                        m.image_vocab_size)
    enc_layers, dec_layers = layers
    S = m.stream_len  # the decoder's stream: N, or T + N decoder-only
    text_logits = (T - 1) * m.text_vocab_size if m.decoder_only and m.text_loss_weight > 0 else 0
    logits = (N * V + text_logits) / tp * (element_bytes + 8) if head else 0
    layer_sites = 2 * T * enc_layers + (2 * S if m.decoder_only else 3 * N) * dec_layers
    embedding_sites = (S if m.decoder_only else T + N) if embeddings else 0  # outside any recomputation
    if recompute == "full":
        masks = embedding_sites * h if m.dropout > 0 else 0
        return int(b * (element_bytes * h * (T * enc_layers + S * dec_layers) + logits + masks))
    masks = (layer_sites + embedding_sites) * h if m.dropout > 0 else 0
    out = 0 if recompute == "selective" else 1
    attn = lambda s, kv: s * h * 2 + (s + 2 * kv + out * s + s) * h / tp  # norm + qkv inputs; q,k,v,out; proj input
    mlp = lambda s: s * h * 2 + 2 * s * f / tp                            # norm + fc1 inputs; gelu in/out
    encoder = attn(T, T) + mlp(T)
    if m.decoder_only:
        decoder = attn(S, S) + mlp(S)
    else:
        decoder = attn(N, N) + (2 * N * h + 2 * T * h / tp + 2 * N * h / tp + N * h / tp) + mlp(N)
    return int(b * (element_bytes * (enc_layers * encoder + dec_layers * decoder) + logits + masks))


ESTIMATE_MARGIN = 0.1
"""A layout fits when its estimated peak plus this fraction of it (and the headroom) is within the GPU's memory:
against the allocated peaks an H200 measured (tests/test_plan.py) the estimate was 8% low to 11% high. The
allocator held 2-21% more than it had allocated there, cached blocks it frees and retries with before it
reports out of memory."""


def recomputed_layer_bytes(m, micro_batch: int, tp: int, element_bytes: int, recompute: str,
                           layers: tuple[int, int]) -> int:
    """Under full recomputation, the tensors of the one layer of a stage that runs again for its backward (the
    largest kind it holds), alive beside the saved inputs of every micro-batch in flight: without it
    bench/scale_slice.py measured the forward peak at 1.53x the estimate. 0 otherwise."""
    if recompute != "full" or not any(layers):
        return 0
    return activation_bytes(m, micro_batch, tp, element_bytes, "none", (0, 1) if layers[1] else (1, 0))


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    params: int           # on the most loaded rank
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    step_s: float
    construction_gb: float = 0.0  # while the model is built, before DeepSpeed casts and partitions it
    micro_batch: int = 1
    recompute: str = "full"
    mfu: float = 0.0              # the model's FLOPs per step (no recomputation) / (step time x peak of all GPUs)

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb

    @property
    def peak_gb(self) -> float:
        return max(self.total_gb, self.construction_gb)

    def over_gb(self, gpu_mem_gb: float, headroom_gb: float = 4) -> float:
        """How far the peak (with ESTIMATE_MARGIN and the headroom) is above the GPU's memory; <= 0 when it fits."""
        return self.peak_gb * (1 + ESTIMATE_MARGIN) + headroom_gb - gpu_mem_gb


@dataclass
class Skipped:
    """A (TP, PP) split that was not estimated, and why."""
    tp: int
    pp: int
    dp: int
    reason: str


@dataclass
class Hardware:
    gpus_per_node: int = 8
    peak_tflops: float = 989.0
    """Dense bf16 TFLOP/s per GPU (H100 SXM). fp32 runs compute at TF32_FRACTION_OF_BF16 of it."""
    hfu: float = 0.5
    """Hardware FLOPs utilisation of a large micro-batch: the FLOPs it executes (recomputation included) over
    the peak. Measured on one H200 (bench/results/gpu_nvidia-h200_2026-11-30), bf16, ZeRO-1, as the slope of
    step time over micro-batch size: 0.50 for parti-350m, 0.60 for parti-3b (the second run, 2026-12-04, four
    micro-batches per step: 0.46 and 0.63, 3.1 and 4.0 ms per layer; the constants stand)."""
    overhead_ms_per_layer: float = 3.5
    """What each micro-batch costs per transformer layer on top of its FLOPs (the host's Python and kernel
    launches, DeepSpeed's gradient hooks; ~1/3 more with full recomputation, which runs the forward again):
    the intercept of the same measurements, 75 ms for parti-350m's 24 layers and 193 ms for parti-3b's 48
    (its optimizer step is ~30 ms of that). It is why small micro-batches are slow: parti-350m took 0.094 s
    per step at micro-batch 4, where its FLOPs at that utilisation take 0.012 s."""
    intra_node_gbs: float = 300.0
    """Effective all-reduce bandwidth per GPU inside a node (NVLink), GB/s."""
    inter_node_gbs: float = 40.0
    """Effective all-reduce bandwidth per GPU across nodes (e.g. 8 x 400 Gb/s InfiniBand per node), GB/s."""


def communication_s(m, o_params: int, tp: int, pp: int, dp: int, zero: int, micro_batch: int, n_micro: int,
                    recompute: str, hw: Hardware, element_bytes: int, layers: int) -> float:
    """Seconds per step spent communicating, counted without overlap (an upper bound):
    TP: 4 all-reduces of the activations per layer and micro-batch (6 with full recomputation), inside a
    node when TP <= GPUs per node; DP: `dp_bytes_per_param` per parameter of the stage, across nodes when the
    DP group spans nodes; PP: activations sent between stages."""
    tokens = micro_batch * (m.text_seq_len + m.image_seq_len)
    tp_bw = hw.intra_node_gbs if tp <= hw.gpus_per_node else hw.inter_node_gbs
    tp_s = 0.0
    if tp > 1:
        per = tokens * m.hidden_size * element_bytes * 2 * (tp - 1) / tp
        tp_s = (6 if recompute == "full" else 4) * layers * n_micro * per / (tp_bw * 1e9)
    dp_bw = hw.inter_node_gbs if tp * dp > hw.gpus_per_node else hw.intra_node_gbs
    dp_s = o_params * dp_bytes_per_param(zero, n_micro, element_bytes, pp > 1) * (dp - 1) / dp / (dp_bw * 1e9)
    pp_s = 0.0 if pp == 1 else 2 * n_micro * tokens * m.hidden_size * element_bytes / (hw.inter_node_gbs * 1e9)
    return tp_s + dp_s + pp_s


def dp_bytes_per_param(zero: int, n_micro: int, element_bytes: int, pipeline: bool = False) -> int:
    """Bytes per parameter a rank sends over the data-parallel group in one step, in ring passes of the whole
    tensor (an all-reduce is two, an all-gather or reduce-scatter one; times (DP - 1) / DP), as DeepSpeed 0.19
    runs each stage with training/engine.py's config (measured by tests/test_plan.py on its collectives).
    Gradients travel in fp32 at ZeRO 1-3 (bf16 runs too: deepspeed_config), in the weights' dtype at ZeRO-0.
    ZeRO-0 all-reduces the gradients once per step; ZeRO-1 too, and all-gathers the updated weights, as does
    ZeRO-0 of a bf16 pipeline (DeepSpeed's pipeline engine runs BF16_Optimizer there); ZeRO-2 all-reduces its
    gradient buckets after every micro-batch (engine.allreduce_gradients: stage 2 "communicates during non
    gradient accumulation boundaries as well") and all-gathers the updated weights; ZeRO-3 reduce-scatters the
    gradients after every micro-batch and all-gathers the weights for its forward and backward, at most
    (DeepSpeed keeps gathered weights alive up to stage3_max_live_parameters, and small ones whole)."""
    w = element_bytes
    if zero == 0:
        return 3 * w if pipeline and w == 2 else 2 * w
    grads = 4
    return {1: 2 * grads + w, 2: 2 * n_micro * grads + w, 3: n_micro * grads + 2 * n_micro * w}[zero]


def construction_bytes(stage_params: int, largest_piece: int, zero: int) -> int:
    """Peak bytes while building the model (training/engine.py's build_model): below ZeRO-3 the stage is
    built whole in fp32 on the GPU before DeepSpeed casts it to bf16; at ZeRO-3 it is built under
    deepspeed.zero.Init, which partitions each module as soon as it exists, so at most one piece (a whole
    layer, an upper bound) is ever whole."""
    return 4 * (largest_piece if zero >= 3 else stage_params)


def estimate(model_cfg, tp, pp, dp, zero, micro_batch, global_batch, precision, recompute, hw: Hardware,
             stage_params: list[int] | None = None, largest_piece: int | None = None, ema: bool = False) -> Layout:
    if largest_piece is None:
        largest_piece = max(piece_params(model_cfg, tp))
    stage_params = stage_params or params_per_stage(model_cfg, tp, pp)
    gb, w = 2**30, 2 if precision == "bf16" else 4
    hw = replace(hw, peak_tflops=run_peak_tflops(hw.peak_tflops, precision))
    # bf16 ZeRO-0 under the pipeline engine is DeepSpeed's BF16_Optimizer: bf16 gradients, the optimizer's
    # state sharded over DP as at ZeRO-1. Otherwise gradients are accumulated in fp32.
    bf16_pipeline_zero0 = precision == "bf16" and pp > 1 and zero == 0
    grads_b = 2 if bf16_pipeline_zero0 else 4
    opt_b = (12 if precision == "bf16" else 8) + EMA_BYTES_PER_PARAM * ema  # fp32 master (bf16 only) + Adam moments
    opt_dp = dp if zero >= 1 or bf16_pipeline_zero0 else 1
    n_micro = max(1, global_batch // (micro_batch * dp))
    pieces = stage_pieces(model_cfg, pp)
    kinds = [cls for _, cls in piece_classes(model_cfg)]
    worst, slowest = None, 0.0
    for s, (params, stage) in enumerate(zip(stage_params, pieces)):
        layers = (sum(kinds[k] is EncoderLayer for k in stage), sum(kinds[k] is DecoderLayer for k in stage))
        in_flight = min(pp - s, n_micro)  # 1F1B: stage s holds up to pp - s micro-batches
        act = (activation_bytes(model_cfg, micro_batch, tp, w, recompute, layers, head=s == pp - 1,
                                embeddings=s == 0) * in_flight
               + recomputed_layer_bytes(model_cfg, micro_batch, tp, w, recompute, layers))
        mem = (params * w / (dp if zero >= 3 else 1), params * grads_b / (dp if zero >= 2 else 1),
               params * opt_b / opt_dp, act)
        if worst is None or sum(mem) > sum(worst[1]):
            worst = (params, mem)
        slowest = max(slowest, micro_batch_s(model_cfg, layers, s == pp - 1, micro_batch, tp, recompute, hw))
    # 1F1B: n_micro + pp - 1 slots of the slowest stage (the bubble, and the imbalance of the encoder
    # living on the first stage, both show up here).
    compute = (n_micro + pp - 1) * slowest
    params, (wb, gr, op, ac) = worst
    layers = (model_cfg.encoder_layers + model_cfg.decoder_layers) // pp
    comm = communication_s(model_cfg, params, tp, pp, dp, zero, micro_batch, n_micro, recompute, hw, w, layers)
    step_s = compute + comm
    mfu = train_flops_per_sample(model_cfg) * global_batch / (step_s * tp * pp * dp * hw.peak_tflops * 1e12)
    return Layout(tp, pp, dp, zero, params, wb / gb, gr / gb, op / gb, ac / gb, step_s,
                  construction_bytes(max(stage_params), largest_piece, zero) / gb, micro_batch, recompute, mfu)


def run_peak_tflops(bf16_peak: float, precision: str) -> float:
    """The peak a run of this precision computes at: fp32 runs on TF32 tensor cores, at TF32_FRACTION_OF_BF16 of
    the bf16 peak (as the trainer's MFU counts it)."""
    return bf16_peak * (TF32_FRACTION_OF_BF16 if precision == "fp32" else 1)


def micro_batch_s(m, layers: tuple[int, int], head: bool, micro_batch: int, tp: int, recompute: str,
                  hw: Hardware) -> float:
    """Seconds one micro-batch takes on a stage of `layers` = (encoder, decoder) layers (and the head):
    forward + backward FLOPs (training/flops.py), plus what recomputation runs again, at hw.hfu of the peak,
    plus hw.overhead_ms_per_layer per layer (x 4/3 with full recomputation: the forward's share again)."""
    enc, dec = layers
    redo_enc, redo_dec = recomputed_layer_flops(m, recompute)
    flops = (enc * (3 * encoder_layer_flops(m) + redo_enc) + dec * (3 * decoder_layer_flops(m) + redo_dec)
             + (3 * head_flops(m) if head else 0))
    overhead = hw.overhead_ms_per_layer / 1e3 * (enc + dec) * (4 / 3 if recompute == "full" else 1)
    return flops * micro_batch / (tp * hw.peak_tflops * 1e12 * hw.hfu) + overhead


CHECKPOINT_BYTES_PER_PARAM = 12
"""What a checkpoint stores per parameter (training/checkpoint.py): the fp32 master weight and AdamW's two fp32
moments, whatever the precision and layout (Adafactor's factored statistics are smaller)."""
EMA_BYTES_PER_PARAM = 4
"""train.ema_decay's moving average of the weights (--ema): one more fp32 value per parameter, kept and sharded with
the optimizer state and stored with it in checkpoints (training/ema.py)."""


@dataclass
class RunCosts:
    """What a layout asks of the file system and the data pipeline."""

    checkpoint_gb: float
    write_s: float            # at the given aggregate file-system bandwidth
    writers: int              # ranks that write: all of them, each its own part (training/checkpoint.py)
    host_gb_per_writer: float  # a writer's part, copied to host memory while it is written
    samples_per_s: float      # what the step time asks of the data pipeline
    data_mb_per_s: float      # in code-shard bytes (data_pipeline/code_shards.py records)


def run_costs(model_cfg, total_params: int, o: Layout, global_batch: int, fs_gbs: float, ema: bool = False) -> RunCosts:
    """Checkpoint size and write time, and the data rate a layout's step time needs (`ema`: the checkpoints hold
    the moving average of the weights too)."""
    total = (CHECKPOINT_BYTES_PER_PARAM + EMA_BYTES_PER_PARAM * ema) * total_params
    record = record_dtype(model_cfg.image_seq_len, model_cfg.text_seq_len).itemsize
    samples_per_s = global_batch / o.step_s
    world = o.tp * o.pp * o.dp  # (ZeRO-1/2/3: each rank's partition; ZeRO-0: whole tensors spread over DP)
    return RunCosts(total / 1e9, total / (fs_gbs * 1e9), world, total / world / 1e9,  # (GB: printed beside the total)
                    samples_per_s, samples_per_s * record / 1e6)


def check_inputs(nodes: int, hw: Hardware, gpu_mem_gb: float, global_batch: int, micro_batch: int | None,
                 headroom_gb: float = 4, dropout: float = 0.0) -> None:
    """A ValueError naming the first input that makes no sense (a zero or negative count or size, a
    utilisation outside (0, 1]): such inputs gave divisions by zero, or layouts with DP = -1 that 'fit'."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", hw.gpus_per_node),
                        ("--global-batch", global_batch), ("--micro-batch", 1 if micro_batch is None else micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a whole number >= 1, got {value}")
    for flag, value in (("--gpu-mem-gb", gpu_mem_gb), ("--peak-tflops", hw.peak_tflops),
                        ("--intra-node-gbs", hw.intra_node_gbs), ("--inter-node-gbs", hw.inter_node_gbs)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a number > 0, got {value}")
    if not 0 < hw.hfu <= 1:
        raise ValueError(f"--hfu must be a fraction of the peak in (0, 1], got {hw.hfu}")
    if not (math.isfinite(hw.overhead_ms_per_layer) and hw.overhead_ms_per_layer >= 0):
        raise ValueError(f"--overhead-ms must be a number >= 0, got {hw.overhead_ms_per_layer}")
    if not (math.isfinite(headroom_gb) and headroom_gb >= 0):
        raise ValueError(f"headroom_gb must be >= 0, got {headroom_gb}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--dropout must be a probability in [0, 1), got {dropout}")


def plan(model: str, nodes: int, hw: Hardware, gpu_mem_gb: float = 80, global_batch: int = 2048,
         micro_batch: int | None = None, precision: str = "bf16", recompute: str | None = None,
         dropout: float = 0.0, headroom_gb: float = 4, stages: tuple[int, ...] = (0, 1, 2, 3), ema: bool = False,
         ) -> tuple[list[Layout], list[Layout], list[Skipped]]:
    """(layouts that fit, fastest first; every (TP, PP, ZeRO) that does not, smallest model split first;
    the (TP, PP) splits not estimated because no micro-batch x DP divides the global batch).
    For each (TP, PP, ZeRO) the micro-batch (None: every power of two whose micro-batch x DP divides the
    global batch) and recomputation (None: none, selective and full) are chosen: the fastest pair that fits,
    else, for the misses, the one that needs the least memory. `dropout`: the run's model.dropout (its masks
    are kept for the backward pass). `stages`: the ZeRO stages to consider. `ema`: the run keeps a moving average
    of the weights (train.ema_decay: EMA_BYTES_PER_PARAM more optimizer state). `headroom_gb` is left free for
    the framework, buffers and fragmentation. Nonsense inputs (check_inputs) are a ValueError."""
    check_inputs(nodes, hw, gpu_mem_gb, global_batch, micro_batch, headroom_gb, dropout)
    m = model_config(model, {"dropout": dropout})
    world = nodes * hw.gpus_per_node
    modes = [recompute] if recompute else list(RECOMPUTE_MODES)
    fits, misses, skipped = [], [], []
    for tp in [t for t in (1, 2, 4, 8, 16) if hw.gpus_per_node % t == 0 and m.num_heads % t == 0]:
        pieces = piece_params(m, tp)
        for pp in [p for p in range(1, m.decoder_layers + 1) if m.decoder_layers % p == 0 and world % (tp * p) == 0]:
            dp = world // (tp * pp)
            tried = [micro_batch] if micro_batch else [2**k for k in range(16) if 2**k * dp <= global_batch] or [1]
            micro_batches = [b for b in tried if ParallelLayout(tp, pp, dp).fits(m, b, global_batch) is None]
            if not micro_batches:  # the rules a run obeys
                skipped.append(Skipped(tp, pp, dp, ParallelLayout(tp, pp, dp).fits(m, tried[0], global_batch)))
                continue
            stage_params = params_per_stage(m, tp, pp, pieces)
            for zero in [z for z in stages if ParallelLayout(tp, pp, dp, z).fits() is None]:
                options = [estimate(m, tp, pp, dp, zero, b, global_batch, precision, mode, hw, stage_params,
                                    max(pieces), ema) for b in micro_batches for mode in modes]
                fitting = [o for o in options if o.over_gb(gpu_mem_gb, headroom_gb) <= 0]
                if fitting:
                    fits.append(min(fitting, key=lambda o: (o.step_s, o.total_gb)))
                else:
                    misses.append(min(options, key=lambda o: (o.peak_gb, o.total_gb)))
    fits.sort(key=lambda o: (o.step_s, o.total_gb))
    misses.sort(key=lambda o: (o.tp * o.pp, o.zero))
    return fits, misses, skipped


def zero_stages(text: str) -> tuple[int, ...]:
    """--zero's comma-separated stages, each 0-3 (a ValueError naming the flag otherwise)."""
    try:
        stages = tuple(sorted({int(z) for z in text.split(",")}))
    except ValueError:
        stages = ()
    if not stages or not set(stages) <= {0, 1, 2, 3}:
        raise ValueError(f"--zero must be stages 0-3 separated by commas, got {text!r}")
    return stages


def _row(o: Layout) -> str:
    return (f"TP={o.tp:<2} PP={o.pp:<2} DP={o.dp:<4} ZeRO-{o.zero}  micro-batch {o.micro_batch:<3} "
            f"recompute {o.recompute:<9}  params/rank {o.params / 1e9:7.3f}B  "
            f"weights {o.weights_gb:6.1f}  grads {o.grads_gb:6.1f}  optim {o.optimizer_gb:6.1f}  "
            f"activ {o.activations_gb:6.1f}  = {o.total_gb:6.1f} GB  (building {o.construction_gb:5.1f})  "
            f"step {o.step_s:7.2f} s  MFU {o.mfu:4.0%}")


def miss_reason(o: Layout, gpu_mem_gb: float, headroom_gb: float = 4) -> str:
    when = "while being built" if o.construction_gb > o.total_gb else "in training"
    return (f"over by {o.over_gb(gpu_mem_gb, headroom_gb):.1f} GB {when} "
            f"({o.peak_gb:.1f} + {ESTIMATE_MARGIN:.0%} + {headroom_gb:g} headroom > {gpu_mem_gb:g})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--model", required=True, help="preset, e.g. parti-20b")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80)
    parser.add_argument("--global-batch", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, help="per GPU (default: the fastest power of two that fits)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--dropout", type=float, default=0.0, help="the run's model.dropout (its masks take memory)")
    parser.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to consider, e.g. 1,2,3 (bf16 gradients "
                        "accumulate and reduce in fp32 at those; at 0 in bf16)")
    parser.add_argument("--recompute", choices=RECOMPUTE_MODES, help="(default: the fastest that fits)")
    parser.add_argument("--peak-tflops", type=float, default=989, help="bf16 dense per GPU (H100: 989); "
                        "fp32 runs use TF32 at half of it")
    parser.add_argument("--hfu", type=float, default=Hardware.hfu,
                        help="FLOPs executed / peak on a large micro-batch (measured on an H200: 0.50-0.60)")
    parser.add_argument("--overhead-ms", type=float, default=Hardware.overhead_ms_per_layer,
                        help="time per layer and micro-batch beyond its FLOPs (measured on an H200: 3.1-4.0)")
    parser.add_argument("--intra-node-gbs", type=float, default=300, help="NVLink all-reduce GB/s per GPU")
    parser.add_argument("--inter-node-gbs", type=float, default=40, help="network all-reduce GB/s per GPU")
    parser.add_argument("--fs-gbs", type=float, default=20, help="aggregate file-system write GB/s (checkpoints)")
    parser.add_argument("--ema", action="store_true",
                        help="the run keeps a moving average of the weights (train.ema_decay > 0)")
    parser.add_argument("--show", type=int, default=8)
    args = parser.parse_args(argv)
    hw = Hardware(args.gpus_per_node, args.peak_tflops, args.hfu, args.overhead_ms, args.intra_node_gbs,
                  args.inter_node_gbs)
    with command(errors=(ValueError,), label="training.plan"):
        if args.show < 0:
            raise ValueError(f"--show must be >= 0, got {args.show}")
        if not (math.isfinite(args.fs_gbs) and args.fs_gbs > 0):
            raise ValueError(f"--fs-gbs must be a number > 0, got {args.fs_gbs}")
        fits, misses, skipped = plan(args.model, args.nodes, hw, args.gpu_mem_gb, args.global_batch,
                                     args.micro_batch, args.precision, args.recompute, args.dropout,
                                     stages=zero_stages(args.zero), ema=args.ema)
    peak = run_peak_tflops(args.peak_tflops, args.precision)
    print(f"{args.model} on {args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_mem_gb:g} GB "
          f"(global batch {args.global_batch}, micro-batch {args.micro_batch or 'chosen'}, {args.precision}, "
          f"dropout {args.dropout:g}, ZeRO {args.zero}, "
          f"recompute {args.recompute or 'chosen'}; step time at {args.hfu:g} of the "
          f"{peak:g} TFLOP/s {'TF32' if args.precision == 'fp32' else 'bf16'} peak plus {args.overhead_ms:g} ms "
          f"per layer and micro-batch); memory per GPU in GB:")
    if fits:
        print("fits, fastest first:")
        for o in fits[: args.show]:
            print("  " + _row(o))
    else:
        print("no layout fits" + ("; why the closest ones miss:" if misses or skipped else ""))
        misses = sorted(misses, key=lambda o: o.over_gb(args.gpu_mem_gb))  # the nearest miss first
    if misses:
        print(f"does not fit (over {args.gpu_mem_gb:g} GB less {ESTIMATE_MARGIN:.0%} margin and 4 GB headroom), "
              f"{'least split' if fits else 'closest'} first:")
        for o in misses[: args.show]:
            print(f"  {_row(o)}  {miss_reason(o, args.gpu_mem_gb)}")
    if skipped:
        print(f"not estimated: no micro-batch x DP divides the global batch {args.global_batch}:")
        for k in skipped[: args.show]:
            print(f"  TP={k.tp:<2} PP={k.pp:<2} DP={k.dp:<4} {k.reason}")
    if not fits:
        sys.exit(1)
    best, m = fits[0], model_config(args.model)
    c = run_costs(m, sum(piece_params(m, 1)), best, args.global_batch, args.fs_gbs, args.ema)
    held = "fp32 weights + AdamW moments" + (" + their moving average" if args.ema else "")
    print(f"the fastest layout's run: a checkpoint of {c.checkpoint_gb:,.1f} GB ({held}) takes "
          f"{c.write_s:,.1f} s at {args.fs_gbs:g} GB/s; all {c.writers} ranks write it, each its own "
          f"{c.host_gb_per_writer:,.2f} GB part (a copy of it in host memory while written); the step time needs "
          f"{c.samples_per_s:,.0f} samples/s = {c.data_mb_per_s:,.1f} MB/s of code shards")


if __name__ == "__main__":
    main()
