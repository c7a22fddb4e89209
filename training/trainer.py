"""The training loop behind `python -m training.train` (training/train.py: the command line, the run directory's
rules): Trainer builds the layout, model, DeepSpeed engine, data and logger for a run directory, resumes it,
steps it and saves it; `train(cfg, run_dir, resume)` does all of that and returns the losses.

    from training.trainer import train, Trainer
    losses = train(cfg, "runs/x", resume="auto")      # in every rank of a process group (torchrun)
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state as ps

from common import metrics
from common.checkpoints import CheckpointError, RunDirError, RunLock, step_of, tag_for
from common.collection import StepCollection
from common.config import ConfigError, save_config, to_dict
from common.files import write_atomic
from common.preemption import StopRequest
from data_pipeline.code_shards import data_tokenizers
from data_pipeline.loader import CaptionDrop, ReadAhead, StepPositions, rank_micro_batch_ids, read_micro_batch
from data_pipeline.sampler import GlobalBatchSampler
from data_pipeline.training_data import held_out_sets, training_dataset
from model_parallel.kernels import select_kernels
from model_parallel.state import (
    destroy_groups,
    init_distributed,
    init_parallel,
    process_groups,
    seed_everything,
    use_device,
)
from training import checkpoint, engine
from training.checkpoint import set_aside
from training.config import Config, batch_ramp, format_changes, layout_of, step_ranges
from training.deepspeed_glue import NonFiniteStop, params_norm, set_global_batch
from training.ema import averaged_weights, ema_decay_after, saved_ema_decay, start_ema, update_ema
from training.flops import enable_tf32, peak_flops, train_flops_per_sample
from training.profiling import StepProfiler
from training.resume_plan import plan_resume
from training.text_encoder import load_text_encoder


def caption_drop(cfg: Config) -> CaptionDrop:
    """The run's caption drops (classifier-free guidance): a pure function of (train.seed, stream position)."""
    m = cfg.model
    return CaptionDrop(cfg.train.seed, m.caption_drop_prob, m.text_pad_id, m.text_eos_id)


def rank_micro_batches(cfg: Config, dataset, sampler, consumed: int, dp_rank: int, dp_size: int):
    """This DP rank's micro-batches (engine.MicroBatch) of the global batch starting at `consumed`, with the
    caption drops of classifier-free guidance, read now: the synchronous reference for what the trainer's
    read-ahead (`open_reader`) gives."""
    drop = caption_drop(cfg)
    for ids in rank_micro_batch_ids(sampler, consumed, dp_rank, dp_size, cfg.train.micro_batch_size):
        yield engine.MicroBatch(*read_micro_batch(dataset, ids, drop))


def held_out_micro_batches(cfg: Config, dataset, batch: int, dp_rank: int, dp_size: int, read: bool = True) -> list:
    """This DP rank's micro-batches (engine.MicroBatch) of held-out global batch `batch` (0 .. train.eval_batches
    - 1), read now: the first eval_batches x global_batch_size positions of a seeded order over the whole held-out
    set (the same samples every time, spread over a blend's folders by their weights, which lay them out one after
    the other), split over the ranks as training's are, with their captions (no caption drop: the loss measured
    is the conditional one). Without `read` (a rank that reads no samples: engine.sample_role), their positions
    only, text and codes None."""
    t, m = cfg.train, cfg.model
    sampler = GlobalBatchSampler(len(dataset), t.global_batch_size, t.seed)
    whole = CaptionDrop(t.seed, 0.0, m.text_pad_id, m.text_eos_id)
    ids = rank_micro_batch_ids(sampler, batch * t.global_batch_size, dp_rank, dp_size, t.micro_batch_size)
    if not read:
        return [engine.MicroBatch(None, None, i[:, 0].contiguous()) for i in ids]
    return [engine.MicroBatch(*read_micro_batch(dataset, i, whole)) for i in ids]


