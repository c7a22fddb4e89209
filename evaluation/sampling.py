"""Autoregressive sampling of image codes: KV cache, temperature, top-k, top-p, classifier-free guidance.

    codes = sample(model, text_ids, SamplingConfig(temperature=1.0, top_k=0, top_p=0.9, guidance_scale=1.2),
                   generator=torch.Generator().manual_seed(0))        # -> int64 [b, grid*grid]
    codes = sample(model, text_ids, cfg, torch.Generator("cuda").manual_seed(0), cuda_graph=True)  # on a GPU

With `guidance_scale` set, every step runs the captions and the null caption ([EOS], as in training)
as one doubled batch and samples from uncond + scale * (cond - uncond) (Parti used 1.2); None samples
from the conditional logits alone, and so does 1 (which is them: no doubled batch). Logits are gathered
over tensor-parallel ranks, and every rank draws from the same generator, so all ranks produce the same
codes. With `codebook_size` (a VQ tokenizer with fewer codes than the model's image vocabulary) only codes
below it are drawn, in every decoding mode.

Decoding modes (one loop, one step function each):
- `use_cache=False`: the whole prefix again at every step (the reference the caches are checked against);
- `use_cache=True` (default): a KV cache that grows by one position per step (layers.LayerCache);
- `static_cache=True`: the KV cache preallocated to the whole image with a device-side write position and
  attention over all of it under a mask of the written positions: every step has the same shapes and no
  host-side state. Slower than the growing cache when run eagerly: it exists for the CUDA graphs below,
  and run eagerly it lets the CPU tests check their very step;
- `cuda_graph=True` (CUDA only): the static-cache step captured in CUDA graphs (one per attended cache
  prefix: a quarter of the image, half, ...) and replayed at every step, so a step costs the host one launch
  instead of hundreds (parti-350m on an H200: 9x the growing cache's tokens/s, yet 17% of the memory-bandwidth
  bound: the ~25 kernels a layer are what is left). The graphs are captured per sample() call (its `setup_s`),
  or once per caption-batch shape with `steps` (StaticSteps: evaluation.generate keeps one; each later batch of
  that shape only refills the graphs' buffers). The CPU tests run the very same static step eagerly; only the
  capture itself needs a GPU;
- `compiled="inductor"` (with the static cache or the CUDA graphs): the step through torch.compile first
  (model_parallel.compile.compile_decode_step), which fuses those kernels: one compilation per attended prefix
  length and batch shape, seconds each. Not yet measured on a GPU (bench/sample.py's `cuda_graph_compiled`).

Where the random draws happen follows the generator: a CPU `torch.Generator` draws on the CPU from the
probabilities copied there (exactly as before: the same codes for the same generator and logits,
whatever device the model is on, at the cost of one host sync per step); a CUDA generator
(`torch.Generator("cuda")`) draws on the GPU with no sync (the draw is torch.multinomial's, without its
host-side checks); None draws on the logits' device from its
default generator. Per-image generators (a list) keep each image independent of the batch either way.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from common.config import ConfigError
from model_parallel.compile import compile_decode_step
from model_parallel.model import null_condition


@dataclass
class SamplingConfig:
    """How each image code is chosen (the `sampling:` keys of an evaluation config, evaluation.generate's flags)."""

    temperature: float = 1.0
    """Softmax temperature; 0 picks the most likely code (greedy)."""
    top_k: int = 0
    """Keep only the k most likely codes (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of codes whose probability reaches top_p (1: all)."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale (None: no guidance; 1 samples as None does; Parti: 1.2)."""

    def __post_init__(self):
        # Out-of-range values do not fail when sampling, they sample wrongly: top_p 0 masks every code (NaN
        # probabilities, every code 0), a negative temperature prefers the least likely code, a negative top_k
        # filters nothing.
        checks = {"temperature": (math.isfinite(self.temperature) and self.temperature >= 0, ">= 0 (0: greedy)"),
                  "top_k": (self.top_k >= 0, ">= 0 (0: all codes)"),
                  "top_p": (0 < self.top_p <= 1, "in (0, 1] (1: all codes)"),
                  "guidance_scale": (self.guidance_scale is None or math.isfinite(self.guidance_scale),
                                     "a finite number or null (no guidance)")}
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"sampling.{name} (--{name.replace('_', '-')}) must be {expected}, "
                                  f"not {getattr(self, name)!r}")

    @property
    def guided(self) -> bool:
        """Whether sampling runs the doubled batch: scale 1 is the conditional logits themselves (the doubled
        batch would only cost twice as much and differ from them by rounding)."""
        return self.guidance_scale not in (None, 1)


