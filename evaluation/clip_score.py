"""CLIP score (100 x max(cos(image, text), 0), averaged) with open_clip weights from a local path; the same
scorer reranks samples in `evaluation.generate`.

    python -m evaluation.clip_score --samples samples/ --clip ViT-L-14 --clip-weights ViT-L-14.pt
    python -m evaluation.clip_score --samples samples/ --clip local-dir:/models/clip     # open_clip_config.json + weights
    scorer = ClipScorer.load("ViT-L-14", "ViT-L-14.pt"); scores = scorer.score(pil_images, prompts)

`--samples` is a folder written by `evaluation.generate` (its metadata.jsonl names each prompt's files); the
result goes to `<samples>/clip_score.json` with the per-image scores and the protocol (model, weights hash).
No package installable here ships CLIP weights, so they always come from a file: an open_clip checkpoint for a
built-in architecture name, or an open_clip `local-dir:` folder. CoCa models (Parti's reranker) work the same way,
scored by their contrastive embeddings (a built-in `coca_ViT-L-14` with its checkpoint file, or a local-dir whose
open_clip_config.json has `multimodal_cfg` and `custom_text: true`). `--clip-weights random` builds an untrained
model for smoke tests and says so in the result (its scores mean nothing).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from evaluation.fid import full_fp32

RANDOM = "random"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


def _weights_file(model: str, weights: str | None) -> Path | None:
    """The file the weights come from, checked before open_clip would fall back to a download or random init."""
    if weights == RANDOM:
        return None
    if model.startswith("local-dir:"):
        folder = Path(model.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder}: an open_clip local-dir needs open_clip_config.json")
        found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{folder}: no CLIP weights (expected one of {', '.join(WEIGHT_FILES)})")
        return found[0]
    if not weights:
        raise ValueError(f"CLIP model {model!r} needs --clip-weights FILE (an open_clip checkpoint; none can be "
                         f"downloaded here) or a local-dir:FOLDER model, or --clip-weights random for a smoke test")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP weights {weights} do not exist")
    return Path(weights)


class ClipScorer:
    """Wraps an open_clip model, its eval preprocessing and its tokenizer."""

    def __init__(self, model, preprocess, tokenizer, protocol: dict, device: str = "cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.protocol, self.device = protocol, device

    @classmethod
    def load(cls, model: str, weights: str | None = None, device: str | None = None) -> ClipScorer:
        import open_clip

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = _weights_file(model, weights)
        pretrained = str(path) if path is not None and not model.startswith("local-dir:") else None
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, load_weights=path is not None, device=device, pretrained_text=False)
        protocol = {"model": model, "weights": str(path) if path else RANDOM,
                    "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path else None,
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


def read_metadata(samples: Path) -> list[dict]:
    path = samples / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run evaluation.generate on {samples} first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_samples(scorer: ClipScorer, samples: str | Path, batch_size: int = 64) -> dict:
    """Score every generated file against its prompt (as metadata.jsonl lists them); writes and returns
    <samples>/clip_score.json."""
    from PIL import Image

    samples = Path(samples)
    rows = [(meta, name) for meta in read_metadata(samples) for name in meta["files"]]
    scores = []
    for start in tqdm(range(0, len(rows), batch_size), desc="clip score", unit="batch"):
        chunk = rows[start:start + batch_size]
        images = [Image.open(samples / name) for _, name in chunk]
        scores += scorer.score(images, [meta["prompt"] for meta, _ in chunk], batch_size).tolist()
    result = {"clip_score": sum(scores) / max(len(scores), 1), "images": len(scores),
              "per_image": [{"file": name, "index": meta["index"], "score": s} for (meta, name), s in zip(rows, scores)],
              "protocol": scorer.protocol}
    (samples / "clip_score.json").write_text(json.dumps(result, indent=1))
    return result


def add_clip_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--clip", required=required, default=None,
                        help="open_clip architecture (e.g. ViT-L-14) or local-dir:FOLDER")
    parser.add_argument("--clip-weights", help=f"open_clip checkpoint file ('{RANDOM}': untrained, smoke tests only)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", required=True, type=Path, help="a folder written by evaluation.generate")
    add_clip_args(parser, required=True)
    args = parser.parse_args(argv)
    result = score_samples(ClipScorer.load(args.clip, args.clip_weights), args.samples)
    print(f"CLIP score {result['clip_score']:.3f} over {result['images']} images "
          f"(weights {result['protocol']['weights']}; per image in {args.samples / 'clip_score.json'})")


if __name__ == "__main__":
    main()
