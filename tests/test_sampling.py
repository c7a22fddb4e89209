"""Sampling: guidance scale 1 = unguided, top-k 1 = greedy, KV cache (growing, static, CUDA graph) = full
recomputation, one-token decoding without an attention mask, TP=2 = TP=1, a VQ codebook smaller than the
vocabulary drawn from alone, settings out of range refused; prompt files; generate (resume, metadata, checks
of the tokenizers, images on the disk before their .json); loading an export on the meta device = the old
random-init-then-load path, in fp32 and bf16."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from evaluation.sampling import SamplingConfig, filter_logits, sample
from tests.conftest import debug_batch, debug_model_config


def debug_model(seed=0):
    """The debug model (random weights) in eval mode."""
    from model_parallel.model import PartiModel

    return PartiModel(debug_model_config(), init_seed=seed).eval()


def preset_model(name: str, *sets: str):
    """A preset's model (random weights, init seed 0) in eval mode, with `sets` overrides."""
    from model_parallel.model import PartiModel
    from training.config import load_config

    return PartiModel(load_config(None, [f"model.preset={name}", *sets]).model, init_seed=0).eval()


def run(model, cfg, seed=3, **kw):
    text, _ = debug_batch(model.cfg, batch=3)
    return sample(model, text, cfg, torch.Generator().manual_seed(seed), **kw)


def test_kv_cache_sampling_equals_full_recomputation(single_process):
    model = debug_model()
    for cfg in (SamplingConfig(), SamplingConfig(top_k=5, temperature=0.7), SamplingConfig(guidance_scale=3.0)):
        assert torch.equal(run(model, cfg), run(model, cfg, use_cache=False))


def spy_on_self_attention(model) -> list[dict]:
    """Record every call of the decoder self-attention kernels: query/key lengths, mask, causal flag."""
    calls = []
    for layer in model.decoder:
        attn = layer.self_attn.fn
        kernel = attn.attention

        def spy(q, k, v, mask=None, causal=False, dropout_p=0.0, kernel=kernel):
            calls.append({"queries": q.shape[2], "keys": k.shape[2], "mask": mask, "causal": causal})
            return kernel(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p)

        attn.attention = spy
    return calls


def decoded_in_chunks(model, text, inputs, chunks, static=False):
    """Logits [b, n, V] of decoder inputs fed through the KV cache `chunks` tokens at a time."""
    caches, memory, mask = model.start_decoding(text, static=static)
    out, at = [], 0
    for n in chunks:
        out.append(model.decode_step(inputs[:, at:at + n], caches, memory, mask))
        at += n
    return torch.cat(out, dim=1)


def recomputed_reference():
    """The debug model, a batch, and its decoder logits from one pass over all positions (the reference)."""
    model = debug_model()
    text, codes = debug_batch(model.cfg, batch=3)
    inputs = model.decoder_input(codes)
    memory, mask = model.encode(text)
    return model, text, inputs, memory, mask, model.decode(inputs, memory, mask).transpose(0, 1)


@torch.no_grad()
def test_one_token_decoding_passes_no_mask_and_equals_recomputation(single_process):
    model, text, inputs, memory, mask, full = recomputed_reference()
    calls = spy_on_self_attention(model)
    chunks = [1, 1, 1, 3, 1, 2, 1, 1, inputs.shape[1] - 11]  # a BOS step, single tokens, several at once
    torch.testing.assert_close(decoded_in_chunks(model, text, inputs, chunks), full, rtol=1e-5, atol=1e-5)
    per_step = calls[::len(model.decoder)]
    assert [c["queries"] for c in per_step] == chunks
    for c in per_step:
        if c["queries"] == 1:  # flash-eligible: no mask, not causal (one query sees every cached key)
            assert c["mask"] is None and c["causal"] is False
        else:  # several new tokens after a cached prefix: the offset causal mask
            assert c["mask"] is not None and c["mask"].shape == (c["queries"], c["keys"])
            assert not c["mask"].all() and c["causal"] is False
    calls.clear()  # training keeps SDPA's own causal masking (no mask tensor)
    model.decode(inputs, memory, mask)
    assert all(c["mask"] is None and c["causal"] is True for c in calls)


