"""The CPU bench scripts (bench/README.md) keep running: a small side-by-side run of one, the interleaved timing
helpers, and one line (no traceback) for bad options. Their numbers are not asserted (speed is bench/'s to
measure, never a test's)."""
import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300)


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


@pytest.mark.parametrize("script, args, expected", [
    ("duplicates_pass", ["--repeat-every", "0"], "--repeat-every 0: at least 1"),
    ("duplicates_pass", ["--records", "10", "--shards", "20"], "--records 10: at least --shards"),
    ("dataset_open", ["--repeats", "0"], "--repeats 0: at least 1"),
    ("sample", ["--modes", "kv"], "--modes kv: unknown kv"),
    ("sample", ["--repeats", "0"], "--repeats 0: at least 1"),
    ("scale_slice", ["--preset", "parti-tiny", "--tp", "3"], "--tp 3: must be >= 1 and divide the heads"),
    ("scale_slice", ["--preset", "parti-tiny", "--recompute", "foo"], "--recompute foo: unknown foo"),
    ("scale_slice", ["--preset", "parti-tiny", "--encoder-layers", "0"], "model.encoder_layers=0 must be positive"),
    ("vq_encode", ["--image-size", "60"], "--image-size 60: image_size 60 must be a multiple"),
    ("image_stream", ["--images", "0"], "--images 0: at least 1"),
    ("pretokenize", ["--workers", "0"], "--workers 0: at least 1"),
    ("model_step", ["--repeats", "0"], "--repeats 0: at least 1"),
    ("keyed_dropout", ["--step-batch", "0"], "--step-batch 0: at least 1"),
    ("train_throughput", ["--nproc", "0"], "--nproc 0: at least 1"),
    ("train_throughput", ["--turns", "0"], "--turns 0: at least 1"),
    ("checkpoint_scale", ["--steps-during", "0"], "--steps-during 0: at least 1"),
])
def test_bad_options_are_one_line(script, args, expected, capsys):
    """In-process (each parses before it builds or starts anything; that the scripts run as scripts, the
    subprocess runs here show): a bad option, or a count the run would divide by, take a median over or spawn that
    many processes of, ends in one line (exit 2), not after the run in a traceback (or, for --nproc 0, silently
    with no output at all)."""
    module = importlib.import_module(f"bench.{script}")
    with pytest.raises(SystemExit) as stop:
        module.main(args)
    assert stop.value.code == 2 and expected in capsys.readouterr().err.strip().splitlines()[-1]


# CPU scripts end to end at their smallest sizes: that each runs and prints its ratios as finite positive numbers.
# Their values are not asserted (noise), only what does not depend on speed (files read, bytes per rank,
# optimizer-state fractions). Left out, too slow for the suite even at their smallest: image_stream.py (~8 s: every
# measurement first fills the stream's 256-image shuffle buffer with decoded 640x480 photos) and keyed_dropout.py
# (~15 s: compiling the mask kernel).

NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def numbers(pattern: str, text: str) -> list[float]:
    """The numbers `pattern` captures (NUMBER in it), each finite and positive; the pattern must match."""
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in:\n{text}"
    values = [float(v) for v in match.groups()]
    assert all(math.isfinite(v) and v > 0 for v in values), (pattern, values)
    return values


