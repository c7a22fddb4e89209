"""VQ-VAE (van den Oord et al. 2017) with an exponential-moving-average codebook: a convolutional tokenizer.

    model = VQVAE(image_size=256, patch=8, width=128, code_dim=64, codebook_size=512)   # 32x32 codes
    recon, aux = model(images)            # training: straight-through reconstruction, commitment loss, usage
    codes = model.encode(images)          # frozen use, the interface of vq/tokenizer.py
    images = model.decode(codes)

Encoder: log2(patch) strided 4x4 convolutions, residual blocks (ReLU, 3x3, ReLU, 1x1), a 1x1 projection to
`code_dim`; the nearest code by squared distance (fp32, autocast off, as ConvVQ and ViT-VQGAN search).
Codebook: not learned by gradients but updated as EMAs of the assigned latents' counts and sums (Razavi et
al. 2019's "VQ-VAE-2" rule, decay `ema_decay`, Laplace-smoothed counts), all-reduced over the data-parallel
ranks, so every replica keeps the same codebook; the loss holds only the commitment term (beta = 0.25).
Unused codes are restarted from batch latents (vq/codebook.py), their EMA statistics with them. Decoder: the
mirror image with transposed convolutions to 3 channels.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vq.codebook import CodeUsage


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 1))

    def forward(self, x):
        return x + self.body(x)


class VQVAE(CodeUsage, nn.Module):
    kind = "vqvae"

    def __init__(self, image_size: int = 256, patch: int = 8, width: int = 128, code_dim: int = 64,
                 codebook_size: int = 512, beta: float = 0.25, ema_decay: float = 0.99, dead_code_steps: int = 200,
                 res_blocks: int = 2):
        super().__init__()
        downs = round(math.log2(patch))
        if 2**downs != patch or image_size % patch:
            raise ValueError(f"patch {patch} must be a power of 2 dividing image_size {image_size} (VQ-VAE downsamples "
                             "by strided convolutions)")
        self.config = dict(image_size=image_size, patch=patch, width=width, code_dim=code_dim,
                           codebook_size=codebook_size, beta=beta, ema_decay=ema_decay, dead_code_steps=dead_code_steps,
                           res_blocks=res_blocks)
        self.image_size, self.grid, self.beta, self.ema_decay = image_size, image_size // patch, beta, ema_decay
        down = [layer for i in range(downs) for layer in (nn.Conv2d(3 if i == 0 else width, width, 4, 2, 1), nn.ReLU())]
        self.encoder = nn.Sequential(*down, *(ResBlock(width) for _ in range(res_blocks)), nn.ReLU(),
                                     nn.Conv2d(width, code_dim, 1))
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.codebook.weight.requires_grad_(False)  # (EMA updates, not gradients)
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.weight.detach().clone())
        up = [layer for i in range(downs) for layer in
              ((nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ReLU()) if i < downs - 1
               else (nn.ConvTranspose2d(width, 3, 4, 2, 1),))]
        self.decoder = nn.Sequential(nn.Conv2d(code_dim, width, 3, padding=1),
                                     *(ResBlock(width) for _ in range(res_blocks)), nn.ReLU(), *up)
        self.init_usage(codebook_size, dead_code_steps)

    # ------------------------------------------------------------------------------------------
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] in [-1, 1] -> latents [B, code_dim, grid, grid]."""
        return self.encoder(images)

    def codes_of(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codes [B, grid, grid] of latents [B, D, grid, grid], in fp32 with autocast off."""
        with torch.autocast(z.device.type, enabled=False):
            flat, e = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float(), self.codebook.weight.float()
            dist_ = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
            return dist_.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook(codes).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes_of(self.latents(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embed(codes.view(-1, self.grid, self.grid))).clamp(-1, 1)

    def forward(self, images: torch.Tensor, frozen_codes: bool = False):
        """Training pass: (reconstruction, {'vq_loss', 'codes', 'perplexity', 'usage'}); `frozen_codes`: the
        encoder and codebook stay as they are (the decoder draws the codes' embeddings)."""
        z = self.latents(images)
        codes = self.codes_of(z)
        q = self.embed(codes)
        if frozen_codes:
            vq_loss, out = images.new_zeros(()), self.decoder(q.detach())
        else:
            vq_loss = self.beta * F.mse_loss(z, q.detach())
            out = self.decoder(z + (q - z).detach())  # straight-through estimator
            if self.training:
                flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                self._ema_update(codes.flatten(), flat)
                self.track_usage(codes, flat)
        return out, {"vq_loss": vq_loss, "codes": codes, **self.usage_stats(codes)}

    def last_decoder_weight(self) -> torch.Tensor:
        return self.decoder[-1].weight

    @torch.no_grad()
    def _ema_update(self, codes: torch.Tensor, flat: torch.Tensor) -> None:
        """Codebook <- EMA of the latents assigned to each code (counts and sums over all data-parallel ranks)."""
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat.float())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n  # (Laplace: no division by 0)
        self.codebook.weight.copy_(self.ema_sum / smoothed[:, None])

    def restarted(self, dead: torch.Tensor) -> None:
        self.ema_sum[dead] = self.codebook.weight[dead].to(self.ema_sum.dtype)
        self.ema_count[dead] = 1.0
