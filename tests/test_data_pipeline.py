"""LAION-style shards -> code shards: filters, formats, resumability, array tasks, the training dataset."""
from __future__ import annotations

import collections.abc
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm import tqdm

from common.files import temporary_name
from data_pipeline.code_shards import CodeShardDataset, MixedDataset, open_training_data
from data_pipeline.errors import DataError
from data_pipeline.images import FilterConfig, prepare_sample
from data_pipeline.laion import expand_shards, read_shard
from data_pipeline.manifest import write_manifest
from data_pipeline.pretokenize import header, pretokenize
from data_pipeline.sampler import GlobalBatchSampler
from data_pipeline.synthetic import write_random_code_shards
from data_pipeline.text_tokenizer import EOS_ID, PAD_ID, TextTokenizer, train_sentencepiece
from model_parallel.state import child_environment
from tests import laion_fixtures as lf
from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FILTERS = FilterConfig(image_size=64, min_size=16, max_punsafe=0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three input tars (planted cases; synthetic; synthetic cut inside sample 5), a VQ, a SentencePiece."""
    root = tmp_path_factory.mktemp("laion")
    samples, expected, keep = lf.planted_samples()
    lf.write_tar(root / "laion" / "00000.tar", samples)
    lf.write_tar(root / "laion" / "00001.tar", lf.synthetic_samples(12))
    lf.write_tar(root / "laion" / "00002.tar", lf.synthetic_samples(9, offset=100))
    lf.truncate_tar_inside(root / "laion" / "00002.tar", "syn00105.jpg")
    keep |= {f"syn{i:05d}" for i in range(12)} | {f"syn{i:05d}" for i in range(100, 105)}
    expected["truncated_tar"] = 1
    torch.manual_seed(0)
    vq_path = root / "vq.pt"
    save_image_tokenizer(ConvVQ(image_size=64, downsample=3, channels=16, code_dim=8, codebook_size=64), vq_path)
    captions = [s[1]["txt"].decode("utf-8", "ignore") for s in samples if "txt" in s[1]] * 20
    captions += [f"a {c} {s} on a white background" for c in lf.COLOURS for s in lf.SHAPES] * 20
    spm_path = train_sentencepiece(captions, vocab_size=120, out=root / "tok" / "spm.model")
    return {"root": root, "pattern": str(root / "laion" / "{00000..00002}.tar"), "vq": vq_path, "spm": spm_path,
            "expected": expected, "keep": keep}


def run_pretokenize(setup, out, **kw):
    vq, tok = load_image_tokenizer(setup["vq"]), TextTokenizer(setup["spm"], max_len=16)
    return pretokenize(expand_shards(setup["pattern"]), out, vq, tok, FILTERS, **kw)


@pytest.fixture(scope="module")
def one_run(setup):
    out = setup["root"] / "codes"
    return run_pretokenize(setup, out), out


def test_manifest_counts_every_planted_case_and_keeps_every_good_sample(setup, one_run):
    manifest, out = one_run
    assert manifest["skipped"] == dict(sorted(setup["expected"].items()))
    assert manifest["complete"] and manifest["num_inputs"] == 3
    for shard in manifest["shards"]:  # every sample read is kept or counted under one reason
        not_samples = ("truncated_tar", "duplicate_member", "duplicate_across_shards")  # (the last: in its records)
        dropped = {k: v for k, v in shard["skipped"].items() if k not in not_samples}
        assert shard["seen"] == shard["records"] + sum(dropped.values()) > 0, shard
    ds = CodeShardDataset(out, text_len=16, grid_tokens=64)
    keys = {ds.record(i)["key"].decode() for i in range(len(ds))}
    assert keys == setup["keep"] and len(ds) == len(setup["keep"]) == manifest["records"]
    assert manifest["vq"]["hash"] == load_image_tokenizer(setup["vq"]).content_hash
    assert manifest["text_tokenizer"]["text_len"] == 16 and manifest["vq"]["grid"] == 8


def test_stored_codes_and_text_match_direct_encoding(setup, one_run):
    _, out = one_run
    ds = CodeShardDataset(out)
    vq, tok = load_image_tokenizer(setup["vq"]), TextTokenizer(setup["spm"], max_len=16)
    key, jpg, caption = lf.coco_mini()[3]
    index = next(i for i in range(len(ds)) if ds.record(i)["key"].decode() == key)
    image = prepare_sample({"__key__": key, "jpg": jpg, "txt": caption.encode()}, FILTERS).image
    direct = vq.encode(image[None].float() / 127.5 - 1).reshape(-1)
    text, codes = ds[index]
    assert torch.equal(codes, direct) and ds.caption(index) == caption
    ids, length = tok.encode(caption)
    assert text.tolist() == ids and ids[length - 1] == EOS_ID and ids[length:] == [PAD_ID] * (16 - length)


def test_images_become_rgb_of_the_tokenizer_size():
    samples, _, _ = lf.planted_samples()
    by_key = dict(samples)
    for key in ("cmyk", "png16", "palette", "rgba"):
        p = prepare_sample({"__key__": key, **by_key[key]}, FILTERS)
        assert p.reason is None and p.image.shape == (3, 64, 64) and p.image.dtype == torch.uint8
    ramp = prepare_sample({"__key__": "png16", **by_key["png16"]}, FILTERS).image
    assert ramp[0, 0, 32] < 10 and ramp[0, -1, 32] > 245 and 100 < ramp[0, 32, 32] < 156  # scaled, not clipped
    rgba = prepare_sample({"__key__": "rgba", **by_key["rgba"]}, FILTERS).image
    assert rgba[:, 0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    """A photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view) comes out as the
    upright picture, red on the left, blue on the right, as a viewer shows it."""
    upright = Image.new("RGB", (96, 64), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 48, 64))
    stored = upright.rotate(90, expand=True)  # counter-clockwise: what orientation 6 turns back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    got = prepare_sample({"__key__": "exif", "jpg": buf.getvalue(), "txt": b"red left, blue right"}, FILTERS)
    want = prepare_sample({"__key__": "up", "jpg": lf.encode(upright), "txt": b"red left, blue right"}, FILTERS)
    assert got.reason is None and (got.image.float() - want.image.float()).abs().mean() < 4


def test_transparent_colour_of_grey_and_rgb_pngs_becomes_white():
    """A PNG whose transparency is a tRNS colour (modes L and RGB, no alpha channel) or a palette index (mode P:
    index 0, black in PIL's default palette) is composited on white, as alpha images are."""
    for mode, colour in (("L", 80), ("RGB", (10, 200, 30)), ("P", 0), ("I;16", 300)):
        img = Image.new(mode, (64, 64), colour)
        if mode == "I;16":  # (16-bit grey: its tRNS value is matched before the scaling to 8 bits)
            img = Image.fromarray(np.where(np.arange(64)[None, :] < 32, 300, 301).repeat(64, 0).astype(np.uint16))
        buf = io.BytesIO()
        img.save(buf, "PNG", transparency=colour)
        p = prepare_sample({"__key__": mode, "png": buf.getvalue(), "txt": b"nothing to see"}, FILTERS)
        assert p.image[:, 10, 10].tolist() == [255, 255, 255], mode
        if mode == "I;16":  # the other value (the same 8-bit grey once scaled) stays opaque
            assert p.image[:, 10, 50].tolist() == [1, 1, 1], p.image[:, 10, 50]


def png_rgb16(pixels: np.ndarray, transparent: tuple[int, int, int] | None) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one), with a tRNS colour when given."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + (chunk(b"tRNS", struct.pack(">HHH", *transparent)) if transparent else b"")
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_rgb_png_with_a_transparent_colour_is_a_decode_error(tmp_path):
    """PIL decodes a 16-bit RGB PNG to 8 bits but keeps its tRNS colour in 16: converted, the transparent half
    (value 100) stayed black and the opaque half (25700, whose high byte is 100) turned white. Such an image is
    skipped (and refused by FID's reader), one without the colour decodes."""
    pixels = np.zeros((64, 64, 3), np.uint16)
    pixels[:, :32], pixels[:, 32:] = 100, 25700
    raw = {"__key__": "k", "txt": b"half hidden"}
    assert prepare_sample({**raw, "png": png_rgb16(pixels, (100, 100, 100))}, FILTERS).reason == "decode_error"
    kept = prepare_sample({**raw, "png": png_rgb16(pixels, None)}, FILTERS)
    assert kept.reason is None and kept.image[:, 10, 10].tolist() == [0, 0, 0]
    assert kept.image[:, 10, 50].tolist() == [100, 100, 100]
    (tmp_path / "t.png").write_bytes(png_rgb16(pixels, (100, 100, 100)))
    from evaluation.fid import open_rgb
    with pytest.raises(ValueError, match="t.png.*16-bit RGB PNG with a tRNS"):
        open_rgb(tmp_path / "t.png")


def test_json_sidecars_that_are_not_objects_or_carry_nan_scores():
    """A .json that is not an object carries nothing to filter on (kept, no crash); a NaN score (img2dataset's
    missing value) does not pass a filter set on that field, and is ignored where no filter is set. A .json that
    is not JSON (cut short, not UTF-8) has unknown scores: bad_json where a score filter is set, kept otherwise."""
    jpg = lf.encode(lf.shape_image("red", "circle"))
    for text in (b"[1, 2]", b"null", b'"a string"', b"3"):
        assert prepare_sample({"__key__": "k", "jpg": jpg, "txt": b"a caption", "json": text}, FILTERS).reason is None
    for text in (b'{"punsafe": 0.0', b"\xff\xfe{}", b""):
        damaged = {"__key__": "k", "jpg": jpg, "txt": b"a caption", "json": text}
        assert prepare_sample(damaged, FILTERS).reason == "bad_json"
        assert prepare_sample(damaged, FilterConfig(image_size=64, min_size=16)).reason is None
    nan = {"__key__": "k", "jpg": jpg, "txt": b"a caption", "json": b'{"punsafe": NaN, "similarity": NaN}'}
    assert prepare_sample(nan, FILTERS).reason == "punsafe"  # FILTERS sets max_punsafe
    assert prepare_sample(nan, FilterConfig(image_size=64, min_size=16)).reason is None
    assert prepare_sample(nan, FilterConfig(image_size=64, min_size=16, min_similarity=0.3)).reason == "similarity"
    # a null score (a null parquet cell, as img2dataset writes it through pyarrow) is unknown as well
    null = {**nan, "json": b'{"punsafe": null, "similarity": 0.5}'}
    assert prepare_sample(null, FILTERS).reason == "punsafe"
    assert prepare_sample(null, FilterConfig(image_size=64, min_size=16, min_similarity=0.3)).reason is None


def test_repeated_tar_member_is_counted_and_the_rest_of_the_shard_read(tmp_path):
    """webdataset refuses a sample with two files of one name (x.txt twice, x.jpg and x.JPG); that costs the
    repeated file only, counted under duplicate_member, not the rest of the shard as a truncated tar."""
    import tarfile

    samples = lf.synthetic_samples(3)
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for i, (key, files) in enumerate(samples):
            members = [(f"{key}.{ext}", data) for ext, data in files.items()]
            if i == 0:
                members += [(f"{key}.txt", b"a second caption"), (f"{key}.JPG", files["jpg"])]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    errors = Counter()
    read = list(read_shard(path, errors))
    assert [s["__key__"] for s in read] == [k for k, _ in samples] and errors == {"duplicate_member": 2}
    assert read[0]["txt"] == samples[0][1]["txt"]  # the first of the repeated files is kept


def test_truncated_tar_costs_only_its_broken_tail(setup):
    errors = Counter()
    keys = [s["__key__"] for s in read_shard(setup["root"] / "laion" / "00002.tar", errors)]
    assert keys == [f"syn{i:05d}" for i in range(100, 105)] and errors == {"truncated_tar": 1}


def test_a_read_error_is_not_taken_for_a_cut(tmp_path, monkeypatch):
    """EIO halfway through a tar (a failing disk, a network file system) is an error naming the shard, not a
    truncated tar whose short shard a rerun would keep as finished."""
    import errno

    from data_pipeline import laion
    from data_pipeline.laion import write_tar

    path = write_tar(tmp_path / "a.tar", lf.synthetic_samples(3))

    class Failing(io.BufferedReader):
        def read(self, size=-1):
            if self.tell() > 6000:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(size)

    monkeypatch.setattr(laion, "open", lambda p, mode: Failing(io.FileIO(p, mode)), raising=False)
    with pytest.raises(DataError, match=r"a.tar: reading failed .*Input/output error.*the shard was not finished"):
        list(read_shard(path, Counter()))


