"""Resume safety (issue #13, items 1, 2, 5): a run never starts again over its own checkpoints, a resume
checks its config against the checkpoint's, checkpoints cannot run code, and bad inputs end in one line
naming the file or field with the run directory as it was.

Runs resume from copies of the reference run (tests/conftest.py: 6 steps, checkpoints at steps 3 and
6, DP=2) in the test process (DP=1, which continues it exactly), so each test costs at most one engine
start-up; refusals come before any engine is built. The table of bad inputs at the end goes through
training.train's main() in this process, and one of them through `python -m training.train`, as a user runs it.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from common.checkpoints import tag_for
from tests.conftest import STEPS, held_out_losses, run
from training.checkpoint import complete_tags, latest_tag
from training.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
MID, LAST = tag_for(3), tag_for(STEPS)


def copy_run(reference_dir: Path, dest: Path, tags=(MID, LAST), latest: str | None = LAST) -> Path:
    """A copy of the reference run directory with the checkpoint folders `tags` and `latest` naming one."""
    shutil.copytree(reference_dir, dest, ignore=shutil.ignore_patterns(".lock", "step_*", "latest"))
    for tag in tags:
        shutil.copytree(reference_dir / "checkpoints" / tag, dest / "checkpoints" / tag)
    if latest:
        (dest / "checkpoints" / "latest").write_text(latest + "\n")
    return dest


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under run_dir (but the lock file, whose holder line each start rewrites) -> its sha256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Item 1: a run does not start again over its own checkpoints


def test_missing_latest_resumes_from_the_newest_complete_checkpoint(single_process, reference, tmp_path, log_lines):
    """`latest` deleted, and the newest folder incomplete (its save was killed before trainer_state.json):
    the resume continues from the newest complete step, as the uninterrupted run did."""
    run_dir = copy_run(reference[1], tmp_path / "run", latest=None)
    (run_dir / "checkpoints" / LAST / "trainer_state.json").unlink()
    losses = run(str(run_dir))
    assert len(losses) == STEPS - 3
    assert losses == pytest.approx(reference[0][3:], rel=1e-4, abs=1e-4)
    assert any("latest is missing: resuming from the newest complete checkpoint" in line and MID in line
               and f"skipping incomplete {LAST}" in line for line in log_lines), log_lines
    assert latest_tag(run_dir) == LAST and (run_dir / "checkpoints" / MID / "trainer_state.json").is_file()


def test_resume_none_on_a_finished_run_is_refused_and_overwrite_starts_afresh(single_process, reference, tmp_path,
                                                                              monkeypatch):
    run_dir = copy_run(reference[1], tmp_path / "run")
    (run_dir / "export").mkdir()
    (run_dir / "export" / "config.json").write_text("{}")  # (the old run's export goes aside with it)
    before = snapshot(run_dir)
    with pytest.raises(RuntimeError, match=rf"already holds checkpoints up to {LAST}; --resume none would .*"
                                           r"--resume overwrite"):
        run(str(run_dir), resume="none")
    assert snapshot(run_dir) == before  # nothing written: config, metrics, checkpoints, latest as they were

    monkeypatch.setenv("SLURM_JOB_ID", "77")  # (the job that overwrote is recorded: slurm/train.sbatch's requeue)
    losses = run(str(run_dir), steps=3, resume="overwrite")
    assert losses == pytest.approx(reference[0][:3], rel=1e-4, abs=1e-4)  # step 1 onwards, afresh
    assert (run_dir / "OVERWRITTEN_BY").read_text() == "77\n"
    [moved] = run_dir.glob("replaced_*")  # the old run, moved aside whole: no checkpoint of it deleted
    assert snapshot(moved) == before
    assert latest_tag(run_dir) == MID and not (run_dir / "checkpoints" / LAST).exists()
    assert not (run_dir / "export").exists()
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]
    old_id = json.loads((moved / "checkpoints" / LAST / "trainer_state.json").read_text()).get("run_id")
    new_id = json.loads((run_dir / "checkpoints" / MID / "trainer_state.json").read_text())["run_id"]
    assert new_id and new_id != old_id


def test_a_checkpoint_is_on_the_disk_before_it_is_marked_complete(single_process, tmp_path, monkeypatch):
    """Every file of a checkpoint is fsynced before trainer_state.json (which marks it complete) is: megatron-core
    syncs its tensor files and index, the trainer the rest (common.pt, metadata.json, the RNG file, the folder)."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    run(str(tmp_path), steps=1)
    folder = str(tmp_path / "checkpoints" / "step_00000001")
    marked = next(i for i, f in enumerate(synced) if f.startswith(folder + "/.trainer_state."))  # (its temporary)
    before = {Path(f).name for f in synced[:marked] if f.startswith(folder)}
    # (the .distcp files are synced by megatron-core's writer processes, which this list does not see)
    assert {"common.pt", "metadata.json", "rng_rank0.pt", ".metadata.tmp", "step_00000001"} <= before, before


# ---------------------------------------------------------------------------------------------
# Item 2: a resume checks its config against the checkpoint's


def test_resume_with_a_changed_lr_uses_the_new_lr(single_process, reference, tmp_path, log_lines):
    from training.config import load_config
    from common.schedule import lr_lambda

    run_dir = copy_run(reference[1], tmp_path / "run", tags=(MID,), latest=MID)
    (run_dir / "metrics.jsonl").unlink()
    run(str(run_dir), "train.lr=1e-3")
    schedule = lr_lambda(load_config("configs/train/debug.yaml", [f"train.steps={STEPS}", "train.lr=1e-3"]).train)
    # What the optimizer used at steps 4-6: the new peak rate on the new schedule at the checkpoint's position
    # (the restored scheduler's base rate was the old 3e-3).
    assert [m["lr"] for m in metrics(run_dir)] == pytest.approx([1e-3 * schedule(k) for k in range(3, STEPS)],
                                                                rel=1e-9)
    assert any("config changes applied from step 3 on: train.lr 0.003 -> 0.001" in line for line in log_lines)
    assert load_config(run_dir / "config.yaml").train.lr == 1e-3
    [segment] = (run_dir / "config_history").glob(f"segment_*_step_{3:08d}.yaml")
    assert load_config(segment).train.lr == 1e-3 and "train.lr 0.003 -> 0.001" in segment.read_text()
    saved = json.loads((run_dir / "checkpoints" / LAST / "trainer_state.json").read_text())
    assert saved["config"]["train"]["lr"] == 1e-3


def test_resume_with_a_changed_head_count_is_refused(single_process, reference, tmp_path):
    """Same shapes (64 = 4 x 16 = 2 x 32), another network: refused before anything is written."""
    run_dir = copy_run(reference[1], tmp_path / "run")
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000006 with another network .*"
                                          r"model\.num_heads 4 -> 2"):
        run(str(run_dir), "model.num_heads=2", steps=9)
    assert snapshot(run_dir) == before  # config.yaml untouched


def test_resume_with_a_changed_seed_warns(single_process, reference, tmp_path, log_lines):
    run_dir = copy_run(reference[1], tmp_path / "run")
    assert run(str(run_dir), "train.seed=7") == []  # already at train.steps: resumes, runs nothing
    assert any(line.startswith("warning: train.seed changed on resume (1234 -> 7)") for line in log_lines), log_lines
    assert not any("rng_rank" in line for line in log_lines)  # (DP=2's RNG files are not for DP=1's rank)


def test_a_resume_at_the_same_layout_without_a_ranks_rng_file_warns(single_process, tmp_path, log_lines):
    """The RNG file of a rank is restored at the checkpoint's own layout; a lost one was skipped silently."""
    run(str(tmp_path), steps=3)
    (tmp_path / "checkpoints" / tag_for(3) / "rng_rank0.pt").unlink()
    assert run(str(tmp_path), steps=3) == []  # resumes, runs nothing
    assert any(line.startswith(f"warning: {tmp_path / 'checkpoints' / tag_for(3)} lacks rng_rank0.pt: those "
                               "ranks' random draws") for line in log_lines), log_lines


def test_a_run_begun_with_the_stored_permutation_keeps_its_sample_order(single_process, tmp_path, monkeypatch):
    """Runs begun before the sampler's Feistel order saved no order (theirs was a stored torch.randperm): such a
    run resumed by today's trainer continues its own stream, the losses of its uninterrupted run."""
    from data_pipeline.sampler import GlobalBatchSampler

    with monkeypatch.context() as old_version:
        old_version.setattr(GlobalBatchSampler.__init__, "__defaults__", ("randperm", None))  # (order, ramp)
        uninterrupted = run(str(tmp_path / "full"), steps=6)
        first = run(str(tmp_path / "resumed"), steps=3)
    state_file = tmp_path / "resumed" / "checkpoints" / tag_for(3) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["sampler"].pop("order") == "randperm"
    state_file.write_text(json.dumps(state))  # as the old version wrote it
    assert first + run(str(tmp_path / "resumed"), steps=6) == uninterrupted
    assert run(str(tmp_path / "feistel"), steps=6) != uninterrupted  # (another order: the check can fail)


# ---------------------------------------------------------------------------------------------
# Item 5: checkpoints cannot run code


