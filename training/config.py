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

import argparse
import ast
import dataclasses
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field(s) and the rule."""


@dataclass
class ModelConfig:
    """Shape of the Parti encoder-decoder transformer."""

    preset: str = ""
    """Name of a preset under configs/model/ whose values are the defaults for this section ('' = none)."""
    encoder_layers: int = 2
    """Number of text-encoder transformer layers (bidirectional self-attention + MLP)."""
    decoder_layers: int = 2
    """Number of image-decoder layers (causal self-attention + cross-attention + MLP)."""
    hidden_size: int = 64
    """Model width d."""
    ffn_hidden_size: int = 256
    """Width of the MLP's inner layer (Parti: 4d)."""
    num_heads: int = 4
    """Attention heads (Parti: d/64)."""
    text_vocab_size: int = 1000
    """SentencePiece vocabulary size, special tokens included (Parti: 16000)."""
    text_seq_len: int = 16
    """Text tokens per caption after truncation/padding (Parti: 128)."""
    image_vocab_size: int = 64
    """VQ codebook size (Parti: 8192). The decoder's input vocabulary adds one BOS token."""
    image_grid: int = 4
    """Image tokens per side; the image sequence is image_grid**2 long (Parti: 32 -> 1024)."""
    text_pad_id: int = 0
    """Token id that pads captions; padded positions are masked out of attention."""
    text_eos_id: int = 3
    """End-of-sentence id; the null (unconditional) caption is [EOS] alone."""
    vocab_pad_multiple: int = 128
    """Embedding tables are padded to a multiple of this (independent of TP, so checkpoints reshard)."""
    dropout: float = 0.0
    """Dropout on residual branches and embeddings."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    layernorm_eps: float = 1e-5
    """Epsilon of every layer norm."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation (output projections scaled by 1/sqrt(2L))."""
    cfg_drop_prob: float = 0.1
    """Probability that a training caption is replaced by the null caption (classifier-free guidance)."""

    @property
    def image_seq_len(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ParallelConfig:
    """How the model is split over processes."""

    tp: int = 1
    """Tensor-parallel size (megatron-core): heads and MLP columns split over this many ranks."""
    pp: int = 1
    """Pipeline-parallel stages."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (only 0 or 1 with pp > 1)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms and dropout on sequence shards (needs tp > 1)."""
    activation_checkpointing: str = "none"
    """Activation recomputation: none | selective (attention core) | full (whole layers)."""


@dataclass
class KernelConfig:
    """Which implementation each fusable operation uses; 'auto' picks the fastest one available."""

    layernorm: str = "auto"
    """auto | apex | te | torch."""
    attention: str = "auto"
    """auto | sdpa (torch scaled_dot_product_attention: flash/efficient kernels on GPU) | math."""
    bias_gelu: str = "auto"
    """auto | fused (megatron-core's jit-fused bias+GeLU) | plain."""
    optimizer: str = "auto"
    """auto | apex (FusedAdam) | deepspeed (FusedAdam) | torch_fused (AdamW fused=True) | torch."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 20
    """Optimizer steps to run."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank."""
    optimizer: str = "adamw"
    """adamw | adafactor (torch's Adafactor, factored second moments as Parti used; ZeRO-0 only)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    lr_decay: str = "cosine"
    """After warmup, from lr to min_lr at train.steps: cosine | linear | constant (stays at lr)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    precision: str = "fp32"
    """fp32 | bf16."""
    log_interval: int = 1
    """Steps between metric lines."""
    save_interval: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in the run directory (older ones are deleted; 0 keeps all)."""
    max_skipped_steps: int = 10
    """Stop the run after this many consecutive steps whose loss or gradients were not finite."""
    device: str = "auto"
    """auto (a GPU when torch sees one, else the CPU) | cuda (a GPU is required: its absence is an error
    naming the driver this torch build needs; slurm/train.sbatch sets it) | cpu (hide GPUs from this run)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device that MFU is divided by (0: the table in training/flops.py for this GPU
    and precision; set it for a GPU the table does not know or a part with other clocks)."""


@dataclass
class DataConfig:
    """Where training samples come from."""

    synthetic: bool = True
    """Use a small generated code-shard set (no prepared data needed)."""
    shards: str = ""
    """Code-shard folder from data_pipeline.pretokenize when synthetic is false; several blend by weight:
    'codes/a:3,codes/b:1'."""


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
    "parallel.activation_checkpointing": ("none", "selective", "full"),
    "kernels.layernorm": ("auto", "apex", "te", "torch"),
    "kernels.attention": ("auto", "sdpa", "math"),
    "kernels.bias_gelu": ("auto", "fused", "plain"),
    "kernels.optimizer": ("auto", "apex", "deepspeed", "torch_fused", "torch"),
    "train.precision": ("fp32", "bf16"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.optimizer": ("adamw", "adafactor"),
    "train.lr_decay": ("cosine", "linear", "constant"),
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate(cfg: Config, world_size: int | None) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name, choices in _CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        _require(value in choices, f"{name}={value!r} must be one of {', '.join(choices)}")
    for name in ("encoder_layers", "decoder_layers", "hidden_size", "ffn_hidden_size", "num_heads",
                 "text_vocab_size", "text_seq_len", "image_vocab_size", "image_grid"):
        _require(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive")
    for name in ("tp", "pp"):
        _require(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
    _require(m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    _require(m.num_heads % p.tp == 0,
             f"model.num_heads={m.num_heads} must be divisible by parallel.tp={p.tp}")
    _require(m.ffn_hidden_size % p.tp == 0,
             f"model.ffn_hidden_size={m.ffn_hidden_size} must be divisible by parallel.tp={p.tp}")
    _require(m.image_vocab_size % p.tp == 0,
             f"model.image_vocab_size={m.image_vocab_size} must be divisible by parallel.tp={p.tp} "
             "(the output head is split over the vocabulary)")
    _require(m.vocab_pad_multiple % p.tp == 0,
             f"model.vocab_pad_multiple={m.vocab_pad_multiple} must be divisible by parallel.tp={p.tp}")
    _require(m.decoder_layers % p.pp == 0,
             f"model.decoder_layers={m.decoder_layers} must be divisible by parallel.pp={p.pp} "
             "(decoder layers are balanced over pipeline stages)")
    _require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3")
    _require(p.pp == 1 or p.zero_stage <= 1,
             f"parallel.zero_stage={p.zero_stage} needs parallel.pp=1 (DeepSpeed allows only ZeRO-0/1 "
             f"with pipeline parallelism; got parallel.pp={p.pp})")
    _require(not p.sequence_parallel or p.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel:
        for name, n in (("text_seq_len", m.text_seq_len), ("image_seq_len (image_grid**2)", m.image_seq_len)):
            _require(n % p.tp == 0, f"model.{name}={n} must be divisible by parallel.tp={p.tp} "
                                    "with sequence parallelism")
    _require(t.optimizer != "adafactor" or p.zero_stage == 0,
             f"train.optimizer=adafactor needs parallel.zero_stage=0 (ZeRO flattens parameters, which would "
             f"turn Adafactor's factored second moments into unfactored ones; got {p.zero_stage})")
    for name in ("dropout", "attention_dropout", "cfg_drop_prob"):
        v = getattr(m, name)
        _require(0.0 <= v < 1.0, f"model.{name}={v} must be in [0, 1)")
    _require(t.peak_tflops >= 0, f"train.peak_tflops={t.peak_tflops} must be >= 0 (0: from the table)")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    _require(t.global_batch_size >= 1, f"train.global_batch_size={t.global_batch_size} must be >= 1")
    for name, low, meaning in (("steps", 1, "optimizer steps to run"),
                               ("log_interval", 1, "steps between metric lines"),
                               ("max_skipped_steps", 1, "non-finite steps in a row before the run stops"),
                               ("save_interval", 0, "steps between checkpoints, 0: only at the end"),
                               ("keep_checkpoints", 0, "checkpoints kept, 0: all"),
                               ("warmup_steps", 0, "linear warmup steps")):
        value = getattr(t, name)
        _require(value >= low, f"train.{name}={value} must be >= {low} ({meaning})")
    _require(t.lr > 0, f"train.lr={t.lr} must be > 0 (the schedule is relative to it)")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        _require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must be >= 0")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"train.global_batch_size={t.global_batch_size} must be divisible by "
             f"train.micro_batch_size={t.micro_batch_size}")
    if world_size is not None:
        _require(world_size % (p.tp * p.pp) == 0,
                 f"world size {world_size} must be divisible by parallel.tp x parallel.pp = {p.tp * p.pp}")
        dp = world_size // (p.tp * p.pp)
        _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"train.global_batch_size={t.global_batch_size} must be divisible by "
                 f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")


# ----------------------------------------------------------------------------------------------
# Loading, overriding, saving


def _parse_value(text: str) -> Any:
    """A command-line value is read as YAML: 2 -> int, 1e-3 -> float, true -> bool, abc -> str."""
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_value(value.strip()))
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def model_preset(name: str) -> dict:
    """The raw values of configs/model/<name>.yaml."""
    path = CONFIG_ROOT / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
        raise ConfigError(f"model.preset={name!r}: no file {path}; known presets: {', '.join(known)}")
    return _read_yaml(path)


def _build(cls, values: dict, where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys and values of the wrong type."""
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name} must be a section (mapping), got {value!r}")
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (type(value) is hint):
        raise ConfigError(f"{name}={value!r} must be of type {hint.__name__}")
    return value


