"""Reading LAION-style shards (img2dataset layout) with webdataset.

    for sample in read_shard("laion/00000.tar", errors): ...   # {'__key__', 'jpg', 'txt', 'json', ...}
    paths = expand_shards("laion/{00000..00099}.tar")

A shard is a tar of `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`. A truncated or corrupt tar yields
the samples before the damage; `errors` then counts it under `truncated_tar` (one per shard).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import braceexpand
from webdataset import tariterators


def expand_shards(pattern: str) -> list[Path]:
    """Brace-expanded shard paths (`laion/{00000..00009}.tar`, comma lists too), each checked to exist."""
    paths = [Path(p) for part in pattern.split() for p in braceexpand.braceexpand(part)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input shard(s) not found: {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if not paths:
        raise FileNotFoundError(f"no input shard matches {pattern!r}")
    return paths


def read_shard(path: str | Path, errors: Counter):
    """The samples of one tar, grouped by key, in file order."""
    stop = []

    def on_error(exc: Exception) -> bool:
        stop.append(exc)
        return False  # stop reading this tar: what comes after a broken member is not trustworthy

    with open(path, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": str(path), "stream": stream}], handler=on_error)
        yield from tariterators.group_by_keys(files, handler=on_error)
    if stop:
        errors["truncated_tar"] += 1
