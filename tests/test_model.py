"""The Parti model at TP=1 against an independent plain-PyTorch implementation; KV-cache decoding."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import debug_batch, debug_model_config
from tests.reference_model import ReferenceParti, load_from_parti


def _model(cfg, seed=0, **kw):
    from model_parallel.model import PartiModel
    from model_parallel.state import seed_everything

    seed_everything(seed)
    return PartiModel(cfg, init_seed=seed, **kw)


def test_logits_and_loss_equal_reference(single_process):
    cfg = debug_model_config()
    model = _model(cfg)
    ref = load_from_parti(ReferenceParti(cfg, kind="math"), model.state_dict())
    text, codes = debug_batch(cfg)
    logits = model(text, codes).transpose(0, 1)  # [b, n, V] (TP=1: the whole vocabulary)
    ref_logits = ref(text, codes)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.loss(text, codes), ref.loss(text, codes), rtol=1e-6, atol=1e-6)


def test_padding_and_condition_matter(single_process):
    """Guards the reference comparison: the text (and its padding mask) changes the logits."""
    cfg = debug_model_config()
    model = _model(cfg)
    text, codes = debug_batch(cfg)
    base = model(text, codes)
    other = text.clone()
    other[0, 0] = other[0, 0] % (cfg.text_vocab_size - 5) + 4 + 1
    assert not torch.allclose(base[:, 0], model(other, codes)[:, 0])
    padded_junk = text.clone()
    padded_junk[2, -1] = 7  # a token where there was padding becomes visible
    assert not torch.allclose(base[:, 2], model(padded_junk, codes)[:, 2])
    # Causality: changing the last code does not change any logit before the last position.
    later = codes.clone()
    later[:, -1] = (later[:, -1] + 1) % cfg.image_vocab_size
    torch.testing.assert_close(base, model(text, later))
    later[:, 5] = (later[:, 5] + 1) % cfg.image_vocab_size
    torch.testing.assert_close(base[:6], model(text, later)[:6])
    assert not torch.allclose(base[6:], model(text, later)[6:])


def test_gradients_equal_reference(single_process):
    cfg = debug_model_config()
    model = _model(cfg, seed=3)
    ref = load_from_parti(ReferenceParti(cfg, kind="math"), model.state_dict())
    text, codes = debug_batch(cfg, seed=1)
    model.loss(text, codes).backward()
    ref.loss(text, codes).backward()
    grads = dict(model.named_parameters())
    torch.testing.assert_close(grads["head.proj.weight"].grad, ref.head.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["encoder.0.mlp.fn.fc1.weight"].grad, ref.encoder[0].mlp.fc1.weight.grad,
                               rtol=1e-5, atol=1e-6)
    q = grads["decoder.1.cross_attn.fn.q.weight"].grad
    torch.testing.assert_close(q, ref.decoder[1].cross_attn.wq.weight.grad, rtol=1e-5, atol=1e-6)
    emb = grads["text_embedding.embed.weight"].grad[: cfg.text_vocab_size]
    torch.testing.assert_close(emb, ref.text_embed.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5])
def test_kv_cache_decoding_equals_full_forward(single_process, chunk):
    cfg = debug_model_config()
    model = _model(cfg).eval()
    text, codes = debug_batch(cfg)
    with torch.no_grad():
        full = model(text, codes).transpose(0, 1)
        caches, memory, mask = model.start_decoding(text)
        inputs = model.decoder_input(codes)
        steps = [model.decode_step(inputs[:, i:i + chunk], caches, memory, mask)
                 for i in range(0, inputs.shape[1], chunk)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert caches[0].length == cfg.image_seq_len
    with pytest.raises(ValueError, match="exceed"):
        model.decode_step(inputs[:, :1], caches, memory, mask)


def test_cfg_null_condition():
    from model_parallel.model import caption_drop_mask, null_condition

    idx = torch.arange(20000)
    drop = caption_drop_mask(idx, seed=5, prob=0.1)
    assert 0.08 < drop.float().mean() < 0.12
    # A pure function of (seed, sample index): any slice of the stream gives the same choices.
    torch.testing.assert_close(caption_drop_mask(idx[7:900:2], seed=5, prob=0.1), drop[7:900:2])
    assert not torch.equal(caption_drop_mask(idx, seed=6, prob=0.1), drop)
    assert not caption_drop_mask(idx, seed=5, prob=0.0).any()
    text = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    out = null_condition(text, torch.tensor([False, True]), pad_id=0, eos_id=3)
    assert out.tolist() == [[5, 6, 7, 0], [3, 0, 0, 0]]
