"""kernels.compile: each transformer layer through torch.compile (inductor) gives the eager model's loss and
gradients, with every kind of dropout on and under each recomputation mode, without recompiling per layer.

The multi-process check (TP=2 with sequence parallelism, collectives inside the compiled graphs) is in
test_training.py beside the other layouts' dropout runs.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import debug_batch, debug_model_config

GPU_FUSIONS = {"dropout_mask": "compiled", "bias_dropout_add": "fused", "split_heads": "fused",
               "cross_entropy": "fused"}
"""The compiled kernels `auto` picks on a GPU (CPU's: eager masks, the plain others)."""


def _loss_and_grads(cfg, text, codes, recompute: str, compiled: str | None, train: bool = True, kernels=None):
    """Two steps' losses and gradients of the debug model (init seed 3), each step's generators (megatron's
    tracker, whose stream the fused attention kernel's dropout draws from, too) seeded as the step's number;
    `kernels`: KernelConfig fields (GPU_FUSIONS or some of them) instead of CPU's eager choices."""
    from model_parallel.activation_checkpointing import apply_activation_checkpointing
    from model_parallel.compile import compile_layers
    from model_parallel.kernels import select_kernels
    from model_parallel.model import PartiModel
    from model_parallel.state import seed_everything
    from training.config import KernelConfig

    chosen = KernelConfig(**{"dropout_mask": "eager", "bias_dropout_add": "plain", "split_heads": "plain",
                             "cross_entropy": "plain", **(kernels or {})})
    model = PartiModel(cfg, select_kernels(chosen), init_seed=3).train(train)
    if compiled:
        compile_layers(model, backend=compiled)
    apply_activation_checkpointing(model, recompute)
    losses, grads = [], []
    for step in range(2):  # the second step runs the compiled code as it stays
        seed_everything(step)
        loss = model.loss(text, codes, sample_index=torch.arange(4) + 4 * step)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    return losses, grads


@pytest.mark.parametrize("preset, recompute, attention_dropout, backend, kernels",
                         [("dalle-debug", "none", 0.0, "aot_eager", GPU_FUSIONS),
                          ("parti-debug", "full", 0.1, "inductor", None)])
def test_compiled_layers_equal_the_eager_model(single_process, preset, recompute, attention_dropout, backend, kernels):
    """Residual dropout (keyed by sample) only: one graph serves every layer, no recompilation (each site's
    key is a tensor, not a constant to specialise on; a property of the tracing, so checked without inductor's
    code generation, the slow part on CPU), with the compiled dropout masks and bias-dropout-add that `auto` picks
    on a GPU (traced into each layer's graph; the masks' own kernel at the embedding). With the fused kernel's attention
    dropout (a graph break at megatron's RNG tracker) and the layers recomputed, through inductor: the same masks as
    eager. (Selective recomputation of compiled layers: test_training's TP=2 run, inductor too.)"""
    torch._dynamo.reset()
    cfg = debug_model_config(**{"model.preset": preset, "model.dropout": 0.1,
                                "model.attention_dropout": attention_dropout})
    text, codes = debug_batch(cfg, batch=4)
    eager = _loss_and_grads(cfg, text, codes, "none", compiled=None)
    with torch._dynamo.config.patch(error_on_recompile=attention_dropout == 0):
        compiled = _loss_and_grads(cfg, text, codes, recompute, compiled=backend, kernels=kernels)
    assert eager[0] != pytest.approx(_loss_and_grads(cfg, text, codes, "none", compiled=None, train=False)[0],
                                     abs=1e-3)  # dropout is on
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6, abs=1e-6)
    for step_compiled, step_eager in zip(compiled[1], eager[1], strict=True):
        for a, b in zip(step_compiled, step_eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_compiled_layer_draws_the_eager_dropout_masks_without_sample_index(single_process):
    """Dropout from torch's generator (no sample_index: F.dropout inside the compiled graph) under inductor draws
    what eager draws under the same seed (compile_layers' fallback_random; inductor's own RNG would not)."""
    from model_parallel.compile import compile_layers
    from model_parallel.model import PartiModel

    torch._dynamo.reset()
    cfg = debug_model_config(**{"model.dropout": 0.3})
    model = PartiModel(cfg, init_seed=3).train()
    layer = model.encoder[0]
    x = torch.randn(cfg.text_seq_len, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 1, 1, cfg.text_seq_len, dtype=torch.bool)
    torch.manual_seed(4)
    eager = layer(x, mask)
    torch.manual_seed(5)
    assert not torch.allclose(layer(x, mask), eager)  # (dropout is on: another seed, other masks)
    compile_layers(model)
    torch.manual_seed(4)
    compiled = layer(x, mask)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_fused_kernels_in_eager_layers_equal_plain(single_process):
    """A GPU's default: eager layers calling the fused bias-dropout-add and head-split kernels (inductor), with
    keyed dropout and full recomputation (each layer's forward run again in the backward), and the loss's
    fused cross-entropy: the plain kernels' losses and gradients; in eval mode the layers take the plain
    operations."""
    from model_parallel.kernels import plain_bias_dropout_add, select_kernels
    from model_parallel.layers import Attention, Residual
    from model_parallel.model import PartiModel
    from training.config import KernelConfig

    cfg = debug_model_config(**{"model.preset": "parti-debug", "model.dropout": 0.1})
    text, codes = debug_batch(cfg, batch=4)
    plain = _loss_and_grads(cfg, text, codes, "none", compiled=None)
    fused = _loss_and_grads(cfg, text, codes, "full", compiled=None,
                            kernels={"bias_dropout_add": "fused", "split_heads": "fused", "cross_entropy": "fused"})
    assert fused[0] == pytest.approx(plain[0], rel=1e-6, abs=1e-6)
    for step_fused, step_plain in zip(fused[1], plain[1], strict=True):
        for a, b in zip(step_fused, step_plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model = PartiModel(cfg, select_kernels(KernelConfig(bias_dropout_add="fused", split_heads="fused")),
                       init_seed=3).eval()
    calls = []
    for module in model.modules():
        if isinstance(module, Residual):
            assert module.bias_dropout_add is not plain_bias_dropout_add
            module.bias_dropout_add = lambda *args, **kw: calls.append(1)  # (would fail the forward if called)
        if isinstance(module, Attention):
            module.split_heads = lambda *args, **kw: calls.append(1)
    with torch.no_grad():
        model.loss(text, codes)
    assert not calls


def test_compile_is_refused_at_zero3():
    from common.config import ConfigError
    from training.config import load_config

    with pytest.raises(ConfigError, match="kernels.compile needs parallel.zero_stage < 3"):
        load_config(None, ["kernels.compile=true", "parallel.zero_stage=3"]).validate()


def test_unserialisable_config_error_is_dropped_only_where_torch_cannot_serialise(monkeypatch, caplog):
    """torch 2.11 fails to serialise dynamo's config (warnings.warn in ignore_logging_functions) into every
    compilation's metrics and logs that error with a traceback; compile_layers drops exactly that record
    there, and nothing where the config serialises (torch 2.14)."""
    import logging

    import torch._dynamo.utils

    from model_parallel.compile import METRICS_LOG_ERROR, _DropRecord, _quiet_unserialisable_config_log

    logger = logging.getLogger("torch._dynamo.metrics_context")
    monkeypatch.setattr(logger, "filters", [])
    _quiet_unserialisable_config_log()
    try:
        torch._dynamo.utils._get_dynamo_config_for_logging()
        serialises = True  # (torch 2.14, the pinned one)
    except TypeError:
        serialises = False  # (torch 2.11, the GPU image's: the suite runs there too)
    assert (logger.filters == []) == serialises

    def fails():
        raise TypeError("Object of type builtin_function_or_method is not JSON serializable")

    monkeypatch.setattr(torch._dynamo.utils, "_get_dynamo_config_for_logging", fails)
    _quiet_unserialisable_config_log()
    _quiet_unserialisable_config_log()
    assert len(logger.filters) == 1 and isinstance(logger.filters[0], _DropRecord)
    with caplog.at_level(logging.ERROR, logger=logger.name):
        logger.error(METRICS_LOG_ERROR)
        logger.error("another error")
    assert [r.getMessage() for r in caplog.records] == ["another error"]


def test_fused_attention_dropout_breaks_the_graph_at_the_attention_call_only(single_process):
    """The fused kernel's attention dropout draws from megatron's RNG tracker, whose fork dynamo cannot trace:
    the attention call runs eager and every frame of the layer is still compiled. (Inside the forward, dynamo
    gave up on the whole attention frame: its projections became graphs of their own, 16 graphs for 10.)"""
    from torch._dynamo.utils import counters

    from model_parallel.compile import compile_layers
    from model_parallel.model import PartiModel
    from model_parallel.state import seed_everything

    cfg = debug_model_config(**{"model.preset": "parti-debug", "model.dropout": 0.1, "model.attention_dropout": 0.1})
    text, codes = debug_batch(cfg, batch=4)
    model = compile_layers(PartiModel(cfg, init_seed=3).train(), backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    seed_everything(0)
    model.loss(text, codes, sample_index=torch.arange(4)).backward()
    assert counters["frames"]["total"] == counters["frames"]["ok"] > 0, dict(counters["frames"])
    assert all("get_rng_state" not in reason for reason in counters["graph_break"]), list(counters["graph_break"])


def test_every_encoder_and_decoder_layer_runs_one_graph_of_its_kind_through_the_backend(single_process):
    """compile_layers hands each layer's forward to the backend asked for: the encoder layers share one graph and
    the decoder layers (with cross-attention's inputs) another, without graph breaks (megatron's warning at each
    RowParallelLinear is traced through). A recording backend, no code generation."""
    from torch._dynamo.utils import counters

    from model_parallel.compile import compile_layers
    from model_parallel.model import PartiModel

    torch._dynamo.reset()
    counters.clear()
    cfg = debug_model_config(**{"model.preset": "parti-debug"})
    text, codes = debug_batch(cfg, batch=2)
    model = PartiModel(cfg, init_seed=3)
    assert cfg.encoder_layers > 1 and cfg.decoder_layers > 1
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([node.target for node in gm.graph.nodes if node.op == "placeholder"])
        return gm.forward

    compile_layers(model, backend=recording_backend)
    with torch.no_grad():
        model.loss(text, codes)
    assert [any("cross" in name for name in inputs) for inputs in graphs] == [False, True], graphs
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_decode_step_compiles_one_static_graph_per_shape_past_dynamos_limit():
    """compile_decode_step: static shapes (one graph per shape, as there is one CUDA graph per attended length),
    and more of them than dynamo's default limit of 8 per function (several models and batch shapes decode in
    one process) without falling back to eager steps; the limit outside its calls stays as it was."""
    from model_parallel.compile import compile_decode_step

    class Stepper(torch.nn.Module):
        def decode_step(self, x):
            return (x * 2).sum(-1)

    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    assert limit < 12
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs])
        return gm.forward

    step = compile_decode_step(Stepper(), backend=recording_backend)
    for n in range(1, 13):
        torch.testing.assert_close(step(torch.ones(2, n)), torch.full((2,), 2.0 * n))
    assert graphs == [[(2, n)] for n in range(1, 13)]
    assert torch._dynamo.config.recompile_limit == limit
