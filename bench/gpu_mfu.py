"""The GPU check's speed sections (run by bench/gpu_check.py through bench/gpu_sections.SECTIONS): MFU of the
Parti presets at the largest micro-batch that fits, where a step's GPU time goes, the planner's step-time fit,
and compiled layers against eager. They need a GPU; like every section, each imports the project's modules
it needs inside itself.
"""
from __future__ import annotations

import cProfile
import gc
import io
import math
import pstats
import re
import time

import torch

from bench.gpu_common import Context, sync, train_config


def _largest_micro_batch(measure, candidates: list[int], fits) -> tuple[int, dict]:
    """Measure at the two smallest candidates, then at the largest that `fits` (the layout planner's memory
    estimate; a line through the two small peaks cannot say: there the optimizer state sets the peak, not
    the activations), stepping down past out-of-memory errors; the best measured size."""
    results = {c: measure(c) for c in candidates[:2]}
    for c in reversed([c for c in candidates[2:] if fits(c)]):
        try:
            results[c] = measure(c)
            break
        except torch.cuda.OutOfMemoryError as e:
            results[c] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        torch.cuda.empty_cache()
    ok = {k: v for k, v in results.items() if "error" not in v}
    best = max(ok, key=lambda k: ok[k]["tflops"])
    return best, results


def _realign(engine, cfg, micro_batch, device: str = "cuda") -> None:
    """After an out-of-memory error inside an optimizer step, DeepSpeed's micro-step counter is mid-step:
    run single micro-batches until the next one starts a step, so that each later step is whole."""
    from training.engine import train_step

    while engine.micro_steps % engine.gradient_accumulation_steps():
        train_step(engine, cfg, [micro_batch], device)


def _host_profile(fn, top: int = 15) -> list[str]:
    """The Python functions that took the most host time (cumulative) during fn(), as printed lines."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top:]


# Kernel families by name fragment, tested in this order (first match wins; lower case). cuBLAS on Hopper names its
# GEMMs sm90_xmma_* or nvjet_*; torch's fused AdamW and the foreach norms run multi_tensor_apply kernels.
KERNEL_KINDS = (("communication", ("nccl",)),
                ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
                ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")),
                ("compiled_fused", ("triton_", "cpp_fused")),  # (inductor's kernels are named after their ops,
                # "..._to_copy_amax..." among them: not the copies this profile looks for)
                ("optimizer_and_foreach", ("multi_tensor", "adam", "foreach")),
                ("copy", ("memcpy", "memset", "copy")),
                ("norm", ("layer_norm", "layernorm", "rms_norm", "gammabeta")),  # (torch's LayerNorm backward
                # computes its weight and bias gradients in GammaBetaBackwardCUDAKernel*, a name without "layer_norm")
                ("loss_softmax", ("softmax", "nll_loss", "cross_entropy", "logsoftmax")),
                ("reduction", ("reduce_kernel",)))  # (bias gradients; megatron's vocab-parallel loss: max, sum)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "elementwise_other")


def kernel_breakdown(kernels: list[tuple[str, float, int]], wall_s: float, top: int = 30) -> dict:
    """Where a step's device time goes, from (kernel name, seconds, launches) triples: seconds per kernel family
    and its share of the kernel time, the busiest kernels, launches, and `busy`: kernel time over wall time. A
    busy fraction well below 1 means the GPU waits for the host (launch-bound: fewer, larger kernels or CUDA
    graphs help); near 1, the kernels' own speed decides (the families say which)."""
    total = sum(seconds for _, seconds, _ in kernels)
    by_kind: dict[str, float] = {}
    for name, seconds, _ in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + seconds
    busiest = sorted(kernels, key=lambda k: -k[1])[:top]
    return {"wall_s": wall_s, "kernel_s": total, "busy": total / wall_s if wall_s else None,
            "launches": sum(count for _, _, count in kernels),
            "by_kind_s": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "by_kind_share": {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])} if total else {},
            "top_kernels": [{"name": name[:120], "s": seconds, "launches": count, "kind": kernel_kind(name)}
                            for name, seconds, count in busiest]}


