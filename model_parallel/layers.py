"""Transformer layers of the Parti encoder-decoder, built from megatron-core tensor-parallel pieces.

Tensors are [sequence, batch, hidden] as in Megatron (sequence parallelism splits dimension 0).
Every linear map is a megatron-core `ColumnParallelLinear` (heads / MLP columns split over TP ranks)
followed by a `RowParallelLinear` (partial sums all-reduced, or reduce-scattered with sequence
parallelism). Fused QKV and KV projections interleave per head ([head, q|k|v, head_dim]) so that a
contiguous TP slice holds whole heads.

Why not megatron-core's `TransformerLayer`/`ModuleSpec`: its local attention core materialises the
full score matrix (no torch SDPA / flash attention without Transformer Engine), its inference KV
cache is tied to megatron's inference engine, and its T5 specs lose their final norm without TE
(megatron-core 0.16's local T5 block specs set the final norm to `TENorm`, which is None when Transformer
Engine is absent, and its torch-norm fallback refuses sequence parallelism). These few layers keep the TP layers,
mappings, init and RNG tracker of megatron-core and add SDPA attention and a simple per-layer KV cache (growing, or
static with a device-side write position for CUDA-graph decoding).

Dropout on residual branches and embeddings is keyed by sample (`SampleDropout`, model_parallel/keyed_dropout.py):
its masks are a pure function of (seed, piece, site, sample position in the run, element), the same at any
DP/TP/PP layout; attention-probability dropout stays inside the fused kernel unless
model.attention_dropout_invariant.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, get_cuda_rng_tracker
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from model_parallel.attention_patterns import AttentionPattern
from model_parallel.config import ModelConfig
from model_parallel.kernels import Kernels, attention_probs, plain_bias_dropout_add, plain_split_heads
from model_parallel.keyed_dropout import dropout_site_key, keyed_dropout, keyed_keep_mask


class KeyedSite(nn.Module):
    """A module holding a dropout site keyed by sample: `key` is set once the module knows where it sits
    (key_dropout_sites). The key is a 0-dim int64 buffer, not a Python int: torch.compile specialises on a
    module's int attributes, and every site has its own key, so an int would recompile each layer (and
    give up after eight). Created on the CPU explicitly (real even in a meta-device build, a scalar to any
    device's ops until the module is moved: .to(device), or at ZeRO-3 training/engine.build_model); not
    saved in checkpoints (it is derived from the seed).
    `keep_mask`: the function that computes its masks (kernels.keep_mask: keyed_keep_mask or its compiled
    kernel, model_parallel/keyed_dropout.py)."""

    def __init__(self, keep_mask=keyed_keep_mask):
        super().__init__()
        self.keyed = False
        self.keep_mask = keep_mask

    def set_key(self, key: int) -> None:
        self.register_buffer("key", torch.tensor(key, dtype=torch.long, device="cpu"), persistent=False)
        self.keyed = True


class SampleDropout(KeyedSite):
    """Dropout of [s, b, d] activations (this rank's sequence shard with sequence parallelism) whose masks
    are keyed by sample (keyed_keep_mask): `forward(x, sample_index)`. `key` is set once the module knows
    where it sits (key_dropout_sites). Without `sample_index` it draws from torch's generators as
    F.dropout does (the per-TP-rank stream on sequence shards): the same run only at the same layout."""

    def __init__(self, p: float, sequence_parallel: bool, tp_group, keep_mask=keyed_keep_mask):
        super().__init__(keep_mask)
        self.p, self.sequence_parallel, self.tp_group = p, sequence_parallel, tp_group

    @property
    def active(self) -> bool:
        return self.training and self.p > 0

    def forward(self, x: torch.Tensor, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        if not self.active:
            return x
        if sample_index is None:
            rng = get_cuda_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()
            with rng:
                return F.dropout(x, self.p, training=True)
        return keyed_dropout(x, self.mask(x, sample_index), self.p)

    def mask(self, x: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor | None:
        """The keep-mask of x's elements keyed by `sample_index`; None when no dropout applies."""
        if not self.active:
            return None
        if not self.keyed:
            raise RuntimeError("dropout site without a key: build the model through PartiModel or "
                               "build_pipeline (key_dropout_sites)")
        tp = self.tp_group.size() if self.sequence_parallel else 1
        rank = self.tp_group.rank() if self.sequence_parallel else 0
        s = x.shape[0]
        return self.keep_mask(sample_index, self.key, self.p, x.shape, batch_dim=1,
                              offsets=(rank * s, 0, 0), full=(tp * s, *x.shape[1:]))


def key_dropout_sites(piece: nn.Module, seed: int, index: int) -> None:
    """Key the dropout sites of model piece `index` (its SampleDropout and Attention modules, numbered in
    module order, which is the same whoever builds the piece) by (seed, index, site)."""
    site = 0
    for module in piece.modules():
        if isinstance(module, KeyedSite):
            module.set_key(dropout_site_key(seed, index, site))
            site += 1


@dataclass
class PieceContext:
    """What every piece of the model is built from: its shape, megatron-core's settings, the kernels,
    the init methods (model_parallel/init.py) and the tensor-parallel group its layers split over
    (passed to megatron-core's layers explicitly, never read from megatron's globals)."""

    cfg: ModelConfig
    mp: ModelParallelConfig
    kernels: Kernels
    init: object
    out_init: object
    tp_group: object  # a torch ProcessGroup (or, for the planner's meta builds, anything with size() and rank())


@dataclass
class StaticPosition:
    """Where a static KV cache writes next, shared by every layer's cache: a device tensor rather than a
    Python int, so that a decode step has no host-side state and the same shapes at every position (what a
    CUDA graph replay needs). `begin` computes this step's positions and the keys each query may see once
    per step (not once per layer); `end` advances the write position. Attention reads the first `keys`
    cache positions (default: all): a sampler may attend over a shorter prefix while it fits, so that early
    steps do not read the whole cache (one CUDA graph per such length)."""

    next: torch.Tensor  # int64 [1] on the model's device: the position of the next token
    max_len: int
    keys: int = 0  # cache positions attention reads this step; 0: max_len (must exceed the last new position)
    at: torch.Tensor | None = None  # int64 [n]: positions of this step's tokens
    valid: torch.Tensor | None = None  # bool [n, keys]: True where query i may attend to key j

    def __post_init__(self):
        self.positions = torch.arange(self.max_len, device=self.next.device)
        self.keys = self.keys or self.max_len

    def begin(self, n: int) -> None:
        self.at = self.next + self.positions[:n]
        self.valid = self.positions[None, :self.keys] <= self.at[:, None]

    def end(self, n: int) -> None:
        self.next.add_(n)


@dataclass
class LayerCache:
    """Incremental-decoding state of one decoder layer: self-attention K/V so far, cross-attention K/V.

    Dynamic (default): `length` counts the cached positions and attention runs over the first `length`
    keys. Static (`static` set): keys and values are written at `static.at` and attention runs over the
    first `static.keys` positions of the preallocated cache under the mask `static.valid` (the cache
    starts as zeros, never NaN, so masked-out positions contribute exactly 0)."""

    self_k: torch.Tensor | None = None  # [batch, local_heads, max_len, head_dim]
    self_v: torch.Tensor | None = None
    length: int = 0
    cross_k: torch.Tensor | None = None  # [batch, local_heads, text_len, head_dim]
    cross_v: torch.Tensor | None = None
    static: StaticPosition | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([b, h, n, d]) after the cached ones; return all keys/values so far."""
        if self.self_k is None:
            shape = (k.shape[0], k.shape[1], max_len, k.shape[3])
            self.self_k = k.new_empty(shape)
            self.self_v = v.new_empty(shape)
        n = k.shape[2]
        if self.length + n > self.self_k.shape[2]:
            raise ValueError(f"KV cache holds {self.self_k.shape[2]} positions; cannot add {n} at {self.length}")
        self.self_k[:, :, self.length:self.length + n] = k
        self.self_v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.self_k[:, :, :self.length], self.self_v[:, :, :self.length]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static cache: store k, v ([b, h, n, d]) at positions `static.at`; return the first `static.keys`
        cache positions and the [n, keys] mask of the keys each new query sees."""
        self.self_k.index_copy_(2, self.static.at, k)
        self.self_v.index_copy_(2, self.static.at, v)
        keys = self.static.keys
        return self.self_k[:, :, :keys], self.self_v[:, :, :keys], self.static.valid


def static_caches(like: torch.Tensor, layers: int, max_len: int, cross_kv=None) -> list[LayerCache]:
    """Static caches for `layers` layers whose K/V look like `like` ([b, local_heads, any, head_dim]):
    self-attention K/V preallocated to `max_len` positions (zeros), one shared write position at 0; with
    each layer's cross-attention K/V (`cross_kv`: a list of (k, v)) when the model has cross-attention."""
    position = StaticPosition(torch.zeros(1, dtype=torch.long, device=like.device), max_len)
    shape = (like.shape[0], like.shape[1], max_len, like.shape[3])
    cross_kv = cross_kv or [(None, None)] * layers
    return [LayerCache(self_k=like.new_zeros(shape), self_v=like.new_zeros(shape), cross_k=k, cross_v=v,
                       static=position) for k, v in cross_kv]


def restart_static_caches(caches: list[LayerCache], cross_kv=None) -> list[LayerCache]:
    """Static caches made by static_caches, emptied in place for new sequences (the same shapes): their K/V
    zeroed, the write position back at 0, each layer's cross-attention K/V (`cross_kv`) copied in. In place
    because a CUDA graph reads these very tensors (evaluation.sampling.StaticStep.restart)."""
    position = caches[0].static
    position.next.zero_()
    position.keys = position.max_len  # (a decoder-only prefill attends over all the caption's positions)
    for cache, (k, v) in zip(caches, cross_kv or [(None, None)] * len(caches), strict=True):
        cache.self_k.zero_()
        cache.self_v.zero_()
        if k is not None:
            cache.cross_k.copy_(k)
            cache.cross_v.copy_(v)
    return caches


@torch.compiler.disable
def _attention_in_rng_fork(attention, q, k, v, mask, causal: bool, dropout: float) -> torch.Tensor:
    """Attention with dropout on its probabilities, drawn from megatron's per-rank stream (heads are split over
    TP ranks). Eager under kernels.compile: the tracker's fork reads the CUDA RNG state, which dynamo does not
    trace, and breaking the graph here keeps the rest of the layer compiled (inside the forward, dynamo gave up
    on the whole frame: each projection became a graph of its own)."""
    with get_cuda_rng_tracker().fork():
        return attention(q, k, v, mask=mask, causal=causal, dropout_p=dropout)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, heads, s, head_dim] -> [s, b, heads*head_dim]: a view, no copy, when attention's output keeps dense
    queries' [s, b, heads, head_dim] order (cuDNN's does: kernels.fused_split_heads)."""
    b, h, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, h * d)


class Attention(KeyedSite):
    """Multi-head attention; self-attention when `memory` is None, else cross-attention to it. Returns the
    output projection's (output, bias): Residual adds the bias with the dropout and the residual. The q / kv /
    qkv projections' biases are added with the split into heads (kernels.split_heads: one fused kernel in
    training on a GPU; eval mode, sampling's one-token steps among them, takes the plain add and views)."""

    def __init__(self, ctx: PieceContext, cross: bool):
        super().__init__(ctx.kernels.keep_mask)
        hidden = ctx.cfg.hidden_size
        self.head_dim = ctx.cfg.head_dim
        self.cross = cross
        self.attention = ctx.kernels.attention
        self.split_heads = ctx.kernels.split_heads
        self.attention_dropout = ctx.cfg.attention_dropout
        # model.attention_dropout_invariant: keyed masks on explicit probabilities instead of the fused kernel.
        self.keyed_attention_dropout = ctx.cfg.attention_dropout_invariant
        self.tp_group = ctx.tp_group
        # Sparse self-attention (model.attention_pattern), set once the piece knows its place (model.place_piece).
        self.pattern: AttentionPattern | None = None
        col = dict(config=ctx.mp, init_method=ctx.init, bias=True, gather_output=False, skip_bias_add=True,
                   tp_group=ctx.tp_group)
        if cross:
            self.q = ColumnParallelLinear(hidden, hidden, **col)
            self.kv = ColumnParallelLinear(hidden, 2 * hidden, **col)
        else:
            self.qkv = ColumnParallelLinear(hidden, 3 * hidden, **col)
        self.proj = RowParallelLinear(hidden, hidden, config=ctx.mp, init_method=ctx.out_init, bias=True,
                                      input_is_parallel=True, skip_bias_add=True, tp_group=ctx.tp_group)

    def _heads(self, projected: tuple[torch.Tensor, torch.Tensor], parts: int) -> list[torch.Tensor]:
        """A projection's (output, bias) -> `parts` tensors of [b, heads, s, head_dim]."""
        split = self.split_heads if self.training else plain_split_heads  # (by mode, as Residual's fusion)
        return split(*projected, parts, self.head_dim)

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(self.kv(memory), 2)
        return k, v

    def forward(self, x, mask=None, causal=False, memory=None, cache: LayerCache | None = None,
                max_len: int = 0, sample_index: torch.Tensor | None = None):
        """`sample_index` (int64 [b], training): the samples' positions in the run's sample stream, which
        key the attention-probability dropout when model.attention_dropout_invariant is set."""
        if self.cross:
            (q,) = self._heads(self.q(x), 1)
            if cache is not None and cache.cross_k is not None:
                k, v = cache.cross_k, cache.cross_v
            else:
                k, v = self.cross_kv(memory)
        else:
            q, k, v = self._heads(self.qkv(x), 3)
            queries = None  # the queries' stream positions (or the first one's), for a sparse pattern
            if cache is not None and cache.static is not None:
                queries = cache.static.at
                k, v, mask = cache.write(k, v)
                causal = False
            elif cache is not None:
                start = cache.length
                k, v = cache.append(k, v, max_len)
                queries = start
                if self.pattern is None:
                    mask, causal = self._cached_mask(q.shape[2], start, k.shape[2], causal, q.device)
            if self.pattern is not None:  # causal and within the cache's written positions too
                if not torch.is_tensor(queries):
                    queries = (queries or 0) + torch.arange(q.shape[2], device=q.device)
                mask, causal = self.pattern.mask(queries, k.shape[2]), False
        dropout = self.attention_dropout if self.training else 0.0
        if dropout > 0 and self.keyed_attention_dropout and sample_index is not None:
            out = self._keyed_dropout_attention(q, k, v, mask, causal, dropout, sample_index)
            return self.proj(_merge_heads(out))
        if dropout > 0:
            out = _attention_in_rng_fork(self.attention, q, k, v, mask, causal, dropout)
        else:
            out = self.attention(q, k, v, mask=mask, causal=causal, dropout_p=0.0)
        return self.proj(_merge_heads(out))

    def _keyed_dropout_attention(self, q, k, v, mask, causal, p, sample_index):
        """softmax(QK^T/sqrt(d)) V with dropout on the probabilities keyed by sample, head (its index among
        all heads: this rank's heads are the TP rank's slice) and (query, key) position. Explicit, not
        fused: SDPA's dropout cannot take a mask, so this materialises the [b, heads, queries, keys]
        probabilities (the price of model.attention_dropout_invariant)."""
        probs = attention_probs(q, k, mask, causal)
        b, heads, n, m = probs.shape
        tp, rank = self.tp_group.size(), self.tp_group.rank()
        keep = self.keep_mask(sample_index, self.key, p, probs.shape, batch_dim=0,
                              offsets=(0, rank * heads, 0, 0), full=(b, tp * heads, n, m))
        return keyed_dropout(probs, keep, p) @ v

    @staticmethod
    def _cached_mask(n: int, start: int, total: int, causal: bool, device) -> tuple[torch.Tensor | None, bool]:
        """(mask, causal) for n new queries at positions start.. over `total` cached keys."""
        if n == 1:
            # One new query sees every key so far: no mask at all, so that SDPA may take its flash kernel
            # (an all-True mask would force the memory-efficient or math kernel).
            return None, False
        if causal and start > 0:
            # Queries start at `start`: query i sees keys 0..start+i (SDPA's is_causal aligns top-left,
            # which is only right without cached positions).
            mask = torch.arange(total, device=device)[None, :] <= start + torch.arange(n, device=device)[:, None]
            return mask, False
        return None, causal


