"""Pre-tokenization speed: images/s with 0 and W decode workers, and the VQ-encode-only rate, in one run.

    python bench/pretokenize.py [--workers 2] [--image-size 256] [--copies 6] [--repeats 2]

Input: the shipped COCO photos (../shared/data/coco_mini, real 640x480 JPEGs) repeated `--copies` times
(re-encoded with the copy's number in a JPEG comment, so that no two have the bytes that pretokenize drops as
duplicates) in two LAION-style tars; a ConvVQ of the given image size. The ratio end-to-end / encode-only shows
how much decoding and resizing cost. After a warm-up encode, the three are timed in turns `--repeats` times;
medians (each ratio: the median of the turns').
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.cli import description, require_at_least  # noqa: E402
from data_pipeline.images import FilterConfig, prepare_sample  # noqa: E402
from data_pipeline.laion import expand_shards  # noqa: E402
from data_pipeline.pretokenize import encode_images, pretokenize  # noqa: E402
from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece  # noqa: E402
from tests import laion_fixtures as lf  # noqa: E402
from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer  # noqa: E402


def make_inputs(folder: Path, copies: int) -> list[tuple[str, dict]]:
    samples = []
    for c in range(copies):
        for key, jpg, caption in lf.coco_mini():
            img = Image.open(io.BytesIO(jpg)).convert("RGB")
            buf = io.BytesIO()
            # A comment, not a changed pixel: JPEG's quantisation often lost that (16 of 102 repeated bytes).
            img.save(buf, "JPEG", quality=90, comment=f"copy {c}")
            samples.append((f"{key}_{c}", {"jpg": buf.getvalue(), "txt": caption.encode()}))
    half = len(samples) // 2
    lf.write_tar(folder / "00000.tar", samples[:half])
    lf.write_tar(folder / "00001.tar", samples[half:])
    return samples


def report(turns: dict[str, list[float]]) -> str:
    """A line per side ({name: [images/s of each turn]}, "VQ encode only" among them): its median images/s and
    the median over the turns of its rate / the turn's encode-only rate."""
    lines = []
    for name, rates in turns.items():
        of = [r / e for r, e in zip(rates, turns["VQ encode only"], strict=True)]
        lines.append(f"{name:>32}: {statistics.median(rates):8.1f} images/s   ({statistics.median(of):.2f} of "
                     "encode-only)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="turns (each times all three once)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("workers", "image_size", "copies", "batch_size", "repeats"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        samples = make_inputs(tmp / "laion", args.copies)
        save_image_tokenizer(ConvVQ(image_size=args.image_size, downsample=3), tmp / "vq.pt")
        vq = load_image_tokenizer(tmp / "vq.pt")
        tok = TextTokenizer(train_sentencepiece([c for _, s in samples for c in [s["txt"].decode()]] * 5, 200,
                                                tmp / "spm.model"), 128)
        cfg = FilterConfig(image_size=args.image_size)
        inputs = expand_shards(str(tmp / "laion" / "{00000..00001}.tar"))
        images = [prepare_sample({"__key__": k, **s}, cfg).image for k, s in samples]
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def encode_only() -> float:
            start = time.perf_counter()
            for i in range(0, len(images), args.batch_size):
                encode_images(vq, images[i:i + args.batch_size], device)
            return len(images) / (time.perf_counter() - start)

        encode_only()  # warm-up (the first encode's lazy initialisation would otherwise land on the first side)
        turns: dict[str, list[float]] = {**{f"end-to-end, {w} decode workers": [] for w in (0, args.workers)},
                                         "VQ encode only": []}
        for turn in range(args.repeats):
            for workers in (0, args.workers):
                start = time.perf_counter()
                manifest = pretokenize(inputs, tmp / f"codes{workers}_{turn}", vq, tok, cfg, workers=workers,
                                       batch_size=args.batch_size)
                turns[f"end-to-end, {workers} decode workers"].append(
                    manifest["records"] / (time.perf_counter() - start))
            turns["VQ encode only"].append(encode_only())
    print(f"\n{len(samples)} images of ~640x480 -> {args.image_size}px, grid {vq.grid}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} turns (medians)")
    print(report(turns))


if __name__ == "__main__":
    main()
