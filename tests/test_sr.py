"""Parti's upsampler (WDSR): the presets' sizes, it beats bicubic upsampling on photos it did not see, resume,
export."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, load_typed
from sr.config import SRConfig
from sr.model import SRModelConfig, build_wdsr
from tests import laion_fixtures as lf

TINY = ["model.preset=tiny", "train.crop=48", "train.resize=160", "train.batch_size=16", "train.lr=2e-3",
        "train.log_interval=50", "train.eval_interval=100000", "train.save_interval=100000"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[str, str]:
    """12 of the shipped photos to train on, the other 5 held out."""
    # (train.resize=160: the photos as the stream resizes them)
    folder, samples = tmp_path_factory.mktemp("srdata"), lf.coco_mini(160)
    for name, part in (("train", samples[:12]), ("val", samples[12:])):
        lf.write_tar(folder / f"{name}.tar", [(k, {"jpg": j, "txt": c.encode()}) for k, j, c in part])
    return str(folder / "train.tar"), str(folder / "val.tar")


def train(photos, run_dir: Path, *overrides: str):
    from sr.train import SRTrainer

    trainer = SRTrainer(load_typed(SRConfig, None, [*TINY, *overrides]), photos[0], run_dir, photos[1])
    trainer.resume()
    return trainer, trainer.run()


def test_garbage_is_collected_every_gc_interval_steps_with_automatic_collection_off(single_process, photos, tmp_path,
                                                                                  monkeypatch):
    """train.gc_interval as Parti's trainer takes it (common/collection.py): automatic collection off in every
    step, on again after the run."""
    import gc

    from sr.train import SRTrainer

    real_step, enabled = SRTrainer.train_step, []
    monkeypatch.setattr(SRTrainer, "train_step", lambda self, *a: enabled.append(gc.isenabled()) or real_step(self, *a))
    train(photos, tmp_path, "train.steps=2", "train.gc_interval=1")
    assert (enabled, gc.isenabled()) == ([False] * 2, True)


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


@pytest.mark.parametrize("preset, size", [("x2", 15e6), ("x4", 30e6)])
def test_presets_have_the_sizes_parti_names(preset, size):
    with torch.device("meta"):
        model = build_wdsr(SRModelConfig(preset=preset))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(size, rel=0.1)
    assert model.scale == int(preset[1])


def reference_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2, so peak^2 = 4), computed here in float64."""
    return 10 * math.log10(4 / torch.mean((images.double() - reference.double()) ** 2).item())


def test_fields_above_zero_override_the_preset_down_to_one():
    """model.scale/features/blocks > 0 replace the preset's (1 included); 0 keeps it."""
    assert SRModelConfig(preset="x4", scale=2, features=1, blocks=1).resolved() == {"scale": 2, "features": 1,
                                                                                     "blocks": 1}
    assert SRModelConfig(preset="x2", blocks=3).resolved() == {"scale": 2, "features": 128, "blocks": 3}


def test_psnr_is_the_closed_form_for_images_in_minus_one_one():
    """common.metrics.psnr (what every logged PSNR is): peak-to-peak 2 for images in [-1, 1]; a wrong peak
    would shift all PSNRs while the relative assertions elsewhere still held."""
    from common.metrics import psnr

    zeros = torch.zeros(2, 3, 8, 8)
    assert psnr(torch.full_like(zeros, 0.1), zeros) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)  # 26.02 dB
    assert psnr(torch.full_like(zeros, -1.0), torch.ones_like(zeros)) == pytest.approx(0.0, abs=1e-6)  # MSE = peak^2
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    assert psnr(a, b) == pytest.approx(reference_psnr(a, b), abs=1e-4)


def test_upsampler_beats_bicubic_on_held_out_photos_and_exports(single_process, photos, tmp_path):
    """The logged bicubic PSNR is torch's bicubic upsampling (align_corners=False, clamped) of the antialiased
    bicubic downsampling of the held-out images, scored here; the untrained WDSR scores exactly that (it starts
    as bicubic), so the trained one's > 0.2 dB over it is what training gained."""
    import torch.nn.functional as F

    from sr.model import build_wdsr, load_upsampler, upsample

    trainer, history = train(photos, tmp_path, "train.steps=200")
    held_out = history[-1]
    hr = trainer.val_images.float() / 127.5 - 1
    assert hr.shape == (5, 3, 160, 160)  # (the 5 held-out photos, whole at train.resize)
    lr = F.interpolate(hr, scale_factor=1 / 2, mode="bicubic", antialias=True).clamp(-1, 1)
    bicubic = reference_psnr(F.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1), hr)
    assert held_out["valid_psnr_bicubic"] == pytest.approx(bicubic, abs=1e-3), held_out
    untrained = build_wdsr(trainer.cfg.model).eval()
    assert reference_psnr(upsample(untrained, lr), hr) == pytest.approx(bicubic, abs=1e-3)
    assert held_out["valid_psnr"] == pytest.approx(reference_psnr(upsample(trainer.model.eval(), lr), hr), abs=1e-3)
    assert held_out["valid_psnr"] > bicubic + 0.2, held_out
    model = load_upsampler(tmp_path / "export.pt")
    low = torch.rand(2, 3, 20, 24) * 2 - 1
    assert torch.equal(upsample(model, low), upsample(trainer.model.eval(), low))
    assert upsample(model, low).shape == (2, 3, 40, 48)
    assert Path(held_out["grid"]).is_file() and (tmp_path / "metrics.jsonl").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["data_wait_pct"] <= 100 and row["images_per_s"] > 0 for row in rows if "images_per_s" in row)


