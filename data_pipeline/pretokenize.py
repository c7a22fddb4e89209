r"""Pre-tokenize LAION-style shards into code shards: filter, resize, VQ-encode, tokenize captions.

    python -m data_pipeline.pretokenize --input 'laion/{00000..00099}.tar' --output codes/ \
        --vq runs/vq/export.pt --text-tokenizer tok/spm.model [--shard-index I --num-shards N] [--workers W]

Input tar i (in the expanded order) becomes output shard `{i:05d}`; array task I of N takes inputs I, I+N,
I+2N, ... so a SLURM array splits the work and the union equals one run. Each output shard is written under a
temporary name and renamed, then its metadata (record count, sha256, skip counts); a rerun skips finished
shards (checked against their checksum unless the .bin has the size and mtime recorded), so a killed run
restarts where it stopped and produces byte-identical shards. Each input tar is streamed (never held whole);
its images are decoded and resized in DataLoader workers, encoded in batches by the frozen tokenizer (on the
GPU when there is one). Duplicates (by image content hash) within an input shard are dropped there; each
shard's kept image hashes go to `NNNNN.hashes` beside it. manifest.json is rebuilt at the end of every task
from the metadata present; once every input is done (`complete`), that step also lists the records whose image
an earlier shard already holds in duplicates.npy (counted as `duplicate_across_shards`; training leaves them
out; the shards themselves are not rewritten). `--manifest-only` rebuilds both, e.g. after array tasks.

Every shard's metadata records the header (image tokenizer, text tokenizer, record layout, filters, image
decoding) it was made with, and its input's file name and size, so a rerun into a folder holding shards of
another header or of other inputs, manifest or not (a killed run), is refused before anything is written or
removed (more inputs than before are fine: the new shards are added). Inputs that are not tars at all, and
codes or text ids outside the tokenizers' ranges, are refused too; the command prints such errors as one line
(`error: ...`) and exits with status 1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from common.cli import command, description
from common.files import write_atomic
from data_pipeline.code_shards import (
    CAPTION_BYTES,
    HASH_BYTES,
    KEY_BYTES,
    hash_digest,
    header_differences,
    read_json,
    record_dtype,
    sha256_file,
    utf8_truncate,
)
from data_pipeline.errors import DataError
from data_pipeline.images import DECODING, FILTER_RULES, FilterConfig, in_turns, prepare_sample
from data_pipeline.laion import check_is_tar, expand_shards, read_shard
from data_pipeline.manifest import check_folder, shard_is_complete, write_manifest
from data_pipeline.text_tokenizer import TextTokenizer
from model_parallel.state import DeviceError, use_device
from vq.tokenizer import load_image_tokenizer


def encode_images(vq, images: list[torch.Tensor], device: str) -> np.ndarray:
    batch = torch.stack(images).to(device).float() / 127.5 - 1.0
    return vq.encode(batch).reshape(len(images), -1).cpu().numpy()


class ShardEnd(NamedTuple):
    """The last item of a PreparedShard: samples the tar held, and its read errors."""

    seen: int
    errors: Counter


class PreparedShard(torch.utils.data.IterableDataset):
    """One input tar's samples, prepared (data_pipeline.images.prepare_sample), in lists of `batch_size`,
    streamed: memory holds the lists in flight, not the tar (img2dataset shards of full-size images are
    gigabytes). The DataLoader workers prepare the lists in turns (data_pipeline.images.in_turns), so the
    records do not depend on their number; each reads the whole tar (the page cache shares it) and decodes
    only its own lists. Worker 0 (or the process, without workers) ends
    with a ShardEnd (the read errors: truncated_tar, duplicate_member)."""

    def __init__(self, path: Path, cfg: FilterConfig, batch_size: int):
        super().__init__()
        self.path, self.cfg, self.batch_size = path, cfg, batch_size

    def __iter__(self):
        errors, seen = Counter(), 0
        for batch, mine in in_turns(read_shard(self.path, errors), self.batch_size):
            seen += len(batch)
            if mine:
                yield [prepare_sample(raw, self.cfg) for raw in batch]
        info = torch.utils.data.get_worker_info()
        if info is None or info.id == 0:
            yield ShardEnd(seen, errors)


def as_is(item):
    """The DataLoader's collate_fn: PreparedShard's items as they are (not converted)."""
    return item


def prepared_batches(path: Path, cfg: FilterConfig, batch_size: int, workers: int):
    """PreparedShard's items, read by `workers` processes. A worker's failure to read the tar (gone or
    unreadable since the start's check) comes back as a DataError naming it in one line, as without workers
    (the DataLoader would raise it with the worker's whole traceback as its message)."""
    loader = torch.utils.data.DataLoader(PreparedShard(path, cfg, batch_size), batch_size=None, num_workers=workers,
                                         collate_fn=as_is)
    try:
        yield from loader
    except (OSError, DataError) as e:
        if not workers:
            raise
        cause = str(e).strip().splitlines()[-1]  # the worker's own message, after its traceback
        raise DataError(f"{path}: could not be read by a decoding worker ({cause})") from None


def process_shard(path: Path, vq, text_tok: TextTokenizer, cfg: FilterConfig, workers: int, batch_size: int,
                  device: str, progress: tqdm) -> tuple[np.ndarray, np.ndarray, Counter, int]:
    """Records of one input tar, their image hashes (uint8 [n, HASH_BYTES]), its skip counts, and how many
    samples it held."""
    dtype = record_dtype(vq.grid * vq.grid, text_tok.max_len)
    records, hashes, seen_hashes, skipped, seen = [], [], set(), Counter(), 0
    for batch in prepared_batches(path, cfg, batch_size, workers):
        if isinstance(batch, ShardEnd):
            seen = batch.seen
            skipped.update(batch.errors)
            continue
        kept = []
        for p in batch:
            if p.reason is None and p.image_hash in seen_hashes:
                p.reason = "duplicate"
            text = text_tok.encode(p.caption) if p.reason is None else None
            if text is not None and text[1] <= 1:  # no piece but EOS (a caption of zero-width spaces): that is the
                p.reason = "empty_caption"  # classifier-free guidance's null caption, not this image's
            if p.reason:
                skipped[p.reason] += 1
                continue
            seen_hashes.add(p.image_hash)
            kept.append((p, text))
        if kept:
            codes = encode_images(vq, [p.image for p, _ in kept], device)
            for (p, (ids, length)), c in zip(kept, codes):
                records.append((c, ids, length, utf8_truncate(p.caption, CAPTION_BYTES),
                                p.key.encode("ascii", "replace")[:KEY_BYTES]))
                hashes.append(np.frombuffer(hash_digest(p.image_hash), dtype=np.uint8))
        progress.update(len(batch))
    hashes = np.stack(hashes) if hashes else np.zeros((0, HASH_BYTES), dtype=np.uint8)
    return np.array(records, dtype=dtype), hashes, skipped, seen


def header(vq, text_tok: TextTokenizer, cfg: FilterConfig) -> dict:
    return {"vq": {"kind": vq.kind, "hash": vq.content_hash, "grid": vq.grid, "codebook_size": vq.codebook_size,
                   "image_size": vq.image_size},
            "text_tokenizer": {"hash": text_tok.content_hash, "vocab_size": text_tok.vocab_size,
                               "text_len": text_tok.max_len},
            "record": {"grid_tokens": vq.grid * vq.grid, "text_len": text_tok.max_len,
                       "caption_bytes": CAPTION_BYTES, "key_bytes": KEY_BYTES},
            "filters": {**asdict(cfg), "rules": FILTER_RULES}, "image_decoding": DECODING}


def pretokenize(inputs: list[Path], output: Path, vq, text_tok: TextTokenizer, cfg: FilterConfig,
                shard_index: int = 0, num_shards: int = 1, workers: int = 0, batch_size: int = 32,
                device: str = "auto") -> dict:
    """`device`: auto | cuda | cpu (model_parallel.state.use_device: cuda without a GPU is an error)."""
    device = use_device(device, "--device")  # (before anything touches CUDA)
    if vq.codebook_size > 65536 or text_tok.vocab_size > 65536:
        raise DataError("codes and text ids are stored as uint16: codebook and vocabulary must be <= 65536")
    output.mkdir(parents=True, exist_ok=True)
    head = header(vq, text_tok, cfg)
    manifest_path = output / "manifest.json"
    if manifest_path.is_file():
        old = read_json(manifest_path)
        diff = header_differences({k: old.get(k) for k in head}, json.loads(json.dumps(head)))
        if diff:
            raise DataError(f"{manifest_path}: its code shards were made with another image tokenizer, text "
                            f"tokenizer, image decoding or filters than this run: {'; '.join(diff)}; use a new "
                            f"--output folder (nothing in {output} was changed)")
    check_folder(output, head, inputs)  # a killed run leaves shards but no manifest
    names = [f"{i:05d}" for i in range(len(inputs))]
    for i in range(shard_index, len(inputs), num_shards):  # leftovers of this task's killed runs
        for stale in output.glob(f".{names[i]}.*.tmp*"):  # (common.files.temporary_name)
            stale.unlink()
    mine = [i for i in range(shard_index, len(inputs), num_shards) if not shard_is_complete(output, names[i])]
    for i in mine:  # a wrong file is refused before hours of work, not when its turn comes
        check_is_tar(inputs[i])
    vq = vq.to(device)
    with tqdm(desc=f"pretokenize {shard_index}/{num_shards}", unit="img") as progress:
        start = time.perf_counter()
        for i in mine:
            records, hashes, skipped, seen = process_shard(inputs[i], vq, text_tok, cfg, workers, batch_size, device,
                                                           progress)
            max_code = int(records["codes"].max(initial=0))
            max_text_id = int(records["text"].max(initial=0))
            if max_code >= vq.codebook_size or max_text_id >= text_tok.vocab_size:
                raise DataError(f"{inputs[i]}: the tokenizers produced image code {max_code} (codebook_size "
                                f"{vq.codebook_size}) / text id {max_text_id} (vocab_size {text_tok.vocab_size}); "
                                "an id outside its range cannot be trained on: check the --vq / --text-tokenizer files")
            bin_path = output / f"{names[i]}.bin"
            write_atomic(bin_path, records.tobytes())
            write_atomic(output / f"{names[i]}.hashes", hashes.tobytes())  # for the cross-shard pass
            st = bin_path.stat()
            meta = {"input": str(inputs[i]), "input_bytes": inputs[i].stat().st_size, "records": len(records),
                    "seen": seen, "sha256": sha256_file(bin_path), "skipped": dict(sorted(skipped.items())),
                    "header": head, "max_code": max_code, "max_text_id": max_text_id,
                    "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "hashes_sha256": hashlib.sha256(hashes.tobytes()).hexdigest()}
            write_atomic(output / f"{names[i]}.json", json.dumps(meta, indent=1).encode())
            progress.set_postfix(images_per_s=f"{progress.n / (time.perf_counter() - start):.1f}")
    return write_manifest(output, head, names)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--input", required=True, help="shard pattern, e.g. 'laion/{00000..00099}.tar'")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--vq", required=True, help="exported image tokenizer (vq/tokenizer.py format)")
    parser.add_argument("--text-tokenizer", required=True, help="SentencePiece .model")
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="image-decoding DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--manifest-only", action="store_true", help="only rebuild manifest.json")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto | cuda | cpu: cuda (what the sbatch scripts pass) makes a missing GPU an error "
                        "instead of hours on the CPU; cpu hides the GPUs")
    for f in fields(FilterConfig):
        if f.name != "image_size":
            parser.add_argument("--" + f.name.replace("_", "-"), type=float if "float" in str(f.type) else int,
                                default=f.default)
    args = parser.parse_args(argv)
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index {args.shard_index} must be in 0..{args.num_shards - 1}")
    if args.batch_size < 1 or args.workers < 0:  # (batch 0 wrote empty shards that a rerun took as finished)
        parser.error(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")

    with command(errors=(DataError, FileNotFoundError, DeviceError)):
        vq = load_image_tokenizer(args.vq)
        cfg = FilterConfig(image_size=vq.image_size, **{f.name: getattr(args, f.name) for f in fields(FilterConfig)
                                                       if f.name != "image_size"})
        text_tok = TextTokenizer(args.text_tokenizer, args.text_len)
        inputs = expand_shards(args.input)
        if args.manifest_only:
            head = header(vq, text_tok, cfg)
            check_folder(args.output, head, inputs)
            manifest = write_manifest(args.output, head, [f"{i:05d}" for i in range(len(inputs))])
        else:
            manifest = pretokenize(inputs, args.output, vq, text_tok, cfg, args.shard_index, args.num_shards,
                                   args.workers, args.batch_size, args.device)
    print(f"{args.output}: {manifest['records']} records in {len(manifest['shards'])}/{manifest['num_inputs']} "
          f"shards; skipped {manifest['skipped']}")


if __name__ == "__main__":
    main()