def check_counts(samples_per_prompt: int, batch_size: int, keep: int) -> None:
    """ValueError naming the flag (and the evaluation config's key) of a count out of range (batch size 0:
    auto_batch_size's)."""
    for flag, value, least, note in (("samples-per-prompt", samples_per_prompt, 1, ""),
                                     ("batch-size", batch_size, 0, " (0: chosen for the device)"),
                                     ("keep", keep, 0, "")):
        if value < least:
            raise ValueError(f"--{flag} (sampling.{flag.replace('-', '_')}) must be >= {least}{note}, not {value}")
    if keep > samples_per_prompt:
        raise ValueError(f"--keep {keep} keeps more than the {samples_per_prompt} sample(s) per prompt "
                         "(--samples-per-prompt): expected at most that many")


CPU_BATCH = 8
"""Images a CPU decodes together (auto_batch_size)."""
GPU_MAX_BATCH = 64
"""The most images a GPU decodes together by default. A decode step reads the weights once for the batch and
each row's cached K/V: at parti-350m (bf16, guidance: 2 rows an image) the weights weigh as much as ~10 rows'
caches at the image's mean position, parti-20b's as ~40, so 64 images (128 rows) get most of what larger
batches would, with one batch shape's graphs and caches per process. Not yet measured (the GPU check's
sampling section times 16 and 64)."""


def cache_bytes_per_row(model_cfg, element_size: int) -> int:
    """Bytes of one decoded sequence's static caches (model.start_decoding(static=True)): every decoder layer's
    self-attention K and V over the whole stream, and the encoder-decoder's cross-attention K and V over the
    caption."""
    positions = model_cfg.stream_len + (0 if model_cfg.decoder_only else model_cfg.text_seq_len)
    return 2 * model_cfg.decoder_layers * positions * model_cfg.num_heads * model_cfg.head_dim * element_size