def test_init_from_an_export_starts_from_its_weights(single_process, photos, tmp_path):
    """train.init_from=<export.pt>: step 0 has the export's weights, through the command line too (--resume none);
    an export of another shape (scale, width, depth) is refused naming the keys."""
    from sr.model import load_upsampler
    from sr.train import main

    train(photos, tmp_path / "source", "train.steps=2", "train.seed=7")
    export = tmp_path / "source" / "export.pt"
    started, _ = train(photos, tmp_path / "ft", "train.steps=0", f"train.init_from={export}")
    source = load_upsampler(export).state_dict()
    assert all(torch.equal(tensor, source[name]) for name, tensor in started.model.state_dict().items())
    main(["--data", photos[0], "--val-data", photos[1], "--run-dir", str(tmp_path / "cli"), "--resume", "none",
          "--set", *TINY, "train.steps=0", f"train.init_from={export}"])
    assert all(torch.equal(tensor, source[name]) for name, tensor in load_upsampler(tmp_path / "cli" / "export.pt")
               .state_dict().items())
    with pytest.raises(ConfigError, match=rf"init_from={export} does not fit the configured model \(.*other shape"):
        train(photos, tmp_path / "wider", "model.features=24", "train.steps=0", f"train.init_from={export}")
    # An export whose config and weights disagree: one line naming the key (a many-line load_state_dict error and a
    # TypeError before), as every reader of an export gets it (evaluation.generate's --upsampler, the benchmark's).
    blob = torch.load(export, weights_only=True)
    for edit, expected in (({"features": 24}, r"does not fit the configured model .*its config describes another"),
                           ({"extra": 1}, r"its config is not an upsampler's .*unexpected keyword argument 'extra'")):
        torch.save({**blob, "config": {**blob["config"], **edit}}, tmp_path / "edited.pt")
        with pytest.raises(ConfigError, match=rf"^train.init_from={tmp_path / 'edited.pt'}:? {expected}"):
            train(photos, tmp_path / "edited", "train.steps=0", f"train.init_from={tmp_path / 'edited.pt'}")


def test_a_run_asked_to_stop_saves_exits_for_requeue_and_resumes(single_process, photos, tmp_path, monkeypatch,
                                                                  capsys):
    """The STOP file (how slurm/train.sbatch passes on SLURM's USR1) appears during step 6: the command saves
    a checkpoint although none is due, leaves REQUEUE, says so in one line and exits 75; the rerun resumes
    there and gives the uninterrupted run's losses for steps 7-12 (weights, Adam, the LR halvings and the
    data stream all continue)."""
    from sr.train import SRTrainer, main

    _, full = train(photos, tmp_path / "full", "train.steps=12")
    split, real_step = tmp_path / "split", SRTrainer.train_step

    def step_then_stop_file(self, lr, hr):
        if self.step == 5:
            (split / "STOP").touch()
        return real_step(self, lr, hr)

    monkeypatch.setattr(SRTrainer, "train_step", step_then_stop_file)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--data", photos[0], "--val-data", photos[1], "--run-dir", str(split), "--set", *TINY, "train.steps=12"])
    monkeypatch.undo()
    assert stopped.value.code == 75
    assert capsys.readouterr().err.strip().endswith(
        f"stopped by {split}/STOP after step 6; checkpoint saved; {split}/REQUEUE written; exit status 75: run "
        "again (requeue) to continue")
    assert (split / "REQUEUE").read_text() == "step 6\n" and not (split / "STOP").exists()
    _, rest = train(photos, split, "train.steps=12")
    assert [h["loss"] for h in rest] == pytest.approx([h["loss"] for h in full[6:]], rel=1e-5)


