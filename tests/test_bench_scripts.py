"""The CPU bench scripts (bench/README.md) keep running: a small side-by-side run of one, the interleaved timing
helpers, the tables' arithmetic on hand-made measurements, and one line (no traceback) for bad options. Their
measured numbers are not asserted (speed is bench/'s to measure, never a test's)."""
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


def test_model_step_report_times_the_model_against_the_reference():
    """Three turns of model / reference 2/1, 3/2 and 2.2/2 ms (ratios 2, 1.5, 1.1): their median 1.5 and range
    1.1-2, the target missed at the median though met in one turn; each side's median and range in ms."""
    from bench.model_step import report

    out = report({"model": [0.002, 0.003, 0.0022], "reference": [0.001, 0.002, 0.002]})
    assert out.splitlines() == [
        "     model: median      2.2 ms  (min 2.0, max 3.0)",
        " reference: median      2.0 ms  (min 1.0, max 2.0)",
        ("ratio model/reference: 1.500x (1.100-2.000 over 3 turns)  (target <= 1.15: NOT met at the median, not in "
         "every turn: rerun with more --repeats)")]


def _on_pool_rank(fn, *args):
    """A bench script's spawned worker body, run on a rank of the session's pool: its environment, thread count,
    log level and allocator settings (which the worker sets for its own fresh process) restored after."""
    import logging

    import torch
    import torch.distributed as dist

    from bench.scale_slice import pin_mmap_threshold

    env, threads, level = dict(os.environ), torch.get_num_threads(), logging.getLogger("parti").level
    try:
        return fn(dist.get_rank(), *args)
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
        logging.getLogger("parti").setLevel(level)
        # (glibc's largest dynamic threshold: the pool's later tests allocate as fast as before, not 1.6x slower)
        pin_mmap_threshold(32 << 20)


def scale_slice_rank(rank: int, tp: int, args, recompute: str) -> dict:
    from bench import scale_slice

    out = {}
    scale_slice.worker(rank, tp, 0, args, recompute, out)  # (the port: the pool's group is already up)
    return out


def test_scale_slice_smoke(pool2, monkeypatch, capsys):
    """main() as run, its measurements by its worker on the pool's 2 ranks (TP=1 there: both build it whole)
    instead of freshly spawned processes."""
    from bench import scale_slice

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

    checkpoints, results = [], []

    def measure(args, root):
        results.extend(pool2.run(_on_pool_rank, checkpoint_scale_rank, args.dp, args, root))
        checkpoints.extend(sum(f.stat().st_size for f in tag.glob("*.distcp"))
                           for tag in sorted((Path(root) / "run" / "checkpoints").glob("step_*")))
        return results

    monkeypatch.setattr(checkpoint_scale, "measure", measure)
    checkpoint_scale.main(["--preset", "parti-tiny", "--layers", "1,1", "--steps-during", "1"])
    out = capsys.readouterr().out
    # The ranks' own files add up to one checkpoint (warm-up, timed and async saves of the same shapes): a rank
    # that counted every rank's files would still print 1.000 against a total twice too large.
    assert len(checkpoints) == 3 and len(set(checkpoints)) == 1, checkpoints
    assert sum(r["written"] for r in results) == checkpoints[0]
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
    from training.config import load_config
    from training.flops import train_flops_per_sample

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
    per_sample = train_flops_per_sample(load_config(None, ["model.preset=parti-tiny"]).model)
    for zero in (0, 1, 2, 3):  # the global samples/s, each process doing 1/DP of their FLOPs
        assert results["flops_per_proc"][zero] == pytest.approx([per_sample * s / 2
                                                                  for s in results["samples_per_s"][zero]])


