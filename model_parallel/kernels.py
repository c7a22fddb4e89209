"""Fused-kernel selection: the one place that decides which implementation each operation uses.

    kernels = select_kernels(cfg.kernels)       # KernelConfig: 'auto' or a named implementation
    log.info(kernels.summary())                 # what was chosen and why, logged at start
    norm = kernels.layer_norm(hidden, eps)      # a module
    y = kernels.bias_gelu(x, bias)              # a function
    y = kernels.bias_dropout_add(x, bias, residual, keep, p)
    q, k, v = kernels.split_heads(x, bias, 3, head_dim)   # [b, heads, s, head_dim] each
    loss = kernels.cross_entropy(logits, target, tp_group)   # per token
    opt = kernels.optimizer(param_groups, lr=..., betas=..., eps=..., weight_decay=...)

Choices (auto picks the first that is available on this machine):
- layer norm: Transformer Engine LayerNorm, apex FusedLayerNorm (both GPU only), torch LayerNorm;
- attention: torch scaled_dot_product_attention (flash / memory-efficient kernels on GPU), or an
  explicit softmax(QK^T)V ("math", for debugging);
- bias + GeLU: megatron-core's jit-fused bias_gelu (GPU), or bias add + tanh GeLU;
- bias + dropout + residual add after each row-parallel projection: one compiled kernel (GPU), or three;
- bias add and split into heads after attention's q / kv / qkv projections: one compiled kernel writing each
  part dense (GPU: its gradients then come back dense and join fast), or a bias add and views;
- the loss's vocab-parallel cross-entropy: three compiled passes over the logits (GPU;
  model_parallel/cross_entropy.py says why), or megatron-core's on fp32 logits;
- optimizer: torch AdamW(fused=True) (one multi-tensor kernel, as fast as apex's), torch AdamW; apex
  FusedAdam and DeepSpeed FusedAdam (GPU only) only when asked for by name: `auto` picks what the
  checkpoint round trip is tested with on every machine (torch's fused AdamW runs on CPU too);
- keyed dropout masks: one compiled kernel (GPU; model_parallel/keyed_dropout.py says why), or the eager
  integer hash (CPU: compiling costs more than a CPU run's masks).
Asking for an implementation that is not available is an error naming the reason.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from common.config import ConfigError, require
from model_parallel.cross_entropy import fused_cross_entropy, plain_cross_entropy
from model_parallel.keyed_dropout import compiled_keep_mask, keyed_dropout, keyed_keep_mask

KERNEL_CHOICES = {"layernorm": ("auto", "apex", "te", "torch"), "attention": ("auto", "sdpa", "math"),
                  "bias_gelu": ("auto", "fused", "plain"), "bias_dropout_add": ("auto", "fused", "plain"),
                  "split_heads": ("auto", "fused", "plain"), "cross_entropy": ("auto", "fused", "plain"),
                  "optimizer": ("auto", "apex", "deepspeed", "torch_fused", "torch"),
                  "dropout_mask": ("auto", "compiled", "eager")}


@dataclass
class KernelConfig:
    """Which implementation each fusable operation uses; 'auto' picks the fastest one available."""

    layernorm: str = "auto"
    """auto (GPU: te, else apex, else torch; torch with kernels.compile, which fuses it) | apex | te | torch."""
    attention: str = "auto"
    """auto | sdpa (torch scaled_dot_product_attention: flash/efficient kernels on GPU) | math."""
    bias_gelu: str = "auto"
    """auto | fused (megatron-core's jit-fused bias+GeLU) | plain."""
    bias_dropout_add: str = "auto"
    """auto | fused (in training, the bias, the keyed dropout and the residual add after attention's and the MLP's
    output projections as one torch.compile kernel; eval mode takes plain) | plain (one kernel each)."""
    split_heads: str = "auto"
    """auto | fused (in training, the bias add of attention's q, kv and qkv projections and their split into heads
    as one torch.compile kernel that writes each part dense; eval mode takes plain) | plain (a bias add, then views
    of its result)."""
    cross_entropy: str = "auto"
    """auto | fused (the loss's cross-entropy in three compiled passes over the logits in their dtype,
    model_parallel/cross_entropy.py) | plain (megatron-core's vocab_parallel_cross_entropy on fp32 logits)."""
    optimizer: str = "auto"
    """auto | apex (FusedAdam) | deepspeed (FusedAdam) | torch_fused (AdamW fused=True) | torch."""
    dropout_mask: str = "auto"
    """auto | compiled (the keyed dropout's mask as one torch.compile kernel) | eager (its ~12 integer
    operations per element one by one). Both give the same masks."""
    compile: bool = False
    """torch.compile each transformer layer in the trainer (model_parallel/compile.py; the text encoder's warm
    start, sampling and export run eager): inductor fuses the elementwise work around the matmuls (bias,
    GeLU, residual, norms, the keyed dropout's hash). The first steps pay the compilation (seconds per
    distinct layer shape); the losses equal the eager run's."""

    def validate(self) -> "KernelConfig":
        for op, choices in KERNEL_CHOICES.items():
            value = getattr(self, op)
            require(value in choices, f"kernels.{op}={value!r} must be one of {', '.join(choices)}")
        require(isinstance(self.compile, bool), f"kernels.compile={self.compile!r} must be true or false")
        return self


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def availability() -> dict[str, dict[str, str | None]]:
    """For each operation, implementation -> None if usable here, else why not."""
    no_gpu = None if torch.cuda.is_available() else "needs a CUDA GPU"
    apex_norm = no_gpu or (None if _has("apex.normalization") else "NVIDIA apex is not installed")
    apex_opt = no_gpu or (None if _has("apex.optimizers") else "NVIDIA apex is not installed")
    te = no_gpu or (None if _has("transformer_engine") else "Transformer Engine is not installed")
    return {
        "layernorm": {"te": te, "apex": apex_norm, "torch": None},
        "attention": {"sdpa": None, "math": None},
        # megatron-core's fused bias-GeLU is a torch.compile'd function (megatron/core/jit.py): inductor's needs.
        "bias_gelu": {"fused": compile_unavailable(), "plain": None},
        "bias_dropout_add": {"fused": compile_unavailable(), "plain": None},
        "split_heads": {"fused": compile_unavailable(), "plain": None},
        "cross_entropy": {"fused": compile_unavailable(), "plain": None},
        "optimizer": {"apex": apex_opt, "deepspeed": no_gpu or _cuda_op_build_unavailable(), "torch_fused": None,
                      "torch": None},
        "dropout_mask": {"compiled": compile_unavailable(), "eager": None},
    }


# What 'auto' tries, best first. On CPU the fusions buy nothing: megatron's bias_gelu is a
# torch.jit kernel aimed at GPUs, AdamW's foreach path beats fused=True for small models, and compiling the
# dropout mask (~10 s of C++ compilation per process) costs more than the masks of a CPU run.
_PREFERENCE = {
    "gpu": {"layernorm": ("te", "apex", "torch"), "attention": ("sdpa",),
            "bias_gelu": ("fused", "plain"), "bias_dropout_add": ("fused", "plain"),
            "split_heads": ("fused", "plain"), "cross_entropy": ("fused", "plain"),
            "optimizer": ("torch_fused", "torch"), "dropout_mask": ("compiled", "eager")},
    "cpu": {"layernorm": ("torch",), "attention": ("sdpa",), "bias_gelu": ("plain",), "bias_dropout_add": ("plain",),
            "split_heads": ("plain",), "cross_entropy": ("plain",), "optimizer": ("torch",),
            "dropout_mask": ("eager",)},
}


# Under kernels.compile, inductor fuses torch's layer norm into its neighbours; apex's and Transformer Engine's are
# custom autograd functions dynamo does not trace (TE releases of 2023-24 mark the forward no_torch_dynamo): a break at
# every norm of every compiled layer.
_COMPILED_PREFERENCE = {"layernorm": ("torch",)}


def _choose(op: str, wanted: str, compiled: bool = False) -> tuple[str, str]:
    options = availability()[op]
    if wanted != "auto":
        if wanted not in options:
            raise ConfigError(f"kernels.{op}={wanted!r} is unknown; choose from {', '.join(options)}")
        if options[wanted]:
            raise ConfigError(f"kernels.{op}={wanted!r} is not available: {options[wanted]}")
        return wanted, "requested"
    device = "gpu" if torch.cuda.is_available() else "cpu"
    passed = []
    if compiled and op in _COMPILED_PREFERENCE:
        preference, where = _COMPILED_PREFERENCE[op], f"{device}, compiled layers"
    else:
        preference, where = _PREFERENCE[device][op], device
    for name in preference:
        if options[name] is None:
            return name, f"auto on {where}" + (f"; skipped {', '.join(passed)}" if passed else "")
        passed.append(f"{name}: {options[name]}")
    raise AssertionError(f"no {op} implementation in the preference list")


# ---------------------------------------------------------------------------------------------


def plain_bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def fused_bias_gelu(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    return plain_bias_gelu(x, None) if bias is None else bias_gelu_impl(x, bias)


def plain_bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                           keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """residual + dropout(x + bias), the dropout given by its mask `keep` (None: no dropout; else kept
    elements are scaled by 1/(1-p), model_parallel/keyed_dropout.py)."""
    y = x if bias is None else x + bias
    return residual + (y if keep is None else keyed_dropout(y, keep, p))


@functools.cache
def fused_bias_dropout_add():
    """plain_bias_dropout_add as one inductor kernel forward (and one backward, plus the bias gradient's sum):
    in eager the broadcast bias add alone took ~7% of a parti-350m step on an H200
    (bench/results/gpu_nvidia-h200_2026-12-04). megatron-core's own fused_bias_dropout draws its masks from
    torch's generator and rounds the residual to the branch's dtype; this one takes the keyed masks and keeps
    the residual's dtype, so it is written here (megatron's way: a torch.compile'd function). Inductor does not
    round `x + bias` to bf16 before the add, so bf16 results differ from plain's by that rounding. One function
    per process, made at the first ask (compiled at its first call): a compiled layer traces through it, and
    one object keeps the layers' graphs alike."""
    return torch.compile(plain_bias_dropout_add, dynamic=True)


def plain_split_heads(x: torch.Tensor, bias: torch.Tensor, parts: int, head_dim: int,
                      dense: bool = False) -> list[torch.Tensor]:
    """x + bias: [s, b, heads*parts*head_dim] -> `parts` tensors of [b, heads, s, head_dim], views of the sum. Each
    head's parts (q, k, v) are adjacent, megatron's layout (a TP rank holds whole heads), and are split along the
    last dimension as megatron-core splits them. The views are not dense (each skips the other parts), so a fused
    attention backward that allocates their gradients like them (empty_like: cuDNN's) writes [b, heads, s, d]
    tensors, and autograd joins those into x's layout with torch's strided cat (see fused_split_heads). `dense`:
    each part written to its own dense [s, b, heads, head_dim] tensor instead (fused_split_heads' trace)."""
    s, b = x.shape[:2]
    heads = (x + bias).view(s, b, -1, parts * head_dim)
    # (cross-attention's queries, parts 1: the whole, dense view; a split into one piece is a cat's copy)
    pieces = [heads] if parts == 1 else heads.split(head_dim, dim=-1)
    return [(part.contiguous() if dense else part).permute(1, 2, 0, 3) for part in pieces]


def fused_split_heads(x: torch.Tensor, bias: torch.Tensor, parts: int, head_dim: int) -> list[torch.Tensor]:
    """plain_split_heads' values as one inductor kernel that writes each part dense ([s, b, heads, head_dim]
    order), and in the backward one kernel joining the parts' gradients into x's layout (with the bias
    gradient's sum). Why: on an H200 (bench/results/gpu_nvidia-h200_2026-12-04) the projections' broadcast bias
    add ran at a third of the memory bandwidth and the join of plain's views' gradients took torch's generic
    strided cat (torch's cat_out_cuda takes its vectorised kernels only for contiguous inputs; cuDNN's attention
    backward allocates dq, dk, dv by empty_like, which gives non-dense views' gradients the [b, heads, s, d] order):
    the cat alone 5% of a parti-350m step, these adds ~3% more by their share of the adds' bytes. Dense parts get
    gradients in their own order, which the compiled backward joins at bandwidth; SDPA's output then also keeps
    the queries' [s, b, heads, d] order, so merging heads is a view, not a copy. Same values as plain; the bias
    gradient is summed in another order."""
    if torch.compiler.is_compiling():  # inside a compiled layer (kernels.compile): part of the layer's graph
        return plain_split_heads(x, bias, parts, head_dim, dense=True)
    return _compiled_split_heads(parts, head_dim)(x, bias)


@functools.cache
def _compiled_split_heads(parts: int, head_dim: int):
    """One compiled function per (parts, head_dim), closed over them: constants to the trace (a compiled frame's
    integer arguments would be dynamic), while dynamic in the sequence and batch (one compilation serves every
    micro-batch shape but 1). Each with a code object of its own: dynamo keeps its compiled graphs, and its limit
    of 8, per code object, which every closure of one `def` shares (the three splits' variants, by dtype and
    grad mode, would share one budget and the last ones run eager)."""
    def split(x: torch.Tensor, bias: torch.Tensor) -> list[torch.Tensor]:
        return plain_split_heads(x, bias, parts, head_dim, dense=True)

    split.__code__ = split.__code__.replace(co_name=f"split_heads_{parts}x{head_dim}")
    return torch.compile(split, dynamic=True)


def sdpa_attention(q, k, v, mask=None, causal=False, dropout_p=0.0):
    """q,k,v: [batch, heads, seq, head_dim]; mask: bool, True = attend, broadcastable to the scores."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal and mask is None)


def attention_probs(q, k, mask=None, causal=False) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) under the mask (or the causal one), in fp32, returned in q's dtype."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal and mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


def math_attention(q, k, v, mask=None, causal=False, dropout_p=0.0):
    return F.dropout(attention_probs(q, k, mask, causal), dropout_p) @ v


def _layer_norm_factory(name: str) -> Callable[[int, float], torch.nn.Module]:
    if name == "te":
        import transformer_engine.pytorch as te

        return lambda size, eps: te.LayerNorm(size, eps=eps)
    if name == "apex":
        from apex.normalization import FusedLayerNorm

        return lambda size, eps: FusedLayerNorm(size, eps=eps)
    return lambda size, eps: torch.nn.LayerNorm(size, eps=eps)


def _optimizer_factory(name: str):
    if name == "apex":
        from apex.optimizers import FusedAdam

        return lambda params, **kw: FusedAdam(params, adam_w_mode=True, **kw)
    if name == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        return lambda params, **kw: FusedAdam(params, adam_w_mode=True, **kw)
    if name == "torch_fused":
        return lambda params, **kw: torch.optim.AdamW(params, fused=True, **kw)
    return lambda params, **kw: torch.optim.AdamW(params, foreach=True, **kw)


@dataclass
class Kernels:
    """The chosen implementations; `choices` maps operation -> (name, reason)."""

    choices: dict[str, tuple[str, str]] = field(default_factory=dict)
    compile: bool = False
    """Whether training compiles each transformer layer (kernels.compile)."""

    def name(self, op: str) -> str:
        return self.choices[op][0]

    def layer_norm(self, size: int, eps: float) -> torch.nn.Module:
        return _layer_norm_factory(self.name("layernorm"))(size, eps)

    @property
    def attention(self):
        return sdpa_attention if self.name("attention") == "sdpa" else math_attention

    @property
    def bias_gelu(self):
        return fused_bias_gelu if self.name("bias_gelu") == "fused" else plain_bias_gelu

    @property
    def bias_dropout_add(self):
        return fused_bias_dropout_add() if self.name("bias_dropout_add") == "fused" else plain_bias_dropout_add

    @property
    def split_heads(self):
        """(x [s, b, heads*parts*head_dim], bias, parts, head_dim) -> `parts` tensors of [b, heads, s, head_dim]."""
        return fused_split_heads if self.name("split_heads") == "fused" else plain_split_heads

    @property
    def cross_entropy(self):
        """(logits [n, b, V/tp], target [n, b], tp_group) -> the per-token loss [n, b] (fp32)."""
        return fused_cross_entropy if self.name("cross_entropy") == "fused" else plain_cross_entropy

    def optimizer(self, params, **kwargs) -> torch.optim.Optimizer:
        return _optimizer_factory(self.name("optimizer"))(params, **kwargs)

    @property
    def keep_mask(self):
        """The keyed dropout's mask function (model_parallel/keyed_dropout.py)."""
        return compiled_keep_mask() if self.name("dropout_mask") == "compiled" else keyed_keep_mask

    def summary(self) -> str:
        chosen = "; ".join(f"{op}={n} ({why})" for op, (n, why) in self.choices.items())
        return f"kernels: {chosen}; layers {'compiled' if self.compile else 'eager'} (kernels.compile)"


def _cuda_op_build_unavailable() -> str | None:
    """DeepSpeed's FusedAdam is a CUDA extension built on first use (bench/device_wheels.sh builds DeepSpeed without
    its ops; so does a plain pip install): it needs nvcc under CUDA_HOME and ninja (deepspeed/ops/op_builder)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "DeepSpeed builds FusedAdam at first use and needs nvcc (CUDA_HOME), which is not here"
    return None if shutil.which("ninja") else "DeepSpeed builds FusedAdam at first use and needs ninja"


def compile_unavailable() -> str | None:
    """None if torch.compile's inductor can build kernels here, else why not: Triton and a C compiler on a
    GPU (Triton builds its kernel launcher with $CC, clang or gcc), a C++ compiler on CPU (checked before
    training starts rather than at the first step's compilation)."""
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton for CUDA kernels (pip install triton)"
        compilers = [os.environ.get("CC"), "clang", "gcc"]  # (what triton/runtime/build.py looks for)
        return None if any(c and shutil.which(c) for c in compilers) else "Triton needs a C compiler (gcc)"
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return None if any(c and shutil.which(c) for c in compilers) else "inductor needs a C++ compiler (g++) on CPU"


def select_kernels(kernel_cfg=None) -> Kernels:
    """Resolve a KernelConfig (or all-'auto' when None) into concrete implementations."""
    wanted = {op: getattr(kernel_cfg, op, "auto") if kernel_cfg else "auto"
              for op in KERNEL_CHOICES}
    compiled = bool(getattr(kernel_cfg, "compile", False))
    if compiled and (why := compile_unavailable()):
        raise ConfigError(f"kernels.compile=true is not available: {why}")
    return Kernels({op: _choose(op, w, compiled) for op, w in wanted.items()}, compiled)
