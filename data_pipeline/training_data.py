"""What the trainer reads: the `data:` section of a run (`DataConfig`) and the dataset it names.

    dataset = training_dataset(cfg.data, cfg.model, seed=cfg.train.seed)
    text_ids, codes = dataset[i]          # int64 [text_seq_len], int64 [image_seq_len]

Code shards (data_pipeline/pretokenize.py) are checked against the model before any work: a codebook or
vocabulary larger than the model's, or other sequence lengths, are refused naming the shard folder.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError
from data_pipeline.code_shards import open_training_data
from data_pipeline.synthetic import SyntheticCodes


@dataclass
class DataConfig:
    """Where training samples come from."""

    synthetic: bool = True
    """Use a small generated code-shard set (no prepared data needed)."""
    shards: str = ""
    """Code-shard folder from data_pipeline.pretokenize when synthetic is false; several blend by weight:
    'codes/a:3,codes/b:1'."""


def training_dataset(data: DataConfig, model, seed: int):
    """The dataset `data` names, for ModelConfig `model`; ConfigError naming data.shards when it does not fit."""
    if data.synthetic:
        return SyntheticCodes(model, size=1024, seed=seed)
    try:
        return open_training_data(data.shards, model)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.shards={data.shards!r}: {e}") from e
