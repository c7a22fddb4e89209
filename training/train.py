"""Train the Parti encoder-decoder: megatron-core tensor parallelism inside a DeepSpeed engine.

    torchrun --nproc_per_node 2 -m training.train --config configs/train/debug.yaml \
        --set parallel.tp=2 train.steps=20 --run-dir runs/x [--resume auto]

The run directory receives config.yaml (resolved), metrics.jsonl, TensorBoard events and
checkpoints/. `--resume auto` continues from checkpoints/latest when there is one.
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
    return parser.parse_args(argv)


def build_dataset(cfg: Config):
    if not cfg.data.synthetic:
        raise ConfigError("data.synthetic=false needs code shards (data_pipeline.pretokenize), "
                          "which this version does not read yet")
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


def train(cfg: Config, run_dir: str | Path, resume: str = "auto") -> list[float]:
    """Run cfg.train.steps steps (or what is left of them after a resume); return the logged losses."""
    from megatron.core import parallel_state as ps

    from data_pipeline.sampler import GlobalBatchSampler
    from model_parallel.kernels import select_kernels
    from model_parallel.state import init_parallel, seed_everything
    from training import checkpoint
    from training.engine import build_engine, build_model, train_step
    from training.flops import peak_flops_per_device, train_flops_per_sample
    from training.metrics import MetricsLogger, memory_gb

    init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    world = dist.get_world_size()
    cfg.validate(world_size=world)
    if cfg.parallel.sequence_parallel and (cfg.parallel.zero_stage > 1 or cfg.parallel.pp > 1):
        raise ConfigError("parallel.sequence_parallel=true works with parallel.pp=1 and parallel.zero_stage "
                          "0 or 1 only (its norm gradients are summed between backward and step)")
    rank, dp_rank, dp_size = dist.get_rank(), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    run_dir = Path(run_dir)
    log = MetricsLogger(run_dir, enabled=rank == 0)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")

    seed_everything(cfg.train.seed)
    kernels = select_kernels(cfg.kernels)
    log.info(kernels.summary())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg, kernels, device)
    seed_everything(cfg.train.seed)  # building may have reseeded (per-piece init seeds)
    engine = build_engine(model, cfg, kernels)
    dataset = build_dataset(cfg)
    sampler = GlobalBatchSampler(len(dataset), cfg.train.global_batch_size, cfg.train.seed)

    step, consumed = 0, 0
    tag = checkpoint.latest_tag(run_dir) if resume == "auto" else None
    if tag:
        state = checkpoint.load(engine, cfg, run_dir, tag)
        step, consumed = state["step"], state["consumed_samples"]
        log.info(f"resumed from {run_dir / 'checkpoints' / tag} at step {step}")
    log.info(f"layout: world {world} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x dp {dp_size}; "
             f"zero {cfg.parallel.zero_stage}; {sum(p.numel() for p in model.parameters()):,} parameters on rank 0")

    m, t = cfg.model, cfg.train
    flops_per_sample, peak = train_flops_per_sample(m), peak_flops_per_device()
    losses = []
    while step < t.steps:
        start = time.perf_counter()
        lr = engine.get_lr()[0]
        micro_batches = list(rank_micro_batches(cfg, dataset, sampler, consumed, dp_rank, dp_size))
        loss, grad_norm = train_step(engine, cfg, micro_batches, device)
        losses.append(loss)
        step += 1
        consumed += t.global_batch_size
        elapsed = time.perf_counter() - start
        if step % t.log_interval == 0 or step == t.steps:
            tflops = flops_per_sample * t.global_batch_size / elapsed / world / 1e12
            log.step({
                "step": step, "loss": losses[-1], "lr": lr, "grad_norm": grad_norm,
                "samples_per_s": t.global_batch_size / elapsed,
                "tokens_per_s": t.global_batch_size * (m.text_seq_len + m.image_seq_len) / elapsed,
                "tflops_per_gpu": tflops, "mfu": tflops * 1e12 / peak if peak else None,
                "mem_gb": memory_gb(),
            })
        if (t.save_interval and step % t.save_interval == 0) or step == t.steps:
            tag = checkpoint.save(engine, cfg, run_dir, step, {"step": step, "consumed_samples": consumed,
                                                          "sampler": sampler.state_dict(consumed)})
            log.info(f"saved {run_dir / 'checkpoints' / tag}")
    log.close()
    return losses


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set).validate()
        train(cfg, args.run_dir, args.resume)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