class Payload:
    """Unpickling it writes the marker file (what a crafted checkpoint file could do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


@pytest.mark.parametrize("name", ["rng_rank1.pt", ".metadata"])
def test_planted_pickle_in_a_checkpoint_does_not_run(pool2, reference, tmp_path, name):
    """A resume at the checkpoint's own layout (DP=2, so every rank reads its rng_rank file) from a checkpoint
    whose RNG file or tensor index (.metadata, which torch.distributed.checkpoint unpickles) carries a payload."""
    import torch

    run_dir = copy_run(reference[1], tmp_path / "run")
    marker, file = tmp_path / "payload_ran", run_dir / "checkpoints" / LAST / name
    if name.endswith(".pt"):
        torch.save({"torch": Payload(marker), "tracker": {}}, file)
    else:
        file.write_bytes(pickle.dumps(Payload(marker)))
    refused = re.escape(str(file)) + r": .*would import builtins\.exec .*refusing to load it"
    with pytest.raises(RuntimeError, match=refused):
        pool2.run(run, str(run_dir), steps=9)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("torch", "save"), ("torch.distributed.checkpoint.planner", "reduce"),
                                          ("torch.distributed.checkpoint.metadata", "field")])
def test_the_tensor_index_reader_admits_dtypes_not_any_global_of_torch_or_of_the_record_modules(tmp_path, module,
                                                                                                name):
    """Of torch the index reader admits dtypes only (torch.save(obj, path), called by a crafted index, writes any
    file), and of torch.distributed.checkpoint's record modules their dataclasses and enums only (not the helpers
    they import): refused by name, unrun."""
    from common.checkpoints import CheckpointError
    from training.checkpoint_verify import read_index

    (tmp_path / ".metadata").write_bytes(b"ctorch\nfloat32\n.")
    assert read_index(tmp_path) is torch.float32  # (what an index holds passes)
    marker = tmp_path / "payload_ran"
    (tmp_path / ".metadata").write_bytes(f"c{module}\n{name}\n(S'the payload ran'\nS'{marker}'\ntR.".encode())
    with pytest.raises(CheckpointError, match=rf"\.metadata: the tensor index would import "
                                              rf"{re.escape(module)}\.{name} "):
        read_index(tmp_path)
    assert not marker.exists()


def one_tensor_index(chunks=..., offsets=..., **storage_info):
    """The tensor index of one float tensor "w" in one record of __0_0.distcp, its record's fields as given (and
    its entry's blocks, or its one block's offsets, if given)."""
    import torch.distributed.checkpoint.metadata as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    size, start = torch.Size([2]), torch.Size([0])
    entry = dcp.TensorStorageMetadata(dcp.TensorProperties(dtype=torch.float32), size,
                                      [dcp.ChunkStorageMetadata(start, size)])
    if offsets is not ...:  # (a dataclass: pickle rebuilds it with any field value)
        entry.chunks[0].offsets = offsets
    if chunks is not ...:
        entry.chunks = chunks
    info = _StorageInfo(**{"relative_path": "__0_0.distcp", "offset": 0, "length": 8, **storage_info})
    return dcp.Metadata({"w": entry}, storage_data={dcp.MetadataIndex("w", start): info})


@pytest.mark.parametrize("index, message", [
    (lambda: b"", r"cannot read the tensor index \(EOFError"),
    (lambda: pickle.dumps(one_tensor_index())[:-40], r"corrupt tensor index \(pickle data was truncated\)"),
    (lambda: pickle.dumps(torch.float32), r"holds dtype without its tensor entries"),
    (lambda: pickle.dumps(dataclasses.replace(one_tensor_index(), storage_data=None)), r"holds Metadata without"),
    (lambda: pickle.dumps(one_tensor_index(offset=-8)), r"the storage record of w is .*offset=-8"),
    (lambda: pickle.dumps(one_tensor_index(length="8")), r"the storage record of w is .*length='8'"),
    (lambda: pickle.dumps(one_tensor_index(relative_path="../__0_0.distcp")),
     r"the storage record of w is .*'\.\./__0_0\.distcp'.*not a file name in"),
    (lambda: pickle.dumps(dataclasses.replace(one_tensor_index(), storage_data={})),
     r"the block of w at offsets \[0\] has no storage record"),
    (lambda: pickle.dumps(dataclasses.replace(one_tensor_index(), state_dict_metadata={}, storage_data={})),
     r"indexes no tensors"),
    (lambda: pickle.dumps(one_tensor_index(chunks=None)), r"the blocks of w are None, not tensor blocks"),
    (lambda: pickle.dumps(one_tensor_index(chunks=[3])), r"the blocks of w are \[3\], not tensor blocks"),
    (lambda: pickle.dumps(one_tensor_index(offsets=None)), r"the blocks of w are .*offsets=None.*not tensor blocks")],
    ids=["empty", "cut-short", "a-dtype", "no-storage-records", "negative-offset", "length-text", "path-outside",
         "block-unstored", "no-tensors", "chunks-none", "chunk-an-int", "offsets-none"])
def test_an_index_cut_short_or_of_other_contents_is_refused_naming_it(tmp_path, index, message):
    """verify() on a .metadata empty or cut short (a full disk), or one that unpickles safely to something other than an
    index of records (a crafted one): one CheckpointError naming it (was: an AttributeError, a TypeError, or an
    OSError from reading at a negative offset, naming no file)."""
    from common.checkpoints import CheckpointError
    from training.checkpoint_verify import verify

    (tmp_path / ".metadata").write_bytes(index())
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / '.metadata'))}: {message}"):
        verify(tmp_path)


BYTES = torch.zeros(4, dtype=torch.uint8)


@pytest.mark.parametrize("state", [{"torch": [0, 1], "tracker": {}}, {"torch": BYTES, "tracker": [BYTES]},
                                   [BYTES], {"torch": torch.zeros(4), "tracker": {}},
                                   {"torch": BYTES, "tracker": {"model-parallel-rng": [0, 1]}},
                                   {"torch": BYTES, "tracker": {}, "cuda": torch.zeros(4)}],
                         ids=["torch-list", "tracker-list", "list", "torch-float", "tracker-of-lists", "cuda-float"])
def test_an_rng_file_of_plain_values_in_another_shape_is_refused_naming_it(tmp_path, state):
    """A rng_rank*.pt that loads safely but is not {'torch': ByteTensor, 'tracker': {name: ByteTensor}} (and a
    ByteTensor 'cuda' if any) is refused by name: torch.set_rng_state of a list or of a float tensor failed on
    resume with a traceback, and the tracker's states went in unchecked."""
    from common.checkpoints import CheckpointError
    from training.checkpoint_verify import load_rng_file

    file = tmp_path / "rng_rank0.pt"
    torch.save({"torch": BYTES, "tracker": {"model-parallel-rng": BYTES}, "cuda": BYTES}, file)
    assert set(load_rng_file(file)) == {"torch", "tracker", "cuda"}
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))}: expected {{'torch': ByteTensor, 'tracker'"):
        load_rng_file(file)


def bytes_entry_in_index(folder: Path) -> None:
    """Index one of the checkpoint's tensors as a bytes record instead (what a crafted index could do)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from training.checkpoint_verify import read_index

    index = read_index(folder)
    index.state_dict_metadata[next(iter(index.state_dict_metadata))] = BytesStorageMetadata()
    (folder / ".metadata").write_bytes(pickle.dumps(index))


def test_export_checks_the_checkpoint_before_reading_it(single_process, reference, tmp_path):
    """python -m training.export on a checkpoint whose tensor index carries a payload, or whose .distcp is cut
    short, or of a --tag that is no complete checkpoint: one line naming the file, the payload unrun."""
    from training.export import main

    run_dir = copy_run(reference[1], tmp_path / "run")
    marker, last = tmp_path / "payload_ran", run_dir / "checkpoints" / LAST
    cases = [(lambda: (last / ".metadata").write_bytes(pickle.dumps(Payload(marker))),
              rf"{re.escape(str(last))}/\.metadata: .*would import builtins\.exec .*refusing to load it", LAST),
             # (a bytes record passed the index's own classes, and torch unpickles one unrestricted when loading)
             (lambda: bytes_entry_in_index(last), r"\.metadata: \S+ is indexed as BytesStorageMetadata, not a tensor",
              LAST),
             (lambda: truncate(run_dir), "__0_1.distcp is truncated", LAST),
             (lambda: None, r"step_00000099/trainer_state\.json: cannot be read .*expected the JSON trainer state",
              "step_00000099")]
    for plant, message, tag in cases:
        shutil.rmtree(run_dir)
        copy_run(reference[1], run_dir)
        plant()
        with pytest.raises(SystemExit) as exit_:
            main(["--run-dir", str(run_dir), "--tag", tag])
        assert re.match(rf"training\.export: .*{message}", str(exit_.value.code)), exit_.value.code
        assert not marker.exists() and not (run_dir / "export").exists()


def test_verify_finds_a_one_byte_cut_damage_past_the_first_record_and_a_missing_file(reference, tmp_path):
    """verify() on the reference's last checkpoint: a .distcp one byte short of its last record's end, a tensor
    record's header overwritten at the file's last record (not its first), and its zip's end-of-directory (where
    torch.load begins reading it), a .distcp gone, a metadata.json that is JSON but no object, a common.pt that
    is there but unreadable, an RNG file of another rank than this process's (one a resume at another layout
    does not load: refused before anything is built all the same); with two files cut, the first in file order
    is named (as a serial check would)."""
    from common.checkpoints import CheckpointError
    from training.checkpoint import verify
    from training.checkpoint_verify import read_index

    folder = tmp_path / LAST
    index = read_index(reference[1] / "checkpoints" / LAST)
    last_record, last_length = max((i.offset, i.length) for i in index.storage_data.values()
                                   if i.relative_path == "__0_0.distcp")
    assert last_record > 0

    def cut(name: str) -> int:
        file = folder / name
        size = file.stat().st_size
        file.write_bytes(file.read_bytes()[:-1])
        return size

    def overwrite_last_record() -> None:
        with open(folder / "__0_0.distcp", "r+b") as f:
            f.seek(last_record)
            f.write(b"\0\0\0\0")

    def overwrite_last_records_end() -> None:  # (its zip's end-of-directory, which torch.load reads first)
        with open(folder / "__0_0.distcp", "r+b") as f:
            f.seek(last_record + last_length - 22)
            f.write(b"\0\0\0\0")

    cases = [
        (lambda: cut("__0_1.distcp"), "__0_1.distcp is truncated: {size_1} bytes, its tensor index expects {size}"),
        (lambda: (cut("__0_1.distcp"), cut("__0_0.distcp"))[1], "__0_0.distcp is truncated: "),
        (overwrite_last_record, f"__0_0.distcp is corrupt: no tensor record at byte {last_record}, "),
        (overwrite_last_records_end, f"__0_0.distcp is corrupt: the tensor record at byte {last_record} does not end "),
        (lambda: (folder / "__0_1.distcp").unlink(), "__0_1.distcp is missing (the tensor index "),
        (lambda: (folder / "metadata.json").write_text("[]"), "metadata.json: cannot be read (not a JSON object)"),
        (lambda: (folder / "rng_rank1.pt").write_bytes(b"not a zip"), "rng_rank1.pt: not a plain RNG-state file"),
        (lambda: (folder / "common.pt").write_bytes(b"not a zip"), "common.pt: cannot be read ("),
    ]
    for damage, message in cases:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(reference[1] / "checkpoints" / LAST, folder)
        verify(folder)  # (whole, it passes)
        size = damage()
        message = message.format(size=size, size_1=(size or 0) - 1)
        with pytest.raises(CheckpointError) as err:
            verify(folder)
        assert str(err.value).startswith(str(folder)) and message in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# A full disk while saving


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(single_process, reference, tmp_path, monkeypatch, mode):
    """The write fails (async: in the background writer, found at the end of the run, which waits for it)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def no_space(*args, **kwargs):  # what writing a .distcp file meets on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run_dir = copy_run(reference[1], tmp_path / "run", tags=(MID,), latest=MID)
    monkeypatch.setattr(filesystem_async, "_write_item", no_space)
    with pytest.raises(RuntimeError, match=rf"saving .*{tag_for(4)} failed: No space left on device \(errno ENOSPC\) "
                                           rf".*removed the partial folder; .*latest still names {MID}") as err:
        run(str(run_dir), f"train.async_save={mode == 'async'}", steps=4)
    assert err.type.__name__ == "CheckpointError" and "\n" not in str(err.value)
    assert not (run_dir / "checkpoints" / tag_for(4)).exists() and latest_tag(run_dir) == MID
    from training.checkpoint import verify

    verify(run_dir / "checkpoints" / MID)  # the previous checkpoint, whole


