r"""Scaling experiments: submit a sweep of SLURM training jobs, then collect their metrics into a table and plots.

    python -m slurm.sweep submit --out sweeps/s1 --config configs/train/parti-350m.yaml \
        --models parti-350m,parti-750m --nodes 1,2,4 --layouts tp1pp1z1,tp2pp1z1,tp2pp2z1 [--steps 200] [--dry-run] \
        [--gpus-per-node 8] [--sbatch-args="--partition=gpu --time=2:00:00"] \
        --set data.shards=codes/ train.warmup_steps=20
    python -m slurm.sweep collect sweeps/s1          # -> results.csv, results.md, *.png
    python -m slurm.sweep cooldowns --out sweeps/c1 --from runs/stable --at 10000,20000,40000 [--fraction 0.2] \
        [--decay minus_sqrt] [--nodes 2] [--gpus-per-node 8] [--set ...] [--dry-run]
    python -m slurm.sweep collect sweeps/c1          # each cool-down's final (held-out) loss against its compute

Each combination model x nodes x layout (tpTppPzZ) is one `sbatch -N nodes slurm/train.sbatch` run in
`OUT/<model>-n<nodes>-<layout>/` that asks for `--gpus-per-node` GPUs per node (0 on CPU nodes, which run
NPROC_PER_NODE processes each, default 1; train.sbatch then needs DEVICE=cpu or auto, and the sweep refuses
without); `--sbatch-args` adds further sbatch options. A combination the trainer would refuse on its process
count (training.config's checks: TP x PP, heads over TP, the global batch over micro-batch x DP) is skipped with
the reason before anything is queued; runs shorter than the warm-up are warned of; an --out whose run folders
hold runs is refused (their jobs would resume them), and so is one whose `jobs.json` records submitted jobs
(they may still be queued; a --dry-run too: its jobs.json would erase that record). A value repeated in a list
counts once. `jobs.json` records each job as it is submitted; when sbatch refuses one, the sweep
stops with sbatch's reason. `collect` reads every run folder with a metrics.jsonl (submitted by this command or
not): median throughput after the first `--warmup` logged steps, TFLOP/s and MFU per GPU, peak memory, final
loss (and held-out loss, where the runs measured one: train.eval_interval; `held_out_loss`: the last checkpoint's
as training.held_out measured it after the run, its newest row in the run's held_out.jsonl) and the compute spent,
and draws throughput per GPU and MFU against nodes, memory per GPU, and loss against compute (held-out loss
dashed).

`cooldowns` is the scaling experiment of a warmup-stable-decay schedule (train.lr_stable_steps): one run trained
at its peak rate (`--from`, its branch points kept: train.keep_checkpoints_every), and from its checkpoint at each
step S of `--at` a branch (train.init_weights_only=false, the run's own config.yaml) that trains fraction x S
steps more while the rate decays to min_lr in `--decay`'s shape: one model's loss at several compute budgets for
the price of one run and the cool-downs. Each is one job in OUT/cooldown-<S>/, submitted as `submit`'s are.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import statistics
import subprocess
from pathlib import Path

import yaml

from common.cli import command, description
from common.config import ConfigError
from common.files import json_rows, write_atomic
from model_parallel.config import saved_model_config
from training.config import load_config
from training.flops import train_flops_per_sample

LAYOUT = re.compile(r"tp(\d+)pp(\d+)z(\d)$")


def sbatch_job(run_dir: Path, nodes: int, gpus_per_node: int, sbatch_args, config: str, sets: list[str]) -> dict:
    """One run's record in jobs.json: its folder, nodes and the sbatch command of slurm/train.sbatch."""
    return {"name": run_dir.name, "run_dir": str(run_dir), "nodes": nodes,
            "command": ["sbatch", "--parsable", "-N", str(nodes), f"--gpus-per-node={gpus_per_node}", *sbatch_args,
                        f"--job-name={run_dir.name}", f"--output={run_dir.parent}/{run_dir.name}.out",
                        "slurm/train.sbatch", config, str(run_dir), "--set", *sets]}