@torch.no_grad()
def test_static_cache_equals_full_recomputation(single_process):
    model, text, inputs, memory, mask, full = recomputed_reference()
    calls = spy_on_self_attention(model)
    chunks = [1, 1, 3, 1, inputs.shape[1] - 6]
    torch.testing.assert_close(decoded_in_chunks(model, text, inputs, chunks, static=True), full,
                               rtol=1e-5, atol=1e-5)
    # Every step attends over the whole preallocated cache under a mask of the written positions.
    assert {c["keys"] for c in calls} == {model.cfg.image_seq_len}
    assert all(c["mask"] is not None for c in calls)
    # sample()'s step function: logits at every position of teacher-forced inputs.
    from evaluation.sampling import StaticStep

    step = StaticStep(model, text)
    stepped = torch.stack([step(inputs, i) for i in range(inputs.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)
    greedy = SamplingConfig(temperature=0)
    reference = run(model, greedy, use_cache=False)
    calls.clear()
    assert torch.equal(run(model, greedy, static_cache=True), reference)
    # sample() attends over growing prefixes of the cache (a quarter, half, ... of it), each step one
    # that holds its position.
    assert (sorted({c["keys"] for c in calls}) == [4, 8, 12, 16]
            == [model.cfg.image_seq_len * k // 4 for k in (1, 2, 3, 4)])
    for cfg in (SamplingConfig(top_k=5, temperature=0.7), SamplingConfig(guidance_scale=3.0)):
        assert torch.equal(run(model, cfg, static_cache=True), run(model, cfg, use_cache=False))


@torch.no_grad()
def test_static_step_makes_no_host_decisions_on_device_values(single_process):
    """What CUDA-graph capture forbids (a sync: .item(), bool(tensor), nonzero), checked on CPU: under
    FakeTensorMode such an op raises, as a deliberately syncing one shows."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from evaluation.sampling import StaticStep

    model = debug_model()
    text, codes = debug_batch(model.cfg)
    step = StaticStep(model, text)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for i in (0, 5, model.cfg.image_seq_len - 1):  # three prefix lengths
            assert step(model.decoder_input(codes), i).shape == (3, model.cfg.image_vocab_size)
        with pytest.raises(DataDependentOutputException):
            bool((torch.ones(3) > 0).any())


def test_static_step_warm_up_fits_a_short_image_and_restarts_at_its_first_position(single_process):
    """The warm-up before CUDA-graph capture (run eagerly here) takes a few steps at each prefix length (each
    one a graph captured next, which must not be its first run): on an image of 4 positions, 4 lengths x 3 steps
    from one start would write past the cache's end."""
    from evaluation.sampling import StaticStep

    greedy = SamplingConfig(temperature=0)
    for name in ("parti-debug", "dalle-debug"):  # (the decoder-only model's caption is a prefix of the cache)
        model = preset_model(name, "model.image_grid=2")
        text, _ = debug_batch(model.cfg)
        full = sample(model, text, greedy, use_cache=False)
        with torch.no_grad():
            step = StaticStep(model, text)
            calls = spy_on_self_attention(model)  # (after the decoder-only caption's prefill)
            step.warm_up()
        assert {c["keys"] for c in calls} == set(step.lengths), (name, step.lengths)
        assert int(step.position.next.max()) == model.cfg.prefix_len
        assert torch.equal(sample(model, text, greedy, static_cache=True), full)


def test_a_kept_static_step_restarted_for_new_captions_equals_a_new_one(single_process):
    """StaticSteps (what evaluation.generate keeps, so that a GPU captures its CUDA graphs once per batch shape):
    the step of an earlier batch, restarted in its own buffers for new captions, decodes what a new step does
    (here eagerly, the very step a graph replays), for an encoder-decoder and a decoder-only model (whose caption
    is prefilled into the cache); another batch shape gets a step of its own."""
    from evaluation.sampling import StaticStep, StaticSteps

    greedy, guided = SamplingConfig(temperature=0), SamplingConfig(top_k=5, guidance_scale=2.0)
    for name in ("parti-debug", "dalle-debug"):
        model = preset_model(name, "model.image_grid=2")
        first, _ = debug_batch(model.cfg, batch=3, seed=1)
        second, _ = debug_batch(model.cfg, batch=3, seed=2)
        steps = StaticSteps()
        for sampling, seed in ((greedy, None), (guided, 7)):  # (guidance: a doubled batch, a step of its own)
            draws = lambda seed=seed: None if seed is None else torch.Generator().manual_seed(seed)
            earlier = sample(model, first, sampling, draws(), static_cache=True, steps=steps)
            made = dict(steps.steps)
            reused = sample(model, second, sampling, draws(), static_cache=True, steps=steps)
            assert steps.steps == made  # (the same step, restarted)
            assert torch.equal(reused, sample(model, second, sampling, draws(), static_cache=True))
            assert not torch.equal(earlier, reused)  # (other captions)
        sample(model, second[:2], greedy, static_cache=True, steps=steps)
        assert len(steps.steps) == 3
        # The restarted state itself, tensor by tensor, against a new step's (codes alone barely see the cross K).
        six = torch.cat([second, first])  # (the guided step's 6 rows; get() restarts the kept step)
        with torch.no_grad():
            kept, new = steps.get(model, six, False), StaticStep(model, six)
        assert len(steps.steps) == 3
        for a, b in zip(_static_state(kept), _static_state(new), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        with pytest.raises(ValueError, match="made for captions"):
            kept.restart(second)  # (3 rows: its buffers hold 6)


def _static_state(step) -> list:
    """What a static step's CUDA graphs read: encoder output, mask, write position, every layer's caches."""
    caches = [getattr(c, n) for c in step.caches for n in ("self_k", "self_v", "cross_k", "cross_v")]
    return [step.memory, step.mask, step.position.next, *caches]


def test_compiled_static_step_equals_the_eager_one_with_one_graph_per_prefix_length(single_process):
    """sample(..., compiled=...): the static step through torch.compile (traced here with aot_eager, without
    inductor's code generation, the slow part on CPU; the GPU check's decode_compiled section runs inductor)
    decodes what the eager step does, for an encoder-decoder and a decoder-only model, without graph breaks (a
    break would leave eager work between graphs) and with one graph per attended prefix length, not one per
    step: the positions are device tensors, not constants. A kept step restarted for new captions compiles
    nothing more."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from evaluation.sampling import StaticSteps

    greedy = SamplingConfig(temperature=0)
    for name in ("parti-debug", "dalle-debug"):
        model = preset_model(name)
        text, _ = debug_batch(model.cfg, batch=2)
        eager = sample(model, text, greedy, static_cache=True)
        torch._dynamo.reset()
        counters.clear()
        steps = StaticSteps()
        assert torch.equal(sample(model, text, greedy, static_cache=True, compiled="aot_eager", steps=steps), eager)
        (step,) = steps.steps.values()
        lengths = {next(k for k in step.lengths if k > step.prefix + i) for i in range(model.cfg.image_seq_len)}
        assert counters["stats"]["unique_graphs"] == len(lengths) > 1, (name, dict(counters["stats"]))
        assert set(step.lengths) == lengths  # (a GPU warms up and captures each: none that no step attends)
        assert not counters["graph_break"], dict(counters["graph_break"])
        with torch._dynamo.config.patch(error_on_recompile=True):
            sample(model, text.flip(0), greedy, static_cache=True, compiled="aot_eager", steps=steps)
    with pytest.raises(ValueError, match="needs cuda_graph=True or static_cache=True"):
        run(model, greedy, compiled="inductor")


def test_kept_static_steps_are_per_model_and_backend_and_compiled_without_them_too(single_process, monkeypatch):
    """A StaticSteps hands a kept step only to the model and compile backend it was made for (else a second model
    decoded with the first one's weights, a compiled request got the eager step); sample(compiled=...) compiles
    with or without one (the GPU check's greedy check passes none). The backend is recorded, not compiled."""
    from evaluation import sampling

    backends = []
    monkeypatch.setattr(sampling, "compile_decode_step", lambda model, backend: backends.append(backend)
                        or model.decode_step)
    greedy, steps = SamplingConfig(temperature=0), sampling.StaticSteps()
    first, second = debug_model(seed=0), debug_model(seed=1)
    text, _ = debug_batch(first.cfg, batch=2)
    codes = [sample(model, text, greedy, static_cache=True, steps=steps) for model in (first, second)]
    assert torch.equal(codes[1], sample(second, text, greedy, use_cache=False))
    assert not torch.equal(codes[0], codes[1])  # (the other model's step would have decoded codes[0])
    sample(first, text, greedy, static_cache=True, compiled="aot_eager")
    assert backends == ["aot_eager"]
    sample(first, text, greedy, static_cache=True, compiled="aot_eager", steps=steps)  # (first's eager step kept)
    assert backends == ["aot_eager"] * 2 and len(steps.steps) == 3


@pytest.mark.parametrize("preset", ["parti-debug", "dalle-debug"])
def test_auto_batch_size_counts_the_static_caches_decoding_allocates(single_process, preset):
    """generate's --batch-size 0 sizes a GPU's batch by cache_bytes_per_row: the bytes model.start_decoding's
    static caches hold per sequence (self-attention K/V over the stream; cross-attention K/V over the caption,
    encoder-decoder only), here counted from the tensors it allocates; a CPU decodes CPU_BATCH images."""
    from evaluation.sampling import CPU_BATCH, auto_batch_size, cache_bytes_per_row

    model = preset_model(preset)
    text, _ = debug_batch(model.cfg, batch=3)
    with torch.no_grad():
        caches, _, _ = model.start_decoding(text, static=True)
    tensors = {id(t): t for c in caches for t in (c.self_k, c.self_v, c.cross_k, c.cross_v) if t is not None}
    allocated = sum(t.numel() * t.element_size() for t in tensors.values())
    assert allocated == 3 * cache_bytes_per_row(model.cfg, 4)
    assert auto_batch_size(model, guided=True) == CPU_BATCH


def test_cuda_graph_needs_cuda_and_the_cache(single_process):
    model = debug_model()
    with pytest.raises(ValueError, match="needs use_cache=True"):
        run(model, SamplingConfig(), use_cache=False, cuda_graph=True)
    with pytest.raises(ValueError, match="static_cache=True is a KV cache: it needs use_cache=True"):
        run(model, SamplingConfig(), use_cache=False, static_cache=True)  # (not recomputation in its place)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs the model and text_ids on a CUDA device"):
            run(model, SamplingConfig(), cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampling_equals_the_static_cache_and_recomputation(single_process):
    model = debug_model().cuda()
    text, _ = debug_batch(model.cfg, batch=3)
    text = text.cuda()
    greedy = SamplingConfig(temperature=0)
    graphed = sample(model, text, greedy, cuda_graph=True)
    assert torch.equal(graphed, sample(model, text, greedy, static_cache=True))
    assert torch.equal(graphed, sample(model, text, greedy, use_cache=False))
    guided = SamplingConfig(top_k=5, guidance_scale=2.0)  # CUDA generators: draws on the GPU
    a = sample(model, text, guided, torch.Generator("cuda").manual_seed(1), cuda_graph=True)
    b = sample(model, text, guided, torch.Generator("cuda").manual_seed(1), static_cache=True)
    assert a.device.type == "cuda" and torch.equal(a, b)


def test_decoding_benchmark_reports_every_mode_against_the_bound(single_process, monkeypatch):
    from bench.sample import measure_decoding, report

    result = measure_decoding(debug_model(), batch=2, tokens=8, reference_tokens=4)
    json.dumps(result)  # JSON-ready for the GPU check's report
    assert result["full_recomputation"]["tokens"] == 4 and result["kv_cache"]["tokens"] == 8
    step = result["bound"]["bytes_per_step"]
    assert step["total"] == step["weights"] + step["kv_cache_mean"] + step["cross_kv"] and step["weights"] > 0
    # The cache bytes against the tensors start_decoding allocates for the batch's 2 rows (not the same formula)
    model = debug_model()
    with torch.no_grad():
        caches, _, _ = model.start_decoding(debug_batch(model.cfg, batch=2)[0], static=True)
    for key, names in (("kv_cache_static", ("self_k", "self_v")), ("cross_kv", ("cross_k", "cross_v"))):
        assert step[key] == sum(getattr(c, n).numel() * getattr(c, n).element_size() for c in caches for n in names)
    for mode in ("full_recomputation", "kv_cache"):
        assert result[mode]["image_tokens_per_s"] > 0 and 0 < result[mode]["of_bound"]
    if not torch.cuda.is_available():
        assert "CUDA" in result["cuda_graph"]["skipped"]
    assert "of the bound" in report("parti-debug", result)
    drawn = []  # with a generator per image, as evaluation.generate draws: the sampler gets one per caption
    from bench import sample as bench_sample
    real = bench_sample.sample
    monkeypatch.setattr(bench_sample, "sample", lambda model, text, cfg, generator, **kw: drawn.append(generator)
                        or real(model, text, cfg, generator, **kw))
    per_image = measure_decoding(debug_model(), batch=3, tokens=4, modes=("kv_cache",), per_image_generators=True)
    assert per_image["generators"] == "per_image" and per_image["kv_cache"]["image_tokens_per_s"] > 0
    assert [len(g) for g in drawn] == [3, 3] and result["generators"] == "one"


def test_decoding_benchmark_times_the_modes_in_turns(single_process, monkeypatch):
    """With repeats, the modes alternate (a warm-up each, then full, kv, full, kv, ...): a mode's rate is its
    median turn's, and its ratio to full recomputation the median of the turns' own ratios, with each turn's."""
    from bench import sample as bench_sample

    calls, decode_s = [], iter([1, 1, 4.0, 1.0, 1.0, 2.0, 2.0, 3.0])  # (warm-ups, then full and kv per turn)
    monkeypatch.setattr(bench_sample, "_timed_sample", lambda model, text, cfg, n, seed, per_image, **kw: calls.append(
        ("kv" if kw.get("use_cache", True) else "full", n)) or {"decode_s": next(decode_s), "setup_s": 0.0})
    result = bench_sample.measure_decoding(debug_model(), batch=2, tokens=8, modes=("full_recomputation", "kv_cache"),
                                           reference_tokens=4, warmup_tokens=2, repeats=3)
    assert calls == [("full", 2), ("kv", 2)] + [("full", 4), ("kv", 8)] * 3
    assert result["turns"] == 3 and result["full_recomputation"]["decode_s"] == 2.0  # (of 4, 1, 2: the median)
    assert result["kv_cache"]["image_tokens_per_s"] == 2 * 8 / 2.0  # (of 1, 2, 3)
    turns = [8 * 4.0 / (4 * 1.0), 8 * 1.0 / (4 * 2.0), 8 * 2.0 / (4 * 3.0)]  # rate kv / rate full, turn by turn
    assert result["kv_cache"]["vs_full_recomputation_turns"] == turns
    assert result["kv_cache"]["vs_full_recomputation"] == turns[2]  # their median (the median rates' ratio: 2.0)
    assert "1.33x full recomputation (1.00-8.00 over 3 turns)" in bench_sample.report("parti-debug", result)
    with pytest.raises(ValueError, match="repeats 0: at least 1"):
        bench_sample.measure_decoding(debug_model(), batch=1, tokens=2, repeats=0)


def test_decoding_bound_reads_the_decoder_weights_and_caches_of_a_step(single_process, monkeypatch):
    """The bound's bytes in bf16 (2 bytes an element, cache and weights alike): every parameter but the encoder's,
    the embeddings' and the cross-attention K/V projections' (run once, at the start); the self-attention cache
    over positions 1..tokens (a step at position i reads i + 1); image tokens/s counts images, not guided rows."""
    from bench import sample as bench_sample

    model = debug_model().to(torch.bfloat16)
    cfg, rows, tokens = model.cfg, 4, 3
    with torch.no_grad():
        caches, _, _ = model.start_decoding(debug_batch(cfg, batch=rows)[0], static=True)
    per_position = sum(c.self_k[:, :, :1].numel() * 2 * 2 for c in caches)  # one position's K and V, bf16
    assert caches[0].self_k.dtype == torch.bfloat16 and caches[0].self_k.shape[0] == rows
    skipped = ("encoder", "text_embedding", "image_embedding", "encoder_norm")
    weights = sum(p.numel() * 2 for n, p in model.named_parameters()
                  if not n.startswith(skipped) and ".cross_attn.fn.kv." not in n)
    step = bench_sample.decode_step_bytes(model, rows, tokens)
    assert step["weights"] == weights
    assert step["kv_cache_mean"] == per_position * (1 + 2 + 3) / tokens
    monkeypatch.setattr(bench_sample, "copy_bandwidth", lambda device: 1e9)
    bound = bench_sample.memory_bound(model, batch=2, rows=rows, tokens=tokens)  # (guided: 2 images, 4 rows)
    assert bound["image_tokens_per_s"] == 2 * 1e9 / step["total"]


def test_copy_bandwidth_counts_the_bytes_read_and_written(monkeypatch):
    """(A decode step only reads; a copy's rate counts both directions, the traffic a device sustains.)"""
    from types import SimpleNamespace

    from bench import sample as bench_sample

    clock = iter([10.0, 12.0])  # 2 s for the timed copies
    monkeypatch.setattr(bench_sample, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert bench_sample.copy_bandwidth(torch.device("cpu"), nbytes=1000, repeats=3) == 2 * 1000 * 3 / 2.0


def test_decoding_rates_relate_to_the_bound_and_full_recomputation():
    """of_bound is rate / bound (at most 1 when the bound holds); vs_full_recomputation rate / full's, unless
    measure_decoding took it from its turns; the bound itself gets neither."""
    from bench.sample import relate_rates

    out = {"bound": {"image_tokens_per_s": 200.0}, "full_recomputation": {"image_tokens_per_s": 10.0},
           "kv_cache": {"image_tokens_per_s": 50.0}, "cuda_graph": {"image_tokens_per_s": 100.0,
                                                                     "vs_full_recomputation": 7.0}}
    relate_rates(out)
    assert out["full_recomputation"] == {"image_tokens_per_s": 10.0, "of_bound": 0.05, "vs_full_recomputation": 1.0}
    assert out["kv_cache"] == {"image_tokens_per_s": 50.0, "of_bound": 0.25, "vs_full_recomputation": 5.0}
    assert out["cuda_graph"]["of_bound"] == 0.5 and out["cuda_graph"]["vs_full_recomputation"] == 7.0
    assert out["bound"] == {"image_tokens_per_s": 200.0}


def test_decoding_benchmark_clamps_its_tokens_and_counts_guided_rows(single_process, monkeypatch):
    """More tokens than the image has time the whole image (full recomputation at most as many); guidance doubles
    the rows decoded, not the images; ms per step is a step's (all rows), the capture the warm-up's setup."""
    from bench import sample as bench_sample

    calls = []
    monkeypatch.setattr(bench_sample, "_timed_sample", lambda model, text, cfg, n, seed, per_image, **kw: calls.append(
        n) or {"decode_s": 2.0, "setup_s": 5.0 if len(calls) == 1 else 0.5})
    model = debug_model()
    image = model.cfg.image_seq_len
    result = bench_sample.measure_decoding(model, batch=3, tokens=10 * image, modes=("full_recomputation",),
                                           reference_tokens=20 * image, warmup_tokens=2, guidance_scale=2.0)
    assert calls == [2, image] and result["tokens"] == image and result["rows"] == 6
    assert result["full_recomputation"]["ms_per_step"] == 1e3 * 2.0 / image
    assert result["full_recomputation"]["image_tokens_per_s"] == 3 * image / 2.0
    kept = bench_sample._mode_result([{"decode_s": 9.0, "setup_s": 5.0}, {"decode_s": 1.0, "setup_s": 0.5}], 3, 4,
                                     kept_step=True)
    assert kept["capture_setup_s"] == 5.0 and kept["setup_s"] == 0.5


def test_guidance_scale_one_equals_unguided(single_process, monkeypatch):
    """Scale 1 is the conditional logits: sampled as unguided (the doubled batch only cost twice as much and
    differed from them by rounding)."""
    model = debug_model()
    for seed in range(3):
        assert torch.equal(run(model, SamplingConfig(top_p=0.9, guidance_scale=1.0), seed=seed),
                           run(model, SamplingConfig(top_p=0.9), seed=seed))
    assert not torch.equal(run(model, SamplingConfig(guidance_scale=4.0)), run(model, SamplingConfig()))
    batches = []  # the captions each decoding starts from: b rows unguided, 2b (with null captions) guided
    start = model.start_decoding
    monkeypatch.setattr(model, "start_decoding", lambda text, **kw: batches.append(len(text)) or start(text, **kw))
    for scale in (None, 1.0, 4.0):
        run(model, SamplingConfig(guidance_scale=scale))
    assert batches == [3, 3, 6]


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


def test_filters_at_their_edges():
    """A top-k above the vocabulary keeps every code (torch.topk of more values than there are raises); a nucleus
    whose mass is reached exactly stops there (the smallest set reaching top_p: two codes of exactly 0.5 each,
    top_p 0.5, keep one); top_p 1 and top_k 0 filter nothing."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.equal(filter_logits(logits, 10, 1.0), logits)
    assert torch.equal(filter_logits(logits, 4, 1.0), logits)
    # (top_p 1 skips the nucleus: in fp32 the mass before a code of probability 1e-13 already reads as 1)
    assert torch.equal(filter_logits(torch.tensor([[0.0, -30.0]]), 0, 1.0), torch.tensor([[0.0, -30.0]]))
    tie = torch.zeros(1, 2)  # (softmax: exactly 0.5 and 0.5)
    assert torch.isinf(filter_logits(tie, 0, 0.5)).sum() == 1
    assert not torch.isinf(filter_logits(tie, 0, 0.51)).any()


def test_max_tokens_gives_the_first_codes_of_the_image(single_process):
    """sample(max_tokens=n) (previews, benchmarks): the first n codes of the very image, in every decoding mode;
    more than the image has gives the whole image."""
    model = debug_model()
    cfg = SamplingConfig(top_k=5, guidance_scale=2.0)
    whole = run(model, cfg)
    for kw in ({}, {"static_cache": True}, {"use_cache": False}):
        assert torch.equal(run(model, cfg, max_tokens=3, **kw), whole[:, :3])
    assert torch.equal(run(model, cfg, max_tokens=10 ** 6), whole)


def test_timings_split_the_setup_from_the_token_loop(single_process, monkeypatch):
    """sample(timings=...) (bench.sample's rates): setup_s is the encoder and the caches, decode_s the token loop,
    tokens the codes per image (not per row of the guided batch); on a clock that only the model's calls advance
    (the setup 10, each decoding step 1)."""
    from types import SimpleNamespace

    import evaluation.sampling as sampling

    model, clock = debug_model(), [0.0]
    monkeypatch.setattr(sampling, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for name, cost in (("start_decoding", 10.0), ("decode_step", 1.0)):
        def advancing(*args, fn=getattr(model, name), cost=cost, **kw):
            clock[0] += cost
            return fn(*args, **kw)

        monkeypatch.setattr(model, name, advancing)
    timings = {}
    run(model, SamplingConfig(guidance_scale=2.0), max_tokens=3, timings=timings)
    assert timings == {"setup_s": 10.0, "decode_s": 3.0, "tokens": 3}


def test_keeping_every_sample_is_allowed():
    """--keep equal to --samples-per-prompt (every sample kept, reranked) is in range; one more is not."""
    from evaluation.sampling import check_counts

    check_counts(samples_per_prompt=2, batch_size=0, keep=2)
    check_counts(samples_per_prompt=1, batch_size=1, keep=0)
    with pytest.raises(ValueError, match=r"--keep 3 keeps more than the 2 sample"):
        check_counts(samples_per_prompt=2, batch_size=0, keep=3)


def test_auto_batch_size_on_a_gpu_fits_half_the_free_memory(monkeypatch):
    """--batch-size 0 on a GPU: as many images as their static caches (two rows each with guidance) fit in half
    the free memory, at most GPU_MAX_BATCH, at least 1 (a stand-in CUDA weight and free-memory count: the
    arithmetic, not the device)."""
    from types import SimpleNamespace

    from evaluation.sampling import GPU_MAX_BATCH, auto_batch_size, cache_bytes_per_row

    cfg = debug_model_config()
    weight = SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda: 2)
    model = SimpleNamespace(cfg=cfg, parameters=lambda: iter([weight]))
    row = cache_bytes_per_row(cfg, 2)
    free = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[-1], 10 * free[-1]))
    free.append(2 * 10 * row + row)  # half of it: 10 rows and a half
    assert auto_batch_size(model, guided=False) == 10
    assert auto_batch_size(model, guided=True) == 5
    free.append(2 * 1000 * row)
    assert auto_batch_size(model, guided=False) == GPU_MAX_BATCH
    free.append(row)  # not even one image: still one
    assert auto_batch_size(model, guided=True) == 1


def test_a_tiny_temperature_samples_the_most_likely_code():
    """Any temperature > 0 passes the config's check; one so small that the logits overflow once divided gave a
    NaN softmax, and every draw picked code 0."""
    from evaluation.sampling import choose

    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, -1.0, 0.5, 2.9]])
    for temperature in (1e-3, 1e-39, 1e-45):
        for seed in range(5):
            picks = choose(logits, SamplingConfig(temperature=temperature), torch.Generator().manual_seed(seed))
            assert picks.tolist() == [2, 0], (temperature, seed, picks)


def test_choose_draws_what_multinomial_draws_without_a_host_sync():
    """choose() makes torch.multinomial's very draw (batch and per-row generators, filtered codes included),
    without multinomial itself, whose checks read device values on the host (ATen: `.item()` of the min,
    max and row sums), which made each GPU decoding step wait; nor any other op that reads one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from evaluation.sampling import choose

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    cfg = SamplingConfig(temperature=0.9, top_k=40, top_p=0.9)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    for seed in range(20):
        assert torch.equal(choose(logits, cfg, torch.Generator().manual_seed(seed)),
                           torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0])
    rows = [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]
    expected = [torch.multinomial(p[None], 1, generator=torch.Generator().manual_seed(s))[0, 0]
                for p, s in zip(probs, (1, 2, 3, 4))]
    assert choose(logits, cfg, rows).tolist() == [int(e) for e in expected]
    host_reads = {"multinomial", "_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}
    with Ops() as seen:
        choose(logits, cfg, torch.Generator().manual_seed(0))
    assert "exponential_" in seen.names and not seen.names & host_reads, seen.names
    with Ops() as seen:
        torch.multinomial(probs, 1)
    assert seen.names & host_reads  # (what the check catches)


def tp_samples(tp, preset="parti-debug"):
    """Codes drawn with the growing cache, the static cache and full recomputation at TP=`tp`."""
    from model_parallel.state import init_parallel

    init_parallel(tp)
    model = debug_model() if preset == "parti-debug" else preset_model(preset)
    cfg = SamplingConfig(top_p=0.9, guidance_scale=1.5)
    return run(model, cfg), run(model, cfg, static_cache=True), run(model, cfg, use_cache=False)


@pytest.mark.parametrize("preset", ["parti-debug", "dalle-debug"])
def test_tp2_samples_equal_tp1(pool2, preset):
    """Decoder-only too: its static cache is preallocated by _prefill (not from cross-attention K/V), with this
    rank's share of the heads."""
    tp1 = pool2.run(tp_samples, 1, preset)[0]
    # the static cache (heads split over ranks too) and recomputation = the growing one
    assert torch.equal(tp1[0], tp1[1]) and torch.equal(tp1[0], tp1[2])
    for rank in pool2.run(tp_samples, 2, preset):
        for codes in rank:
            assert torch.equal(codes, tp1[0])


def test_per_row_generators_make_rows_independent_of_the_batch(single_process):
    model = debug_model()
    text, _ = debug_batch(model.cfg, batch=3)
    cfg = SamplingConfig(top_p=0.95)
    together = sample(model, text, cfg, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = sample(model, text[1:2], cfg, [torch.Generator().manual_seed(8)])
    assert torch.equal(together[1:2], alone)


@torch.no_grad()
def test_guided_greedy_codes_are_the_argmax_of_guided_teacher_forced_logits(single_process):
    """Classifier-free guidance against a reference built here: the unconditional logits are those of the null
    caption training drops captions to ([EOS, PAD, ...], by hand), combined as uncond + s (cond - uncond) from
    two teacher-forced passes; guided greedy decoding picks their argmax at every position, in every mode. (The
    modes share the guidance step, so agreeing with each other did not show it right.)"""
    model = debug_model()
    m = model.cfg
    text, _ = debug_batch(m, batch=3)
    null = torch.full_like(text, m.text_pad_id)
    null[:, 0] = m.text_eos_id
    for scale in (3.0, 0.5):
        codes = run(model, SamplingConfig(temperature=0, guidance_scale=scale))
        cond, uncond = (model(t, codes).transpose(0, 1)[..., :m.image_vocab_size] for t in (text, null))
        assert torch.equal((uncond + scale * (cond - uncond)).argmax(-1), codes), scale
        assert not torch.equal(cond.argmax(-1), codes)  # (guidance changed the codes: the check can fail)
        for kw in ({"use_cache": False}, {"static_cache": True}):
            assert torch.equal(run(model, SamplingConfig(temperature=0, guidance_scale=scale), **kw), codes)


@torch.no_grad()
def test_a_smaller_codebook_draws_only_its_codes_in_every_mode(single_process):
    """A VQ tokenizer with fewer codes than the model's image vocabulary (training allows it): only its codes
    are drawn, the same ones by every decoding mode; greedy codes are the argmax over those codes of the
    teacher-forced logits."""
    model, below = debug_model(), 16
    text, _ = debug_batch(model.cfg, batch=3)
    assert run(model, SamplingConfig()).max() >= below  # (without the limit the model draws the others too)
    for cfg in (SamplingConfig(), SamplingConfig(top_k=5, guidance_scale=3.0)):
        drawn = run(model, cfg, codebook_size=below)
        assert drawn.max() < below
        assert torch.equal(run(model, cfg, codebook_size=below, use_cache=False), drawn)
        assert torch.equal(run(model, cfg, codebook_size=below, static_cache=True), drawn)
    greedy = run(model, SamplingConfig(temperature=0), codebook_size=below)
    assert torch.equal(model(text, greedy).transpose(0, 1)[..., :below].argmax(-1), greedy)


@pytest.mark.parametrize("setting, value, expected", [
    ("temperature", -1.0, ">= 0"), ("temperature", float("nan"), ">= 0"), ("temperature", float("inf"), ">= 0"),
    ("top_k", -3, ">= 0"),
    ("top_p", 0.0, r"in \(0, 1\]"), ("top_p", 1.5, r"in \(0, 1\]"), ("guidance_scale", float("inf"), "a finite")])
def test_sampling_settings_out_of_range_are_refused(setting, value, expected):
    """Out of range they sampled wrongly without a word (top_p 0: NaN probabilities, every code 0; a negative
    temperature: the least likely code, an infinite one: every code alike; a negative top_k: no filter). The
    message names the key and the flag."""
    from common.config import ConfigError
    from evaluation.config import load_eval_config

    flag = "--" + setting.replace("_", "-")
    message = rf"^sampling\.{setting} \({flag}\) must be {expected}.*, not {re.escape(repr(value))}$"
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**{setting: value})
    if value != value or value in (float("inf"), float("-inf")):  # (refused for every float key of a config file)
        message = rf"^sampling\.{setting}={value!r} must be a finite number$"
    with pytest.raises(ConfigError, match=message):  # an evaluation config's sampling section
        load_eval_config(None, [f"sampling.{setting}={value}"])
    SamplingConfig(temperature=0, top_k=0, top_p=1, guidance_scale=None)  # the edges are fine


def test_sample_refuses_a_model_in_training_mode_and_a_codebook_out_of_range(single_process):
    model = debug_model()
    for size in (0, model.cfg.image_vocab_size + 1):
        with pytest.raises(ValueError, match=rf"codebook_size={size}: expected 1\.\.{model.cfg.image_vocab_size}"):
            run(model, SamplingConfig(), codebook_size=size)
    # The whole vocabulary (a VQ with as many codes as the model: the usual case) is in range: no limit at all.
    whole = model.cfg.image_vocab_size
    assert torch.equal(run(model, SamplingConfig(), codebook_size=whole), run(model, SamplingConfig()))
    model.train()  # (dropout would perturb every step)
    with pytest.raises(ValueError, match=r"needs the model in eval mode \(model.eval\(\)\)"):
        run(model, SamplingConfig())


def own_group_samples():
    """TP=2 world, but each rank's model built for a group of its own (a TP=1 model inside a TP>1 job)."""
    import torch.distributed as dist

    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel

    init_parallel(2)
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # (every rank makes every group)
    try:
        model = PartiModel(debug_model_config(), init_seed=0, tp_group=groups[dist.get_rank()]).eval()
        return [run(model, SamplingConfig(top_k=5), **kw) for kw in ({}, {"use_cache": False})]
    finally:
        for group in groups:
            dist.destroy_process_group(group)


def test_recomputation_gathers_over_the_models_own_group(single_process, pool2):
    """The recomputing step gathered the logits over megatron's global TP group (here 2 ranks: twice the
    vocabulary), where the cached step uses the model's group (here its rank alone)."""
    expected = run(debug_model(), SamplingConfig(top_k=5))
    for cached, recomputed in pool2.run(own_group_samples):
        assert torch.equal(cached, expected) and torch.equal(recomputed, expected)


def test_prompt_files_with_a_byte_order_mark_and_jsonl_lines_that_are_not_objects(tmp_path):
    """A UTF-8 byte-order mark (some editors write one) reads as without it (it stuck to the first column's
    name: 'no prompt'; or to the first prompt); a JSONL line that is no object names the file and line."""
    from evaluation.prompts import read_prompts

    files = {"a.tsv": "Prompt\tCategory\nA cat\tAnimals\n", "a.csv": "caption\nA cat\n", "a.txt": "A cat\nA dog\n",
             "a.jsonl": '{"prompt": "A cat"}\n'}
    for name, text in files.items():
        for folder, encoding in (("plain", "utf-8"), ("bom", "utf-8-sig")):
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / name).write_text(text, encoding=encoding)
        assert (tmp_path / "bom" / name).read_bytes().startswith(b"\xef\xbb\xbf")
        plain = read_prompts(tmp_path / "plain" / name)
        assert plain[0]["prompt"] == "A cat" and read_prompts(tmp_path / "bom" / name) == plain
    for line, kind in (('"some text"', "string"), ('["a cat"]', "array"), ("3", "number"), ("null", "null")):
        (tmp_path / "bad.jsonl").write_text('{"prompt": "A cat"}\n' + line + "\n")
        with pytest.raises(ValueError, match=rf"bad\.jsonl:2: a JSON {kind}, not an object; expected one object"):
            read_prompts(tmp_path / "bad.jsonl")


def test_image_seeds_differ_where_the_affine_ones_collided():
    """seed*1_000_003 + i*1_009 + k gave prompt 0's sample 1009 the seed of prompt 1's sample 0, and --seed 1 the
    seeds of --seed 0's prompt 991 (sample 84 on); SeedSequence seeds every (seed, prompt, sample) apart."""
    from evaluation.generate import image_seed

    seeds = {image_seed(s, i, k) for s in (0, 1) for i in (0, 1, 991) for k in (0, 84, 1009)}
    assert len(seeds) == 18 and image_seed(3, 5, 7) == image_seed(3, 5, 7)
    assert all(0 <= x < 2**64 for x in seeds)


def test_image_seeds_are_the_recorded_seeding():
    """image_seed is what the record's `seeding` names, SeedSequence([seed, prompt, sample]) in that order: a
    folder begun under it resumes only if its images keep their seeds (prompt and sample swapped went unseen)."""
    import numpy as np

    from evaluation.generate import SEEDING, image_seed

    assert SEEDING == "SeedSequence([seed, prompt, sample])"
    for seed, prompt, index in ((7, 1, 2), (0, 3, 0), (1, 0, 5)):
        expected = int(np.random.SeedSequence([seed, prompt, index]).generate_state(1, np.uint64)[0])
        assert image_seed(seed, prompt, index) == expected
    assert image_seed(0, 1, 2) != image_seed(0, 2, 1)


def test_the_record_holds_how_the_reranking_clip_runs_and_a_damaged_export_config_is_named(tmp_path):
    """Reranking with the same weights under another --clip-tag (activation, normalisation) resumed the folder;
    an export's config.json cut short (or not UTF-8) gave a bare JSON position."""
    from types import SimpleNamespace

    from evaluation.generate import generation_record, read_export_config
    from evaluation.sampling import SamplingConfig

    model = torch.nn.Linear(1, 1)
    protocol = {"weights": "clip.bin", "weights_sha256": "ab", "model": "ViT-B-32", "tag": None,
                "preprocess": {"mean": [0.5]}, "quick_gelu": False, "open_clip": "3.0"}
    records = [generation_record(model, None, None, SamplingConfig(), 1, 0, SimpleNamespace(protocol=p))
               for p in (protocol, {**protocol, "tag": "openai", "quick_gelu": True})]
    assert records[0]["rerank"] != records[1]["rerank"]
    assert records[0]["rerank"] == {"clip": "clip.bin", "weights_sha256": "ab", "model": "ViT-B-32", "tag": None,
                                    "preprocess": {"mean": [0.5]}, "quick_gelu": False}
    for damaged in (b'{"model": ', b'{"model": \xff}'):  # (cut short; not UTF-8: a UnicodeDecodeError)
        (tmp_path / "config.json").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"config\.json: not readable as JSON .*export the checkpoint again"):
            read_export_config(tmp_path)


def test_prompts_that_are_missing_not_text_or_blank_are_refused_naming_the_line(tmp_path):
    """A null or non-text prompt became the text 'None' or '3'; a blank COCO caption the unconditional caption;
    a COCO annotation without a caption a bare KeyError. Line numbers of CSV rows count blank lines and quoted
    line breaks."""
    from evaluation.prompts import read_prompts

    cases = {
        "a.jsonl": ('{"prompt": "A cat"}\n{"prompt": null}\n', r"a\.jsonl:2: prompt is missing"),
        "b.jsonl": ('{"prompt": "A cat"}\n\n{"text": 3}\n', r"b\.jsonl:3: text is 3, not text"),
        "c.csv": ('caption,id\n"A cat\non two lines",1\n\n"  ",2\n', r"c\.csv:5: caption is blank"),
        "d.tsv": ("Category\tPrompt\nAnimals\tA cat\nAnimals\n", r"d\.tsv:3: Prompt is missing"),
        "e.json": (json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1}]}),
                   r"e\.json: annotations\[0\]\.caption is missing"),
        "f.json": (json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": " "}]}),
                   r"f\.json: annotations\[0\]\.caption is blank"),
        "g.json": (json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": []}), r"g\.json: images\[0\] has no"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts(tmp_path / name)
    (tmp_path / "ok.csv").write_text('caption\n"A cat\non two lines"\n\nA dog\n')
    assert [p["prompt"] for p in read_prompts(tmp_path / "ok.csv")] == ["A cat\non two lines", "A dog"]
    (tmp_path / "ok.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [  # (a blank caption never
        {"image_id": 1, "caption": "A cat."}, {"image_id": 1, "caption": " "}]}))     # used refused the file)
    assert [p["prompt"] for p in read_prompts(tmp_path / "ok.json")] == ["A cat."]


def test_a_row_of_more_fields_than_its_header_is_refused_naming_the_line(tmp_path):
    """A caption's unquoted comma (CSV) or a tab inside a prompt (TSV, read unquoted) split the row: the prompt was
    cut there and the rest shifted into the next columns (a Category of 'sitting on a mat'), without a word."""
    from evaluation.prompts import read_prompts

    cases = {"a.csv": ("caption,image_id\nA dog,2\nA cat, on a mat,1\n", r"a\.csv:3: 3 fields, the header has 2 "
                                                                         r"\(caption, image_id\); quote a caption"),
             "b.tsv": ("Prompt\tCategory\tChallenge\nA cat\tsitting on a mat\tAnimals\tBasic\n",
                       r"b\.tsv:2: 4 fields, the header has 3 .*cannot hold a tab")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_prompts(tmp_path / name)
    (tmp_path / "ok.csv").write_text('caption,image_id\n"A cat, on a mat",1\n', encoding="utf-8")  # (quoted: one field)
    assert read_prompts(tmp_path / "ok.csv") == [{"caption": "A cat, on a mat", "image_id": "1",
                                                  "prompt": "A cat, on a mat"}]


def test_prompt_column_order_suffix_case_json_lines_and_coco_entries(tmp_path):
    """The prompt is the first of Prompt / prompt / caption / text, stripped; an upper-case suffix reads as its
    format; a JSONL line that does not parse names its own line; a COCO captions file keeps each image's file
    name, skips an image without a caption, and a file or annotation not of that format is a ValueError."""
    from evaluation.prompts import read_prompts

    row = {"text": "T", "caption": "C", "prompt": "p", "Prompt": "P"}
    for key in ("Prompt", "prompt", "caption", "text"):
        (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n")
        assert read_prompts(tmp_path / "a.jsonl")[0]["prompt"] == row.pop(key)
    (tmp_path / "B.TSV").write_text("Prompt\tCategory\n  A cat \tAnimals\n")
    assert read_prompts(tmp_path / "B.TSV") == [{"Prompt": "  A cat ", "Category": "Animals", "prompt": "A cat"}]
    (tmp_path / "c.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"c\.jsonl:3: not valid JSON"):
        read_prompts(tmp_path / "c.jsonl")
    coco = {"images": [{"id": 7, "file_name": "7.jpg"}, {"id": 8, "file_name": "8.jpg"}, {"id": 9}],
            "annotations": [{"image_id": 9, "caption": "A dog."}, {"image_id": 7, "caption": "A cat."}]}
    (tmp_path / "d.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "d.json") == [{"prompt": "A cat.", "image_id": 7, "file_name": "7.jpg"},
                                                 {"prompt": "A dog.", "image_id": 9, "file_name": ""}]
    for name, data, message in (("e.json", {"images": []}, r"e\.json: expected a COCO captions file"),
                                ("f.json", {"images": [{"id": 1}], "annotations": [{"caption": "x"}]},
                                 r"f\.json: annotations\[0\] has no \"image_id\"")):
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            read_prompts(tmp_path / name)


def test_metadata_keeps_the_prompt_order_past_99999(tmp_path):
    """Prompt files are named by a 5-digit index, 6 digits from 100,000 on: sorted as text, those came first."""
    from evaluation.generate import gather_metadata

    for i in (9999, 10000, 99999, 100000, 100001):
        (tmp_path / f"{i:05d}.json").write_text(json.dumps({"index": i}))
    rows = [json.loads(line)["index"] for line in gather_metadata(tmp_path).read_text().splitlines()]
    assert rows == [9999, 10000, 99999, 100000, 100001]


def generate_on_my_rank(folder: str, texts: list[str]) -> str | None:
    """evaluation.generate on this rank's share of `texts` into folder/out (the debug model, folder's vq.pt and
    spm.model); the refusal's message, or None."""
    import torch.distributed as dist

    from data_pipeline.text_tokenizer import TextTokenizer
    from evaluation.generate import generate
    from model_parallel.state import init_parallel
    from vq.tokenizer import load_image_tokenizer

    init_parallel(1)
    model, folder = debug_model(), Path(folder)
    tok = TextTokenizer(folder / "spm.model", model.cfg.text_seq_len)
    try:
        generate(model, load_image_tokenizer(folder / "vq.pt"), tok, [{"prompt": t} for t in texts], folder / "out",
                 SamplingConfig(top_k=8), batch_size=4, rank=dist.get_rank(), world=dist.get_world_size())
    except ValueError as e:
        return str(e)
    return None


def test_a_rerun_with_other_prompts_is_refused_by_every_rank_before_any_writes(single_process, pool2, tmp_path):
    """Each rank checks its own finished prompts; the rank whose prompts matched went on writing while the other
    refused, and the folder mixed two prompt files' images (refused for good with either)."""
    from data_pipeline.text_tokenizer import train_sentencepiece
    from vq.tokenizer import ConvVQ, save_image_tokenizer

    texts = ["a red circle", "a blue square", "two green cats", "a yellow star"]
    train_sentencepiece(texts * 50, 40, tmp_path / "spm.model")
    torch.manual_seed(0)
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64),
                         tmp_path / "vq.pt")
    assert generate_on_my_rank(str(tmp_path), texts[:2]) is None  # (one process: prompts 0 and 1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    changed = [texts[0], "a purple moon", *texts[2:]]  # (prompt 1 is rank 1's)
    refusals = pool2.run(generate_on_my_rank, str(tmp_path), changed)
    assert all(r and "prompt 1: 'a blue square' then, 'a purple moon' now" in r for r in refusals), refusals
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    # A finished prompt's own record is checked too (a folder resumed by a run of other settings before).
    record = json.loads((tmp_path / "out" / "00001.json").read_text())
    record["sampling"]["top_k"] = 9
    (tmp_path / "out" / "00001.json").write_text(json.dumps(record))
    assert "sampling.top_k: 9 then, 8 now" in generate_on_my_rank(str(tmp_path), texts)


def test_parti_prompts_reader_keeps_every_prompt():
    from evaluation.prompts import read_prompts
    from tests.laion_fixtures import SHARED_DATA

    prompts = read_prompts(SHARED_DATA / "PartiPrompts.tsv")
    assert len(prompts) == 1632
    quoted = [p for p in prompts if p["prompt"].startswith('"')]
    assert quoted and all(p["prompt"].endswith('"') or '"' in p["prompt"][1:] for p in quoted)
    assert len({p["Category"] for p in prompts}) == 12 and len({p["Challenge"] for p in prompts}) == 11
    coco = read_prompts(SHARED_DATA / "coco_30k.csv")
    assert len(coco) == 30000 and coco[0]["prompt"] == "A bicycle replica with a clock as the front wheel."


def generation_parts(reference, tmp_path):
    """An exported debug model, a small conv VQ, a SentencePiece model, and 4 prompts."""
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from evaluation.prompts import read_prompts
    from training.export import export, load_exported
    from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

    model = load_exported(export(reference[1], out=tmp_path / "export"))
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64),
                         tmp_path / "vq.pt")
    vq = load_image_tokenizer(tmp_path / "vq.pt")
    words = ["a red circle", "a blue square on grass", "two green cats", '"quoted" text']
    tok = TextTokenizer(train_sentencepiece(words * 50, 40, tmp_path / "spm.model"), model.cfg.text_seq_len)
    (tmp_path / "prompts.txt").write_text("\n".join(words) + "\n")
    return model, vq, tok, read_prompts(tmp_path / "prompts.txt")


def test_generate_writes_images_and_metadata_and_resumes(single_process, reference, tmp_path, monkeypatch):
    from evaluation import generate as generate_module
    from evaluation.generate import gather_metadata, generate

    warnings = []  # the project's "parti" logger (its handler, if any, is the caller's)
    monkeypatch.setattr(generate_module.log, "warning", warnings.append)
    model, vq, tok, prompts = generation_parts(reference, tmp_path)
    graphed, real_sample = [], generate_module.sample  # sample()'s cuda_graph per batch: a GPU's decoder only
    monkeypatch.setattr(generate_module, "sample",
                        lambda *a, **kw: graphed.append(kw["cuda_graph"]) or real_sample(*a, **kw))
    cfg = SamplingConfig(guidance_scale=1.2, top_k=20)
    out = tmp_path / "samples"
    # A killed run's half-written files: each rank removes those of the prompts it makes (and only those).
    out.mkdir()
    left = [out / ".00003_1.vm.99.0e452810.tmp.png", out / ".00003.vm.99.1f.tmp.json",
            out / ".00000_0.vm.98.2a.tmp.png"]
    for path in left:
        path.write_bytes(b"cut short")
    assert generate(model, vq, tok, prompts, out, cfg, samples_per_prompt=2, batch_size=3, rank=1, world=2) == 2
    assert graphed == [next(model.parameters()).is_cuda] * 2  # (this rank: 2 prompts x 2 samples, 3 a batch)
    assert [p.exists() for p in left] == [False, False, True]  # (prompt 0 is rank 0's)
    assert generate(model, vq, tok, prompts, out, cfg, samples_per_prompt=2, batch_size=5, rank=0, world=2) == 2
    assert not any(p.name.startswith(".") for p in out.iterdir())
    assert model.cfg.caption_drop_prob > 0 and warnings == []  # (guidance on a model trained for it)
    assert len(list(out.glob("*.png"))) == 8
    first = (out / "00003_1.png").read_bytes()
    assert generate(model, vq, tok, prompts, out, cfg, samples_per_prompt=2) == 0  # all done: skipped
    lines = gather_metadata(out).read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[3])["prompt"] == '"quoted" text'
    # A rerun with fewer prompts (a smaller --limit) gathers only its own, not the earlier run's later ones.
    assert generate(model, vq, tok, prompts[:2], out, cfg, samples_per_prompt=2) == 0
    assert gather_metadata(out, 2).read_text().splitlines() == [(out / f"{i:05d}.json").read_text() for i in (0, 1)]
    again = tmp_path / "again"  # one process, another batch size: the same images
    generate(model, vq, tok, prompts, again, cfg, samples_per_prompt=2, batch_size=8)
    assert (again / "00003_1.png").read_bytes() == first
    saved = (again / "00001.json").read_text()  # a damaged prompt record is named, not a bare JSON error
    (again / "00001.json").write_text(saved[:20])
    with pytest.raises(ValueError, match=r"again/00001.json: a damaged record \(JSONDecodeError: .*delete it"):
        generate(model, vq, tok, prompts, again, cfg, samples_per_prompt=2)
    (again / "00001.json").write_text(saved)
    record = json.loads((again / "generation.json").read_text())  # a folder begun under the earlier affine seeds
    (again / "generation.json").write_text(json.dumps({k: v for k, v in record.items() if k != "seeding"}))
    with pytest.raises(ValueError, match=r"seeding: '\(not recorded\)' then, 'SeedSequence"):
        generate(model, vq, tok, prompts, again, cfg, samples_per_prompt=2)
    modes = []  # --compile-decode: the static step through inductor (traced with aot_eager here: no C++ build)
    monkeypatch.setattr(generate_module, "sample", lambda *a, **kw: modes.append((kw["static_cache"], kw["compiled"]))
                        or real_sample(*a, **{**kw, "compiled": kw["compiled"] and "aot_eager"}))
    generate(model, vq, tok, prompts[:1], tmp_path / "compiled", cfg, samples_per_prompt=2, compile_decode=True)
    assert modes == [(True, "inductor")] and len(list((tmp_path / "compiled").glob("*.png"))) == 2


def test_generate_with_an_upsampler_writes_both_resolutions(single_process, reference, tmp_path):
    """Parti's last stage: every kept image also upsampled (x2 here) into samples_upsampled/, the same images as
    without the upsampler in out/, the upsampler recorded; another upsampler into the same folder is refused."""
    from PIL import Image

    from evaluation.generate import gather_metadata, generate, load_upsampler_for_sampling
    from sr.model import SRModelConfig, build_wdsr, save_upsampler

    model, vq, tok, prompts = generation_parts(reference, tmp_path)
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        save_upsampler(build_wdsr(SRModelConfig(preset="tiny")), SRModelConfig(preset="tiny"), tmp_path / name)
    upsampler = load_upsampler_for_sampling(tmp_path / "a.pt", "cpu")
    cfg, out = SamplingConfig(top_k=20), tmp_path / "samples"
    generate(model, vq, tok, prompts[:2], out, cfg, samples_per_prompt=2, upsampler=upsampler)
    generate(model, vq, tok, prompts[:2], tmp_path / "plain", cfg, samples_per_prompt=2)
    for name in ("00000_0.png", "00001_1.png"):
        assert Image.open(out / name).size == (32, 32)
        assert Image.open(tmp_path / "samples_upsampled" / name).size == (64, 64)
        assert (out / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    assert gather_metadata(out).read_text() == (tmp_path / "samples_upsampled" / "metadata.jsonl").read_text()
    record = json.loads((out / "generation.json").read_text())
    assert record["upsampler"]["sha256"] == upsampler.export_identity["sha256"]
    with pytest.raises(ValueError, match="upsampler.sha256"):
        generate(model, vq, tok, prompts[:2], out, cfg, samples_per_prompt=2,
                 upsampler=load_upsampler_for_sampling(tmp_path / "b.pt", "cpu"))


def test_generate_with_fewer_vq_codes_and_a_text_tokenizer_that_does_not_fit(single_process, reference, tmp_path,
                                                                           monkeypatch):
    """A VQ with fewer codes than the model's image vocabulary generates (sample draws only its codes; other
    codes crashed its decoder); guidance on a model trained without caption dropout is said in one line (rank
    0); a text tokenizer with more tokens than the model's text vocabulary is refused before anything is
    written, and by load_for_sampling before the model is loaded."""
    from evaluation import generate as generate_module
    from evaluation.generate import generate, load_for_sampling
    from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

    model, _, tok, prompts = generation_parts(reference, tmp_path)
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=16),
                         tmp_path / "vq16.pt")
    vq = load_image_tokenizer(tmp_path / "vq16.pt")
    assert vq.codebook_size < model.cfg.image_vocab_size
    warnings = []
    monkeypatch.setattr(generate_module.log, "warning", warnings.append)
    model.cfg = dataclasses.replace(model.cfg, caption_drop_prob=0.0)  # its null caption never trained
    generate(model, vq, tok, prompts[:1], tmp_path / "out", SamplingConfig(top_k=20, guidance_scale=1.5),
             samples_per_prompt=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000_0.png", "00000_1.png"]
    assert len(warnings) == 1 and "guidance_scale=1.5" in warnings[0] and "caption_drop_prob=0)" in warnings[0]
    generate(model, vq, tok, prompts[:1], tmp_path / "out1", SamplingConfig(guidance_scale=1.0), rank=0, world=2)
    assert len(warnings) == 1  # (scale 1 is unguided)
    model.cfg = dataclasses.replace(model.cfg, text_vocab_size=tok.vocab_size - 1)
    message = (rf"--text-tokenizer\) has {tok.vocab_size} tokens, more than the model's text vocabulary "
               rf"\(model.text_vocab_size={tok.vocab_size - 1}\)")
    with pytest.raises(ValueError, match=message):
        generate(model, vq, tok, prompts, tmp_path / "refused", SamplingConfig())
    assert not (tmp_path / "refused").exists()
    config = tmp_path / "export" / "config.json"
    saved = json.loads(config.read_text())
    saved["model"]["text_vocab_size"] = tok.vocab_size - 1
    config.write_text(json.dumps(saved))
    monkeypatch.setattr(generate_module, "load_exported", lambda *a: pytest.fail("the model was loaded first"))
    with pytest.raises(ValueError, match=message):
        load_for_sampling(tmp_path / "export", tmp_path / "vq16.pt", tmp_path / "spm.model", "cpu")


def test_images_reach_the_disk_before_the_json_marks_them_done(tmp_path, monkeypatch):
    """Each PNG is flushed to the disk (fsync) before its rename, and so before the prompt's .json, which marks
    it done: a crash cannot leave a .json beside an empty image. The saved pixels are the image's."""
    import os

    import numpy as np
    from PIL import Image

    from common import files
    from evaluation.generate import finish_prompt, to_pil

    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    temporary, name_for = {}, files.temporary_name  # the temporary name each final name was written under
    monkeypatch.setattr(files, "temporary_name", lambda path: temporary.setdefault(path.name, name_for(path)))
    images = [torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(k)) * 2 - 1 for k in range(2)]
    finish_prompt(5, {"prompt": "a cat"}, images, tmp_path, {"seed": 0})
    names = ["00005_0.png", "00005_1.png", "00005.json"]
    assert synced == [str(temporary[name]) for name in names]
    for k in range(2):  # (8 rows, 12 columns: a transposed or channel-swapped image differs; mapped here by hand)
        expected = np.rint((images[k].numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(tmp_path / names[k]).convert("RGB")), expected)
        assert np.array_equal(np.asarray(to_pil(images[k])), expected)


