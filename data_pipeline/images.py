"""Decoding LAION-style samples: images to RGB of one size, captions to text, with counted skip reasons.

    prepared = prepare_sample(raw, FilterConfig(image_size=256))
    prepared.reason      # None for a kept sample, else one of SKIP_REASONS
    prepared.image       # uint8 [3, 256, 256] (shorter side resized with antialiasing, center-cropped)

Whatever the file holds (grayscale, palette with transparency, CMYK, alpha, 16-bit PNG) becomes 8-bit
RGB; transparency (an alpha channel or a PNG tRNS colour) is composited on white (a 16-bit RGB PNG with a tRNS
colour, which PIL cannot decode exactly, is skipped as a decode_error). A photo's EXIF
orientation is applied first, so the image is the one a viewer shows (a phone photo stored sideways
is turned upright: its caption describes it that way).
"""
from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DECODING = {"version": 4, "exif_orientation": True, "transparency": "white"}
"""How images become pixels, recorded in every code shard's header (data_pipeline.pretokenize): a folder begun by
a version that decoded otherwise (1: EXIF orientation ignored, a PNG's tRNS colour composited on black; 2: a 16-bit
grey PNG's transparent value ignored; 3: a 16-bit RGB PNG's tRNS colour matched against 8-bit pixels, see
check_exact_decoding) is not continued with different pixels."""
FILTER_RULES = 3
"""Which samples the filters skip, recorded beside their settings in every header (`filters.rules`): a folder begun
under other rules (1: a null score passed a filter set on its field; a caption of no piece but EOS was kept, as
the guidance null caption; 2: a .json that is not JSON passed the score filters) is not continued with other
samples."""
SKIP_REASONS = ("missing_image", "decode_error", "too_small", "bad_aspect", "empty_caption", "caption_not_utf8",
                "caption_too_long", "duplicate", "bad_json", "punsafe", "pwatermark", "similarity")


@dataclass
class FilterConfig:
    """Which samples pre-tokenization keeps. With a score filter set (max_punsafe, max_pwatermark, min_similarity), an
    unknown score does not pass it: NaN or null (punsafe, ...) and a .json that is not JSON (bad_json)."""

    image_size: int = 256
    """Side of the square images given to the tokenizer."""
    min_size: int = 64
    """Shorter image side below which a sample is dropped (too_small)."""
    max_aspect: float = 3.0
    """Longer/shorter side above which a sample is dropped (bad_aspect)."""
    max_caption_chars: int = 1000
    """Caption length (characters) above which a sample is dropped (caption_too_long)."""
    max_punsafe: float | None = None
    """Drop samples whose json `punsafe` exceeds this (when the field is present)."""
    max_pwatermark: float | None = None
    """Drop samples whose json `pwatermark` exceeds this (when present)."""
    min_similarity: float | None = None
    """Drop samples whose json `similarity` (CLIP image-text) is below this (when present)."""


@dataclass
class ImageFilter(FilterConfig):
    """The image trainers' filters (data_pipeline/image_stream.py): the image alone counts, its caption is neither
    read nor required (no empty_caption, caption_too_long)."""


@dataclass
class Prepared:
    key: str
    reason: str | None = None
    image: torch.Tensor | None = None  # uint8 [3, S, S]
    caption: str = ""
    image_hash: str = ""


def check_exact_decoding(img: Image.Image) -> None:
    """ValueError for an opened (not yet loaded) image that PIL would decode to wrong pixels: a 16-bit RGB PNG with
    a tRNS colour. PIL keeps the high byte of each sample but the colour's 16-bit values, so its RGBA conversion
    matches the colour against the wrong pixels (none, or opaque ones whose high byte equals it); PIL has no 16-bit
    RGB mode to match it exactly, and transparency in 16-bit RGB is nearly always an alpha channel instead."""
    if img.format == "PNG" and "transparency" in img.info and img.tile and img.tile[0].args == "RGB;16B":
        raise ValueError("a 16-bit RGB PNG with a tRNS transparent colour: PIL cannot tell which pixels it hides")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        transparent = img.info.get("transparency")  # (a 16-bit tRNS value: matched before the scaling merges values)
        if isinstance(transparent, int):
            alpha = Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8), "L")
            grey = Image.merge("LA", (grey, alpha))
        img = grey
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # (a tRNS colour: PIL keeps it aside)
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic, antialiased when shrinking), then the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _caption(raw: dict) -> tuple[str | None, str | None]:
    data = raw.get("txt")
    if data is None:
        return None, "empty_caption"
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    return (text, None) if text else (None, "empty_caption")


