"""The CPU bench scripts (bench/README.md) keep running: a small side-by-side run of one, the interleaved timing
helpers, and one line (no traceback) for bad options. Their numbers are not asserted (speed is bench/'s to
measure, never a test's)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300)


@pytest.mark.parametrize("script, args, expected", [
    ("duplicates_pass.py", ["--repeat-every", "0"], "--repeat-every 0: at least 1"),
    ("duplicates_pass.py", ["--records", "10", "--shards", "20"], "--records 10: at least --shards"),
    ("dataset_open.py", ["--repeats", "0"], "--repeats 0: at least 1"),
    ("sample.py", ["--modes", "kv"], "--modes kv: unknown kv"),
    ("scale_slice.py", ["--preset", "parti-tiny", "--tp", "3"], "--tp 3: must be >= 1 and divide the heads"),
    ("scale_slice.py", ["--preset", "parti-tiny", "--recompute", "foo"], "--recompute foo: unknown foo"),
    ("vq_encode.py", ["--image-size", "60"], "--image-size 60: image_size 60 must be a multiple"),
    ("image_stream.py", ["--images", "0"], "--images 0: at least 1"),
    ("pretokenize.py", ["--workers", "0"], "--workers 0: at least 1"),
])
def test_bad_options_are_one_line(script, args, expected):
    proc = run(script, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in proc.stderr.strip().splitlines()[-1]


def test_duplicates_pass_runs_both_passes_in_turns():
    proc = run("duplicates_pass.py", "--records", "2000", "--shards", "4", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2,000 records in 4 shards, 196 duplicates, 2 turns" in proc.stdout
    assert "over 2 turns" in proc.stdout


def test_vq_encode_times_the_batch_sizes_in_turns(monkeypatch):
    from bench import vq_encode

    calls = []

    class Model:
        def encode(self, x):
            calls.append(len(x))

    rates = vq_encode.rates(Model(), 8, repeats=3, device="cpu", batches={1: 2, 4: 1})
    assert [len(r) for r in rates.values()] == [3, 3] and all(r > 0 for v in rates.values() for r in v)
    assert calls == [1, 4] + [1, 1, 4] * 3  # one warm-up each, then the two alternate
