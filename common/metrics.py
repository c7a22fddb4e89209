"""The one logging helper: rank 0 prints a line per log step and writes metrics.jsonl, TensorBoard and, when asked,
Weights & Biases.

    log = MetricsLogger(run_dir, enabled=rank == 0)          # wandb_project="parti": W&B too (see MetricsLogger)
    log.step({"step": 10, "loss": 2.3, "lr": 1e-3, ...})     # a line, a JSON object, scalars
    log.info("text")                                         # a plain message (rank 0 only)
    log.resumed_at(step)                                     # a run (re)starting at `step`: later rows go
    clock = StepClock()                                      # each step: clock.step_done(); around a save or an
    with clock.paused(): ...                                 # evaluation: clock.paused(); at a log line:
    samples_per_s = global_batch / clock.seconds_per_step()  # the interval's mean step time (and a new interval)

metrics.jsonl holds one JSON object per logged step: step, loss, lr, grad_norm (the step's), params_norm (the fp32
weights'; Parti's trainer), samples_per_s, tokens_per_s, tflops_per_gpu, mfu, data_wait_pct (the share of the step
time spent waiting for input, the largest of any rank's, and data_wait_pct_rank that rank: max_over_ranks; these
over the steps since the previous row: StepClock), mem_gb (on a GPU its peak allocated, on CPU the resident memory
of the process; the largest of any rank's, and mem_gb_rank that rank), mem_reserved_gb (GPU only, the largest peak
of any rank's; both in GiB, 2^30 bytes, as torch and nvidia-smi count GPU memory) (null where not measurable),
consumed_samples (training samples up to and with the step: step x global batch unless a resume changed the batch;
Megatron-LM's consumed samples), and valid_loss in the rows of the steps the held-out loss was measured at
(training's train.eval_interval; with named held-out sets, data.valid_shards, also valid_loss_<name> each and
valid_loss their mean: `held_out_row`). TensorBoard and W&B name a scalar train/<key>, or
valid/<name> for a key valid_<name>.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import psutil
import torch

from common.files import write_atomic

_FORMATS = {"loss": ".4f", "lr": ".3e", "grad_norm": ".3f", "params_norm": ".2f", "samples_per_s": ".1f",
            "tokens_per_s": ".0f", "tflops_per_gpu": ".3f", "mfu": ".3f", "data_wait_pct": ".1f", "mem_gb": ".2f",
            "mem_reserved_gb": ".2f", "valid_loss": ".4f"}


def held_out_row(losses: dict[str, float]) -> dict[str, float]:
    """A metric row's held-out losses from {set name: loss} (data.valid_shards' sets; '' for an unnamed one):
    valid_loss, their mean, and valid_loss_<name> for each named set."""
    return {"valid_loss": sum(losses.values()) / len(losses),
            **{f"valid_loss_{name}": loss for name, loss in losses.items() if name}}


def memory_gb() -> dict[str, float]:
    """{'mem_gb': peak GPU memory allocated by tensors since the last `reset_peak_memory`,
    'mem_reserved_gb': peak reserved by the caching allocator (what the GPU really gives up)};
    on CPU {'mem_gb': resident memory of this process}."""
    if torch.cuda.is_available():
        return {"mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"mem_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) against a reference."""
    return 10 * math.log10(4.0 / max(torch.nn.functional.mse_loss(images.float(), reference.float()).item(), 1e-12))