def test_a_tar_cut_between_two_members_is_counted_as_truncated(tmp_path):
    """tarfile reads a tar cut exactly at a member boundary as a shorter, sound archive; its missing
    end-of-archive marker gives it away. The whole tar, and one without the padding after its marker (as Go's and
    Rust's tar writers leave it), are sound; one with half of the marker (one zero block) was cut."""
    import tarfile

    from data_pipeline.laion import write_tar

    path = write_tar(tmp_path / "whole.tar", lf.synthetic_samples(3))
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        third = next(m for m in members if m.name.startswith(lf.synthetic_samples(3)[2][0]))
    errors = Counter()
    assert len(list(read_shard(path, errors))) == 3 and errors == {}
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:third.offset])  # the first two samples whole, then nothing
    keys = [s["__key__"] for s in read_shard(cut, errors)]
    assert keys == [k for k, _ in lf.synthetic_samples(2)] and errors == {"truncated_tar": 1}
    members_end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    for zero_blocks, counted in ((2, {}), (1, {"truncated_tar": 1})):
        (tmp_path / "unpadded.tar").write_bytes(path.read_bytes()[:members_end + 512 * zero_blocks])
        errors = Counter()
        assert len(list(read_shard(tmp_path / "unpadded.tar", errors))) == 3 and errors == counted, zero_blocks


def test_a_tar_cut_within_its_first_headers_is_truncated_and_a_shorter_file_is_not_a_tar(tmp_path):
    """A download that died in its first kilobyte: past the first 512-byte header block (sound, checksummed) the
    file is a tar without a whole member, counted as truncated (one shard of thousands does not stop a run);
    shorter than that block, or not starting with one (a page of HTML), it is not a tar."""
    from data_pipeline.laion import check_is_tar, write_tar

    whole = write_tar(tmp_path / "whole.tar", lf.synthetic_samples(1)).read_bytes()
    for cut in (512, 1024, 1535):
        (tmp_path / f"{cut}.tar").write_bytes(whole[:cut])
        errors = Counter()
        assert list(read_shard(tmp_path / f"{cut}.tar", errors)) == [] and errors == {"truncated_tar": 1}, cut
    for name, data in (("short", whole[:511]), ("page", b"<html>" + bytes(2042))):
        (tmp_path / f"{name}.tar").write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}\.tar is not a tar archive"):
            check_is_tar(tmp_path / f"{name}.tar")


def test_a_compressed_tar_cut_within_its_first_headers_is_truncated_as_a_plain_one(tmp_path):
    """As a plain tar: a gzip/xz shard whose decompressed bytes end within its first member's headers (its first
    block sound) is a truncated shard without samples, not refused as not a tar."""
    import gzip
    import lzma
    import zlib

    from data_pipeline.laion import write_tar

    whole = write_tar(tmp_path / "whole.tar", lf.synthetic_samples(1)).read_bytes()
    for name, compress, wbits in (("gz", gzip.compress, 31), ("xz", lzma.compress, None)):
        data = compress(whole)
        def decompressed(cut: int, data=data, wbits=wbits) -> bytes:
            return (zlib.decompressobj(wbits) if wbits else lzma.LZMADecompressor()).decompress(data[:cut])

        cut = next(c for c in range(len(data)) if 512 <= len(decompressed(c)) < 1536)
        (tmp_path / f"{name}.tar").write_bytes(data[:cut])
        errors = Counter()
        assert list(read_shard(tmp_path / f"{name}.tar", errors)) == [] and errors == {"truncated_tar": 1}, name
    (tmp_path / "magic.tar").write_bytes(gzip.compress(whole)[:3])  # (tarfile: a TypeError from its gzip header read)
    (tmp_path / "inflate.tar").write_bytes(gzip.compress(whole)[:10] + bytes(range(256)) * 8)  # (a gzip header only)
    for name in ("magic", "inflate"):
        with pytest.raises(DataError, match=rf"{name}\.tar is not a tar archive"):
            read_shard(tmp_path / f"{name}.tar", Counter()).__next__()


def test_a_compressed_tar_cut_after_a_member_is_counted_as_truncated(tmp_path):
    """A gzip/bz2/xz shard whose stream was cut within the third sample's header: tarfile's stream mode reads the
    two samples before it as a whole, shorter archive (it checks neither the decompressor's end nor the tar's end
    marker), so the cut is counted as a plain tar's is; a whole compressed shard, and one whose complete stream
    holds a tar without its end marker, are told apart."""
    import bz2
    import gzip
    import lzma
    import tarfile
    import zlib

    from data_pipeline.laion import write_tar

    samples = lf.synthetic_samples(3)
    whole = write_tar(tmp_path / "whole.tar", samples).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = next(m.offset for m in tar.getmembers() if m.name.startswith(samples[2][0]))
    shards = {}
    for name, compress, decompressor in (("gz", gzip.compress, lambda: zlib.decompressobj(31)),
                                         ("bz2", bz2.compress, bz2.BZ2Decompressor),
                                         ("xz", lzma.compress, lzma.LZMADecompressor)):
        data = compress(whole)
        shards[f"whole.tar.{name}"], shards[f"unmarked.tar.{name}"] = data, compress(whole[:third])
        if name != "bz2":  # (bz2 gives nothing of a block before its end: a cut lands where a block ends)
            shards[f"cut.tar.{name}"] = next(data[:c] for c in range(len(data))
                                             if third < len(decompressor().decompress(data[:c])) < third + 512)
    for name, shard in shards.items():
        (tmp_path / name).write_bytes(shard)
        errors = Counter()
        read = [s["__key__"] for s in read_shard(tmp_path / name, errors)]
        whole_shard = name.startswith("whole")
        assert read == [k for k, _ in samples[:3 if whole_shard else 2]], name
        assert errors == ({} if whole_shard else {"truncated_tar": 1}), name


def test_a_tar_with_a_damaged_header_is_counted_as_truncated(tmp_path):
    """tarfile reads a header whose checksum fails (a flipped bit) as the end of a shorter, sound archive: the
    samples from it on are lost, and the shard is counted as truncated wherever the header is, also in a plain
    tar's last record and in a compressed tar (both end with their end-of-archive marker)."""
    import gzip
    import tarfile

    from data_pipeline.laion import write_tar

    samples = lf.synthetic_samples(3)
    path = write_tar(tmp_path / "whole.tar", samples)
    with tarfile.open(path) as tar:
        third = next(m.offset for m in tar.getmembers() if m.name.startswith(samples[2][0]))
    damaged = bytearray(path.read_bytes())
    damaged[third] ^= 1  # (a bit of the third sample's first name: its header's checksum no longer matches)
    for name, shard in (("damaged.tar", damaged), ("damaged.tar.gz", gzip.compress(damaged))):
        (tmp_path / name).write_bytes(shard)
        errors = Counter()
        keys = [s["__key__"] for s in read_shard(tmp_path / name, errors)]
        assert keys == [k for k, _ in samples[:2]] and errors == {"truncated_tar": 1}, name


def test_an_empty_tar_is_a_shard_without_samples_and_an_input_may_be_several_patterns(tmp_path):
    """A tar of no member (one record of zeros: the empty archive tarfile and webdataset write, as for an
    img2dataset shard whose every download failed) holds no samples and is sound, not refused as a file of zeros
    (a block more of zeros is); an --input of patterns separated by white space expands each in turn, and one
    of no pattern is refused."""
    import tarfile

    from data_pipeline.laion import check_is_tar, write_tar

    empty = write_tar(tmp_path / "00000.tar", [])
    assert empty.stat().st_size == tarfile.RECORDSIZE
    errors = Counter()
    assert list(read_shard(empty, errors)) == [] and errors == {}
    (tmp_path / "zeros.tar").write_bytes(bytes(tarfile.RECORDSIZE + 512))
    with pytest.raises(DataError, match=r"zeros\.tar is not a tar archive \(10752 bytes beginning with zeros"):
        check_is_tar(tmp_path / "zeros.tar")
    for i in (1, 2):
        write_tar(tmp_path / f"{i:05d}.tar", lf.synthetic_samples(1, offset=i))
    assert expand_shards(f"{tmp_path}/00002.tar\n {tmp_path}/{{00000..00001}}.tar") == \
        [tmp_path / "00002.tar", tmp_path / "00000.tar", tmp_path / "00001.tar"]
    with pytest.raises(FileNotFoundError, match="no input shard matches"):
        expand_shards(" ")


def test_input_tars_are_streamed_into_the_same_shards_at_any_number_of_workers(setup, one_run, tmp_path,
                                                                               monkeypatch):
    """An input tar is read as it is encoded (img2dataset shards of full-size images are gigabytes): the first
    batch is encoded before the tar's 12 samples are read. With 2 decoding workers the shards, their sample and
    skip counts (the truncated tar's included) are those of the run without workers."""
    from data_pipeline import pretokenize as module

    _, single = one_run
    inputs, vq = expand_shards(setup["pattern"]), load_image_tokenizer(setup["vq"])
    tok = TextTokenizer(setup["spm"], 16)
    read, read_at_encode = [], []
    real_read, real_encode = module.read_shard, module.encode_images
    monkeypatch.setattr(module, "read_shard", lambda *a: (read.append(s) or s for s in real_read(*a)))
    monkeypatch.setattr(module, "encode_images", lambda *a: read_at_encode.append(len(read)) or real_encode(*a))
    pretokenize(inputs[1:2], tmp_path / "streamed", vq, tok, FILTERS, batch_size=4)
    assert read_at_encode[0] == 4 and len(read) == 12
    pretokenize(inputs[1:], tmp_path / "workers", vq, tok, FILTERS, batch_size=4, workers=2)
    for out, mine, theirs in (("streamed", "00000", "00001"), ("workers", "00000", "00001"),
                              ("workers", "00001", "00002")):
        assert (tmp_path / out / f"{mine}.bin").read_bytes() == (single / f"{theirs}.bin").read_bytes()
        meta, reference = (json.loads(p.read_text()) for p in (tmp_path / out / f"{mine}.json",
                                                                single / f"{theirs}.json"))
        assert (meta["seen"], meta["skipped"]) == (reference["seen"], reference["skipped"])
    assert json.loads((single / "00002.json").read_text())["skipped"]["truncated_tar"] == 1
    gone = tmp_path / "gone.tar"  # (vanished after the start's check): one line naming it, from a worker too
    for workers in (0, 2):
        with pytest.raises((DataError, FileNotFoundError), match=r"^[^\n]*gone\.tar[^\n]*$") as e:
            module.process_shard(gone, vq, tok, FILTERS, workers, 4, "cpu", tqdm(disable=True))
        assert ("decoding worker" in str(e.value)) == (workers > 0)  # (without workers: the read's own error)
        assert "No such file" in str(e.value)  # the cause, with workers taken from under their traceback


def test_array_tasks_together_equal_one_run(setup, one_run, tmp_path):
    """Task 1 of 2 makes shard 1 and leaves shard 0's temporary file (task 0 may be writing it) alone; task 0
    removes it (a leftover of its own killed run) and makes shards 0 and 2: the folder of one run."""
    _, single = one_run
    theirs = temporary_name(tmp_path / "00000.bin")
    theirs.write_bytes(b"half written")
    run_pretokenize(setup, tmp_path, shard_index=1, num_shards=2)
    partial = json.loads((tmp_path / "manifest.json").read_text())
    assert not partial["complete"] and [s["name"] for s in partial["shards"]] == ["00001"]
    assert theirs.exists()
    run_pretokenize(setup, tmp_path, shard_index=0, num_shards=2)
    assert not theirs.exists()
    for name in ("00000", "00001", "00002"):
        assert (tmp_path / f"{name}.bin").read_bytes() == (single / f"{name}.bin").read_bytes()
    assert (tmp_path / "manifest.json").read_text() == (single / "manifest.json").read_text()


