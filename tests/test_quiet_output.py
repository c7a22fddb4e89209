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
