"""TP=2 on two gloo processes against TP=1: loss, gathered gradients, KV-cache decoding, SP."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.conftest import debug_batch, debug_model_config


def _full(t: torch.Tensor, param) -> torch.Tensor:
    """Concatenate a tensor-parallel shard over the TP group along its partition dimension."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def loss_and_grads(tp: int, sequence_parallel: bool, dropout: float = 0.0):
    from model_parallel.layers import allreduce_sequence_parallel_grads
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel, seed_everything

    init_parallel(tp=tp)
    seed_everything(11)
    cfg = debug_model_config(**{"model.dropout": dropout})
    model = PartiModel(cfg, sequence_parallel=sequence_parallel, init_seed=11)
    text, codes = debug_batch(cfg, batch=3, seed=2)
    loss = model.loss(text, codes)
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    params = dict(model.named_parameters())
    return (loss.item(), {n: _full(p.grad, p) for n, p in params.items()},
            {n: _full(p.data, p) for n, p in params.items()})


def decoded_logits(tp: int):
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel, seed_everything

    init_parallel(tp=tp)
    seed_everything(5)
    cfg = debug_model_config()
    model = PartiModel(cfg).eval()
    text, codes = debug_batch(cfg, seed=4)
    with torch.no_grad():
        caches, memory, mask = model.start_decoding(text)
        inputs = model.decoder_input(codes)
        return torch.cat([model.decode_step(inputs[:, i:i + 1], caches, memory, mask)
                          for i in range(inputs.shape[1])], dim=1)


def fused_cross_entropy_slices(dtype: torch.dtype):
    """This rank's vocabulary half of the same logits: the fused cross-entropy over the TP group of both ranks,
    and torch's over the whole vocabulary (targets in both halves)."""
    import torch.nn.functional as F

    from model_parallel.cross_entropy import fused_cross_entropy

    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(5, 3, 32, generator=g) * 4).to(dtype)
    target = torch.randint(0, 32, (5, 3), generator=g)
    target.view(-1)[:4] = torch.tensor([0, 15, 16, 31])  # the first and last ids of each rank's slice
    upstream = torch.rand(5, 3, generator=g)
    rank = dist.get_rank()
    mine = logits[..., rank * 16:(rank + 1) * 16].clone().requires_grad_()
    loss = fused_cross_entropy(mine, target, dist.group.WORLD)
    (grad,) = torch.autograd.grad(loss, mine, upstream)
    whole = logits.clone().requires_grad_()
    reference = F.cross_entropy(whole.float().flatten(0, 1), target.flatten(), reduction="none").view(5, 3)
    (reference_grad,) = torch.autograd.grad(reference, whole, upstream)
    return loss.detach(), reference.detach(), grad, reference_grad[..., rank * 16:(rank + 1) * 16], target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_over_vocabulary_slices_equals_whole(pool2, dtype):
    """kernels.cross_entropy=fused at TP=2 (each rank a half of the vocabulary: the maxima and sums all-reduced,
    the target's logit from the rank that holds it): torch's loss over the whole vocabulary, each rank's slice of
    its gradient (bf16: the gradient in bf16, within its rounding); targets at the slices' boundaries among them."""
    from model_parallel.kernels import availability

    if availability()["cross_entropy"]["fused"]:
        pytest.skip(availability()["cross_entropy"]["fused"])
    for rank, (loss, reference, grad, reference_grad, target) in enumerate(pool2.run(fused_cross_entropy_slices,
                                                                                      dtype)):
        assert ((target < 16) == (rank == 0)).any()  # each rank holds some of the targets
        assert grad.dtype == dtype
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.fixture(scope="module")
def tp1(pool2):
    return pool2.run(loss_and_grads, 1, False)[0]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_equals_tp1(pool2, tp1, sequence_parallel):
    loss1, grads1, weights1 = tp1
    (loss2, grads2, weights2), other_rank = pool2.run(loss_and_grads, 2, sequence_parallel)
    # Same initial model at any TP (one master weight per layer, sliced per rank).
    for name in weights1:
        torch.testing.assert_close(weights2[name], weights1[name], rtol=0, atol=0, msg=name)
    assert loss2 == pytest.approx(loss1, rel=1e-6, abs=1e-6)
    assert set(grads2) == set(grads1)
    for name in grads1:  # every parameter: cross-attention, vocab-parallel embeddings and head included
        torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-5, atol=1e-5, msg=name)
    assert other_rank[0] == loss2


