"""Evaluation harnesses: PartiPrompts (CLIP score per category and challenge) and MS-COCO-30k (FID and CLIP
score), with results.json and an HTML report of image grids; with `model.upsampler` (Parti's last stage) the
images are also upsampled, and `benchmark.resolution=upsampled` scores those.

    python -m evaluation.benchmark --config configs/eval/partiprompts.yaml \
        --set model.checkpoint=runs/x/export model.vq=vq.pt model.text_tokenizer=spm.model \
              clip.model=ViT-L-14 clip.weights=/models/ViT-L-14.pt
    python -m evaluation.benchmark --config configs/eval/coco30k.yaml --set ... benchmark.real=/data/coco/val2014
    torchrun --nproc_per_node 8 -m evaluation.benchmark ...          # or: sbatch slurm/eval.sbatch CONFIG --set ...

Every process generates its slice of the prompts into <out>/images (resumable: a rerun continues where a
preempted one stopped); rank 0 then scores: CLIP score of every kept image against its prompt, FID against
the real folder (coco30k), and writes <out>/results.json, <out>/report.html and <out>/grids/*.png. The
resolved config is saved as <out>/eval_config.yaml.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import yaml
from PIL import Image

from common.cli import command, config_parser
from data_pipeline.shared_data import resolve
from evaluation.clip_score import ClipScorer, read_metadata, score_samples
from evaluation.config import EvalConfig, load_eval_config
from evaluation.fid import fid
from evaluation.generate import (
    WAIT_FOR_PEERS_MINUTES,
    gather_metadata,
    generate,
    load_for_sampling,
    load_upsampler_for_sampling,
    upsampled_folder,
)
from evaluation.prompts import read_prompts
from evaluation.report import image_grid, image_html, table_html, write_html
from model_parallel.state import DeviceError, init_distributed, use_device


def group_scores(per_prompt: list[dict], key: str) -> list[dict]:
    """Mean CLIP score of the prompts grouped by a column (Category, Challenge)."""
    groups = defaultdict(list)
    for row in per_prompt:
        groups[row.get(key) or "(none)"].append(row["clip_score"])
    return [{key: name, "prompts": len(v), "clip_score": sum(v) / len(v)} for name, v in sorted(groups.items())]


def per_prompt_scores(clip: dict, metadata: list[dict]) -> list[dict]:
    """clip_score.json's per-image scores -> one row per prompt (mean over its kept images) with its columns."""
    scores = defaultdict(list)
    for row in clip["per_image"]:
        scores[row["index"]].append(row["score"])
    return [{**meta, "clip_score": sum(scores[meta["index"]]) / len(scores[meta["index"]])} for meta in metadata]


def grid_section(images: Path, grids: Path, name: str, rows: list[dict], count: int) -> tuple[str, str]:
    chosen = rows[:count]
    grid = image_grid([images / r["files"][0] for r in chosen], [r["prompt"] for r in chosen],
                      columns=min(4, len(chosen)), cell=160)
    file = grids / f"{''.join(c if c.isalnum() else '_' for c in name)}.png"
    grid.save(file)
    return name, image_html(f"grids/{file.name}")


def write_report(cfg: EvalConfig, out: Path, images: Path, results: dict, metadata: list[dict],
                 per_prompt: list[dict]) -> Path:
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    summary = {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
    sections = [("Summary", table_html([summary], digits=3))]
    if cfg.benchmark.name == "partiprompts" and per_prompt:
        for key in ("Category", "Challenge"):
            sections.append((f"CLIP score per {key.lower()}", table_html(results[f"per_{key.lower()}"], digits=2)))
    if "Category" in (metadata[0] if metadata else {}):
        by_category = defaultdict(list)
        for meta in metadata:
            by_category[meta["Category"]].append(meta)
        sections += [grid_section(images, grids, f"Samples: {name}", rows, cfg.benchmark.grid_prompts)
                     for name, rows in sorted(by_category.items())]
    elif metadata:
        sections.append(grid_section(images, grids, "Samples", metadata, cfg.benchmark.grid_prompts))
    reranked = cfg.clip.model and cfg.sampling.samples_per_prompt > 1
    intro = (f"Model {cfg.model.checkpoint}; sampling {vars(cfg.sampling)}; CLIP {cfg.clip.model or 'none'}. "
             + ("Samples reranked by CLIP score: the best is shown." if reranked else "The first sample is shown."))
    return write_html(out / "report.html", f"{cfg.benchmark.name} evaluation", sections, intro)


def score(cfg: EvalConfig, out: Path, scorer) -> dict:
    """Rank 0, after generation: CLIP score, FID, results.json and the report, on the images of
    benchmark.resolution (the detokenizer's, or the upsampler's)."""
    images = out / "images" if cfg.benchmark.resolution == "base" else upsampled_folder(out / "images")
    metadata = read_metadata(images)
    with Image.open(images / metadata[0]["files"][0]) as first:
        size = "x".join(map(str, first.size))
    results: dict = {"benchmark": cfg.benchmark.name, "prompts": len(metadata),
                     "resolution": f"{cfg.benchmark.resolution} ({size})"}
    per_prompt: list[dict] = []
    if scorer is not None:
        clip = score_samples(scorer, images)
        results.update(clip_score=clip["clip_score"], clip_images=clip["images"], clip_protocol=clip["protocol"])
        per_prompt = per_prompt_scores(clip, metadata)
        if cfg.benchmark.name == "partiprompts":
            results.update(per_category=group_scores(per_prompt, "Category"),
                           per_challenge=group_scores(per_prompt, "Challenge"))
    if cfg.benchmark.name == "coco30k":
        measured = fid(cfg.benchmark.real, images)
        results.update(fid=measured["fid"], fid_protocol=measured["protocol"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(cfg, out, images, results, metadata, per_prompt)
    return results


def run(cfg: EvalConfig) -> dict | None:
    import torch.distributed as dist


    device = use_device(cfg.benchmark.device, "benchmark.device")  # (before init_distributed touches CUDA)
    init_distributed(timeout_minutes=WAIT_FOR_PEERS_MINUTES)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.benchmark.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "eval_config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    prompts = read_prompts(resolve(cfg.benchmark.prompts))[: cfg.benchmark.limit or None]
    model, vq, text_tok = load_for_sampling(cfg.model.checkpoint, cfg.model.vq, cfg.model.text_tokenizer, device)
    upsampler = load_upsampler_for_sampling(cfg.model.upsampler, device) if cfg.model.upsampler else None
    scorer = ClipScorer.load(cfg.clip.model, cfg.clip.weights or None, device) if cfg.clip.model else None
    s = cfg.sampling
    generate(model, vq, text_tok, prompts, out / "images", s.per_code(), s.samples_per_prompt, s.seed, s.batch_size,
             rank, world, scorer if s.samples_per_prompt > 1 else None, s.keep, upsampler)  # reranked when there is a choice
    dist.barrier()
    if rank != 0:
        return None
    gather_metadata(out / "images")
    return score(cfg, out, scorer)


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__, where="configs/eval/").parse_args(argv)
    with command(errors=(ValueError, FileNotFoundError, DeviceError)):  # bad inputs, refused reruns (evaluation.generate)
        cfg = load_eval_config(args.config, args.set)
        results = run(cfg)
    if results is not None:
        shown = {k: round(v, 4) for k, v in results.items() if k in ("fid", "clip_score")}
        print(f"{cfg.benchmark.name}: {results['prompts']} prompts {shown}; report {Path(cfg.benchmark.out) / 'report.html'}")


if __name__ == "__main__":
    main()