def test_a_full_disk_when_marking_a_checkpoint_complete_fails_the_save(single_process, reference, tmp_path,
                                                                        monkeypatch):
    """The tensors written, trainer_state.json's write fails: the save raises (it did not stop the run before
    `latest` moved), the folder goes and `latest` stays on the previous checkpoint."""
    from training import checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    run_dir = copy_run(reference[1], tmp_path / "run", tags=(MID,), latest=MID)
    monkeypatch.setattr(checkpoint, "write_atomic", no_space)
    with pytest.raises(RuntimeError, match=rf"saving .*{tag_for(4)} failed: No space left on device .*latest still "
                                           rf"names {MID}"):
        run(str(run_dir), steps=4)
    assert not (run_dir / "checkpoints" / tag_for(4)).exists() and latest_tag(run_dir) == MID


def save_failing_on_rank_1(run_dir: str) -> str:
    """(In each worker of the pool) train from run_dir's checkpoint of step 3 to step 4, rank 1's tensor write
    failing as on a full disk; the CheckpointError each rank raised."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from common.checkpoints import CheckpointError

    real = filesystem_async._write_item

    def no_space_on_rank_1(*args, **kwargs):
        if dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    filesystem_async._write_item = no_space_on_rank_1
    try:
        run(run_dir, steps=4)
    except CheckpointError as e:
        return str(e)
    finally:
        filesystem_async._write_item = real
    return "no error"


def test_a_save_that_fails_on_one_rank_fails_on_every_rank(pool2, reference, tmp_path):
    """Every rank learns of any rank's failed write: rank 0 does not mark the checkpoint complete (its own files
    written, rank 1's not) and every rank raises the cause, `latest` left on the previous checkpoint."""
    run_dir = copy_run(reference[1], tmp_path / "run", tags=(MID,), latest=MID)
    for message in pool2.run(save_failing_on_rank_1, str(run_dir)):
        assert re.search(rf"saving .*{tag_for(4)} failed: No space left on device .*latest still names {MID}",
                         message), message
    assert not (run_dir / "checkpoints" / tag_for(4)).exists() and latest_tag(run_dir) == MID


# ---------------------------------------------------------------------------------------------
# One run per run directory


