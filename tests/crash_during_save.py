"""Helper for tests/test_faults.py: train one process and SIGKILL itself while writing the checkpoint
of step `kill_at_step` (after the tensor files, before the trainer state and the `latest` pointer)."""
import os
import signal
import sys

import torch


def main(run_dir: str, kill_at_step: int) -> None:
    from training import checkpoint
    from training.config import load_config
    from training.train import train

    real_save = torch.save

    def save_then_die(obj, path, *args, **kwargs):
        if f"step_{kill_at_step:08d}" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *args, **kwargs)

    checkpoint.torch.save = save_then_die  # the rng_rank file is written after dist_checkpointing's files
    cfg = load_config("configs/train/debug.yaml", ["train.steps=6", "train.global_batch_size=8",
                                                   "train.micro_batch_size=2", "train.save_interval=2"])
    train(cfg, run_dir)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
