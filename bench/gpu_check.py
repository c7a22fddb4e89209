"""The GPU check: one command that proves the CUDA path right and measures it on the machine it runs on.

    python bench/gpu_check.py                           # on a GPU machine: 5 minutes, the first sections
    python bench/gpu_check.py --budget-s 900            # every section, ~10 minutes
    python bench/gpu_check.py --device cpu --quick      # what can run on CPU, tiny sizes (a test runs it)
    python bench/gpu_check.py --only train_resume,mfu_350m --out /tmp/x   # these, in this order

Writes `<out>/gpu_<device>_<date>.json` (everything measured) and `.md` (a summary table), both rewritten
after each section so that a run cut short keeps what it finished; the running section's finished parts are in
`<out>/running/` until it ends (a run stopped from outside keeps them). The budget counts from this process's
start. Sections (bench/gpu_sections.py):
environment (GPU, driver, CUDA, NCCL, kernels chosen, CPU compatibility layer off, measured matmul and
copy rates), flash_attention (the SDPA kernel decoder self-attention really runs, by profiler kernel
names), train_resume (parti-tiny bf16 at ZeRO 0/1/3: save, resume = uninterrupted), recompute (none /
selective / full with dropout: equal), compile_speedup (kernels.compile vs eager, dropout on and off, the
dropout masks eager vs compiled), mfu_350m / mfu_750m / mfu_3b (bf16 ZeRO-1, the largest micro-batch that
fits, MFU against the named peak), sampling (KV cache vs recomputation: equal greedy codes, tokens/s),
vq (ViT-VQGAN bf16 train/save/resume, fp32 code search under autocast, pre-tokenization images/s) and
multi_gpu (TP=2 and PP=2 over NCCL = TP=1; needs 2 GPUs). Each runs in its own process with a time
limit (stopped 20 s after writing its result if it has not exited by then: its result stands), and
starts only if that limit fits in what is left of --budget-s; a section that needs a GPU is
skipped with the reason on CPU. Exit status: 1 if a section failed.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.cli import description
from common.files import write_atomic  # (after the path above)

# Seconds each section may take on a GPU (x3 on CPU), about twice what it took on an H200 (the MFU sections: plus
# the compilation of their layers and the operation profile, ~10 s with its Python stacks, not yet measured there).
TIME_LIMITS = {"environment": 60, "flash_attention": 60, "train_resume": 120, "recompute": 60, "mfu_350m": 170,
               "sampling": 120, "vq": 90, "mfu_750m": 180, "mfu_3b": 240, "multi_gpu": 120,
               "parti_stages": 60, "async_save": 110, "compile_speedup": 240, "decode_compiled": 240}
# The whole run's default length on a GPU: 5 minutes, in which the sections run in SECTIONS' order (what matters
# most first); every section takes ~10 minutes (--budget-s 900). A lent machine runs one command for at
# most 600 s, the wheels' installation first: bench/device_wheels.sh's command passes --budget-s 540.
GPU_BUDGET_S = 300


def run_section(name: str, device: str, quick: bool, scratch: Path, result_file: Path, deadline: float) -> None:
    """In the child process: run one section and write its result (or its error) as JSON. `deadline`: when
    (time.time()) the parent stops this process."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    from bench import gpu_sections  # after DS_ACCELERATOR: DeepSpeed reads it when first imported
    from common.cli import exit_promptly

    exit_promptly()

    fn = dict((n, f) for n, f, _ in gpu_sections.SECTIONS)[name]
    # Shortly before the parent stops this process at its limit: every thread's stack to stderr (the parent keeps
    # its tail), so that a section that hangs says where.
    faulthandler.dump_traceback_later(max(deadline - time.time() - 20, 1))  # (the imports took part of the limit)
    start = time.perf_counter()
    try:
        result = fn(gpu_sections.Context(device, quick, scratch, partial_file=partial_file(result_file)))
        failed = [k for k, ok in result.get("checks", {}).items() if not ok]
        result["status"] = "fail" if failed else "ok"
        if failed:
            result["failed_checks"] = failed
    except Exception as e:  # reported, not raised: the other sections still run
        result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = time.perf_counter() - start
    result["helpers_left"] = helpers_left()
    write_atomic(result_file, json.dumps(result, indent=1, default=str), sync=False)  # (whole, or not there)


