"""Checkpoints that resume on any layout: megatron-core dist_checkpointing of weights and optimizer state.

    save(engine, cfg, layout, run_dir, step, trainer_state, cfg.train.retention())   # layout: a ParallelLayout
    save(..., background=BackgroundSaves())           # train.async_save: written while training goes on
    tag = latest_tag(run_dir)                         # None when there is no `latest` pointer
    tag, note = resume_tag(run_dir)                   # `latest`'s, else the newest complete checkpoint
    trainer_state = load(engine, cfg, layout, checkpoint_dir(run_dir) / tag)   # at this run's TP/PP/DP/ZeRO layout
    load_weights(engine, cfg, checkpoint_folder)      # train.init_from: its fp32 weights alone, any layout

Why dist_checkpointing rather than DeepSpeed's own checkpoints: DeepSpeed's native files are tied to the
DP size and, under a pipeline, to per-layer files; its universal conversion is an offline step and
needs TP patterns per parameter. megatron-core's dist_checkpointing stores each tensor once with its
global shape and the offsets of every block, and reshards on load, so a checkpoint saved at
TP=2 x PP=2 x DP=2 loads at TP=1 x PP=1 x DP=1 (and back). What goes in:
- for every parameter, under its PartiModel name (the same at any PP, see `piece_names`): the fp32
  master weight and the optimizer state (AdamW's `exp_avg`, `exp_avg_sq`; Adafactor's statistics; the moving
  average of the weights, `ema`, when the run keeps one: training/ema.py);
- what each rank writes is its own part, read in place from DeepSpeed's partitions (deepspeed_glue.py
  `own_fragment`): under ZeRO-1/2/3 a flat range of each parameter, stored as the few row-major blocks
  that cover it (`flat_blocks`; megatron-core 0.16 refuses ShardedTensor.flattened_range), placed in the
  global tensor by the parameter's TP `partition_dim`. So bytes written, host memory and time per rank
  scale with the rank's partition, with no gathers; at ZeRO-0, where every DP rank holds whole tensors,
  megatron's fully parallel save spreads their writes over the DP ranks. A load asks for the blocks of its
  own layout and dist_checkpointing reads them out of whatever blocks were written, straight into the
  partitions; the working (bf16) weights are then refreshed from the masters. (Adafactor's row/column
  statistics exist only per TP shard: stored per TP rank, they reload at the same TP size only);
- trainer_state.json: step, consumed samples (the sampler's state), optimizer step count, LR
  schedule, skipped steps, world layout, the resolved config, the training data's tokenizers (their hashes);
- rng_rank{r}.pt: each rank's RNG states (restored only when the layout is unchanged).

Layout and the `latest` pointer are common/checkpoints.py's: run_dir/checkpoints/step_00000100/, and
`latest` moved by rank 0 after every rank finished writing. A tag is complete when its trainer_state.json
(STATE_FILE, written last, atomically) exists. A save that fails (a full disk) removes its partial folder,
leaves `latest` where it was and raises CheckpointError naming the cause. An asynchronous save
(`BackgroundSaves`) is completed the same way, at the first training step after every rank's writer
finished; a run killed before then leaves `latest` on the previous checkpoint.

Safety of what is read back: `verify` (training/checkpoint_verify.py) checks a checkpoint's files before
anything is built from them; a crafted file is refused, naming it, instead of running code.

Checkpoints carry the id of the run that wrote them (`run_id`, kept over resumes): pruning deletes only
older complete checkpoints of the same run (and leftovers of killed saves), never another run's.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)

from common import checkpoints
from common.checkpoints import (  # noqa: F401 - training.trainer reaches them from here
    CheckpointError,
    Retention,
    RunDirError,
    checkpoint_dir,
    failure_cause,
    has_checkpoints,
    move_latest,
    one_line,
    prepare_folder,
    tag_for,
)
from common.config import to_dict
from common.files import sync_to_disk, write_atomic
from model_parallel.layout import ParallelLayout
from model_parallel.pipeline import canonical_parameters
from training.checkpoint_verify import load_rng_file, verify  # noqa: F401 - training.trainer calls verify here
from training.deepspeed_glue import (
    EMA_KEY,
    Fragment,
    ensure_optimizer_state,
    link_optimizer_fragments,
    local_shape,
    optimizer_state_specs,
    optimizer_step_count,
    own_fragment,
    refresh_working_weights,
    set_optimizer_step_count,
)
from training.ema import saved_ema_decay

STATE_FILE = "trainer_state.json"
"""Written last into a checkpoint folder: its presence marks the checkpoint complete."""
EXPORT_WEIGHTS = "model.safetensors"
"""The weights file of training.export's folder (train.init_from takes one)."""

RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "config_history", "tensorboard", "wandb", "export",
             "REQUEUE", "held_out.jsonl")
"""What a training run, its export and training.held_out write into its run directory (`--resume overwrite` moves
them aside: an old export left in place would be sampled as the new run's)."""


def complete_tags(run_dir: str | Path) -> list[str]:
    return checkpoints.complete_tags(run_dir, STATE_FILE)


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag `checkpoints/latest` names (None: no pointer); CheckpointError when it names no complete one."""
    return checkpoints.latest_tag(run_dir, STATE_FILE)


def resume_tag(run_dir: str | Path) -> tuple[str | None, str | None]:
    """(tag or None, note or None): `latest`'s tag, else the newest complete checkpoint (common/checkpoints.py)."""
    return checkpoints.resume_tag(run_dir, STATE_FILE)


def set_aside(run_dir: str | Path) -> Path | None:
    """Move a previous run's RUN_FILES into run_dir/replaced_<time>/ (`--resume overwrite`); the folder or None."""
    return checkpoints.set_aside(run_dir, RUN_FILES)


def read_trainer_state(path: Path) -> dict:
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # (ValueError: undecodable text, bad JSON, an int past Python's digit limit)
        raise CheckpointError(f"{file}: cannot be read ({one_line(e)}); expected the JSON trainer state "
                              "written with the checkpoint") from None
    missing = [key for key in ("step", "consumed_samples", "lr_scheduler", "optimizer_steps", "layout")
               if key not in state] if isinstance(state, dict) else ["(not an object)"]
    if missing:
        raise CheckpointError(f"{file}: not a trainer state (missing {', '.join(missing)})")
    wrong = [key for key in ("step", "consumed_samples", "optimizer_steps")
             if type(state[key]) is not int or state[key] < 0]
    if wrong:
        raise CheckpointError(f"{file}: {', '.join(f'{k}={state[k]!r}' for k in wrong)}: expected counts (integers "
                              ">= 0) as the checkpoint writes them")
    wrong = [key for key in ("lr_scheduler", "layout") if not isinstance(state[key], dict)]
    if wrong:  # (the LR schedule's load_state_dict failed on one with a traceback)
        raise CheckpointError(f"{file}: {', '.join(f'{k}={state[k]!r}'[:80] for k in wrong)}: expected objects as "
                              "the checkpoint writes them")
    return state


# ---------------------------------------------------------------------------------------------
# Parameters by layout-independent name, and their shards

WEIGHT_SOURCES = {"model": "model", "ema": f"optimizer.{EMA_KEY}"}
"""The weights a checkpoint holds, by what they are (the fp32 masters, or their moving average when the run kept
one: train.ema_decay), and the prefix of their stored names."""