def test_a_rerun_reads_no_finished_shard_but_makes_a_changed_one_again(setup, one_run, tmp_path, monkeypatch):
    """A restarted task takes its finished shards whose .bin has the size and mtime their metadata recorded
    without reading them; one changed since (a byte flipped: an mtime of its own), or whose image hashes changed,
    is made again, as written."""
    from data_pipeline import manifest as manifest_module

    _, single = one_run
    out = tmp_path / "codes"
    shutil.copytree(single, out)  # (times kept, as cp -p)
    from data_pipeline import pretokenize as module

    hashed, real_sha256_file = [], manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p: hashed.append(p.name) or real_sha256_file(p))
    made, real_process_shard = [], module.process_shard
    monkeypatch.setattr(module, "process_shard",
                        lambda path, *a: made.append(path.name) or real_process_shard(path, *a))
    assert run_pretokenize(setup, out) == json.loads((single / "manifest.json").read_text())
    assert not [n for n in hashed if n.endswith(".bin")] and made == []
    data = bytearray((out / "00001.bin").read_bytes())
    data[100] ^= 0xFF
    (out / "00001.bin").write_bytes(bytes(data))
    changed_since(out / "00001.bin")
    hashed.clear()
    run_pretokenize(setup, out)
    assert [n for n in hashed if n.endswith(".bin")] == ["00001.bin"] and made == ["00001.tar"]
    assert (out / "00001.bin").read_bytes() == (single / "00001.bin").read_bytes()
    hashes = bytearray((out / "00002.hashes").read_bytes())  # its image hashes changed: made again too
    hashes[0] ^= 0xFF
    (out / "00002.hashes").write_bytes(bytes(hashes))
    made.clear()
    run_pretokenize(setup, out)
    assert made == ["00002.tar"] and (out / "00002.hashes").read_bytes() == (single / "00002.hashes").read_bytes()


