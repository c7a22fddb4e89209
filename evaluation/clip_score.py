"""CLIP score (100 x max(cos(image, text), 0), averaged) with open_clip weights from a local path; the same
scorer reranks samples in `evaluation.generate`.

    python -m evaluation.clip_score --samples samples/ --clip local-dir:/models/clip   # open_clip_config.json + weights
    python -m evaluation.clip_score --samples samples/ --clip ViT-L-14 --clip-weights ViT-L-14.pt --clip-tag openai
    scorer = ClipScorer.load("local-dir:/models/clip"); scores = scorer.score(pil_images, prompts)

`--samples` is a folder written by `evaluation.generate` (its metadata.jsonl names each prompt's files); the
result goes to `<samples>/clip_score.json` with the per-image scores and the protocol (model, weights file
and hash, pretrained tag, the image preprocessing and activation the model ran with). No package installable
here ships CLIP weights, so they always come from a file:
- an open_clip `local-dir:` folder (recommended): its open_clip_config.json carries the model config
  (QuickGELU or not) and the preprocessing (mean/std) the weights were trained with, e.g. a laion/CLIP-ViT-*
  repository copied to the cluster; the weights file is the one open_clip itself picks in that folder;
- a built-in architecture name with a checkpoint file and `--clip-tag`, the open_clip pretrained tag the file
  was published under (openai, laion2b_s32b_b82k, ...): its mean/std and QuickGELU come from open_clip's
  table (offline). Without a tag open_clip uses the architecture's defaults (OpenAI mean/std, GELU), wrong
  for e.g. LAION weights (mean/std 0.5) or OpenAI ViT-L-14 weights (QuickGELU): a warning says so.
CoCa models (Parti's reranker) work the same way, scored by their contrastive embeddings (a built-in
`coca_ViT-L-14` with its checkpoint file, or a local-dir whose open_clip_config.json has `multimodal_cfg` and
`custom_text: true`). `--clip-weights random` builds an untrained model for smoke tests and says so in the
result (its scores mean nothing). An unreadable image or metadata line stops the scoring naming the file
(and line).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from common.cli import command, description
from evaluation.fid import full_fp32, open_rgb, save_result

RANDOM = "random"
METADATA_KEYS = ("prompt", "index", "files")
"""What scoring reads from each metadata.jsonl line (evaluation.generate writes them)."""


def _local_dir_weights(folder: Path) -> Path:
    """The weights file open_clip loads from a local-dir (its own choice among *.safetensors, *.bin, *.pth):
    the protocol names and hashes exactly that file."""
    from open_clip.factory import _find_checkpoint_in_dir  # (what create_model calls for local-dir:)

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: {'a file' if folder.exists() else 'no such folder'}; expected an "
                                "open_clip local-dir (open_clip_config.json and the weights)")
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{folder}: an open_clip local-dir needs open_clip_config.json")
    found = _find_checkpoint_in_dir(folder)
    if found is None:
        raise FileNotFoundError(f"{folder}: no CLIP weights (expected a *.safetensors, *.bin or *.pth file, "
                                "e.g. open_clip_model.safetensors or open_clip_pytorch_model.bin)")
    return Path(found)


def _weights_file(model: str, weights: str | None) -> Path | None:
    """The file the weights come from, checked before open_clip would fall back to a download or random init."""
    if weights == RANDOM:
        return None
    if model.startswith("local-dir:"):
        return _local_dir_weights(Path(model.removeprefix("local-dir:")))
    if not weights:
        raise ValueError(f"CLIP model {model!r} needs --clip-weights FILE (an open_clip checkpoint; none can be "
                         f"downloaded here) or a local-dir:FOLDER model, or --clip-weights random for a smoke test")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP weights {weights} do not exist")
    return Path(weights)


def check_clip(model: str, weights: str | None, tag: str | None, where: str = "") -> None:
    """What ClipScorer.load would refuse (missing weights, an unknown tag), checked before minutes of loading the
    model that makes the images; `where`: the flags or keys to name (e.g. "--clip ..., --clip-weights ...")."""
    try:
        _weights_file(model, weights)
        tag_settings(model, tag)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{where}: {e}" if where else str(e)) from None


def tag_settings(model: str, tag: str | None) -> dict:
    """create_model_and_transforms' preprocessing and activation for weights open_clip knows as `tag`, from its
    pretrained table (offline): a checkpoint given as a file path gets none of them from open_clip."""
    if not tag:
        return {}
    if model.startswith("local-dir:"):
        raise ValueError(f"CLIP tag {tag!r} given for {model}: a local-dir's open_clip_config.json already carries "
                         "its preprocessing and activation; drop the tag")
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        known = ", ".join(list_pretrained_tags_by_model(model)) or "none"
        raise ValueError(f"CLIP tag {tag!r} is not an open_clip pretrained tag of {model} (known: {known})")
    return {"image_mean": cfg.get("mean"), "image_std": cfg.get("std"), "image_interpolation": cfg.get("interpolation"),
            "image_resize_mode": cfg.get("resize_mode"), "force_quick_gelu": bool(cfg.get("quick_gelu"))}


def uses_quick_gelu(model: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _check_activation(net: nn.Module, model: str, tag: str | None, path: Path | None, settings: dict) -> None:
    """A tag whose weights need another activation than the architecture builds is an error; a file for a
    built-in name without a tag is a warning (open_clip then uses the architecture's defaults)."""
    if tag and uses_quick_gelu(net) != settings["force_quick_gelu"]:
        raise ValueError(f"CLIP tag {tag!r} was trained without QuickGELU but {model} builds it: use the "
                         "architecture name without -quickgelu")
    if not tag and path is not None and not model.startswith("local-dir:"):
        print(f"warning: CLIP weights {path} for {model} without a tag (clip.tag / --clip-tag): open_clip uses the "
              f"architecture's defaults (mean {tuple(net.visual.preprocess_cfg['mean'])}, "
              f"{'QuickGELU' if uses_quick_gelu(net) else 'GELU'}), right only for weights trained with them; give "
              "the open_clip tag the file was published under, or use a local-dir: folder", file=sys.stderr)


class ClipScorer:
    """Wraps an open_clip model, its eval preprocessing and its tokenizer."""

    def __init__(self, model, preprocess, tokenizer, protocol: dict, device: str = "cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.protocol, self.device = protocol, device

    @classmethod
    def load(cls, model: str, weights: str | None = None, device: str | None = None,
             tag: str | None = None) -> ClipScorer:
        """`tag`: the open_clip pretrained tag of a checkpoint file given for a built-in architecture name."""
        import open_clip

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = _weights_file(model, weights)
        pretrained = str(path) if path is not None and not model.startswith("local-dir:") else None
        settings = tag_settings(model, tag)
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, load_weights=path is not None, device=device, pretrained_text=False,
            **settings)
        _check_activation(net, model, tag, path, settings)
        protocol = {"model": model, "weights": str(path) if path else RANDOM, "tag": tag or None,
                    "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path else None,
                    "preprocess": json.loads(json.dumps(net.visual.preprocess_cfg)), "quick_gelu": uses_quick_gelu(net),
                    "score": "100 * max(cos(image, text), 0), mean over images", "open_clip": open_clip.__version__,
                    "precision": "float32, TF32 off"}
        return cls(net, preprocess, open_clip.get_tokenizer(model), protocol, device)

    @torch.no_grad()
    def score(self, images: list, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """PIL images and their texts -> float [N] CLIP scores."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + batch_size]])
            tokens = self.tokenizer(texts[start:start + batch_size])
            with full_fp32():  # (the same scores on a GPU as on the CPU)
                image = self.model.encode_image(pixels.to(self.device), normalize=True)
                text = self.model.encode_text(tokens.to(self.device), normalize=True)
            out.append(100 * (image * text).sum(-1).clamp(min=0).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def _metadata_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); expected one JSON object per line, as "
                         "evaluation.generate writes") from e
    missing = [k for k in METADATA_KEYS if k not in row] if isinstance(row, dict) else list(METADATA_KEYS)
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)}; expected a JSON object with {', '.join(METADATA_KEYS)}")
    return row


def read_metadata(samples: Path) -> list[dict]:
    """The prompts of a folder written by evaluation.generate; a damaged line is an error naming file and line."""
    path = samples / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run evaluation.generate on {samples} first")
    lines = path.read_bytes().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            lines[n - 1] = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text ({e}); expected one JSON object per line") from None
    return [_metadata_row(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]


def listed_images(samples: Path, metadata: list[dict] | None = None) -> list[tuple[dict, str]]:
    """(prompt row, file name) of every image metadata.jsonl (or `metadata`) lists; ValueError when there is none
    (a mean over no image is no score: 0 would read as one)."""
    rows = [(meta, name) for meta in (read_metadata(samples) if metadata is None else metadata)
            for name in meta["files"]]
    if not rows:
        raise ValueError(f"{samples / 'metadata.jsonl'} lists no images; expected those evaluation.generate wrote")
    return rows


def score_samples(scorer: ClipScorer, samples: str | Path, batch_size: int = 64,
                  metadata: list[dict] | None = None) -> dict:
    """Score every generated file against its prompt (as metadata.jsonl, or `metadata`, lists them); writes
    and returns <samples>/clip_score.json."""
    samples = Path(samples)
    rows = listed_images(samples, metadata)
    scores = []
    for start in tqdm(range(0, len(rows), batch_size), desc="clip score", unit="batch"):
        chunk = rows[start:start + batch_size]
        images = [open_rgb(samples / name) for _, name in chunk]  # (an unreadable file: named)
        scores += scorer.score(images, [meta["prompt"] for meta, _ in chunk], batch_size).tolist()
    result = {"clip_score": sum(scores) / max(len(scores), 1), "images": len(scores),
              "per_image": [{"file": name, "index": meta["index"], "score": s}
                            for (meta, name), s in zip(rows, scores)],
              "protocol": scorer.protocol}
    written = save_result(samples / "clip_score.json", result)
    return {**result, "written": str(samples / "clip_score.json") if written else None}


def all_samples_mean(metadata: list[dict]) -> float | None:
    """The mean CLIP score over every sample reranking scored (each prompt's .json keeps them: all_clip_scores), the
    unbiased figure beside the score of the kept best ones; None where none were recorded."""
    every = [x for meta in metadata for x in meta.get("all_clip_scores", [])]
    return sum(every) / len(every) if every else None


def same_model_selection(metadata: list[dict], protocol: dict) -> str | None:
    """A warning when the images scored are each prompt's best `keep` of `samples_per_prompt`, kept by reranking
    with these same CLIP weights (their sha256; evaluation.generate records the reranker in every prompt's .json):
    the score is biased upward. It gives the mean over all samples, which reranking scored, when recorded. None
    otherwise. (evaluation.benchmark says the same in its results: benchmark.clip_selection.)"""
    first = metadata[0] if metadata else {}
    rerank, keep, count = first.get("rerank") or {}, first.get("keep") or 0, first.get("samples_per_prompt") or 0
    sha = rerank.get("weights_sha256")  # (None: no reranking, or untrained weights, which are no file's)
    if not (0 < keep < count) or sha is None or sha != protocol.get("weights_sha256"):
        return None
    mean = all_samples_mean(metadata)
    unbiased = f"; the mean over all samples is {mean:.3f}" if mean is not None else ""
    return (f"warning: each prompt's images are the best {keep} of {count}, chosen by these same CLIP weights "
            f"(evaluation.generate's reranking): the score is biased upward{unbiased}")


def add_clip_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--clip", required=required, default=None,
                        help="open_clip local-dir:FOLDER (recommended) or architecture (e.g. ViT-L-14)")
    parser.add_argument("--clip-weights", help=f"open_clip checkpoint file ('{RANDOM}': untrained, smoke tests only)")
    parser.add_argument("--clip-tag", help="the open_clip pretrained tag of --clip-weights (e.g. openai, "
                        "laion2b_s32b_b82k): its mean/std and activation (none for a local-dir:)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--samples", required=True, type=Path, help="a folder written by evaluation.generate")
    add_clip_args(parser, required=True)
    args = parser.parse_args(argv)
    with command(errors=(ValueError, FileNotFoundError), label="evaluation.clip_score"):
        metadata = read_metadata(args.samples)  # (a damaged or empty file stops it before the model is loaded)
        listed_images(args.samples, metadata)
        result = score_samples(ClipScorer.load(args.clip, args.clip_weights, tag=args.clip_tag), args.samples,
                               metadata=metadata)
    where = f"per image in {result['written']}" if result["written"] else "clip_score.json not written"
    print(f"CLIP score {result['clip_score']:.3f} over {result['images']} images "
          f"(weights {result['protocol']['weights']}; {where})")
    warning = same_model_selection(metadata, result["protocol"])
    if warning:
        print(warning)


if __name__ == "__main__":
    main()