def test_a_resume_follows_a_longer_schedule_and_refuses_another_model(single_process, photos, tmp_path):
    """The LR halvings at 50% and 75% of train.steps move with a run extended from 4 to 8 steps (a saved
    MultiStepLR kept halving at steps 2 and 3); a resume with another model section is refused naming the
    shapes, config.yaml untouched (it was rewritten, then load_state_dict failed)."""
    from sr.train import SRTrainer

    trainer, first = train(photos, tmp_path, "train.steps=4")
    assert [h["lr"] for h in first] == pytest.approx([2e-3, 2e-3, 1e-3, 5e-4])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["lr"]) for m in lines if "loss" in m] == [(4, pytest.approx(5e-4))]  # (the last step's line,
    # although train.log_interval=50 does not divide it)
    assert [g["lr"] for g in trainer.opt.param_groups] == pytest.approx([5e-4])  # (what Adam stepped with)
    before = (tmp_path / "config.yaml").read_text()
    wider = SRTrainer(load_typed(SRConfig, None, [*TINY, "train.steps=8", "model.features=24"]), photos[0], tmp_path)
    try:
        with pytest.raises(ConfigError, match=r"step_00000004/state.pt \(to resume\) does not fit the configured "
                                              r"model \(.*other shape.*\): resume with the model section"):
            wider.resume()
    finally:
        wider.stream.close()
    assert (tmp_path / "config.yaml").read_text() == before
    shorter = SRTrainer(load_typed(SRConfig, None, [*TINY, "train.steps=3"]), photos[0], tmp_path)
    try:  # (trained nothing, exported step 4's weights and rewrote config.yaml with 3 steps)
        with pytest.raises(ConfigError, match=r"train.steps=3 is below step 4 of the checkpoint this run resumes"):
            shorter.resume()
    finally:
        shorter.stream.close()
    assert (tmp_path / "config.yaml").read_text() == before
    _, rest = train(photos, tmp_path, "train.steps=8")
    assert [h["lr"] for h in rest] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])


def test_a_checkpoint_without_stream_states_replays_the_crops_its_steps_took(single_process, photos, tmp_path,
                                                                            log_lines):
    """A checkpoint of an older version has no data stream states: the resume replays the crops its steps
    consumed on this rank (steps x train.batch_size / world size), and the run goes on as from its saved state."""
    from common.state_file import load_state

    for run in ("saved", "replayed"):  # (2 steps, then extended to 3: the same LR schedule in both)
        train(photos, tmp_path / run, "train.steps=2", "train.batch_size=4")
    path = tmp_path / "replayed" / "checkpoints" / "step_00000002" / "state.pt"
    state = load_state(path, ("model", "opt", "step"), writer="sr.train")
    del state["streams"]
    torch.save(state, path)
    _, saved = train(photos, tmp_path / "saved", "train.steps=3", "train.batch_size=4")
    _, replayed = train(photos, tmp_path / "replayed", "train.steps=3", "train.batch_size=4")
    assert any("data stream replayed from its start (8 images per rank: the checkpoint has no stream state)" in line
               for line in log_lines), log_lines
    assert [h["loss"] for h in replayed] == pytest.approx([h["loss"] for h in saved], rel=1e-5)


