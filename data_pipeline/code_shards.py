"""Code shards: fixed-size records, read by position (a few open files at a time), addressable by global sample index.

A code-shard folder holds `NNNNN.bin` (records back to back, no header), `NNNNN.hashes` (each record's
image content hash, HASH_BYTES bytes, in record order), `NNNNN.json` (that shard's record count, sha256,
input and skip counts, the header below it was made with, its largest code and text id, the size and
mtime of the .bin when written, the sha256 of its .hashes), `duplicates.npy`, `shard_stats.json`
({"header": header_digest, "shards": {name: [bytes, mtime_ns, max_code, max_text_id]}, "duplicates":
[bytes, mtime_ns, sha256] | null}: those of each NNNNN.json made with the manifest's header and of
duplicates.npy as written, what opening needs, in one file) and `manifest.json`:
  {"format", "vq": {"kind", "hash", "grid", "codebook_size", "image_size"},
   "text_tokenizer": {"hash", "vocab_size", "text_len"}, "record": {"grid_tokens", "text_len",
   "caption_bytes", "key_bytes"}, "filters": {...}, "shards": [{"name", "input", "records", "sha256",
   "skipped", "duplicates"}...], "records", "skipped": {reason: count}, "num_inputs", "complete",
   "duplicates": {"file", "count", "sha256"} | null}
Shards are written once and never changed. Duplicates within an input shard are never written; those
across shards are found when the manifest is made complete (data_pipeline/manifest.py): a record whose image
hash a shard earlier in index order (or an earlier record) already holds is listed, by its index among all
records of the folder, in `duplicates.npy` (sorted int64), counted per shard under `duplicates` and in
`skipped` as `duplicate_across_shards`; the dataset leaves listed records out. A shard's `records` is
what its .bin holds; the manifest's `records` is what training sees.
A record: codes uint16[grid*grid], text uint16[text_len] (padded), text_len uint16, caption (UTF-8,
truncated, NUL-padded), key (ASCII, NUL-padded).

    ds = CodeShardDataset("codes/")          # or open_training_data("codes/a:3,codes/b:1", model_cfg)
    text_ids, codes = ds[1234]               # int64 [text_len], int64 [grid*grid]

Opening checks every shard's values once: a code >= vq.codebook_size or a text id >= the text
vocab_size is refused naming the shard. A shard whose .bin still has the size and mtime recorded in
its metadata is checked from the maxima recorded there (pretokenize computed them from the records it
wrote; read from shard_stats.json, so that opening reads no NNNNN.json of an unchanged shard); any other
(copied without times, edited, written by an older version) is scanned in one vectorised pass over the
memory map, remembered for the process. `cp -p`/`rsync -t` keep copies cheap.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import DataError

FORMAT = "parti-code-shards/1"
CAPTION_BYTES, KEY_BYTES = 256, 64
SHARD_META = re.compile(r"^\d+\.json$")
CHUNK_RECORDS = 1 << 14  # records per step of a scan over a memory map (~40 MiB at 32x32 codes)
HEADER_KEYS = ("vq", "text_tokenizer", "record", "filters", "image_decoding")  # a shard's makings (pretokenize.header)
PRIVATE_META = ("header", "max_code", "max_text_id", "bytes", "mtime_ns", "hashes_sha256")  # NNNNN.json only
SHARD_STATS = "shard_stats.json"  # what the dataset's open needs of each NNNNN.json, in one file
STAT_KEYS = ("bytes", "mtime_ns", "max_code", "max_text_id")
HASH_BYTES = 16  # the first 128 bits of the image file's sha256, per record in NNNNN.hashes
DUPLICATES = "duplicates.npy"
MANIFEST_KEYS = ("complete", "num_inputs", "shards", "records", "skipped", "record", "vq", "text_tokenizer")


def header_digest(header: dict) -> str:
    """sha256 of a header's HEADER_KEYS (SHARD_STATS holds the one its entries were made with: the entries
    count only beside a manifest of that header)."""
    return hashlib.sha256(json.dumps({k: header.get(k) for k in HEADER_KEYS}, sort_keys=True).encode()).hexdigest()


def stamp(st: os.stat_result) -> list[int]:
    """[bytes, mtime_ns]: what a file's metadata records of it to take it later as unchanged since (its
    content then not read again; `cp -p` and `rsync -t` keep both)."""
    return [st.st_size, st.st_mtime_ns]


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


def hash_digest(hex_sha256: str) -> bytes:
    """What NNNNN.hashes stores for an image whose content sha256 is `hex_sha256`."""
    return bytes.fromhex(hex_sha256)[:HASH_BYTES]


def read_json(path: Path) -> dict:
    """A metadata file's object, or a DataError naming the file (a truncated or hand-edited one among
    thousands must say which)."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        fix = ("rebuild it with data_pipeline.pretokenize --manifest-only (same arguments)"
               if path.name in ("manifest.json", SHARD_STATS) else  # (a plain rerun would stop at the manifest)
               "remove it with its .bin, then rerun data_pipeline.pretokenize with the same arguments")
        raise DataError(f"{path}: not readable as JSON ({e}); it is damaged: {fix}") from e
    if not isinstance(value, dict):
        raise DataError(f"{path}: a JSON {type(value).__name__}, expected an object")
    return value


