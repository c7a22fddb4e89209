r"""Train an image tokenizer on LAION-style shards, then export it frozen.

    python -m vq.train --config configs/vq/vit-vqgan-small.yaml --data 'laion/{00000..00099}.tar' \
        --run-dir runs/vq --set train.lpips_backbone=vgg16-397923af.pth [train.steps=1000 ...] [--resume auto]
    torchrun --nproc_per_node 8 -m vq.train ...                 # data parallel (DDP)

model.kind picks the tokenizer family, each with a preset in configs/vq/:
    vit_vqgan  ViT-VQGAN, Parti's tokenizer (vq/vit_vqgan.py)             vit-vqgan-small.yaml
    vqvae      VQ-VAE with an EMA codebook (vq/vqvae.py)                  vqvae.yaml
    vqgan      taming's VQGAN, PatchGAN + LPIPS (vq/vqgan.py)             vqgan.yaml
    dvae       DALL-E's discrete VAE, Gumbel-softmax + KL (vq/dvae.py)    dvae.yaml
All share the loop, the losses of vq/losses.py (the config's loss section), checkpoints and the export.
`--set train.init_from=<export.pt or taming last.ckpt>` starts from trained weights (vq/init_weights.py).

The run directory receives config.yaml, metrics.jsonl + TensorBoard (l2, PSNR, perplexity, code usage,
losses), recon_XXXXXXXX.png grids (top: inputs, bottom: reconstructions), checkpoints/ and, at the end,
export.pt: the frozen tokenizer in the format of vq/tokenizer.py that data_pipeline.pretokenize loads (with
train.ema_decay, the moving average of the weights; checkpoints hold both).

Checkpoints follow common/checkpoints.py: checkpoints/step_XXXXXXXX/state.pt, written atomically (its
presence marks the checkpoint complete), then the `latest` pointer moves and older checkpoints beyond
train.keep_checkpoints are deleted. `--resume auto` continues from `latest`, or from the newest complete
checkpoint when `latest` is gone; `--resume none` starts at step 0, refused where checkpoints exist. Run
directories of the earlier single-file layout (checkpoints/step_XXXXXXXX.pt, `latest` naming the file) are
moved into this layout by renames when resumed.
SIGUSR1/SIGTERM or a run_dir/STOP file: finish the step, save, write run_dir/REQUEUE, exit 75 (0 under torchrun;
common/preemption.py); `TRAINER=vq.train sbatch slurm/train.sbatch CONFIG RUN_DIR --data ...` requeues on it.

A checkpoint holds tensors, containers, numbers and strings only (the config as a dict; no generator states:
each step seeds from (seed, step, rank)) and is read back with torch.load(weights_only=True): a file holding
anything else (a pickled object, which could run code when loaded) or a damaged one stops the resume with its name.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common.checkpoints import CheckpointError, check_steps_left, checkpoint_dir, resume_tag
from common.cli import config_parser, run_trainer
from common.collection import StepCollection
from common.config import ConfigError, check_minima, require, save_config
from common.files import write_atomic
from common.metrics import MetricsLogger, StepClock, mean_over_ranks, psnr
from common.preemption import StopRequest
from common.schedule import check_schedule, lr_lambda
from common.state_file import RESUME_ADVICE, STATE_FILE, check_fits, load_state, save_state
from data_pipeline.image_stream import CropStream, gather_stream_states, restore_stream
from model_parallel.state import DeviceError, init_distributed, use_device
from vq.config import IMAGE_TRAIN_MINIMA, LOSS_MINIMA, MODEL_MINIMA, VQConfig
from vq.dvae import DVAE
from vq.init_weights import load_initial_weights
from vq.losses import RealAndFake, VQGANLoss, check_lpips_backbone, split_output
from vq.tokenizer import save_image_tokenizer
from vq.vit_vqgan import ENCODER_PARTS, VIT_VQGAN_PRESETS, ViTVQGAN, default_heads
from vq.vqgan import TAMING_F16, VQGAN
from vq.vqvae import VQVAE

KINDS = ("vit_vqgan", "vqvae", "vqgan", "dvae")


def check_logit_laplace(cfg: VQConfig) -> None:
    """The logit-Laplace likelihood is trained where the config weighs it, and weighed where the decoder predicts
    it: a positive loss.logit_laplace with a 3-channel decoder used to drop the term without a word (the ViT-VQGAN
    presets asked for the paper's 0.1 and trained without it). The dvae always predicts it and needs its weight."""
    m, weight = cfg.model, cfg.loss.logit_laplace
    if m.kind == "dvae":
        require(weight > 0, f"model.kind=dvae needs loss.logit_laplace > 0 (got {weight}): the logit-Laplace "
                            "likelihood is the dVAE's reconstruction term (configs/vq/dvae.yaml: 1)")
        return
    require(m.kind == "vit_vqgan" or not m.logit_laplace,
            f"model.logit_laplace needs model.kind=vit_vqgan (model.kind={m.kind} decodes 3 channels; dvae is "
            "always logit-Laplace)")
    predicts = m.kind == "vit_vqgan" and m.logit_laplace
    require(weight <= 0 or predicts,
            f"loss.logit_laplace={weight} needs a decoder that predicts the logit-Laplace parameters: "
            f"model.kind=vit_vqgan with model.logit_laplace=true (got model.kind={m.kind}, "
            f"model.logit_laplace={str(m.logit_laplace).lower()}); or set loss.logit_laplace=0")
    require(weight > 0 or not predicts,
            "model.logit_laplace=true needs loss.logit_laplace > 0: the decoder's log-scales are trained by that "
            f"term alone (got {weight})")


def check_power_of_2_patch(m, why: str) -> None:
    """The convolutional kinds' patch: halved to 1 a layer at a time, and tiling the image."""
    if m.patch < 1 or m.patch & (m.patch - 1) or m.image_size % m.patch:
        raise ConfigError(f"model.patch={m.patch} must be a power of 2 dividing model.image_size={m.image_size} "
                          f"({why})")


def build_model(cfg: VQConfig):
    m = cfg.model
    if m.kind not in KINDS:
        raise ConfigError(f"model.kind={m.kind!r} must be one of {', '.join(KINDS)}")
    check_logit_laplace(cfg)
    if m.kind == "vqvae":
        check_power_of_2_patch(m, "the VQ-VAE downsamples by 2 in each strided convolution")
        return VQVAE(image_size=m.image_size, patch=m.patch, width=m.width or 128, code_dim=m.code_dim,
                     codebook_size=m.codebook_size, ema_decay=m.ema_decay, dead_code_steps=m.dead_code_steps,
                     res_blocks=m.res_blocks)
    if m.kind == "vqgan":
        return VQGAN(**vqgan_shape(m), embed_dim=m.code_dim, n_embed=m.codebook_size, resolution=m.image_size,
                     dead_code_steps=m.dead_code_steps)
    if m.kind == "dvae":
        if not (0 < m.tau_end <= m.tau_start):
            raise ConfigError(f"model.tau_start={m.tau_start} and model.tau_end={m.tau_end} must satisfy "
                              "0 < tau_end <= tau_start (the Gumbel-softmax temperature is annealed down)")
        if m.res_blocks < 1:
            raise ConfigError(f"model.res_blocks={m.res_blocks} must be at least 1 (the dVAE's groups are residual "
                              "blocks)")
        check_power_of_2_patch(m, "the dVAE max-pools by 2 between groups")
        return DVAE(image_size=m.image_size, patch=m.patch, n_hid=m.width or 256, code_dim=m.code_dim,
                    codebook_size=m.codebook_size, res_blocks=m.res_blocks, tau_start=m.tau_start, tau_end=m.tau_end,
                    tau_steps=m.tau_steps, kl_weight=m.kl_weight, kl_warmup_steps=m.kl_warmup_steps)
    require(m.image_size % m.patch == 0, f"model.patch={m.patch} must divide model.image_size={m.image_size} "
                                          "(the ViT's patches tile the image)")
    layers, width, heads = vit_shape(m)
    return ViTVQGAN(image_size=m.image_size, patch=m.patch, layers=layers, width=width, code_dim=m.code_dim,
                    codebook_size=m.codebook_size, logit_laplace=m.logit_laplace, dead_code_steps=m.dead_code_steps,
                    heads=heads)


def vqgan_shape(m) -> dict:
    """ConvVQGAN's ch, ch_mult, num_res_blocks, z_channels, attn_resolutions from a vqgan model section (taming
    f16's where unset), checked against model.patch and model.image_size."""
    ch_mult = TAMING_F16["ch_mult"] if m.ch_mult is None else m.ch_mult
    if not ch_mult or min(ch_mult) < 1:  # (integers: common.config's loader refuses other items, naming them)
        raise ConfigError(f"model.ch_mult={m.ch_mult!r} must be a non-empty list of positive integers")
    if m.patch != 2 ** (len(ch_mult) - 1) or m.image_size % m.patch:
        raise ConfigError(f"model.patch={m.patch} must be 2^(len(model.ch_mult) - 1) = {2 ** (len(ch_mult) - 1)} "
                          f"(model.ch_mult={ch_mult}: one halving between levels) and divide model.image_size="
                          f"{m.image_size}")
    if m.res_blocks < 1:
        raise ConfigError(f"model.res_blocks={m.res_blocks} must be at least 1 "
                          "(the VQGAN's levels are residual blocks)")
    attn = [m.image_size // m.patch] if m.attn_resolutions is None else m.attn_resolutions
    return {"ch": m.width or TAMING_F16["ch"], "ch_mult": list(ch_mult), "num_res_blocks": m.res_blocks,
            "z_channels": m.z_channels or m.code_dim, "attn_resolutions": attn}


def vit_shape(m) -> tuple[int, int, int]:
    """(layers, width, heads) of a ViT-VQGAN model section: the preset's, overridden by the fields > 0 (heads
    0 when only the width was changed: ViTVQGAN then takes width / 64)."""
    if m.preset not in VIT_VQGAN_PRESETS:
        raise ConfigError(f"model.preset={m.preset!r} must be one of {', '.join(VIT_VQGAN_PRESETS)}")
    shape = VIT_VQGAN_PRESETS[m.preset]
    width = m.width or shape["width"]
    heads = m.heads or (shape["heads"] if width == shape["width"] else 0)
    if width % (heads or default_heads(width)):  # (else the first step fails in a reshape, the run started)
        raise ConfigError(f"model.width={width} must be a multiple of the attention heads "
                          f"({heads or default_heads(width)}{'' if heads else ': width / 64, model.heads unset'}); "
                          "set model.heads to a divisor of it")
    return m.layers or shape["layers"], width, heads


def load_checkpoint(path: Path) -> dict:
    """A checkpoint as saved by VQTrainer.save (common/state_file.py: refused unrun unless tensors and plain data)."""
    return load_state(path, ("model", "opt", "step"), writer="vq.train")


SINGLE_FILE = re.compile(r"step_\d+\.pt")


def adopt_single_file_checkpoints(run_dir: str | Path) -> None:
    """Move checkpoints of the earlier single-file layout (checkpoints/step_XXXXXXXX.pt, `latest` naming
    the file) into the folder layout (step_XXXXXXXX/state.pt, `latest` naming the folder) by renames, so an
    old run resumes, falls back and prunes like a new one. Nothing is deleted but the `.tmp` leftovers of
    killed saves; `latest` is rewritten last. A call killed midway is finished by the next one."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for file in sorted(root.glob("step_*.pt")):
        if SINGLE_FILE.fullmatch(file.name) and file.is_file():
            (root / file.stem).mkdir(exist_ok=True)
            os.replace(file, root / file.stem / STATE_FILE)
    for leftover in root.glob("step_*.tmp"):  # the old layout's partial writes: never complete
        leftover.unlink(missing_ok=True)
    pointer = root / "latest"
    try:
        named = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return  # no pointer, or one resume_tag refuses, naming it
    if SINGLE_FILE.fullmatch(named) and (root / Path(named).stem / STATE_FILE).is_file():
        write_atomic(pointer, Path(named).stem + "\n")


DECAYED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
"""Modules whose weight weight decay shrinks (not biases, norms, position or code embeddings)."""


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in order, as one AdamW group without weight decay, or as two (DECAYED weights
    with it, the rest without) when there is any: a checkpoint's optimizer state has that many groups."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": trainable, "weight_decay": 0.0}]
    decayed = {id(m.weight) for m in module.modules() if isinstance(m, DECAYED)}
    return [{"params": [p for p in trainable if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in trainable if id(p) not in decayed], "weight_decay": 0.0}]


def load_optimizer(opt: torch.optim.Optimizer, saved: dict, module: torch.nn.Module, path: Path) -> None:
    """The checkpoint's optimizer state (each parameter's moments and step count) into `opt`, with this run's
    weight decay and betas (the schedule sets the rate at every step). A checkpoint of one group (no weight
    decay) into two, or back, is regrouped: param_groups orders the parameters the same way for a module, so
    the saved indices are matched to parameters by rebuilding the saving run's grouping."""
    saving = param_groups(module, 1.0 if len(saved["param_groups"]) == 2 else 0.0)
    saved_params = [p for g in saving for p in g["params"]]
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(saved["param_groups"]) > 2 or len(saved_ids) != len(saved_params):
        raise CheckpointError(f"{path}: its optimizer holds {len(saved_ids)} parameters in "
                              f"{len(saved['param_groups'])} group(s); this model trains {len(saved_params)}")
    state_of = {id(p): saved["state"][i] for p, i in zip(saved_params, saved_ids) if i in saved["state"]}
    state, groups, index = {}, [], 0
    for group in opt.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(index, index + len(group["params"])))})
        for p in group["params"]:
            if id(p) in state_of:
                state[index] = state_of[id(p)]
            index += 1
    opt.load_state_dict({"state": state, "param_groups": groups})


