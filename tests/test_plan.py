"""The layout planner against the model actually built: per-rank parameters and memory."""
from __future__ import annotations

import json

import pytest
import torch

from model_parallel.config import model_config
from model_parallel.model import piece_classes
from tests.conftest import H200_RUN, H200_RUN_2, debug_batch, debug_model_config
from training.plan import Hardware, activation_bytes, estimate, params_per_stage, plan


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


def measured_bytes(tp: int, batch: int, preset: str, dropout: float = 0.0) -> tuple[int, int]:
    """(weights + gradients + Adam moments, activations saved for backward) on this rank."""
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel

    init_parallel(tp, 1)
    cfg = debug_model_config(**{"model.preset": preset, "model.dropout": dropout})
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
        loss = model.loss(text, codes, torch.arange(batch))  # sample positions: training's keyed dropout
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


def test_dropout_masks_are_estimated_as_autograd_keeps_them(single_process, pool2):
    """With model.dropout every dropout site (embeddings, each residual branch) keeps a bool mask for the
    backward pass: what that adds to the estimate is what it adds to the tensors autograd saves."""
    without, with_dropout = (pool2.run(measured_bytes, 2, 8, "parti-debug", p)[0][1] for p in (0.0, 0.1))
    cfg = lambda p: debug_model_config(**{"model.dropout": p})
    estimated = lambda p: activation_bytes(cfg(p), 8, 2, 4, "none", (2, 2), head=True, embeddings=True)
    assert with_dropout - without == pytest.approx(estimated(0.1) - estimated(0.0), rel=0.05)
    full = lambda p: activation_bytes(cfg(p), 8, 2, 4, "full", (2, 2), head=True, embeddings=True)
    assert full(0.1) - full(0.0) == 8 * (16 + 16) * 64  # the embeddings' masks: the layers' are recomputed


def test_full_recomputation_adds_one_recomputed_layer_per_stage():
    """Under full recomputation a stage keeps each in-flight micro-batch's layer inputs, and the tensors of the
    one layer it is recomputing, once: at PP=2 stage 0 holds two micro-batches in flight."""
    from training.plan import recomputed_layer_bytes, stage_pieces

    m, hw = debug_model_config(**{"model.dropout": 0.1}), Hardware()
    assert recomputed_layer_bytes(m, 8, 1, 2, "full", (2, 2)) == activation_bytes(m, 8, 1, 2, "none", (0, 1))
    assert recomputed_layer_bytes(m, 8, 1, 2, "full", (2, 0)) == activation_bytes(m, 8, 1, 2, "none", (1, 0))
    assert recomputed_layer_bytes(m, 8, 1, 2, "selective", (2, 2)) == 0
    o = estimate(m, 1, 2, 1, 1, 8, 64, "bf16", "full", hw)
    kinds = [cls.__name__ for _, cls in piece_classes(m)]
    expected = []
    for s, stage in enumerate(stage_pieces(m, 2)):
        layers = (sum(kinds[k] == "EncoderLayer" for k in stage), sum(kinds[k] == "DecoderLayer" for k in stage))
        saved = activation_bytes(m, 8, 1, 2, "full", layers, head=s == 1, embeddings=s == 0) * (2 - s)
        expected.append(saved + recomputed_layer_bytes(m, 8, 1, 2, "full", layers))
    assert o.activations_gb * 2**30 in [pytest.approx(e) for e in expected]