def submissions(models: list[str], nodes: list[int], layouts: list[str], config: str, out: Path, steps: int,
                extra: list[str], gpus_per_node: int, sbatch_args: list[str] = ()) -> list[dict]:
    """The sbatch command of every combination whose config the trainer would accept on its process count
    (gpus_per_node GPUs per node; 0: CPU nodes running NPROC_PER_NODE processes each, default 1): the others
    are skipped with the trainer's reason (TP x PP not dividing the processes, heads not splitting over TP,
    a global batch smaller than micro-batch x DP ...) instead of failing in the queue."""
    if gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node {gpus_per_node}: expected GPUs per node >= 0 (0: CPU nodes)")
    procs = gpus_per_node or nproc_per_node(1)
    if procs < 1:  # (0 processes: every combination's DP would be a division by zero)
        raise ValueError(f"NPROC_PER_NODE={procs}: expected processes per CPU node >= 1 (--gpus-per-node 0)")
    jobs = []
    for model in dict.fromkeys(models):  # (a value given twice would queue two jobs into one run folder)
        # (a mistake in the config or the overrides is refused here, not reported as every combination skipped)
        cfg = load_config(config, [f"model.preset={model}", f"train.steps={steps}", *extra]).validate()
        if cfg.train.warmup_steps >= cfg.train.steps:
            print(f"warning: {model}: train.warmup_steps={cfg.train.warmup_steps} >= train.steps={cfg.train.steps}: "
                  f"its runs never reach the peak learning rate; add e.g. --set train.warmup_steps="
                  f"{max(1, cfg.train.steps // 10)}")
        for n in dict.fromkeys(nodes):
            for layout in dict.fromkeys(layouts):
                match = LAYOUT.match(layout)
                if not match:
                    raise ValueError(f"layout {layout!r}: expected tpNppNzN, e.g. tp2pp1z1")
                tp, pp, zero = match.groups()
                run_dir = out / f"{model}-n{n}-{layout}"
                sets = [f"model.preset={model}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                        f"parallel.zero_stage={zero}", f"train.steps={steps}", *extra]
                try:
                    load_config(config, sets).validate(world_size=n * procs)
                except ConfigError as e:
                    print(f"skipped {run_dir.name} ({n * procs} processes): {e}")
                    continue
                jobs.append(sbatch_job(run_dir, n, gpus_per_node, sbatch_args, config, sets))
    return jobs


def cooldown_jobs(source: Path, at: list[int], fraction: float, decay: str, out: Path, extra: list[str],
                  nodes: int, gpus_per_node: int, sbatch_args: list[str] = ()) -> list[dict]:
    """The sbatch command of each cool-down branch of run directory `source` (module docstring): from its complete
    checkpoint at each step S of `at`, round(fraction x S) steps more (at least one), the decay starting at S and
    ending at the last step. ValueError naming the flag (a step without a complete checkpoint, or inside the warm-up;
    a constant or unknown decay) or ConfigError (the run's config with `extra` refused on nodes x processes)."""
    from common.schedule import DECAYS
    from training.checkpoint import STATE_FILE, complete_tags, tag_for

    config = source / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: not found; --from takes the run directory of python -m training.train")
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: expected each cool-down's steps as a fraction of the step it "
                         "branches at, in (0, 1] (0.1-0.2 is usual)")
    if decay not in DECAYS or decay == "constant":
        raise ValueError(f"--decay {decay!r}: expected one of {', '.join(d for d in DECAYS if d != 'constant')}")
    warmup, complete = load_config(str(config), extra).train.warmup_steps, complete_tags(source)
    procs, jobs = gpus_per_node or nproc_per_node(1), []
    for step in dict.fromkeys(at):
        if tag_for(step) not in complete:
            raise ValueError(f"--at {step}: {source / 'checkpoints'} holds no complete checkpoint of step {step} "
                             f"({STATE_FILE}; complete: {', '.join(complete) or 'none'}); save the run there "
                             "(train.save_interval) and keep them (train.keep_checkpoints_every)")
        if step < warmup:
            raise ValueError(f"--at {step}: inside the run's warm-up (train.warmup_steps={warmup}): a cool-down "
                             "starts from the peak rate")
        length = max(1, round(fraction * step))
        sets = [f"train.init_from={(source / 'checkpoints' / tag_for(step)).resolve()}",
                "train.init_weights_only=false", f"train.steps={step + length}",
                f"train.lr_stable_steps={step - warmup}", f"train.lr_decay={decay}", f"train.lr_decay_steps={length}",
                *extra]
        load_config(str(config), sets).validate(world_size=nodes * procs)
        jobs.append(sbatch_job(out / f"cooldown-{step}", nodes, gpus_per_node, sbatch_args, str(config), sets))
    return jobs


