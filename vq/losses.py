"""Tokenizer losses; the defaults are ViT-VQGAN's weights: l2 1.0, logit-Laplace 0.1, perceptual 0.1, adversarial 0.1.

    losses = VQGANLoss(LossConfig(), lpips_backbone="vgg16-397923af.pth")  # (or "random": smoke tests)
    g_loss, logs = losses.generator(images, decoder_output, vq_loss, step, last_layer)
    d_loss = losses.discriminator_loss(images, decoder_output, step[, critic=DDP(RealAndFake(discriminator))])

Perceptual loss: LPIPS from the `lpips` package. Its wheel ships the calibration (linear) layers only;
the VGG backbone normally downloads at run time, which is impossible offline, so the backbone weights
come from a local torchvision `vgg16` state-dict file, or, without one, stay random: a clearly logged
mode meant for tests. Adversarial loss (`discriminator`): a StyleGAN2-style residual discriminator with
minibatch standard deviation and the non-saturating logistic loss (ViT-VQGAN), or taming-transformers'
PatchGAN (pix2pix's NLayerDiscriminator: 4x4 convolutions, BatchNorm, LeakyReLU 0.2, a logit per
overlapping patch) with the hinge loss (VQGAN). Either is weighted by the one VQGAN adaptive weight (ratio of
the reconstruction and adversarial gradient norms at the decoder's last layer) and is off before `adv_start`.
The l1 term is taming's VQGAN reconstruction loss; logit-Laplace is DALL-E's (the dVAE's whole likelihood).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ConfigError

log = logging.getLogger("parti")

DISCRIMINATORS = ("stylegan", "patchgan")
LAPLACE_EPS = 0.1
"""DALL-E's pixel squeeze for the logit-Laplace likelihood: x in [0, 1] -> x (1 - 2 eps) + eps."""


@dataclass
class LossConfig:
    l2: float = 1.0
    """Weight of the mean squared error."""
    l1: float = 0.0
    """Weight of the mean absolute error (taming's VQGAN reconstruction term)."""
    logit_laplace: float = 0.0
    """Weight of the logit-Laplace likelihood (0: none). Needs a decoder that predicts it: vit_vqgan with
    model.logit_laplace=true (ViT-VQGAN's 0.1), or the dvae (DALL-E's 1); refused otherwise (vq.train)."""
    perceptual: float = 0.1
    """Weight of LPIPS (0 disables it)."""
    adversarial: float = 0.1
    """Weight of the adversarial loss, times the adaptive weight (0 disables the discriminator)."""
    adv_start: int = 0
    """Training step at which the adversarial loss (and the discriminator's training) starts."""
    discriminator: str = "stylegan"
    """stylegan (residual, minibatch stddev; non-saturating logistic loss: ViT-VQGAN) | patchgan (taming's
    NLayerDiscriminator, 3 layers, 64 channels, BatchNorm; hinge loss: VQGAN)."""


def split_output(out: torch.Tensor) -> torch.Tensor:
    """The decoder's reconstruction in [-1, 1]: its 3 channels, or the logit-Laplace means mapped back.

    The means predict the squeezed pixels of logit_laplace_nll, so they are unsqueezed (DALL-E's
    unmap_pixels) as well as sigmoided: without it the l2 term and the likelihood pulled the means towards
    two different targets, and decoded images had 0.8 of their contrast. Not clamped (gradients); decode()
    clamps."""
    if out.shape[1] != 6:
        return out
    return (torch.sigmoid(out[:, :3]) - LAPLACE_EPS) / (1 - 2 * LAPLACE_EPS) * 2 - 1


def logit_laplace_nll(images: torch.Tensor, out: torch.Tensor, eps: float = LAPLACE_EPS) -> torch.Tensor:
    """DALL-E's logit-Laplace negative log-likelihood of images in [-1, 1] (pixels squeezed into
    [eps, 1 - eps]); out[:, :3] are the means, out[:, 3:] the log-scales, in logit space."""
    x = ((images + 1) / 2).clamp(0, 1) * (1 - 2 * eps) + eps
    y = torch.logit(x)
    mu, log_b = out[:, :3], out[:, 3:].clamp(-7, 7)
    return ((y - mu).abs() * torch.exp(-log_b) + log_b + math.log(2) + torch.log(x * (1 - x))).mean()


