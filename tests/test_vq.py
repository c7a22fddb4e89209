"""The ViT-VQGAN tokenizer: it learns, uses its codebook, resumes, exports into the pipeline interface."""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from common.config import load_typed
from tests import laion_fixtures as lf
from vq.config import VQConfig

PHOTO_SIDE = 128
"""The shipped photos' shorter side here: these models see them at 32-64 px (train.resize=64)."""
TINY = ["model.layers=2", "model.width=64", "model.image_size=32", "model.code_dim=8", "model.codebook_size=32",
        "model.dead_code_steps=20", "loss.perceptual=0", "loss.adversarial=0", "train.batch_size=16",
        "train.resize=64", "train.lr=1e-3", "train.log_interval=1", "train.eval_interval=1000"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vqdata") / "00000.tar"
    lf.write_tar(path, [(k, {"jpg": j, "txt": c.encode()}) for k, j, c in lf.coco_mini(PHOTO_SIDE)])
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
                          for k, j, _ in lf.coco_mini(PHOTO_SIDE)]).float() / 127.5 - 1
    codes = tok.encode(images)
    assert torch.equal(codes, tok.encode(images)) and torch.equal(codes, trainer.model.eval().encode(images))
    assert codes.unique().numel() >= 16  # at least half of the codebook in use
    assert tok.decode(codes).shape == images.shape
    assert list(tmp_path.glob("recon_*.png")) and (tmp_path / "metrics.jsonl").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["data_wait_pct"] <= 100 and row["images_per_s"] > 0 for row in rows if "images_per_s" in row)


def test_garbage_is_collected_every_gc_interval_steps_with_automatic_collection_off(single_process, photos, tmp_path,
                                                                                  monkeypatch):
    """train.gc_interval as Parti's trainer takes it (common/collection.py): automatic collection off in every
    step, the young generations collected at the interval's steps, and on again after the run."""
    import gc

    from vq.train import VQTrainer

    real_step, real_collect, enabled, collected = VQTrainer.train_step, gc.collect, [], []
    monkeypatch.setattr(VQTrainer, "train_step", lambda self, *a: enabled.append(gc.isenabled()) or real_step(self, *a))
    monkeypatch.setattr(gc, "collect", lambda *g: g == (1,) and collected.append(len(enabled)) or real_collect(*g))
    train(photos, tmp_path, "train.steps=3", "train.gc_interval=2", "train.save_interval=1000")
    assert (enabled, collected, gc.isenabled()) == ([False] * 3, [2], True)


def test_a_run_past_exit_after_minutes_saves_after_a_step_and_stops(single_process, photos, tmp_path, monkeypatch):
    """train.exit_after_minutes as Parti's trainer takes it (common/preemption.py): one step, a save, a stop; the
    logger is closed on the way out (TensorBoard's events were left unflushed, a W&B run unfinished)."""
    from common.metrics import MetricsLogger
    from common.preemption import Preempted

    closed, close = [], MetricsLogger.close
    monkeypatch.setattr(MetricsLogger, "close", lambda self: closed.append(self) or close(self))
    with pytest.raises(Preempted, match="^stopped by train.exit_after_minutes=1e-09 after step 1"):
        train(photos, tmp_path, "train.steps=3", "train.exit_after_minutes=1e-9")
    assert (tmp_path / "REQUEUE").read_text() == "step 1\n"
    assert len(closed) == 1


def test_preempted_run_saves_and_resumes_the_same_run(single_process, photos, tmp_path, monkeypatch):
    """SIGUSR1 during step 6, sent to every process as SLURM signals a job step (the image decoding workers
    too): the step finishes, a checkpoint is saved although no save is due, REQUEUE is left, Preempted is
    raised; the rerun resumes there and ends where the uninterrupted run does. The interrupted run decodes
    its images in 2 worker processes: the same data stream."""
    from common.preemption import Preempted
    from vq.train import VQTrainer

    _, full = train(photos, tmp_path / "full", "train.steps=12", "train.save_interval=12")
    real_step, first = VQTrainer.train_step, []
    others = set(multiprocessing.active_children())  # (the session's worker pools, when they are up)

    def signalled_step(self, images):
        if self.step == 5:
            decoders = set(multiprocessing.active_children()) - others
            assert len(decoders) == 2
            for pid in [os.getpid(), *(child.pid for child in decoders)]:
                os.kill(pid, signal.SIGUSR1)
        first.append(real_step(self, images))
        return first[-1]

    monkeypatch.setattr(VQTrainer, "train_step", signalled_step)
    split = tmp_path / "split"
    with pytest.raises(Preempted, match="stopped by SIGUSR1 after step 6; checkpoint saved"):
        train(photos, split, "train.steps=12", "train.save_interval=12", "train.data_workers=2")
    monkeypatch.undo()
    assert (split / "REQUEUE").read_text() == "step 6\n"
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers go with the run
    assert not (split / "export.pt").exists()
    _, second = train(photos, split, "train.steps=12", "train.save_interval=12", "train.data_workers=2")
    assert [h["loss"] for h in first + second] == pytest.approx([h["loss"] for h in full], rel=1e-5)


def test_a_stop_signal_during_the_resume_is_honoured_before_the_first_step(single_process, photos, tmp_path,
                                                                          monkeypatch):
    """SIGTERM while `python -m vq.train` builds and resumes (minutes at scale): noted by the handlers run_trainer
    installs first, honoured before the first step (REQUEUE, exit 75), as Parti's trainer does; the handlers were
    installed in the loop only, and the signal's default action ended the process unsaved, without REQUEUE."""
    from vq.train import VQTrainer, main

    real_resume = VQTrainer.resume
    monkeypatch.setattr(VQTrainer, "resume", lambda self: (os.kill(os.getpid(), signal.SIGTERM), real_resume(self)))
    with pytest.raises(SystemExit) as stopped:
        main(["--data", photos, "--run-dir", str(tmp_path), "--set", *TINY, "train.steps=3"])
    assert stopped.value.code == 75 and (tmp_path / "REQUEUE").read_text() == "step 0\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (restored after the command)


def test_resume_falls_back_to_the_newest_complete_checkpoint_and_prunes(single_process, photos, tmp_path, caplog):
    """Checkpoints beyond train.keep_checkpoints are deleted but those train.keep_checkpoints_every keeps; with
    `latest` gone and the newest folder incomplete (a save killed before state.pt), the resume continues from the
    newest complete one."""
    run_dir, keep = tmp_path / "run", ["train.steps=10", "train.save_interval=2", "train.keep_checkpoints=2",
                                       "train.keep_checkpoints_every=4"]
    _, full = train(photos, run_dir, *keep)
    folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step_00000004", "step_00000008", "step_00000010"]  # steps 2, 6 pruned
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000010\n"
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "checkpoints" / "step_00000010" / "state.pt").unlink()
    logger = logging.getLogger("parti")  # (the trainer's logger does not propagate: caplog listens on it directly)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="parti"):
            _, resumed = train(photos, run_dir, *keep)
    finally:
        logger.removeHandler(caplog.handler)
    assert "latest is missing: resuming from the newest complete checkpoint" in caplog.text
    assert "skipping incomplete step_00000010" in caplog.text
    assert "data stream continued from its saved position" in caplog.text  # not replayed from its start
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full[8:]], rel=1e-5)  # steps 9, 10
    assert (run_dir / "checkpoints" / "step_00000010" / "state.pt").is_file()


def test_a_resume_with_the_discriminator_continues_the_same_run(single_process, photos, tmp_path):
    """With the adversarial loss on from step 0, 1 + 2 steps give the 3 uninterrupted steps: the checkpoint
    carries the discriminator's weights (its judgement in the generator's loss at step 2) and its Adam moments
    (its update at step 2, judged at step 3), and the weights' moving average (the exports the same)."""
    sets = ["loss.adversarial=0.1", "loss.adv_start=0", "train.save_interval=1", "train.ema_decay=0.5",
            "train.batch_size=4"]
    _, full = train(photos, tmp_path / "full", "train.steps=3", *sets)
    split = train(photos, tmp_path / "split", "train.steps=1", *sets)[1] + \
        train(photos, tmp_path / "split", "train.steps=3", *sets)[1]
    for key in ("loss", "adversarial", "disc"):
        assert [h[key] for h in split] == pytest.approx([h[key] for h in full], rel=1e-5), key
    exports = [torch.load(tmp_path / run / "export.pt", weights_only=True)["state_dict"] for run in ("full", "split")]
    for name, value in exports[0].items():
        torch.testing.assert_close(exports[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_single_file_checkpoints_are_moved_into_folders_and_latest_follows(tmp_path):
    """The earlier layout (checkpoints/step_XXXXXXXX.pt, `latest` naming the file) becomes the folder layout by
    renames: each file its folder's state.pt, content unchanged; the old layout's .tmp leftovers go; `latest` names
    the folder; a call again (as after a kill midway) changes nothing; resume_tag then picks the pointed one."""
    from common.checkpoints import resume_tag
    from vq.train import adopt_single_file_checkpoints

    root = tmp_path / "checkpoints"
    root.mkdir()
    for step in (2, 4):
        (root / f"step_{step:08d}.pt").write_bytes(b"weights of step %d" % step)
    (root / "step_00000006.tmp").write_bytes(b"a killed save")
    (root / "latest").write_text("step_00000002.pt\n")  # (set back by hand: not the newest)
    (root / "step_00000004").mkdir()  # a call killed after the mkdir, before the rename
    adopt_single_file_checkpoints(tmp_path)
    adopt_single_file_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    for step in (2, 4):
        assert (root / f"step_{step:08d}" / "state.pt").read_bytes() == b"weights of step %d" % step
    assert (root / "latest").read_text() == "step_00000002\n"
    assert resume_tag(tmp_path, "state.pt")[0] == "step_00000002"
    adopt_single_file_checkpoints(tmp_path / "never_ran")  # (no checkpoints folder: nothing to do)


def test_full_objective_runs_with_logged_random_lpips(single_process, photos, tmp_path, log_lines):
    _, history = train(photos, tmp_path, "train.steps=2", "loss.perceptual=0.1", "loss.adversarial=0.1",
                       "model.logit_laplace=true", "loss.logit_laplace=0.1", "train.save_interval=1000",
                       "train.lpips_backbone=random")
    assert any("RANDOM VGG backbone" in line for line in log_lines)  # (log_lines: whether or not the logger propagates)
    for key in ("l2", "logit_laplace", "perceptual", "adversarial", "disc", "vq"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in history), key


def test_lpips_backbone_from_a_local_file(single_process, tmp_path):
    import torchvision

    from common.config import ConfigError
    from vq.losses import make_lpips
    from vq.train import VQTrainer

    vgg = torchvision.models.vgg16(weights=None)
    # (torchvision's file holds the classifier too, 0.5 GB that LPIPS does not read: left out here)
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, tmp_path / "vgg16.pth")
    model = make_lpips(tmp_path / "vgg16.pth")
    torch.testing.assert_close(model.net.slice3._modules["10"].weight, vgg.features[10].weight)
    # Anything else is one line naming train.lpips_backbone, the presets' unset value included (it trained them
    # with a random VGG and a warning; 'random' asks for that, for smoke tests).
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    torch.save({**vgg.features.state_dict(prefix="features."), "features.28.weight": torch.zeros(1)},
               tmp_path / "shape.pth")  # (vgg19's or a cut-down net's: the names are there, a shape is not)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "vgg16.pth").read_bytes()[:4096])
    for backbone, expected in (("", r"a perceptual loss weight > 0 needs train.lpips_backbone: .*or 'random' for"),
                               ("wrong.pth", r"no features.0.weight of shape \[64, 3, 3, 3\]; expected a torchvision"),
                               ("shape.pth", r"no features.28.weight of shape \[512, 512, 3, 3\]"),
                               ("cut.pth", r"not readable as a state dict"), ("none.pth", r"no such file")):
        where = f"train.lpips_backbone={re.escape(str(tmp_path / backbone))}: " if backbone else ""
        with pytest.raises(ConfigError, match=f"^{where}{expected}"):
            make_lpips(tmp_path / backbone if backbone else "")
    with pytest.raises(ConfigError, match="needs train.lpips_backbone"):  # (before the run directory is made)
        VQTrainer(load_typed(VQConfig, "configs/vq/vit-vqgan-small.yaml", TINY[:6]), "unused", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def ddp_codebook(data: str, run_dir: str):
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*TINY, "train.steps=3", "train.batch_size=8",
                                                    "model.dead_code_steps=1", "loss.adversarial=0.1",
                                                    "loss.adv_start=0"]), data, run_dir)
    history = trainer.run()
    disc = {k: v.clone() for k, v in trainer.losses.discriminator.state_dict().items()}
    saved = torch.load(Path(run_dir) / "checkpoints" / "step_00000003" / "state.pt", map_location="cpu",
                       weights_only=True)
    return (history[-1]["loss"], trainer.model.codebook.weight.detach().clone(), trainer.model.enc_pos.detach().clone(),
            disc, sorted(saved["disc"]) if trainer.rank == 0 else None, [state["rank"] for state in saved["streams"]])


def test_data_parallel_keeps_ranks_identical(pool2, photos, tmp_path):
    """Generator and discriminator (adversarial loss from step 0) stay the same on both ranks."""
    (loss0, codebook0, pos0, disc0, keys, streams), (loss1, codebook1, pos1, disc1, _, _) = \
        pool2.run(ddp_codebook, photos, str(tmp_path))
    assert streams == [0, 1]  # each rank's data stream state, gathered into rank 0's checkpoint
    torch.testing.assert_close(codebook0, codebook1, rtol=0, atol=0)  # restarted codes broadcast
    torch.testing.assert_close(pos0, pos1, rtol=0, atol=0)            # gradients averaged by DDP
    torch.testing.assert_close(disc0, disc1, rtol=0, atol=0)          # the discriminator's too
    assert keys == sorted(disc0) and not any(k.startswith("module.") for k in keys)  # the bare module's keys
    assert loss0 == loss1  # the logged loss: the step's mean over both ranks (mean_over_ranks)


