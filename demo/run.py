"""The main job: the whole system end to end on a small synthetic task, ending in an HTML report that shows
whether the model learned to draw what the caption says.

    python -m demo [--config my_demo.yaml] [--set train_steps=600 out=runs/demo2]   # (DemoConfig fields below)
    python -m demo --set arch=decoder_only out=runs/demo-dalle      # the DALL-E-style decoder-only model

Steps (each one the project's real code path, on CPU by default; a finished step is skipped on a rerun):
 1. data: LAION-style shards of captioned shapes ("a red circle on a white background"; some colour/shape
    combinations never shown) plus the shipped COCO photos, read in place;
 2. a small ViT-VQGAN trained on them, exported and frozen; Parti's last stage at this scale: a tiny WDSR
    upsampler (x2) trained on shapes drawn at twice the size and the photos, PSNR against bicubic measured;
 3. a SentencePiece model trained on the captions; pre-tokenization of all shards into code shards;
 4. parti-tiny (arch=decoder_only: dalle-tiny, one causal stream of caption and image tokens) trained with
    tensor parallelism 2 on 2 processes (torchrun), stopped half way through the STOP file (as a SLURM
    preemption does), resumed from its checkpoint (preempt=false: not stopped), exported;
 5. guided sampling for every colour/shape prompt, the held-out combinations included (also upsampled), and
    for the same model before training;
 6. report.html: loss curve, VQ reconstructions, a sample grid per prompt, samples before and after
    upsampling, colour/shape agreement measured on each sample (demo/shapes.py), FID of the samples against
    unseen real shape images.
"""
from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common.cli import command, config_parser
from common.config import ConfigError, load_typed
from data_pipeline.images import FilterConfig
from data_pipeline.laion import expand_shards
from data_pipeline.pretokenize import pretokenize
from data_pipeline.shared_data import shared_path
from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
from data_pipeline.train_text_tokenizer import shard_captions
from demo import shapes
from evaluation.fid import fid, image_files
from evaluation.generate import (
    gather_metadata,
    generate,
    load_for_sampling,
    load_upsampler_for_sampling,
    to_pil,
    upsampled_folder,
)
from evaluation.report import image_grid, image_html, line_plot, table_html, write_html
from evaluation.sampling import SamplingConfig
from model_parallel.layout import ParallelLayout
from model_parallel.model import PartiModel
from model_parallel.state import child_environment
from sr.config import SRConfig
from sr.train import SRTrainer
from training.config import load_config
from training.export import export
from vq.config import VQConfig
from vq.tokenizer import load_image_tokenizer
from vq.train import VQTrainer


@dataclass
class DemoConfig:
    """Sizes of the end-to-end demo (the defaults run in about ten minutes on 2 CPU cores)."""

    out: str = "runs/demo"
    """Output folder (steps already finished there are skipped)."""
    seed: int = 0
    """Seed of the data, the tokenizer and the model."""
    image_size: int = 32
    """Side of the training images (and of the samples)."""
    shapes: int = 6000
    """Captioned shape images for training."""
    held_out: str = "yellow square,blue triangle"
    """Colour/shape combinations never shown in training, comma separated."""
    valid_shapes: int = 256
    """Captioned shape images of the training combinations kept out of training (other drawings): the training
    run's held-out loss (train.eval_batches=4 global batches of them)."""
    eval_interval: int = 100
    """Training steps between held-out losses."""
    vq_steps: int = 1500
    """Image tokenizer training steps."""
    vq_width: int = 64
    """Image tokenizer width (ViT-VQGAN, 2 layers, 4x4 patches -> 8x8 codes)."""
    codebook_size: int = 64
    """Image tokenizer codebook size (= the Parti model's image vocabulary)."""
    text_vocab: int = 160
    """SentencePiece vocabulary size."""
    arch: str = "encoder_decoder"
    """The model family: encoder_decoder (Parti: parti-tiny) or decoder_only (DALL-E: dalle-tiny)."""
    train_config: str = "configs/train/demo.yaml"
    """The training config (demo.yaml: TP=2); the demo sets its model preset (by `arch`), data and vocabulary sizes."""
    train_steps: int = 1000
    """Parti training steps."""
    preempt: bool = True
    """Stop the training half way (the STOP file, as a SLURM preemption) and resume it from its checkpoint."""
    nproc: int = 2
    """Training processes (torchrun)."""
    samples_per_prompt: int = 4
    """Samples per colour/shape prompt."""
    guidance_scale: float = 3.0
    """Classifier-free guidance scale for the samples."""
    fid_real: int = 96
    """Unseen real shape images the samples are compared with (FID)."""
    fid: bool = True
    """Compute the FID (Inception on every sample and real image: ~25 s of the sampling step on 2 CPU cores)."""
    sr_images: int = 1000
    """Shapes drawn at twice image_size for the upsampler (plus the shipped photos)."""
    sr_steps: int = 600
    """Upsampler training steps (the tiny WDSR preset, x2)."""


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


