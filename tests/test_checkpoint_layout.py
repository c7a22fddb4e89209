"""How a rank's ZeRO part becomes checkpoint blocks: `flat_blocks` against a brute-force reference."""
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
