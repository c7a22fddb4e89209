"""Sampling, generation, FID, CLIP score, the PartiPrompts and COCO-30k harnesses and their reports (README.md)."""
from common.quiet import quiet_third_party

quiet_third_party()  # first: this package's modules import megatron-core and DeepSpeed, which warn at import