ARCH_PRESETS = {"encoder_decoder": "parti-tiny", "decoder_only": "dalle-tiny"}
"""The demo's model preset for each model.arch."""
EVAL_BATCHES = 4
"""Global batches of the held-out shapes in each held-out loss of the training run (train.eval_batches)."""
VQ_PATCH = 4
"""The image tokenizer's patch side: image_size / VQ_PATCH codes a side, the training config's model.image_grid."""


def check(cfg: DemoConfig) -> None:
    """A ValueError naming the first field that makes no sense (or that the output folder's run does not share)."""
    if cfg.arch not in ARCH_PRESETS:
        raise ValueError(f"arch={cfg.arch!r} must be one of {', '.join(ARCH_PRESETS)}")
    out = Path(cfg.out)
    if not cfg.out.strip():  # (Path("") is the current folder: its vq/ and sr/ would take the demo's runs)
        raise ValueError("out= is empty: name the demo's output folder")
    file = next((f for f in (out, *out.parents) if f.exists() and not f.is_dir()), None)
    if file is not None:
        raise ValueError(f"out={cfg.out}: {file} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "demo_config.yaml").is_file():
        raise ValueError(f"out={cfg.out} holds other files and no demo_config.yaml (not a demo's folder): "
                         "give an empty or new folder")
    if not shapes.combinations(held_out(cfg)):
        raise ValueError(f"held_out={cfg.held_out!r} leaves no combination to train on")
    check_same_run(cfg, Path(cfg.out) / "demo_config.yaml")
    train = load_config(cfg.train_config)
    try:  # (else each training process refuses it, minutes in)
        ParallelLayout.of(train.parallel, cfg.nproc).check(micro_batch=train.train.micro_batch_size,
                                                          global_batch=train.train.global_batch_size)
    except ConfigError as e:
        raise ValueError(f"nproc={cfg.nproc} processes for {cfg.train_config}: {e}") from None
    batch, grid = train.train.global_batch_size, train.model.image_grid
    if cfg.image_size != VQ_PATCH * grid:  # (else pre-tokenization refuses the codes' grid, minutes in)
        raise ValueError(f"image_size={cfg.image_size}: the image tokenizer's {VQ_PATCH}x{VQ_PATCH} patches must give "
                         f"the {grid}x{grid} codes of {cfg.train_config} (model.image_grid): image_size="
                         f"{VQ_PATCH * grid}")
    if cfg.valid_shapes < EVAL_BATCHES * batch:  # (else the training step refuses them, minutes in)
        raise ValueError(f"valid_shapes={cfg.valid_shapes}: the training run's held-out loss reads {EVAL_BATCHES} "
                         f"global batches of {batch} ({cfg.train_config}) from them; give at least "
                         f"{EVAL_BATCHES * batch}")


def held_out(cfg: DemoConfig) -> set[tuple[str, str]]:
    pairs = {tuple(item.split()) for item in cfg.held_out.split(",") if item.strip()}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"held_out={cfg.held_out!r}: {' '.join(pair)!r} is not a colour and a shape "
                             "(e.g. 'yellow square')")
    for colour, shape in pairs:
        if colour not in shapes.COLOURS or shape not in shapes.SHAPES:
            raise ValueError(f"held_out={cfg.held_out!r}: {colour} {shape} is not a colour "
                             f"({', '.join(shapes.COLOURS)}) and shape ({', '.join(shapes.SHAPES)})")
    return pairs


