"""The frozen image tokenizer interface, and a small convolutional VQ model that implements it.

    tok = load_image_tokenizer("runs/vq/export.pt")      # frozen, eval mode
    codes = tok.encode(images)      # images: float [B, 3, S, S] in [-1, 1] -> int64 [B, grid, grid]
    recon = tok.decode(codes)       # -> float [B, 3, S, S] in [-1, 1]
    tok.codebook_size, tok.grid, tok.image_size, tok.content_hash

Every tokenizer (this ConvVQ, the ViT-VQGAN of vq/, loaders of public checkpoints) is saved by
`save_image_tokenizer` as one file: {"kind", "config", "state_dict"}; `content_hash` is a sha256 of
the kind, the config and every tensor, so a code-shard manifest can name exactly which tokenizer made it.

ConvVQ is a real VQ model (strided-conv encoder, a codebook with nearest-code lookup, a transposed-conv
decoder); the pipeline and its tests use it until the ViT-VQGAN is trained.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.files import atomic_path
from vq.conv_vqgan import ConvVQGAN
from vq.vit_vqgan import ViTVQGAN


class ConvVQ(nn.Module):
    kind = "conv_vq"

    def __init__(self, image_size: int = 64, downsample: int = 3, channels: int = 64, code_dim: int = 16,
                 codebook_size: int = 256):
        super().__init__()
        self.config = dict(image_size=image_size, downsample=downsample, channels=channels, code_dim=code_dim,
                           codebook_size=codebook_size)
        self.image_size, self.codebook_size = image_size, codebook_size
        self.grid = image_size // 2**downsample
        enc, dec, c = [nn.Conv2d(3, channels, 3, padding=1)], [], channels
        for _ in range(downsample):
            enc += [nn.GELU(), nn.Conv2d(c, c, 4, stride=2, padding=1)]
            dec += [nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.GELU()]
        self.encoder = nn.Sequential(*enc, nn.GELU(), nn.Conv2d(c, code_dim, 1))
        self.codebook = nn.Embedding(codebook_size, code_dim)
        self.decoder = nn.Sequential(nn.Conv2d(code_dim, c, 1), nn.GELU(), *dec, nn.Conv2d(c, 3, 3, padding=1))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> nearest code ids [B, h, w]."""
        # fp32 with autocast off, as in ViTVQGAN.codes_of: |z|^2 - 2 z.e + |e|^2 cancels badly in bf16.
        with torch.autocast(z.device.type, enabled=False):
            flat, e = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float(), self.codebook.weight.float()
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
            return dist.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encoder(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.codebook(codes).permute(0, 3, 1, 2)).clamp(-1, 1)

    def forward(self, images: torch.Tensor):
        """Training: reconstruction through the straight-through estimator, plus the VQ losses."""
        z = self.encoder(images)
        q = self.codebook(self.quantize(z)).permute(0, 3, 1, 2)
        commit = F.mse_loss(z, q.detach()) * 0.25 + F.mse_loss(q, z.detach())
        return self.decoder(z + (q - z).detach()), commit


def _registry() -> dict:
    return {ConvVQ.kind: ConvVQ, ViTVQGAN.kind: ViTVQGAN, ConvVQGAN.kind: ConvVQGAN}


def content_hash(kind: str, config: dict, state_dict: dict) -> str:
    h = hashlib.sha256(repr((kind, sorted(config.items()))).encode())
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_image_tokenizer(model: nn.Module, path: str | Path) -> str:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"kind": model.kind, "config": model.config, "state_dict": state}, tmp)
    return content_hash(model.kind, model.config, state)


def load_image_tokenizer(path: str | Path, device: str = "cpu") -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image tokenizer {path} does not exist (train one with vq.train or export one)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    kind, known = blob.get("kind"), _registry()
    if kind not in known:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; known: {', '.join(known)}")
    model = known[kind](**blob["config"])
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    model.content_hash = content_hash(kind, blob["config"], blob["state_dict"])
    model.requires_grad_(False)
    return model.to(device).eval()
