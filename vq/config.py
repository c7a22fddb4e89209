"""Typed configuration of the image-tokenizer trainer (`python -m vq.train --config configs/vq/...`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vq.losses import LossConfig


@dataclass
class VQModelConfig:
    kind: str = "vit_vqgan"
    """vit_vqgan (ViT-VQGAN: preset/layers/width/heads) | vqvae (VQ-VAE with an EMA codebook: width channels,
    log2(patch) strided convolutions; preset/layers/heads/logit_laplace unused)."""
    preset: str = "small"
    """small (8 layers, d512, 8 heads) | base (12, d768, 12) | large (32, d1280, 16); layers/width/heads below
    override it when > 0. (vq.finetune_decoder: the new decoder's shape.)"""
    layers: int = 0
    """Transformer blocks in the encoder and in the decoder (0: the preset's)."""
    width: int = 0
    """Model width (0: the preset's)."""
    heads: int = 0
    """Attention heads (0: the preset's)."""
    image_size: int = 256
    """Side of the (square) training and tokenizing images."""
    patch: int = 8
    """Patch side: the code grid is image_size / patch per side."""
    code_dim: int = 32
    """Dimension of the factorized, l2-normalised codes."""
    codebook_size: int = 8192
    """Number of codes."""
    logit_laplace: bool = False
    """Decoder predicts logit-Laplace parameters (6 channels) and the loss includes their likelihood."""
    dead_code_steps: int = 200
    """Codes unused for this many steps are restarted from batch latents."""
    ema_decay: float = 0.99
    """vqvae: decay of the codebook's moving averages."""


@dataclass
class VQTrainConfig:
    steps: int = 10000
    """Optimizer steps."""
    batch_size: int = 32
    """Images per step over all data-parallel processes."""
    lr: float = 1e-4
    """Adam learning rate (generator and discriminator)."""
    seed: int = 1234
    """Seed of weights and data order."""
    resize: int = 0
    """Images are first resized (shorter side) and centre-cropped to this, then randomly cropped to
    model.image_size (0: no random crop)."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast; on GPU)."""
    log_interval: int = 10
    """Steps between metric lines."""
    eval_interval: int = 500
    """Steps between reconstruction grids (recon_XXXXXXXX.png)."""
    save_interval: int = 1000
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Checkpoints kept in the run directory (older ones are deleted; 0 keeps all)."""
    lpips_backbone: str = ""
    """Local torchvision vgg16 state dict for LPIPS ('' = random backbone, for tests)."""


@dataclass
class VQConfig:
    model: VQModelConfig = field(default_factory=VQModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: VQTrainConfig = field(default_factory=VQTrainConfig)
