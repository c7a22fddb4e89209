"""Typed configuration of the image-tokenizer trainer (`python -m vq.train --config configs/vq/...`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from common.loop_control import LOOP_MINIMA, LoopControl
from vq.losses import LossConfig


@dataclass
class VQModelConfig:
    kind: str = "vit_vqgan"
    """vit_vqgan (ViT-VQGAN: preset/layers/width/heads) | vqvae (VQ-VAE with an EMA codebook: width channels,
    log2(patch) strided convolutions) | vqgan (taming's VQGAN CNN: width = ch, ch_mult, res_blocks,
    attn_resolutions, z_channels) | dvae (DALL-E's discrete VAE: width = n_hid, res_blocks, the tau_* and kl_*
    schedules; always logit-Laplace). preset/layers/heads are ViT-VQGAN's only."""
    preset: str = "small"
    """small (8 layers, d512, 8 heads) | base (12, d768, 12) | large (32, d1280, 16); layers/width/heads below
    override it when > 0. (vq.finetune_decoder: the new decoder's shape.)"""
    layers: int = 0
    """Transformer blocks in the encoder and in the decoder (0: the preset's)."""
    width: int = 0
    """Model width (0: the preset's). vqvae: conv channels (0: 128); vqgan: base channels `ch` (0: taming's 128);
    dvae: `n_hid` (0: DALL-E's 256)."""
    heads: int = 0
    """Attention heads (0: the preset's)."""
    image_size: int = 256
    """Side of the (square) training and tokenizing images."""
    patch: int = 8
    """Patch side: the code grid is image_size / patch per side."""
    code_dim: int = 32
    """Dimension of the factorized, l2-normalised codes (vit_vqgan); of the code embeddings (vqvae; vqgan:
    taming's embed_dim); dvae: channels of the decoder's input conv, whose columns are the codebook (DALL-E's
    n_init, 128)."""
    codebook_size: int = 8192
    """Number of codes."""
    logit_laplace: bool = False
    """vit_vqgan: decoder predicts logit-Laplace parameters (6 channels) and the loss includes their likelihood
    (the dvae always does; vqvae and vqgan decode 3 channels)."""
    dead_code_steps: int = 200
    """Codes unused for this many steps are restarted from batch latents (0: never; the dvae never restarts)."""
    ema_decay: float = 0.99
    """vqvae: decay of the codebook's moving averages."""
    res_blocks: int = 2
    """vqvae: residual blocks; vqgan: residual blocks per level (taming's num_res_blocks); dvae: blocks per group
    (DALL-E's n_blk_per_group)."""
    ch_mult: list[int] | None = None
    """vqgan: channel multiplier of each resolution level; len - 1 halvings, so patch must be 2^(len - 1)
    (null: taming f16's [1, 1, 2, 2, 4], patch 16)."""
    attn_resolutions: list[int] | None = None
    """vqgan: feature-map sides at which the encoder and decoder levels self-attend (null: the code grid's side,
    as taming f16's [16] at 256 px; [] for none; the middle blocks always attend)."""
    z_channels: int = 0
    """vqgan: encoder output channels before the 1x1 quant_conv into code_dim (0: code_dim; taming: 256)."""
    tau_start: float = 1.0
    """dvae: Gumbel-softmax temperature at step 0 (DALL-E: 1)."""
    tau_end: float = 0.0625
    """dvae: temperature from tau_steps on (DALL-E: 1/16)."""
    tau_steps: int = 150000
    """dvae: steps of the cosine annealing from tau_start to tau_end (DALL-E: 150,000)."""
    kl_weight: float = 6.6
    """dvae: weight beta of the KL term to the uniform prior once ramped up (DALL-E: 6.6). Against the likelihood
    per pixel value a cell's KL weighs kl_weight / (3 patch^2): 6.6 / 192 at DALL-E's patch 8; scale it with
    that count when the patch changes (a much heavier KL collapses the posterior towards the prior)."""
    kl_warmup_steps: int = 5000
    """dvae: steps of the cosine ramp of the KL weight from 0 (DALL-E: 5000)."""