def whole_batch_psnr(*ranks: float) -> float:
    """The PSNR of equal batches joined, from each one's PSNR (their mean squared error: 10^(-dB/10) x peak^2)."""
    return -10 * math.log10(sum(10 ** (-p / 10) for p in ranks) / len(ranks))


def ranks_psnr(seed: int):
    """Each rank's own images (rank r: noise of scale r + 1) and the logged step numbers, averaged over ranks."""
    import torch.distributed as dist

    from common.metrics import mean_over_ranks, psnr

    rank = dist.get_rank()
    reference = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    images = reference + 0.1 * (rank + 1) * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(rank))
    return mean_over_ranks({"psnr": psnr(images, reference), "loss": float(rank), "step": 3})


def test_the_logged_psnr_of_a_data_parallel_step_is_the_whole_batchs(pool2):
    """mean_over_ranks: a PSNR is averaged as the squared error it stands for (the PSNR of both ranks' images
    together, by common.metrics.psnr on the joined batch), other numbers as they are."""
    from common.metrics import psnr

    first, second = pool2.run(ranks_psnr, 5)
    reference = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    images = [reference + 0.1 * (r + 1) * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(r))
              for r in (0, 1)]
    whole = psnr(torch.cat(images), torch.cat([reference, reference]))
    ranks = [psnr(i, reference) for i in images]
    assert first == second and first["psnr"] == pytest.approx(whole, rel=1e-6)
    assert abs(whole - sum(ranks) / 2) > 0.5  # (the mean of the decibels, logged before, is another number)
    assert (first["loss"], first["step"]) == (0.5, 3)


def test_nearest_code_search_is_fp32_under_bf16_autocast():
    """Training runs under bf16 autocast, pre-tokenization in fp32: both must pick the same codes. The
    latents and 512 codes in 8 dimensions leave near ties that a bf16 search orders differently."""
    import torch.nn.functional as F

    from vq.conv_vqgan import ConvVQGAN
    from vq.tokenizer import ConvVQ
    from vq.vit_vqgan import ViTVQGAN

    torch.manual_seed(0)
    n, dim = 512, 8
    vit = ViTVQGAN(image_size=8, patch=8, layers=0, width=64, code_dim=dim, codebook_size=n)
    conv = ConvVQ(image_size=8, downsample=1, channels=8, code_dim=dim, codebook_size=n)
    gan = ConvVQGAN("taming", ch=8, ch_mult=[1, 1], num_res_blocks=1, z_channels=8, embed_dim=dim, n_embed=n,
                    resolution=8, attn_resolutions=[])
    z = torch.randn(1024, dim)

    def l2_search(w):  # the search as it was, a matmul that autocast runs in bf16
        return lambda z: (z.pow(2).sum(-1, keepdim=True) - 2 * z @ w.t() + w.pow(2).sum(-1)).argmin(-1)

    cases = {  # name: (the model's search on latents [N, dim], the search as it was, latents)
        "vit_vqgan": (vit.codes_of, lambda z: (z @ F.normalize(vit.codebook.weight, dim=-1).t()).argmax(-1),
                      F.normalize(z, dim=-1)),
        "conv_vq": (lambda z: conv.quantize(z.t()[None, :, :, None]).flatten(), l2_search(conv.codebook.weight), z),
        "conv_vqgan": (gan.nearest, l2_search(gan.quantize.embedding.weight), z),
    }
    with torch.no_grad():
        for name, (search, old, latents) in cases.items():
            fp32 = old(latents)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16, fixed = old(latents), search(latents)
            assert (bf16 != fp32).any(), f"{name}: the batch does not tell a bf16 search from an fp32 one"
            assert torch.equal(fixed, fp32), f"{name}: {(fixed != fp32).float().mean():.1%} of codes differ"
            assert torch.equal(search(latents), fp32), name


def test_frozen_codes_under_bf16_autocast_are_the_fp32_encoders():
    """Detokenizer fine-tuning trains under bf16 autocast on the frozen tokenizer's codes: they are encode()'s,
    which pre-tokenization computes in fp32 (the frozen encoder's latents in bf16 moved ~1% of them). (The dVAE's
    frozen codes are made the same way; its argmax over logits showed no bf16 difference on the CPU to test.)"""
    from vq.vit_vqgan import ViTVQGAN

    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    model = ViTVQGAN(image_size=32, patch=4, layers=2, width=64, code_dim=8, codebook_size=512)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        _, aux = model(images, frozen_codes=True)
    assert torch.equal(aux["codes"].reshape(16, -1), model.encode(images).reshape(16, -1))


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")  # meta weights: no-op copies
def test_resume_on_another_device_loads_onto_its_parameters(single_process, photos, tmp_path):
    """A checkpoint is loaded onto the CPU and copied onto the parameters' device (a map_location of the GPU
    once put the saved RNG states there, and every resume on a GPU failed). Here the resuming trainer lives on
    "meta"."""
    from vq.train import VQTrainer

    cfg = load_typed(VQConfig, None, [*TINY, "train.steps=1", "loss.adversarial=0.1"])
    saver, resumer = VQTrainer(cfg, photos, tmp_path), VQTrainer(cfg, photos, tmp_path, device="meta")
    saver.train_step(saver.batch())  # optimizer and discriminator state in the checkpoint
    saver.step = 1
    saver.save()
    resumer.resume()
    assert resumer.step == 1 and resumer.model.codebook.weight.device.type == "meta"
    assert all(v.device.type == "meta" for v in resumer.opt.state_dict()["state"][0].values() if v.dim())
    for trainer in (saver, resumer):
        trainer.stream.close()


def test_each_rank_draws_its_own_gumbel_noise_and_a_resumed_step_the_same(single_process, photos, tmp_path,
                                                                           monkeypatch):
    """The dVAE's Gumbel noise at step 3 on rank 0 and on rank 1 of 2 (each a fresh trainer: every rank seeds
    alike): other noise (one seed gave every rank's images the same), and rank 0's again from a third trainer
    (as after a resume): the draws follow (seed, step, rank)."""
    from vq.train import VQTrainer

    noise, real = [], torch.nn.functional.gumbel_softmax
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax",
                        lambda logits, **kw: noise.append(torch.get_rng_state()) or real(logits, **kw))
    for rank in (0, 1, 0):
        trainer = VQTrainer(load_typed(VQConfig, None, [*TINY, *DVAE, "train.steps=4"]), photos, tmp_path / str(rank))
        trainer.rank, trainer.world, trainer.step = rank, 2, 3
        trainer.train_step(trainer.batch())
        trainer.stream.close()
    assert not torch.equal(noise[0], noise[1]) and torch.equal(noise[0], noise[2])


def _write_marker(path: str) -> dict:
    """What the planted payload runs when it is unpickled."""
    Path(path).write_text("the payload ran")
    return {}


