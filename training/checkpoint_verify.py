"""Safety of what a checkpoint gives back: its files checked before anything is built from them.

    index = verify(run_dir / "checkpoints" / "step_00000100")   # CheckpointError naming the file, or its index
    state = load_rng_file(path / "rng_rank0.pt")

The tensor index `.metadata` (a pickle that torch.distributed.checkpoint unpickles unrestricted) is first read
with an unpickler that admits only its own record classes, each `.distcp` file must hold every record the index
places in it, and rng_rank*.pt files load with torch.load(weights_only=True): a crafted file is refused, naming
it, instead of running code. (training/checkpoint.py writes and loads checkpoints; the trainer calls `verify`
on rank 0 before a resume.)
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from common.checkpoints import CheckpointError, one_line


class _IndexUnpickler(pickle.Unpickler):
    """Reads torch.distributed.checkpoint's `.metadata` admitting only its record classes (dataclasses
    and enums of torch.distributed.checkpoint.metadata/planner, the filesystem writer's _StorageInfo),
    torch.Size, dtypes and layouts; anything else (builtins.exec, os.system, ...) is refused unrun."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        allowed = False
        if module in self.MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            allowed = isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        elif (module, name) in (("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")):
            allowed = True
        elif module == "torch":
            allowed = isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_index(path: Path):
    """The torch.distributed.checkpoint Metadata of a checkpoint folder, read safely."""
    file = path / ".metadata"
    try:
        with open(file, "rb") as f:
            return _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "refused global" in str(e):
            raise CheckpointError(f"{file}: the tensor index would import {str(e).split('refused global ')[1]} "
                                  "when read (it may run code); refusing to load it (an index holds only "
                                  "torch.distributed.checkpoint records)") from None
        raise CheckpointError(f"{file}: corrupt tensor index ({one_line(e)})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise CheckpointError(f"{file}: cannot read the tensor index ({type(e).__name__}: {one_line(e)}); "
                              "expected torch.distributed.checkpoint's .metadata") from None


def load_rng_file(file: Path) -> dict:
    """A rng_rank*.pt file, loaded with weights_only=True (tensors and plain containers only)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, OSError
        text = one_line(e)
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsupported:  # (torch names builtins without their module)
            name = unsupported.group(1) if "." in unsupported.group(1) else f"builtins.{unsupported.group(1)}"
            text = f"it would import {name} when loaded, which may run code"
        raise CheckpointError(f"{file}: not a plain RNG-state file ({text}); refusing to load it "
                              "(torch.load weights_only=True)") from None
    tracker = state.get("tracker") if isinstance(state, dict) else None
    plain = (isinstance(tracker, dict) and all(map(_is_byte_tensor, tracker.values()))
             and _is_byte_tensor(state.get("torch")) and _is_byte_tensor(state.get("cuda", state.get("torch"))))
    if not plain:
        # (torch.set_rng_state of another tensor, or of none, failed on resume with a traceback)
        found = ({k: f"{type(v).__name__}{f' {v.dtype}' if torch.is_tensor(v) else ''}" for k, v in state.items()}
                 if isinstance(state, dict) else type(state).__name__)
        raise CheckpointError(f"{file}: expected {{'torch': ByteTensor, 'tracker': {{name: ByteTensor}}}}, "
                              f"found {str(found)[:200]}")
    return state


def _is_byte_tensor(value) -> bool:
    return torch.is_tensor(value) and value.dtype == torch.uint8


ZIP_RECORD = b"PK\x03\x04"  # torch.save's zip archive: every tensor record of a .distcp starts with one
ZIP_END, ZIP_END_SIZE = b"PK\x05\x06", 22  # and ends with its end-of-central-directory record (no comment)


def verify(path: Path) -> Metadata:
    """The tensor index of a checkpoint folder, once its files are checked: refuse (CheckpointError naming the
    file) a checkpoint folder whose files cannot be what its index
    says: index unreadable, unsafe (a record class outside its own, an entry that is not a tensor) or malformed, a
    .distcp file missing, shorter than its records reach, or without a tensor record where one should start or
    the end of one where it should end;
    an RNG file that is not plain tensors; metadata.json or common.pt missing or unreadable. Reads the index,
    8 bytes per record and the small RNG files. (Bit flips inside a tensor's bytes are not detected: the
    format has no checksums.)"""
    index = read_index(path)
    entries, storage = getattr(index, "state_dict_metadata", None), getattr(index, "storage_data", None)
    if not (isinstance(index, Metadata) and isinstance(entries, dict) and isinstance(storage, dict)):
        # (a pickle of anything the reader admits passes it; this failed with an AttributeError, naming no file)
        raise CheckpointError(f"{path / '.metadata'}: holds {type(index).__name__} without its tensor entries and "
                              "storage records, not torch.distributed.checkpoint's tensor index")
    # (a bytes record is read back with torch.load(weights_only=False): a crafted one could run code)
    others = [fqn for fqn, entry in entries.items() if not isinstance(entry, TensorStorageMetadata)]
    if others:
        raise CheckpointError(f"{path / '.metadata'}: {others[0]} is indexed as {type(entries[others[0]]).__name__}, "
                              "not a tensor, and loading it would unpickle it unrestricted; the trainers' "
                              "checkpoints hold tensors only: refusing to load it")
    _check_every_chunk_stored(path, entries, storage)
    files: dict[str, list[tuple[int, int, bool]]] = {}
    for where, info in storage.items():
        record = [getattr(info, name, None) for name in ("relative_path", "offset", "length")]
        # (a name such as ../x or /x: reading it, here and in the load, would reach outside the checkpoint)
        in_folder = isinstance(record[0], str) and Path(record[0]).name == record[0] not in ("", ".", "..")
        if not (in_folder and all(type(n) is int and n >= 0 for n in record[1:])):
            # (else a TypeError from the sizes, or an OSError from reading at a negative offset)
            raise CheckpointError(f"{path / '.metadata'}: the storage record of {getattr(where, 'fqn', where)} is "
                                  f"{str(info)[:200]}, not a file name in the folder with a byte offset and length")
        tensor = isinstance(entries.get(getattr(where, "fqn", None)), TensorStorageMetadata)
        plain = tensor and not getattr(info, "transform_descriptors", None)
        files.setdefault(info.relative_path, []).append((info.offset, info.length, plain))
    # A thread per file, up to 32: a file's check is 4 bytes read at each end of each of its records (a record
    # per tensor block a rank wrote), a round trip each on a parallel file system; those of different files overlap.
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(files)))) as pool:
        for problem in pool.map(lambda item: _file_problem(path / item[0], item[1]), sorted(files.items())):
            if problem:  # (the first in file order, as a serial check would find)
                raise CheckpointError(problem)
    for file in sorted(path.glob("rng_rank*.pt")):
        load_rng_file(file)
    _check_megatron_files(path)
    return index


def _check_every_chunk_stored(path: Path, entries: dict, storage: dict) -> None:
    """Refuse an index that lists no tensors, or a tensor block (chunk) with no storage record: the load would
    fail on it with a bare KeyError (or, with no tensors, load nothing) after the job's start-up."""
    if not entries:
        raise CheckpointError(f"{path / '.metadata'}: indexes no tensors; a checkpoint's index lists the model's "
                              "and the optimizer's")
    for fqn, entry in entries.items():
        chunks = getattr(entry, "chunks", None)
        for chunk in chunks if isinstance(chunks, (list, tuple)) else [None]:
            offsets = getattr(chunk, "offsets", None)
            if not (isinstance(offsets, (list, tuple)) and all(type(n) is int for n in offsets)):
                # (else a bare TypeError or AttributeError from a crafted or garbled entry, naming no file)
                raise CheckpointError(f"{path / '.metadata'}: the blocks of {fqn} are {str(chunks)[:200]}, not "
                                      "tensor blocks with integer offsets")
            if MetadataIndex(fqn, offsets) not in storage:
                raise CheckpointError(f"{path / '.metadata'}: the block of {fqn} at offsets {list(offsets)} "
                                      "has no storage record (no file holds its bytes)")


