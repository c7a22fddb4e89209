"""DALL-E's discrete VAE (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation"): a tokenizer trained by vq.train.

    python -m vq.train --config configs/vq/dvae.yaml --data 'laion/{00000..00099}.tar' --run-dir runs/dvae
    model = DVAE(image_size=256, patch=8, n_hid=256, codebook_size=8192)   # DALL-E: 32x32 codes from 8192
    recon, aux = model(images)            # training: Gumbel-softmax relaxation, KL to the uniform prior
    codes = model.encode(images)          # frozen use: argmax of the encoder's logits (no Gumbel noise)
    images = model.decode(codes)          # the decoder on one-hot codes

Architecture (openai/DALL-E's dall_e/encoder.py, decoder.py): the encoder is an input 7x7 conv, then
log2(patch) + 1 groups of `res_blocks` residual blocks (ReLU, 3x3, 3x3, 3x3, 1x1 at a quarter of the width,
the residual scaled by 1 / (blocks in all)^2) of width n_hid x 1, 2, 4, 8, max-pooled by 2 between groups, and a
ReLU + 1x1 conv to `codebook_size` logits per grid cell. The decoder starts with a 1x1 conv from the one-hot (or
relaxed) codes to `code_dim` channels: its weight columns are the codebook, so codes need no embedding table
of their own. Then the groups in reverse (widths 8, 4, 2, 1 x n_hid; blocks 1x1, 3x3, 3x3, 3x3), nearest
upsampling by 2 between groups, and a ReLU + 1x1 conv to 6 channels: the logit-Laplace means and
log-scales (vq/losses.py's logit_laplace_nll and split_output read them). DALL-E keeps the encoder's output
conv and the decoder's input conv in fp32; so does this under bf16 autocast.

Training (the paper's section 2.1 and appendix A.2): the decoder sees a Gumbel-softmax sample of the encoder's
categorical q(z|x) at temperature tau, annealed from tau_start (1) to tau_end (1/16) over tau_steps (150k) by
a cosine schedule; the loss is the relaxed negative ELB: the logit-Laplace NLL (vq.train's loss.logit_laplace)
plus kl_weight x KL(q(z|x) || uniform over the codes), with kl_weight ramped 0 -> 6.6 over kl_warmup_steps
(5000) by a cosine schedule. DALL-E sums the NLL over the 256 x 256 x 3 pixel values and the KL over the
32 x 32 cells and divides both by the pixel count; so here: the NLL is a mean over pixel values and the KL
is a sum over cells divided by 3 x image_size^2 (beta / 192 per cell at DALL-E's shape). The schedules run on
the model's own step counter (a buffer: it resumes with the checkpoint and is exported, harmlessly).
Code usage / perplexity of the argmax codes go through vq/codebook.py; there are no dead-code restarts (see
there why): the KL to the uniform prior is what keeps codes in use.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from vq.codebook import CodeUsage
from vq.losses import split_output


def cosine_anneal(start: float, end: float, steps: int, step: float) -> float:
    """start at step 0, end from step `steps` on, half a cosine in between (steps <= 0: `end` throughout)."""
    if steps <= 0 or step >= steps:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / steps))


class Block(nn.Module):
    """DALL-E's EncoderBlock / DecoderBlock: id_path (1x1 conv when the width changes) + post_gain x res_path."""

    def __init__(self, c_in: int, c_out: int, n_layers: int, decoder: bool):
        super().__init__()
        hid = c_out // 4
        self.id_path = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        kernels = (1, 3, 3, 3) if decoder else (3, 3, 3, 1)
        widths = (c_in, hid, hid, hid, c_out)
        self.res_path = nn.Sequential(OrderedDict(
            item for i, k in enumerate(kernels) for item in
            ((f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", nn.Conv2d(widths[i], widths[i + 1], k, padding=k // 2)))))
        self.post_gain = 1 / n_layers**2  # (keeps the deep residual stack near the identity at initialisation)

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAE(CodeUsage, nn.Module):
    kind = "dvae"
    encoder_parts = ("encoder",)
    """The modules that decide the codes (vq.train's parameter count); the codebook is the decoder's input conv."""

    def __init__(self, image_size: int = 256, patch: int = 8, n_hid: int = 256, code_dim: int = 128,
                 codebook_size: int = 8192, res_blocks: int = 2, tau_start: float = 1.0, tau_end: float = 1 / 16,
                 tau_steps: int = 150_000, kl_weight: float = 6.6, kl_warmup_steps: int = 5000):
        super().__init__()
        pools = round(math.log2(patch))
        if 2**pools != patch or image_size % patch:
            raise ValueError(f"patch {patch} must be a power of 2 dividing image_size {image_size} (the dVAE "
                             "max-pools by 2 between groups)")
        self.config = {"image_size": image_size, "patch": patch, "n_hid": n_hid, "code_dim": code_dim,
                       "codebook_size": codebook_size, "res_blocks": res_blocks, "tau_start": tau_start,
                       "tau_end": tau_end, "tau_steps": tau_steps, "kl_weight": kl_weight,
                       "kl_warmup_steps": kl_warmup_steps}
        self.image_size, self.grid = image_size, image_size // patch
        self.tau_start, self.tau_end, self.tau_steps = tau_start, tau_end, tau_steps
        self.kl_max, self.kl_warmup_steps = kl_weight, kl_warmup_steps
        groups, n_layers = pools + 1, (pools + 1) * res_blocks
        enc, c = [("input", nn.Conv2d(3, n_hid, 7, padding=3))], n_hid
        for g in range(groups):
            width = n_hid * 2**g
            blocks = [(f"block_{i + 1}", Block(c if i == 0 else width, width, n_layers, False))
                      for i in range(res_blocks)]
            c = width
            enc.append((f"group_{g + 1}", nn.Sequential(OrderedDict(
                blocks + ([("pool", nn.MaxPool2d(2))] if g < groups - 1 else [])))))
        enc.append(("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(c, codebook_size, 1)))))
        self.encoder = nn.Sequential(OrderedDict(enc))
        dec, c = [("input", nn.Conv2d(codebook_size, code_dim, 1))], code_dim
        for g in range(groups):
            width = n_hid * 2 ** (groups - 1 - g)
            blocks = [(f"block_{i + 1}", Block(c if i == 0 else width, width, n_layers, True))
                      for i in range(res_blocks)]
            c = width
            dec.append((f"group_{g + 1}", nn.Sequential(OrderedDict(
                blocks + ([("upsample", nn.Upsample(scale_factor=2, mode="nearest"))] if g < groups - 1 else [])))))
        dec.append(("output", nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=nn.Conv2d(c, 6, 1)))))
        self.decoder = nn.Sequential(OrderedDict(dec))
        self.init_usage(codebook_size, 0)  # usage and perplexity; no restarts (module docstring)

    # -- schedules ------------------------------------------------------------------------------
    def tau(self, step: int) -> float:
        """Gumbel-softmax temperature at training step `step`: cosine from tau_start to tau_end."""
        return cosine_anneal(self.tau_start, self.tau_end, self.tau_steps, step)

    def kl_weight(self, step: int) -> float:
        """KL weight at training step `step`: cosine ramp from 0 to kl_weight."""
        return cosine_anneal(0.0, self.kl_max, self.kl_warmup_steps, step)

    # -- the tokenizer interface ----------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] in [-1, 1] -> fp32 logits [B, codebook_size, grid, grid]."""
        h = self.encoder[:-1](images)
        with torch.autocast(images.device.type, enabled=False):  # the output conv in fp32, as DALL-E's
            return self.encoder.output(h.float())

    def pixels(self, z: torch.Tensor) -> torch.Tensor:
        """One-hot or relaxed codes [B, codebook_size, grid, grid] -> decoder output [B, 6, S, S]."""
        with torch.autocast(z.device.type, enabled=False):  # the input conv in fp32, as DALL-E's
            h = self.decoder.input(z.float())
        return self.decoder[1:](h)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(1)

    def one_hot(self, codes: torch.Tensor) -> torch.Tensor:
        return F.one_hot(codes.view(-1, self.grid, self.grid), self.codebook_size).permute(0, 3, 1, 2).float()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return split_output(self.pixels(self.one_hot(codes))).clamp(-1, 1)

    # -- training -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, frozen_codes: bool = False):
        """Training pass: (decoder output [B, 6, S, S], {'vq_loss': kl_weight x KL term, 'codes': argmax codes,
        'perplexity', 'usage', 'logs': {'tau', 'kl_weight', 'kl'}}); `frozen_codes`: the encoder stays as it is
        and the decoder draws the one-hot argmax codes."""
        if frozen_codes:
            with torch.autocast(images.device.type, enabled=False):  # (encode()'s fp32 codes, as pre-tokenization's)
                codes = self.encode(images.float())
            return self.pixels(self.one_hot(codes)), {"vq_loss": images.new_zeros(()), "codes": codes,
                                                      **self.usage_stats(codes)}
        step = int(self.step)  # forward passes trained so far (CodeUsage's counter)
        tau, beta = self.tau(step), self.kl_weight(step)
        logits = self.logits(images)
        out = self.pixels(F.gumbel_softmax(logits, tau=tau, hard=False, dim=1))
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || uniform) per cell = sum_k q_k (log q_k + log K); summed over cells, per pixel value (DALL-E)
        kl_cells = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(1)
        kl = kl_cells.flatten(1).sum(1).mean() / (3 * self.image_size**2)
        codes = logits.detach().argmax(1)
        if self.training:
            self.track_usage(codes, None)
        return out, {"vq_loss": beta * kl, "codes": codes, **self.usage_stats(codes),
                     "logs": {"tau": tau, "kl_weight": beta, "kl": float(kl.detach())}}

    def last_decoder_weight(self) -> torch.Tensor:
        return self.decoder.output.conv.weight