class Payload:
    """An object whose unpickling calls _write_marker: code that a checkpoint would run when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (str(self.marker),)


def test_a_pickle_planted_in_a_checkpoint_does_not_run(single_process, photos, tmp_path):
    from vq.train import CheckpointError, VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*TINY, "train.steps=1"]), photos, tmp_path / "run")
    trainer.save()
    path, marker = tmp_path / "run" / "checkpoints" / "step_00000000" / "state.pt", tmp_path / "marker"
    state = torch.load(path, map_location="cpu", weights_only=True)  # what vq.train writes loads so
    torch.save({**state, "config": Payload(marker)}, path)
    torch.load(path, map_location="cpu", weights_only=False)  # the payload is live: an unguarded load runs it
    assert marker.is_file()
    marker.unlink()
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: refused: .*_write_marker"):
        trainer.resume()
    assert not marker.exists() and trainer.step == 0
    path.write_bytes(path.read_bytes()[:100])  # a damaged file: named too
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: not a readable checkpoint"):
        trainer.resume()


# ---------------------------------------------------------------------------------------------
# Parti's detokenizer stage: a larger decoder fine-tuned on the frozen codes (vq/finetune_decoder.py)


@pytest.fixture(scope="module")
def split_photos(tmp_path_factory) -> tuple[str, torch.Tensor]:
    """12 shipped photos as a shard to train on; the other 5 held back (float [5, 3, 32, 32] in [-1, 1])."""
    from data_pipeline.images import FilterConfig, prepare_sample

    samples = lf.coco_mini(PHOTO_SIDE)
    path = tmp_path_factory.mktemp("detok") / "00000.tar"
    lf.write_tar(path, [(k, {"jpg": j, "txt": c.encode()}) for k, j, c in samples[:12]])
    held_back = torch.stack([prepare_sample({"__key__": k, "jpg": j, "txt": b"x"}, FilterConfig(image_size=32)).image
                             for k, j, _ in samples[12:]]).float() / 127.5 - 1
    return str(path), held_back


def test_finetuned_decoder_keeps_the_codes_and_draws_held_back_photos_better(single_process, split_photos, tmp_path):
    import torch.nn.functional as F

    from data_pipeline.images import FilterConfig
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from common.checkpoints import CheckpointError
    from vq.finetune_decoder import DecoderFinetuner
    from vq.tokenizer import load_image_tokenizer

    data, held_back = split_photos
    train(data, tmp_path / "vq", "train.steps=40", "train.save_interval=1000")
    source = load_image_tokenizer(tmp_path / "vq" / "export.pt")
    # Code shards made with the source tokenizer, before the fine-tuning.
    spm = train_sentencepiece([c for _, _, c in lf.coco_mini(PHOTO_SIDE)] * 5, 60, tmp_path / "spm.model")
    text_tok, filters = TextTokenizer(spm, 16), FilterConfig(image_size=32, min_size=32)
    pretokenize([Path(data)], tmp_path / "codes", source, text_tok, filters)

    cfg = load_typed(VQConfig, None, [*TINY, "model.layers=3", "model.width=96", "model.heads=4", "train.steps=250",
                                      "train.lr=2e-3", "train.save_interval=1000"])
    tuner = DecoderFinetuner(cfg, tmp_path / "vq" / "export.pt", data, tmp_path / "detok")
    tuner.resume()
    history = tuner.run()
    assert history[-1]["code_usage"] > 0.2  # (the frozen codes' usage: logged as 0 before, never tracked)
    tuned = load_image_tokenizer(tmp_path / "detok" / "export.pt")
    assert len(tuned.decoder) == 3 and tuned.decoder[0].mlp[0].in_features == 96 and tuned.decoder[0].heads == 4
    codes = source.encode(held_back)
    assert torch.equal(tuned.encode(held_back), codes)  # the encoder and codebook are the source's
    assert tuned.content_hash == source.content_hash and tuned.weights_hash != source.weights_hash
    before, after = (F.mse_loss(tok.decode(codes), held_back).item() for tok in (source, tuned))
    assert after < 0.97 * before, (before, after)  # (measured: 0.149 -> 0.139)
    pretokenize([Path(data)], tmp_path / "codes", tuned, text_tok, filters)  # the shards made before still fit
    # Resumed with another --tokenizer: refused (its export would claim that tokenizer's codes, encoding with these).
    train(data, tmp_path / "other", "train.steps=1", "train.seed=7")
    other = DecoderFinetuner(cfg, tmp_path / "other" / "export.pt", data, tmp_path / "detok")
    with pytest.raises(CheckpointError, match=r"step_00000250/state.pt: fine-tuned on the codes of tokenizer "
                                              rf"{source.content_hash[:16]}, but --tokenizer is"):
        other.resume()
    other.stream.close()
    # Pointed at the source's own vq.train run: refused as such (it failed on the optimizer's parameter count).
    own = DecoderFinetuner(cfg, tmp_path / "vq" / "export.pt", data, tmp_path / "vq")
    with pytest.raises(CheckpointError, match=r"step_00000040/state.pt: not a vq.finetune_decoder checkpoint"):
        own.resume()
    own.stream.close()


def test_a_detokenizer_whose_encoder_was_changed_is_refused(single_process, split_photos, tmp_path):
    from vq.tokenizer import load_image_tokenizer, save_image_tokenizer
    from vq.vit_vqgan import ViTVQGAN

    model = ViTVQGAN(image_size=32, patch=8, layers=1, width=32, code_dim=8, codebook_size=16, dec_layers=2)
    save_image_tokenizer(model, tmp_path / "tok.pt", codes_of="0" * 64)
    assert load_image_tokenizer(tmp_path / "tok.pt").content_hash == "0" * 64
    blob = torch.load(tmp_path / "tok.pt", weights_only=True)
    blob["state_dict"]["codebook.weight"] += 1
    torch.save(blob, tmp_path / "tok.pt")
    with pytest.raises(ValueError, match="encoder and codebook differ"):
        load_image_tokenizer(tmp_path / "tok.pt")


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["state_dict"].pop("decoder.0.bias"), r"missing keys \['decoder.0.bias'\], unexpected keys \[\]"),
    (lambda b: b["state_dict"].update(extra=torch.zeros(1)), r"missing keys \[\], unexpected keys \['extra'\]"),
    (lambda b: b["codes"].pop("hash"), r"its codes record is \{'encoder_sha256': '[0-9a-f]+'\}, not \{'hash': str"),
    (lambda b: b["codes"].update(hash=5), r"its codes record is \{'hash': 5, .*not \{'hash': str"),
    (lambda b: b.update(codes=None), r"its codes record is None, not"),
    (lambda b: b.update(kind=["conv_vq"]), r"unknown tokenizer kind \['conv_vq'\]")],
    ids=["missing-key", "unexpected-key", "codes-without-hash", "hash-not-text", "codes-none", "kind-list"])
def test_an_export_with_a_field_missing_or_of_another_kind_is_refused_naming_it(tmp_path, edit, message):
    """A detokenizer export loads frozen with its source's content hash (and, returned by the save, the hash a
    manifest records), its weights hash naming its config too; one edited is refused naming the file and field
    (was: a KeyError or AttributeError naming neither, or a hash of 5 recorded in manifests)."""
    from data_pipeline.errors import DataError
    from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

    file, model = tmp_path / "tok.pt", ConvVQ(image_size=8, downsample=1, channels=4, code_dim=2, codebook_size=4)
    assert save_image_tokenizer(model, file, codes_of="0" * 64) == "0" * 64
    tok = load_image_tokenizer(file)
    assert tok.content_hash == "0" * 64 and not tok.training and not any(p.requires_grad for p in tok.parameters())
    blob = torch.load(file, weights_only=True)
    torch.save({**blob, "config": {**blob["config"], "image_size": 16}}, file)  # (same weights, other images)
    assert load_image_tokenizer(file).weights_hash != tok.weights_hash
    edit(blob)
    torch.save(blob, file)
    with pytest.raises(DataError, match=rf"^{re.escape(str(file))}: {message}"):
        load_image_tokenizer(file)


def test_the_vit_decoder_takes_its_own_shape_recorded_only_when_set():
    """dec_layers/dec_width/dec_heads (vq.finetune_decoder's larger decoder) shape the decoder alone, its heads
    width / 64 when only its width is given (not the encoder's heads); a width its heads do not divide is refused.
    The config records them only when set: an export saved before they existed keeps its content hash."""
    from vq.vit_vqgan import ViTVQGAN

    shape = {"image_size": 8, "patch": 4, "layers": 1, "width": 64, "code_dim": 4, "codebook_size": 8, "heads": 4}
    plain, model = ViTVQGAN(**shape), ViTVQGAN(**shape, dec_layers=2, dec_width=128)
    assert not {"dec_layers", "dec_width", "dec_heads"} & set(plain.config)
    assert model.config == {**plain.config, "dec_layers": 2, "dec_width": 128}
    assert (len(model.encoder), model.encoder[0].heads) == (1, 4)
    assert (len(model.decoder), model.decoder[0].heads, model.dec_in.out_features) == (2, 2, 128)
    with pytest.raises(ValueError, match=r"widths 64 \(encoder\) and 96 \(decoder\) must be multiples"):
        ViTVQGAN(**shape, dec_width=96, dec_heads=5)


def test_files_that_are_not_exports_are_named_for_what_they_are(tmp_path):
    """A vq.train checkpoint passed as --vq says so (was: unknown tokenizer kind None); a file that is no torch.save
    archive (a SentencePiece model) is refused without torch's advice to load it with weights_only=False."""
    from data_pipeline.errors import DataError
    from vq.tokenizer import load_image_tokenizer

    torch.save({"model": {}, "opt": {}, "step": 3, "streams": None}, tmp_path / "state.pt")
    with pytest.raises(DataError, match=r"state\.pt: a vq\.train checkpoint, not an export; pass the run's export"):
        load_image_tokenizer(tmp_path / "state.pt")
    (tmp_path / "spm.model").write_bytes(b"\n\x0b\n\x05<pad>\x15\x00\x00\x00\x00")
    with pytest.raises(DataError, match=r"spm\.model: not an image tokenizer export") as e:
        load_image_tokenizer(tmp_path / "spm.model")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_the_finetuned_decoder_takes_the_sources_image_size_and_codebook(single_process, photos, tmp_path, log_lines):
    """A config whose model.image_size/patch/code_dim/codebook differ from --tokenizer's trains at the source's size
    (the crops and the discriminator at the config's 64 px failed with a shape error) and says so. The encoder and
    codebook stay the source's through a training step; the decoder is the config's (here logit-Laplace)."""
    import yaml

    from vq.finetune_decoder import DecoderFinetuner
    from vq.tokenizer import load_image_tokenizer, save_image_tokenizer
    from vq.vit_vqgan import ENCODER_PARTS, ViTVQGAN

    source = ViTVQGAN(image_size=32, patch=8, layers=1, width=32, code_dim=8, codebook_size=16)
    save_image_tokenizer(source, tmp_path / "tok.pt")
    cfg = load_typed(VQConfig, None, [*TINY, "model.image_size=64", "model.patch=16", "model.codebook_size=64",
                                      "model.code_dim=4", "model.logit_laplace=true", "loss.logit_laplace=0.1",
                                      "loss.adversarial=0.1", "loss.adv_start=0", "train.steps=1"])
    tuner = DecoderFinetuner(cfg, tmp_path / "tok.pt", photos, tmp_path / "detok")
    tuner.resume()
    tuner.run()
    tuned = load_image_tokenizer(tmp_path / "detok" / "export.pt")
    assert tuned.image_size == 32 and tuned.out_channels == 6
    frozen = {k: v for k, v in tuned.state_dict().items() if k.split(".")[0] in ENCODER_PARTS}
    assert "codebook.weight" in frozen and all(torch.equal(v, source.state_dict()[k]) for k, v in frozen.items())
    saved = yaml.safe_load((tmp_path / "detok" / "config.yaml").read_text())["model"]
    assert (saved["image_size"], saved["patch"], saved["code_dim"], saved["codebook_size"]) == (32, 8, 8, 16)
    assert any("model.image_size=32 (not 64), model.patch=8 (not 16), model.code_dim=8 (not 4), "
               "model.codebook_size=16 (not 64)" in line for line in log_lines)


def test_only_a_vit_vqgan_decoder_is_finetuned(tmp_path):
    """--tokenizer of another kind is refused before the run starts (the fine-tune builds a ViT-VQGAN around its
    encoder's parameters)."""
    from common.config import ConfigError
    from vq.finetune_decoder import DecoderFinetuner
    from vq.tokenizer import save_image_tokenizer
    from vq.vqvae import VQVAE

    save_image_tokenizer(VQVAE(image_size=32, patch=8, width=8, code_dim=4, codebook_size=16), tmp_path / "tok.pt")
    with pytest.raises(ConfigError, match=r"tok\.pt: a vqvae tokenizer; vq\.finetune_decoder fine-tunes the decoder "
                                          "of a vit_vqgan export"):
        DecoderFinetuner(load_typed(VQConfig, None, TINY), tmp_path / "tok.pt", "x.tar", tmp_path / "detok")
    assert not (tmp_path / "detok").exists()


def test_a_resume_with_another_model_is_refused_naming_the_shapes_and_leaves_the_run(single_process, photos, tmp_path):
    """(load_state_dict's many-line RuntimeError before, after config.yaml had been rewritten.) Also refused up
    front: a train.resize smaller than the crops cut from it (it failed at the first step)."""
    from common.config import ConfigError
    from vq.train import VQTrainer

    train(photos, tmp_path, "train.steps=1")
    before = (tmp_path / "config.yaml").read_text()
    other = VQTrainer(load_typed(VQConfig, None, [*TINY, "model.width=32", "train.steps=2"]), photos, tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"step_00000001/state.pt \(to resume\) does not fit the configured "
                                              r"model \(.*other shape.*\): resume with the model section"):
            other.resume()
    finally:
        other.stream.close()
    assert (tmp_path / "config.yaml").read_text() == before
    with pytest.raises(ConfigError, match=r"train\.resize=16 must be at least model\.image_size=32"):
        VQTrainer(load_typed(VQConfig, None, [*TINY, "train.resize=16"]), photos, tmp_path / "small")
    with pytest.raises(ConfigError, match=r"train\.eval_interval=0 must be >= 1 \(steps between evaluations\)"):
        VQTrainer(load_typed(VQConfig, None, [*TINY, "train.eval_interval=0"]), photos, tmp_path / "never")  # (it
        # failed as a division by zero at the first step)


def test_a_run_is_not_resumed_with_other_heads(single_process, photos, tmp_path):
    """Heads leave the weights' shapes alone: a checkpoint is refused by a run that would build other heads,
    naming the setting that continues it; also one written when heads were width / 64 (no model.heads in its
    config)."""
    from vq.train import CheckpointError

    train(photos, tmp_path / "now", "model.width=128", "model.heads=4", "train.steps=2", "train.save_interval=2")
    with pytest.raises(CheckpointError, match=r"had 4 heads \(model.heads\); this run builds 2: .* model.heads=4"):
        train(photos, tmp_path / "now", "model.width=128", "train.steps=4", "train.save_interval=2")
    train(photos, tmp_path, "model.width=128", "train.steps=2", "train.save_interval=2")
    state_file = tmp_path / "checkpoints" / "step_00000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["config"]["model"]["heads"]  # as the older runs wrote it
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"had 2 heads .* --set model.heads=2"):
        train(photos, tmp_path, "model.width=128", "model.heads=4", "train.steps=250", "train.save_interval=2")
    _, rest = train(photos, tmp_path, "model.width=128", "model.heads=2", "train.steps=4", "train.save_interval=2")
    assert len(rest) == 2


# ---------------------------------------------------------------------------------------------
# Other tokenizer families in vq.train (model.kind)

VQVAE = ["model.kind=vqvae", "model.width=64", "model.image_size=32", "model.patch=4", "model.code_dim=16",
         "model.codebook_size=32", "model.dead_code_steps=20", "loss.perceptual=0", "loss.adversarial=0",
         "train.batch_size=16", "train.resize=64", "train.lr=2e-3", "train.log_interval=1", "train.eval_interval=1000"]


def test_vqvae_trains_uses_its_codebook_exports_and_pretokenizes(single_process, photos, tmp_path):
    """VQ-VAE with an EMA codebook: PSNR up by 3 dB, half the codebook in use on the photos, the export loads
    with the same codes, and pre-tokenization takes it."""
    from data_pipeline.images import FilterConfig, prepare_sample
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from vq.tokenizer import load_image_tokenizer
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*VQVAE, "train.steps=150", "train.save_interval=1000"]),
                        photos, tmp_path)
    history = trainer.run()
    first, last = history[0]["psnr"], sum(h["psnr"] for h in history[-10:]) / 10
    assert last >= first + 3, (first, last)
    tok = load_image_tokenizer(tmp_path / "export.pt")
    assert (tok.kind, tok.grid, tok.codebook_size) == ("vqvae", 8, 32)
    images = torch.stack([prepare_sample({"__key__": k, "jpg": j, "txt": b"x"}, FilterConfig(image_size=32)).image
                          for k, j, _ in lf.coco_mini(PHOTO_SIDE)]).float() / 127.5 - 1
    codes = tok.encode(images)
    assert torch.equal(codes, trainer.model.eval().encode(images)) and codes.unique().numel() >= 16
    assert tok.decode(codes).shape == images.shape
    spm = train_sentencepiece([c for _, _, c in lf.coco_mini(PHOTO_SIDE)] * 5, 60, tmp_path / "spm.model")
    manifest = pretokenize([Path(photos)], tmp_path / "codes", tok, TextTokenizer(spm, 16),
                           FilterConfig(image_size=32, min_size=32))
    assert manifest["vq"]["kind"] == "vqvae" and manifest["vq"]["hash"] == tok.content_hash


def test_vqvae_codebook_follows_its_moving_averages_only():
    """The EMA rule by hand: one training pass with decay 0.75 moves each used code a quarter of the way to the mean
    of its latents (Laplace smoothing aside), leaves unused ones, and the codebook gets no gradient; the loss's
    commitment term, beta x mse(z, sg[q]), pulls the encoder."""
    from torch.nn import functional as F

    from vq.vqvae import VQVAE

    torch.manual_seed(0)
    model = VQVAE(image_size=16, patch=4, width=16, code_dim=4, codebook_size=8, ema_decay=0.75, dead_code_steps=10**6)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    z = model.latents(images).detach()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    with torch.no_grad():  # 6 codes among the latents, 2 far (at initialisation every latent chose the same code)
        model.codebook.weight.copy_(torch.cat([flat[:48:8], torch.randn(2, 4)]))
        model.ema_sum.copy_(model.codebook.weight)
    before = model.codebook.weight.detach().clone()
    codes = model.codes_of(z).flatten()
    assert codes.unique().numel() > 3 and not torch.isin(torch.arange(6, 8), codes).any()
    out, aux = model(images)
    enc = model.encoder[0].weight
    g_enc = torch.autograd.grad(aux["vq_loss"], enc, retain_graph=True, allow_unused=True)[0]
    q = before[codes].view(4, 4, 4, 4).permute(0, 3, 1, 2)  # (the codes before this pass's EMA update)
    torch.testing.assert_close(g_enc, torch.autograd.grad(0.25 * F.mse_loss(model.latents(images), q), enc)[0])
    (out.square().mean() + aux["vq_loss"]).backward()
    assert model.codebook.weight.grad is None
    counts = torch.bincount(codes, minlength=8).float()
    ema_count = 0.75 * 1 + 0.25 * counts  # (decay 0.75: a swapped decay and 1 - decay differ)
    ema_sum = 0.75 * before + 0.25 * torch.zeros(8, 4).index_add_(0, codes, flat)
    n = ema_count.sum()
    expected = ema_sum / ((ema_count + 1e-5) / (n + 8 * 1e-5) * n)[:, None]
    torch.testing.assert_close(model.codebook.weight, expected)