def make_data(cfg: DemoConfig, out: Path) -> tuple[str, str]:
    """Step 1: the LAION-style shards, and those held out of training; returns their brace patterns."""
    laion, valid = out / "laion", out / "laion_valid"
    if not (laion / "done").exists():
        paths = shapes.write_shapes_shards(laion, cfg.shapes, cfg.image_size, held_out(cfg), cfg.seed)
        shapes.write_photo_shard(laion / f"{len(paths):05d}.tar", shared_path("coco_mini"))
        (laion / "done").write_text(f"{len(paths) + 1}\n")
    if not (valid / "done").exists():  # the drawings after the training set's (same seed, later indices)
        paths = shapes.write_shapes_shards(valid, cfg.valid_shapes, cfg.image_size, held_out(cfg), cfg.seed,
                                           start=cfg.shapes)
        (valid / "done").write_text(f"{paths[0].stem} {paths[-1].stem}\n")  # (named by their first index)
    count = int((laion / "done").read_text())
    first, last = (valid / "done").read_text().split()
    return str(laion / f"{{00000..{count - 1:05d}}}.tar"), str(valid / f"{{{first}..{last}}}.tar")


def train_image_tokenizer(cfg: DemoConfig, out: Path, pattern: str) -> Path:
    """Step 2: a small ViT-VQGAN (l2 + codebook losses: enough for flat colours), exported to vq/export.pt."""
    export = out / "vq" / "export.pt"
    if not export.is_file():
        vq_cfg = load_typed(VQConfig, None, [
            "model.layers=2", f"model.width={cfg.vq_width}", f"model.image_size={cfg.image_size}",
            f"model.patch={VQ_PATCH}", "model.code_dim=16", f"model.codebook_size={cfg.codebook_size}",
            "model.dead_code_steps=50",
            "loss.perceptual=0", "loss.adversarial=0", "loss.logit_laplace=0", f"train.steps={cfg.vq_steps}",
            "train.batch_size=32", "train.lr=2e-3", f"train.seed={cfg.seed}", "train.log_interval=50",
            f"train.eval_interval={cfg.vq_steps}", f"train.save_interval={cfg.vq_steps}"])
        trainer = VQTrainer(vq_cfg, pattern, out / "vq")
        trainer.resume()  # (from the checkpoint a stopped or killed run left there; none: from step 0)
        trainer.run()
    return export


def train_upsampler(cfg: DemoConfig, out: Path, vq_path: Path) -> Path:
    """Step 2b: a tiny WDSR x2 (image_size -> 2 x image_size) on shapes drawn at the larger size and the
    photos, its inputs the image tokenizer's reconstructions of them at image_size (what it upsamples in
    generation, as Parti trains it), evaluated on unseen shapes against bicubic upsampling; exported to
    sr/export.pt."""
    export, data, side = out / "sr" / "export.pt", out / "sr_data", 2 * cfg.image_size
    if not export.is_file():
        if not (data / "done").exists():
            count = len(shapes.write_shapes_shards(data / "train", cfg.sr_images, side, seed=cfg.seed + 2))
            shapes.write_photo_shard(data / "train" / f"{count:05d}.tar", shared_path("coco_mini"))
            shapes.write_shapes_shards(data / "val", 16, side, seed=cfg.seed + 3)
            (data / "done").write_text(f"{count + 1}\n")
        count = int((data / "done").read_text())
        sr_cfg = load_typed(SRConfig, None, [
            "model.preset=tiny", f"train.crop={side}", f"train.resize={side}", f"train.tokenizer={vq_path}",
            f"train.steps={cfg.sr_steps}", "train.batch_size=16",
            "train.lr=1e-3", f"train.seed={cfg.seed}", "train.log_interval=50", f"train.eval_interval={cfg.sr_steps}",
            f"train.save_interval={cfg.sr_steps}"])
        trainer = SRTrainer(sr_cfg, str(data / "train" / f"{{00000..{count - 1:05d}}}.tar"), out / "sr",
                            str(data / "val" / "00000.tar"))
        trainer.resume()
        trainer.run()
    return export


def tokenize(cfg: DemoConfig, out: Path, pattern: str, valid_pattern: str, vq_path: Path) -> tuple[Path, Path, Path]:
    """Step 3: SentencePiece on the training captions, then pre-tokenization into code shards (the held-out
    shards into their own folder, with the same tokenizers)."""
    spm = out / "tok" / "spm.model"
    if not spm.is_file():
        train_sentencepiece(shard_captions(pattern, Counter()), cfg.text_vocab, spm)
    folders = []
    for shards, codes in ((pattern, out / "codes"), (valid_pattern, out / "codes_valid")):
        manifest = codes / "manifest.json"
        if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
            pretokenize(expand_shards(shards), codes, load_image_tokenizer(vq_path), TextTokenizer(spm, 32),
                        FilterConfig(image_size=cfg.image_size, min_size=cfg.image_size))
        folders.append(codes)
    return spm, folders[0], folders[1]


