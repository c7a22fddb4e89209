"""Typed run configuration: dataclasses, YAML presets, dotted overrides, validation.

A run is described by one `Config` (model, parallel layout, kernels, training). It is loaded from a
YAML file under `configs/`, then overridden from the command line with dotted keys:

    cfg = load_config("configs/train/debug.yaml", ["parallel.tp=2", "train.steps=20"])
    cfg.validate(world_size=4)
    save_config(cfg, "runs/x/config.yaml")     # the resolved config, written into every run

`model.preset: parti-350m` loads `configs/model/parti-350m.yaml` first; other `model.*` keys set in the
same file or on the command line override the preset, whatever their order.

Print every key with its documentation: `python -m training.config [--config FILE] [--set k=v ...]`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cli import command, config_parser
from common.config import (ConfigError, build, check_minima, describe, flat_dict, load_raw, read_yaml, require,
                           save_config, to_dict)
from common.loop_control import LOOP_MINIMA, LoopControl
from common.schedule import check_schedule
from data_pipeline.sampler import BatchRamp
from data_pipeline.training_data import DataConfig
from model_parallel.config import ModelConfig, model_preset, resolve_model_section
from model_parallel.kernels import KernelConfig
from model_parallel.layout import ParallelConfig, ParallelLayout

__all__ = ["Config", "ConfigError", "ModelConfig", "ParallelConfig", "KernelConfig", "TrainConfig", "DataConfig",
           "load_config", "config_from_dict", "save_config", "resume_changes"]


@dataclass
class TrainConfig(LoopControl):
    """The training loop."""

    steps: int = 20
    """Optimizer steps to run."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank."""
    rampup_batch_size: str = ""
    """START INCREMENT SAMPLES, e.g. `256 128 2000000` (Megatron-LM's --rampup-batch-size): the global batch starts at
    START samples and grows by INCREMENT over the first SAMPLES consumed, in equal shares of them, to
    global_batch_size (START and INCREMENT multiples of micro_batch_size x the data-parallel size). The LR schedule
    counts steps as always ('' = none)."""
    optimizer: str = "adamw"
    """adamw | adafactor (torch's Adafactor, factored second moments as Parti used; ZeRO-0 only, and fp32 with
    parallel.pp > 1)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    lr_stable_steps: int = 0
    """Steps at lr between the warmup and the decay: a warmup-stable-decay schedule (WSD, Megatron-LM's
    --lr-decay-style WSD; common/schedule.py), whose cool-downs are branched from the stable run's checkpoints
    (train.init_weights_only=false) with the decay set to start at the branch's step."""
    lr_decay: str = "cosine"
    """After the warmup and lr_stable_steps, from lr to min_lr over lr_decay_steps: cosine | linear | minus_sqrt
    (1 - sqrt of the progress, WSD's usual cool-down) | exponential (Megatron-LM's WSD shapes) | constant (stays
    at lr)."""
    lr_decay_steps: int = 0
    """Steps of the decay, then min_lr to the end (0: until train.steps; Megatron's --lr-decay-iters, less the
    warmup and the stable steps)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay (Megatron's --adam-beta1)."""
    adam_beta2: float = 0.95
    """AdamW's second-moment decay (Megatron's --adam-beta2; 0.95 as in GPT-3 and LlamaGen)."""
    adam_eps: float = 1e-8
    """AdamW's denominator epsilon (Megatron's --adam-eps)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    precision: str = "fp32"
    """fp32 | bf16."""
    log_interval: int = 1
    """Steps between metric lines."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end)."""
    eval_interval: int = 0
    """Steps between measurements of the loss on held-out data (data.valid_shards), also after the last step;
    logged as valid_loss in that step's metric line (0: never; Megatron's --eval-interval)."""
    eval_batches: int = 4
    """Global batches of held-out samples each measurement reads: eval_batches x global_batch_size samples of
    data.valid_shards (a seeded choice over the whole set), the same ones every time (Megatron's --eval-iters)."""
    async_save: bool = False
    """Write checkpoints in background processes while training goes on (megatron-core's async save: each
    rank's part is copied to host memory, then written by a forked process); `latest` moves at the first
    step after every rank's write finished, and the run's last save is waited for."""
    max_skipped_steps: int = 10
    """Stop the run after this many consecutive steps whose loss or gradients were not finite."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the fp32 weights, ema = decay x ema + (1 - decay) x weights after
    every optimizer step taken (LlamaGen's --ema, 0.9999; 0: none): one more fp32 tensor per parameter, held
    beside Adam's moments in each rank's own ZeRO/TP part (training/ema.py), saved in checkpoints and resumed at
    any layout; its held-out loss is logged as ema_valid_loss beside valid_loss; `training.export --ema` and
    `training.held_out --ema` take it instead of the weights."""
    ema_warmup: bool = False
    """Warm the moving average's decay up: the (k+1)-th update after it started uses min(ema_decay, (1 + k) /
    (10 + k)) (diffusers' EMAModel: a fixed 0.9999 keeps e^-1 of the random initialisation's weight after 10k steps,
    so a short run's average is mostly its start). The count of updates is saved in checkpoints and goes on after a
    resume."""
    loss_spike_factor: float = 1.5
    """Warn when a step's loss is this many times the median of the previous 100 steps' (0: never), naming the
    newest checkpoint before it and the train.skip_steps that would resume there without the batches since."""
    skip_steps: str | int = ""
    """Steps (numbered as the log numbers them) whose global batches are read past without training, e.g.
    `1201-1300,1450` (Megatron-LM's --iterations-to-skip): after a loss spike, resume from a checkpoint before it
    with the batches that led to it skipped, as PaLM did. A skipped step counts against train.steps and moves the
    data position; the weights, optimizer state and LR schedule stay where they are, and it is not logged or
    evaluated ('' = none)."""
    device: str = "auto"
    """auto (a GPU when torch sees one, else the CPU) | cuda (a GPU is required: its absence is an error
    naming the driver this torch build needs; slurm/train.sbatch sets it) | cpu (hide GPUs from this run)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device that MFU is divided by (0: the table in training/flops.py for this GPU
    and precision; set it for a GPU the table does not know or a part with other clocks)."""
    wandb_project: str = ""
    """Weights & Biases project to log to besides TensorBoard ('' = none). Offline unless WANDB_MODE says
    otherwise or WANDB_API_KEY is set; offline runs go to <run_dir>/wandb/ (upload later: `wandb sync`). The
    W&B run's id is the training run's: the segments of a preempted and requeued run are one W&B run."""
    init_from: str = ""
    """Fine-tuning or a warm start: a checkpoint of python -m training.train (its folder, or a run directory:
    the checkpoint `latest` names) or an export folder (training.export's) whose fp32 weights start this run, at
    any layout, with a new optimizer, LR schedule and data order from step 0 (Megatron-LM's
    --pretrained-checkpoint with --finetune; '' = none).
    The network must be the checkpoint's; a run with checkpoints of its own resumes those instead."""
    init_weights_only: bool = True
    """With train.init_from: its weights alone (true), or a checkpoint's whole training state (false: step,
    optimizer state, LR-schedule and data positions, skipped steps), which this run continues as a new run
    whose checkpoints go to its own run directory: a branch, e.g. a WSD cool-down (train.lr_stable_steps) from a
    checkpoint of the stable phase. Its config is checked against the checkpoint's as a resume's is (schedule
    values applied). torchtitan's checkpoint.initial_load_model_only=false; Megatron-LM's --load of another run
    without --finetune."""
    profile_step: int = 0
    """The first step traced with torch's profiler, numbered as the log numbers steps (0: none; Megatron-LM's
    --profile-step-start; pick one after warm-up): a Chrome trace and a table of the top operators per rank in
    <run_dir>/profile/ (training/profiling.py)."""
    profile_steps: int = 2
    """Steps traced from train.profile_step on."""
    profile_all_ranks: bool = False
    """Trace every rank, one file each (default: rank 0 only; Megatron-LM's --profile-ranks)."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, world_size: int | None = None) -> "Config":
        """Raise ConfigError naming the field and the rule for the first broken rule."""
        _validate(self, world_size)
        return self


_CHOICES = {
    "train.precision": ("fp32", "bf16"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.optimizer": ("adamw", "adafactor"),
}


def _validate(cfg: Config, world_size: int | None) -> None:
    """The run's rules: each section's own (ModelConfig, KernelConfig), the layout's (ParallelLayout,
    stated there once), and those of the training loop."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name, choices in _CHOICES.items():
        value = getattr(t, name.split(".")[1])
        require(value in choices, f"{name}={value!r} must be one of {', '.join(choices)}")
    cfg.kernels.validate()
    cfg.data.validate()
    m.validate()
    layout = ParallelLayout.of(p, world_size).check(m)
    require(t.optimizer != "adafactor" or p.zero_stage == 0,
            f"train.optimizer=adafactor needs parallel.zero_stage=0 (ZeRO flattens parameters, which would "
            f"turn Adafactor's factored second moments into unfactored ones; got {p.zero_stage})")
    require(t.optimizer != "adafactor" or p.pp == 1 or t.precision != "bf16",
            "train.optimizer=adafactor with parallel.pp > 1 needs train.precision=fp32 (DeepSpeed's pipeline runs "
            "bf16 through its BF16_Optimizer, which flattens parameters even at ZeRO-0: the first save failed)")
    require(t.init_weights_only or t.init_from,
            "train.init_weights_only=false continues train.init_from's checkpoint: set train.init_from")
    require(not (t.init_from and m.init_text_encoder),
            "train.init_from and model.init_text_encoder: set one (the checkpoint holds a text encoder too)")
    require(not m.init_text_encoder or p.zero_stage < 3,
            f"model.init_text_encoder needs parallel.zero_stage < 3 (ZeRO-3 partitions the model while it is built, "
            f"before the pre-trained encoder could be loaded into it; got {p.zero_stage})")
    require(not (m.freeze_text_encoder and p.pp > 1 and p.zero_stage >= 1 and t.precision == "fp32"),
            "model.freeze_text_encoder with parallel.pp > 1 and parallel.zero_stage >= 1 needs train.precision=bf16 "
            "(or zero_stage 0): fp32 ZeRO reduces each parameter group's gradient norm across the pipeline stages, "
            "and only the first stage holds the frozen encoder's group, so the stages would wait on each other "
            "for ever")
    require(not cfg.kernels.compile or p.zero_stage < 3,
            "kernels.compile needs parallel.zero_stage < 3 (ZeRO-3 gathers each module's parameters in hooks "
            "that split a compiled layer into many graphs and exhaust torch.compile's recompilation limit; "
            f"got {p.zero_stage})")
    require(t.seed >= 0, f"train.seed={t.seed} must be >= 0")
    require(t.peak_tflops >= 0, f"train.peak_tflops={t.peak_tflops} must be >= 0 (0: from the table)")
    require(t.loss_spike_factor == 0 or t.loss_spike_factor > 1,
            f"train.loss_spike_factor={t.loss_spike_factor} must be > 1 (a multiple of the recent losses' median), "
            "or 0: no warning")
    require(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    require(t.global_batch_size >= 1, f"train.global_batch_size={t.global_batch_size} must be >= 1")
    check_minima(t, "train", (*LOOP_MINIMA, ("steps", 1, "optimizer steps to run"),
                              ("log_interval", 1, "steps between metric lines"),
                              ("max_skipped_steps", 1, "non-finite steps in a row before the run stops"),
                              ("save_interval", 0, "steps between checkpoints, 0: only at the end"),
                              ("eval_interval", 0, "steps between held-out losses, 0: never"),
                              ("eval_batches", 1, "global batches of held-out samples per measurement"),
                              ("profile_step", 0, "the first step traced, 0: none"),
                              ("profile_steps", 1, "steps traced")))
    check_schedule(t, "train")
    for name in ("weight_decay", "grad_clip"):
        require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(t, name) < 1, f"train.{name}={getattr(t, name)} must be in [0, 1)")
    require(t.adam_eps > 0, f"train.adam_eps={t.adam_eps} must be > 0")
    require(0 <= t.ema_decay < 1, f"train.ema_decay={t.ema_decay} must be in [0, 1) (0: no moving average)")
    require(t.ema_decay > 0 or not t.ema_warmup, "train.ema_warmup warms up the moving average's decay: it needs "
            "train.ema_decay > 0 (e.g. 0.9999)")
    step_ranges(t.skip_steps, "train.skip_steps")
    ramp = batch_ramp(t)
    require(t.global_batch_size % t.micro_batch_size == 0,
            f"train.global_batch_size={t.global_batch_size} must be divisible by "
            f"train.micro_batch_size={t.micro_batch_size}")
    if world_size is not None:
        layout.check(micro_batch=t.micro_batch_size, global_batch=t.global_batch_size)
        for name, size in (("START", ramp.start), ("INCREMENT", ramp.increment)) if ramp else ():
            require(size % (t.micro_batch_size * layout.dp) == 0,
                    f"train.rampup_batch_size={t.rampup_batch_size!r}: its {name} {size} must be a multiple of "
                    f"train.micro_batch_size x the data-parallel size = {t.micro_batch_size * layout.dp}")


