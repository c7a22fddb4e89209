"""How a start of `python -m training.train` goes, decided by rank 0 from the files alone before anything is
built or written: resume the run directory's own checkpoint, start at step 0, take train.init_from's weights, or
continue another run's checkpoint as a branch (train.init_weights_only=false); every refusal (another network, data
of other tokenizers, a checkpoint that fails its checks) comes here, naming the file or key.

    plan = plan_resume(cfg, run_dir, "auto", data_tokenizers(dataset))   # ResumePlan: path, step, messages, ...
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoints import CheckpointError, check_steps_left
from common.config import ConfigError
from data_pipeline.code_shards import other_tokenizers
from training import checkpoint
from training.config import RESUME_MODES, Config, change_messages, format_changes, resume_changes
from training.export import checked_export, is_export


@dataclass
class ResumePlan:
    """What a start does, decided by rank 0 before anything is built or written (`plan_resume`)."""

    run_id: str
    path: Path | None = None
    """Checkpoint folder to continue from (None: start at step 0): the run directory's own, or with
    train.init_weights_only=false train.init_from's (`branch`)."""
    branch: bool = False
    """The checkpoint is another run's, continued in this run directory as a new run (its own run id)."""
    state: dict | None = None
    """Its trainer_state.json."""
    set_aside: bool = False
    """--resume overwrite over an existing run: move that run's files aside first."""
    overwrite: bool = False
    """--resume overwrite was asked for (OVERWRITTEN_BY records the SLURM job that did it)."""
    messages: list[str] = field(default_factory=list)
    """Lines for the log once it exists (fallbacks, config changes, warnings)."""
    changes: dict = field(default_factory=dict)
    """training.config.resume_changes against the checkpoint's config."""
    init_from: Path | None = None
    """A fresh run's train.init_from checkpoint folder, checked (`init_checkpoint`)."""

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0


def plan_resume(cfg: Config, run_dir: Path, mode: str, tokenizers: dict | None = None) -> ResumePlan:
    """Decide from the run directory's files alone how this start goes (and, for a fresh run, train.init_from's
    checkpoint); raise ConfigError (a config the checkpoint cannot continue with, data made with other tokenizers
    than `tokenizers`, the training data's data_tokenizers) or RunDirError/CheckpointError (one line naming the
    file) instead."""
    plan = _plan_start(cfg, run_dir, mode, tokenizers)
    if not cfg.train.init_from or plan.path is not None:
        return plan
    if cfg.train.init_weights_only:
        plan.init_from, message = init_checkpoint(cfg, tokenizers)
        plan.messages.append(message)
    else:
        plan = _plan_branch(cfg, tokenizers, plan)
    source = plan.init_from or plan.path
    if plan.set_aside and source.resolve().is_relative_to(Path(run_dir).resolve()):
        raise ConfigError(f"train.init_from={source} lies in the run directory whose checkpoints and "
                          "export --resume overwrite moves aside (and a requeued segment would look for it there): "
                          "copy it out first, or start the new run in another --run-dir")
    return plan


def _checkpoint_folder(given: Path) -> tuple[Path | None, str | None]:
    """train.init_from's checkpoint folder (itself, or a run directory's: the checkpoint `latest` names, else its
    newest complete one) and a note on that choice; (None, None) when it is neither."""
    if (given / checkpoint.STATE_FILE).is_file():
        return given, None
    tag, note = checkpoint.resume_tag(given) if checkpoint.has_checkpoints(given) else (None, None)
    return (checkpoint.checkpoint_dir(given) / tag, note) if tag else (None, None)


def _not_a_source(given: Path) -> ConfigError:
    return ConfigError(f"train.init_from={given}: neither a checkpoint folder ({checkpoint.STATE_FILE}), an export "
                       "(config.json, model.safetensors) nor a run directory with a complete checkpoint (expected "
                       "those of python -m training.train or training.export)")