@torch.no_grad()
def test_the_kept_samples_are_the_best_scored_and_upsampled_are_theirs(tmp_path, monkeypatch):
    """With a scorer and keep: the PNGs are the `keep` best-scored samples, best first, and each upsampled PNG is
    the upsampler's image of that same sample (an upsampler that drew the first samples instead went unseen:
    an untrained WDSR is bicubic, and no test combined it with reranking). Scores: a stand-in scorer (mean
    brightness); the upsampler's tail perturbed so that it is not bicubic."""
    import numpy as np
    from PIL import Image

    from evaluation.generate import finish_prompt, to_pil, upsampled_folder
    from sr.model import SRModelConfig, build_wdsr, upsample

    class Brightness:
        protocol = {"weights": "mean brightness"}

        def score(self, pictures, texts):
            return torch.tensor([float(np.asarray(p).mean()) for p in pictures])

    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 8, 12, generator=g) * 0.2 + shift).clamp(-1, 1) for shift in (-0.5, 0.3, -0.1, 0.6)]
    torch.manual_seed(1)
    upsampler = build_wdsr(SRModelConfig(preset="tiny")).eval()
    torch.nn.init.normal_(upsampler.tail[0].parametrizations.weight.original0, std=0.05)  # (not bicubic any more)
    out = tmp_path / "samples"
    out.mkdir()
    finish_prompt(0, {"prompt": "a cat"}, images, out, {"seed": 0}, scorer=Brightness(), keep=2, upsampler=upsampler)
    meta = json.loads((out / "00000.json").read_text())
    assert meta["sample_index"] == [3, 1] and meta["files"] == ["00000_0.png", "00000_1.png"]
    for r, k in enumerate([3, 1]):
        assert np.array_equal(np.asarray(Image.open(out / f"00000_{r}.png")), np.asarray(to_pil(images[k])))
        large = np.asarray(Image.open(upsampled_folder(out) / f"00000_{r}.png"))
        assert np.array_equal(large, np.asarray(to_pil(upsample(upsampler, images[k][None])[0])))
        bicubic = torch.nn.functional.interpolate(images[k][None], scale_factor=2, mode="bicubic")[0]
        assert not np.array_equal(large, np.asarray(to_pil(bicubic)))
    monkeypatch.chdir(out)  # --out . (a path of no name: a ValueError after the first batch's samples)
    assert upsampled_folder(Path(".")) == upsampled_folder(out) == tmp_path / "samples_upsampled"


