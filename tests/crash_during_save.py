"""Helper for tests/test_faults.py: train one process and SIGKILL itself during the checkpoint of step
`kill_at_step`, before the trainer state and the `latest` pointer are written.

    python -m tests.crash_during_save RUN_DIR KILL_AT_STEP [sync|async]

sync: while writing it (after the tensor files, at the rng_rank file); async (train.async_save=true): right
after handing it to the background writer, which goes on writing as an orphan (the test kills it after)."""
import os
import signal
import sys

import torch


def main(run_dir: str, kill_at_step: int, mode: str = "sync") -> None:
    from training import checkpoint
    from training.config import load_config
    from training.trainer import train

    tag = f"step_{kill_at_step:08d}"
    if mode == "async":
        real_schedule = checkpoint.BackgroundSaves.schedule

        def schedule_then_die(self, request, run_dir, path):
            real_schedule(self, request, run_dir, path)
            if path.name == tag:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.BackgroundSaves.schedule = schedule_then_die
    else:
        real_save = torch.save

        def save_then_die(obj, path, *args, **kwargs):
            if tag in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *args, **kwargs)

        checkpoint.torch.save = save_then_die  # the rng_rank file is written after dist_checkpointing's files
    cfg = load_config("configs/train/debug.yaml", ["train.steps=6", "train.global_batch_size=8",
                                                   "train.micro_batch_size=2", "train.save_interval=2",
                                                   f"train.async_save={mode == 'async'}"])
    train(cfg, run_dir)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
