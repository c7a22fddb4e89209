"""Sampling: guidance scale 1 = unguided, top-k 1 = greedy, KV cache = full recomputation, TP=2 = TP=1."""
from __future__ import annotations

import pytest
import torch

from evaluation.sampling import SamplingConfig, filter_logits, sample
from tests.conftest import debug_batch, debug_model_config


def debug_model(seed=0):
    """The debug model (random weights) in eval mode."""
    from model_parallel.model import PartiModel

    return PartiModel(debug_model_config(), init_seed=seed).eval()


def run(model, cfg, seed=3, **kw):
    text, _ = debug_batch(model.cfg, batch=3)
    return sample(model, text, cfg, torch.Generator().manual_seed(seed), **kw)


def test_kv_cache_sampling_equals_full_recomputation(single_process):
    model = debug_model()
    for cfg in (SamplingConfig(), SamplingConfig(top_k=5, temperature=0.7), SamplingConfig(guidance_scale=3.0)):
        assert torch.equal(run(model, cfg), run(model, cfg, use_cache=False))


def test_guidance_scale_one_equals_unguided(single_process):
    model = debug_model()
    assert torch.equal(run(model, SamplingConfig(guidance_scale=1.0)), run(model, SamplingConfig()))
    assert not torch.equal(run(model, SamplingConfig(guidance_scale=4.0)), run(model, SamplingConfig()))


def test_top_k_one_equals_greedy(single_process):
    model = debug_model()
    greedy = run(model, SamplingConfig(temperature=0))
    assert torch.equal(run(model, SamplingConfig(top_k=1), seed=1), greedy)
    assert torch.equal(run(model, SamplingConfig(top_k=1), seed=2), greedy)
    assert not torch.equal(run(model, SamplingConfig(), seed=1), greedy)


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, float(probs[0]) - 0.01)).tolist() == [[False, True, True, True]]


def tp_samples(tp):
    from model_parallel.state import init_parallel

    init_parallel(tp)
    return run(debug_model(), SamplingConfig(top_p=0.9, guidance_scale=1.5))


def test_tp2_samples_equal_tp1(pool2):
    tp1 = pool2.run(tp_samples, 1)[0]
    a, b = pool2.run(tp_samples, 2)
    assert torch.equal(a, tp1) and torch.equal(b, tp1)