def data_parallel_traffic(zero: int, n_micro: int, run_dir: str, *overrides: str) -> tuple[int, dict]:
    """(parameters, {(collective, dtype): bytes in ring passes}) of one bf16 training step at DP=2 with `n_micro`
    micro-batches, counted on DeepSpeed's communication backend (every collective the engine runs goes
    through it): an all-reduce counts its tensor twice, an all-gather its output and a reduce-scatter its
    input once. The model is wide enough (256) that ZeRO-3 partitions its matrices (it keeps parameters
    under 100k elements whole)."""
    import deepspeed.comm.comm as ds_comm

    from bench.gpu_mfu import _random_micro_batches
    from training.config import load_config
    from training.engine import train_step
    from training.trainer import Trainer

    cfg = load_config(None, ["model.preset=parti-debug", "model.hidden_size=256", "model.ffn_hidden_size=1024",
                             "train.precision=bf16", f"parallel.zero_stage={zero}", "model.dropout=0",
                             "model.caption_drop_prob=0", f"train.global_batch_size={2 * n_micro}",
                             "train.micro_batch_size=1", "train.steps=10", *overrides])
    trainer = Trainer(cfg, run_dir)
    data = _random_micro_batches(cfg.model, 1, n_micro, "cpu")
    train_step(trainer.engine, cfg, data, "cpu")  # (ZeRO-3 traces its parameter order in the first step)
    passes = {"all_reduce": 2, "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}
    traffic = {}

    def counted(name, collective):
        def run(*args, **kwargs):
            tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
            key = (name, str(tensors[0].dtype))
            traffic[key] = traffic.get(key, 0) + passes[name] * max(t.numel() * t.element_size() for t in tensors)
            return collective(*args, **kwargs)
        return run

    backend = ds_comm.cdb
    for name in passes:
        setattr(backend, name, counted(name, getattr(backend, name)))
    try:
        train_step(trainer.engine, cfg, data, "cpu")
    finally:
        for name in passes:
            delattr(backend, name)  # (the instance attributes shadowed the class's methods)
        trainer.log.close()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    return params, traffic


def test_data_parallel_traffic_is_what_deepspeed_sends(pool2, pool4, tmp_path):
    """dp_bytes_per_param against DeepSpeed's own collectives at DP=2, two micro-batches per step, bf16:
    ZeRO-0 all-reduces bf16 gradients once; ZeRO 1-3 reduce fp32-accumulated gradients in fp32 (not cast to
    bf16, DeepSpeed's default): ZeRO-1 once and all-gathers the weights, ZeRO-2 after each micro-batch, ZeRO-3
    reduce-scatters after each and gathers weights at most twice per micro-batch; ZeRO-0 of a bf16 pipeline
    (PP=2, BF16_Optimizer) all-reduces and all-gathers once."""
    from training.plan import dp_bytes_per_param

    for zero in (0, 1, 2, 3):
        params, traffic = pool2.run(data_parallel_traffic, zero, 2, str(tmp_path / str(zero)))[0]
        total = sum(v for v in traffic.values() if v > 1024)  # (scalars: the loss, the norm, the skip flag)
        planned = params * dp_bytes_per_param(zero, 2, 2)
        if zero < 3:
            assert total == pytest.approx(planned, rel=0.01), (zero, traffic)
        else:
            gathered = traffic[("all_gather_into_tensor", "torch.bfloat16")]
            assert traffic[("reduce_scatter_tensor", "torch.float32")] == 2 * params * 4
            assert 2 * params * 2 * 0.5 < gathered <= 2 * 2 * params * 2, traffic  # most weights, once or twice
        reduced = {dtype for (name, dtype), v in traffic.items() if name != "all_gather_into_tensor" and v > 1024}
        assert reduced == {"torch.bfloat16" if zero == 0 else "torch.float32"}, (zero, traffic)
    stage_params, traffic = pool4.run(data_parallel_traffic, 0, 2, str(tmp_path / "pp"), "parallel.pp=2")[0]
    assert sum(v for v in traffic.values() if v > 1024) == pytest.approx(
        stage_params * dp_bytes_per_param(0, 2, 2, pipeline=True), rel=0.01), traffic


def h200_measurements() -> list[tuple[str, int, int, dict]]:
    """(preset, micro-batch, micro-batches per step, what was measured) of the two GPU runs' MFU sections: bf16,
    ZeRO-1, one GPU, no recomputation, no dropout; one micro-batch per step in the first, 4 in the second."""
    points = []
    for run in (H200_RUN, H200_RUN_2):
        sections = json.loads(run.read_text())["sections"]
        points += [(s["preset"], int(b), s.get("accumulation", 1), r)
                   for s in (sections["mfu_350m"], sections["mfu_3b"]) for b, r in s["by_micro_batch"].items()]
    return points


def test_estimates_follow_what_an_h200_measured():
    """Against an H200 (parti-350m at micro-batches 4-128, parti-3b at 2-24, one and four micro-batches per
    step): the estimated memory within 12% of the allocated peak and, with the margin and headroom a layout must
    leave, above it; the step time within 20%, small micro-batches' fixed cost included (parti-350m: 0.094 s at
    4, 0.26 s at 16x that)."""
    points = h200_measurements()
    assert len(points) == 12
    for preset, micro_batch, accumulation, measured in points:
        o = estimate(model_config(preset), 1, 1, 1, 1, micro_batch, micro_batch * accumulation, "bf16", "none",
                     Hardware())
        assert abs(o.total_gb / measured["peak_gib"] - 1) < 0.12, (preset, micro_batch)
        assert o.over_gb(measured["peak_gib"]) > 0, (preset, micro_batch)  # would not be planned to fill the GPU
        assert abs(o.step_s / measured["step_s"] - 1) < 0.2, (preset, micro_batch, o.step_s)


def test_recomputation_and_small_micro_batches_cost_time():
    m, hw = model_config("parti-350m"), Hardware()
    step = {r: estimate(m, 1, 1, 32, 1, 16, 8192, "bf16", r, hw).step_s for r in ("none", "selective", "full")}
    assert step["none"] < step["selective"] < step["full"]
    assert step["full"] / step["none"] > 1.3  # the forward again: 4/3 of the FLOPs and of the fixed cost
    per_sample = [estimate(m, 1, 1, 32, 1, b, 8192, "bf16", "none", hw).step_s for b in (1, 4, 16, 64)]
    assert per_sample == sorted(per_sample, reverse=True) and per_sample[0] > 3 * per_sample[-1]
    free = Hardware(overhead_ms_per_layer=0)  # without the fixed cost the micro-batch would not matter
    assert estimate(m, 1, 1, 32, 1, 1, 8192, "bf16", "none", free).step_s == pytest.approx(
        estimate(m, 1, 1, 32, 1, 64, 8192, "bf16", "none", free).step_s)


def test_fp32_runs_compute_at_the_tf32_peak():
    """fp32 runs multiply on TF32 tensor cores, at half the bf16 peak (training/flops.py; the trainer's MFU
    divides by it): twice the compute time, the same MFU against that peak."""
    m, free = model_config("parti-350m"), Hardware(overhead_ms_per_layer=0)  # (one GPU: no communication)
    o = {p: estimate(m, 1, 1, 1, 1, 8, 8, p, "none", free) for p in ("bf16", "fp32")}
    assert o["fp32"].step_s == pytest.approx(2 * o["bf16"].step_s)
    assert o["fp32"].mfu == pytest.approx(o["bf16"].mfu)


def test_the_chosen_micro_batch_and_recomputation_are_the_fastest_that_fit():
    """For every (TP, PP, ZeRO), the plan's choice fits and is at least as fast as every micro-batch and
    recomputation that fits (tried one by one); where it finds none, none fits. With little memory it
    recomputes, with plenty it does not."""
    from training.plan import piece_params

    m, hw = model_config("parti-3b"), Hardware()
    pieces = {tp: piece_params(m, tp) for tp in (1, 2, 4, 8)}
    for memory in (24, 80):
        fits, misses, _ = plan("parti-3b", 2, hw, memory, 512)
        assert fits and (misses or memory == 80)  # (at 80 GB every split fits)
        for o in fits + misses:
            tried = [estimate(m, o.tp, o.pp, o.dp, o.zero, b, 512, "bf16", mode, hw,
                              params_per_stage(m, o.tp, o.pp, pieces[o.tp]), max(pieces[o.tp]))
                     for b in (2**k for k in range(10)) if b * o.dp <= 512 for mode in ("none", "selective", "full")]
            fitting = [t.step_s for t in tried if t.over_gb(memory) <= 0]
            if o in fits:
                assert o.over_gb(memory) <= 0 and o.step_s <= min(fitting), (memory, o)
            else:
                assert not fitting, (memory, o)
        modes = {o.recompute for o in fits}
        assert modes == {"full"} if memory == 24 else "none" in modes, (memory, modes)


def test_parti_20b_on_64_nodes_fits_and_says_why_smaller_layouts_do_not():
    fits, misses, _ = plan("parti-20b", nodes=64, hw=Hardware(gpus_per_node=8), gpu_mem_gb=80)
    assert fits and fits[0].total_gb + 4 <= 80 and fits[0].tp * fits[0].pp * fits[0].dp == 512
    unsplit = next(o for o in misses if (o.tp, o.pp, o.zero) == (1, 1, 0))
    assert unsplit.total_gb > 300 and unsplit.params == 20_540_899_328  # the whole model on one GPU
    assert all(o.over_gb(80) > 0 for o in misses)  # in training or while being built


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
    assert c.writers == 16 and c.host_gb_per_writer * 1e9 == pytest.approx(313_088 * 12 / 16)  # each rank its part
    record = np.dtype(record_dtype(m.image_seq_len, m.text_seq_len)).itemsize
    assert record > 2 * (m.image_seq_len + m.text_seq_len)  # ids and codes at least
    assert c.samples_per_s == 128 and c.data_mb_per_s == pytest.approx(128 * record / 1e6)
    # with the moving average of the weights (train.ema_decay), a fourth fp32 value per parameter
    assert run_costs(m, 313_088, layout, 64, 2.0, ema=True).checkpoint_gb * 1e9 == pytest.approx(313_088 * 4 * 4)


def test_memory_terms_per_parameter_and_stage():
    """Per parameter: weights in the run's dtype (/DP at ZeRO-3), gradients in fp32 (/DP from ZeRO-2) except
    bf16 ZeRO-0 under the pipeline engine (DeepSpeed's BF16_Optimizer: bf16, optimizer state over DP as at
    ZeRO-1), optimizer state 12 bytes for bf16 (fp32 master + two moments), 8 for fp32 (/DP from ZeRO-1). The
    layout's figures are those of its most loaded stage, whose activations count min(PP - stage, micro-batches)
    micro-batches in flight."""
    from training.plan import recomputed_layer_bytes, stage_pieces

    m, hw, gb = debug_model_config(), Hardware(), 2**30
    for precision, pp, zero, (w, g, o) in (("fp32", 1, 0, (4, 4, 8)), ("fp32", 1, 1, (4, 4, 8 / 2)),
                                           ("bf16", 1, 0, (2, 4, 12)), ("bf16", 1, 1, (2, 4, 12 / 2)),
                                           ("bf16", 2, 0, (2, 2, 12 / 2)), ("fp32", 2, 0, (4, 4, 8)),
                                           ("bf16", 1, 3, (2 / 2, 4 / 2, 12 / 2))):
        layout = estimate(m, 1, pp, 2, zero, 1, 8, precision, "none", hw)
        assert (layout.weights_gb, layout.grads_gb, layout.optimizer_gb) == pytest.approx(
            (layout.params * w / gb, layout.params * g / gb, layout.params * o / gb)), (precision, pp, zero)
        # train.ema_decay's moving average: one more fp32 value per parameter, sharded as the optimizer state is
        averaged = estimate(m, 1, pp, 2, zero, 1, 8, precision, "none", hw, ema=True)
        whole = 12 if precision == "bf16" else 8  # (o: whole / the DP size the state is sharded over)
        assert averaged.optimizer_gb == pytest.approx(layout.params * (whole + 4) * (o / whole) / gb)
    m = debug_model_config(**{"model.preset": "dalle-debug"})  # (its caption head makes the last stage the larger)
    kinds = [cls.__name__ for _, cls in piece_classes(m)]
    for micro_batches in (1, 4):  # one micro-batch per step: never more than one in flight
        layout = estimate(m, 1, 2, 1, 1, 2, 2 * micro_batches, "bf16", "none", hw)
        stages = []
        for s, (params, stage) in enumerate(zip(params_per_stage(m, 1, 2), stage_pieces(m, 2))):
            layers = (sum(kinds[k] == "EncoderLayer" for k in stage), sum(kinds[k] == "DecoderLayer" for k in stage))
            act = (activation_bytes(m, 2, 1, 2, "none", layers, head=s == 1, embeddings=s == 0)
                   * min(2 - s, micro_batches))
            stages.append((params * (2 + 4 + 12) + act, params, act))
        total, params, act = max(stages)
        assert (layout.params, layout.activations_gb, layout.total_gb) == (params, pytest.approx(act / gb),
                                                                           pytest.approx(total / gb))
        assert stages.index(max(stages)) == (1 if micro_batches == 1 else 0)  # (the head's stage; the first's two)
    assert recomputed_layer_bytes(m, 8, 1, 2, "full", (0, 0)) == 0  # a stage without layers recomputes none


def test_activation_terms_by_hand():
    """Selective recomputation keeps all but SDPA's output (queries x hidden / TP per layer); a decoder-only head
    with a text loss keeps the caption's T - 1 logits beside the image's N, each in the model's dtype plus 8 bytes
    of fp32 copies."""
    m = debug_model_config()
    h, T, N = m.hidden_size, m.text_seq_len, m.image_seq_len
    for tp in (1, 2):
        dropped = activation_bytes(m, 2, tp, 2, "none", (1, 1)) - activation_bytes(m, 2, tp, 2, "selective", (1, 1))
        assert dropped == 2 * 2 * (T + N) * h // tp
    dalle = debug_model_config(**{"model.preset": "dalle-debug"})
    assert dalle.text_loss_weight > 0
    logits = dalle.image_seq_len * dalle.image_vocab_size + (dalle.text_seq_len - 1) * dalle.text_vocab_size
    assert activation_bytes(dalle, 1, 1, 2, "full", (0, 0), head=True) == logits * (2 + 8)


def test_communication_terms_by_hand():
    """TP: 4 activation all-reduces per layer and micro-batch, 6 with full recomputation; DP traffic across nodes
    once the TP x DP ranks span more than a node; PP: a send and a receive of each micro-batch's activations."""
    from training.plan import communication_s, dp_bytes_per_param

    m, hw = debug_model_config(), Hardware()
    tp_time = {r: communication_s(m, 0, 2, 1, 1, 0, 1, 1, r, hw, 2, layers=3) for r in ("none", "full")}
    assert tp_time["none"] > 0 and tp_time["full"] == pytest.approx(1.5 * tp_time["none"])
    params = 1_000_000
    for tp, dp, bandwidth in ((2, 4, hw.intra_node_gbs), (2, 8, hw.inter_node_gbs), (1, 8, hw.intra_node_gbs)):
        assert communication_s(m, params, tp, 1, dp, 0, 1, 1, "none", hw, 2, layers=0) == pytest.approx(
            params * dp_bytes_per_param(0, 1, 2) * (dp - 1) / dp / (bandwidth * 1e9)), (tp, dp)
    tokens = m.text_seq_len + m.image_seq_len
    assert communication_s(m, 0, 1, 2, 1, 0, 1, 3, "none", hw, 2, layers=0) == pytest.approx(
        2 * 3 * tokens * m.hidden_size * 2 / (hw.inter_node_gbs * 1e9))
    # In a layout's step time the TP all-reduces are those of every layer of a stage, the encoder's included: the
    # step time's only term in the NVLink bandwidth at TP=2 x DP=1, so halving the bandwidth adds it once more.
    slow = Hardware(intra_node_gbs=hw.intra_node_gbs / 2)
    added = estimate(m, 2, 1, 1, 0, 2, 8, "bf16", "none", slow).step_s - estimate(m, 2, 1, 1, 0, 2, 8, "bf16", "none",
                                                                                    hw).step_s
    assert added == pytest.approx(communication_s(m, 0, 2, 1, 1, 0, 2, 4, "none", hw, 2,
                                                  layers=m.encoder_layers + m.decoder_layers))


def test_plan_weighs_splits_of_the_heads_and_layers_least_split_misses_first_and_refuses_nonsense():
    """TP divides the heads and PP the decoder layers (parti-tiny: 4 heads, 4 decoder layers; TP=8 and PP=3 would
    be possible splits of the GPUs); the misses come least split first; a dropout of 1, a negative headroom or a
    bool as a count is a ValueError naming it."""
    m = model_config("parti-tiny")
    for gpus in (8, 6):
        fits, misses, skipped = plan("parti-tiny", 1, Hardware(gpus_per_node=gpus), 80, 48)
        splits = {(o.tp, o.pp) for o in fits + misses + skipped}
        assert fits and all(m.num_heads % tp == 0 and m.decoder_layers % pp == 0 for tp, pp in splits), splits
    _, misses, _ = plan("parti-350m", 1, Hardware(gpus_per_node=2), 6, 8)
    order = [(o.tp * o.pp, o.zero) for o in misses]
    assert len(misses) > 2 and order == sorted(order)
    for kwargs, flag in ((dict(dropout=1.0), "--dropout"), (dict(headroom_gb=-1), "headroom_gb"),
                         (dict(nodes=True), "--nodes")):
        with pytest.raises(ValueError, match=flag):
            plan("parti-debug", **{"nodes": 1, "hw": Hardware(gpus_per_node=2), **kwargs})
