"""Sharded initialisation (model_parallel/init.py): the same weights at any TP size, each rank drawing
only its shard; shards of any layout are slices of one whole; pipeline pieces keep their weights."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.conftest import debug_model_config
from tests.distributed import StandInGroup


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter gathered over the TP group along its partition dimension (itself if not split)."""
    from megatron.core import parallel_state as ps

    if not getattr(t, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=t.partition_dim)


def built_weights(tp: int, init_seed: int):
    """Build the debug model at `tp`; return its full weights, the values this rank's init methods
    drew, and the names of its TP-split parameters."""
    from model_parallel import init
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel

    init_parallel(tp=tp)
    init.draw_counts.update(split=0, whole=0)
    model = PartiModel(debug_model_config(), init_seed=init_seed)
    counts = dict(init.draw_counts)
    split = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    return {n: _full(p) for n, p in model.named_parameters()}, counts, split


@pytest.fixture(scope="module")
def layouts(pool2):
    return pool2.run(built_weights, 1, 7)[0], pool2.run(built_weights, 2, 7)


def test_full_weights_at_tp2_equal_tp1(layouts):
    (weights1, _, _), ((weights2, _, split), (other_rank, _, _)) = layouts
    assert set(weights2) == set(weights1) == set(other_rank)
    assert len(split) == 37  # every linear layer (weight, column-parallel bias) and vocab embedding
    for name in weights1:
        torch.testing.assert_close(weights2[name], weights1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(other_rank[name], weights1[name], rtol=0, atol=0, msg=name)


def test_each_rank_draws_only_its_shard(layouts):
    (_, counts1, _), ((_, counts_rank0, _), (_, counts_rank1, _)) = layouts
    assert counts1["split"] > 300_000  # the split matrices of the debug model
    # At TP=2 a rank draws half of every split matrix, and the unsplit position tables whole.
    assert counts_rank0["split"] == counts_rank1["split"] == counts1["split"] // 2
    assert counts_rank0["whole"] == counts_rank1["whole"] == counts1["whole"] > 0


@pytest.mark.parametrize("full, slice_values", [(48, 64), (64, 16), (24, 4096), (40, 7), (1, 100), (6, 3)])
def test_shards_of_every_layout_are_slices_of_the_whole(full, slice_values):
    from model_parallel.init import draw_slices, shard_runs, tile_slices

    whole = torch.empty(full, slice_values)
    assert draw_slices((5, 2), full, slice_values, [(0, 0, full)], whole, std=0.5) == whole.numel()
    assert whole.std().item() == pytest.approx(0.5, rel=0.2)
    assert len({tuple(row[:4].tolist()) for row in whole}) == full  # every slice its own values
    c = tile_slices(full, slice_values)
    for world in range(1, full + 1):
        for stride in (1, 2):
            if full % (world * stride):
                continue
            local = full // world
            for rank in range(world):
                shard = torch.empty(local, slice_values)
                runs = shard_runs(local, rank, world, stride)
                drawn = draw_slices((5, 2), full, slice_values, runs, shard, std=0.5)
                # megatron-core's split: chunks of local/stride slices dealt round-robin to the ranks
                chunks = torch.split(whole, local // stride)[rank::world]
                torch.testing.assert_close(shard, torch.cat(chunks), rtol=0, atol=0,
                                           msg=f"{world=} {rank=} {stride=}")
                if (local // stride) % c == 0:  # tiles nest in the shard: nothing but the shard is drawn
                    assert drawn == shard.numel()
                else:  # and else at most the rest of the two tiles at the ends of each run of slices
                    assert shard.numel() <= drawn <= shard.numel() + stride * 2 * (c - 1) * slice_values


def test_tiles_nest_in_the_shards_of_tp_up_to_8():
    from model_parallel.init import TILE_VALUES, tile_slices

    assert tile_slices(3 * 4096, 4096) == 16 and tile_slices(16384, 4096) == 16  # parti-20b qkv, fc1 rows
    assert tile_slices(8320, 1024) == 16 and tile_slices(1000, 64) == 1  # 1000 slices: 8 does not divide 125
    for full, values in [(12288, 4096), (4096, 16384), (16000, 4096), (8320, 1024), (64, 64)]:
        c = tile_slices(full, values)
        assert c * values <= max(TILE_VALUES, values) and all((full // tp) % c == 0 for tp in (1, 2, 4, 8))


def test_weights_are_normal_distinct_and_seeded(single_process):
    from model_parallel.model import PartiModel

    cfg = debug_model_config()
    a, b, c = (dict(PartiModel(cfg, init_seed=s).named_parameters()) for s in (3, 3, 4))
    drawn = [n for n, p in a.items() if p.dim() == 2]
    assert len(drawn) == 28  # the linear layers' weights, vocab and position embeddings
    for n in drawn:
        assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n]), n
        scaled = n.endswith(("proj.weight", "fc2.weight")) and not n.startswith("head")
        std = cfg.init_std / (2 * (cfg.encoder_layers + cfg.decoder_layers)) ** 0.5 if scaled else cfg.init_std
        assert a[n].mean().abs() < 5 * std / a[n].numel() ** 0.5, n
        assert a[n].std().item() == pytest.approx(std, rel=0.15 if a[n].numel() < 1000 else 0.05), n
    firsts = {a[n].flatten()[:8].tolist().__repr__() for n in drawn}
    assert len(firsts) == len(drawn)  # every weight has its own key


def test_a_piece_built_alone_has_the_models_weights(single_process):
    """Pipeline stages build only some pieces, each after torch.manual_seed(init_seed + k)."""
    from model_parallel.model import PartiModel, piece_classes, piece_context

    cfg = debug_model_config()
    model = dict(PartiModel(cfg, init_seed=9).named_parameters())
    pieces = piece_classes(cfg)
    for k, (name, cls) in enumerate(pieces):
        if name not in ("head", "decoder.1", "image_embedding"):
            continue
        prefix = name + "."
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(9 + k)
            piece = cls(piece_context(cfg))
        for n, p in piece.named_parameters():
            torch.testing.assert_close(p, model[prefix + n], rtol=0, atol=0, msg=prefix + n)


def test_meta_build_allocates_nothing(single_process):
    from model_parallel import init
    from model_parallel.model import PartiModel

    init.draw_counts.update(split=0, whole=0)
    with torch.device("meta"):
        model = PartiModel(debug_model_config(), meta=True)
    assert all(p.is_meta for p in model.parameters())
    assert init.draw_counts == {"split": 0, "whole": 0}


def _marks(module: torch.nn.Module) -> dict:
    return {n: {k: v for k, v in vars(p).items() if not k.startswith("_")} for n, p in module.named_parameters()}


def test_a_build_for_a_resume_draws_nothing_and_marks_the_split_weights(single_process):
    """A resume builds without initialising (its checkpoint fills every weight): nothing is drawn, and every
    parameter carries the tensor-parallel marks an initialised build has (megatron-core sets them in its
    initialisation only; the checkpoint blocks and the gradient clipping read them), in PartiModel and in the
    pipeline's stages."""
    from model_parallel import init
    from model_parallel.kernels import select_kernels
    from model_parallel.model import PartiModel
    from model_parallel.pipeline import build_pipeline
    from training.deepspeed_glue import init_deepspeed

    cfg = debug_model_config()
    init_deepspeed()
    init.draw_counts.update(split=0, whole=0)
    bare = PartiModel(cfg, init_seed=3, initialize=False)
    assert init.draw_counts == {"split": 0, "whole": 0}
    marks = _marks(PartiModel(cfg, init_seed=3))
    assert sum("tensor_model_parallel" in m for m in marks.values()) > 10 and _marks(bare) == marks
    assert _marks(build_pipeline(cfg, select_kernels(), 1, 3, initialize=False)) == _marks(
        build_pipeline(cfg, select_kernels(), 1, 3))


def test_draws_stay_on_the_cpu_when_factories_default_elsewhere(single_process):
    """deepspeed.zero.Init (ZeRO-3) sends factory calls without a device to the GPU, where the CPU tile
    generators cannot draw (seen on an H200); the init must name the CPU for its buffers. A default
    device of 'meta' stands in for the GPU here."""
    from model_parallel.init import ShardedNormalInit

    torch.manual_seed(5)
    expected = ShardedNormalInit(0.02)(torch.empty(64, 32))
    torch.manual_seed(5)
    target = torch.empty(64, 32)
    with torch.device("meta"):
        ShardedNormalInit(0.02)(target)
    torch.testing.assert_close(target, expected, rtol=0, atol=0)


def test_draws_stay_float32_under_zero_init_factories(single_process, monkeypatch):
    """deepspeed.zero.Init (ZeRO-3) wraps torch's tensor factories so that every floating result is cast to
    the training dtype, dtype=float32 or not; torch 2.11 draws other values into bf16 than into float32,
    so a bf16 ZeRO-3 model differed from ZeRO-0/1's there (its train_resume check failed). Under DeepSpeed's
    own wrapper, a whole weight and a shard that cuts its tiles keep their float32 values exactly."""
    from deepspeed.runtime.zero import partition_parameters as pp

    from model_parallel.init import ShardedNormalInit, draw_slices, shard_runs, tile_slices

    full, values, world, stride, rank = 64, 16, 8, 2, 1
    local = full // world
    assert (local // stride) % tile_slices(full, values)  # the shard starts and ends inside tiles
    runs = shard_runs(local, rank, world, stride)

    def draw(weight: torch.Tensor, shard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(5)
        ShardedNormalInit(0.02)(weight)
        draw_slices((5, 2), full, values, runs, shard, std=0.5)
        return weight, shard

    targets = [torch.ones(64, 32), torch.ones(local, values)]  # float32, made before the wrapper
    expected = draw(torch.ones(64, 32), torch.ones(local, values))
    for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "eye", "randn"):
        monkeypatch.setattr(torch, name, pp.zero_wrapper_for_fp_tensor_constructor(
            getattr(pp, f"_orig_torch_{name}"), torch.bfloat16, None))
    assert torch.empty(2, dtype=torch.float32).dtype == torch.bfloat16  # the wrapper is in place
    got = draw(*targets)
    monkeypatch.undo()
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_shard_inside_a_tile_draws_and_counts_the_whole_tile():
    from model_parallel.init import draw_slices, tile_slices

    assert tile_slices(64, 1) == 8
    whole, part = torch.empty(64, 1), torch.empty(2, 1)
    draw_slices((5, 2), 64, 1, [(0, 0, 64)], whole)
    assert draw_slices((5, 2), 64, 1, [(0, 3, 2)], part) == 8  # slices 3-4: all of tile 0 drawn
    torch.testing.assert_close(part, whole[3:5], rtol=0, atol=0)


def test_the_drawn_values_are_those_of_earlier_versions():
    """A weight's values follow from its key alone, in every release: Philox(key = (seed, n)) at counter
    tile x 2**64 fills the Mersenne-Twister words (a change here changes every fresh run's weights)."""
    from model_parallel.init import draw_slices

    out = torch.empty(16, 4)
    draw_slices((1234, 5), 16, 4, [(0, 0, 16)], out)
    expected = [[-0.3309102952480316, 1.0316358804702759], [-0.9909427165985107, 0.5674116611480713]]
    torch.testing.assert_close(out[[0, 15], :2], torch.tensor(expected), rtol=0, atol=1e-6)


def _split(rows: int, cols: int, stride: int = 1) -> torch.Tensor:
    tensor = torch.empty(rows, cols)
    tensor.tensor_model_parallel, tensor.partition_dim, tensor.partition_stride = True, 0, stride
    return tensor


def test_a_strided_split_weight_gets_its_chunks_of_the_whole():
    """partition_stride 2 at TP=2: rank 1 holds chunks 1 and 3 of four (megatron-core's split)."""
    from model_parallel.init import InitKeys, ShardedNormalInit

    torch.manual_seed(11)
    whole = ShardedNormalInit(1.0, InitKeys())(_split(8, 3, stride=2))
    torch.manual_seed(11)
    shard = ShardedNormalInit(1.0, InitKeys(), tp_group=StandInGroup(2, 1))(_split(4, 3, stride=2))
    torch.testing.assert_close(shard, whole[[2, 3, 6, 7]], rtol=0, atol=0)


def test_a_scalar_a_meta_tensor_and_an_unregistered_tensor():
    """A 0-d weight is drawn (one value); a meta tensor draws nothing; a tensor that is not the parameter registered
    last takes the seed of now, not that parameter's."""
    from model_parallel import init

    torch.manual_seed(3)
    keys = init.InitKeys()
    scalar = init.ShardedNormalInit(1.0, keys)(torch.empty(()))
    assert scalar.shape == () and torch.isfinite(scalar)
    before = dict(init.draw_counts)
    init.ShardedNormalInit(1.0, keys)(torch.empty(4, 4, device="meta"))
    assert init.draw_counts == before
    torch.manual_seed(5)
    torch.nn.Linear(2, 2)  # (its parameters registered under seed 5)
    torch.manual_seed(6)
    init.ShardedNormalInit(1.0, keys)(torch.empty(3))
    assert keys.seed == 6


def test_an_unseeded_model_parallel_stream_differs_per_tp_rank(single_process):
    """ensure_model_parallel_rng, when seed_everything has not run: each TP rank its own stream (split heads)."""
    from megatron.core.tensor_parallel import random as mrandom

    from model_parallel.init import ensure_model_parallel_rng

    tracker = mrandom.get_cuda_rng_tracker()
    saved = tracker.get_states(), set(getattr(tracker, "seeds_", ()))
    try:
        tracker.reset()
        torch.manual_seed(40)
        ensure_model_parallel_rng(tp_rank=1)
        expected = torch.Generator().manual_seed(40 + 2718 + 1).get_state()
        assert torch.equal(tracker.get_states()[mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME], expected)
    finally:
        tracker.reset()
        tracker.set_states(saved[0])
        if hasattr(tracker, "seeds_"):
            tracker.seeds_ = saved[1]
