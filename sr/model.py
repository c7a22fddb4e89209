"""WDSR, the super-resolution network of Parti's last stage (256 px -> 512 or 1024 px).

    model = build_wdsr(SRModelConfig(preset="x4"))     # ~30M parameters, x4
    hr = model(lr)                                     # [B, 3, H, W] in [-1, 1] -> [B, 3, sH, sW]
    hr = upsample(model, lr)                           # the same, clamped to [-1, 1], without gradients

Wide activation residual blocks (Yu et al. 2018, "Wide Activation for Efficient and Accurate Image
Super-Resolution", WDSR-B): a 1x1 convolution widens the features `expansion` times before the ReLU, a linear
1x1 narrows them to `low_rank` x features, a 3x3 brings them back; weight normalisation instead of batch
normalisation; a 3x3 head, a 3x3 tail producing scale^2 x 3 channels rearranged by pixel shuffle, and a
global branch (5x5 convolution + pixel shuffle) from the input to the output. Parti names WDSR models of
~15M (x2) and ~30M (x4) parameters; the presets reach them with 50 blocks of 128 and 180 features. The
network starts as bicubic upsampling (`_start_as_bicubic`), the baseline it has to beat.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from common.config import ConfigError
from common.files import atomic_path
from common.state_file import check_fits

WDSR_PRESETS = {
    "x2": {"scale": 2, "features": 128, "blocks": 50},   # ~14.8M parameters, 256 -> 512 px
    "x4": {"scale": 4, "features": 180, "blocks": 50},   # ~29.3M parameters, 256 -> 1024 px
    "tiny": {"scale": 2, "features": 16, "blocks": 4},   # tests and the demo
}


@dataclass
class SRModelConfig:
    preset: str = "x4"
    """x2 (~15M parameters) | x4 (~30M) | tiny; scale/features/blocks below override it when > 0."""
    scale: int = 0
    """Upsampling factor (0: the preset's)."""
    features: int = 0
    """Channels of the residual body (0: the preset's)."""
    blocks: int = 0
    """Residual blocks (0: the preset's)."""
    expansion: float = 6.0
    """Width of the activation inside a block, in multiples of `features` (WDSR-B: 6)."""
    low_rank: float = 0.8
    """Width of the linear low-rank convolution after the activation, in multiples of `features` (WDSR-B: 0.8)."""

    def resolved(self) -> dict:
        """scale, features and blocks: the preset's, overridden by the fields > 0."""
        if self.preset not in WDSR_PRESETS:
            raise ConfigError(f"model.preset={self.preset!r} must be one of {', '.join(WDSR_PRESETS)}")
        shape = dict(WDSR_PRESETS[self.preset])
        for name in shape:  # (a negative value trained the preset's silently)
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0 (0: the preset's)")
        shape.update({k: getattr(self, k) for k in shape if getattr(self, k) > 0})
        for name in ("expansion", "low_rank"):  # (else a block of no channels, failing in the first step)
            if round(shape["features"] * getattr(self, name)) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} x {shape['features']} features rounds to no "
                                  "channel; it must give at least one")
        return shape


def conv(c_in: int, c_out: int, kernel: int, padding_mode: str = "zeros") -> nn.Module:
    return weight_norm(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, padding_mode=padding_mode))


