"""Typed configuration of the upsampler trainer (`python -m sr.train --config configs/sr/...`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.loop_control import LoopControl
from sr.model import SRModelConfig


@dataclass
class SRTrainConfig(LoopControl):
    steps: int = 100000
    """Optimizer steps."""
    batch_size: int = 16
    """High-resolution crops per step over all data-parallel processes."""
    crop: int = 192
    """Side of the high-resolution training crops (the low-resolution input is crop / scale)."""
    resize: int = 0
    """Images are first resized (shorter side) and centre-cropped to this, then randomly cropped to `crop`
    (0: to `crop` directly, no random crop). Images smaller than it are skipped, not enlarged: an interpolated
    target would teach the upsampler interpolation's blur."""
    tokenizer: str = ""
    """An image tokenizer export (vq.train's export.pt; vq.finetune_decoder's detokenizer) whose reconstructions
    are the low-resolution inputs, as Parti trains its upsampler on the detokenizer's output (Yu et al. 2022,
    fig. 4), which is what it upsamples in generation: each image, at train.resize = the tokenizer's image size x
    the model's scale, is downsampled to the tokenizer's size, encoded and decoded, then the pair is cropped to
    train.crop. '' = the downsampled images themselves (no tokenizer artefacts to learn to undo)."""
    lr: float = 1e-3
    """Adam learning rate (halved at 50% and 75% of train.steps: sr.train.lr_factor; a resume follows a changed
    train.steps or train.lr)."""
    l1: float = 1.0
    """Weight of the L1 loss to the high-resolution image."""
    perceptual: float = 0.0
    """Weight of LPIPS (0 disables it)."""
    lpips_backbone: str = ""
    """Local torchvision vgg16 state dict for LPIPS (vgg16-397923af.pth), needed when its weight is > 0; 'random':
    an untrained VGG, for smoke tests (the perceptual loss then means nothing)."""
    init_from: str = ""
    """An upsampler export (sr.train's export.pt) of the same model section to start from at step 0 ('' = fresh;
    a resume takes the checkpoint's weights)."""
    seed: int = 1234
    """Seed of weights and data order."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast on a GPU; on CPU the steps stay fp32)."""
    device: str = "auto"
    """auto | cuda | cpu: cuda (what the sbatch scripts set) makes a missing GPU an error instead of a run on
    the CPU; cpu hides the GPUs."""
    data_workers: int = 0
    """Processes decoding and resizing the next images while the model trains (0: in the training process;
    the data stream is the same at any count). A GPU needs them: PIL in the training process starves it."""
    log_interval: int = 10
    """Steps between metric lines."""
    eval_interval: int = 1000
    """Steps between evaluations on --val-data (PSNR against bicubic) and comparison grids."""
    save_interval: int = 1000
    """Steps between checkpoints."""


@dataclass
class SRConfig:
    model: SRModelConfig = field(default_factory=SRModelConfig)
    train: SRTrainConfig = field(default_factory=SRTrainConfig)
