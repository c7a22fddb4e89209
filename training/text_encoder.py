r"""Text-encoder warm start: masked-token pre-training of Parti's text encoder, and loading it into a Parti run.

    torchrun --nproc_per_node 2 -m training.text_encoder --config configs/train/debug.yaml --run-dir runs/textenc \
        [--text-files captions.txt --text-tokenizer tok/spm.model [--valid-text-files held_out.txt]] \
        [--set parallel.tp=2 train.steps=1000 train.eval_interval=500 ...] [--resume auto|none]
    torchrun ... -m training.train ... --set model.init_text_encoder=runs/textenc/text_encoder \
        [model.freeze_text_encoder=true]

Parti warm-starts its text encoder with a BERT-style masked-language-model objective. The encoder here is built
from PartiModel's own pieces (text embedding, encoder layers, encoder norm: megatron-core tensor-parallel layers
on the run's TP group, each seeded as PartiModel seeds it), with a head tied to the token embedding
(vocab-parallel logits: an exact cross-entropy at any TP). It trains on captions: the run's data (data.shards
code shards, or data.synthetic), or --text-files (one caption per line, tokenized with --text-tokenizer); with
train.eval_interval it measures the masked-token loss on held-out captions (data.valid_shards, or
--valid-text-files), logged as valid_loss (and valid_loss_<name> for named sets: training/captions.py).
Masking as BERT's: 15% of each caption's tokens before its EOS are chosen (at least one); 80% of those become
the mask id (BOS, which captions never use), 10% a random word, 10% stay; the loss is the cross-entropy at the
chosen positions. Masks come from a generator keyed by (train.seed, step): the same on every rank; the
residual dropout (model.dropout) is keyed by each caption's position in the sample stream, as in the trainer,
so a run with dropout gives the same losses at any TP/DP layout. The other
ranks of the world are data parallel (DDP over megatron-core's data-parallel group, each its slice of every
global batch); AdamW with the run's train.lr schedule, weight decay and TP-aware gradient clipping, in
train.precision (bf16: autocast, fp32 weights and optimizer state); a step with non-finite gradients is skipped
and counted (train.max_skipped_steps in a row stop the run), as in the Parti trainer. A run's config serves
both commands: parallel.pp, zero_stage, activation_checkpointing and train.async_save do not apply here (the log
says so), train.optimizer must be adamw. A resume compares the configs as the Parti trainer does.

Output: <run-dir>/text_encoder/, the encoder's weights in dist_checkpointing's format under PartiModel's
parameter names (training/checkpoint.py's blocks) and config.json (the model section and the text tokenizer the
caption ids came from, written last: the folder is complete when it exists); metrics.jsonl and config.yaml in the
run directory. A Parti run with model.init_text_encoder=<that folder> loads them at its own TP/PP
(`load_text_encoder`) before its engine is built, refused when its code shards' text tokenizer is another (as is a
resume of the pre-training on captions of another tokenizer).

Checkpoints: <run-dir>/checkpoints/step_XXXXXXXX/ every train.save_interval steps and at the end (weights and
AdamW's moments in training/checkpoint.py's layout-independent blocks, trainer_state.json marking it complete,
`latest`, train.keep_checkpoints kept); a rerun continues from `latest` at whatever TP/DP it has (masks, data
order and dropout are keyed by step and position: the losses are those of an uninterrupted run).
SIGUSR1/SIGTERM or <run-dir>/STOP: finish the step, save, write REQUEUE, exit 75 (0 under torchrun;
common/preemption.py); on SLURM: TRAINER=training.text_encoder sbatch slurm/train.sbatch CONFIG RUN_DIR ...
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)

from common.checkpoints import (
    CheckpointError,
    RunDirError,
    check_steps_left,
    checkpoint_dir,
    failure_cause,
    has_checkpoints,
    holding_run_dir,
    one_line,
)
from common.cli import command, config_parser
from common.collection import StepCollection
from common.config import ConfigError, save_config, to_dict
from common.files import replace_folder, write_atomic
from common.metrics import MetricsLogger, StepClock, held_out_row
from common.preemption import StopRequest
from common.schedule import lr_lambda
from data_pipeline.errors import DataError
from data_pipeline.sampler import GlobalBatchSampler
from data_pipeline.text_tokenizer import BOS_ID, EOS_ID
from model_parallel.config import ModelConfig, saved_model_config
from model_parallel.kernels import select_kernels
from model_parallel.model import build_pieces, loss_cross_entropy, piece_context, text_mask
from model_parallel.pipeline import TEXT_ENCODER_PIECES, canonical_parameters, is_text_encoder
from model_parallel.state import DeviceError, init_parallel, seed_everything, use_device
from training.captions import caption_source, caption_tokenizer, held_out_captions
from training.checkpoint import (
    STATE_FILE,
    load_in_place,
    resume_tag,
    save_sections,
    sharded_blocks,
    verify,
    wait_for_pruning,
    write_blocks,
)
from training.config import Config, change_messages, format_changes, load_config, resume_changes
from training.deepspeed_glue import Fragment, NonFiniteStop, global_grad_norm
from training.engine import decay_groups

MASK_ID = BOS_ID
"""The mask token: BOS, reserved by the caption tokenizer and never in a caption (data_pipeline/text_tokenizer.py)."""
FIRST_WORD = EOS_ID + 1
"""Ids below are PAD/UNK/BOS/EOS: random replacements are drawn from the words from here on."""
OUTPUT = "text_encoder"
CHECKPOINT_KIND = "text_encoder_pretraining"
"""The `kind` of this command's checkpoints (training/checkpoint.py's trainer_state.json), which Parti's don't have."""
SHAPE_KEYS = ("hidden_size", "num_heads", "ffn_hidden_size", "encoder_layers", "text_vocab_size", "text_seq_len",
              "vocab_pad_multiple", "layernorm_eps")
"""What a pre-trained encoder and the run that loads it must agree on."""


class MaskedTextEncoder(nn.Module):
    """PartiModel's text encoder (its pieces, names and initialisation) with a tied masked-token head."""

    def __init__(self, cfg: ModelConfig, kernels=None, init_seed: int = 1234, tp_group=None):
        super().__init__()
        self.cfg = cfg
        ctx = piece_context(cfg, kernels, tp_group=tp_group)
        self.tp_group = ctx.tp_group
        self.cross_entropy = loss_cross_entropy(ctx)  # (kernels.cross_entropy, as the image-token loss's)
        build_pieces(self, ctx, init_seed, keep=lambda name: name.split(".")[0] in TEXT_ENCODER_PIECES)

    def forward(self, text_ids: torch.Tensor, targets: torch.Tensor, chosen: torch.Tensor,
                sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """Summed cross-entropy at the `chosen` positions ([b, T] bool) of the original ids `targets` [b, T] (the
        caller divides by the global batch's chosen count: a mean per micro-batch weighed micro-batches of few
        chosen tokens more, so the loss and the update changed with train.micro_batch_size).
        `sample_index` (int64 [b]): the captions' positions in the run's sample stream, which key the dropout
        masks (as in the trainer: the same masks at any layout)."""
        x = self.text_embedding(text_ids, sample_index)
        for layer in self.encoder:
            x = layer(x, text_mask(text_ids, self.cfg.text_pad_id), sample_index)
        x = copy_to_tensor_model_parallel_region(self.encoder_norm(x), group=self.tp_group)
        logits = nn.functional.linear(x, self.text_embedding.embed.weight)  # [T, b, V/tp], tied to the input table
        losses = self.cross_entropy(logits, targets.t().contiguous())  # [T, b], fp32
        return (losses * chosen.t().float()).sum()


def mask_tokens(text_ids: torch.Tensor, cfg: ModelConfig, generator: torch.Generator, first_row: int = 0,
                rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of captions [b, T]: (inputs, chosen). Words are the ids before each caption's EOS. The
    draws are made for a batch of `rows` (default b) of which these are rows first_row.. (a data-parallel
    rank's slice of the global batch: every rank draws the whole batch's, so the masks do not depend on DP)."""
    shape, own = (rows or len(text_ids), text_ids.shape[1]), slice(first_row, first_row + len(text_ids))
    draw, action = torch.rand(shape, generator=generator)[own], torch.rand(shape, generator=generator)[own]
    random_words = torch.randint(FIRST_WORD, cfg.text_vocab_size, shape, generator=generator)[own]
    words = torch.cumsum(text_ids == cfg.text_eos_id, dim=1) == 0
    words &= text_ids != cfg.text_pad_id
    chosen = (draw < 0.15) & words
    first = words.float().argmax(1)  # a caption with no word chosen gets its first word chosen
    none = ~chosen.any(1) & words.any(1)
    chosen[none, first[none]] = True
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(text_ids, MASK_ID), text_ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_words, inputs)
    return inputs, chosen




def pretrain(cfg: Config, run_dir: str | Path, text_files: list[str] | None = None,
             text_tokenizer: str | None = None, resume: str = "auto",
             valid_text_files: list[str] | None = None) -> list[float]:
    """Train the encoder to cfg.train.steps global batches, continuing from run_dir's latest checkpoint when
    there is one (resume="none": refused where there are checkpoints); write run_dir/text_encoder/; return this
    call's losses. With train.eval_interval, the held-out loss (training.captions.held_out_captions) is logged as
    valid_loss. Raises Preempted after saving when a stop was asked for (common/preemption.py)."""
    if cfg.model.decoder_only:
        raise ConfigError("model.arch=decoder_only has no text encoder to pre-train (its caption is the start of "
                          "the decoder's stream): use an encoder_decoder model section")
    if cfg.train.optimizer != "adamw":
        raise ConfigError(f"train.optimizer={cfg.train.optimizer}: the text encoder's pre-training trains with AdamW "
                          "(its checkpoints hold Adam's moments); set train.optimizer=adamw for this command")
    for name in ("text_pad_id", "text_eos_id"):  # (a [MASK] equal to EOS, or a random word equal to PAD, went unseen)
        value = getattr(cfg.model, name)
        if value >= FIRST_WORD or value == MASK_ID:
            raise ConfigError(f"model.{name}={value}: the masked-token pre-training keeps ids 0-{FIRST_WORD - 1} "
                              f"for PAD/UNK/BOS/EOS ({MASK_ID}, BOS, is its [MASK]) and draws random words from "
                              f"{FIRST_WORD} on; use the caption tokenizer's ids (data_pipeline/text_tokenizer.py)")
    if valid_text_files and not cfg.train.eval_interval:
        raise ConfigError("--valid-text-files needs train.eval_interval > 0 (steps between held-out losses)")
    if resume == "none" and has_checkpoints(run_dir):
        raise CheckpointError(f"--resume none: {checkpoint_dir(run_dir)} holds checkpoints; continue them with "
                              "--resume auto, or use another --run-dir")
    # (before CUDA is touched; a GPU asked for and missing is an error)
    device = use_device(cfg.train.device, "train.device")
    init_parallel(cfg.parallel.tp, 1, cfg.train.dist_timeout_minutes)
    # (first: a stop asked for while starting is kept)
    stop, losses = StopRequest(Path(run_dir) / "STOP", cfg.train.exit_after_minutes), []
    try:
        t, captions = cfg.train, caption_source(cfg, text_files, text_tokenizer, valid_text_files)
        held_out = held_out_captions(cfg, captions, valid_text_files) if t.eval_interval else {}
        run = _Pretraining(cfg, Path(run_dir), device, captions, held_out)
        valid_lines = held_out.get("")  # (--valid-text-files' CaptionLines, when given)
        for name, lines in (("--text-files", captions), ("--valid-text-files", valid_lines)):
            if getattr(lines, "left_out", 0):  # (CaptionLines: lines the tokenizer's normalisation empties)
                run.log.info(f"{name}: {lines.left_out:,} line(s) that tokenize to no piece left out")
        if getattr(valid_lines, "watched", 0):  # (captions common in the data, or held-out lines left among training)
            run.log.info(f"warning: --valid-text-files: {valid_lines.watched:,} of its {len(valid_lines):,} captions "
                         "are also lines of --text-files (trained on): the held-out loss is lower than on unseen "
                         "captions")
    except BaseException:
        stop.restore()
        raise
    collection = StepCollection(t.gc_interval)
    try:
        first = run.resume()
        stop.start(run.run_dir, first, t.steps)
        clock = StepClock()  # (throughput over the log interval's steps, saves and evaluation left out)
        for step in range(first, t.steps):
            lr = run.schedule.get_last_lr()[0]  # (this step's; step() moves it on)
            loss, norm = run.step(step)
            losses.append(loss)
            collection.step_done(step + 1)
            clock.step_done()
            evaluate = t.eval_interval and ((step + 1) % t.eval_interval == 0 or step + 1 == t.steps)
            with clock.paused():  # (also before a stop's save)
                valid = held_out_row({n: run.held_out_loss(c) for n, c in run.held_out.items()}) if evaluate else {}
            if (step + 1) % t.log_interval == 0 or step + 1 == t.steps or valid:
                run.log.step({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "skipped_steps": run.skipped,
                              "samples_per_s": t.global_batch_size / clock.seconds_per_step(),
                              "consumed_samples": run.consumed, **valid})
            NonFiniteStop.check(step + 1, run.consecutive, t.max_skipped_steps)
            preempted = stop.requested()
            if preempted or (t.save_interval and (step + 1) % t.save_interval == 0) or step + 1 == t.steps:
                with clock.paused():
                    run.save(step + 1)
            if preempted:
                stop.leave_for_requeue(run.run_dir, step + 1, last=step + 1 == t.steps)
        save_text_encoder(run.model, cfg.model, run.run_dir / OUTPUT, run.text_tokenizer)
        run.log.info(f"wrote {run.run_dir / OUTPUT} (load it with model.init_text_encoder={run.run_dir / OUTPUT})")
    finally:
        collection.close()
        stop.restore()
        run.log.close()
        wait_for_pruning()
    return losses


class _Pretraining:
    """The pre-training's model (DDP over the data-parallel group), AdamW, LR schedule and captions; one
    global batch per `step`; checkpoints of weights and Adam's moments in the layout-independent blocks of
    training/checkpoint.py (a run resumes at any TP/DP). Masks, data order and dropout are keyed by the step
    and the captions' positions, so a checkpoint needs no RNG state: only the position in the caption stream
    (consumed_samples, which a resume with another train.global_batch_size goes on from) and Adam's step count
    (the steps less those skipped)."""

    def __init__(self, cfg: Config, run_dir: Path, device, captions, held_out=None):
        t = cfg.train
        self.cfg, self.run_dir, self.device, self.captions, self.held_out = cfg, run_dir, device, captions, held_out
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        if t.global_batch_size % (t.micro_batch_size * self.dp_size):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                              f"train.micro_batch_size={t.micro_batch_size} x the {self.dp_size} data-parallel ranks")
        self.log = MetricsLogger(run_dir, enabled=dist.get_rank() == 0)
        for note in not_applied(cfg):
            self.log.info(note)
        self.bf16 = t.precision == "bf16"  # autocast: bf16 matmuls, fp32 weights, gradients and AdamW state
        self.skipped = self.consecutive = 0  # optimizer steps skipped for non-finite gradients (all / in a row)
        self.consumed = 0  # captions of the sample stream trained on (a resume with another batch size goes on there)
        seed_everything(t.seed)
        # megatron-core allocates its layers on the GPU when there is one, the embeddings and norms here on the CPU
        model = MaskedTextEncoder(cfg.model, select_kernels(cfg.kernels), t.seed, ps.get_tensor_model_parallel_group())
        self.model = model.to(device)
        self.params = list(self.model.parameters())
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, process_group=ps.get_data_parallel_group())
                    if self.dp_size > 1 else self.model)
        self.optimizer = torch.optim.AdamW(decay_groups(self.params, t.weight_decay), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
        self.sampler = GlobalBatchSampler(len(captions), t.global_batch_size, t.seed)
        self.schedule = None  # (made by resume, at the step it continues from)
        self.text_tokenizer = caption_tokenizer(captions)  # (what the caption ids mean: saved, checked on resume)

    def _masked_batch(self, captions, sampler, first: int, seed: int) -> list[torch.Tensor]:
        """This DP rank's rows of the global batch at position `first` of `sampler`'s order: [inputs, targets,
        chosen, positions] on the device, the masks drawn from `seed` for the whole global batch."""
        t, rank = self.cfg.train, self.dp_rank
        positions, mine = sampler.rank_batch(first, rank, self.dp_size)
        text = torch.stack([captions.at(int(i), int(p)) for p, i in zip(positions, mine)])
        generator = torch.Generator().manual_seed(seed)  # (masks drawn on the CPU: the same on any device)
        inputs, chosen = mask_tokens(text, self.cfg.model, generator, rank * len(mine), t.global_batch_size)
        # each caption's position in the sample stream keys its dropout masks: the same at any TP/DP layout
        return [x.to(self.device) for x in (inputs, text, chosen, positions)]

    def step(self, step: int) -> tuple[float, float]:
        """Global batch `step` (0-based): masked-token loss, clipped AdamW update; (mean loss, grad norm)."""
        t, device = self.cfg.train, self.device
        inputs, text, chosen, positions = self._masked_batch(self.captions, self.sampler, self.consumed,
                                                             t.seed * 1_000_003 + step)
        self.consumed += t.global_batch_size
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)  # (NCCL reduces device tensors only)
        share = self.dp_size / self._global_count(chosen)  # (DDP averages the gradients over DP)
        for m in range(0, len(text), t.micro_batch_size):
            part = slice(m, m + t.micro_batch_size)
            # Backward inside too: megatron-core's linear layers restore autocast in their backward for CUDA
            # only (custom_bwd), and on the CPU the backward runs in this thread (on a GPU in autograd's own).
            with torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.ddp(inputs[part], text[part], chosen[part], positions[part]) * share
                loss.backward()
            total += loss.detach().float()
        norm = float(global_grad_norm(self.params))  # (the same on every rank: DDP averaged the gradients)
        if math.isfinite(norm):
            if t.grad_clip and norm > t.grad_clip:
                for p in self.params:
                    p.grad.mul_(t.grad_clip / (norm + 1e-6))
            self.optimizer.step()
            self.schedule.step()  # (the LR follows the updates made, as the Parti trainer's and Megatron-LM's)
            self.consecutive = 0
        else:  # skipped, as the Parti trainer skips it (its gradients would make every weight NaN), the LR held
            self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total.item() / self.dp_size, norm

    def _global_count(self, chosen: torch.Tensor) -> torch.Tensor:
        """The chosen tokens of the whole global batch (every DP rank's), at least 1: the loss is their mean."""
        count = chosen.sum().float()
        dist.all_reduce(count, group=ps.get_data_parallel_group())
        return count.clamp(min=1)

    @torch.no_grad()
    def held_out_loss(self, held_out) -> float:
        """The masked-token loss on held-out captions `held_out` (one of self.held_out's sets) now: train.eval_batches
        global batches, the same captions and masks every time (a seeded order over the whole set; masks keyed by
        the batch), without dropout."""
        t = self.cfg.train
        sampler = GlobalBatchSampler(len(held_out), t.global_batch_size, t.seed)
        total = torch.zeros((), device=self.device)
        self.model.eval()
        for b in range(t.eval_batches):
            seed = int(np.random.SeedSequence([t.seed, 2, b]).generate_state(1, np.uint64)[0])  # (apart from steps')
            inputs, text, chosen, positions = self._masked_batch(held_out, sampler, b * t.global_batch_size, seed)
            share = self.dp_size / self._global_count(chosen)
            for m in range(0, len(text), t.micro_batch_size):
                part = slice(m, m + t.micro_batch_size)
                with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
                    total += self.model(inputs[part], text[part], chosen[part], positions[part]).float() * share
        self.model.train()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return total.item() / (self.dp_size * t.eval_batches)

    def save(self, step: int) -> None:
        """checkpoints/step_<step>/ (every rank; training/checkpoint.py: `latest`, pruning, failures)."""
        state = {"step": step, "kind": CHECKPOINT_KIND, "config": to_dict(self.cfg), "consumed_samples": self.consumed,
                 "sampler_order": self.sampler.order, "skipped_steps": self.skipped,
                 "consecutive_skipped_steps": self.consecutive, "text_tokenizer": self.text_tokenizer}
        self._adam_state(0)  # (a parameter never updated yet)
        save_sections(lambda: _blocks(self.model, self.cfg.model, self.optimizer), True, self.run_dir, step, state,
                      self.cfg.train.retention())

    def resume(self) -> int:
        """The step to continue from: `latest`'s (or the newest complete checkpoint's), its weights and Adam
        moments loaded at this run's layout; 0 without one. Makes the LR schedule at the updates made by then (the
        steps less the skipped ones; checkpoints written before 2026-12-05 advanced it on skipped steps). config.yaml
        is written once the checkpoint's config has been checked against this one."""
        tag, note = resume_tag(self.run_dir)
        if note:
            self.log.info(note)
        step = 0
        if tag is not None:
            path = checkpoint_dir(self.run_dir) / tag
            state = _read_state(path, self.cfg)
            check_text_tokenizer(state.get("text_tokenizer"), self.text_tokenizer, f"cannot resume {path}")
            check_steps_left(self.cfg.train.steps, int(state["step"]), path)
            for message in _resume_messages(state, self.cfg):
                self.log.info(message)
            step, order = int(state["step"]), state.get("sampler_order", "randperm")
            if order != self.sampler.order:  # a run keeps the caption order it began with
                self.sampler = GlobalBatchSampler(self.sampler.n, self.cfg.train.global_batch_size,
                                                  self.cfg.train.seed, order)
            self.skipped = int(state.get("skipped_steps", 0))
            self.consecutive = int(state.get("consecutive_skipped_steps", 0))  # (train.max_skipped_steps counts on)
            saved_batch = state["config"]["train"]["global_batch_size"]  # (checkpoints before consumed_samples)
            self.consumed = int(state.get("consumed_samples", step * saved_batch))
            self._adam_state(step - self.skipped)  # (Adam's count: a skipped step did not update)
            verify(path)
            try:
                load_in_place(_blocks(self.model, self.cfg.model, self.optimizer), path)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - as training/checkpoint.py's load
                # (verify reads a few bytes per record: a record damaged further in failed here with a traceback)
                raise CheckpointError(f"{path}: cannot read the checkpoint's tensors ({failure_cause(e)}); a .distcp "
                                      "file may be corrupt (resume from an earlier checkpoint: delete this folder "
                                      f"and {checkpoint_dir(self.run_dir) / 'latest'})") from None
            self.log.info(f"resumed from {path} at step {step}")
        if dist.get_rank() == 0:
            save_config(self.cfg, self.run_dir / "config.yaml")
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.train.lr
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg.train),
                                                          last_epoch=step - self.skipped - 1)  # (updates made)
        self.log.resumed_at(step)
        return step

    def _adam_state(self, step: int) -> None:
        """AdamW makes a parameter's state at its first update: made here where it is missing (zero moments,
        Adam's step count `step`), so that a checkpoint's blocks have tensors to be written from or loaded into."""
        for p in self.params:
            if not self.optimizer.state[p]:
                self.optimizer.state[p].update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(p),
                                               exp_avg_sq=torch.zeros_like(p))


