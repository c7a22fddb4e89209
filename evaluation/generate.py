"""Generate images for a prompt file with an exported Parti model and a frozen VQ tokenizer.

    python -m evaluation.generate --checkpoint runs/x/export --vq runs/vq/export.pt --text-tokenizer tok/spm.model \
        --prompts ../shared/data/PartiPrompts.tsv --out samples/ [--samples-per-prompt 4] [--guidance-scale 1.2] \
        [--temperature 1.0 --top-k 0 --top-p 1.0] [--seed 0] [--batch-size 8] [--limit N] \
        [--clip ViT-L-14 --clip-weights clip.pt --keep 1]
    torchrun --nproc_per_node 8 -m evaluation.generate ...      # each process takes every 8th prompt

For prompt i it writes `{i:05d}_{r}.png` for its samples, then `{i:05d}.json` (the prompt and its other
columns, seed, settings, files); a rerun skips prompts whose .json exists. Seeds depend on (seed, i, k)
only, so the images do not depend on the number of processes or the batch size. On a GPU the model runs
in bf16 and draws from CUDA generators (the same seeds give other images than on CPU). With a CLIP model the
samples are reranked by CLIP score (r = 0 is the best; their scores go into the .json) and `--keep N` keeps
only the best N. At the end rank 0 gathers the .json files into metadata.jsonl.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.prompts import read_prompts
from evaluation.sampling import SamplingConfig, sample


def to_pil(image: torch.Tensor):
    """float [3, H, W] in [-1, 1] -> the uint8 PIL image that is saved (and scored)."""
    from PIL import Image

    return Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def save_png(image, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)


def finish_prompt(i: int, prompt: dict, images: list, out: Path, settings: dict, scorer=None, keep: int = 0) -> None:
    """Write prompt i's samples (best CLIP score first when a scorer is given, the best `keep` of them when
    keep > 0) and then its .json, which marks the prompt done."""
    order, scores = list(range(len(images))), None
    if scorer is not None:
        scores = scorer.score(images, [prompt["prompt"]] * len(images)).tolist()
        order.sort(key=lambda k: -scores[k])
    order = order[:keep or None]
    for r, k in enumerate(order):
        save_png(images[k], out / f"{i:05d}_{r}.png")
    meta = {**prompt, "index": i, **settings, "files": [f"{i:05d}_{r}.png" for r in range(len(order))],
            "sample_index": order}
    if scores is not None:
        meta.update(clip_scores=[scores[k] for k in order], all_clip_scores=scores, clip=scorer.protocol["weights"])
    (out / f"{i:05d}.json").write_text(json.dumps(meta))


def generate(model, vq, text_tok, prompts: list[dict], out: Path, cfg: SamplingConfig, samples_per_prompt: int = 1,
             seed: int = 0, batch_size: int = 8, rank: int = 0, world: int = 1, scorer=None, keep: int = 0) -> int:
    """Images for this rank's prompts that are not done yet; returns how many prompts it generated.
    With a CLIP scorer the samples of each prompt are reranked; keep > 0 keeps only the best ones."""
    out.mkdir(parents=True, exist_ok=True)
    if vq.grid * vq.grid != model.cfg.image_seq_len or vq.codebook_size > model.cfg.image_vocab_size:
        raise ValueError(f"the VQ tokenizer (grid {vq.grid}, {vq.codebook_size} codes) does not fit the model "
                         f"({model.cfg.image_seq_len} image tokens, vocabulary {model.cfg.image_vocab_size})")
    todo = [i for i in range(rank, len(prompts), world) if not (out / f"{i:05d}.json").exists()]
    device = next(model.parameters()).device
    jobs = [(i, k) for i in todo for k in range(samples_per_prompt)]
    settings = {"seed": seed, "sampling": asdict(cfg), "samples_per_prompt": samples_per_prompt}
    pending: dict[int, list] = {}  # prompt -> its decoded samples so far (a prompt may span two batches)
    with tqdm(total=len(jobs), desc="generate", unit="img", disable=rank != 0) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            text = torch.tensor([text_tok.encode(prompts[i]["prompt"])[0] for i, _ in batch], device=device)
            # A generator per image on the model's device: on a GPU the draws stay there (no host sync).
            generators = [torch.Generator(device).manual_seed(seed * 1_000_003 + i * 1_009 + k) for i, k in batch]
            codes = sample(model, text, cfg, generators)  # one batch through the KV cache, a generator per image
            images = vq.decode(codes.view(-1, vq.grid, vq.grid).to(next(vq.parameters()).device))
            for (i, k), image in zip(batch, images):
                pending.setdefault(i, []).append(to_pil(image))
                if k == samples_per_prompt - 1:
                    finish_prompt(i, prompts[i], pending.pop(i), out, settings, scorer, keep)
            bar.update(len(batch))
    return len(todo)


def gather_metadata(out: Path) -> Path:
    lines = [p.read_text() for p in sorted(out.glob("[0-9]*.json"))]
    (out / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return out / "metadata.jsonl"


def load_for_sampling(checkpoint, vq_path, text_tokenizer, device: str, dtype: torch.dtype | None = None):
    """The exported model (on `device`, in `dtype`: default bf16 on CUDA, fp32 on CPU), the frozen VQ
    tokenizer and the text tokenizer at the model's text length."""
    from data_pipeline.text_tokenizer import TextTokenizer
    from training.export import load_exported
    from vq.tokenizer import load_image_tokenizer

    model = load_exported(checkpoint, device, dtype)
    return model, load_image_tokenizer(vq_path, device), TextTokenizer(text_tokenizer, model.cfg.text_seq_len)


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from evaluation.clip_score import ClipScorer, add_clip_args
    from model_parallel.state import init_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="an export folder (python -m training.export)")
    parser.add_argument("--vq", required=True)
    parser.add_argument("--text-tokenizer", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    add_clip_args(parser, required=False)
    parser.add_argument("--keep", type=int, default=0, help="keep the best N samples per prompt (needs --clip)")
    args = parser.parse_args(argv)
    if args.keep and not args.clip:
        parser.error("--keep ranks samples by CLIP score: give --clip (and --clip-weights)")
    init_distributed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, vq, text_tok = load_for_sampling(args.checkpoint, args.vq, args.text_tokenizer, device)
    scorer = ClipScorer.load(args.clip, args.clip_weights, device) if args.clip else None
    prompts = read_prompts(args.prompts)[: args.limit or None]
    cfg = SamplingConfig(args.temperature, args.top_k, args.top_p, args.guidance_scale)
    generate(model, vq, text_tok, prompts, args.out, cfg, args.samples_per_prompt, args.seed, args.batch_size,
             dist.get_rank(), dist.get_world_size(), scorer, args.keep)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"wrote {gather_metadata(args.out)}")


if __name__ == "__main__":
    main()