# ----------------------------------------------------------------------------------------------
# Loading an export: built on the meta device, weights assigned (no random initialisation), any dtype.


def write_export(model, out):
    """An export folder (training/export.py's layout) holding `model`'s weights."""
    import dataclasses

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in model.state_dict().items() if not n.endswith("_extra_state")},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": dataclasses.asdict(model.cfg), "checkpoint": "test"}))
    return out


class InitSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records random-initialisation ops (normal_, uniform_, ...) that write real (non-meta) memory."""

    RANDOM = ("normal", "uniform", "trunc_normal", "bernoulli", "random", "exponential")

    def __init__(self):
        super().__init__()
        self.real_inits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if any(name.startswith(r) for r in self.RANDOM) and not args[0].is_meta:
            self.real_inits.append(name)
        return out


def old_load(path):
    """The previous load path: a randomly initialised fp32 model on CPU, then the weights copied in."""
    from safetensors.torch import load_file

    from model_parallel.config import saved_model_config
    from model_parallel.model import PartiModel

    cfg = saved_model_config(json.loads((path / "config.json").read_text())["model"])
    model = PartiModel(cfg)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    return model.eval()


@torch.no_grad()
def test_load_exported_builds_on_meta_without_initialising_and_equals_the_old_path(single_process, tmp_path):
    from training.export import load_exported

    path = write_export(debug_model(seed=5), tmp_path / "export")
    with InitSpy() as spy:
        reference = old_load(path)
    assert spy.real_inits  # the spy sees the old path's random initialisation
    with InitSpy() as spy:
        model = load_exported(path)
    assert spy.real_inits == []  # the new one allocates no randomly initialised weights
    text, codes = debug_batch(model.cfg, batch=3)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert torch.equal(model(text, codes), reference(text, codes))
    params = dict(model.named_parameters())
    for name, p in reference.named_parameters():  # megatron's TP attributes survive the assignment
        assert vars(params[name]) == vars(p), name
    assert any(getattr(p, "tensor_model_parallel", False) for p in params.values())
    cfg = SamplingConfig(top_k=5)
    assert torch.equal(sample(model, text, cfg, torch.Generator().manual_seed(0)),
                       sample(reference, text, cfg, torch.Generator().manual_seed(0)))


def test_a_damaged_or_mismatched_export_is_refused_naming_its_weights(single_process, tmp_path):
    """A truncated model.safetensors (safetensors' own error) and a config.json of another model size (load_state_dict's
    size mismatches) ended generation in a traceback: one ValueError naming the file; weights of another checkpoint
    than config.json's are refused."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from training.export import load_exported

    path = write_export(debug_model(seed=5), tmp_path / "export")
    weights = path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{weights}: cannot be read .*damaged or truncated: export again"):
        load_exported(path)
    weights.write_bytes(whole)
    # Weights tagged with another checkpoint than config.json's (a re-export stopped between its two files).
    save_file(load_file(str(weights)), str(weights), metadata={"checkpoint": "step_2"})
    with pytest.raises(ValueError, match=rf"{path}: model.safetensors holds the weights of checkpoint step_2, "
                                         "config.json describes test"):
        load_exported(path)
    weights.write_bytes(whole)
    config = json.loads((path / "config.json").read_text())
    wider = dataclasses.replace(debug_model(seed=5).cfg, hidden_size=2 * config["model"]["hidden_size"])
    wider = dataclasses.asdict(wider)
    (path / "config.json").write_text(json.dumps({**config, "model": wider}))
    with pytest.raises(ValueError, match=rf"{weights} does not fit the configured model \(\d+ other shape\(s\): "
                                         r".*\(the model's: \(.*its config.json describes another model"):
        load_exported(path)


