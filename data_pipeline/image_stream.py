"""Endless training crops from LAION-style shards, for the image models (tokenizer, upsampler).

    stream = crop_stream("laion/{00000..00099}.tar", crop=256, resize=288, rank=0, world=8, seed=1234)
    image = next(stream)      # uint8 [3, 256, 256]

Every kept sample (data_pipeline/images.py's filters) is resized (shorter side) and centre-cropped to
`resize` (or `crop` when resize is 0), then, through a 256-image shuffle buffer, randomly cropped to `crop`
and flipped. Rank r of `world` takes every world-th kept sample; the stream is a pure function of
(pattern, seed, rank, world), so a resumed trainer replays it to where it was.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import torch

from data_pipeline.images import FilterConfig, prepare_sample
from data_pipeline.laion import expand_shards, read_shard


def crop_stream(pattern: str, crop: int, resize: int, rank: int, world: int, seed: int) -> Iterator[torch.Tensor]:
    paths, side = expand_shards(pattern), resize or crop
    prep = FilterConfig(image_size=side, min_size=min(64, side))
    rng = random.Random(seed * 1000 + rank)
    buffer = []
    while True:
        index = 0
        for path in paths:
            for raw in read_shard(path, Counter()):
                p = prepare_sample(raw, prep)
                if p.reason is None:
                    index += 1
                    if index % world == rank:
                        buffer.append(p.image)
                if len(buffer) >= 256:
                    yield _random_crop(buffer.pop(rng.randrange(len(buffer))), crop, rng)
        if index < world:
            raise ValueError(f"{pattern}: {index} usable image(s), fewer than the {world} data-parallel ranks")
        while buffer:
            yield _random_crop(buffer.pop(rng.randrange(len(buffer))), crop, rng)


def _random_crop(image: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    top, left = rng.randint(0, image.shape[1] - size), rng.randint(0, image.shape[2] - size)
    crop = image[:, top:top + size, left:left + size]
    return crop.flip(-1) if rng.random() < 0.5 else crop


def center_crops(pattern: str, size: int, limit: int) -> torch.Tensor:
    """The first `limit` kept images of the shards, resized (shorter side) and centre-cropped to `size`:
    uint8 [N, 3, size, size], the same on every call (held-out evaluation images)."""
    prep, images = FilterConfig(image_size=size, min_size=min(64, size)), []
    for path in expand_shards(pattern):
        for raw in read_shard(path, Counter()):
            p = prepare_sample(raw, prep)
            if p.reason is None:
                images.append(p.image)
            if len(images) == limit:
                return torch.stack(images)
    if not images:
        raise ValueError(f"{pattern}: no usable image")
    return torch.stack(images)
