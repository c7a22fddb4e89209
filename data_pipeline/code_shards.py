"""Code shards: fixed-size records, memory-mapped, addressable by global sample index.

A code-shard folder holds `NNNNN.bin` (records back to back, no header), `NNNNN.json` (that shard's
record count, sha256, input and skip counts) and `manifest.json`:
  {"format", "vq": {"kind", "hash", "grid", "codebook_size", "image_size"},
   "text_tokenizer": {"hash", "vocab_size", "text_len"}, "record": {"grid_tokens", "text_len",
   "caption_bytes", "key_bytes"}, "filters": {...}, "shards": [{"name", "input", "records", "sha256",
   "skipped"}...], "records", "skipped": {reason: count}, "num_inputs", "complete"}
A record: codes uint16[grid*grid], text uint16[text_len] (padded), text_len uint16, caption (UTF-8,
truncated, NUL-padded), key (ASCII, NUL-padded).

    ds = CodeShardDataset("codes/")          # or CodeShardDataset.mixed({"codes/a": 3, "codes/b": 1})
    text_ids, codes = ds[1234]               # int64 [text_len], int64 [grid*grid]
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

FORMAT = "parti-code-shards/1"
CAPTION_BYTES, KEY_BYTES = 256, 64


def record_dtype(grid_tokens: int, text_len: int, caption_bytes: int = CAPTION_BYTES,
                 key_bytes: int = KEY_BYTES) -> np.dtype:
    return np.dtype([("codes", "<u2", (grid_tokens,)), ("text", "<u2", (text_len,)), ("text_len", "<u2"),
                     ("caption", f"S{caption_bytes}"), ("key", f"S{key_bytes}")])


def utf8_truncate(text: str, limit: int) -> bytes:
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_is_complete(folder: Path, name: str) -> bool:
    """The shard's metadata exists and its records match the recorded checksum."""
    meta_path, bin_path = folder / f"{name}.json", folder / f"{name}.bin"
    if not (meta_path.is_file() and bin_path.is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("sha256") == sha256_file(bin_path)


def write_manifest(folder: Path, header: dict, names: list[str]) -> dict:
    """manifest.json from the shards' metadata files present now; `complete` when all `names` are."""
    shards = [{"name": n, **json.loads((folder / f"{n}.json").read_text())}
              for n in names if (folder / f"{n}.json").is_file()]
    skipped: dict[str, int] = {}
    for s in shards:
        for reason, count in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    manifest = {"format": FORMAT, **header, "shards": shards, "records": sum(s["records"] for s in shards),
                "skipped": dict(sorted(skipped.items())), "num_inputs": len(names),
                "complete": len(shards) == len(names)}
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


class CodeShardDataset:
    """All records of one code-shard folder, by global index (shards in manifest order)."""

    def __init__(self, folder: str | Path, text_len: int | None = None, grid_tokens: int | None = None):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run data_pipeline.pretokenize for {self.folder}")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if not self.manifest["complete"]:
            raise ValueError(f"{path}: only {len(self.manifest['shards'])} of {self.manifest['num_inputs']} "
                             "shards are done; finish data_pipeline.pretokenize first")
        rec = self.manifest["record"]
        for name, want, have in (("text_len", text_len, rec["text_len"]), ("grid_tokens", grid_tokens, rec["grid_tokens"])):
            if want is not None and want != have:
                raise ValueError(f"{path}: records have {name}={have}, the model expects {want}")
        self.dtype = record_dtype(rec["grid_tokens"], rec["text_len"], rec["caption_bytes"], rec["key_bytes"])
        self.arrays, offsets = [], [0]
        for shard in self.manifest["shards"]:
            bin_path = self.folder / f"{shard['name']}.bin"
            size = bin_path.stat().st_size
            if size != shard["records"] * self.dtype.itemsize:
                raise ValueError(f"{bin_path}: {size} bytes, expected {shard['records']} records of "
                                 f"{self.dtype.itemsize} bytes")
            self.arrays.append(np.memmap(bin_path, dtype=self.dtype, mode="r") if size else
                               np.zeros(0, dtype=self.dtype))
            offsets.append(offsets[-1] + shard["records"])
        self.offsets = np.array(offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def record(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside 0..{len(self) - 1} of {self.folder}")
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.arrays[shard][index - self.offsets[shard]]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.record(index)
        return torch.from_numpy(r["text"].astype(np.int64)), torch.from_numpy(r["codes"].astype(np.int64))

    def caption(self, index: int) -> str:
        return self.record(index)["caption"].decode("utf-8", "ignore")


class MixedDataset:
    """Several datasets blended by weight, as Megatron's BlendedDataset: position k of the blend goes to
    the dataset whose share is furthest behind its weight (a deterministic, even interleaving); each
    dataset is cycled when the blend asks for more than it holds."""

    def __init__(self, datasets: list, weights: list[float], size: int | None = None):
        if len(datasets) != len(weights) or not datasets or min(weights) <= 0:
            raise ValueError("MixedDataset needs one positive weight per dataset")
        self.datasets = datasets
        total = sum(weights)
        shares = np.array(weights, dtype=np.float64) / total
        self.size = size or sum(len(d) for d in datasets)
        self.which = np.zeros(self.size, dtype=np.int32)
        self.position = np.zeros(self.size, dtype=np.int64)
        counts = np.zeros(len(datasets), dtype=np.int64)
        for k in range(self.size):
            d = int(np.argmax(shares * (k + 1) - counts))
            self.which[k], self.position[k] = d, counts[d] % len(datasets[d])
            counts[d] += 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.datasets[self.which[index]][int(self.position[index])]


def open_training_data(spec: str, model_cfg):
    """`codes/` or `codes/a:3,codes/b:1` (folder[:weight], comma-separated) -> a dataset the model fits."""
    parts = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        folder, _, weight = item.partition(":")
        ds = CodeShardDataset(folder, text_len=model_cfg.text_seq_len, grid_tokens=model_cfg.image_seq_len)
        for name, have, limit in (("codebook_size", ds.manifest["vq"]["codebook_size"], model_cfg.image_vocab_size),
                                  ("text vocab_size", ds.manifest["text_tokenizer"]["vocab_size"],
                                   model_cfg.text_vocab_size)):
            if have > limit:
                raise ValueError(f"{folder}: {name} {have} exceeds the model's "
                                 f"{'model.image_vocab_size' if 'codebook' in name else 'model.text_vocab_size'}={limit}")
        parts.append((ds, float(weight) if weight else 1.0))
    if not parts:
        raise ValueError("data.shards is empty: give a code-shard folder (or folder:weight,folder:weight)")
    if len(parts) == 1:
        return parts[0][0]
    return MixedDataset([d for d, _ in parts], [w for _, w in parts])