def batch_ramp(t: TrainConfig) -> BatchRamp | None:
    """train.rampup_batch_size as a BatchRamp (None for ''); ConfigError naming the key otherwise."""
    spec = str(t.rampup_batch_size).replace(",", " ").split()
    if not spec:
        return None
    numbers = [int(x) for x in spec if x.isdigit()]
    if len(spec) != 3 or len(numbers) != 3 or min(numbers) < 1:
        raise ConfigError(f"train.rampup_batch_size={t.rampup_batch_size!r}: expected three whole numbers >= 1, "
                          "START INCREMENT SAMPLES, e.g. '256 128 2000000'")
    ramp = BatchRamp(*numbers)
    if ramp.start >= t.global_batch_size or (t.global_batch_size - ramp.start) % ramp.increment:
        raise ConfigError(f"train.rampup_batch_size={t.rampup_batch_size!r}: START {ramp.start} must be below "
                          f"train.global_batch_size={t.global_batch_size}, which INCREMENT {ramp.increment} must "
                          "reach from it in whole steps")
    return ramp


def step_ranges(spec: str | int, name: str) -> list[tuple[int, int]]:
    """Steps and ranges of steps as `1201-1300,1450` (or a lone step number) -> [(1201, 1300), (1450, 1450)],
    in order; '' -> []. `name` is the key the error names."""
    if isinstance(spec, bool) or not isinstance(spec, str | int):
        raise ConfigError(f"{name}={spec!r}: expected steps and ranges of steps, e.g. 1201-1300,1450")
    ranges = []
    for item in (str(spec).split(",") if str(spec).strip() else []):
        found = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", item)
        first, last = (int(found[1]), int(found[2] or found[1])) if found else (0, 0)
        require(1 <= first <= last, f"{name}={spec!r}: expected steps and ranges of steps from 1 on, e.g. "
                                    f"1201-1300,1450 ({item.strip()!r} is not one)")
        ranges.append((first, last))
    return sorted(ranges)


