"""The layout planner: which TP x PP x DP (and ZeRO stage) fits a model on a cluster, best first.

    python -m training.plan --model parti-20b --nodes 64 --gpus-per-node 8 [--gpu-mem-gb 80] \
        [--global-batch 2048 --micro-batch 4 --precision bf16 --recompute full]

For every candidate TP (dividing the GPUs of a node and the heads) and PP (dividing the decoder layers),
the model is built on the meta device at that TP (megatron-core layers sized for a TP group of that
size, no memory allocated) and its pieces are split over the stages as the pipeline engine does
(DeepSpeed's balanced partition of the decoder layers): exact parameters per rank. Memory per GPU is
then estimated as
  weights + gradients + optimizer state   (bytes per parameter below, divided by DP where ZeRO shards)
  + activations of the micro-batches in flight (1F1B keeps up to PP of them on the first stage),
with activations counted tensor by tensor as this model's layers save them for the backward pass
(`activation_bytes`), and a step time from the FLOPs of training/flops.py at an assumed MFU plus the
pipeline bubble. A layout must also fit while it is built (`construction_bytes`: the fp32 model below
ZeRO-3; one layer at a time at ZeRO-3, built under deepspeed.zero.Init). Layouts that fit are printed
fastest first; those that do not with why: memory over the GPU's by how much (in training or while being
built), or a global batch that the layout's micro-batch x DP does not divide. For the fastest layout it then
says what the run asks of the file system (checkpoint size, write time at --fs-gbs, writers and the host
memory each needs) and of the data pipeline (samples/s and MB/s of code shards). Sizes, counts, bandwidths and
the MFU must be positive (MFU at most 1): anything else is one line naming the flag, exit status 1.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass

from common.cli import command
from data_pipeline.code_shards import record_dtype
from model_parallel.config import model_config
from model_parallel.layers import DecoderLayer, EncoderLayer
from model_parallel.layout import ParallelLayout
from model_parallel.model import piece_classes
from model_parallel.param_count import piece_params
from training.flops import decoder_layer_flops, encoder_layer_flops, head_flops


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
                     head: bool = False) -> int:
    """Bytes saved for backward by `layers` = (encoder, decoder) layers of one micro-batch: the inputs of
    every norm and linear map, SDPA's q, k, v and output, the MLP's GeLU input and output (per layer, h
    = hidden, f = MLP width, T/N = text/image length). Full recomputation keeps each layer's input only;
    selective recomputation (the attention core) drops SDPA's output only: q, k and v are the recomputed
    region's inputs and stay. `head`: the stage holds the output head, whose logits (in the model's dtype,
    an fp32 copy for the loss and the loss's fp32 softmax) are alive at the peak whatever the recomputation
    (measured at parti-20b width by bench/scale_slice.py). Decoder-only: a decoder layer over the whole
    stream S = T + N, no cross-attention; the head adds the caption's logits with a text loss."""
    b, h, f, T, N, V = (micro_batch, m.hidden_size, m.ffn_hidden_size, m.text_seq_len, m.image_seq_len,
                        m.image_vocab_size)
    enc_layers, dec_layers = layers
    S = m.stream_len  # the decoder's stream: N, or T + N decoder-only
    text_logits = (T - 1) * m.text_vocab_size if m.decoder_only and m.text_loss_weight > 0 else 0
    logits = (N * V + text_logits) / tp * (element_bytes + 8) if head else 0
    if recompute == "full":
        return int(b * (element_bytes * h * (T * enc_layers + S * dec_layers) + logits))
    out = 0 if recompute == "selective" else 1
    attn = lambda s, kv: s * h * 2 + (s + 2 * kv + out * s + s) * h / tp  # norm + qkv inputs; q,k,v,out; proj input
    mlp = lambda s: s * h * 2 + 2 * s * f / tp                            # norm + fc1 inputs; gelu in/out
    encoder = attn(T, T) + mlp(T)
    if m.decoder_only:
        decoder = attn(S, S) + mlp(S)
    else:
        decoder = attn(N, N) + (2 * N * h + 2 * T * h / tp + 2 * N * h / tp + N * h / tp) + mlp(N)
    return int(b * (element_bytes * (enc_layers * encoder + dec_layers * decoder) + logits))


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

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb

    @property
    def peak_gb(self) -> float:
        return max(self.total_gb, self.construction_gb)

    def over_gb(self, gpu_mem_gb: float, headroom_gb: float = 4) -> float:
        """How far the peak (with the headroom) is above the GPU's memory; <= 0 when it fits."""
        return self.peak_gb + headroom_gb - gpu_mem_gb


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
    """Dense bf16 TFLOP/s per GPU (H100 SXM)."""
    mfu: float = 0.4
    """Assumed utilisation of the compute itself."""
    intra_node_gbs: float = 300.0
    """Effective all-reduce bandwidth per GPU inside a node (NVLink), GB/s."""
    inter_node_gbs: float = 40.0
    """Effective all-reduce bandwidth per GPU across nodes (e.g. 8 x 400 Gb/s InfiniBand per node), GB/s."""


