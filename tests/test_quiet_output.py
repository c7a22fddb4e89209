"""What a person sees (issue #14 item 7): a 2-process CPU training run says each warning at most once, and only
rank 0 speaks (common/quiet.py, called first thing by training.train's main)."""
from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

from model_parallel.state import child_environment

ROOT = Path(__file__).resolve().parents[1]
# torchrun --tee 3 prefixes each line a worker prints with "[default<local rank>]:".
RANK_LINE = re.compile(r"^\[default(\d+)\]:(.*)$")
# Warnings as the libraries print them: Python's `warnings` ("file.py:12: UserWarning: ..."), DeepSpeed's logger
# ("[<time>] [WARNING] [...]"), torch's Python and C++ logs ("[rank1]:W1201 02:24:18.929000 14415 file.py:183] ...",
# "[W1201 ...]").
WARNING = re.compile(r"\w+Warning: |\[WARNING\]|^(\[rank\d+\]:)?\[?W\d{4} ")
# What differs between two printings of one warning: torch's rank, time and process id, DeepSpeed's time.
STAMP = re.compile(r"^(\[rank\d+\]:)?\[?W\d{4} [\d:.]+ +\d+ |^\[[\d-]+ [\d:,]+\] ")


def test_two_process_cpu_run_says_each_warning_once_and_only_rank_0_speaks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--tee", "3",
           "-m", "training.train", "--config", "configs/train/debug.yaml", "--run-dir", str(tmp_path),
           "--set", "parallel.tp=2", "train.steps=3"]
    # OMP_NUM_THREADS set: else torchrun's launcher prints a banner of its own (its '****' line twice).
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=child_environment(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    by_rank = collections.defaultdict(list)  # None: the launcher's own lines
    for line in out.splitlines():
        m = RANK_LINE.match(line)
        by_rank[int(m[1]) if m else None].append(m[2] if m else line)
    assert any(" step 3 | loss " in line for line in by_rank[0]), out[-3000:]
    assert not by_rank[1], "rank 1 spoke:\n" + "\n".join(by_rank[1])
    lines = [line for printed in by_rank.values() for line in printed]
    said = collections.Counter(STAMP.sub("", line) for line in lines if WARNING.search(line))
    repeated = [f"{n}x {line}" for line, n in said.items() if n > 1]
    assert not repeated, "said more than once:\n" + "\n".join(repeated)


QUIET_PROBE = """
import json, logging, os, sys, warnings
if sys.argv[2] == "torch-first":
    import torch  # noqa: F401
from common.quiet import quiet_third_party
quiet_third_party(None if sys.argv[1] == "env" else int(sys.argv[1]))
quiet_third_party(1 if sys.argv[1] == "0" else 0)  # (a second call does nothing)

def shown(message, module, category=UserWarning):
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, category, "x.py", 1, module=module, registry={})
    return len(caught)

def passes(logger, level, message):
    return bool(logging.getLogger(logger).filter(logging.LogRecord(logger, level, "x.py", 1, message, (), None)))

print(json.dumps({
    "harmless": shown("Transformer Engine is not installed. Falling back", "megatron.core.fusions"),
    "harmless elsewhere": shown("Transformer Engine is not installed", "mine"),
    "cpu only": shown("When using sequence parallelism it is recommended to set the environment variable "
                      "CUDA_DEVICE_MAX_CONNECTIONS", "megatron.core.tensor_parallel"),
    "megatron news": shown("something new", "megatron.core.models"),
    "torch news": shown("something new", "torch.nn"),
    "torchvision news": shown("something new", "torchvision.models"),
    "ours": shown("something new", "training.trainer"),
    "deepspeed cpu line": passes("DeepSpeed", logging.INFO, "Setting accelerator to CPU (auto detect)"),
    "deepspeed info": passes("DeepSpeed", logging.INFO, "ZeRO stage 1"),
    "deepspeed error": passes("DeepSpeed", logging.ERROR, "ZeRO stage 1"),
    "megatron level": logging.getLogger("megatron").level,
    "torch level": logging.getLogger("torch").level,
    "TORCH_LOGS": os.environ.get("TORCH_LOGS"), "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL"),
}))
"""


def test_rank_0_hears_news_and_other_ranks_only_errors_from_the_libraries():
    """common.quiet.quiet_third_party in a fresh interpreter per rank (it changes the process's warning filters,
    loggers and environment): the listed harmless warnings and log lines go on every rank; anything else from the
    libraries stays on rank 0 only, but errors; our own warnings stay everywhere; its first call decides."""
    import json

    def probe(rank: str, torch_first: bool = False, accelerator: str | None = "cpu", **variables: str) -> dict:
        env = {name: value for name, value in child_environment().items()
               if name not in ("TORCH_LOGS", "TORCH_CPP_LOG_LEVEL", "RANK", "SLURM_PROCID", "DS_ACCELERATOR")}
        env.update(variables or {"RANK": "1"}, **({"DS_ACCELERATOR": accelerator} if accelerator else {}))
        done = subprocess.run([sys.executable, "-c", QUIET_PROBE, rank, "torch-first" if torch_first else "-"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout)

    rank0 = probe("0")
    assert rank0 == {"harmless": 0, "harmless elsewhere": 1, "cpu only": 0, "megatron news": 1, "torch news": 1,
                     "torchvision news": 1, "ours": 1, "deepspeed cpu line": False, "deepspeed info": True,
                     "deepspeed error": True, "megatron level": 0, "torch level": 0, "TORCH_LOGS": None,
                     "TORCH_CPP_LOG_LEVEL": None}, rank0
    quiet = {**rank0, "megatron news": 0, "torch news": 0, "deepspeed info": False, "megatron level": 40,
             "TORCH_LOGS": "-torch", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    assert probe("1") == quiet and probe("env") == quiet  # (rank None: RANK's, 1 here)
    # a bare srun sets no RANK before init_distributed: SLURM_PROCID is the rank (every task spoke as rank 0)
    assert probe("env", SLURM_PROCID="1") == quiet and probe("env", SLURM_PROCID="0") == rank0
    assert probe("env", SLURM_PROCID="1", RANK="0") == rank0
    no_driver = {**rank0, "cpu only": int(Path("/proc/driver/nvidia").exists())}  # (DS_ACCELERATOR unset)
    assert probe("0", accelerator=None) == no_driver
    assert probe("1", torch_first=True) == {**quiet, "torch level": 40, "TORCH_LOGS": None, "TORCH_CPP_LOG_LEVEL": None}
