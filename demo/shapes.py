"""A synthetic captioned image set in which the caption decides what is drawn ("a red circle on a white
background"), written as LAION-style shards, and the measurement that reads colour and shape back from an
image. The end-to-end demo (demo/run.py) trains on it and checks that samples follow their prompts.

    write_shapes_shards(Path("laion/shapes"), count=2000, held_out={("yellow", "square")})
    measure(Image.open("sample.png"))        # -> ("red", "circle")

Each image is a filled shape of one of four colours on white, at a random position and size; a sample is a
pure function of (seed, index). The measurement is deliberately simple (no learned model): pixels far from
white form the shape; their mean colour names the nearest of the four colours, and how much of its bounding
box the shape fills names the shape (square ~1, circle ~0.79, triangle ~0.5).
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.laion import write_tar

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 205, 20)}
SHAPES = ("circle", "square", "triangle")
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape} on a white background"


def combinations(held_out: set[tuple[str, str]] = frozenset()) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_out]


def draw(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """The shape, filling 45-70% of the side, somewhere inside the image."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    side = int(size * rng.uniform(0.45, 0.7))
    x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
    box = (x, y, x + side - 1, y + side - 1)
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x, y + side - 1), (x + side - 1, y + side - 1), (x + (side - 1) / 2, y)], fill=COLOURS[colour])
    return img


def shape_sample(index: int, combos: list[tuple[str, str]], size: int, seed: int = 0) -> tuple[str, str, Image.Image]:
    rng = random.Random(seed * 1_000_003 + index)
    colour, shape = combos[rng.randrange(len(combos))]
    return colour, shape, draw(colour, shape, size, rng)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_shapes_shards(out: Path, count: int, size: int = 32, held_out: set = frozenset(), seed: int = 0,
                        per_shard: int = 1000, start: int = 0) -> list[Path]:
    """`count` captioned shapes (never a held-out combination) in shards of `per_shard`, keys from `start`."""
    combos, paths = combinations(held_out), []
    for first in range(start, start + count, per_shard):
        samples = []
        for i in range(first, min(first + per_shard, start + count)):
            colour, shape, img = shape_sample(i, combos, size, seed)
            meta = {"caption": caption(colour, shape), "colour": colour, "shape": shape, "width": size, "height": size}
            samples.append((f"shape{i:07d}", {"png": _png(img), "txt": caption(colour, shape).encode(),
                                               "json": json.dumps(meta).encode()}))
        paths.append(write_tar(out / f"{first // per_shard:05d}.tar", samples))
    return paths


def write_photo_shard(path: Path, photos_dir: Path) -> Path:
    """The shipped COCO photos (read in place) as one shard, each with its first caption."""
    entries = json.loads((photos_dir / "captions.json").read_text())
    samples = [(Path(e["file_name"]).stem, {"jpg": (photos_dir / "images" / e["file_name"]).read_bytes(),
                                            "txt": e["captions"][0].encode(),
                                            "json": json.dumps({"caption": e["captions"][0],
                                                                "license": e["license"]}).encode()})
               for e in entries]
    return write_tar(path, samples)


def measure(image: Image.Image, white_distance: float = 90.0) -> tuple[str | None, str | None]:
    """(colour, shape) read from an image; (None, None) when nothing but background is found.
    Only the largest blob is measured, so decoder speckle around the shape does not count."""
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = np.linalg.norm(pixels - 255.0, axis=-1) > white_distance
    labels, count = ndimage.label(mask)  # 4-connected blobs: speckle and stray lines are separate from the shape
    if count == 0:
        return None, None
    blob = labels == 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, count + 1))))
    mean = pixels[blob].mean(0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
    rows, cols = np.nonzero(blob)
    fill = blob.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return colour, shape
