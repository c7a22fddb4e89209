"""Cross-entropy of vocab-parallel logits: the image-code loss (and a decoder-only model's caption loss).

    loss = cross_entropy(logits, target, tp_group)   # logits [n, b, V/tp] (this rank's vocabulary slice),
                                                     # target [n, b] -> per-token loss [n, b], fp32

`plain_cross_entropy` is megatron-core's vocab_parallel_cross_entropy on fp32 logits, the reference.
`fused_cross_entropy` computes the same loss (kernels.cross_entropy=fused; a GPU's auto) in three compiled passes
over the logits in their own dtype: the row maxima, then the sums of exponentials with the target's logit (each
followed by the all-reduce over the TP group that megatron's does), and in the backward the gradient
softmax - onehot, recomputed from the logits. megatron's plain version makes fp32 copies of the bf16 logits and
passes over them ~8 times (cast, max, subtract, exp, sum, divide, the gradient's scaling, the cast back): at
parti-350m's micro-batch of 128 that is ~55 GB of memory traffic a micro-batch (~3% of an H200 step by that
count; bench/gpu_mfu.py times both side by side), and it keeps the fp32 softmax (4 GiB) for the backward.
megatron-core's fused_vocab_parallel_cross_entropy still keeps that softmax, always returns a bf16 gradient
(wrong for fp32 logits) and compiles per shape until torch turns dynamic; the passes here read the logits in
their dtype, keep only them and two numbers a token, and compile once for all shapes. Written here for that.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist


def plain_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """megatron-core's vocab_parallel_cross_entropy of the fp32 logits. (megatron-core 0.16's takes no group
    argument: it reduces over megatron's TP group, which is `tp_group` wherever the model is trained.)
    fp32 logits are consumed: megatron-core turns them into the softmax in place (sparing a copy of the largest
    activation), so no caller reads them after the loss (the fused kernel leaves its input alone)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), target)


def _row_max(logits):
    return logits.float().amax(dim=-1)


def _sums(logits, target, row_max, first: int):
    """[2, n, b]: each row's sum of exp(logit - max) over this rank's slice, and its target's logit - max where
    the target falls in the slice (0 elsewhere): one tensor, so that one all-reduce sums both."""
    shifted = logits.float() - row_max.unsqueeze(-1)
    local = target - first
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = shifted.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.stack([shifted.exp().sum(dim=-1), torch.where(inside, picked, 0.0)])


def _gradient(logits, target, log_normaliser, first: int, grad_loss):
    """d loss / d logits = (softmax - onehot(target)) x grad_loss, in the logits' dtype."""
    probs = (logits.float() - log_normaliser.unsqueeze(-1)).exp()
    columns = torch.arange(logits.shape[-1], device=logits.device) + first
    onehot = (columns == target.unsqueeze(-1)).float()
    return ((probs - onehot) * grad_loss.unsqueeze(-1)).to(logits.dtype)


@functools.cache
def _compiled():
    """The three passes, compiled at their first call for any shape (one object per process, as
    kernels.fused_bias_dropout_add)."""
    return tuple(torch.compile(fn, dynamic=True) for fn in (_row_max, _sums, _gradient))


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group):
        row_max_fn, sums_fn, gradient_fn = _compiled()
        tp = tp_group.size() if tp_group is not None else 1
        first = logits.shape[-1] * (tp_group.rank() if tp > 1 else 0)
        row_max = row_max_fn(logits)
        if tp > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sums = sums_fn(logits, target, row_max, first)
        if tp > 1:
            dist.all_reduce(sums, group=tp_group)
        log_sum = sums[0].log()
        ctx.save_for_backward(logits, target, row_max + log_sum)
        ctx.first, ctx.gradient = first, gradient_fn
        return log_sum - sums[1]

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, log_normaliser = ctx.saved_tensors
        return ctx.gradient(logits, target, log_normaliser, ctx.first, grad_loss.contiguous()), None, None


def fused_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> torch.Tensor:
    """plain_cross_entropy's loss in three compiled passes over the logits (the module docstring says why): the
    loss in fp32 as plain's (up to the order of the sums), the gradient in the logits' dtype."""
    return _FusedCrossEntropy.apply(logits, target, tp_group)