def partial_file(result_file: Path) -> Path:
    """Where a section records its finished parts as it goes (Context.record), beside its result file."""
    return result_file.with_suffix(".partial.json")


def helpers_left() -> list[dict]:
    """The helper processes still running when the section has returned. A daemonic one (a data worker) should
    have been ended by its owner: one such, ignoring SIGTERM, once kept a section's process from exiting
    (common.cli.exit_promptly now kills it); which one it is, and what it is doing, for the next GPU run. (The
    checkpoints' results-queue server, training/checkpoint.py, is not daemonic and lives with the process.)"""
    import multiprocessing

    left = []
    for p in multiprocessing.active_children():
        proc = Path(f"/proc/{p.pid}")
        status = dict(line.split(":\t", 1) for line in _read(proc / "status").splitlines() if ":\t" in line)
        left.append({"pid": p.pid, "name": p.name, "daemon": p.daemon, "state": status.get("State", "?").strip(),
                     "ignores_sigterm": bool(int(status.get("SigIgn", "0"), 16) & (1 << (signal.SIGTERM - 1))),
                     "wchan": _read(proc / "wchan"), "cmdline": _read(proc / "cmdline").replace("\0", " ")[:200]})
    return left


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def device_slug(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _kernel_summary(profile: dict) -> str:
    """'; GPU busy 93%: matmul 61%, attention 14%, ...' from bench/gpu_sections.kernel_breakdown."""
    shares = ", ".join(f"{kind} {share:.0%}" for kind, share in list(profile["by_kind_share"].items())[:4])
    return f"; GPU busy {profile['busy']:.0%} of the step: {shares}"


def _compiled_summary(compiled: dict | None) -> str:
    """'; compiled layers: MFU 43.0% (1.11x eager, first step 41 s)' (or why not) for an MFU section's line."""
    if not compiled:
        return ""
    if "step_s" not in compiled:
        return f"; compiled layers: {compiled.get('error') or compiled.get('skipped')}".splitlines()[0][:200]
    mfu = "n/a" if compiled["mfu"] is None else f"{compiled['mfu']:.1%}"
    return (f"; compiled layers: MFU {mfu} ({compiled['speedup']:.2f}x eager, "
            f"first step {compiled['first_step_s']:.0f} s)"
            + (_kernel_summary(compiled["device_profile_one_step"]) if compiled.get("device_profile_one_step") else ""))


def summary_markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}, {report['date']}", "",
             f"`{report['command']}` — {report['seconds']:.0f} s", "",
             "| section | status | seconds | key results |", "| --- | --- | --- | --- |"]
    for name, r in report["sections"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {_key_results(name, r)} |")
    return "\n".join(lines) + "\n"


def _tflops(value: float) -> str:
    """A TFLOP/s figure: whole numbers on a GPU, two digits below 1 (a CPU's 0.4 printed as 0 before)."""
    return f"{value:.0f}" if value >= 1 else f"{value:.2g}"


def _key_results(name: str, r: dict) -> str:
    """A section's key results in one line; never raises (a result it cannot read says so: the .json has it
    whole), so that a surprise in one section's numbers cannot end the run."""
    try:
        return _summarise(name, r)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"(no summary: {type(e).__name__}: {e}; see the .json)".replace("|", "/")


def _partial_summary(partial: dict | None) -> str:
    """What a section that failed or ran out of time had recorded (Context.record): an MFU section's best eager
    MFU so far and its compiled layers' (what the targets are judged on), else the names of the records."""
    if not partial:
        return ""
    runs = {k.removeprefix("micro_batch_"): v for k, v in partial.items()
            if k.startswith("micro_batch_") and isinstance(v, dict) and v.get("mfu")}
    found = []
    if runs:
        size, best = max(runs.items(), key=lambda run: run[1]["mfu"])
        found.append(f"eager MFU {best['mfu']:.1%} at micro-batch {size}")
    if isinstance(partial.get("compiled"), dict) and partial["compiled"].get("mfu"):
        found.append(f"compiled layers MFU {partial['compiled']['mfu']:.1%}")
    return "; recorded before: " + ", ".join(found or sorted(partial))


def _summarise(name: str, r: dict) -> str:
    if r["status"] == "skipped":
        return r["reason"]
    if r["status"] == "error":
        return (r["error"].splitlines()[0][:200] + _partial_summary(r.get("partial"))).replace("|", "/")
    # (daemonic ones only: a daemon is its owner's to end; megatron's results-queue server is meant to live on)
    daemons = [h for h in r.get("helpers_left", []) if h.get("daemon", True)]
    parts = [f"{len(daemons)} helper process(es) left running"] if daemons else []
    if r.get("exit"):
        parts.append(r["exit"])
    if r.get("failed_checks"):
        parts.append("FAILED: " + ", ".join(r["failed_checks"]))
    if name == "environment":
        parts.append(f"{r.get('gpu', 'cpu')}, driver {r.get('driver')}, torch {r['torch']} (CUDA {r['torch_cuda']}), "
                     f"NCCL {r.get('nccl')}; matmul {_tflops(r['measured_matmul_tflops'])} TFLOP/s; {r['peak']}")
    elif name == "flash_attention":
        parts.append(", ".join(f"{k}: {v}" for k, v in r["kinds"].items()))
    elif name == "train_resume":
        parts.append(", ".join(f"ZeRO-{z}: resume diff {r[f'zero{z}']['max_abs_diff']:.1e}, "
                               f"{(r[f'zero{z}']['mem_gb'] or 0):.2f} GiB" for z in (0, 1, 3)))
    elif name == "recompute":
        parts.append(", ".join(f"{m}: loss diff {r[m]['max_abs_loss_diff']:.1e}" for m in ("selective", "full")))
    elif name.startswith("mfu_"):
        best = r["by_micro_batch"][str(r["best_micro_batch"])]  # (JSON keys are strings)
        mfu = "n/a (no peak for this GPU: set train.peak_tflops)" if r["best_mfu"] is None else f"{r['best_mfu']:.1%}"
        parts.append(f"MFU {mfu} ({r['best_tflops']:.0f} TFLOP/s"
                     + (f", {best['vs_measured_matmul']:.0%} of the measured matmul"
                        if "vs_measured_matmul" in best else "")
                     + f") at micro-batch {r['best_micro_batch']}"
                     + (f" x {r['accumulation']}" if "accumulation" in r else "")
                     + (f" (too large for memory: {', '.join(map(str, r['too_large_for_memory']))})"
                        if r.get("too_large_for_memory") else "")
                     + f", build {r['build_s']:.0f} s"
                     + (f", optimizer {r['optimizer_step']['optimizer_s']:.3f} s/step" if "optimizer_step" in r else "")
                     + (_kernel_summary(r["device_profile_one_step"]) if r.get("device_profile_one_step") else "")
                     + (f"; planner fit: hfu {r['planner_fit']['hfu']:.2f}, "
                        f"{r['planner_fit']['overhead_ms_per_layer']:.1f} "
                        "ms per layer and micro-batch" if r.get("planner_fit") else "")
                     + (f"; full recomputation {r['full_recompute']['vs_none']:.2f}x the step"
                        + (" of the compiled layers" if r["full_recompute"].get("layers_compiled") else "")
                        + f" (planner {r['full_recompute']['planner_vs_none']:.2f}x)"
                        if r.get("full_recompute") else "")
                     + _compiled_summary(r.get("compiled")))
    elif name == "sampling":
        m = r["measured"]
        rates = [f"{mode} {m[mode]['image_tokens_per_s']:.0f} tok/s"
                 + (f" ({m[mode]['of_bound']:.0%} of bound)" if "of_bound" in m[mode] else "")
                 for mode in ("full_recomputation", "kv_cache", "cuda_graph")
                 if "image_tokens_per_s" in m.get(mode, {})]
        wide = [m[k] for k in m if k.startswith("cuda_graph_batch_") and "image_tokens_per_s" in m[k]]
        parts.append(f"{r['preset']} {m['dtype']} batch {m['batch']} (+guidance): " + ", ".join(rates)
                     + (f"; batch {wide[0]['batch']}: cuda_graph " + ", ".join(
                         f"{w['image_tokens_per_s']:.0f} tok/s ({w.get('of_bound', 0):.0%} of its bound"
                         + (", a generator per image)" if k else ")") for k, w in enumerate(wide))
                        + f", auto batch {r['auto_batch_size']}" if wide else ""))
    elif name == "decode_compiled":
        parts.append(f"greedy gap {r['greedy']['gap_fp32']:.1e} ({r['greedy']['preset']}, first call "
                     f"{r['greedy']['first_call_s']:.0f} s)"
                     + (f"; parti-350m CUDA graphs: compiled step {r['compiled_over_eager']:.2f}x the eager step's "
                        "tok/s" if "compiled_over_eager" in r else ""))
    elif name == "vq":
        parts.append(f"resume diff {r['max_abs_diff']:.1e}, "
                     f"autocast code agreement {r['autocast_code_agreement']:.3f}, "
                     f"pretokenize {r['pretokenize_images_per_s']:.0f} img/s "
                     f"vs encode {r['encode_only_images_per_s']:.0f}")
    elif name == "compile_speedup":
        parts.append(f"compiled layers {r['speedup']['dropout_0.1']:.2f}x eager (dropout 0.1), compiled dropout masks "
                     f"{r['compiled_mask_speedup']:.2f}x eager masks; dropout's cost: "
                     + ", ".join(f"{k} +{v:.0%}" for k, v in r["dropout_cost"].items()))
    elif name == "async_save":
        parts.append(f"step during an async save / without: {r['steps']['ratio']:.2f}; beside an idle fork / without: "
                     f"{r['steps']['idle_fork_ratio']:.2f}")
    elif name == "multi_gpu":
        parts.append(", ".join(f"{k}: {v}" for k, v in r["checks"].items()))
    return "; ".join(parts).replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU, tests)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the .json and .md")
    parser.add_argument("--only", help="comma-separated section names")
    parser.add_argument("--budget-s", type=float, help="the run's length: a section starts only if its time limit "
                        f"fits in what is left (default {GPU_BUDGET_S} on a GPU, none on CPU)")
    parser.add_argument("--section", help=argparse.SUPPRESS)      # child process: run this one section
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        run_section(args.section, args.device, args.quick, Path(args.scratch), Path(args.result_file), args.deadline)
        return 0

    from bench.gpu_sections import SECTIONS

    env = {**os.environ, "DS_ACCELERATOR": "cuda" if args.device == "cuda" else "cpu", "PYTHONUNBUFFERED": "1",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}  # as slurm/train.sbatch sets it (megatron's TP overlap)
    gpus = 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from model_parallel.state import driver_version, no_gpu_reason

            sys.exit(f"--device cuda: {no_gpu_reason(driver_version())}")
        gpus = torch.cuda.device_count()
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    wanted = args.only.split(",") if args.only else [n for n, _, _ in SECTIONS]
    unknown = set(wanted) - {n for n, _, _ in SECTIONS}
    if unknown:
        sys.exit(f"--only: unknown sections {', '.join(sorted(unknown))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    slug = device_slug(args.device)
    stem = out / f"gpu_{slug}_{date}"
    report = {"device_name": slug, "date": date,
              "command": " ".join(["python bench/gpu_check.py", *(argv or sys.argv[1:])]),
              "quick": args.quick, "sections": {}, "seconds": 0.0}
    budget = args.budget_s if args.budget_s is not None else GPU_BUDGET_S if args.device == "cuda" else float("inf")
    start = STARTED  # (this process's imports and the GPU's start count against the budget too)
    needs_of = {name: needs for name, _, needs in SECTIONS}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        for name in wanted:  # (--only's order: what matters most first)
            needs = needs_of[name]
            left = budget - (time.perf_counter() - start)
            if needs > gpus:
                result = {"status": "skipped", "reason": f"needs {needs} GPU{'s' if needs > 1 else ''}; "
                                                         f"{gpus} visible" if args.device == "cuda" else "needs a GPU"}
            elif time_limit(name, args.device) > left:  # (a later, shorter section may still fit)
                result = {"status": "skipped", "reason": f"out of time: its limit of {time_limit(name, args.device)} s "
                                                         f"> the {max(left, 0):.0f} s left of --budget-s {budget:g}"}
            else:
                try:
                    result = _run_child(name, args, Path(scratch), out / "running", env)
                except Exception as e:  # (the run goes on with the next section)
                    result = {"status": "error", "error": f"gpu_check could not run it: {type(e).__name__}: {e}"}
            report["sections"][name] = result
            report["seconds"] = time.perf_counter() - start
            write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=1, default=str), sync=False)
            write_atomic(stem.with_suffix(".md"), summary_markdown(report), sync=False)
            for leftover in (out / "running").glob(f"{name}.*"):  # (in the report now)
                leftover.unlink()
            print(f"[gpu_check] {name}: {result['status']} ({result.get('seconds', 0):.0f} s) "
                  f"{_key_results(name, result)}", flush=True)
    print(f"[gpu_check] wrote {stem}.json and {stem}.md")
    return 1 if any(r["status"] in ("fail", "error") for r in report["sections"].values()) else 0