def test_the_lock_of_a_dead_run_does_not_block(tmp_path):
    """A run killed while holding run_dir/.lock (SIGKILL, a node failure, a SLURM requeue) leaves the file,
    not the lock: the kernel released it with the process."""
    from common.checkpoints import RunLock

    holder = ("import fcntl, os, signal, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
              "f.write(f'pid {os.getpid()}'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", holder, str(tmp_path / ".lock")], timeout=60)
    assert proc.returncode == -signal.SIGKILL and (tmp_path / ".lock").read_text().startswith("pid ")
    lock = RunLock(tmp_path).acquire()
    assert lock.file is not None and f"pid {os.getpid()} on " in (tmp_path / ".lock").read_text()
    with pytest.raises(RuntimeError, match=rf"\.lock is held by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()  # a second holder, while the first is alive
    lock.release()
    RunLock(tmp_path).acquire().release()


def test_a_forked_worker_closes_only_descriptors_that_still_name_a_run_lock(tmp_path):
    """drop_inherited_locks (a DataLoader worker's start): the copy of a held lock is closed; the number of a lock
    that was never released, closed when collected and since reused by a pipe, is left alone (closing it cut a
    worker off from its own result queue and hung the trainer)."""
    from common.checkpoints import RunLock, drop_inherited_locks

    held = RunLock(tmp_path / "held").acquire()
    leaked = RunLock(tmp_path / "leaked").acquire()
    read, write = os.pipe()
    number = leaked.file.fileno()
    leaked.file.close()  # what collecting an unreleased lock does
    os.dup2(write, number)  # the freed number now names a pipe
    pid = os.fork()
    if pid == 0:  # the worker: the pipe must still work, the held lock's copy must be gone
        try:
            drop_inherited_locks()
            ok = os.write(number, b"x") == 1
            try:
                os.fstat(held.file.fileno())
                ok = False
            except OSError:
                pass
        finally:
            os._exit(0 if locals().get("ok") else 1)
    assert os.waitpid(pid, 0)[1] == 0 and os.read(read, 1) == b"x"
    held.release()
    for fd in (read, write, number):
        os.close(fd)


def test_pruning_keeps_the_newest_removes_leftovers_and_never_leaves_a_complete_looking_part(tmp_path, monkeypatch):
    """prune: this run's newest `keep` complete checkpoints stay; incomplete leftovers of killed saves below the
    step just saved go even with keep=0 (which keeps every complete one); a deletion cut short (a kill inside
    rmtree) leaves an incomplete folder, never one that a resume would take as complete."""
    from common import checkpoints

    def make(step: int, complete: bool = True) -> Path:
        folder = tmp_path / "checkpoints" / tag_for(step)
        folder.mkdir(parents=True)
        (folder / "__0_0.distcp").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
        return folder

    for step in (2, 4, 6, 8):
        make(step)
    make(5, complete=False), make(9, complete=False)  # a killed save below the step and one above it

    def names():
        return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    checkpoints.prune(tmp_path, checkpoints.Retention(0), 8, "trainer_state.json")
    assert names() == [tag_for(s) for s in (2, 4, 6, 8, 9)]
    checkpoints.prune(tmp_path, checkpoints.Retention(2, every=4), 8, "trainer_state.json")
    assert names() == [tag_for(s) for s in (4, 6, 8, 9)]  # (4: a multiple of `every`, kept besides the newest 2)
    checkpoints.prune(tmp_path, checkpoints.Retention(3), 8, "trainer_state.json")
    assert names() == [tag_for(s) for s in (4, 6, 8, 9)]

    def killed(path, **kwargs):
        (Path(path) / "__0_0.distcp").unlink()
        raise KeyboardInterrupt  # stands for the process dying inside rmtree

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.prune(tmp_path, checkpoints.Retention(2), 8, "trainer_state.json")
    assert checkpoints.complete_tags(tmp_path, "trainer_state.json") == [tag_for(6), tag_for(8)]


def test_pruning_counts_a_checkpoint_without_a_run_id_as_this_runs_and_leaves_another_runs(tmp_path):
    """prune with owner_of: a complete checkpoint that records no run id (one written before run ids were kept)
    is this run's and pruned as such; another run's stays, and does not take a place among the `keep`."""
    from common import checkpoints

    owners = {tag_for(1): "other", tag_for(2): None, tag_for(3): "mine", tag_for(4): "mine"}
    for tag in owners:
        (tmp_path / "checkpoints" / tag).mkdir(parents=True)
        (tmp_path / "checkpoints" / tag / "state.pt").write_text("x")
    owner_of = lambda path: owners[path.name]  # noqa: E731
    checkpoints.prune(tmp_path, checkpoints.Retention(2), 4, "state.pt", run_id="mine", owner_of=owner_of)
    assert checkpoints.complete_tags(tmp_path, "state.pt") == [tag_for(1), tag_for(3), tag_for(4)]
    checkpoints.prune(tmp_path, checkpoints.Retention(1), 4, "state.pt", run_id="mine", owner_of=owner_of)
    assert checkpoints.complete_tags(tmp_path, "state.pt") == [tag_for(1), tag_for(4)]


def test_a_save_folder_replaces_a_leftover_or_this_runs_own_checkpoint_never_another_runs(tmp_path):
    """prepare_folder: a folder already at the step's path is emptied (a killed save's leftover, or this run's own
    checkpoint of the step saved again); a complete checkpoint another run wrote is refused, left as it was; a
    folder that cannot be made is one line naming it and the cause."""
    from common.checkpoints import prepare_folder

    folder = tmp_path / "checkpoints" / tag_for(4)
    assert prepare_folder(folder) is None and folder.is_dir()
    (folder / "state.pt").write_text("leftover")
    assert prepare_folder(folder) is None and list(folder.iterdir()) == []
    (folder / "state.pt").write_text("this run's")
    assert prepare_folder(folder, "mine", lambda path: "mine") is None and list(folder.iterdir()) == []
    assert prepare_folder(folder, "mine", lambda path: None) is None  # (no run id recorded: this run's)
    (folder / "state.pt").write_text("another run's")
    problem = prepare_folder(folder, "mine", lambda path: "other")
    assert problem == (f"{folder} holds a complete checkpoint of another run (run id other; this run is mine): "
                       "refusing to overwrite it; move it away or use another --run-dir")
    assert (folder / "state.pt").read_text() == "another run's"
    (tmp_path / "file").write_text("")
    problem = prepare_folder(tmp_path / "file" / tag_for(4))
    assert problem.startswith(f"cannot prepare {tmp_path / 'file' / tag_for(4)}: Not a directory (errno ENOTDIR) (")


def test_a_failed_saves_line_names_the_checkpoint_latest_still_names(tmp_path):
    """failed_save_message: the cause, the free space and `latest`'s tag; a `latest` that cannot be read (or none)
    is 'no checkpoint', not a second error hiding the first."""
    from common.checkpoints import failed_save_message

    root = tmp_path / "checkpoints"
    (root / tag_for(2)).mkdir(parents=True)
    (root / tag_for(2) / "state.pt").write_text("x")
    line = failed_save_message(tmp_path, root / tag_for(4), "No space left on device (errno ENOSPC)", "state.pt")
    assert re.fullmatch(rf"saving {re.escape(str(root / tag_for(4)))} failed: No space left on device \(errno ENOSPC\) "
                        rf"\([\d.]+ GiB free on its file system\); removed the partial folder; "
                        rf"{re.escape(str(root / 'latest'))} still names no checkpoint", line), line
    (root / "latest").write_text(tag_for(2) + "\n")
    assert line.replace("no checkpoint", tag_for(2)) == failed_save_message(
        tmp_path, root / tag_for(4), "No space left on device (errno ENOSPC)", "state.pt")
    (root / "latest").write_text("garbage\n")
    assert failed_save_message(tmp_path, root / tag_for(4), "x", "state.pt").endswith("still names no checkpoint")


def test_a_write_failure_is_told_by_its_os_error_wherever_it_is_in_the_chain():
    """failure_cause: the OSError's text (its strerror, else the errno's) found in the cause/context chain or in a
    CheckpointException-like `failures` dict (values bare or (error, traceback) tuples); an '[Errno N]' quoted in a
    message that crossed a process boundary; an OSError without an errno and other errors: their own text (one
    line, cut at 300 characters)."""
    from common.checkpoints import failure_cause, one_line

    full = OSError(errno.ENOSPC, "No space left on device")
    assert failure_cause(full) == "No space left on device (errno ENOSPC)"
    assert failure_cause(OSError(errno.EIO, "")) == f"{os.strerror(errno.EIO)} (errno EIO)"
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("writer failed")  # (implicit: only __context__ links them)
    except RuntimeError as e:
        assert failure_cause(e) == "No space left on device (errno ENOSPC)"

    class CheckpointException(Exception):
        def __init__(self, failures):
            super().__init__("rank failures")
            self.failures = failures

    assert failure_cause(CheckpointException({0: (full, "traceback")})) == "No space left on device (errno ENOSPC)"
    assert failure_cause(CheckpointException({1: full})) == "No space left on device (errno ENOSPC)"
    assert failure_cause(RuntimeError("worker: [Errno 28] gone")) == "No space left on device (errno ENOSPC)"
    assert failure_cause(OSError("no errno here")) == "no errno here"
    assert failure_cause(RuntimeError("a\n  b")) == "a b"
    assert one_line(ValueError()) == "ValueError"
    assert one_line(ValueError("x" * 300)) == "x" * 300
    assert one_line(ValueError("x" * 301)) == "x" * 300 + "..."
    assert one_line(ValueError("ab cd"), limit=2) == "ab..."


def test_the_run_lock_is_rank_0s_and_lets_go_for_the_next_holder(tmp_path, monkeypatch, capsys):
    """holding_run_dir takes the lock on rank 0 only (RANK; SLURM_PROCID under a bare srun, where RANK is unset);
    release() unlocks even while a forked child still shares the open file (a checkpoint writer outliving the
    block), forgets the descriptor for drop_inherited_locks, and may be called again."""
    from common import checkpoints
    from common.checkpoints import RunDirError, RunLock, holding_run_dir

    monkeypatch.delenv("RANK", raising=False)
    for env, taken in (({"SLURM_PROCID": "1"}, False), ({"SLURM_PROCID": "0"}, True),
                       ({"SLURM_PROCID": "1", "RANK": "0"}, True), ({"SLURM_PROCID": "0", "RANK": "2"}, False)):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with holding_run_dir(tmp_path) as lock:
            assert (lock.file is not None) == taken, env
            if taken:
                with pytest.raises(RunDirError, match="is held by another run"):
                    RunLock(tmp_path).acquire()
        for name in env:
            monkeypatch.delenv(name)
    assert capsys.readouterr().err == ""
    lock = RunLock(tmp_path).acquire()
    fd = lock.file.fileno()
    assert fd in checkpoints._HELD_LOCKS
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # holds a copy of the locked file until the parent writes
        os.read(read, 1)
        os._exit(0)
    try:
        lock.release()
        assert lock.file is None and fd not in checkpoints._HELD_LOCKS
        lock.release()
        RunLock(tmp_path).acquire().release()
    finally:
        os.write(write, b"x")
        os.waitpid(child, 0)
        os.close(read), os.close(write)


def test_a_start_that_fails_before_writing_leaves_no_run_directory(tmp_path, monkeypatch):
    """A block under holding_run_dir that fails (a refused config, missing data) removes the lock file and the
    folders it made, parents included; a folder that was there, or one that holds another file by then, or a
    lock file of an earlier run, stays. A block that ends well keeps its lock file."""
    from common.checkpoints import holding_run_dir

    monkeypatch.setenv("RANK", "0")
    written = ["a/b/run/.lock", "a/b/run/config.yaml"]
    for case, (setup, left) in enumerate((
            (lambda run: None, []), (lambda run: run.mkdir(parents=True), ["a/b/run"]),
            (lambda run: (run.mkdir(parents=True), (run / ".lock").touch()), ["a/b/run/.lock"]),
            (lambda run: None, written))):
        base = tmp_path / f"case{case}"
        run = base / "a" / "b" / "run"
        setup(run)
        with pytest.raises(ValueError, match="refused"), holding_run_dir(run):
            if left == written:
                (run / "config.yaml").touch()
            raise ValueError("refused")
        assert sorted(str(p.relative_to(base)) for p in base.rglob("*") if not p.is_dir() or not any(p.iterdir())) \
            == left, left
    with holding_run_dir(tmp_path / "ended"):
        pass
    assert (tmp_path / "ended" / ".lock").is_file()


def test_a_run_that_opened_the_lock_file_a_failed_start_removes_holds_the_lock_file_then_there(tmp_path, monkeypatch):
    """A second run that opened .lock before a failed start removed it (release(failed=True)) and locks it after:
    its lock must be on the file at the path, so that a third run in that run directory is refused (a lock on the
    unlinked file would stop nobody)."""
    import threading

    from common.checkpoints import RunDirError, RunLock, holding_run_dir

    monkeypatch.setenv("RANK", "0")
    run, real_flock = tmp_path / "runs" / "new", fcntl.flock
    opened, released, second = threading.Event(), threading.Event(), {}

    def flock(f, op):  # the second run: opened the lock file, not yet locked it when the first one fails
        if threading.current_thread().name == "second" and op & fcntl.LOCK_EX and not opened.is_set():
            opened.set()
            released.wait(10)
        return real_flock(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    starting = threading.Thread(target=lambda: second.update(lock=RunLock(run).acquire()), name="second")
    with pytest.raises(ValueError, match="refused"), holding_run_dir(run):
        starting.start()
        assert opened.wait(10)
        raise ValueError("refused")
    released.set()
    starting.join(10)
    assert second["lock"].file is not None and (run / ".lock").is_file()
    with pytest.raises(RunDirError, match="held by another run"):
        RunLock(run).acquire()
    second["lock"].release()


def test_a_file_system_without_flock_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    """flock failing (Lustre without -o flock): acquire returns with a warning instead of the lock, and
    holding_run_dir prints it once on rank 0."""
    from common.checkpoints import RunLock, holding_run_dir

    def no_flock(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setenv("RANK", "0")
    lock = RunLock(tmp_path).acquire()
    assert lock.file is None and lock.warning == (f"warning: cannot lock {tmp_path / '.lock'} (No locks available; "
                                                  "a file system without flock): nothing stops a second run from "
                                                  "writing to this run directory")
    with holding_run_dir(tmp_path):
        pass
    assert capsys.readouterr().err == lock.warning + "\n"


def test_setting_a_run_aside_moves_what_is_there_under_a_new_name(tmp_path, monkeypatch):
    """set_aside: nothing to move makes no folder (None); else the names present go into replaced_<time>/, with
    _2, _3 ... after the time when a folder of that name is there already (two starts within one second)."""
    from common import checkpoints

    assert checkpoints.set_aside(tmp_path, ("checkpoints", "metrics.jsonl")) is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(checkpoints.time, "strftime", lambda fmt: "20260101-000000")
    (tmp_path / "replaced_20260101-000000").mkdir()
    (tmp_path / "replaced_20260101-000000_2").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    dest = checkpoints.set_aside(tmp_path, ("checkpoints", "metrics.jsonl", "config.yaml"))
    assert dest == tmp_path / "replaced_20260101-000000_3"
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "replaced_20260101-000000",
                                                          "replaced_20260101-000000_2", "replaced_20260101-000000_3"]


def test_pruning_a_linked_checkpoint_removes_the_link_not_what_it_points_to(tmp_path):
    """A step folder that is a symlink to another run's checkpoint (linked in to resume from it): pruning deleted
    the marker through the link, and the other run's own next prune then removed its whole checkpoint."""
    from common import checkpoints

    other = tmp_path / "other" / "checkpoints" / tag_for(2)
    other.mkdir(parents=True)
    for name in ("trainer_state.json", "__0_0.distcp"):
        (other / name).write_text("x")
    mine = tmp_path / "run" / "checkpoints"
    mine.mkdir(parents=True)
    (mine / tag_for(2)).symlink_to(other)
    for step in (4, 6):
        (mine / tag_for(step)).mkdir()
        (mine / tag_for(step) / "trainer_state.json").write_text("{}")
    checkpoints.prune(tmp_path / "run", checkpoints.Retention(2), 6, "trainer_state.json")
    assert sorted(p.name for p in mine.iterdir()) == [tag_for(4), tag_for(6)]
    assert sorted(p.name for p in other.iterdir()) == ["__0_0.distcp", "trainer_state.json"]


# ---------------------------------------------------------------------------------------------
# Bad inputs to training.train's main(): exit 1, one line naming the file or field, nothing changed


def truncate(run_dir: Path) -> None:
    file = run_dir / "checkpoints" / LAST / "__0_1.distcp"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def scribble(run_dir: Path) -> None:
    file = run_dir / "checkpoints" / LAST / "__0_0.distcp"
    data = bytearray(file.read_bytes())
    data[:4096] = os.urandom(4096)
    file.write_bytes(bytes(data))


def edit_state(run_dir: Path, **values) -> None:
    """trainer_state.json with `values` written in (as JSON text: an int past Python's digit limit is text)."""
    file = run_dir / "checkpoints" / LAST / "trainer_state.json"
    state = {**json.loads(file.read_text()), **{k: f"@{k}@" for k in values}}
    text = json.dumps(state)
    for k, v in values.items():
        text = text.replace(f'"@{k}@"', v if isinstance(v, str) else json.dumps(v))
    file.write_text(text)


def garbage_latest(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "latest").write_bytes(bytes(range(256)))


HELD = []


def hold_lock(run_dir: Path) -> None:
    """This test process holds the run directory, as a run in progress would."""
    f = open(run_dir / ".lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since now\n")
    f.flush()
    HELD.append(f)


BAD_INPUTS = {  # id: (prepare the run directory, --set overrides, what the one line must say)
    "truncated-distcp": (truncate, [], [f"{LAST}/__0_1.distcp is truncated:", "its tensor index expects"]),
    "corrupt-distcp": (scribble, [], [f"{LAST}/__0_0.distcp is corrupt: no tensor record at byte 0"]),
    "no-common-pt": (lambda d: (d / "checkpoints" / LAST / "common.pt").unlink(), [],
                     [f"{LAST}/common.pt: cannot be read", "dist_checkpointing's common.pt"]),
    "bad-metadata-json": (lambda d: (d / "checkpoints" / LAST / "metadata.json").write_text("{"), [],
                          [f"{LAST}/metadata.json: cannot be read", "dist_checkpointing's metadata.json"]),
    "huge-step": (lambda d: edit_state(d, step="1" * 5000), [],  # (a raw ValueError naming no file before)
                  [f"{LAST}/trainer_state.json: cannot be read (Exceeds the limit"]),
    "negative-step": (lambda d: edit_state(d, consumed_samples=-8), [],
                      [f"{LAST}/trainer_state.json: consumed_samples=-8: expected counts"]),
    "scheduler-not-object": (lambda d: edit_state(d, lr_scheduler='"x"'), [],  # (a traceback from the LR schedule)
                             [f"{LAST}/trainer_state.json: lr_scheduler='x': expected objects"]),
    "garbage-latest": (garbage_latest, [], ["checkpoints/latest: cannot be read as text", "expected one line naming",
                                            f"delete it to resume from the newest complete checkpoint ({LAST})"]),
    "another-preset": (None, ["model.preset=parti-tiny"],
                       ["config error: cannot resume", "model.preset 'parti-debug' -> 'parti-tiny'",
                        "model.hidden_size 64 -> 128"]),
    "log-interval-0": (None, ["train.log_interval=0"], ["config error: train.log_interval=0 must be >= 1"]),
    "global-batch-0": (None, ["train.global_batch_size=0"], ["config error: train.global_batch_size=0 must be >= 1"]),
    "steps-negative": (None, ["train.steps=-1"], ["config error: train.steps=-1 must be >= 1"]),
    "steps-below-checkpoint": (None, ["train.steps=4"],  # (ran nothing, exit 0, and rewrote config.yaml)
                               ["config error: train.steps=4 is below step 6 of the checkpoint this run resumes",
                                "nothing would train"]),
    "max-skipped-0": (None, ["train.max_skipped_steps=0"], ["config error: train.max_skipped_steps=0 must be >= 1"]),
    "run-dir-busy": (hold_lock, [], [".lock is held by another run (pid {pid} on", "use another --run-dir"]),
}


def _bad_input(reference_dir: Path, tmp_path: Path, case: str) -> tuple[Path, dict, list[str]]:
    """A copy of the reference run prepared for `case`: (run dir, its snapshot, training.train's arguments)."""
    prepare, sets, _ = BAD_INPUTS[case]
    run_dir = copy_run(reference_dir, tmp_path / "run")
    if prepare:
        prepare(run_dir)
    args = ["--config", "configs/train/debug.yaml", "--run-dir", str(run_dir), "--set", "train.steps=9",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.save_interval=3", "model.dropout=0.0",
            "model.attention_dropout=0.0", *sets]
    return run_dir, snapshot(run_dir), args


def _check_line(case: str, line: str) -> None:
    assert re.match(r"(config )?error: ", line) and "\n" not in line, line
    for text in BAD_INPUTS[case][2]:
        assert text.format(pid=os.getpid()) in line, line


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_ends_in_one_line_and_leaves_the_run_as_it_was(single_process, reference, tmp_path, case, capfd):
    """main() in this process (an engine start-up where the checkpoint is read, no interpreter start-up):
    SystemExit carries the one line the interpreter prints; nothing else went to stderr as a traceback."""
    from training.train import main

    run_dir, before, args = _bad_input(reference[1], tmp_path, case)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(args)
    finally:
        while HELD:
            HELD.pop().close()
    assert isinstance(exit_.value.code, str), exit_.value.code  # sys.exit(message): exit status 1
    _check_line(case, exit_.value.code)
    assert "Traceback" not in capfd.readouterr().err
    assert snapshot(run_dir) == before


def test_the_command_line_exits_1_with_that_line_last(reference, tmp_path):
    """The same through `python -m training.train` in a subprocess, as a user runs it (one case: the others
    differ only inside main())."""
    run_dir, before, args = _bad_input(reference[1], tmp_path, "truncated-distcp")
    proc = subprocess.run([sys.executable, "-m", "training.train", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    _check_line("truncated-distcp", proc.stderr.strip().splitlines()[-1])
    assert snapshot(run_dir) == before


def test_the_command_line_passes_its_resume_mode_on_and_ends_a_refused_or_stopped_run_in_one_line(tmp_path,
                                                                                                monkeypatch):
    """training.train's main() around a stand-in trainer: the validated config, --run-dir and --resume (auto when
    not given) reach it; the deepspeed launcher's --local_rank is taken; an unknown mode or no --run-dir is a usage
    error (exit 2)
    and a config that fails validation a config error, neither reaching the trainer; a busy or damaged run
    directory (RunDirError), a run stopped for non-finite steps (NonFiniteStop) and a missing device (DeviceError)
    end in one line `error: ...`, not a traceback."""
    import training.trainer as trainer_module
    from common.checkpoints import RunDirError
    from model_parallel.state import DeviceError
    from training.deepspeed_glue import NonFiniteStop
    from training.train import main

    seen = []
    monkeypatch.setattr(trainer_module, "train", lambda cfg, run_dir, resume: seen.append((cfg.train.steps, run_dir,
                                                                                           resume)))
    run_dir = str(tmp_path / "run")
    args = ["--config", "configs/train/debug.yaml", "--run-dir", run_dir, "--set", "train.steps=3"]
    main(args)
    main([*args, "--resume", "none", "--local_rank=0"])
    main(["--resume", "overwrite", *args])
    assert seen == [(3, run_dir, "auto"), (3, run_dir, "none"), (3, run_dir, "overwrite")]
    for usage_error in ([*args, "--resume", "fresh"], args[:2] + args[4:]):  # (an unknown mode; no --run-dir)
        with pytest.raises(SystemExit) as exit_:
            main(usage_error)
        assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main([*args, "train.max_skipped_steps=0"])
    assert exit_.value.code.startswith("config error: train.max_skipped_steps=0 must be >= 1")
    assert len(seen) == 3
    for error in (RunDirError("run/.lock is held by another run"), NonFiniteStop("stopping at step 4: ..."),
                  DeviceError("train.device cuda was asked for")):
        def fail(*args, error=error):
            raise error

        monkeypatch.setattr(trainer_module, "train", fail)
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == f"error: {error}"


@pytest.mark.parametrize("module, args", [
    ("vq.train", ["--data", "x.tar", "--set", "loss.perceptual=0"]),  # (the default weighs LPIPS: a backbone needed)
    ("vq.finetune_decoder", ["--data", "x.tar", "--tokenizer", "export.pt"]),
    ("sr.train", ["--data", "x.tar"]), ("training.text_encoder", [])])
def test_every_trainer_holds_its_run_directory(tmp_path, capsys, module, args):
    """The image tokenizers', the detokenizer's, the upsampler's and the text encoder's trainers take the run
    lock as Parti's does (slurm/train.sbatch clears a requeued job's STOP under it): a second run in a run
    directory in use stops before it writes there, naming the holder; the lock is released when a run ends."""
    import importlib

    from common.checkpoints import RunLock

    main = importlib.import_module(module).main
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir).acquire()
    with pytest.raises(SystemExit, match=rf"{module}: .*\.lock is held by another run \(pid {os.getpid()} on "):
        main([*args, "--run-dir", str(run_dir)])
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    lock.release()
    # a failed run lets the lock go
    with pytest.raises(SystemExit, match=rf"{module}: .*(x.tar|export.pt|x.txt|x.model)"):
        main([*args, "--run-dir", str(run_dir)]
             + (["--text-files", "x.txt", "--text-tokenizer", "x.model"] if not args else []))
    RunLock(run_dir).acquire().release()


@pytest.mark.parametrize("module, args", [
    ("vq.train", ["--data", "x.tar"]), ("vq.finetune_decoder", ["--data", "x.tar", "--tokenizer", "export.pt"]),
    ("sr.train", ["--data", "x.tar"])])
def test_every_trainer_refuses_a_fresh_start_over_checkpoints(tmp_path, module, args):
    """--resume none in a run directory that holds checkpoints is refused before anything is built, as
    training.train and training.text_encoder refuse it: the fresh run's saves replaced the earlier run's steps,
    leaving its later ones beside them for a lost `latest` to fall back to."""
    import importlib

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / tag_for(4)).mkdir(parents=True)
    (run_dir / "checkpoints" / tag_for(4) / "trainer_state.json").write_text("{}")
    before = snapshot(run_dir)
    with pytest.raises(SystemExit, match=rf"{module}: --resume none: .*checkpoints holds checkpoints; continue them "
                                         "with --resume auto, or use another --run-dir"):
        importlib.import_module(module).main([*args, "--run-dir", str(run_dir), "--resume", "none"])
    assert snapshot(run_dir) == before


def test_a_state_file_save_that_fails_leaves_no_folder_and_latest_as_it_was(tmp_path, monkeypatch):
    """common.state_file.save_state: each save moves `latest` and keeps the newest `keep`; a write that fails (a full
    disk, which torch.save reports as a RuntimeError) removes its folder and says so in one line, `latest` where it
    was; a folder that cannot be made is refused the same way. load_state refuses a state without a required key."""
    from common import state_file
    from common.checkpoints import CheckpointError, Retention, complete_tags, latest_tag

    for step in (1, 2, 3):
        path = state_file.save_state(tmp_path, step, {"model": {"w": torch.ones(2)}, "step": step},
                                     keep=Retention(2))
        assert path == tmp_path / "checkpoints" / tag_for(step) / "state.pt"
    assert (complete_tags(tmp_path, "state.pt") == [tag_for(2), tag_for(3)]
            and latest_tag(tmp_path, "state.pt") == tag_for(3))
    assert state_file.load_state(path, ("model", "step"), writer="vq.train")["step"] == 3
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: not a vq.train checkpoint \(no opt, rng\)$"):
        state_file.load_state(path, ("model", "opt", "step", "rng"), writer="vq.train")

    def full(state, tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(state_file.torch, "save", full)
    with pytest.raises(CheckpointError, match=rf"^saving .*{tag_for(4)} failed: PytorchStreamWriter failed .*; removed "
                                              rf"the partial folder; .*latest still names {tag_for(3)}$"):
        state_file.save_state(tmp_path, 4, {"step": 4}, keep=Retention(2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", tag_for(2), tag_for(3)]
    monkeypatch.undo()
    (tmp_path / "checkpoints" / tag_for(5)).write_text("a file where the folder goes")
    with pytest.raises(CheckpointError, match=rf"^cannot prepare .*{tag_for(5)}: "):
        state_file.save_state(tmp_path, 5, {"step": 5}, keep=Retention(2))
    assert latest_tag(tmp_path, "state.pt") == tag_for(3)


def test_weights_that_do_not_fit_the_model_are_refused_naming_each_kind_of_mismatch():
    """common.state_file.check_fits: missing keys (but the optional ones), unexpected keys and other shapes, each
    counted, at most six named, then the advice."""
    from common.state_file import check_fits

    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    check_fits(module, state, "w.pt")
    check_fits(module, {k: v for k, v in state.items() if k != "1.bias"}, "w.pt", optional=("1.bias",))
    bad = {**{k: v for k, v in state.items() if k != "1.bias"}, "0.weight": torch.zeros(4, 2),
           **{f"extra{i}": torch.zeros(1) for i in range(7)}}
    with pytest.raises(ConfigError) as refused:
        check_fits(module, bad, "w.pt", advice="retrain")
    assert str(refused.value) == ("w.pt does not fit the configured model (1 missing key(s): 1.bias; 7 unexpected "
                                  "key(s): extra0, extra1, extra2, extra3, extra4, extra5 ...; 1 other shape(s): "
                                  "0.weight (4, 2) (the model's: (3, 2))): retrain")
    with pytest.raises(ConfigError, match=r"\(6 unexpected key\(s\): extra0, .*, extra5\): set the model section as"):
        check_fits(module, {**state, **{f"extra{i}": torch.zeros(1) for i in range(6)}}, "w.pt")


def test_a_state_file_damaged_inside_is_refused_naming_it(tmp_path):
    """The tokenizers' and upsampler's state.pt: damage that torch.load reports as a ValueError (or KeyError,
    UnicodeDecodeError) escaped as a traceback instead of the one line naming the file."""
    import torch

    from common.checkpoints import CheckpointError
    from common.state_file import load_state

    path = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.ones(3)}, "step": 1}, path)
    data = path.read_bytes()
    assert data.count(b"little") == 1  # (the archive's byte-order record)
    path.write_bytes(data.replace(b"little", b"littlE"))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: not a readable checkpoint "
                                              r"\(Unknown endianness"):
        load_state(path, ("model",), writer="vq.train")


@pytest.mark.parametrize("edit, message", [
    ({"lr_scheduler": None}, "not a trainer state (missing lr_scheduler)"),
    ({"layout": None, "optimizer_steps": None}, "not a trainer state (missing optimizer_steps, layout)"),
    ({"step": -1}, "step=-1: expected counts"), ({"optimizer_steps": -1}, "optimizer_steps=-1: expected counts"),
    ({"consumed_samples": True}, "consumed_samples=True: expected counts"),
    ({"layout": [1]}, "layout=[1]: expected objects")])
def test_a_trainer_state_without_a_field_or_with_one_of_another_kind_is_refused_naming_it(tmp_path, edit, message):
    """read_trainer_state checks every field a resume reads (a missing one failed later with a KeyError), counts
    as integers >= 0 (not -1, not a JSON true), the LR schedule's and layout's state as objects."""
    from common.checkpoints import CheckpointError
    from training.checkpoint import read_trainer_state

    state = {"step": 0, "consumed_samples": 0, "optimizer_steps": 0, "lr_scheduler": {}, "layout": {}}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert read_trainer_state(tmp_path) == state
    state = {k: v for k, v in {**state, **edit}.items() if v is not None}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'trainer_state.json'}: {message}")):
        read_trainer_state(tmp_path)


