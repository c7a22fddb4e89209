r"""Train the Parti encoder-decoder: megatron-core tensor parallelism inside a DeepSpeed engine.

    torchrun --nproc_per_node 2 -m training.train --config configs/train/debug.yaml \
        --set parallel.tp=2 train.steps=20 --run-dir runs/x [--resume auto]

The run directory receives config.yaml (the config of the current segment), config_history/ (one
file per start or resume: segment_<n>_step_<s>.yaml, the config each segment ran with and what changed),
metrics.jsonl, TensorBoard events and checkpoints/. One run at a time: rank 0 holds run_dir/.lock
(common/checkpoints.py RunLock) for the run's life; a second run there fails at once naming the holder.

--resume auto (default): continue from checkpoints/latest, or, when that pointer is missing, from the
  newest complete checkpoint (logged), at whatever layout this run has; start at step 0 when there is none.
  The config is compared with the checkpoint's first: a changed network (model.*) or optimizer kind is
  refused naming the keys, schedule/optimizer values (train.lr, min_lr, warmup_steps, lr_stable_steps,
  lr_decay, lr_decay_steps, steps, weight_decay, grad_clip, adam_beta1/2, adam_eps) are applied and logged,
  seed/batch/data changes are warned about.
--resume none: start at step 0; refused when the run directory already holds checkpoints.
--resume overwrite: start at step 0 in a run directory that holds another run; that run's checkpoints,
  metrics, configs and events are moved (not deleted) to run_dir/replaced_<time>/.
SIGUSR1/SIGTERM or a run_dir/STOP file: finish the step, save, write run_dir/REQUEUE, exit 75 (0 under
torchrun, which passes no status on; common/preemption.py). Errors: exit 1 with one line naming the file
or field ("config error: ..." or "error: ..."), the run directory as it was.
Data: `data.synthetic: true` uses generated caption/code pairs (data_pipeline/synthetic.py). Each data-parallel
rank's micro-batches are read ahead by `data.workers` DataLoader workers (data_pipeline/loader.py) on its TP group's
rank 0 of the pipeline stages that take inputs, and broadcast to the group (training.engine.sample_role), in the order
rank_micro_batches gives (a pure function of seed and consumed samples), from the resumed position on a resume.
"""
from __future__ import annotations

import argparse

from common.checkpoints import RunDirError
from common.cli import command, config_parser
from training.config import RESUME_MODES, load_config


def parse_args(argv):
    parser = config_parser(__doc__, where="configs/train/", example="parallel.tp=2 train.steps=20")
    parser.add_argument("--run-dir", required=True, help="where config, metrics and checkpoints go")
    parser.add_argument("--resume", default="auto", choices=RESUME_MODES,
                        help="auto: continue from the run directory's latest (else newest complete) checkpoint "
                             "if any; none: start afresh, refused where checkpoints exist; overwrite: start "
                             "afresh, moving an existing run to run_dir/replaced_<time>/")
    # The deepspeed launcher passes --local_rank; the rank is read from the environment either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with command():
        cfg = load_config(args.config, args.set).validate()
    # Imported once the config is valid: megatron-core and DeepSpeed take ~5 s to import, which a config error
    # (on every rank of every node) need not wait for.
    from model_parallel.state import DeviceError
    from training.deepspeed_glue import NonFiniteStop
    from training.trainer import train

    with command(errors=(RunDirError, NonFiniteStop, DeviceError)):  # RunDirError includes CheckpointError
        train(cfg, args.run_dir, args.resume)  # a requested stop: Preempted, which command() turns into the exit


if __name__ == "__main__":
    main()
