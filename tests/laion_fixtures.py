"""LAION-style shards built by the tests: the shipped COCO photos, synthetic images, planted bad samples."""
from __future__ import annotations

import functools
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.laion import write_tar  # noqa: F401  (the tests' shard writer)
from data_pipeline.shared_data import shared_data_dir

SHARED_DATA = shared_data_dir()
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square")


def coco_mini(shorter: int | None = None) -> list[tuple[str, bytes, str]]:
    """(key, jpeg bytes, first caption) of the 17 shipped photos (640 px wide); with `shorter`, each photo
    resized once to that shorter side (as the pipeline resizes) and saved again as a JPEG (quality 95).
    The image-model tests train at 32-64 px: decoding and resizing the full photos at every step was about
    half of their time (the crop stream decodes each photo again on every pass over the shard)."""
    return list(_coco_mini(shorter))


@functools.cache
def _coco_mini(shorter: int | None) -> tuple[tuple[str, bytes, str], ...]:
    folder = SHARED_DATA / "coco_mini"
    if not (folder / "captions.json").is_file():
        raise FileNotFoundError(f"{folder / 'captions.json'} is missing: "
                                "set PARTI_SHARED_DATA to the shared data folder")
    entries = json.loads((folder / "captions.json").read_text())
    photos = [(Path(e["file_name"]).stem, (folder / "images" / e["file_name"]).read_bytes(), e["captions"][0])
              for e in entries]
    if shorter is None:
        return tuple(photos)
    out = []
    for key, data, caption in photos:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = shorter / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC,
                         reducing_gap=None)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        out.append((key, buf.getvalue(), caption))
    return tuple(out)


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def shape_image(colour: str, shape: str, size: int = 96, jitter: int = 0) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    lo, hi = size // 4 + jitter, 3 * size // 4 + jitter
    (d.ellipse if shape == "circle" else d.rectangle)((lo, lo, hi, hi), fill=COLOURS[colour])
    return img


def synthetic_samples(n: int, offset: int = 0) -> list[tuple[str, dict]]:
    out = []
    for i in range(offset, offset + n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        img = shape_image(colour, shape, jitter=i % 7)
        out.append((f"syn{i:05d}", {"jpg": encode(img), "txt": f"a {colour} {shape} on a white background".encode(),
                                    "json": json.dumps({"punsafe": 0.01}).encode()}))
    return out


def truncate_tar_inside(path: Path, member: str) -> None:
    """Cut the tar in the middle of `member`'s data: everything before it stays readable."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()[: info.offset_data + info.size // 2]
    path.write_bytes(data)


def planted_samples() -> tuple[list[tuple[str, dict]], dict[str, int], set[str]]:
    """COCO photos plus planted cases; returns (samples, expected skip counts, keys that must be kept)."""
    photos = coco_mini()
    samples = [(k, {"jpg": jpg, "txt": cap.encode(), "json": json.dumps({"punsafe": 0.02}).encode()})
               for k, jpg, cap in photos]
    keep = {k for k, _, _ in photos}
    first_jpg = photos[0][1]
    cmyk = Image.open(io.BytesIO(first_jpg)).convert("CMYK")
    sixteen = Image.fromarray((np.linspace(0, 65535, 128 * 96).reshape(96, 128)).astype(np.uint16))
    palette = shape_image("green", "circle").convert("P", palette=Image.Palette.ADAPTIVE)
    planted = [
        ("cmyk", {"jpg": encode(cmyk), "txt": b"a photo stored as CMYK"}, None),
        ("png16", {"png": encode(sixteen, "PNG"), "txt": b"a 16-bit grey ramp"}, None),
        ("palette", {"png": encode(palette, "PNG"), "txt": b"a palette image"}, None),
        ("rgba", {"png": encode(shape_image("red", "square").convert("RGBA"), "PNG"), "txt": b"with alpha"}, None),
        ("truncjpg", {"jpg": first_jpg[: len(first_jpg) // 2], "txt": b"half a jpeg"}, "decode_error"),
        ("zerobyte", {"jpg": b"", "txt": b"no bytes"}, "decode_error"),
        ("nocaption", {"jpg": encode(shape_image("blue", "circle"))}, "empty_caption"),
        ("badutf8", {"jpg": encode(shape_image("yellow", "square")), "txt": b"caf\xe9 \xff\xfe"}, "caption_not_utf8"),
        ("tiny", {"png": encode(Image.new("RGB", (1, 1)), "PNG"), "txt": b"one pixel"}, "too_small"),
        ("wide", {"jpg": encode(Image.new("RGB", (400, 70), (9, 9, 9))), "txt": b"a banner"}, "bad_aspect"),
        ("dup", {"jpg": first_jpg, "txt": b"the same photo again"}, "duplicate"),
        ("unsafe", {"jpg": encode(shape_image("red", "circle", jitter=3)), "txt": b"flagged",
                    "json": json.dumps({"punsafe": 0.97}).encode()}, "punsafe"),
    ]
    expected: dict[str, int] = {}
    for key, files, reason in planted:
        samples.append((key, files))
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
        else:
            keep.add(key)
    return samples, expected, keep