def test_train_throughput_report_divides_each_measure_by_its_reference():
    """Two turns of ZeRO-0 and ZeRO-3 (hand-made): TFLOP/s per process against the matmul's in the same turn,
    samples/s against ZeRO-0's, optimizer bytes (moments + master copies) and the moments alone against ZeRO-0's
    (its master copies made up here, 0 in the fp32 runs, so that the two columns differ)."""
    from bench.train_throughput import report

    mb = 2**20
    out = report("parti-tiny", 2, {"samples_per_s": {0: [10.0, 20.0], 3: [5.0, 30.0]},
                                   "flops_per_proc": {0: [2e12, 4e12], 3: [1e12, 6e12]}, "matmul": [4e12, 8e12],
                                   "opt_bytes": {0: (4 * mb, 4 * mb), 3: (2 * mb, 1 * mb)}}).splitlines()
    assert "measured matmul: 6.0000 TFLOP/s per process (median turn)" in out
    rows = [line.split() for line in out if line.split()[:1] in (["0"], ["3"])]
    turns = ["over", "2", "turns)"]
    assert rows == [["0", "15.0", "3.0000", "0.500x", "(0.500-0.500", *turns, "1.00x", "(1.00-1.00", *turns],
                    ["3", "17.5", "3.5000", "0.500x", "(0.250-0.750", *turns, "1.00x", "(0.50-1.50", *turns],
                    ["0", "4.00", "4.00", "1.000", "1.000"], ["3", "2.00", "1.00", "0.375", "0.500"]]


