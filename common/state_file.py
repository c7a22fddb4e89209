"""One-file checkpoints of the single-model trainers (vq.train, sr.train): checkpoints/step_XXXXXXXX/state.pt.

    save_state(run_dir, step, state, cfg.train.retention())   # one process: atomically, `latest`, pruning
    state = load_state(path, ("model", "opt", "step", "rng"), writer="vq.train")

The folder, pointer and pruning mechanics are common/checkpoints.py's (a checkpoint is complete when its
state.pt exists; `resume_tag(run_dir, STATE_FILE)` finds `latest`, or the newest complete one). A state holds
tensors, containers, numbers and strings only, and is read back with torch.load(weights_only=True): a file
holding anything else (a pickled object, which could run code when loaded) or one cut short is refused with
its name instead. There is no checksum: most flipped bits in tensor data load unnoticed (a flip in the
structure is refused like a cut).
"""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import torch

from common.checkpoints import (
    CheckpointError,
    Retention,
    checkpoint_dir,
    failed_save_message,
    failure_cause,
    move_latest,
    prepare_folder,
    prune,
    tag_for,
)
from common.config import ConfigError
from common.files import atomic_path

STATE_FILE = "state.pt"
"""A checkpoint folder's one file, written atomically: its presence marks the checkpoint complete."""


def save_state(run_dir: str | Path, step: int, state: dict, keep: Retention) -> Path:
    """Write checkpoints/step_<step>/state.pt atomically, move `latest` to it and prune what `keep` does not
    keep (common.checkpoints.prune). A failed write leaves no partial folder and `latest` where it was
    (CheckpointError, one line)."""
    folder = checkpoint_dir(run_dir) / tag_for(step)
    problem = prepare_folder(folder)
    if problem:
        raise CheckpointError(problem)
    try:
        with atomic_path(folder / STATE_FILE) as tmp:
            torch.save(state, tmp)
        move_latest(run_dir, folder.name)
    except (OSError, RuntimeError) as e:  # (torch.save's writer reports a full disk as a RuntimeError)
        shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointError(failed_save_message(run_dir, folder, failure_cause(e), STATE_FILE)) from None
    prune(run_dir, keep, step, STATE_FILE)
    return folder / STATE_FILE


def load_state(path: Path, required: tuple[str, ...], writer: str, if_refused: str = "") -> dict:
    """A state saved by `save_state`, on the CPU (weights_only=True: anything but tensors and plain data is
    refused unrun); CheckpointError naming the file when it is unreadable, unsafe, or lacks a `required` key.
    `if_refused`: what to do about a refused file (default: a resume's advice)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a damaged file fails in many ways: KeyError, ValueError, UnicodeDecodeError)
        found = re.search(r"GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and found:
            raise CheckpointError(f"{path}: refused: it holds a pickled {found.group(1)}, not only tensors and plain "
                                  "data, and loading it could run code; " + (if_refused or (
                                      f"{writer} never writes such checkpoints - use one from a run you trust, or "
                                      "delete its folder and `latest` to resume "
                                      "from the newest complete one"))) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first}); expected a torch.save file "
                              f"written by {writer}") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a {writer} checkpoint (no {', '.join(missing)})")
    return state


RESUME_ADVICE = ("resume with the model section of the run's config.yaml, or start the new model in another "
                 "--run-dir (nothing was changed)")
"""check_fits's advice when the weights are a checkpoint to continue."""


def check_fits(module: torch.nn.Module, state: dict, where: str, optional: tuple[str, ...] = (),
               advice: str = "set the model section as the source was trained") -> None:
    """ConfigError naming the missing, unexpected and other-shaped keys of `state` against `module`'s (a
    model section that differs from the one the weights were trained with: `where` names their file), then
    `advice`; the keys in `optional` may be missing."""
    ours = module.state_dict()
    missing = sorted(k for k in ours.keys() - state.keys() if k not in optional)
    unexpected = sorted(state.keys() - ours.keys())
    shapes = [f"{k} {tuple(state[k].shape)} (the model's: {tuple(ours[k].shape)})"
              for k in sorted(state.keys() & ours.keys()) if state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(found)} {what}: {', '.join(found[:6])}{' ...' if len(found) > 6 else ''}"
                    for what, found in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                        ("other shape(s)", shapes)) if found]
        raise ConfigError(f"{where} does not fit the configured model ({'; '.join(problems)}): {advice}")
