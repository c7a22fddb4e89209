"""The sections of bench/gpu_check.py: each checks or measures one part of the CUDA path.

Every section is a function `section(ctx) -> dict` run in a process of its own by bench/gpu_check.py
(a crash, hang or out-of-memory in one leaves the others standing). `ctx` says the device ('cuda' or
'cpu'), whether the run is `quick` (tiny sizes, for CPU and for the test that keeps this script from
rotting) and a scratch folder. A section returns its measurements and a `checks` dict of named
booleans; a failed check makes the section 'fail'. `SECTIONS` lists them in the order they run,
with what each needs (a GPU, several GPUs) so that the runner can skip them with the reason.
Each section imports the project's modules it needs inside itself, on purpose: an import that fails on
the GPU machine (a library built differently there) fails that section alone, not the whole check.
The speed sections (MFU, compile) live in bench/gpu_mfu.py, what sections share in bench/gpu_common.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from pathlib import Path

import torch

from bench.gpu_common import Context, max_diff, sync, tiny_run_sets, train_config, train_run
from bench.gpu_mfu import compile_speedup, mfu_3b, mfu_350m, mfu_750m

# ---------------------------------------------------------------------------------------------
# environment


def environment(ctx: Context) -> dict:
    """Versions, the GPU and its driver, NCCL, the kernels auto picks, the CPU compatibility layer (must
    be off on a GPU), the MFU peak, and this machine's measured bf16 matmul rate and copy bandwidth."""
    from importlib.metadata import version

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from bench.sample import copy_bandwidth
    from bench.train_throughput import matmul_flops
    from model_parallel.cpu_compat import is_applied
    from model_parallel.kernels import availability, select_kernels
    from model_parallel.state import driver_version, init_parallel, use_device
    from training.flops import peak_flops

    device = use_device(ctx.device)
    init_parallel(1, 1)
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
           "megatron_core": version("megatron-core"), "deepspeed_accelerator": get_accelerator().device_name(),
           "kernels": select_kernels().summary(), "unavailable": {op: {k: v for k, v in opts.items() if v}
                                                                  for op, opts in availability().items()},
           "cpu_compat_applied": is_applied(), "driver": driver_version()}
    peak, source = peak_flops("bf16")
    out["peak"] = source
    checks = {"cpu_compat_off_on_gpu": device == "cpu" or not is_applied(),
              "deepspeed_accelerator_matches": out["deepspeed_accelerator"] == device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(), gpus_visible=torch.cuda.device_count(),
                   capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
        checks["peak_known"] = peak is not None
    out["measured_matmul_tflops"] = matmul_flops(device) / 1e12
    if device == "cuda":
        out["measured_copy_gbs"] = copy_bandwidth(torch.device("cuda")) / 1e9
        if peak:
            out["matmul_vs_peak"] = out["measured_matmul_tflops"] * 1e12 / peak
    out["checks"] = checks
    return out


# ---------------------------------------------------------------------------------------------
# flash attention


def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    from bench.gpu_mfu import is_kernel

    return sorted({e.key for e in prof.key_averages() if is_kernel(e)})


def _attention_kind(names: list[str]) -> str:
    lowered = " ".join(names).lower()
    # (a name at a time: another cuDNN kernel beside the memory-efficient fmha one is no cuDNN attention)
    if any("cudnn" in n and any(s in n for s in ("sdpa", "fmha", "attn")) for n in map(str.lower, names)):
        return "cudnn flash" if "flash" in lowered else "cudnn"
    if "flash" in lowered:
        return "flash"
    if "fmha" in lowered or "efficient_attention" in lowered or "mem_eff" in lowered:
        return "memory-efficient"
    return "math (no fused attention kernel)"


def flash_attention(ctx: Context) -> dict:
    """Which SDPA kernel the decoder's self-attention (causal, no mask), cross-attention (text padding
    mask) and one-token KV-cache decoding run in bf16, by the kernel names the torch profiler records."""
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel, seed_everything

    init_parallel(1, 1)
    seed_everything(0)
    cfg = train_config(["model.preset=parti-350m", "model.encoder_layers=1", "model.decoder_layers=1",
                         "model.dropout=0", "model.attention_dropout=0"]).model
    model = PartiModel(cfg).cuda().to(torch.bfloat16)
    layer = model.decoder[0]
    x = torch.randn(cfg.image_seq_len, 4, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    memory = torch.randn(cfg.text_seq_len, 4, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(4, 1, 1, cfg.text_seq_len, dtype=torch.bool, device="cuda")
    mask[:, :, :, 100:] = False

    def self_attention():
        layer.self_attn(x, causal=True).sum().backward()

    def cross_attention():
        layer.cross_attn(x, memory=memory, mask=mask).sum().backward()

    text = torch.randint(4, cfg.text_vocab_size, (4, cfg.text_seq_len), device="cuda")
    model.eval()
    from evaluation.sampling import decoding_attention_kernels

    with torch.no_grad(), decoding_attention_kernels(torch.device("cuda")):  # as sample() decodes
        caches, mem, mmask = model.start_decoding(text)
        bos = torch.full((4, 1), model.bos_id, device="cuda")
        for _ in range(8):
            model.decode_step(bos, caches, mem, mmask)

        def decode_one():
            model.decode_step(bos, caches, mem, mmask)

        decode_names = _kernel_names(decode_one)
    model.train()
    names = {"self_attention_train": _kernel_names(self_attention),
             "cross_attention_train": _kernel_names(cross_attention), "decode_one_token": decode_names}
    kinds = {k: _attention_kind(v) for k, v in names.items()}
    attention_kernels = {k: [n for n in v
                             if any(s in n.lower() for s in ("flash", "fmha", "attn", "attention", "sdpa"))]
                         for k, v in names.items()}
    return {"kinds": kinds, "attention_kernels": attention_kernels,
            "checks": {"self_attention_uses_flash": kinds["self_attention_train"] in ("flash", "cudnn flash"),
                       "decoding_uses_a_fused_kernel": kinds["decode_one_token"] != "math (no fused attention kernel)"}}


# ---------------------------------------------------------------------------------------------
# training: ZeRO stages, save and resume; activation recomputation


def train_resume(ctx: Context) -> dict:
    """parti-tiny in bf16 with dropout at ZeRO 0, 1 and 3: 6 steps uninterrupted against 3 steps, save,
    a new engine resumed from the checkpoint and 3 more steps (at ZeRO-1 the first part saves asynchronously:
    train.async_save, copied off the GPU, then written by a background process). Also each stage's peak memory.
    Then the same at ZeRO-1 for the decoder-only dalle-debug under DALL-E's sparse masks (SDPA's masked
    kernels, forward and backward, in bf16). Every run measures its held-out loss at steps 3 and 6 (eval mode) and
    keeps a moving average of the weights (train.ema_decay, on the GPU beside Adam's moments), which the resumed
    run's last checkpoint must hold as the uninterrupted run's does."""
    out, checks = {}, {}
    held_out = lambda lines: [m["valid_loss"] for m in lines if "valid_loss" in m]

    def resumed_equals_uninterrupted(name: str, sets: list[str], first_sets: list[str]) -> None:
        full, lines = train_run(ctx.scratch / f"{name}_full", sets, 6)
        first, _ = train_run(ctx.scratch / f"{name}_resumed", sets + first_sets, 3)
        second, resumed_lines = train_run(ctx.scratch / f"{name}_resumed", sets, 6)
        # (a resumed run of other steps than 4-6, one that restarted from step 1 when no checkpoint was there, or
        # held-out losses at other steps: a failed check, not max_diff's error over lists of different lengths)
        diff = max_diff(full, first + second) if len(first) == len(second) == 3 and len(full) == 6 else float("inf")
        held, held_resumed = held_out(lines), held_out(resumed_lines)
        ema_diff = max_weight_diff(*(averaged_weights(ctx.scratch / f"{name}_{kind}") for kind in ("full", "resumed")))
        out[name] = ctx.record(name, {
            "uninterrupted": full, "resumed": first + second, "max_abs_diff": diff,
            "held_out": held, "held_out_resumed": held_resumed, "ema_max_abs_diff": ema_diff,
            "mem_gb": lines[-1].get("mem_gb"), "mem_reserved_gb": lines[-1].get("mem_reserved_gb")})
        checks[f"{name}_resume_equals_uninterrupted"] = diff <= 2e-3
        checks[f"{name}_ema_resumed_equals_uninterrupted"] = ema_diff <= 1e-4
        checks[f"{name}_held_out_resumed_equals_uninterrupted"] = (
            len(held) == len(held_resumed) == 2 and max_diff(held, held_resumed) <= 2e-3)
        checks[f"{name}_learns"] = full[-1] < full[0]

    ema = ["train.ema_decay=0.9"]
    for zero in (0, 1, 3):
        resumed_equals_uninterrupted(f"zero{zero}", tiny_run_sets(ctx) + [f"parallel.zero_stage={zero}"] + ema,
                                     [f"train.async_save={zero == 1}"])
    resumed_equals_uninterrupted("decoder_only_sparse", tiny_run_sets(ctx) + [  # (the later preset wins)
        "model.preset=dalle-debug", "parallel.zero_stage=1"] + ema, [])
    # The stages against each other: the same bf16 model, so nearly the same losses.
    out["zero3_vs_zero0_max_abs_diff"] = max_diff(out["zero0"]["uninterrupted"], out["zero3"]["uninterrupted"])
    checks["zero_stages_agree"] = out["zero3_vs_zero0_max_abs_diff"] <= 2e-2
    out["note"] = ("one process: DP=1, so ZeRO partitions nothing here and the stages' memory is alike; "
                   "ZeRO-3 <= 1/N of ZeRO-0's model states needs N >= 2 GPUs (multi_gpu)")
    out["checks"] = checks
    return out


def averaged_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The moving average of the weights (train.ema_decay) that run_dir's latest checkpoint holds, whole, on the CPU
    (training.export's reader: {} when the run saved none)."""
    from training.checkpoint import resume_tag
    from training.export import open_checkpoint, read_weights

    tag = resume_tag(run_dir)[0]
    return read_weights(open_checkpoint(run_dir, tag), weights="ema") if tag else {}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two sets of weights of the same names (inf when they differ in
    names or there are none)."""
    if not a or a.keys() != b.keys():
        return float("inf")
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def recompute(ctx: Context) -> dict:
    """Activation recomputation none / selective / full with dropout on: the same losses and gradient
    norms (megatron's RNG tracker restored for the recomputation; wrong dropout masks show up at once)."""
    runs = {}
    for mode in ("none", "selective", "full"):
        losses, lines = train_run(ctx.scratch / f"recompute_{mode}", tiny_run_sets(ctx) + [
            f"parallel.activation_checkpointing={mode}", "train.save_interval=0"], 3)
        runs[mode] = ctx.record(mode, {"losses": losses, "grad_norms": [m["grad_norm"] for m in lines]})
    checks = {}
    for mode in ("selective", "full"):
        dl = max_diff(runs[mode]["losses"], runs["none"]["losses"])
        dg = max_diff(runs[mode]["grad_norms"], runs["none"]["grad_norms"])
        runs[mode].update(max_abs_loss_diff=dl, max_abs_grad_norm_diff=dg)
        checks[f"{mode}_equals_none"] = dl <= 2e-3 and dg <= 1e-2 * max(runs["none"]["grad_norms"])
    return {**runs, "checks": checks}


def greedy_gap(model, text: torch.Tensor, codes: torch.Tensor) -> float:
    """How far `codes` are from greedy decoding under full recomputation: the largest amount, over the image's
    positions, by which the best logit of one teacher-forced pass over the whole image (BOS + codes, the
    decoder without a cache) exceeds the logit of the code chosen there. 0 when each code is that pass's argmax;
    ~1e-6 where fp32 rounding of other kernels (another cache length, a padded static cache) tipped a near-tie,
    after which exact sequences part for good; a cache that computes something else is far above that."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        memory, mask = model.encode(text)
        tokens = torch.cat([torch.full_like(codes[:, :1], model.bos_id), codes[:, :-1]], dim=1)
        logits = gather_from_tensor_model_parallel_region(model.decode(tokens, memory, mask)).float()  # [n, b, V]
    chosen = logits.gather(-1, codes.t().unsqueeze(-1)).squeeze(-1)
    return float((logits.max(-1).values - chosen).max())


GREEDY_TOLERANCE = 1e-3
"""greedy_gap's bound for "the same greedy decoding" in fp32 (logits here are O(1); a wrong cache gives O(0.1+))."""


def sampling(ctx: Context) -> dict:
    """Greedy decoding with the KV cache (and, on a GPU, the CUDA-graph decode step, also restarted from an
    earlier batch's graphs) is greedy decoding under full recomputation in fp32 (greedy_gap; whether the codes
    are also exactly equal is recorded), for the encoder-decoder and the decoder-only model (dalle-debug: under
    DALL-E's sparse masks); then
    bench/sample.py's measurement of parti-350m in bf16 (batch 16 with classifier-free guidance, 32 rows):
    image tokens/s of full recomputation, KV cache and CUDA graph against the memory-bandwidth bound
    measured on this machine; on a GPU also the CUDA graphs at evaluation.generate's largest default batch
    (GPU_MAX_BATCH images) and the batch it would choose here (auto_batch_size)."""
    from bench.sample import MODES, measure_decoding, relate_rates
    from evaluation.sampling import GPU_MAX_BATCH, SamplingConfig, StaticSteps, auto_batch_size, sample
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel, seed_everything

    init_parallel(1, 1)
    seed_everything(0)
    device = ctx.device
    greedy, equal, gap = SamplingConfig(temperature=0.0), {}, {}
    # Both architectures: the decoder-only one prefills its caption into the cache (and the CUDA graphs).
    for arch, name in (("", "parti-debug" if ctx.quick else "parti-tiny"), ("decoder_only_", "dalle-debug")):
        small = train_config([f"model.preset={name}"]).model
        model = PartiModel(small).to(device).eval()
        text = torch.randint(4, small.text_vocab_size, (2, small.text_seq_len), device=device)
        full = sample(model, text, greedy, use_cache=False)
        for mode in ("kv_cache", "cuda_graph", "cuda_graph_restarted") if device == "cuda" else ("kv_cache",):
            steps = StaticSteps() if mode == "cuda_graph_restarted" else None
            if steps is not None:  # graphs captured for other captions, restarted for these (evaluation.generate's)
                sample(model, text.roll(1, dims=0), greedy, cuda_graph=True, steps=steps)
            codes = sample(model, text, greedy, cuda_graph=mode != "kv_cache", steps=steps)
            equal[arch + mode], gap[arch + mode] = bool(torch.equal(codes, full)), greedy_gap(model, text, codes)
    out = {"greedy_equal_fp32": ctx.record("greedy_equal_fp32", equal),
           "greedy_gap_fp32": ctx.record("greedy_gap_fp32", gap)}
    checks = {f"greedy_{k}_is_greedy_under_recomputation": v <= GREEDY_TOLERANCE for k, v in gap.items()}

    preset = "parti-debug" if ctx.quick else "parti-350m"
    cfg = train_config([f"model.preset={preset}"]).model
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = PartiModel(cfg).to(device=device, dtype=dtype).eval()
    modes = ("full_recomputation", "kv_cache", "cuda_graph", "bound") if device == "cuda" else \
        ("full_recomputation", "kv_cache")
    measured = {}
    # Full recomputation over the first half of the image (its steps grow with the prefix: over the first 128
    # tokens, where the GPU idles, both modes are bound by the host and their ratio says nothing); the caches over
    # the whole image, so "faster" holds a fortiori.
    for mode in modes:  # one at a time, each kept as it finishes
        result = measure_decoding(model, 4 if ctx.quick else 16, cfg.image_seq_len, (mode,),
                                  reference_tokens=min(128, cfg.image_seq_len) if ctx.quick else cfg.image_seq_len // 2,
                                  guidance_scale=1.2)
        measured.update({k: v for k, v in result.items() if k not in MODES}, **{mode: result[mode]})
        ctx.record(mode, result[mode])
    relate_rates(measured)
    if device == "cuda":  # evaluation.generate's default batch on a GPU (at most GPU_MAX_BATCH), beside batch 16;
        # its draws from one generator and from one per image (generate's: a few kernels per image and step)
        for per_image, name in ((False, f"cuda_graph_batch_{GPU_MAX_BATCH}"),
                                (True, f"cuda_graph_batch_{GPU_MAX_BATCH}_per_image_generators")):
            wide = measure_decoding(model, GPU_MAX_BATCH, cfg.image_seq_len, ("cuda_graph", "bound"),
                                    guidance_scale=1.2, per_image_generators=per_image)
            measured[name] = ctx.record(name, {**wide["cuda_graph"], "batch": wide["batch"],
                                               "bound_image_tokens_per_s": wide["bound"]["image_tokens_per_s"]})
        out["auto_batch_size"] = auto_batch_size(model, guided=True)
    out.update(preset=preset, measured=measured)
    for mode in ("kv_cache", "cuda_graph"):
        if mode in modes:
            checks[f"{mode}_ran"] = "image_tokens_per_s" in measured[mode]
    if device == "cuda":  # a speed check; on CPU (the test suite's --quick run) the ratio is reported, not judged
        checks["kv_cache_faster_than_recomputation"] = measured["kv_cache"].get("vs_full_recomputation", 0) > 1.0
    out["checks"] = checks
    return out


def decode_compiled(ctx: Context) -> dict:
    """The decode step through inductor (sample(..., compiled="inductor"): model_parallel.compile.
    compile_decode_step; not yet evaluation.generate's default): greedy decoding with it is greedy under full
    recomputation in fp32 (parti-tiny; parti-debug through the eager static cache on CPU), with the CUDA graphs
    on a GPU; then bench/sample.py's parti-350m measurement (bf16, batch 16 with guidance) of the CUDA graphs
    with the compiled step beside the eager step's, side by side, and each one's first call (the capture, and
    for the compiled step the compilations: one per attended prefix length)."""
    from bench.sample import measure_decoding, relate_rates
    from evaluation.sampling import SamplingConfig, sample
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel, seed_everything

    init_parallel(1, 1)
    seed_everything(0)
    device, gpu = ctx.device, ctx.device == "cuda"
    small = train_config([f"model.preset={'parti-debug' if ctx.quick else 'parti-tiny'}"]).model
    model = PartiModel(small).to(device).eval()
    text = torch.randint(4, small.text_vocab_size, (2, small.text_seq_len), device=device)
    start = time.perf_counter()
    codes = sample(model, text, SamplingConfig(temperature=0.0), cuda_graph=gpu, static_cache=not gpu,
                   compiled="inductor")
    out = {"greedy": ctx.record("greedy", {"preset": small.preset, "first_call_s": time.perf_counter() - start,
                                           "gap_fp32": greedy_gap(model, text, codes)})}
    checks = {"greedy_is_greedy_under_recomputation": out["greedy"]["gap_fp32"] <= GREEDY_TOLERANCE}
    if gpu:
        cfg = train_config(["model.preset=parti-350m"]).model
        model = PartiModel(cfg).to(device=device, dtype=torch.bfloat16).eval()
        measured = {}
        for mode in ("cuda_graph", "cuda_graph_compiled", "bound"):  # one at a time, each kept as it finishes
            result = measure_decoding(model, 16, cfg.image_seq_len, (mode,), guidance_scale=1.2)
            measured[mode] = ctx.record(mode, result[mode])
        relate_rates(measured)
        out["measured"] = measured
        compiled, eager = (measured[m].get("image_tokens_per_s") for m in ("cuda_graph_compiled", "cuda_graph"))
        checks["compiled_ran"] = compiled is not None
        if compiled and eager:
            out["compiled_over_eager"] = compiled / eager
    out["checks"] = checks
    return out


# ---------------------------------------------------------------------------------------------
# the image tokenizer: train, save, resume; pre-tokenization


def vq(ctx: Context) -> dict:
    """ViT-VQGAN trained in bf16 autocast for 4 steps against 2 steps + save + resume + 2 steps (the
    resume restores CPU and CUDA RNG states); the training-time code search (under autocast) against the
    fp32 search of pre-tokenization; pre-tokenization images/s against encoding alone."""
    from common.config import load_typed
    from demo import shapes
    from vq.config import VQConfig
    from vq.train import VQTrainer

    size = 32 if ctx.quick else 64
    data = ctx.scratch / "shapes"
    paths = shapes.write_shapes_shards(data, 256, size=size, per_shard=128)
    pattern = str(data / f"{{00000..{len(paths) - 1:05d}}}.tar")
    sets = ["model.layers=2", "model.width=128", f"model.image_size={size}", "model.patch=8", "model.code_dim=16",
            "model.codebook_size=256", "loss.perceptual=0", "loss.adversarial=0", "loss.logit_laplace=0",
            "train.batch_size=16", "train.lr=1e-3", "train.precision=bf16", "train.log_interval=1",
            "train.eval_interval=1000", "train.warmup_steps=1", "train.lr_decay=cosine", "train.min_lr=1e-4",
            "train.weight_decay=0.01", "train.ema_decay=0.9"]  # (the schedule, AdamW's groups, the average)

    def run(folder: str, steps: int, workers: int = 0) -> list[float]:
        cfg = load_typed(VQConfig, None, sets + [f"train.steps={steps}", "train.save_interval=2",
                                                 f"train.data_workers={workers}"])
        trainer = VQTrainer(cfg, pattern, ctx.scratch / folder)
        trainer.resume()
        return [h["loss"] for h in trainer.run()]

    full = run("vq_full", 4)
    # The interrupted run decodes in 2 DataLoader workers, forked after CUDA is up: the same images.
    resumed = run("vq_resumed", 2, workers=2) + run("vq_resumed", 4, workers=2)
    out = ctx.record("resume", {"uninterrupted": full, "resumed": resumed, "max_abs_diff": max_diff(full, resumed)})
    checks = {"vq_resume_equals_uninterrupted": out["max_abs_diff"] <= 1e-3}

    from vq.tokenizer import load_image_tokenizer

    tok = load_image_tokenizer(ctx.scratch / "vq_full" / "export.pt").to(ctx.device)
    images = torch.rand(64, 3, size, size, device=ctx.device) * 2 - 1
    with torch.no_grad():  # the same latents (as training makes them, under autocast), searched two ways:
        with torch.autocast(ctx.device, dtype=torch.bfloat16):  # as training searches them
            z = tok.latents(images)
            autocast_codes = tok.codes_of(z)
        codebook = torch.nn.functional.normalize(tok.codebook.weight.float(), dim=-1)
        fp32 = (z.float() @ codebook.t()).argmax(-1)  # written out here, in fp32 outside autocast
        encoded = tok.encode(images).flatten(1)  # pre-tokenization: the encoder in fp32 too
    out["autocast_code_agreement"] = float((autocast_codes == fp32).float().mean())
    checks["autocast_code_search_is_fp32"] = out["autocast_code_agreement"] == 1.0
    # (not a check: how many codes a bf16 encoder moves across near-ties, against the fp32 encoder)
    out["bf16_encoder_code_agreement"] = float((autocast_codes == encoded).float().mean())
    out.update(_pretokenize_rates(ctx, tok, pattern, size))
    out["checks"] = checks
    return out


def async_save(ctx: Context) -> dict:
    """Issue #15's async-save target on this device: the step time while a train.async_save writer runs, against
    a run of the same steps that saves only at its end (parti-350m's width, 4 + 4 layers, bf16, ZeRO-1;
    parti-debug when quick). A checkpoint every 5 steps; the two steps after each save call overlap its
    background writer (the steps after those may too: the run without saves is the reference). On CPU the
    writer (a fork of the trainer) copies every page the CPU step writes, so only a GPU run can meet the target.
    Beside them, a run that forks an idle child where the other saves (megatron-core's writer is such a fork):
    its steps against the reference weigh the fork alone (copy-on-write faults in the trainer), apart from the
    writer's work (its copies to disk). Each run's step times and the trainer's page faults, context switches
    and system time are recorded."""
    preset = ["model.preset=parti-debug"] if ctx.quick else ["model.preset=parti-350m", "model.encoder_layers=4",
                                                              "model.decoder_layers=4"]
    sets = preset + ["train.precision=bf16", "parallel.zero_stage=1", "train.global_batch_size=8",
                     "train.micro_batch_size=8", "train.async_save=true", "train.keep_checkpoints=2",
                     f"train.device={ctx.device}"]
    median = lambda xs: sorted(xs)[len(xs) // 2]
    usage = {}  # the trainer's minor page faults (a forked writer makes each page the trainer then writes, Python
    # objects' reference counts included, a copy-on-write fault), context switches and system time, per run

    def step_seconds(folder: str, save_interval: int, steps: int = 20) -> tuple[dict, float]:
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        _, lines = train_run(ctx.scratch / folder, sets + [f"train.save_interval={save_interval}"], steps)
        after = resource.getrusage(resource.RUSAGE_SELF)
        usage[folder] = {k: getattr(after, k) - getattr(before, k)
                         for k in ("ru_minflt", "ru_nvcsw", "ru_nivcsw", "ru_stime", "ru_utime")}
        return {m["step"]: 8 / m["samples_per_s"] for m in lines}, time.perf_counter() - start

    step_seconds("warm_up", 0, 2)  # (the process's first run: imports, first kernels; its faults not compared)
    without, without_wall = step_seconds("no_saves", 0)
    seconds, wall = step_seconds("async_save", 5)
    with forking_idly_every(5):
        beside_fork, _ = step_seconds("idle_fork", 0)
    after_save = lambda times: [times[s] for s in times if s % 5 in (1, 2) and s > 5]  # the steps after a save call
    reference = [without[s] for s in without if s > 5]
    ratio = median(after_save(seconds)) / median(reference)
    steps = ctx.record("steps", {"step_s_during_save": median(after_save(seconds)), "step_s_without": median(reference),
                                 "ratio": ratio, "run_s_saving_every_5": wall, "run_s_saving_at_the_end": without_wall,
                                 "latest": (ctx.scratch / "async_save" / "checkpoints" / "latest").read_text().strip(),
                                 "step_s_beside_an_idle_fork": median(after_save(beside_fork)),
                                 "idle_fork_ratio": median(after_save(beside_fork)) / median(reference),
                                 "step_s_by_step": {"saving_every_5": seconds, "saving_at_the_end": without,
                                                    "idle_fork_every_5": beside_fork},
                                 "usage": {"saving_every_5": usage["async_save"],
                                           "saving_at_the_end": usage["no_saves"],
                                           "idle_fork_every_5": usage["idle_fork"]}})
    return {"steps": steps, "checks": {"async_step_within_10pct": ratio <= 1.10, "last_save_completed":
                                       steps["latest"] == "step_00000020"} if ctx.device == "cuda" else {}}


@contextlib.contextmanager
def forking_idly_every(interval: int):
    """While inside: every `interval` steps, where the trainer would start a save, a forked child that sleeps
    (the previous one killed first), as megatron-core's writer is forked (multiprocessing's fork context) but
    with nothing to write. Patches Trainer.complete_saves, which the loop calls once a step outside its timing."""
    import multiprocessing

    from training.trainer import Trainer

    plain, children = Trainer.complete_saves, []

    def complete_saves(trainer, wait: bool = False) -> None:
        plain(trainer, wait)
        if trainer.step % interval == 0:
            kill_all(children)
            children.append(multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,), daemon=True))
            children[-1].start()

    Trainer.complete_saves = complete_saves
    try:
        yield
    finally:
        Trainer.complete_saves = plain
        kill_all(children)


def kill_all(children: list) -> None:
    """Kill and reap the processes in `children` (emptied); one that takes over 5 s to go is left to the exit."""
    for child in children:
        child.kill()
        child.join(5)
    children.clear()


def parti_stages(ctx: Context) -> dict:
    """Parti's later stages on this device, bf16 autocast on a GPU: a detokenizer fine-tuned for 2 steps on a
    2-step tokenizer's frozen codes (the codes and content hash must stay the source's), and a tiny WDSR x2
    upsampler trained for 4 steps, stopped (the STOP file), resumed for 2 more and exported (resume equals
    uninterrupted; the export upsamples to twice the size); the text encoder's masked-token pre-training for 4
    steps."""
    from common.config import load_typed
    from common.preemption import Preempted
    from demo import shapes
    from sr.config import SRConfig
    from sr.model import load_upsampler, upsample
    from sr.train import SRTrainer
    from vq.config import VQConfig
    from vq.finetune_decoder import DecoderFinetuner
    from vq.tokenizer import load_image_tokenizer
    from vq.train import VQTrainer

    size = 32
    data = ctx.scratch / "stage_shapes"
    paths = shapes.write_shapes_shards(data, 64, size=2 * size, per_shard=64)
    pattern = str(data / f"{{00000..{len(paths) - 1:05d}}}.tar")
    vq_sets = ["model.layers=1", "model.width=64", f"model.image_size={size}", "model.code_dim=8",
               "model.codebook_size=64", "loss.perceptual=0", "loss.adversarial=0", "train.batch_size=8",
               "train.precision=bf16", "train.steps=2", "train.save_interval=2", f"train.resize={2 * size}"]
    VQTrainer(load_typed(VQConfig, None, vq_sets), pattern, ctx.scratch / "stage_vq").run()
    tuner = DecoderFinetuner(load_typed(VQConfig, None, vq_sets + ["model.layers=2", "model.width=96"]),
                             ctx.scratch / "stage_vq" / "export.pt", pattern, ctx.scratch / "stage_detok")
    tuner.run()
    source, tuned = (load_image_tokenizer(ctx.scratch / f / "export.pt", ctx.device)
                     for f in ("stage_vq", "stage_detok"))
    images = torch.rand(16, 3, size, size, device=ctx.device) * 2 - 1
    checks = {"detokenizer_keeps_codes": bool(torch.equal(source.encode(images), tuned.encode(images))),
              "detokenizer_keeps_content_hash": source.content_hash == tuned.content_hash}

    sr_sets = ["model.preset=tiny", f"train.crop={2 * size}", "train.batch_size=8", "train.precision=bf16",
               "train.save_interval=4", "train.log_interval=1"]

    def run_sr(folder: str, stop_at: int | None = None) -> list[float]:
        """The losses of a 6-step run's steps from its checkpoint on; `stop_at`: stopped after that step as by
        SLURM's signal (the STOP file: save, then Preempted)."""
        run_dir = ctx.scratch / folder
        trainer = SRTrainer(load_typed(SRConfig, None, sr_sets + ["train.steps=6"]), pattern, run_dir)
        trainer.resume()
        losses, step = [], trainer.train_step

        def recorded_step(lr, hr):
            if trainer.step + 1 == stop_at:
                (run_dir / "STOP").touch()  # (read after this step)
            logs = step(lr, hr)
            losses.append(logs["loss"])
            return logs

        trainer.train_step = recorded_step
        try:
            trainer.run()
        except Preempted:
            pass
        return losses

    full = run_sr("stage_sr_full")
    resumed = run_sr("stage_sr_resumed", 4) + run_sr("stage_sr_resumed")
    out = ctx.record("upsampler_resume", {"uninterrupted": full, "resumed": resumed,
                                          "max_abs_diff": max_diff(full, resumed)})
    checks["upsampler_resume_equals_uninterrupted"] = out["max_abs_diff"] <= 1e-3
    upsampler = load_upsampler(ctx.scratch / "stage_sr_full" / "export.pt", ctx.device)
    checks["upsampler_doubles_the_size"] = tuple(upsample(upsampler, images).shape) == (16, 3, 2 * size, 2 * size)

    from training.config import load_config
    from training.text_encoder import OUTPUT, pretrain

    losses = pretrain(load_config("configs/train/debug.yaml",
                                  ["train.steps=4", "train.global_batch_size=16", "train.micro_batch_size=8",
                                   f"train.device={ctx.device}"]),
                      ctx.scratch / "stage_textenc")
    out["text_encoder_losses"] = ctx.record("text_encoder_losses", losses)
    checks["text_encoder_pretrains"] = (len(losses) == 4 and all(map(math.isfinite, losses))
                                        and (ctx.scratch / "stage_textenc" / OUTPUT / "config.json").is_file())
    out["checks"] = checks
    return out


def _pretokenize_rates(ctx: Context, tok, pattern: str, size: int) -> dict:
    from collections import Counter

    from data_pipeline.images import FilterConfig
    from data_pipeline.laion import expand_shards
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from data_pipeline.train_text_tokenizer import shard_captions

    spm = train_sentencepiece(shard_captions(pattern, Counter()), 40, ctx.scratch / "spm" / "spm.model")
    start = time.perf_counter()
    manifest = pretokenize(expand_shards(pattern), ctx.scratch / "codes", tok.cpu(), TextTokenizer(spm, 16),
                           FilterConfig(image_size=size, min_size=size), workers=0 if ctx.quick else 4)
    elapsed = time.perf_counter() - start
    records = manifest["records"]
    ctx.record("pretokenize", {"images_per_s": records / elapsed, "records": records})
    tok = tok.to(ctx.device)
    images = torch.rand(64, 3, size, size, device=ctx.device) * 2 - 1
    with torch.no_grad():
        tok.encode(images)
        sync(ctx.device)
        start = time.perf_counter()
        for _ in range(5):
            tok.encode(images)
        sync(ctx.device)
    return {"pretokenize_images_per_s": records / elapsed, "pretokenize_records": records,
            "encode_only_images_per_s": 5 * 64 / (time.perf_counter() - start), "image_size": size}


# ---------------------------------------------------------------------------------------------
# several GPUs: TP=2 and PP=2 over NCCL


def multi_gpu(ctx: Context) -> dict:
    """TP=2 and PP=2 (torchrun, 2 processes, NCCL) against TP=1 on parti-tiny in fp32 without dropout:
    the same losses."""
    import subprocess
    import sys

    from model_parallel.state import child_environment, free_port

    base = ["model.preset=parti-tiny", "model.dropout=0", "model.attention_dropout=0", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.steps=4", "train.device=cuda"]
    losses = {}
    for name, nproc, extra in (("tp1", 1, []), ("tp2", 2, ["parallel.tp=2"]), ("pp2", 2, ["parallel.pp=2"])):
        run_dir = ctx.scratch / f"multi_{name}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "training.train", "--run-dir", str(run_dir),
               "--set", *base, *extra]
        subprocess.run(cmd, check=True, env=child_environment(), cwd=Path(__file__).resolve().parent.parent)
        losses[name] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checks = {f"{k}_equals_tp1": max_diff(losses[k], losses["tp1"]) <= 1e-3 for k in ("tp2", "pp2")}
    return {"losses": losses, "checks": checks}


# (name, function, GPUs needed: 0 runs on CPU too, 1 needs a GPU, 2 needs two). In the order they run, so that a run
# cut short by --budget-s (gpu_check.py; a lent machine's 540 s) checks what matters most: first whether the code
# changed since the last GPU run (bench/results/gpu_nvidia-h200_2026-12-04*) still trains right there (train_resume:
# the fused bias-dropout-add, split heads and cross-entropy in bf16, resumed = uninterrupted), then the targets that
# run missed (MFU, each with its compiled layers; the asynchronous save's step), the CUDA-graph decoding that
# evaluation.generate now takes (sampling), the VQ section whose process never exited there, what no GPU run has
# measured yet (decode_compiled, mfu_750m: with the H200's times, a 540 s run reaches them only if the MFU sections
# are quick: else `--only` them in a second run), the checks that passed there, compile_speedup (the longest, which
# only measures; the MFU sections time the compiled layers too), and multi_gpu (one GPU: skipped at once).
SECTIONS = [
    ("environment", environment, 0),
    ("train_resume", train_resume, 0),
    ("mfu_350m", mfu_350m, 1),
    ("mfu_3b", mfu_3b, 1),
    ("async_save", async_save, 0),
    ("sampling", sampling, 0),
    ("vq", vq, 0),
    ("decode_compiled", decode_compiled, 0),
    ("mfu_750m", mfu_750m, 1),
    ("recompute", recompute, 0),
    ("flash_attention", flash_attention, 1),
    ("parti_stages", parti_stages, 0),
    ("compile_speedup", compile_speedup, 1),
    ("multi_gpu", multi_gpu, 2),
]