@pytest.mark.parametrize("sets, message", [
    (["train.crop=47"], "train.crop=47 must be divisible by the model's scale 2"),
    (["train.resize=161"], "train.resize=161 must be divisible by the model's scale 2"),
    (["model.preset=x3"], "model.preset='x3' must be one of x2, x4, tiny"),
    (["train.precision=fp16"], "train.precision='fp16' must be fp32 or bf16"),  # (it trained in fp32 silently)
    (["train.resize=32"], "train.resize=32 must be at least train.crop=48"),  # (it failed at the first step)
    # (these failed at the first step, or, negative, trained the preset's shape silently)
    (["train.crop=0"], "train.crop=0 must be >= 2 (the high-resolution crops' side)"),
    (["train.batch_size=0"], "train.batch_size=0 must be >= 1 (images per step over all processes)"),
    (["train.save_interval=0"], "train.save_interval=0 must be >= 1 (steps between checkpoints)"),
    (["model.scale=-3"], "model.scale=-3 must be >= 0 (0: the preset's)"),
    (["model.blocks=-1"], "model.blocks=-1 must be >= 0 (0: the preset's)"),
    (["model.expansion=0"], "model.expansion=0.0 x 16 features rounds to no channel"),
    (["model.low_rank=0.01"], "model.low_rank=0.01 x 16 features rounds to no channel"),
    (["train.perceptual=0.1"], "a perceptual loss weight > 0 needs train.lpips_backbone"),
    (["train.l1=-1"], "train.l1=-1.0 must be >= 0 (a loss weight: a negative one maximises its term)"),
])
def test_bad_settings_are_refused_naming_the_field(single_process, photos, tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(photos, tmp_path, "train.steps=0", *sets)  # (0 steps: a setting no longer refused fails here, not
        # after the default 100,000 steps)


def test_a_batch_that_the_ranks_cannot_share_is_refused_naming_it(single_process, photos, tmp_path, monkeypatch):
    """train.batch_size is over all processes: 16 crops on 3 ranks (a stand-in world size) is refused before the
    run directory is made (each rank's 16 // 3 dropped a crop a step unsaid)."""
    import sr.train

    monkeypatch.setattr(sr.train.dist, "get_world_size", lambda *group: 3)
    with pytest.raises(ConfigError, match=r"^train\.batch_size=16 must be divisible by the world size 3"):
        sr.train.SRTrainer(load_typed(SRConfig, None, TINY), photos[0], tmp_path / "run", photos[1])
    assert not (tmp_path / "run").exists()


def ddp_weights(photos, run_dir: str):
    from sr.train import SRTrainer

    trainer = SRTrainer(load_typed(SRConfig, None, [*TINY, "train.steps=3", "train.batch_size=8"]), photos[0],
                        run_dir, photos[1])
    own, step = [], trainer.train_step  # (each rank's own numbers, before they are averaged for the log)
    trainer.train_step = lambda *batch: own.append(step(*batch)) or own[-1]
    history = trainer.run()
    return history[-1], own[-1], {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_data_parallel_keeps_ranks_identical(pool2, photos, tmp_path):
    """Weights equal on both ranks; the logged loss and PSNR are the step's over both ranks' images."""
    (logged0, own0, weights0), (logged1, own1, weights1) = pool2.run(ddp_weights, photos, str(tmp_path))
    torch.testing.assert_close(weights0, weights1, rtol=0, atol=0)  # gradients averaged by DDP
    assert own0["loss"] != own1["loss"]  # each rank saw its own images
    from tests.test_vq import whole_batch_psnr

    assert logged0["loss"] == logged1["loss"] == pytest.approx((own0["loss"] + own1["loss"]) / 2, rel=1e-12)
    assert logged0["psnr"] == logged1["psnr"] == pytest.approx(whole_batch_psnr(own0["psnr"], own1["psnr"]))


def test_a_perceptual_weight_adds_lpips_of_the_output_to_the_loss(single_process, photos, tmp_path):
    """train.perceptual > 0 (train.lpips_backbone=random: the trainer wants it named): each step's loss is
    train.l1 x the logged L1 + train.perceptual x the LPIPS distance of that step's output to its targets."""
    from sr.train import SRTrainer

    trainer = SRTrainer(load_typed(SRConfig, None, [*TINY, "train.steps=2", "train.batch_size=4", "train.l1=2",
                                                    "train.perceptual=0.5", "train.lpips_backbone=random"]),
                        photos[0], tmp_path)
    distances, lpips = [], trainer.lpips

    def recorded(out, hr):
        d = lpips(out, hr)
        assert d.requires_grad and out.shape == hr.shape == (4, 3, 48, 48)  # (of the step's output, in its graph)
        distances.append(float(d.mean()))
        return d

    trainer.lpips = recorded
    history = trainer.run()
    assert len(distances) == len(history) == 2
    for logs, distance in zip(history, distances):
        assert math.isfinite(distance) and distance > 0
        assert logs["loss"] == pytest.approx(2 * logs["l1"] + 0.5 * distance, rel=1e-5), (logs, distance)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A small (untrained) image tokenizer of 80px images: TINY's x2 upsampler then reconstructs 160px ones."""
    from vq.tokenizer import ConvVQ, save_image_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "tok.pt"
    save_image_tokenizer(ConvVQ(image_size=80, downsample=3, channels=16, code_dim=8, codebook_size=32), path)
    return path


def test_with_a_tokenizer_the_inputs_are_its_reconstructions_cropped_with_their_targets(single_process, photos,
                                                                                         tokenizer, tmp_path,
                                                                                         monkeypatch):
    """train.tokenizer (Parti: the upsampler learns from the detokenizer's output): the inputs are the tokenizer's
    reconstructions of the downsampled whole images, cropped at the same place as their targets (a target that is
    its input enlarged by nearest neighbours stays so after cropping); a resumed run crops and trains as the
    uninterrupted one. train.resize must be the tokenizer's size x the scale (refused naming it otherwise)."""
    import torch.nn.functional as F

    from common.preemption import Preempted
    from sr.train import SRTrainer, downsample
    from vq.tokenizer import load_image_tokenizer

    trainer = SRTrainer(load_typed(SRConfig, None, [*TINY, f"train.tokenizer={tokenizer}"]), photos[0],
                        tmp_path / "look", photos[1])
    hr = torch.rand(3, 3, 160, 160) * 2 - 1
    tok = load_image_tokenizer(tokenizer)
    assert torch.equal(trainer.low_resolution(hr), tok.decode(tok.encode(downsample(hr, 2))).clamp(-1, 1))
    lr = torch.rand(3, 3, 80, 80)
    lr_crops, hr_crops = trainer.crop_pairs(lr, F.interpolate(lr, scale_factor=2, mode="nearest"))
    assert lr_crops.shape == (3, 3, 24, 24) and hr_crops.shape == (3, 3, 48, 48)
    assert torch.equal(hr_crops, F.interpolate(lr_crops, scale_factor=2, mode="nearest"))
    assert not torch.equal(lr_crops[0], lr_crops[1])  # (each image its own place)
    trainer.step = 1  # the next step's crops: at other places (the step is in their seed), still pairs
    lr_next, hr_next = trainer.crop_pairs(lr, F.interpolate(lr, scale_factor=2, mode="nearest"))
    assert torch.equal(hr_next, F.interpolate(lr_next, scale_factor=2, mode="nearest"))
    assert not torch.equal(lr_next, lr_crops)
    assert next(trainer.stream).shape == (3, 160, 160)  # the tokenizer sees whole images, cropped after it
    trainer.stream.close()

    _, full = train(photos, tmp_path / "full", f"train.tokenizer={tokenizer}", "train.steps=6")
    real_step = SRTrainer.train_step

    def step_then_stop(self, lr, hr):
        (tmp_path / "split" / "STOP").touch()  # (during the first step: saved after it, as a preemption)
        return real_step(self, lr, hr)

    monkeypatch.setattr(SRTrainer, "train_step", step_then_stop)
    with pytest.raises(Preempted, match="after step 1"):
        train(photos, tmp_path / "split", f"train.tokenizer={tokenizer}", "train.steps=6")
    monkeypatch.undo()
    _, rest = train(photos, tmp_path / "split", f"train.tokenizer={tokenizer}", "train.steps=6")
    assert len(rest) == 5
    assert [h["loss"] for h in rest] == pytest.approx([h["loss"] for h in full[1:]], rel=1e-5)
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000006.*reconstructions of a tokenizer of weights "
                                          r"hash .*train\.tokenizer=\(none\) makes other inputs"):
        train(photos, tmp_path / "split", "train.steps=8")  # (continued without the tokenizer: refused)
    with pytest.raises(ConfigError, match=r"train\.tokenizer=.*tok\.pt reconstructs 80px images: train\.resize must "
                                          r"be 160 .*; got train\.resize=200"):
        train(photos, tmp_path / "wrong", f"train.tokenizer={tokenizer}", "train.resize=200")


def test_images_smaller_than_the_high_resolution_side_are_skipped_not_enlarged(single_process, tmp_path):
    """An 80x100 photo would be enlarged to a 160px target of interpolated pixels: the upsampler's images skip it,
    the training crops (the stream's default keeps images from 64 px on) as the held-out ones. Held-out images
    without one large enough are refused when the trainer is made."""
    import io

    from PIL import Image

    from data_pipeline.image_stream import center_crops

    def jpg(size, colour=(200, 30, 30)):
        buf = io.BytesIO()
        Image.new("RGB", size, colour).save(buf, "JPEG")
        return buf.getvalue()

    lf.write_tar(tmp_path / "mixed.tar", [("small", {"jpg": jpg((80, 100)), "txt": b"a"}),
                                          ("large", {"jpg": jpg((200, 180), (30, 30, 200)), "txt": b"b"})])
    assert len(center_crops(str(tmp_path / "mixed.tar"), 160, 16)) == 2  # (the default: enlarged from 64 px on)
    assert len(center_crops(str(tmp_path / "mixed.tar"), 160, 16, min_size=160)) == 1
    from sr.train import SRTrainer

    trainer = SRTrainer(load_typed(SRConfig, None, TINY), str(tmp_path / "mixed.tar"), tmp_path / "crops")
    try:  # (train.resize=160: each pass over the shard keeps the large blue photo only)
        crops = [next(trainer.stream).float() for _ in range(4)]
    finally:
        trainer.stream.close()
    assert all(c.shape == (3, 48, 48) and c[2].mean() > 150 > 60 > c[0].mean() for c in crops)
    lf.write_tar(tmp_path / "small.tar", [("small", {"jpg": jpg((80, 100)), "txt": b"a"})])
    with pytest.raises(ConfigError, match=r"--val-data .*small\.tar: .*no usable image \(.* at least 160 px.*\)"):
        from sr.train import SRTrainer  # (refused when the trainer is made, not at its first evaluation)

        SRTrainer(load_typed(SRConfig, None, TINY), str(tmp_path / "mixed.tar"), tmp_path / "run",
                  str(tmp_path / "small.tar"))
    assert not (tmp_path / "run").exists()


def test_crop_corners_reach_every_place_and_differ_per_rank_and_step():
    """crop_pairs (a stand-in trainer: its config, scale, step, rank and world only): every corner from 0 to the
    last one fits is drawn (the last included), each pair aligned; (step, rank) seeds differ for every pair, so
    rank 1's step 0 does not crop as rank 0's step 1."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from sr.train import SRTrainer

    def crops(step, rank, lr):
        me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(crop=8, seed=3)), scale=2, step=step, rank=rank,
                             world=2)
        return SRTrainer.crop_pairs(me, lr, F.interpolate(lr, scale_factor=2, mode="nearest"))

    lr = torch.arange(64 * 5 * 5, dtype=torch.float32).view(64, 1, 5, 5).expand(64, 3, 5, 5).contiguous()
    lr_crops, hr_crops = crops(0, 0, lr)
    assert lr_crops.shape == (64, 3, 4, 4) and torch.equal(hr_crops, F.interpolate(lr_crops, scale_factor=2))
    offsets = (lr_crops[:, 0, 0, 0] - lr[:, 0, 0, 0]).long()  # row * 5 + column of each corner
    assert {int(o) for o in offsets} == {0, 1, 5, 6}  # the corners (0|1, 0|1): the last place, 1, included
    assert not torch.equal(crops(0, 1, lr)[0], crops(1, 0, lr)[0])
    assert not torch.equal(crops(0, 1, lr)[0], lr_crops)


@pytest.mark.parametrize("scale", [2, 4])
def test_an_untrained_wdsr_is_torchs_bicubic_upsampling(scale):
    """_start_as_bicubic: the untrained network computes F.interpolate(mode="bicubic", align_corners=False) of its
    input, borders included (torch repeats the edge pixels, the global branch's replicate padding too)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_wdsr(SRModelConfig(preset="tiny", scale=scale)).eval()
    lr = torch.rand(2, 3, 7, 9) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(lr),
                                   F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False),
                                   rtol=0, atol=1e-5)


