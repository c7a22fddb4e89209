"""The keys every trainer's train section has for how its loop runs around the steps, not what it trains: a time
limit of its own, how long a collective waits for the other ranks, when garbage is collected, which checkpoints
are kept.

    @dataclass
    class VQTrainConfig(LoopControl): ...                 # training's TrainConfig, vq's, sr's
    check_minima(cfg.train, "train", (*LOOP_MINIMA, ...))

Used by common/preemption.py (exit_after_minutes), model_parallel/state.py (dist_timeout_minutes),
common/collection.py (gc_interval) and common/checkpoints.py (`retention()`) through each trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.checkpoints import Retention


@dataclass
class LoopControl:
    exit_after_minutes: float = 0.0
    """Save and stop for a requeue (as a preemption does: run_dir/REQUEUE, common/preemption.py) at the first step
    after this many minutes from the trainer process's start (torchrun's, for its workers; imports, build and
    resume included, as a job's time limit counts them; Megatron-LM's --exit-duration-in-mins; 0: no limit): set it
    below a job's time limit where no signal comes before it (slurm/train.sbatch has SLURM send USR1). Each segment
    takes at least one step."""
    dist_timeout_minutes: int = 30
    """How long a collective waits for the other ranks before the run fails (torch.distributed's process-group
    timeout, megatron-core's groups too; Megatron-LM's --distributed-timeout-minutes): long enough for the
    slowest rank's checkpoint load or save, short enough that a hung rank ends the job."""
    gc_interval: int = 50
    """Steps between Python garbage collections, taken by every rank at the same step with automatic collection
    off (torchtitan's training.gc_freq, Megatron-LM's --manual-gc-interval): an automatic one starts on each
    rank at its own moment and holds the others at the next collective (common/collection.py). 0: Python's
    automatic collection."""
    keep_checkpoints: int = 3
    """Checkpoints kept in the run directory (older ones are deleted; 0 keeps all)."""
    keep_checkpoints_every: int = 0
    """Checkpoints whose step is a multiple of this are kept besides (0: none; Orbax's keep_period): e.g. the
    branch points of a warmup-stable-decay run's cool-downs (training's train.init_weights_only=false), or
    milestones to evaluate, while keep_checkpoints bounds the others."""

    def retention(self) -> Retention:
        """What a save's prune keeps (common.checkpoints.prune)."""
        return Retention(self.keep_checkpoints, self.keep_checkpoints_every)


LOOP_MINIMA = (("exit_after_minutes", 0, "minutes before a save and stop, 0: no limit"),
               ("dist_timeout_minutes", 1, "minutes a collective waits for the other ranks"),
               ("gc_interval", 0, "steps between garbage collections, 0: automatic"),
               ("keep_checkpoints", 0, "checkpoints kept, 0: all"),
               ("keep_checkpoints_every", 0, "steps between checkpoints kept besides, 0: none"))
"""LoopControl's rules (common.config.check_minima)."""
