"""A code-shard folder's shared files, written by pretokenize's manifest step: manifest.json, duplicates.npy
and shard_stats.json (formats: data_pipeline/code_shards.py), and the checks made before anything is written
into a folder (its shards' headers and inputs against this run's).

    check_folder(out, header, inputs)             # refuse a folder of another run (nothing written)
    manifest = write_manifest(out, header, names) # after a task's shards; complete once all names are there

Every array task checks the folder at its start and rebuilds the manifest at its end from the NNNNN.json files
present (the last one to finish writes the complete one).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from common.files import abandoned_temporaries, write_atomic
from data_pipeline.code_shards import (
    DUPLICATES,
    FORMAT,
    HASH_BYTES,
    PRIVATE_META,
    SHARD_META,
    SHARD_STATS,
    STAT_KEYS,
    header_differences,
    header_digest,
    read_json,
    sha256_file,
    stamp,
)
from data_pipeline.errors import DataError


def shard_is_complete(folder: Path, name: str) -> bool:
    """The shard's metadata exists and its records and image hashes match the recorded checksums (a shard of
    records written by a version that kept no hashes is not: a rerun makes it again, byte-identical). A .bin
    with the size and mtime its metadata recorded is taken as written, as the dataset's open takes it (a
    restarted task would otherwise read all its finished shards again: ~30 MB each)."""
    meta_path, bin_path, hashes_path = folder / f"{name}.json", folder / f"{name}.bin", folder / f"{name}.hashes"
    if not (meta_path.is_file() and bin_path.is_file()):
        return False
    meta = read_json(meta_path)
    as_written = [meta.get("bytes"), meta.get("mtime_ns")] == stamp(bin_path.stat())
    if not as_written and meta.get("sha256") != sha256_file(bin_path):
        return False
    if "hashes_sha256" in meta:
        return hashes_path.is_file() and meta["hashes_sha256"] == sha256_file(hashes_path)
    return meta.get("records") == 0


def shard_hashes(folder: Path, name: str, records: int) -> np.ndarray:
    """uint8 [records, HASH_BYTES]: the image hash of each record of shard `name`."""
    path = folder / f"{name}.hashes"
    if not records:
        return np.zeros((0, HASH_BYTES), dtype=np.uint8)
    if not path.is_file():
        raise DataError(f"{path} is missing: shard {name} was written by a version that kept no image hashes, so "
                        "duplicates across shards cannot be found; rerun data_pipeline.pretokenize with the same "
                        "arguments (it makes that shard again, byte-identical, with its hashes)")
    data = np.fromfile(path, dtype=np.uint8)
    if len(data) != records * HASH_BYTES:
        raise DataError(f"{path}: {len(data)} bytes, expected {records} hashes of {HASH_BYTES} bytes")
    return data.reshape(records, HASH_BYTES)


BUCKET_BITS = 4
"""The duplicates pass sorts the hashes in 2^BUCKET_BITS parts, one at a time, by their first bits."""


def find_duplicates(hashes: Iterable[np.ndarray], total: int) -> np.ndarray:
    """Sorted int64 indices, among the `total` records of all shards in order (`hashes`: each shard's uint8
    [records, HASH_BYTES], read one at a time), of the records whose hash an earlier one has: the first of
    each hash is kept, whatever shard or record order the array tasks ran in.

    Memory: the hashes once (16 bytes a record) plus 1/2^BUCKET_BITS of them sorted at a time, ~25 bytes a
    record in all; sorting all at once took ~60 (24 GB at LAION-400M, 120 GB at 2B; bench/duplicates_pass.py).
    Equal hashes share a part, so the parts' duplicates are the whole's."""
    keys, at = np.empty((total, 2), dtype=">u8"), 0  # the hash as two big-endian 64-bit words
    for part in hashes:
        if at + len(part) <= total:
            keys[at:at + len(part)] = np.ascontiguousarray(part).view(">u8")
        at += len(part)
    if at != total:  # (shard_hashes checks each shard's against its own count)
        raise DataError(f"the shards' image hashes hold {at} records, their metadata {total}")
    bucket = (keys[:, 0] >> np.uint64(64 - BUCKET_BITS)).astype(np.uint8)
    found = []
    for b in range(1 << BUCKET_BITS):
        index = np.flatnonzero(bucket == b)  # ascending: a stable sort keeps equal hashes in record order
        part = keys[index]
        order = np.lexsort((part[:, 1], part[:, 0]))
        ordered = part[order]
        repeat = np.zeros(len(order), dtype=bool)
        repeat[1:] = (ordered[1:] == ordered[:-1]).all(axis=1)
        found.append(index[order[repeat]])
    return np.sort(np.concatenate(found)).astype(np.int64)


def check_folder(folder: Path, header: dict, inputs: list[Path] | None = None) -> None:
    """Refuse (DataError) a folder holding a finished shard (NNNNN.json present) made with another image
    tokenizer, text tokenizer, record layout or filters than `header`, or, given `inputs`, made from other
    inputs (output shard i is input i): a shard whose recorded input has another file name (or, where
    recorded, another size) than input i, or a shard beyond the last input (the manifest would leave it out:
    its samples would silently be lost to training). More inputs than before are fine: the folder grows by
    the new shards. Nothing is written or removed; each NNNNN.json is read once (every array task does this
    at its start: at 40,000 shards and hundreds of tasks, a pass is millions of small-file reads)."""
    if not folder.is_dir():
        return
    headers, other_input = HeaderCheck(folder, header), None
    for meta_path in sorted((p for p in folder.iterdir() if SHARD_META.match(p.name)), key=lambda p: int(p.stem)):
        meta = read_json(meta_path)
        headers.add(meta_path, meta)
        if inputs is not None and other_input is None:
            problem = _input_problem(int(meta_path.stem), meta, inputs)
            other_input = problem and f"{meta_path.with_suffix('.bin')} {problem}"
    headers.raise_if_mismatched()
    if other_input:
        raise DataError(f"{other_input}: the --input pattern is not the one this folder was begun with; give that "
                        f"pattern (more shards may follow it) or a new --output folder (nothing in {folder} was "
                        "changed)")


class HeaderCheck:
    """The shards' recorded headers against `header`, one NNNNN.json at a time (`add`), then
    `raise_if_mismatched`: a DataError naming the first that differs and how many more do. A shard written
    before shards recorded their header is held to the folder's manifest.json."""

    def __init__(self, folder: Path, header: dict):
        self.folder, self.want, self.mismatched, self._manifest = folder, json.loads(json.dumps(header)), [], None

    def add(self, meta_path: Path, meta: dict) -> bool:
        """Whether the shard's own recorded header is `header` (False for one held to the manifest's)."""
        have = meta.get("header")
        if have is None and self._manifest is None and (self.folder / "manifest.json").is_file():
            self._manifest = read_json(self.folder / "manifest.json")
        if have is None and self._manifest is not None:
            have = {k: self._manifest.get(k) for k in self.want}
        if have is None:
            raise DataError(f"{meta_path.with_suffix('.bin')} records no tokenizer header (an older version wrote "
                            "it, and there is no manifest.json): it cannot be checked against this run; use a new "
                            "--output folder (nothing was changed)")
        diff = header_differences(have, self.want)
        if diff:
            self.mismatched.append((meta_path.with_suffix(".bin"), diff))
        return not diff and "header" in meta

    def raise_if_mismatched(self) -> None:
        if self.mismatched:
            path, diff = self.mismatched[0]
            more = f" (and {len(self.mismatched) - 1} more shard(s))" if len(self.mismatched) > 1 else ""
            raise DataError(f"{path}{more} was made with another image tokenizer, text tokenizer, image decoding or "
                            f"filters than this run: {'; '.join(diff)}; use a new --output folder (nothing in "
                            f"{self.folder} was changed)")