def nproc_per_node(default: int) -> int:
    """NPROC_PER_NODE from the environment (unset or empty: `default`, as train.sbatch reads it); a ValueError
    naming the variable when it is not a whole number."""
    text = os.environ.get("NPROC_PER_NODE", "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"NPROC_PER_NODE={text!r}: expected a whole number of processes per node") from None


def submit(args) -> None:
    """`submit` and `cooldowns`: their jobs checked, queued and recorded in OUT/jobs.json (`queue`)."""
    _check_gpus_per_node(args)
    if args.action == "cooldowns":
        if args.nodes < 1:
            raise ValueError(f"--nodes {args.nodes}: expected a node count >= 1")
        at = [int(s) if s.strip().isdigit() and int(s) > 0 else 0 for s in args.at.split(",")]
        if 0 in at:
            raise ValueError(f"--at {args.at}: expected steps >= 1 of the run's checkpoints, comma-separated")
        jobs = cooldown_jobs(Path(args.source), at, args.fraction, args.decay, Path(args.out), args.set, args.nodes,
                             args.gpus_per_node, shlex.split(args.sbatch_args))
    else:
        jobs = _grid(args)
    queue(jobs, Path(args.out), args.dry_run)


def _check_gpus_per_node(args) -> None:
    """--gpus-per-node read (default: NPROC_PER_NODE, else 8) and checked against the environment the jobs get."""
    if args.gpus_per_node is None:  # (read here, not as the flag's default: `collect` does not depend on it)
        args.gpus_per_node = nproc_per_node(8)
    elif args.gpus_per_node and nproc_per_node(args.gpus_per_node) != args.gpus_per_node:
        # (sbatch passes the environment on, and train.sbatch starts NPROC_PER_NODE trainers per node when it is
        # set: the jobs would run at another process count than the one each combination was checked at)
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} but NPROC_PER_NODE={nproc_per_node(0)} in the "
                         "environment, which the jobs would start per node instead: unset it or make them equal")
    if args.gpus_per_node == 0 and os.environ.get("DEVICE", "cuda") == "cuda":
        raise SystemExit("sweep: --gpus-per-node 0 runs on CPU nodes: set DEVICE=cpu (or auto) in the environment "
                         "(train.sbatch's default, cuda, would fail every job at its start)")


def _grid(args) -> list[dict]:
    nodes = [int(n) if n.strip().isdigit() and int(n) > 0 else 0 for n in args.nodes.split(",")]
    if 0 in nodes:
        raise ValueError(f"--nodes {args.nodes}: expected node counts >= 1, comma-separated (e.g. 1,2,4)")
    models = [m.strip() for m in args.models.split(",")]
    if "" in models:  # (an empty name would queue the config's model without its preset, in a folder "-n1-...")
        raise ValueError(f"--models {args.models}: expected preset names, comma-separated (e.g. parti-350m,parti-3b)")
    return submissions(models, nodes, args.layouts.split(","), args.config, Path(args.out), args.steps, args.set,
                       args.gpus_per_node, shlex.split(args.sbatch_args))


