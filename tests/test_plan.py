"""The layout planner against the model actually built: per-rank parameters and memory."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import debug_batch, debug_model_config
from training.plan import Hardware, estimate, params_per_stage, plan


def local_parameters(tp: int, pp: int, preset: str = "parti-debug") -> tuple[int, int]:
    """(pipeline stage, parameters held by this rank) of a debug model built at TP x PP."""
    from megatron.core import parallel_state as ps

    from model_parallel.kernels import select_kernels
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel

    init_parallel(tp, pp)
    cfg = debug_model_config(**{"model.preset": preset})
    if pp > 1:
        from model_parallel.pipeline import build_pipeline
        from training.deepspeed_glue import init_deepspeed

        init_deepspeed()
        model = build_pipeline(cfg, select_kernels(), pp, init_seed=1)
    else:
        model = PartiModel(cfg)
    return ps.get_pipeline_model_parallel_rank(), sum(p.numel() for p in model.parameters())


def test_per_rank_parameters_equal_the_built_model(single_process, pool2, pool4):
    cfg = debug_model_config()
    for pool, tp, pp in ((pool2, 2, 1), (pool4, 2, 2)):
        planned = params_per_stage(cfg, tp, pp)
        for stage, count in pool.run(local_parameters, tp, pp):
            assert count == planned[stage], (tp, pp, stage)
    assert sum(params_per_stage(cfg, 1, 2)) == sum(params_per_stage(cfg, 1, 1)) == 313_088
    dalle = debug_model_config(**{"model.preset": "dalle-debug"})
    planned = params_per_stage(dalle, 2, 2)
    for stage, count in pool4.run(local_parameters, 2, 2, "dalle-debug"):
        assert count == planned[stage], ("dalle", stage)


def measured_bytes(tp: int, batch: int, preset: str) -> tuple[int, int]:
    """(weights + gradients + Adam moments, activations saved for backward) on this rank."""
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel

    init_parallel(tp, 1)
    cfg = debug_model_config(**{"model.preset": preset})
    model = PartiModel(cfg)
    params = list(model.parameters())
    param_storage = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storage:  # linear layers also keep their weight
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    text, codes = debug_batch(cfg, batch=batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(text, codes)
    loss.backward()
    opt = torch.optim.AdamW(params)
    opt.step()
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    model_states = sum(p.numel() * 4 for p in params) + sum(p.grad.numel() * 4 for p in params) + states
    return model_states, sum(saved.values())


@pytest.mark.parametrize("tp, batch, preset", [(1, 8, "parti-debug"), (2, 8, "parti-debug"), (2, 2, "parti-debug"),
                                               (2, 8, "dalle-debug")])
def test_memory_estimate_within_30_percent_of_measured(single_process, pool2, tp, batch, preset):
    model_states, activations = pool2.run(measured_bytes, tp, batch, preset)[0]
    cfg = debug_model_config(**{"model.preset": preset})
    o = estimate(cfg, tp, 1, 1, 0, batch, batch, "fp32", "none", Hardware())
    estimated = o.total_gb * 2**30
    assert abs(estimated / (model_states + activations) - 1) < 0.3, (estimated, model_states, activations)
    assert abs(o.activations_gb * 2**30 / activations - 1) < 0.3


def test_parti_20b_on_64_nodes_fits_and_says_why_smaller_layouts_do_not():
    fits, misses, _ = plan("parti-20b", nodes=64, hw=Hardware(gpus_per_node=8), gpu_mem_gb=80)
    assert fits and fits[0].total_gb + 4 <= 80 and fits[0].tp * fits[0].pp * fits[0].dp == 512
    unsplit = next(o for o in misses if (o.tp, o.pp, o.zero) == (1, 1, 0))
    assert unsplit.total_gb > 300 and unsplit.params == 20_540_899_328  # the whole model on one GPU
    assert all(o.peak_gb + 4 > 80 for o in misses)  # in training or while being built


def test_construction_memory_follows_what_is_built():
    """Below ZeRO-3 the stage is built whole in fp32 (parti-20b at TP=1: 76.5 GiB per GPU before the first
    step); at ZeRO-3, under zero.Init, one layer at a time: a layout is judged by the larger of the two peaks."""
    from model_parallel.config import model_config

    m = model_config("parti-20b")
    hw = Hardware()
    zero0 = estimate(m, 1, 1, 64, 0, 1, 64, "bf16", "full", hw)
    zero3 = estimate(m, 1, 1, 64, 3, 1, 64, "bf16", "full", hw)
    assert zero0.construction_gb == pytest.approx(20_540_899_328 * 4 / 2**30) and zero0.peak_gb >= 76.5
    assert zero3.construction_gb < 1.1 and zero3.peak_gb == zero3.total_gb  # one decoder layer: 1.0 GiB
    fits, misses, _ = plan("parti-20b", 8, hw, gpu_mem_gb=80)
    assert all(o.peak_gb + 4 <= 80 for o in fits) and any(o.construction_gb + 4 > 80 for o in misses)


def test_run_costs_follow_what_a_checkpoint_and_a_code_shard_hold(single_process):
    """Checkpoint bytes: fp32 master + two AdamW moments per parameter (parti-debug: 313,088 parameters);
    the data rate: the global batch per step in code-shard records (text ids + codes + caption + key)."""
    import numpy as np

    from data_pipeline.code_shards import record_dtype
    from model_parallel.config import model_config
    from training.plan import Layout, run_costs

    m = model_config("parti-debug")
    layout = Layout(tp=2, pp=2, dp=4, zero=1, params=0, weights_gb=0, grads_gb=0, optimizer_gb=0, activations_gb=0,
                    step_s=0.5)
    c = run_costs(m, 313_088, layout, global_batch=64, fs_gbs=2.0)
    assert c.checkpoint_gb * 1e9 == pytest.approx(313_088 * 3 * 4)
    assert c.write_s == pytest.approx(313_088 * 12 / 2e9)
    assert c.writers == 16 and c.host_gb_per_writer * 2**30 == pytest.approx(313_088 * 12 / 16)  # each rank its part
    record = np.dtype(record_dtype(m.image_seq_len, m.text_seq_len)).itemsize
    assert record > 2 * (m.image_seq_len + m.text_seq_len)  # ids and codes at least
    assert c.samples_per_s == 128 and c.data_mb_per_s == pytest.approx(128 * record / 1e6)