def photo_batch(size: int = 32) -> torch.Tensor:
    """The shipped photos, centre-cropped: float [17, 3, size, size] in [-1, 1]."""
    from data_pipeline.images import FilterConfig, prepare_sample

    return torch.stack([prepare_sample({"__key__": k, "jpg": j, "txt": b"x"}, FilterConfig(image_size=size)).image
                        for k, j, _ in lf.coco_mini(PHOTO_SIDE)]).float() / 127.5 - 1


def pretokenizes(tok, data: str, tmp_path: Path) -> dict:
    """The pipeline's pre-tokenization with this tokenizer, unchanged; returns the manifest."""
    from data_pipeline.images import FilterConfig
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece

    spm = train_sentencepiece([c for _, _, c in lf.coco_mini(PHOTO_SIDE)] * 5, 60, tmp_path / "spm.model")
    return pretokenize([Path(data)], tmp_path / "codes", tok, TextTokenizer(spm, 16),
                       FilterConfig(image_size=tok.image_size, min_size=tok.image_size))


def psnr_gain(history: list[dict]) -> tuple[float, float]:
    """(PSNR of the first step, mean PSNR of the last 10)."""
    return history[0]["psnr"], sum(h["psnr"] for h in history[-10:]) / 10


VQGAN = ["model.kind=vqgan", "model.width=16", "model.ch_mult=[1,2,2]", "model.res_blocks=1", "model.patch=4",
         "model.image_size=32", "model.code_dim=16", "model.codebook_size=32", "model.dead_code_steps=20",
         "loss.perceptual=0", "loss.adversarial=0", "train.batch_size=16", "train.resize=64", "train.lr=2e-3",
         "train.log_interval=1000", "train.eval_interval=1000", "train.save_interval=1000"]


def test_vqgan_trains_uses_its_codebook_exports_and_pretokenizes(single_process, photos, tmp_path):
    """VQGAN on ConvVQGAN's own modules: PSNR up by 3 dB, half the codebook in use on the photos, the export
    loads (a ConvVQGAN, taming's parameter names) with the same codes, and pre-tokenization takes it. (The
    discriminator is off here, as in taming's first phase before disc_start; the next tests cover it.)"""
    from vq.conv_vqgan import ConvVQGAN
    from vq.tokenizer import load_image_tokenizer
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*VQGAN, "train.steps=100"]), photos, tmp_path)
    first, last = psnr_gain(trainer.run())
    # (measured: 10.2 -> 16.1 dB; full-size photos, seeds 1-3: +8.0, +4.8, +5.7)
    assert last >= first + 3, (first, last)
    tok = load_image_tokenizer(tmp_path / "export.pt")
    assert (tok.kind, tok.grid, tok.codebook_size) == ("vqgan", 8, 32) and isinstance(tok, ConvVQGAN)
    taming = ConvVQGAN("taming", ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, embed_dim=16, n_embed=32,
                       resolution=32, attn_resolutions=[8])
    assert set(tok.state_dict()) - set(taming.state_dict()) == {"usage", "last_used", "step"}
    assert set(taming.state_dict()) <= set(tok.state_dict())  # taming's keys, so its checkpoints map on
    images = photo_batch()
    codes = tok.encode(images)
    assert torch.equal(codes, trainer.model.eval().encode(images))
    # (measured: 30 of 32; full-size photos, seeds 1-3: 30, 31, 27)
    assert codes.unique().numel() >= 16, codes.unique().numel()
    assert tok.decode(codes).shape == images.shape
    manifest = pretokenizes(tok, photos, tmp_path)
    assert manifest["vq"]["kind"] == "vqgan" and manifest["vq"]["hash"] == tok.content_hash


def test_a_fresh_vqgan_spreads_the_photos_over_its_codebook():
    """taming's codebook start, U(-1/K, 1/K): codes near the encoder's first latents, so an untrained VQGAN's
    nearest codes spread (measured, seeds 0-2: 132-153 distinct of 256 on the 17 photos). nn.Embedding's N(0, 1)
    codes left the few shortest nearest to every latent (4-15 distinct), a collapse only dead-code restarts undid."""
    from vq.train import build_model

    torch.manual_seed(0)
    model = build_model(load_typed(VQConfig, None, [*VQGAN, "model.codebook_size=256", "model.code_dim=64"]))
    assert model.encode(photo_batch()).unique().numel() >= 64


@pytest.mark.parametrize("l2_norm", [False, True])
def test_a_dead_code_restart_keeps_the_steps_backward_and_gradients(l2_norm):
    """A code restarted during the forward (track_usage) while the graph holds the codebook weight itself:
    VQGAN(l2_norm=True) normalises the weight, and the in-place restart failed its backward. The gradients are
    those of the same forward without the restart (the restarted rows were chosen by no code)."""
    from vq.vqgan import VQGAN

    def step(restart: bool):
        torch.manual_seed(0)
        model = VQGAN(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=64, resolution=16,
                      attn_resolutions=[], l2_norm=l2_norm, dead_code_steps=0)
        model.dead_code_steps, model.step = (1 if restart else 0), torch.tensor(5)
        out, aux = model(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
        (out.square().mean() + aux["vq_loss"]).backward()
        return model

    restarted, plain = step(True), step(False)
    assert not torch.equal(restarted.codebook.weight, plain.codebook.weight)  # (codes were restarted)
    for (name, a), b in zip(restarted.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_init_from_an_export_starts_a_run_that_a_resume_then_continues(single_process, photos, tmp_path):
    """train.init_from=<export.pt>: step 0 has the export's weights; once the run has a checkpoint, a resume takes
    its weights instead; an export of another kind, shape or attention heads is refused naming the file;
    vq.finetune_decoder refuses the key (it would replace the frozen encoder)."""
    from common.config import ConfigError
    from vq.finetune_decoder import DecoderFinetuner
    from vq.tokenizer import load_image_tokenizer
    from vq.train import main

    source, _ = train(photos, tmp_path / "source", "train.steps=2", "train.seed=7")
    export = tmp_path / "source" / "export.pt"

    def weights(trainer):
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    started, _ = train(photos, tmp_path / "ft", "train.steps=0", f"train.init_from={export}")
    assert weights(started).keys() == weights(source).keys()
    assert all(torch.equal(a, weights(source)[k]) for k, a in weights(started).items())
    # The command line too, also with --resume none: 0 steps, so its export is the weights it started from.
    main(["--data", photos, "--run-dir", str(tmp_path / "cli"), "--resume", "none", "--set", *TINY, "train.steps=0",
          f"train.init_from={export}"])
    assert (load_image_tokenizer(tmp_path / "cli" / "export.pt").weights_hash
            == load_image_tokenizer(export).weights_hash)
    tuned, _ = train(photos, tmp_path / "ft", "train.steps=2", "train.save_interval=2", f"train.init_from={export}")
    resumed, _ = train(photos, tmp_path / "ft", "train.steps=2", f"train.init_from={export}")
    assert resumed.step == 2 and all(torch.equal(a, weights(tuned)[k]) for k, a in weights(resumed).items())
    assert not torch.equal(weights(resumed)["codebook.weight"], weights(source)["codebook.weight"])
    for other, error in ((VQGAN, rf"init_from={export}: a vit_vqgan tokenizer; this run trains model.kind=vqgan"),
                         (["model.width=128"], (rf"init_from={export} does not fit the configured model \(\d+ other "
                                               r"shape\(s\): .*set the model section as the source was trained")),
                         (["model.heads=2"], (rf"init_from={export}: its attention has 1 heads where the configured "
                                              r"model has 2 \(encoder.0, 4 block\(s\)\): set model.heads"))):
        with pytest.raises(ConfigError, match=error):
            train(photos, tmp_path / str(len(other)), *other, "train.steps=0", f"train.init_from={export}")
    with pytest.raises(ConfigError, match="vq.finetune_decoder starts from --tokenizer's encoder"):
        DecoderFinetuner(load_typed(VQConfig, None, [*TINY, f"train.init_from={export}"]), export, photos, tmp_path)


def test_patchgan_hinge_loss_and_adaptive_weight_by_hand():
    """loss.discriminator=patchgan: taming's NLayerDiscriminator, its hinge losses and the adaptive weight,
    each against a computation by hand."""
    from torch import nn

    from vq.losses import LossConfig, VQGANLoss

    torch.manual_seed(0)
    cfg = LossConfig(l2=0.0, l1=1.0, perceptual=0.0, adversarial=0.8, adv_start=5, discriminator="patchgan")
    losses = VQGANLoss(cfg, image_size=32)
    disc = losses.discriminator
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] * 3 + [((4, 4), (1, 1))] * 2
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3
    assert all(m.negative_slope == 0.2 for m in disc.modules() if isinstance(m, nn.LeakyReLU))

    images = torch.rand(4, 3, 32, 32) * 2 - 1
    last = nn.Parameter(torch.randn(3, 8, 3, 3) * 0.1)  # a stand-in for the decoder's last layer
    out = torch.nn.functional.conv2d(torch.randn(4, 8, 32, 32), last, padding=1)
    vq = torch.tensor(0.3)
    assert losses.discriminator_loss(images, out, step=4) is None  # before adv_start
    total, logs = losses.generator(images, out, vq, step=4, last_layer=last)
    assert "adversarial" not in logs and torch.isclose(total, (out - images).abs().mean() + vq)

    d_loss = losses.discriminator_loss(images, out, step=5)
    real, fake = disc(images), disc(out.detach())
    assert real.shape == (4, 1, 2, 2)  # one logit per patch
    hinge = 0.5 * (torch.clamp(1 - real, min=0).sum() / real.numel()
                   + torch.clamp(1 + fake, min=0).sum() / fake.numel())
    torch.testing.assert_close(d_loss, hinge)

    total, logs = losses.generator(images, out, vq, step=5, last_layer=last)
    rec = (out - images).abs().mean()
    g_adv = -disc(out).mean()  # the hinge generator loss
    g_rec_grad = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv_grad = torch.autograd.grad(g_adv, last, retain_graph=True)[0]
    weight = g_rec_grad.norm() / (g_adv_grad.norm() + 1e-4)
    assert logs["adversarial"] == pytest.approx(float(g_adv.detach()), rel=1e-5)
    torch.testing.assert_close(total, rec + vq + 0.8 * weight * g_adv)
    total.backward()
    assert all(p.grad is None for p in disc.parameters())  # the generator step leaves the discriminator alone


def test_vqgan_full_objective_trains_the_patchgan(single_process, photos, tmp_path):
    """taming's recipe end to end for a few steps: l1 + LPIPS (random backbone) + PatchGAN hinge loss with the
    adaptive weight, Adam betas (0.5, 0.9); every term finite and the discriminator's weights move."""
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [
        *VQGAN, "train.steps=3", "loss.l2=0", "loss.l1=1", "loss.perceptual=1", "train.lpips_backbone=random",
        "loss.adversarial=0.8",
        "loss.discriminator=patchgan", "loss.adv_start=1", "train.adam_beta1=0.5", "train.adam_beta2=0.9"]),
        photos, tmp_path)
    before = {k: v.clone() for k, v in trainer.losses.discriminator.state_dict().items()}
    history = trainer.run()
    # (loss.adv_start=1: step 0 trains neither the generator against the discriminator nor the discriminator)
    assert "adversarial" not in history[0] and "disc" not in history[0] and all("disc" in h for h in history[1:])
    for key in ("l1", "perceptual", "adversarial", "disc", "vq"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in history if key in h), key
    after = trainer.losses.discriminator.state_dict()
    assert not torch.equal(before["main.0.weight"], after["main.0.weight"])
    assert trainer.opt.param_groups[0]["betas"] == (0.5, 0.9)


