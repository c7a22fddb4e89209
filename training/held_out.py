r"""The held-out loss of a run's checkpoints, without training (Megatron-LM's --skip-train): each checkpoint's
weights read at this launch's layout, the loss on data.valid_shards' sets measured as the trainer measures it every
train.eval_interval steps (train.eval_batches global batches, the same samples every time), one row per checkpoint:
a run's loss on a held-out set it was not measured on, or on more samples, after the fact.

    torchrun --nproc_per_node 2 -m training.held_out --run-dir runs/x --checkpoints all \
        --set parallel.tp=2 data.valid_shards=coco=data/coco_val,laion=data/laion_val train.eval_batches=16

The config is the run's config.yaml (--config names another), then --set: the layout, held-out data, batch sizes,
precision and kernels may be other than the run's; the network must be each checkpoint's, and the held-out data
made with the tokenizers its training data was, which the checkpoints record (refused naming the keys or the file
otherwise; the training data itself is not read); a training start's train.init_from, model.init_text_encoder and
model.freeze_text_encoder are not read.
--checkpoints, comma-separated: latest (default: the one `latest` names, else the newest complete), all (every
complete one, in step order), new (those without a row in the file for this held-out data yet: a job that measures
the checkpoints as a run saves them, or one requeued; a checkpoint saved again, by a run resumed from an earlier one,
is new again: rows record its save_id), tags (step_00001000,step_00002000), or export folders
(training.export's: e.g. the average of the last checkpoints, --average N, against the last one alone; one whose
path holds a comma given alone). Rows go to RUN_DIR/held_out.jsonl (--out: another file), appended, and to the
output: {"checkpoint", "step", "consumed_samples", "save_id" (an export's: "export", its absolute path, "checkpoint",
"averaged"), "valid_loss" (the sets' mean), "valid_loss_<name>" for each named set, "valid_shards", "eval_samples",
"layout", and "weights": "ema" for --ema's and an export of the average}, and OUT.png draws the checkpoints' rows of
the file against their steps.
--ema: the moving average of the weights each checkpoint holds (train.ema_decay) is measured instead of the weights
(a line of its own in OUT.png; --checkpoints new counts the rows of each apart). Nothing else is written and no
lock is taken: a run still training may be measured (a checkpoint it prunes meanwhile is an error naming it).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from common.checkpoints import RunDirError
from common.cli import command, config_parser
from common.config import ConfigError
from common.files import json_rows
from training.config import Config, load_config

OUT_FILE = "held_out.jsonl"
"""The run directory's file of rows (checkpoint.RUN_FILES: --resume overwrite moves it aside with the run)."""


def measuring(cfg: Config) -> Config:
    """`cfg` without what only a training run's start reads (train.init_from, model.init_text_encoder and
    model.freeze_text_encoder): every weight is a checkpoint's here, so the config rules about them (ZeRO-3
    refused with model.init_text_encoder, ...) would refuse layouts the measurement can take. Nor its ramp of the
    training batch (train.rampup_batch_size: a measurement is eval_batches full global batches), whose START and
    INCREMENT must split over the micro-batches and data-parallel ranks of the run's layout, not this one's.
    (A copy.)"""
    cfg = copy.deepcopy(cfg)
    cfg.train.init_from, cfg.train.init_weights_only, cfg.train.rampup_batch_size = "", True, ""
    cfg.model.init_text_encoder, cfg.model.freeze_text_encoder = "", False
    return cfg