def test_killed_run_restarts_to_byte_identical_shards(setup, one_run, tmp_path):
    _, single = one_run
    cmd = [sys.executable, "-m", "data_pipeline.pretokenize", "--input", setup["pattern"], "--output", str(tmp_path),
           "--vq", str(setup["vq"]), "--text-tokenizer", str(setup["spm"]), "--text-len", "16",
           "--min-size", "16", "--max-punsafe", "0.5", "--batch-size", "4", "--workers", "2"]  # workers: same bytes
    env = child_environment(PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "00000.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in tmp_path.glob("*.json"))
    assert "manifest.json" not in done_before  # killed before the end
    # What a writer killed inside write_atomic leaves (common.files.temporary_name, the killed process's id): of a
    # finished shard and of unfinished ones, one of each file a shard has; and files that are not such leftovers.
    left = [tmp_path / temporary_name(tmp_path / name).name.replace(f".{os.getpid()}.", f".{proc.pid}.")
            for name in ("00000.bin", "00001.hashes", "00002.json", "00002.bin")]
    others = [tmp_path / ".00001.keep", tmp_path / temporary_name(tmp_path / "notes.txt").name]
    for path in left + others:
        path.write_bytes(b"half written")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    for name in ("00000", "00001", "00002"):
        assert (tmp_path / f"{name}.bin").read_bytes() == (single / f"{name}.bin").read_bytes()
    assert json.loads((tmp_path / "manifest.json").read_text()) == json.loads((single / "manifest.json").read_text())
    assert sorted(tmp_path.glob(".*")) == sorted(others), "a killed run's temporary files were left, or others removed"


def test_abandoned_temporaries_are_those_of_a_dead_writer_here_or_of_any_writer_long_idle(tmp_path):
    """common.files.abandoned_temporaries: a temporary of `path` whose writer ran on this host and is gone goes
    after `dead_for_s` idle; one of a live writer, of another host or with no process id in its name only after
    `older_than_s`; other files' temporaries and the file itself are not its."""
    from common import files

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead, live, host = int(gone.stdout), os.getpid(), socket.gethostname().split(".")[0] or "host"
    now = time.time()

    def leave(writer: str, idle: float, name: str = "manifest") -> Path:
        path = tmp_path / f".{name}.{writer}.tmp.json"
        path.write_text("half")
        os.utime(path, (now - idle, now - idle))
        return path

    expected = [leave(f"{host}.{dead}.ab12cd34", 700), leave(f"{host}.{live}.ab12cd34", 2 * 86400),
                leave(f"elsewhere.{dead}.ab12cd34", 2 * 86400), leave(f"{host}.x{dead}.ab12cd34", 2 * 86400)]
    kept = [leave(f"{host}.{dead}.ab12cd35", 100), leave(f"{host}.{live}.ab12cd35", 700),
            leave(f"elsewhere.{dead}.ab12cd35", 700), leave(f"{host}.x{dead}.ab12cd35", 700),
            leave(f"{host}.{dead}.ab12", 700, name="notes"), leave(f"{host}.{dead}.extra.ab12cd36", 700)]
    (tmp_path / "manifest.json").write_text("{}")
    os.utime(tmp_path / "manifest.json", (now - 2 * 86400, now - 2 * 86400))
    assert sorted(files.abandoned_temporaries(tmp_path / "manifest.json")) == sorted(expected), kept
    assert sorted(files.abandoned_temporaries(tmp_path / "manifest.json", dead_for_s=50)) == sorted(expected + kept[:1])
    assert temporary_name(tmp_path / "manifest.json") != temporary_name(tmp_path / "manifest.json")
    name = temporary_name(tmp_path / "manifest.json").name
    assert name.startswith(f".manifest.{host}.{live}.") and name.endswith(".tmp.json")


def test_a_writer_of_another_user_counts_as_running(monkeypatch):
    """common.files._running: os.kill(pid, 0) refused (another user's process) means the process is there."""
    from common import files

    def refused(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    assert files._running(os.getpid())
    monkeypatch.setattr(files.os, "kill", refused)
    assert files._running(1)


def test_atomic_writes_and_folder_replacement_leave_the_old_or_the_new_never_a_temporary(tmp_path):
    """common.files: a failed atomic write leaves the old file and no temporary; write_atomic writes text or
    bytes; replace_folder puts the written folder in place of the old one (and of a `.old` an earlier call left),
    leaving no `.old`; sync_to_disk skips what is not there."""
    from common import files

    target = tmp_path / "manifest.json"
    files.write_atomic(target, "old")
    with pytest.raises(ZeroDivisionError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ZeroDivisionError
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    files.write_atomic(target, b"new", sync=False)
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    files.sync_to_disk(target, tmp_path, tmp_path / "missing")

    dest = tmp_path / "codes"
    for step, stale_old in ((1, False), (2, True), (3, False)):
        written = tmp_path / f"written{step}"
        written.mkdir()
        (written / "data.bin").write_text(str(step))
        if stale_old:  # (an earlier call stopped in its last rmtree)
            (tmp_path / "codes.old").mkdir()
            (tmp_path / "codes.old" / "data.bin").write_text("stale")
        files.replace_folder(written, dest)
        assert (dest / "data.bin").read_text() == str(step) and not written.exists()
        assert not (tmp_path / "codes.old").exists()
    dest.rename(tmp_path / "codes.old")  # a call that stopped between its renames: no `dest`, the old one aside
    (tmp_path / "written4").mkdir()
    files.replace_folder(tmp_path / "written4", dest)
    assert dest.is_dir() and not (tmp_path / "codes.old").exists()


@pytest.fixture(scope="module")
def duplicated(setup):
    """Three input tars sharing images: syn00001's photo in all three (under other keys and captions), syn00011's
    in the second and third. Returns (the input paths, the keys that must be kept, in order)."""
    base = dict(lf.synthetic_samples(12))
    folder = setup["root"] / "dup_laion"
    tars = [
        [(k, base[k]) for k in ("syn00000", "syn00001", "syn00002", "syn00003")],
        [("again", {**base["syn00001"], "txt": b"the same picture again"}), ("syn00010", base["syn00010"]),
         ("syn00011", base["syn00011"])],
        [("thrice", {"jpg": base["syn00001"]["jpg"], "txt": b"and once more"}), ("syn00005", base["syn00005"]),
         ("eleven", {**base["syn00011"], "txt": b"a copy"})],
    ]
    inputs = [lf.write_tar(folder / f"{i:05d}.tar", samples) for i, samples in enumerate(tars)]
    keep = ["syn00000", "syn00001", "syn00002", "syn00003", "syn00010", "syn00011", "syn00005"]
    return inputs, keep


def test_duplicates_across_shards_are_counted_once(setup, duplicated, tmp_path):
    """An image repeated across input shards is kept once (in the first shard, by index order), counted under
    duplicate_across_shards, and left out of training; the same whether one process or array tasks in any
    order did the work, and when --manifest-only remakes the manifest. The shards are not rewritten."""
    inputs, keep = duplicated
    vq, tok = load_image_tokenizer(setup["vq"]), TextTokenizer(setup["spm"], max_len=16)
    single = tmp_path / "single"
    manifest = pretokenize(inputs, single, vq, tok, FILTERS)
    assert manifest["skipped"] == {"duplicate_across_shards": 3}
    assert [s["duplicates"] for s in manifest["shards"]] == [0, 1, 2]
    assert [s["records"] for s in manifest["shards"]] == [4, 3, 3] and manifest["records"] == 7
    ds = CodeShardDataset(single, text_len=16, grid_tokens=64)
    assert [ds.record(i)["key"].decode() for i in range(len(ds))] == keep
    raw = {r["key"].decode(): r for n in ("00000", "00001", "00002")
           for r in np.fromfile(single / f"{n}.bin", dtype=ds.dtype)}
    for i, key in enumerate(keep):  # what training reads of the kept records is theirs
        text, codes = ds[i]
        assert codes.tolist() == raw[key]["codes"].tolist() and text.tolist() == raw[key]["text"].tolist()
    for n in ("00000", "00001", "00002"):  # every record is still in its shard, as written
        meta = json.loads((single / f"{n}.json").read_text())
        assert meta["sha256"] == hashlib.sha256((single / f"{n}.bin").read_bytes()).hexdigest()

    tasks = tmp_path / "tasks"
    for index in (2, 0, 1):  # array tasks finishing in another order
        part = pretokenize(inputs, tasks, vq, tok, FILTERS, shard_index=index, num_shards=3)
        assert part["complete"] == (index == 1) and (part["duplicates"] is None) == (index != 1)
    for name in ("00000.bin", "00001.bin", "00002.bin", "duplicates.npy", "manifest.json"):
        assert (tasks / name).read_bytes() == (single / name).read_bytes(), name
    (tasks / "duplicates.npy").unlink()
    assert write_manifest(tasks, header(vq, tok, FILTERS), ["00000", "00001", "00002"]) == manifest  # --manifest-only
    assert (tasks / "duplicates.npy").read_bytes() == (single / "duplicates.npy").read_bytes()

    (tasks / "00001.hashes").unlink()  # as a shard made by a version that kept no hashes (nor their checksum)
    legacy = json.loads((tasks / "00001.json").read_text())
    del legacy["hashes_sha256"]
    (tasks / "00001.json").write_text(json.dumps(legacy))
    (tasks / "00002.hashes").unlink()  # (lost: its metadata names its checksum)
    with pytest.raises(DataError, match=r"00001\.hashes is missing: .* rerun data_pipeline\.pretokenize"):
        write_manifest(tasks, header(vq, tok, FILTERS), ["00000", "00001", "00002"])
    assert pretokenize(inputs, tasks, vq, tok, FILTERS) == manifest  # the rerun makes those shards again
    for name in ("00001.bin", "00001.hashes", "00002.hashes"):
        assert (tasks / name).read_bytes() == (single / name).read_bytes(), name
    assert "hashes_sha256" in json.loads((tasks / "00001.json").read_text())


def test_other_tokenizer_into_same_folder_is_refused(setup, one_run):
    _, out = one_run
    torch.manual_seed(1)
    other = setup["root"] / "vq_other.pt"
    save_image_tokenizer(ConvVQ(image_size=64, downsample=3, channels=16, code_dim=8, codebook_size=64), other)
    with pytest.raises(DataError,
                       match=r"manifest.json: .*made with another image tokenizer.*: vq\.hash .*new --output"):
        pretokenize(expand_shards(setup["pattern"]), out, load_image_tokenizer(other),
                    TextTokenizer(setup["spm"], max_len=16), FILTERS)


def test_folder_begun_under_older_filter_rules_or_decoding_is_refused(setup, one_run, tmp_path):
    """A folder whose manifest says its samples were skipped or decoded otherwise (made before the rule versions
    were recorded, or under an older decoding) is not continued under today's rules; nothing in it changes."""
    from data_pipeline.images import DECODING, FILTER_RULES

    _, single = one_run
    for key, older in (("filters", lambda h: h.pop("rules")), ("image_decoding", lambda h: h.update(version=2))):
        out = tmp_path / key
        shutil.copytree(single, out)
        manifest = json.loads((out / "manifest.json").read_text())
        older(manifest[key])
        (out / "manifest.json").write_text(json.dumps(manifest))
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        changed = (rf"filters\.rules null there, {FILTER_RULES} now" if key == "filters"
                   else rf"image_decoding\.version 2 there, {DECODING['version']} now")
        with pytest.raises(DataError, match=rf"manifest.json: .*filters than this run: {changed}.*new --output"):
            pretokenize(expand_shards(setup["pattern"]), out, load_image_tokenizer(setup["vq"]),
                        TextTokenizer(setup["spm"], max_len=16), FILTERS)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_killed_run_rerun_with_another_text_tokenizer_is_refused(setup, one_run, tmp_path):
    """A run on 2 inputs killed before its manifest (shards and their metadata, no manifest.json), rerun with
    another text tokenizer: refused naming a shard and what differs, before anything is written or removed;
    also when it was killed after its first shard (the second is not made)."""
    _, single = one_run
    inputs, vq = expand_shards(setup["pattern"])[:2], load_image_tokenizer(setup["vq"])
    other = TextTokenizer(train_sentencepiece([f"a {c} {s}" for c in lf.COLOURS for s in lf.SHAPES] * 20, 30,
                                              tmp_path / "other.model"), max_len=16)
    for done, more in ((("00000", "00001"), r" \(and 1 more shard\(s\)\)"), (("00000",), "")):
        out = tmp_path / f"codes{len(done)}"
        out.mkdir()
        for name in done:
            for ext in (".bin", ".hashes", ".json"):
                shutil.copy2(single / f"{name}{ext}", out / f"{name}{ext}")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(DataError, match=rf"codes{len(done)}/00000\.bin{more} was made with another .*"
                                            r"text_tokenizer\.hash .* there, .* now.*use a new --output folder"):
            pretokenize(inputs, out, vq, other, FILTERS)
        with pytest.raises(DataError, match=r"text_tokenizer\.hash"):  # nor can --manifest-only claim it
            write_manifest(out, header(vq, other, FILTERS), ["00000", "00001"])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    manifest = pretokenize(inputs, out, vq, TextTokenizer(setup["spm"], max_len=16), FILTERS)  # same one resumes
    assert manifest["complete"] and manifest["text_tokenizer"]["hash"] == TextTokenizer(setup["spm"]).content_hash
    assert all((out / f"{n}.bin").read_bytes() == (single / f"{n}.bin").read_bytes() for n in ("00000", "00001"))


def test_other_inputs_into_a_begun_folder_are_refused_and_more_inputs_grow_it(setup, one_run, tmp_path):
    """Output shard i is input i: a rerun whose input i is another file, or that has fewer inputs than shards
    exist (the manifest would silently leave the rest out), is refused before anything changes; more inputs
    than before add their shards, the earlier ones kept as they were."""
    _, single = one_run
    inputs, vq = expand_shards(setup["pattern"]), load_image_tokenizer(setup["vq"])
    tok = TextTokenizer(setup["spm"], 16)
    out = tmp_path / "codes"
    pretokenize(inputs[:2], out, vq, tok, FILTERS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"codes/00001\.bin was made from .*00001\.tar, and this run's input 1 is "
                                        r".*00002\.tar: the --input pattern"):
        pretokenize([inputs[0], inputs[2]], out, vq, tok, FILTERS)
    with pytest.raises(DataError, match=r"codes/00001\.bin was made from input 1 .* only 1 input"):
        pretokenize(inputs[:1], out, vq, tok, FILTERS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    grown = pretokenize(inputs, out, vq, tok, FILTERS)
    assert grown == json.loads((single / "manifest.json").read_text())
    assert all((out / n).read_bytes() == before[n] for n in ("00000.bin", "00001.bin", "00001.json"))
    # A run of the first 2 inputs that finishes after the folder grew (an array task of the older job) must not
    # write its 2-shard manifest over the grown one.
    with pytest.raises(DataError, match=r"codes/00002\.json: a shard beyond this run's 2 input\(s\)"):
        write_manifest(out, header(vq, tok, FILTERS), ["00000", "00001"])
    assert json.loads((out / "manifest.json").read_text()) == grown


def changed_since(path: Path) -> None:
    """`path` as after an edit or a copy (`cp -p` keeps the source's time, not the one recorded here)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_007))


def test_damaged_metadata_is_named(one_run, tmp_path):
    _, single = one_run
    out = tmp_path / "codes"
    shutil.copytree(single, out)  # (copytree keeps times, as cp -p: the shards are taken on trust from shard_stats)
    (out / "00001.json").write_text('{"input": "x.tar", "rec')
    CodeShardDataset(out)  # its .bin is as written: the damaged NNNNN.json is not read
    changed_since(out / "00001.bin")
    with pytest.raises(DataError, match=r"codes/00001\.json: not readable as JSON"):
        CodeShardDataset(out)
    (out / "shard_stats.json").write_text('{"shards": {"00000": [1, 2]}}')
    with pytest.raises(DataError, match=r"codes/shard_stats\.json: expected .*damaged; rebuild it with "
                                        r"data_pipeline\.pretokenize --manifest-only"):
        CodeShardDataset(out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text('{"format": ')  # (a rerun of pretokenize would stop at it too)
    with pytest.raises(DataError, match=r"manifest\.json: not readable as JSON .*--manifest-only \(same arguments\)"):
        CodeShardDataset(out)
    del manifest["record"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: no record entry"):
        CodeShardDataset(out)


def test_open_reads_one_file_per_folder_and_a_shard_json_only_once_its_bin_changed(one_run, tmp_path, monkeypatch):
    """Opening a folder reads manifest.json and shard_stats.json and stats each .bin; a shard's NNNNN.json
    is read (and its records scanned for the largest values) only once its .bin differs from what
    shard_stats.json records, and a folder made before shard_stats.json existed opens from its NNNNN.json."""
    from data_pipeline import code_shards

    _, single = one_run
    out = tmp_path / "codes"
    shutil.copytree(single, out)
    reads, real_read = [], code_shards.read_json
    monkeypatch.setattr(code_shards, "read_json", lambda path: reads.append(path.name) or real_read(path))
    reference = CodeShardDataset(single)
    expected = [reference.record(i) for i in range(len(reference))]

    def scanned():  # the shards of `out` whose records were read for their largest values
        return sorted(Path(key[0]).name for key in code_shards._SCANNED if Path(key[0]).parent == out.resolve())

    reads.clear()
    ds = CodeShardDataset(out)
    assert reads == ["manifest.json", "shard_stats.json"] and scanned() == []
    assert all((ds.record(i) == e).all() for i, e in enumerate(expected))
    reads.clear()
    changed_since(out / "00001.bin")
    CodeShardDataset(out)
    assert reads == ["manifest.json", "shard_stats.json", "00001.json"] and scanned() == ["00001.bin"]
    reads.clear()
    (out / "shard_stats.json").unlink()
    ds = CodeShardDataset(out)
    assert reads == ["manifest.json", "00000.json", "00001.json", "00002.json"]
    assert all((ds.record(i) == e).all() for i, e in enumerate(expected))


@pytest.mark.parametrize("field, value, message", [
    ("codes", 100, "image code 100 is outside the codebook of 64"),
    ("text", 120, "text id 120 is outside the text vocabulary of 120")])
def test_out_of_range_value_in_a_shard_is_refused_at_open(setup, one_run, tmp_path, field, value, message):
    from training.config import load_config

    _, single = one_run
    out = tmp_path / "codes"
    shutil.copytree(single, out)
    model_cfg = load_config(None, ["model.text_seq_len=16", "model.image_grid=8", "model.image_vocab_size=128",
                                   "model.text_vocab_size=128"]).model
    ds = open_training_data(str(out), model_cfg)  # fits before the plant
    records = np.memmap(out / "00001.bin", dtype=ds.dtype, mode="r+")
    records[field][3, 5] = value  # within the model's vocabularies, outside the tokenizer's
    records.flush()
    del records
    with pytest.raises(DataError, match=rf"codes/00001\.bin: {message} .* at record 3;"):
        open_training_data(str(out), model_cfg)


def open_counting_checks(folder: str, sets: list[str]):
    """In a pool process: training_dataset over `folder` and how many shards this process checked (a stat each);
    (checks, len, first record's text ids) or (checks, the ConfigError's message)."""
    from data_pipeline.code_shards import CodeShardDataset
    from data_pipeline.training_data import training_dataset
    from training.config import ConfigError, load_config

    checked, real = [], CodeShardDataset._check_shard
    CodeShardDataset._check_shard = lambda self, path, *a: checked.append(path) or real(self, path, *a)
    try:
        cfg = load_config(None, ["data.synthetic=false", f"data.shards={folder}", *sets])
        ds = training_dataset(cfg.data, cfg.model, cfg.train.seed)
        return len(checked), len(ds), ds[0][0].tolist()
    except ConfigError as e:
        return len(checked), str(e)
    finally:
        CodeShardDataset._check_shard = real


def test_only_rank_0_checks_the_shards_and_its_refusal_is_every_ranks(pool2, one_run, tmp_path):
    """Each check is a stat of every shard: on every rank of a large job, ~100 million at every start (200,000
    shards, 512 ranks). Rank 0 checks; the others open the same dataset from the manifest; a damaged shard is
    refused on every rank with rank 0's message."""
    _, single = one_run
    out = tmp_path / "codes"
    shutil.copytree(single, out)
    sets = ["model.text_seq_len=16", "model.image_grid=8", "model.image_vocab_size=128", "model.text_vocab_size=128"]
    (checked0, n0, first0), (checked1, n1, first1) = pool2.run(open_counting_checks, str(out), sets)
    shards = len(list(out.glob("*.bin")))
    assert (checked0, checked1) == (shards, 0) and shards > 1
    assert n0 == n1 > 0 and first0 == first1
    with open(out / "00001.bin", "r+b") as f:
        f.truncate(7)
    refused = pool2.run(open_counting_checks, str(out), sets)
    assert refused[0][1] == refused[1][1] and "00001.bin: 7 bytes, expected" in refused[0][1]
    assert refused[1][0] == 0


def test_blend_weight_too_small_for_one_sample_is_refused(one_run, tmp_path):
    """A folder whose weight gives it no sample of an epoch would never be trained on: refused naming it;
    a weight that gives it one sample is accepted."""
    from training.config import load_config

    _, single = one_run
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(single, a)
    shutil.copytree(single, b)
    model_cfg = load_config(None, ["model.text_seq_len=16", "model.image_grid=8", "model.image_vocab_size=128",
                                   "model.text_vocab_size=128"]).model
    n = 2 * len(CodeShardDataset(a))
    assert open_training_data(f"{a}:1,{b}:{1 / n}", model_cfg).counts.tolist() == [n - 1, 1]
    with pytest.raises(DataError, match=rf"{b}: weight .* gives it none of an epoch's {n} samples"):
        open_training_data(f"{a}:1,{b}:{0.1 / n}", model_cfg)
    timed = tmp_path / "codes-12:30"  # a folder whose name holds ':' (its weight is after the last one)
    shutil.copytree(single, timed)
    assert open_training_data(f"{timed},{b}", model_cfg).counts.tolist() == [n // 2, n // 2]
    assert open_training_data(f"{timed}:3,{b}:1", model_cfg).counts.tolist() == [3 * n // 4, n // 4]


@pytest.mark.parametrize("extra_records", [0, 1])
def test_shard_of_another_run_is_refused_at_open(one_run, tmp_path, extra_records):
    """A shard copied in from a folder made with another text tokenizer (its .bin came with it: of another
    mtime, and maybe of another record count) is named as such, not merely as of the wrong size."""
    _, single = one_run
    out = tmp_path / "codes"
    shutil.copytree(single, out)
    meta = json.loads((out / "00002.json").read_text())
    meta["header"]["text_tokenizer"]["hash"] = "0" * 64
    (out / "00002.json").write_text(json.dumps(meta))
    with open(out / "00002.bin", "ab") as f:
        f.write(b"\0" * extra_records * CodeShardDataset(single).dtype.itemsize)
    changed_since(out / "00002.bin")
    with pytest.raises(DataError, match=r"codes/00002\.bin was made with another .*text_tokenizer\.hash \"0000"):
        CodeShardDataset(out)


def test_a_manifest_edited_since_its_shard_stats_is_checked_against_every_shard(one_run, tmp_path):
    """shard_stats.json vouches for the shards only beside the manifest header it was made with: after an edit
    of manifest.json's tokenizer hash, every shard is compared with it again (from its NNNNN.json) and refused."""
    _, single = one_run
    out = tmp_path / "codes"
    shutil.copytree(single, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["vq"]["hash"] = "f" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"codes/00000\.bin was made with another .*vq\.hash"):
        CodeShardDataset(out)


def test_many_shards_of_repeated_images_keep_the_first_of_each(tmp_path):
    """Over 200 shards whose records show 150 images in all (whole shards of repeats among them), the dataset
    holds exactly the first record of each image, in order: the reference walks every record by hand."""
    folder = tmp_path / "codes"
    write_random_code_shards(folder, 200, records=4, images=150)
    ds = CodeShardDataset(folder)
    seen, keep = set(), []
    for i in range(200):
        hashes = np.fromfile(folder / f"{i:05d}.hashes", dtype=np.uint8).reshape(4, 16)
        records = np.fromfile(folder / f"{i:05d}.bin", dtype=ds.dtype)
        for h, r in zip(hashes, records):
            if h.tobytes() not in seen:
                seen.add(h.tobytes())
                keep.append(r)
    assert 100 < len(keep) <= 150 and any(len(s) == 4 for s in ds.skips)  # some shards are all repeats
    assert len(ds) == len(keep) and (np.stack([ds.record(i) for i in range(len(ds))]) == np.stack(keep)).all()


def test_duplicates_file_is_hashed_at_open_only_once_it_changed(tmp_path, monkeypatch):
    """Every rank reads duplicates.npy (320 MB at 40M duplicates) when it opens the folder, and its sha256 only
    once its size or mtime differ from what shard_stats.json records (a copy without times: then hashed, and
    opened when it still matches the manifest; other content: refused, naming the file)."""
    from data_pipeline import code_shards

    folder = tmp_path / "codes"
    write_random_code_shards(folder, 40, records=4, images=100)
    path = folder / "duplicates.npy"
    hashed, real_sha256_file = [], code_shards.sha256_file
    monkeypatch.setattr(code_shards, "sha256_file", lambda p: hashed.append(p.name) or real_sha256_file(p))
    reference = CodeShardDataset(folder)
    assert sum(map(len, reference.skips)) > 0 and hashed == []
    changed_since(path)
    copied = CodeShardDataset(folder)
    assert hashed == ["duplicates.npy"] and all(np.array_equal(a, b) for a, b in zip(copied.skips, reference.skips))
    found = np.load(path)
    found[-1] -= 1  # another record left out: what a duplicates.npy of another folder could hold
    np.save(path, found)
    changed_since(path)  # (as a copy would be: a coarse file-system clock could give the write the recorded time)
    with pytest.raises(DataError, match=r"codes/duplicates\.npy is missing or does not match the sha256 in "
                                        r".*codes/manifest\.json: rebuild it"):
        CodeShardDataset(folder)


def test_manifest_step_removes_what_killed_manifest_steps_left_half_written(tmp_path):
    """Temporary files of manifest.json / shard_stats.json / duplicates.npy (320 MB at 40M duplicates) whose
    writer was killed are removed by the next manifest step: those of a process of this host that no longer
    runs (untouched for an hour here), and any a day old; another node's recent one (it may still be writing),
    a running one and a dead-looking one just written (a container's own process ids) stay."""
    import socket

    from data_pipeline.synthetic import RANDOM_SHARDS_HEADER

    folder = tmp_path / "codes"
    write_random_code_shards(folder, 3, images=4)
    host = socket.gethostname().split(".")[0] or "host"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = {"dead here": folder / f".duplicates.{host}.{dead.pid}.0a1b2c3d.tmp.npy",
            "dead here, just written": folder / f".manifest.{host}.{dead.pid}.1a1b2c3d.tmp.json",
            "a day old": folder / ".manifest.othernode.123.0a1b2c3d.tmp.json",
            "recent elsewhere": folder / ".shard_stats.othernode.456.0a1b2c3d.tmp.json",
            "running here": folder / f".manifest.{host}.{os.getpid()}.0a1b2c3d.tmp.json"}
    for path in left.values():
        path.write_bytes(b"half")
    for name, age in (("a day old", 2 * 86400), ("dead here", 3600)):
        st = left[name].stat()
        os.utime(left[name], ns=(st.st_atime_ns, st.st_mtime_ns - age * 10**9))
    write_manifest(folder, RANDOM_SHARDS_HEADER, ["00000", "00001", "00002"])
    assert {name: path.exists() for name, path in left.items()} == {
        "dead here": False, "dead here, just written": True, "a day old": False, "recent elsewhere": True,
        "running here": True}


def test_manifest_of_a_partial_folder_an_older_shard_and_damaged_hashes(tmp_path):
    """write_manifest: of 2 shards of 3 inputs, an incomplete manifest of 3 inputs; a shard that records no header
    (an older version's) is held to manifest.json and taken when it agrees; an older shard of 0 records needs no
    .hashes file; a .hashes of another length than its records' is refused naming it (not a reshape error)."""
    from data_pipeline.manifest import check_folder
    from data_pipeline.synthetic import RANDOM_SHARDS_HEADER as HEAD

    folder, names = tmp_path / "codes", ["00000", "00001", "00002"]
    write_random_code_shards(folder, 2)
    partial = write_manifest(folder, HEAD, names)
    assert (partial["complete"], partial["num_inputs"], len(partial["shards"])) == (False, 3, 2)
    older = json.loads((folder / "00001.json").read_text())
    del older["header"]
    (folder / "00001.json").write_text(json.dumps(older))
    check_folder(folder, HEAD)
    (folder / "00002.bin").write_bytes(b"")
    (folder / "00002.json").write_text(json.dumps({"input": "00002.tar", "records": 0, "seen": 1,
                                                   "skipped": {"too_small": 1}}))
    whole = write_manifest(folder, HEAD, names)
    assert whole["complete"] and whole["records"] == 6 and whole["num_inputs"] == 3
    with open(folder / "00000.hashes", "ab") as f:
        f.write(bytes(16))
    with pytest.raises(DataError, match=r"00000\.hashes: 64 bytes, expected 3 hashes of 16 bytes"):
        write_manifest(folder, HEAD, names)
    with pytest.raises(DataError, match=r"00000\.bin \(and 2 more shard\(s\)\) was made with another image tokenizer"
                                        r".*: vq\.hash"):
        check_folder(folder, {**HEAD, "vq": {**HEAD["vq"], "hash": "w"}})


def test_the_manifest_holds_finished_shards_only_and_is_made_again_for_one_finished_meanwhile(tmp_path, monkeypatch):
    """write_manifest: a shard whose .bin is written and not yet its .json (a task at it, or killed) is left out,
    and is not complete, as one whose .bin is gone; a shard that finished while the manifest was being made has
    it made again, complete; the skipped counts (the folder's, and a shard's with its duplicates added) are in
    name order; a .hashes shorter than its records is refused naming it."""
    from data_pipeline import manifest as mf
    from data_pipeline.synthetic import RANDOM_SHARDS_HEADER as HEAD

    folder, names = tmp_path / "codes", ["00000", "00001", "00002"]
    write_random_code_shards(folder, 3, images=2)
    for name, skipped in (("00000", {"too_small": 1}), ("00002", {"too_small": 2, "bad_caption": 1})):
        meta = json.loads((folder / f"{name}.json").read_text())
        (folder / f"{name}.json").write_text(json.dumps({**meta, "skipped": skipped}))
    last = (folder / "00002.json").read_text()
    (folder / "00002.json").unlink()
    assert not mf.shard_is_complete(folder, "00002")
    partial = write_manifest(folder, HEAD, names)
    assert not partial["complete"] and [s["name"] for s in partial["shards"]] == ["00000", "00001"]

    real, calls = mf._manifest, []

    def finished_meanwhile(*args):
        if not calls:
            (folder / "00002.json").write_text(last)
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(mf, "_manifest", finished_meanwhile)
    whole = write_manifest(folder, HEAD, names)
    assert calls == [names[:2], names] and whole["complete"] and whole["duplicates"]["count"] == 7
    written = json.loads((folder / "manifest.json").read_text())
    assert written == whole and list(written["skipped"].items()) == [
        ("bad_caption", 1), ("duplicate_across_shards", 7), ("too_small", 3)]
    assert [list(s["skipped"].items()) for s in written["shards"]] == [
        [("duplicate_across_shards", 1), ("too_small", 1)], [("duplicate_across_shards", 3)],
        [("bad_caption", 1), ("duplicate_across_shards", 3), ("too_small", 2)]]
    with open(folder / "00001.hashes", "r+b") as f:
        f.truncate(32)
    with pytest.raises(DataError, match=r"00001\.hashes: 32 bytes, expected 3 hashes of 16 bytes"):
        write_manifest(folder, HEAD, names)
    (folder / "00000.bin").unlink()
    assert not mf.shard_is_complete(folder, "00000")

def test_duplicates_pass_keeps_the_first_of_each_hash_in_every_part_of_the_hash_space():
    """find_duplicates sorts the hashes a part (their first bits) at a time: against a walk over the records by
    hand, on 5 shards of 2,000 hashes drawn from 3,000 (every part of the space used, many repeats) with pairs
    that differ only in their last byte (the same first word: one part, told apart by the second)."""
    from data_pipeline.manifest import BUCKET_BITS, find_duplicates

    rng = np.random.default_rng(7)
    pool = rng.integers(0, 256, (3000, 16), dtype=np.uint8)
    pool[1::2] = pool[::2]
    pool[1::2, 15] ^= 1  # (odd = even but for the last bit)
    shards = [pool[rng.integers(0, 3000, 2000)] for _ in range(5)]
    seen, expected = set(), []
    for i, h in enumerate(np.concatenate(shards)):
        if h.tobytes() in seen:
            expected.append(i)
        seen.add(h.tobytes())
    found = find_duplicates(iter(shards), 10000)
    assert found.dtype == np.int64 and found.tolist() == expected
    # Hashes of one part sharing their second word, told apart by the first: a repeat after another is still one
    a, b = np.zeros(16, dtype=np.uint8), np.zeros(16, dtype=np.uint8)
    b[7] = 1  # (the first word's last byte: the same part)
    assert find_duplicates(iter([np.stack([a, b, a, b])]), 4).tolist() == [2, 3]
    assert len(set(pool[:, 0] >> (8 - BUCKET_BITS))) == 1 << BUCKET_BITS
    for total in (9999, 10001):
        with pytest.raises(DataError, match=f"hold 10000 records, their metadata {total}"):
            find_duplicates(iter(shards), total)


def test_a_folder_of_more_shards_than_open_files_allowed_is_read_whole(tmp_path):
    """LAION-400M is ~41,000 shards of 10,000, and a process may hold ~1,024 open files (`ulimit -n`): a dataset
    keeping a memory map (a file descriptor) per shard could not open such a folder. Under a limit of 128, a
    folder of 300 shards opens, every record read back in a shuffled order equals its bytes in its .bin, and
    the reader never holds more descriptors than its limit."""
    import resource

    write_random_code_shards(tmp_path / "codes", 300)
    script = f"""
import numpy as np, os
from data_pipeline.code_shards import CodeShardDataset
ds = CodeShardDataset({str(tmp_path / "codes")!r})
expected = np.concatenate([np.fromfile(p, dtype=ds.dtype) for p in ds.paths])
order = np.random.default_rng(0).permutation(len(ds))
got = np.stack([ds.record(int(i)) for i in order])
assert len(ds) == 900 and (got == expected[order]).all()
assert len(ds.files.open) == ds.files.limit == 32, (len(ds.files.open), ds.files.limit)
print("ok", len(os.listdir("/proc/self/fd")))
"""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_environment(), capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                                     (128, hard)))
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
    assert int(proc.stdout.split()[1]) < 128


def test_a_record_outside_the_dataset_or_past_a_shard_cut_since_is_refused_naming_it(tmp_path):
    """record(i) reads sample i or refuses: a negative index is not read from the end (the loader never asks
    one: it would be a bug upstream), and a shard cut after the dataset was opened is named, not read short."""
    write_random_code_shards(tmp_path / "codes", 2)
    ds = CodeShardDataset(tmp_path / "codes")
    expected = np.fromfile(tmp_path / "codes" / "00001.bin", dtype=ds.dtype)
    assert len(ds) == 6 and (ds.record(5) == expected[2]).all()
    for index in (-1, 6):
        with pytest.raises(IndexError, match=rf"sample {index} outside 0\.\.5 of .*codes"):
            ds.record(index)
    with open(tmp_path / "codes" / "00001.bin", "r+b") as f:
        f.truncate(2 * ds.dtype.itemsize + 1)
    assert (ds.record(4) == expected[1]).all()
    with pytest.raises(DataError, match=r"codes/00001\.bin: record 2 ends past the file's end; the shard changed"):
        ds.record(5)


def test_a_weight_that_is_not_a_positive_number_is_refused_naming_its_item(tmp_path):
    """folder:weight takes a positive number: 0 (the folder would never be read), a negative, nan, inf or a word
    are refused naming the item, a lone folder's included (its weight otherwise goes unused)."""
    from types import SimpleNamespace

    write_random_code_shards(tmp_path / "a", 2)
    write_random_code_shards(tmp_path / "b", 2)
    model_cfg = SimpleNamespace(text_seq_len=4, image_seq_len=4, image_vocab_size=64, text_vocab_size=128)
    for weight in ("0", "-1", "nan", "inf", "two"):
        for spec in (f"{tmp_path}/a:{weight}", f"{tmp_path}/b:1,{tmp_path}/a:{weight}"):
            with pytest.raises(DataError, match=rf"/a:{weight}: the weight after ':' must be a positive number"):
                open_training_data(spec, model_cfg)
    assert open_training_data(f"{tmp_path}/b:1,{tmp_path}/a:0.5", model_cfg).counts.tolist() == [8, 4]
    for spec in ("", " , "):
        with pytest.raises(DataError, match="data.shards is empty: give a code-shard folder"):
            open_training_data(spec, model_cfg)
    for weights in ([1, 0], [1, -1], [1]):
        with pytest.raises(ValueError, match="MixedDataset needs one positive weight per dataset"):
            MixedDataset([[0], [1]], weights)


def test_an_unfinished_or_non_object_manifest_is_refused_naming_it(tmp_path):
    """A manifest of a pre-tokenization not finished (complete: false) says how many shards are done; a
    metadata file that is JSON but not an object is named as such (not an AttributeError from deep inside)."""
    write_random_code_shards(tmp_path / "codes", 2)
    path = tmp_path / "codes" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "complete": False, "num_inputs": 5}))
    with pytest.raises(DataError, match=r"manifest\.json: only 2 of 5 shards are done; finish"):
        CodeShardDataset(tmp_path / "codes")
    path.write_text(json.dumps([manifest]))
    with pytest.raises(DataError, match=r"manifest\.json: a JSON list, expected an object"):
        CodeShardDataset(tmp_path / "codes")


def test_a_shard_of_no_records_opens_without_a_scan(tmp_path):
    """An input whose every sample was skipped makes a shard of no records: a folder holding one opens (its
    empty .bin has nothing to check) even where its maxima must be found by a scan (no shard_stats.json)."""
    from data_pipeline.code_shards import record_dtype

    write_random_code_shards(tmp_path / "codes", 2)
    path = tmp_path / "codes" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][1]["records"], manifest["records"] = 0, 3
    path.write_text(json.dumps(manifest))
    (tmp_path / "codes" / "00001.bin").write_bytes(b"")
    (tmp_path / "codes" / "shard_stats.json").unlink()
    expected = np.fromfile(tmp_path / "codes" / "00000.bin", dtype=record_dtype(4, 4))
    ds = CodeShardDataset(tmp_path / "codes")
    assert len(ds) == 3 and all((ds.record(i) == expected[i]).all() for i in range(3))