def test_a_wide_block_is_its_residual_of_relu_then_low_rank_then_3x3_convolutions():
    """WideBlock by hand (WDSR-B): x + conv3x3(conv1x1_low_rank(relu(conv1x1_wide(x)))), widths round(features x
    expansion) and round(features x low_rank): the untrained WDSR is bicubic whatever its body computes (the
    tail starts at zero), so only this shows the body's activation and skip connection."""
    import torch.nn.functional as F

    from sr.model import WideBlock

    torch.manual_seed(0)
    block = WideBlock(8, expansion=2.5, low_rank=0.7)  # (20 and 5.6 -> 6 channels)
    wide, narrow, out = (m for m in block.body if isinstance(m, torch.nn.Conv2d))
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in (wide, narrow, out)] == [
        (8, 20, (1, 1)), (20, 6, (1, 1)), (6, 8, (3, 3))]
    x = torch.randn(2, 8, 5, 6)
    h = F.conv2d(F.relu(F.conv2d(x, wide.weight, wide.bias)), narrow.weight, narrow.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + F.conv2d(h, out.weight, out.bias, padding=1))


def test_expansion_and_low_rank_shape_the_model_and_travel_in_the_export(tmp_path):
    """model.expansion and model.low_rank reach the blocks (build_wdsr), down to the smallest accepted one (one
    feature: 6 and 1 channels, the check's rounding is the block's), and an export of such a model is read back
    as it (load_upsampler builds it from the saved config)."""
    from sr.model import load_upsampler, save_upsampler, upsample

    def widths(model):
        return [m.out_channels for m in model.body[0].body if isinstance(m, torch.nn.Conv2d)]

    assert widths(build_wdsr(SRModelConfig(preset="tiny"))) == [96, 13, 16]  # 6 x 16, round(0.8 x 16)
    assert widths(build_wdsr(SRModelConfig(preset="tiny", features=1))) == [6, 1, 1]
    cfg = SRModelConfig(preset="tiny", expansion=2.0, low_rank=0.5)
    torch.manual_seed(0)
    model = build_wdsr(cfg)
    assert widths(model) == [32, 8, 16]
    with torch.no_grad():  # (a body that computes something: the tail's gain away from its zero start)
        model.tail[0].parametrizations.weight.original0.fill_(0.1)
    save_upsampler(model, cfg, tmp_path / "sr.pt")
    loaded = load_upsampler(tmp_path / "sr.pt")
    assert widths(loaded) == [32, 8, 16] and not loaded.training
    low = torch.rand(2, 3, 6, 7) * 2 - 1
    assert torch.equal(upsample(loaded, low), upsample(model.eval(), low))
    assert upsample(loaded, low).shape == (2, 3, 12, 14)


