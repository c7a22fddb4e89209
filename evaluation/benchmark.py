r"""Evaluation harnesses: PartiPrompts (CLIP score per category and challenge) and MS-COCO-30k (FID and CLIP
score), with results.json and an HTML report of image grids; with `model.upsampler` (Parti's last stage) the
images are also upsampled, and `benchmark.resolution=upsampled` scores those.

    python -m evaluation.benchmark --config configs/eval/partiprompts.yaml \
        --set model.checkpoint=runs/x/export model.vq=vq.pt model.text_tokenizer=spm.model \
              clip.model=local-dir:/models/CLIP-ViT-L-14        # or clip.model=ViT-L-14 clip.weights=F clip.tag=openai
    python -m evaluation.benchmark --config configs/eval/coco30k.yaml --set ... benchmark.real=/data/coco/val2014
    torchrun --nproc_per_node 8 -m evaluation.benchmark ...          # or: sbatch slurm/eval.sbatch CONFIG --set ...

Every process generates its slice of the prompts into <out>/images (resumable: a rerun continues where a
preempted one stopped); rank 0 then scores: CLIP score of every kept image against its prompt, FID against
the real folder (coco30k), and writes <out>/results.json, <out>/report.html and <out>/grids/*.png. The
resolved config is saved as <out>/eval_config.yaml. Only this run's prompts are scored (a folder that an
earlier run with a larger benchmark.limit filled holds more).

What a number means is written next to it: FID's image counts (results.json `fid_real_images`,
`fid_fake_images`, the report and the printed line), a FID over fewer than 30,000 generated images named
`FID-N` with a warning (it is biased upward; not comparable with published COCO-30k FIDs), and, when each
prompt's kept image is the best of several by the same CLIP model that scores it (PartiPrompts' reranking),
`selected_by_same_model` with the unbiased mean over all samples, `clip_score_all_samples`.
"""
from __future__ import annotations

import html
import json
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import yaml

from common.cli import command, config_parser
from common.files import write_atomic
from data_pipeline.shared_data import resolve
from evaluation.clip_score import ClipScorer, all_samples_mean, check_clip, read_metadata, score_samples
from evaluation.config import EvalConfig, load_eval_config
from evaluation.fid import default_weights, fid, image_files, open_rgb
from evaluation.generate import (
    WAIT_FOR_PEERS_MINUTES,
    check_out_folder,
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


def grid_section(images: Path, grids: Path, name: str, rows: list[dict], count: int, number: int = 0
                 ) -> tuple[str, str]:
    """A section of the first `count` rows' images; its grid file is named by its `number` (a name made of the
    category's text collided for "Food & Drink" and "Food / Drink", and a long one was longer than a file name may
    be)."""
    chosen = rows[:count]
    grid = image_grid([open_rgb(images / r["files"][0]) for r in chosen], [r["prompt"] for r in chosen],  # (a damaged
                      # file: a ValueError naming it, as CLIP score and FID give, not PIL's OSError without a name)
                      columns=min(4, len(chosen)), cell=160)
    file = grids / f"samples_{number:03d}.png"
    grid.save(file)
    return name, image_html(f"grids/{file.name}")


def warnings_of(results: dict) -> list[str]:
    return [v for k, v in results.items() if k.endswith("_warning") and v]


def write_report(cfg: EvalConfig, out: Path, images: Path, results: dict, metadata: list[dict],
                 per_prompt: list[dict]) -> Path:
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    summary = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not k.endswith("_warning")}
    sections = [("Summary", table_html([summary], digits=3))]
    if cfg.benchmark.name == "partiprompts" and per_prompt:
        for key in ("Category", "Challenge"):
            sections.append((f"CLIP score per {key.lower()}", table_html(results[f"per_{key.lower()}"], digits=2)))
    if any("Category" in meta for meta in metadata):  # (a prompt without one, as group_scores: "(none)"; a row
        # of a .tsv short of its Category field, or a JSONL line without it, stopped the report after the whole run)
        by_category = defaultdict(list)
        for meta in metadata:
            by_category[meta.get("Category") or "(none)"].append(meta)
        sections += [grid_section(images, grids, f"Samples: {name}", rows, cfg.benchmark.grid_prompts, number)
                     for number, (name, rows) in enumerate(sorted(by_category.items()))]
    elif metadata:
        sections.append(grid_section(images, grids, "Samples", metadata, cfg.benchmark.grid_prompts))
    reranked = cfg.clip.model and cfg.sampling.samples_per_prompt > 1
    clip = cfg.clip.model or "none"
    intro = html.escape(f"Model {cfg.model.checkpoint}; sampling {vars(cfg.sampling)}; CLIP {clip}. "
                        + ("Samples reranked by CLIP score: the best is shown." if reranked
                           else "The first sample is shown."))  # (paths and names are text, not markup)
    intro += "".join(f"<br><b>Warning:</b> {html.escape(w)}" for w in warnings_of(results))
    return write_html(out / "report.html", f"{cfg.benchmark.name} evaluation", sections, intro)