def test_a_blends_tokenizers_are_those_of_its_folders():
    """data_tokenizers of a blend (what a checkpoint records and the held-out data is checked against) are its
    folders' (a blend shares them), not None as for data that records none."""
    import tempfile
    from types import SimpleNamespace

    from data_pipeline.code_shards import data_tokenizers

    with tempfile.TemporaryDirectory() as folder:
        for name in "ab":
            write_random_code_shards(Path(folder) / name, 1)
        model_cfg = SimpleNamespace(text_seq_len=4, image_seq_len=4, image_vocab_size=64, text_vocab_size=128)
        blend = open_training_data(f"{folder}/a:1,{folder}/b:1", model_cfg)
        manifest = json.loads((Path(folder) / "a" / "manifest.json").read_text())
        assert isinstance(blend, MixedDataset)
        assert data_tokenizers(blend) == {k: manifest[k] for k in ("vq", "text_tokenizer")}


def test_a_shard_rewritten_in_place_at_the_same_size_is_scanned_again(tmp_path):
    """The scan of a shard with no recorded maxima is remembered by path, size, mtime and inode: the same file
    rewritten at the same size (another value, a later mtime) is scanned again, not taken from what was
    remembered."""
    from data_pipeline.code_shards import record_dtype, shard_maxima

    dtype, path = record_dtype(4, 3), tmp_path / "00000.bin"
    records = np.zeros(5, dtype=dtype)
    records["codes"][2, 1] = 40
    path.write_bytes(records.tobytes())
    assert shard_maxima(path, dtype, {}) == (40, 0)
    records["codes"][2, 1], records["text"][4, 0] = 70, 9
    path.write_bytes(records.tobytes())
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert shard_maxima(path, dtype, {}) == (70, 9)


