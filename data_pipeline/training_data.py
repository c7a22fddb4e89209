"""What the trainer reads: the `data:` section of a run (`DataConfig`) and the dataset it names.

    dataset = training_dataset(cfg.data, cfg.model, seed=cfg.train.seed)
    text_ids, codes = dataset[i]          # int64 [text_seq_len], int64 [image_seq_len]
    held_out = held_out_dataset(cfg.data, cfg.model, cfg.train.seed, samples=64, tokenizers=data_tokenizers(dataset))
    sets = held_out_sets(cfg.data, cfg.model, cfg.train.seed, 64, data_tokenizers(dataset))  # {name: dataset}

The trainer reads it through data_pipeline/loader.py (`data.workers` processes reading ahead).

Code shards (data_pipeline/pretokenize.py) are checked against the model before any work: a codebook or
vocabulary larger than the model's, or other sequence lengths, are refused naming the shard folder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from common.config import ConfigError, require
from data_pipeline.code_shards import blend_items, data_tokenizers, open_training_data, other_tokenizers
from data_pipeline.errors import DataError
from data_pipeline.synthetic import SyntheticCodes

SYNTHETIC_SIZE = 1024
"""Samples in the synthetic training set."""


@dataclass
class DataConfig:
    """Where training samples come from."""

    synthetic: bool = True
    """Use a small generated code-shard set (no prepared data needed)."""
    shards: str = ""
    """Code-shard folder from data_pipeline.pretokenize when synthetic is false; several blend by weight:
    'codes/a:3,codes/b:1'."""
    workers: int = 2
    """DataLoader worker processes per rank that read micro-batches ahead of the step being trained
    (data_pipeline/loader.py); 0: read in the training process at the start of each step. The batches are
    the same whatever the number."""
    read_ahead_steps: int = 2
    """Steps of micro-batches the workers keep requested ahead of training (with workers > 0)."""
    valid_shards: str = ""
    """Code-shard folder of held-out samples (not in data.shards; same tokenizers) whose loss the trainer
    measures every train.eval_interval steps ('' with synthetic data: generated samples the training set does
    not hold). Several named sets, 'coco=codes/coco_val,laion=codes/laion_val', are measured apart: each logged
    as valid_loss_<name>, their mean as valid_loss (Megatron-LM's multiple validation sets)."""

    def validate(self) -> DataConfig:
        require(self.workers >= 0, f"data.workers={self.workers} must be >= 0 (0: read in the training process)")
        require(self.read_ahead_steps >= 1, f"data.read_ahead_steps={self.read_ahead_steps} must be >= 1")
        # (synthetic is the default: a config that names its shards but not synthetic: false trained on random codes)
        require(not (self.synthetic and self.shards), f"data.shards={self.shards!r} with data.synthetic=true: the run "
                "would train on generated samples and never read the shards; set data.synthetic=false to train on "
                "them (or drop data.shards)")
        return self


def training_dataset(data: DataConfig, model, seed: int):
    """The dataset `data` names, for ModelConfig `model`; ConfigError naming data.shards when it does not fit
    (or naming the data.* key that breaks its rule)."""
    data.validate()
    if data.synthetic:
        return SyntheticCodes(model, size=SYNTHETIC_SIZE, seed=seed)
    try:
        return open_checked_once(data.shards, model)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.shards={data.shards!r}: {e}") from e


def open_checked_once(spec: str, model):
    """open_training_data(spec, model) in every process of the job, its shards checked by rank 0 alone: each
    check is a stat of every shard (and a read of a changed one's metadata), which on every rank of a large job
    is a metadata storm on the parallel file system (200,000 shards x 512 ranks: ~100 million stats at every
    start and requeue). Rank 0's refusal is every rank's (a DataError with its message)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return open_training_data(spec, model)
    dataset, error = None, None
    if dist.get_rank() == 0:
        try:
            dataset = open_training_data(spec, model)
        except Exception as e:  # noqa: BLE001 - the other ranks wait in the broadcast below for any outcome
            error = e
    verdict = [None if error is None else (isinstance(error, ValueError | FileNotFoundError), str(error))]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is None:
        return dataset if dataset is not None else open_training_data(spec, model, check_shards=False)
    refused, message = verdict[0]
    if error is not None and not refused:
        raise error
    raise DataError(message) if refused else RuntimeError(f"rank 0 could not open {spec}: {message}")


def folders(spec: str) -> set[Path]:
    """The folders of a data.shards-style spec ('codes/a:3,codes/b:1'), resolved."""
    return {Path(folder).resolve() for _, folder, _ in blend_items(spec)}


def named_sets(spec: str) -> dict[str, str]:
    """data.valid_shards as {name: folder}: 'coco=codes/coco_val,laion=codes/laion_val' names each set; a spec
    without names (a folder, or a blend 'codes/a:3,codes/b:1') is one set named ''. ConfigError for a spec that
    names some of its sets only, or one name twice."""
    items = [item.strip() for item in spec.split(",")]
    # (an item that is a folder as it stands, a weight aside, is one: e.g. a relative 'split=val' of a Hive-style
    # layout, not a set 'split' of folder 'val')
    named = [None if _existing_folder(item) else re.fullmatch(r"(\w+)=(.+)", item) for item in items]
    where = f"data.valid_shards={spec!r}"
    if not any(named):
        # ('coco-val=codes/a': a name of other characters read as a folder that is not there)
        odd = [item for item in items if re.match(r"[^/\\:=]+=", item) and not _existing_folder(item)]
        require(not odd, f"{where}: {odd[0]!r} is neither a folder nor name=folder (a set's name is letters, "
                         "digits and _, as it becomes the metric valid_loss_<name>)" if odd else "")
        return {"": spec}
    require(all(named), f"{where}: name every held-out set (name=folder, comma-separated) or none")
    names = [m[1] for m in named]
    require(len(set(names)) == len(names), f"{where}: a set's name is given twice")
    return {m[1]: m[2] for m in named}


def _existing_folder(item: str) -> bool:
    """Whether a data.valid_shards item ('folder' or 'folder:weight') names a folder that is there."""
    return Path(re.sub(r":[0-9.eE+-]+$", "", item)).is_dir()


def held_out_sets(data: DataConfig, model, seed: int, samples: int, tokenizers: dict | None) -> dict:
    """{name: held-out dataset} of data.valid_shards (`named_sets`; '' for a spec without names), each following
    held_out_dataset's rules."""
    if data.synthetic and not data.valid_shards:
        return {"": held_out_dataset(data, model, seed, samples, tokenizers)}
    return {name: held_out_dataset(replace(data, valid_shards=folder), model, seed, samples, tokenizers)
            for name, folder in named_sets(data.valid_shards).items()}


def held_out_dataset(data: DataConfig, model, seed: int, samples: int, tokenizers: dict | None):
    """The held-out samples whose loss the trainer measures (data.valid_shards; with synthetic data and none
    named, `samples` generated ones past the training set's). ConfigError naming data.valid_shards when it
    does not fit the model, holds fewer than `samples`, or was made with other tokenizers than `tokenizers`
    (those of the training data, code_shards.data_tokenizers; None: unknown, not compared): its codes or text ids
    would mean other things to the model."""
    if data.synthetic and not data.valid_shards:
        return SyntheticCodes(model, size=samples, seed=seed, first=SYNTHETIC_SIZE)
    where = f"data.valid_shards={data.valid_shards!r}"
    require(data.valid_shards, f"{where}: train.eval_interval needs held-out data: set data.valid_shards to a "
                               "code-shard folder (data_pipeline.pretokenize) of samples not in data.shards")
    shared = folders(data.valid_shards) & folders(data.shards)
    require(not shared, f"{where}: {', '.join(sorted(map(str, shared)))} is also in data.shards: its samples "
                        "are trained on, so their loss is not a held-out one")
    try:
        held_out = open_checked_once(data.valid_shards, model)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: {e}") from e
    require(len(held_out) >= samples, f"{where}: holds {len(held_out):,} samples; train.eval_batches global batches "
                                      f"of train.global_batch_size need {samples:,}")
    ours = data_tokenizers(held_out)
    differ = other_tokenizers(ours, tokenizers) if ours and tokenizers else []
    require(not differ, f"{where}: made with another {' and '.join(differ)} than the training data "
                        f"(data.shards={data.shards!r}): its codes or text ids would mean other things to the model")
    return held_out
