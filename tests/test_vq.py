"""The ViT-VQGAN tokenizer: it learns, uses its codebook, resumes, exports into the pipeline interface."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests import laion_fixtures as lf
from training.config import load_typed
from vq.config import VQConfig

TINY = ["model.layers=2", "model.width=64", "model.image_size=32", "model.code_dim=8", "model.codebook_size=32",
        "model.dead_code_steps=20", "loss.perceptual=0", "loss.adversarial=0", "train.batch_size=16",
        "train.resize=64", "train.lr=1e-3", "train.log_interval=1", "train.eval_interval=1000"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vqdata") / "00000.tar"
    lf.write_tar(path, [(k, {"jpg": j, "txt": c.encode()}) for k, j, c in lf.coco_mini()])
    return str(path)


def train(data: str, run_dir: Path, *overrides: str):
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*TINY, *overrides]), data, run_dir)
    trainer.resume()
    return trainer, trainer.run()


def test_trains_uses_codebook_and_exports(single_process, photos, tmp_path):
    from data_pipeline.images import FilterConfig, prepare_sample
    from vq.tokenizer import load_image_tokenizer

    trainer, history = train(photos, tmp_path, "train.steps=150", "train.save_interval=1000")
    first, last = history[0]["psnr"], sum(h["psnr"] for h in history[-10:]) / 10
    assert last >= first + 3, (first, last)
    tok = load_image_tokenizer(tmp_path / "export.pt")
    assert (tok.kind, tok.grid, tok.codebook_size, tok.image_size) == ("vit_vqgan", 4, 32, 32)
    images = torch.stack([prepare_sample({"__key__": k, "jpg": j, "txt": b"x"}, FilterConfig(image_size=32)).image
                          for k, j, _ in lf.coco_mini()]).float() / 127.5 - 1
    codes = tok.encode(images)
    assert torch.equal(codes, tok.encode(images)) and torch.equal(codes, trainer.model.eval().encode(images))
    assert codes.unique().numel() >= 16  # at least half of the codebook in use
    assert tok.decode(codes).shape == images.shape
    assert list(tmp_path.glob("recon_*.png")) and (tmp_path / "metrics.jsonl").is_file()


def test_resume_continues_the_same_run(single_process, photos, tmp_path):
    _, full = train(photos, tmp_path / "full", "train.steps=12", "train.save_interval=6")
    _, first = train(photos, tmp_path / "split", "train.steps=6", "train.save_interval=6")
    _, second = train(photos, tmp_path / "split", "train.steps=12", "train.save_interval=6")
    assert [h["loss"] for h in first + second] == pytest.approx([h["loss"] for h in full], rel=1e-5)


def test_full_objective_runs_with_logged_random_lpips(single_process, photos, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="parti"):
        _, history = train(photos, tmp_path, "train.steps=2", "loss.perceptual=0.1", "loss.adversarial=0.1",
                           "model.logit_laplace=true", "train.save_interval=1000")
    assert "RANDOM VGG backbone" in caplog.text
    for key in ("l2", "logit_laplace", "perceptual", "adversarial", "disc", "vq"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in history), key


def test_lpips_backbone_from_a_local_file(tmp_path):
    import torchvision

    from vq.losses import make_lpips

    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    model = make_lpips(tmp_path / "vgg16.pth")
    torch.testing.assert_close(model.net.slice3._modules["10"].weight, vgg.features[10].weight)
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(KeyError, match="expected a torchvision vgg16 state dict"):
        make_lpips(tmp_path / "wrong.pth")


def ddp_codebook(data: str, run_dir: str):
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*TINY, "train.steps=3", "train.batch_size=8",
                                                    "model.dead_code_steps=1"]), data, run_dir)
    history = trainer.run()
    return history[-1]["loss"], trainer.model.codebook.weight.detach().clone(), trainer.model.enc_pos.detach().clone()


def test_data_parallel_keeps_ranks_identical(pool2, photos, tmp_path):
    (loss0, codebook0, pos0), (loss1, codebook1, pos1) = pool2.run(ddp_codebook, photos, str(tmp_path))
    torch.testing.assert_close(codebook0, codebook1, rtol=0, atol=0)  # restarted codes broadcast
    torch.testing.assert_close(pos0, pos1, rtol=0, atol=0)            # gradients averaged by DDP
    assert loss0 != loss1  # each rank saw its own images