RANDOM_BACKBONE = "random"
"""train.lpips_backbone's value for an untrained VGG: smoke tests only, the perceptual loss then means nothing."""


def check_lpips_backbone(weight: float, backbone: str | Path) -> None:
    """ConfigError for a perceptual loss weight > 0 without train.lpips_backbone (checked by the trainers before
    they write to the run directory)."""
    if weight > 0 and not str(backbone):
        raise ConfigError("a perceptual loss weight > 0 needs train.lpips_backbone: a local torchvision vgg16 state "
                          f"dict (vgg16-397923af.pth), or '{RANDOM_BACKBONE}' for smoke tests (a meaningless loss)")


def make_lpips(backbone: str | Path):
    """LPIPS (VGG; its linear heads ship with the lpips package) on the torchvision vgg16 state dict at
    `backbone` (train.lpips_backbone; no download here), or on a random VGG for RANDOM_BACKBONE. Unset, or a file
    that is not such a state dict: ConfigError naming train.lpips_backbone (the presets weigh LPIPS, and a random
    backbone trained the shipped presets with a meaningless term and a warning only)."""
    import lpips

    check_lpips_backbone(1.0, backbone)
    where = f"train.lpips_backbone={backbone}"
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if str(backbone) == RANDOM_BACKBONE:
        log.warning("LPIPS: a RANDOM VGG backbone (train.lpips_backbone=random: tests/offline only; perceptual "
                    "loss values are not meaningful)")
        return model.eval().requires_grad_(False)
    if not Path(backbone).is_file():
        raise ConfigError(f"{where}: no such file; expected a torchvision vgg16 state dict")
    try:
        state = torch.load(backbone, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load's many kinds (a damaged zip, a pickle of code): name the file
        raise ConfigError(f"{where}: not readable as a state dict ({type(e).__name__}: {str(e)[:120]}); expected a "
                          "torchvision vgg16 state dict") from None
    target = dict(model.net.named_parameters())
    for name in target:  # "slice3.10.weight" <- torchvision "features.10.weight"
        source = "features." + name.split(".", 1)[1]
        if not isinstance(state, dict) or source not in state or state[source].shape != target[name].shape:
            raise ConfigError(f"{where}: no {source} of shape {list(target[name].shape)}; expected a torchvision "
                              "vgg16 state dict")
        target[name].data.copy_(state[source])
    log.info(f"LPIPS: VGG backbone weights from {backbone}")
    return model.eval().requires_grad_(False)


class DiscriminatorBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        return (h + F.avg_pool2d(self.skip(x), 2)) / math.sqrt(2)


class Discriminator(nn.Module):
    """StyleGAN2-style residual discriminator: downsampling blocks to 4x4, minibatch stddev, linear head."""

    def __init__(self, image_size: int, channels: int = 64, max_channels: int = 512):
        super().__init__()
        blocks, c, size = [], channels, image_size
        self.stem = nn.Conv2d(3, c, 1)
        while size > 4:
            c_out = min(c * 2, max_channels)
            blocks.append(DiscriminatorBlock(c, c_out))
            c, size = c_out, size // 2
        self.blocks = nn.Sequential(*blocks)
        self.final = nn.Conv2d(c + 1, c, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, c), nn.LeakyReLU(0.2), nn.Linear(c, 1))

    def forward(self, x):
        h = self.blocks(F.leaky_relu(self.stem(x), 0.2))
        std = h.std(dim=0, unbiased=False).mean().expand(h.shape[0], 1, h.shape[2], h.shape[3])
        return self.head(F.leaky_relu(self.final(torch.cat([h, std], 1)), 0.2))