class VQTrainer:
    def __init__(self, cfg: VQConfig, data: str, run_dir: str | Path, device: str | None = None):
        """`device`: where the model trains; by default train.device's choice (model_parallel.state.use_device)."""
        device = device or use_device(cfg.train.device, "train.device")  # (before init_distributed touches CUDA)
        t = cfg.train
        check_minima(t, "train", IMAGE_TRAIN_MINIMA)  # (before the process group: its timeout is one of them)
        init_distributed(t.dist_timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if t.batch_size % self.world:
            raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the world size {self.world}")
        check_schedule(t, "train")  # (before config.yaml is written: a refused config leaves the run's as it was)
        check_logit_laplace(cfg)
        check_minima(cfg.model, "model", MODEL_MINIMA)
        check_minima(cfg.loss, "loss", LOSS_MINIMA)
        require(0 <= cfg.model.ema_decay < 1, f"model.ema_decay={cfg.model.ema_decay} must be in [0, 1) (the VQ-VAE "
                "codebook's moving average)")
        check_lpips_backbone(cfg.loss.perceptual, t.lpips_backbone)
        require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
        require(t.precision in ("fp32", "bf16"), f"train.precision={t.precision!r} must be fp32 or bf16")
        require(0 <= t.ema_decay < 1, f"train.ema_decay={t.ema_decay} must be in [0, 1) (0: no average)")
        require(not t.resize or t.resize >= cfg.model.image_size, f"train.resize={t.resize} must be at least "
                f"model.image_size={cfg.model.image_size} (the crops are cut from the resized images; 0: no resize)")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = device
        torch.manual_seed(t.seed)
        self.model = self.build(cfg).to(self.device)
        self.losses = VQGANLoss(cfg.loss, cfg.model.image_size, t.lpips_backbone).to(self.device)
        # (the run folder is made once the shapes are known good: a refused one leaves none behind)
        self.log = MetricsLogger(self.run_dir, enabled=self.rank == 0)
        ddp = torch.nn.parallel.DistributedDataParallel if self.world > 1 else lambda module: module
        self.ddp = ddp(self.model)
        self.lr_factor = lr_lambda(t)
        betas = (t.adam_beta1, t.adam_beta2)
        self.opt = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=betas)
        disc = self.losses.discriminator
        # The discriminator trains data-parallel too, else its gradients are never averaged and the
        # replicas drift apart. Only its own loss runs through the wrapper (the generator's adversarial
        # term calls the bare module with detached parameters), on real and fake images in one call
        # (RealAndFake says why); checkpoints keep the bare module's keys.
        self.disc_ddp = ddp(RealAndFake(disc)) if disc is not None else None
        self.disc_opt = (torch.optim.AdamW(param_groups(disc, t.weight_decay), lr=t.lr, betas=betas)
                         if disc else None)
        # torch's own moving average of a module's parameters (its buffers follow the model's: code usage,
        # the VQ-VAE's codebook statistics); its first update copies the weights (those of a resume or of
        # train.init_from: the copy made here is replaced then).
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay)) if t.ema_decay else None
        self.step = 0
        self.stream = CropStream(data, cfg.model.image_size, t.resize, self.rank, self.world, t.seed, t.data_workers)
        sizes = {True: 0, False: 0}  # in the encoder and codebook / in the decoder
        parts = getattr(self.model, "encoder_parts", ENCODER_PARTS)
        for name, p in self.model.named_parameters():
            sizes[name.split(".")[0] in parts] += p.numel()
        self.log.info(f"{type(self.model).__name__} {self.model.config}: {sizes[True]:,} parameters in the encoder and "
                      f"codebook, {sizes[False]:,} in the decoder "
                      f"({'frozen codes' if self.frozen_codes else 'trained'})")

    frozen_codes = False
    """Encoder and codebook fixed (vq.finetune_decoder); the tokenizer trains whole here."""
    stop: StopRequest | None = None
    """The stop handlers common.cli.run_trainer installed before the build and the resume (else run() installs them)."""

    def build(self, cfg: VQConfig) -> torch.nn.Module:
        return build_model(cfg)

    def export_tokenizer(self, path: Path) -> str:
        return save_image_tokenizer(self.model, path)

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self, streams: list[dict]) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step, "streams": streams,
                "ema": self.ema.state_dict() if self.ema else None,
                "disc": self.losses.discriminator.state_dict() if self.disc_opt else None,
                "disc_opt": self.disc_opt.state_dict() if self.disc_opt else None,
                "config": dataclasses.asdict(self.cfg)}  # (no generator states: train_step seeds each step)

    def save(self) -> None:
        """Rank 0 writes checkpoints/step_XXXXXXXX/state.pt (common/state_file.py); every rank waits for it."""
        streams = gather_stream_states(self.stream)
        if self.rank == 0:
            save_state(self.run_dir, self.step, self.state(streams), self.cfg.train.retention())
        dist.barrier()

    def resume(self) -> None:
        """Continue from `latest`, or from the newest complete checkpoint when `latest` is gone (logged);
        nothing to do when there is none. A bad pointer or checkpoint raises CheckpointError (one line)."""
        if self.rank == 0:
            adopt_single_file_checkpoints(self.run_dir)
        dist.barrier()
        tag, note = resume_tag(self.run_dir, STATE_FILE)
        if note:
            self.log.info(note)
        if tag is None:
            self.start_fresh()
            return
        path = checkpoint_dir(self.run_dir) / tag / STATE_FILE
        # Loaded onto the CPU, not self.device: load_state_dict copies model weights and optimizer state onto
        # the parameters' device itself. weights_only: a checkpoint must not be able to run code (load_checkpoint).
        state = load_checkpoint(path)
        check_steps_left(self.cfg.train.steps, state["step"], path)
        self.check_resumable(path, state)
        check_fits(self.model, state["model"], f"{path} (to resume)", advice=RESUME_ADVICE)
        self.model.load_state_dict(state["model"])
        load_optimizer(self.opt, state["opt"], self.model, path)
        if self.disc_opt and state["disc"] is not None:
            check_fits(self.losses.discriminator, state["disc"], f"{path} (its discriminator)", advice=RESUME_ADVICE)
            self.losses.discriminator.load_state_dict(state["disc"])
            load_optimizer(self.disc_opt, state["disc_opt"], self.losses.discriminator, path)
        self.step = state["step"]
        if self.ema and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        elif self.ema:
            self.log.info(f"{path} holds no average of the weights: train.ema_decay's starts at step {self.step}")
        how = restore_stream(self.stream, state.get("streams"),
                             self.step * self.cfg.train.batch_size // self.world, path)
        self.log.info(f"resumed from {path} at step {self.step}; {how}")

    def start_fresh(self) -> None:
        """Step 0: the weights of train.init_from when it is set, else those the model was built with."""
        if self.cfg.train.init_from:
            self.log.info(load_initial_weights(self.cfg.train.init_from, self.model, self.losses.discriminator))

    def check_resumable(self, path: Path, state: dict) -> None:
        """Refuse (CheckpointError) a checkpoint this trainer must not continue."""
        self._check_heads(path, state.get("config", {}).get("model", {}))

    def _check_heads(self, path: Path, saved: dict) -> None:
        """Attention heads leave no trace in the weights' shapes, so a checkpoint would load into a model with
        other heads and silently become another model: refuse a resume that would change them (the decoder's,
        for vq.finetune_decoder, whose model section shapes the decoder). Runs written before model.heads
        existed used width / 64 heads (the Large preset now has the paper's 16, not 20)."""
        if not saved or not isinstance(self.model, ViTVQGAN):
            return
        _, width, heads = vit_shape(self.cfg.model)
        now = heads or default_heads(width)
        if "heads" in saved:
            fields = {f.name for f in dataclasses.fields(self.cfg.model)}
            _, width, heads = vit_shape(dataclasses.replace(self.cfg.model,
                                                            **{k: v for k, v in saved.items() if k in fields}))
            before, when = heads or default_heads(width), "model.heads"
        else:
            width = saved.get("width") or VIT_VQGAN_PRESETS.get(saved.get("preset"), {}).get("width", 0)
            before, when = (default_heads(width) if width else now), "width / 64, before model.heads existed"
        if before != now:
            raise CheckpointError(f"{path}: written by a run whose attention had {before} heads ({when}); this run "
                                  f"builds {now}: continue it with --set model.heads={before}")

    # -- the loop ------------------------------------------------------------------------------------
    def batch(self) -> torch.Tensor:
        n = self.cfg.train.batch_size // self.world
        return torch.stack([next(self.stream) for _ in range(n)]).to(self.device).float() / 127.5 - 1

    def train_step(self, images: torch.Tensor) -> dict:
        bf16 = self.cfg.train.precision == "bf16" and self.device == "cuda"
        # The step's draws (the dVAE's Gumbel noise; rank 0's codebook restarts, broadcast) from (seed, step, rank):
        # every rank its own noise (one seed gave each rank's images the same noise), and a resumed run draws as
        # the uninterrupted one did.
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + self.step * self.world + self.rank)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=bf16):
            out, aux = self.ddp(images, frozen_codes=self.frozen_codes)
        out = out.float()
        last = self.model.last_decoder_weight()
        loss, logs = self.losses.generator(images, out, aux["vq_loss"], self.step, last)
        lr = self.cfg.train.lr * self.lr_factor(self.step)
        for group in [*self.opt.param_groups, *(self.disc_opt.param_groups if self.disc_opt else [])]:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema:
            self.ema.update_parameters(self.model)
        d_loss = self.losses.discriminator_loss(images, out, self.step, critic=self.disc_ddp)
        if d_loss is not None:
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            logs["disc"] = float(d_loss.detach())

        logs.update(lr=lr, loss=float(loss.detach()), psnr=psnr(split_output(out).detach(), images),
                    perplexity=float(aux["perplexity"]), code_usage=float(aux["usage"]))
        logs.update(aux.get("logs", {}))  # the model's own (the dVAE's temperature, KL weight, KL)
        return logs

    def recon_grid(self, images: torch.Tensor) -> Path:
        from torchvision.utils import save_image

        self.model.eval()
        with torch.no_grad():
            recon = self.model.decode(self.model.encode(images))
        self.model.train()
        path = self.run_dir / f"recon_{self.step:08d}.png"
        save_image(torch.cat([images[:8], recon[:8]]).float() * 0.5 + 0.5, path, nrow=min(8, len(images)))
        return path

    def run(self) -> list[dict]:
        """Step until train.steps, then export; return this call's per-step logs. A requested stop (SIGUSR1,
        SIGTERM, run_dir/STOP: common/preemption.py) saves after the step in flight and raises Preempted."""
        t, history = self.cfg.train, []
        if self.rank == 0:  # (here, after resume()'s checks: a refused config or checkpoint leaves the run's)
            save_config(self.cfg, self.run_dir / "config.yaml")
        # (run_trainer installs the stop handlers before the build and the resume: self.stop; else here)
        stop = self.stop or StopRequest(self.run_dir / "STOP", t.exit_after_minutes)
        collection = StepCollection(t.gc_interval)
        self.log.resumed_at(self.step)  # (steps after it that a killed segment logged are trained again)
        self.model.train()
        try:
            stop.start(self.run_dir, self.step, t.steps)
            clock = StepClock()  # (images/s over the log interval's steps, saves and grids left out)
            while self.step < t.steps:
                with clock.waiting():
                    images = self.batch()
                logs = mean_over_ranks(self.train_step(images))
                self.step += 1
                history.append(logs)
                collection.step_done(self.step)
                clock.step_done()
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self.log.step({"step": self.step, **logs, **clock.rates(t.batch_size, "images")})
                if self.rank == 0 and (self.step % t.eval_interval == 0 or self.step == t.steps):
                    with clock.paused():
                        self.log.info(f"reconstructions: {self.recon_grid(images)}")
                preempted = stop.requested()
                if preempted or self.step % t.save_interval == 0 or self.step == t.steps:
                    with clock.paused():
                        self.save()
                if preempted:
                    stop.leave_for_requeue(self.run_dir, self.step, last=self.step == t.steps)
        finally:  # the decoding processes, also when a step fails
            collection.close()
            stop.restore()
            self.stream.close()
            self.log.close()  # (also when stopped: TensorBoard's unflushed events and a W&B run are finished)
        if self.ema and self.ema.n_averaged > 0:  # (none when no step ran: a finished run's export made again)
            # (the last checkpoint holds the weights and the average: a longer run resumes from both)
            self.model.load_state_dict(self.ema.module.state_dict())
        if self.rank == 0:
            digest = self.export_tokenizer(self.run_dir / "export.pt")
            self.log.info(f"exported {self.run_dir / 'export.pt'} (content hash {digest[:16]})")
        return history


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__, where="configs/vq/", example="model.kind=vqgan train.steps=1000")
    parser.add_argument("--data", required=True, help="LAION-style shard pattern")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", default="auto", choices=["auto", "none"])
    args = parser.parse_args(argv)
    run_trainer(args, VQConfig, lambda cfg: VQTrainer(cfg, args.data, args.run_dir), "vq.train", use_device,
                DeviceError)


if __name__ == "__main__":
    main()
