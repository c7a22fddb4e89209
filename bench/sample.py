"""Image tokens/s of decoding: full recomputation, KV cache, KV cache + CUDA graph, against the memory bound.

    python bench/sample.py                                   # parti-350m, 1024-token image; bf16 on a GPU
    python bench/sample.py --max-tokens 32 --threads 1       # on CPU: the first 32 tokens (fp32)
    python bench/sample.py --preset parti-tiny --max-tokens 0 --reference-tokens 256   # the old default

    from bench.sample import measure_decoding                # from another script (bench/gpu_sections.py)
    result = measure_decoding(model, batch=16, tokens=1024, modes=("kv_cache", "cuda_graph", "bound"))

Modes: `full_recomputation` (the decoder over the whole prefix at every step; quadratic, so timed over
the first `reference_tokens` only, its cheapest part: its ratio flatters it), `kv_cache` (one token per
step through a growing cache), `cuda_graph` (one token per step through a static cache, the step replayed
from a CUDA graph; GPU only, skipped with the reason elsewhere), `cuda_graph_compiled` (the same with the step
through inductor first: model_parallel.compile.compile_decode_step; its first call compiles) and `bound`: what
memory bandwidth allows, image tokens/s = batch / (bytes read per decode step / bandwidth), with the bytes of the
decoder weights a step reads (every decoder layer and the output head; not the encoder, nor the cross-attention K/V
projections, whose outputs are cached), the self-attention K/V cache over the positions written so far
(averaged over the image) and the cached cross-attention K/V, and the bandwidth of a large device copy
measured in the same run (bytes read + written per second). Rates are image tokens/s of the token loop
(sample()'s `decode_s`; the encoder, cache allocation and graph capture are `setup_s`), the modes timed in turns
(`--repeats`, each mode once a turn): a rate is its median turn's, a ratio the median of the turns' ratios.
Sampling draws from a generator on the model's device (temperature 1, no filtering, no guidance unless asked), or
with `--per-image-generators` from one per image, as evaluation.generate does. The CUDA-graph mode is timed as
evaluation.generate samples its later batches: through a step kept from an earlier call of the same shape
(`setup_s` restarts it; `capture_setup_s` is that first call's capture).

On a shared CPU, time with `--threads 1`: a decode step is ~100 small ops, and with more OpenMP threads
than idle cores each op waits for descheduled threads (parti-tiny: 2.1 ms/step with 1 thread, 44 ms/step
with 2 threads at load 16 on 2 cores); the report prints the threads and the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.cli import description, require_at_least  # noqa: E402
from evaluation.sampling import SamplingConfig, StaticSteps, sample  # noqa: E402
from model_parallel.model import PartiModel
from model_parallel.state import init_parallel, seed_everything
from training.config import load_config

MODES = ("full_recomputation", "kv_cache", "cuda_graph", "cuda_graph_compiled", "bound")
GRAPH_MODES = ("cuda_graph", "cuda_graph_compiled")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s of a large device-to-device copy (read + written), the ceiling a decode step can reach."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (page faults, clocks)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def decode_step_bytes(model, rows: int, tokens: int) -> dict:
    """Bytes one decode step reads, averaged over the first `tokens` positions, for `rows` sequences."""
    cfg = model.cfg
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if (n.startswith("decoder.") and ".cross_attn.fn.kv." not in n) or n.startswith("head."))
    size = next(model.parameters()).element_size()
    layers, d = cfg.decoder_layers, cfg.hidden_size
    per_position = 2 * layers * rows * d * size  # K and V of every decoder layer
    kv_cache = per_position * (tokens + 1) / 2  # a step at position i reads i + 1 positions
    cross = per_position * cfg.text_seq_len
    return {"weights": weights, "kv_cache_mean": kv_cache, "kv_cache_static": per_position * cfg.image_seq_len,
            "cross_kv": cross, "total": weights + kv_cache + cross}


def _timed_sample(model, text, cfg: SamplingConfig, tokens: int, seed: int, per_image: bool, **mode) -> dict:
    device = text.device
    timings: dict = {}
    generator = ([torch.Generator(device).manual_seed(seed + r) for r in range(len(text))] if per_image
                 else torch.Generator(device).manual_seed(seed))
    sample(model, text, cfg, generator, max_tokens=tokens, timings=timings, **mode)
    return timings


def measure_decoding(model, batch: int, tokens: int, modes=MODES, reference_tokens: int | None = None,
                     guidance_scale: float | None = None, seed: int = 0, warmup_tokens: int = 4,
                     per_image_generators: bool = False, repeats: int = 1) -> dict:
    """Image tokens/s of each decoding mode for `batch` random captions and the first `tokens` image
    tokens, on the model's device in its dtype (model: PartiModel in eval mode, TP=1); the draws from one
    generator for the batch, or with `per_image_generators` from one per image, as evaluation.generate draws
    (each row's draw is then a few kernels of its own). `repeats`: the modes are timed in that many turns (each
    mode once per turn, after one warm-up each: noise hits the modes of a turn alike); a mode's rate is its median
    turn's, and `vs_full_recomputation` the median of the turns' ratios (`vs_full_recomputation_turns`: each).
    Returns a JSON-ready dict: one entry per mode ({"skipped": reason} where it cannot run, {"error": ...} where it
    failed) with `image_tokens_per_s`, `of_bound` (the fraction of the memory-bandwidth bound) and
    `vs_full_recomputation` where measured."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if repeats < 1:
        raise ValueError(f"repeats {repeats}: at least 1")
    device, cfg = next(model.parameters()).device, model.cfg
    tokens = min(tokens or cfg.image_seq_len, cfg.image_seq_len)
    reference_tokens = min(reference_tokens or tokens, tokens)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.text_vocab_size, (batch, cfg.text_seq_len), generator=g).to(device)
    sampling = SamplingConfig(guidance_scale=guidance_scale)
    out = _run_description(model, batch, tokens, sampling, guidance_scale, per_image_generators, repeats)
    if "bound" in modes:
        out["bound"] = memory_bound(model, batch, out["rows"], tokens)
    plans, skipped = _decoding_plans(modes, device, tokens, reference_tokens)
    out.update(skipped)
    turns, failed = _time_in_turns(model, text, sampling, plans, repeats, warmup_tokens, seed, per_image_generators)
    out.update(failed)
    for mode, runs_of_mode in turns.items():
        if mode not in out:
            n, kwargs = plans[mode]
            out[mode] = _mode_result(runs_of_mode, batch, n, "steps" in kwargs)
    for mode, ratios in _ratios_to_full_recomputation(turns, plans, failed).items():
        out[mode].update(vs_full_recomputation=statistics.median(ratios), vs_full_recomputation_turns=ratios)
    relate_rates(out)
    return out