def _short(value) -> str:
    text = json.dumps(value)
    return text[:14] + '..."' if isinstance(value, str) and len(value) > 16 else text


def header_differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    """`text_tokenizer.hash "1a2b..." there, "5e6f..." now` for every entry that differs."""
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += header_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_short(a)} there, {_short(b)} now")
    return out


class CodeShardDataset:
    """All records of one code-shard folder but its duplicates across shards (duplicates.npy), by global
    index (shards in manifest order)."""

    def __init__(self, folder: str | Path, text_len: int | None = None, grid_tokens: int | None = None,
                 check_shards: bool = True):
        """`check_shards=False`: the shards are taken as the manifest describes them, without a stat or a read of
        each (another process checked them: training_data.training_dataset's rank 0)."""
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder: expected a code-shard folder written by "
                                    "data_pipeline.pretokenize (its --output)")
        if not path.is_file():
            made = sorted(p.name for p in self.folder.iterdir() if SHARD_META.match(p.name))
            if not made:
                raise DataError(f"{self.folder} holds no code shards (no manifest.json, no NNNNN.json): expected "
                                "the --output folder of data_pipeline.pretokenize")
            raise DataError(f"{path} does not exist though {len(made)} shard(s) do: the pre-tokenization did not "
                            "finish; rerun data_pipeline.pretokenize with the same arguments (it resumes)")
        self.manifest = read_json(path)
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        missing = [k for k in MANIFEST_KEYS if k not in self.manifest]
        if missing:
            raise DataError(f"{path}: no {', '.join(missing)} entry: the manifest is damaged; rebuild it with "
                            "data_pipeline.pretokenize --manifest-only (same arguments)")
        if not self.manifest["complete"]:
            raise DataError(f"{path}: only {len(self.manifest['shards'])} of {self.manifest['num_inputs']} "
                            "shards are done; finish data_pipeline.pretokenize first")
        if not self.manifest["records"]:
            raise DataError(f"{path}: 0 records (every sample of its {self.manifest['num_inputs']} input shard(s) "
                            f"was skipped: {self.manifest['skipped']}): nothing to train on")
        rec = self.manifest["record"]
        for name, want, have in (("text_len", text_len, rec["text_len"]),
                                 ("grid_tokens", grid_tokens, rec["grid_tokens"])):
            if want is not None and want != have:
                raise DataError(f"{path}: records have {name}={have}, the model expects {want}")
        self.dtype = record_dtype(rec["grid_tokens"], rec["text_len"], rec["caption_bytes"], rec["key_bytes"])
        self.paths = [self.folder / f"{shard['name']}.bin" for shard in self.manifest["shards"]]
        counts = [shard["records"] for shard in self.manifest["shards"]]
        stats = self._shard_stats()
        for bin_path, shard in zip(self.paths, self.manifest["shards"]) if check_shards else ():
            self._check_shard(bin_path, shard["records"], stats.get("shards", {}).get(shard["name"]))
        self.skips = self._duplicates(np.cumsum([0] + counts), stats.get("duplicates"))
        self.offsets = np.cumsum([0] + [n - len(e) for n, e in zip(counts, self.skips)])
        self.files = OpenFiles()

    def _duplicates(self, raw_offsets: np.ndarray, stat: list | None) -> list[np.ndarray]:
        """Per shard, the sorted indices of its records left out, each minus the number left out before it
        (so that kept record k is record k + searchsorted(that, k, 'right') of the shard). Its sha256 is
        computed (a second read) only when SHARD_STATS (`stat`) does not record its size, mtime and the
        manifest's sha256: it is 320 MB at 40M duplicates, read by every rank."""
        entry = self.manifest.get("duplicates")  # absent in folders made before duplicates across shards were found
        if not entry or not entry["count"]:
            return [np.zeros(0, dtype=np.int64) for _ in self.paths]
        path = self.folder / entry["file"]
        st = path.stat() if path.is_file() else None
        unchanged = st is not None and stat == [*stamp(st), entry["sha256"]]
        if st is None or not unchanged and sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path} is missing or does not match the sha256 in {self.folder / 'manifest.json'}: "
                            "rebuild it with data_pipeline.pretokenize --manifest-only (same arguments)")
        found = np.load(path, allow_pickle=False).astype(np.int64)
        # Sorted (find_duplicates wrote it, the sha256 matches), so each shard's part is one slice: a mask per
        # shard would scan all of them once per shard (47 min per rank at 41,000 shards and 40M duplicates).
        cuts = np.searchsorted(found, raw_offsets)
        return [found[a:b] - start - np.arange(b - a) for start, a, b in zip(raw_offsets, cuts[:-1], cuts[1:])]

    def __getstate__(self):  # for a DataLoader worker that is not forked: it opens files of its own
        return {**self.__dict__, "files": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.files = OpenFiles()

    def _shard_stats(self) -> dict:
        """SHARD_STATS's content: {} for a folder made before write_manifest wrote it, or beside a manifest of
        another header than its entries were made with (the manifest was edited or replaced since: then every
        shard is checked against it from its NNNNN.json)."""
        path = self.folder / SHARD_STATS
        if not path.is_file():
            return {}
        content = read_json(path)
        stats, duplicates = content.get("shards"), content.get("duplicates")
        if (not isinstance(stats, dict) or not all(isinstance(v, list) and len(v) == len(STAT_KEYS)
                                                   for v in stats.values())
                or not (duplicates is None or isinstance(duplicates, list) and len(duplicates) == 3)):
            raise DataError(f"{path}: expected {{\"header\": digest, \"shards\": {{name: {list(STAT_KEYS)}}}, "
                            "\"duplicates\": [bytes, mtime_ns, sha256] | null}: it is damaged; rebuild it with "
                            "data_pipeline.pretokenize --manifest-only (same arguments)")
        return content if content.get("header") == header_digest(self.manifest) else {}

    def _check_shard(self, bin_path: Path, records: int, stat: list | None) -> None:
        """The shard's makings, its size and its values, or a DataError naming it. A .bin with the size and
        mtime its SHARD_STATS entry (`stat`) records is checked from that entry alone (write_manifest wrote
        it only for a shard made with the manifest's header), so opening costs one stat per shard: at 70,000
        shards and hundreds of ranks, every NNNNN.json read on every rank is tens of millions of small-file
        reads on a parallel file system. Any other (replaced, edited or copied in since) is checked from its
        NNNNN.json and its records."""
        st = bin_path.stat()
        if stat is not None and stat[:2] == stamp(st):
            meta = dict(zip(STAT_KEYS, stat))
        else:
            meta_path = bin_path.with_suffix(".json")
            meta = read_json(meta_path) if meta_path.is_file() else {}
            head = {k: self.manifest.get(k) for k in HEADER_KEYS}
            diff = header_differences(meta["header"], head) if "header" in meta else []
            if diff:  # e.g. a shard copied in from another folder
                raise DataError(f"{bin_path} was made with another image tokenizer, text tokenizer, image decoding "
                                f"or filters than {self.folder / 'manifest.json'} says: {'; '.join(diff)}; "
                                "pre-tokenize again into a new --output folder")
        if st.st_size != records * self.dtype.itemsize:
            raise DataError(f"{bin_path}: {st.st_size} bytes, expected {records} records of "
                            f"{self.dtype.itemsize} bytes")
        self._check_values(bin_path, records, meta, st)

    def _check_values(self, bin_path: Path, records: int, meta: dict, st: os.stat_result) -> None:
        """Every code < vq.codebook_size and every text id < the text vocab_size, or a DataError naming the shard."""
        if not records:
            return
        max_code, max_text = shard_maxima(bin_path, self.dtype, meta, st)
        for field, largest, limit, what in (
                ("codes", max_code, self.manifest["vq"]["codebook_size"], "image code {v} is outside the codebook "
                 "of {n} (manifest.json vq.codebook_size)"),
                ("text", max_text, self.manifest["text_tokenizer"]["vocab_size"], "text id {v} is outside the text "
                 "vocabulary of {n} (manifest.json text_tokenizer.vocab_size)")):
            if largest >= limit:
                at = first_record_at_or_above(bin_path, self.dtype, field, limit)
                raise DataError(f"{bin_path}: {what.format(v=largest, n=limit)} at record {at}; the shard is "
                                "damaged or was not made with this folder's tokenizers: pre-tokenize again into a "
                                "new --output folder")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def record(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside 0..{len(self) - 1} of {self.folder}")
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        k = int(index - self.offsets[shard])
        k += int(np.searchsorted(self.skips[shard], k, side="right"))
        data = os.pread(self.files.fd(self.paths[shard]), self.dtype.itemsize, k * self.dtype.itemsize)
        if len(data) != self.dtype.itemsize:  # (the size was checked at open: the file changed since)
            raise DataError(f"{self.paths[shard]}: record {k} ends past the file's end; the shard changed after "
                            "the dataset was opened")
        return np.frombuffer(data, dtype=self.dtype)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.record(index)
        return torch.from_numpy(r["text"].astype(np.int64)), torch.from_numpy(r["codes"].astype(np.int64))

    def caption(self, index: int) -> str:
        return self.record(index)["caption"].decode("utf-8", "ignore")


class OpenFiles:
    """Read-only file descriptors of the shards read recently, at most `limit` at once (least recently used
    closed first). Records are read with os.pread, not from a memory map per shard: Python's mmap keeps a file
    descriptor per map, and a process may hold ~1,024 (`ulimit -n`'s usual soft limit) and 65,530 maps
    (vm.max_map_count): LAION-400M in shards of 10,000 is 41,000 shards, LAION-2B 230,000. A random order over
    many shards seldom finds its shard open; a miss costs one open(), no more than mapping it would."""

    def __init__(self, limit: int | None = None):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.limit = limit or max(8, min(256, soft // 4))  # (DataLoader workers, sockets, logs need the rest)
        self.open: OrderedDict[Path, int] = OrderedDict()

    def fd(self, path: Path) -> int:
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        if len(self.open) >= self.limit:
            os.close(self.open.popitem(last=False)[1])
        self.open[path] = os.open(path, os.O_RDONLY)
        return self.open[path]

    def __del__(self):
        for fd in self.open.values():
            try:
                os.close(fd)
            except OSError:  # (already closed, e.g. at interpreter exit)
                pass


_SCANNED: dict[tuple, tuple[int, int]] = {}


def shard_maxima(bin_path: Path, dtype: np.dtype, meta: dict, st: os.stat_result | None = None) -> tuple[int, int]:
    """(largest code, largest text id) of one shard's records: from its metadata (NNNNN.json) while the .bin has
    the size and mtime recorded there when pretokenize wrote it, else one vectorised pass over the memory map
    (in chunks of CHUNK_RECORDS), remembered for this process by the file's path, size, mtime and inode. `st`:
    the .bin's stat, where the caller has it."""
    st = st or bin_path.stat()
    if [meta.get("bytes"), meta.get("mtime_ns")] == stamp(st) and "max_code" in meta:
        return int(meta["max_code"]), int(meta["max_text_id"])
    key = (str(bin_path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SCANNED:
        array = np.memmap(bin_path, dtype=dtype, mode="r")  # (unmapped on return)
        max_code = max_text = 0
        for start in range(0, len(array), CHUNK_RECORDS):
            chunk = array[start:start + CHUNK_RECORDS]
            max_code = max(max_code, int(chunk["codes"].max(initial=0)))
            max_text = max(max_text, int(chunk["text"].max(initial=0)))
        _SCANNED[key] = (max_code, max_text)
    return _SCANNED[key]


def first_record_at_or_above(bin_path: Path, dtype: np.dtype, field: str, limit: int) -> int | str:
    """Index of the first record with a value >= limit in `field` (only called once one is known to exist)."""
    array = np.memmap(bin_path, dtype=dtype, mode="r")
    for start in range(0, len(array), CHUNK_RECORDS):
        bad = np.flatnonzero((array[start:start + CHUNK_RECORDS][field] >= limit).any(axis=1))
        if len(bad):
            return start + int(bad[0])
    return "?"  # only the recorded maximum says so


class MixedDataset:
    """Several datasets blended by weight, as Megatron's BlendedDataset: an epoch of `size` positions (the
    datasets' total by default), dataset d taking weight_d / sum(weights) of them (exactly, by largest
    remainders) as one block; the sampler's permutation of each epoch mixes the blocks. Dataset d's draws
    continue from epoch to epoch where the last one stopped (`at_epoch`), so a dataset weighted below its
    size is seen whole over several epochs instead of the same part every epoch, and one weighted above
    it is cycled. Its records are walked in a golden-ratio stride order, not in file order, so an epoch's
    part of it spreads over all its shards. Constant memory: nothing is held per position."""

    def __init__(self, datasets: list, weights: list[float], size: int | None = None):
        if len(datasets) != len(weights) or not datasets or min(weights) <= 0:
            raise ValueError("MixedDataset needs one positive weight per dataset")
        self.datasets = datasets
        self.size = size or sum(len(d) for d in datasets)
        exact = np.array(weights, dtype=np.float64) / sum(weights) * self.size
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(counts - exact, kind="stable")[:self.size - counts.sum()]] += 1  # the largest remainders
        self.counts, self.starts = counts, np.concatenate([[0], np.cumsum(counts)])
        self.strides = [_coprime_stride(len(d)) for d in datasets]

    def __len__(self) -> int:
        return self.size

    def at_epoch(self, index: int, epoch: int):
        """Position `index` of epoch `epoch` (data_pipeline.loader passes the stream position's epoch)."""
        d = int(np.searchsorted(self.starts, index, side="right") - 1)
        n = len(self.datasets[d])
        draw = (epoch * int(self.counts[d]) + index - int(self.starts[d])) % n
        return self.datasets[d][draw * self.strides[d] % n]

    def __getitem__(self, index: int):
        return self.at_epoch(index, 0)


def _coprime_stride(n: int) -> int:
    """A step through 0..n-1 that visits each once (coprime to n) and far apart (near n / golden ratio)."""
    stride = max(1, round(n * 0.6180339887))
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


TOKENIZERS = {"vq": "image tokenizer", "text_tokenizer": "text tokenizer"}  # manifest.json's entries of each


def data_tokenizers(dataset) -> dict | None:
    """The image and text tokenizers a dataset's samples were made with (manifest.json's `vq` and `text_tokenizer`
    entries, with their content hashes); None for data that records none (data_pipeline.synthetic)."""
    first = dataset.datasets[0] if isinstance(dataset, MixedDataset) else dataset  # (a blend shares them)
    manifest = getattr(first, "manifest", None)
    return {k: manifest[k] for k in TOKENIZERS} if manifest else None


def other_tokenizers(a: dict, b: dict) -> list[str]:
    """The names of the tokenizers whose content hashes differ between two data_tokenizers() results: codes or
    text ids made by one mean other image patches or words to a model trained on the other's. (A detokenizer
    fine-tuned on the frozen codes keeps the image tokenizer's hash: vq/tokenizer.py.)"""
    return [name for k, name in TOKENIZERS.items() if a[k].get("hash") != b[k].get("hash")]


def blend_items(spec: str) -> list[tuple[str, str, str]]:
    """`codes/a:3,codes/b:1` (folder[:weight], comma-separated) -> [(item, folder, weight text)]. The weight is
    what follows the last ':'; an item that is itself an existing folder (a name holding ':') has none."""
    items = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        folder, colon, weight = item.rpartition(":")
        items.append((item, item, "") if not colon or Path(item).is_dir() else (item, folder, weight))
    return items


def open_training_data(spec: str, model_cfg, check_shards: bool = True):
    """`codes/` or `codes/a:3,codes/b:1` (folder[:weight], comma-separated) -> a dataset the model fits
    (`check_shards`: CodeShardDataset's)."""
    parts = []
    for item, folder, weight in blend_items(spec):
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            weight = -1.0
        if not 0 < weight < float("inf"):
            raise DataError(f"{item}: the weight after ':' must be a positive number (folder:weight)")
        ds = CodeShardDataset(folder, text_len=model_cfg.text_seq_len, grid_tokens=model_cfg.image_seq_len,
                              check_shards=check_shards)
        for name, have, limit in (("codebook_size", ds.manifest["vq"]["codebook_size"], model_cfg.image_vocab_size),
                                  ("text vocab_size", ds.manifest["text_tokenizer"]["vocab_size"],
                                   model_cfg.text_vocab_size)):
            if have > limit:
                raise DataError(f"{folder}: {name} {have} exceeds the model's "
                                f"{'model.image_vocab_size' if 'codebook' in name else 'model.text_vocab_size'}"
                                f"={limit}")
        parts.append((ds, weight))
    if not parts:
        raise DataError("data.shards is empty: give a code-shard folder (or folder:weight,folder:weight)")
    first = parts[0][0]
    for ds, _ in parts[1:]:
        differ = other_tokenizers(data_tokenizers(first), data_tokenizers(ds))
        if differ:
            raise DataError(f"{ds.folder} was made with another {' and '.join(differ)} than {first.folder} "
                            "(manifest.json vq.hash / text_tokenizer.hash): a blend must share both, or the same code "
                            "means another image patch and the same id another word; pre-tokenize one with the "
                            "other's tokenizers")
    if len(parts) == 1:
        return parts[0][0]
    mixed = MixedDataset([d for d, _ in parts], [w for _, w in parts])
    for (ds, weight), count in zip(parts, mixed.counts):
        if count == 0:  # its share of the epoch rounds to no sample: the model would never see it
            raise DataError(f"{ds.folder}: weight {weight:g} gives it none of an epoch's {len(mixed)} samples "
                            f"(share {weight / sum(w for _, w in parts):.2e}); raise its weight or leave it out")
    return mixed