def time_limit(name: str, device: str) -> int:
    return TIME_LIMITS[name] * (3 if device == "cpu" else 1)


def _run_child(name: str, args, scratch: Path, running: Path, env: dict) -> dict:
    """Run one section in a process of its own. Its result and what it records as it goes are written to
    `running` (under --out: a run stopped from outside still brings them back), its files to `scratch`."""
    folder = scratch / name
    folder.mkdir()
    running.mkdir(exist_ok=True)
    result_file = running / f"{name}.json"
    for stale in (result_file, partial_file(result_file)):  # (an earlier run's into this --out, stopped from
        stale.unlink(missing_ok=True)  # outside: not this section's result, nor what it recorded)
    limit = time_limit(name, args.device)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--device", args.device,
           "--result-file", str(result_file), "--scratch", str(folder), "--deadline", str(time.time() + limit)]
    start = time.perf_counter()
    returncode, stderr = run_with_limit(cmd + (["--quick"] if args.quick else []), limit, env, done=result_file)
    finished = _read_json(result_file)
    if returncode is None and finished and time.perf_counter() - start < limit:  # stopped EXIT_GRACE_S after it
        # wrote its result, not at its limit: the result stands, the rest of its limit is left to the next sections
        finished.update(exit=f"its process had not exited {EXIT_GRACE_S:g} s after writing its result: stopped",
                        stderr_tail=stderr[-3000:])
        returncode = -signal.SIGKILL
    if returncode is None:
        return {"status": "error", "error": f"timed out after {limit} s" + (", after its work, at its exit" if finished
                                                                            else ""),
                "stderr_tail": stderr[-8000:], "partial": _partial(result_file), "finished_result": finished,
                "seconds": time.perf_counter() - start}
    if finished:
        if finished["status"] == "error":
            finished.update(stderr_tail=stderr[-3000:], partial=_partial(result_file))
        return finished
    return {"status": "error", "error": f"the section's process exited with {returncode} and no result",
            "stderr_tail": stderr[-3000:], "partial": _partial(result_file), "seconds": time.perf_counter() - start}