def _json_reason(raw: dict, cfg: FilterConfig) -> str | None:
    filtering = (cfg.max_punsafe, cfg.max_pwatermark, cfg.min_similarity) != (None, None, None)
    if "json" not in raw or not filtering:
        return None
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError):  # (a damaged sidecar, e.g. cut short: its scores are unknown)
        return "bad_json"
    if not isinstance(meta, dict):  # (img2dataset writes an object; anything else carries no fields to filter on)
        return None
    for field, limit, too_high in (("punsafe", cfg.max_punsafe, True), ("pwatermark", cfg.max_pwatermark, True),
                                   ("similarity", cfg.min_similarity, False)):
        if limit is None or field not in meta:  # (no such field: nothing to filter on)
            continue
        value = meta[field]
        # img2dataset writes a missing score as NaN, or as null (a null parquet cell through pyarrow's to_pydict):
        # unknown does not pass a filter
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return field
        if (value > limit) if too_high else (value < limit):
            return field
    return None


def prepare_sample(raw: dict, cfg: FilterConfig) -> Prepared:
    """raw: {'__key__': str, 'jpg'|'png'|'webp': bytes, 'txt': bytes, 'json': bytes} (any subset)."""
    import hashlib

    key, caption = raw.get("__key__", ""), ""
    if not isinstance(cfg, ImageFilter):
        caption, reason = _caption(raw)
        if reason:
            return Prepared(key, reason)
        if len(caption) > cfg.max_caption_chars:
            return Prepared(key, "caption_too_long")
    reason = _json_reason(raw, cfg)
    if reason:
        return Prepared(key, reason)
    data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if data is None:
        return Prepared(key, "missing_image")
    try:
        img = Image.open(io.BytesIO(data))
        check_exact_decoding(img)
        img.load()  # decode now: a truncated file fails here, not later
        img = ImageOps.exif_transpose(img)  # (a no-op without an EXIF orientation)
    except Exception:  # PIL raises many types for broken files
        return Prepared(key, "decode_error")
    w, h = img.size
    if min(w, h) < cfg.min_size:
        return Prepared(key, "too_small")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        return Prepared(key, "bad_aspect")
    out = np.asarray(resize_center_crop(to_rgb(img), cfg.image_size), dtype=np.uint8)
    return Prepared(key, None, torch.from_numpy(out.copy()).permute(2, 0, 1), caption,
                    hashlib.sha256(data).hexdigest())


def in_turns(items: Iterator, size: int) -> Iterator[tuple[list, bool]]:
    """`items` cut into lists of `size`, each with whether it is this DataLoader worker's to prepare: worker w
    of W takes the lists w, w + W, ..., the order in which the loader hands the results back, so they do not
    depend on the number of workers. Every worker reads all items (cheap: raw bytes) and prepares its own."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    for number in itertools.count():
        batch = list(itertools.islice(items, size))
        if not batch:
            return
        yield batch, number % workers == worker


class PreparedSamples(torch.utils.data.Dataset):
    """`prepare_sample` over a list of raw samples as a map-style dataset: DataLoader workers decode and
    resize them in parallel and hand them back in order (pre-tokenization, the image models' crop stream)."""

    def __init__(self, raw: list[dict], cfg: FilterConfig):
        self.raw, self.cfg = raw, cfg

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> Prepared:
        return prepare_sample(self.raw[i], self.cfg)
