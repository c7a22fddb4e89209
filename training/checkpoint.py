"""Checkpoints of a run: DeepSpeed engine state plus the trainer's own state, with a `latest` pointer.

    save(engine, run_dir, step, trainer_state, keep=3)
    tag = latest_tag(run_dir)                # None when there is no complete checkpoint
    trainer_state = load(engine, run_dir, tag)

Layout: run_dir/checkpoints/step_00000100/ (DeepSpeed's model/optimizer files, trainer_state.json,
rng_rank{r}.pt) and run_dir/checkpoints/latest, a one-line file naming the newest complete tag. It is
replaced atomically (write + rename) by rank 0 only after every rank has finished writing, so a run
killed while saving resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: str | Path) -> str | None:
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {tag!r}, but {checkpoint_dir(run_dir) / tag} is incomplete")
    return tag


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str | Path, step: int, trainer_state: dict, keep: int = 3) -> str:
    root, tag = checkpoint_dir(run_dir), tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rank = dist.get_rank()
    torch.save(_rng_state(), root / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        # trainer_state.json last: its presence marks the tag complete.
        with open(root / tag / "trainer_state.json", "w") as f:
            json.dump({**trainer_state, "world_size": dist.get_world_size()}, f, indent=1)
        tmp = root / "latest.tmp"
        tmp.write_text(tag + "\n")
        os.replace(tmp, root / "latest")
        _prune(root, keep)
    dist.barrier()
    return tag


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(engine, run_dir: str | Path, tag: str) -> dict:
    root = checkpoint_dir(run_dir)
    state = json.loads((root / tag / "trainer_state.json").read_text())
    path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")
    rng_file = root / tag / f"rng_rank{dist.get_rank()}.pt"
    if state.get("world_size") == dist.get_world_size() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state
