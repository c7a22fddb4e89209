"""What opening a code-shard folder costs each rank: with shard_stats.json against reading every NNNNN.json.

    python bench/dataset_open.py [--shards 20000] [--repeats 5] [--dir /parallel/fs/tmp]

Writes a folder of --shards small shards (data_pipeline.synthetic.write_random_code_shards: 3 records of 4 codes
each, with what pretokenize and its manifest step write; the per-shard cost of opening does not depend on the
records), then opens it (CodeShardDataset: every shard's size and values checked) alternately as written and
with shard_stats.json moved aside (what a folder made before it costs: each NNNNN.json read), --repeats times
each, side by side. Prints the median seconds of each, their ratio and the files read per open. Every rank of a
training run opens its folders once; on a parallel file system the file reads are what count, so run it there
with --dir to see the difference at the metadata server.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.cli import require_at_least
from data_pipeline import code_shards
from data_pipeline.code_shards import SHARD_STATS, CodeShardDataset
from data_pipeline.synthetic import write_random_code_shards


def timed_open(folder: Path) -> tuple[float, int]:
    """(seconds to open the folder, metadata files read)."""
    reads, real = [], code_shards.read_json
    code_shards.read_json = lambda path: reads.append(path) or real(path)
    try:
        start = time.perf_counter()
        CodeShardDataset(folder)
        return time.perf_counter() - start, len(reads)
    finally:
        code_shards.read_json = real


def report(times: dict[str, list[float]], reads: dict[str, int], shards: int) -> str:
    """The table ({way: [seconds of each open]}, {way: files read}; shard_stats.json first) and the ratio of the
    medians, the slow way's over the fast one's."""
    fast, slow = (statistics.median(times[k]) for k in times)
    lines = [f"\n{'open with':<20}{'median s':>10}{'files read':>12}"]
    lines += [f"{name:<20}{statistics.median(values):>10.3f}{reads[name]:>12}" for name, values in times.items()]
    lines.append(f"\nratio (every NNNNN.json / shard_stats.json): {slow / fast:.2f}x at {shards} shards")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the folder (default: the system's temp dir)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("shards", "repeats"))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "codes"
        start = time.perf_counter()
        write_random_code_shards(folder, args.shards)
        print(f"wrote {args.shards} shards in {time.perf_counter() - start:.1f} s", flush=True)
        stats, aside = folder / SHARD_STATS, Path(tmp) / SHARD_STATS
        times: dict[str, list[float]] = {"shard_stats.json": [], "every NNNNN.json": []}
        reads = {}
        for _ in range(args.repeats):
            for name, seconds in times.items():
                if name == "every NNNNN.json":
                    stats.rename(aside)
                took, reads[name] = timed_open(folder)
                seconds.append(took)
                if aside.exists():
                    aside.rename(stats)
    print(report(times, reads, args.shards))


if __name__ == "__main__":
    main()
