"""Train the Parti encoder-decoder: megatron-core tensor parallelism inside a DeepSpeed engine.

    torchrun --nproc_per_node 2 -m training.train --config configs/train/debug.yaml \
        --set parallel.tp=2 train.steps=20 --run-dir runs/x [--resume auto]

The run directory receives config.yaml (resolved), metrics.jsonl, TensorBoard events and
checkpoints/. `--resume auto` continues from checkpoints/latest when there is one, at whatever
layout this run has. SIGUSR1/SIGTERM: finish the step, save, exit 75 (requeue). Exit 1 on errors.
Data: `data.synthetic: true` uses generated caption/code pairs (data_pipeline/synthetic.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from training.config import Config, ConfigError, add_config_args, load_config, save_config


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--run-dir", required=True, help="where config, metrics and checkpoints go")
    parser.add_argument("--resume", default="auto", choices=["auto", "none"],
                        help="auto: continue from the run directory's latest checkpoint if any")
    # The deepspeed launcher passes --local_rank; the rank is read from the environment either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_dataset(cfg: Config):
    if not cfg.data.synthetic:
        from data_pipeline.code_shards import open_training_data

        try:
            return open_training_data(cfg.data.shards, cfg.model)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.shards={cfg.data.shards!r}: {e}") from e
    from data_pipeline.synthetic import SyntheticCodes

    return SyntheticCodes(cfg.model, size=1024, seed=cfg.train.seed)


def rank_micro_batches(cfg: Config, dataset, sampler, consumed: int, dp_rank: int, dp_size: int):
    """This DP rank's micro-batches of the global batch starting at `consumed`, with CFG caption drops."""
    from model_parallel.model import cfg_drop_mask, null_condition

    m, t = cfg.model, cfg.train
    positions = torch.arange(consumed, consumed + t.global_batch_size)
    ids = sampler.global_batch(consumed)
    mine = sampler.rank_slice(torch.stack([positions, ids], 1), dp_rank, dp_size)
    for chunk in mine.split(t.micro_batch_size):
        text, codes = map(torch.stack, zip(*(dataset[int(i)] for i in chunk[:, 1])))
        drop = cfg_drop_mask(chunk[:, 0], t.seed, m.cfg_drop_prob)
        yield null_condition(text, drop, m.text_pad_id, m.text_eos_id), codes