EXIT_GRACE_S = 20.0
"""Seconds a section's process gets to exit once its result file is there, before it is stopped (a process that
hung at its exit, as the VQ section's did on the H200, kept the run waiting for the rest of its limit)."""


def run_with_limit(cmd: list[str], limit: float, env: dict | None = None,
                   done: Path | None = None) -> tuple[int | None, str]:
    """Run `cmd` for at most `limit` seconds: (its exit status, None if stopped; its stderr). It runs
    in a session of its own, and whatever it started is stopped with it, also when it ended by itself (torchrun's
    workers, checkpoint writers), so that nothing is left holding the GPU for the next section. Its stderr goes
    to a file, not a pipe: what it left running (torchrun's workers are in sessions of their own, out of reach of
    its group) would hold a pipe open, and the wait for its end with it. `done`: a file whose appearance means the
    command's work is over: from then on it gets EXIT_GRACE_S more to exit (within `limit`)."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + limit
        returncode = None
        while returncode is None and time.monotonic() < deadline:
            if done is not None and done.exists():
                deadline = min(deadline, time.monotonic() + EXIT_GRACE_S)
                done = None
            try:
                returncode = proc.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        stderr.seek(0)
        return returncode, stderr.read()


def _read_json(path: Path) -> dict | None:
    """A JSON file a section wrote, or None when it is not there or cut short (its process stopped mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _partial(result_file: Path) -> dict:
    """What a section recorded before it failed or ran out of time (Context.record)."""
    return _read_json(partial_file(result_file)) or {}


if __name__ == "__main__":
    sys.exit(main())