def communication_s(m, o_params: int, tp: int, pp: int, dp: int, zero: int, micro_batch: int, n_micro: int,
                    recompute: str, hw: Hardware, element_bytes: int, layers: int) -> float:
    """Seconds per step spent communicating, counted without overlap (an upper bound):
    TP: 4 all-reduces of the activations per layer and micro-batch (6 with full recomputation), inside a
    node when TP <= GPUs per node; DP: a ring all-reduce of the gradients (ZeRO-3 adds the parameter
    all-gathers: x1.5), across nodes when the DP group spans nodes; PP: activations sent between stages."""
    tokens = micro_batch * (m.text_seq_len + m.image_seq_len)
    tp_bw = hw.intra_node_gbs if tp <= hw.gpus_per_node else hw.inter_node_gbs
    tp_s = 0.0
    if tp > 1:
        per = tokens * m.hidden_size * element_bytes * 2 * (tp - 1) / tp
        tp_s = (6 if recompute == "full" else 4) * layers * n_micro * per / (tp_bw * 1e9)
    dp_bw = hw.inter_node_gbs if tp * dp > hw.gpus_per_node else hw.intra_node_gbs
    dp_s = 2 * o_params * element_bytes * (dp - 1) / dp / (dp_bw * 1e9) * (1.5 if zero >= 3 else 1.0)
    pp_s = 0.0 if pp == 1 else 2 * n_micro * tokens * m.hidden_size * element_bytes / (hw.inter_node_gbs * 1e9)
    return tp_s + dp_s + pp_s


def construction_bytes(stage_params: int, largest_piece: int, zero: int) -> int:
    """Peak bytes while building the model (training/engine.py's build_model): below ZeRO-3 the stage is
    built whole in fp32 on the GPU before DeepSpeed casts it to bf16; at ZeRO-3 it is built under
    deepspeed.zero.Init, which partitions each module as soon as it exists, so at most one piece (a whole
    layer, an upper bound) is ever whole."""
    return 4 * (largest_piece if zero >= 3 else stage_params)