class PatchGAN(nn.Module):
    """taming-transformers' NLayerDiscriminator (the pix2pix PatchGAN): a 4x4 stride-2 conv and LeakyReLU 0.2,
    then n_layers - 1 more stride-2 and one stride-1 4x4 conv with BatchNorm (channels doubling up to 8 x
    ndf), and a 4x4 conv to one logit per patch: [B, 1, h, w] (30x30 at 256 px, 2x2 at 32). Module names
    and the N(0, 0.02) / BatchNorm N(1, 0.02) initialisation are taming's, so its `loss.discriminator.*`
    weights would load."""

    def __init__(self, channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers, mult = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)], 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),  # (BN's bias)
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        self.main = nn.Sequential(*layers, nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


class RealAndFake(nn.Module):
    """The discriminator on a real and a fake batch in one call, as two batches (the PatchGAN's BatchNorm
    normalises each on its own): what vq.train wraps in DDP, so that DDP broadcasts the buffers (BatchNorm's
    running statistics) once per step, before both batches. Called twice, DDP broadcast them again between the
    two, in place, over statistics the first batch's backward had saved (torch 2.11 then stops that backward:
    "modified by an inplace operation")."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)


class VQGANLoss(nn.Module):
    def __init__(self, cfg: LossConfig, image_size: int, lpips_backbone: str | Path = ""):
        super().__init__()
        if cfg.discriminator not in DISCRIMINATORS:
            raise ConfigError(f"loss.discriminator={cfg.discriminator!r} must be one of {', '.join(DISCRIMINATORS)}")
        self.cfg, self.hinge = cfg, cfg.discriminator == "patchgan"
        self.lpips = make_lpips(lpips_backbone) if cfg.perceptual > 0 else None
        self.discriminator = None
        if cfg.adversarial > 0:
            self.discriminator = PatchGAN() if self.hinge else Discriminator(image_size)

    def adaptive_weight(self, rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()

    def generator(self, images, out, vq_loss, step: int, last_layer: torch.Tensor | None = None):
        c = self.cfg
        recon = split_output(out)
        logs = {"l2": F.mse_loss(recon, images)}
        rec = c.l2 * logs["l2"]
        if c.l1 > 0:
            logs["l1"] = (recon - images).abs().mean()
            rec = rec + c.l1 * logs["l1"]
        if out.shape[1] == 6 and c.logit_laplace > 0:
            logs["logit_laplace"] = logit_laplace_nll(images, out)
            rec = rec + c.logit_laplace * logs["logit_laplace"]
        if self.lpips is not None:
            logs["perceptual"] = self.lpips(recon, images).mean()
            rec = rec + c.perceptual * logs["perceptual"]
        total = rec + vq_loss
        if self.discriminator is not None and step >= c.adv_start:
            # The discriminator with detached parameters: the generator step needs gradients through it
            # to `recon` only. Its own parameters get none here, so under DDP (vq.train wraps it for
            # discriminator_loss) its reducer sees exactly one backward per step, the discriminator's.
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            fake = torch.func.functional_call(self.discriminator, frozen, (recon,))
            # hinge (taming): -D(fake); logistic (StyleGAN2): the non-saturating softplus(-D(fake))
            logs["adversarial"] = -fake.mean() if self.hinge else F.softplus(-fake).mean()
            weight = self.adaptive_weight(rec, logs["adversarial"], last_layer) if last_layer is not None else 1.0
            total = total + c.adversarial * weight * logs["adversarial"]
        logs["vq"] = vq_loss
        return total, {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in logs.items()}

    def discriminator_loss(self, images, out, step: int, critic: nn.Module | None = None):
        """The discriminator's loss (logistic, or taming's hinge for the PatchGAN); `critic` runs it on the real
        and the fake images (vq.train passes its DDP-wrapped RealAndFake, so the gradients are averaged over the
        ranks), by default a RealAndFake of `self.discriminator`: two batches, as in taming."""
        if self.discriminator is None or step < self.cfg.adv_start:
            return None
        critic = RealAndFake(self.discriminator) if critic is None else critic
        real, fake = critic(images, split_output(out).detach())
        if self.hinge:
            return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        return F.softplus(-real).mean() + F.softplus(fake).mean()