def generated_size(images: Path, metadata: list[dict]) -> tuple[int, int]:
    """(width, height) of the generated images (the first one's)."""
    if not metadata:
        raise ValueError(f"{images / 'metadata.jsonl'} lists no prompts; expected those evaluation.generate wrote")
    return open_rgb(images / metadata[0]["files"][0]).size


def fid_results(cfg: EvalConfig, images: Path, metadata: list[dict], size: tuple[int, int]) -> dict:
    """coco30k: FID of the images `metadata` lists (this run's prompts) against benchmark.real, the real images
    centre-cropped to the generated size first (benchmark.real_center_crop), with both image counts."""
    real_size = None
    if cfg.benchmark.real_center_crop:
        if size[0] != size[1]:
            raise ValueError(f"benchmark.real_center_crop crops real images to the generated size, but the images "
                             f"in {images} are {size[0]}x{size[1]}, not square; set benchmark.real_center_crop=false")
        real_size = size[0]
    files = [images / name for meta in metadata for name in meta["files"]]
    measured = fid(resolve(cfg.benchmark.real), images, real_size=real_size, fake_files=files)
    return {"fid": measured["fid"], "fid_name": measured["name"], "fid_real_images": measured["real_images"],
            "fid_fake_images": measured["fake_images"], "fid_warning": measured["warning"],
            "fid_protocol": measured["protocol"]}


def clip_selection(cfg: EvalConfig, metadata: list[dict]) -> dict:
    """How the scored images were chosen. The best `keep` of `samples_per_prompt` by the CLIP model that also
    scores them (Parti's reranking) score higher than a random sample: the unbiased figure is the mean over all
    samples, which reranking scored (on the detokenizer's images) and each prompt's .json keeps."""
    s = cfg.sampling
    selected = bool(cfg.clip.model) and s.samples_per_prompt > 1 and 0 < s.keep < s.samples_per_prompt
    out = {"samples_per_prompt": s.samples_per_prompt, "keep": s.keep or s.samples_per_prompt,
           "selected_by_same_model": selected}
    mean = all_samples_mean(metadata)
    if selected and mean is not None:
        out["clip_score_all_samples"] = mean
        out["clip_warning"] = (f"clip_score is over the best {s.keep} of {s.samples_per_prompt} samples per prompt, "
                               "chosen by the same CLIP model (biased upward); clip_score_all_samples is the mean over "
                               "all samples" + (" (scored before upsampling)" if cfg.benchmark.resolution == "upsampled"
                                                else ""))
    return out


def score(cfg: EvalConfig, out: Path, scorer) -> dict:
    """Rank 0, after generation: CLIP score, FID, results.json and the report, on the images of
    benchmark.resolution (the detokenizer's, or the upsampler's)."""
    images = out / "images" if cfg.benchmark.resolution == "base" else upsampled_folder(out / "images")
    metadata = read_metadata(images)
    size = generated_size(images, metadata)
    results: dict = {"benchmark": cfg.benchmark.name, "prompts": len(metadata),
                     "resolution": f"{cfg.benchmark.resolution} ({size[0]}x{size[1]})"}
    per_prompt: list[dict] = []
    if scorer is not None:
        clip = score_samples(scorer, images, metadata=metadata)
        results.update(clip_score=clip["clip_score"], clip_images=clip["images"], **clip_selection(cfg, metadata),
                       clip_protocol=clip["protocol"])
        per_prompt = per_prompt_scores(clip, metadata)
        if cfg.benchmark.name == "partiprompts":
            results.update(per_category=group_scores(per_prompt, "Category"),
                           per_challenge=group_scores(per_prompt, "Challenge"))
    if cfg.benchmark.name == "coco30k":
        results.update(fid_results(cfg, images, metadata, size))
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    write_report(cfg, out, images, results, metadata, per_prompt)
    return results