def test_upsample_clamps_to_the_image_range_without_gradients():
    """upsample (what generation and evaluation call): the model's output clamped to [-1, 1] (bicubic overshoots
    at sharp edges), outside autograd."""
    from sr.model import upsample

    model = build_wdsr(SRModelConfig(preset="tiny"))
    edges = torch.ones(1, 3, 8, 8)
    edges[..., ::2, :] = -1  # (stripes: bicubic overshoots past both ends)
    raw = model(edges)
    assert raw.requires_grad and raw.max() > 1 and raw.min() < -1
    out = upsample(model, edges)
    assert not out.requires_grad and torch.equal(out, raw.detach().clamp(-1, 1))


def test_files_that_are_not_upsampler_exports_are_refused_naming_them(tmp_path):
    """load_upsampler (generation's --upsampler, the benchmark's model.upsampler, train.init_from): a pickle that
    would run code is refused unrun (weights_only), a tokenizer's export and a blob whose state_dict is not a
    mapping of tensors are named as not an upsampler's, a config of values SRModelConfig refuses as the file's;
    the message starts with `where`, the path by default."""
    import pathlib

    from sr.model import load_upsampler, save_upsampler
    from vq.tokenizer import ConvVQ, save_image_tokenizer

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    cfg = SRModelConfig(preset="tiny")
    save_upsampler(build_wdsr(cfg), cfg, tmp_path / "sr.pt")
    blob = torch.load(tmp_path / "sr.pt", weights_only=True)
    torch.save({**blob, "extra": Planted()}, tmp_path / "planted.pt")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'planted.pt'}: not a readable upsampler export \("):
        load_upsampler(tmp_path / "planted.pt")
    assert not marker.exists()
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=32),
                         tmp_path / "tok.pt")
    torch.save({**blob, "state_dict": [1.0]}, tmp_path / "list.pt")
    torch.save({**blob, "state_dict": {**blob["state_dict"], "head.bias": 1.0}}, tmp_path / "number.pt")
    for name in ("tok.pt", "list.pt", "number.pt"):  # (the number: an AttributeError in check_fits before)
        with pytest.raises(ConfigError, match=r"^--upsampler x: not an upsampler export \(expected sr\.train's "
                                              r"export\.pt, kind 'wdsr'\)$"):
            load_upsampler(tmp_path / name, where="--upsampler x")
    # A config that SRModelConfig refuses: named as the file's (it was "model.preset='x8' must be ...", which reads
    # as a setting of the command's own).
    for edit, expected in (({"preset": "x8"}, r"model\.preset='x8' must be one of"),
                           ({"blocks": -1}, r"model\.blocks=-1 must be >= 0")):
        torch.save({**blob, "config": {**blob["config"], **edit}}, tmp_path / "edited.pt")
        with pytest.raises(ConfigError, match=rf"^--upsampler x: its config is not an upsampler's \({expected}"):
            load_upsampler(tmp_path / "edited.pt", where="--upsampler x")