def test_a_latest_set_back_by_hand_is_followed_with_a_warning_naming_the_newer_checkpoints(tmp_path):
    """A rollback (`latest` edited to an older step) resumes there, and says which newer checkpoints remain: they
    would be taken if `latest` were lost (the newest complete one is the fallback)."""
    from common.checkpoints import resume_tag

    for step in (2, 4, 6):
        (tmp_path / "checkpoints" / tag_for(step)).mkdir(parents=True)
        (tmp_path / "checkpoints" / tag_for(step) / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text(tag_for(6) + "\n")
    assert resume_tag(tmp_path, "trainer_state.json") == (tag_for(6), None)
    (tmp_path / "checkpoints" / "latest").write_text(tag_for(2) + "\n")
    tag, note = resume_tag(tmp_path, "trainer_state.json")
    assert tag == tag_for(2)
    assert f"latest names {tag_for(2)}, but newer checkpoints are there ({tag_for(4)}, {tag_for(6)})" in note


def test_which_checkpoint_a_resume_takes_without_a_usable_latest(tmp_path):
    """resume_tag without `latest`: the newest complete step folder (a folder named as the marker, a file named as
    a step folder and a step_* folder that is no tag do not count), saying which incomplete ones it skipped; none
    complete: step 0, naming them. A `latest` that names no tag or an incomplete folder is refused naming it."""
    from common.checkpoints import CheckpointError, has_checkpoints, latest_tag, resume_tag, step_of

    marker, root = "trainer_state.json", tmp_path / "checkpoints"
    assert tag_for(100) == "step_00000100" and step_of(tag_for(100)) == 100
    assert [step_of(t) for t in ("step_", "latest", "step_1x")] == [None, None, None]
    assert resume_tag(tmp_path, marker) == (None, None) and not has_checkpoints(tmp_path)
    (root / "step_backup").mkdir(parents=True)
    assert not has_checkpoints(tmp_path)
    (root / tag_for(1)).mkdir()
    assert has_checkpoints(tmp_path)
    assert resume_tag(tmp_path, marker) == (None, f"{root} holds only incomplete checkpoints ({tag_for(1)}): "
                                                   "starting at step 0")
    for step in (2, 4):
        (root / tag_for(step)).mkdir()
        (root / tag_for(step) / marker).write_text("{}")
    (root / tag_for(6) / marker).mkdir(parents=True)  # (not a file: incomplete)
    (root / tag_for(8)).write_text("")  # (not a folder)
    assert resume_tag(tmp_path, marker) == (tag_for(4), f"{root / 'latest'} is missing: resuming from the newest "
                                            f"complete checkpoint {root / tag_for(4)} "
                                            f"(skipping incomplete {tag_for(6)})")
    (root / "latest").write_text("step_\n")
    with pytest.raises(CheckpointError, match=rf"latest: expected one line naming a checkpoint folder such as "
                                              rf"{tag_for(100)}, found 'step_'; delete it to resume from the newest "
                                              rf"complete checkpoint \({tag_for(4)}\)$"):
        resume_tag(tmp_path, marker)
    (root / "latest").write_text(tag_for(6) + "\n")
    with pytest.raises(CheckpointError, match=rf"latest names {tag_for(6)}, but .*{tag_for(6)} is missing or "
                                              rf"incomplete \(no {marker}\)"):
        latest_tag(tmp_path, marker)
    for step in (10, 12, 14, 16):
        (root / tag_for(step)).mkdir()
        (root / tag_for(step) / marker).write_text("{}")
    (root / "latest").write_text(tag_for(2) + "\n")
    tag, note = resume_tag(tmp_path, marker)
    assert tag == tag_for(2) and f"({', '.join(tag_for(s) for s in (4, 10, 12, 14))} ...)" in note
    only_latest = tmp_path / "other"
    (only_latest / "checkpoints").mkdir(parents=True)
    (only_latest / "checkpoints" / "latest").write_text(tag_for(2) + "\n")
    assert has_checkpoints(only_latest)


def test_steps_at_or_above_the_checkpoints_step_are_allowed_below_it_refused(tmp_path):
    """check_steps_left: train.steps equal to the checkpoint's step (a finished run started again) is no error."""
    from common.checkpoints import check_steps_left

    check_steps_left(6, 6, tmp_path)
    with pytest.raises(ConfigError, match="train.steps=5 is below step 6 of the checkpoint this run resumes"):
        check_steps_left(5, 6, tmp_path)


def test_a_resume_with_another_global_batch_saves_the_stream_position_it_reached(single_process, tmp_path):
    """3 steps of 8 samples, then 2 of 16: the checkpoint of step 5 is at sample 3 x 8 + 2 x 16 = 56 of the stream
    (not 5 x 16: the next resume would skip 24 samples)."""
    run(str(tmp_path), "train.eval_interval=0", steps=3)
    run(str(tmp_path), "train.eval_interval=0", "train.global_batch_size=16", steps=5)
    state = json.loads((tmp_path / "checkpoints" / tag_for(5) / "trainer_state.json").read_text())
    assert state["consumed_samples"] == 56


def test_every_held_out_loss_is_logged_and_old_checkpoints_are_pruned(single_process, tmp_path):
    """The held-out loss measured at a step that is not a log step still gets its row (log every 4 steps,
    measure every 3); train.keep_checkpoints=2 keeps the newest two of a save every 2 steps, and
    train.keep_checkpoints_every=4 those of steps 4 and 8 besides."""
    run(str(tmp_path), "train.log_interval=4", "train.eval_interval=3", "train.save_interval=2",
        "train.keep_checkpoints=2", "train.keep_checkpoints_every=4", steps=10)
    assert sorted(held_out_losses(tmp_path)) == [3, 6, 9, 10]
    assert [m["step"] for m in metrics(tmp_path)] == [3, 4, 6, 8, 9, 10]
    from training.checkpoint import wait_for_pruning

    wait_for_pruning()
    assert complete_tags(tmp_path) == [tag_for(4), tag_for(8), tag_for(10)]


def test_a_resumed_run_keeps_its_run_id_and_prunes_its_earlier_segments_checkpoints(single_process, tmp_path):
    """The run id goes on over a resume (checkpoints record it): with train.keep_checkpoints=1 the second
    segment's save at step 6 removes the first segment's of step 3, pruning only what its own run wrote."""
    from training.checkpoint import wait_for_pruning

    run(str(tmp_path), "train.eval_interval=0", "train.keep_checkpoints=1", steps=3)
    run_id = json.loads((tmp_path / "checkpoints" / MID / "trainer_state.json").read_text())["run_id"]
    run(str(tmp_path), "train.eval_interval=0", "train.keep_checkpoints=1", steps=6)
    wait_for_pruning()
    assert complete_tags(tmp_path) == [LAST]
    assert json.loads((tmp_path / "checkpoints" / LAST / "trainer_state.json").read_text())["run_id"] == run_id


def test_a_save_over_another_runs_complete_checkpoint_is_refused_and_leaves_it(single_process, tmp_path):
    """A complete checkpoint of another run copied in at step 6 (a run resumed from its own step 3, `latest`):
    the save at step 6 refuses to replace it, naming both run ids, and leaves it as it was."""
    from common.checkpoints import CheckpointError

    run(str(tmp_path / "other"), "train.eval_interval=0", steps=6)
    run(str(tmp_path / "run"), "train.eval_interval=0", steps=3)
    shutil.copytree(tmp_path / "other" / "checkpoints" / LAST, tmp_path / "run" / "checkpoints" / LAST)
    before = snapshot(tmp_path / "run" / "checkpoints" / LAST)
    other_id = json.loads((tmp_path / "other" / "checkpoints" / LAST / "trainer_state.json").read_text())["run_id"]
    with pytest.raises(CheckpointError, match=rf"{LAST} holds a complete checkpoint of another run "
                                              rf"\(run id {other_id};"):
        run(str(tmp_path / "run"), "train.eval_interval=0", steps=6)
    assert snapshot(tmp_path / "run" / "checkpoints" / LAST) == before


def test_a_resume_drops_the_rows_a_killed_segment_logged_after_its_checkpoint(single_process, tmp_path):
    """A segment that logged steps 4 and 5 after the checkpoint of step 3 and died: the resumed run trains them
    again, and metrics.jsonl holds every step once."""
    run(str(tmp_path), "train.eval_interval=0", steps=5)
    (tmp_path / "checkpoints" / "latest").write_text(tag_for(3) + "\n")  # (as if step 5's save never happened)
    run(str(tmp_path), "train.eval_interval=0")
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_a_resume_at_the_same_layout_restores_the_random_generators(single_process, tmp_path):
    """(Attention dropout draws from them: an uninterrupted run's masks need the saved states.)"""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from training.checkpoint_verify import load_rng_file

    run(str(tmp_path), "train.eval_interval=0", steps=3)
    saved = load_rng_file(tmp_path / "checkpoints" / tag_for(3) / "rng_rank0.pt")
    torch.manual_seed(99)
    assert run(str(tmp_path), "train.eval_interval=0", steps=3) == []  # (resumes, trains nothing)
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    tracker = get_cuda_rng_tracker().get_states()
    assert tracker.keys() == saved["tracker"].keys()
    assert all(torch.equal(tracker[k], saved["tracker"][k]) for k in tracker)


def test_a_resume_at_another_layout_leaves_the_generators_as_seeded(single_process, reference, tmp_path):
    """The reference's DP=2 ranks' generator states do not map onto one process's: rank 0's file is not loaded."""
    from training.checkpoint_verify import load_rng_file

    run_dir = copy_run(reference[1], tmp_path / "run")
    saved = load_rng_file(run_dir / "checkpoints" / LAST / "rng_rank0.pt")
    torch.manual_seed(99)
    assert run(str(run_dir)) == []  # (resumes at step 6, trains nothing)
    assert not torch.equal(torch.get_rng_state(), saved["torch"])


# ---------------------------------------------------------------------------------------------
# A start's plan, a failed start, close, save and resume, without a model or engine (fast)


def fake_checkpoint(run_dir: Path, step: int = 3, **state) -> Path:
    """checkpoints/step_<step> holding a trainer_state.json only (its tensors are not read here), named by latest."""
    from common.checkpoints import tag_for

    folder = run_dir / "checkpoints" / tag_for(step)
    folder.mkdir(parents=True)
    state = {"step": step, "consumed_samples": 8 * step, "optimizer_steps": step, "lr_scheduler": {}, "layout": {},
             **state}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (run_dir / "checkpoints" / "latest").write_text(tag_for(step) + "\n")
    return folder


def test_what_a_resume_plan_checks_before_anything_is_built(tmp_path, monkeypatch):
    """plan_resume (rank 0, before any engine): an unknown --resume mode; a checkpoint saved without its config is
    resumed with a warning that it cannot be checked; Adafactor's statistics only at the checkpoint's
    parallel.tp (Adam's at any); data of other tokenizers than the checkpoint's refused (synthetic data, which
    records none, is not); the checkpoint's files verified last."""
    from common.checkpoints import CheckpointError
    from training import checkpoint
    from training.config import load_config
    from training.resume_plan import plan_resume

    cfg = load_config("configs/train/debug.yaml", ["train.steps=6"])
    with pytest.raises(ConfigError, match="--resume 'bogus' must be one of auto, none, overwrite"):
        plan_resume(cfg, tmp_path, "bogus")
    made = {"vq": {"hash": "v1"}, "text_tokenizer": {"hash": "t1"}}
    folder = fake_checkpoint(tmp_path, layout={"tp": 2}, run_id="r1", data_tokenizers=made)
    with pytest.raises(CheckpointError, match=rf"{folder}/\.metadata: cannot read the tensor index"):
        plan_resume(cfg, tmp_path, "auto")  # (checkpoint.verify: this one holds no tensors)
    verified = []
    monkeypatch.setattr(checkpoint, "verify", verified.append)
    plan = plan_resume(cfg, tmp_path, "auto", made)
    assert (plan.path, plan.step, plan.run_id, verified) == (folder, 3, "r1", [folder])
    assert plan.messages == [(f"warning: {folder / 'trainer_state.json'} holds no config: this run's config cannot "
                              "be checked against the checkpoint's")]
    assert plan_resume(cfg, tmp_path, "auto", None).path == folder
    with pytest.raises(ConfigError, match=r"cannot resume .* its samples were made with another text tokenizer "):
        plan_resume(cfg, tmp_path, "auto", {**made, "text_tokenizer": {"hash": "t2"}})
    adafactor = load_config("configs/train/debug.yaml", ["train.steps=6", "train.optimizer=adafactor"])
    with pytest.raises(ConfigError, match=rf"{folder}: Adafactor's factored statistics are per tensor-parallel "
                                          r"shard; resume it at parallel.tp=2 \(this run has 1\)"):
        plan_resume(adafactor, tmp_path, "auto")
    assert len(verified) == 2  # (the refusals came before it)


def test_a_branchs_refusals_leave_the_source_runs_files_alone(tmp_path, monkeypatch):
    """train.init_weights_only=false from another run's checkpoint: a train.steps below its step, or another
    network, is refused with advice for a branch (another train.init_from), never a rollback of that run's
    `latest` or a --resume overwrite here, which would change the other run or not help; a decay that would start
    only after train.steps is warned about (the cool-down would not cool)."""
    from training import checkpoint
    from training.config import config_to_dict, load_config
    from training.resume_plan import plan_resume

    monkeypatch.setattr(checkpoint, "verify", lambda path: None)
    source = fake_checkpoint(tmp_path / "stable", step=5, run_id="s",
                             config=config_to_dict(load_config("configs/train/debug.yaml", ["train.steps=6"])))

    def plan(*sets):
        cfg = load_config("configs/train/debug.yaml", [f"train.init_from={source}", "train.init_weights_only=false",
                                                       *sets]).validate()
        return plan_resume(cfg, tmp_path / "branch", "auto")

    assert plan("train.steps=8").branch
    assert plan("train.steps=8", "train.warmup_steps=3", "train.lr_stable_steps=5").messages[-1] == (
        "warning: the cosine decay starts at step 8 (train.warmup_steps + train.lr_stable_steps), not before "
        "train.steps=8: this branch trains at the peak rate throughout")
    assert "warning" not in plan("train.steps=8", "train.warmup_steps=3", "train.lr_stable_steps=2").messages[-1]
    with pytest.raises(ConfigError, match=r"train.steps=4 is below step 5 of the checkpoint this branch continues "
                                          r".*branch from an earlier checkpoint of that run") as refused:
        plan("train.steps=4")
    assert "latest" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"cannot resume .* with another network .*; branch with the checkpoint's "
                                          r"values, or take its weights alone") as refused:
        plan("train.steps=8", "model.hidden_size=32", "model.num_heads=2")
    assert "--resume overwrite" not in str(refused.value)