class MLP(nn.Module):
    """fc2(GeLU(fc1(x))): returns fc2's (output, bias), as Attention does."""

    def __init__(self, ctx: PieceContext):
        super().__init__()
        hidden, ffn = ctx.cfg.hidden_size, ctx.cfg.ffn_hidden_size
        self.fc1 = ColumnParallelLinear(hidden, ffn, config=ctx.mp, init_method=ctx.init, bias=True,
                                        gather_output=False, skip_bias_add=True, tp_group=ctx.tp_group)
        self.fc2 = RowParallelLinear(ffn, hidden, config=ctx.mp, init_method=ctx.out_init, bias=True,
                                     input_is_parallel=True, skip_bias_add=True, tp_group=ctx.tp_group)
        self.bias_gelu = ctx.kernels.bias_gelu

    def forward(self, x):
        h, bias = self.fc1(x)
        return self.fc2(self.bias_gelu(h, bias))


class Residual(nn.Module):
    """Pre-LN residual branch: x + dropout(f(norm(x)) + bias), `f` returning its output projection's (output,
    bias), the dropout keyed by `sample_index` (SampleDropout), which attention also gets (for
    model.attention_dropout_invariant). In training the bias, keyed dropout and residual add are one operation
    (kernels.bias_dropout_add: one fused kernel on a GPU); with masks from torch's generator (no sample_index)
    and in eval mode (sampling, evaluation) they are the plain three."""

    def __init__(self, norm: nn.Module, fn: nn.Module, dropout: float, sequence_parallel: bool, tp_group,
                 keep_mask=keyed_keep_mask, bias_dropout_add=plain_bias_dropout_add):
        super().__init__()
        self.norm, self.fn = norm, fn
        self.drop = SampleDropout(dropout, sequence_parallel, tp_group, keep_mask)
        self.bias_dropout_add = bias_dropout_add
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:
            mark_sequence_parallel(norm)

    def forward(self, x, sample_index: torch.Tensor | None = None, **kwargs):
        if isinstance(self.fn, Attention):
            kwargs["sample_index"] = sample_index
        out, bias = self.fn(self.norm(x), **kwargs)
        if self.drop.active and sample_index is None:  # (masks from torch's generator: F.dropout's kernel)
            return x + self.drop(out + bias)
        # Eval mode takes the plain operations: a compiled call's guard checks cost a decoded token more host time
        # than the fusion saves it, and each inference shape (prefill, one-token steps, fp32) would compile anew.
        # (By mode, not grad mode: a forward in training mode under no_grad, as a reentrant recomputation's first
        # pass is, takes the same kernel as its rerun with grad.)
        fused = self.bias_dropout_add if self.training else plain_bias_dropout_add
        return fused(out, bias, x, self.drop.mask(out, sample_index), self.drop.p)


