"""A run directory's checkpoints, for any trainer: naming, the `latest` pointer, which one to resume,
pruning, one run per run directory. What goes into a checkpoint is the trainer's business.

    folder = checkpoint_dir(run_dir) / tag_for(step)
    problem = prepare_folder(folder)                     # None: an empty folder; else one line saying why not
    ... write the checkpoint's files into `folder`, its marker file last and atomically (common.files) ...
    move_latest(run_dir, tag_for(step))                  # only once the marker is there
    prune(run_dir, Retention(3), step, marker)           # this run's newest 3, leftovers of killed saves gone
    tag, note = resume_tag(run_dir, marker)              # `latest`'s tag, else the newest complete one (note says so)

Layout: run_dir/checkpoints/step_00000100/, one folder per saved step, and run_dir/checkpoints/latest, a
one-line file naming the newest complete tag, replaced atomically after the checkpoint is complete, so a
run killed while saving resumes from the previous checkpoint. A folder is complete when its marker file
exists: the trainer writes it last, atomically (training: `trainer_state.json`; vq: `state.pt`). A folder
without it is a leftover of a killed or failed save: never resumed from, deleted by the next prune.

Checkpoints may carry the id of the run that wrote them (`owner_of` reads it back): pruning deletes only
this run's older checkpoints, never another run's that was copied or left in the same directory.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from common.config import ConfigError
from common.files import write_atomic
from common.preemption import launch_rank

OwnerOf = Callable[[Path], "str | None"]
"""Reads the run id a complete checkpoint folder records (None: none recorded, counts as this run's)."""


class Retention(NamedTuple):
    """Which of a run's complete checkpoints a prune keeps: the newest `last` (0: all), and those whose step is a
    multiple of `every` (0: none; Orbax's keep_period), e.g. a warmup-stable-decay run's branch points."""

    last: int = 3
    every: int = 0

    def kept_for_good(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (busy, or holding a run that would be overwritten);
    the message is one line naming the file and what to do."""


class CheckpointError(RunDirError):
    """A checkpoint cannot be read or written; the message is one line naming the file and the cause."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


TAG = re.compile(r"step_(\d+)")


def step_of(tag: str) -> int | None:
    match = TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def is_complete(path: Path, marker: str) -> bool:
    return (path / marker).is_file()


def step_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder, complete or not, oldest first."""
    root = checkpoint_dir(run_dir)
    found = [(step_of(p.name), p) for p in root.glob("step_*") if p.is_dir()] if root.is_dir() else []
    return sorted((step, p) for step, p in found if step is not None)


def complete_tags(run_dir: str | Path, marker: str) -> list[str]:
    return [p.name for _, p in step_folders(run_dir) if is_complete(p, marker)]


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether the run directory holds a `latest` pointer or any step folder (complete or not)."""
    return (checkpoint_dir(run_dir) / "latest").exists() or bool(step_folders(run_dir))


def latest_tag(run_dir: str | Path, marker: str) -> str | None:
    """The tag `checkpoints/latest` names; None when there is no pointer. A pointer that is not one line
    naming a complete step folder raises CheckpointError (one line, naming the file)."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    complete = complete_tags(run_dir, marker)
    hint = (f"delete it to resume from the newest complete checkpoint ({complete[-1]})" if complete
            else "no complete checkpoint is left")
    try:
        tag = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot be read as text ({one_line(e)}); expected one line naming a "
                              f"checkpoint folder such as {tag_for(100)}; {hint}") from None
    if step_of(tag) is None:
        raise CheckpointError(f"{pointer}: expected one line naming a checkpoint folder such as {tag_for(100)}, "
                              f"found {tag[:60]!r}; {hint}")
    if not is_complete(checkpoint_dir(run_dir) / tag, marker):
        raise CheckpointError(f"{pointer} names {tag}, but {checkpoint_dir(run_dir) / tag} is missing or incomplete "
                              f"(no {marker}); {hint}")
    return tag


def resume_tag(run_dir: str | Path, marker: str) -> tuple[str | None, str | None]:
    """(the tag to resume from or None, a note for the log or None): `latest`'s tag; when there is no
    `latest` (deleted, or lost with the file system's metadata) the newest complete step folder. A `latest`
    set back by hand (a rollback) is followed, with a warning naming the newer checkpoints left in place."""
    tag = latest_tag(run_dir, marker)
    complete, folders = complete_tags(run_dir, marker), step_folders(run_dir)
    if tag is not None:
        newer = [t for t in complete if step_of(t) > step_of(tag)]
        return tag, (f"warning: {checkpoint_dir(run_dir) / 'latest'} names {tag}, but newer checkpoints are there "
                     f"({', '.join(newer[:4])}{' ...' if len(newer) > 4 else ''}): resuming from {tag} as it says; "
                     "the newer ones stay until this run saves their steps, and would be resumed from if `latest` "
                     "were lost: move them out of checkpoints/ if they belong to an abandoned run") if newer else None
    pointer = checkpoint_dir(run_dir) / "latest"
    if complete:
        incomplete = [p.name for step, p in folders if p.name not in complete and step > step_of(complete[-1])]
        skipped = f" (skipping incomplete {', '.join(incomplete)})" if incomplete else ""
        return complete[-1], (f"{pointer} is missing: resuming from the newest complete checkpoint "
                              f"{checkpoint_dir(run_dir) / complete[-1]}{skipped}")
    if folders:
        return None, (f"{checkpoint_dir(run_dir)} holds only incomplete checkpoints "
                      f"({', '.join(p.name for _, p in folders)}): starting at step 0")
    return None, None


def check_steps_left(steps: int, step: int, path: Path, branch: bool = False) -> None:
    """Refuse (ConfigError) a train.steps below the step of the checkpoint a run resumes (`branch`: continues,
    another run's: its files are left alone): nothing would train, the run would end as finished, and its
    config.yaml would say it ends before where its checkpoint stands."""
    if steps < step:
        what, earlier = (("this branch continues", "branch from an earlier checkpoint of that run "
                          "(train.init_from=<its step folder>)") if branch else
                         ("this run resumes", "point checkpoints/latest at that step's folder (a rollback)"))
        raise ConfigError(f"train.steps={steps} is below step {step} of the checkpoint {what} ({path}): nothing "
                          f"would train. Set train.steps above {step} to go on; to continue from an earlier step, "
                          f"{earlier}")


def move_latest(run_dir: str | Path, tag: str) -> None:
    """Point `checkpoints/latest` at `tag` (write + rename: a reader finds the old pointer or the new one).
    Call it only once the tag's folder is complete."""
    write_atomic(checkpoint_dir(run_dir) / "latest", tag + "\n")


# ---------------------------------------------------------------------------------------------
# Writing and pruning step folders


def prepare_folder(path: Path, run_id: str | None = None, owner_of: OwnerOf | None = None) -> str | None:
    """Before a save (one process): an empty folder at `path` (None), or why not (one line). A folder
    already there is a leftover of a killed save (incomplete) or this run's own checkpoint of the step: it
    is replaced; a complete checkpoint of another run (`owner_of` names another run id) is not."""
    try:
        if path.exists():
            owner = owner_of(path) if owner_of else None
            if owner and run_id and owner != run_id:
                return (f"{path} holds a complete checkpoint of another run (run id {owner}; this run is {run_id}): "
                        "refusing to overwrite it; move it away or use another --run-dir")
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as e:
        return f"cannot prepare {path}: {failure_cause(e)} ({free_space(path.parent)})"
    return None


def failed_save_message(run_dir: str | Path, path: Path, error: str, marker: str) -> str:
    """The one line a failed save raises (after its partial folder is removed): why, the free space, and
    which checkpoint `latest` still names."""
    try:
        previous = latest_tag(run_dir, marker)
    except CheckpointError:
        previous = None
    root = checkpoint_dir(run_dir)
    return (f"saving {path} failed: {error} ({free_space(root)}); removed the partial folder; "
            f"{root / 'latest'} still names {previous or 'no checkpoint'}")


def prune(run_dir: str | Path, keep: Retention, step: int, marker: str, run_id: str | None = None,
          owner_of: OwnerOf | None = None) -> None:
    """Keep this run's newest `keep.last` complete checkpoints up to `step` (just saved; 0 keeps all) and those
    `keep.every` names; delete its other older ones and (whatever `keep` is) incomplete leftovers of killed saves
    below `step`. Another run's
    checkpoints (`owner_of` names another run id) and folders above `step` are left alone; checkpoints that
    record no run id count as this run's. A checkpoint's marker goes first: a deletion cut short leaves an
    incomplete folder (removed by the next prune), never a complete-looking one with files missing."""
    older = []
    for s, path in step_folders(run_dir):
        if s >= step:
            continue
        if not is_complete(path, marker):
            _remove(path, marker)
        elif owner_of is None or owner_of(path) in (None, run_id):
            older.append(path)
    for path in older[:max(0, len(older) - (keep.last - 1))] if keep.last > 0 else []:
        if not keep.kept_for_good(step_of(path.name)):
            _remove(path, marker)


def _remove(path: Path, marker: str) -> None:
    """A checkpoint folder deleted, its marker first. A symlink (a checkpoint linked in from another run, to
    resume from it) loses the link only: deleting through it took the other run's marker, and that run's own next
    prune then removed its whole checkpoint as an incomplete leftover."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
        return
    (path / marker).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def failure_cause(e: BaseException) -> str:
    """One line for why a write failed: the OSError's own text when one is in the chain (also inside
    torch.distributed.checkpoint's CheckpointException, which carries each rank's failure, and in
    messages that only quote it, '[Errno 28] ...' after crossing a process boundary); else the first rank's
    failure inside a CheckpointException (whose own text is a traceback, cut before its cause), else e's text."""
    stack, seen, texts, inner = [e], set(), [], None
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return f"{x.strerror or os.strerror(x.errno)} (errno {errno.errorcode.get(x.errno, x.errno)})"
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            ranks = [v[0] if isinstance(v, tuple) else v for v in failures.values()]
            inner = inner or next((x for x in ranks if isinstance(x, BaseException)), None)
            stack.extend(ranks)
        stack.extend((x.__cause__, x.__context__))
        texts.append(str(x))
    for text in texts:
        match = re.search(r"\[Errno (\d+)\]", text)
        if match:
            n = int(match.group(1))
            return f"{os.strerror(n)} (errno {errno.errorcode.get(n, n)})"
    return f"{type(inner).__name__}: {one_line(inner)}" if inner is not None else one_line(e)


def free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free on its file system"
    except OSError:
        return "free space unknown"


# ---------------------------------------------------------------------------------------------
# One run per run directory


class RunLock:
    """An exclusive lock on run_dir/.lock for a run's life, taken by the process that writes the config,
    metrics, pointer and prunes (rank 0): a second run started in the same run directory fails at once,
    naming the holder (pid, host, start time, written into the file).

    fcntl.flock: the kernel releases the lock when the holder's last file descriptor closes, i.e. when
    the process dies however it dies (SIGKILL, OOM, node reboot for local disks), so a stale .lock of a
    dead run never blocks, and a SLURM requeue of the same job (its previous processes are dead by then)
    takes it again. Child processes forked while it is held (checkpoint writer workers) share it until
    they exit. Limits: on a local disk it is exact. On NFS, Linux implements flock with NFS byte-range
    locks: it works across clients, but the lock of a crashed client is released only when the server's
    lease/grace period ends (~90 s for NFSv4), so a requeue right after a node failure may be refused for
    that long. Lustre mounted without `-o flock` (or with `localflock`) and other file systems without
    flock make the call fail or lock only per node: the run then goes on with a warning and nothing
    stops a second run on another node."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None
        self.warning: str | None = None
        self.made: list[Path] = []  # what acquire created: the lock file, the run directory and its new parents

    def acquire(self) -> RunLock:
        import fcntl

        while True:
            try:
                self.made = [p for p in (self.path, *self.path.parents) if not p.exists()]
                self.path.parent.mkdir(parents=True, exist_ok=True)
                f = open(self.path, "a+")
            except OSError as e:
                raise RunDirError(f"cannot use {self.path.parent} as the run directory: {e.strerror} "
                                  f"({e.filename or self.path})") from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = " ".join(f.read().split()) or "holder unknown"
                f.close()
                raise RunDirError(f"{self.path} is held by another run ({holder}): two runs must not write to one "
                                  "run directory; wait for it to end, stop it, or use another --run-dir") from None
            except OSError as e:
                f.close()
                self.warning = (f"warning: cannot lock {self.path} ({e.strerror}; a file system without flock): "
                                "nothing stops a second run from writing to this run directory")
                return self
            if _same_file(f, self.path):
                break
            # A start that failed meanwhile removed the file we opened (release(failed=True)) after we opened it
            # and before we locked it: a lock on it would stop no other run. Take the file now at the path.
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        f.flush()
        self.file = f
        _HELD_LOCKS[f.fileno()] = _identity(f.fileno())
        return self

    def release(self, failed: bool = False) -> None:
        """Unlock. `failed`: the run stopped before it wrote anything: the lock file and run directory this
        lock created are removed when nothing else is in them (a refused start leaves no folder behind)."""
        import fcntl

        if self.file is not None:
            _HELD_LOCKS.pop(self.file.fileno(), None)
            if failed and self.path in self.made and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
                self.path.unlink()  # (a run that opened it meanwhile finds it gone once locked: acquire's retry)
                with contextlib.suppress(OSError):  # (a file that appeared since: the folder stays)
                    for folder in self.made[1:]:  # (the run directory, then the parents mkdir made for it)
                        folder.rmdir()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


@contextlib.contextmanager
def holding_run_dir(run_dir: str | Path) -> Iterator[RunLock]:
    """The run directory's RunLock for a block, taken by the launch's rank 0 (RANK; SLURM_PROCID under a bare
    srun: the rank init_distributed will give it) before the process group exists, for the trainers whose
    construction already writes to the run directory (vq, sr, the text encoder's pre-training). Its refusal
    ends rank 0 with the holder's name, and the launcher (torchrun; srun --kill-on-bad-exit) ends the others. A
    block that fails before anything was written leaves no run directory (RunLock.release(failed=True))."""
    lock = RunLock(run_dir)
    if launch_rank() == 0:
        lock.acquire()
        if lock.warning:
            print(lock.warning, file=sys.stderr, flush=True)
    try:
        yield lock
    except BaseException:
        lock.release(failed=True)
        raise
    lock.release()


def _same_file(f, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path` (not unlinked or replaced since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


_HELD_LOCKS: dict[int, tuple[int, int]] = {}  # descriptor -> (device, inode) of the run locks this process holds


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def drop_inherited_locks() -> None:
    """In a forked child (a data-loading worker): close its copies of the run locks' descriptors. flock belongs
    to the open file, which every forked copy keeps open, so a worker outliving a killed trainer (PyTorch's
    workers notice a dead parent only every few seconds) would hold the run directory against a requeue."""
    # Only a descriptor that still names its lock file: a lock never released (a Trainer that failed after
    # taking it) is closed when collected, and its number may since name a pipe of this very worker (its
    # DataLoader queues): closing that left the worker's results undelivered and the trainer waiting forever.
    for fd, identity in list(_HELD_LOCKS.items()):
        if _identity(fd) == identity:
            os.close(fd)
    _HELD_LOCKS.clear()


def set_aside(run_dir: str | Path, names: tuple[str, ...]) -> Path | None:
    """Move a previous run's files (`names`, those of run_dir's entries the trainer writes) into
    run_dir/replaced_<time>/, for starting afresh: renamed, not deleted, so no complete checkpoint of that
    run is lost. Returns the folder (None when there was nothing to move)."""
    run_dir = Path(run_dir)
    present = [name for name in names if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"replaced_{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"replaced_{stamp}_{n}"
    dest.mkdir()
    for name in present:
        os.replace(run_dir / name, dest / name)
    return dest
