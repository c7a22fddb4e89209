"""What the trainer reads: the `data:` section of a run (`DataConfig`) and the dataset it names.

    dataset = training_dataset(cfg.data, cfg.model, seed=cfg.train.seed)
    text_ids, codes = dataset[i]          # int64 [text_seq_len], int64 [image_seq_len]

The trainer reads it through data_pipeline/loader.py (`data.workers` processes reading ahead).

Code shards (data_pipeline/pretokenize.py) are checked against the model before any work: a codebook or
vocabulary larger than the model's, or other sequence lengths, are refused naming the shard folder.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError, require
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
    workers: int = 2
    """DataLoader worker processes per rank that read micro-batches ahead of the step being trained
    (data_pipeline/loader.py); 0: read in the training process at the start of each step. The batches are
    the same whatever the number."""
    read_ahead_steps: int = 2
    """Steps of micro-batches the workers keep requested ahead of training (with workers > 0)."""

    def validate(self) -> DataConfig:
        require(self.workers >= 0, f"data.workers={self.workers} must be >= 0 (0: read in the training process)")
        require(self.read_ahead_steps >= 1, f"data.read_ahead_steps={self.read_ahead_steps} must be >= 1")
        return self


def training_dataset(data: DataConfig, model, seed: int):
    """The dataset `data` names, for ModelConfig `model`; ConfigError naming data.shards when it does not fit
    (or naming the data.* key that breaks its rule)."""
    data.validate()
    if data.synthetic:
        return SyntheticCodes(model, size=1024, seed=seed)
    try:
        return open_training_data(data.shards, model)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.shards={data.shards!r}: {e}") from e