def config_from_dict(raw: dict) -> Config:
    raw = dict(raw)
    model = dict(raw.get("model") or {})
    if model.get("preset"):
        model = _merge(model_preset(model["preset"]), model)
    raw["model"] = model
    return _build(Config, raw, "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults), apply dotted overrides, build the dataclasses."""
    raw = _read_yaml(Path(path)) if path else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    return config_from_dict(raw)


def load_typed(cls, path: str | Path | None, overrides: list[str] | None = None):
    """Any config dataclass from a YAML file plus dotted overrides (same rules as `load_config`)."""
    raw = _read_yaml(Path(path)) if path else {}
    return _build(cls, _merge(raw, parse_overrides(overrides or [])), "")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path, header: str = "") -> None:
    """Write the resolved config as YAML (`header`: comment lines put above it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if header:
            f.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# A resumed run's config against the one its checkpoint was saved with

RESUME_APPLIED = ("train.lr", "train.min_lr", "train.warmup_steps", "train.lr_decay", "train.steps",
                  "train.weight_decay", "train.grad_clip")
"""Schedule and optimizer hyper-parameters a resumed run takes over: the LR schedule continues at the
checkpoint's step with the new values (training/checkpoint.py `load`), weight decay and clipping
are the new ones from the first step on."""

RESUME_WARNED = {
    "train.seed": "data order and caption drops follow the new seed from here on (samples of this epoch "
                  "may repeat or be skipped); the weights stay the checkpoint's",
    "train.global_batch_size": "each step from here on takes the new number of samples; the LR schedule "
                               "counts steps, not samples",
    "data.synthetic": "the training data changes from this step on",
    "data.shards": "the training data changes from this step on",
}
"""Changes a resumed run accepts with a warning: the run goes on, but is no longer the run it was."""

NOT_NETWORK = ("model.preset", "model.dropout", "model.attention_dropout", "model.cfg_drop_prob",
               "model.init_std")
"""model.* keys that do not change the network a checkpoint holds: the preset's name (its values are
compared one by one), regularisation, and the initialisation (used only by a fresh run). Every other
model.* key, present or future, is taken to change it."""


def flat_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 1e-3, ...} from nested sections."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
        if (key.startswith("model.") and key not in NOT_NETWORK) or key == "train.optimizer":
            kind = "refused"
        elif key in RESUME_APPLIED:
            kind = "applied"
        elif key in RESUME_WARNED:
            kind = "warned"
        else:
            kind = "noted"
        out[kind].append((key, before, value))
    return out


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


# ----------------------------------------------------------------------------------------------
# Documentation of every key, read from the attribute docstrings above.


def field_docs(cls) -> dict[str, str]:
    """Map field name -> the string literal written right below it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = nxt.value.value
    return docs


def describe(cfg: Config) -> str:
    lines = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        lines.append(f"{section.name}:  # {inspect.getdoc(type(obj))}")
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            doc = " ".join(docs.get(f.name, "").split())
            lines.append(f"  {f.name}: {getattr(obj, f.name)!r}  # {doc}")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. parallel.tp=2 train.steps=20")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the resolved config with every key's meaning.")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set).validate()
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    print(describe(cfg))


if __name__ == "__main__":
    main()
