"""The main job end to end (demo/run.py) with smaller settings: shapes -> image tokenizer ->
SentencePiece -> code shards -> parti-tiny at TP=2 on 2 processes, stopped and resumed -> guided samples,
upsampled by a tiny WDSR.
The trained model must draw the prompted colour far more often than chance; the same model before
training must not. The decoder-only variant (--set arch=decoder_only) trains on the same code shards and
must do as well.
The slowest tests of the suite (a few minutes on 2 CPU cores)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from common.config import load_typed

# 160 training steps, threshold 0.8 (chance 0.25). 8 samples per prompt (96 in all, ~2 s of sampling on 2 CPU cores)
# keep the measured agreement's own noise (~0.03) well inside the margin: at 4 per prompt the decoder-only
# model measured 0.85 where 192 samples of the same model gave 0.90.
SMALL = ["shapes=2000", "vq_steps=400", "train_steps=160", "fid_real=32", "samples_per_prompt=8", "sr_images=300",
         "sr_steps=450"]


def test_measure_reads_colour_and_shape_back():
    import random

    from PIL import Image

    from demo import shapes

    for i in range(240):
        colour, shape, img = shapes.shape_sample(i, shapes.combinations(), 32)
        speckled = img.copy()
        rng = random.Random(i)
        for _ in range(6):  # stray pixels apart from the shape, as a decoder leaves them, do not change the answer
            x, y = rng.randrange(32), rng.randrange(32)
            near = [img.getpixel((u, v)) for u in range(max(x - 1, 0), min(x + 2, 32))
                    for v in range(max(y - 1, 0), min(y + 2, 32))]
            if all(p == (255, 255, 255) for p in near):
                speckled.putpixel((x, y), shapes.COLOURS[rng.choice(list(shapes.COLOURS))])
        assert shapes.measure(img) == shapes.measure(speckled) == (colour, shape), i
    assert shapes.measure(Image.new("RGB", (32, 32), "white")) == (None, None)


def test_measure_reads_decoder_like_samples():
    """What a VQ decoder gives back is no flat drawing: a colour washed 40% toward white, an off-white noisy
    background, soft edges; and a stray line that touches the shape only at a corner (not a 4-neighbour). Each
    is still read as the drawn colour and shape (the white threshold, the 4-connected blobs)."""
    import numpy as np
    from PIL import ImageFilter

    from demo import shapes

    for i in range(240):
        colour, shape, img = shapes.shape_sample(i, shapes.combinations(), 32)
        pixels = 255 - 0.6 * (255 - np.asarray(img, dtype=np.float64))
        pixels = pixels - 12 + np.random.default_rng(i).normal(0, 4, pixels.shape)
        soft = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
        assert shapes.measure(soft) == (colour, shape), i
        lined = np.array(img)
        row, col = min(map(tuple, np.argwhere((lined != 255).any(-1))))  # the top row's leftmost shape pixel
        for k in range(1, min(row, col, 6) + 1):  # a diagonal line up and left from it
            lined[row - k, col - k] = shapes.COLOURS[colour]
        assert shapes.measure(Image.fromarray(lined)) == (colour, shape), i


def test_shapes_are_drawn_whole_inside_the_image_at_45_to_70_percent_of_its_side():
    """draw(): the shape's box is 45-70% of the side, at least one white pixel from every edge, anywhere
    (not only on the diagonal); a triangle is isosceles (its apex above its base's middle)."""
    import numpy as np

    from demo import shapes

    for size in (32, 64):
        corners = set()
        for i in range(240):
            _, shape, img = shapes.shape_sample(i, shapes.combinations(), size)
            mask = (np.asarray(img) != 255).any(-1)
            rows, cols = np.nonzero(mask)
            assert rows.min() >= 1 and cols.min() >= 1 and rows.max() <= size - 2 and cols.max() <= size - 2, i
            side = rows.max() - rows.min() + 1
            assert side == cols.max() - cols.min() + 1 and int(0.45 * size) <= side <= int(0.7 * size), (i, side)
            corners.add((rows.min(), cols.min()))
            if shape == "triangle":
                box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                assert (box != box[:, ::-1]).mean() < 0.15, i
        assert len({r - c for r, c in corners}) > 5


def test_shape_samples_are_a_function_of_seed_and_index():
    """The demo draws its sets from one generator with other seeds (training: seed, FID's real images: seed+1,
    the upsampler's: seed+2 and its unseen validation shapes: seed+3): a seed's stream is not another's shifted,
    else the "unseen" images would be training images."""
    import numpy as np

    from demo import shapes

    combos = shapes.combinations()

    def sample(i, seed):
        colour, shape, img = shapes.shape_sample(i, combos, 32, seed)
        return colour, shape, np.asarray(img).tobytes()

    assert sample(7, 0) == sample(7, 0) and sample(7, 0) != sample(7, 1)
    assert sum(sample(i, 1) == sample(i + 1, 0) for i in range(64)) < 5
    assert shapes.caption("red", "circle") == "a red circle on a white background"
    assert len(shapes.combinations({("yellow", "square"), ("blue", "triangle")})) == 10
    assert ("yellow", "square") not in shapes.combinations({("yellow", "square")})


def test_shape_and_photo_shards_hold_what_they_are_asked_for(tmp_path):
    """write_shapes_shards: `count` samples keyed from `start`, `per_shard` to a shard named by its first
    index, no held-out combination, each with its png, caption and metadata; write_photo_shard: every shipped
    photo with its first caption and its licence."""
    import io
    import json
    import tarfile

    import numpy as np

    from data_pipeline.shared_data import shared_path
    from demo import shapes

    def members(path):
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    hidden = {(c, s) for c in ("red", "green", "blue") for s in shapes.SHAPES}  # only yellow, and not squares
    paths = shapes.write_shapes_shards(tmp_path / "s", 5, 16, {*hidden, ("yellow", "square")}, seed=3, per_shard=4,
                                       start=6)
    assert [p.name for p in paths] == ["00001.tar", "00002.tar"]
    files = [members(p) for p in paths]
    keys = [sorted({name.split(".")[0] for name in f}) for f in files]
    assert keys == [[f"shape{i:07d}" for i in range(6, 10)], ["shape0000010"]]
    for f in files:
        for key in {name.split(".")[0] for name in f}:
            meta = json.loads(f[f"{key}.json"])
            assert meta == {"caption": f[f"{key}.txt"].decode(), "colour": "yellow", "shape": meta["shape"],
                            "width": 16, "height": 16}
            assert (meta["shape"] in ("circle", "triangle")
                    and meta["caption"] == shapes.caption("yellow", meta["shape"]))
            image = Image.open(io.BytesIO(f[f"{key}.png"]))
            assert image.size == (16, 16)
            assert np.array_equal(np.asarray(image), np.asarray(shapes.shape_sample(int(key[5:]), shapes.combinations(
                {*hidden, ("yellow", "square")}), 16, 3)[2]))
    photos = shared_path("coco_mini")
    entries = json.loads((photos / "captions.json").read_text())
    shard = members(shapes.write_photo_shard(tmp_path / "p.tar", photos))
    for e in entries:
        key = Path(e["file_name"]).stem
        assert shard[f"{key}.txt"].decode() == e["captions"][0]
        assert json.loads(shard[f"{key}.json"]) == {"caption": e["captions"][0], "license": e["license"]}
        assert shard[f"{key}.jpg"] == (photos / "images" / e["file_name"]).read_bytes()
    assert len(shard) == 3 * len(entries)


def test_demo_settings_that_cannot_work_are_refused_before_anything_runs(tmp_path):
    """Too few held-out shapes for the training run's held-out loss (train.eval_batches global batches) failed at
    the training step, minutes in; so did a process count (nproc) that demo.yaml's TP=2 does not divide, and then
    with a traceback; an unknown colour in held_out is named."""
    from demo.run import main

    cases = {"valid_shapes=64": r"valid_shapes=64: the training run's held-out loss reads 4 global batches of 32 "
                                r"\(configs/train/demo.yaml\) from them; give at least 128$",
             "held_out=pink circle": r"held_out='pink circle': pink circle is not a colour",
             "image_size=30": r"image_size=30: the image tokenizer's 4x4 patches must give the 8x8 codes of "
                              r"configs/train/demo.yaml \(model.image_grid\): image_size=32$",
             "nproc=3": r"nproc=3 processes for configs/train/demo.yaml: world size 3 must be divisible by "
                        r"parallel.tp x parallel.pp = 2$"}
    for setting, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(["--set", f"out={tmp_path / 'out'}", setting])
        assert re.search(message, str(exit_.value.code)), exit_.value.code
    assert not (tmp_path / "out").exists()


def test_demo_settings_are_checked_against_the_output_folder_and_the_combinations(tmp_path):
    """check(): the boundary valid_shapes (4 global batches of 32) and a rerun with only another out= pass; an
    unknown arch or shape, a held_out item that is not "colour shape", held_out covering every combination,
    an out= naming a file, and an empty out= (the current folder: the demo's vq/ and sr/ went into the
    packages of those names) are refused; the saved settings of an older demo (a field it lacked) are not."""
    import yaml

    from demo.run import DemoConfig, check, check_same_run, held_out

    check(DemoConfig(out=str(tmp_path / "fresh"), valid_shapes=128))
    assert held_out(DemoConfig(held_out="yellow square, ,red circle")) == {("yellow", "square"), ("red", "circle")}
    (tmp_path / "a_file").write_text("")
    everything = ",".join(f"{c} {s}" for c, s in __import__("demo.shapes").shapes.combinations())
    cases = {"arch": (DemoConfig(arch="dalle"), r"arch='dalle' must be one of encoder_decoder, decoder_only"),
             "shape": (DemoConfig(held_out="red star"), r"red star is not a colour .* and shape"),
             "one word": (DemoConfig(held_out="yellow"), r"held_out='yellow': 'yellow' is not a colour and a shape"),
             "all": (DemoConfig(held_out=everything), r"held_out=.* leaves no combination to train on"),
             "file": (DemoConfig(out=str(tmp_path / "a_file")), r"out=.*a_file is a file, not a folder"),
             "under a file": (DemoConfig(out=str(tmp_path / "a_file" / "demo")),
                              r"out=.*a_file/demo: .*a_file is a file, not a folder"),
             "empty": (DemoConfig(out=""), r"out= is empty"),
             "a folder that is no demo's": (DemoConfig(out=str(tmp_path)),
                                            r"holds other files and no demo_config.yaml")}
    for name, (cfg, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            check(cfg)
    saved = tmp_path / "demo" / "demo_config.yaml"
    saved.parent.mkdir()
    settings = {k: v for k, v in __import__("dataclasses").asdict(DemoConfig(out="elsewhere")).items() if k != "fid"}
    saved.write_text(yaml.safe_dump(settings))
    check_same_run(DemoConfig(out=str(saved.parent)), saved)  # other out=, and `fid` unknown to that run: accepted
    check(DemoConfig(out=str(saved.parent)))
    with pytest.raises(ValueError, match=r"other settings \(shapes: 6000 there, 10 here\)"):
        check(DemoConfig(out=str(saved.parent), shapes=10))
    with pytest.raises(ValueError, match=r"holds a demo run with other settings \(seed: 0 there, 1 here; "
                                         r"shapes: 6000 there, 10 here\)"):
        check_same_run(DemoConfig(out=str(saved.parent), shapes=10, seed=1), saved)


def test_a_demo_whose_training_fails_ends_in_one_line_after_the_trainers_error(tmp_path, monkeypatch):
    """The training processes print their own error; the demo then ended in a RuntimeError's traceback."""
    import subprocess

    import demo.run as demo_run

    monkeypatch.setattr(demo_run, "run", lambda cfg: demo_run.train_parti(cfg, tmp_path, tmp_path, tmp_path,
                                                                          tmp_path / "spm.model"))
    monkeypatch.setattr(demo_run, "text_vocab_size", lambda *args: 64)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(args, 1))
    with pytest.raises(SystemExit) as exit_:
        demo_run.main(["--set", f"out={tmp_path / 'out'}", "preempt=false"])
    assert re.fullmatch(r"demo: training failed \(its error is above\); see .*/parti", str(exit_.value.code))


def test_the_decoder_only_demo_gives_its_text_head_a_vocabulary_that_tp_divides(tmp_path):
    """The demo's captions give an odd vocabulary (69 pieces at the defaults), and its decoder-only model's text
    head is split over demo.yaml's TP=2: `--set arch=decoder_only` was refused at its training step
    ('model.text_vocab_size=69 must be divisible by parallel.tp=2'), after the tokenizers had trained. The
    model's text vocabulary is the tokenizer's rounded up to a multiple of TP."""
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from demo import shapes
    from demo.run import ARCH_PRESETS, text_vocab_size
    from training.config import layout_of, load_config

    spm = train_sentencepiece([shapes.caption(c, s) for c, s in shapes.combinations()] * 20, 27,
                              tmp_path / "spm.model")
    assert TextTokenizer(spm).vocab_size == 27
    train_config = Path(__file__).parent.parent / "configs/train/demo.yaml"
    assert text_vocab_size(train_config, spm) == 28
    cfg = load_config(train_config, [f"model.preset={ARCH_PRESETS['decoder_only']}",
                                     f"model.text_vocab_size={text_vocab_size(train_config, spm)}"])
    assert cfg.parallel.tp == 2 and cfg.model.text_loss_weight > 0
    layout_of(cfg, world_size=2)  # (a ConfigError at 27)


def test_a_rerun_continues_the_image_tokenizer_and_the_upsampler_from_their_checkpoints(tmp_path, monkeypatch):
    """A stop during the image tokenizer's or the upsampler's training (SIGTERM, a SLURM preemption) saves a
    checkpoint and says "run again to continue"; the rerun trained them from step 0 again (run() without
    resume()). Each trainer is now resumed before it runs (the trainers themselves stand in here)."""
    import demo.run as demo_run

    calls = []

    def recording(name):
        class Trainer:
            def __init__(self, cfg, *args):
                calls.append((name, "init"))

            def resume(self):
                calls.append((name, "resume"))

            def run(self):
                calls.append((name, "run"))
        return Trainer

    monkeypatch.setattr(demo_run, "VQTrainer", recording("vq"))
    monkeypatch.setattr(demo_run, "SRTrainer", recording("sr"))
    cfg = demo_run.DemoConfig(out=str(tmp_path), sr_images=2, image_size=8)
    demo_run.train_image_tokenizer(cfg, tmp_path, "unused")
    demo_run.train_upsampler(cfg, tmp_path, tmp_path / "vq" / "export.pt")
    assert calls == [(n, step) for n in ("vq", "sr") for step in ("init", "resume", "run")]


def test_sample_prompts_measures_each_sample_against_its_prompt(tmp_path, monkeypatch):
    """sample_prompts(): one row per sample file, its measured colour and shape each compared with the prompt's
    (the sampler stands in: the first sample of a prompt is what it asks for, the second another shape)."""
    import json
    import random

    import demo.run as demo_run
    from demo import shapes

    def fake_generate(model, vq, text_tok, prompts, out, cfg, samples_per_prompt, seed, batch_size, upsampler):
        out.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(prompts):
            other = next(s for s in shapes.SHAPES if s != p["shape"])
            files = [f"{i:05d}_{k}.png" for k in range(samples_per_prompt)]
            for k, (name, shape) in enumerate(zip(files, (p["shape"], other))):
                shapes.draw(p["colour"], shape, 32, random.Random(k)).save(out / name)
            (out / f"{i:05d}.json").write_text(json.dumps({**p, "files": files}))

    monkeypatch.setattr(demo_run, "generate", fake_generate)
    prompts = demo_run.demo_prompts(demo_run.DemoConfig())[:3]
    rows = demo_run.sample_prompts(None, None, None, prompts, tmp_path, demo_run.DemoConfig(samples_per_prompt=2))
    assert [(r["file"], r["colour_ok"], r["shape_ok"]) for r in rows] == [
        (f"{i:05d}_{k}.png", True, k == 0) for i in range(3) for k in range(2)]
    assert [r["seen_colour"] for r in rows] == ["red"] * 6 and rows[0]["seen_shape"] == "circle"


def test_demo_help_names_the_command(capsys):
    """--help's usage line is the command a user types, not argparse's "__main__.py" under `python -m demo`."""
    from demo.run import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m demo [-h]")


def test_a_demo_rerun_reuses_the_fid_of_unchanged_samples(tmp_path, monkeypatch):
    """demo_fid(): a rerun into a finished folder takes each FID from the fid.json written after its images
    (Inception is the whole of a rerun's time otherwise); a folder whose images are newer (regenerated) or
    another number of them is measured again."""
    import json
    import os
    import random

    import demo.run as demo_run
    from demo import shapes

    real, out = tmp_path / "fid_real", tmp_path / "out"
    for folder in (real, out / "samples", out / "samples_before_training"):
        folder.mkdir(parents=True)
        for i in range(3):
            shapes.draw("red", "circle", 8, random.Random(i)).save(folder / f"{i:05d}.png")
    measured = []

    def fake_fid(real_folder, fake):
        measured.append(fake.name)
        result = {"fid": 1.0 + len(measured), "name": "FID-3/3", "warning": None, "fake_images": 3, "real_images": 3}
        (fake / "fid.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(demo_run, "fid", fake_fid)
    first = demo_run.demo_fid(real, out)
    assert measured == ["samples", "samples_before_training"]
    assert demo_run.demo_fid(real, out) == first and len(measured) == 2  # a rerun: both reused
    later = (out / "samples" / "fid.json").stat().st_mtime + 5
    os.utime(out / "samples" / "00001.png", (later, later))  # a regenerated sample
    (out / "samples_before_training" / "00002.png").unlink()  # fewer samples than measured
    again = demo_run.demo_fid(real, out)
    assert measured[2:] == ["samples", "samples_before_training"] and again["trained"] == 4.0


def test_demo_data_step_writes_the_sets_it_names_and_skips_them_on_a_rerun(tmp_path):
    """make_data(): the training shards (no held-out combination) and the photo shard behind the first
    pattern, the held-out loss's shards (keys after the training set's) behind the second; a rerun rewrites
    nothing."""
    import io
    import tarfile

    from data_pipeline.laion import expand_shards
    from demo import shapes
    from demo.run import DemoConfig, make_data

    cfg = DemoConfig(out=str(tmp_path), shapes=1500, valid_shapes=3, image_size=8, held_out="yellow square")
    pattern, valid_pattern = make_data(cfg, tmp_path)
    train, valid = expand_shards(pattern), expand_shards(valid_pattern)
    assert ([p.name for p in train] == ["00000.tar", "00001.tar", "00002.tar"]
            and [p.name for p in valid] == ["00001.tar"])

    def samples(path):
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    captions = [v.decode() for p in train[:2] for k, v in samples(p).items() if k.endswith(".txt")]
    assert len(captions) == 1500 and shapes.caption("yellow", "square") not in captions
    assert len([k for k in samples(train[2]) if k.endswith(".jpg")]) == 17  # the shipped photos
    assert sorted(k for k in samples(valid[0]) if k.endswith(".png")) == [
        f"shape{i:07d}.png" for i in (1500, 1501, 1502)]
    stamps = {p: p.stat().st_mtime_ns for p in train + valid}
    assert make_data(cfg, tmp_path) == (pattern, valid_pattern)
    assert {p: p.stat().st_mtime_ns for p in train + valid} == stamps
    assert Image.open(io.BytesIO(samples(valid[0])["shape0001500.png"])).size == (8, 8)


def test_demo_report_helpers():
    """agreement() (a sample counts for "both" only with colour and shape right; none: only the count), the prompts
    (every combination once, the held-out ones marked), and the labels the report and its plot carry."""
    from types import SimpleNamespace

    from demo.run import DemoConfig, agreement, demo_prompts, layout_label, loss_label, preemption_label

    rows = [{"colour_ok": c, "shape_ok": s} for c, s in ((True, True), (True, False), (False, True), (False, False))]
    assert agreement(rows) == {"samples": 4, "colour": 0.5, "shape": 0.5, "both": 0.25}
    assert agreement(rows[:3]) == {"samples": 3, "colour": 2 / 3, "shape": 2 / 3, "both": 1 / 3}
    assert agreement(rows[:2]) == {"samples": 2, "colour": 1.0, "shape": 0.5, "both": 0.5}
    assert agreement(rows[:1]) == {"samples": 1, "colour": 1.0, "shape": 1.0, "both": 1.0}
    assert agreement([]) == {"samples": 0}  # (held_out= empty: no fractions, not 0%)
    prompts = demo_prompts(DemoConfig(held_out="yellow square,blue triangle"))
    assert len(prompts) == 12 and prompts[0] == {"prompt": "a red circle on a white background", "colour": "red",
                                                 "shape": "circle", "held_out": False}
    assert sorted((p["colour"], p["shape"]) for p in prompts if p["held_out"]) == [("blue", "triangle"),
                                                                                   ("yellow", "square")]
    assert preemption_label({"stopped_at_step": 81, "steps": 160}) == "stopped at step 81 and resumed"
    assert preemption_label({}) == "not stopped"
    assert loss_label(SimpleNamespace(text_loss_weight=0)) == "loss (image-token cross-entropy)"
    assert (loss_label(SimpleNamespace(text_loss_weight=0.1))
            == "loss (0.9 x image-token + 0.1 x caption-token cross-entropy)")
    layouts = {(2, 1, 2): "TP=2", (1, 1, 2): "DP=2", (2, 1, 4): "DP=2 x TP=2", (1, 2, 4): "DP=2 x PP=2",
               (2, 2, 4): "TP=2 x PP=2", (1, 1, 1): "one process"}
    for (tp, pp, nproc), label in layouts.items():
        assert layout_label(SimpleNamespace(tp=tp, pp=pp), nproc) == label


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo with SMALL settings (encoder-decoder): (its output folder, its results)."""
    from demo.run import DemoConfig, run

    out = tmp_path_factory.mktemp("demo")
    return out, run(load_typed(DemoConfig, None, [f"out={out}", *SMALL]))


def test_demo_learns_the_prompted_colour_and_reports(demo):
    out, results = demo
    trained, before = results["trained"]["all"], results["before_training"]["all"]
    assert results["model"] == {"arch": "encoder_decoder", "preset": "parti-tiny"}
    assert trained["samples"] == before["samples"] == 12 * 8
    assert trained["colour"] >= 0.8, results  # 4 colours: chance is 25%
    assert before["colour"] <= 0.5, results
    assert results["fid"]["name"] == "FID-96/32" and results["fid"]["trained"] < results["fid"]["before_training"]
    # The last stage: the samples upsampled x2, by an upsampler that beats bicubic on unseen shapes.
    assert results["upsampler"]["valid_psnr"] > results["upsampler"]["valid_psnr_bicubic"], results["upsampler"]
    assert Image.open(out / "samples_upsampled" / "00000_0.png").size == (64, 64)
    # It was stopped half way (the STOP file, as a SLURM preemption), resumed from that checkpoint (the second
    # segment of the run's config history starts there, not at step 0), and finished, each step logged once.
    stopped = results["training"]["stopped_at_step"]
    assert 80 <= stopped < 160
    history = sorted(p.name for p in (out / "parti" / "config_history").iterdir())
    assert history == ["segment_001_step_00000000.yaml", f"segment_002_step_{stopped:08d}.yaml"], history
    rows = [json.loads(line) for line in (out / "parti" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(10, 161, 10))
    # The held-out loss (other drawings of the training combinations, never trained on), at steps 100 and 160:
    # far below a uniform guess over the 64 codes and near the training loss (2.5 epochs of 2000 shapes).
    held_out = {row["step"]: row["valid_loss"] for row in rows if "valid_loss" in row}
    assert sorted(held_out) == [100, 160]
    assert held_out[160] < math.log(64) - 1 and abs(held_out[160] - rows[-1]["loss"]) < 0.5, (held_out, rows[-1])
    # The report shows the loss curve, reconstructions and sample grids, all files beside it.
    report = (out / "report.html").read_text()
    images = [part.split('"')[0] for part in report.split('src="')[1:]]
    assert {"loss.png", "reconstructions.png", "grid_trained.png", "grid_before_training.png",
            "grid_upsampled.png"} <= set(images)
    assert all((out / name).stat().st_size > 1000 for name in images)
    assert "held out" in report and "FID" in report and "trained with TP=2 on" in report


def test_a_rerun_into_the_demos_folder_with_other_settings_is_refused(demo):
    """Finished steps are skipped on a rerun: arch=decoder_only into the encoder-decoder demo's folder reused its
    trained model and labelled the report dalle-tiny. Refused before anything runs, naming what differs."""
    from demo.run import main

    before = (demo[0] / "demo_config.yaml").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["--set", f"out={demo[0]}", *SMALL, "arch=decoder_only"])
    assert re.fullmatch(rf"config error: out={re.escape(str(demo[0]))} holds a demo run with other settings \(arch: "
                        r"'encoder_decoder' there, 'decoder_only' here\); .* use another out= .*",
                        str(exit_.value.code))
    assert (demo[0] / "demo_config.yaml").read_text() == before


def test_decoder_only_demo_learns_the_prompted_colour(demo, tmp_path):
    """--set arch=decoder_only: dalle-tiny on the same data, tokenizers and code shards (the encoder-decoder
    demo's finished steps, linked in: the demo skips them) learns colour from the caption as well. Trained
    with data parallelism over the 2 processes (the demo's config with tp 1, the same global batch): 1.5x
    the samples/s of TP=2 on 2 CPU cores; the encoder-decoder demo shows TP=2, tests/test_decoder_only.py
    checks the decoder-only model at TP=2 against DP=2. Not stopped half way (preempt=false, ~15 s less) and
    no FID (fid=false, ~25 s less): the encoder-decoder demo shows both."""
    import yaml

    from demo.run import DemoConfig, run

    for step in ("laion", "laion_valid", "vq", "sr", "sr_data", "tok", "codes", "codes_valid", "fid_real"):
        (tmp_path / step).symlink_to(demo[0] / step)
    train_config = yaml.safe_load((Path(__file__).parent.parent / "configs/train/demo.yaml").read_text())
    train_config["parallel"]["tp"], train_config["train"]["micro_batch_size"] = 1, 16
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_config))
    overrides = [f"out={tmp_path}", "arch=decoder_only", f"train_config={tmp_path / 'train.yaml'}", "preempt=false",
                 *SMALL, "fid=false"]
    results = run(load_typed(DemoConfig, None, overrides))
    assert results["model"] == {"arch": "decoder_only", "preset": "dalle-tiny"}
    assert results["trained"]["all"]["colour"] >= 0.8, results
    assert results["before_training"]["all"]["colour"] <= 0.5, results
    report = (tmp_path / "report.html").read_text()
    assert "model.arch=decoder_only" in report and "trained with DP=2 on" in report
    assert results["training"] == {} and results["fid"] is None  # (preempt=false, fid=false)
    assert "FID of the trained model" not in report