@pytest.mark.parametrize("sent, raised", [(("CheckpointError", "bad file"), "CheckpointError"),
                                          (("RunDirError", "held"), "RunDirError"),
                                          (("ConfigError", "bad value"), "ConfigError"),
                                          (("RuntimeError", "rank 0 failed: ValueError: x"), "RuntimeError")])
def test_a_refusal_decided_on_rank_0_is_raised_as_its_own_kind_on_the_other_ranks(monkeypatch, sent, raised):
    """training.train prints a ConfigError/RunDirError (CheckpointError) as one line: another rank raised a
    RuntimeError for it, or none."""
    import training.trainer as trainer_module

    def broadcast(box, src):
        box[0] = sent

    monkeypatch.setattr(trainer_module.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(trainer_module.dist, "broadcast_object_list", broadcast)
    with pytest.raises(Exception) as err:
        trainer_module.decide_on_rank0(lambda: pytest.fail("decided on rank 1"))
    assert type(err.value).__name__ == raised and str(err.value) == sent[1]
    sent = ("ok", 7)
    assert trainer_module.decide_on_rank0(lambda: pytest.fail("decided on rank 1")) == 7


def test_rank_0_raises_its_own_error_and_sends_the_others_its_kind(monkeypatch):
    import training.trainer as trainer_module
    from common.checkpoints import CheckpointError

    sent = []
    monkeypatch.setattr(trainer_module.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(trainer_module.dist, "broadcast_object_list", lambda box, src: sent.append(list(box)))
    error = CheckpointError("bad file")

    def fail(e):
        raise e

    with pytest.raises(CheckpointError) as err:
        trainer_module.decide_on_rank0(lambda: fail(error))
    assert err.value is error
    with pytest.raises(ValueError, match="^x$"):
        trainer_module.decide_on_rank0(lambda: fail(ValueError("x")))
    assert trainer_module.decide_on_rank0(lambda: 5) == 5
    assert sent == [[("CheckpointError", "bad file")], [("RuntimeError", "rank 0 failed: ValueError: x")], [("ok", 5)]]


def test_a_failed_start_releases_the_run_directory_and_the_signal_handlers(single_process, tmp_path):
    """A start refused while planning (here an unknown --resume mode) leaves the lock free for the next start
    in this process, and SIGTERM's handler as it found it."""
    import signal

    from common.checkpoints import RunLock
    from training.config import load_config
    from training.trainer import Trainer

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match="--resume 'bogus' must be one of"):
        Trainer(load_config("configs/train/debug.yaml", ["train.steps=2"]), tmp_path, resume="bogus")
    assert signal.getsignal(signal.SIGTERM) == before
    RunLock(tmp_path).acquire().release()


def test_close_aborts_a_save_in_flight_and_releases_the_run_directory_when_a_part_of_it_fails(tmp_path):
    from common.checkpoints import RunLock
    from common.preemption import StopRequest
    from training.trainer import Trainer

    done = []

    def failing_close():
        raise OSError("worker gone")

    t = Trainer.__new__(Trainer)
    t.reader = types.SimpleNamespace(close=lambda: done.append("reader"))
    t.background = types.SimpleNamespace(close=lambda abort=False: done.append(("background", abort)))
    t.log = types.SimpleNamespace(close=lambda: done.append("log"))
    t.stop, t.lock = StopRequest(tmp_path / "STOP"), RunLock(tmp_path).acquire()
    t.close()
    t.close()  # (train() closes after run() did)
    assert done == ["reader", ("background", True), "log"]
    t.reader, t.lock = types.SimpleNamespace(close=failing_close), RunLock(tmp_path).acquire()
    with pytest.raises(OSError, match="worker gone"):
        t.close()
    RunLock(tmp_path).acquire().release()


class _Data(list):
    """64 samples made with these tokenizers."""

    def __init__(self):
        super().__init__(range(64))
        self.manifest = {"vq": {"hash": "v"}, "text_tokenizer": {"hash": "t"}, "other": 1}


def bare_trainer(tmp_path, *sets):
    """A Trainer of the debug config without a model or engine: its log lines in `.lines`."""
    from data_pipeline.sampler import GlobalBatchSampler
    from training.config import load_config
    from training.resume_plan import ResumePlan
    from training.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = load_config("configs/train/debug.yaml", ["train.steps=6", *sets])
    t.run_dir, t.lines, t.background = Path(tmp_path), [], None
    t.dataset = _Data()
    t.sampler = GlobalBatchSampler(64, 8, 1234)
    t.log = types.SimpleNamespace(info=t.lines.append, resumed_at=lambda step: t.lines.append(f"resumed_at {step}"))
    t.plan = ResumePlan(run_id="r1", path=Path(tmp_path) / "checkpoints" / "step_00000003")
    t.nonfinite_guard = types.SimpleNamespace(skipped=0, consecutive=0)
    t.engine = types.SimpleNamespace(get_lr=lambda: [1e-3])
    return t


def test_a_save_waits_for_the_save_in_flight_and_records_the_trainers_state(tmp_path, monkeypatch):
    from training import checkpoint

    t = bare_trainer(tmp_path, "train.keep_checkpoints=2", "train.keep_checkpoints_every=100")
    t.step, t.consumed, t.nonfinite_guard.skipped, t.nonfinite_guard.consecutive = 5, 48, 2, 1
    t.ema_updates, order = 4, []
    t.complete_saves = lambda wait=False: order.append(("wait", wait))

    def save(engine, cfg, layout, run_dir, step, state, keep, background):
        order.append(("save", step, keep))
        order.append(state)
        return "step_00000005"

    t.layout = None
    monkeypatch.setattr(checkpoint, "save", save)
    t.save()
    assert order[:2] == [("wait", True), ("save", 5, (2, 100))]  # (common.checkpoints.Retention: last, every)
    save_id = order[2].pop("save_id")  # (which save of the tag: training.held_out --checkpoints new)
    assert order[2] == {"step": 5, "consumed_samples": 48, "sampler": t.sampler.state_dict(48), "skipped_steps": 2,
                        "consecutive_skipped_steps": 1, "run_id": "r1", "ema_updates": 4,
                        "data_tokenizers": {"vq": {"hash": "v"}, "text_tokenizer": {"hash": "t"}}}
    assert len(save_id) == 32 and int(save_id, 16) >= 0
    assert t.lines == [f"saved {tmp_path / 'checkpoints' / 'step_00000005'}"]


@pytest.mark.parametrize("saved_len", [64, 48, None])
def test_a_resume_restores_the_trainers_state_and_warns_of_other_data_only(tmp_path, monkeypatch, saved_len):
    """The step, stream position, skipped steps (in all and in a row), the sample order the run began with;
    the warning about the data's size only when it differs from the checkpoint's (None: not recorded)."""
    import training.trainer as trainer_module
    from training import checkpoint

    t = bare_trainer(tmp_path)
    state = {"step": 3, "consumed_samples": 24, "skipped_steps": 2, "consecutive_skipped_steps": 1,
             "sampler": {"order": "randperm", **({"dataset_len": saved_len} if saved_len else {})}, "rng_note": None}
    monkeypatch.setattr(checkpoint, "load", lambda engine, cfg, layout, path, branch=False: state)
    monkeypatch.setattr(trainer_module.dist, "get_rank", lambda: 0)
    t.layout, t._reader_at = None, lambda consumed: t.lines.append(f"reader at {consumed}")
    t.resume()
    assert (t.step, t.consumed, t.nonfinite_guard.skipped, t.nonfinite_guard.consecutive) == (3, 24, 2, 1)
    assert t.sampler.order == "randperm"
    warned = [line for line in t.lines if "warning: the training data holds 64 samples" in line]
    assert len(warned) == (saved_len == 48)
    assert t.lines[-2:] == ["resumed_at 3", "reader at 24"]
    assert (tmp_path / "config.yaml").is_file()