def test_the_open_shards_are_the_most_recently_read_and_a_copy_of_the_dataset_opens_its_own():
    """OpenFiles closes the least recently used shard when full (a shard read often stays open), and a dataset
    sent to another process (pickled: a DataLoader worker that is not forked) opens files of its own: the
    descriptors it was sent are not its own, and are neither used nor closed by it."""
    import pickle
    import tempfile

    from data_pipeline.code_shards import OpenFiles

    with tempfile.TemporaryDirectory() as folder:
        a, b, c = (Path(folder) / name for name in "abc")
        for path in (a, b, c):
            path.write_bytes(b"x")
        files = OpenFiles(limit=2)
        fd_a = files.fd(a)
        files.fd(b)
        assert files.fd(a) == fd_a  # (a read again: now the most recent)
        files.fd(c)
        assert list(files.open) == [a, c] and files.fd(a) == fd_a
        write_random_code_shards(Path(folder) / "codes", 2)
        ds = CodeShardDataset(Path(folder) / "codes")
        before = [ds.record(i) for i in range(len(ds))]
        copy = pickle.loads(pickle.dumps(ds))
        assert copy.files is not ds.files and not copy.files.open
        assert all((ds.record(i) == r).all() for i, r in enumerate(before))  # (its descriptors still open)
        assert all((copy.record(i) == r).all() for i, r in enumerate(before))


def test_corrupt_inputs_are_refused_clearly(setup, one_run, tmp_path):
    _, out = one_run
    with pytest.raises(FileNotFoundError, match="input shard"):
        expand_shards(str(tmp_path / "{0..2}.tar"))
    with pytest.raises(DataError, match="the model expects 32"):
        CodeShardDataset(out, text_len=32)
    (tmp_path / "manifest.json").write_text(json.dumps({**json.loads((out / "manifest.json").read_text())}))
    with pytest.raises(ValueError, match="00000.bin: .* bytes, expected"):
        (tmp_path / "00000.bin").write_bytes(b"\0" * 10)
        CodeShardDataset(tmp_path)


@pytest.mark.parametrize("order", ["feistel", "randperm"])
def test_sampler_same_global_batches_at_any_dp_size_and_after_restore(order):
    sampler = GlobalBatchSampler(dataset_len=37, global_batch_size=8, seed=5, order=order)
    for step in range(12):  # crosses several epochs
        whole = sampler.global_batch(step * 8)
        for dp in (2, 4):
            parts = [GlobalBatchSampler.rank_slice(whole, r, dp) for r in range(dp)]
            assert torch.equal(torch.cat(parts), whole)
            for r, part in enumerate(parts):  # each rank computes its part alone
                positions, ids = sampler.rank_batch(step * 8, r, dp)
                assert torch.equal(ids, part) and positions.tolist() == list(range(step * 8 + r * len(part),
                                                                                   step * 8 + (r + 1) * len(part)))
    state = sampler.state_dict(consumed=5 * 8)
    restored = GlobalBatchSampler(state["dataset_len"], state["global_batch_size"], state["seed"], state["order"])
    assert torch.equal(restored.global_batch(state["consumed"]), sampler.global_batch(40))
    epochs = [sampler.stream(37 * e, 37).tolist() for e in range(4)]
    assert all(sorted(epoch) == list(range(37)) for epoch in epochs)  # each epoch a permutation
    assert len({tuple(epoch) for epoch in epochs}) == 4  # reshuffled every epoch (not two orders in turn)


def test_the_sampler_refuses_what_it_cannot_order_or_split():
    """An empty dataset, an order it does not know (it would silently be another), and a global batch that does
    not split evenly over the data-parallel ranks (each rank's share rounded down would leave samples out of
    every step) are refused; a split that does divide is not."""
    with pytest.raises(ValueError, match="the dataset is empty"):
        GlobalBatchSampler(dataset_len=0, global_batch_size=8, seed=5)
    with pytest.raises(ValueError, match=r"sampler order 'shuffle': expected one of feistel, randperm"):
        GlobalBatchSampler(dataset_len=37, global_batch_size=8, seed=5, order="shuffle")
    sampler = GlobalBatchSampler(dataset_len=37, global_batch_size=8, seed=5)
    with pytest.raises(ValueError, match="global batch of 8 does not split over 3 data-parallel ranks"):
        sampler.rank_batch(16, 0, 3)
    with pytest.raises(ValueError, match="global batch of 8 does not split over 3 data-parallel ranks"):
        GlobalBatchSampler.rank_slice(sampler.global_batch(16), 0, 3)
    assert len(sampler.rank_batch(16, 3, 4)[1]) == len(GlobalBatchSampler.rank_slice(torch.arange(8), 3, 4)) == 2


def test_the_sample_order_is_the_one_runs_were_trained_with():
    """The order is part of every checkpoint's meaning: a run resumed after an upgrade that changed it would train
    on other samples than it saved its position in (epochs 0 and 1 of seed 1234, recorded 2026-12-05)."""
    sampler = GlobalBatchSampler(dataset_len=1000, global_batch_size=8, seed=1234)
    assert sampler.stream(0, 8).tolist() == [459, 724, 799, 758, 789, 327, 231, 878]
    assert sampler.stream(1000, 8).tolist() == [491, 790, 21, 586, 795, 106, 121, 474]
    assert GlobalBatchSampler(1000, 8, seed=1).stream(1000, 8).tolist() != \
        GlobalBatchSampler(1000, 8, seed=2).stream(0, 8).tolist()


def test_feistel_order_is_a_permutation_of_any_length_without_a_table():
    """Every length (1, powers of two and their neighbours, odd sizes) gets a permutation, another per seed and
    epoch, uncorrelated with the position; at 4 billion samples a global batch is computed in a moment,
    with no table of the dataset's length."""
    from data_pipeline.sampler import feistel_permute

    for n in (1, 2, 3, 4, 5, 37, 63, 64, 65, 1000, 4097):
        assert sorted(feistel_permute(torch.arange(n), n, key=9).tolist()) == list(range(n)), n
    n = 100_000
    a, b = (feistel_permute(torch.arange(n), n, key=k).double() for k in (1, 2))
    assert not torch.equal(a, b)
    for x, y in ((torch.arange(n).double(), a), (a, b)):
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1]) < 0.02
    big = GlobalBatchSampler(dataset_len=4_000_000_000, global_batch_size=4096, seed=1)
    ids = big.global_batch(123_456_789_000)
    assert len(set(ids.tolist())) == 4096 and 0 <= int(ids.min()) and int(ids.max()) < 4_000_000_000


def test_mixed_datasets_by_weight():
    """Exact shares of each epoch; a dataset weighted above its size is cycled (each record equally often), one
    weighted below it is seen whole over the epochs (the stream's epochs continue through it, as the loader
    reads it), not the same part every epoch; the same positions give the same records."""
    from data_pipeline.loader import read_sample

    a, b = list(range(100)), list(range(1000, 1010))
    mix = MixedDataset([a, b], [3, 1], size=400)
    picks = [mix[i] for i in range(400)]
    from_b = [x for x in picks if x >= 1000]
    assert len(from_b) == 100 and Counter(from_b) == {x: 10 for x in b}  # 1:3, b cycled
    assert Counter(x for x in picks if x < 1000) == {x: 3 for x in a}
    assert picks == [MixedDataset([a, b], [3, 1], size=400)[i] for i in range(400)]

    small, big = list(range(1000)), list(range(5000, 6000))  # small weighted 1:3, its share 500 of 2000
    mix = MixedDataset([small, big], [1, 3])
    sampler = GlobalBatchSampler(dataset_len=len(mix), global_batch_size=8, seed=3)
    stream = sampler.stream(0, 2 * len(mix))
    drawn = [read_sample(mix, int(i), k) for k, i in enumerate(stream.tolist())]
    epochs = [[x for x in drawn[e * len(mix):(e + 1) * len(mix)] if x < 1000] for e in (0, 1)]
    assert [len(e) for e in epochs] == [500, 500] and sorted(epochs[0] + epochs[1]) == small
    assert 100 < sum(x < 500 for x in epochs[0]) < 400  # an epoch's part is spread over the whole dataset