def shape_differences(saved_model: dict, model_cfg: ModelConfig) -> str:
    """The SHAPE_KEYS on which a saved model section (a dict) and `model_cfg` differ, as one phrase ('' if none)."""
    saved = saved_model_config(saved_model)
    return "; ".join(f"model.{k}: {getattr(saved, k)} there, {getattr(model_cfg, k)} here" for k in SHAPE_KEYS
                     if getattr(saved, k) != getattr(model_cfg, k))


def _read_state(path: Path, cfg: Config) -> dict:
    """A pre-training checkpoint's trainer_state.json (step, sample order, config ...); CheckpointError naming
    the file when it is not one, or of another shape; ConfigError when `cfg` changes what the encoder's
    masking depends on (which ids are padding and end of caption)."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from None
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind != CHECKPOINT_KIND:
        raise CheckpointError(f"{file}: not a checkpoint of python -m training.text_encoder (kind {kind!r}); "
                              "use another --run-dir")
    differ = shape_differences(state["config"]["model"], cfg.model)
    if differ:
        raise CheckpointError(f"{path}: an encoder of another shape ({differ}); use another --run-dir")
    refused = [c for c in resume_changes(state["config"], cfg)["refused"] if c[0] in MASKING_KEYS]
    if refused:
        raise ConfigError(f"cannot resume {path} with other caption ids: {format_changes(refused)}; resume with the "
                          "checkpoint's values, or use another --run-dir")
    return state


MASKING_KEYS = ("model.text_pad_id", "model.text_eos_id")
"""Beside SHAPE_KEYS, what a pre-training run cannot change on resume: the words its masks choose from."""


def _resume_messages(state: dict, cfg: Config) -> list[str]:
    """What a resume with `cfg` changes against the checkpoint's config, as the Parti trainer reports it: the
    schedule and optimizer values applied, warnings, and the rest (model.* keys of the decoder included:
    the pre-training does not build it)."""
    changes = resume_changes(state["config"], cfg)
    return change_messages({**changes, "noted": changes["noted"] + changes["refused"]}, state["step"])


def not_applied(cfg: Config) -> list[str]:
    """Notes for the settings of a Parti run that this command does not apply (a run's config serves both)."""
    p, t, notes = cfg.parallel, cfg.train, []
    if p.pp > 1:
        notes.append(f"note: parallel.pp={p.pp} does not apply here: the encoder trains at TP={p.tp}, the world's "
                     "other ranks data parallel")
    if p.zero_stage:
        notes.append(f"note: parallel.zero_stage={p.zero_stage} does not apply here: each data-parallel rank keeps "
                     "its TP shard's whole AdamW state (DDP; the encoder is a small part of the model)")
    if p.activation_checkpointing != "none":
        notes.append(f"note: parallel.activation_checkpointing={p.activation_checkpointing} does not apply here: "
                     "the encoder's activations (captions of text_seq_len tokens) are kept")
    if t.async_save:
        notes.append("note: train.async_save does not apply here: checkpoints are written before training goes on")
    for key, value in (("rampup_batch_size", t.rampup_batch_size), ("ema_decay", t.ema_decay)):
        if value:
            notes.append(f"note: train.{key}={value} does not apply here: the encoder's pre-training takes "
                         "train.global_batch_size at every step and exports its weights")
    if t.init_from:  # (a Parti run takes this command's result with model.init_text_encoder)
        notes.append(f"note: train.init_from={t.init_from} does not apply here: the encoder's pre-training starts "
                     "from random weights (or its run directory's checkpoints)")
    return notes


def _blocks(module: nn.Module, model_cfg: ModelConfig, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{'model': {name#i: ShardedTensor}} of the text encoder's parameters this rank holds (views of them);
    with `optimizer` also 'exp_avg' and 'exp_avg_sq', AdamW's moments of each, split as the parameter is."""
    out = {"model": {}} if optimizer is None else {"model": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in canonical_parameters(module, model_cfg).items():
        if is_text_encoder(name):
            for section, blocks in out.items():
                tensor = p.data if section == "model" else optimizer.state[p][section]
                fragment = Fragment(0, tensor.view(-1), whole=True)
                for i, block in enumerate(sharded_blocks(f"{section}.{name}", fragment, tuple(p.shape), p)):
                    blocks[f"{name}#{i}"] = block
    return out


def check_text_tokenizer(saved: dict | None, current: dict | None, what: str) -> None:
    """ConfigError when an encoder trained on one text tokenizer's ids (`saved`, caption_tokenizer's dict) meets
    captions of another (`current`): each id would mean another word. None on either side (synthetic ids, or
    saved before the tokenizer was recorded) has nothing to compare."""
    if saved and current and saved.get("hash") != current.get("hash"):
        raise ConfigError(f"{what}: its text encoder was trained on the ids of another text tokenizer (sha256 "
                          f"{str(saved.get('hash'))[:12]}... there, {str(current.get('hash'))[:12]}... here), so every "
                          "caption id would mean another word; use captions made with its tokenizer")


def save_text_encoder(module: nn.Module, model_cfg: ModelConfig, folder: Path,
                      text_tokenizer: dict | None = None) -> None:
    """Every rank: the encoder's weights (each TP shard once, the writes spread over DP) into <folder>.partial,
    then rank 0 writes config.json (the model section and the text tokenizer its ids are from), which marks it
    complete, and puts it at `folder`: a rerun that extends a finished run keeps the earlier encoder whole until
    the new one is (a kill mid-write left a folder that looked complete, its tensors half rewritten)."""
    partial = folder.with_name(folder.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # (a killed write's)
        partial.mkdir(parents=True)
    dist.barrier()
    write_blocks(_blocks(module, model_cfg), partial, replicated=True)
    if dist.get_rank() == 0:
        saved = {"model": to_dict(model_cfg), "text_tokenizer": text_tokenizer}
        write_atomic(partial / "config.json", json.dumps(saved, indent=1))
        replace_folder(partial, folder)
    dist.barrier()


def load_text_encoder(module: nn.Module, model_cfg: ModelConfig, folder: str | Path,
                      text_tokenizer: dict | None = None) -> None:
    """Every rank: load a pre-trained encoder (`save_text_encoder`'s folder) into the text encoder pieces of
    `module` (PartiModel or a pipeline stage; a stage without them takes part in the collective load only),
    resharded to its TP size. ConfigError naming the folder when it is incomplete, of another shape, or trained
    on another text tokenizer than `text_tokenizer` (the run's data's: {"hash", ...}; None for synthetic data)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.init_text_encoder={folder}: no config.json there (expected the text_encoder "
                          "folder written by python -m training.text_encoder, complete)")
    try:
        saved = json.loads((folder / "config.json").read_text())
        model = saved["model"] if isinstance(saved, dict) else None
        if not isinstance(model, dict):
            raise TypeError(f"no model section in {type(saved).__name__} {str(saved)[:80]}")
    except (OSError, ValueError, TypeError) as e:  # (a damaged copy: a JSONDecodeError or KeyError traceback)
        raise ConfigError(f"model.init_text_encoder={folder}: {folder / 'config.json'} cannot be read "
                          f"({one_line(e)}); expected the JSON written by python -m training.text_encoder") from None
    differ = shape_differences(model, model_cfg)
    if differ:
        raise ConfigError(f"model.init_text_encoder={folder}: an encoder of another shape ({differ})")
    check_text_tokenizer(saved.get("text_tokenizer"), text_tokenizer, f"model.init_text_encoder={folder}")
    verify(folder)  # (every rank reads it: a crafted index would run code when dist_checkpointing reads it)
    try:
        load_in_place(_blocks(module, model_cfg), folder)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - as training/checkpoint.py's load_weights
        raise CheckpointError(f"model.init_text_encoder={folder}: cannot read the encoder's tensors "
                              f"({failure_cause(e)}); a .distcp file may be corrupt (write it again with "
                              "python -m training.text_encoder)") from None


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__, where="configs/train/", example="parallel.tp=2 train.steps=1000")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--text-files", nargs="*", help="caption files, one per line (default: the run's data)")
    parser.add_argument("--text-tokenizer", help="the SentencePiece model for --text-files")
    parser.add_argument("--valid-text-files", nargs="*", help="held-out caption files for train.eval_interval with "
                        "--text-files (default: the run's data.valid_shards)")
    parser.add_argument("--resume", default="auto", choices=["auto", "none"],
                        help="auto: continue from the run directory's latest checkpoint if any; none: start at step 0, "
                             "refused where checkpoints exist")
    args = parser.parse_args(argv)
    with command(errors=(FileNotFoundError, DeviceError, CheckpointError, RunDirError, NonFiniteStop, DataError),
                 label="training.text_encoder"):
        cfg = load_config(args.config, args.set).validate()
        use_device(cfg.train.device, "train.device")  # (a missing GPU: refused before the run directory is made)
        with holding_run_dir(args.run_dir):
            pretrain(cfg, args.run_dir, args.text_files, args.text_tokenizer, args.resume, args.valid_text_files)


if __name__ == "__main__":
    main()
