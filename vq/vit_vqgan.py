"""ViT-VQGAN (Yu et al. 2021, "Vector-quantized Image Modeling with Improved VQGAN"): the image tokenizer.

    model = ViTVQGAN(**VIT_VQGAN_PRESETS["small"], image_size=256)     # 32x32 codes from 8x8 patches
    recon, aux = model(images)            # training: straight-through reconstruction, VQ losses, code usage
    codes = model.encode(images)          # frozen use, the interface of vq/tokenizer.py
    images = model.decode(codes)

Encoder: 8x8 patches -> ViT blocks -> a linear projection to a low-dimensional code space (32 by
default, "factorized codes"); latents and codebook entries are l2-normalised, so the nearest code is
the one of highest cosine similarity. Straight-through estimator, commitment loss (beta = 0.25) and
codebook loss; code usage is tracked (EMA of counts, perplexity) and codes unused for
`dead_code_steps` training steps are restarted from random latents of the batch. Decoder: a linear
map back to the model width, ViT blocks, a linear map to pixels per patch. The decoder outputs 6
channels per pixel when `logit_laplace` is on (means and log-scales of the logit-Laplace loss), else 3.
The decoder may have its own shape (`dec_layers`, `dec_width`, `dec_heads`; 0: the encoder's), as Parti's
detokenizer, a larger decoder fine-tuned on a frozen encoder's codes (vq/finetune_decoder.py), does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vq.codebook import CodeUsage
from vq.losses import split_output

VIT_VQGAN_PRESETS = {  # the ViT-VQGAN paper's shapes (MLP 4 x width)
    "small": dict(layers=8, width=512, heads=8),
    "base": dict(layers=12, width=768, heads=12),
    "large": dict(layers=32, width=1280, heads=16),
}
ENCODER_PARTS = ("patch_embed", "enc_pos", "encoder", "enc_out", "codebook")
"""The modules that decide the codes; the decoder (dec_in, dec_pos, decoder, dec_out) only draws them."""


class Block(nn.Module):
    """Pre-LN transformer block (bidirectional attention over patches) with torch SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


def default_heads(width: int) -> int:
    """Attention heads of a width whose heads are not given: 64 channels each (at least one)."""
    return max(1, width // 64)


class ViTVQGAN(CodeUsage, nn.Module):
    kind = "vit_vqgan"

    def __init__(self, image_size: int = 256, patch: int = 8, layers: int = 8, width: int = 512, code_dim: int = 32,
                 codebook_size: int = 8192, beta: float = 0.25, logit_laplace: bool = False,
                 dead_code_steps: int = 200, heads: int = 0, dec_layers: int = 0, dec_width: int = 0,
                 dec_heads: int = 0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size {patch}")
        self.config = dict(image_size=image_size, patch=patch, layers=layers, width=width, code_dim=code_dim,
                           codebook_size=codebook_size, beta=beta, logit_laplace=logit_laplace,
                           dead_code_steps=dead_code_steps)
        # (recorded only when set: a tokenizer saved before these existed keeps its config, hence its hash)
        self.config.update({k: v for k, v in dict(heads=heads, dec_layers=dec_layers, dec_width=dec_width,
                                                  dec_heads=dec_heads).items() if v})
        self.image_size, self.patch, self.grid = image_size, patch, image_size // patch
        self.beta = beta
        self.out_channels = 6 if logit_laplace else 3
        heads = heads or default_heads(width)
        dec_width = dec_width or width
        dec_heads = dec_heads or (heads if dec_width == width else default_heads(dec_width))
        if width % heads or dec_width % dec_heads:
            raise ValueError(f"widths {width} (encoder) and {dec_width} (decoder) must be multiples of their attention "
                             f"heads ({heads}, {dec_heads})")
        n = self.grid * self.grid
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.enc_pos = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.encoder = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.enc_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, code_dim))
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.dec_in = nn.Linear(code_dim, dec_width)
        self.dec_pos = nn.Parameter(torch.randn(1, n, dec_width) * 0.02)
        self.decoder = nn.Sequential(*(Block(dec_width, dec_heads) for _ in range(dec_layers or layers)))
        self.dec_out = nn.Sequential(nn.LayerNorm(dec_width), nn.Linear(dec_width, self.out_channels * patch * patch))
        self.init_usage(codebook_size, dead_code_steps)

    # ------------------------------------------------------------------------------------------
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] in [-1, 1] -> l2-normalised latents [B, grid*grid, code_dim]."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.enc_pos
        return F.normalize(self.enc_out(self.encoder(x)), dim=-1)

    def codes_of(self, z: torch.Tensor) -> torch.Tensor:
        # In fp32 with autocast off: under bf16 autocast (vq.train) the similarity matmul is rounded to
        # 8 significant bits, which reorders near-tied codes (~3% of them), so training would quantise
        # differently from the fp32 search of pre-tokenization.
        with torch.autocast(z.device.type, enabled=False):
            return (z.float() @ F.normalize(self.codebook.weight.float(), dim=-1).t()).argmax(-1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.codebook(codes), dim=-1)

    def pixels(self, q: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, N, code_dim] -> decoder output [B, out_channels, S, S]."""
        x = self.dec_out(self.decoder(self.dec_in(q) + self.dec_pos))
        b, g, p = x.shape[0], self.grid, self.patch
        x = x.view(b, g, g, self.out_channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.out_channels, g * p, g * p)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes_of(self.latents(images)).view(-1, self.grid, self.grid)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        # (with logit_laplace: the means mapped back to [-1, 1], as the losses read them)
        return split_output(self.pixels(self.embed(codes.flatten(1)))).clamp(-1, 1)

    # ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, frozen_codes: bool = False):
        """Training pass: (decoder output, {'vq_loss', 'codes', 'perplexity', 'usage'}). `frozen_codes`: the
        encoder and codebook are fixed (detokenizer fine-tuning): the decoder draws the codes' own embeddings,
        no VQ loss, no code restarts (their usage is still tracked)."""
        if frozen_codes:  # (the codes of encode() and pre-tokenization, fp32: bf16 latents moved ~1% of them)
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                codes = self.codes_of(self.latents(images.float()))
            vq_loss, out = images.new_zeros(()), self.pixels(self.embed(codes))
            if self.training:  # (the codes' usage on this data, logged; the frozen codebook is not restarted)
                self.track_usage(codes, None, restart=False)
        else:
            z = self.latents(images)
            codes = self.codes_of(z)
            q = self.embed(codes)
            vq_loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
            out = self.pixels(z + (q - z).detach())  # straight-through estimator
            if self.training:
                self.track_usage(codes, z.reshape(-1, z.shape[-1]))
        return out, {"vq_loss": vq_loss, "codes": codes, **self.usage_stats(codes)}

    def last_decoder_weight(self) -> torch.Tensor:
        """The decoder's last layer (the adversarial loss's adaptive weight is measured there)."""
        return self.dec_out[1].weight