class TrainingFailed(RuntimeError):
    """The training processes ended in an error (which they printed): the demo's one line after it."""


def text_vocab_size(train_config: str | Path, spm: Path) -> int:
    """model.text_vocab_size for the captions of `spm`: its ids, rounded up to a multiple of the training config's
    parallel.tp, which must divide the decoder-only model's text head (split over the vocabulary; the demo's
    captions give an odd count, 69 at the defaults). The ids past the tokenizer's are never a target."""
    tp = load_config(train_config).parallel.tp
    return -(-TextTokenizer(spm).vocab_size // tp) * tp


def train_parti(cfg: DemoConfig, out: Path, codes: Path, valid_codes: Path, spm: Path) -> Path:
    """Step 4: torchrun training (demo.yaml: TP=2), stopped through the STOP file half way and resumed (unless
    preempt=false), its held-out loss measured on `valid_codes` every eval_interval steps; exported."""
    run_dir = out / "parti"
    if (run_dir / "export" / "model.safetensors").is_file():
        return run_dir
    overrides = [f"model.preset={ARCH_PRESETS[cfg.arch]}", f"data.shards={codes}", f"train.steps={cfg.train_steps}",
                 f"train.seed={cfg.seed + 1234}", f"data.valid_shards={valid_codes}",
                 f"train.eval_interval={cfg.eval_interval}", f"train.eval_batches={EVAL_BATCHES}",
                 f"model.text_vocab_size={text_vocab_size(cfg.train_config, spm)}",
                 f"model.image_vocab_size={cfg.codebook_size}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
               "-m", "training.train", "--config", cfg.train_config, "--run-dir", str(run_dir), "--resume", "auto",
               "--set", *overrides]
    env = child_environment(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR",
                                                          "cuda" if torch.cuda.is_available() else "cpu"),
                            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    metrics, stop_at = run_dir / "metrics.jsonl", cfg.train_steps // 2
    if cfg.preempt and not metrics.is_file():  # a fresh run: stop it half way, as a preemption would
        log(f"training {cfg.train_config} ({cfg.train_steps} steps); it is stopped once step {stop_at} is logged "
            "(a STOP file: the trainers finish the step they are on and save) and resumed")
        proc = subprocess.Popen(command, env=env)
        while proc.poll() is None:
            if metrics.is_file() and any(json.loads(line)["step"] >= stop_at
                                         for line in metrics.read_text().splitlines()):
                (run_dir / "STOP").touch()
                break
            time.sleep(0.5)
        # After saving on request the trainers leave REQUEUE (and exit 0 under torchrun: common/preemption.py).
        if proc.wait() != 0 and not (run_dir / "REQUEUE").is_file():
            raise TrainingFailed(f"training failed (exit {proc.returncode}; its error is above); see {run_dir}")
        if (run_dir / "REQUEUE").is_file():  # absent when the run ended before the STOP file was seen
            stopped = int((run_dir / "REQUEUE").read_text().split()[1])
            (run_dir / "REQUEUE").unlink()
            (out / "training.json").write_text(json.dumps({"stopped_at_step": stopped, "steps": cfg.train_steps}))
            log(f"stopped at step {stopped}; resuming from its checkpoint")
    if subprocess.run(command, env=env).returncode != 0:
        raise TrainingFailed(f"training failed (its error is above); see {run_dir}")
    export(run_dir)
    return run_dir


def sample_prompts(model, vq, text_tok, prompts: list[dict], out: Path, cfg: DemoConfig, upsampler=None) -> list[dict]:
    """Generate into `out` (and upsampled into `<out>_upsampled` with an upsampler) and measure colour and shape
    of every sample; one row per sample."""
    from PIL import Image

    generate(model, vq, text_tok, prompts, out, SamplingConfig(guidance_scale=cfg.guidance_scale),
             cfg.samples_per_prompt, cfg.seed, batch_size=16, upsampler=upsampler)
    rows = []
    for meta in map(json.loads, gather_metadata(out, len(prompts)).read_text().splitlines()):
        for name in meta["files"]:
            colour, shape = shapes.measure(Image.open(out / name))
            rows.append({**meta, "file": name, "seen_colour": colour, "seen_shape": shape,
                         "colour_ok": colour == meta["colour"], "shape_ok": shape == meta["shape"]})
    return rows


def agreement(rows: list[dict]) -> dict:
    """The fractions of `rows` whose colour, shape and both were measured as prompted; of no rows, only the count
    (none measured: a 0% would read as a model that got every one wrong; the report's table leaves them blank)."""
    n = len(rows)
    if not n:
        return {"samples": 0}
    return {"samples": len(rows), "colour": sum(r["colour_ok"] for r in rows) / n,
            "shape": sum(r["shape_ok"] for r in rows) / n,
            "both": sum(r["colour_ok"] and r["shape_ok"] for r in rows) / n}


def demo_prompts(cfg: DemoConfig) -> list[dict]:
    hidden = held_out(cfg)
    return [{"prompt": shapes.caption(c, s), "colour": c, "shape": s, "held_out": (c, s) in hidden}
            for c, s in shapes.combinations()]


def evaluate(cfg: DemoConfig, out: Path, run_dir: Path, vq_path: Path, spm: Path, sr_path: Path) -> dict:
    """Step 5: samples of the trained model (also upsampled) and of the same model before training, measured;
    FID; the upsampler's PSNR against bicubic on unseen shapes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, vq, text_tok = load_for_sampling(run_dir / "export", vq_path, spm, device)  # bf16 on a GPU
    prompts = demo_prompts(cfg)
    trained = sample_prompts(model, vq, text_tok, prompts, out / "samples", cfg,
                             load_upsampler_for_sampling(sr_path, device))
    train_cfg = load_config(run_dir / "config.yaml")
    weights = next(model.parameters())  # the untrained model on the same device, in the same dtype
    untrained = PartiModel(model.cfg, init_seed=train_cfg.train.seed).to(weights.device, weights.dtype).eval()
    before = sample_prompts(untrained, vq, text_tok, prompts, out / "samples_before_training", cfg)
    real = out / "fid_real"  # unseen images of every combination (another seed than the training set)
    if not (real / "done").exists():
        real.mkdir(parents=True, exist_ok=True)
        for i in range(cfg.fid_real):
            shapes.shape_sample(i, shapes.combinations(), cfg.image_size, seed=cfg.seed + 1)[2].save(
                real / f"{i:05d}.png")
        (real / "done").touch()
    results = {"model": {"arch": model.cfg.arch, "preset": model.cfg.preset},
               "trained": {"all": agreement(trained), "held_out": agreement([r for r in trained if r["held_out"]]),
                           "seen": agreement([r for r in trained if not r["held_out"]])},
               "before_training": {"all": agreement(before)},
               "training": json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {},
               "upsampler": next(m for m in map(json.loads, reversed((out / "sr" / "metrics.jsonl").read_text()
                                                                      .splitlines())) if "valid_psnr" in m),
               "fid": demo_fid(real, out) if cfg.fid else None, "chance": {"colour": 1 / len(shapes.COLOURS),
                                                                     "shape": 1 / len(shapes.SHAPES)}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return {"results": results, "trained": trained, "before": before}


def demo_fid(real: Path, out: Path) -> dict:
    """The samples' FID and, as its baseline, the untrained model's: at these few small images FID is biased far
    upward (evaluation.fid's name, FID-n/m, and warning say so), so only the two side by side mean something."""
    trained, before = (earlier_fid(real, out / name) or fid(real, out / name)
                       for name in ("samples", "samples_before_training"))
    return {"name": trained["name"], "trained": trained["fid"], "before_training": before["fid"],
            "warning": trained["warning"]}


def earlier_fid(real: Path, fake: Path) -> dict | None:
    """The FID an earlier run into this folder left in `fake`/fid.json, if it still holds: written after every
    image there (fid() writes it last; a regenerated sample is newer) and over as many real and generated images
    as the folders hold now. A rerun then skips Inception (its finished steps are skipped; the real images are
    fixed by demo_config.yaml). None: compute it."""
    saved = fake / "fid.json"
    if not saved.is_file():
        return None
    result, images, reals = json.loads(saved.read_text()), image_files(fake), image_files(real)
    counts_hold = (result.get("fake_images"), result.get("real_images")) == (len(images), len(reals))
    newest = max((p.stat().st_mtime for p in images + reals), default=0.0)
    return result if counts_hold and saved.stat().st_mtime >= newest else None


def preemption_label(training: dict) -> str:
    return f"stopped at step {training['stopped_at_step']} and resumed" if training else "not stopped"


def loss_label(m) -> str:
    if m.text_loss_weight == 0:
        return "loss (image-token cross-entropy)"
    return f"loss ({1 - m.text_loss_weight:g} x image-token + {m.text_loss_weight:g} x caption-token cross-entropy)"


def layout_label(parallel, nproc: int) -> str:
    """How the run was split over its processes, as the report names it: "TP=2", "DP=2", "DP=2 x TP=2"."""
    dp = nproc // (parallel.tp * parallel.pp)
    parts = [f"{name}={n}" for name, n in (("DP", dp), ("TP", parallel.tp), ("PP", parallel.pp)) if n > 1]
    return " x ".join(parts) or "one process"


def write_report(cfg: DemoConfig, out: Path, run_dir: Path, vq_path: Path, evaluated: dict, timings: dict) -> Path:
    """Step 6: report.html and its pictures, all inside `out`."""
    from PIL import Image

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    preset, what = ARCH_PRESETS[cfg.arch], {"encoder_decoder": "Parti's encoder-decoder",
                                            "decoder_only": "a DALL-E-style decoder-only transformer"}[cfg.arch]
    run_config = load_config(run_dir / "config.yaml")
    layout = layout_label(run_config.parallel, cfg.nproc)
    held_out_rows = [m for m in metrics if m.get("valid_loss") is not None]
    line_plot(out / "loss.png", {f"training batches ({preset}, {layout})": ([m["step"] for m in metrics],
                                                                            [m["loss"] for m in metrics]),
                                 **({"held-out shapes": ([m["step"] for m in held_out_rows],
                                                         [m["valid_loss"] for m in held_out_rows])}
                                    if held_out_rows else {})},
              "step", loss_label(run_config.model),
              preemption_label(evaluated["results"]["training"]))
    vq = load_image_tokenizer(vq_path)
    originals = [Image.open(p) for p in sorted((out / "fid_real").glob("*.png"))[:8]]
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in originals])
    with torch.no_grad():
        recon = vq.decode(vq.encode(pixels.float() / 127.5 - 1))
    image_grid(originals + [to_pil(r) for r in recon], columns=8, cell=64).save(out / "reconstructions.png")
    sections = []
    res = evaluated["results"]
    rows = [{"model": f"trained, {k.replace('_', '-')} prompts", **res["trained"][k]}
            for k in ("all", "seen", "held_out")]
    rows += [{"model": "before training", **res["before_training"]["all"]},
             {"model": "chance", "colour": res["chance"]["colour"], "shape": res["chance"]["shape"]}]
    sections.append(("Prompt/image agreement (fraction of samples whose measured colour/shape is the prompted one)",
                     table_html(rows, ["model", "samples", "colour", "shape", "both"])
                     + (f"<p>{res['fid']['name']} of the trained model's samples against {cfg.fid_real} unseen real "
                        f"shape images: {res['fid']['trained']:.1f}; the same model before training: "
                        f"{res['fid']['before_training']:.1f} (few images at 32x32: only the two side by side mean "
                        "something).</p>" if cfg.fid else "")))
    sections.append(("Training loss", image_html("loss.png")))
    sections.append(("Image tokenizer: originals (top) and reconstructions (bottom)",
                     image_html("reconstructions.png")))
    for name, samples in (("trained", evaluated["trained"]), ("before_training", evaluated["before"])):
        folder = "samples" if name == "trained" else "samples_before_training"
        grid = image_grid([out / folder / r["file"] for r in samples],
                          [f"{r['prompt'][2:].split(' on ')[0]}{' (held out)' if r['held_out'] else ''}: "
                           f"{r['seen_colour']} {r['seen_shape']}" for r in samples],
                          columns=cfg.samples_per_prompt * 2, cell=96)
        grid.save(out / f"grid_{name}.png")
        sections.append((f"Samples, {name.replace('_', ' ')} (prompt: measured colour and shape)",
                         image_html(f"grid_{name}.png")))
    firsts = [r for r in evaluated["trained"] if r["file"].endswith("_0.png")][:8]
    upsampled = upsampled_folder(out / "samples")
    image_grid([out / "samples" / r["file"] for r in firsts] + [upsampled / r["file"] for r in firsts],
               columns=len(firsts), cell=96).save(out / "grid_upsampled.png")
    up = res["upsampler"]
    title = (f"Last stage: samples ({cfg.image_size} px, top) and upsampled by the tiny WDSR "
             f"({2 * cfg.image_size} px, bottom)")
    psnr_note = (f"<p>On unseen shapes the upsampler reaches {up['valid_psnr']:.1f} dB PSNR, bicubic upsampling "
                 f"{up['valid_psnr_bicubic']:.1f} dB.</p>")
    sections.append((title, image_html("grid_upsampled.png") + psnr_note))
    sections.append(("Time per step in this invocation (s; 0: done by an earlier run into this folder)",
                     table_html([timings], digits=0)))
    intro = html.escape(f"{preset} ({what}, model.arch={cfg.arch}) trained with {layout} on {cfg.shapes} captioned "
                        f"shapes and {len(shapes.COLOURS)} colours x {len(shapes.SHAPES)} shapes (held out: "
                        f"{cfg.held_out}), plus the 17 shipped COCO photos; samples with classifier-free guidance "
                        f"{cfg.guidance_scale}. Config: demo_config.yaml, {run_dir.name}/config.yaml.")
    return write_html(out / "report.html", "End-to-end demo", sections, intro)


