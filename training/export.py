r"""Export a checkpoint's weights to one safetensors file plus its config, for inference without DeepSpeed.

    python -m training.export --run-dir runs/x [--tag step_00000100] [--out runs/x/export] [--dtype bf16] \
        [--average 5] [--ema]
    # --average 5: the mean weights of the 5 newest checkpoints up to --tag (checkpoint averaging);
    # --ema: the moving average of the weights the run kept (train.ema_decay) instead of the weights
    model = load_exported("runs/x/export")          # a PartiModel at TP=1, in eval mode, fp32 on CPU
    model = load_exported("runs/x/export", "cuda")  # bf16 on the GPU (dtype=... to choose)

Whatever layout the run trained at (TP, PP, ZeRO), the checkpoint's tensors are read back whole
(torch.distributed.checkpoint joins the blocks the ranks wrote) under PartiModel's parameter names, GROUP_BYTES
at a time, each group written as it is read, with the tensor index read once; the file holds fp32 weights (bf16
with --dtype bf16: half the size), and config.json the model section of the run's resolved config and the image
and text tokenizers its training data was made with (generation refuses others). Loading builds the model on the
meta device and assigns the weights (cast to the target dtype) without ever allocating a randomly initialised
copy, so a model needs its weights' memory once, not twice.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)
from torch.distributed.checkpoint.metadata import Metadata
from tqdm import tqdm

from common.checkpoints import CheckpointError, checkpoint_dir, failure_cause
from common.cli import command, description
from common.config import ConfigError
from common.files import atomic_path, write_atomic
from common.state_file import check_fits
from model_parallel.config import ModelConfig, saved_model_config
from model_parallel.model import PartiModel, move_buffers
from model_parallel.param_count import SizingGroup
from model_parallel.state import init_parallel
from training.checkpoint import (
    EXPORT_WEIGHTS,
    WEIGHT_SOURCES,
    complete_tags,
    read_trainer_state,
    resume_tag,
    verify,
)
from training.deepspeed_glue import local_shape
from training.ema import saved_ema_decay

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""The safetensors dtypes load_exported takes (cast to its `dtype`): training.export writes F32 or BF16."""

GROUP_BYTES = 1 << 31
"""Weights read from the checkpoint at a time while exporting (parti-20b's fp32 weights are 80 GB): the host
memory an export needs beyond the process's own."""


class OpenCheckpoint(NamedTuple):
    """A checkpoint opened for reading its weights whole (open_checkpoint, then read_weights)."""

    path: Path
    state: dict
    """Its trainer_state.json (the run's config under "config")."""
    shapes: dict[str, tuple]
    """Every PartiModel parameter's whole (TP=1) shape, by name."""
    index: Metadata
    """Its tensor index (.metadata), read once, safely, by verify."""


def open_checkpoint(run_dir: str | Path, tag: str) -> OpenCheckpoint:
    """Checkpoint `tag` of RUN_DIR, checked (verify) and ready for read_weights; sets up TP=1, PP=1."""
    init_parallel(tp=1, pp=1)
    path = checkpoint_dir(run_dir) / tag
    state = read_trainer_state(path)  # (first: it marks the checkpoint complete)
    if not isinstance(state.get("config"), dict) or not isinstance(state["config"].get("model"), dict):
        raise CheckpointError(f"{path / 'trainer_state.json'}: no config.model (the run's resolved config)")
    index = verify(path)
    with torch.device("meta"):
        model = PartiModel(saved_model_config(state["config"]["model"]), meta=True)
    return OpenCheckpoint(path, state, {n: tuple(local_shape(p)) for n, p in model.named_parameters()}, index)


class _IndexedReader(FileSystemReader):
    """torch.distributed.checkpoint's reader of a checkpoint folder, given its index: each read (an export reads
    GROUP_BYTES at a time) would unpickle .metadata again, and with it every rank's block records; at parti-20b
    ZeRO-3 over 512 ranks ~2.3M of them, ~300 MiB and ~40 s per read on CPU (measured on a synthetic index), ~40
    reads for the 80 GB of weights. The index verify read safely is used instead (never unpickled unrestricted)."""

    def __init__(self, path: Path, index: Metadata):
        super().__init__(path)
        self.index = index

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.index


