"""The frozen image tokenizer: its interface, ViT-VQGAN and CNN VQGAN models, losses, trainer (README.md)."""
from common.quiet import quiet_third_party

quiet_third_party()  # first: this package's modules import megatron-core and DeepSpeed, which warn at import