def test_tp2_kv_cache_decoding_equals_tp1(pool2):
    ref = pool2.run(decoded_logits, 1)[0]
    tp2 = pool2.run(decoded_logits, 2)
    torch.testing.assert_close(tp2[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp2[1], ref, rtol=1e-5, atol=1e-5)


def test_dropout_changes_loss_and_is_reproducible(pool2):
    """With dropout the TP=2 loss is no longer TP=1's, but is the same on every TP rank and rerun."""
    a = pool2.run(loss_and_grads, 2, False, 0.3)
    b = pool2.run(loss_and_grads, 2, False, 0.3)
    assert a[0][0] == a[1][0] == b[0][0]
    no_dropout = pool2.run(loss_and_grads, 2, False, 0.0)[0][0]
    assert a[0][0] != pytest.approx(no_dropout, abs=1e-4)


def sequence_parallel_dropout_of_ones():
    """TP=2 with sequence parallelism: a SampleDropout site without sample_index (torch's generators) on this
    rank's sequence shard of ones, the default generator seeded alike on both ranks (seed_everything)."""
    from model_parallel.layers import SampleDropout
    from model_parallel.state import init_parallel, seed_everything, tensor_parallel_group

    init_parallel(tp=2)
    seed_everything(5)
    drop = SampleDropout(0.5, sequence_parallel=True, tp_group=tensor_parallel_group()).train()
    return drop(torch.ones(8, 3, 64))


def test_sequence_parallel_dropout_without_sample_index_differs_per_rank(pool2):
    """Each rank holds other positions of the sequence: its masks come from megatron's per-rank stream, not the
    default generator both ranks share (which would repeat one shard's mask on every shard)."""
    masks = pool2.run(sequence_parallel_dropout_of_ones)
    for mask in masks:
        assert set(mask.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
        assert 0.4 < (mask == 0).float().mean() < 0.6
    assert not torch.equal(masks[0], masks[1])


def loss_and_grads_with_recompute(mode: str):
    """TP=2 with dropout everywhere; activations recomputed by `mode`."""
    from model_parallel.activation_checkpointing import apply_activation_checkpointing
    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel, seed_everything

    init_parallel(tp=2)
    cfg = debug_model_config(**{"model.dropout": 0.2, "model.attention_dropout": 0.2})
    model = apply_activation_checkpointing(PartiModel(cfg, init_seed=3), mode)
    seed_everything(21)
    text, codes = debug_batch(cfg, seed=8)
    loss = model.loss(text, codes)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients(pool2):
    loss0, grads0 = pool2.run(loss_and_grads_with_recompute, "none")[0]
    for mode in ("selective", "full"):
        loss, grads = pool2.run(loss_and_grads_with_recompute, mode)[0]
        assert loss == loss0
        for name in grads0:  # dropout masks (megatron's per-rank stream included) were redrawn identically
            torch.testing.assert_close(grads[name], grads0[name], rtol=0, atol=0, msg=f"{mode}: {name}")


def _recomputed_run(mode: str, steps: int = 2):
    """The debug model (dropout 0.2, attention dropout from megatron's tracker) under recomputation `mode`, one
    process: every step's loss and gradients (seeded once: later steps draw on from where the last left the
    generators), the tracker's states after the last step, and how often each layer's forward and each
    attention core ran."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from model_parallel.activation_checkpointing import apply_activation_checkpointing
    from model_parallel.layers import Attention, DecoderLayer, EncoderLayer
    from model_parallel.model import PartiModel
    from model_parallel.state import seed_everything

    cfg = debug_model_config(**{"model.dropout": 0.2, "model.attention_dropout": 0.2})
    model = PartiModel(cfg, init_seed=3)
    calls = {"layer": 0, "attention": 0}

    def counted(kind, function):
        def run(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)
        return run

    for module in model.modules():
        if isinstance(module, EncoderLayer | DecoderLayer):
            module.forward = counted("layer", module.forward)
        if isinstance(module, Attention):
            module.attention = counted("attention", module.attention)
    apply_activation_checkpointing(model, mode)
    text, codes = debug_batch(cfg, seed=8)
    seed_everything(21)
    losses, grads = [], []
    for _ in range(steps):
        loss = model.loss(text, codes)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    return losses, grads, get_cuda_rng_tracker().get_states(), calls


def test_each_recomputation_mode_recomputes_its_part_and_draws_the_same_dropout(single_process):
    """One process: full recomputation runs each layer's forward again in the backward, selective each attention
    core only, none nothing; every mode gives the losses and gradients of none over two steps (the dropout masks,
    megatron's tracker's included, drawn again as at the forward) and leaves megatron's tracker where none
    leaves it (a recomputation restores the tracker's states after it). An unknown mode is refused."""
    from model_parallel.activation_checkpointing import apply_activation_checkpointing

    losses, grads, states, calls = _recomputed_run("none")
    layers, attentions = calls["layer"], calls["attention"]
    assert layers > 0 and attentions > layers  # (2 steps; a decoder layer has two attention cores)
    for mode, recomputed in (("selective", {"layer": layers, "attention": 2 * attentions}),
                             ("full", {"layer": 2 * layers, "attention": 2 * attentions})):
        mode_losses, mode_grads, mode_states, mode_calls = _recomputed_run(mode)
        assert mode_calls == recomputed, mode
        assert mode_losses == losses, mode
        for step, step0 in zip(mode_grads, grads, strict=True):
            for a, b in zip(step, step0, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=mode)
        assert mode_states.keys() == states.keys() and all(torch.equal(mode_states[k], states[k]) for k in states)
    with pytest.raises(ValueError, match="activation checkpointing 'some': expected one of none, selective, full"):
        apply_activation_checkpointing(torch.nn.Linear(1, 1), "some")


def summed_bf16_sequence_parallel_grad() -> list[float]:
    """Rank 0's gradient 1, the others' 2^-8, in bf16, summed by allreduce_sequence_parallel_grads over TP=4."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from model_parallel.layers import allreduce_sequence_parallel_grads
    from model_parallel.state import init_parallel

    init_parallel(tp=4)
    weight = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    weight.sequence_parallel = True
    weight.grad = torch.full((8,), 1.0 if dist.get_rank() == 0 else 2**-8, dtype=torch.bfloat16)
    allreduce_sequence_parallel_grads(SimpleNamespace(parameters=lambda: [weight],
                                                      tp_group=ps.get_tensor_model_parallel_group()))
    return weight.grad.float().tolist()


def test_sequence_parallel_grads_are_summed_in_fp32(pool4):
    """1 + 3 x 2^-8 rounds to bf16's 1.015625 once summed exactly (Megatron sums into fp32 main grads); a sum in
    bf16 rounds at each addition (1 + 2^-8 is 1 in bf16) and lost the small gradients."""
    for grad in pool4.run(summed_bf16_sequence_parallel_grad):
        assert grad == [1.015625] * 8
