r"""The weights a vq.train run starts from (`train.init_from`): fine-tuning a trained tokenizer on other images.

    python -m vq.train --config configs/vq/vqgan.yaml --data 'mine/{00000..00009}.tar' --run-dir runs/ft \
        --set train.init_from=vqgan_imagenet_f16_1024/checkpoints/last.ckpt loss.adv_start=0 \
        train.lpips_backbone=vgg16-397923af.pth

`train.init_from` names either
- a tokenizer export of vq.train or vq/tokenizer.py (`export.pt`: kind, config, state_dict) of model.kind (for
  model.kind=vqgan also a converted taming checkpoint, vq/conv_vqgan.py), with the same attention heads, or
- for model.kind=vqgan, a taming-transformers Lightning checkpoint (`last.ckpt`): its VQModel weights, and its
  PatchGAN's (`loss.discriminator.*`) when loss.discriminator=patchgan. Its LPIPS weights are not taken (LPIPS
  is loss.perceptual's, from train.lpips_backbone), nor its optimizer state: the optimizers start afresh.
Every key of the file must be one of the configured model and of its shape (only the code-usage statistics that
taming does not keep start from zero), so a model section that differs from the source is refused naming the
keys, instead of training a half-initialised network. A resume takes the checkpoint's weights instead.
"""
from __future__ import annotations

import torch

from common.config import ConfigError
from common.state_file import check_fits
from vq.conv_vqgan import ConvVQGAN, read_checkpoint
from vq.losses import PatchGAN
from vq.tokenizer import tokenizer_from_export

USAGE_BUFFERS = ("usage", "last_used", "step")
"""vq/codebook.py's code-usage state: kept by our exports, not by taming's checkpoints."""


def load_initial_weights(path: str, model: torch.nn.Module, discriminator: torch.nn.Module | None) -> str:
    """Copy `path`'s weights into `model` (and `discriminator`, see the module docstring); returns what was
    loaded, for the log. ConfigError naming the file when it does not fit the configured model."""
    where = f"train.init_from={path}"
    try:
        blob = read_checkpoint(path, ("state_dict",), writer="vq.train's export or taming-transformers")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    if "kind" in blob:
        return _from_export(path, blob, model, where)
    if model.kind != "vqgan":
        raise ConfigError(f"{where}: not a tokenizer export (no `kind`); only model.kind=vqgan also starts from a "
                          "taming-transformers checkpoint")
    state = blob["state_dict"]
    _copy(model, {k: v for k, v in state.items() if not k.startswith("loss.")}, where, optional=USAGE_BUFFERS)
    prefix = "loss.discriminator."
    theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if discriminator is not None and isinstance(discriminator, PatchGAN) and theirs:
        _copy(discriminator, theirs, f"{where} ({prefix}*)", optional=())
        return f"VQGAN and PatchGAN weights from the taming-transformers checkpoint {path}"
    why = ("it has none" if not theirs else "loss.adversarial=0: no discriminator" if discriminator is None
           else "loss.discriminator is not patchgan")
    return f"VQGAN weights from the taming-transformers checkpoint {path} (not its discriminator: {why})"


def _from_export(path: str, blob: dict, model: torch.nn.Module, where: str) -> str:
    """An export of model.kind, or for a vqgan a converted taming checkpoint (kind conv_vqgan: the same keys
    without the usage statistics). Its attention heads must be the model's too: they leave the shapes alone."""
    kind = blob["kind"]
    if kind != model.kind and (kind, model.kind) != (ConvVQGAN.kind, "vqgan"):
        raise ConfigError(f"{where}: a {kind} tokenizer; this run trains model.kind={model.kind}")
    try:
        source = tokenizer_from_export(blob, path)  # its own model, built from its config
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    state = source.state_dict()
    check_fits(model, state, where, optional=USAGE_BUFFERS if kind == ConvVQGAN.kind else ())
    modules = dict(model.named_modules())
    heads = {name: (m.heads, getattr(modules.get(name), "heads", None))
             for name, m in source.named_modules() if isinstance(getattr(m, "heads", None), int)}
    if differ := {name: pair for name, pair in heads.items() if pair[0] != pair[1]}:
        name, (theirs, ours) = next(iter(differ.items()))
        raise ConfigError(f"{where}: its attention has {theirs} heads where the configured model has {ours} ({name}, "
                          f"{len(differ)} block(s)): set model.heads / model.dec_heads as the source was trained")
    model.load_state_dict(state, strict=False)
    return f"weights from the {kind} export {path}"


def _copy(module: torch.nn.Module, state: dict, where: str, optional: tuple[str, ...]) -> None:
    check_fits(module, state, where, optional)
    module.load_state_dict(state, strict=False)