def mean_over_ranks(logs: dict) -> dict:
    """A data-parallel step's numbers (loss, PSNR, ...) averaged over the ranks of the default group, in one
    all-reduce: the step's whole batch, not rank 0's share of it (ranks with equal batches: the mean of their
    means; numbers already global, like an all-reduced code usage or the LR, stay as they are). A PSNR (a key
    with 'psnr' in its name) is averaged as the squared error it stands for, so it is the whole batch's PSNR, not
    the mean of the ranks' decibels. Every rank calls it."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return logs
    keys = [k for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    decibels = torch.tensor(["psnr" in k for k in keys])
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # (NCCL reduces device tensors only)
    values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
    values = torch.where(decibels, 10 ** (-values / 10), values).to(device)  # (dB -> MSE over the peak's square)
    dist.all_reduce(values)
    values = values.cpu() / dist.get_world_size()
    values = torch.where(decibels, -10 * torch.log10(values), values)
    return {**logs, **dict(zip(keys, values.tolist()))}


def max_over_ranks(values: dict[str, float], ranked: tuple[str, ...] = ()) -> dict[str, float]:
    """Each of `values` as its largest over the ranks of the default group, in one all-gather, and for each key of
    `ranked` also '<key>_rank': the rank that has it (the lowest of equals). For what one rank can hold everyone
    back with, which rank 0's own number hides: a rank whose reads are slow makes the others wait in the step's
    next collective (their own input was ready: rank 0's data_wait_pct said 0), and the rank with the most memory
    is the one that runs out (a pipeline's first stage keeps the most activations). Every rank calls it, at the
    same steps; one process: `values` as they are, without '_rank' keys."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # (NCCL gathers device tensors only)
    mine = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    every = torch.stack(every).cpu()  # [ranks, keys]
    largest, rank = every.max(dim=0)  # (ties: torch takes the first maximum's index)
    row = dict(zip(values, largest.tolist()))
    return {**row, **{f"{key}_rank": int(rank[list(values).index(key)]) for key in ranked}}


def reset_peak_memory() -> None:
    """Start the peaks of `memory_gb` afresh: called once the engine is built, so that the logged peak is
    training's, not construction's (the fp32 model before DeepSpeed casts it to bf16)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for one that is not a whole JSON object with one."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def wandb_mode() -> str:
    """W&B's mode when a project is given: WANDB_MODE if set (online, offline, disabled); else online where an
    API key is in WANDB_API_KEY; else offline (no account or network needed: `wandb sync` uploads the run later)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class LossSpikes:
    """Watches the training loss for spikes: `seen(loss)` returns how many times the median of the previous `window`
    finite losses this one is, when that is `factor` or more and it begins a spike (None otherwise, and until
    `window` losses were seen; factor 0: never). The losses after it that stay at the factor or above are the same
    spike (a warning at each would repeat until the median itself rose); the first one below ends it, and that
    call sets `recovered_after` to the spike's number of losses (None at every other call). A spike that does not
    recover is what resuming before it with its batches skipped is for (train.skip_steps)."""

    def __init__(self, factor: float, window: int = 100):
        self.factor, self.window, self.recent = factor, window, []
        self.spike_losses, self.recovered_after = 0, None

    def seen(self, loss: float) -> float | None:
        self.recovered_after = None
        if not math.isfinite(loss):
            return None
        ratio = None
        if self.factor and len(self.recent) == self.window:
            median = sorted(self.recent)[self.window // 2]
            ratio = loss / median if median > 0 and loss >= self.factor * median else None
        self.recent = (self.recent + [loss])[-self.window:]
        if ratio is None and self.spike_losses:
            self.recovered_after, self.spike_losses = self.spike_losses, 0
        elif ratio is not None:
            self.spike_losses += 1
            return ratio if self.spike_losses == 1 else None
        return ratio


class StepClock:
    """The mean wall time of the training steps since the last log line: every step of the interval counts,
    not only the one that logs (the others' time, and what ran between steps, went unreported), and the time of
    what the `paused()` blocks ran (checkpoint saves, held-out evaluation, reconstruction grids) is left out, as
    Megatron-LM's interval timer leaves it out, so that samples/s, TFLOP/s and MFU describe training. The time
    of the `waiting()` blocks (a step waiting for its input) counts in the step and is reported apart too:
    training that waits on its data shows there, not only as low throughput (torchtitan's data_loading_time)."""

    def __init__(self):
        self._restart()

    def _restart(self) -> None:
        self.start, self.steps, self.excluded, self.waited = time.perf_counter(), 0, 0.0, 0.0

    def step_done(self) -> None:
        self.steps += 1

    def paused(self):
        """A block whose time is left out of the steps'."""
        return self._timed("excluded")

    def waiting(self):
        """A block of a step waiting for its input: counted in the step, and apart."""
        return self._timed("waited")

    @contextlib.contextmanager
    def _timed(self, total: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, total, getattr(self, total) + time.perf_counter() - began)

    def interval(self) -> tuple[float, float]:
        """(the interval's mean step time, its mean time waiting for input); the next interval starts now."""
        steps = max(self.steps, 1)
        times = ((time.perf_counter() - self.start - self.excluded) / steps, self.waited / steps)
        self._restart()
        return times

    def seconds_per_step(self) -> float:
        """The interval's mean step time; the next interval starts now."""
        return self.interval()[0]

    def rates(self, batch: int, unit: str) -> dict[str, float]:
        """{'<unit>_per_s': `batch` over the interval's mean step time, 'data_wait_pct': the share of it spent
        waiting for input, the most of any rank's, and 'data_wait_pct_rank': that rank (`max_over_ranks`: every rank
        calls this)} (the image trainers' log columns); the next interval starts now."""
        elapsed, waited = self.interval()
        return {f"{unit}_per_s": batch / elapsed,
                **max_over_ranks({"data_wait_pct": 100 * waited / elapsed}, ranked=("data_wait_pct",))}


class MetricsLogger:
    """`wandb_project` (empty: no W&B): the same scalars as TensorBoard (train/<name> or valid/<name>, at the step) go
    to that W&B project too, under `run_name` (default: the run directory's name), with `config` (the resolved
    config) as the run's config. The mode is `wandb_mode()`'s; an online start that cannot reach the server within
    WANDB_INIT_TIMEOUT (W&B's default: 90 s) falls back to offline, said in one line. W&B writes under
    run_dir/wandb/; where a run is offline, the line at the start says the `wandb sync` command that uploads it.
    Only the enabled logger (rank 0) starts a W&B run. With `run_id` (the training run's, kept over resumes) every
    segment of a preempted and requeued run logs to the one W&B run of that id (`resume="allow"`); offline, each
    segment leaves a folder of that id and `wandb sync` uploads them into one run, in order. Steps a killed segment
    logged after its last checkpoint keep those first values there (W&B takes each step once; a resume on the same
    layout gives the same losses) while metrics.jsonl and TensorBoard hold the rerun's (`resumed_at`). A run
    directory copied to branch an experiment keeps the run's id (its checkpoints carry it), so the branch would log
    into the original's W&B run: give the branch another W&B project."""

    def __init__(self, run_dir: str | Path, enabled: bool, *, wandb_project: str = "", run_name: str | None = None,
                 config: dict | None = None, run_id: str | None = None):
        self.enabled = enabled
        self.log = logging.getLogger("parti")
        self.wandb = None
        if not enabled:
            return
        if not self.log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            self.log.addHandler(handler)
            self.log.setLevel(logging.INFO)
            self.log.propagate = False
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.tb, self.purge_step = run_dir, None, None  # (TensorBoard's writer: at the first step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_project:
            self.wandb = self._start_wandb(run_dir, wandb_project, run_name or run_dir.resolve().name, config, run_id)

    def _start_wandb(self, run_dir: Path, project: str, name: str, config: dict | None, run_id: str | None):
        # Imported here: W&B is optional and its import takes ~0.7 s, paid only by runs that ask for it.
        import wandb

        mode = wandb_mode()
        # silent: W&B's own banner and closing summary stay out of the output, this logger's lines say what matters.
        start = {"project": project, "name": name, "config": config, "dir": str(run_dir),
                 "settings": wandb.Settings(silent=True)}
        if run_id:
            start.update(id=run_id, resume="allow")
        try:
            run = wandb.init(mode=mode, **start)
        except wandb.errors.Error as e:  # online, but the server cannot be reached, refuses the key or the id
            if mode != "online":
                raise
            self.log.info(f"W&B: online start failed ({str(e).splitlines()[0]}); logging offline instead")
            mode = "offline"
            run = wandb.init(mode=mode, **start)
        if mode == "offline":
            where = Path(run.dir).parent  # run_dir/wandb/offline-run-<time>-<id>; run.dir is its files/
            every = where.parent / f"offline-run-*-{run.id}"  # (this segment's and the earlier ones')
            self.log.info(f"W&B: offline run in {where}; upload it with: wandb sync {every if run_id else where}")
        elif mode == "online":
            self.log.info(f"W&B: {run.url}")
        return run

    def resumed_at(self, step: int) -> None:
        """A run (re)starting at `step` (its checkpoint's; 0 without one) trains the steps after it again: the rows
        a killed segment logged for them go, from metrics.jsonl (rewritten; a line cut short by the kill too)
        and from TensorBoard (purge_step), so that every step appears once."""
        if not self.enabled:
            return
        path = self.run_dir / "metrics.jsonl"
        self.jsonl.close()
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _logged_step(line) <= step]
        write_atomic(path, "".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a", buffering=1)
        self.purge_step = step + 1

    def info(self, message: str) -> None:
        if self.enabled:
            self.log.info(message)

    def step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/inf: a non-finite value is written as null (the printed line still shows it).
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        self.jsonl.write(json.dumps(clean) + "\n")
        step = metrics["step"]
        scalars = {f"valid/{k[6:]}" if k.startswith("valid_") else f"train/{k}": v
                   for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.purge_step)
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        parts = [f"step {step}"] + [f"{k} {format(v, _FORMATS.get(k, '.4g' if isinstance(v, float) else ''))}"
                                    for k, v in metrics.items() if k != "step" and v is not None]
        self.log.info(" | ".join(parts))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                import wandb

                self.wandb.finish()
                # finish() can return before W&B's service process has written the run's .wandb file out (wandb
                # 0.31, offline: seen 7 bytes long); teardown waits for it, so the run is complete on disk for
                # `wandb sync` even if this process is killed next. A later wandb.init starts a new service.
                wandb.teardown()
                self.wandb = None