def run(cfg: EvalConfig) -> dict | None:
    import torch.distributed as dist

    prompts = read_prompts(resolve(cfg.benchmark.prompts), cfg.benchmark.limit)  # (before minutes of model loading)
    check_out_folder(cfg.benchmark.out, "benchmark.out")
    if cfg.benchmark.name == "coco30k":  # what FID needs, before hours of generation
        try:
            image_files(resolve(cfg.benchmark.real))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"benchmark.real={cfg.benchmark.real}: {e}") from None
        if len(prompts) * (cfg.sampling.keep or cfg.sampling.samples_per_prompt) < 2:
            raise ValueError(f"coco30k: {len(prompts)} prompt(s) x "
                             f"{cfg.sampling.keep or cfg.sampling.samples_per_prompt}"
                             " image(s) each; FID needs at least 2 generated images (raise benchmark.limit)")
        default_weights()
    device = use_device(cfg.benchmark.device, "benchmark.device")  # (before init_distributed touches CUDA)
    # Small: a wrong file stops the run before minutes of loading. Read onto the CPU here and moved to the device
    # after init_distributed: loaded onto "cuda" before it sets each rank's GPU, every rank's upsampler went to GPU 0.
    upsampler = (load_upsampler_for_sampling(cfg.model.upsampler, "cpu", "model.upsampler=")
                 if cfg.model.upsampler else None)
    if cfg.clip.model:
        check_clip(cfg.clip.model, cfg.clip.weights or None, cfg.clip.tag or None, f"clip.model={cfg.clip.model}")
    init_distributed(timeout_minutes=WAIT_FOR_PEERS_MINUTES)
    if upsampler is not None:
        upsampler.to(device)  # (now "cuda" is this rank's GPU)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.benchmark.out)
    out.mkdir(parents=True, exist_ok=True)
    model, vq, text_tok = load_for_sampling(cfg.model.checkpoint, cfg.model.vq, cfg.model.text_tokenizer, device)
    scorer = (ClipScorer.load(cfg.clip.model, cfg.clip.weights or None, device, cfg.clip.tag or None)
              if cfg.clip.model else None)
    s = cfg.sampling
    generate(model, vq, text_tok, prompts, out / "images", s.per_code(), s.samples_per_prompt, s.seed, s.batch_size,
             rank, world, scorer if s.samples_per_prompt > 1 else None,  # reranked when there is a choice
             s.keep, upsampler, compile_decode=s.compile_decode)
    if rank == 0:  # (after generate's resume check: a refused rerun leaves the folder's config as it was)
        (out / "eval_config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    dist.barrier()
    if rank != 0:
        return None
    gather_metadata(out / "images", len(prompts))  # this run's prompts only (not a larger earlier limit's)
    return score(cfg, out, scorer)


def summary_line(cfg: EvalConfig, results: dict) -> str:
    """The printed result: each number under its honest name, FID with its image counts."""
    names = {"fid": results.get("fid_name", "fid")}
    shown = {names.get(k, k): round(v, 4) for k, v in results.items()
             if k in ("fid", "clip_score", "clip_score_all_samples")}
    counts = (f" ({results['fid_fake_images']} generated vs {results['fid_real_images']} real images)"
              if "fid" in results else "")
    return (f"{cfg.benchmark.name}: {results['prompts']} prompts {shown}{counts}; "
            f"report {Path(cfg.benchmark.out) / 'report.html'}")


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__, where="configs/eval/",
                         example="benchmark.limit=100 sampling.guidance_scale=3.0").parse_args(argv)
    # bad inputs, refused reruns (evaluation.generate)
    with command(errors=(ValueError, FileNotFoundError, DeviceError)):
        cfg = load_eval_config(args.config, args.set)
        results = run(cfg)
    if results is not None:
        print(summary_line(cfg, results))
        for warning in warnings_of(results):
            print(f"warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    main()