def check_same_run(cfg: DemoConfig, saved: Path) -> None:
    """ValueError when the output folder holds a demo run with other settings: its finished steps are skipped on a
    rerun, so a changed arch, size or step count would not apply, and the report would name settings that did
    not make its model."""
    import yaml

    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    changed = [f"{k}: {before[k]!r} there, {v!r} here" for k, v in asdict(cfg).items()
               if k != "out" and k in before and before[k] != v]
    if changed:
        raise ValueError(f"out={cfg.out} holds a demo run with other settings ({'; '.join(changed)}); its finished "
                         "steps would be skipped, not redone: use another out= (or remove that folder)")


def run(cfg: DemoConfig) -> dict:
    import yaml

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    timings, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        log(f"{name}: {timings[name]:.0f} s")

    pattern, valid_pattern = make_data(cfg, out)
    lap("data")
    vq_path = train_image_tokenizer(cfg, out, pattern)
    lap("image tokenizer")
    sr_path = train_upsampler(cfg, out, vq_path)
    lap("upsampler")
    spm, codes, valid_codes = tokenize(cfg, out, pattern, valid_pattern, vq_path)
    lap("text tokenizer + pretokenize")
    run_dir = train_parti(cfg, out, codes, valid_codes, spm)
    lap("parti training")
    evaluated = evaluate(cfg, out, run_dir, vq_path, spm, sr_path)
    lap("sampling + measurement" + (" + FID" if cfg.fid else ""))
    write_report(cfg, out, run_dir, vq_path, evaluated, timings)
    return evaluated["results"]


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__, where="DemoConfig in demo/run.py", example="train_steps=600 out=runs/demo2")
    parser.prog = "python -m demo"  # (argparse's default under -m: "__main__.py")
    args = parser.parse_args(argv)
    with command(errors=(ValueError,), label="config error"):
        cfg = load_typed(DemoConfig, args.config, args.set)
        check(cfg)
    with command(errors=(TrainingFailed,), label="demo"):
        res = run(cfg)
    t, b = res["trained"], res["before_training"]["all"]
    held = (f"held-out combinations {t['held_out']['colour']:.0%}" if t["held_out"]["samples"]
            else "no held-out combinations")
    log(f"{ARCH_PRESETS[cfg.arch]} ({cfg.arch}): colour agreement {t['all']['colour']:.0%} ({held}, before "
        f"training {b['colour']:.0%}, chance {res['chance']['colour']:.0%}); shape {t['all']['shape']:.0%}"
        + (f"; {res['fid']['name']} {res['fid']['trained']:.1f} (before training {res['fid']['before_training']:.1f})"
           if cfg.fid else ""))
    log(f"report: {Path(cfg.out) / 'report.html'}")


if __name__ == "__main__":
    main()