def held_out_losses(train_engine, cfg: Config, held_out: dict, role: str, dp_rank: int, dp_size: int,
                    device: str) -> dict[str, float]:
    """{set name: the loss of the engine's weights on its held-out samples (train.eval_batches global batches of
    it)} for each set of `held_out` (data_pipeline.training_data.held_out_sets: '' for an unnamed one); `role`:
    engine.sample_role."""
    losses = {}
    for name, dataset in held_out.items():
        batches = [engine.eval_step(train_engine, cfg, engine.share_samples(
            cfg, held_out_micro_batches(cfg, dataset, b, dp_rank, dp_size, role == engine.READ), role, device),
            device) for b in range(cfg.train.eval_batches)]
        losses[name] = sum(batches) / len(batches)
    return losses


def open_reader(cfg: Config, dataset, sampler, consumed: int, steps: int, dp_rank: int, dp_size: int,
                device: str, read: bool = True) -> ReadAhead | StepPositions:
    """`steps` steps of this DP rank's micro-batches from `consumed` on, read ahead by data.workers processes
    (pinned memory on a GPU); the same micro-batches as rank_micro_batches, step by step. Without `read` (a rank
    that reads no samples: engine.sample_role), their positions only, from the sampler: no workers."""
    if not read:
        return StepPositions(sampler, consumed, steps, dp_rank, dp_size, cfg.train.micro_batch_size)
    d = cfg.data
    return ReadAhead(dataset, sampler, consumed, steps, dp_rank, dp_size, cfg.train.micro_batch_size,
                     caption_drop(cfg), workers=d.workers, read_ahead_steps=d.read_ahead_steps,
                     pin_memory=device == "cuda")


OVERWRITTEN_BY = "OVERWRITTEN_BY"
"""The run directory's record of the SLURM job whose `--resume overwrite` started the run in it."""


def decide_on_rank0(decide):
    """Run `decide()` on rank 0 and return its result on every rank; its ConfigError/RunDirError (or any
    other failure) is raised on every rank, so that no rank waits for the others in a collective."""

    outcome, error = None, None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except (ConfigError, RunDirError) as e:
            outcome, error = (type(e).__name__, str(e)), e
        except Exception as e:
            outcome, error = ("RuntimeError", f"rank 0 failed: {type(e).__name__}: {e}"), e
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if error is not None:
        raise error
    if kind != "ok":
        classes = {"ConfigError": ConfigError, "RunDirError": RunDirError, "CheckpointError": CheckpointError}
        raise classes.get(kind, RuntimeError)(value)
    return value


def last_trained_step(steps: int, skip_spans: list[tuple[int, int]]) -> int:
    """The last of steps 1..`steps` that train.skip_steps (its sorted `skip_spans`) does not read past; 0: none."""
    step = steps
    for first, last in reversed(skip_spans):
        if first <= step <= last:
            step = first - 1
    return step


def held_out_columns(held_out: dict[str, float] | None, held_out_ema: dict[str, float] | None) -> dict[str, float]:
    """A metrics row's held-out losses (metrics.held_out_row), of the weights and of their moving average
    (ema_valid_loss...), where measured."""
    return {**(metrics.held_out_row(held_out) if held_out else {}),
            **({f"ema_{k}": v for k, v in metrics.held_out_row(held_out_ema).items()} if held_out_ema else {})}