def test_the_default_model_is_the_x4_preset_of_wdsr_b_blocks():
    """SRModelConfig(): Parti's x4 upsampler (256 -> 1024 px, ~29.4M parameters), blocks widened 6x and narrowed to
    0.8x (WDSR-B); the x2 preset ~14.8M (the counts sr/model.py names)."""
    cfg = SRModelConfig()
    assert (cfg.preset, cfg.expansion, cfg.low_rank) == ("x4", 6.0, 0.8)
    assert cfg.resolved() == {"scale": 4, "features": 180, "blocks": 50}
    for preset, count in (("x2", 14.83e6), ("x4", 29.39e6)):
        with torch.device("meta"):
            model = build_wdsr(SRModelConfig(preset=preset))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(count, rel=1e-3)


def test_the_learning_rate_halves_at_whole_steps_and_resize_may_equal_the_crop(single_process, photos, tmp_path):
    """lr_factor's halvings fall on whole steps, steps // 2 and 3 steps // 4 (10 steps: at 5 and 7), as a resume
    recomputes them; train.resize equal to train.crop (one crop per image, the whole resized image) is accepted,
    only a smaller one is refused."""
    from sr.train import SRTrainer, lr_factor

    assert [lr_factor(step, 10) for step in range(10)] == [1] * 5 + [0.5] * 2 + [0.25] * 3
    assert [[lr_factor(step, n) for step in range(n)] for n in (1, 2, 3)] == [[1], [1, 0.5], [1, 0.5, 0.25]]
    trainer = SRTrainer(load_typed(SRConfig, None, [*TINY, "train.resize=48"]), photos[0], tmp_path)
    try:
        assert next(trainer.stream).shape == (3, 48, 48)
    finally:
        trainer.stream.close()