def test_dataset_open_smoke(tmp_path, capsys):
    from bench import dataset_open

    dataset_open.main(["--shards", "3", "--repeats", "1", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    numbers(rf"ratio \(every NNNNN.json / shard_stats.json\): {NUMBER}x at 3 shards", out)
    reads = {name: int(n) for name, n in re.findall(r"^(shard_stats.json|every NNNNN.json)\s+[\d.]+\s+(\d+)$", out,
                                                    re.MULTILINE)}
    assert reads == {"shard_stats.json": 2, "every NNNNN.json": 4}, out  # manifest.json and the stats, or each shard's
    assert list(tmp_path.iterdir()) == []  # (its folder is a temporary one under --dir)


def test_pretokenize_smoke(capsys):
    from bench import pretokenize

    pretokenize.main(["--workers", "1", "--image-size", "16", "--copies", "1", "--batch-size", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "17 images of ~640x480 -> 16px, grid 2, batch 8" in out, out
    for name in ("end-to-end, 0 decode workers", "end-to-end, 1 decode workers", "VQ encode only"):
        numbers(rf"{name}:\s+{NUMBER} images/s\s+\({NUMBER} of encode-only\)", out)
    assert numbers(rf"VQ encode only:\s+{NUMBER} images/s\s+\({NUMBER} of", out)[1] == 1.0


def test_model_step_smoke(single_process, capsys):
    from bench import model_step

    model_step.main(["--batch", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    for side in ("model", "reference"):
        numbers(rf"^\s*{side}: median\s+{NUMBER} ms", out)
    numbers(rf"ratio model/reference: {NUMBER}x \({NUMBER}-{NUMBER} over 1 turns\)  \(target <= 1.15: "
            r"(?:met in every turn|NOT met in any turn)\)", out)
    assert [model_step.verdict(r) for r in ([1.0, 1.15], [1.2, 1.16], [1.1, 1.12, 1.3], [1.1, 1.2, 1.3])] == [
        "met in every turn", "NOT met in any turn",
        "met at the median, not in every turn: rerun with more --repeats",
        "NOT met at the median, not in every turn: rerun with more --repeats"]


def _on_pool_rank(fn, *args):
    """A bench script's spawned worker body, run on a rank of the session's pool: its environment, thread count
    and log level (which the worker sets for its own fresh process) restored after."""
    import logging

    import torch
    import torch.distributed as dist

    env, threads, level = dict(os.environ), torch.get_num_threads(), logging.getLogger("parti").level
    try:
        return fn(dist.get_rank(), *args)
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
        logging.getLogger("parti").setLevel(level)


def scale_slice_rank(rank: int, tp: int, args, recompute: str) -> dict:
    from bench import scale_slice

    out = {}
    scale_slice.worker(rank, tp, 0, args, recompute, out)  # (the port: the pool's group is already up)
    return out


def test_scale_slice_smoke(pool2, monkeypatch, capsys):
    """main() as run, its measurements by its worker on the pool's 2 ranks (TP=1 there: both build it whole)
    instead of freshly spawned processes."""
    from bench import scale_slice

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # (main sets it for the processes it starts)
    monkeypatch.setattr(scale_slice, "measure", lambda tp, args, recompute: pool2.run(
        _on_pool_rank, scale_slice_rank, tp, args, recompute)[0])
    scale_slice.main(["--preset", "parti-tiny", "--tp", "1,2", "--recompute", "none"])
    out = capsys.readouterr().out
    rows = [re.search(rf"^\s*{tp}\s+none\s+([\d,]+)" + r"\s+(\S+)" * 9 + "$", out, re.MULTILINE) for tp in (1, 2)]
    assert all(rows), out
    rows = [[float(v.replace(",", "")) for v in row.groups()] for row in rows]
    # params/rank, build s, init GB, vs TP=1, fwd GB, planned, ratio, fwd+bwd GB, planned, ratio: the ratios positive
    # (a tiny slice's GB round to 0.00)
    assert all(math.isfinite(v) and v >= 0 for row in rows for v in row), out
    assert all(row[i] > 0 for row in rows for i in (0, 3, 6, 9)), out
    assert rows[0][0] > rows[1][0], out  # params per rank: TP=2 holds about half
    assert rows[0][3] == 1.0, out  # init memory vs TP=1


def checkpoint_scale_rank(rank: int, world: int, args, root: str) -> dict:
    from bench import checkpoint_scale

    out = {}
    checkpoint_scale.worker(rank, world, 0, args, root, out)
    return out[rank]


def test_checkpoint_scale_smoke(pool2, monkeypatch, capsys):
    """main() as run, its ranks by its worker on the pool's 2 ranks instead of freshly spawned processes."""
    from bench import checkpoint_scale

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setattr(checkpoint_scale, "measure", lambda args, root: pool2.run(
        _on_pool_rank, checkpoint_scale_rank, args.dp, args, root))
    checkpoint_scale.main(["--preset", "parti-tiny", "--layers", "1,1", "--steps-during", "1"])
    out = capsys.readouterr().out
    assert "parti-tiny (layers 1,1 ), ZeRO-1, DP=2, fp32; checkpoint" in out, out
    for rank in (0, 1):
        written = numbers(
            rf"^\s*{rank}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER} / {NUMBER}\s*= {NUMBER}\s+{NUMBER} / {NUMBER}\s*= "
            rf"{NUMBER}\s+{NUMBER} \({NUMBER}, {NUMBER} s\), completed\s+{NUMBER}$", out)[0]
        assert written == pytest.approx(1, abs=0.05), out  # each rank writes its own half


def test_train_throughput_smoke(pool2):
    """Its worker's measurements on the pool's 2 ranks (main() spawns them: its options are checked above): every
    stage and the matmul timed once a turn, and the tables rank 0 prints."""
    from bench import train_throughput

    results = pool2.run(_on_pool_rank, train_throughput_rank, "parti-tiny", 1, 2)[0]
    assert [len(results["samples_per_s"][zero]) for zero in (0, 1, 2, 3)] + [len(results["matmul"])] == [2] * 5
    out = train_throughput.report("parti-tiny", 2, results)
    numbers(rf"measured matmul: {NUMBER} TFLOP/s per process", out)
    turns = rf"{NUMBER}x \({NUMBER}-{NUMBER} over 2 turns\)"
    for zero in (0, 1, 2, 3):
        speed = re.search(rf"^\s*{zero}\s+{NUMBER}\s+{NUMBER}\s+{turns}\s+{turns}$", out, re.MULTILINE)
        memory = re.search(rf"^\s*{zero}" + rf"\s+{NUMBER}" * 4 + "$", out, re.MULTILINE)
        assert speed and memory, out
        samples, flops, *of_matmul = map(float, speed.groups()[:5])
        vs_zero0 = list(map(float, speed.groups()[5:]))
        assert all(math.isfinite(v) and v > 0 for v in (samples, flops, *of_matmul, *vs_zero0)), out
        assert zero or vs_zero0 == [1, 1, 1], out  # (each turn's own ratio: ZeRO-0 against itself)
        moments, master, total, of_moments = map(float, memory.groups())
        assert moments > 0 and total > 0, out
        assert master == 0 if zero == 0 else master > 0, out  # fp32 ZeRO-0 keeps no master copy
        assert of_moments == pytest.approx(1 if zero == 0 else 0.5, abs=0.01), out  # ZeRO 1-3: Adam's moments / DP


def test_train_throughput_rotates_the_order_of_its_sides():
    """Each turn calls every side once, the turn after starting one side later: none is always first."""
    from bench.turns import in_turns

    calls = []
    values = in_turns({side: lambda side=side: calls.append(side) or len(calls) for side in "abc"}, turns=4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert values == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}


def test_a_ratio_over_turns_is_the_median_of_each_turns_ratio_with_their_range():
    """Turns whose ratios are 3, 4 and 1 (their mean 2.67, the ratio of their sums 2.6): the median 3 and the range
    1-4; sides timed a different number of times are an error, not a ratio over the turns they share."""
    from bench.turns import ratio_over_turns

    assert ratio_over_turns([3.0, 8.0, 2.0], [1.0, 2.0, 2.0]) == "3.00x (1.00-4.00 over 3 turns)"
    assert ratio_over_turns([1.0], [3.0], digits=3) == "0.333x (0.333-0.333 over 1 turns)"
    with pytest.raises(ValueError):
        ratio_over_turns([1.0, 2.0], [1.0])


def train_throughput_rank(rank: int, preset: str, steps: int, turns: int):
    from bench import train_throughput

    return train_throughput.rank_results(preset, steps, turns)
