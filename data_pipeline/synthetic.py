"""Synthetic caption/code pairs in which the caption decides the image codes, for the debug config.

    ds = SyntheticCodes(model_cfg, size=512, seed=0)
    text_ids, codes = ds[17]           # int64 [text_seq_len], int64 [image_seq_len]
    held_out = SyntheticCodes(model_cfg, size=64, seed=0, first=512)   # the same classes, other samples

    write_random_code_shards(Path("codes"), 300)   # a code-shard folder of random records (tests, bench/)

Each sample belongs to one of `num_classes` classes chosen from its index; its caption spells the
class with a few tokens and its codes are the class's fixed pattern with 10% of positions
resampled, so a model that reads the caption can get well below the unconditional loss. Every
sample is a pure function of (seed, first + index): any process can address any sample, and a set made with
`first` at or past another's size holds none of its samples (held-out data of the same classes).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from data_pipeline.code_shards import record_dtype
from data_pipeline.manifest import write_manifest


class SyntheticCodes:
    FIRST_WORD = 4  # ids below are PAD/UNK/BOS/EOS

    def __init__(self, model_cfg, size: int = 1024, seed: int = 0, num_classes: int = 8, noise: float = 0.1,
                 first: int = 0):
        self.cfg, self.size, self.seed, self.num_classes, self.noise = model_cfg, size, seed, num_classes, noise
        self.first = first
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randint(0, model_cfg.image_vocab_size, (num_classes, model_cfg.image_seq_len),
                                      generator=g)
        words = model_cfg.text_vocab_size - self.FIRST_WORD
        self.captions = torch.randint(0, words, (num_classes, 3), generator=g) + self.FIRST_WORD

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} outside 0..{self.size - 1}")
        c = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.first + index)
        cls = int(torch.randint(0, self.num_classes, (1,), generator=g))
        n_words = min(3, c.text_seq_len - 1)
        text = torch.full((c.text_seq_len,), c.text_pad_id, dtype=torch.long)
        text[:n_words] = self.captions[cls, :n_words]
        text[n_words] = c.text_eos_id
        codes = self.patterns[cls].clone()
        resample = torch.rand(c.image_seq_len, generator=g) < self.noise
        codes[resample] = torch.randint(0, c.image_vocab_size, (int(resample.sum()),), generator=g)
        return text, codes


RANDOM_SHARDS_HEADER = {
    "vq": {"kind": "stand-in", "hash": "v", "grid": 2, "codebook_size": 64, "image_size": 16},
    "text_tokenizer": {"hash": "t", "vocab_size": 100, "text_len": 4}, "filters": {}, "image_decoding": "-",
    "record": {"grid_tokens": 4, "text_len": 4, "caption_bytes": 256, "key_bytes": 64}}


def write_random_code_shards(folder: Path, count: int, records: int = 3, images: int | None = None) -> dict:
    """A code-shard folder of `count` shards of random records (4 codes, 4 text ids) with the metadata
    pretokenize writes and the manifest step's files, without tokenizers; returns the manifest. With
    `images`, each record's image hash is one of that many, so that most repeat across shards."""
    rng, dtype = np.random.default_rng(0), record_dtype(4, 4)
    folder.mkdir(parents=True)
    for i in range(count):
        r = np.zeros(records, dtype=dtype)
        r["codes"], r["text"] = rng.integers(0, 64, (records, 4)), rng.integers(0, 100, (records, 4))
        r["key"] = [f"{i}-{k}".encode() for k in range(records)]
        if images:
            hashes = np.repeat(rng.integers(0, images, records), 16).astype(np.uint8).tobytes()
        else:
            hashes = rng.integers(0, 256, (records, 16), dtype=np.uint8).tobytes()
        bin_path = folder / f"{i:05d}.bin"
        bin_path.write_bytes(r.tobytes())
        (folder / f"{i:05d}.hashes").write_bytes(hashes)
        st = bin_path.stat()
        (folder / f"{i:05d}.json").write_text(json.dumps({
            "input": f"{i:05d}.tar", "records": records, "seen": records, "skipped": {},
            "header": RANDOM_SHARDS_HEADER, "sha256": hashlib.sha256(r.tobytes()).hexdigest(),
            "hashes_sha256": hashlib.sha256(hashes).hexdigest(), "max_code": int(r["codes"].max()),
            "max_text_id": int(r["text"].max()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return write_manifest(folder, RANDOM_SHARDS_HEADER, [f"{i:05d}" for i in range(count)])