def _plan_branch(cfg: Config, tokenizers: dict | None, start: ResumePlan) -> ResumePlan:
    """train.init_weights_only=false: continue train.init_from's checkpoint (its step, optimizer state, LR schedule
    and data positions) as a new run in this run directory, its config checked as a resume checks it; `start`:
    the plan for the run directory's own files (no checkpoint)."""
    given = Path(cfg.train.init_from)
    path, note = _checkpoint_folder(given)
    if path is None and is_export(given):
        raise ConfigError(f"train.init_from={given}: an export holds the weights alone; train.init_weights_only=false "
                          "continues a checkpoint's training state (optimizer, step, data position): give the "
                          "checkpoint the export was made from, or drop train.init_weights_only=false")
    if path is None:
        raise _not_a_source(given)
    # (the run directory's note, e.g. only incomplete checkpoints of a segment killed in its first save: the branch,
    # not step 0, is what starts)
    own = [m.replace(": starting at step 0", ": the branch starts anew") for m in start.messages]
    plan = _plan_continue(cfg, path, tokenizers, own + ([note] if note else []), branch=True)
    plan.run_id, plan.branch, plan.set_aside, plan.overwrite = start.run_id, True, start.set_aside, start.overwrite
    plan.messages.append(f"a branch of run {plan.state.get('run_id') or '(unrecorded)'}: continues {path} at its "
                         f"step {plan.step} (optimizer, LR schedule and data positions) as a new run, whose "
                         "checkpoints go to this run directory")
    t = cfg.train
    if t.lr_decay != "constant" and t.warmup_steps + t.lr_stable_steps >= t.steps:  # (a cool-down that never cools)
        plan.messages.append(f"warning: the {t.lr_decay} decay starts at step {t.warmup_steps + t.lr_stable_steps} "
                             f"(train.warmup_steps + train.lr_stable_steps), not before train.steps={t.steps}: this "
                             "branch trains at the peak rate throughout")
    return plan


def init_checkpoint(cfg: Config, tokenizers: dict | None) -> tuple[Path, str]:
    """train.init_from's folder (a checkpoint's, an export's, or a run directory's: the checkpoint `latest`
    names) and the log line saying so, once its files, network and data tokenizers are checked against this
    run's; ConfigError or CheckpointError naming it otherwise."""
    given = Path(cfg.train.init_from)
    path, note = _checkpoint_folder(given)
    if path is None and is_export(given):
        return given, check_weights_source(cfg, given, export_state(given), tokenizers, "export")
    if path is None:
        raise _not_a_source(given)
    state = checkpoint.read_trainer_state(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path / checkpoint.STATE_FILE}: holds no config, so the network whose weights it "
                              "holds cannot be checked against this run's")
    message = check_weights_source(cfg, path, state, tokenizers, "checkpoint")
    checkpoint.verify(path)
    return path, message + (f" ({note})" if note else "")


def export_state(path: Path, key: str = "train.init_from") -> dict:
    """An export folder's config.json in the shape of a checkpoint's trainer state (config, step: the tag of its
    checkpoint, averaged, weights: "ema" for an export of the moving average, data_tokenizers), its
    model.safetensors checked to be that config's (here: each rank reads only its part of the file, later);
    CheckpointError naming `key`, the option that gave it, otherwise."""
    try:
        config, _ = checked_export(path)
    except ValueError as e:  # (the messages name the file; a CheckpointError reaches every rank as one)
        raise CheckpointError(f"{key}: {e}") from None
    return {"config": {"model": config["model"]}, "step": config.get("checkpoint"),
            "averaged": config.get("averaged"), "weights": config.get("weights"),
            "data_tokenizers": config.get("data_tokenizers")}


def check_weights_source(cfg: Config, path: Path, state: dict, tokenizers: dict | None, kind: str,
                         key: str = "train.init_from") -> str:
    """The log line of a train.init_from source (`key`: the option that names it) whose network and data
    tokenizers are this run's; ConfigError naming it otherwise."""
    network = [c for c in resume_changes(state["config"], cfg)["refused"] if c[0].startswith("model.")]
    if network:
        raise ConfigError(f"{key}={path}: the {kind} holds another network ({format_changes(network)}); "
                          f"set the model section as the {kind}'s")
    differ = _other_data_tokenizers(state, tokenizers)
    if differ:
        raise ConfigError(f"{key}={path}: its weights were trained on data made with another "
                          f"{differ} than data.shards={cfg.data.shards!r}, so its codes or text ids "
                          f"mean other things to the model; give data made with the {kind}'s tokenizers")
    step = f"its step {state['step']}" if kind == "checkpoint" else f"an export of {state['step'] or 'a checkpoint'}"
    return f"weights from train.init_from={path} ({step}); the optimizer, LR schedule and data order start anew"