def queue(jobs: list[dict], out: Path, dry_run: bool) -> None:
    """sbatch each job (`dry_run`: print its command), recording them in out/jobs.json as they are queued; refused
    when there are none, when a run folder already holds a run, or when jobs.json records submitted jobs."""
    if not jobs:
        raise SystemExit("sweep: no combination fits (see the reasons above); nothing submitted")
    used = [job["run_dir"] for job in jobs if Path(job["run_dir"]).is_dir() and any(Path(job["run_dir"]).iterdir())]
    if used:  # (its jobs would resume those runs, or find them finished, instead of measuring afresh)
        raise SystemExit(f"sweep: {', '.join(used[:3])}{' ...' if len(used) > 3 else ''} already hold(s) a run: "
                         f"submit the sweep into a new --out (resubmit one run with its command in {out}/jobs.json)")
    record = out / "jobs.json"
    if submitted_before(record):  # (their run folders appear only once they start; a dry run would erase the record)
        raise SystemExit(f"sweep: {record} records jobs submitted before, which may still be queued: submit the "
                         "sweep into a new --out")
    out.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        if dry_run:
            print(" ".join(job["command"]))
            continue
        try:
            job["job_id"] = subprocess.run(job["command"], check=True, capture_output=True, text=True).stdout.strip()
        except subprocess.CalledProcessError as e:
            queued = sum("job_id" in j for j in jobs)
            raise SystemExit(f"sweep: sbatch refused {job['name']} ({' '.join((e.stderr or '').split()) or e}); the "
                             f"{queued} job(s) queued before it are recorded in {record}: submit the others with their "
                             "commands there") from None
        finally:
            write_atomic(record, json.dumps(jobs, indent=1), sync=False)  # after each job: what is queued is known
        print(f"{job['name']}: job {job['job_id']}")
    if dry_run:
        write_atomic(record, json.dumps(jobs, indent=1), sync=False)


def submitted_before(record: Path) -> bool:
    """Whether a sweep's jobs.json records a submitted job (a dry run's records none); a damaged one counts."""
    try:
        return any("job_id" in job for job in json.loads(record.read_text()))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, TypeError):
        return True


def summarize(run_dir: Path, warmup: int) -> dict | None:
    metrics_path, config_path = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not (metrics_path.is_file() and config_path.is_file()):
        return None
    lines = [m for m in json_rows(metrics_path) if "step" in m]
    trained = [m for m in lines if "loss" in m]  # (a run whose last step was read past, train.skip_steps, ends in a
    # row of its final held-out losses alone)
    if not trained:  # (a killed job's last line may be cut short: left out)
        return None
    cfg = yaml.safe_load(config_path.read_text())
    steady = trained[warmup:] or trained
    median = lambda key: statistics.median(m[key] for m in steady if m.get(key) is not None) \
        if any(m.get(key) is not None for m in steady) else None
    world = trained[-1].get("world_size", 1)
    p = cfg["parallel"]
    gbs = cfg["train"]["global_batch_size"]
    flops = train_flops_per_sample(saved_model_config(cfg["model"]))
    # (training FLOPs up to a row: its consumed samples, which a resume with another global batch keeps right; rows
    # logged before they were recorded: step x this run's global batch)
    compute = lambda m: m.get("consumed_samples", m["step"] * gbs) * flops  # noqa: E731
    held_out = [(compute(m), m["valid_loss"]) for m in lines if m.get("valid_loss") is not None]
    measured = run_dir / "held_out.jsonl"  # (training.held_out's rows: the final checkpoint's newest one)
    later = [r for r in json_rows(measured) if isinstance(r.get("step"), int) and r["step"] >= lines[-1]["step"]
             and "valid_loss" in r and r.get("weights") is None]  # (at or past the last row; the weights', not
    # --ema's, which are the moving average's)
    later = [r for r in later if r["step"] == max(r["step"] for r in later)]
    return {"run": run_dir.name, "model": cfg["model"].get("preset") or "custom", "gpus": world,
            "tp": p["tp"], "pp": p["pp"], "dp": world // (p["tp"] * p["pp"]), "zero": p["zero_stage"],
            "samples_per_s": median("samples_per_s"),
            "samples_per_s_per_gpu": (median("samples_per_s") or 0) / world,
            "tflops_per_gpu": median("tflops_per_gpu"), "mfu": median("mfu"),
            "mem_gb": max(m.get("mem_gb") or 0 for m in lines), "steps": lines[-1]["step"],
            "final_loss": trained[-1]["loss"], "final_valid_loss": held_out[-1][1] if held_out else None,
            # (train.ema_decay: the moving average's, at the last measurement: none when that segment kept none)
            "final_ema_valid_loss": next((m.get("ema_valid_loss") for m in reversed(lines)
                                          if m.get("valid_loss") is not None), None),
            "held_out_loss": later[-1]["valid_loss"] if later else None,
            "curve": [(compute(m), m["loss"]) for m in trained], "valid_curve": held_out}