def mark_sequence_parallel(module: nn.Module) -> None:
    """Parameters that see only a sequence shard: their gradients must be summed over the TP group."""
    for p in module.parameters():
        p.sequence_parallel = True


def _residual(ctx: PieceContext, fn: nn.Module) -> Residual:
    cfg = ctx.cfg
    return Residual(ctx.kernels.layer_norm(cfg.hidden_size, cfg.layernorm_eps), fn, cfg.dropout,
                    ctx.mp.sequence_parallel, ctx.tp_group, ctx.kernels.keep_mask, ctx.kernels.bias_dropout_add)


class EncoderLayer(nn.Module):
    def __init__(self, ctx: PieceContext):
        super().__init__()
        self.attn = _residual(ctx, Attention(ctx, cross=False))
        self.mlp = _residual(ctx, MLP(ctx))

    def forward(self, x, mask, sample_index: torch.Tensor | None = None):
        return self.mlp(self.attn(x, sample_index, mask=mask), sample_index)


class DecoderLayer(nn.Module):
    """Causal self-attention (KV cache over the decoder's stream), cross-attention to the text encoder's
    output (encoder-decoder only: a decoder-only model's caption is the start of its stream), MLP."""

    def __init__(self, ctx: PieceContext):
        super().__init__()
        self.max_len = ctx.cfg.stream_len
        self.self_attn = _residual(ctx, Attention(ctx, cross=False))
        if not ctx.cfg.decoder_only:
            self.cross_attn = _residual(ctx, Attention(ctx, cross=True))
        self.mlp = _residual(ctx, MLP(ctx))

    def forward(self, x, memory=None, memory_mask=None, cache: LayerCache | None = None,
                sample_index: torch.Tensor | None = None):
        x = self.self_attn(x, sample_index, causal=True, cache=cache, max_len=self.max_len)
        if hasattr(self, "cross_attn"):
            x = self.cross_attn(x, sample_index, memory=memory, mask=memory_mask, cache=cache)
        return self.mlp(x, sample_index)


def allreduce_sequence_parallel_grads(model: nn.Module) -> None:
    """Sum, over the model's TP group (`model.tp_group`), the gradients of parameters marked
    `sequence_parallel` (norms and row-parallel biases, which see only their rank's sequence shard).
    Call after backward, before the optimizer step; a no-op without sequence parallelism. Summed in fp32 (bf16
    gradients too, as Megatron sums into its fp32 main grads): a bf16 sum over 4+ ranks rounds at every hop."""
    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads or model.tp_group.size() == 1:
        return
    flat = _flatten_dense_tensors([g.float() for g in grads])
    dist.all_reduce(flat, group=model.tp_group)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)