def _other_data_tokenizers(state: dict, tokenizers: dict | None) -> str:
    """The tokenizers ('image tokenizer and text tokenizer') that made this run's data (`tokenizers`) unlike those
    a checkpoint's weights were trained on (its trainer state's data_tokenizers); '' when none differ or either is
    unknown (synthetic data, or saved before they were recorded)."""
    trained_on = state.get("data_tokenizers")
    return " and ".join(other_tokenizers(trained_on, tokenizers) if trained_on and tokenizers else [])


def _plan_start(cfg: Config, run_dir: Path, mode: str, tokenizers: dict | None) -> ResumePlan:
    """plan_resume's decision on the run directory's own files."""
    if mode not in RESUME_MODES:
        raise ConfigError(f"--resume {mode!r} must be one of {', '.join(RESUME_MODES)}")
    new_id = uuid.uuid4().hex[:12]
    if mode == "overwrite":
        return ResumePlan(run_id=new_id, set_aside=any((run_dir / n).exists() for n in checkpoint.RUN_FILES),
                          overwrite=True)
    if mode == "none":
        if checkpoint.has_checkpoints(run_dir):
            complete = checkpoint.complete_tags(run_dir)
            held = f"checkpoints up to {complete[-1]}" if complete else "checkpoint folders"
            raise checkpoint.RunDirError(
                f"{run_dir} already holds {held}; --resume none would start again at step 0 and overwrite them: "
                "continue with --resume auto, start afresh with --resume overwrite (moves the old run to "
                f"{run_dir}/replaced_<time>/), or use another --run-dir")
        return ResumePlan(run_id=new_id)
    tag, note = checkpoint.resume_tag(run_dir)
    messages = [note] if note else []
    if tag is None:
        return ResumePlan(run_id=new_id, messages=messages)
    plan = _plan_continue(cfg, checkpoint.checkpoint_dir(run_dir) / tag, tokenizers, messages)
    plan.run_id = plan.state.get("run_id") or new_id
    return plan


def _plan_continue(cfg: Config, path: Path, tokenizers: dict | None, messages: list[str],
                   branch: bool = False) -> ResumePlan:
    """The plan that continues checkpoint folder `path` with this config, once its config, data tokenizers and
    files are checked (ConfigError or CheckpointError naming it otherwise); its run id is the caller's to set.
    `branch`: `path` is another run's (train.init_weights_only=false), whose files the refusals' advice leaves
    alone (a rollback of its `latest`, or --resume overwrite here, would not help and would change that run)."""
    state = checkpoint.read_trainer_state(path)
    check_steps_left(cfg.train.steps, state["step"], path, branch)
    if isinstance(state.get("config"), dict):
        changes = resume_changes(state["config"], cfg)
    else:  # (saved before checkpoints held their config)
        changes = {"refused": [], "applied": [], "warned": [], "noted": []}
        messages.append(f"warning: {path / 'trainer_state.json'} holds no config: this run's config cannot be "
                        "checked against the checkpoint's")
    if changes["refused"]:
        preset = [c for c in changes["noted"] if c[0] == "model.preset"]
        advice = ("branch with the checkpoint's values, or take its weights alone (drop "
                  "train.init_weights_only=false; the network must still be the checkpoint's)" if branch else
                  "resume with the checkpoint's values, or start the new model in another --run-dir (or with "
                  "--resume overwrite)")
        raise ConfigError(f"cannot resume {path} with another network or optimizer: "
                          f"{format_changes(preset + changes['refused'])} (the checkpoint holds the other one's "
                          f"weights and optimizer state); {advice}")
    differ = _other_data_tokenizers(state, tokenizers)
    if differ:
        raise ConfigError(f"cannot resume {path} on data.shards={cfg.data.shards!r}: its samples were made with "
                          f"another {differ} than the data the checkpoint was trained on (its "
                          "trainer_state.json data_tokenizers), so its codes or text ids mean other things to the "
                          "model; give the data made with the checkpoint's tokenizers")
    layout = state.get("layout", {})
    if cfg.train.optimizer == "adafactor" and layout.get("tp", cfg.parallel.tp) != cfg.parallel.tp:
        raise ConfigError(f"{path}: Adafactor's factored statistics are per tensor-parallel shard; resume it at "
                          f"parallel.tp={layout['tp']} (this run has {cfg.parallel.tp})")
    checkpoint.verify(path)
    messages += change_messages(changes, state["step"])
    return ResumePlan(run_id="", path=path, state=state, messages=messages, changes=changes)
