"""The manifest step's duplicates pass: memory and time of data_pipeline.manifest.find_duplicates (the hash
space sorted a part at a time) against sorting all hashes at once, on the same random hashes, in one run.

    python bench/duplicates_pass.py [--records 20000000] [--shards 2000] [--repeat-every 10]

Peak memory is measured with tracemalloc (numpy reports its arrays to it), the hashes read included (the
shards' .hashes files are generated here instead); each pass runs in a fresh child process so that one's freed memory does not serve the other. Prints
bytes per record, seconds and the ratios; both passes must find the same duplicates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000_000)
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--repeat-every", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_pass(args.child, args.records, args.shards, args.repeat_every)))
        return
    results = {}
    for how in ("at once", "in parts"):
        cmd = [sys.executable, __file__, "--child", how, "--records", str(args.records), "--shards", str(args.shards),
               "--repeat-every", str(args.repeat_every)]
        results[how] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    if results["at once"]["digest"] != results["in parts"]["digest"]:
        raise SystemExit("the two passes found different duplicates")
    n = args.records // args.shards * args.shards
    print(f"{n:,} records in {args.shards} shards, {results['in parts']['found']:,} duplicates\n")
    print(f"{'pass':<10}{'bytes/record':>14}{'seconds':>10}")
    for how, r in results.items():
        print(f"{how:<10}{r['peak'] / n:>14.1f}{r['seconds']:>10.1f}")
    a, b = results["at once"], results["in parts"]
    print(f"\nmemory ratio (at once / in parts): {a['peak'] / b['peak']:.2f}x; time ratio: "
          f"{a['seconds'] / b['seconds']:.2f}x")


if __name__ == "__main__":
    main()
