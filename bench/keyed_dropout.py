"""The keyed dropout's mask, eager against compiled (`kernels.dropout_mask`), at one site and in a training step.

    python bench/keyed_dropout.py    # a parti-350m site; the step: parti-tiny at batch 8 (CPU) / parti-350m at 16 (GPU)
    python bench/keyed_dropout.py --step-preset parti-350m --step-batch 1 --repeats 3    # on CPU: ~20 s a step

1. One decoder residual site of `--preset` (batch 2 on CPU, 16 on a GPU), [image tokens, batch, hidden]: milliseconds
   for the mask by the eager integer hash, by its compiled kernel, and for applying a mask (what dropout costs at best),
   with the ratios eager/compiled and mask/apply; and the bytes each moves per element, counted from the eager
   operations' inputs and outputs (the compiled kernel writes one byte): elementwise work is bound by memory
   bandwidth on a GPU, so there its time follows the bytes; a CPU's matmuls are slow enough to hide them.
2. Forward + backward of PartiModel (`--step-preset`; TP=1; bf16 on a GPU, fp32 on CPU) with dropout 0.1 and the masks
   of each kind, and with no dropout: each step's cost over the dropout-free step.
Timings alternate between the variants in one run (these machines are noisy); medians are printed. The
compiled variants are warmed up first, so compilation is not timed (printed apart).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.cli import description, require_at_least
from model_parallel.kernels import select_kernels
from model_parallel.keyed_dropout import compiled_keep_mask, keyed_dropout, keyed_keep_mask
from model_parallel.model import PartiModel
from model_parallel.state import init_parallel, seed_everything
from training.config import KernelConfig, load_config


def timed(fn, device: str) -> float:
    """Seconds of one call of fn, between device synchronisations."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(variants: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each variant, timed in turn `repeats` times after one warm-up call each."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


class BytesMoved(TorchDispatchMode):
    """Counts the bytes of the tensors (more than one element) each operation reads and writes."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor) and t.numel() > 1]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def bytes_per_element(fn, elements: int) -> float:
    with BytesMoved() as counter:
        fn()
    return counter.bytes / elements


def site(cfg, batch: int, device: str, dtype, repeats: int) -> dict[str, float]:
    shape = torch.Size((cfg.image_seq_len, batch, cfg.hidden_size))
    x = torch.randn(shape, device=device, dtype=dtype)
    samples = torch.arange(1000, 1000 + batch, device=device)
    key = torch.tensor(0x1234ABCD)
    mask = keyed_keep_mask(samples, key, 0.1, shape, 1)
    compile_s = timed(lambda: compiled_keep_mask()(samples, key, 0.1, shape, 1), device)
    moved = {"bytes_mask_eager": bytes_per_element(lambda: keyed_keep_mask(samples, key, 0.1, shape, 1), x.numel()),
             "bytes_apply": bytes_per_element(lambda: keyed_dropout(x, mask, 0.1), x.numel())}
    return {"compile_s": compile_s, **moved, **alternate({
        "mask_eager": lambda: keyed_keep_mask(samples, key, 0.1, shape, 1),
        "mask_compiled": lambda: compiled_keep_mask()(samples, key, 0.1, shape, 1),
        "apply": lambda: keyed_dropout(x, mask, 0.1)}, repeats, device)}


def training_step(preset: str, batch: int, device: str, dtype, repeats: int) -> dict[str, float]:
    cfg = load_config(None, [f"model.preset={preset}"]).model
    text = torch.randint(4, cfg.text_vocab_size, (batch, cfg.text_seq_len), device=device)
    codes = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_seq_len), device=device)
    samples = torch.arange(batch, device=device)
    models = {}
    for name, mask in (("eager_mask", "eager"), ("compiled_mask", "compiled"), ("no_dropout", "eager")):
        seed_everything(0)
        dropout = 0.0 if name == "no_dropout" else 0.1
        model_cfg = load_config(None, [f"model.preset={preset}", f"model.dropout={dropout}"]).model
        models[name] = PartiModel(model_cfg, select_kernels(KernelConfig(dropout_mask=mask))).to(device, dtype).train()

    def step(model):
        model.zero_grad(set_to_none=True)
        model.loss(text, codes, sample_index=samples).backward()

    return alternate({name: (lambda m=model: step(m)) for name, model in models.items()}, repeats, device)


def site_report(s: dict[str, float], shape: str) -> str:
    """site()'s medians (seconds) and bytes per element, with each ratio its label names."""
    return (f"one site {shape}: mask eager {s['mask_eager'] * 1e3:.2f} ms, compiled {s['mask_compiled'] * 1e3:.2f} "
            f"ms (first call with compilation {s['compile_s']:.1f} s), applying a mask {s['apply'] * 1e3:.2f} ms\n"
            f"  eager/compiled {s['mask_eager'] / s['mask_compiled']:.3g}x; mask/apply: eager "
            f"{s['mask_eager'] / s['apply']:.3g}, compiled {s['mask_compiled'] / s['apply']:.3g}\n"
            f"  bytes moved per element: mask eager {s['bytes_mask_eager']:.0f}, compiled 1, applying "
            f"{s['bytes_apply']:.0f} (eager/compiled {s['bytes_mask_eager']:.0f}x, eager mask/apply "
            f"{s['bytes_mask_eager'] / s['bytes_apply']:.0f}x)")


def step_report(t: dict[str, float], preset: str, batch: int) -> str:
    """training_step()'s medians (seconds): each dropout step's cost over the dropout-free one, eager over compiled."""
    base = t["no_dropout"]
    return (f"forward+backward of {preset} at batch {batch}: no dropout {base * 1e3:.1f} ms; "
            f"dropout 0.1 with eager masks {t['eager_mask'] * 1e3:.1f} ms ({t['eager_mask'] / base - 1:+.0%}), "
            f"with compiled masks {t['compiled_mask'] * 1e3:.1f} ms ({t['compiled_mask'] / base - 1:+.0%})\n"
            f"  step eager/compiled masks: {t['eager_mask'] / t['compiled_mask']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    gpu = torch.cuda.is_available()
    parser.add_argument("--preset", default="parti-350m", help="the site's shape")
    parser.add_argument("--batch", type=int, default=16 if gpu else 2)
    parser.add_argument("--step-preset",
                        help="the training step's model (default: --preset on a GPU, parti-tiny on CPU)")
    parser.add_argument("--step-batch", type=int, help="default: --batch on a GPU, 8 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("batch", "repeats"))
    if args.step_batch is not None:
        require_at_least(parser, args, ("step_batch",))
    step_preset = args.step_preset or (args.preset if gpu else "parti-tiny")
    step_batch = args.step_batch or (args.batch if gpu else 8)
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    init_parallel(1, 1)
    cfg = load_config(None, [f"model.preset={args.preset}"]).model
    print(f"{args.preset} d={cfg.hidden_size} image tokens={cfg.image_seq_len} batch={args.batch} device={device} "
          f"{dtype} threads={torch.get_num_threads()}")

    shape = f"{cfg.image_seq_len}x{args.batch}x{cfg.hidden_size}"
    print(site_report(site(cfg, args.batch, device, dtype, args.repeats), shape))
    print(step_report(training_step(step_preset, step_batch, device, dtype, args.repeats), step_preset, step_batch))


if __name__ == "__main__":
    main()
