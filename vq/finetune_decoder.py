r"""Fine-tune a new, larger detokenizer on a frozen image tokenizer's codes: Parti's detokenizer stage.

    python -m vq.finetune_decoder --tokenizer runs/vq/export.pt --config configs/vq/finetune-decoder-large.yaml \
        --data 'laion/{00000..00099}.tar' --run-dir runs/detok --set train.lpips_backbone=vgg16-397923af.pth \
        [train.steps=1000 ...] [--resume auto]
    torchrun --nproc_per_node 8 -m vq.finetune_decoder ...        # data parallel (DDP)

The encoder and codebook of --tokenizer (a ViT-VQGAN export) are copied and frozen; a decoder of the config's
shape (model.preset/layers/width/heads: e.g. ViT-VQGAN-Large's 32 blocks, width 1280, 16 heads, MLP 5120,
~630M parameters) is trained from scratch to draw the frozen codes with the tokenizer's losses (l2,
logit-Laplace, LPIPS, adversarial: the config's loss section), with vq.train's loop: DDP, bf16 autocast on
GPU, checkpoints and resume, preemption (SIGUSR1/SIGTERM/STOP: save, REQUEUE, exit 75; TRAINER=vq.finetune_decoder
in slurm/train.sbatch), metrics, reconstruction grids. The export (<run-dir>/export.pt) loads wherever the
source did: its encode() is the source's, and it keeps the source's content hash (vq/tokenizer.py), so
code shards made with the source stay valid; images decoded from them come from the new decoder.
The config's model.image_size/patch/code_dim/codebook_size are replaced by the source's (logged when they differ;
config.yaml records the source's): the crops, the discriminator and the decoder are the source's size.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from common.checkpoints import CheckpointError
from common.cli import config_parser, run_trainer
from common.config import ConfigError
from model_parallel.state import DeviceError, use_device
from vq.config import VQConfig
from vq.tokenizer import load_image_tokenizer, save_image_tokenizer
from vq.train import VQTrainer, vit_shape
from vq.vit_vqgan import ENCODER_PARTS, ViTVQGAN

SOURCE_FIXED = ("image_size", "patch", "code_dim", "codebook_size")
"""The model fields (with model.kind) the source tokenizer fixes: the config's are replaced by its."""


class DecoderFinetuner(VQTrainer):
    frozen_codes = True

    def __init__(self, cfg: VQConfig, tokenizer: str | Path, data: str, run_dir: str | Path, device: str | None = None):
        self.source = load_image_tokenizer(tokenizer)
        if self.source.kind != ViTVQGAN.kind:
            raise ConfigError(f"--tokenizer {tokenizer}: a {self.source.kind} tokenizer; vq.finetune_decoder "
                              f"fine-tunes the decoder of a {ViTVQGAN.kind} export")
        if cfg.train.init_from:  # (it would replace the frozen encoder, whose codes the export claims as its own)
            raise ConfigError(f"train.init_from={cfg.train.init_from}: vq.finetune_decoder starts from --tokenizer's "
                              "encoder and a fresh decoder; train.init_from is vq.train's")
        cfg, replaced = self.with_source_shape(cfg)
        super().__init__(cfg, data, run_dir, device)
        if replaced:
            self.log.info(f"--tokenizer {tokenizer} fixes {replaced}: the config's values are not used")

    def with_source_shape(self, cfg: VQConfig) -> tuple[VQConfig, str]:
        """The config with the source's image size, patch and codebook (which the frozen encoder fixes), and
        a note of those that differed. (The crops and the discriminator follow model.image_size.)"""
        fixed = {"kind": self.source.kind, **{k: self.source.config[k] for k in SOURCE_FIXED}}
        replaced = ", ".join(f"model.{k}={v} (not {getattr(cfg.model, k)})" for k, v in fixed.items()
                             if getattr(cfg.model, k) != v)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fixed)), replaced

    def build(self, cfg: VQConfig) -> ViTVQGAN:
        """The source's encoder and codebook (frozen) with a fresh decoder of the config's shape."""
        layers, width, heads = vit_shape(cfg.model)
        source_config = {k: v for k, v in self.source.config.items() if not k.startswith("dec_")}
        model = ViTVQGAN(**{**source_config, "logit_laplace": cfg.model.logit_laplace, "dec_layers": layers,
                            "dec_width": width, "dec_heads": heads})
        encoder = {k: v for k, v in self.source.state_dict().items() if k.split(".")[0] in ENCODER_PARTS}
        missing, unexpected = model.load_state_dict(encoder, strict=False)
        assert not unexpected and all(k.split(".")[0] not in ENCODER_PARTS for k in missing), (missing, unexpected)
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] not in ENCODER_PARTS)
        return model

    def state(self, streams: list[dict]) -> dict:
        return {**super().state(streams), "source_tokenizer": self.source.content_hash}

    def check_resumable(self, path: Path, state: dict) -> None:
        """Also refuse a --tokenizer other than the one the checkpoint's frozen encoder came from: its export
        would claim that tokenizer's codes while encoding with the checkpoint's encoder."""
        saved = state.get("source_tokenizer")
        if saved is None:  # (else it failed later, on the optimizer state of every parameter vq.train trains)
            raise CheckpointError(f"{path}: not a vq.finetune_decoder checkpoint (it names no source tokenizer: a "
                                  "vq.train run's, or a fine-tune written before 2026-12-05); give "
                                  "vq.finetune_decoder a --run-dir of its own")
        if saved != self.source.content_hash:
            raise CheckpointError(f"{path}: fine-tuned on the codes of tokenizer {saved[:16]}, but --tokenizer is "
                                  f"{self.source.content_hash[:16]}; resume with that tokenizer's export, or start "
                                  "the new one in another --run-dir")
        super().check_resumable(path, state)

    def export_tokenizer(self, path: Path) -> str:
        return save_image_tokenizer(self.model, path, codes_of=self.source.content_hash)


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__, where="configs/vq/", example="train.steps=1000 train.lr=1e-4")
    parser.add_argument("--tokenizer", required=True,
                        help="the ViT-VQGAN export whose codes stay (vq.train's export.pt)")
    parser.add_argument("--data", required=True, help="LAION-style shard pattern")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", default="auto", choices=["auto", "none"])
    args = parser.parse_args(argv)
    run_trainer(args, VQConfig, lambda cfg: DecoderFinetuner(cfg, args.tokenizer, args.data, args.run_dir),
                "vq.finetune_decoder", use_device, DeviceError)


if __name__ == "__main__":
    main()