def test_trainer_reads_code_shards(single_process, setup, one_run, tmp_path):
    from tests.conftest import held_out_losses, run
    from training.config import ConfigError

    _, out = one_run
    shutil.copytree(out, tmp_path / "valid")  # (a copy of the same records: read as held-out data, another folder)
    model = ["model.text_seq_len=16", "model.image_grid=8", "model.image_vocab_size=64", "model.text_vocab_size=128",
             "data.synthetic=false", f"data.shards={out}:2,{out}:1", f"data.valid_shards={tmp_path / 'valid'}"]
    losses = run(str(tmp_path / "run"), *model, steps=4)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert list(held_out_losses(tmp_path / "run")) == [3, 4]
    # Named held-out sets: each measured as that folder alone is (the same run's), their mean as valid_loss.
    shutil.copytree(out, tmp_path / "valid2")
    run(str(tmp_path / "named"), *model[:-1], f"data.valid_shards=a={tmp_path / 'valid'},b={tmp_path / 'valid2'}",
        steps=4)
    rows = [json.loads(line) for line in (tmp_path / "named" / "metrics.jsonl").read_text().splitlines()]
    alone = held_out_losses(tmp_path / "run")
    for key in ("valid_loss_a", "valid_loss_b", "valid_loss"):
        assert {row["step"]: row[key] for row in rows if key in row} == pytest.approx(alone, rel=1e-6), key
    with pytest.raises(ConfigError, match="records have text_len=16, the model expects 32"):
        run(str(tmp_path / "bad"), *model, "model.text_seq_len=32")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_data_of_other_tokenizers_is_refused_for_blends_resumes_and_sampling(single_process, setup, one_run,
                                                                              tmp_path):
    """The same records under another image tokenizer's hash (as data pre-tokenized with another VQ): blending
    it with the first is refused, and so is resuming a run trained on the first with it; the export records
    its training data's tokenizers, and sampling with a VQ of another hash is refused (its own is accepted)."""
    from evaluation.generate import check_fits
    from tests.conftest import run
    from training.config import ConfigError
    from training.export import export as export_run
    from training.export import exported_data_tokenizers, exported_model_config

    _, out = one_run
    other = tmp_path / "other"
    shutil.copytree(out, other)
    for path in [other / "manifest.json", *other.glob("0*.json")]:
        meta = json.loads(path.read_text())
        (meta["header"] if "header" in meta else meta)["vq"]["hash"] = "0" * 64
        path.write_text(json.dumps(meta))
    model = ["model.text_seq_len=16", "model.image_grid=8", "model.image_vocab_size=64", "model.text_vocab_size=128",
             "data.synthetic=false", "train.eval_interval=0"]  # (no held-out shards)
    with pytest.raises(ConfigError, match=rf"{other} was made with another image tokenizer than {out}"):
        run(str(tmp_path / "blend"), *model, f"data.shards={out},{other}")
    run(str(tmp_path / "run"), *model, f"data.shards={out}", steps=2)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000002 on data.shards=.*another image tokenizer"):
        run(str(tmp_path / "run"), *model, f"data.shards={other}", steps=3)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before

    exported = export_run(tmp_path / "run")
    assert exported_data_tokenizers(exported) == {k: json.loads((out / "manifest.json").read_text())[k]
                                                  for k in ("vq", "text_tokenizer")}
    model_cfg, tok = exported_model_config(exported), TextTokenizer(setup["spm"], 16)
    check_fits(model_cfg, load_image_tokenizer(setup["vq"]), tok, exported_data_tokenizers(exported))
    torch.manual_seed(1)
    save_image_tokenizer(ConvVQ(image_size=64, downsample=3, channels=16, code_dim=8, codebook_size=64),
                         tmp_path / "vq_other.pt")
    with pytest.raises(ValueError, match="the image tokenizer given .* is not the one the model's training data"):
        check_fits(model_cfg, load_image_tokenizer(tmp_path / "vq_other.pt"), tok, exported_data_tokenizers(exported))


def test_resume_on_grown_data_warns_that_the_order_changes(single_process, setup, tmp_path, log_lines):
    """Shards added to the folder data.shards names between two segments of a run: the sample order (a
    permutation of the dataset's length) is another from the resumed step on, which the log says."""
    from tests.conftest import run

    inputs, vq = expand_shards(setup["pattern"]), load_image_tokenizer(setup["vq"])
    tok = TextTokenizer(setup["spm"], 16)
    codes = tmp_path / "codes"
    before = pretokenize(inputs[:2], codes, vq, tok, FILTERS)["records"]
    model = ["model.text_seq_len=16", "model.image_grid=8", "model.image_vocab_size=64", "model.text_vocab_size=128",
             "data.synthetic=false", f"data.shards={codes}", "train.eval_interval=0"]  # (no held-out shards)
    assert len(run(str(tmp_path / "run"), *model, steps=3)) == 3
    after = pretokenize(inputs, codes, vq, tok, FILTERS)["records"]
    assert len(run(str(tmp_path / "run"), *model, steps=4)) == 1
    warning = f"warning: the training data holds {after:,} samples, {before:,} when step_00000003 was saved"
    assert any(line.startswith(warning) for line in log_lines), log_lines


def test_train_text_tokenizer_command(setup, tmp_path, capsys):
    from data_pipeline.train_text_tokenizer import main

    main(["--captions", setup["pattern"], "--vocab-size", "60", "--out", str(tmp_path / "spm.model")])
    tok = TextTokenizer(tmp_path / "spm.model", max_len=8)
    ids, length = tok.encode("a red circle on a white background with many more words than fit")
    assert length == 8 and ids[-1] == EOS_ID and tok.decode(ids).startswith("a red circle")
    assert "unreadable tails in 1 shard" in capsys.readouterr().out


def test_the_text_tokenizer_keeps_case_unless_asked_to_fold_it(tmp_path):
    """A model that renders text in its images needs the caption's case ("STOP" on a sign): kept by default,
    lowercased with case_fold (--case-fold), the rule travelling in the model file."""
    captions = [f"A {c} sign that says {w}" for c in ("red", "Blue", "GREEN") for w in ("STOP", "Open", "exit")] * 20
    cased = TextTokenizer(train_sentencepiece(captions, 40, tmp_path / "cased.model"), max_len=64)
    folded = TextTokenizer(train_sentencepiece(captions, 40, tmp_path / "folded.model", case_fold=True), max_len=64)
    assert cased.decode(cased.encode("A Blue sign that says STOP")[0]) == "A Blue sign that says STOP"
    assert folded.decode(folded.encode("A Blue sign that says STOP")[0]) == "a blue sign that says stop"


def test_the_text_tokenizer_trains_on_a_seeded_sample_of_at_most_max_captions(tmp_path):
    """SentencePiece holds every caption it trains on in memory: of more than max_captions, a uniform sample
    (fewer distinct pieces here than all captions support), the same one on every call."""
    import random

    rng = random.Random(0)
    captions = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12)) for _ in range(2000)]
    whole = train_sentencepiece(captions, 8000, tmp_path / "whole.model")
    sampled = [train_sentencepiece(captions, 8000, tmp_path / f"sampled{k}.model", max_captions=200) for k in range(2)]
    sizes = [TextTokenizer(path).sp.get_piece_size() for path in (whole, *sampled)]
    assert sizes[1] < sizes[0] / 2, sizes
    assert sampled[0].read_bytes() == sampled[1].read_bytes()


def test_the_text_tokenizer_refuses_what_it_cannot_encode_with(tmp_path):
    """A text length below 2 (a piece and EOS) and a SentencePiece model of other PAD/EOS ids are refused; 2 gives
    one piece then EOS."""
    import sentencepiece as spm

    from data_pipeline.errors import DataError

    path = train_sentencepiece(["a red circle two green cats"] * 50, 30, tmp_path / "spm.model")
    with pytest.raises(DataError, match="text length 1 .*expected at least 2"):
        TextTokenizer(path, max_len=1)
    ids, length = TextTokenizer(path, max_len=2).encode("a red circle")
    assert len(ids) == 2 and length == 2 and ids[1] == EOS_ID and ids[0] not in (PAD_ID, EOS_ID)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a red circle two green cats"] * 50),
                                   model_prefix=str(tmp_path / "other"), vocab_size=30, hard_vocab_limit=False,
                                   minloglevel=2)
    with pytest.raises(DataError, match=rf"other\.model: pad/eos ids are -1/2, expected {PAD_ID}/{EOS_ID}"):
        TextTokenizer(tmp_path / "other.model")


def test_training_the_text_tokenizer_on_nothing_or_a_failing_reader_names_the_cause(tmp_path):
    """No captions: a DataError saying so; an error raised while the captions are read (a shard that cannot be
    read) comes out as itself, not as SentencePiece's RuntimeError."""
    from data_pipeline.errors import DataError

    with pytest.raises(DataError, match="no captions to train .*spm.model on"):
        train_sentencepiece(iter([]), 30, tmp_path / "spm.model")

    def failing():
        yield "a red circle"
        raise OSError("shard 3 cannot be read")

    with pytest.raises(OSError, match="shard 3 cannot be read"):
        train_sentencepiece(failing(), 30, tmp_path / "spm.model")
    assert not (tmp_path / "spm.model").exists()


@pytest.mark.parametrize("args, says", [(["--vocab-size", "4"], "--vocab-size 4 must be in 5..65536"),
                                        (["--vocab-size", "65537"], "--vocab-size 65537 must be in 5..65536"),
                                        (["--max-captions", "100"], "--max-captions 100 must be more than 100")])
def test_train_text_tokenizer_refuses_sizes_out_of_range(tmp_path, capsys, args, says):
    from data_pipeline.train_text_tokenizer import main

    with pytest.raises(SystemExit):
        main(["--captions", str(tmp_path / "none.tar"), "--out", str(tmp_path / "spm.model"), *args])
    assert says in capsys.readouterr().err


def test_pinned_orders_of_a_power_of_two_length_and_of_the_stored_permutation():
    """The order is part of every checkpoint's meaning (see above), at every length: 1024 and 2048 (powers of two:
    the Feistel network's halves are those of n - 1's bits, so 1024's first values are 1000's) and the stored
    permutation (`order="randperm"`) of runs begun before, whose checkpoints record no order (recorded
    2026-12-06)."""
    sampler = GlobalBatchSampler(dataset_len=1024, global_batch_size=8, seed=1234)
    assert sampler.stream(0, 8).tolist() == [459, 724, 799, 758, 1009, 327, 231, 878]
    assert sampler.stream(1024, 8).tolist() == [491, 790, 21, 586, 795, 106, 121, 474]
    sampler = GlobalBatchSampler(dataset_len=2048, global_batch_size=8, seed=1234)
    assert sampler.stream(0, 8).tolist() == [1023, 1067, 799, 1027, 1293, 1459, 1319, 778]
    assert sampler.stream(2048, 8).tolist() == [1756, 1965, 1034, 325, 1413, 393, 2027, 1123]
    old = GlobalBatchSampler(dataset_len=1000, global_batch_size=8, seed=1234, order="randperm")
    assert old.stream(0, 8).tolist() == [251, 394, 456, 861, 938, 448, 19, 491]
    assert old.stream(1000, 8).tolist() == [985, 286, 232, 127, 211, 185, 611, 916]


def test_the_chunked_scan_of_a_changed_shard_sees_every_record(tmp_path, monkeypatch):
    """A shard with no recorded maxima is scanned in chunks of CHUNK_RECORDS: the maxima (and the first record
    over a limit) are those of a whole-array computation wherever in a chunk the largest value lies."""
    from data_pipeline import code_shards
    from data_pipeline.code_shards import first_record_at_or_above, record_dtype, shard_maxima

    monkeypatch.setattr(code_shards, "CHUNK_RECORDS", 4)
    dtype = record_dtype(4, 3)
    for at in range(10):
        records = np.zeros(10, dtype=dtype)
        records["codes"][at, 2], records["text"][at, 1] = 50 + at, 30 + at
        path = tmp_path / f"{at}.bin"
        path.write_bytes(records.tobytes())
        assert shard_maxima(path, dtype, {}) == (int(records["codes"].max()), int(records["text"].max())) == \
            (50 + at, 30 + at)
        assert first_record_at_or_above(path, dtype, "codes", 50) == at


def test_captions_are_cut_to_whole_characters_within_their_bytes():
    """utf8_truncate against a brute force: the longest prefix (in characters) whose UTF-8 fits the limit."""
    from data_pipeline.code_shards import utf8_truncate

    for text in ("a" * 300, "é" * 200, "a" + "é" * 200, "ab" + "漢" * 100, "short", "x" * 256, "🙂" * 70):
        for limit in (1, 2, 3, 4, 255, 256, 257):
            want = max((text[:n] for n in range(len(text) + 1) if len(text[:n].encode()) <= limit), key=len)
            assert utf8_truncate(text, limit) == want.encode(), (text[:3], limit)


