"""Shared fixtures: a one-process megatron-core group for in-process tests, gloo worker pools."""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


def debug_model_config(**overrides):
    """The parti-debug preset with fp32-friendly test settings (no dropout, no caption dropping)."""
    from training.config import load_config

    sets = ["model.preset=parti-debug", "model.dropout=0.0", "model.attention_dropout=0.0",
            "model.caption_drop_prob=0.0"] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, sets).model


def debug_batch(cfg, batch: int = 3, seed: int = 0):
    """Text ids with varied padding and random image codes, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.text_vocab_size, (batch, cfg.text_seq_len), generator=g)
    for i in range(batch):
        text[i, max(1, cfg.text_seq_len - 3 * i - 1):] = cfg.text_pad_id
    codes = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_seq_len), generator=g)
    return text, codes


# The files that take minutes, longest first (seconds on 2 busy cores: the demo ~400, the CPU GPU check ~200, the
# SLURM cluster ~300 over its tests).
SLOW_FILES = ("test_end_to_end.py", "test_slurm.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test`: --dist loadfile --no-loadscope-reorder) each file goes whole to the next
    free worker in the order collected: the SLOW_FILES first, then the others by their number of tests (xdist's own
    order), so that no long file is the last one running while the other worker idles (longest first, as in
    scheduling). Without xdist the order is left as it is."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    tests_in = Counter(item.path for item in items)
    slow = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: (slow.get(item.path.name, len(slow)), -tests_in[item.path]))  # (stable: files whole)


_SINGLE_PROCESS = {"on": False}


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed with one gloo rank and megatron-core TP=PP=1 in the test process."""
    from model_parallel.state import init_parallel

    init_parallel(tp=1, pp=1)
    _SINGLE_PROCESS["on"] = True
    yield


@pytest.fixture(autouse=True)
def _restore_single_process_groups():
    """After each test: a command's main() run in this process tears the process groups down when it ends
    (common.cli.command), which left the later tests of the session-wide single_process without them
    (they failed when run after tests/test_data_pipeline.py). init_parallel is a no-op when they are there."""
    yield
    if _SINGLE_PROCESS["on"]:
        from model_parallel.state import init_parallel

        init_parallel(tp=1, pp=1)


@pytest.fixture(scope="session")
def pool2():
    from tests.distributed import WorkerPool

    pool = WorkerPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    from tests.distributed import WorkerPool

    pool = WorkerPool(4)
    yield pool
    pool.close()


# ---------------------------------------------------------------------------------------------
# Training runs of the debug model, and the reference run others are compared with.

STEPS = 6

H200_RUN = Path(__file__).resolve().parent.parent / "bench" / "results" / "gpu_nvidia-h200_2026-11-30.json"
"""The first GPU run's results (bench/gpu_check.py on an H200): the measurements the planner is checked against."""
H200_RUN_2 = H200_RUN.with_name("gpu_nvidia-h200_2026-12-04.json")
"""The second (4 micro-batches per optimizer step, parti-350m up to micro-batch 128): checked against as well."""


REFERENCE_EMA = "train.ema_decay=0.9"
"""The reference run's moving average of the weights (the runs compared with it at other layouts keep one too)."""


def held_out_losses(run_dir, key: str = "valid_loss") -> dict[int, float]:
    """{step: valid_loss} of a run's metrics.jsonl (the steps its held-out loss was measured at; `key`: another
    column, e.g. ema_valid_loss, the moving average's)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def run(run_dir: str, *overrides: str, steps: int = STEPS, resume: str = "auto") -> list[float]:
    """Train the debug model (fp32, no dropout, global batch 8 in micro-batches of 2, a checkpoint and the
    held-out loss of 2 global batches every 3 steps) in this process's group; resumes from run_dir's latest
    checkpoint if any (`resume`: training.train's --resume mode)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from training.config import load_config
    from training.trainer import train

    cfg = load_config("configs/train/debug.yaml", [
        f"train.steps={steps}", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.save_interval=3", "train.eval_interval=3", "train.eval_batches=2", "model.dropout=0.0",
        "model.attention_dropout=0.0", *overrides])
    return train(cfg, run_dir, resume=resume)


@pytest.fixture(scope="session")
def reference(pool2, tmp_path_factory):
    """The reference run: ZeRO-0, DP=2, TP=1, PP=1, 6 steps, keeping a moving average of the weights (REFERENCE_EMA:
    it changes no loss, and runs resumed from its checkpoints without one leave it behind). Returns (losses,
    run_dir)."""
    path = tmp_path_factory.mktemp("reference")
    losses = pool2.run(run, str(path), REFERENCE_EMA)
    assert losses[0] == losses[1]
    return losses[0], path


@pytest.fixture
def log_lines():
    """The trainer's log messages (logger 'parti', rank 0) of this test."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, logger = Keep(), logging.getLogger("parti")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # (training/metrics.py sets it only when it adds its own handler)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)