def test_an_export_of_integer_weights_or_without_a_model_section_is_refused_naming_its_file(single_process, tmp_path):
    """A tensor stored as integers or booleans (the header's dtype edited: its bytes read as other numbers) loaded
    cast to floats without a word; a config.json without a model section ended in a KeyError or AttributeError,
    and one of unknown keys in a ConfigError not naming the file: each a ValueError naming it (a float16 or
    bfloat16 copy of the weights still loads)."""
    from safetensors.torch import load_file, save_file

    from training.export import exported_data_tokenizers, exported_model_config, load_exported

    path = write_export(debug_model(seed=5), tmp_path / "export")
    weights, config = path / "model.safetensors", path / "config.json"
    tensors = load_file(str(weights))
    name = min(tensors)
    save_file({**tensors, name: tensors[name].to(torch.int32)}, str(weights))
    with pytest.raises(ValueError, match=rf"{weights}: 1 tensor\(s\) not floating point: {re.escape(name)} \(I32\)"):
        load_exported(path)
    for half in (torch.float16, torch.bfloat16):
        save_file({n: t.to(half) for n, t in tensors.items()}, str(weights))
        assert {p.dtype for p in load_exported(path).parameters()} == {torch.float32}
    saved = json.loads(config.read_text())
    for bad in ({"checkpoint": "test"}, [saved], {**saved, "model": "parti-debug"}):
        config.write_text(json.dumps(bad))
        for read in (load_exported, exported_model_config, exported_data_tokenizers):
            with pytest.raises(ValueError, match=rf"{config}: no model section"):
                read(path)
    config.write_text(json.dumps({**saved, "model": {**saved["model"], "hidden_sise": 64}}))
    with pytest.raises(ValueError, match=rf"{config}: unknown key\(s\) model.hidden_sise"):
        load_exported(path)