# The KL weight per cell against the likelihood per pixel value is kl_weight / (pixel values per cell): 12 here,
# 192 at DALL-E's shape. At 6.6 the KL would weigh 16x DALL-E's, and one seed in four collapsed the posterior
# towards the uniform prior (+0.9 dB, 13 codes); 1.6 (still 4x DALL-E's balance) trains on seeds 1, 2, 3, 4,
# 1234 with +5.2 to +6.0 dB and 20 to 23 of the 32 codes on the photos.
def ddp_tokenizer(data: str, run_dir: str, sets: list[str]):
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*sets, "train.steps=3", "train.batch_size=8"]), data, run_dir)
    own, seen, step = [], [], trainer.train_step  # (each rank's own numbers, before they are averaged for the log)
    trainer.train_step = lambda images: seen.append(images.clone()) or own.append(step(images)) or own[-1]
    history = trainer.run()
    disc = trainer.losses.discriminator
    return ((history[-1], own[-1]), {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            {k: v.detach().clone() for k, v in disc.named_parameters()} if disc is not None else {}, seen)


DATA_PARALLEL = {
    # restarted codes broadcast (a dead code every step), the PatchGAN trained data-parallel from step 0
    "vqgan": [*VQGAN, "model.dead_code_steps=1", "loss.adversarial=0.8", "loss.discriminator=patchgan"],
    # the EMA codebook: its counts and sums all-reduced (no restart in 3 steps: the one-process run draws none either)
    "vqvae": VQVAE,
}


@pytest.mark.parametrize("kind", DATA_PARALLEL)
def test_vqgan_and_vqvae_data_parallel_keep_ranks_identical(pool2, photos, tmp_path, request, kind):
    """The tokenizer's weights and buffers (code usage; the VQ-VAE's codebook and its EMA counts and sums) and the
    PatchGAN's weights stay the same on both ranks (restarted codes broadcast, gradients averaged, EMA statistics
    all-reduced). Only the PatchGAN's parameters are compared: its BatchNorm running statistics are rank-local
    between DDP's buffer broadcasts, as in taming's DDP runs, and training never reads them (train mode
    throughout). The VQ-VAE (no BatchNorm, no restart) also trains as one process on the step's whole batch does."""
    sets = DATA_PARALLEL[kind]
    ((logged0, own0), model0, disc0, seen0), ((logged1, own1), model1, disc1, seen1) = \
        pool2.run(ddp_tokenizer, photos, str(tmp_path), sets)
    torch.testing.assert_close(model0, model1, rtol=0, atol=0)
    torch.testing.assert_close(disc0, disc1, rtol=0, atol=0)
    assert bool(disc0) == (kind == "vqgan")
    assert own0["loss"] != own1["loss"]  # each rank saw its own images; the log has the step's mean over both
    for key in ("loss", *(("disc",) if disc0 else ())):
        assert logged0[key] == logged1[key] == pytest.approx((own0[key] + own1[key]) / 2, rel=1e-12)
    assert logged0["psnr"] == logged1["psnr"] == pytest.approx(whole_batch_psnr(own0["psnr"], own1["psnr"]))
    if kind != "vqvae":
        return
    from vq.train import VQTrainer

    request.getfixturevalue("single_process")
    one = VQTrainer(load_typed(VQConfig, None, [*sets, "train.steps=3", "train.batch_size=8"]), photos,
                    tmp_path / "one")
    batches = iter([torch.cat(pair) for pair in zip(seen0, seen1)])  # (the step's global batch, rank 0's share first)
    one.batch = lambda: next(batches)
    history = one.run()
    whole = one.model.state_dict()
    # the counts of the global batch (8 images x 8x8 codes a step), not of a rank's half, on top of the initial 1s
    assert float(model0["ema_count"].sum()) == pytest.approx(32 * 0.99**3 + 8 * 64 * (1 - 0.99**3), rel=1e-5)
    torch.testing.assert_close(whole, model0, rtol=1e-4, atol=3e-5)  # (measured: 3e-6 at most)
    assert history[-1]["loss"] == pytest.approx(logged0["loss"], rel=1e-4)


DVAE = ["model.kind=dvae", "model.width=16", "model.res_blocks=1", "model.patch=2", "model.image_size=32",
        "model.code_dim=32", "model.codebook_size=32", "model.tau_steps=150", "model.kl_warmup_steps=50",
        "model.kl_weight=1.6", "loss.l2=0", "loss.logit_laplace=1", "loss.perceptual=0", "loss.adversarial=0",
        "train.batch_size=16", "train.resize=64", "train.lr=4e-3", "train.log_interval=1000",
        "train.eval_interval=1000", "train.save_interval=1000"]


def test_dvae_trains_uses_its_codebook_exports_and_pretokenizes(single_process, photos, tmp_path):
    """DALL-E's dVAE: PSNR up by 3 dB under the annealed relaxation, half the codebook in use on the photos; the
    exported codes are the argmax of the encoder's logits (computed here by the encoder's layers directly),
    decoding is the decoder on one-hot codes, and pre-tokenization takes it."""
    import torch.nn.functional as F

    from vq.losses import split_output
    from vq.tokenizer import load_image_tokenizer
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [*DVAE, "train.steps=150"]), photos, tmp_path)
    history = trainer.run()
    first, last = psnr_gain(history)
    assert last >= first + 3, (first, last)  # (measured: 10.7 -> 16.6 dB)
    assert history[-1]["tau"] == pytest.approx(1 / 16, rel=1e-2) and history[-1]["kl_weight"] == 1.6
    tok = load_image_tokenizer(tmp_path / "export.pt")
    assert (tok.kind, tok.grid, tok.codebook_size) == ("dvae", 16, 32)
    images = photo_batch()
    codes = tok.encode(images)
    with torch.no_grad():
        logits = trainer.model.eval().encoder(images)  # [17, 32, 16, 16], through the layers one by one
    assert logits.shape == (17, 32, 16, 16) and torch.equal(codes, logits.argmax(1))
    assert codes.unique().numel() >= 16, codes.unique().numel()  # (measured: 23 of 32)
    one_hot = F.one_hot(codes, 32).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(tok.decode(codes), split_output(tok.decoder(one_hot)).clamp(-1, 1))
        # the decoder's input conv on a one-hot code is its weight column: the codebook
        conv = tok.decoder.input
        torch.testing.assert_close(conv(one_hot)[:, :, 3, 5], conv.weight[:, codes[:, 3, 5], 0, 0].t() + conv.bias)
    manifest = pretokenizes(tok, photos, tmp_path)
    assert manifest["vq"]["kind"] == "dvae" and manifest["vq"]["hash"] == tok.content_hash


def test_dvae_schedules_and_kl_follow_the_formulas():
    """tau: cosine from tau_start to tau_end over tau_steps; KL weight: cosine from 0 to kl_weight over
    kl_warmup_steps; the loss's KL term is KL(q || uniform) summed over cells, per pixel value, at the weight of
    the model's step."""
    import math

    from vq.dvae import DVAE

    model = DVAE(image_size=16, patch=4, n_hid=8, code_dim=8, codebook_size=16, res_blocks=1, tau_start=1.0,
                 tau_end=1 / 16, tau_steps=1000, kl_weight=6.6, kl_warmup_steps=100)
    for step in (0, 1, 250, 500, 999, 1000, 5000):
        t = min(step, 1000) / 1000
        assert model.tau(step) == pytest.approx(1 / 16 + (1 - 1 / 16) * 0.5 * (1 + math.cos(math.pi * t)), abs=1e-12)
    assert (model.tau(0), model.tau(500), model.tau(1000)) == pytest.approx((1.0, (1 + 1 / 16) / 2, 1 / 16))
    for step in (0, 25, 50, 100, 3000):
        t = min(step, 100) / 100
        assert model.kl_weight(step) == pytest.approx(6.6 * 0.5 * (1 - math.cos(math.pi * t)), abs=1e-12)
    assert (model.kl_weight(0), model.kl_weight(50), model.kl_weight(100)) == pytest.approx((0.0, 3.3, 6.6))

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    model.step.fill_(25)  # the schedules run on the model's own training-step counter
    _, aux = model(images)
    assert aux["logs"]["tau"] == model.tau(25) and aux["logs"]["kl_weight"] == model.kl_weight(25)
    assert int(model.step) == 26
    q = torch.softmax(model.logits(images).detach(), dim=1)  # [2, 16, 4, 4]
    kl = (q * (q * 16).log()).sum() / 2 / (3 * 16 * 16)  # per image, over cells and codes; per pixel value
    torch.testing.assert_close(aux["vq_loss"].detach(), model.kl_weight(25) * kl)