def auto_batch_size(model, guided: bool) -> int:
    """Images to decode together when none is given (--batch-size 0): CPU_BATCH on a CPU; on a GPU as many as
    their caches fit in half its free memory (the other half for a last, smaller batch's own caches and CUDA
    graphs, the VQ decoder and CLIP), at most GPU_MAX_BATCH, at least 1."""
    weight = next(model.parameters())
    if weight.device.type != "cuda":
        return CPU_BATCH
    per_image = cache_bytes_per_row(model.cfg, weight.element_size()) * (2 if guided else 1)
    return max(1, min(GPU_MAX_BATCH, torch.cuda.mem_get_info(weight.device)[0] // 2 // per_image))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """-inf outside the top-k codes and outside the top-p nucleus (the most likely code is always kept)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this code already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def _draw_device(generator, default: torch.device) -> torch.device:
    """The device the draws happen on: the generators' (all the same), or `default` without one."""
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    devices = {g.device for g in gens if g is not None}
    if len(devices) > 1:
        raise ValueError(f"the generators are on different devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else default


def choose(logits: torch.Tensor, cfg: SamplingConfig, generator) -> torch.Tensor:
    """Next codes [b] (on the logits' device) from logits [b, V]; `generator`: one for the batch, or a list
    with one per row (then each row's draws do not depend on what else is in the batch). The draws happen
    on the generator's device (module docstring)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    # (less the row's largest first: a tiny temperature then tends to greedy; divided as they were, the logits
    # overflowed to inf, the softmax gave NaN and every draw picked code 0)
    shifted = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature
    probs = filter_logits(shifted, cfg.top_k, cfg.top_p).softmax(-1)
    probs = probs.to(_draw_device(generator, logits.device))
    if isinstance(generator, (list, tuple)):
        picks = torch.cat([_draw_one(p[None], g) for p, g in zip(probs, generator)])
    else:
        picks = _draw_one(probs, generator)
    return picks.to(logits.device)


def _draw_one(probs: torch.Tensor, generator) -> torch.Tensor:
    """One code per row of probs [b, V], the very draw torch.multinomial(probs, 1, generator=...) makes
    (ATen's one-sample path: argmax of probs / q with q ~ Exp(1)), without its two validity checks, which
    copy to the host (`.item()`) and so made every decoding step on a GPU wait for the device. The
    probabilities come from a softmax here: non-negative, and finite wherever the logits are."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def null_captions(model, text_ids: torch.Tensor) -> torch.Tensor:
    drop = torch.ones(text_ids.shape[0], dtype=torch.bool, device=text_ids.device)
    return null_condition(text_ids, drop, model.cfg.text_pad_id, model.cfg.text_eos_id)


# ----------------------------------------------------------------------------------------------
# Step functions: (decoder inputs [B, n+1] so far, step i) -> next-token logits [B, V] for position i.


class Recompute:
    """The reference: the decoder over the whole prefix tokens[:, :i+1] at every step."""

    def __init__(self, model, texts: torch.Tensor):
        self.model = model
        self.memory, self.mask = model.encode(texts)

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            gather_from_tensor_model_parallel_region,
        )

        full = self.model.decode(tokens[:, :i + 1], self.memory, self.mask)
        # Over the model's own TP group (as decode_step): a model built for another group than megatron's
        # global one (a TP=1 export loaded inside a TP>1 job) would otherwise gather other ranks' logits.
        return gather_from_tensor_model_parallel_region(full, group=self.model.tp_group)[-1]


class CachedStep:
    """One token per step through a KV cache that grows by one position per step."""

    def __init__(self, model, texts: torch.Tensor):
        self.model = model
        self.caches, self.memory, self.mask = model.start_decoding(texts)

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        return self.model.decode_step(tokens[:, i:i + 1], self.caches, self.memory, self.mask)[:, -1]


class StaticStep:
    """One token per step through a static KV cache, with a static input tensor (`self.tokens`). Step i
    attends over the shortest of `buckets` cache prefixes (a quarter of the stream, half, ...) that holds
    its position (i, after the caption's `prefix_len` positions for a decoder-only model), so early steps do
    not read the whole cache. With `cuda_graph` the step is captured once
    per prefix length in a CUDA graph and every call replays one; without, the same step runs eagerly
    (which is how the CPU tests check the static cache, prefixes included). `compiled`: a torch.compile
    backend for the step ("inductor"; model_parallel.compile.compile_decode_step), None: the eager step."""

    warmup_steps = 3  # lazy initialisation (cuBLAS handles, workspaces, compiled fusions) before capture

    def __init__(self, model, texts: torch.Tensor, cuda_graph: bool = False, buckets: int = 4,
                 compiled: str | None = None):
        self.model, self.made_for = model, (tuple(texts.shape), texts.device)
        self.decode_step = model.decode_step if compiled is None else compile_decode_step(model, compiled)
        self.caches, self.memory, self.mask = model.start_decoding(texts, static=True)
        self.position, self.prefix = self.caches[0].static, model.cfg.prefix_len
        self.tokens = torch.full((texts.shape[0], 1), model.bos_id, dtype=torch.long, device=texts.device)
        length = self.position.max_len
        # (a decoder-only caption of a quarter of the stream or more: the shorter lengths are never attended)
        self.lengths = sorted({n for k in range(buckets) if (n := -(-length * (k + 1) // buckets)) > self.prefix})
        self.graphs: dict[int, tuple] = {}  # prefix length -> (CUDA graph, its output logits)
        if cuda_graph:
            self._capture()

    def _forward(self, keys: int) -> torch.Tensor:
        self.position.keys = keys
        return self.decode_step(self.tokens, self.caches, self.memory, self.mask)

    def _capture(self) -> None:
        """torch's documented recipe: warm up on a side stream, then capture under torch.cuda.graph. The
        tensors the graphs read and write (tokens, caches, write position, memory, masks) are allocated
        before capture and kept alive by this object; each graph's output lives in its private pool."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.warm_up()
        torch.cuda.current_stream().wait_stream(side)
        for keys in self.lengths:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(keys)  # capture records the kernels without running them
            self.graphs[keys] = (graph, logits)

    def restart(self, texts: torch.Tensor) -> None:
        """Start decoding `texts` (the shape this step was made for) in the same buffers, which the captured
        graphs read: the caches restarted in place (zeroed, the new captions' cross-attention K/V or, decoder-only,
        their prefill written in; the write position back at the image's start), the encoder output and its mask
        copied in."""
        if (tuple(texts.shape), texts.device) != self.made_for:
            raise ValueError(f"a static step made for captions {self.made_for} cannot restart for "
                             f"{(tuple(texts.shape), texts.device)}: its buffers have the first ones' shapes")
        _, memory, mask = self.model.start_decoding(texts, static=True, into=self.caches)
        for mine, new in ((self.memory, memory), (self.mask, mask)):
            if mine is not None:
                mine.copy_(new)

    def warm_up(self) -> None:
        """A few steps at every prefix length, each from the first image position (however short the image),
        which is where the write position is left. The (BOS) keys and values they wrote are harmless: each
        step writes its position before attending, and positions after it are masked out (finite values
        times weight 0)."""
        for keys in self.lengths:
            self.position.next.fill_(self.prefix)
            for _ in range(min(self.warmup_steps, self.position.max_len - self.prefix)):
                self._forward(keys)
        self.position.next.fill_(self.prefix)

    def __call__(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        keys = next(k for k in self.lengths if k > self.prefix + i)  # step i writes prefix + i, reads 0..it
        self.tokens.copy_(tokens[:, i:i + 1])
        if self.graphs:
            graph, logits = self.graphs[keys]
            graph.replay()
        else:
            logits = self._forward(keys)
        # With a graph, a view of its output: read (by choose) before the next replay overwrites it.
        return logits[:, -1]


class StaticSteps:
    """Static steps kept across sample() calls, one per model and caption-batch shape, each restarted for the next
    batch: its CUDA graphs' capture (with the warm-up before it) is paid once per shape instead of once per batch
    (parti-350m on an H200: 0.25 s a call, an eighth of the decoding of 16 images). Each kept step holds its
    static KV caches and its graphs' memory until this object goes (none is dropped: evaluation.generate has
    two shapes at most, its batches and its last one)."""

    def __init__(self):
        self.steps: dict[tuple, StaticStep] = {}

    def get(self, model, texts: torch.Tensor, cuda_graph: bool, compiled: str | None = None) -> StaticStep:
        key = (id(model), tuple(texts.shape), texts.device, cuda_graph, compiled)
        if key in self.steps:
            self.steps[key].restart(texts)
        else:
            self.steps[key] = StaticStep(model, texts, cuda_graph, compiled=compiled)
        return self.steps[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample(model, text_ids: torch.Tensor, cfg: SamplingConfig, generator=None, use_cache: bool = True,
           max_tokens: int | None = None, cuda_graph: bool = False, static_cache: bool = False,
           timings: dict | None = None, codebook_size: int | None = None,
           steps: StaticSteps | None = None, compiled: str | None = None) -> torch.Tensor:
    """Image codes [b, grid*grid] for captions [b, T] (model: PartiModel in eval mode; decoder-only: T is
    model.text_seq_len, the caption length the cache's positions assume); with `max_tokens`, only the first
    codes (previews, benchmarks). `cuda_graph` (CUDA, with the cache) and `static_cache` choose the decoding
    mode (module docstring). `timings`, if given, receives `setup_s` (encoder, caches, graph capture) and
    `decode_s` (the token loop), measured with device syncs. `codebook_size`: draw only codes below it (a VQ
    tokenizer with fewer codes than the model's image vocabulary; None: the whole vocabulary). `steps`: where a
    static step (and its CUDA graphs) is kept for later calls with captions of the same shape (StaticSteps).
    `compiled`: the static step through torch.compile with this backend ("inductor"; with cuda_graph or
    static_cache only)."""
    _check_arguments(model, use_cache, cuda_graph, static_cache, text_ids.device, codebook_size, compiled)
    with decoding_attention_kernels(text_ids.device):
        return _sample(model, text_ids, cfg, generator, use_cache, max_tokens, cuda_graph, static_cache, timings,
                       codebook_size or model.cfg.image_vocab_size, steps, compiled)


def _check_arguments(model, use_cache, cuda_graph, static_cache, device, codebook_size, compiled) -> None:
    if model.training:  # (dropout would perturb every step's logits)
        raise ValueError("sample() needs the model in eval mode (model.eval()): it is in training mode")
    if codebook_size is not None and not 0 < codebook_size <= model.cfg.image_vocab_size:
        raise ValueError(f"codebook_size={codebook_size}: expected 1..{model.cfg.image_vocab_size} "
                         "(the model's image vocabulary)")
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph=True replays the KV-cache decode step: it needs use_cache=True")
    if cuda_graph and device.type != "cuda":
        raise RuntimeError(f"cuda_graph=True needs the model and text_ids on a CUDA device, not {device}")
    if static_cache and not use_cache:
        raise ValueError("static_cache=True is a KV cache: it needs use_cache=True")
    if compiled and not (cuda_graph or static_cache):
        raise ValueError(f"compiled={compiled!r} compiles the static cache's step: it needs cuda_graph=True or "
                         "static_cache=True (the growing cache's shapes change at every step)")


def decoding_attention_kernels(device: torch.device):
    """SDPA kernels for decoding: flash, then memory-efficient, then math, without cuDNN's. cuDNN's
    attention (torch's first choice on Hopper, and right for training's fixed shapes) builds an execution
    plan for every new shape, and a growing KV cache is a new key length at every step. (On an H200 the
    GPU check's sampling of parti-350m with the growing cache did not finish in 90 s; per-shape plans are
    the likely cause, to be confirmed by the next GPU run.) Flash kernels take any length as it comes."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _sample(model, text_ids, cfg, generator, use_cache, max_tokens, cuda_graph, static_cache, timings, codes_below,
            steps, compiled):
    device = text_ids.device
    b, n = text_ids.shape[0], min(model.cfg.image_seq_len, max_tokens or model.cfg.image_seq_len)
    guided = cfg.guided
    texts = torch.cat([text_ids, null_captions(model, text_ids)]) if guided else text_ids
    _sync(device)
    start = time.perf_counter()
    if not use_cache:
        step = Recompute(model, texts)
    elif cuda_graph or static_cache:
        step = StaticStep(model, texts, cuda_graph, compiled=compiled) if steps is None else \
            steps.get(model, texts, cuda_graph, compiled)
    else:
        step = CachedStep(model, texts)
    _sync(device)
    ready = time.perf_counter()
    # Decoder inputs: BOS, then the codes chosen so far (written in place: no growing concatenation).
    tokens = torch.full((texts.shape[0], n + 1), model.bos_id, dtype=torch.long, device=device)
    for i in range(n):
        # Only the codes the VQ tokenizer has: a slice outside the step (the same in every decoding mode, no
        # host sync, nothing added to a captured graph). Guidance and the softmax in fp32 whatever the dtype.
        logits = step(tokens, i)[:, :codes_below].float()
        if guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + cfg.guidance_scale * (cond - uncond)
        nxt = choose(logits, cfg, generator)
        tokens[:, i + 1] = torch.cat([nxt, nxt]) if guided else nxt
    codes = tokens[:b, 1:].clone()
    if timings is not None:
        _sync(device)
        timings.update(setup_s=ready - start, decode_s=time.perf_counter() - ready, tokens=n)
    return codes
