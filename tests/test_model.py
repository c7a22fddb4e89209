"""The Parti model at TP=1 against an independent plain-PyTorch implementation; KV-cache decoding."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import debug_batch, debug_model_config
from tests.distributed import StandInGroup
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


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])  # (2: the smallest chunk that needs a causal mask)
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



def test_a_caption_longer_than_text_seq_len_is_refused_naming_the_key(single_process):
    """An encoder-decoder caption past model.text_seq_len is a ValueError naming the key, in training's forward and
    in decoding (an IndexError from the position table's lookup, "index out of range in self", before); a shorter
    one is fine (its positions are the first ones)."""
    cfg = debug_model_config()
    model = _model(cfg).eval()
    text, codes = debug_batch(cfg)
    longer = torch.cat([text, torch.full_like(text[:, :2], cfg.text_pad_id)], dim=1)
    with pytest.raises(ValueError, match="captions of 18 tokens exceed the model.text_seq_len=16 positions"):
        model(longer, codes)
    with pytest.raises(ValueError, match="model.text_seq_len=16"):
        model.start_decoding(longer)
    assert model(text[:, :10], codes).shape == (cfg.image_seq_len, 3, cfg.image_vocab_size)

def test_cfg_null_condition():
    from model_parallel.model import caption_drop_mask, null_condition

    idx = torch.arange(20000)
    drop = caption_drop_mask(idx, seed=5, prob=0.1)
    assert 0.08 < drop.float().mean() < 0.12
    # A pure function of (seed, sample index): any slice of the stream gives the same choices.
    torch.testing.assert_close(caption_drop_mask(idx[7:900:2], seed=5, prob=0.1), drop[7:900:2])
    assert not torch.equal(caption_drop_mask(idx, seed=6, prob=0.1), drop)
    assert not caption_drop_mask(idx, seed=5, prob=0.0).any()
    far = caption_drop_mask(idx + 2**32, seed=5, prob=0.1)  # beyond 2^32 samples: no repeat of the first ones
    assert 0.08 < far.float().mean() < 0.12 and (far != drop).float().mean() > 0.1
    text = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    out = null_condition(text, torch.tensor([False, True]), pad_id=0, eos_id=3)
    assert out.tolist() == [[5, 6, 7, 0], [3, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------
# Dropout keyed by sample (model_parallel/keyed_dropout.py): the same masks at any layout.


def test_keyed_dropout_mask_slices_like_the_layouts_do():
    from model_parallel.keyed_dropout import dropout_site_key, keyed_keep_mask

    key = dropout_site_key(1234, 3, 1)
    samples = torch.tensor([5, 6, 7, 2**40 + 5])  # positions past 2^32 are keys too
    s, b, d = 8, 4, 64
    whole = keyed_keep_mask(samples, key, 0.1, (s, b, d), batch_dim=1)
    assert whole.dtype == torch.bool and whole.shape == (s, b, d)
    assert torch.equal(whole, keyed_keep_mask(samples, key, 0.1, (s, b, d), batch_dim=1))  # no generator state
    # Sequence parallelism: each TP rank's sequence shard gets its slice of the whole's mask.
    for rank in range(2):
        shard = keyed_keep_mask(samples, key, 0.1, (s // 2, b, d), 1, offsets=(rank * s // 2, 0, 0), full=(s, b, d))
        assert torch.equal(shard, whole[rank * s // 2:(rank + 1) * s // 2])
    # Data parallelism / micro-batching: any subset of the samples gets their columns.
    assert torch.equal(keyed_keep_mask(samples[1:3], key, 0.1, (s, 2, d), 1), whole[:, 1:3])
    # Attention probabilities [b, heads, queries, keys] with heads split over TP ranks.
    heads = keyed_keep_mask(samples, key, 0.1, (4, 4, 6, 5), 0)
    upper = keyed_keep_mask(samples, key, 0.1, (4, 2, 6, 5), 0, offsets=(0, 2, 0, 0), full=(4, 4, 6, 5))
    assert torch.equal(upper, heads[:, 2:])
    with pytest.raises(ValueError, match="32 bits"):
        keyed_keep_mask(samples, key, 0.1, (2**17, 4, 2**16), 1)


def test_keyed_dropout_rate_and_independence():
    from model_parallel.keyed_dropout import dropout_site_key, keyed_keep_mask

    def dropped(samples, seed=1234, piece=3, site=1, p=0.1):
        return ~keyed_keep_mask(samples, dropout_site_key(seed, piece, site), p, (64, 64, 64), batch_dim=1)

    samples = torch.arange(1000, 1064)
    drop = dropped(samples)
    assert abs(drop.float().mean().item() - 0.1) < 0.003
    assert abs(dropped(samples, p=0.5).float().mean().item() - 0.5) < 0.005
    assert not dropped(samples, p=0.0).any()
    # Other samples (the next step), pieces, sites, seeds: independent masks (both dropped: p^2, not p).
    # (samples + 2^32: the index's high bits are keyed too, so the masks do not repeat every 2^32 samples)
    others = (dropped(samples + 64), dropped(samples, piece=4), dropped(samples, site=2), dropped(samples, seed=1235),
              dropped(samples + 2**32))
    for other in others:
        assert abs((drop & other).float().mean().item() - 0.01) < 0.002
    # Neighbouring samples, positions and features too.
    for a, b in ((drop[:, :-1], drop[:, 1:]), (drop[:-1], drop[1:]), (drop[..., :-1], drop[..., 1:])):
        assert abs((a & b).float().mean().item() - 0.01) < 0.002


def test_sample_dropout_scales_kept_values_and_is_off_in_eval():
    from model_parallel.layers import SampleDropout

    drop = SampleDropout(0.25, sequence_parallel=False, tp_group=None)
    drop.set_key(7)
    x = torch.rand(5, 3, 16) + 1
    idx = torch.tensor([0, 1, 2])
    y = drop(x, idx)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert torch.equal(y, drop(x, idx))
    torch.testing.assert_close(drop(x[:, 1:], idx[1:]), y[:, 1:])
    assert not torch.equal(drop(x, idx + 3), y)
    assert drop.eval()(x, idx) is x


def test_residual_dropout_without_sample_index_drops_the_branch_with_its_bias(single_process):
    """Masks from torch's generator (no sample_index): x + dropout(f(norm(x)) + bias), the bias dropped and
    scaled with the branch, against F.dropout by hand under the same seed."""
    import torch.nn.functional as F

    cfg = debug_model_config(**{"model.dropout": 0.5})
    model = _model(cfg).train()
    x = torch.randn(16, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in model.named_parameters():  # (megatron initialises the biases to zero)
            if name.endswith("bias"):
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
        for residual, kwargs in ((model.decoder[0].mlp, {}), (model.encoder[0].attn, {"mask": None})):
            torch.manual_seed(3)
            out = residual(x, **kwargs)
            torch.manual_seed(3)
            branch, bias = residual.fn(residual.norm(x), **kwargs)
            assert bias.abs().min() > 0  # (the bias is there to be dropped)
            expected = x + F.dropout(branch + bias, 0.5, training=True)
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(out, x + branch + bias)  # (dropout is on)


def test_compiled_dropout_mask_equals_eager(single_process):
    """kernels.dropout_mask=compiled (the mask as one inductor kernel, what `auto` picks on a GPU): the masks
    of the calls a TP rank > 0 makes (a sequence shard, a slice of heads) and the model's logits with it (the
    rank-0 calls: residual and embedding sites, keyed attention; encoder and decoder lengths through one
    dynamic-shape graph each) equal the eager hash's."""
    from model_parallel.kernels import select_kernels
    from model_parallel.keyed_dropout import compiled_keep_mask, dropout_site_key, keyed_keep_mask
    from model_parallel.layers import Attention, SampleDropout
    from training.config import KernelConfig

    key = torch.tensor(dropout_site_key(1234, 3, 1))
    samples = torch.tensor([5, 6, 7, 2**40 + 5])
    # As a TP rank > 0 calls it (the model below makes the rank-0 calls): a sequence shard, a slice of heads.
    for shape, batch_dim, offsets, full in (((8, 4, 64), 1, (4, 0, 0), (16, 4, 64)),
                                            ((4, 2, 6, 5), 0, (0, 2, 0, 0), (4, 4, 6, 5))):
        shape = torch.Size(shape)  # (what the model passes: a tuple would be a graph of its own)
        expected = keyed_keep_mask(samples, key, 0.1, shape, batch_dim, offsets, full)
        assert torch.equal(compiled_keep_mask()(samples, key, 0.1, shape, batch_dim, offsets, full), expected)

    cfg = debug_model_config(**{"model.dropout": 0.1, "model.attention_dropout": 0.2,
                                "model.attention_dropout_invariant": True})
    text, codes = debug_batch(cfg)
    logits = {}
    for choice in ("eager", "compiled"):
        kernels = select_kernels(KernelConfig(dropout_mask=choice))
        model = _model(cfg, kernels=kernels).train()
        sites = [m for m in model.modules() if isinstance(m, SampleDropout | Attention)]
        assert all(m.keep_mask is kernels.keep_mask for m in sites)
        logits[choice] = model(text, codes, sample_index=torch.tensor([40, 41, 42]))
    assert kernels.keep_mask is compiled_keep_mask() and "dropout_mask=compiled (requested)" in kernels.summary()
    assert torch.equal(logits["compiled"], logits["eager"])


