"""Process groups, the parallel layout, the Parti model from megatron-core TP layers, kernel selection, CPU
compatibility (README.md)."""
from common.quiet import quiet_third_party

quiet_third_party()  # first: this package's modules import megatron-core and DeepSpeed, which warn at import