def layout_of(cfg: Config, world_size: int) -> ParallelLayout:
    """The run's validated parallel layout on `world_size` processes."""
    return ParallelLayout.of(cfg.parallel, world_size).check(cfg.model, cfg.train.micro_batch_size,
                                                             cfg.train.global_batch_size)


# ----------------------------------------------------------------------------------------------
# Loading, overriding, saving


def config_from_dict(raw: dict) -> Config:
    """A run's Config from its sections (model.preset filled in underneath the model section)."""
    return build(Config, {**raw, "model": resolve_model_section(raw.get("model", {}))})


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults), apply dotted overrides, build the dataclasses."""
    raw = load_raw(path, overrides)
    cfg = config_from_dict(raw)  # (first: a section of the wrong type is refused there, naming it)
    if path:
        check_preset_override(read_yaml(path).get("model") or {}, raw.get("model") or {}, path)
    return cfg


def check_preset_override(file_model: dict, model: dict, path: str | Path) -> None:
    """ConfigError when an override's model.preset would change only the preset's name: the file's model
    section (a run's config.yaml sets every key) sets every key of the new preset, so none of its values
    would apply and the run would train the file's model under the new name."""
    preset = model.get("preset")
    if not preset or preset == file_model.get("preset"):
        return
    values = {k: v for k, v in model_preset(preset).items() if k != "preset"}
    if values and all(k in file_model for k in values) and any(file_model[k] != v for k, v in values.items()):
        trained = f"{file_model['preset']}'s" if file_model.get("preset") else "the file's"
        raise ConfigError(f"model.preset={preset}: {path} sets every key of that preset in its model section (a "
                          f"run's config.yaml does), so its values would not apply and the run would train "
                          f"{trained} model under the name {preset}; start from a config that sets the preset "
                          "only, or override the model keys themselves")


def config_to_dict(cfg: Config) -> dict:
    return to_dict(cfg)


# ----------------------------------------------------------------------------------------------
# A resumed run's config against the one its checkpoint was saved with

RESUME_APPLIED = ("train.lr", "train.min_lr", "train.warmup_steps", "train.lr_stable_steps", "train.lr_decay",
                  "train.lr_decay_steps", "train.steps", "train.weight_decay", "train.grad_clip", "train.adam_beta1",
                  "train.adam_beta2", "train.adam_eps", "train.ema_decay", "train.ema_warmup")
"""Schedule and optimizer hyper-parameters a resumed run takes over: the LR schedule continues at the
checkpoint's step with the new values (training/checkpoint.py `load`), weight decay, clipping and Adam's
betas and epsilon are the new ones from the first step on (the moments are the checkpoint's)."""

RESUME_MODES = ("auto", "none", "overwrite")
"""training.train --resume: continue (auto), start afresh where no checkpoint is (none), or moving one aside
(overwrite)."""

RESUME_WARNED = {
    "train.seed": "data order and caption drops follow the new seed from here on (samples of this epoch "
                  "may repeat or be skipped); the weights stay the checkpoint's",
    "train.global_batch_size": "each step from here on takes the new number of samples; the LR schedule "
                               "counts steps, not samples; the held-out loss is measured on other samples from "
                               "this step on (train.eval_batches global batches)",
    "train.rampup_batch_size": "the global batch of each step from here on follows the new ramp (from the samples "
                               "consumed so far)",
    "data.synthetic": "the training data changes from this step on",
    "data.shards": "the training data changes from this step on",
    "data.valid_shards": "the held-out loss is measured on other samples from this step on",
    "train.eval_batches": "the held-out loss is measured on other samples from this step on",
}
"""Changes a resumed run accepts with a warning: the run goes on, but is no longer the run it was."""

NOT_NETWORK = ("model.preset", "model.dropout", "model.attention_dropout", "model.attention_dropout_invariant",
               "model.caption_drop_prob", "model.init_std", "model.init_text_encoder", "model.freeze_text_encoder")
"""model.* keys that do not change the network a checkpoint holds: the preset's name (its values are
compared one by one), regularisation, and the initialisation (used only by a fresh run). Every other
model.* key, present or future, is taken to change it."""


def resume_changes(saved: dict, cfg: Config) -> dict[str, list[tuple[str, Any, Any]]]:
    """What changed between a checkpoint's config (`saved`, the dict trainer_state.json holds) and the
    config resuming it, by what a resume does with each change: {'refused': [...], 'applied': [...],
    'warned': [...], 'noted': [...]}, each a list of (dotted key, saved value, new value).

    refused: the network (any model.* key but NOT_NETWORK's) or the optimizer's kind (its state would
    not fit); applied: RESUME_APPLIED; warned: RESUME_WARNED; noted: anything else (layout, kernels,
    precision, intervals: a checkpoint resumes at any of them). A key the checkpoint's config lacks
    (added to the code since) is compared with its default."""
    new = flat_dict(config_to_dict(cfg))
    old = {**flat_dict(config_to_dict(Config())), **flat_dict(saved or {})}
    out: dict[str, list] = {"refused": [], "applied": [], "warned": [], "noted": []}
    for key, value in new.items():
        before = old.get(key)
        if before == value or (isinstance(value, float) and isinstance(before, int) and float(before) == value):
            continue
        if key == "model.conv_attention_kernel" and new["model.attention_pattern"] == "dense":
            kind = "noted"  # no effect on a dense network (a change of the pattern itself is refused)
        elif (key.startswith("model.") and key not in NOT_NETWORK) or key == "train.optimizer":
            kind = "refused"
        elif key == "data.valid_shards" and _same_held_out_folders(before, value):
            kind = "noted"  # (the same sets, now named or renamed: the same samples are measured)
        elif key in RESUME_APPLIED:
            kind = "applied"
        elif key in RESUME_WARNED:
            kind = "warned"
        else:
            kind = "noted"
        out[kind].append((key, before, value))
    return out


def _same_held_out_folders(old: Any, new: Any) -> bool:
    """Whether two data.valid_shards specs name the same folders in the same order, only their sets' names differing
    and no name given to another folder (swapped names would put another set's samples under valid_loss_<name>)."""
    from data_pipeline.training_data import named_sets

    try:
        before, after = named_sets(str(old or "")), named_sets(str(new or ""))
    except ConfigError:  # (a spec saved under other rules)
        return False
    return (list(before.values()) == list(after.values())
            and all(before[name] == after[name] for name in before.keys() & after.keys()))


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def change_messages(changes: dict, step: int) -> list[str]:
    """The log lines of a resume at `step` with resume_changes' `changes` (the refused ones excepted)."""
    messages = []
    if changes["applied"]:
        messages.append(f"config changes applied from step {step} on: {format_changes(changes['applied'])}")
    for key, old, new in changes["warned"]:
        messages.append(f"warning: {key} changed on resume ({old!r} -> {new!r}): {RESUME_WARNED[key]}")
    if changes["noted"]:
        messages.append(f"config changes on resume: {format_changes(changes['noted'])}")
    return messages


def main(argv: list[str] | None = None) -> None:
    parser = config_parser("Print the resolved config with every key's meaning.", where="configs/train/",
                           example="parallel.tp=2 train.steps=20")
    args = parser.parse_args(argv)
    with command():
        print(describe(load_config(args.config, args.set).validate()))


if __name__ == "__main__":
    main()
