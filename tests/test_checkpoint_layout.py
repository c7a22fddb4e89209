"""How a rank's ZeRO part becomes checkpoint blocks: `flat_blocks` against a brute-force reference, and
`own_fragment`'s parts of each parameter over two data-parallel ranks."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from megatron.core.dist_checkpointing import ShardedTensor

from training.checkpoint import flat_blocks


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 1, 6), (2, 3, 4), (1, 9)])
def test_flat_blocks_cover_exactly_the_range_in_order(shape):
    """Every [start, stop) of small tensors: the blocks, read out of the tensor, are the flat range in order,
    each a contiguous run, and no more than 2 * ndim - 1 of them."""
    numel = math.prod(shape)
    values = torch.arange(numel).view(shape)
    for start, stop in itertools.combinations(range(numel + 1), 2):
        blocks = flat_blocks(shape, start, stop)
        pieces = [values[tuple(slice(o, o + s) for o, s in zip(offset, size))].reshape(-1) for offset, size in blocks]
        assert torch.equal(torch.cat(pieces), torch.arange(start, stop)), (shape, start, stop, blocks)
        assert all(p.numel() and torch.equal(p, torch.arange(p[0], p[0] + p.numel())) for p in pieces)
        assert len(blocks) <= 2 * len(shape) - 1
    assert flat_blocks(shape, 3, 3) == []


def zero_fragments(stage: int, step: bool, groups: int = 1) -> list:
    """A Linear(3, 1) (weight 3, bias 1: odd sizes) at ZeRO-`stage`, DP=2, after one step or none (the state a
    save finds when every step so far was skipped as non-finite), its parameters in one param group or one each
    (`groups`: DeepSpeed links each group's state views after the first group's step, before the others have
    state; the trainer has two groups, decayed and not): for each parameter (name, numel, the whole fp32
    weight, [(start, values, whole)] of this rank's own_fragment of its master weight and of exp_avg), the
    optimizer state made by ensure_optimizer_state as a save makes it."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from model_parallel.state import init_parallel
    from training.deepspeed_glue import MegatronMpu, ensure_optimizer_state, init_deepspeed, own_fragment

    init_parallel(tp=1, pp=1)
    init_deepspeed()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    params = [model.parameters()] if groups == 1 else [[model.weight], [model.bias]]
    optimizer = torch.optim.AdamW([{"params": list(group)} for group in params], lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      mpu=MegatronMpu(), config=config)
    if step:
        engine.backward(engine(torch.ones(1, 3)).sum())
        engine.step()
    ensure_optimizer_state(engine)
    out = []
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            whole = p.detach().float().reshape(-1).tolist()
        fragments = [own_fragment(engine, p, key) for key in (None, "exp_avg")]
        out.append((name, getattr(p, "ds_numel", p.numel()), whole,
                    [(f.start, f.data.tolist(), f.whole) for f in fragments]))
    engine.destroy()
    return out


@pytest.mark.parametrize("stage, step, groups", [(3, True, 1), (1, False, 1), (1, True, 2)],
                         ids=["zero3", "zero1-before-any-step", "zero1-two-groups"])
def test_zero_fragments_cover_each_parameter_once(pool2, stage, step, groups):
    """own_fragment over the two data-parallel ranks: each parameter's fragments (master weight and exp_avg)
    are disjoint, cover its elements exactly and hold its values. ZeRO-3 pads the last partition of an
    odd-sized parameter (2 elements a rank): no padding past its end, which a save would place outside the
    tensor. ZeRO-1 before its first step: the exp_avg views exist once ensure_optimizer_state made the state; after
    a step, every group's exp_avg holds that step's (1 - beta1) x gradient: one nonzero value for every element of
    both parameters (the gradient of the sum of Linear(ones) is the same for each)."""
    ranks = pool2.run(zero_fragments, stage, step, groups)
    exp_avg = []
    for params in zip(*ranks):
        (name, numel, whole), = {(n, k, tuple(w)) for n, k, w, _ in params}
        for key in range(2):  # master weight, exp_avg
            assert not any(fragments[key][2] for *_, fragments in params), name  # (ZeRO parts, not whole)
            parts = sorted(fragments[key][:2] for *_, fragments in params if fragments[key][1])
            # (each part starts where the one before ends, the first at 0)
            expected_starts = list(itertools.accumulate((len(values) for _, values in parts[:-1]), initial=0))
            assert [start for start, _ in parts] == expected_starts, (name, key, parts)
            assert sum(len(values) for _, values in parts) == numel, (name, key, parts)
            if key == 0:
                assert [v for _, values in parts for v in values] == pytest.approx(list(whole), rel=1e-6), name
            elif step:
                exp_avg.extend(v for _, values in parts for v in values)
        if step:
            assert exp_avg[0] > 0 and exp_avg == pytest.approx([exp_avg[0]] * len(exp_avg)), (name, exp_avg)


class StandIn:
    """An engine or a DeepSpeed optimizer wrapper reduced to the attributes named (a plain object: the fp32
    holders are cached per wrapper in a weak dictionary, which a SimpleNamespace cannot key)."""

    def __init__(self, **attributes):
        vars(self).update(attributes)


def test_zero0_fragments_are_the_whole_fp32_masters_and_refresh_copies_them_into_the_working_weights():
    """ZeRO-0 without ZeRO partitions: FP16_Optimizer (apex's or DeepSpeed's FusedAdam under bf16) keeps one flat
    fp32 master per group, the group's parameters in order, FP16_UnfusedOptimizer one fp32 master per parameter,
    and without a wrapper the parameter is its own master. own_fragment is each parameter's master (or its
    optimizer state) at its offset, whole and live (no copy); refresh_working_weights copies the masters into the
    bf16 weights; a bf16 parameter with no fp32 master is refused (its save would lose precision)."""
    from training.deepspeed_glue import own_fragment, refresh_working_weights

    a, b = (torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (2, 3))
    flat = torch.arange(5.0)
    inner = torch.optim.AdamW([flat])
    inner.state[flat].update(exp_avg=torch.arange(10.0, 15.0), exp_avg_sq=torch.zeros(5))
    engine = StandIn(optimizer=StandIn(fp16_groups=[[a, b]], fp32_groups_flat=[flat], optimizer=inner))
    fragment = own_fragment(engine, b, None)
    assert (fragment.start, fragment.data.tolist(), fragment.whole) == (0, [2.0, 3.0, 4.0], True)
    assert fragment.data.data_ptr() == flat[2:].data_ptr()  # (live values, not a copy)
    assert own_fragment(engine, a, "exp_avg").data.tolist() == [10.0, 11.0]
    assert own_fragment(engine, b, "exp_avg").data.tolist() == [12.0, 13.0, 14.0]
    refresh_working_weights(engine, [a, b])
    assert a.tolist() == [0.0, 1.0] and b.tolist() == [2.0, 3.0, 4.0]

    masters = [torch.full((2,), 7.0), torch.full((3,), 8.0)]
    engine = StandIn(optimizer=StandIn(fp16_groups=[[a, b]], fp32_groups=[masters],
                                       optimizer=torch.optim.AdamW(masters)))
    assert own_fragment(engine, b, None).data.tolist() == [8.0] * 3
    refresh_working_weights(engine, [a, b])
    assert a.tolist() == [7.0] * 2 and b.tolist() == [8.0] * 3

    w = torch.nn.Parameter(torch.ones(2))
    engine = StandIn(optimizer=torch.optim.AdamW([w]))
    fragment = own_fragment(engine, w, None)
    assert fragment.whole and fragment.data.data_ptr() == w.data_ptr()
    engine = StandIn(optimizer=torch.optim.AdamW([a]))
    with pytest.raises(RuntimeError, match=r"no fp32 master weight found for a torch.bfloat16 parameter of shape "
                                           r"\(2,\)"):
        own_fragment(engine, a, None)


def test_zero3_fragments_stop_at_the_parameters_end_and_refresh_copies_each_wrappers_masters():
    """ZeRO-3 pads a parameter to a multiple of the data-parallel ranks: 5 elements over 4 ranks are partitions
    of 2, rank 2 holding one element and one of padding, rank 3 padding only (its start, 6, is past the end:
    an empty fragment, not the padding). refresh_working_weights copies ZeRO-3's fp32 partitions into the bf16
    ones (between releasing the gathered parameters and gathering the persistent ones again) and asks ZeRO-1/2
    and BF16_Optimizer to do it (update_lp_params)."""
    from training.deepspeed_glue import own_fragment, refresh_working_weights

    p = torch.nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_numel = 0, 5
    for rank, expected in enumerate([[0.0, 1.0], [2.0, 3.0], [4.0], []]):
        partition = torch.arange(2.0 * rank, 2.0 * rank + 2)
        p._z3_optimizer = StandIn(get_local_fp32_param=lambda p, key, part=partition: part,
                                  _get_param_partition_rank=lambda p, rank=rank: rank)
        fragment = own_fragment(StandIn(), p, None)
        assert (fragment.start, fragment.data.tolist(), fragment.whole) == (2 * rank, expected, False), rank

    low, master, events = torch.zeros(3, dtype=torch.bfloat16), torch.arange(3.0), []
    refresh_working_weights(StandIn(optimizer=StandIn(
        fp16_partitioned_groups_flat=[low], fp32_partitioned_groups_flat=[master],
        _partition_all_parameters=lambda: events.append(("released", low.tolist())),
        checkpoint_event_epilogue=lambda: events.append(("gathered", low.tolist())))), [])
    # (the gathered parameters released before the copy, the persistent ones gathered again from it after)
    assert events == [("released", [0.0, 0.0, 0.0]), ("gathered", [0.0, 1.0, 2.0])]
    calls = []
    refresh_working_weights(StandIn(optimizer=StandIn(update_lp_params=lambda: calls.append(1))), [])
    assert calls == [1]


def test_ensure_optimizer_state_creates_only_the_missing_state_in_each_optimizers_own_form():
    """Before a load: zero moments for each tensor the optimizer holds no state for yet, the state a step
    already made kept as it is; Adam's step count a float tensor for torch's optimizers, an int for DeepSpeed's
    FusedAdam (here any other optimizer), none for apex's (kept in its param groups); Adafactor's factored
    statistics at this rank's shard shape (a zero.Init placeholder's `ds_shape`), behind a wrapper too."""
    from training.deepspeed_glue import ensure_optimizer_state, optimizer_state_specs

    stepped, fresh = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([stepped, fresh])
    stepped.grad = torch.ones(2)
    optimizer.step()
    moments = {key: optimizer.state[stepped][key].clone() for key in ("exp_avg", "exp_avg_sq", "step")}
    assert not optimizer.state[fresh]  # (a lookup, as DeepSpeed's wrappers make, leaves an empty entry behind)
    ensure_optimizer_state(StandIn(optimizer=optimizer))
    assert all(torch.equal(optimizer.state[stepped][key], value) for key, value in moments.items())
    state = optimizer.state[fresh]
    assert state["exp_avg"].tolist() == state["exp_avg_sq"].tolist() == [0.0] * 3
    assert torch.is_tensor(state["step"]) and state["step"].dtype == torch.float32 and state["step"].item() == 0

    p = torch.nn.Parameter(torch.ones(2))
    other = torch.optim.SGD([p], lr=0.1)  # (not torch's Adam: DeepSpeed's FusedAdam keeps an int)
    ensure_optimizer_state(StandIn(optimizer=other))
    assert other.state[p]["step"] == 0 and not torch.is_tensor(other.state[p]["step"])
    apex = type("FusedAdam", (torch.optim.SGD,), {"__module__": "apex.optimizers.fused_adam"})([p], lr=0.1)
    ensure_optimizer_state(StandIn(optimizer=apex))
    assert "step" not in apex.state[p] and set(apex.state[p]) == {"exp_avg", "exp_avg_sq"}

    matrix, placeholder, vector = (torch.nn.Parameter(torch.ones(*shape)) for shape in ((3, 4), (0,), (5,)))
    placeholder.ds_shape = torch.Size((2, 3, 4))  # (zero.Init: a flat placeholder, the shape beside it)
    adafactor = torch.optim.Adafactor([matrix, placeholder, vector])
    engine = StandIn(optimizer=StandIn(optimizer=adafactor))  # (behind a ZeRO/bf16 wrapper)
    assert optimizer_state_specs(engine, matrix) == [("row_var", True, (3, 1)), ("col_var", True, (1, 4))]
    assert optimizer_state_specs(engine, placeholder) == [("row_var", True, (2, 3, 1)), ("col_var", True, (2, 1, 4))]
    assert optimizer_state_specs(engine, vector) == [("variance", False, (5,))]
    ensure_optimizer_state(engine)
    assert {key: tuple(value.shape) for key, value in adafactor.state[matrix].items()} == \
        {"row_var": (3, 1), "col_var": (1, 4), "step": ()}
    for p in (matrix, vector):  # (the shapes torch's Adafactor makes at its first step)
        p.grad = torch.ones_like(p)
    fresh_adafactor = torch.optim.Adafactor([matrix, vector])
    fresh_adafactor.step()
    for p in (matrix, vector):
        assert {k: tuple(v.shape) for k, v in fresh_adafactor.state[p].items()} == \
            {k: tuple(v.shape) for k, v in adafactor.state[p].items()}



def write_row_blocks(folder: str, rows: list[tuple[int, int]]) -> list | None:
    """This rank writes the blocks rows[rank::world] ([start, stop) rows each) of a (4, 3) tensor whose element
    (i, j) is 3 i + j, as the trainer writes a ZeRO part (write_blocks, nothing replicated); then every rank
    reads the whole tensor back (read_blocks)."""
    import torch.distributed as dist

    from model_parallel.state import init_parallel
    from training.checkpoint import read_blocks, write_blocks

    init_parallel(tp=1, pp=1)
    Path(folder).mkdir(exist_ok=True)  # (save_sections' prepare_folder makes it)
    dist.barrier()
    values = torch.arange(12, dtype=torch.float32).view(4, 3)
    blocks = {f"w#{i}": ShardedTensor("w", values[start:stop].clone(), torch.float32, (stop - start, 3), (4, 3),
                                      (start, 0), axis_fragmentations=None, replica_id=(0, 0))
              for i, (start, stop) in enumerate(rows[dist.get_rank()::dist.get_world_size()])}
    write_blocks({"model": blocks}, Path(folder), replicated=False)
    whole = ShardedTensor.from_rank_offsets("w", torch.zeros(4, 3), replica_id=0)
    return read_blocks({"model": {"w": whole}}, Path(folder))["model"]["w"].tolist()


def test_blocks_written_by_two_ranks_are_read_back_whole(pool2, tmp_path):
    """write_blocks without megatron's access-integrity gather (and without the fully parallel wrapper): the
    blocks of two ranks, one of them in two pieces, make one tensor that every rank reads back whole."""
    results = pool2.run(write_row_blocks, str(tmp_path / "checkpoint"), [(0, 1), (2, 4), (1, 2)], timeout=60)
    assert results == [torch.arange(12.0).view(4, 3).tolist()] * 2


def test_overlapping_blocks_are_refused_without_megatrons_integrity_check(single_process, tmp_path):
    """write_blocks turns megatron's access-integrity check off (it all-gathers every block's metadata to every
    rank); torch.distributed.checkpoint's check of the global plan (on the coordinator) must still refuse
    blocks that overlap. (Its other check, that the blocks cover each tensor, needs two ranks' plans; a refusal
    reaches only the coordinator, so the other ranks would wait: not tested in the pool.)"""
    with pytest.raises(ValueError, match="Failed to validate global plan"):
        write_row_blocks(str(tmp_path / "checkpoint"), [(0, 3), (2, 4)])