def estimate(model_cfg, tp, pp, dp, zero, micro_batch, global_batch, precision, recompute, hw: Hardware,
             stage_params: list[int] | None = None, largest_piece: int | None = None) -> Layout:
    if largest_piece is None:
        largest_piece = max(piece_params(model_cfg, tp))
    stage_params = stage_params or params_per_stage(model_cfg, tp, pp)
    gb, w = 2**30, 2 if precision == "bf16" else 4
    grads_b = 4                       # gradients accumulated in fp32
    opt_b = 12 if precision == "bf16" else 8  # fp32 master (bf16 only) + Adam moments
    n_micro = max(1, global_batch // (micro_batch * dp))
    pieces = stage_pieces(model_cfg, pp)
    kinds = [cls for _, cls in piece_classes(model_cfg)]
    worst, slowest = None, 0.0
    for s, (params, stage) in enumerate(zip(stage_params, pieces)):
        layers = (sum(kinds[k] is EncoderLayer for k in stage), sum(kinds[k] is DecoderLayer for k in stage))
        in_flight = min(pp - s, n_micro)  # 1F1B: stage s holds up to pp - s micro-batches
        act = activation_bytes(model_cfg, micro_batch, tp, w, recompute, layers, head=s == pp - 1) * in_flight
        mem = (params * w / (dp if zero >= 3 else 1), params * grads_b / (dp if zero >= 2 else 1),
               params * opt_b / (dp if zero >= 1 else 1), act)
        if worst is None or sum(mem) > sum(worst[1]):
            worst = (params, mem)
        flops = (layers[0] * encoder_layer_flops(model_cfg) + layers[1] * decoder_layer_flops(model_cfg)
                 + (head_flops(model_cfg) if s == pp - 1 else 0))
        slowest = max(slowest, 3 * flops * micro_batch / (tp * hw.peak_tflops * 1e12 * hw.mfu))
    # 1F1B: n_micro + pp - 1 slots of the slowest stage (the bubble, and the imbalance of the encoder
    # living on the first stage, both show up here).
    compute = (n_micro + pp - 1) * slowest
    params, (wb, gr, op, ac) = worst
    layers = (model_cfg.encoder_layers + model_cfg.decoder_layers) // pp
    comm = communication_s(model_cfg, params, tp, pp, dp, zero, micro_batch, n_micro, recompute, hw, w, layers)
    return Layout(tp, pp, dp, zero, params, wb / gb, gr / gb, op / gb, ac / gb, compute + comm,
                  construction_bytes(max(stage_params), largest_piece, zero) / gb)


CHECKPOINT_BYTES_PER_PARAM = 12
"""What a checkpoint stores per parameter (training/checkpoint.py): the fp32 master weight and AdamW's two fp32
moments, whatever the precision and layout (Adafactor's factored statistics are smaller)."""


@dataclass
class RunCosts:
    """What a layout asks of the file system and the data pipeline."""

    checkpoint_gb: float
    write_s: float            # at the given aggregate file-system bandwidth
    writers: int              # ranks that write: all of them, each its own part (training/checkpoint.py)
    host_gb_per_writer: float  # a writer's part, copied to host memory while it is written
    samples_per_s: float      # what the step time asks of the data pipeline
    data_mb_per_s: float      # in code-shard bytes (data_pipeline/code_shards.py records)


def run_costs(model_cfg, total_params: int, o: Layout, global_batch: int, fs_gbs: float) -> RunCosts:
    """Checkpoint size and write time, and the data rate a layout's step time needs."""
    total = CHECKPOINT_BYTES_PER_PARAM * total_params
    record = record_dtype(model_cfg.image_seq_len, model_cfg.text_seq_len).itemsize
    samples_per_s = global_batch / o.step_s
    world = o.tp * o.pp * o.dp  # (ZeRO-1/2/3: each rank's partition; ZeRO-0: whole tensors spread over DP)
    return RunCosts(total / 1e9, total / (fs_gbs * 1e9), world, total / world / 2**30,
                    samples_per_s, samples_per_s * record / 1e6)


def check_inputs(nodes: int, hw: Hardware, gpu_mem_gb: float, global_batch: int, micro_batch: int,
                 headroom_gb: float = 4) -> None:
    """A ValueError naming the first input that makes no sense (a zero or negative count or size, an MFU
    outside (0, 1]): such inputs gave divisions by zero, or layouts with DP = -1 that 'fit'."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", hw.gpus_per_node),
                        ("--global-batch", global_batch), ("--micro-batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a whole number >= 1, got {value}")
    for flag, value in (("--gpu-mem-gb", gpu_mem_gb), ("--peak-tflops", hw.peak_tflops),
                        ("--intra-node-gbs", hw.intra_node_gbs), ("--inter-node-gbs", hw.inter_node_gbs)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a number > 0, got {value}")
    if not 0 < hw.mfu <= 1:
        raise ValueError(f"--mfu must be a fraction of the peak in (0, 1], got {hw.mfu}")
    if not (math.isfinite(headroom_gb) and headroom_gb >= 0):
        raise ValueError(f"headroom_gb must be >= 0, got {headroom_gb}")


def plan(model: str, nodes: int, hw: Hardware, gpu_mem_gb: float = 80, global_batch: int = 2048,
         micro_batch: int = 1, precision: str = "bf16", recompute: str = "full",
         headroom_gb: float = 4) -> tuple[list[Layout], list[Layout], list[Skipped]]:
    """(layouts that fit, fastest first; every (TP, PP, ZeRO) that does not, smallest model split first;
    the (TP, PP) splits not estimated because micro-batch x DP does not divide the global batch).
    `headroom_gb` is left free for the framework, buffers and fragmentation. Nonsense inputs
    (check_inputs) are a ValueError."""
    check_inputs(nodes, hw, gpu_mem_gb, global_batch, micro_batch, headroom_gb)
    m = model_config(model)
    world = nodes * hw.gpus_per_node
    fits, misses, skipped = [], [], []
    for tp in [t for t in (1, 2, 4, 8, 16) if hw.gpus_per_node % t == 0 and m.num_heads % t == 0]:
        pieces = piece_params(m, tp)
        for pp in [p for p in range(1, m.decoder_layers + 1) if m.decoder_layers % p == 0 and world % (tp * p) == 0]:
            dp = world // (tp * pp)
            reason = ParallelLayout(tp, pp, dp).fits(m, micro_batch, global_batch)  # the rules a run obeys
            if reason:
                skipped.append(Skipped(tp, pp, dp, reason))
                continue
            stage_params = params_per_stage(m, tp, pp, pieces)
            for zero in [z for z in (0, 1, 2, 3) if ParallelLayout(tp, pp, dp, z).fits() is None]:
                o = estimate(m, tp, pp, dp, zero, micro_batch, global_batch, precision, recompute, hw, stage_params,
                             max(pieces))
                (fits if o.over_gb(gpu_mem_gb, headroom_gb) <= 0 else misses).append(o)
    fits.sort(key=lambda o: (o.step_s, o.total_gb))
    misses.sort(key=lambda o: (o.tp * o.pp, o.zero))
    return fits, misses, skipped


def _row(o: Layout) -> str:
    return (f"TP={o.tp:<2} PP={o.pp:<2} DP={o.dp:<4} ZeRO-{o.zero}  params/rank {o.params / 1e9:7.3f}B  "
            f"weights {o.weights_gb:6.1f}  grads {o.grads_gb:6.1f}  optim {o.optimizer_gb:6.1f}  "
            f"activ {o.activations_gb:6.1f}  = {o.total_gb:6.1f} GB  (building {o.construction_gb:5.1f})  "
            f"step {o.step_s:7.2f} s")


def miss_reason(o: Layout, gpu_mem_gb: float, headroom_gb: float = 4) -> str:
    when = "while being built" if o.construction_gb > o.total_gb else "in training"
    return (f"over by {o.over_gb(gpu_mem_gb, headroom_gb):.1f} GB {when} "
            f"({o.peak_gb:.1f} + {headroom_gb:g} headroom > {gpu_mem_gb:g})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="preset, e.g. parti-20b")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80)
    parser.add_argument("--global-batch", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="full")
    parser.add_argument("--peak-tflops", type=float, default=989, help="per GPU (H100 bf16 dense: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed utilisation of the compute")
    parser.add_argument("--intra-node-gbs", type=float, default=300, help="NVLink all-reduce GB/s per GPU")
    parser.add_argument("--inter-node-gbs", type=float, default=40, help="network all-reduce GB/s per GPU")
    parser.add_argument("--fs-gbs", type=float, default=20, help="aggregate file-system write GB/s (checkpoints)")
    parser.add_argument("--show", type=int, default=8)
    args = parser.parse_args(argv)
    hw = Hardware(args.gpus_per_node, args.peak_tflops, args.mfu, args.intra_node_gbs, args.inter_node_gbs)
    with command(errors=(ValueError,), label="training.plan"):
        if args.show < 0:
            raise ValueError(f"--show must be >= 0, got {args.show}")
        if not (math.isfinite(args.fs_gbs) and args.fs_gbs > 0):
            raise ValueError(f"--fs-gbs must be a number > 0, got {args.fs_gbs}")
        fits, misses, skipped = plan(args.model, args.nodes, hw, args.gpu_mem_gb, args.global_batch,
                                     args.micro_batch, args.precision, args.recompute)
    print(f"{args.model} on {args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_mem_gb:g} GB "
          f"(global batch {args.global_batch}, micro-batch {args.micro_batch}, {args.precision}, "
          f"recompute {args.recompute}, assumed MFU {args.mfu}); memory per GPU in GB:")
    if fits:
        print("fits, fastest first:")
        for o in fits[: args.show]:
            print("  " + _row(o))
    else:
        print("no layout fits" + ("; why the closest ones miss:" if misses or skipped else ""))
        misses = sorted(misses, key=lambda o: o.over_gb(args.gpu_mem_gb))  # the nearest miss first
    if misses:
        print(f"does not fit (over {args.gpu_mem_gb:g} GB less 4 GB headroom), "
              f"{'least split' if fits else 'closest'} first:")
        for o in misses[: args.show]:
            print(f"  {_row(o)}  {miss_reason(o, args.gpu_mem_gb)}")
    if skipped:
        print(f"not estimated: micro-batch x DP does not divide the global batch {args.global_batch}:")
        for k in skipped[: args.show]:
            print(f"  TP={k.tp:<2} PP={k.pp:<2} DP={k.dp:<4} {k.reason}")
    if not fits:
        sys.exit(1)
    best, m = fits[0], model_config(args.model)
    c = run_costs(m, sum(piece_params(m, 1)), best, args.global_batch, args.fs_gbs)
    print(f"the fastest layout's run: a checkpoint of {c.checkpoint_gb:,.1f} GB (fp32 weights + AdamW moments) takes "
          f"{c.write_s:,.1f} s at {args.fs_gbs:g} GB/s; all {c.writers} ranks write it, each its own "
          f"{c.host_gb_per_writer:,.2f} GB part (a copy of it in host memory while written); the step time needs "
          f"{c.samples_per_s:,.0f} samples/s = {c.data_mb_per_s:,.1f} MB/s of code shards")


if __name__ == "__main__":
    main()