def test_dvae_resume_continues_the_same_run(single_process, photos, tmp_path):
    """Gumbel noise and the schedules' step resume with the checkpoint: 4 + 4 steps equal 8, with DALL-E's
    kind of learning-rate schedule (warmup, a cosine decay that ends before the last step) and weight decay."""
    from common.schedule import lr_lambda
    from vq.train import VQTrainer

    schedule = ["train.warmup_steps=2", "train.lr_decay=cosine", "train.lr_decay_steps=4", "train.min_lr=1e-4",
                "train.weight_decay=0.01", "train.ema_decay=0.9"]

    def run(run_dir, steps):
        cfg = load_typed(VQConfig, None, [*DVAE, f"train.steps={steps}", "train.save_interval=4",
                                          "train.batch_size=4", "model.tau_steps=6", *schedule])
        trainer = VQTrainer(cfg, photos, run_dir)
        trainer.resume()
        return trainer.run()

    full = run(tmp_path / "full", 8)
    split = run(tmp_path / "split", 4) + run(tmp_path / "split", 8)
    assert [h["loss"] for h in split] == pytest.approx([h["loss"] for h in full], rel=1e-5)
    assert [h["tau"] for h in split] == [h["tau"] for h in full]
    t = load_typed(VQConfig, None, [*DVAE, "train.steps=8", *schedule]).train
    assert [h["lr"] for h in full] == [h["lr"] for h in split] == [4e-3 * lr_lambda(t)(s) for s in range(8)]
    assert full[1]["lr"] == 4e-3 and full[-1]["lr"] == full[-2]["lr"] == 1e-4  # (the decay ends at step 6)
    exports = [torch.load(tmp_path / run / "export.pt", weights_only=True)["state_dict"] for run in ("full", "split")]
    for name, value in exports[0].items():  # the average of the weights resumed with them
        torch.testing.assert_close(exports[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("saved_at, resumed_at", [(0.0, 0.01), (0.01, 0.0)])
def test_turning_weight_decay_on_or_off_keeps_each_parameters_adam_state(single_process, photos, tmp_path, saved_at,
                                                                        resumed_at):
    """A run saved without weight decay (one AdamW group, as every checkpoint before the option) resumed with
    it (two groups: Linear/Conv weights, the rest), and back: every parameter gets its own saved moments and
    step count, by name, and the run continues."""
    from vq.train import VQTrainer, load_checkpoint

    train(photos, tmp_path, "train.steps=2", f"train.weight_decay={saved_at}")
    saved = load_checkpoint(tmp_path / "checkpoints" / "step_00000002" / "state.pt")["opt"]
    saving = VQTrainer(load_typed(VQConfig, None, [*TINY, f"train.weight_decay={saved_at}"]), photos, tmp_path / "x")
    index = {id(p): i for i, p in enumerate(p for g in saving.opt.param_groups for p in g["params"])}
    saved_index = {n: index[id(p)] for n, p in saving.model.named_parameters()}
    trainer, history = train(photos, tmp_path, "train.steps=2", f"train.weight_decay={resumed_at}")
    assert history == [] and len(trainer.opt.param_groups) == (2 if resumed_at else 1)
    assert [g["weight_decay"] for g in trainer.opt.param_groups] == ([resumed_at, 0.0] if resumed_at else [0.0])
    for name, p in trainer.model.named_parameters():
        mine, theirs = trainer.opt.state[p], saved["state"][saved_index[name]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(mine[key], theirs[key]), (name, key)
    _, more = train(photos, tmp_path, "train.steps=3", f"train.weight_decay={resumed_at}")
    assert len(more) == 1 and math.isfinite(more[0]["loss"])


def test_the_export_is_the_moving_average_of_the_weights(single_process, photos, tmp_path, monkeypatch):
    """train.ema_decay=0.5 over 3 steps: the exported weights are 0.25 w1 + 0.25 w2 + 0.5 w3 of the weights
    after each step (the average starts as a copy of w1), computed here by hand."""
    from vq.tokenizer import load_image_tokenizer
    from vq.train import VQTrainer

    after, real_step = [], VQTrainer.train_step

    def recording_step(self, images):
        logs = real_step(self, images)
        after.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return logs

    monkeypatch.setattr(VQTrainer, "train_step", recording_step)
    train(photos, tmp_path, "train.steps=3", "train.ema_decay=0.5")
    exported = dict(load_image_tokenizer(tmp_path / "export.pt").named_parameters())
    assert len(after) == 3 and set(exported) == set(after[0])
    assert not any(torch.equal(after[1][n], after[2][n]) for n in ("enc_pos", "dec_pos"))  # (the weights moved)
    for name, w in exported.items():
        expected = 0.25 * after[0][name] + 0.25 * after[1][name] + 0.5 * after[2][name]
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7, msg=name)
    # A finished run without the average, run again with it (no step left): its export stays the trained
    # weights, not the untrained ones the average was built from.
    def exported_weights():
        return torch.load(tmp_path / "plain" / "export.pt", weights_only=True)["state_dict"]

    train(photos, tmp_path / "plain", "train.steps=2")
    trained = exported_weights()
    train(photos, tmp_path / "plain", "train.steps=2", "train.ema_decay=0.5")
    assert all(torch.equal(w, trained[name]) for name, w in exported_weights().items())


def test_weight_decay_shrinks_the_weights_of_linear_and_conv_layers_only(single_process, photos, tmp_path):
    """One step at lr 1e-3 with weight_decay 250 against one without, from the same weights and images: AdamW's
    decoupled decay takes lr x 250 = 1/4 of each Linear/Conv weight (the gradient step is the same in both),
    and leaves biases, norms, position embeddings and the codebook as the run without it has them."""
    from vq.train import DECAYED, VQTrainer

    def one_step(run_dir, *overrides):
        trainer = VQTrainer(load_typed(VQConfig, None, [*TINY, "train.steps=1", *overrides]), photos, run_dir)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.run()
        return trainer.model, before, {n: p.detach() for n, p in trainer.model.named_parameters()}

    model, before, plain = one_step(tmp_path / "plain")
    _, _, decayed = one_step(tmp_path / "decayed", "train.weight_decay=250")
    matrices = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, DECAYED)}
    assert "codebook.weight" not in matrices and "enc_pos" in plain and len(matrices) > 10
    for name, value in plain.items():
        if name in matrices:
            torch.testing.assert_close(decayed[name] - value, -0.25 * before[name], rtol=0, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(decayed[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["model.kind=vqgan", "model.patch=8", "model.ch_mult=[1,2,2]"],
     r"model\.patch=8 must be 2\^\(len\(model\.ch_mult\)"),
    (["model.kind=vqgan", "model.patch=16", "model.logit_laplace=true"], r"model\.logit_laplace needs"),
    (["model.kind=vqgan", "model.patch=4", "model.ch_mult=[1,2,2]", "model.res_blocks=0"], r"model\.res_blocks=0"),
    (["model.kind=dvae", "loss.logit_laplace=0"], r"model\.kind=dvae needs loss\.logit_laplace > 0"),
    (["model.kind=dvae", "loss.logit_laplace=1", "model.tau_end=0"], r"model\.tau_start=1\.0 and model\.tau_end=0"),
    (["model.kind=dvae", "loss.logit_laplace=1", "model.patch=6"], r"model\.patch=6 must be a power of 2"),
    (["model.kind=dvae", "loss.logit_laplace=1", "model.tau_end=2"], r"model\.tau_start=1\.0 and model\.tau_end=2\.0 "),
    (["model.kind=dvae", "loss.logit_laplace=1", "model.res_blocks=0"],
     r"model\.res_blocks=0 must be at least 1 \(the dVAE"),
    (["model.kind=dvae", "loss.logit_laplace=1", "model.patch=64"],
     r"model\.patch=64 must be a power of 2 dividing model"),
    (["model.kind=dvae", "loss.logit_laplace=1", "model.image_size=48", "model.patch=12"], r"model\.patch=12 must be"),
    (["model.kind=vqgan", "model.patch=16", "model.image_size=40"], r"model\.patch=16 .* divide model\.image_size=40"),
    (["model.kind=vqgan", "model.patch=16", "model.ch_mult=[]"], r"model\.ch_mult=\[\] must be a non-empty list"),
    (["model.kind=vqgan", "model.patch=16", "model.ch_mult=[1,0]"], r"model\.ch_mult=\[1, 0\] must be a non-empty"),
    (["model.kind=dvqae"], r"model\.kind='dvqae' must be one of vit_vqgan, vqvae, vqgan, dvae"),
    (["loss.discriminator=nlayer"], r"loss\.discriminator='nlayer' must be one of stylegan, patchgan"),
    (["loss.logit_laplace=0.1"], r"loss\.logit_laplace=0\.1 needs a decoder .*model\.logit_laplace=false\)"),
    (["model.kind=vqvae", "loss.logit_laplace=0.1"], r"loss\.logit_laplace=0\.1 needs .*model\.kind=vqvae"),
    (["model.logit_laplace=true"], r"model\.logit_laplace=true needs loss\.logit_laplace > 0"),
    (["model.width=480"], r"model\.width=480 must be a multiple of the attention heads \(7: width / 64, model\.heads "),
    (["model.width=512", "model.heads=6"], r"model\.width=512 must be a multiple of the attention heads \(6\); set"),
    (["model.patch=6"], r"model\.patch=6 must divide model\.image_size=32"),  # (was ViTVQGAN's ValueError)
    (["model.kind=vqvae", "model.image_size=30"],  # (was VQVAE's ValueError, naming no field)
     r"model\.patch=8 must be a power of 2 dividing model\.image_size=30 \(the VQ-VAE"),
])
def test_bad_tokenizer_family_settings_name_the_field(overrides, message):
    from common.config import ConfigError
    from vq.losses import VQGANLoss
    from vq.train import build_model, check_logit_laplace

    cfg = load_typed(VQConfig, None, ["model.image_size=32", "loss.perceptual=0", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_logit_laplace(cfg)
        VQGANLoss(cfg.loss, cfg.model.image_size)
        with torch.device("meta"):  # (the default ViT-VQGAN, unallocated)
            build_model(cfg)


@pytest.mark.parametrize("override, message", [
    ("model.layers=-1", r"model\.layers=-1 must be >= 0 \(0: the preset's\)"),  # (no blocks, and it trained)
    ("model.heads=-2", r"model\.heads=-2 must be >= 0"),  # (a traceback in the first step)
    ("model.patch=0", r"model\.patch=0 must be >= 1"),
    ("loss.l2=-1", r"loss\.l2=-1\.0 must be >= 0 \(a loss weight: a negative one maximises its term\)"),
    ("model.ema_decay=1.5", r"model\.ema_decay=1\.5 must be in \[0, 1\)"),  # (the VQ-VAE's codebook collapsed)
    ("train.resize=16", r"train\.resize=16 must be at least model\.image_size=32"),  # (no crop of 32 px in 16)
    ("train.ema_decay=1", r"train\.ema_decay=1\.0 must be in \[0, 1\) \(0: no average\)"),  # (the average never moved)
    ("train.weight_decay=-0.1", r"train\.weight_decay=-0\.1 must be >= 0"),
    ("train.eval_interval=0", r"train\.eval_interval=0 must be >= 1"),  # (a division by zero at the first step)
    ("model.codebook_size=1", r"model\.codebook_size=1 must be >= 2 \(codes\)"),
    ("model.image_size=0", r"model\.image_size=0 must be >= 1 \(pixels\)"),
    ("model.tau_steps=0", r"model\.tau_steps=0 must be >= 1"),
    ("model.kl_weight=-1", r"model\.kl_weight=-1\.0 must be >= 0"),
    ("loss.adv_start=-1", r"loss\.adv_start=-1 must be >= 0 \(the step the adversarial loss starts at\)"),
    # (vq.config's other rules, each at one below its least value)
    ("model.width=-1", r"model\.width=-1 must be >= 0 \(0: the preset's or the kind's\)"),
    ("model.z_channels=-1", r"model\.z_channels=-1 must be >= 0 \(0: the kind's\)"),
    ("model.code_dim=0", r"model\.code_dim=0 must be >= 1 \(channels per code\)"),
    ("model.res_blocks=-1", r"model\.res_blocks=-1 must be >= 0 \(residual blocks\)"),
    ("model.kl_warmup_steps=-1", r"model\.kl_warmup_steps=-1 must be >= 0 \(steps of the KL weight's ramp\)"),
    ("loss.l1=-1", r"loss\.l1=-1\.0 must be >= 0 \(a loss weight"),
    ("loss.perceptual=-1", r"loss\.perceptual=-1\.0 must be >= 0 \(a loss weight"),
    ("loss.adversarial=-1", r"loss\.adversarial=-1\.0 must be >= 0 \(a loss weight"),
    ("train.steps=-1", r"train\.steps=-1 must be >= 0 \(optimizer steps to run, 0: export the starting weights\)"),
    ("train.log_interval=0", r"train\.log_interval=0 must be >= 1 \(steps between metric lines\)"),
    ("train.keep_checkpoints=-1", r"train\.keep_checkpoints=-1 must be >= 0 \(checkpoints kept, 0: all\)"),
    ("train.data_workers=-1", r"train\.data_workers=-1 must be >= 0 \(decoding processes"),
    ("model.patch=6", r"model\.patch=6 must divide model\.image_size=32"),  # (a shape the model's build refuses)
])
def test_values_that_would_train_nonsense_are_refused_before_the_run_directory(single_process, photos, tmp_path,
                                                                              override, message):
    from common.config import ConfigError
    from vq.train import VQTrainer

    with pytest.raises(ConfigError, match=f"^{message}"):
        VQTrainer(load_typed(VQConfig, None, [*TINY, override]), photos, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_batch_that_the_ranks_cannot_share_is_refused_naming_it(single_process, photos, tmp_path, monkeypatch):
    """train.batch_size is over all processes: 16 images on 3 ranks is refused before the run directory (a
    stand-in world size of 3: each rank's batch_size // world would drop an image a step unsaid)."""
    import vq.train
    from common.config import ConfigError

    monkeypatch.setattr(vq.train.dist, "get_world_size", lambda *group: 3)
    with pytest.raises(ConfigError, match=r"^train\.batch_size=16 must be divisible by the world size 3"):
        vq.train.VQTrainer(load_typed(VQConfig, None, TINY), photos, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_stream_states_replays_the_images_its_steps_took(single_process, photos, tmp_path,
                                                                             log_lines, monkeypatch):
    """A checkpoint of an older version has no data stream states: the resume replays the images its steps
    consumed on this rank (steps x train.batch_size / world size), and the run goes on as the uninterrupted one."""
    from vq.train import load_checkpoint

    sets = ["train.batch_size=4", "train.save_interval=1"]
    _, full = train(photos, tmp_path / "full", "train.steps=3", *sets)
    train(photos, tmp_path / "split", "train.steps=2", *sets)
    path = tmp_path / "split" / "checkpoints" / "step_00000002" / "state.pt"
    state = load_checkpoint(path)
    del state["streams"]
    torch.save(state, path)
    _, rest = train(photos, tmp_path / "split", "train.steps=3", *sets)
    assert any("data stream replayed from its start (8 images per rank: the checkpoint has no stream state)" in line
               for line in log_lines), log_lines
    assert [h["loss"] for h in rest] == pytest.approx([full[2]["loss"]], rel=1e-5)
    # On 2 ranks each took half of each step's batch: 3 x 4 / 2 images to replay, not 3 x 4.
    import vq.train

    replayed, trainer = [], vq.train.VQTrainer(load_typed(VQConfig, None, [*TINY, "train.steps=3", *sets]), photos,
                                               tmp_path / "split")
    trainer.world = 2  # (a stand-in world size: only the replay count is checked here)
    monkeypatch.setattr(vq.train, "restore_stream", lambda stream, states, images, path: replayed.append(images) or "")
    trainer.resume()
    assert replayed == [6]


def test_an_optimizer_state_of_another_grouping_is_refused_naming_the_file(tmp_path):
    """load_optimizer takes a checkpoint of one group (no weight decay) or two (decayed and not): three groups,
    even of the same parameter count, come from another optimizer and are refused, naming the file."""
    from common.checkpoints import CheckpointError
    from vq.train import load_optimizer, param_groups

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    opt = torch.optim.AdamW(param_groups(module, 0.0))
    saved = opt.state_dict()
    saved["param_groups"] = [{**saved["param_groups"][0], "params": i} for i in ([0, 1], [2], [3])]
    with pytest.raises(CheckpointError, match=r"state\.pt: its optimizer holds 4 parameters in 3 group\(s\); "
                                              r"this model trains 4"):
        load_optimizer(opt, saved, module, tmp_path / "state.pt")


def test_the_presets_build_the_papers_shapes():
    from vq.train import build_model, vit_shape, vqgan_shape

    with torch.device("meta"):  # (shapes only: nothing allocated)
        vqgan = build_model(load_typed(VQConfig, "configs/vq/vqgan.yaml"))
        dvae = build_model(load_typed(VQConfig, "configs/vq/dvae.yaml"))
    assert vqgan.config == {**vqgan.config, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                            "z_channels": 256, "embed_dim": 256, "n_embed": 1024, "attn_resolutions": [16]}
    assert vqgan.grid == 16
    assert (dvae.grid, dvae.codebook_size, dvae.config["n_hid"], dvae.config["code_dim"]) == (32, 8192, 256, 128)
    assert len([m for m in dvae.encoder if isinstance(m, torch.nn.Sequential)]) == 5  # 4 groups + output
    # ViT-VQGAN Small (Yu et al. 2021), whose file leaves patch, code_dim and heads to vq.config's defaults
    with torch.device("meta"):
        vit = build_model(load_typed(VQConfig, "configs/vq/vit-vqgan-small.yaml"))
    assert vit.config == {**vit.config, "image_size": 256, "patch": 8, "layers": 8, "width": 512, "code_dim": 32,
                          "codebook_size": 8192}
    assert vit.grid == 32 and vit.encoder[0].heads == 8
    # The fields > 0 override the preset's (TINY: 2 layers of width 64, heads width / 64); the VQGAN attends at
    # its lowest resolution, the code grid, where model.attn_resolutions is unset (taming's f16).
    assert vit_shape(load_typed(VQConfig, None, TINY).model) == (2, 64, 0)
    assert vqgan_shape(load_typed(VQConfig, None, [*VQGAN, "model.image_size=64"]).model)["attn_resolutions"] == [16]


@pytest.mark.parametrize("preset", ["vit-vqgan-small", "finetune-decoder-large"])
def test_the_vit_vqgan_presets_train_the_logit_laplace_term_they_weigh(preset):
    """ViT-VQGAN's loss (Yu et al. 2021, section 3) weighs the logit-Laplace likelihood 0.1: the presets' decoders
    predict its parameters (6 channels), so the term is computed, not dropped (vq.losses adds it for 6 channels)."""
    from vq.train import build_model, check_logit_laplace

    cfg = load_typed(VQConfig, f"configs/vq/{preset}.yaml")
    check_logit_laplace(cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    assert cfg.loss.logit_laplace == 0.1 and model.out_channels == 6


def test_an_unknown_precision_is_refused(single_process, tmp_path):
    """train.precision=fp16 (or a typo) trained in fp32 without a word."""
    from vq.train import main

    with pytest.raises(SystemExit, match="train.precision='fp16' must be fp32 or bf16"):
        main(["--data", str(tmp_path / "x.tar"), "--run-dir", str(tmp_path / "run"), "--set", "train.precision=fp16",
              "loss.perceptual=0"])


# -- loss terms, codebook statistics and estimators against independent computations (mutation audit) ----------

def test_stylegan_losses_and_term_weights_by_hand():
    """loss.discriminator=stylegan: the non-saturating logistic losses (generator softplus(-D(fake)); discriminator
    softplus(-D(real)) + softplus(D(fake))), the l2 and l1 terms at their own weights (not 1), and the adaptive
    weight a constant: the generator's gradient at the last layer is that of rec + vq + w * adv with w fixed."""
    from torch import nn
    from torch.nn import functional as F

    from vq.losses import LossConfig, VQGANLoss

    torch.manual_seed(0)
    losses = VQGANLoss(LossConfig(l2=0.3, l1=0.7, perceptual=0.0, adversarial=0.5), image_size=16)
    disc = losses.discriminator
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    last = nn.Parameter(torch.randn(3, 8, 3, 3) * 0.1)
    out = F.conv2d(torch.randn(3, 8, 16, 16), last, padding=1)
    vq = torch.tensor(0.2)
    total, logs = losses.generator(images, out, vq, step=0, last_layer=last)
    rec = 0.3 * ((out - images) ** 2).mean() + 0.7 * (out - images).abs().mean()
    adv = torch.log1p(torch.exp(-disc(out))).mean()  # softplus(-D(fake)), written out
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).item()
    assert logs["adversarial"] == pytest.approx(float(adv), rel=1e-5)
    torch.testing.assert_close(total, rec + vq + 0.5 * weight * adv)
    grad = torch.autograd.grad(total, last)[0]
    torch.testing.assert_close(grad, g_rec + 0.5 * weight * g_adv)  # (the weight is not differentiated)

    d_loss = losses.discriminator_loss(images, out, step=0)
    real, fake = disc(images), disc(out.detach())
    torch.testing.assert_close(d_loss, torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())

    # A discriminator blind to its input (as a fresh one nearly is) gives the adversarial term no gradient at the
    # last layer: the weight is capped at taming's 1e4, not |g_rec| / 1e-4.
    with torch.no_grad():
        disc.head[-1].weight.zero_()
    big = F.conv2d(torch.randn(3, 8, 16, 16), last, padding=1) * 100  # (a graph of its own: the last was freed)
    total, _ = losses.generator(images, big, vq, step=0, last_layer=last)
    rec = 0.3 * ((big - images) ** 2).mean() + 0.7 * (big - images).abs().mean()
    assert torch.autograd.grad(rec, last, retain_graph=True)[0].norm() > 1  # (uncapped, the weight were > 1e4)
    adv = torch.log1p(torch.exp(-disc.head[-1].bias)).squeeze()
    torch.testing.assert_close(total, rec + vq + 0.5 * 1e4 * adv)


def test_the_perceptual_term_is_weighed_by_its_weight():
    """loss.perceptual scales the LPIPS distance (its value logged unweighted) in the generator's loss."""
    from vq.losses import LossConfig, VQGANLoss

    torch.manual_seed(0)
    losses = VQGANLoss(LossConfig(l2=0.0, perceptual=0.4, adversarial=0.0), image_size=16, lpips_backbone="random")
    images, out = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    total, logs = losses.generator(images, out, torch.tensor(0.2), step=0)
    distance = losses.lpips(out, images).mean()
    assert logs["perceptual"] == pytest.approx(float(distance), rel=1e-5)
    torch.testing.assert_close(total, 0.4 * distance + 0.2)
    assert not any(p.requires_grad for p in losses.lpips.parameters())  # (no VGG gradients in every backward)
    # loss.adversarial=0 disables the discriminator: none built, trained or saved (vq.train tests for None)
    assert losses.discriminator is None and losses.discriminator_loss(images, out, step=0) is None


def test_a_logit_laplace_decoders_terms_by_hand():
    """A 6-channel decoder output (logit-Laplace means and log-scales): l2, l1, LPIPS and both discriminator losses
    see the means mapped back to pixels (DALL-E's unmap_pixels of their sigmoid, times 2, minus 1), not the logits;
    the likelihood is weighed by loss.logit_laplace; the critic passed in (vq.train's DDP wrapper) judges."""
    from torch import nn
    from torch.nn import functional as F

    from vq.losses import LAPLACE_EPS, LossConfig, RealAndFake, VQGANLoss, logit_laplace_nll

    torch.manual_seed(0)
    cfg = LossConfig(l2=0.3, l1=0.7, logit_laplace=0.2, perceptual=0.4, adversarial=0.5)
    losses = VQGANLoss(cfg, image_size=16, lpips_backbone="random")
    disc, images = losses.discriminator, torch.rand(2, 3, 16, 16) * 2 - 1
    last = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.1)
    out = F.conv2d(torch.randn(2, 8, 16, 16), last, padding=1)
    pixels = (torch.sigmoid(out[:, :3]) - LAPLACE_EPS) / (1 - 2 * LAPLACE_EPS)  # in [0, 1], unclamped
    recon, vq = pixels * 2 - 1, torch.tensor(0.2)
    terms = {"l2": ((recon - images) ** 2).mean(), "l1": (recon - images).abs().mean(),
             "logit_laplace": logit_laplace_nll(images, out), "perceptual": losses.lpips(recon, images).mean()}
    rec = sum(getattr(cfg, name) * value for name, value in terms.items())
    adv = F.softplus(-disc(recon)).mean()
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    total, logs = losses.generator(images, out, vq, step=0, last_layer=last)
    for name, value in {**terms, "adversarial": adv}.items():
        assert logs[name] == pytest.approx(float(value), rel=1e-5), name
    torch.testing.assert_close(total, rec + vq + 0.5 * (g_rec.norm() / (g_adv.norm() + 1e-4)) * adv)

    judged = []

    def critic(real, fake):
        judged.append(fake)
        return RealAndFake(disc)(real, fake)

    d_loss = losses.discriminator_loss(images, out, step=0, critic=critic)
    assert len(judged) == 1 and not judged[0].requires_grad
    torch.testing.assert_close(judged[0], recon.detach())
    torch.testing.assert_close(d_loss, F.softplus(-disc(images)).mean() + F.softplus(disc(recon)).mean())


def test_pixel_likelihood_and_its_means_against_torch_distributions():
    """logit_laplace_nll is -log p(x) of the squeezed pixel x under a Laplace(mu, exp(log_b)) of logit(x), with the
    change of variables' log x(1 - x); split_output maps means that predict the squeezed pixels exactly back to the
    images."""
    from vq.losses import LAPLACE_EPS, logit_laplace_nll, split_output

    torch.manual_seed(0)
    images = torch.rand(2, 3, 4, 4) * 2 - 1
    out = torch.cat([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).clamp(-3, 3)], 1)
    x = (images + 1) / 2 * (1 - 2 * LAPLACE_EPS) + LAPLACE_EPS
    laplace = torch.distributions.Laplace(out[:, :3], out[:, 3:].exp())
    expected = -(laplace.log_prob(torch.logit(x)) - torch.log(x * (1 - x))).mean()
    torch.testing.assert_close(logit_laplace_nll(images, out), expected)
    # Log-scales run off (a decoder early in training): the likelihood and its gradient stay finite.
    far = torch.cat([out[:, :3], torch.full_like(out[:, 3:], -100.0)], 1).requires_grad_()
    nll = logit_laplace_nll(images, far)
    assert torch.isfinite(nll) and torch.isfinite(torch.autograd.grad(nll, far)[0]).all()
    means = torch.cat([torch.logit(x), torch.zeros_like(x)], 1)
    torch.testing.assert_close(split_output(means), images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_output(out[:, :3]), out[:, :3])  # (3 channels: the reconstruction itself)


def test_code_usage_ema_perplexity_and_restart_threshold_by_hand():
    """usage: EMA 0.99 of the per-batch code counts; perplexity: exp of the batch codes' entropy; a code unused for
    more than dead_code_steps steps (not fewer) is restarted from a batch latent, others keep their embedding."""
    from vq.vit_vqgan import ViTVQGAN

    torch.manual_seed(0)
    model = ViTVQGAN(image_size=8, patch=4, layers=1, width=16, code_dim=4, codebook_size=6, dead_code_steps=2)
    first, second = torch.tensor([[0, 0, 1, 2]]), torch.tensor([[0, 1, 1, 1]])
    latents = torch.randn(4, 4)
    model.track_usage(first, latents)
    model.track_usage(second, latents)
    c1, c2 = (torch.bincount(c.flatten(), minlength=6).float() for c in (first, second))
    torch.testing.assert_close(model.usage, 0.99 * (0.01 * c1) + 0.01 * c2)
    probs = c2 / c2.sum()
    stats = model.usage_stats(second)
    torch.testing.assert_close(stats["perplexity"], torch.distributions.Categorical(probs=probs).entropy().exp())
    assert float(stats["usage"]) == pytest.approx(3 / 6)  # codes 0, 1, 2 above 1e-3
    before = model.codebook.weight.detach().clone()
    model.track_usage(second, latents)  # step 3: codes 3-5 unused for 3 > 2 steps, code 2 for 2 steps only
    after = model.codebook.weight.detach()
    assert torch.equal(after[:3], before[:3])
    assert all(any(torch.equal(after[k], row) for row in latents) for k in (3, 4, 5))
    assert model.last_used.tolist() == [3, 3, 1, 3, 3, 3]


def test_ema_codebook_restart_resets_the_codes_moving_averages():
    """A restarted VQ-VAE code's EMA statistics restart with it: count 1 and sum its new embedding, so the next
    EMA update keeps it at the latent it was restarted from (when no latent is assigned to it)."""
    from vq.vqvae import VQVAE

    torch.manual_seed(0)
    model = VQVAE(image_size=8, patch=4, width=8, code_dim=4, codebook_size=4, dead_code_steps=1)
    model.ema_count.fill_(7.0)
    model.ema_sum.normal_()
    model.codebook.weight.data.normal_()
    dead = torch.tensor([False, True, False, True])
    model.restarted(dead)
    assert model.ema_count.tolist() == [7.0, 1.0, 7.0, 1.0]
    torch.testing.assert_close(model.ema_sum[dead], model.codebook.weight[dead])


@pytest.mark.parametrize("kind", ["vit", "taming"])
def test_codebook_and_commitment_terms_move_what_the_paper_says(kind):
    """vq_loss = ||sg[z] - q||^2 + beta ||z - sg[q]||^2: the codebook gets the gradient of the first term alone, the
    encoder's latents beta times that of the second; the reconstruction reaches the encoder (straight-through)."""
    from torch.nn import functional as F

    from vq.vit_vqgan import ViTVQGAN
    from vq.vqgan import VQGAN

    torch.manual_seed(0)
    if kind == "vit":
        model = ViTVQGAN(image_size=8, patch=4, layers=1, width=16, code_dim=4, codebook_size=8, beta=0.25)
        latents = model.latents
        enc = model.patch_embed.weight
    else:
        model = VQGAN(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, n_embed=8, resolution=8,
                      attn_resolutions=[], beta=0.25)

        def latents(x):
            return model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1)
        enc = model.encoder.conv_in.weight
    model.eval()  # (no usage tracking, no restarts)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    out, aux = model(images)
    codes, weight = aux["codes"], model.codebook.weight
    g_code = torch.autograd.grad(aux["vq_loss"], weight, retain_graph=True)[0]
    g_enc = torch.autograd.grad(aux["vq_loss"], enc, retain_graph=True)[0]
    z = latents(images).reshape(-1, 4)
    q = F.normalize(weight, dim=-1)[codes.flatten()] if kind == "vit" else weight[codes.flatten()]
    torch.testing.assert_close(g_code, torch.autograd.grad(F.mse_loss(q, z.detach()), weight)[0])
    torch.testing.assert_close(g_enc, torch.autograd.grad(0.25 * F.mse_loss(z, q.detach()), enc)[0])
    assert torch.autograd.grad(out.square().mean(), enc)[0].abs().sum() > 0  # the straight-through estimator


def test_relaxed_tokenizer_decodes_the_soft_gumbel_softmax_sample_of_its_logits():
    """Training decodes F.gumbel_softmax(logits, tau, hard=False) of the step's noise (a relaxed, not a one-hot,
    sample), at the temperature of the model's step."""
    from torch.nn import functional as F

    from vq.dvae import DVAE

    model = DVAE(image_size=8, patch=2, n_hid=8, code_dim=4, codebook_size=8, res_blocks=1, tau_steps=10)
    model.step.fill_(3)
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    seen = []
    real_pixels = model.pixels
    model.pixels = lambda z: seen.append(z) or real_pixels(z)
    torch.manual_seed(5)
    model(images)
    logits = model.logits(images)
    torch.manual_seed(5)
    torch.testing.assert_close(seen[0], F.gumbel_softmax(logits, tau=model.tau(3), hard=False, dim=1))
    assert seen[0].max() < 1


def test_each_training_step_and_rank_seeds_its_draws_apart():
    """VQTrainer.train_step seeds torch from (seed, step, rank) before the forward pass (a stand-in trainer whose
    forward reads the seed): every (step, rank) of a run its own seed, the same pair the same seed."""
    from types import SimpleNamespace

    from vq.train import VQTrainer

    class Seen(Exception):
        pass

    def seed_of(step, rank, seed=5):
        def forward(*args, **kwargs):
            raise Seen(torch.initial_seed())

        me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(seed=seed, precision="fp32")), device="cpu",
                             step=step, rank=rank, world=2, ddp=forward, frozen_codes=False)
        with pytest.raises(Seen) as seen:
            VQTrainer.train_step(me, torch.zeros(1, 3, 8, 8))
        return seen.value.args[0]

    seeds = [seed_of(step, rank) for step in range(4) for rank in range(2)]
    assert len(set(seeds)) == 8 and seed_of(2, 1) == seeds[5]
    assert seed_of(0, 0, seed=6) not in seeds


