"""The super-resolution upsampler of Parti's last stage: WDSR models, trainer, export (README.md)."""
from common.quiet import quiet_third_party

quiet_third_party()  # first: this package's modules import vq's, which import megatron-core and DeepSpeed
