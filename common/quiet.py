"""Keep third-party chatter out of what a person sees: `quiet_third_party()` first thing in an entry point's main().

Every process of a run imports the same libraries and hears the same warnings, so a 2-process CPU run opened with
each of them twice, none about the run. This, before megatron-core and DeepSpeed are imported (they warn at import):
  - ignores the known-harmless warnings below (message, category and warning module, each said why), on every rank;
  - drops the known-harmless log lines below (torch, DeepSpeed), on every rank;
  - on ranks != 0 keeps only errors from megatron-core, DeepSpeed and torch (their `warnings` and loggers; torch's
    C++ log where torch is not imported yet): every rank runs the same code, so rank 0 already says what they would.
Any other warning still prints on rank 0: a new one is news. Our own "parti" logger speaks on rank 0 only
(common/metrics.py). Nothing here needs saying in our words: model_parallel/kernels.py already logs which kernels
run instead of apex/Transformer Engine ones. Measured with the versions of requirements.txt (torch 2.14.1,
megatron-core 0.16.1, deepspeed 0.19.8, torchvision 0.29.1, lpips 0.1.4): recheck the lists when they change.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from common.preemption import launch_rank

# (message, category, module): `warnings` matches both regexes at the start of the text, the module being the one the
# warning is attributed to (its caller's, for stacklevel=2).
HARMLESS_WARNINGS = [
    # megatron-core, at import of five of its modules: fused apex/TE kernels absent. kernels.py picks and logs the
    # kernels that run instead ("kernels: layernorm=torch ...").
    (r"(Transformer Engine|Apex) (and Apex )?(is|are) not installed", UserWarning, r"megatron\.core"),
    # Deprecated torch.distributed names called by DeepSpeed's ZeRO-2/3 (all_gather_into_tensor) and megatron-core's
    # dist_checkpointing loader (load_state_dict): same behaviour, the libraries' to rename.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning, r"torch\.distributed"),
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing"),
    # torchvision's vgg16(pretrained=...) as lpips calls it (vq/losses.py, perceptual loss): vq/losses.py loads the
    # backbone weights itself.
    ((r"The parameter 'pretrained' is deprecated|Arguments other than a weight enum or `None` for 'weights' are "
      r"deprecated"), UserWarning, r"torchvision\.models"),
]
# Only where no GPU can be used (DS_ACCELERATOR=cpu or no NVIDIA driver): megatron-core's tensor_parallel/layers.py,
# first TP>1 backward. CUDA_DEVICE_MAX_CONNECTIONS orders CUDA kernels: nothing on CPU. On GPUs slurm/*.sbatch sets
# it to 1 (then megatron says nothing), and a bare torchrun without it is told so on rank 0.
CPU_ONLY_WARNINGS = [((r"When using (async grad allreduce|sequence parallelism) it is recommended to set the "
                       r"environment variable CUDA_DEVICE_MAX_CONNECTIONS"), UserWarning, r"megatron\.core")]

# logger -> message regex (searched). Python loggers, so a filter on the logger object: it stays when the library
# later resets the logger's level (DeepSpeed does at import).
HARMLESS_LOGS = {
    # torch.utils.cpp_extension at import (DeepSpeed imports it) on a machine with a CUDA toolkit and no GPU:
    # nothing is compiled on CPU.
    "torch.utils.cpp_extension": r"No CUDA runtime is found",
    # DeepSpeed's accelerator probe without DS_ACCELERATOR and no GPU: the CPU is what we run on (kernels line).
    "DeepSpeed": r"Setting accelerator to CPU",
}
THIRD_PARTY = ("megatron", "deepspeed", "torch")  # whose warnings and logs ranks != 0 keep to errors


class _Drop(logging.Filter):
    """Drops records below `level` and those whose message matches `pattern`."""

    def __init__(self, level: int, pattern: str | None):
        super().__init__()
        self.level, self.pattern = level, re.compile(pattern) if pattern else None

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level and not (self.pattern and self.pattern.search(record.getMessage()))


_DONE = False


def quiet_third_party(rank: int | None = None) -> None:
    """Install the filters above for this process (`rank`: its global rank, read from RANK when None, else from
    SLURM_PROCID: torchrun sets RANK before Python starts, a bare srun only SLURM_PROCID, which init_distributed
    turns into RANK after this has run). Call it before megatron-core/DeepSpeed are imported; once is
    enough, a second call does nothing."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    rank = launch_rank() if rank is None else rank
    no_gpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not os.path.exists("/proc/driver/nvidia")
    for message, category, module in HARMLESS_WARNINGS + (CPU_ONLY_WARNINGS if no_gpu else []):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    level = logging.ERROR if rank != 0 else logging.NOTSET
    for name, pattern in HARMLESS_LOGS.items():
        logging.getLogger(name).addFilter(_Drop(level, pattern))
    if rank == 0:
        return
    warnings.filterwarnings("ignore", module=rf"({'|'.join(THIRD_PARTY)})(\.|$)")
    logging.getLogger("megatron").setLevel(logging.ERROR)  # megatron-core's module loggers inherit it
    if "torch" in sys.modules:  # torch set its loggers up at import: lower the top one, the others inherit
        logging.getLogger("torch").setLevel(logging.ERROR)
    else:  # torch sets its loggers from TORCH_LOGS ("-torch": errors) and its C++ log from TORCH_CPP_LOG_LEVEL
        os.environ.setdefault("TORCH_LOGS", "-torch")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