def flat_blocks(shape: tuple, start: int, stop: int) -> list[tuple[tuple, tuple]]:
    """[(offset, size)]: the fewest row-major blocks that together cover elements [start, stop) of a
    tensor of `shape` flattened, in order; each block is a contiguous run of that range (at most
    2 * len(shape) - 1 of them). A ZeRO partition is such a range of a parameter, and dist_checkpointing
    stores rectangular blocks (megatron-core 0.16 refuses ShardedTensor.flattened_range)."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    row = math.prod(shape[1:])
    first_full, end_full = -(-start // row), stop // row  # whole rows [first_full, end_full)
    if first_full > end_full:  # inside one row
        r = start // row
        return [((r, *o), (1, *s)) for o, s in flat_blocks(shape[1:], start - r * row, stop - r * row)]
    blocks = []
    if start < first_full * row:
        r = first_full - 1
        blocks += [((r, *o), (1, *s)) for o, s in flat_blocks(shape[1:], start - r * row, row)]
    if end_full > first_full:
        blocks.append(((first_full,) + (0,) * (len(shape) - 1), (end_full - first_full, *shape[1:])))
    if stop > end_full * row:
        blocks += [((end_full, *o), (1, *s)) for o, s in flat_blocks(shape[1:], 0, stop - end_full * row)]
    return blocks


def sharded_blocks(key: str, fragment: Fragment, shape: tuple, p: torch.nn.Parameter,
                   per_tp_rank: bool = False) -> list[ShardedTensor]:
    """dist_checkpointing ShardedTensors for this rank's fragment of a tensor of (TP-local) `shape`: the
    fragment's blocks, placed in the global tensor (split along p's `partition_dim` over TP). Replica ids
    (TP, DP): a tensor not split over TP is written from TP rank 0 only; a whole tensor (ZeRO-0) is one
    replica per DP rank, and the fully parallel save spreads those writes over the DP ranks; a ZeRO part
    is this rank's alone. The block tensors are views of the live values (a load fills them in place).
    `per_tp_rank`: a statistic that exists per TP shard only (Adafactor's), stored with a leading TP axis;
    it reloads at the same TP size only (ZeRO-0, so always whole)."""
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    dp_replica = ps.get_data_parallel_rank() if fragment.whole else 0
    if per_tp_rank:
        return [ShardedTensor.from_rank_offsets(key, fragment.data.view(shape), (0, tp_rank, tp_size),
                                                replica_id=(0, dp_replica), prepend_axis_num=1)]
    split = getattr(p, "tensor_model_parallel", False) and tp_size > 1
    global_shape, tp_offset = list(shape), [0] * len(shape)
    if split:
        global_shape[p.partition_dim] *= tp_size
        tp_offset[p.partition_dim] = tp_rank * shape[p.partition_dim]
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    out = []
    for offset, size in flat_blocks(tuple(shape), fragment.start, fragment.start + fragment.data.numel()):
        begin = sum(o * s for o, s in zip(offset, strides)) - fragment.start
        data = fragment.data[begin:begin + math.prod(size)].view(size)
        out.append(ShardedTensor(key, data, data.dtype, tuple(size), tuple(global_shape),
                                 tuple(o + t for o, t in zip(offset, tp_offset)), axis_fragmentations=None,
                                 replica_id=(0 if split else tp_rank, dp_replica)))
    return out


def _state_dict(engine, model_cfg, optimizer: bool = True, ema: bool = False,
                weights_from: str = "model") -> tuple[dict, list[torch.nn.Parameter]]:
    """{'model': {name#i: ShardedTensor}, 'optimizer': {moment.name#i: ShardedTensor}}: this rank's own
    blocks of every fp32 master weight and optimizer state (not with `optimizer=False`; the moving average of the
    weights too with `ema`: training/ema.py), under PartiModel's parameter names (the same at any layout), as
    views of the live tensors: a save writes them, a load fills them in place. `weights_from`: the stored name
    the master weights are read from (WEIGHT_SOURCES: a load of the average into the weights)."""
    params = canonical_parameters(engine.module, model_cfg)
    link_optimizer_fragments(engine)
    state: dict = {"model": {}, "optimizer": {}} if optimizer else {"model": {}}
    for n, p in params.items():
        parts = [("model", f"{WEIGHT_SOURCES[weights_from]}.{n}", None, False, tuple(local_shape(p)))]
        parts += [("optimizer", f"optimizer.{key}.{n}", key, per_tp, shape)
                  for key, per_tp, shape in (optimizer_state_specs(engine, p, ema) if optimizer else [])]
        for section, name, key, per_tp, shape in parts:
            blocks = sharded_blocks(name, own_fragment(engine, p, key), shape, p, per_tp)
            state[section].update({f"{name}#{i}": block for i, block in enumerate(blocks)})
    return state, list(params.values())


# ---------------------------------------------------------------------------------------------


def write_blocks(sections: dict, path: Path, replicated: bool, background: bool = False):
    """dist_checkpointing.save of {section: {name: ShardedTensor}} into `path` (every rank; `background`: the
    AsyncRequest that writes them, else None). torch_dist files (megatron-core's default); `replicated`: tensors
    that every data-parallel rank holds whole (ZeRO-0), whose writes megatron's fully parallel wrapper spreads
    over those ranks instead of leaving them all to DP rank 0. It is left out when nothing is replicated (ZeRO
    parts are each rank's own): it all-gathers every rank's block metadata over data parallelism to share out
    writes there are none of.
    megatron's access-integrity check is off (the fully parallel wrapper runs it itself; at ZeRO-0 the blocks
    are whole tensors, few): it all-gathers every rank's block metadata to every rank and, for blocks off a
    regular grid (all but Adafactor's per-TP statistics), checks only their dtypes and shapes. At
    parti-20b ZeRO-3 over 512 ranks, ~2.3M blocks, that is ~190 MiB and ~17 s of unpickling per rank and ~9 s of
    checks on rank 0 per save and per load (per block, measured on CPU: 87 B pickled, 7.4 us to unpickle, 3.8 us
    to check).
    torch.distributed.checkpoint's coordinator checks the written blocks itself at every save (in bounds, no
    overlaps and, over two or more ranks, each tensor covered: tests/test_checkpoint_layout.py); its refusal
    raises on the coordinator only, as megatron's check did on rank 0 (the other ranks wait in the save's
    collectives until the process group's timeout)."""
    _start_write_results_queue()
    strategy = get_default_save_sharded_strategy()
    if replicated:
        strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group())
    return dist_checkpointing.save(sections, str(path), sharded_strategy=strategy, validate_access_integrity=False,
                                   async_sharded_save=background)


def read_blocks(template: dict, path: Path) -> dict:
    """dist_checkpointing.load of a {section: {name: ShardedTensor}} template from `path` (every rank), without
    megatron's access-integrity check (write_blocks says why; the load's planner still checks each tensor's
    global shape against the checkpoint's)."""
    return dist_checkpointing.load(template, str(path), validate_access_integrity=False)


def _start_write_results_queue() -> None:
    """megatron-core's checkpoint writers report through one queue per process, served by a multiprocessing
    Manager that megatron starts at the first save with 'spawn'. The spawned server imports the trainer's
    main module again (for `python -m training.train`: all of megatron-core and DeepSpeed) and then torch to
    read the first report: a run's first save took 9 s, the next ones 0.2 s, once per rank and launch. And a
    stop signal sent to every process of the job (SLURM's SIGTERM on requeue or preemption) killed that
    server, so the trainer's save on that signal failed with Broken pipe. The same Manager is started here
    by fork, as the data-loading workers and megatron's own async writers are, and kept where megatron looks
    for it (filesystem_async._results_queue). The forked server must not act as the trainer:
    `_queue_server_init`."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(_queue_server_init, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()  # (the proxy keeps the manager, as megatron's does)


def _queue_server_init(trainer_pid: int) -> None:
    """In the forked queue server: a stop signal sent to the whole job is the trainer's to handle (it saves
    first, through this server); the run directory's lock stays the trainer's alone; and the server ends
    within a second of the trainer however that ends (a SIGKILL leaves no finaliser to shut it down)."""
    import signal
    import threading
    import time

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    checkpoints.drop_inherited_locks()

    def exit_with_the_trainer() -> None:
        while os.getppid() == trainer_pid:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=exit_with_the_trainer, daemon=True).start()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    """The saved generators, where they fit: megatron's tracker holds CUDA generator states on a GPU and CPU ones
    on a CPU (model_parallel.cpu_compat), so a checkpoint saved on the other kind of device (its "cuda" state
    says which) leaves the tracker as seeded (the attention-dropout masks then differ from an uninterrupted
    run's; keyed dropout does not depend on it); set into the wrong kind it fails at its first use."""
    torch.set_rng_state(state["torch"])
    if ("cuda" in state) == torch.cuda.is_available():
        get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _from_rank0(value):
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_of_all(value):
    """The first rank's non-empty `value` (None when every rank has none), on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return next((v for v in out if v), None)


def _run_id_of(path: Path) -> str | None:
    """The run id a complete checkpoint records (None: none, or not complete)."""
    try:
        return json.loads((path / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


class BackgroundSaves:
    """Checkpoints written by background processes while training goes on (train.async_save).

    megatron-core's asynchronous save: `save` plans the write, takes a copy of this rank's tensors in host
    memory (its own ZeRO part; a GPU's are copied out) and forks a process that writes them; the training
    loop calls `poll()` once per step (a one-integer all-reduce: every rank at the same point) and, when
    every rank's writer has finished, the save is completed there as a synchronous one is: the tensor index,
    then trainer_state.json (the mark of a complete checkpoint), `latest`, pruning. A run killed before that
    leaves the folder incomplete and `latest` on the previous checkpoint. One save is in flight at a time:
    the next `save` first waits for the previous one."""

    def __init__(self):
        self.queue = AsyncCallsQueue(persistent=False)  # (a fresh forked writer per save: nothing to restart)
        self.in_flight: list[tuple[Path, Path]] = []  # (run_dir, checkpoint folder) of each save in flight

    def schedule(self, request, run_dir: Path, path: Path) -> None:
        self.queue.schedule_async_request(request)
        self.in_flight.append((Path(run_dir), path))

    def poll(self, wait: bool = False) -> list[Path]:
        """Complete the saves every rank has finished writing (all of them when `wait`); their folders. Every
        rank calls it at the same point. A failed background write raises CheckpointError as a failed save does."""
        if not self.in_flight:
            return []
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=wait)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - raised on every rank (megatron broadcasts it)
            run_dir, path = self.in_flight.pop(0)
            _fail(run_dir, path, failure_cause(e))
        completed = [path for _, path in self.in_flight[:len(done)]]
        del self.in_flight[:len(done)]
        return completed

    def close(self, abort: bool = False) -> None:
        """Stop the queue; `abort`: kill a writer still running (its checkpoint stays incomplete)."""
        self.queue.close(abort=abort)
        self.in_flight.clear()


def save(engine, cfg, layout: ParallelLayout, run_dir: str | Path, step: int, trainer_state: dict,
         keep: Retention = Retention(), background: BackgroundSaves | None = None) -> str:
    """Write the checkpoint of `step` (every rank), then rank 0 marks it complete, moves `latest` and
    prunes; with `background`, the tensors are written by a background process and the rest happens at a
    later `background.poll()`. A failed write (a full disk) leaves no partial folder and `latest` where it
    was, and raises CheckpointError with the cause on every rank."""
    if background is not None:
        background.poll(wait=True)
    ensure_optimizer_state(engine)  # (none yet when every step so far was skipped as non-finite)
    full_state = {**trainer_state, "optimizer_steps": optimizer_step_count(engine),
                  "lr_scheduler": engine.lr_scheduler.state_dict(), "layout": layout.record(),
                  "config": to_dict(cfg)}
    rank = dist.get_rank()
    return save_sections(lambda: _state_dict(engine, cfg.model, ema=cfg.train.ema_decay > 0)[0],
                         cfg.parallel.zero_stage == 0, run_dir, step,
                         full_state, keep, background,
                         also=lambda path: _save_synced(_rng_state(), path / f"rng_rank{rank}.pt"))


def _save_synced(obj, file: Path) -> None:
    """torch.save, on the disk before the checkpoint is marked complete (see _complete)."""
    torch.save(obj, file)
    sync_to_disk(file)


def save_sections(sections, replicated: bool, run_dir: str | Path, step: int, full_state: dict,
                  keep: Retention = Retention(), background: BackgroundSaves | None = None, also=None) -> str:
    """The checkpoint of `step` (every rank): `sections()`'s {section: {name: ShardedTensor}} written with
    `write_blocks` (`replicated`: as it says) and `also(path)` (this rank's other files), then `full_state` (JSON:
    `step`, and `run_id` when there is one) as trainer_state.json, which marks it complete; `latest` moves, older
    ones are pruned. Failures as `save` says. (Parti's trainer through `save`, the text encoder's pre-training.)"""
    path, run_id = checkpoint_dir(run_dir) / tag_for(step), full_state.get("run_id")
    wait_for_pruning()
    problem = _from_rank0(prepare_folder(path, run_id, _run_id_of) if dist.get_rank() == 0 else None)
    if problem:
        raise CheckpointError(problem)
    error, request = None, None
    try:
        request = write_blocks(sections(), path, replicated, background is not None)
        if also is not None:
            also(path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must learn of any rank's failure
        error = failure_cause(e)
    error = _first_of_all(error)  # (also the barrier: every rank has finished writing or planning)
    if error:
        _fail(run_dir, path, error)
    if request is None:
        _complete(run_dir, path, full_state, keep)
    else:
        request.add_finalize_fn(lambda: _complete(run_dir, path, full_state, keep))
        background.schedule(request, run_dir, path)
    return path.name


def _complete(run_dir: str | Path, path: Path, full_state: dict, keep: Retention) -> None:
    """Every rank, once every rank's tensors are written: rank 0 writes trainer_state.json last (write +
    rename: its presence marks the checkpoint complete), moves `latest`, prunes older ones of this run."""
    error = None
    if dist.get_rank() == 0:
        try:
            # megatron-core fsyncs the tensor files and .metadata, not common.pt and metadata.json (rank 0's);
            # a node crash must not leave them empty under a trainer_state.json that says the folder is complete
            sync_to_disk(path / "common.pt", path / "metadata.json", path)
            write_atomic(path / STATE_FILE, json.dumps(full_state, indent=1))
            move_latest(run_dir, path.name)
        except OSError as e:
            error = failure_cause(e)
    error = _from_rank0(error)
    if error:
        _fail(run_dir, path, error)
    if dist.get_rank() == 0:
        _prune_in_background(run_dir, keep, full_state["step"], STATE_FILE, full_state.get("run_id"), _run_id_of)


_pruning: threading.Thread | None = None


def _prune_in_background(*args) -> None:
    """Rank 0 deletes older checkpoints in a thread while training goes on: the rmtree of a parti-20b
    checkpoint (~250 GB, 2 files per rank) can take seconds to minutes on a parallel file system, and every
    rank would wait for it. The next save, and the end of the run, wait for it first (wait_for_pruning)."""
    global _pruning
    wait_for_pruning()
    _pruning = threading.Thread(target=checkpoints.prune, args=args, name="prune-checkpoints")
    _pruning.start()


def wait_for_pruning() -> None:
    global _pruning
    if _pruning is not None:
        _pruning.join()
        _pruning = None


def _fail(run_dir: Path, path: Path, error: str) -> None:
    """Every rank, after a failed save: rank 0 removes the partial folder; raise CheckpointError saying
    where `latest` still points."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    raise CheckpointError(checkpoints.failed_save_message(run_dir, path, error, STATE_FILE))


def load_in_place(template: dict, path: Path) -> None:
    """Fill the blocks of a {section: {name: ShardedTensor}} template (views of live tensors) from the
    checkpoint at `path`: dist_checkpointing fills them in place; copy where it handed back another tensor."""
    targets = {section: {name: block.data for name, block in blocks.items()} for section, blocks in template.items()}
    loaded = read_blocks(template, path)
    with torch.no_grad():
        for section, blocks in targets.items():
            for name, target in blocks.items():
                if loaded[section][name].data_ptr() != target.data_ptr():
                    target.copy_(loaded[section][name])


def load_weights(engine, cfg, path: Path, key: str = "train.init_from", weights: str = "model") -> None:
    """The fp32 master weights of the checkpoint at `path` (`weights`="ema": their moving average, which the
    checkpoint must hold) into the engine at this run's layout, its optimizer state left as it is
    (train.init_from: a new run from another's weights; `key`: the option that named it)."""
    template, params = _state_dict(engine, cfg.model, optimizer=False, weights_from=weights)
    export, error = path / EXPORT_WEIGHTS, None
    try:
        if export.is_file():
            fill_from_export(template["model"], export)
        else:
            load_in_place(template, path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - as load's
        error = failure_cause(e)
    # Every rank learns of any rank's failure: each rank reads its part of an export alone, and one that failed
    # left the others waiting in the first step's collectives until the process group's timeout.
    error = _first_of_all(error)
    if error:
        source = "export" if export.is_file() else "checkpoint"
        raise CheckpointError(f"{key}={path}: cannot read the {source}'s weights ({error})")
    refresh_working_weights(engine, params)


def fill_from_export(blocks: dict, file: Path) -> None:
    """Fill a template's model blocks (views of live tensors) from training.export's model.safetensors, which
    holds each weight whole (TP=1) under its name: each rank reads only its blocks' windows of the mapped file.
    (An export is one safetensors file, not a dist_checkpointing folder: read with safetensors' slices.)"""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f, torch.no_grad():
        for block in blocks.values():
            name = block.key.removeprefix("model.")
            whole = f.get_slice(name)
            if tuple(whole.get_shape()) != tuple(block.global_shape):  # (a slice out of bounds would be cut short)
                raise ValueError(f"{file}: {name} is {tuple(whole.get_shape())}, this run's model has "
                                 f"{tuple(block.global_shape)}")
            block.data.copy_(whole[tuple(slice(o, o + n) for o, n in zip(block.global_offset, block.local_shape))])


def load(engine, cfg, layout: ParallelLayout, path: Path, branch: bool = False) -> dict:
    """Load the checkpoint in folder `path` into the engine at this run's layout; returns its trainer state. The
    LR schedule continues at the checkpoint's step with this run's train.lr/min_lr/warmup/decay/steps. `branch`:
    `path` is another run's (train.init_weights_only=false), so a failure's advice leaves its files alone."""
    state = read_trainer_state(path)
    # (Adafactor's per-TP-shard statistics at another TP size are refused before, by training.resume_plan.plan_resume.)
    ensure_optimizer_state(engine)
    # (the average of the weights where both keep one: a run that starts keeping one starts it from the loaded
    # weights, training.trainer; one that stops leaves the checkpoint's unread)
    template, params = _state_dict(engine, cfg.model, ema=cfg.train.ema_decay > 0 and saved_ema_decay(state) > 0)
    try:
        load_in_place(template, path)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - EOFError, RuntimeError from torch's unzip...
        advice = ("branch from another checkpoint of that run: set train.init_from to its folder" if branch else
                  f"resume from an earlier checkpoint: delete this folder and {path.parent / 'latest'}")
        raise CheckpointError(f"{path}: cannot read the checkpoint's tensors ({failure_cause(e)}); "
                              f"a .distcp file may be corrupt ({advice})") from None
    refresh_working_weights(engine, params)
    set_optimizer_step_count(engine, state["optimizer_steps"])
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state["lr_scheduler"])
    # LambdaLR.load_state_dict restores the position (last_epoch) but also the saved base_lrs, the peak
    # rate the checkpoint's run had; the shape (lr_lambda, a closure over this run's cfg, not saved) is
    # this run's. Rates from the saved base would mix the two when train.lr changed on resume: take the
    # base from this run's optimizer (its initial_lr, = train.lr) and recompute the rate it holds.
    bases = [group.get("initial_lr", cfg.train.lr) for group in scheduler.optimizer.param_groups]
    scheduler.base_lrs = list(bases)
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(bases, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = list(rates)
    state["rng_note"] = None
    if state["layout"] == layout.record():  # (at another layout the ranks' streams do not map onto these)
        rng_file = path / f"rng_rank{dist.get_rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(load_rng_file(rng_file))
        missing = [f"rng_rank{r}.pt" for r in range(dist.get_world_size())
                   if dist.get_rank() == 0 and not (path / f"rng_rank{r}.pt").is_file()]
        if missing:  # (removed or lost since the save, which writes each before marking the checkpoint complete)
            state["rng_note"] = (f"warning: {path} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
                                 ": those ranks' random draws (dropout) go on from this run's seed, so the steps "
                                 "from here differ from the uninterrupted run's")
    return state