def test_train_throughput_stepper_counts_every_step_and_reads_new_batches(monkeypatch):
    """samples/s over `steps` steps (on a clock only train_step advances, 2 s a step), the batches read before
    the clock starts, each call's from where the last one stopped."""
    from types import SimpleNamespace

    import torch

    import training.engine
    import training.trainer
    from bench import train_throughput

    clock, reads, stepped = [0.0], [], []
    monkeypatch.setattr(train_throughput, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(training.trainer, "rank_micro_batches", lambda cfg, dataset, sampler, consumed, rank, size: (
        reads.append((consumed, rank, size)) or [consumed]))
    monkeypatch.setattr(training.engine, "train_step", lambda engine, cfg, batches, device: (
        stepped.append((batches, len(reads))), clock.__setitem__(0, clock[0] + 2.0)))
    step = train_throughput.stepper(SimpleNamespace(cfg=None, dataset=None, sampler=None, dp_rank=1, dp_size=2,
                                                    engine=None, device="cpu"))
    assert step(3) == 16 * 3 / 6.0 and step(2) == 16 * 2 / 4.0
    assert reads == [(0, 1, 2), (16, 1, 2), (32, 1, 2), (48, 1, 2), (64, 1, 2)]
    assert stepped == [([0], 3), ([16], 3), ([32], 3), ([48], 5), ([64], 5)]


def test_train_throughput_matmul_counts_two_flops_a_multiply_add(monkeypatch):
    from types import SimpleNamespace

    from bench import train_throughput

    clock = iter([10.0, 10.5])  # the timed repeats take 0.5 s
    monkeypatch.setattr(train_throughput, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert train_throughput.matmul_flops("cpu", n=4, repeats=2) == 2 * 4**3 * 2 / 0.5


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


def test_checkpoint_scale_report_divides_each_measure_by_its_reference():
    """Hand-made measurements of 2 ranks: every ratio the table prints is the one its header names."""
    from argparse import Namespace

    from bench.checkpoint_scale import report

    rank = {"written": 3 << 28, "own": 400, "extra_rss": 100, "save_s": 3.0, "raw_s": 2.0, "blocking_s": 0.6,
            "step_s": 2.0, "step_during_s": 3.0, "step_beside_fork_s": 2.5, "steps_during": 4,
            "async_completed": True}
    out = report(Namespace(preset="p", layers="1,1", set=[], dp=2),
                 [rank, {**rank, "written": 1 << 28, "async_completed": False}])
    assert "checkpoint 1.00 GiB" in out, out
    rows = [line.split() for line in out.splitlines()[2:]]
    # written / (total / dp): 3/4 and 1/4 of a GiB against half of it; extra memory / own partition 100/400; save
    # / raw 3/2; paused / save 0.6/3; step during / step 3/2 (4 steps, step 2 s); beside a fork / step 2.5/2
    assert rows[0] == ["0", "1.500", "0.250", "3.00", "/", "2.00", "=", "1.50", "0.60", "/", "3.00", "=", "0.20",
                       "1.500", "(4,", "2.00", "s),", "completed", "1.250"], out
    assert rows[1][:2] == ["1", "0.500"] and "NOT" in rows[1], out


def test_checkpoint_scale_own_partition_is_masters_and_each_moment():
    """fp32 masters of this rank's flat partitions and every tensor of Adam's state with their shape (two moments),
    not its 0-dim step count: 4 bytes x (10 + 6) elements x 3."""
    from types import SimpleNamespace

    import torch

    from bench.checkpoint_scale import own_partition_bytes

    flats = [torch.zeros(10), torch.zeros(6)]
    state = {t: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
             for t in flats}
    optimizer = SimpleNamespace(single_partition_of_fp32_groups=flats, optimizer=SimpleNamespace(state=state))
    assert own_partition_bytes(SimpleNamespace(engine=SimpleNamespace(optimizer=optimizer))) == 4 * 16 * 3


def test_checkpoint_scale_raw_write_writes_the_bytes_asked(tmp_path, monkeypatch):
    """The disk's raw speed is timed over exactly the bytes the rank's save wrote (a 64 MiB piece and 5 bytes
    here, not two whole pieces), and its file is gone after."""
    import torch.distributed as dist

    from bench.checkpoint_scale import raw_write_seconds

    sizes, fsync = [], os.fsync
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(os, "fsync", lambda fd: sizes.append(os.fstat(fd).st_size) or fsync(fd))
    assert raw_write_seconds(tmp_path, (64 << 20) + 5, rank=1) > 0
    assert sizes == [(64 << 20) + 5] and list(tmp_path.iterdir()) == []


def test_scale_slice_row_divides_each_measure_by_its_reference():
    """Hand-made measurements: GB are 2**30 bytes; init against the first TP size's, the forward peak against the
    planned activations, forward + backward against activations + gradients."""
    from bench.scale_slice import row

    r = {"params": 1234567, "build_s": 2.5, "init_bytes": 3 << 29, "forward": 1 << 29, "activations": 1 << 30,
         "measured": 3 << 30, "planned": 2 << 30}
    assert row(2, "none", r, first_init=3 << 30).split() == [
        "2", "none", "1,234,567", "2.5", "1.50", "0.50", "0.50", "1.00", "0.50", "3.00", "2.00", "1.50"]


def test_peak_rss_keeps_a_peak_freed_inside_the_block():
    """64 MiB of fresh pages held until the sampler has seen them, then unmapped before the block ends: the peak
    keeps them (the forward's temporaries are freed before scale_slice reads the peak). The pages are an
    anonymous mapping of their own: a tensor of that size can come from memory the allocator already holds
    resident (freed by earlier tests in the process), and then the process does not grow at all."""
    import mmap
    import time

    import psutil

    from bench.scale_slice import PeakRSS

    size, before = 64 << 20, psutil.Process().memory_info().rss
    with PeakRSS() as peak:
        held = mmap.mmap(-1, size)
        for page in range(0, size, mmap.PAGESIZE):  # (resident once written)
            held[page] = 1
        deadline = time.monotonic() + 30
        while peak.peak < before + size and time.monotonic() < deadline:
            time.sleep(0.001)
        held.close()
    assert peak.peak - before >= size > psutil.Process().memory_info().rss - before


def test_vq_encode_rate_counts_every_image_of_every_call(monkeypatch):
    """0.5 s a call whatever the batch: batch b at c calls a turn is b * c images in 0.5 * c s, 2b images/s."""
    from bench import vq_encode

    monkeypatch.setattr(vq_encode, "seconds", lambda model, x, calls, device: 0.5 * calls)
    model = type("Model", (), {"encode": lambda self, x: None})()
    assert vq_encode.rates(model, 8, repeats=2, device="cpu", batches={1: 4, 32: 1}) == {1: [2.0, 2.0],
                                                                                         32: [64.0, 64.0]}


def test_vq_encode_report_is_batch_32_over_batch_1_turn_by_turn():
    """Turns' ratios 20, 15 and 24: the median 20, not the ratio of the medians 60 / 4."""
    from bench.vq_encode import report

    out = report({1: [2.0, 4.0, 5.0], 32: [40.0, 60.0, 120.0]})
    assert "batch  1:     4.00 images/s (median of 3; min 2.00, max 5.00)" in out, out
    assert "batch 32:    60.00 images/s (median of 3; min 40.00, max 120.00)" in out, out
    assert "batch 32 / batch 1: 20.00x (15.00-24.00 over 3 turns)" in out, out


def test_pretokenize_copies_are_no_duplicates(tmp_path):
    """pretokenize drops repeated image bytes, so each copy must have bytes of its own (a changed pixel, its first
    way, was lost to JPEG quantisation for 4 of the 17 photos between copies 0 and 1)."""
    import hashlib

    from bench.pretokenize import make_inputs

    samples = make_inputs(tmp_path, 2)
    assert len(samples) == 34 and len({hashlib.sha256(s["jpg"]).digest() for _, s in samples}) == 34
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00001.tar"]


def test_pretokenize_report_divides_each_turn_by_its_encode_only_rate():
    """3 turns: 0 workers 10, 30, 20 images/s, 2 workers 40, 90, 50, encode only 100, 100, 50: their turns' shares
    of encode-only 0.1, 0.3, 0.4 and 0.4, 0.9, 1.0, medians 0.3 and 0.9 (not 20/100 and 50/100)."""
    from bench.pretokenize import report

    out = report({"end-to-end, 0 decode workers": [10.0, 30.0, 20.0],
                  "end-to-end, 2 decode workers": [40.0, 90.0, 50.0], "VQ encode only": [100.0, 100.0, 50.0]})
    rows = re.findall(r"^\s*(.+): +(\S+) images/s +\((\S+) of encode-only\)$", out, re.MULTILINE)
    assert rows == [("end-to-end, 0 decode workers", "20.0", "0.30"), ("end-to-end, 2 decode workers", "50.0", "0.90"),
                    ("VQ encode only", "100.0", "1.00")], out


def test_dataset_open_report_is_the_slow_way_over_the_fast_one():
    from bench.dataset_open import report

    out = report({"shard_stats.json": [0.1, 0.3, 0.2], "every NNNNN.json": [2.0, 0.6, 1.0]},
                 {"shard_stats.json": 2, "every NNNNN.json": 4}, 3)
    rows = [line.rsplit(maxsplit=2) for line in out.splitlines() if line.startswith(("shard_stats", "every"))]
    assert rows == [["shard_stats.json", "0.200", "2"], ["every NNNNN.json", "1.000", "4"]], out
    assert "ratio (every NNNNN.json / shard_stats.json): 5.00x at 3 shards" in out, out


def test_dataset_open_alternates_with_and_without_shard_stats(tmp_path, monkeypatch):
    """Every turn opens the folder as written, then with shard_stats.json moved aside, and puts it back after; the
    module's read_json is its own again after each open."""
    from bench import dataset_open
    from data_pipeline import code_shards

    had, timed_open, read_json = [], dataset_open.timed_open, code_shards.read_json
    monkeypatch.setattr(dataset_open, "timed_open", lambda folder: had.append(
        (folder / code_shards.SHARD_STATS).is_file()) or timed_open(folder))
    dataset_open.main(["--shards", "2", "--repeats", "2", "--dir", str(tmp_path)])
    assert had == [True, False, True, False] and code_shards.read_json is read_json


def test_image_stream_report_divides_each_variant_by_its_reference():
    """Turns' ratios: workers / in process 2.5, 1.5, 3; rank of 4 / in process 0.8, 0.5, 1.1; replay / saved state
    (seconds: the state's speed-up) 3, 4, 2."""
    from bench.image_stream import report

    out = report({"inline": [10.0, 20.0, 30.0], "ahead": [25.0, 30.0, 90.0], "rank": [8.0, 10.0, 33.0],
                  "replay": [3.0, 2.0, 4.0], "state": [1.0, 0.5, 2.0]}, size=64, workers=2, images=600)
    assert ("64 px: 20 images/s decoded in the training process, 30 with 2 workers: 2.50x (1.50-3.00 over 3 turns)"
            in out), out
    assert "(in the training process): 10 images/s, 0.80x (0.50-1.10 over 3 turns) a single process's" in out, out
    assert ("resume after 600 images: replay 3.00 s, saved state 1.00 s: 3.00x (2.00-4.00 over 3 turns) faster"
            in out), out


def test_keyed_dropout_reports_divide_each_measure_by_the_one_named():
    """Hand-made medians: masks 6 ms eager, 2 ms compiled, applying 4 ms; 228 and 9 bytes per element; steps of
    200 ms without dropout, 300 ms with eager masks and 250 ms with compiled ones."""
    from bench.keyed_dropout import site_report, step_report

    out = site_report({"mask_eager": 0.006, "mask_compiled": 0.002, "apply": 0.004, "compile_s": 12.3,
                       "bytes_mask_eager": 228.0, "bytes_apply": 9.0}, "1024x2x1024")
    assert ("one site 1024x2x1024: mask eager 6.00 ms, compiled 2.00 ms (first call with compilation 12.3 s), "
            "applying a mask 4.00 ms") in out, out
    assert "eager/compiled 3x; mask/apply: eager 1.5, compiled 0.5" in out, out
    assert "mask eager 228, compiled 1, applying 9 (eager/compiled 228x, eager mask/apply 25x)" in out, out
    out = step_report({"no_dropout": 0.2, "eager_mask": 0.3, "compiled_mask": 0.25}, "parti-tiny", 8)
    assert ("forward+backward of parti-tiny at batch 8: no dropout 200.0 ms; dropout 0.1 with eager masks 300.0 ms "
            "(+50%), with compiled masks 250.0 ms (+25%)") in out, out
    assert "step eager/compiled masks: 1.20x" in out, out


class _ClockedStream:
    """A crop stream on a fake clock: its first image costs `first` seconds (the shuffle buffer filling), each
    later one 0.5 s; it records what it was built with."""

    def __init__(self, clock: list[float], first: float, **built):
        self.clock, self.first, self.built, self.drawn = clock, first, built, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.clock[0] += self.first if self.drawn == 0 else 0.5
        self.drawn += 1
        return self.drawn

    def state_dict(self):
        return {"drawn": self.drawn}

    def close(self):
        pass


def test_image_stream_times_the_steady_state_and_the_restore(monkeypatch):
    """images/s: `count` images after the first (100 s of buffer filling) at 0.5 s each, 2 images/s; a resume's
    seconds: restore_stream alone, given the first stream's saved state or (replay) none."""
    from types import SimpleNamespace

    from bench import image_stream

    clock, streams, restored = [0.0], [], []
    monkeypatch.setattr(image_stream, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(image_stream, "crop_stream", lambda pattern, size, workers=0, world=1: streams.append(
        _ClockedStream(clock, 100.0, workers=workers, world=world)) or streams[-1])

    def restore(stream, state, consumed, checkpoint):
        restored.append((state, consumed))
        clock[0] += 7.0

    monkeypatch.setattr(image_stream, "restore_stream", restore)
    assert image_stream.images_per_s("p", 64, workers=2, count=5, world=4) == 2.0
    assert streams[0].built == {"workers": 2, "world": 4} and streams[0].drawn == 6
    assert [image_stream.resume_seconds("p", 64, 3, saved=s) for s in (True, False)] == [7.0, 7.0]
    assert restored == [([{"drawn": 3}], 3), (None, 3)]


def test_keyed_dropout_counts_bytes_read_and_written_per_element():
    """Applying a mask to bf16: where() reads the bool mask (1 byte) and x (2), writes 2; the scale reads 2 and
    writes 2: 9 bytes per element. An fp32 x * 2 (a scalar: not counted): 4 read + 4 written."""
    import torch

    from bench.keyed_dropout import bytes_per_element
    from model_parallel.keyed_dropout import keyed_dropout

    x, keep, y = torch.ones(64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bool), torch.ones(64)
    assert bytes_per_element(lambda: keyed_dropout(x, keep, 0.1), 64) == 9
    assert bytes_per_element(lambda: y * 2, 64) == 8


def test_keyed_dropout_alternates_after_one_untimed_call_each(monkeypatch):
    """Each variant is called once before timing (the compiled one's first call compiles), then in turn; the
    medians are of the timed calls only."""
    from bench import keyed_dropout

    calls, seconds = [], iter([5.0, 1.0, 3.0, 2.0, 4.0, 6.0])
    monkeypatch.setattr(keyed_dropout, "timed", lambda fn, device: fn() or next(seconds))
    medians = keyed_dropout.alternate({v: (lambda v=v: calls.append(v)) for v in "ab"}, repeats=3, device="cpu")
    assert calls == list("ab") + list("ab") * 3 and medians == {"a": 4.0, "b": 2.0}
