"""The decoder-only (DALL-E-style) model: a plain-PyTorch reference gives its logits, loss and gradients; the
KV cache (growing, static) and sampling equal full recomputation; TP=2, PP=2, ZeRO-3 and TP=2 with sequence
parallelism train like DP=2 at ZeRO-0; a checkpoint resumes at another layout; its config rules."""
from __future__ import annotations

import pytest
import torch

from common.config import ConfigError
from evaluation.sampling import SamplingConfig, sample
from tests.conftest import STEPS, debug_batch, run
from tests.reference_model import ReferenceDecoderOnly, load_decoder_only

DALLE = ("model.preset=dalle-debug",)


def dalle_config(**overrides):
    from training.config import load_config

    sets = [*DALLE, "model.caption_drop_prob=0.0"] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, sets).validate().model


def dalle_model(seed=0, **overrides):
    from model_parallel.model import PartiModel
    from model_parallel.state import seed_everything

    seed_everything(seed)
    return PartiModel(dalle_config(**overrides), init_seed=seed)


@pytest.mark.parametrize("text_loss_weight", [0.0, 0.125])
def test_logits_loss_and_gradients_equal_reference(single_process, text_loss_weight):
    model = dalle_model(**{"model.text_loss_weight": text_loss_weight})
    cfg = model.cfg
    ref = load_decoder_only(ReferenceDecoderOnly(cfg), model.state_dict())
    text, codes = debug_batch(cfg)
    torch.testing.assert_close(model(text, codes).transpose(0, 1), ref(text, codes), rtol=1e-5, atol=1e-5)
    loss, ref_loss = model.loss(text, codes), ref.loss(text, codes)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    params = dict(model.named_parameters())
    pairs = [("decoder.3.self_attn.fn.proj.weight", ref.layers[3].attn.wo), ("head.proj.weight", ref.head),
             ("decoder.0.mlp.fn.fc1.weight", ref.layers[0].mlp.fc1)]
    if text_loss_weight:
        pairs.append(("head.text_proj.weight", ref.text_head))
    else:
        assert "head.text_proj.weight" not in params  # no text head without a text loss
    for name, module in pairs:
        torch.testing.assert_close(params[name].grad, module.weight.grad, rtol=1e-5, atol=1e-6, msg=name)
    text_grad = params["embedding.text.embed.weight"].grad[: cfg.text_vocab_size]
    torch.testing.assert_close(text_grad, ref.text_embed.weight.grad, rtol=1e-5, atol=1e-6)


def test_the_caption_conditions_the_image_and_the_stream_is_causal(single_process):
    """Guards the reference comparison: the caption (padding included: it is not masked) changes every image
    logit; a later code changes no earlier logit."""
    model = dalle_model(seed=2)
    text, codes = debug_batch(model.cfg)
    base = model(text, codes)
    other = text.clone()
    other[1, -1] = 9  # where there was padding
    assert not torch.allclose(base[:, 1], model(other, codes)[:, 1])
    later = codes.clone()
    later[:, 5] = (later[:, 5] + 1) % model.cfg.image_vocab_size
    torch.testing.assert_close(base[:6], model(text, later)[:6])
    assert not torch.allclose(base[6:], model(text, later)[6:])


@torch.no_grad()
def test_decode_after_the_encoded_caption_equals_the_forward(single_process):
    """decode(inputs, *encode(text)): the caption's part of the stream put before the image inputs, the logits of
    the image positions only, in shape and values those of model(text, codes)."""
    model = dalle_model(seed=1).eval()
    text, codes = debug_batch(model.cfg)
    full = model(text, codes)
    decoded = model.decode(model.decoder_input(codes), *model.encode(text))
    assert decoded.shape == full.shape == (model.cfg.image_seq_len, text.shape[0], model.cfg.image_vocab_size)
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk, static, pattern", [
    (1, False, "dalle"), (5, False, "dalle"), (1, True, "dalle"), (2, False, "dalle"), (3, False, "dalle"),
    (7, False, "dalle"), (2, False, "dense"), (3, False, "dense"), (7, False, "dense")],
    ids=["step", "chunks", "static", "chunks-2", "chunks-3", "chunks-7", "dense-2", "dense-3", "dense-7"])