def test_dropout_keyed_by_sample_is_the_same_in_any_batch(single_process):
    """What a DP rank, a micro-batch or a pipeline stage computes for a sample does not depend on the
    samples beside it: its masks are keyed by its position in the run's sample stream."""
    from model_parallel.layers import Attention, SampleDropout

    keyed_attention = {"model.attention_dropout": 0.2, "model.attention_dropout_invariant": True}
    for overrides in ({"model.dropout": 0.1}, {"model.dropout": 0.1, **keyed_attention}):
        cfg = debug_model_config(**overrides)
        model = _model(cfg).train()
        text, codes = debug_batch(cfg)
        idx = torch.tensor([40, 41, 42])
        full = model(text, codes, sample_index=idx)
        assert torch.equal(full, model(text, codes, sample_index=idx))
        torch.testing.assert_close(model(text[1:], codes[1:], sample_index=idx[1:]), full[:, 1:], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(full, model(text, codes, sample_index=idx + 8), atol=1e-3)  # the next step's masks
        with torch.no_grad():
            assert not torch.allclose(full, model.eval()(text, codes), atol=1e-3)
        sites = [m for m in model.modules() if isinstance(m, SampleDropout | Attention)]
        keys = [int(m.key) for m in sites]
        assert (all(m.keyed for m in sites)
                and len(set(keys)) == len(keys) == 2 + 3 * cfg.encoder_layers + 5 * cfg.decoder_layers)


def test_invariant_attention_dropout_path_equals_the_fused_kernel_without_drops(single_process):
    """model.attention_dropout_invariant's explicit attention: at a rate too small to drop anything, the
    training logits equal those of the fused kernel (SDPA, eval mode)."""
    cfg = debug_model_config(**{"model.attention_dropout": 1e-9, "model.attention_dropout_invariant": True})
    model = _model(cfg)
    text, codes = debug_batch(cfg)
    with torch.no_grad():
        trained = model.train()(text, codes, sample_index=torch.arange(3))
        torch.testing.assert_close(trained, model.eval()(text, codes), rtol=1e-5, atol=1e-5)


def test_caption_drop_choices_below_2_to_the_32_are_those_of_earlier_versions():
    """The index's high 32 bits are mixed in only above 2^32: below it (every run so far) the same captions are
    dropped as before they were, so a resumed run keeps its choices (values drawn by the code of 2026-12)."""
    from model_parallel.model import caption_drop_mask

    assert caption_drop_mask(torch.arange(16), seed=5, prob=0.25).nonzero().flatten().tolist() == [3, 4, 5, 7, 9]
    near = caption_drop_mask(torch.arange(2**32 - 40, 2**32), seed=5, prob=0.25)  # (high bits of 2^31 set)
    assert near.nonzero().flatten().tolist() == [2, 7, 8, 14, 15, 32]


def test_sequence_parallelism_and_its_decoding_need_tp_above_one(single_process):
    """Sequence parallelism at TP=1 is refused where the model is built (not only in the config's checks), and a
    model built with it is refused incremental decoding (each rank would hold a sequence shard of the caches)."""
    from model_parallel.model import PartiModel

    cfg = debug_model_config()
    with pytest.raises(ValueError, match="needs a tensor-parallel group of 2 or more"):
        PartiModel(cfg, sequence_parallel=True)
    model = _model(cfg).eval()
    model.sequence_parallel = True  # (as built at TP > 1 with it)
    with pytest.raises(RuntimeError, match="incremental decoding needs a model built without sequence parallelism"):
        model.start_decoding(debug_batch(cfg)[0])


def test_each_tp_rank_draws_its_slice_of_the_tp1_masks(single_process):
    """Keyed dropout at TP=2 as each rank computes it (a stand-in group, in one process): a sequence-parallel site
    masks its sequence shard, and the keyed attention dropout its heads, with their slices of the TP=1 masks, so a
    sample gets the same dropout at any TP (the layout runs compare only losses)."""
    from model_parallel.layers import SampleDropout

    idx = torch.tensor([3, 9, 2**33])
    x = torch.ones(8, 3, 16)
    whole = SampleDropout(0.3, sequence_parallel=False, tp_group=StandInGroup(1, 0))
    whole.set_key(11)
    full = whole.mask(x, idx)
    for rank in range(2):
        shard = SampleDropout(0.3, sequence_parallel=True, tp_group=StandInGroup(2, rank))
        shard.set_key(11)
        assert torch.equal(shard.mask(x[:4], idx), full[4 * rank:4 * (rank + 1)]), rank

    cfg = debug_model_config(**{"model.attention_dropout": 0.3, "model.attention_dropout_invariant": True})
    attn = _model(cfg).decoder[0].self_attn.fn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, cfg.num_heads, 6, cfg.head_dim, generator=g) for _ in range(3))
    half = cfg.num_heads // 2
    attn.tp_group = StandInGroup(1, 0)
    out = attn._keyed_dropout_attention(q, k, v, None, True, 0.3, idx)
    for rank in range(2):
        heads = slice(half * rank, half * (rank + 1))
        attn.tp_group = StandInGroup(2, rank)
        torch.testing.assert_close(attn._keyed_dropout_attention(q[:, heads], k[:, heads], v[:, heads], None, True,
                                                                 0.3, idx), out[:, heads], rtol=1e-6, atol=1e-6)