def append_row(out: Path, row: dict | None) -> None:
    """`row` appended to `out` as a JSON line (`out` checked writable when row is None); RunDirError naming
    --out when it cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        cut = False  # (a last line a killed job cut short: a row appended to it would be lost with it)
        if row is not None and out.is_file() and out.stat().st_size:
            with out.open("rb") as f:
                f.seek(-1, 2)
                cut = f.read(1) != b"\n"
        with out.open("a") as f:
            if row is not None:
                f.write(("\n" if cut else "") + json.dumps(row) + "\n")
    except OSError as e:
        raise RunDirError(f"--out {out}: cannot be written ({e.strerror or e})") from None


def chosen_sources(run_dir: Path, which: str, measured: set[tuple[str, str | None]] = frozenset(),
                   ema: bool = False) -> list[Path]:
    """The folders `which` names, comma-separated: latest, all, new (the complete checkpoints whose `saved_as` is
    not in `measured`), tags of run_dir's complete checkpoints, or export folders (training.export's, e.g. an
    --average of checkpoints); RunDirError naming what is missing otherwise. With `ema` (--ema), all and new are the
    complete checkpoints that hold a moving average of the weights: a run that began keeping one on a resume, or
    stopped, has checkpoints without (a checkpoint named by its tag, or latest, must hold one: checked_sources)."""
    from training import checkpoint
    from training.ema import saved_ema_decay
    from training.export import is_export

    complete, chosen, missing = checkpoint.complete_tags(run_dir), [], []
    if ema and any(item.strip() in ("all", "new") for item in which.split(",")) and not is_export(which):
        averaged = [tag for tag in complete
                    if saved_ema_decay(checkpoint.read_trainer_state(checkpoint.checkpoint_dir(run_dir) / tag))]
        if complete and not averaged:
            raise RunDirError(f"--ema: no complete checkpoint of {run_dir} holds a moving average of the weights "
                              "(its run's train.ema_decay was 0 when each was saved)")
    else:
        averaged = complete
    # (an export folder whose path holds a comma is one item; each export by its absolute path: a row's "export"
    # in RUN_DIR/held_out.jsonl names it from anywhere)
    for item in [which] if is_export(which) else (item.strip() for item in which.split(",")):
        if item in ("latest", "all", "new") and not complete:
            raise RunDirError(f"{run_dir}: holds no complete checkpoint (expected those of python -m training.train "
                              "in its checkpoints/)")
        if is_export(item):
            chosen.append(Path(item).resolve())
        elif item == "latest":
            chosen.append(checkpoint.checkpoint_dir(run_dir) / checkpoint.resume_tag(run_dir)[0])
        elif item == "new":
            folders = [checkpoint.checkpoint_dir(run_dir) / tag for tag in averaged]
            chosen += [path for path in folders if saved_as(path, checkpoint.read_trainer_state(path)) not in measured]
        elif item in complete or item == "all":
            chosen += [checkpoint.checkpoint_dir(run_dir) / tag for tag in (averaged if item == "all" else [item])]
        else:
            missing.append(item)
    if missing:
        raise RunDirError(f"--checkpoints {which}: {', '.join(missing)} is neither a complete checkpoint of {run_dir} "
                          f"(it has {', '.join(complete) or 'none'}) nor an export folder (training.export's)")
    return list(dict.fromkeys(chosen))  # (each once: new,latest or all,latest name the newest twice)


def checked_sources(cfg: Config, paths: list[Path], ema: bool = False) -> list[tuple[Path, dict]]:
    """(folder, trainer state) of each checkpoint or export, once its network is checked against the config's,
    its files verified (training.resume_plan's checks of a train.init_from source), and its data tokenizers found
    those of the first (the held-out data must have been made with them); with `ema`, each a checkpoint that holds
    a moving average of the weights."""
    from data_pipeline.code_shards import other_tokenizers
    from training import checkpoint
    from training.ema import saved_ema_decay
    from training.export import is_export
    from training.resume_plan import check_weights_source, export_state

    sources = []
    for path in paths:
        if ema and is_export(path):
            raise ConfigError(f"--ema: {path} is an export, which holds one set of weights (export a checkpoint's "
                              "average with training.export --ema and measure that export without --ema)")
        if is_export(path):
            state = export_state(path, key="--checkpoints")
        else:
            state = checkpoint.read_trainer_state(path)
            checkpoint.verify(path)
        if isinstance(state.get("config"), dict):  # (saved before checkpoints held their config: not checked)
            check_weights_source(cfg, path, state, None, "export" if is_export(path) else "checkpoint",
                                 key="--checkpoints")
        (first, theirs), ours = sources[0] if sources else (path, state), state.get("data_tokenizers")
        differ = other_tokenizers(ours, theirs["data_tokenizers"]) if ours and theirs.get("data_tokenizers") else []
        if differ:
            raise ConfigError(f"--checkpoints: {path} was trained on data made with another {' and '.join(differ)} "
                              f"than {first}: one held-out set cannot be measured for both; measure them apart")
        if ema and not saved_ema_decay(state):
            raise ConfigError(f"--ema: {path} holds no moving average of the weights (its run's train.ema_decay was "
                              "0 when it was saved): name checkpoints saved with one")
        sources.append((path, state))
    return sources


def saved_as(path: Path, state: dict) -> tuple[str, str | None]:
    """Which save of a checkpoint (its folder and trainer state) a row measured: its tag and the save's id
    (trainer_state.json's save_id; None for checkpoints saved before there was one). A run resumed from an earlier
    checkpoint saves the steps of the trajectory it abandoned again, under the same tags: --checkpoints new measures
    those anew."""
    return path.name, state.get("save_id")


def source_fields(path: Path, state: dict) -> dict:
    """A row's description of what was measured: a checkpoint's tag, step, consumed samples and save id; an export's
    folder, the tag of its checkpoint, those it averages and whether it holds the moving average of the weights (no
    step: it is not the run's state at one)."""
    if "consumed_samples" in state:
        return {"checkpoint": path.name, "step": state["step"], "consumed_samples": state["consumed_samples"],
                **({"save_id": state["save_id"]} if state.get("save_id") else {})}
    return {"export": str(path), "checkpoint": state["step"], "averaged": state.get("averaged"),
            **({"weights": state["weights"]} if state.get("weights") else {})}  # (as --ema's rows say it)


def evaluate(cfg: Config, run_dir: str | Path, which: str = "latest", out: str | Path | None = None,
             ema: bool = False) -> list[dict]:
    """The rows of the checkpoints `which` names (see the module docstring), appended to `out` (default:
    RUN_DIR/held_out.jsonl) by rank 0, of their weights or (`ema`) the moving average of them each holds; in every
    rank of a process group (torchrun)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from common.metrics import held_out_row
    from data_pipeline.training_data import held_out_sets
    from model_parallel.kernels import select_kernels
    from model_parallel.state import destroy_groups, init_distributed, init_parallel, process_groups, use_device
    from training import checkpoint, engine
    from training.config import layout_of
    from training.trainer import decide_on_rank0, held_out_losses

    cfg = measuring(cfg)
    run_dir, t = Path(run_dir), cfg.train
    device = use_device(t.device, "train.device")
    init_distributed(t.dist_timeout_minutes)
    cfg.validate(world_size=dist.get_world_size())
    layout = layout_of(cfg, dist.get_world_size())
    if not (cfg.data.valid_shards or cfg.data.synthetic):
        raise ConfigError("training.held_out needs data.valid_shards: the code-shard folder(s) of the held-out "
                          "samples (e.g. --set data.valid_shards=coco=data/coco_val)")
    out = Path(out) if out else run_dir / OUT_FILE
    held_out_data = {"valid_shards": cfg.data.valid_shards or "(synthetic)",
                     "eval_samples": t.eval_batches * t.global_batch_size, "weights": "ema" if ema else None}
    held_out_data = {k: v for k, v in held_out_data.items() if v is not None}  # (rows of the weights: no "weights")

    def decide() -> list[tuple[Path, dict]]:
        same = ("valid_shards", "eval_samples", "weights")  # (what a row of this measurement has in common)
        measured = {(row["checkpoint"], row.get("save_id")) for row in json_rows(out)  # (for --checkpoints new)
                    if isinstance(row.get("step"), int)
                    and all(row.get(k) == held_out_data.get(k) for k in same)}
        checked = checked_sources(cfg, chosen_sources(run_dir, which, measured, ema), ema)
        # (--out checked writable too before anything is measured: rank 0 alone writes it, and its failure is every
        # rank's, so that none waits in the next checkpoint's collectives)
        append_row(out, None)
        return checked

    sources = decide_on_rank0(decide)
    if not sources:  # (--checkpoints new, all measured)
        if dist.get_rank() == 0:
            held = " that holds a moving average of the weights" if ema else ""
            print(f"nothing new to measure: every complete checkpoint of {run_dir}{held} has a row in {out} for this "
                  "held-out data" + (" and --ema" if ema else ""))
        return []
    # The held-out data must have been made with the tokenizers the weights were trained on (which the checkpoints
    # record: the training data itself need not be there); checked_sources has found them alike.
    held_out = held_out_sets(cfg.data, cfg.model, t.seed, held_out_data["eval_samples"],
                             sources[0][1].get("data_tokenizers"))
    init_parallel(layout.tp, layout.pp, t.dist_timeout_minutes)
    groups, rank0, rows = process_groups(), dist.get_rank() == 0, []
    try:
        kernels = select_kernels(cfg.kernels)
        model = engine.build_model(cfg, kernels, device, layout, initialize=False)  # (every weight is loaded)
        train_engine, _ = engine.build_engine(model, cfg, kernels, layout)
        role = engine.sample_role()
        for path, state in tqdm(sources, desc="held-out loss", unit="checkpoint", disable=not rank0):
            checkpoint.load_weights(train_engine, cfg, path, key="--checkpoints", weights="ema" if ema else "model")
            losses = held_out_losses(train_engine, cfg, held_out, role, ps.get_data_parallel_rank(), layout.dp,
                                     device)
            rows.append({**source_fields(path, state), **held_out_row(losses), **held_out_data,
                         "layout": layout.describe()})
            # (a row per checkpoint as it is measured: a killed job keeps those done)
            decide_on_rank0(lambda: append_row(out, rows[-1]))
            if rank0:
                tqdm.write(json.dumps(rows[-1]))
    finally:
        destroy_groups(process_groups() - groups)
    if rank0:
        plot(out)
    return rows


def held_out_series(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{label: {step: loss}} of the checkpoint rows (exports have no step), a series per held-out set
    (valid_loss_<name>, or valid_loss of an unnamed one), number of samples (a row of other eval_samples measured
    other samples) and kind of weights (--ema's apart); a step measured again: its newest row."""
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        if isinstance(row.get("step"), int) and "valid_loss" in row:
            named = {k[len("valid_loss_"):]: v for k, v in row.items() if k.startswith("valid_loss_")}
            for name, loss in (named or {"": row["valid_loss"]}).items():
                label = (f"{row['valid_shards']}" + (f" [{name}]" if name else "") + f", {row.get('eval_samples')} "
                         "samples" + (" (ema)" if row.get("weights") else ""))
                series.setdefault(label, {})[row["step"]] = loss
    return series


def plot(out: Path) -> Path | None:
    """OUT.png: the held-out losses of every checkpoint row in `out` against its step, a line per series
    (held_out_series); None (nothing drawn) when no series has two steps yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {label: points for label, points in held_out_series(json_rows(out)).items() if len(points) > 1}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], "o-", label=label)
    ax.set(xlabel="step", ylabel="held-out loss", title=f"{out.name}: held-out loss of the checkpoints")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return out.with_suffix(".png")


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__, where="the run directory's config.yaml",
                           example="parallel.tp=2 data.valid_shards=data/coco_val train.eval_batches=16")
    parser.add_argument("--run-dir", required=True, help="the run whose checkpoints are measured")
    parser.add_argument("--checkpoints", default="latest",
                        help="latest (default) | all | new (not measured yet on this held-out data) | tags, e.g. "
                             "step_00001000,step_00002000 | export folders (comma-separated)")
    parser.add_argument("--out", help=f"the file rows are appended to (default: RUN_DIR/{OUT_FILE})")
    parser.add_argument("--ema", action="store_true",
                        help="measure the moving average of the weights each checkpoint holds (train.ema_decay)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # (deepspeed's launcher)
    args = parser.parse_args(argv)
    with command():
        config = Path(args.config or Path(args.run_dir) / "config.yaml")
        if not config.is_file():
            raise ConfigError(f"{config}: no such file; expected the run's config.yaml (or name one with --config)")
        cfg = measuring(load_config(config, args.set)).validate()
    from model_parallel.state import DeviceError

    with command(errors=(RunDirError, DeviceError), label="training.held_out"):  # RunDirError includes CheckpointError
        evaluate(cfg, args.run_dir, args.checkpoints, args.out, args.ema)


if __name__ == "__main__":
    main()