@dataclass
class VQTrainConfig(LoopControl):
    steps: int = 10000
    """Optimizer steps."""
    batch_size: int = 32
    """Images per step over all data-parallel processes."""
    lr: float = 1e-4
    """Peak learning rate of the generator and the discriminator (common/schedule.py)."""
    min_lr: float = 0.0
    """Learning rate at the end of a cosine or linear decay."""
    warmup_steps: int = 0
    """Linear warmup steps to lr (0: none)."""
    lr_stable_steps: int = 0
    """Steps at lr between the warmup and the decay (a warmup-stable-decay schedule: common/schedule.py)."""
    lr_decay: str = "constant"
    """After the warmup and lr_stable_steps: cosine | linear | minus_sqrt | exponential (lr to min_lr) | constant
    (stays at lr: taming, LlamaGen)."""
    lr_decay_steps: int = 0
    """Steps of the decay, then min_lr to the end (0: until train.steps; DALL-E's dVAE: 1.2M of 3M)."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights, which the export takes instead of the last
    weights (0: off; DALL-E's dVAE: 0.999)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay of Linear and Conv weights, not of biases, norms, position embeddings
    and Embedding codebooks (the dVAE's codebook is its decoder's input conv: decayed; DALL-E's dVAE: 1e-4).
    A resume may turn it on or off: each parameter keeps its Adam state."""
    adam_beta1: float = 0.9
    """Adam's beta1 (generator and discriminator; taming's VQGAN: 0.5)."""
    adam_beta2: float = 0.99
    """Adam's beta2 (taming's VQGAN: 0.9; DALL-E's dVAE: 0.999)."""
    seed: int = 1234
    """Seed of weights and data order."""
    resize: int = 0
    """Images are first resized (shorter side) and centre-cropped to this, then randomly cropped to
    model.image_size (0: no random crop)."""
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
    eval_interval: int = 500
    """Steps between reconstruction grids (recon_XXXXXXXX.png)."""
    save_interval: int = 1000
    """Steps between checkpoints."""
    init_from: str = ""
    """Weights to start from at step 0 ('' = fresh; a resume takes the checkpoint's): a tokenizer export of
    model.kind, or for vqgan a taming-transformers last.ckpt (and its PatchGAN): vq/init_weights.py."""
    lpips_backbone: str = ""
    """Local torchvision vgg16 state dict for LPIPS (vgg16-397923af.pth), needed when its weight is > 0; 'random':
    an untrained VGG, for smoke tests (the perceptual loss then means nothing)."""


IMAGE_TRAIN_MINIMA = (*LOOP_MINIMA, ("steps", 0, "optimizer steps to run, 0: export the starting weights"),
                      ("batch_size", 1, "images per step over all processes"),
                      ("log_interval", 1, "steps between metric lines"),
                      ("eval_interval", 1, "steps between evaluations"),
                      ("save_interval", 1, "steps between checkpoints"),
                      ("data_workers", 0, "decoding processes, 0: in the training process"))
"""The image trainers' (vq.train, vq.finetune_decoder, sr.train) rules for their train section's counts
(common.config.check_minima): a 0 interval failed as a division by zero at the first step, a 0 batch as an empty
stack."""

MODEL_MINIMA = (("layers", 0, "0: the preset's"), ("width", 0, "0: the preset's or the kind's"),
                ("heads", 0, "0: the preset's"), ("z_channels", 0, "0: the kind's"), ("image_size", 1, "pixels"),
                ("patch", 1, "pixels per code"), ("code_dim", 1, "channels per code"),
                ("codebook_size", 2, "codes"), ("res_blocks", 0, "residual blocks"),
                ("tau_steps", 1, "steps of the temperature's schedule"),
                ("kl_warmup_steps", 0, "steps of the KL weight's ramp"), ("kl_weight", 0, "the KL term's weight"))
LOSS_MINIMA = tuple((name, 0, "a loss weight: a negative one maximises its term") for name in
                    ("l2", "l1", "logit_laplace", "perceptual", "adversarial")) + (
                        ("adv_start", 0, "the step the adversarial loss starts at"),)
"""vq.train's rules for its model and loss sections (common.config.check_minima): a negative layer count built
no blocks and trained, a negative weight maximised its loss."""


@dataclass
class VQConfig:
    model: VQModelConfig = field(default_factory=VQModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: VQTrainConfig = field(default_factory=VQTrainConfig)
