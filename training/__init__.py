"""A training run: its config, the trainer, the DeepSpeed engine and its patches, checkpoints, export, the
layout planner (README.md)."""
from common.quiet import quiet_third_party

quiet_third_party()  # first: this package's modules import megatron-core and DeepSpeed, which warn at import