def test_assign_weights_refuses_a_parameter_or_buffer_left_on_the_meta_device():
    """Every parameter and buffer of the meta-built module must get a tensor: one left on meta is named."""
    from training.export import assign_weights

    def meta_module():
        with torch.device("meta"):
            module = torch.nn.Linear(2, 3)
            module.register_buffer("scale", torch.ones(3))
        return module

    weights = {"weight": torch.ones(3, 2), "bias": torch.zeros(3), "scale": torch.full((3,), 2.0)}
    module = meta_module()
    assign_weights(module, dict(weights), "w.safetensors")
    assert all(torch.equal(t, weights[n]) for n, t in module.state_dict().items())
    for name in weights:
        with pytest.raises(RuntimeError, match=rf"w.safetensors: no weights for \['{name}'\]"):
            assign_weights(meta_module(), {k: v for k, v in weights.items() if k != name}, "w.safetensors")


@torch.no_grad()
def test_load_exported_in_bf16(single_process, tmp_path):
    from training.export import default_dtype, load_exported

    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda") == torch.bfloat16
    path = write_export(debug_model(seed=5), tmp_path / "export")
    fp32, bf16 = load_exported(path), load_exported(path, "cpu", torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    text, codes = debug_batch(fp32.cfg, batch=3)
    a, b = fp32(text, codes), bf16(text, codes).float()
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)  # bf16 rounding of the same weights
    codes = sample(bf16, text, SamplingConfig(guidance_scale=1.2), torch.Generator().manual_seed(0))
    assert codes.shape == (3, bf16.cfg.image_seq_len) and codes.max() < bf16.cfg.image_vocab_size