def test_a_training_step_hands_the_losses_its_step_and_last_layer_and_logs_the_pixels_psnr():
    """VQTrainer.train_step (a stand-in trainer around a 6-channel logit-Laplace decoder of one 1x1 conv): both losses
    get the step before its increment (loss.adv_start counts from 0), the generator's the decoder's last weight (the
    adaptive weight is measured there; without it the adversarial weight is 1), and PSNR is that of the pixels the
    means map to, not of the logits."""
    from types import SimpleNamespace

    from common.metrics import psnr
    from vq.losses import split_output
    from vq.train import VQTrainer

    torch.manual_seed(0)
    weight, seen = torch.nn.Parameter(torch.randn(6, 3, 1, 1)), {}
    images = torch.rand(2, 3, 8, 8) * 2 - 1

    def forward(x, frozen_codes):
        return torch.nn.functional.conv2d(x, weight), {"vq_loss": torch.tensor(0.0), "perplexity": 1.0, "usage": 1.0}

    def generator(images, out, vq_loss, step, last_layer=None):
        seen.update(step=step, last_layer=last_layer)
        return out.square().mean(), {}

    def discriminator_loss(images, out, step, critic=None):
        seen["disc_step"] = step

    me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(seed=5, precision="fp32", lr=0.1)), device="cpu",
                         step=3, rank=0, world=1, ddp=forward, frozen_codes=False, lr_factor=lambda step: 1.0,
                         model=SimpleNamespace(last_decoder_weight=lambda: weight), ema=None, disc_opt=None,
                         losses=SimpleNamespace(generator=generator, discriminator_loss=discriminator_loss),
                         opt=torch.optim.SGD([weight], lr=0.1), disc_ddp=None)
    out = forward(images, False)[0].detach()  # (this step's output: the step then moves the weight)
    logs = VQTrainer.train_step(me, images)
    assert (seen["step"], seen["disc_step"]) == (3, 3) and seen["last_layer"] is weight
    assert logs["psnr"] == pytest.approx(psnr(split_output(out), images))