def test_a_tokenizer_that_cannot_be_read_is_refused_naming_train_tokenizer(single_process, photos, tmp_path):
    """train.tokenizer that is missing, or an export of something else (an upsampler's): a ConfigError naming the
    key (the command's one line), not a FileNotFoundError's traceback; before the run directory is made."""
    from sr.model import save_upsampler
    from sr.train import SRTrainer

    cfg = SRModelConfig(preset="tiny")
    save_upsampler(build_wdsr(cfg), cfg, tmp_path / "sr.pt")
    for path, expected in ((tmp_path / "none.pt", r"image tokenizer .*none\.pt does not exist"),
                           (tmp_path / "sr.pt", r"unknown tokenizer kind 'wdsr'")):
        with pytest.raises(ConfigError, match=rf"^train\.tokenizer: .*{expected}") as refused:
            SRTrainer(load_typed(SRConfig, None, [*TINY, f"train.tokenizer={path}"]), photos[0], tmp_path / "run")
        assert str(refused.value).count(path.name) == 1, refused.value  # (the file named once)
    assert not (tmp_path / "run").exists()


def test_bf16_on_the_cpu_trains_as_fp32(single_process, photos, tmp_path):
    """train.precision=bf16 autocasts on a GPU only: on the CPU a step's logs and updated weights are fp32's, bit
    for bit (CPU autocast would round the convolutions to bf16, and slowly). The untrained WDSR is bicubic
    upsampling, so the first step's PSNR (of the clamped outputs) is bicubic's."""
    from sr.train import SRTrainer

    steps = {}
    for precision in ("fp32", "bf16"):
        trainer = SRTrainer(load_typed(SRConfig, None, [*TINY, "train.batch_size=2", f"train.precision={precision}"]),
                            photos[0], tmp_path / precision)
        try:
            steps[precision] = trainer.train_step(*trainer.batch()), [p.detach() for p in trainer.model.parameters()]
        finally:
            trainer.stream.close()
    logs = steps["fp32"][0]
    assert trainer.device == "cpu" and steps["bf16"][0] == logs
    assert all(torch.equal(a, b) for a, b in zip(steps["bf16"][1], steps["fp32"][1]))
    assert logs["psnr"] == pytest.approx(logs["psnr_bicubic"], abs=1e-4), logs


def test_logs_evaluations_and_checkpoints_at_their_intervals_and_the_last_step(single_process, photos, tmp_path):
    """Over 11 steps: train.save_interval=3 saves at 3, 6, 9 and 11, of which train.keep_checkpoints' default keeps
    the newest three; train.eval_interval=4 evaluates (grid and metrics) at 4, 8 and 11; train.log_interval's
    default (10) logs steps 10 and 11."""
    from sr.train import SRTrainer

    sets = [s for s in TINY if not s.startswith("train.log_interval=")]  # (its default)
    SRTrainer(load_typed(SRConfig, None, [*sets, "train.steps=11", "train.batch_size=2", "train.save_interval=3",
                                          "train.eval_interval=4"]), photos[0], tmp_path, photos[1]).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in (6, 9, 11)]
    assert sorted(p.name for p in tmp_path.glob("compare_*.png")) == [f"compare_{s:08d}.png" for s in (4, 8, 11)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [10, 11]
    assert [m["step"] for m in lines if "valid_psnr" in m] == [4, 8, 11]


def test_each_rank_takes_its_share_of_the_batch():
    """train.batch_size is over all processes: a step of 16 on 2 ranks takes 8 images from each rank's stream (a
    stand-in trainer: its config, world size, stream and device; the pairs made as they are)."""
    from types import SimpleNamespace

    from sr.train import SRTrainer

    images = (torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(20))
    me = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(batch_size=16)), world=2, stream=images,
                         device="cpu", low_resolution=lambda hr: hr, crop_pairs=lambda lr, hr: (lr, hr))
    _, hr = SRTrainer.batch(me)
    assert torch.equal(hr[:, 0, 0, 0], torch.arange(8) / 127.5 - 1)  # (in [-1, 1])