def _input_problem(index: int, meta: dict, inputs: list[Path]) -> str | None:
    """Why shard `index` (its metadata `meta`) was not made from inputs[index], or None."""
    made_from = meta.get("input")
    if index >= len(inputs):
        return f"was made from input {index} ({made_from}), and this run has only {len(inputs)} input(s)"
    if made_from is not None and Path(made_from).name != inputs[index].name:
        return f"was made from {made_from}, and this run's input {index} is {inputs[index]}"
    size = inputs[index].stat().st_size
    if meta.get("input_bytes", size) != size:
        return (f"was made from {made_from} of {meta['input_bytes']} bytes, and this run's input {index} "
                f"({inputs[index]}) has {size}")
    return None


def write_manifest(folder: Path, header: dict, names: list[str]) -> dict:
    """manifest.json from the shards' metadata files present now; `complete` when all `names` are, and then
    duplicates.npy too (the records whose image an earlier shard or record holds). Refused (DataError), with
    nothing written, when a shard among `names` was made with another header, or, once complete, lacks its
    image hashes. Made again when a shard appeared meanwhile (array tasks finishing together): the last
    task's manifest is the complete one. Refused too when the folder holds a shard beyond `names`: a run with
    more inputs grew it while this one ran, and this manifest would drop that run's shards. The temporary files
    of killed manifest steps are removed first (common.files.abandoned_temporaries: those of this host's dead
    processes, any a day old)."""
    def present() -> list[str]:  # one listing, not a stat per shard
        on_disk = set(os.listdir(folder))
        beyond = sorted((f for f in on_disk if SHARD_META.match(f) and int(f.split(".")[0]) >= len(names)),
                        key=lambda f: int(f.split(".")[0]))
        if beyond:
            raise DataError(f"{folder / beyond[0]}: a shard beyond this run's {len(names)} input(s) (a run with more "
                            "inputs grew the folder meanwhile); this run's shards are written, the manifest is left "
                            "to that run (or rebuild it with --manifest-only and that run's --input)")
        return [n for n in names if f"{n}.json" in on_disk]

    for shared in ("manifest.json", SHARD_STATS, DUPLICATES):  # what killed manifest steps left half written
        for tmp in abandoned_temporaries(folder / shared):
            tmp.unlink(missing_ok=True)
    while True:
        done = present()
        manifest, stats = _manifest(folder, header, names, done)
        write_atomic(folder / SHARD_STATS, json.dumps({"header": header_digest(header), **stats}).encode())
        write_atomic(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
        if present() == done:
            return manifest


def _manifest(folder: Path, header: dict, names: list[str], present: list[str]) -> tuple[dict, dict]:
    """(the manifest, SHARD_STATS's content but its header: "shards", the STAT_KEYS of each shard made with
    `header`, and "duplicates", DUPLICATES's [bytes, mtime_ns, sha256] once complete). The manifest is a
    function of the inputs and tokenizers alone (array tasks or one run, the same bytes); the files' times
    live in SHARD_STATS."""
    shards, stats, headers = [], {}, HeaderCheck(folder, header)
    for n in present:
        meta = read_json(folder / f"{n}.json")
        own_header = headers.add(folder / f"{n}.json", meta)
        shards.append({"name": n, **{k: v for k, v in meta.items() if k not in PRIVATE_META}})
        if own_header and all(k in meta for k in STAT_KEYS):
            stats[n] = [meta[k] for k in STAT_KEYS]
    headers.raise_if_mismatched()  # (before anything is written)
    complete = len(shards) == len(names)
    duplicates = stats_of_duplicates = None
    if complete:  # the cross-shard pass, once every shard is there
        found = find_duplicates((shard_hashes(folder, s["name"], s["records"]) for s in shards),
                                sum(s["records"] for s in shards))
        starts = np.cumsum([0] + [s["records"] for s in shards])
        for s, count in zip(shards, np.diff(np.searchsorted(found, starts))):
            s["duplicates"] = int(count)
            if count:
                s["skipped"] = dict(sorted({**s["skipped"], "duplicate_across_shards": int(count)}.items()))
        data = npy_bytes(found)
        write_atomic(folder / DUPLICATES, data)  # before the manifest that names it
        duplicates = {"file": DUPLICATES, "count": len(found), "sha256": hashlib.sha256(data).hexdigest()}
        stats_of_duplicates = [*stamp((folder / DUPLICATES).stat()), duplicates["sha256"]]
    skipped: dict[str, int] = {}
    for s in shards:
        for reason, count in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {"format": FORMAT, **header, "shards": shards,
            "records": sum(s["records"] for s in shards) - (duplicates["count"] if duplicates else 0),
            "skipped": dict(sorted(skipped.items())), "num_inputs": len(names), "complete": complete,
            "duplicates": duplicates}, {"shards": stats, "duplicates": stats_of_duplicates}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
