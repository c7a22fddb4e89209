"""The frame every command line shares: --config/--set, one-line errors, process-group cleanup.

    def main(argv=None):
        parser = config_parser(__doc__, where="configs/vq/")
        parser.add_argument("--run-dir", required=True)
        args = parser.parse_args(argv)
        with command(errors=(CheckpointError,)):
            cfg = load_typed(VQConfig, args.config, args.set)
            ...

A ConfigError ends the command with `config error: <message>`, each of `errors` with `error: <message>` (exit status
1, one line, no traceback), and so does a path of the wrong kind in every command (an output folder named where a
file is, a file where a folder must be: FileExistsError, NotADirectoryError, IsADirectoryError, whose messages name
the path); a trainer's Preempted (common/preemption.py: a requested stop, saved, or one honoured while starting)
with one line on rank 0 and the requeue exit status (75; 0 under torchrun). The process group, when the command made
one, is destroyed on the way out whatever happened (with megatron-core's groups on it, so that a later command in
the same process starts afresh); the interpreter's exit is made prompt (exit_promptly: no last garbage collection,
no wait on a helper process that ignores SIGTERM).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import gc
import io
import sys
import time
import typing

from common.config import ConfigError, add_config_args, field_docs
from common.preemption import Preempted, launch_rank, requeue_exit_code


def description(doc: str | None) -> str | None:
    """A command's --help description: the first paragraph of its module docstring (its first line alone
    stopped mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split()) if doc and doc.strip() else None


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...],
                     minimum: int = 1) -> None:
    """parser.error (one line, exit 2) naming the first of the options `names` (their dest names) below `minimum`."""
    for name in names:
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: at least {minimum}")


def config_parser(doc: str | None, where: str = "configs/", example: str = "train.steps=20") -> argparse.ArgumentParser:
    """An ArgumentParser described by `doc` (description()), with --config and --set (`example`: overrides of
    this command's config to show in --set's help)."""
    parser = argparse.ArgumentParser(description=description(doc))
    add_config_args(parser, where, example)
    return parser


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """A --flag per field of config dataclass `cls` (top_k -> --top-k), its default and its documentation
    as help: a command's flags and a config section that mean the same thing are stated once."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name] if hints[f.name] in (int, float, str) else float  # `float | None`: default None
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                            help=" ".join(docs.get(f.name, "").split()))


def dataclass_from_args(cls, args: argparse.Namespace):
    """`cls` from the flags `add_dataclass_args` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _one_write_per_line() -> None:
    """Python prints an exit message and its newline as two writes, each straight through under `python -u`
    (as torchrun starts its workers): every rank meets the same config error, and their lines ran into each
    other. Line buffering makes each line one write."""
    if isinstance(sys.stderr, io.TextIOWrapper):
        sys.stderr.reconfigure(write_through=False, line_buffering=True)


@functools.cache  # once per process
def exit_promptly() -> None:
    """Make the interpreter's exit prompt (once per process; every command calls it, and the test workers; in a
    multiprocessing child, such as those, multiprocessing's own exit work runs before the exit handlers).

    - Python's last garbage collection walks every object alive, ~500k once torch, megatron-core and DeepSpeed
      are imported: ~2 s per process, per rank at each launch's end. Frozen by an exit handler, they are left
      to the OS (objects alive at exit are not promised a collection anyway; the exit handlers still run).
    - multiprocessing's own exit handler sends SIGTERM to the daemonic helper processes still running (data
      workers) and then waits for each, without a limit. The data workers ignore SIGTERM
      (common.preemption.ignore_stop_signals: a job's stop is the trainer's to handle), so one that had not
      ended kept the process from ever exiting: on an H200 a VQ training process hung at its exit this way
      (bench/results/gpu_nvidia-h200_2026-12-04.md), which under SLURM holds the job until its time limit.
      Helpers still running after HELPER_GRACE_S are killed, and named on stderr; one that has not ended a second
      after that is left to the OS, not waited for."""
    # (multiprocessing's exit handler is registered when its util module is imported: now, if not yet, so that
    # this one, registered after it, runs before it: exit handlers run last-in, first-out)
    import multiprocessing.util  # noqa: F401

    atexit.register(gc.freeze)
    atexit.register(_end_helpers)


HELPER_GRACE_S = 3.0
"""Seconds the daemonic helper processes left at exit get to end after SIGTERM, before SIGKILL."""