def test_each_image_draws_from_its_own_seed_and_meta_lists_scores_in_rank_order(tmp_path, monkeypatch):
    """generate(): the generator of prompt i's sample k is seeded with image_seed(seed, i, k) (a stand-in model
    and sampler: the seeds are read back from the generators); the saved PNG is the image rounded to the nearest
    8-bit value; a reranked prompt's clip_scores are its kept samples' in rank order, all_clip_scores in sample
    order; gather_metadata(out, n) lists prompts below n only; the record holds --keep (a rerun with another is
    refused)."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from evaluation import generate as generate_module
    from evaluation.generate import finish_prompt, gather_metadata, generate, image_seed, to_pil
    from evaluation.sampling import SamplingConfig
    from vq.tokenizer import ConvVQ

    seeds = []

    def fake_sample(model, text, cfg, generators, codebook_size, **kw):
        seeds.extend(g.initial_seed() for g in generators)
        return torch.randint(0, codebook_size, (len(generators), 4))

    monkeypatch.setattr(generate_module, "sample", fake_sample)
    model = torch.nn.Linear(1, 1)
    model.cfg = SimpleNamespace(caption_drop_prob=0.1, image_seq_len=4, image_vocab_size=8, text_vocab_size=8)
    text_tok = SimpleNamespace(encode=lambda prompt: ([0, 0, 0, 0],), content_hash="t",
                               vocab_size=8)
    vq = ConvVQ(image_size=16, downsample=3, channels=4, code_dim=4, codebook_size=8).eval()
    rows = [{"prompt": f"p{i}"} for i in range(3)]
    generate(model, vq, text_tok, rows, tmp_path / "out", SamplingConfig(), samples_per_prompt=2, seed=7,
             batch_size=4)
    assert seeds == [image_seed(7, i, k) for i in range(3) for k in range(2)]
    assert [json.loads(line)["index"]
            for line in gather_metadata(tmp_path / "out", 2).read_text().splitlines()] == [0, 1]

    image = torch.full((3, 2, 2), 100.6 / 127.5 - 1)  # 100.6 in 8 bits: saved as 101
    assert np.asarray(to_pil(image)).tolist() == [[[101] * 3] * 2] * 2

    scorer = SimpleNamespace(protocol={"weights": "fixed"}, score=lambda pictures, texts: torch.tensor([0.1, 0.9, 0.5]))
    finish_prompt(0, {"prompt": "x"}, [image] * 3, tmp_path, {}, scorer=scorer, keep=2)
    meta = json.loads((tmp_path / "00000.json").read_text())
    assert meta["sample_index"] == [1, 2] and meta["clip_scores"] == pytest.approx([0.9, 0.5])
    assert meta["all_clip_scores"] == pytest.approx([0.1, 0.9, 0.5])
    assert np.asarray(Image.open(tmp_path / "00000_0.png")).max() == 101

    from evaluation.generate import RECORD, check_resumable, generation_record

    kept = [generation_record(model, vq, text_tok, SamplingConfig(), 4, 0, keep=keep) for keep in (1, 2)]
    assert [record["keep"] for record in kept] == [1, 2]  # (--keep decides which images a folder holds)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / RECORD).write_text(json.dumps(kept[0]))
    with pytest.raises(ValueError, match="keep: 1 then, 2 now"):
        check_resumable(tmp_path / "kept", kept[1], [])


def test_a_vq_of_another_grid_or_more_codes_is_refused():
    """check_fits: a VQ whose grid is not the model's image grid, or with more codes than its image vocabulary."""
    from types import SimpleNamespace

    from evaluation.generate import check_fits

    model_cfg = SimpleNamespace(image_seq_len=16, image_vocab_size=64, text_vocab_size=100)
    text_tok = SimpleNamespace(vocab_size=100)
    check_fits(model_cfg, SimpleNamespace(grid=4, codebook_size=64), text_tok)
    for vq in (SimpleNamespace(grid=8, codebook_size=64), SimpleNamespace(grid=4, codebook_size=65)):
        with pytest.raises(ValueError, match=rf"grid {vq.grid}, {vq.codebook_size} codes\) does not fit the model"):
            check_fits(model_cfg, vq, text_tok)


def test_a_folder_recorded_with_another_decoder_is_refused(tmp_path):
    """Only a record without `decoding` (written before it was recorded) is read as the growing KV cache's: a
    recorded decoder is kept, and another one now is refused."""
    from evaluation.generate import RECORD, check_resumable

    record = {"seed": 0, "decoding": "kv_cache"}
    (tmp_path / RECORD).write_text(json.dumps({"seed": 0}))
    check_resumable(tmp_path, record, [])
    (tmp_path / RECORD).write_text(json.dumps({"seed": 0, "decoding": "cuda_graph"}))
    with pytest.raises(ValueError, match="decoding: 'cuda_graph' then, 'kv_cache' now"):
        check_resumable(tmp_path, record, [])