def _run_description(model, batch: int, tokens: int, sampling: SamplingConfig, guidance_scale: float | None,
                     per_image_generators: bool, repeats: int) -> dict:
    """What measure_decoding measured on: the model, the batch (`rows`: doubled under guidance), the tokens, the
    generators and the turns, and on CPU the threads and the load average."""
    weight, cfg = next(model.parameters()), model.cfg
    out: dict = {"device": str(weight.device), "dtype": str(weight.dtype).replace("torch.", ""), "batch": batch,
                 "rows": batch * (2 if sampling.guided else 1), "tokens": tokens, "guidance_scale": guidance_scale,
                 "generators": "per_image" if per_image_generators else "one", "turns": repeats,
                 "hidden": cfg.hidden_size, "layers": f"{cfg.encoder_layers}+{cfg.decoder_layers}"}
    if weight.device.type == "cpu":
        out.update(threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
    return out


def memory_bound(model, batch: int, rows: int, tokens: int) -> dict:
    """Mode `bound`: image tokens/s if a decode step took only the time to read its bytes (decode_step_bytes) at
    the bandwidth of a device copy measured now."""
    step = decode_step_bytes(model, rows, tokens)
    bandwidth = copy_bandwidth(next(model.parameters()).device)
    return {"image_tokens_per_s": batch * bandwidth / step["total"], "bandwidth_GBps": bandwidth / 1e9,
            "bytes_per_step": step}


def _decoding_plans(modes, device: torch.device, tokens: int, reference_tokens: int) -> tuple[dict, dict]:
    """({mode: (image tokens it is timed over, its sample() keywords)} for the modes to time,
    {mode: {"skipped": reason}} for those that cannot run on `device`)."""
    keywords = {"full_recomputation": {"use_cache": False}, "kv_cache": {}, "cuda_graph": {"cuda_graph": True},
                "cuda_graph_compiled": {"cuda_graph": True, "compiled": "inductor"}}
    plans, skipped = {}, {}
    for mode in (m for m in modes if m != "bound"):
        if mode in GRAPH_MODES and device.type != "cuda":
            skipped[mode] = {"skipped": f"CUDA graphs need a CUDA device; the model is on {device}"}
            continue
        kwargs = keywords[mode]
        if mode in GRAPH_MODES:  # (as evaluation.generate samples: the graphs kept for the next batch)
            kwargs = {**kwargs, "steps": StaticSteps()}
        plans[mode] = (reference_tokens if mode == "full_recomputation" else tokens, kwargs)
    return plans, skipped


def _time_in_turns(model, text, sampling: SamplingConfig, plans: dict, repeats: int, warmup_tokens: int, seed: int,
                   per_image_generators: bool) -> tuple[dict, dict]:
    """({mode: its sample() timings, the warm-up's then each turn's}, {mode: {"error": ...}} for those that failed).
    Turn 0 warms each mode up over its first `warmup_tokens` tokens (lazy initialisation, the first kernels), then
    each of `repeats` turns times every mode once; a mode that failed is out of the later turns."""
    turns: dict[str, list[dict]] = {mode: [] for mode in plans}
    failed: dict[str, dict] = {}
    for turn in range(1 + repeats):
        for mode in [m for m in plans if m not in failed]:
            n, kwargs = plans[mode]
            try:
                t = _timed_sample(model, text, sampling, n if turn else min(warmup_tokens, n), seed,
                                  per_image_generators, **kwargs)
            except Exception as e:  # noqa: BLE001 - recorded: the other modes' numbers still come back
                failed[mode] = {"error": f"{type(e).__name__}: {e}"}
                continue
            turns[mode].append(t)  # (the warm-up's setup_s: a graph mode's first call, its capture)
    return turns, failed


def _ratios_to_full_recomputation(turns: dict, plans: dict, failed: dict) -> dict[str, list[float]]:
    """{mode: each turn's rate of that mode / full recomputation's in the same turn} for the modes timed beside
    full recomputation (none if it was not timed, or failed)."""
    if "full_recomputation" not in turns or "full_recomputation" in failed:
        return {}
    full_n, full = plans["full_recomputation"][0], turns["full_recomputation"][1:]
    return {mode: [plans[mode][0] * f["decode_s"] / (full_n * t["decode_s"])
                   for t, f in zip(turns[mode][1:], full, strict=True)]
            for mode in turns if mode != "full_recomputation" and mode not in failed}


def _mode_result(runs_of_mode: list[dict], batch: int, n: int, kept_step: bool) -> dict:
    """One mode's entry from its warm-up and timed runs: the median turn's (by decode time) rate and times."""
    timed = runs_of_mode[1:]
    t = sorted(timed, key=lambda r: r["decode_s"])[(len(timed) - 1) // 2]
    result = {"tokens": n, "image_tokens_per_s": batch * n / t["decode_s"], "ms_per_step": 1e3 * t["decode_s"] / n,
              "setup_s": t["setup_s"], "decode_s": t["decode_s"]}
    if kept_step:  # the first call's setup captured the graphs; the timed ones restarted them
        result["capture_setup_s"] = runs_of_mode[0]["setup_s"]
    return result


def relate_rates(out: dict) -> None:
    """Add to each measured mode its rate as a fraction of the bound and against full recomputation (unless
    measure_decoding took that from its turns)."""
    bound = out.get("bound", {}).get("image_tokens_per_s")
    full = out.get("full_recomputation", {}).get("image_tokens_per_s")
    for mode in ("full_recomputation", "kv_cache", *GRAPH_MODES):
        rate = out.get(mode, {}).get("image_tokens_per_s")
        if rate and bound:
            out[mode]["of_bound"] = rate / bound
        if rate and full:
            out[mode].setdefault("vs_full_recomputation", rate / full)


def build_model(preset: str, grid: int, device: torch.device, dtype: torch.dtype):
    """A randomly initialised PartiModel (TP=1, eval mode) of a preset on `device` in `dtype`."""
    init_parallel(1, 1)
    seed_everything(0)
    cfg = load_config(None, [f"model.preset={preset}", f"model.image_grid={grid}"]).model
    return PartiModel(cfg).to(device=device, dtype=dtype).eval()


def report(preset: str, result: dict) -> str:
    lines = [f"{preset} d={result['hidden']} layers={result['layers']}, {result['tokens']} image tokens timed, "
             f"batch {result['batch']} ({result['rows']} rows), {result['device']} {result['dtype']}"
             + (f", threads {result['threads']}, load {result['load_average']:.1f}" if "threads" in result else "")]
    for mode in MODES:
        r = result.get(mode)
        if r is None:
            continue
        if "skipped" in r or "error" in r:
            lines.append(f"{mode:>20}: " + (f"skipped ({r['skipped']})" if "skipped" in r else f"FAILED {r['error']}"))
            continue
        extra = [f"{r['ms_per_step']:.2f} ms/step over {r['tokens']} tokens"] if "ms_per_step" in r else []
        if mode == "bound":
            b = r["bytes_per_step"]
            extra.append(f"{b['total'] / 2**20:.1f} MiB/step (weights {b['weights'] / 2**20:.1f}, KV "
                         f"{b['kv_cache_mean'] / 2**20:.1f}, cross K/V {b['cross_kv'] / 2**20:.1f}) at "
                         f"{r['bandwidth_GBps']:.1f} GB/s measured")
        ratios = [f"{r[k]:.2f}x {name}" for k, name in (("vs_full_recomputation", "full recomputation"),
                                                        ("of_bound", "of the bound")) if k in r]
        if len(r.get("vs_full_recomputation_turns", ())) > 1:
            each = r["vs_full_recomputation_turns"]
            ratios[0] += f" ({min(each):.2f}-{max(each):.2f} over {len(each)} turns)"
        lines.append(f"{mode:>20}: {r['image_tokens_per_s']:10.1f} image tokens/s  " + "; ".join(extra + ratios))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--preset", default="parti-350m")
    parser.add_argument("--grid", type=int, default=32, help="image grid (32: Parti's 1024 tokens)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="time the first N tokens (default: the whole image on a GPU, 32 on CPU; 0: all)")
    parser.add_argument("--reference-tokens", type=int, default=None,
                        help="full recomputation over the first N tokens (default: 256 on a GPU, 16 on CPU)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--per-image-generators", action="store_true", help="draw from a generator per image, as "
                        "evaluation.generate does (default: one for the batch)")
    parser.add_argument("--repeats", type=int, default=3, help="turns: each mode timed once per turn")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("repeats",))
    modes = tuple(args.modes.split(","))
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"--modes {args.modes}: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if gpu else "fp32")]
    start = time.perf_counter()
    model = build_model(args.preset, args.grid, device, dtype)
    built = time.perf_counter() - start
    tokens = args.max_tokens if args.max_tokens is not None else (0 if gpu else 32)
    reference = args.reference_tokens or (256 if gpu else 16)
    result = measure_decoding(model, args.batch, tokens, modes, reference, args.guidance_scale,
                              per_image_generators=args.per_image_generators, repeats=args.repeats)
    print(report(args.preset, result))
    print(f"(model built in {built:.1f} s)")


if __name__ == "__main__":
    main()