def _check_megatron_files(path: Path) -> None:
    """dist_checkpointing's own files beside the tensors, which its load reads first: metadata.json (the
    format) and common.pt (the non-tensor state; torch.load weights_only, as megatron-core loads it)."""
    import json

    file = path / "metadata.json"
    try:
        problem = None if isinstance(json.loads(file.read_text()), dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        problem = one_line(e)
    if problem:
        raise CheckpointError(f"{file}: cannot be read ({problem}); expected megatron-core dist_checkpointing's "
                              "metadata.json, written with the checkpoint")
    file = path / "common.pt"
    try:
        torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - OSError, UnpicklingError, RuntimeError (zip), EOFError
        raise CheckpointError(f"{file}: cannot be read ({one_line(e)}); expected megatron-core "
                              "dist_checkpointing's common.pt (plain tensors and containers), written with the "
                              "checkpoint") from None


def _file_problem(file: Path, records: list[tuple[int, int, bool]]) -> str | None:
    """What is wrong with one .distcp file, given its records (offset, length, plain tensor?), or None."""
    if not file.is_file():
        return f"{file} is missing (the tensor index {file.parent / '.metadata'} places records in it)"
    size, end = file.stat().st_size, max(offset + length for offset, length, _ in records)
    if size < end:
        return f"{file} is truncated: {size} bytes, its tensor index expects {end}"
    fd = os.open(file, os.O_RDONLY)
    try:
        for offset, length, plain in sorted(records):
            if plain and os.pread(fd, 4, offset) != ZIP_RECORD:
                return f"{file} is corrupt: no tensor record at byte {offset}, where its tensor index places one"
            # (the zip's directory, which torch.load reads first: damaged there, the load failed without naming
            # the file, after the job's start-up)
            end = offset + length - ZIP_END_SIZE
            if plain and (length < ZIP_END_SIZE + 4 or os.pread(fd, 4, end) != ZIP_END):
                return (f"{file} is corrupt: the tensor record at byte {offset} does not end where its tensor index "
                        f"says ({length} bytes on, no zip end-of-directory at byte {end})")
    finally:
        os.close(fd)
    return None
