"""Generate images for a prompt file with an exported Parti model and a frozen VQ tokenizer.

    python -m evaluation.generate --checkpoint runs/x/export --vq runs/vq/export.pt --text-tokenizer tok/spm.model \
        --prompts ../shared/data/PartiPrompts.tsv --out samples/ [--samples-per-prompt 4] [--guidance-scale 1.2] \
        [--temperature 1.0 --top-k 0 --top-p 1.0] [--seed 0] [--batch-size 8] [--limit N]
    torchrun --nproc_per_node 8 -m evaluation.generate ...      # each process takes every 8th prompt

For prompt i and sample k it writes `{i:05d}_{k}.png`, then `{i:05d}.json` (prompt and its other
columns, seed, settings, files); a rerun skips prompts whose .json exists. Seeds depend on (seed, i, k)
only, so the images do not depend on the number of processes. At the end rank 0 gathers the .json files
into metadata.jsonl. (Reranking by CLIP score comes with the CLIP scorer.)
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


def save_png(image: torch.Tensor, path: Path) -> None:
    """image: float [3, H, W] in [-1, 1]."""
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


def generate(model, vq, text_tok, prompts: list[dict], out: Path, cfg: SamplingConfig, samples_per_prompt: int = 1,
             seed: int = 0, batch_size: int = 8, rank: int = 0, world: int = 1) -> int:
    """Images for this rank's prompts that are not done yet; returns how many prompts it generated."""
    out.mkdir(parents=True, exist_ok=True)
    if vq.grid * vq.grid != model.cfg.image_seq_len or vq.codebook_size > model.cfg.image_vocab_size:
        raise ValueError(f"the VQ tokenizer (grid {vq.grid}, {vq.codebook_size} codes) does not fit the model "
                         f"({model.cfg.image_seq_len} image tokens, vocabulary {model.cfg.image_vocab_size})")
    todo = [i for i in range(rank, len(prompts), world) if not (out / f"{i:05d}.json").exists()]
    device = next(model.parameters()).device
    jobs = [(i, k) for i in todo for k in range(samples_per_prompt)]
    done = 0
    with tqdm(total=len(jobs), desc="generate", unit="img", disable=rank != 0) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            text = torch.tensor([text_tok.encode(prompts[i]["prompt"])[0] for i, _ in batch], device=device)
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i * 1_009 + k) for i, k in batch]
            codes = sample(model, text, cfg, generators)  # one batch through the KV cache, a generator per image
            images = vq.decode(codes.view(-1, vq.grid, vq.grid).to(next(vq.parameters()).device))
            for (i, k), image in zip(batch, images):
                save_png(image, out / f"{i:05d}_{k}.png")
                if k == samples_per_prompt - 1:  # all samples of prompt i are written
                    meta = {**prompts[i], "index": i, "seed": seed, "sampling": asdict(cfg),
                            "files": [f"{i:05d}_{s}.png" for s in range(samples_per_prompt)]}
                    (out / f"{i:05d}.json").write_text(json.dumps(meta))
                    done += 1
            bar.update(len(batch))
    return done


def gather_metadata(out: Path) -> Path:
    lines = [p.read_text() for p in sorted(out.glob("[0-9]*.json"))]
    (out / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return out / "metadata.jsonl"


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from data_pipeline.text_tokenizer import TextTokenizer
    from model_parallel.state import init_distributed
    from training.export import load_exported
    from vq.tokenizer import load_image_tokenizer

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
    args = parser.parse_args(argv)
    init_distributed()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_exported(args.checkpoint, device)
    vq = load_image_tokenizer(args.vq, device)
    text_tok = TextTokenizer(args.text_tokenizer, model.cfg.text_seq_len)
    prompts = read_prompts(args.prompts)[: args.limit or None]
    cfg = SamplingConfig(args.temperature, args.top_k, args.top_p, args.guidance_scale)
    generate(model, vq, text_tok, prompts, args.out, cfg, args.samples_per_prompt, args.seed, args.batch_size,
             dist.get_rank(), dist.get_world_size())
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"wrote {gather_metadata(args.out)}")


if __name__ == "__main__":
    main()
