"""Reading LAION-style shards (img2dataset layout) with webdataset.

    for sample in read_shard("laion/00000.tar", errors): ...   # {'__key__', 'jpg', 'txt', 'json', ...}
    paths = expand_shards("laion/{00000..00099}.tar")
    write_tar(Path("laion/00000.tar"), [("000000000", {"jpg": jpeg_bytes, "txt": b"a caption", "json": b"{}"})])

A shard is a tar of `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`. A truncated or corrupt tar yields
the samples before the damage; `errors` then counts it under `truncated_tar` (one per shard), also when it was
cut exactly between two members (its end-of-archive marker is missing: `ends_like_a_tar`; of a compressed tar,
in its decompressed stream), a header in it is damaged (tarfile ends the archive there without a word) or its tail
is zeros (allocated, never written). A member repeated within a sample (`x.txt` twice, `x.jpg` and `x.JPG`) is
counted under `duplicate_member` and left out (the sample keeps the first); the samples after it are read as usual.
A file that is not a tar at all (`check_is_tar`; also a file of zeros) is refused with a DataError naming it; one
whose first header block is sound but was cut before its first member (a download that died in its first
kilobytes) is a truncated tar without samples.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import braceexpand
from webdataset import TarWriter, tariterators

from common.files import atomic_path
from data_pipeline.errors import DataError

# The compressions tarfile's "r|*" (webdataset's mode) reads, told apart by their first bytes as tarfile does:
# (magic, the opener of the decompressed stream).
COMPRESSIONS = ((b"\x1f\x8b\x08", gzip.open), (b"BZh91", bz2.open), (b"\x5d\x00\x00\x80", lzma.open),
                (b"\xfd7zXZ", lzma.open))


def decompressing_opener(head: bytes):
    """The opener of a compressed tar's decompressed stream, told by its first bytes `head`; None: not compressed."""
    return next((opener for magic, opener in COMPRESSIONS if head.startswith(magic)), None)


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


def check_is_tar(path: str | Path) -> None:
    """Refuse a file whose first header is not a tar header (plain or compressed, as webdataset reads it).

    Not a tar at all vs truncated: a file that does not even start like a tar (an HTML error page or a JPEG
    saved under a .tar name, an empty file, one shorter than a header) is the wrong file, and every sample it
    should have held is missing; counting it as `truncated_tar` would turn a wrong --input into an empty
    shard and exit status 0, so it is an error naming the file. A real tar cut short (an interrupted
    download or copy) still holds its samples before the cut: those are kept and the cut is counted, so
    one damaged shard among thousands does not stop a run; also when the cut came before its first member
    was whole (its first header block is sound: `starts_with_a_tar_header`). Cost: one header read per shard.
    """
    try:
        tarfile.open(path, mode="r|*").close()  # webdataset's mode; opening reads the first header
        with open(path, "rb") as f:
            # tarfile reads a zero block as the end of an empty archive; a file of zeros longer than an empty
            # archive's one record was allocated and never written (an interrupted copy, a crash).
            zeros, size = f.read(512) == bytes(512), f.seek(0, 2)
        if zeros and size > tarfile.RECORDSIZE:
            raise tarfile.ReadError(f"{size} bytes beginning with zeros where the first header should be: a file "
                                    "allocated but never written")
    # (TypeError: Python 3.11's tarfile on a gzip header cut within its first bytes, ord() of an empty read)
    except (tarfile.ReadError, tarfile.CompressionError, EOFError, TypeError) as e:
        if starts_with_a_tar_header(path):  # cut within its first member's headers: read_shard counts the cut
            return
        raise DataError(f"{path} is not a tar archive ({e}); expected a webdataset shard of {{key}}.jpg/.txt/.json "
                        "files: replace it or leave it out of the input pattern") from e


def starts_with_a_tar_header(path: str | Path) -> bool:
    """Whether the file's first 512 bytes are a sound tar header (its checksum matches): a plain tar cut short
    before its first member's headers all arrived (one PAX member's take 1536 bytes) still begins with one."""
    with open(path, "rb") as f:
        opener = decompressing_opener(f.read(262))
    try:
        with (opener or open)(path, "rb") as f:  # (a compressed tar: its first block is in the decompressed bytes)
            block = f.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError, zlib.error, lzma.LZMAError):
        return False
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def read_shard(path: str | Path, errors: Counter):
    """The samples of one tar, grouped by key, in file order (DataError if the file is not a tar at all)."""
    check_is_tar(path)
    stop = []

    def on_error(exc: Exception) -> bool:
        if isinstance(exc, OSError):  # (EIO, ESTALE on a network file system: not a cut the shard could be short of)
            raise reading_failed(path, exc) from exc
        if isinstance(exc, ValueError) and "duplicate file name" in str(exc.args[0]):  # (group_by_keys' words)
            errors["duplicate_member"] += 1  # a second KEY.jpg (or KEY.JPG): the sample keeps its first one
            return True  # the tar itself is sound: read on
        stop.append(exc)
        return False  # stop reading this tar: what comes after a broken member is not trustworthy

    with open(path, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": str(path), "stream": stream}], handler=on_error)
        yield from tariterators.group_by_keys(files, handler=on_error)
    if stop or not ends_like_a_tar(path):
        errors["truncated_tar"] += 1


def reading_failed(path: str | Path, exc: OSError) -> DataError:
    return DataError(f"{path}: reading failed ({exc}); the shard was not finished: rerun when the file system is "
                     "sound")


def ends_like_a_tar(path: str | Path) -> bool:
    """Whether a tar's last member is followed by its end-of-archive marker and nothing else (two zero blocks or more:
    tar, Python's tarfile and webdataset's writer all write it, padded to whole records). tarfile reads a tar cut
    exactly between two members or within a header, or one with a damaged header (a flipped bit), as a shorter
    archive without a word; walking its headers tells where it stopped, and what follows must be zeros. More than a
    record of zeros after the last member of a plain tar is a tail that was allocated but never written (an
    interrupted copy: its members are missing). Cost: a plain tar's headers are read once more (about half the time
    of reading the tar; little beside decoding its images); a compressed tar is decompressed once more (img2dataset
    writes plain tars): its stream must also reach its own end marker (tarfile does not check that)."""
    with open(path, "rb") as f:
        head = f.read(262)
    opener = decompressing_opener(head)
    if opener is None and head[257:262] != b"ustar":  # (an old v7 tar: no magic to tell its blocks by)
        return True
    try:
        with (opener or open)(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for _ in tar:  # (its headers only: tarfile seeks past the members' data)
                pass
            # tarfile stopped at `end`: a zero block, or a header it could not read (which is followed by its data or
            # the next member's header, not zeros); it read that block, and what is past it must be zeros
            end, size = tar.offset, f.tell()
            while chunk := f.read(1 << 20):
                size += len(chunk)
                if chunk.count(0) < len(chunk) or (opener is None and size - end > tarfile.RECORDSIZE + 512):
                    return False
    except (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError):  # (EOFError: a stream cut before its end)
        return False
    except OSError as e:
        if e.errno is not None:  # (EIO, ESTALE: reading failed, not a damaged file)
            raise reading_failed(path, e) from e
        return False  # corrupt compressed data (gzip's BadGzipFile, bz2's "Invalid data stream")
    return size % 512 == 0 and size - end >= 1024


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """One img2dataset-style shard: files KEY.EXT (png, jpg, txt, json, ...) holding the given bytes, written
    by webdataset's TarWriter under a temporary name and renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, TarWriter(f, encoder=False) as writer:
        for key, files in samples:
            writer.write({"__key__": key, **files})
    return path