def test_filters_keep_samples_exactly_at_their_limits():
    """A score equal to its limit passes (max_*: dropped when it exceeds; min_similarity: when below), so does a
    caption of max_caption_chars; an image whose shorter side is min_size, or whose sides are max_aspect:1, is
    kept; the centre crop is the middle."""
    from dataclasses import replace

    def sample(size=(48, 48), meta=None, colours=None):
        img = Image.new("RGB", size, (9, 9, 9))
        for i, c in enumerate(colours or ()):  # thirds along the longer side
            img.paste(c, (i * size[0] // 3, 0, (i + 1) * size[0] // 3, size[1]) if size[0] >= size[1] else
                      (0, i * size[1] // 3, size[0], (i + 1) * size[1] // 3))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return {"__key__": "k", "png": buf.getvalue(), "txt": b"a caption", "json": json.dumps(meta or {}).encode()}

    cfg = FilterConfig(image_size=16, min_size=16, max_aspect=3.0, max_punsafe=0.5, max_pwatermark=0.25,
                       min_similarity=0.3)
    at_limits = {"punsafe": 0.5, "pwatermark": 0.25, "similarity": 0.3}
    assert prepare_sample(sample(meta=at_limits), cfg).reason is None
    for field, value in (("punsafe", 0.51), ("pwatermark", 0.26), ("similarity", 0.29)):
        assert prepare_sample(sample(meta={**at_limits, field: value}), cfg).reason == field
    assert prepare_sample(sample(), replace(cfg, max_caption_chars=len("a caption"))).reason is None
    assert prepare_sample(sample(), replace(cfg, max_caption_chars=len("a caption") - 1)).reason == "caption_too_long"
    assert prepare_sample(sample(size=(48, 16)), cfg).reason is None  # shorter side 16 = min_size, 3:1
    assert prepare_sample(sample(size=(48, 15)), cfg).reason == "too_small"
    assert prepare_sample(sample(size=(49, 16)), cfg).reason == "bad_aspect"
    assert prepare_sample(sample(size=(16, 49)), cfg).reason == "bad_aspect"  # (a portrait image too)
    wide = prepare_sample(sample(size=(48, 16), colours=[(255, 0, 0), (0, 255, 0), (0, 0, 255)]), cfg).image
    assert wide.shape == (3, 16, 16) and wide[:, :, 2:14].permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() \
        == [[0, 255, 0]]  # the middle third (its edges blend with the neighbours' colours)
    tall = prepare_sample(sample(size=(16, 48), colours=[(255, 0, 0), (0, 255, 0), (0, 0, 255)]), cfg).image
    assert tall.shape == (3, 16, 16) and tall[:, 2:14, :].permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() \
        == [[0, 255, 0]]  # (a portrait image: the middle third from top to bottom)


def test_captions_are_stripped_and_the_image_hash_is_the_files_sha256():
    """A caption keeps no surrounding white space (nor is one of white space alone a caption: empty_caption); a
    kept sample's image hash (its records' NNNNN.hashes, the duplicate passes) is the sha256 of the image file as
    stored, not of its decoded pixels: the same picture saved twice in other files is two images."""
    png, jpg = lf.encode(lf.shape_image("red", "circle"), "PNG"), lf.encode(lf.shape_image("red", "circle"))
    cfg = FilterConfig(image_size=16, min_size=16)
    kept = prepare_sample({"__key__": "k", "png": png, "txt": b" \t a red circle\n"}, cfg)
    assert kept.reason is None and kept.caption == "a red circle"
    assert prepare_sample({"__key__": "k", "png": png, "txt": b" \n\t "}, cfg).reason == "empty_caption"
    assert prepare_sample({"__key__": "k", "png": png}, cfg).reason == "empty_caption"  # (no .txt at all)
    assert kept.image_hash == hashlib.sha256(png).hexdigest()
    other = io.BytesIO()
    Image.open(io.BytesIO(png)).save(other, "PNG", compress_level=1)  # (the same pixels, other bytes)
    again = prepare_sample({"__key__": "k", "png": other.getvalue(), "txt": b"x"}, cfg)
    assert torch.equal(again.image, kept.image) and again.image_hash == hashlib.sha256(other.getvalue()).hexdigest()
    assert prepare_sample({"__key__": "k", "jpg": jpg, "txt": b"x"}, cfg).image_hash == hashlib.sha256(jpg).hexdigest()


def test_images_reach_the_tokenizer_scaled_to_minus_one_to_one():
    """encode_images gives the image tokenizer what vq.train trained it on: uint8 0..255 as float -1..1."""
    from data_pipeline.pretokenize import encode_images

    class Echo:
        def encode(self, batch):
            return batch

    image = torch.tensor([0, 255, 0], dtype=torch.uint8).reshape(3, 1, 1)
    assert encode_images(Echo(), [image, image], "cpu").tolist() == [[-1.0, 1.0, -1.0]] * 2


def test_a_blend_walks_each_dataset_in_its_stride_order_continuing_over_the_epochs():
    """By hand: 10 records take the stride 7 (round(10 x 0.618) = 6 shares 2 with 10; 7 does not); weights 1:1 of
    10 positions give each dataset 5 a epoch: epoch 0 draws records 0, 7, 14, 21, 28 (mod 10), epoch 1 the next 5
    draws, epoch 2 starts over. 100 records: round(61.8) = 62 shares 2 with 100, so 63."""
    mix = MixedDataset([list(range(10)), list(range(100, 110))], [1, 1], size=10)
    assert [mix.at_epoch(i, 0) for i in range(10)] == [0, 7, 4, 1, 8, 100, 107, 104, 101, 108]
    assert [mix.at_epoch(i, 1) for i in range(10)] == [5, 2, 9, 6, 3, 105, 102, 109, 106, 103]
    assert [mix.at_epoch(i, 2) for i in range(5)] == [0, 7, 4, 1, 8]
    assert [MixedDataset([list(range(100))], [1])[i] for i in range(4)] == [0, 63, 26, 89]


def test_an_input_of_the_same_name_and_another_size_is_refused(tmp_path):
    """check_folder: a finished shard made from an input of another size than this run's input of that name (a
    re-downloaded tar holds other samples) is refused, naming both sizes; of the same size it is taken."""
    from data_pipeline.manifest import check_folder

    head = {"vq": {"hash": "v"}, "text_tokenizer": {"hash": "t"}}
    out, tar = tmp_path / "codes", tmp_path / "laion" / "00000.tar"
    out.mkdir()
    tar.parent.mkdir()
    tar.write_bytes(b"x" * 11)
    (out / "00000.json").write_text(json.dumps({"header": head, "input": "elsewhere/00000.tar", "input_bytes": 10}))
    with pytest.raises(DataError, match=r"00000\.bin was made from elsewhere/00000\.tar of 10 bytes, .* has 11"):
        check_folder(out, head, [tar])
    tar.write_bytes(b"x" * 9)  # (shorter than it was: refused as well)
    with pytest.raises(DataError, match=r"00000\.bin was made from elsewhere/00000\.tar of 10 bytes, .* has 9"):
        check_folder(out, head, [tar])
    tar.write_bytes(b"x" * 10)
    check_folder(out, head, [tar])
    check_folder(tmp_path / "not yet made", head, [tar])  # (nothing to refuse)
    (out / "00000.json").write_text(json.dumps({"header": head}))  # (an older shard, recording no input: taken)
    check_folder(out, head, [tar])


def test_of_several_other_shards_the_refusal_names_the_first_by_number(tmp_path):
    """check_folder and write_manifest name the lowest-numbered offending shard, also past 99,999 inputs, where
    the names grow a digit ("100000" sorts before "20000" as text)."""
    from data_pipeline.manifest import check_folder

    head = {"vq": {"hash": "v"}, "text_tokenizer": {"hash": "t"}}
    out = tmp_path / "codes"
    out.mkdir()
    for i in (20000, 100000):
        (out / f"{i:05d}.json").write_text(json.dumps({"header": head, "input": f"old-{i:05d}.tar"}))
    class Inputs(collections.abc.Sequence):  # 100,001 input paths made when asked (a list of them: seconds of GC)
        def __len__(self):
            return 100001

        def __getitem__(self, i):
            return tmp_path / f"{range(100001)[i]:05d}.tar"  # (other names: no file is opened)

    inputs = Inputs()
    with pytest.raises(DataError, match=r"codes/20000\.bin was made from old-20000\.tar, and this run's input 20000"):
        check_folder(out, head, inputs)
    with pytest.raises(DataError, match=r"codes/20000\.json: a shard beyond this run's 2 input"):
        write_manifest(out, head, ["00000", "00001"])
    for i in (20000, 100000):
        (out / f"{i:05d}.json").write_text(json.dumps({"header": {**head, "vq": {"hash": "w"}}}))
    with pytest.raises(DataError, match=r"codes/20000\.bin \(and 1 more shard\(s\)\) was made with another"):
        check_folder(out, head)


def test_integer_grey_images_are_scaled_by_their_range():
    """By hand: a 16-bit grey image's 0, 32768, 65535 become 0, 128, 255; a 32-bit one ("I") holding 8-bit values
    (as some decoders give an 8-bit grey PNG) keeps them, one holding larger values is 16-bit."""
    from data_pipeline.images import to_rgb

    def grey(values, mode):
        img = Image.fromarray(np.array([values], dtype=np.uint16 if mode == "I;16" else np.int32))
        assert img.mode == mode
        return np.asarray(to_rgb(img))[0, :, 0].tolist()

    assert grey([0, 32768, 65535], "I;16") == [0, 128, 255]
    assert grey([0, 128, 255], "I") == [0, 128, 255]
    assert grey([0, 256, 65535], "I") == [0, 1, 255]


def test_shrinking_is_antialiased_and_webp_and_jpeg_files_are_read():
    """An image shrunk to the tokenizer's size is filtered over the pixels each output pixel covers (bicubic,
    antialiased): stripes one pixel wide become their mean grey, not a sample of the stripes. Besides .jpg and
    .png, img2dataset writes .webp (its --encode_format) and some shards hold .jpeg: each is the sample's image."""
    stripes = Image.fromarray(np.tile(np.array([0, 255], np.uint8), (64, 32)), "L")  # 64 x 64
    cfg = FilterConfig(image_size=16, min_size=16)
    for ext, fmt in (("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")):
        p = prepare_sample({"__key__": "k", ext: lf.encode(stripes, fmt), "txt": b"grey stripes"}, cfg)
        assert p.reason is None and p.image.shape == (3, 16, 16), ext
        if ext == "png":  # (lossless: the stripes exactly; webp and jpeg blur them on their own)
            assert (p.image.float() - 127.5).abs().max() < 16, p.image  # (not 0 or 255; 128 but at the edges)


def test_shared_names_resolve_under_the_shared_data_folder(tmp_path, monkeypatch):
    from data_pipeline.shared_data import resolve, shared_data_dir, shared_path

    (tmp_path / "PartiPrompts.tsv").write_text("Prompt\tCategory\n")
    monkeypatch.setenv("PARTI_SHARED_DATA", str(tmp_path))
    assert resolve("shared:PartiPrompts.tsv") == shared_path("PartiPrompts.tsv") == tmp_path / "PartiPrompts.tsv"
    assert resolve("runs/shared:x.csv") == Path("runs/shared:x.csv")
    with pytest.raises(FileNotFoundError, match="coco.csv is missing: set PARTI_SHARED_DATA"):
        resolve("shared:coco.csv")
    monkeypatch.delenv("PARTI_SHARED_DATA")  # (unset: the shared/data folder beside the project's)
    assert shared_data_dir() == ROOT.parent / "shared" / "data"


def test_named_sets_reads_a_folder_with_an_equals_sign_as_a_folder_and_refuses_other_names(tmp_path, monkeypatch):
    """data.valid_shards: a relative folder 'split=val' (a Hive-style layout) that is there is one unnamed set, not a
    set 'split' of folder 'val'; a name of other characters ('coco-val=...') is refused saying so, not read as a
    folder that is not there."""
    from common.config import ConfigError
    from data_pipeline.training_data import named_sets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "split=val").mkdir()
    assert named_sets("split=val") == {"": "split=val"}
    assert named_sets("split=val:2,codes/b:1") == {"": "split=val:2,codes/b:1"}
    assert named_sets("coco=codes/a,laion=codes/b:2") == {"coco": "codes/a", "laion": "codes/b:2"}
    with pytest.raises(ConfigError, match="'coco-val=codes/a' is neither a folder nor name=folder"):
        named_sets("coco-val=codes/a,laion-val=codes/b")
