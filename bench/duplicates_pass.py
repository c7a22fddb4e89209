"""The manifest step's duplicates pass: memory and time of data_pipeline.manifest.find_duplicates (the hash
space sorted a part at a time) against sorting all hashes at once, on the same random hashes, in one run.

    python bench/duplicates_pass.py [--records 20000000] [--shards 2000] [--repeat-every 10] [--repeats 3]

Peak memory is measured with tracemalloc (numpy reports its arrays to it), the hashes read included (the
shards' .hashes files are generated here instead, inside the timed pass, as reading them would be); each pass
runs in a fresh child process so that one's freed memory does not serve the other, the two in turns
`--repeats` times. Prints bytes per record, median seconds and the ratios (time: the median of the turns'
ratios); both passes must find the same duplicates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.turns import ratio_over_turns
from common.cli import require_at_least


def shards(records: int, count: int, repeat_every: int):
    """`count` shards of random 16-byte hashes, every `repeat_every`-th one a repeat of its shard's first."""
    rng = np.random.default_rng(0)
    for _ in range(count):
        h = rng.integers(0, 256, (records // count, 16), dtype=np.uint8)
        h[::repeat_every] = h[0]
        yield h


def sort_all_at_once(parts: list[np.ndarray]) -> np.ndarray:
    """The pass before the parts: every hash in one lexsort (the reference)."""
    keys = np.ascontiguousarray(np.concatenate(parts)).view(">u8")
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    ordered = keys[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (ordered[1:] == ordered[:-1]).all(axis=1)
    return np.sort(order[repeat]).astype(np.int64)


def one_pass(how: str, records: int, count: int, repeat_every: int) -> dict:
    """In this process: the pass's seconds, its peak bytes (the hashes read included), and a digest of what it
    found."""
    from data_pipeline.manifest import find_duplicates

    total = records // count * count
    tracemalloc.start()
    start = time.perf_counter()
    if how == "at once":  # (every shard's hashes read into a list first, as the manifest step did)
        found = sort_all_at_once(list(shards(records, count, repeat_every)))
    else:  # (the shards read one at a time into the pass's own array)
        found = find_duplicates(shards(records, count, repeat_every), total)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": tracemalloc.get_traced_memory()[1], "found": len(found),
            "digest": hashlib.sha256(found.tobytes()).hexdigest()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000_000)
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--repeat-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="turns (each runs both passes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("shards", "repeat_every", "repeats"))
    if args.records < args.shards:
        parser.error(f"--records {args.records}: at least --shards ({args.shards}), one record per shard")
    if args.child:
        print(json.dumps(one_pass(args.child, args.records, args.shards, args.repeat_every)))
        return
    turns: dict[str, list[dict]] = {"at once": [], "in parts": []}
    for _ in range(args.repeats):
        for how, runs in turns.items():
            cmd = [sys.executable, __file__, "--child", how, "--records", str(args.records), "--shards",
                   str(args.shards), "--repeat-every", str(args.repeat_every)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                raise SystemExit(f"the {how!r} pass failed: {last}")
            runs.append(json.loads(proc.stdout))
    if len({r["digest"] for runs in turns.values() for r in runs}) != 1:
        raise SystemExit("the two passes found different duplicates")
    n = args.records // args.shards * args.shards
    print(f"{n:,} records in {args.shards} shards, {turns['in parts'][0]['found']:,} duplicates, "
          f"{args.repeats} turns\n")
    print(f"{'pass':<10}{'bytes/record':>14}{'median s':>10}")
    peak = {how: max(r["peak"] for r in runs) for how, runs in turns.items()}
    seconds = {how: [r["seconds"] for r in runs] for how, runs in turns.items()}
    for how in turns:
        print(f"{how:<10}{peak[how] / n:>14.1f}{statistics.median(seconds[how]):>10.2f}")
    print(f"\nmemory ratio (at once / in parts): {peak['at once'] / peak['in parts']:.2f}x; time ratio: "
          f"{ratio_over_turns(seconds['at once'], seconds['in parts'])}")


if __name__ == "__main__":
    main()