def test_bf16_autocasts_on_the_gpu_only():
    """train.precision=bf16 is autocast on CUDA; a run on the CPU trains in fp32 (a stand-in trainer whose
    forward reports whether autocast is on)."""
    from types import SimpleNamespace

    from vq.train import VQTrainer

    class Seen(Exception):
        pass

    def forward(*args, **kwargs):
        raise Seen(torch.is_autocast_enabled("cpu"))

    for precision in ("fp32", "bf16"):
        me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(seed=5, precision=precision)), device="cpu",
                             step=0, rank=0, world=1, ddp=forward, frozen_codes=False)
        with pytest.raises(Seen) as seen:
            VQTrainer.train_step(me, torch.zeros(1, 3, 8, 8))
        assert seen.value.args == (False,), precision


def test_the_discriminator_follows_the_learning_rate_schedule(single_process, photos, tmp_path):
    """Warmup (and any decay) sets the discriminator's learning rate with the tokenizer's at every step: the
    discriminator's optimizer otherwise kept train.lr (the same only under a constant schedule)."""
    from vq.train import VQTrainer

    trainer = VQTrainer(load_typed(VQConfig, None, [
        *VQGAN, "train.steps=2", "train.warmup_steps=4", "loss.perceptual=0", "loss.adversarial=0.8",
        "loss.discriminator=patchgan"]), photos, tmp_path)
    history = trainer.run()
    assert history[-1]["lr"] < trainer.cfg.train.lr
    assert [g["lr"] for g in trainer.disc_opt.param_groups] == [history[-1]["lr"]] * len(trainer.disc_opt.param_groups)


def test_vit_block_by_hand_and_patches_drawn_where_they_were_read():
    """A ViT-VQGAN block is pre-LN, x + MHA(LN1(x)) then + MLP(LN2(x)), its attention nn.MultiheadAttention's on the
    same weights (heads split per token, attending over the patches); the decoder draws token n as the patch the
    encoder read as token n (row-major grid; channels, rows, columns within a patch: F.fold's layout)."""
    from torch import nn
    from torch.nn import functional as F

    from vq.vit_vqgan import Block, ViTVQGAN

    torch.manual_seed(0)
    block = Block(16, 4)
    x = torch.randn(2, 5, 16)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight), mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight), mha.out_proj.bias.copy_(block.proj.bias)
        h = block.ln1(x)
        h = x + mha(h, h, h, need_weights=False)[0]
        expected = h + block.mlp[2](F.gelu(block.mlp[0](block.ln2(h)), approximate="tanh"))
        torch.testing.assert_close(block(x), expected)

        model = ViTVQGAN(image_size=12, patch=4, layers=0, width=16, code_dim=4, codebook_size=8, logit_laplace=True)
        q = torch.randn(2, 9, 4)
        tokens = model.dec_out(model.dec_in(q) + model.dec_pos)  # [2, 9, 6 * 4 * 4] (no blocks: layers=0)
        drawn = F.fold(tokens.transpose(1, 2), output_size=12, kernel_size=4, stride=4)
        torch.testing.assert_close(model.pixels(q), drawn)
        images = torch.randn(2, 3, 12, 12)  # the encoder's token n: the patch F.unfold reads n-th
        patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)
        tokens = patches @ model.patch_embed.weight.flatten(1).t() + model.patch_embed.bias
        torch.testing.assert_close(model.patch_embed(images).flatten(2).transpose(1, 2), tokens)
        torch.testing.assert_close(model.latents(images), F.normalize(model.enc_out(tokens + model.enc_pos), dim=-1))


@pytest.mark.parametrize("kind", ["vit", "vqvae", "vqgan", "vqgan_l2"])
def test_a_training_pass_decodes_the_nearest_codes_of_encode(kind):
    """The training pass (eval mode: no usage or restarts) quantises to encode()'s codes, the nearest by squared
    distance (of unit latents and codes for ViT-VQGAN and VQGAN(l2_norm)); its output is the decoder's drawing of
    their embeddings (decode() before the clamp), with frozen codes too: the straight-through estimator changes
    gradients only, and lets the reconstruction's reach the encoder. vq_loss: (1 + beta) x mse(z, q) in value; the
    EMA VQ-VAE's, beta x mse."""
    from torch.nn import functional as F

    from vq.vit_vqgan import ViTVQGAN
    from vq.vqgan import VQGAN
    from vq.vqvae import VQVAE

    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    if kind == "vit":
        model = ViTVQGAN(image_size=8, patch=4, layers=1, width=16, code_dim=4, codebook_size=16, beta=0.25)
        z, codebook = model.latents(images), F.normalize(model.codebook.weight, dim=-1)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(2, 4))  # (the paper's l2-normalised codes)
        draw, enc = lambda q: model.pixels(q.flatten(1, 2)), model.patch_embed.weight
    elif kind == "vqvae":
        model = VQVAE(image_size=8, patch=4, width=8, code_dim=4, codebook_size=16, beta=0.25)
        z, codebook = model.latents(images).permute(0, 2, 3, 1), model.codebook.weight
        spread = torch.randn(3, 4, 5, 5)  # (this encoder's latents all share one code: the search on spread ones)
        by_cdist = torch.cdist(spread.permute(0, 2, 3, 1).reshape(-1, 4).double(), codebook.detach().double())
        assert by_cdist.argmin(1).unique().numel() > 4
        assert torch.equal(model.codes_of(spread).flatten(), by_cdist.argmin(1))
        draw, enc = lambda q: model.decoder(q.permute(0, 3, 1, 2)), model.encoder[0].weight
    else:
        model = VQGAN(ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, n_embed=16, resolution=8,
                      attn_resolutions=[], beta=0.25, l2_norm=kind == "vqgan_l2")
        model.quantize.embedding.weight.data.normal_()  # (codes as far apart as trained ones)
        z, codebook = model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1), model.quantize.embedding.weight
        if model.l2_norm:
            z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
        draw, enc = lambda q: model.decoder(model.post_quant_conv(q.permute(0, 3, 1, 2))), model.encoder.conv_in.weight
    model.eval()
    out, aux = model(images)
    g = model.grid
    z, codebook = z.reshape(2, g, g, 4), codebook.detach()
    nearest = (z.detach().double()[..., None, :] - codebook.double()).square().sum(-1).argmin(-1)
    assert torch.equal(aux["codes"].reshape(2, g, g), nearest)
    assert torch.equal(model.encode(images).reshape(2, g, g), nearest)
    q = codebook[nearest]
    with torch.no_grad():
        torch.testing.assert_close(out, draw(q))
        torch.testing.assert_close(model.decode(aux["codes"]), draw(q).clamp(-1, 1))
    last = model.dec_out[-1] if kind == "vit" else model.decoder[-1] if kind == "vqvae" else model.decoder.conv_out
    assert model.last_decoder_weight() is last.weight  # (the adaptive weight's layer: the one that draws the pixels)
    mse = F.mse_loss(z.detach(), q)
    torch.testing.assert_close(aux["vq_loss"].detach(), (0.25 if kind == "vqvae" else 1.25) * mse)
    assert torch.autograd.grad(out.square().mean(), enc)[0].abs().sum() > 0
    out, aux = model(images, frozen_codes=True)  # (the same codes and drawing, no loss)
    assert torch.equal(aux["codes"].reshape(2, g, g), nearest) and float(aux["vq_loss"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(out, draw(q))


def test_stale_codes_restart_in_the_training_pass_but_not_frozen_ones():
    """Codes unused for over dead_code_steps steps restart in a training forward: the VQ-VAE's from batch latents
    with their EMA statistics (count 1, sum the new code); a frozen codebook (detokenizer fine-tuning, whose
    forward passes no latents) keeps every code however stale, its usage still counted."""
    from vq.vit_vqgan import ViTVQGAN
    from vq.vqvae import VQVAE

    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    model = VQVAE(image_size=8, patch=4, width=8, code_dim=4, codebook_size=64, dead_code_steps=1)
    model.step.fill_(10)  # every code last used at step 0
    model(images)
    used = torch.zeros(64, dtype=torch.bool)
    used[model.encode(images).unique()] = True  # (the restarted codes are batch latents: encode may pick them now)
    dead = model.last_used == 11
    assert dead.sum() >= 56  # (8 latents use at most 8 codes; all the rest restart)
    latents = model.latents(images).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    unused = dead & (model.ema_count == 1.0)
    assert unused.sum() >= 56, model.ema_count  # (not decay x 1 + (1 - decay) x 0: the EMA restarted too)
    torch.testing.assert_close(model.ema_sum[unused], model.codebook.weight[unused])
    assert all(any(torch.allclose(row, lat) for lat in latents) for row in model.codebook.weight[unused])
    assert model.codebook.weight[unused].unique(dim=0).shape[0] > 1  # (each from a random latent, not one for all)

    vit = ViTVQGAN(image_size=8, patch=4, layers=1, width=16, code_dim=4, codebook_size=16, dead_code_steps=1)
    vit.step.fill_(10)
    before = vit.codebook.weight.detach().clone()
    vit(images, frozen_codes=True)
    assert torch.equal(vit.codebook.weight, before) and int(vit.step) == 11 and vit.usage.sum() > 0
    vit(images)  # (a training pass: the codes the frozen one left stale restart)
    assert int(vit.step) == 12 and not torch.equal(vit.codebook.weight, before)


def test_discriminators_start_and_mix_as_their_papers_say():
    """taming's PatchGAN initialisation (conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0); the
    StyleGAN2-style discriminator's residual blocks scale their sum by 1/sqrt(2), and its last conv sees the
    minibatch standard deviation (over the batch, averaged) as one more feature map."""
    from torch import nn
    from torch.nn import functional as F

    from vq.losses import Discriminator, DiscriminatorBlock, PatchGAN

    torch.manual_seed(0)
    patchgan = PatchGAN()
    convs = torch.cat([m.weight.flatten() for m in patchgan.modules() if isinstance(m, nn.Conv2d)])
    norms = [m for m in patchgan.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_weights = torch.cat([m.weight.flatten() for m in norms])
    assert abs(float(convs.mean())) < 1e-3 and float(convs.std()) == pytest.approx(0.02, rel=0.05)
    assert (float(bn_weights.mean()) == pytest.approx(1.0, abs=0.01)
            and float(bn_weights.std()) == pytest.approx(0.02, rel=0.2))
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)

    block, x = DiscriminatorBlock(4, 8), torch.randn(2, 4, 8, 8)
    h = F.avg_pool2d(F.leaky_relu(block.conv2(F.leaky_relu(block.conv1(x), 0.2)), 0.2), 2)
    torch.testing.assert_close(block(x), (h + F.avg_pool2d(block.skip(x), 2)) / 2**0.5)

    disc, images, seen = Discriminator(16, channels=8), torch.rand(3, 3, 16, 16) * 2 - 1, []
    disc.final.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        disc(images)
        h = disc.blocks(F.leaky_relu(disc.stem(images), 0.2))  # [3, C, 4, 4]
    std = h.std(dim=0, unbiased=False).mean()  # over the batch, averaged over channels and pixels: one feature map
    torch.testing.assert_close(seen[0], torch.cat([h, std.expand(3, 1, 4, 4)], 1))


def test_dvae_training_and_frozen_passes_and_decode_use_the_argmax_codes():
    """The dVAE's training pass reports encode()'s argmax codes (their usage and perplexity are logged), a frozen
    pass draws their one-hot codes, and decode() is DALL-E's unmap_pixels(sigmoid(means)) of them, in [-1, 1]."""
    from torch.nn import functional as F

    from vq.dvae import DVAE

    torch.manual_seed(0)
    model = DVAE(image_size=8, patch=2, n_hid=8, code_dim=4, codebook_size=8, res_blocks=1)
    model.encoder.output.conv.bias.data.zero_()  # (its random biases alone chose every code at initialisation)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    _, aux = model(images)
    codes = model.encode(images)
    assert codes.unique().numel() > 1 and torch.equal(aux["codes"], codes)
    with torch.no_grad():
        drawn = model.pixels(F.one_hot(codes, 8).permute(0, 3, 1, 2).float())
        frozen, aux = model(images, frozen_codes=True)
        assert torch.equal(aux["codes"], codes)
        torch.testing.assert_close(frozen, drawn)
        unmapped = ((torch.sigmoid(drawn[:, :3]) - 0.1) / (1 - 2 * 0.1)).clamp(0, 1)  # DALL-E's unmap_pixels
        torch.testing.assert_close(model.decode(codes), unmapped * 2 - 1)