class Trainer:
    """One run: process groups, model, engine, data order, and the loop that steps, logs and saves."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        from megatron.core import parallel_state as ps

        from data_pipeline.sampler import GlobalBatchSampler
        from model_parallel.kernels import select_kernels
        from model_parallel.state import init_distributed, init_parallel, seed_everything, use_device
        from training.engine import build_engine, build_model
        from training.flops import enable_tf32, peak_flops
        from training.metrics import MetricsLogger, reset_peak_memory

        self.device = use_device(cfg.train.device)  # before anything touches CUDA
        init_distributed()
        self.world = dist.get_world_size()
        cfg.validate(world_size=self.world)  # before any work: a layout that does not fit is refused
        init_parallel(cfg.parallel.tp, cfg.parallel.pp)
        if cfg.parallel.sequence_parallel and (cfg.parallel.zero_stage > 1 or cfg.parallel.pp > 1):
            raise ConfigError("parallel.sequence_parallel=true works with parallel.pp=1 and parallel.zero_stage "
                              "0 or 1 only (its norm gradients are summed between backward and step)")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dataset = build_dataset(cfg)  # data that does not fit the model is refused before anything is written
        self.log = MetricsLogger(self.run_dir, enabled=dist.get_rank() == 0)
        if dist.get_rank() == 0:
            save_config(cfg, self.run_dir / "config.yaml")

        seed_everything(cfg.train.seed)
        kernels = select_kernels(cfg.kernels)
        self.log.info(kernels.summary())
        if cfg.train.precision == "bf16" and cfg.parallel.zero_stage != 1:
            self.log.info("note: bf16 with parallel.zero_stage != 1 accumulates and reduces gradients in bf16 "
                          "(DeepSpeed); parallel.zero_stage=1 keeps them in fp32")
        if self.device == "cuda" and cfg.train.precision == "fp32":
            enable_tf32()
        self.peak_flops, peak_source = peak_flops(cfg.train.precision, cfg.train.peak_tflops)
        self.log.info(f"MFU against {peak_source}")
        model = build_model(cfg, kernels, self.device)
        seed_everything(cfg.train.seed)  # building may have reseeded (per-piece init seeds)
        self.engine = build_engine(model, cfg, kernels)
        reset_peak_memory()
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.train.global_batch_size, cfg.train.seed)
        self.step, self.consumed = 0, 0
        self.log.info(f"layout: world {self.world} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x dp "
                      f"{self.dp_size}; zero {cfg.parallel.zero_stage}; "
                      f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()):,} parameters on rank 0")

    def resume(self) -> None:
        from training import checkpoint

        tag = checkpoint.latest_tag(self.run_dir)
        if tag:
            state = checkpoint.load(self.engine, self.cfg, self.run_dir, tag)
            self.step, self.consumed = state["step"], state["consumed_samples"]
            self.engine.nonfinite_guard.skipped = state.get("skipped_steps", 0)
            self.log.info(f"resumed from {self.run_dir / 'checkpoints' / tag} at step {self.step}")

    def save(self) -> None:
        from training import checkpoint

        state = {"step": self.step, "consumed_samples": self.consumed,
                 "sampler": self.sampler.state_dict(self.consumed),
                 "skipped_steps": self.engine.nonfinite_guard.skipped}
        tag = checkpoint.save(self.engine, self.cfg, self.run_dir, self.step, state, self.cfg.train.keep_checkpoints)
        self.log.info(f"saved {self.run_dir / 'checkpoints' / tag}")

    def log_step(self, loss: float, lr: float, grad_norm: float | None, elapsed: float) -> None:
        from training.flops import train_flops_per_sample
        from training.metrics import memory_gb

        m, gbs = self.cfg.model, self.cfg.train.global_batch_size
        tflops = train_flops_per_sample(m) * gbs / elapsed / self.world / 1e12
        peak = self.peak_flops
        self.log.step({
            "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "samples_per_s": gbs / elapsed, "tokens_per_s": gbs * (m.text_seq_len + m.image_seq_len) / elapsed,
            "tflops_per_gpu": tflops, "mfu": tflops * 1e12 / peak if peak else None,
            **memory_gb(), "skipped_steps": self.engine.nonfinite_guard.skipped, "world_size": self.world,
        })

    def run(self) -> list[float]:
        """Step until train.steps; return this call's per-step losses. Raises Preempted after saving
        when SIGUSR1/SIGTERM arrived, RuntimeError after too many non-finite steps in a row."""
        from training.engine import train_step
        from training.preemption import Preempted, StopRequest

        t, guard = self.cfg.train, self.engine.nonfinite_guard
        stop, losses = StopRequest(self.run_dir / "STOP"), []
        try:
            while self.step < t.steps:
                start, lr = time.perf_counter(), self.engine.get_lr()[0]
                batches = list(rank_micro_batches(self.cfg, self.dataset, self.sampler, self.consumed,
                                                  self.dp_rank, self.dp_size))
                loss, grad_norm = train_step(self.engine, self.cfg, batches, self.device)
                losses.append(loss)
                self.step += 1
                self.consumed += t.global_batch_size
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self.log_step(loss, lr, grad_norm, time.perf_counter() - start)
                if guard.consecutive >= t.max_skipped_steps:
                    raise RuntimeError(f"stopping at step {self.step}: the last {guard.consecutive} steps had "
                                       "non-finite loss or gradients and were skipped (train.max_skipped_steps="
                                       f"{t.max_skipped_steps}); lower train.lr or check the data")
                preempted = stop.requested()
                if preempted or (t.save_interval and self.step % t.save_interval == 0) or self.step == t.steps:
                    self.save()
                if preempted:
                    reason = stop.name
                    dist.barrier()  # every rank has read the STOP file before it goes
                    if dist.get_rank() == 0:  # tells a SLURM script (slurm/train.sbatch) to requeue
                        (self.run_dir / "STOP").unlink(missing_ok=True)
                        (self.run_dir / "REQUEUE").write_text(f"step {self.step}\n")
                    raise Preempted(self.step, reason)
        finally:
            stop.restore()
            self.log.close()
        return losses


def train(cfg: Config, run_dir: str | Path, resume: str = "auto") -> list[float]:
    """Run cfg.train.steps steps (or what is left of them after a resume); return their losses."""
    trainer = Trainer(cfg, run_dir)
    if resume == "auto":
        trainer.resume()
    return trainer.run()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from training.preemption import REQUEUE_EXIT_CODE, Preempted

    try:
        cfg = load_config(args.config, args.set).validate()
        train(cfg, args.run_dir, args.resume)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except Preempted as e:
        print(f"{e}; exiting with {REQUEUE_EXIT_CODE} (requeue me)", file=sys.stderr)
        sys.exit(REQUEUE_EXIT_CODE)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