class Trainer:
    """One run: process groups, model, engine, data order, and the loop that steps, logs and saves.
    `resume`: auto | none | overwrite (see the module docstring); the decision and every refusal come
    before anything is written to the run directory."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: str = "auto"):
        self.device = use_device(cfg.train.device, "train.device")  # before anything touches CUDA
        init_distributed(cfg.train.dist_timeout_minutes)
        self.world = dist.get_world_size()
        cfg.validate(world_size=self.world)  # before any work: a layout that does not fit is refused
        self.layout = layout_of(cfg, self.world)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # data that does not fit the model is refused before anything is written
        self.dataset = training_dataset(cfg.data, cfg.model, cfg.train.seed)
        t = cfg.train
        self.held_out = (held_out_sets(cfg.data, cfg.model, t.seed, t.eval_batches * t.global_batch_size,
                                       data_tokenizers(self.dataset)) if t.eval_interval else None)
        self.lock = RunLock(self.run_dir)
        self.log, self.reader, self.background = None, None, None
        # Installed before the build and the resume (minutes at scale): a stop asked for meanwhile is noted
        # and honoured before the first step (StopRequest.start), instead of killing the process unsaved.
        self.stop = StopRequest(self.run_dir / "STOP", cfg.train.exit_after_minutes)
        try:
            self.plan = decide_on_rank0(lambda: (self.lock.acquire(), plan_resume(cfg, self.run_dir, resume,
                                                                                  data_tokenizers(self.dataset)))[1])
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, layout = self.cfg, self.layout
        init_parallel(layout.tp, layout.pp, cfg.train.dist_timeout_minutes)
        self.groups_before = process_groups()  # the groups DeepSpeed makes for this run are destroyed by close()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), layout.dp
        self.role = engine.sample_role()  # whether this rank reads its samples, receives them or takes none
        rank0 = dist.get_rank() == 0
        moved = set_aside(self.run_dir) if rank0 and self.plan.set_aside else None
        if rank0 and self.plan.overwrite and os.environ.get("SLURM_JOB_ID"):
            # slurm/train.sbatch reads it: a requeued segment of this job continues the new run (--resume auto),
            # while one requeued before this point asks for the overwrite again.
            write_atomic(self.run_dir / OVERWRITTEN_BY, os.environ["SLURM_JOB_ID"] + "\n")
        self.log = metrics.MetricsLogger(self.run_dir, enabled=rank0, wandb_project=cfg.train.wandb_project,
                                         config=to_dict(cfg), run_id=self.plan.run_id)
        if self.lock.warning:
            self.log.info(self.lock.warning)
        if moved:
            self.log.info(f"--resume overwrite: moved the previous run's files to {moved}")
        for message in self.plan.messages:
            self.log.info(message)
        if rank0 and self.plan.path is None:  # (a resumed run's: once its checkpoint has loaded, in resume())
            self._write_config()

        seed_everything(cfg.train.seed)
        kernels = select_kernels(cfg.kernels)
        self.log.info(kernels.summary())
        if cfg.train.precision == "bf16" and cfg.parallel.zero_stage == 0:
            self.log.info("note: bf16 with parallel.zero_stage=0 accumulates and reduces gradients in bf16 "
                          "(DeepSpeed); ZeRO stages 1-3 keep them in fp32")
        if self.device == "cuda" and cfg.train.precision == "fp32":
            enable_tf32()
        self.peak_flops, peak_source = peak_flops(cfg.train.precision, cfg.train.peak_tflops)
        self.log.info(f"MFU against {peak_source}")
        loaded = bool(self.plan.path or self.plan.init_from)  # (every weight comes from a checkpoint)
        model = engine.build_model(cfg, kernels, self.device, layout, initialize=not loaded)
        if cfg.model.init_text_encoder and self.plan.path is None:  # (a resumed run has its checkpoint's weights)
            load_text_encoder(model, cfg.model, cfg.model.init_text_encoder,
                              (data_tokenizers(self.dataset) or {}).get("text_tokenizer"))
            self.log.info(f"text encoder warm-started from {cfg.model.init_text_encoder}"
                          + ("; frozen (model.freeze_text_encoder)" if cfg.model.freeze_text_encoder else ""))
        seed_everything(cfg.train.seed)  # building may have reseeded (per-piece init seeds)
        self.engine, self.nonfinite_guard = engine.build_engine(model, cfg, kernels, layout)
        if self.plan.init_from:
            checkpoint.load_weights(self.engine, cfg, self.plan.init_from)
        if cfg.train.ema_decay:  # (from the weights just built or loaded; a resume loads the checkpoint's)
            start_ema(self.engine)
        metrics.reset_peak_memory()
        self.background = checkpoint.BackgroundSaves() if cfg.train.async_save else None
        t = cfg.train
        self.profiler = StepProfiler(self.run_dir, t.profile_step, t.profile_steps, dist.get_rank(),
                                     enabled=rank0 or t.profile_all_ranks, cuda=self.device == "cuda")
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.train.global_batch_size, cfg.train.seed,
                                          ramp=batch_ramp(cfg.train))
        self.step, self.consumed = 0, 0
        self.ema_updates = 0  # (the moving average's updates since it started: train.ema_warmup's count)
        self.log.info(f"layout: {layout.describe()}; "
                      f"{sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()):,} parameters on rank 0")

    def _write_config(self) -> None:
        """config.yaml (this segment's config) and config_history/segment_<n>_step_<s>.yaml, written once the
        checkpoint's config has been checked: the history keeps what every segment of the run ran with."""
        plan, history = self.plan, self.run_dir / "config_history"
        n = len(list(history.glob("segment_*.yaml"))) + 1 if history.is_dir() else 1
        source = (f"a branch of {plan.path}" if plan.branch else f"resumed from checkpoints/{plan.path.name}"
                  if plan.path else "started at step 0")
        lines = [f"segment {n} of run {plan.run_id}: {source}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"]
        for kind in ("applied", "warned", "noted"):
            if plan.changes.get(kind):
                lines.append(f"changed ({kind}): {format_changes(plan.changes[kind])}")
        save_config(self.cfg, history / f"segment_{n:03d}_step_{plan.step:08d}.yaml", header="\n".join(lines))
        save_config(self.cfg, self.run_dir / "config.yaml")

    def resume(self) -> None:
        """Load the checkpoint the plan chose (nothing when it chose none), then write this segment's config:
        a checkpoint that fails to load leaves the run directory as it was."""
        if self.plan.path:
            state = checkpoint.load(self.engine, self.cfg, self.layout, self.plan.path, branch=self.plan.branch)
            if dist.get_rank() == 0:
                self._write_config()
            self.step, self.consumed = state["step"], state["consumed_samples"]
            self._ema_after_resume(saved_ema_decay(state), state.get("ema_updates", self.step))
            self.nonfinite_guard.skipped = state.get("skipped_steps", 0)
            # (the steps skipped in a row up to the checkpoint: a run requeued more often than
            # train.max_skipped_steps steps would otherwise never stop)
            self.nonfinite_guard.consecutive = state.get("consecutive_skipped_steps", 0)
            order = state.get("sampler", {}).get("order", "randperm")  # (runs begun before orders were recorded)
            if order != self.sampler.order:  # a run keeps the sample order it began with
                self.sampler = GlobalBatchSampler(len(self.dataset), self.cfg.train.global_batch_size,
                                                  self.cfg.train.seed, order, self.sampler.ramp)
            self.log.info(f"resumed from {self.plan.path} at step {self.step}; "
                          f"lr now {self.engine.get_lr()[0]:.3e}")
            if state["rng_note"]:
                self.log.info(state["rng_note"])
            saved_len = state.get("sampler", {}).get("dataset_len")
            if saved_len not in (None, len(self.dataset)):  # e.g. shards added to the folder data.shards names
                self.log.info(f"warning: the training data holds {len(self.dataset):,} samples, {saved_len:,} when "
                              f"{self.plan.path.name} was saved: the sample order from step {self.step} on is that "
                              "of the new data (samples of this epoch may repeat or be skipped)")
        self.log.resumed_at(self.step)  # (the steps after it are trained again: their old rows go)
        self._reader_at(self.consumed)  # reading ahead starts here, at the resumed position

    def _ema_after_resume(self, saved_decay: float, saved_updates: int) -> None:
        """A resume that starts or stops keeping the average of the weights (train.ema_decay) says so; one that
        starts it starts from the checkpoint's weights (its checkpoint holds none), one that goes on with it goes on
        counting its updates from the checkpoint's (`saved_updates`: its step where it saved no count)."""
        decay = self.cfg.train.ema_decay
        self.ema_updates = saved_updates if decay and saved_decay else 0
        if decay and not saved_decay:
            start_ema(self.engine)
            self.log.info(f"{self.plan.path} holds no moving average of the weights: train.ema_decay={decay}'s "
                          f"starts from its weights at step {self.step}")
        elif saved_decay and not decay:
            self.log.info(f"note: {self.plan.path} holds a moving average of the weights (train.ema_decay="
                          f"{saved_decay}); train.ema_decay=0 leaves it behind: this run's checkpoints hold none")

    def _reader_at(self, consumed: int) -> ReadAhead | StepPositions:
        """The read-ahead for the steps left from `consumed` on: the open one when it is there, else a new one
        (on a rank that reads no samples, engine.sample_role, one that gives their positions only)."""
        if self.reader is None or self.reader.consumed != consumed:
            if self.reader is not None:
                self.reader.close()
            self.reader = None
            self.reader = open_reader(self.cfg, self.dataset, self.sampler, consumed,
                                      max(0, self.cfg.train.steps - self.step), self.dp_rank, self.dp_size, self.device,
                                      read=self.role == engine.READ)
        return self.reader

    def _with_samples(self, micro_batches) -> list[engine.MicroBatch]:
        """One step's micro-batches as this rank's model takes them: the samples its TP group's rank 0 read, on
        every rank of the group (engine.share_samples); positions only on a middle pipeline stage."""
        return engine.share_samples(self.cfg, [engine.MicroBatch(*mb) for mb in micro_batches], self.role,
                                    self.device)

    def save(self) -> None:
        state = {"step": self.step, "consumed_samples": self.consumed,
                 "sampler": self.sampler.state_dict(self.consumed),
                 "skipped_steps": self.nonfinite_guard.skipped,
                 "consecutive_skipped_steps": self.nonfinite_guard.consecutive, "run_id": self.plan.run_id,
                 "ema_updates": self.ema_updates, "save_id": uuid.uuid4().hex,  # (which save of the step's tag)
                 "data_tokenizers": data_tokenizers(self.dataset)}
        self.complete_saves(wait=True)  # one save in flight at a time
        tag = checkpoint.save(self.engine, self.cfg, self.layout, self.run_dir, self.step, state,
                              self.cfg.train.retention(), self.background)
        where = self.run_dir / "checkpoints" / tag
        self.log.info(f"saving {where} in the background" if self.background else f"saved {where}")

    def complete_saves(self, wait: bool = False) -> None:
        """With train.async_save: complete the background saves every rank has written (all when `wait`)."""
        for path in self.background.poll(wait) if self.background else []:
            self.log.info(f"saved {path}")

    def close(self) -> None:
        """Release the run directory (the lock; the logger if `run` did not), stop the data workers, destroy the
        process groups DeepSpeed made for this run. The lock is released even when a step of this fails."""
        try:
            if getattr(self, "profiler", None) is not None:  # (a run failed inside the traced steps)
                self.profiler.close()
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            if self.background is not None:  # (a save still in flight here was not waited for: the run failed)
                self.background.close(abort=True)
                self.background = None
            if self.log is not None and not getattr(self, "_log_closed", False):
                self.log.close()
                self._log_closed = True
            if getattr(self, "groups_before", None) is not None:  # (a process that trains again must not keep them)
                destroy_groups(process_groups() - self.groups_before)
                self.groups_before = None
            checkpoint.wait_for_pruning()  # (the run directory is this run's until its old checkpoints are gone)
        finally:
            self.stop.restore()
            self.lock.release()

    def held_out_loss(self, averaged: bool = False) -> dict[str, float]:
        """held_out_losses of the weights now, or (`averaged`) of their moving average (train.ema_decay)."""
        with averaged_weights(self.engine) if averaged else contextlib.nullcontext():
            return held_out_losses(self.engine, self.cfg, self.held_out, self.role, self.dp_rank, self.dp_size,
                                   self.device)

    def _read_past(self, reader: ReadAhead | StepPositions) -> bool:
        """Whether the next step is one of train.skip_steps; if so, its global batch is read past untrained (the
        weights, optimizer, LR schedule and non-finite count stay), and the log says so at the first step of the
        range that this segment takes."""
        step = self.step + 1
        span = next(((a, b) for a, b in self.skip_spans if a <= step <= b), None)
        if span is None:
            return False
        reader.next_step()
        if span not in self._spans_told:
            self._spans_told.add(span)
            last = min(span[1], self.cfg.train.steps)
            steps = (f"steps {step}-{last}: their global batches are" if last > step
                     else f"step {step}: its global batch is")
            self.log.info(f"{steps} read past without training (train.skip_steps={self.cfg.train.skip_steps})")
        return True

    def _warn_of_a_spike(self, loss: float, ratio: float | None, recovered_after: int | None = None) -> None:
        """A loss spike's warning (metrics.LossSpikes: `ratio` times the recent median, at its first step) on rank 0,
        with what would resume before it without its batches; its end (`recovered_after` steps above the factor) is
        noted. (Called before the step is counted: its number is self.step + 1.)"""
        step = self.step + 1
        if recovered_after and self.log.enabled:
            self.log.info(f"the loss spike of step {self._spike_step} is over: loss {loss:.4f} at step {step} is below "
                          f"train.loss_spike_factor={self.cfg.train.loss_spike_factor} times the recent median, after "
                          f"{recovered_after} step(s) at or above it")
        if ratio is None or not self.log.enabled:
            return
        self._spike_step = step
        # (those before the spike only: a resume from an earlier checkpoint leaves the later ones of the
        # trajectory it abandoned in the run directory)
        saved = [s for s in map(step_of, checkpoint.complete_tags(self.run_dir)) if s < step]
        resume = (f"if it does not recover, resume from checkpoints/{tag_for(saved[-1])} (the newest one saved) with "
                  f"--set train.skip_steps={saved[-1] + 1}-{step} (its batches read past untrained, or a shorter range "
                  "just before the spike, as PaLM did)" if saved else "no checkpoint is saved yet")
        self.log.info(f"warning: loss {loss:.4f} at step {step} is {ratio:.2f}x the median of the previous 100 steps "
                      f"(train.loss_spike_factor={self.cfg.train.loss_spike_factor}): a loss spike; {resume}")

    def _write_profile(self) -> None:
        """After the last traced step (train.profile_step): write the traces and say where."""
        files = self.profiler.end(self.step, run_ends=self.step == self.cfg.train.steps)
        if files:
            self.log.info(f"profile of steps {self.profiler.first}-{self.profiler.last} in {files[0].parent}: "
                          f"{files[0].name} (a Chrome trace: ui.perfetto.dev opens it), top operators in "
                          f"{files[1].name}")

    def log_step(self, loss: float, lr: float, grad_norm: float | None, elapsed: float, waited: float,
                 held_out: dict[str, float] | None = None, held_out_ema: dict[str, float] | None = None,
                 samples: int | None = None, mean_samples: float | None = None) -> None:
        """The step's loss, LR and gradient norm; throughput from `elapsed`, the mean step time of the interval, and
        the share of it spent waiting for the step's input (`waited`, its mean: metrics.StepClock), for a step of
        `samples` (default: train.global_batch_size) and the interval's steps of `mean_samples` on average (default:
        `samples`; they differ where train.rampup_batch_size grew the batch inside the interval); the held-out
        losses of the weights and of their moving average (ema_valid_loss...) when measured."""
        m, gbs = self.cfg.model, samples or self.cfg.train.global_batch_size
        per_step = mean_samples or gbs  # (the interval's: its mean step time is over all of its steps)
        tflops = train_flops_per_sample(m) * per_step / elapsed / self.world / 1e12
        peak = self.peak_flops
        self.log.step({
            "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "params_norm": params_norm(self.engine),
            "samples_per_s": per_step / elapsed,
            "tokens_per_s": per_step * (m.text_seq_len + m.image_seq_len) / elapsed,
            "tflops_per_gpu": tflops, "mfu": tflops * 1e12 / peak if peak else None,
            **metrics.max_over_ranks({"data_wait_pct": 100 * waited / elapsed, **metrics.memory_gb()},
                                     ranked=("data_wait_pct", "mem_gb")),
            "skipped_steps": self.nonfinite_guard.skipped, "world_size": self.world,
            "consumed_samples": self.consumed, "global_batch_size": gbs,
            **held_out_columns(held_out, held_out_ema),
        })

    def run(self) -> list[float]:
        """Step until train.steps; return this call's per-step losses (NaN for a step not trained: skipped as
        non-finite or by train.skip_steps). Raises Preempted after saving
        when SIGUSR1/SIGTERM arrived, RuntimeError after too many non-finite steps in a row."""

        t, guard = self.cfg.train, self.nonfinite_guard
        stop, losses, collection = self.stop, [], StepCollection(t.gc_interval)
        self.skip_spans, self._spans_told = step_ranges(t.skip_steps, "train.skip_steps"), set()
        last_trained = last_trained_step(t.steps, self.skip_spans)  # (logged: the interval up to it is the run's last)
        spikes = metrics.LossSpikes(t.loss_spike_factor)
        try:
            stop.start(self.run_dir, self.step, t.steps)
            if t.profile_step and not self.step < t.profile_step <= t.steps:
                self.log.info(f"note: train.profile_step={t.profile_step} is not among the steps this run takes "
                              f"({self.step + 1}-{t.steps}): nothing is traced")
            reader = self._reader_at(self.consumed) if self.step < t.steps else None
            clock = metrics.StepClock()  # (throughput over the log interval's steps, saves and evaluation left out)
            interval_samples = []  # (the sizes of the interval's trained steps: train.rampup_batch_size changes them)
            while self.step < t.steps:
                lr = self.engine.get_lr()[0]
                self.profiler.begin(self.step + 1)
                with clock.paused():
                    trains = not self._read_past(reader)  # (a step of train.skip_steps)
                samples = self.sampler.batch_size_at(self.consumed)  # (less while train.rampup_batch_size ramps up)
                if trains:
                    with clock.waiting():
                        batches = self._with_samples(reader.next_step())  # read ahead while training
                    set_global_batch(self.engine, samples)
                    loss, grad_norm = engine.train_step(self.engine, self.cfg, batches, self.device)
                    if not guard.step_done() and t.ema_decay:  # (a step skipped as non-finite changed nothing)
                        update_ema(self.engine, ema_decay_after(self.ema_updates, t.ema_decay, t.ema_warmup))
                        self.ema_updates += 1
                    self._warn_of_a_spike(loss, spikes.seen(loss), spikes.recovered_after)
                losses.append(loss if trains else float("nan"))
                self.step += 1
                self.consumed += samples
                collection.step_done(self.step)  # (in the step's time: every step's share of collecting)
                if trains:  # (a skipped step's reading was left out of the interval's time and steps)
                    clock.step_done()
                    interval_samples.append(samples)
                with clock.paused():
                    self._write_profile()
                evaluate = t.eval_interval and (trains and self.step % t.eval_interval == 0 or self.step == t.steps)
                with clock.paused():  # (also before a stop's save: a resumed run starts after this step)
                    held_out = self.held_out_loss() if evaluate else None
                    held_out_ema = self.held_out_loss(averaged=True) if evaluate and t.ema_decay else None
                if trains and (self.step % t.log_interval == 0 or self.step == last_trained or held_out is not None):
                    self.log_step(loss, lr, grad_norm, *clock.interval(), held_out, held_out_ema, samples,
                                  sum(interval_samples) / len(interval_samples))
                    interval_samples.clear()
                elif held_out is not None:  # (the last step, read past: the final weights' loss, in a row of its own)
                    self.log.step({"step": self.step, **held_out_columns(held_out, held_out_ema),
                                   "consumed_samples": self.consumed})
                NonFiniteStop.check(self.step, guard.consecutive, t.max_skipped_steps)
                with clock.paused():  # (a background save's finishing is a save's, left out of the step times)
                    self.complete_saves()
                preempted = stop.requested()
                if preempted or (t.save_interval and self.step % t.save_interval == 0) or self.step == t.steps:
                    with clock.paused():
                        self.save()
                        self.complete_saves(wait=preempted or self.step == t.steps)
                if preempted:  # REQUEUE tells a SLURM script (slurm/train.sbatch) to requeue; raises Preempted
                    stop.leave_for_requeue(self.run_dir, self.step, last=self.step == t.steps)
        finally:
            collection.close()
            self.close()  # (the stop handlers restored too)  # the run is over: logger closed, run directory released
        return losses


def train(cfg: Config, run_dir: str | Path, resume: str = "auto") -> list[float]:
    """Run cfg.train.steps steps (or what is left of them after a resume); return their losses.
    resume: auto | none | overwrite (module docstring)."""
    trainer = Trainer(cfg, run_dir, resume)
    try:
        trainer.resume()
        return trainer.run()
    finally:
        trainer.close()
