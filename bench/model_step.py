"""Forward+backward time of PartiModel (megatron-core layers, TP=1) next to a plain-PyTorch reference.

    python bench/model_step.py [--preset parti-tiny] [--batch 8] [--repeats 7] [--set model.hidden_size=256 ...]

Both models have the same shapes and weights; the reference (tests/reference_model.py, kind "sdpa")
uses nn.Linear, nn.LayerNorm and torch SDPA. Timings alternate between the two in one run, so machine
noise hits both alike; the printed ratio is the median of the turns' model / reference (target: at most 1.15),
with their range; the verdict says whether every turn met it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.turns import ratio_over_turns  # noqa: E402
from common.cli import description, require_at_least  # noqa: E402
from model_parallel.kernels import select_kernels  # noqa: E402
from model_parallel.model import PartiModel  # noqa: E402
from model_parallel.state import init_parallel, seed_everything  # noqa: E402
from tests.reference_model import ReferenceParti, load_from_parti  # noqa: E402
from training.config import load_config  # noqa: E402

TARGET = 1.15  # model / reference: megatron-core's layers at most 15% slower than plain PyTorch's


def step_time(model, text, codes) -> float:
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.loss(text, codes).backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--preset", default="parti-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--set", nargs="*", default=[], help="extra model.* overrides")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("batch", "repeats"))

    cfg = load_config(None, [f"model.preset={args.preset}", "model.dropout=0.0",
                             "model.attention_dropout=0.0", *args.set]).validate()
    init_parallel(tp=1, pp=1)
    seed_everything(0)
    kernels = select_kernels(cfg.kernels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PartiModel(cfg.model, kernels).to(device)
    ref = load_from_parti(ReferenceParti(cfg.model, kind="sdpa"), model.state_dict()).to(device)
    m = cfg.model
    text = torch.randint(4, m.text_vocab_size, (args.batch, m.text_seq_len), device=device)
    codes = torch.randint(0, m.image_vocab_size, (args.batch, m.image_seq_len), device=device)

    for net in (model, ref):  # warm-up
        step_time(net, text, codes)
    times = {"model": [], "reference": []}
    for _ in range(args.repeats):
        times["model"].append(step_time(model, text, codes))
        times["reference"].append(step_time(ref, text, codes))
    print(kernels.summary())
    print(f"preset={args.preset} d={m.hidden_size} layers={m.encoder_layers}+{m.decoder_layers} "
          f"text={m.text_seq_len} image={m.image_seq_len} batch={args.batch} device={device} "
          f"threads={torch.get_num_threads()}")
    print(report(times))


def report(times: dict[str, list[float]]) -> str:
    """Each side's step times (seconds, one a turn) in ms, and their ratio model / reference against TARGET."""
    lines = [f"{k:>10}: median {statistics.median(v) * 1e3:8.1f} ms  (min {min(v) * 1e3:.1f}, max {max(v) * 1e3:.1f})"
             for k, v in times.items()]
    ratios = [a / b for a, b in zip(times["model"], times["reference"], strict=True)]
    # (3 digits: a ratio of 1.154 printed as 1.15 beside "target <= 1.15: NOT met" would read as a contradiction)
    lines.append(f"ratio model/reference: {ratio_over_turns(times['model'], times['reference'], digits=3)}  "
                 f"(target <= {TARGET}: {verdict(ratios)})")
    return "\n".join(lines)


def verdict(ratios: list[float]) -> str:
    """Whether the turns' ratios meet TARGET: in every turn, in none, or only at their median (noise)."""
    if max(ratios) <= TARGET:
        return "met in every turn"
    if min(ratios) > TARGET:
        return "NOT met in any turn"
    median_met = statistics.median(ratios) <= TARGET
    return f"{'met' if median_met else 'NOT met'} at the median, not in every turn: rerun with more --repeats"


if __name__ == "__main__":
    main()