def _end_helpers() -> None:
    import multiprocessing
    import multiprocessing.process
    import signal

    helpers = [p for p in multiprocessing.active_children() if p.daemon]
    if not helpers:
        return
    # torch's DataLoader handler raises in this process when one of its live iterators' workers dies by a signal:
    # it would end this handler at the first one ended here, and the exit would wait for the others again
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in helpers:
        p.terminate()
    deadline = time.monotonic() + HELPER_GRACE_S
    for p in helpers:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            print(f"exit: helper process {p.name} (pid {p.pid}) was still running {HELPER_GRACE_S:g} s after SIGTERM; "
                  "killed", file=sys.stderr, flush=True)
            p.kill()
            p.join(1.0)
        if p.is_alive():  # (not ended even by SIGKILL yet, e.g. still tearing down its memory: the OS reaps it
            # once it has; multiprocessing's own handler, which would wait for it, no longer knows of it)
            multiprocessing.process._children.discard(p)


@contextlib.contextmanager
def command(errors: tuple[type[BaseException], ...] = (), label: str = "error"):
    exit_promptly()
    try:
        yield
    except ConfigError as e:
        _one_write_per_line()
        sys.exit(_on_this_rank(f"config error: {e}"))
    except (*errors, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        _one_write_per_line()
        sys.exit(_on_this_rank(f"{label}: {e}"))
    except Preempted as e:
        code = requeue_exit_code()
        if launch_rank() == 0:
            _one_write_per_line()
            print(f"{e}; exit status {code}: run again (requeue) to continue", file=sys.stderr)
        sys.exit(code)
    finally:
        # torch is not imported here for a command that failed before needing it (a config error).
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            groups = sys.modules.get("megatron.core.parallel_state")  # megatron-core's groups live on this one
            if groups is not None and groups.model_parallel_is_initialized():
                groups.destroy_model_parallel()
            dist.destroy_process_group()


def _on_this_rank(line: str) -> str:
    """The error line as a rank other than 0 of a launch prints it: every rank says why it stopped (a node may
    lack a file the others have), and torchrun's copies of one error read as what they are."""
    rank = launch_rank()
    return f"rank {rank}: {line}" if rank else line


def run_trainer(args: argparse.Namespace, config_cls, build, label: str, use_device, device_error: type) -> None:
    """The command line of a trainer with --config/--set, --run-dir and --resume auto|none whose object has
    resume(), start_fresh() and run() (vq.train, vq.finetune_decoder, sr.train): the config and the device
    first (a missing GPU is refused before the run directory is made), then the run lock for the run's life
    (common.checkpoints.holding_run_dir), then `build(cfg)` resumed or started afresh (--resume none: refused
    where the run directory holds checkpoints, as training.train refuses it), and trained. Bad input,
    a busy run directory and a damaged checkpoint end in one line. `use_device`, `device_error`:
    model_parallel.state's (passed in: common sits below model_parallel)."""
    from pathlib import Path

    from common.checkpoints import CheckpointError, RunDirError, checkpoint_dir, has_checkpoints, holding_run_dir
    from common.config import load_typed
    from common.preemption import StopRequest

    # (ValueError: bad input data or files, e.g. data_pipeline's DataError, a damaged export)
    with command(errors=(CheckpointError, device_error, FileNotFoundError, RunDirError, ValueError), label=label):
        cfg = load_typed(config_cls, args.config, args.set)
        use_device(cfg.train.device, "train.device")
        with holding_run_dir(args.run_dir):
            if args.resume == "none" and has_checkpoints(args.run_dir):  # (its saves would replace that run's steps)
                raise CheckpointError(f"--resume none: {checkpoint_dir(args.run_dir)} holds checkpoints; continue "
                                      "them with --resume auto, or use another --run-dir")
            # The stop handlers before the build and the resume (minutes: a checkpoint, a tokenizer, the data
            # stream's buffer), as Parti's trainer installs them: a SIGTERM/SIGUSR1 meanwhile is noted and honoured
            # before the first step (StopRequest.start) instead of ending the process unsaved, without REQUEUE.
            stop = StopRequest(Path(args.run_dir) / "STOP", cfg.train.exit_after_minutes)
            try:
                trainer = build(cfg)
                trainer.stop = stop
                if args.resume == "auto":
                    trainer.resume()
                else:
                    trainer.start_fresh()
                trainer.run()
            finally:
                stop.restore()