def collect(folder: Path, warmup: int = 2) -> list[dict]:
    rows = [r for d in sorted(p for p in folder.iterdir() if p.is_dir()) if (r := summarize(d, warmup))]
    if not rows:
        raise FileNotFoundError(f"{folder}: no run folder with config.yaml and metrics.jsonl")
    columns = [k for k in rows[0] if not k.endswith("curve")]
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    (folder / "results.md").write_text("\n".join(table) + "\n")
    plot(rows, folder)
    return rows


def plot(rows: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(f"{r['model']} tp{r['tp']} pp{r['pp']} z{r['zero']}", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["gpus"])
        axes[0].plot([r["gpus"] for r in rs], [r["samples_per_s_per_gpu"] for r in rs], "o-", label=label)
        if any(r["mfu"] is not None for r in rs):
            axes[1].plot([r["gpus"] for r in rs], [r["mfu"] or 0 for r in rs], "o-", label=label)
    axes[0].set(xlabel="GPUs (processes)", ylabel="samples/s per GPU", title="throughput per GPU")
    axes[1].set(xlabel="GPUs (processes)", ylabel="MFU", title="MFU (empty without a known peak, e.g. on CPU)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, len(rows) * 0.9), 4))
    ax.bar(range(len(rows)), [r["mem_gb"] for r in rows])
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="peak memory per process (GB)", title="memory per GPU")
    fig.tight_layout()
    fig.savefig(folder / "memory.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        line, = ax.plot([c for c, _ in r["curve"]], [loss for _, loss in r["curve"]], label=r["run"])
        if r["valid_curve"]:
            ax.plot([c for c, _ in r["valid_curve"]], [loss for _, loss in r["valid_curve"]], "o--",
                    color=line.get_color(), label=f"{r['run']} held-out")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="loss", title="loss against compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "loss_vs_compute.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    sub = parser.add_subparsers(dest="action", required=True)
    s = sub.add_parser("submit", help="submit the sweep's jobs")
    s.add_argument("--out", required=True)
    s.add_argument("--config", required=True)
    s.add_argument("--models", required=True, help="comma-separated presets")
    s.add_argument("--nodes", required=True, help="comma-separated node counts")
    s.add_argument("--layouts", required=True, help="comma-separated tpNppNzN")
    s.add_argument("--steps", type=int, default=200)
    d = sub.add_parser("cooldowns", help="submit a warmup-stable-decay run's cool-down branches")
    d.add_argument("--out", required=True)
    d.add_argument("--from", dest="source", required=True, help="the run directory of the run at its peak rate")
    d.add_argument("--at", required=True, help="comma-separated steps of its checkpoints to branch at")
    d.add_argument("--fraction", type=float, default=0.2, help="each cool-down's steps over its branch step")
    d.add_argument("--decay", default="minus_sqrt", help="the decay's shape (train.lr_decay)")
    d.add_argument("--nodes", type=int, default=1, help="nodes per cool-down")
    for p in (s, d):
        p.add_argument("--gpus-per-node", type=int, help="GPUs (= processes) per node, passed to sbatch (default: "
                       "NPROC_PER_NODE, else 8); 0: CPU nodes, NPROC_PER_NODE (default 1) processes each (set "
                       "DEVICE=cpu)")
        p.add_argument("--sbatch-args", default="", help='further sbatch options for every job, one string: '
                       '--sbatch-args="--partition=gpu --cpus-per-task=64"')
        p.add_argument("--set", nargs="*", default=[], help="further overrides for every run")
        p.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    c = sub.add_parser("collect", help="tabulate and plot the runs of a sweep folder")
    c.add_argument("folder")
    c.add_argument("--warmup", type=int, default=2, help="logged steps left out of the medians")
    args = parser.parse_args(argv)
    if args.action == "collect" and args.warmup < 0:  # (a negative one would keep the last -N rows only)
        parser.error(f"--warmup {args.warmup}: expected logged steps >= 0")
    with command(errors=(ValueError, FileNotFoundError), label="slurm.sweep"):  # (bad input: one line)
        if args.action in ("submit", "cooldowns"):
            submit(args)
        else:
            rows = collect(Path(args.folder), args.warmup)
            print((Path(args.folder) / "results.md").read_text())
            print(f"{len(rows)} runs; plots: throughput.png, memory.png, loss_vs_compute.png in {args.folder}")


if __name__ == "__main__":
    main()
