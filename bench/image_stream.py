"""The image models' crop stream (data_pipeline/image_stream.py), side by side in one run: images/s with
decoding in the training process against W DataLoader workers, a rank of 4 against a single process (each
rank decodes only its quarter of the samples: the same images/s), and the cost of a resume from the saved
stream state against replaying the stream to the same position.

    python bench/image_stream.py [--workers 2] [--images 600] [--size 256] [--repeats 3]

The measurements are taken in turns, `--repeats` times (each turn: in process, W workers, rank of 4, replay,
saved state), so machine noise hits them alike; medians are printed, and each ratio is the median of the
turns' ratios (measured one after the other instead, a rank of 4 read 0.21x a single process on a loaded
machine, 0.71-0.84x in turns).

Data: the shipped COCO photos (../shared/data/coco_mini, read in place; ~640x480 JPEGs, as LAION's), repeated
into 2 shards (LAION's hold ~10,000 samples) under a temporary folder.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.turns import ratio_over_turns
from common.cli import description, require_at_least
from data_pipeline.image_stream import CropStream, restore_stream
from data_pipeline.laion import write_tar
from data_pipeline.shared_data import shared_path


def crop_stream(pattern: str, size: int, workers: int = 0, world: int = 1) -> CropStream:
    return CropStream(pattern, crop=size, resize=size + size // 8, rank=0, world=world, seed=0, workers=workers)


def images_per_s(pattern: str, size: int, workers: int, count: int, world: int = 1) -> float:
    """Steady-state images/s over `count` images, timed from the first one on: the stream hands out nothing until
    its 256-image shuffle buffer is full (and its workers have started), a fixed cost that timed in made both
    sides slow and a shorter run slower still."""
    stream = crop_stream(pattern, size, workers, world)
    next(stream)
    start = time.perf_counter()
    for _ in itertools.islice(stream, count):
        pass
    seconds = time.perf_counter() - start
    stream.close()
    return count / seconds


def resume_seconds(pattern: str, size: int, consumed: int, saved: bool) -> float:
    first = crop_stream(pattern, size)
    for _ in itertools.islice(first, consumed):
        pass
    state = [first.state_dict()] if saved else None
    resumed = crop_stream(pattern, size)
    start = time.perf_counter()
    restore_stream(resumed, state, consumed, Path("bench"))
    return time.perf_counter() - start


def report(turns: dict[str, list[float]], size: int, workers: int, images: int) -> str:
    """The three comparisons from each variant's turns (images/s of inline, ahead and rank; seconds of replay
    and state): W workers and a rank of 4 over in-process decoding, a replay's seconds over the saved state's."""
    med = {k: statistics.median(v) for k, v in turns.items()}
    ratio = {k: ratio_over_turns(turns[k], turns[of]) for k, of in (("ahead", "inline"), ("rank", "inline"),
                                                                     ("replay", "state"))}
    return (f"crop stream, {size} px: {med['inline']:.0f} images/s decoded in the training process, "
            f"{med['ahead']:.0f} with {workers} workers: {ratio['ahead']}\n"
            f"rank 0 of 4 (in the training process): {med['rank']:.0f} images/s, {ratio['rank']} a single "
            "process's (it reads all samples but decodes a quarter)\n"
            f"resume after {images} images: replay {med['replay']:.2f} s, saved state {med['state']:.2f} s: "
            f"{ratio['replay']} faster (replay grows with the images seen, the state's cost does not)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=600, help="images drawn per measurement (the buffer holds 256)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="turns (each measures every variant once)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("images", "size", "repeats"))
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1 (0 is the in-process side it is compared with)")
    with tempfile.TemporaryDirectory() as tmp:
        photos = sorted((shared_path("coco_mini") / "images").glob("*.jpg"))
        per_shard = 2 * args.images + 1024  # so that the stream never runs dry (a rank of 4 reads 4x what it decodes)
        for shard in range(2):
            write_tar(Path(tmp) / f"{shard:05d}.tar", [(f"{shard}{i:06d}", {"jpg": photos[i % len(photos)].read_bytes(),
                                                                         "txt": b"a photo"}) for i in range(per_shard)])
        pattern = f"{tmp}/{{00000..00001}}.tar"
        turns = {k: [] for k in ("inline", "ahead", "rank", "replay", "state")}
        for _ in range(args.repeats):
            turns["inline"].append(images_per_s(pattern, args.size, 0, args.images))
            turns["ahead"].append(images_per_s(pattern, args.size, args.workers, args.images))
            turns["rank"].append(images_per_s(pattern, args.size, 0, args.images, world=4))
            turns["replay"].append(resume_seconds(pattern, args.size, args.images, saved=False))
            turns["state"].append(resume_seconds(pattern, args.size, args.images, saved=True))
    print(report(turns, args.size, args.workers, args.images))


if __name__ == "__main__":
    main()