def _device_profile(fn) -> dict:
    """kernel_breakdown of fn() on the GPU, from the torch profiler's kernel records (self device time: a kernel
    has no children)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    kernels = [(e.key, e.self_device_time_total / 1e6, e.count) for e in prof.key_averages() if is_kernel(e)]
    return kernel_breakdown(kernels, wall_s)


def is_kernel(event) -> bool:
    """Whether a profile event (or key_averages entry) is device work: on the CUDA timeline and not a
    gpu_user_annotation, the span kineto draws there for a record_function range around kernels (torch's optimizer
    step, "Optimizer.step#AdamW.step"; c10d's "nccl:all_reduce"), which would count those kernels' time a second
    time (torch's own table leaves them out of its device total: autograd/profiler_util.py, `not
    evt.is_user_annotation`; pytorch#130730)."""
    return event.device_type.name == "CUDA" and not getattr(event, "is_user_annotation", False)


SOURCE_MARKERS = ("model_parallel/", "training/", "megatron/", "deepspeed/", "torch/nn/functional.py",
                  "autograd::engine::evaluate_function")
"""The callers op_breakdown names: the project's layers and engine, megatron's and DeepSpeed's code, torch's
functional layer (which names the operation a module called), and, in the backward, the autograd node."""
_PYTHON_FRAME = re.compile(r"\(\d+\): ")  # (a Python function's event: "file.py(12): f"; a C one's: "<built-in ...";
# a module's: "nn.Module: Linear_0". Callers, not operations.)


def op_breakdown(events, device: str, top: int = 25) -> list[dict]:
    """Which operations, called from where, spend a step's time: from a profile's events (with_stack,
    record_shapes), the `top` (operation, inputs (describe_inputs), callers) by their own time on `device` (on a GPU the
    kernels each launched itself: an aten::copy_ under a .to() or a .contiguous(), an aten::add that is a bias, a
    residual or a gradient accumulation), with their calls and the innermost callers (SOURCE_MARKERS; a Python
    caller is named by the line where its function starts)."""
    # (An operation's own kernels, summed directly: the profiler's self_device_time_total walks the event's whole
    # subtree on every call, quadratic over a micro-batch's events.)
    own = (lambda e: sum(k.duration for k in e.kernels)) if device == "cuda" else (lambda e: e.self_cpu_time_total)
    totals: dict[tuple, list] = {}
    for e in events:
        # (a user annotation: a record_function range, not an operation)
        if (e.device_type.name != "CPU" or _PYTHON_FRAME.search(e.name)
                or e.name.startswith(("<built-in", "nn.Module:")) or getattr(e, "is_user_annotation", False)):
            continue
        seconds = own(e) / 1e6
        if seconds <= 0:
            continue
        callers, parent = [], e.cpu_parent
        while parent is not None and len(callers) < 4:
            if any(m in parent.name for m in SOURCE_MARKERS):
                callers.append(parent.name)
            parent = parent.cpu_parent
        row = totals.setdefault((e.name, describe_inputs(e)[:300], tuple(callers)), [0.0, 0])
        row[0] += seconds
        row[1] += 1
    rows = [{"op": op, "s": s, "calls": n, "shapes": shapes, "called_from": list(callers)}
            for (op, shapes, callers), (s, n) in totals.items()]
    return sorted(rows, key=lambda r: -r["s"])[:top]


def describe_inputs(event) -> str:
    """An operation's inputs as the profile recorded them: each tensor's shape, with its strides where it is not
    contiguous (a copy or a cat over permuted views runs torch's slow strided kernel, over contiguous ones its
    vectorised kernel), and a tensor list's tensors one by one (the plain input_shapes shows a list as [])."""
    shapes = getattr(event, "structured_input_shapes", None)  # (torch 2.13+; earlier: input_shapes alone)
    strides = getattr(event, "structured_input_strides", None)
    if not shapes or not strides or len(shapes) != len(strides):
        return str(event.input_shapes)

    def one(shape, stride) -> str:
        if shape and isinstance(shape[0], list):  # a tensor list
            return "[" + ", ".join(one(a, b) for a, b in zip(shape, stride)) + "]"
        contiguous = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        dense = all(n == 1 or st == c for n, st, c in zip(shape, stride, contiguous))
        return str(list(shape)) + ("" if dense or len(stride) != len(shape) else f" strides {list(stride)}")

    return "[" + ", ".join(one(list(a), list(b)) for a, b in zip(shapes, strides)) + "]"


def _op_profile(fn, device: str) -> list[dict]:
    """op_breakdown of fn() (a profile apart from _device_profile's: recording shapes and Python calls slows the
    host, which would make the GPU look idle there)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        fn()
        sync(device)
    return op_breakdown(prof.events(), device)


def _ms_per_call(step, device: str, calls: int, warm_up: int = 2) -> float:
    """Milliseconds per call of step(), after `warm_up` calls (compilation, allocator), between device
    synchronisations."""
    for _ in range(warm_up):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    return (time.perf_counter() - start) / calls * 1e3


def fusion_timing(shape: tuple, device: str, calls: int = 20) -> dict:
    """The residual branch's end (kernels.bias_dropout_add), plain against fused, forward and backward in bf16 at
    a layer's activation shape [s, b, hidden], without dropout (the MFU runs') and with a keyed mask of p=0.1:
    milliseconds per call of each and plain's time over fused's, side by side in one process."""
    from model_parallel.kernels import fused_bias_dropout_add, plain_bias_dropout_add

    g = torch.Generator(device).manual_seed(0)
    x, residual, grad = (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    for leaf in (x, residual):
        leaf.requires_grad_()
    bias = torch.randn(shape[-1], generator=g, device=device, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.rand(shape, generator=g, device=device) > 0.1
    out = {"shape": list(shape)}
    for case, mask in (("no_dropout", None), ("dropout_0.1", keep)):
        for name, fn in (("plain", plain_bias_dropout_add), ("fused", fused_bias_dropout_add())):
            step = lambda fn=fn, mask=mask: fn(x, bias, residual, mask, 0.1).backward(grad)
            out[f"{case}_{name}_ms"] = _ms_per_call(step, device, calls)
        out[f"{case}_plain_over_fused"] = out[f"{case}_plain_ms"] / out[f"{case}_fused_ms"]
    return out


def cross_entropy_timing(shape: tuple, device: str, calls: int = 10) -> dict:
    """The loss's cross-entropy (kernels.cross_entropy), megatron's plain against the fused passes, forward and
    backward of bf16 logits [s, b, V] (TP=1: megatron's group must be set up): milliseconds per call of each,
    plain's time over fused's, and the memory each call peaks at above the logits, side by side in one process."""
    from model_parallel.cross_entropy import fused_cross_entropy, plain_cross_entropy

    g = torch.Generator(device).manual_seed(0)
    logits = torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, shape[-1], shape[:2], generator=g, device=device)
    out = {"shape": list(shape)}
    for name, fn in (("plain", plain_cross_entropy), ("fused", fused_cross_entropy)):
        step = lambda fn=fn: torch.autograd.grad(fn(logits, target).mean(), logits)  # (no gradient accumulated)
        out[f"{name}_ms"] = _ms_per_call(step, device, calls)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            out[f"{name}_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    out["plain_over_fused"] = out["plain_ms"] / out["fused_ms"]
    return out


def split_heads_timing(seq: int, batch: int, heads: int, head_dim: int, device: str, calls: int = 10) -> dict:
    """Self-attention's bias add and split into heads (kernels.split_heads), plain against fused, at a decoder
    layer's shape in bf16, each with causal SDPA between it and its output projection's layout, forward and
    backward: milliseconds per call of each and plain's over fused's, side by side (the attention is the same in
    both: the difference is the split's, its gradients' join and the merge of heads); and for each, the strides of
    the q, k, v gradients SDPA's backward hands over, and whether they are contiguous once permuted back to
    [s, b, heads, d] (what decides between torch's vectorised cat and its strided one for plain's join)."""
    from model_parallel.kernels import fused_split_heads, plain_split_heads
    from model_parallel.layers import _merge_heads

    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(seq, batch, 3 * heads * head_dim, generator=g, device=device, dtype=torch.bfloat16,
                    requires_grad=True)
    bias = torch.randn(3 * heads * head_dim, generator=g, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(seq, batch, heads * head_dim, generator=g, device=device, dtype=torch.bfloat16)
    out = {"shape": [seq, batch, heads, head_dim]}
    for name, split in (("plain", plain_split_heads), ("fused", fused_split_heads)):
        def step(split=split, hook=None):
            q, k, v = split(x, bias, 3, head_dim)
            for t in (q, k, v) if hook else ():
                t.register_hook(hook)
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return torch.autograd.grad(_merge_heads(attended), (x, bias), grad)  # (no gradient accumulated)

        grads = []
        step(hook=grads.append)
        out[f"{name}_grad_strides"] = [list(t.stride()) for t in grads]
        out[f"{name}_contiguous_once_permuted_back"] = [t.permute(2, 0, 1, 3).is_contiguous() for t in grads]
        out[f"{name}_ms"] = _ms_per_call(step, device, calls)
    out["plain_over_fused"] = out["plain_ms"] / out["fused_ms"]
    return out


def _random_micro_batches(m, mbs: int, count: int, device: str) -> list:
    """`count` micro-batches of `mbs` random captions and image codes of model config `m`, on `device`, at
    distinct positions of the sample stream (what keys the dropout masks)."""
    from training.engine import MicroBatch

    g = torch.Generator().manual_seed(0)
    return [MicroBatch(torch.randint(4, m.text_vocab_size, (mbs, m.text_seq_len), generator=g).to(device),
                       torch.randint(0, m.image_vocab_size, (mbs, m.image_seq_len), generator=g).to(device),
                       torch.arange(i * mbs, (i + 1) * mbs, device=device)) for i in range(count)]


def _seconds_per_step(engine, cfg, data: list, device: str, steps: int = 3) -> float:
    """Seconds per optimizer step over the micro-batches `data`, after one warm-up step (allocator, kernels,
    compilation), timed between device synchronisations."""
    from training.engine import train_step

    return _ms_per_call(lambda: train_step(engine, cfg, data, device), device, steps, warm_up=1) / 1e3


def planner_fit(by_micro_batch: dict, flops_per_sample: float, peak_flops: float, layers: int,
                accumulation: int) -> dict | None:
    """The layout planner's two step-time constants (training/plan.Hardware) fitted to measured steps: a
    least-squares line of seconds per micro-batch over micro-batch size; its slope gives the utilisation of
    the peak (`hfu`), its intercept the fixed cost per layer and micro-batch (`overhead_ms_per_layer`; the
    optimizer step's share, 1/accumulation of it, included). None with fewer than two measured sizes, or
    steps that do not grow with the micro-batch."""
    points = [(int(b), r["step_s"] / accumulation) for b, r in by_micro_batch.items() if "step_s" in r]
    if len(points) < 2 or not peak_flops:
        return None
    mean_b = sum(b for b, _ in points) / len(points)
    mean_s = sum(s for _, s in points) / len(points)
    slope = (sum((b - mean_b) * (s - mean_s) for b, s in points) / sum((b - mean_b) ** 2 for b, _ in points))
    if slope <= 0:  # (noise over too narrow a range of sizes: no utilisation to read)
        return None
    return {"hfu": flops_per_sample / (slope * peak_flops),
            "overhead_ms_per_layer": (mean_s - slope * mean_b) * 1e3 / layers}


def _mfu(ctx: Context, preset: str, candidates: list[int], accumulation: int = 4,
         recompute_mode: str = "none") -> dict:
    """bf16 training of a preset at ZeRO-1 on one GPU (the real Trainer and engine), random data already
    on the GPU, `accumulation` micro-batches per optimizer step (as any real global batch has): seconds per
    step at several micro-batch sizes, TFLOP/s by training/flops.py's formula, MFU against the table's
    peak and against the matmul rate measured here, peak memory; then, at the best size, how much of a
    step the optimizer takes (its micro-batch timed apart), where the host and the GPU spend that step (kernel
    families and the GPU's busy fraction: kernel_breakdown) and, without
    recomputation, what full recomputation costs there; the layout planner's step times for the same runs,
    and its constants fitted to these (planner_fit)."""
    from bench.train_throughput import matmul_flops
    from model_parallel.activation_checkpointing import apply_activation_checkpointing
    from training.engine import train_step
    from training.flops import train_flops_per_sample
    from training.plan import Hardware, estimate
    from training.trainer import Trainer

    cfg = train_config([f"model.preset={preset}", "train.precision=bf16", "parallel.zero_stage=1",
                         f"parallel.activation_checkpointing={recompute_mode}", "model.caption_drop_prob=0",
                         f"train.global_batch_size={candidates[0] * accumulation}",
                         f"train.micro_batch_size={candidates[0]}", f"train.device={ctx.device}", "train.steps=1000"])
    start = time.perf_counter()
    trainer = Trainer(cfg, ctx.scratch / preset)
    build_s = ctx.record("build_s", time.perf_counter() - start)
    m, engine = cfg.model, trainer.engine
    flops = train_flops_per_sample(m)
    matmul = matmul_flops("cuda")

    def batches(mbs: int) -> list:
        return _random_micro_batches(m, mbs, accumulation, "cuda")

    def measure(mbs: int) -> dict:
        data = batches(mbs)
        torch.cuda.reset_peak_memory_stats()
        try:
            step_s = _seconds_per_step(engine, cfg, data, "cuda")
        except torch.cuda.OutOfMemoryError as e:
            failed = str(e)  # (not the exception: its traceback holds the failed step's frames and activations)
        else:
            failed = None
        if failed is not None:  # outside the except block, whose exception kept that memory alive
            del data
            gc.collect()
            torch.cuda.empty_cache()
            _realign(engine, cfg, batches(candidates[0])[0])
            raise torch.cuda.OutOfMemoryError(failed)
        tflops = flops * mbs * accumulation / step_s / 1e12
        return ctx.record(f"micro_batch_{mbs}", {
            "step_s": step_s, "tflops": tflops,
            "mfu": tflops * 1e12 / trainer.peak_flops if trainer.peak_flops else None,
            "vs_measured_matmul": tflops * 1e12 / matmul, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30})

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    hw = Hardware(peak_tflops=trainer.peak_flops / 1e12) if trainer.peak_flops else Hardware()  # (this GPU's peak)
    fits = lambda b: estimate(m, 1, 1, 1, 1, b, b * accumulation, "bf16", recompute_mode, hw).peak_gb <= 0.95 * total
    best, results = _largest_micro_batch(measure, candidates, fits)
    _realign(engine, cfg, batches(best)[0])  # (whole steps from here, whatever an out-of-memory error left)
    micro_s = []
    for micro_batch in batches(best):  # one optimizer step, each micro-batch timed apart
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(engine, cfg, [micro_batch], "cuda")
        torch.cuda.synchronize()
        micro_s.append(time.perf_counter() - t0)
    optimizer = ctx.record("optimizer_step", {"micro_batch_s": micro_s,
                                              "optimizer_s": micro_s[-1] - sum(micro_s[:-1]) / (len(micro_s) - 1)})
    profile = _host_profile(lambda: train_step(engine, cfg, batches(best), "cuda"))
    kernels = ctx.record("device_profile_one_step",
                         _device_profile(lambda: train_step(engine, cfg, batches(best), "cuda")))
    ops = _recorded(ctx, "ops_one_micro_batch",
                    lambda: _op_profile(lambda: train_step(engine, cfg, batches(best)[:1], "cuda"), "cuda"))
    _realign(engine, cfg, batches(best)[0])  # (the rest of that step: later steps whole again)
    fusion = _recorded(ctx, "bias_dropout_add", lambda: fusion_timing((m.image_seq_len, best, m.hidden_size), "cuda"))
    planner = lambda b, mode: estimate(m, 1, 1, 1, 1, int(b), int(b) * accumulation, "bf16", mode, hw).step_s
    planned = {b: planner(b, recompute_mode) for b, r in results.items() if "step_s" in r}
    step_flops = flops * best * accumulation
    compiled = _compiled_step(ctx, engine, cfg, batches(best), step_flops, trainer.peak_flops, results[best]["step_s"])
    if recompute_mode == "none":  # the planner counts full recomputation as 4/3 of the FLOPs and of the fixed cost
        apply_activation_checkpointing(engine.module, "full")  # (the layers' forward wrapped in place)
        full_s = _seconds_per_step(engine, cfg, batches(best), "cuda")
        none_s = compiled.get("step_s", results[best]["step_s"])  # (the same layers, compiled or not)
        ctx.record("full_recompute", {"micro_batch": best, "step_s": full_s, "vs_none": full_s / none_s,
                                      "layers_compiled": "step_s" in compiled,
                                      "planner_vs_none": planner(best, "full") / planner(best, "none")})
    # (Last: neither changes the targets' verdict; a time limit reached here leaves every measurement above in
    # the section's partial results.)
    loss = _recorded(ctx, "cross_entropy",
                     lambda: cross_entropy_timing((m.image_seq_len, best, m.image_vocab_size), "cuda"))
    split = _recorded(ctx, "split_heads",
                      lambda: split_heads_timing(m.image_seq_len, best, m.num_heads, m.head_dim, "cuda"))
    trainer.log.close()
    return {"preset": preset, "recompute": recompute_mode, "zero_stage": 1, "accumulation": accumulation,
            "build_s": build_s, "train_flops_per_sample": flops, "measured_matmul_tflops": matmul / 1e12,
            "best_micro_batch": best, "best_mfu": results[best]["mfu"], "best_tflops": results[best]["tflops"],
            # (the targets were set on an H200's 141 GB: a smaller GPU may stop below the micro-batches they met)
            "too_large_for_memory": [c for c in candidates[2:] if not fits(c) or "error" in results.get(c, {})],
            "by_micro_batch": results, "optimizer_step": optimizer, "host_profile_one_step": profile,
            "device_profile_one_step": kernels, "ops_one_micro_batch": ops,
            "bias_dropout_add": fusion, "cross_entropy": loss, "split_heads": split,
            "compiled": compiled,
            "planner_step_s": planned, "planner_fit": planner_fit(results, flops, trainer.peak_flops,
                                                                  m.encoder_layers + m.decoder_layers, accumulation),
            "full_recompute": ctx.partial.get("full_recompute"),
            "flops_formula": "3 x forward matmul FLOPs (training/flops.py; recomputation not counted)"}


def _recorded(ctx: Context, name: str, measure):
    """ctx.record(name, measure()), or the error it raised: a diagnostic not yet run on a GPU must not cost the
    section the measurements after it (the compiled layers, the targets)."""
    try:
        result = measure()
    except Exception as e:  # noqa: BLE001 - recorded
        result = {"error": f"{type(e).__name__}: {e}"[:1000]}  # (not the exception: its traceback holds tensors)
    return ctx.record(name, result)


def _compiled_step(ctx: Context, engine, cfg, data: list, step_flops: float, peak_flops: float | None,
                   eager_step_s: float) -> dict:
    """The same step with kernels.compile (each layer compiled in place, as training/engine.py does at
    kernels.compile=true): the first step's seconds (compilation), seconds per step, MFU, the speed-up over the
    eager layers, peak memory, where the GPU time goes. A failure (the first compilation of these layers on a GPU, or
    out of memory) is recorded and the layers made eager again: the eager results stand."""
    from model_parallel.compile import compile_layers
    from model_parallel.kernels import compile_unavailable
    from model_parallel.layers import DecoderLayer, EncoderLayer
    from training.engine import train_step

    if why := compile_unavailable():
        return ctx.record("compiled", {"skipped": why})
    device, gpu = ctx.device, ctx.device == "cuda"
    layers = [m for m in engine.module.modules() if isinstance(m, EncoderLayer | DecoderLayer)]
    forwards = [m.__dict__.get("forward") for m in layers]  # (a wrapper set on the instance, or None: the class's)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    try:
        compile_layers(engine.module)
        start = time.perf_counter()
        train_step(engine, cfg, data, device)
        sync(device)
        first_s = time.perf_counter() - start
        step_s = _seconds_per_step(engine, cfg, data, device)
        kernels = _device_profile(lambda: train_step(engine, cfg, data, device)) if gpu else None
    except Exception as e:  # recorded: the eager measurements stand  # noqa: BLE001
        failed = f"{type(e).__name__}: {e}"[:1000]  # (not the exception: its traceback holds the step's tensors)
    else:
        failed = None
    if failed is not None:
        for module, forward in zip(layers, forwards):  # each layer's forward as it was (compile_layers set its own)
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        _realign(engine, cfg, data[0], device)
        return ctx.record("compiled", {"error": failed})
    tflops = step_flops / step_s / 1e12
    return ctx.record("compiled", {"first_step_s": first_s, "step_s": step_s, "tflops": tflops,
                                   "mfu": tflops * 1e12 / peak_flops if peak_flops else None,
                                   "speedup": eager_step_s / step_s,
                                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
                                   "device_profile_one_step": kernels})


def _target(r: dict, at_least: float) -> dict:
    """The MFU target met by the eager or the compiled layers (kernels.compile: what a run after speed sets)."""
    best = max(r["best_mfu"] or 0, r["compiled"].get("mfu") or 0)
    return {**r, "best_mfu_eager_or_compiled": best, "checks": {f"mfu_at_least_{at_least:.0%}".replace("%", "pct"):
                                                                best >= at_least}}


def mfu_350m(ctx: Context) -> dict:
    return _target(_mfu(ctx, "parti-350m", [4, 8, 16, 32, 64, 96, 128]), 0.40)


def mfu_750m(ctx: Context) -> dict:
    return _mfu(ctx, "parti-750m", [4, 8, 16, 32, 48])


def mfu_3b(ctx: Context) -> dict:
    return _target(_mfu(ctx, "parti-3b", [2, 4, 8, 16, 24]), 0.50)


def compile_speedup(ctx: Context) -> dict:
    """kernels.compile against eager layers, parti-350m (parti-debug when quick) in bf16 at ZeRO-1, with the
    residual dropout on (0.1, keyed by sample) and off; the eager layers once with the dropout masks of the
    eager integer hash (kernels.dropout_mask=eager: ~12 int64 operations per element, ~230 bytes moved) and
    once with its compiled kernel (`auto` on a GPU: one byte written per element): seconds per step of each,
    the first step's time (compilation), and the first losses (compiled = eager up to bf16 rounding)."""
    from model_parallel.layers import SampleDropout
    from training.engine import train_step
    from training.flops import train_flops_per_sample
    from training.trainer import Trainer

    preset, mbs, accumulation = ("parti-debug", 2, 2) if ctx.quick else ("parti-350m", 32, 2)
    out = {"preset": preset, "micro_batch": mbs, "accumulation": accumulation}
    variants = {"eager_mask": ["kernels.compile=false", "kernels.dropout_mask=eager"],
                "eager": ["kernels.compile=false", "kernels.dropout_mask=auto"], "compiled": ["kernels.compile=true"]}
    for name, kernels in variants.items():
        compiled = name == "compiled"
        cfg = train_config([f"model.preset={preset}", "train.precision=bf16", "parallel.zero_stage=1",
                             "model.dropout=0.1", "model.caption_drop_prob=0", *kernels,
                             f"train.global_batch_size={mbs * accumulation}", f"train.micro_batch_size={mbs}",
                             f"train.device={ctx.device}", "train.steps=1000", "train.lr=1e-5",
                             "train.min_lr=1e-6"])
        trainer = Trainer(cfg, ctx.scratch / f"compile_{name}")
        m, engine = cfg.model, trainer.engine
        data = _random_micro_batches(m, mbs, accumulation, ctx.device)
        from torch._dynamo.utils import counters

        counters.clear()  # (process-wide: the eager variants compiled megatron's bias-GeLU and the masks before)
        start = time.perf_counter()
        first = train_step(engine, cfg, data, ctx.device)[0]
        sync(ctx.device)
        run = {"first_step_s": time.perf_counter() - start, "first_loss": first}
        ctx.record(f"{name}_first_step", run)  # (kept if the section runs out of time later)
        for dropout in (0.1, 0.0):
            for module in engine.module.modules():  # the residual sites; a compiled graph recompiles once
                if isinstance(module, SampleDropout):
                    module.p = dropout
            step_s = _seconds_per_step(engine, cfg, data, ctx.device)  # (its warm-up step recompiles)
            run[f"dropout_{dropout}"] = {"step_s": step_s,
                                         "tflops": train_flops_per_sample(m) * mbs * accumulation / step_s / 1e12}
        if compiled:  # what this torch version's compiler made of a layer: graphs, breaks and why
            run["unique_graphs"] = counters["stats"]["unique_graphs"]
            run["graph_breaks"] = dict(counters["graph_break"])
        out[name] = ctx.record(name, run)
        trainer.close()  # (the run-directory lock, the data workers, DeepSpeed's process groups)
        del trainer, engine
    e, c = out["eager"], out["compiled"]
    out["speedup"] = {f"dropout_{d}": e[f"dropout_{d}"]["step_s"] / c[f"dropout_{d}"]["step_s"] for d in (0.1, 0.0)}
    out["compiled_mask_speedup"] = out["eager_mask"]["dropout_0.1"]["step_s"] / e["dropout_0.1"]["step_s"]
    out["dropout_cost"] = {k: out[k]["dropout_0.1"]["step_s"] / out[k]["dropout_0.0"]["step_s"] - 1 for k in variants}
    eager_mask_loss = out["eager_mask"]["first_loss"]
    out["checks"] = {"compiled_first_loss_equals_eager": abs(c["first_loss"] - e["first_loss"]) <= 2e-2,
                     "compiled_mask_first_loss_equals_eager_mask": abs(e["first_loss"] - eager_mask_loss) <= 1e-3}
    return out


# ---------------------------------------------------------------------------------------------
# sampling
