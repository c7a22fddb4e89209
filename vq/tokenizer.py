"""The frozen image tokenizer interface, and a small convolutional VQ model that implements it.

    tok = load_image_tokenizer("runs/vq/export.pt")      # frozen, eval mode
    codes = tok.encode(images)      # images: float [B, 3, S, S] in [-1, 1] -> int64 [B, grid, grid]
    recon = tok.decode(codes)       # -> float [B, 3, S, S] in [-1, 1]
    tok.codebook_size, tok.grid, tok.image_size, tok.content_hash, tok.weights_hash

Every tokenizer (this ConvVQ, the ViT-VQGAN, VQ-VAE, VQGAN and dVAE of vq/, loaders of public checkpoints) is
saved by `save_image_tokenizer` as one file: {"kind", "config", "state_dict"[, "codes"]}. `weights_hash` is a sha256
of the kind, the config and every tensor (what decoded images depend on). `content_hash` names what the
codes depend on, so that a code-shard manifest names exactly which tokenizer made it: for a tokenizer as
trained it is the weights hash; a detokenizer fine-tuned on its frozen codes (vq/finetune_decoder.py) keeps
its source's content hash, recorded under "codes" with a sha256 of the encoder and codebook tensors
(`ENCODER_PARTS`), which loading checks: code shards made with the source stay valid for it.

ConvVQ is a real VQ model (strided-conv encoder, a codebook with nearest-code lookup, a transposed-conv
decoder); the pipeline and its tests use it until the ViT-VQGAN is trained.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.files import atomic_path
from data_pipeline.errors import DataError
from vq.conv_vqgan import ConvVQGAN
from vq.dvae import DVAE
from vq.vit_vqgan import ENCODER_PARTS, ViTVQGAN
from vq.vqgan import VQGAN
from vq.vqvae import VQVAE


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
    return {ConvVQ.kind: ConvVQ, ViTVQGAN.kind: ViTVQGAN, ConvVQGAN.kind: ConvVQGAN, VQVAE.kind: VQVAE,
            VQGAN.kind: VQGAN, DVAE.kind: DVAE}


def content_hash(kind: str, config: dict, state_dict: dict) -> str:
    h = hashlib.sha256(repr((kind, sorted(config.items()))).encode())
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encoder_hash(state_dict: dict) -> str:
    """sha256 of the tensors that decide the codes (ENCODER_PARTS of a ViT-VQGAN)."""
    h = hashlib.sha256()
    for name in sorted(n for n in state_dict if n.split(".")[0] in ENCODER_PARTS):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_image_tokenizer(model: nn.Module, path: str | Path, codes_of: str | None = None) -> str:
    """Write the tokenizer file; returns its content hash. `codes_of`: the content hash of the tokenizer whose
    encoder and codebook this one carries unchanged (a fine-tuned detokenizer), kept as its own."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"kind": model.kind, "config": model.config, "state_dict": state}
    if codes_of is not None:
        blob["codes"] = {"hash": codes_of, "encoder_sha256": encoder_hash(state)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return codes_of or content_hash(model.kind, model.config, state)


def load_image_tokenizer(path: str | Path, device: str = "cpu") -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image tokenizer {path} does not exist (train one with vq.train or export one)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # (unreadable: permissions, I/O; named by the OS error itself)
    except pickle.UnpicklingError:  # (torch's text advises weights_only=False: unsafe, and no help for a wrong file)
        raise DataError(f"{path}: not an image tokenizer export (not a torch.save file of tensors and plain values); "
                        "expected the export.pt of vq.train (or an export of a pre-trained tokenizer)") from None
    except Exception as e:  # (pickle, zip and weights_only errors of every kind: the file is not an export)
        raise DataError(f"{path}: not an image tokenizer export ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else 'unreadable'}); expected the "
                         "export.pt of vq.train (or an export of a pre-trained tokenizer)") from None
    return tokenizer_from_export(blob, path).to(device)


def tokenizer_from_export(blob: dict, path: str | Path) -> nn.Module:
    """The tokenizer an export's contents describe (`path` names the file in errors), frozen, on the CPU."""
    kind, known = blob.get("kind") if isinstance(blob, dict) else None, _registry()
    if kind is None and isinstance(blob, dict) and {"model", "opt", "step"} <= blob.keys():
        raise DataError(f"{path}: a vq.train checkpoint, not an export; pass the run's export.pt (vq.train writes "
                        "it at the end)")
    if not isinstance(kind, str) or kind not in known:  # (a list was a TypeError: unhashable)
        raise DataError(f"{path}: unknown tokenizer kind {kind!r}; known: {', '.join(known)}")
    if not isinstance(blob.get("config"), dict) or not isinstance(blob.get("state_dict"), dict):
        raise DataError(f"{path}: a {kind} export without its config and state_dict (damaged or edited)")
    try:
        model = known[kind](**blob["config"])
        missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    except (TypeError, ValueError, RuntimeError) as e:  # (a config key the class lacks; tensors of other shapes)
        raise DataError(f"{path}: a {kind} export whose config and weights do not make a tokenizer "
                         f"({' '.join(str(e).split())[:300]}): damaged or edited; export it again") from None
    if missing or unexpected:
        raise DataError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    model.weights_hash = content_hash(kind, blob["config"], blob["state_dict"])
    model.content_hash = model.weights_hash
    if "codes" in blob:  # a fine-tuned detokenizer: the codes are its source's, if the encoder is unchanged
        codes = blob["codes"]
        if not (isinstance(codes, dict) and all(isinstance(codes.get(k), str) for k in ("hash", "encoder_sha256"))):
            # (was a KeyError or AttributeError naming no file, or a content hash of another type in manifests)
            raise DataError(f"{path}: its codes record is {str(codes)[:200]}, not {{'hash': str, 'encoder_sha256': "
                            "str}: the file is damaged or was edited; re-export it with vq.finetune_decoder")
        if encoder_hash(blob["state_dict"]) != codes["encoder_sha256"]:
            raise DataError(f"{path}: its encoder and codebook differ from those of the tokenizer it claims to "
                             f"share codes with ({codes['hash'][:16]}): the file is damaged or was "
                             "edited; re-export it with vq.finetune_decoder")
        model.content_hash = codes["hash"]
    model.requires_grad_(False)
    return model.eval()
