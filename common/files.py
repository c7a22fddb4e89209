"""Writes that readers never see half done: write to a temporary name beside the file, then rename.

    write_atomic(folder / "manifest.json", json.dumps(manifest))
    with atomic_path(out / "00001.png") as tmp:       # for writers that want a path (PIL, torch.save)
        image.save(tmp)
    abandoned_temporaries(folder / "manifest.json")   # those a killed writer left behind
    replace_folder(written, folder)                   # a folder of files, written whole beside it, put in place
    json_rows(run_dir / "metrics.jsonl")              # and their reader: the rows a killed writer finished

A rename within one folder is atomic on POSIX file systems: a reader finds the old file or the new one.
The temporary name starts with a dot and carries `.tmp` before the file's own suffix (writers that pick
a format by extension still work; folder scans skip `.tmp` files). A failed write leaves no temporary
file behind and the old file as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """Unique to this write: SLURM array tasks on different nodes (or in containers with their own process
    ids) write the same shared file at once, so the process id alone could name two writers' files alike."""
    host = socket.gethostname().split(".")[0] or "host"
    return path.with_name(f".{path.stem}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


def abandoned_temporaries(path: Path, older_than_s: float = 86400, dead_for_s: float = 600) -> list[Path]:
    """The temporary files of `path` (temporary_name's) whose writer is gone: untouched for `dead_for_s` and
    written by a process of this host that no longer runs, or untouched for `older_than_s` (another node's
    process cannot be asked; a container with its own process ids but this host's name is why a dead-looking
    writer gets `dead_for_s` too). A killed writer leaves them behind, and they can be large (a code folder's
    duplicates.npy)."""
    host, now, gone = socket.gethostname().split(".")[0] or "host", time.time(), []
    prefix, suffix = f".{path.stem}.", f".tmp{path.suffix}"
    for tmp in path.parent.glob(f"{prefix}*{suffix}"):
        writer = tmp.name[len(prefix):-len(suffix)].split(".")  # [host, pid, token]
        try:
            idle = now - tmp.stat().st_mtime
        except FileNotFoundError:  # (its writer renamed or removed it meanwhile)
            continue
        dead_here = len(writer) == 3 and writer[0] == host and writer[1].isdigit() and not _running(int(writer[1]))
        if (dead_here and idle > dead_for_s) or idle > older_than_s:
            gone.append(tmp)
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary path to write to; renamed onto `path` when the block ends without an error."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sync_to_disk(*paths: str | Path) -> None:
    """fsync each of `paths` that exists (files, and folders: their entries), so that a node's crash after
    this cannot leave them empty or missing while a file written later says they are complete."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, sync: bool = True) -> None:
    """Write `data` to `path` atomically; `sync`: flush it to the disk before the rename (a crash right
    after cannot leave an empty file under the final name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def replace_folder(written: str | Path, dest: str | Path) -> None:
    """Put the folder `written` (complete) at `dest`, removing what was there. Two renames: a crash between
    them leaves no `dest`, but both folders whole (the old one as <dest>.old), never a mix of the two."""
    written, dest = Path(written), Path(dest)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():  # (else an earlier call stopped between its renames: its .old stays until `dest` is whole)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(written, dest)
    shutil.rmtree(old, ignore_errors=True)


def json_rows(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (metrics.jsonl, held_out.jsonl), a line that is not one left out (the
    last line of a killed job may be cut short); [] when the file is not there."""
    path, rows = Path(path), []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
