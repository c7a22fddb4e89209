r"""VQGAN (Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis") trained by vq.train.

    python -m vq.train --config configs/vq/vqgan.yaml --data 'laion/{00000..00099}.tar' --run-dir runs/vqgan \
        --set train.lpips_backbone=vgg16-397923af.pth
    model = VQGAN(ch=128, ch_mult=[1, 1, 2, 2, 4], n_embed=1024, embed_dim=256)   # taming f16: 16x16 codes at 256 px
    recon, aux = model(images)            # training: straight-through reconstruction, VQ losses, code usage
    codes = model.encode(images)          # frozen use, the interface of vq/tokenizer.py (ConvVQGAN's)
    images = model.decode(codes)

The architecture is not copied: VQGAN *is* vq/conv_vqgan.py's ConvVQGAN (taming's CNN encoder and decoder:
residual blocks per level, self-attention at attn_resolutions, a middle block, quant_conv / post_quant_conv,
`quantize.embedding`), with the same module and parameter names, so a taming `last.ckpt`'s weights load into it
by name (only the usage buffers below are not in it) and its encode/decode are ConvVQGAN's own. This subclass
adds what training needs: the learned codebook's losses (codebook term + beta 0.25 x commitment, as in the paper;
taming's `legacy` quantizer puts beta on the codebook term instead), the straight-through estimator, and code
usage / perplexity / dead-code restarts (vq/codebook.py). The perceptual loss, taming's PatchGAN with the hinge loss and
the adaptive weight are vq/losses.py's (`loss.discriminator: patchgan`). Exports are kind "vqgan": ConvVQGAN's keys plus
the usage buffers (`usage`, `last_used`, `step`), loaded through this class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vq.codebook import CodeUsage
from vq.conv_vqgan import ConvVQGAN

TAMING_F16 = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256, "embed_dim": 256,
              "n_embed": 1024, "resolution": 256, "attn_resolutions": [16]}
"""taming-transformers' vqgan_imagenet_f16_1024 model.yaml (ddconfig, embed_dim, n_embed)."""


class VQGAN(CodeUsage, ConvVQGAN):
    kind = "vqgan"
    encoder_parts = ("encoder", "quant_conv", "quantize")
    """The modules that decide the codes (vq.train's parameter count)."""

    def __init__(self, style: str = "taming", ch: int = 128, ch_mult: list[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, embed_dim: int = 256, n_embed: int = 1024,
                 resolution: int = 256, attn_resolutions: list[int] = (16,), l2_norm: bool = False,
                 beta: float = 0.25, dead_code_steps: int = 200):
        super().__init__(style, ch, ch_mult, num_res_blocks, z_channels, embed_dim, n_embed, resolution,
                         attn_resolutions, l2_norm)
        self.config.update(beta=beta, dead_code_steps=dead_code_steps)
        self.beta = beta
        self.init_usage(n_embed, dead_code_steps)

    @property
    def codebook(self) -> torch.nn.Embedding:
        """ConvVQGAN's `quantize.embedding` under the name CodeUsage restarts (a property, not a second
        registration, so the state dict keeps taming's single key)."""
        return self.quantize.embedding

    def forward(self, images: torch.Tensor, frozen_codes: bool = False):
        """Training pass: (reconstruction, {'vq_loss', 'codes', 'perplexity', 'usage'}); `frozen_codes`: the
        encoder and codebook stay as they are (the decoder draws the codes' embeddings)."""
        if frozen_codes:
            with torch.no_grad():
                codes = self.encode(images)
            out = self.decoder(self.post_quant_conv(self._codebook()[codes].permute(0, 3, 1, 2)))
            return out, {"vq_loss": images.new_zeros(()), "codes": codes, **self.usage_stats(codes)}
        z = self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)  # [B, grid, grid, embed_dim]
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.nearest(z)  # (fp32 with autocast off, as encode)
        q = self._codebook()[codes]
        # codebook term (moves the codes) + beta x commitment (moves the encoder), as the paper's eq. 4
        vq_loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        out = self.decoder(self.post_quant_conv((z + (q - z).detach()).permute(0, 3, 1, 2)))  # straight-through
        if self.training:
            self.track_usage(codes, z.detach().reshape(-1, z.shape[-1]))
        return out, {"vq_loss": vq_loss, "codes": codes, **self.usage_stats(codes)}

    def last_decoder_weight(self) -> torch.Tensor:
        """The decoder's last layer (taming measures the adaptive weight at decoder.conv_out.weight too)."""
        return self.decoder.conv_out.weight
