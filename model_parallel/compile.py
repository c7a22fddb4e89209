"""torch.compile of each transformer layer (`kernels.compile`), as torchtitan compiles each block; and of the
decode step that sampling's CUDA graphs replay (compile_decode_step).

    compile_layers(model)          # PartiModel or a PipelineModule of its pieces; before recomputation
    step = compile_decode_step(model)   # evaluation.sampling: sample(..., compiled="inductor")

Why: without Transformer Engine the elementwise steps of a layer (layer norms, the keyed dropout's integer hash,
residual gradients; bias+GeLU, the q/kv/qkv projections' bias+head split and the output projections'
bias+dropout+residual add have fused kernels of their own, model_parallel/kernels.py) each read and write the
whole activation; inductor fuses them into a few kernels around the matmuls. Each layer is compiled on its own:
the layers share their code, so one compiled graph serves all of them (their parameters and dropout keys are
graph inputs, not constants), and the embeddings, head and loss stay eager. Compiling the layer's `forward`
(rather than the module call) lets activation recomputation wrap the compiled function: a recomputed
layer runs the compiled code twice.

What stays out of the graph: megatron-core's RowParallelLinear warns on every call that it passed no TP
group (it passes None on purpose); compiled code skips `warnings.warn` rather than break the graph there.
Dropout inside the fused attention kernel forks megatron's RNG tracker (a graph break: the attention call
runs eager, the rest of the layer compiled).
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch._inductor.config

from model_parallel.layers import DecoderLayer, EncoderLayer


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile the forward of every encoder and decoder layer of `model` in place (names unchanged).
    `backend`: torch.compile's (tests check what tracing does with "aot_eager", without code generation)."""
    _trace_through_warnings()
    # Random ops inside the graph draw from torch's generators as eager does (not inductor's own RNG): the
    # fused attention kernel's dropout masks stay those of the eager run, and a recomputation under the
    # restored megatron tracker draws them again. The residual dropout is keyed (a hash, no RNG): free.
    torch._inductor.config.fallback_random = True
    for module in model.modules():
        if isinstance(module, EncoderLayer | DecoderLayer):
            module.forward = torch.compile(module.forward, backend=backend)
    return model


def compile_decode_step(model: torch.nn.Module, backend: str = "inductor"):
    """`model.decode_step` through torch.compile, for the static KV cache's one-token steps (evaluation/sampling.py
    StaticStep, what the CUDA graphs replay): inductor fuses each layer's bias adds, norms, residual adds, the
    cache writes (in place, at the step's position) and the attention mask into a few kernels around the
    matmuls, where the eager step launches ~25 kernels a layer (under a CUDA graph the host no longer waits, the
    kernels' count and memory passes are what is left; LlamaGen and gpt-fast compile their decode step for this).
    Static shapes: one graph per attended prefix length and batch shape, as there is one CUDA graph per length.
    Not the model's own: a wrapper, so the model's other calls (training, the growing cache) stay eager."""
    _trace_through_warnings()
    compiled = torch.compile(model.decode_step, backend=backend, dynamic=False)

    def step(*args):
        # dynamo's default of 8 graphs a function would send a second model (the GPU check decodes three) or a
        # third batch shape back to eager steps; raised for these calls only (a process-wide limit would hide
        # recompilations elsewhere).
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
            return compiled(*args)

    return step


def _trace_through_warnings() -> None:
    """megatron-core's RowParallelLinear warns on every call (module docstring): compiled code skips
    `warnings.warn` rather than break the graph there."""
    dynamo = torch._dynamo.config
    # (`ignore_logger_methods` is the older torch's name; where it takes loggers only, the warning breaks the
    # graph at each RowParallelLinear: still correct, less fused.)
    getattr(dynamo, "ignore_logging_functions", dynamo.ignore_logger_methods).add(warnings.warn)
    _quiet_unserialisable_config_log()


METRICS_LOG_ERROR = "Unexpected exception logging compilation metrics"


def _quiet_unserialisable_config_log() -> None:
    """torch 2.11 (the GPU image's; 2.14 leaves the setting out) writes dynamo's config into the metrics of every
    compilation and cannot serialise `warnings.warn` in it: each compilation then logs that error with its
    traceback, which says nothing about the compiled code and buries real errors in a log's tail. Where
    serialising fails, drop exactly that record."""
    describe = getattr(torch._dynamo.utils, "_get_dynamo_config_for_logging", None)
    try:
        if describe is not None:
            describe()
        return
    except Exception:  # (what torch's metrics context catches and logs)
        logger = logging.getLogger("torch._dynamo.metrics_context")
        if not any(isinstance(f, _DropRecord) for f in logger.filters):
            logger.addFilter(_DropRecord(METRICS_LOG_ERROR))


class _DropRecord(logging.Filter):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message