def test_saved_pixels_saturate_outside_minus_one_to_one_and_settings_win_over_prompt_columns(tmp_path):
    """to_pil clamps before the 8-bit cast: a decoder overshooting [-1, 1] (1.2, -1.3) saves 255 and 0, not
    bytes wrapped around to 25 or 217. A prompt row's own `index` or `seed` column does not replace the run's in
    the prompt's .json (the index gather_metadata and clip_score read, the seed a resume checks)."""
    import numpy as np

    from evaluation.generate import finish_prompt, to_pil

    image = torch.tensor([1.2, -1.3, 1.0, -1.0]).view(1, 2, 2).expand(3, 2, 2)
    assert np.asarray(to_pil(image))[..., 0].tolist() == [[255, 0], [255, 0]]
    finish_prompt(4, {"prompt": "a cat", "index": 99, "seed": 5, "Category": "Animals"}, [image], tmp_path,
                  {"seed": 0})
    meta = json.loads((tmp_path / "00004.json").read_text())
    assert (meta["index"], meta["seed"], meta["Category"]) == (4, 0, "Animals")


def test_a_resume_is_refused_for_another_dtype_sample_count_decoder_weights_or_reranking(tmp_path):
    """The record names what the images depend on and a rerun that differs in it is refused: the model's dtype,
    --samples-per-prompt, the VQ's decoder weights (a fine-tuned detokenizer keeps its source's content hash: its
    codes are the same, its images are not), a folder made without reranking rerun with it, and a setting the
    folder recorded that this run does not have (a record written by a later version)."""
    from types import SimpleNamespace

    from evaluation.generate import RECORD, check_resumable, generation_record
    from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

    torch.manual_seed(0)
    vq = ConvVQ(image_size=16, downsample=3, channels=4, code_dim=4, codebook_size=8)
    source = save_image_tokenizer(vq, tmp_path / "vq.pt")
    with torch.no_grad():
        next(vq.decoder.parameters()).add_(0.1)
    save_image_tokenizer(vq, tmp_path / "finetuned.pt", codes_of=source)
    vqs = [load_image_tokenizer(tmp_path / name) for name in ("vq.pt", "finetuned.pt")]
    assert vqs[0].content_hash == vqs[1].content_hash
    tok = SimpleNamespace(content_hash="t")
    model = torch.nn.Linear(1, 1)
    scorer = SimpleNamespace(protocol={"weights": "clip.bin", "weights_sha256": "ab", "model": "ViT-B-32"})
    base = generation_record(model, vqs[0], tok, SamplingConfig(), 2, 0)
    changed = {"dtype: 'float32' then, 'bfloat16' now": generation_record(model.to(torch.bfloat16), vqs[0], tok,
                                                                             SamplingConfig(), 2, 0),
               "samples_per_prompt: 2 then, 4 now": generation_record(model.float(), vqs[0], tok, SamplingConfig(),
                                                                      4, 0),
               "vq: ": generation_record(model, vqs[1], tok, SamplingConfig(), 2, 0),
               "rerank: None then, {'clip': 'clip.bin'": generation_record(model, vqs[0], tok, SamplingConfig(), 2,
                                                                           0, scorer)}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RECORD).write_text(json.dumps(base))
    check_resumable(tmp_path / "out", base, [])
    for difference, record in changed.items():
        with pytest.raises(ValueError, match=re.escape(difference)):
            check_resumable(tmp_path / "out", record, [])
    later = {**base, "sampling": {**base["sampling"], "min_p": 0.1}}
    (tmp_path / "out" / RECORD).write_text(json.dumps(later))
    with pytest.raises(ValueError, match=re.escape("sampling.min_p: 0.1 then, '(not recorded)' now")):
        check_resumable(tmp_path / "out", base, [])


def test_a_record_that_is_json_but_not_an_object_is_named(tmp_path):
    """A generation.json or prompt .json holding other JSON than an object (a list, null: an edit, another tool's
    file) is named as a damaged record, not a TypeError of merging it."""
    from evaluation.generate import RECORD, check_resumable

    (tmp_path / "00000.json").write_text("null")
    with pytest.raises(ValueError, match=r"00000\.json: a damaged record \(not a JSON object\); delete it"):
        check_resumable(tmp_path, {"seed": 0}, [{"prompt": "a cat"}])
    (tmp_path / RECORD).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation\.json: a damaged record \(not a JSON object\)"):
        check_resumable(tmp_path, {"seed": 0}, [])


def test_a_record_not_in_utf_8_is_named(tmp_path):
    """A record saved in another encoding (an editor's Latin-1) is named as a damaged record, as a cut-short one is,
    not a UnicodeDecodeError without the file's name."""
    from evaluation.generate import RECORD, check_resumable

    (tmp_path / RECORD).write_bytes('{"prompt": "café"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"generation\.json: a damaged record \(UnicodeDecodeError: .*delete it"):
        check_resumable(tmp_path, {"seed": 0}, [])


def test_every_ranks_problems_are_listed_once_in_rank_order(monkeypatch):
    """A setting changed for the whole folder is found by every rank: the refusal names it once, not once per rank
    (the message shows 6 problems: 8 copies of one hid a prompt that differed on one rank)."""
    import torch.distributed as dist

    from evaluation.generate import every_ranks

    found = [["seed: 0 then, 1 now"], ["seed: 0 then, 1 now", "prompt 1: 'a' then, 'b' now"], ["seed: 0 then, 1 now"]]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "all_gather_object", lambda gathered, problems: gathered.__setitem__(slice(None), found))
    assert every_ranks(found[0], 3) == ["seed: 0 then, 1 now", "prompt 1: 'a' then, 'b' now"]
    assert every_ranks(["mine"], 2) == ["mine"]  # (not this group's ranks: no collective)


def test_a_killed_runs_temporary_files_are_removed_from_both_folders_for_this_ranks_prompts_only(tmp_path):
    """remove_unfinished: a half-written PNG (or .json) of a prompt about to be made again goes, in the output
    folder and in its upsampled sibling (where a killed run with --upsampler leaves them too); those of other
    prompts, and of files that are not a prompt's, stay."""
    from evaluation.generate import remove_unfinished, upsampled_folder

    out = tmp_path / "samples"
    left = {}
    for folder in (out, upsampled_folder(out)):
        folder.mkdir()
        for name in (".00003_1.vm.99.0e452810.tmp.png", ".00003.vm.99.1f.tmp.json", ".00002_0.vm.98.2a.tmp.png",
                     ".metadata.vm.98.3b.tmp.jsonl"):
            (folder / name).write_bytes(b"cut short")
            left[folder / name] = name.startswith(".00003")
    remove_unfinished(out, [3, 5])
    assert {path: not path.exists() for path in left} == left


def test_batch_size_0_asks_auto_batch_size_for_the_guided_model(tmp_path, monkeypatch):
    """--batch-size 0: the batch is auto_batch_size's for this model and whether guidance doubles its caches
    (on a GPU the guided batch fits half the images), not a fixed 8; a batch spans prompts. Guidance on a model
    trained with a little caption dropout is not warned about."""
    from types import SimpleNamespace

    from evaluation import generate as generate_module
    from vq.tokenizer import ConvVQ

    asked, batches, warnings = [], [], []
    monkeypatch.setattr(generate_module.log, "warning", warnings.append)
    monkeypatch.setattr(generate_module, "auto_batch_size", lambda model, guided: asked.append(guided) or 3)
    monkeypatch.setattr(generate_module, "sample", lambda model, text, cfg, generators, codebook_size, **kw:
                        batches.append(len(generators)) or torch.zeros(len(generators), 4, dtype=torch.long))
    model = torch.nn.Linear(1, 1)
    model.cfg = SimpleNamespace(caption_drop_prob=0.1, image_seq_len=4, image_vocab_size=8, text_vocab_size=8)
    text_tok = SimpleNamespace(encode=lambda prompt: ([0, 0, 0, 0],), content_hash="t", vocab_size=8)
    vq = ConvVQ(image_size=16, downsample=3, channels=4, code_dim=4, codebook_size=8).eval()
    rows = [{"prompt": f"p{i}"} for i in range(2)]
    generate_module.generate(model, vq, text_tok, rows, tmp_path / "a", SamplingConfig(guidance_scale=2.0),
                             samples_per_prompt=2)
    generate_module.generate(model, vq, text_tok, rows, tmp_path / "b", SamplingConfig(), samples_per_prompt=2)
    assert asked == [True, False] and batches == [3, 1, 3, 1]
    assert warnings == []  # (guidance on a model trained with some caption dropout, however little)


def test_check_fits_refuses_a_smaller_grid_and_allows_a_full_vocabulary():
    """A VQ grid smaller than the model's (fewer image tokens than it predicts) is refused like a larger one; a
    VQ with exactly the model's image vocabulary and a text tokenizer of exactly its text vocabulary fit."""
    from types import SimpleNamespace

    from evaluation.generate import check_fits

    model_cfg = SimpleNamespace(image_seq_len=16, image_vocab_size=64, text_vocab_size=100)
    check_fits(model_cfg, SimpleNamespace(grid=4, codebook_size=64), SimpleNamespace(vocab_size=100))
    with pytest.raises(ValueError, match=r"grid 2, 64 codes\) does not fit the model \(16 image tokens"):
        check_fits(model_cfg, SimpleNamespace(grid=2, codebook_size=64), SimpleNamespace(vocab_size=100))


def test_metadata_gathers_only_the_prompts_json_files(tmp_path):
    """gather_metadata reads NNNNN.json only: another .json whose name starts with a digit (notes, a copy) is
    neither gathered nor a ValueError of reading its name as a prompt index."""
    from evaluation.generate import gather_metadata

    (tmp_path / "00000.json").write_text(json.dumps({"index": 0}))
    (tmp_path / "2024_notes.json").write_text(json.dumps({"note": "kept by hand"}))
    assert gather_metadata(tmp_path, 5).read_text() == '{"index": 0}\n'


def test_generate_called_directly_refuses_bad_counts_before_writing(tmp_path):
    """generate() itself (evaluation.benchmark calls it, not main) checks the counts: 0 samples per prompt wrote
    no image and no .json, and a keep above the samples kept fewer than asked, each without a word."""
    from types import SimpleNamespace

    from evaluation.generate import generate
    from vq.tokenizer import ConvVQ

    model = torch.nn.Linear(1, 1)
    model.cfg = SimpleNamespace(caption_drop_prob=0.1, image_seq_len=4, image_vocab_size=8, text_vocab_size=8)
    text_tok = SimpleNamespace(encode=lambda prompt: ([0, 0, 0, 0],), content_hash="t", vocab_size=8)
    vq = ConvVQ(image_size=16, downsample=3, channels=4, code_dim=4, codebook_size=8).eval()
    for kw, message in (({"samples_per_prompt": 0}, r"samples_per_prompt\) must be >= 1, not 0"),
                        ({"samples_per_prompt": 2, "keep": 3}, r"--keep 3 keeps more than the 2 sample")):
        with pytest.raises(ValueError, match=message):
            generate(model, vq, text_tok, [{"prompt": "p"}], tmp_path / "out", SamplingConfig(), **kw)
        assert not (tmp_path / "out").exists()