def test_kv_cache_decoding_equals_the_full_forward(single_process, chunk, static, pattern):
    """Dense attention too: its chunks after the cached caption take the offset causal mask (layers._cached_mask),
    where the dalle pattern brings a mask of its own."""
    model = dalle_model(**{"model.attention_pattern": pattern}).eval()
    text, codes = debug_batch(model.cfg)
    with torch.no_grad():
        full = model(text, codes).transpose(0, 1)
        caches, memory, mask = model.start_decoding(text, static=static)
        inputs = model.decoder_input(codes)
        steps = [model.decode_step(inputs[:, i:i + chunk], caches, memory, mask)
                 for i in range(0, inputs.shape[1], chunk)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    if not static:
        assert caches[0].length == model.cfg.stream_len  # caption + image


def test_sampling_with_the_cache_equals_recomputation(single_process):
    model = dalle_model(seed=1).eval()
    text, _ = debug_batch(model.cfg)
    for cfg in (SamplingConfig(top_k=5, temperature=0.7), SamplingConfig(guidance_scale=3.0)):
        draw = lambda **kw: sample(model, text, cfg, torch.Generator().manual_seed(3), **kw)
        recomputed = draw(use_cache=False)
        assert torch.equal(draw(), recomputed)
        assert torch.equal(draw(static_cache=True), recomputed)
    # The cache places the image after model.text_seq_len caption positions: a shorter caption is refused
    # (it crashed the growing cache and shifted the static one's write position).
    for kw in ({}, {"static_cache": True}):
        with pytest.raises(ValueError, match=f"text_seq_len={model.cfg.text_seq_len} tokens .*, not 10$"):
            sample(model, text[:, :10], SamplingConfig(temperature=0), **kw)


@pytest.mark.parametrize("pattern", ["dalle", "dense"])
@torch.no_grad()
def test_restarted_static_caches_prefill_the_whole_caption(single_process, pattern):
    """start_decoding(into=caches): the caches of an earlier start restarted in place read every cache position again
    (a sampler's shorter read left from its first steps, `keys`, would hide most of the caption from its own
    prefill), then decode what the full forward computes."""
    model = dalle_model(**{"model.attention_pattern": pattern}).eval()
    text, codes = debug_batch(model.cfg)
    full = model(text, codes).transpose(0, 1)
    caches, _, _ = model.start_decoding(text, static=True)
    caches[0].static.keys = 2  # (what a sampler's first steps read)
    caches, memory, mask = model.start_decoding(text, static=True, into=caches)
    inputs = model.decoder_input(codes)
    steps = [model.decode_step(inputs[:, i:i + 1], caches, memory, mask) for i in range(inputs.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_stream_is_dropped_as_one_site_keyed_by_sample(single_process):
    """The decoder-only embedding's dropout: in training, the caption and image parts joined, then one keyed mask over
    the whole stream (the parts' own sites unused)."""
    from model_parallel.keyed_dropout import keyed_dropout

    model = dalle_model(**{"model.dropout": 0.5})
    text, codes = debug_batch(model.cfg)
    image_in, idx = model.decoder_input(codes), torch.tensor([3, 4, 5])
    with torch.no_grad():
        plain = model.embedding.eval()(text, image_in, sample_index=idx)
        dropped = model.embedding.train()(text, image_in, sample_index=idx)
    assert plain.shape == (model.cfg.stream_len, 3, model.cfg.hidden_size)
    torch.testing.assert_close(dropped, keyed_dropout(plain, model.embedding.drop.mask(plain, idx), 0.5))
    assert 0.4 < (dropped == 0).float().mean() < 0.6


@torch.no_grad()
def test_the_head_under_sequence_parallelism_projects_only_the_positions_the_plain_head_projects(single_process):
    """OutputHead with sequence parallelism gathers the positions' shards, then projects the image positions after
    the caption, and caption positions 0..T-2 for the text loss: the very positions the plain head projects, and
    no others (it projected the whole stream, 9x the text loss's positions at Parti's lengths). (At TP=1 nothing
    is gathered. The gradients at TP=2: test_layouts_equal_the_reference[tp2-sp].)"""
    model = dalle_model().eval()
    cfg, head = model.cfg, model.head
    projected = []
    for proj in (head.proj, head.text_proj):
        proj.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[0]))
    h = torch.randn(cfg.stream_len, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    plain, plain_text = head.stream_logits(h)
    plain_forward = head(h, cfg.prefix_len)
    assert plain.shape == (cfg.image_seq_len, 2, cfg.image_vocab_size)
    assert plain_text.shape == (cfg.text_seq_len - 1, 2, cfg.text_vocab_size)
    head.sequence_parallel = True
    image, text = head.stream_logits(h)
    torch.testing.assert_close(image, plain)
    torch.testing.assert_close(text, plain_text)
    torch.testing.assert_close(head(h, cfg.prefix_len), plain_forward)
    assert projected == [cfg.image_seq_len, cfg.text_seq_len - 1, cfg.image_seq_len] * 2


def test_the_forward_refuses_a_caption_of_another_length(single_process):
    """model(text, codes) places the image after model.text_seq_len caption positions: a shorter caption would shift
    every image logit (and the head would slice image positions as caption ones), so it is refused, as decoding
    refuses it."""
    model = dalle_model()
    text, codes = debug_batch(model.cfg)
    for call in (model, model.loss):
        with pytest.raises(ValueError, match=f"text_seq_len={model.cfg.text_seq_len} tokens .*, not 10$"):
            call(text[:, :10], codes)


@pytest.mark.parametrize("sets, match", [
    (("model.encoder_layers=2",), "encoder_layers=2 must be 0"),
    (("model.freeze_text_encoder=true",), "freeze_text_encoder needs model.arch=encoder_decoder"),
    (("model.arch=decoder_ony",), "model.arch='decoder_ony' must be one of"),
    (("model.arch=encoder_decoder", "model.encoder_layers=2"), "text_loss_weight=0.125 needs model.arch=decoder_only"),
    (("model.attention_pattern=sparse",), "model.attention_pattern='sparse' must be one of dense, dalle"),
    (("model.conv_attention_kernel=4",), "model.conv_attention_kernel=4 must be a positive odd number"),
    (("model.text_loss_weight=1.0",), r"model.text_loss_weight=1.0 must be in \[0, 1\)"),
    (("model.text_loss_weight=-0.5",), r"model.text_loss_weight=-0.5 must be in \[0, 1\)"),
    (("model.init_text_encoder=/nowhere",), "init_text_encoder needs model.arch=encoder_decoder"),
])
def test_config_rules(sets, match):
    from training.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config("configs/train/debug.yaml", [*DALLE, *sets]).validate()


# ----------------------------------------------------------------------------------------------
# Training at every layout (the debug run of tests/conftest.py with the dalle-debug model).


@pytest.fixture(scope="module")
def dalle_reference(pool2, tmp_path_factory):
    """DP=2, ZeRO-0, 6 steps of the decoder-only debug model (text loss 1/8): (losses, run_dir)."""
    path = tmp_path_factory.mktemp("dalle")
    losses = pool2.run(run, str(path), *DALLE)
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0] - 0.3
    return losses[0], path


@pytest.mark.parametrize("layout", [("parallel.tp=2",), ("parallel.tp=2", "parallel.sequence_parallel=true"),
                                    ("parallel.pp=2",), ("parallel.zero_stage=3",)],
                         ids=["tp2", "tp2-sp", "pp2", "zero3"])
def test_layouts_equal_the_reference(pool2, dalle_reference, tmp_path, layout):
    for losses in pool2.run(run, str(tmp_path), *DALLE, *layout):
        assert losses == pytest.approx(dalle_reference[0], rel=1e-5, abs=1e-5)


def test_sequence_parallelism_needs_only_the_stream_to_divide_over_tp(pool2, tmp_path):
    """A caption of 15 and an image of 9 positions (each odd, the stream 24) at TP=2 with sequence parallelism: the
    losses of DP=2 (the encoder-decoder's rule, each length divisible, refused it); a stream of 25 is refused."""
    from training.config import load_config

    odd = (*DALLE, "model.text_seq_len=15", "model.image_grid=3")
    reference = pool2.run(run, str(tmp_path / "dp"), *odd, steps=3)[0]
    for losses in pool2.run(run, str(tmp_path / "sp"), *odd, "parallel.tp=2", "parallel.sequence_parallel=true",
                            steps=3):
        assert losses == pytest.approx(reference, rel=1e-5, abs=1e-5)
    with pytest.raises(ConfigError, match=r"model.text_seq_len \+ image_seq_len \(the stream\)=25 must be divisible "
                                          "by parallel.tp=2 with sequence parallelism"):
        load_config("configs/train/debug.yaml", [*DALLE, "model.text_seq_len=16", "model.image_grid=3",
                                                 "parallel.tp=2", "parallel.sequence_parallel=true"]).validate()


def test_resume_on_another_layout(pool2, dalle_reference, tmp_path):
    first = pool2.run(run, str(tmp_path), *DALLE, "parallel.pp=2", steps=3)[0]
    second = pool2.run(run, str(tmp_path), *DALLE, "parallel.tp=2")[0]
    assert len(first) + len(second) == STEPS
    assert first + second == pytest.approx(dalle_reference[0], rel=1e-4, abs=1e-4)


SHORTER_CAPTION = {"model.text_seq_len": 8, "model.decoder_layers": 3}
"""A caption shorter than the image (T != N) and as many encoder as decoder layers no more: terms that mix up
text and image lengths, or the two stacks, count differently."""


@pytest.mark.parametrize("preset, sets", [("parti-debug", {}), ("dalle-debug", {}),
                                          ("parti-debug", SHORTER_CAPTION), ("dalle-debug", SHORTER_CAPTION)],
                         ids=["parti", "dalle", "parti-T8", "dalle-T8"])
def test_flops_formula_counts_what_the_model_computes(single_process, preset, sets):
    """training/flops.py against torch's FLOP counter on the model's forward. The counter does not see the
    CPU SDPA kernel, so the attention cores (QK^T and PV: 4 x queries x keys x d) are added by hand: what
    selective recomputation runs again."""
    from torch.utils.flop_counter import FlopCounterMode

    from model_parallel.model import PartiModel
    from tests.conftest import debug_model_config
    from training.flops import forward_flops_per_sample, recomputed_layer_flops

    cfg = debug_model_config(**{"model.preset": preset, **sets})
    text, codes = debug_batch(cfg, batch=2)
    with FlopCounterMode(display=False) as counter:
        PartiModel(cfg)(text, codes, return_loss=True)
    d, T, N, S = cfg.hidden_size, cfg.text_seq_len, cfg.image_seq_len, cfg.stream_len
    if cfg.decoder_only:
        cores = cfg.decoder_layers * 4 * S * S * d
    else:
        cores = cfg.encoder_layers * 4 * T * T * d + cfg.decoder_layers * (4 * N * N * d + 4 * N * T * d)
    assert counter.get_total_flops() + 2 * cores == 2 * forward_flops_per_sample(cfg)
    encoder, decoder = recomputed_layer_flops(cfg, "selective")
    assert cfg.encoder_layers * encoder + cfg.decoder_layers * decoder == cores


def test_recomputed_flops_by_hand():
    """recomputed_layer_flops at T=8 != N=16, d=64: selective, the attention cores (encoder 4T^2 d; decoder
    4N^2 d causal + 4NTd cross; decoder-only 4S^2 d); full, each layer's whole forward; none, nothing."""
    from tests.conftest import debug_model_config
    from training.flops import recomputed_layer_flops

    parti = debug_model_config(**SHORTER_CAPTION)
    dalle = debug_model_config(**{"model.preset": "dalle-debug", **SHORTER_CAPTION})
    assert (parti.text_seq_len, parti.image_seq_len, parti.hidden_size, parti.ffn_hidden_size) == (8, 16, 64, 256)
    assert recomputed_layer_flops(parti, "selective") == (4 * 8 * 8 * 64, 4 * 16 * 16 * 64 + 4 * 16 * 8 * 64) \
        == (16_384, 98_304)
    assert recomputed_layer_flops(dalle, "selective")[1] == 4 * 24 * 24 * 64 == 147_456
    projections = 4 * 64 * 64 + 2 * 64 * 256  # QKV + output, MLP: per token
    encoder = 2 * 8 * projections + 4 * 8 * 8 * 64
    decoder = 2 * 16 * projections + 4 * 16 * 16 * 64 + 2 * 16 * 2 * 64 * 64 + 2 * 8 * 2 * 64 * 64 + 4 * 16 * 8 * 64
    assert recomputed_layer_flops(parti, "full") == (encoder, decoder) == (802_816, 2_064_384)
    assert recomputed_layer_flops(parti, "none") == (0, 0)


def test_training_flops_are_three_forwards_and_count_the_caption_head_only_with_a_text_loss():
    """train = 3 x forward (backward = 2 x forward); the decoder-only caption head (2(T-1)dV_t) is counted
    only when model.text_loss_weight > 0: at 0 the head is the image head alone (2NdV)."""
    from tests.conftest import debug_model_config
    from training.flops import forward_flops_per_sample, head_flops, train_flops_per_sample

    dalle = debug_model_config(**{"model.preset": "dalle-debug"})
    image_head = 2 * dalle.image_seq_len * dalle.hidden_size * dalle.image_vocab_size
    assert dalle.text_loss_weight > 0
    assert head_flops(dalle) == image_head + 2 * (dalle.text_seq_len - 1) * dalle.hidden_size * dalle.text_vocab_size
    silent = debug_model_config(**{"model.preset": "dalle-debug", "model.text_loss_weight": 0.0})
    assert head_flops(silent) == image_head
    for cfg in (dalle, silent, debug_model_config()):
        assert train_flops_per_sample(cfg) == 3 * forward_flops_per_sample(cfg) > 0
