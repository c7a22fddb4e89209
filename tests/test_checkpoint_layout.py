"""How a rank's ZeRO part becomes checkpoint blocks: `flat_blocks` against a brute-force reference, and
`own_fragment`'s parts of each parameter over two data-parallel ranks."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

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


def zero_fragments(stage: int, step: bool) -> list:
    """A Linear(3, 1) (weight 3, bias 1: odd sizes) at ZeRO-`stage`, DP=2, after one step or none (the state a
    save finds when every step so far was skipped as non-finite): for each parameter (name, numel, the whole fp32
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
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
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


@pytest.mark.parametrize("stage, step", [(3, True), (1, False)], ids=["zero3", "zero1-before-any-step"])
def test_zero_fragments_cover_each_parameter_once(pool2, stage, step):
    """own_fragment over the two data-parallel ranks: each parameter's fragments (master weight and exp_avg)
    are disjoint, cover its elements exactly and hold its values. ZeRO-3 pads the last partition of an
    odd-sized parameter (2 elements a rank): no padding past its end, which a save would place outside the
    tensor. ZeRO-1 before its first step: the exp_avg views exist once ensure_optimizer_state made the state."""
    ranks = pool2.run(zero_fragments, stage, step)
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