class WideBlock(nn.Module):
    """x + conv3x3(conv1x1_low_rank(relu(conv1x1_wide(x))))."""

    def __init__(self, features: int, expansion: float, low_rank: float):
        super().__init__()
        wide, narrow = round(features * expansion), round(features * low_rank)
        self.body = nn.Sequential(conv(features, wide, 1), nn.ReLU(inplace=True), conv(wide, narrow, 1),
                                  conv(narrow, features, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class WDSR(nn.Module):
    def __init__(self, scale: int, features: int, blocks: int, expansion: float = 6.0, low_rank: float = 0.8):
        super().__init__()
        self.scale = scale
        out = 3 * scale * scale
        self.head = conv(3, features, 3)
        self.body = nn.Sequential(*(WideBlock(features, expansion, low_rank) for _ in range(blocks)))
        self.tail = nn.Sequential(conv(features, out, 3), nn.PixelShuffle(scale))
        # (replicate padding: at the border the global branch repeats edge pixels, as bicubic upsampling does)
        self.skip = nn.Sequential(conv(3, out, 5, padding_mode="replicate"), nn.PixelShuffle(scale))
        self._start_as_bicubic()

    @torch.no_grad()
    def _start_as_bicubic(self) -> None:
        """Initialise the network as bicubic upsampling, the baseline it has to beat: the global branch's 5x5
        filters hold the bicubic weights of each output phase (torch's bicubic, a = -0.75, edges repeated), and the
        body's tail starts at zero (weight norm's gain g = 0, so it still learns). The architecture is WDSR's; only this
        starting point is ours (training then refines a residual)."""
        s = self.scale
        taps = torch.zeros(s, 5)  # taps[phase, k]: weight of the low-resolution pixel at offset k - 2
        for phase in range(s):
            x = (phase + 0.5) / s - 0.5  # the output pixel's position, relative to the low-resolution pixel
            for k in range(5):
                taps[phase, k] = _cubic(abs(k - 2 - x))
        weight = torch.zeros(3 * s * s, 3, 5, 5)
        for c in range(3):
            for i in range(s):
                for j in range(s):
                    weight[c * s * s + i * s + j, c] = taps[i][:, None] * taps[j][None, :]
        skip = self.skip[0]
        skip.weight = weight  # (weight norm's right inverse: gain and direction of these filters)
        skip.bias.zero_()
        self.tail[0].parametrizations.weight.original0.zero_()
        self.tail[0].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x))) + self.skip(x)


def _cubic(d: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel at distance d (torch's bicubic interpolation uses a = -0.75)."""
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    return a * (((d - 5) * d + 8) * d - 4) if d < 2 else 0.0


def build_wdsr(cfg: SRModelConfig) -> WDSR:
    return WDSR(**cfg.resolved(), expansion=cfg.expansion, low_rank=cfg.low_rank)


@torch.no_grad()
def upsample(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] upsampled by the model, clamped to [-1, 1] (inference)."""
    return model(images).clamp(-1, 1)


def save_upsampler(model: WDSR, cfg: SRModelConfig, path) -> None:
    """The trained upsampler in one file: its model config and weights (tensors and plain data only)."""
    with atomic_path(path) as tmp:
        torch.save({"kind": "wdsr", "config": asdict(cfg), "state_dict": model.state_dict()}, tmp)


def load_upsampler(path, device: str | torch.device = "cpu", where: str | None = None) -> WDSR:
    """An exported upsampler (`save_upsampler`), in eval mode; weights_only: a file that holds more than
    tensors and plain data is refused unrun. Any other file, or one whose config and weights disagree, is a
    ConfigError naming `where` (the flag or key and the path; default: the path)."""
    where = where or str(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError (unsafe content), RuntimeError (not a torch file), OSError
        raise ConfigError(f"{where}: not a readable upsampler export ({str(e).strip().splitlines()[0][:200]}); "
                          "expected sr.train's export.pt") from None
    state = blob.get("state_dict") if isinstance(blob, dict) else None
    if not (isinstance(blob, dict) and blob.get("kind") == "wdsr" and isinstance(state, dict)
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ConfigError(f"{where}: not an upsampler export (expected sr.train's export.pt, kind 'wdsr')")
    try:
        model = build_wdsr(SRModelConfig(**blob.get("config", {})))
    except (TypeError, ConfigError) as e:  # (a key SRModelConfig does not have, a config that is not a mapping, a
        # value its checks refuse: an unknown preset, a negative count; named as the file's, not as a model.* setting)
        raise ConfigError(f"{where}: its config is not an upsampler's ({e}); expected sr.train's export.pt") from None
    check_fits(model, blob["state_dict"], where, advice="its config describes another model than its weights")
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()
