"""Autoregressive sampling of image codes: KV cache, temperature, top-k, top-p, classifier-free guidance.

    codes = sample(model, text_ids, SamplingConfig(temperature=1.0, top_k=0, top_p=0.9, guidance_scale=1.2),
                   generator=torch.Generator().manual_seed(0))        # -> int64 [b, grid*grid]

With `guidance_scale` set, every step runs the captions and the null caption ([EOS], as in training)
as one doubled batch and samples from uncond + scale * (cond - uncond) (Parti used 1.2); None samples
from the conditional logits alone. `use_cache=False` recomputes the whole prefix at every step (the
reference the KV cache is checked against). Logits are gathered over tensor-parallel ranks, and every
rank draws from the same generator, so all ranks produce the same codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Softmax temperature; 0 picks the most likely code (greedy)."""
    top_k: int = 0
    """Keep only the k most likely codes (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of codes whose probability reaches top_p (1: all)."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale (None: no guidance; Parti: 1.2)."""


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


def choose(logits: torch.Tensor, cfg: SamplingConfig, generator) -> torch.Tensor:
    """Next codes [b] from logits [b, V]; `generator`: one for the batch, or a list with one per row
    (then each row's draws do not depend on what else is in the batch)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1).cpu()
    if isinstance(generator, (list, tuple)):
        picks = torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    else:
        picks = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return picks.to(logits.device)


def null_captions(model, text_ids: torch.Tensor) -> torch.Tensor:
    from model_parallel.model import null_condition

    drop = torch.ones(text_ids.shape[0], dtype=torch.bool, device=text_ids.device)
    return null_condition(text_ids, drop, model.cfg.text_pad_id, model.cfg.text_eos_id)


@torch.no_grad()
def sample(model, text_ids: torch.Tensor, cfg: SamplingConfig, generator=None,
           use_cache: bool = True, max_tokens: int | None = None) -> torch.Tensor:
    """Image codes [b, grid*grid] for captions [b, T] (model: PartiModel in eval mode); with
    `max_tokens`, only the first codes (previews, benchmarks)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, n = text_ids.shape[0], min(model.cfg.image_seq_len, max_tokens or model.cfg.image_seq_len)
    guided = cfg.guidance_scale is not None
    texts = torch.cat([text_ids, null_captions(model, text_ids)]) if guided else text_ids
    caches, memory, mask = model.start_decoding(texts)
    inputs = torch.full((texts.shape[0], 1), model.bos_id, dtype=torch.long, device=text_ids.device)
    codes = []
    for _ in range(n):
        if use_cache:
            logits = model.decode_step(inputs[:, -1:], caches, memory, mask)[:, -1]
        else:  # the reference: the whole prefix again
            full = model.decode(inputs, memory, mask)
            logits = gather_from_tensor_model_parallel_region(full).transpose(0, 1)[:, -1]
        if guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + cfg.guidance_scale * (cond - uncond)
        nxt = choose(logits, cfg, generator)
        codes.append(nxt)
        inputs = torch.cat([inputs, (torch.cat([nxt, nxt]) if guided else nxt)[:, None]], dim=1)
    return torch.stack(codes, dim=1)