def test_keyed_mask_of_a_shard_of_any_dimension_and_its_values():
    """keyed_keep_mask's contract for any sharded dimension (the model shards the outermost ones: sequence, heads):
    an inner dimension's shard gets its slice too; the seed's high 32 bits key the sites; and the masks are those
    of earlier versions (bits drawn by the code of 2026-12), so a resumed run redraws the dropout it had."""
    from model_parallel.keyed_dropout import dropout_site_key, keyed_keep_mask

    key, samples = dropout_site_key(1234, 3, 1), torch.tensor([5, 2**40 + 5])
    whole = keyed_keep_mask(samples, key, 0.5, (6, 2, 64), batch_dim=1)
    for half in range(2):
        shard = keyed_keep_mask(samples, key, 0.5, (6, 2, 32), 1, offsets=(0, 0, 32 * half), full=(6, 2, 64))
        assert torch.equal(shard, whole[..., 32 * half:32 * (half + 1)])
    assert dropout_site_key(1234 + 2**32, 3, 1) != key == 2801043195
    bits = keyed_keep_mask(torch.tensor([0, 2**40]), key, 0.5, (2, 2, 8), batch_dim=1).flatten().tolist()
    assert int("".join("1" if b else "0" for b in bits), 2) == 3574708479


@pytest.mark.parametrize("preset", ["parti-debug", "dalle-debug"])
def test_a_one_stage_pipeline_computes_the_models_loss(single_process, preset):
    """model_parallel/pipeline.py's layers passing their tuples, in one stage (in this process; the layout runs
    check two): PartiModel's parameters under its names, and its loss to the bit with keyed dropout (the padding
    masks rebuilt from the ids at each layer; decoder-only, the caption loss mixed in)."""
    from model_parallel.kernels import select_kernels
    from model_parallel.pipeline import build_pipeline, canonical_parameters
    from training.deepspeed_glue import init_deepspeed

    init_deepspeed()
    cfg = debug_model_config(**{"model.preset": preset, "model.dropout": 0.1})
    model = _model(cfg, seed=3).train()
    pipe = build_pipeline(cfg, select_kernels(), 1, init_seed=3).train()
    params = dict(model.named_parameters())
    held = canonical_parameters(pipe, cfg)
    assert set(held) == set(params) and all(torch.equal(p, params[name]) for name, p in held.items())
    text, codes = debug_batch(cfg)
    text[1, 2:] = cfg.text_pad_id  # (more padding: the masks matter)
    idx = torch.tensor([4, 5, 6])
    loss = pipe.loss_fn(pipe((text, model.decoder_input(codes), idx)), codes)
    assert torch.equal(loss, model.loss(text, codes, sample_index=idx))
    assert (cfg.text_loss_weight > 0) == (preset == "dalle-debug")


def test_logits_equal_reference_with_nonzero_biases_and_gelus_curve(single_process):
    """test_logits_and_loss_equal_reference's model has megatron's zero biases and small activations, where
    dropping a bias or taking erf's GeLU for tanh's changes nothing measurable: here every bias is drawn at random
    and the weights are larger (GeLU's inputs of order one), in training mode without dropout (the layers' train
    kernels: bias+dropout+residual, bias+head split) and in eval mode."""
    cfg = debug_model_config(**{"model.init_std": 0.2})
    model = _model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    ref = load_from_parti(ReferenceParti(cfg, kind="math"), model.state_dict())
    text, codes = debug_batch(cfg)
    ref_logits = ref(text, codes)
    for train in (True, False):
        logits = model.train(train)(text, codes).transpose(0, 1)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4, msg=f"train={train}")