def read_weights(checkpoint: OpenCheckpoint, names: list[str] | None = None,
                 weights: str = "model") -> dict[str, torch.Tensor]:
    """The whole fp32 tensors of an opened checkpoint named in `names` (default: all; the others are not read), of
    its `weights` (WEIGHT_SOURCES: the masters, or their moving average). torch.distributed.checkpoint reads them
    straight from the blocks the ranks wrote, at any layout (megatron-core saves a ShardedTensor as torch's sharded
    tensor under its key: model.<name>, optimizer.ema.<name>)."""
    names = list(checkpoint.shapes) if names is None else names
    prefix = WEIGHT_SOURCES[weights]
    found = {f"{prefix}.{n}": torch.empty(checkpoint.shapes[n]) for n in names}
    try:
        with warnings.catch_warnings():  # (no_dist: this process reads alone, as asked; torch warns it assumes so)
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(found, storage_reader=_IndexedReader(checkpoint.path, checkpoint.index), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - as training/checkpoint.py's load_weights
        # (a run still training prunes its oldest checkpoints, those an --average reads first: one line naming it)
        raise CheckpointError(f"{checkpoint.path}: cannot read its weights ({failure_cause(e)}); pruned or damaged "
                              "since it was opened?") from None
    return {n: found[f"{prefix}.{n}"] for n in names}


def weight_groups(shapes: dict[str, tuple], limit: int = GROUP_BYTES) -> list[list[str]]:
    """The names in sorted order (the file's), cut into runs of at most `limit` fp32 bytes (a larger
    tensor alone)."""
    groups, size = [[]], 0
    for name in sorted(shapes):
        nbytes = 4 * math.prod(shapes[name])
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


EXPORT_DTYPES = {"fp32": ("F32", torch.float32), "bf16": ("BF16", torch.bfloat16)}
"""training.export's --dtype: its safetensors name and torch dtype (bf16: half the file, torchtitan's
checkpoint.export_dtype; the weights rounded to what a GPU runs them in)."""


def safetensors_header(shapes: dict[str, tuple], metadata: dict[str, str], dtype: str = "fp32") -> bytes:
    """The 8-byte length and JSON header of a safetensors file of `dtype` (EXPORT_DTYPES) tensors stored in
    sorted name order, padded with spaces to a multiple of 8 (the format's alignment)."""
    (name_in_file, torch_dtype), header, offset = EXPORT_DTYPES[dtype], {"__metadata__": metadata}, 0
    for name in sorted(shapes):
        nbytes = torch_dtype.itemsize * math.prod(shapes[name])
        header[name] = {"dtype": name_in_file, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def export(run_dir: str | Path, tag: str | None = None, out: str | Path | None = None,
           group_bytes: int = GROUP_BYTES, dtype: str = "fp32", average: int = 1, ema: bool = False) -> Path:
    """Write RUN_DIR's checkpoint `tag` (default: latest) as OUT/model.safetensors + OUT/config.json, the
    weights in `dtype` (EXPORT_DTYPES: the checkpoint's fp32 masters, or rounded to bf16); with `average` N > 1,
    the mean of the weights of the N newest complete checkpoints up to `tag` (checkpoint averaging, as fairseq's
    average_checkpoints.py: often a lower held-out loss than the last checkpoint alone, at no training cost);
    with `ema`, the moving average of the weights the checkpoint holds (train.ema_decay) instead of the weights.

    The file is written as the checkpoints are read, `group_bytes` of weights at a time: the safetensors
    library writes a file only from all of its tensors in memory, the whole model in host RAM (80 GB at
    parti-20b); its format is a length, a JSON header and the tensors' bytes back to back, so the header
    comes first, from the shapes alone, and each group's bytes follow (the same bytes as the library's)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype}: expected one of {', '.join(EXPORT_DTYPES)}")
    tags = averaged_tags(run_dir, tag, average)
    tag = tags[-1]
    out = Path(out or Path(run_dir) / "export")
    check_replaceable(out)
    opened = [open_checkpoint(run_dir, t) for t in tags]
    state, shapes = opened[-1].state, opened[-1].shapes
    check_averageable(opened)
    weights = "ema" if ema else "model"
    if ema:
        check_has_ema(opened)
    # (what the file holds besides the checkpoint's own weights, in its header and config.json)
    made_of = {"averaged": ",".join(tags)} if len(tags) > 1 else {}
    made_of |= {"weights": "ema", "ema_decay": str(saved_ema_decay(state))} if ema else {}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp, open(tmp, "wb") as f:
        f.write(head := safetensors_header(shapes, {"checkpoint": tag, **made_of}, dtype))
        written = EXPORT_DTYPES[dtype][1]
        total = written.itemsize * sum(math.prod(s) for s in shapes.values())
        progress = tqdm(total=total, desc=f"export {tag}", unit="B", unit_scale=True, disable=None)  # (minutes at 20B)
        for group in weight_groups(shapes, group_bytes):
            values = mean_weights(opened, group, weights)
            for name in group:  # (as bytes: numpy has no bfloat16)
                progress.update(f.write(memoryview(values[name].to(written).reshape(-1).view(torch.uint8).numpy())))
            del values
        progress.close()
        if f.tell() != len(head) + total:
            raise ValueError(f"{tmp}: {f.tell()} bytes written, its header describes another size")
        f.flush()
        os.fsync(f.fileno())
    # (after the weights: a re-export stopped between the two leaves the earlier config.json, whose checkpoint
    # tag load_exported then finds differing from the weights')
    write_atomic(out / "config.json", json.dumps({"model": state["config"]["model"], "checkpoint": tag, **made_of,
                                                  "data_tokenizers": state.get("data_tokenizers")}, indent=1))
    return out


def averaged_tags(run_dir: str | Path, tag: str | None, average: int) -> list[str]:
    """The tags an export reads: `tag` (default: `latest`'s, or the newest complete one when `latest` is gone) and
    the average - 1 complete checkpoints before it; FileNotFoundError naming what is missing otherwise."""
    tag = tag or resume_tag(run_dir)[0]
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir(run_dir)} holds no complete checkpoint")
    if average < 1:
        raise ValueError(f"--average {average}: expected a number of checkpoints, at least 1")
    if average == 1:
        return [tag]
    complete = complete_tags(run_dir)
    if tag not in complete:
        raise FileNotFoundError(f"--average {average}: {checkpoint_dir(run_dir) / tag} is not a complete checkpoint "
                                f"(complete: {', '.join(complete) or 'none'})")
    upto = complete[:complete.index(tag) + 1]
    if len(upto) < average:
        raise FileNotFoundError(f"--average {average}: {checkpoint_dir(run_dir)} holds {len(upto)} complete "
                                f"checkpoint(s) up to {tag} ({', '.join(upto) or 'none'}); keep more "
                                "(train.keep_checkpoints, train.keep_checkpoints_every) or average fewer")
    return upto[-average:]


def check_averageable(opened: list[OpenCheckpoint]) -> None:
    """ValueError naming the checkpoints when those averaged differ in their weights' names or shapes, or were
    trained on data of other tokenizers (their weights would not mean the same things)."""
    last = opened[-1]
    for other in opened[:-1]:
        if other.shapes != last.shapes or other.state.get("data_tokenizers") != last.state.get("data_tokenizers"):
            what = "weights (names or shapes)" if other.shapes != last.shapes else "data tokenizers"
            raise ValueError(f"--average: {other.path} and {last.path} differ in their {what}; average checkpoints "
                             "of one network trained on the same data")


def mean_weights(opened: list[OpenCheckpoint], names: list[str], which: str = "model") -> dict[str, torch.Tensor]:
    """The fp32 mean over the opened checkpoints of the weights `names` (`which`: read_weights' `weights`; summed in
    fp64, one checkpoint's group in memory at a time besides the sums), each checked to be the float32 tensor of the
    shape the header says."""
    sums = {}
    for checkpoint in opened:
        weights = read_weights(checkpoint, names, which)
        for name in names:  # (the header was written from the shapes: each tensor must be what it says)
            w = weights[name]
            if w.dtype != torch.float32 or tuple(w.shape) != checkpoint.shapes[name]:
                raise ValueError(f"{checkpoint.path}: {name} read back as {w.dtype} {tuple(w.shape)}, the export's "
                                 f"header says float32 {checkpoint.shapes[name]}")
            if len(opened) == 1:  # (a checkpoint's own weights, as they are)
                sums[name] = w
            else:
                sums[name] = w.double() if name not in sums else sums[name].add_(w)
        del weights
    return sums if len(opened) == 1 else {name: (total / len(opened)).float() for name, total in sums.items()}


def check_has_ema(opened: list[OpenCheckpoint]) -> None:
    """CheckpointError naming the first checkpoint that holds no moving average of the weights (--ema)."""
    for checkpoint in opened:
        if not saved_ema_decay(checkpoint.state):
            raise CheckpointError(f"--ema: {checkpoint.path} holds no moving average of the weights (its run's "
                                  "train.ema_decay was 0 when it was saved); export its weights without --ema")


def check_replaceable(out: Path) -> None:
    """FileExistsError naming the file when `out` holds a config.json or model.safetensors that an export did not
    write (another tool's folder given as --out, say a text encoder's, whose config.json would be replaced)."""
    config, weights = out / "config.json", out / "model.safetensors"
    if config.exists():
        try:
            ours = {"model", "checkpoint"} <= set(json.loads(config.read_text()))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise FileExistsError(f"{config}: not the config.json of an export (no model and checkpoint); refusing to "
                                  "replace it: choose another --out")
    elif weights.exists():  # (an export stopped between its two files writes the weights first, with their tag)
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                ours = "checkpoint" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 - safetensors' SafetensorError: not such a file at all
            ours = False
        if not ours:
            raise FileExistsError(f"{weights}: not the weights of an export (no checkpoint tag) and no config.json "
                                  "beside it; refusing to replace it: choose another --out")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU (half the memory and bandwidth, flash attention), fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def read_export_config(path: str | Path) -> dict:
    """An export folder's config.json; ValueError naming it when it is not JSON (a half-copied export printed a
    bare JSON position), not an object, or has no model section."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except ValueError as e:  # (UnicodeDecodeError included)
        raise ValueError(f"{file}: not readable as JSON ({str(e)[:200]}); the export is damaged: export the "
                         "checkpoint again (python -m training.export)") from None
    kind = type(config).__name__
    shape = "" if isinstance(config, dict) else f"this {file.name}: a JSON {kind}, expected an object; "
    if shape or not isinstance(config.get("model"), dict):  # (a damaged file, not a type: ValueError)
        raise ValueError(f"{file}: no model section ({shape}expected the config.json training.export writes): "
                         "export again")
    return config


def exported_model_config(path: str | Path) -> ModelConfig:
    """The model section an export folder's config.json holds (read without building the model)."""
    return _model_config(read_export_config(path), Path(path) / "config.json")


def _model_config(config: dict, file: Path) -> ModelConfig:
    try:
        return saved_model_config(config["model"])
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None


def exported_data_tokenizers(path: str | Path) -> dict | None:
    """The image and text tokenizers of the data the exported model was trained on (code-shard manifest entries,
    data_pipeline.code_shards.data_tokenizers); None for synthetic data or an export made before they were kept."""
    return read_export_config(path).get("data_tokenizers")


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A PartiModel (TP=1, eval mode) with the exported weights on `device` in `dtype` (default: bf16 on
    CUDA, fp32 on CPU); needs a process group (one process is fine).

    The model is built on the meta device (no memory, no random initialisation) and the weights are
    assigned to it one tensor at a time, read from the memory-mapped file straight into `dtype` on
    `device`: the host holds at most one tensor beside the mapped file, the device the weights once."""
    from safetensors import safe_open

    path = Path(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    config, shapes = checked_export(path)
    init_parallel(tp=1, pp=1)
    with torch.device("meta"):
        model = PartiModel(_model_config(config, path / "config.json"), meta=True)
    file = path / EXPORT_WEIGHTS
    with readable(file), safe_open(str(file), framework="pt", device="cpu") as f:
        weights = {name: f.get_tensor(name).to(device=device, dtype=dtype) for name in shapes}
    assign_weights(model, weights, str(file))
    move_buffers(model, device)
    return model.eval()


@contextlib.contextmanager
def readable(file: Path):
    """Around reading an export's model.safetensors: safetensors' own errors (SafetensorError: a truncated or
    damaged file) become a ValueError naming the file; OSError and ValueError pass as they are."""
    try:
        yield
    except (OSError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError and kin
        raise ValueError(f"{file}: cannot be read ({type(e).__name__}: {str(e)[:200]}); damaged or truncated: "
                         "export again") from None


def weight_shapes(f, config: dict, path: Path) -> dict[str, tuple]:
    """{name: shape} of the open model.safetensors `f` of export folder `path` (config: its config.json), once
    the file is checked to be that config's (its checkpoint tag) and to hold floating-point tensors only."""
    metadata = f.metadata() or {}
    weights_tag = metadata.get("checkpoint")
    if weights_tag is not None and weights_tag != config.get("checkpoint"):  # (None: written without it)
        raise ValueError(f"{path}: model.safetensors holds the weights of checkpoint {weights_tag}, config.json "
                         f"describes {config.get('checkpoint')} (an export stopped between its two files?); export "
                         "again")
    # (one checkpoint's tag, other weights: its --average with the checkpoints before it, or its --ema average)
    made_of = {key: (metadata.get(key), config.get(key)) for key in ("averaged", "weights")}
    if weights_tag is not None and any(theirs != ours for theirs, ours in made_of.values()):
        differ = "; ".join(f"{key} {theirs or '(none)'} in model.safetensors, {ours or '(none)'} in config.json"
                           for key, (theirs, ours) in made_of.items() if theirs != ours)
        raise ValueError(f"{path}: model.safetensors holds other weights of checkpoint {weights_tag} than config.json "
                         f"describes ({differ}: an export stopped between its two files?); export again")
    names = list(f.keys())  # (a safe_open handle is not a mapping)
    slices = {name: f.get_slice(name) for name in names}
    other = [f"{n} ({s.get_dtype()})" for n, s in slices.items() if s.get_dtype() not in FLOAT_DTYPES]
    if other:  # (cast to a float dtype, integers or booleans would load as weights without a word)
        raise ValueError(f"{path / 'model.safetensors'}: {len(other)} tensor(s) not floating point: "
                         f"{', '.join(other[:6])}{' ...' if len(other) > 6 else ''}; training.export writes "
                         "floating-point weights: export again")
    return {name: tuple(s.get_shape()) for name, s in slices.items()}


def check_weights_fit(config: dict, shapes: dict[str, tuple], path: Path) -> None:
    """ConfigError (check_fits') naming export folder `path`'s model.safetensors when its weights (`shapes`, from
    weight_shapes) are not those of its config.json's model: a tensor missing, unexpected or of another shape
    (load_exported, train.init_from). Built on the meta device with a stand-in TP group of 1 (no parallel state
    needed: train.init_from checks an export on rank 0, before any group exists; a rank whose part of the file
    is missing would fail alone)."""
    with torch.device("meta"):
        model = PartiModel(_model_config(config, path / "config.json"), meta=True, tp_group=SizingGroup(1))
    megatron_extra = tuple(k for k in model.state_dict() if k.endswith("_extra_state"))  # (not exported)
    check_fits(model, {name: torch.empty(shape, device="meta") for name, shape in shapes.items()},
               str(path / EXPORT_WEIGHTS), optional=megatron_extra,
               advice="its config.json describes another model than its weights: export again")


def checked_export(path: Path) -> tuple[dict, dict[str, tuple]]:
    """(config.json, {name: shape} of model.safetensors) of an export folder whose weights are its config's:
    readable, floating point, of its checkpoint, every tensor of its model's shape (load_exported, and
    train.init_from on rank 0 before the build); ValueError (or ConfigError) naming the file otherwise."""
    from safetensors import safe_open

    config = read_export_config(path)
    with readable(path / EXPORT_WEIGHTS), safe_open(str(path / EXPORT_WEIGHTS), framework="pt") as f:
        shapes = weight_shapes(f, config, path)
    check_weights_fit(config, shapes, path)
    return config, shapes


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder training.export wrote (its two files)."""
    return (Path(path) / "config.json").is_file() and (Path(path) / EXPORT_WEIGHTS).is_file()


def assign_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load `weights` into a (meta-built) model by assignment: its parameters become these tensors, no copy.
    Assignment makes new Parameter objects: the attributes megatron-core sets on its parameters
    (tensor_model_parallel, partition_dim, sequence_parallel, ...) are carried over to them. The names and shapes
    are the caller's to check first (load_exported: common.state_file.check_fits)."""
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.load_state_dict(weights, strict=False, assign=True)  # (strict=False: megatron's _extra_state is not saved)
    for name, p in model.named_parameters():
        for key, value in attributes[name].items():
            setattr(p, key, value)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: no weights for {left} (still on the meta device)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    parser.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default="fp32",
                        help="the weights' precision in the file (bf16: half the size; load_exported casts to its "
                             "device's dtype either way)")
    parser.add_argument("--average", type=int, default=1, metavar="N",
                        help="export the mean weights of the N newest complete checkpoints up to --tag (default 1: "
                             "that checkpoint's own)")
    parser.add_argument("--ema", action="store_true",
                        help="export the moving average of the weights the checkpoint holds (train.ema_decay) "
                             "instead of the weights")
    args = parser.parse_args(argv)
    with command(errors=(CheckpointError, FileNotFoundError, ValueError), label="training.export"):
        out = export(args.run_dir, args.tag, args.out, dtype=args.dtype, average=args.average, ema=args.ema)
        print(f"exported to {out}")


if __name__ == "__main__":
    main()
