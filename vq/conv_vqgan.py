"""Public convolutional VQ checkpoints behind the tokenizer interface: taming-transformers VQGAN, LlamaGen VQ.

    tok = load_taming_vqgan("vqgan_f16_1024/checkpoints/last.ckpt", "vqgan_f16_1024/configs/model.yaml")
    tok = load_llamagen_vq("vq_ds16_c2i.pt")                 # weights under "model"
    save_image_tokenizer(tok, "runs/vq/export.pt")          # then data_pipeline.pretokenize --vq ...

Both are the VQGAN architecture (Esser et al. 2021): a conv encoder of residual blocks at resolutions
halving per level, self-attention at the lowest, a middle block, 1x1 convs into and out of the code
space, a mirrored decoder. The two projects name the containers differently (taming: `down[i].block`,
`mid.block_1`, `up[i]`; LlamaGen: `conv_blocks[i].res`, `mid.0`, decoder levels from the lowest up) and
LlamaGen l2-normalises codes; `style` picks both. Checkpoints are read with torch.load(weights_only=True)
(what the two projects' training scripts pickle besides: read_checkpoint);
keys must match exactly (the taming training loss's `loss.*` entries are the only ones skipped).
vq/vqgan.py's VQGAN is this class made trainable (vq.train, model.kind=vqgan), with the same parameter names.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.state_file import load_state


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if c % 32 == 0 else 1, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Resample(nn.Module):
    """Downsample: pad right/bottom by one, 3x3 conv stride 2. Upsample: nearest x2, 3x3 conv."""

    def __init__(self, c: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


def _level(blocks: list, attn: list, names: tuple[str, str]) -> nn.Module:
    level = nn.Module()
    setattr(level, names[0], nn.ModuleList(blocks))
    setattr(level, names[1], nn.ModuleList(attn))
    return level


class Coder(nn.Module):
    """The encoder (up=False) or decoder (up=True) of either naming style."""

    def __init__(self, style: str, up: bool, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int,
                 resolution: int, attn_resolutions: list[int]):
        super().__init__()
        self.style, self.is_decoder, self.levels = style, up, len(ch_mult)
        blocks_name = "block" if style == "taming" else "res"
        per_level = num_res_blocks + (1 if up else 0)
        levels, mids = [], None
        if not up:
            self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
            c, res = ch, resolution
            for i, mult in enumerate(ch_mult):
                blocks, attn = [], []
                for _ in range(per_level):
                    blocks.append(ResBlock(c, ch * mult))
                    c = ch * mult
                    if self._attends(i, res, attn_resolutions):
                        attn.append(AttnBlock(c))
                level = _level(blocks, attn, (blocks_name, "attn"))
                if i != self.levels - 1:
                    level.downsample = Resample(c, up=False)
                    res //= 2
                levels.append(level)
        else:
            c, res = ch * ch_mult[-1], resolution // 2 ** (self.levels - 1)
            self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
            for i in reversed(range(self.levels)):  # built from the lowest resolution up
                blocks, attn = [], []
                for _ in range(per_level):
                    blocks.append(ResBlock(c, ch * ch_mult[i]))
                    c = ch * ch_mult[i]
                    if self._attends(i, res, attn_resolutions):
                        attn.append(AttnBlock(c))
                level = _level(blocks, attn, (blocks_name, "attn"))
                if i != 0:
                    level.upsample = Resample(c, up=True)
                    res *= 2
                levels.append(level)
        mid_c = ch * ch_mult[-1]
        if style == "taming":
            self.mid = nn.Module()
            self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (ResBlock(mid_c, mid_c), AttnBlock(mid_c),
                                                                   ResBlock(mid_c, mid_c))
            mids = [self.mid.block_1, self.mid.attn_1, self.mid.block_2]
            # taming indexes levels by resolution (0 = full) in both directions
            if up:
                self.up = nn.ModuleList(reversed(levels))
            else:
                self.down = nn.ModuleList(levels)
        else:
            self.mid = nn.ModuleList([ResBlock(mid_c, mid_c), AttnBlock(mid_c), ResBlock(mid_c, mid_c)])
            mids = list(self.mid)
            self.conv_blocks = nn.ModuleList(levels)
        self._order, self._mids = levels, mids
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3 if up else z_channels, 3, padding=1)

    def _attends(self, level: int, res: int, attn_resolutions: list[int]) -> bool:
        return res in attn_resolutions if self.style == "taming" else level == self.levels - 1

    def _run_level(self, level: nn.Module, h):
        blocks = getattr(level, "block" if self.style == "taming" else "res")
        for j, block in enumerate(blocks):
            h = block(h)
            if len(level.attn):
                h = level.attn[j](h)
        return h

    def forward(self, x):
        h = self.conv_in(x)
        if self.is_decoder:
            for m in self._mids:
                h = m(h)
        for level in self._order:
            h = self._run_level(level, h)
            resample = getattr(level, "upsample" if self.is_decoder else "downsample", None)
            if resample is not None:
                h = resample(h)
        if not self.is_decoder:
            for m in self._mids:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvVQGAN(nn.Module):
    kind = "conv_vqgan"

    def __init__(self, style: str = "taming", ch: int = 128, ch_mult: list[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, embed_dim: int = 256, n_embed: int = 1024,
                 resolution: int = 256, attn_resolutions: list[int] = (16,), l2_norm: bool = False):
        super().__init__()
        if style not in ("taming", "llamagen"):
            raise ValueError(f"style {style!r}: expected 'taming' or 'llamagen'")
        ch_mult, attn_resolutions = list(ch_mult), list(attn_resolutions)
        self.config = dict(style=style, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                           embed_dim=embed_dim, n_embed=n_embed, resolution=resolution,
                           attn_resolutions=attn_resolutions, l2_norm=l2_norm)
        self.image_size, self.codebook_size, self.l2_norm = resolution, n_embed, l2_norm
        self.grid = resolution // 2 ** (len(ch_mult) - 1)
        args = (ch, ch_mult, num_res_blocks, z_channels, resolution, attn_resolutions)
        self.encoder, self.decoder = Coder(style, False, *args), Coder(style, True, *args)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(z_channels, embed_dim, 1), nn.Conv2d(embed_dim, z_channels, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(n_embed, embed_dim)
        # taming's (and LlamaGen's) start: codes near the origin, where the encoder's first latents are, so the
        # nearest-code search spreads over the codebook; nn.Embedding's N(0, 1) codes (norm ~sqrt(embed_dim))
        # left the few shortest codes nearest to every latent.
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        if style == "llamagen":  # LlamaGen keeps a usage buffer in its checkpoints
            self.quantize.register_buffer("codebook_used", torch.zeros(65536))

    def _codebook(self):
        w = self.quantize.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)
        return self.nearest(F.normalize(z, dim=-1) if self.l2_norm else z)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., embed_dim] -> ids of the nearest codes (squared l2) [...]."""
        # fp32 with autocast off, as in ViTVQGAN.codes_of: |z|^2 - 2 z.e + |e|^2 cancels badly in bf16.
        with torch.autocast(z.device.type, enabled=False):
            z, e = z.float(), self._codebook().float()
            dist = z.pow(2).sum(-1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(-1)
            return dist.argmin(-1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        q = self._codebook()[codes].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(q)).clamp(-1, 1)


def _load_strict(model: nn.Module, state: dict, source: str, skip_prefixes: tuple[str, ...] = ()) -> nn.Module:
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"{source} does not match the architecture: {len(missing)} missing key(s) "
                       f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; {len(unexpected)} unexpected key(s) "
                       f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


# PyTorch Lightning before 1.5 (taming-transformers' checkpoints) saved each callback's state under its class
# (`checkpoint["callbacks"][ModelCheckpoint] = {...}`): a pickled class reference, which torch.load's
# weights_only refuses ("Unsupported global"). These inert stand-ins take the classes' places, so the checkpoints
# load without importing Lightning or allowing anything else.
LIGHTNING_CALLBACKS = [(type(name, (), {}), f"pytorch_lightning.callbacks.{module}.{name}")
                       for module, name in (("model_checkpoint", "ModelCheckpoint"),
                                            ("early_stopping", "EarlyStopping"), ("lr_monitor", "LearningRateMonitor"))]
TRAINING_SCRIPT_GLOBALS = [*LIGHTNING_CALLBACKS, argparse.Namespace]
"""Also allowed: argparse's Namespace (plain attributes), which LlamaGen's train_vq.py saves under "args"."""


def read_checkpoint(path: str | Path, required: tuple[str, ...], writer: str) -> dict:
    """A public checkpoint on the CPU: tensors and plain data only (weights_only; TRAINING_SCRIPT_GLOBALS aside).
    FileNotFoundError when it is missing, CheckpointError when unreadable or without `required`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals(TRAINING_SCRIPT_GLOBALS):
        return load_state(path, required, writer, if_refused=(
            f"if you trust it, keep only its weights: torch.save({{'{required[0]}': torch.load('{path}', "
            f"weights_only=False)['{required[0]}']}}, 'weights.pt')"))


def load_taming_vqgan(ckpt: str | Path, config_yaml: str | Path) -> ConvVQGAN:
    """A taming-transformers VQModel from its Lightning `last.ckpt` and `configs/model.yaml`."""
    import yaml

    params = yaml.safe_load(Path(config_yaml).read_text())["model"]["params"]
    dd = params["ddconfig"]
    if dd.get("double_z") or dd.get("in_channels", 3) != 3 or dd.get("out_ch", 3) != 3:
        raise ValueError(f"{config_yaml}: only the VQGAN image setting (double_z false, 3 channels) is supported")
    model = ConvVQGAN("taming", dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"],
                      params["embed_dim"], params["n_embed"], dd["resolution"], dd["attn_resolutions"])
    state = read_checkpoint(ckpt, ("state_dict",), "taming-transformers")["state_dict"]
    return _load_strict(model, state, str(ckpt), skip_prefixes=("loss.",))


def load_llamagen_vq(ckpt: str | Path, codebook_size: int = 16384, codebook_embed_dim: int = 8,
                     ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), z_channels: int = 256, image_size: int = 256,
                     ch: int = 128, num_res_blocks: int = 2) -> ConvVQGAN:
    """LlamaGen's VQ (vq_ds16_*.pt: weights under "model"; the defaults are its VQ-16)."""
    model = ConvVQGAN("llamagen", ch, list(ch_mult), num_res_blocks, z_channels, codebook_embed_dim, codebook_size,
                      image_size, [], l2_norm=True)
    return _load_strict(model, read_checkpoint(ckpt, ("model",), "LlamaGen")["model"], str(ckpt))
