"""The Parti encoder-decoder: text encoder, image-token decoder with cross-attention, image-vocab head.

    init_parallel(tp=2); seed_everything(cfg.train.seed)
    model = PartiModel(cfg.model, select_kernels(cfg.kernels))
    loss = model.loss(text_ids, image_codes)            # text_ids [b, T] int64, image_codes [b, H*W]

The model knows nothing of parallelism beyond its megatron-core layers' TP group: pipeline stages,
activation checkpointing and the DeepSpeed engine are applied from outside (training/). Weights are
built on CPU from one master tensor per layer and sliced for this rank, so one seed gives the same
model at any TP size; build under `torch.device("meta")` with `meta=True` to count parameters
without allocating them.

Conventions: text ids padded with `text_pad_id` (padding is masked out of attention); the decoder
input is [BOS, codes[:-1]] with BOS = image_vocab_size; positions are learned, 1-D for text and
row + column embeddings for the 2-D image grid; logits are vocab-parallel ([seq, batch, V/tp]).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.utils import init_method_normal, scaled_init_method_normal

from model_parallel.kernels import Kernels, select_kernels
from model_parallel.layers import DecoderLayer, EncoderLayer, LayerCache, mark_sequence_parallel


def padded_vocab(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def megatron_config(sequence_parallel: bool = False, meta: bool = False,
                    dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        sequence_parallel=sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1,
        use_cpu_initialization=True,  # master weight sliced per rank: same model at any TP
        perform_initialization=not meta,
        params_dtype=dtype,
    )


class PartiModel(nn.Module):
    def __init__(self, cfg, kernels: Kernels | None = None, sequence_parallel: bool = False,
                 meta: bool = False):
        super().__init__()
        kernels = kernels or select_kernels()
        self.cfg = cfg
        mp = megatron_config(sequence_parallel, meta)
        self.sequence_parallel = mp.sequence_parallel
        init = init_method_normal(cfg.init_std)
        out_init = scaled_init_method_normal(cfg.init_std, cfg.encoder_layers + cfg.decoder_layers)
        d = cfg.hidden_size
        self.bos_id = cfg.image_vocab_size

        self.text_embed = VocabParallelEmbedding(
            padded_vocab(cfg.text_vocab_size, cfg.vocab_pad_multiple), d, init_method=init, config=mp)
        self.text_pos = nn.Embedding(cfg.text_seq_len, d)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, mp, kernels, init, out_init)
                                     for _ in range(cfg.encoder_layers))
        self.encoder_norm = kernels.layer_norm(d, cfg.layernorm_eps)

        self.image_embed = VocabParallelEmbedding(
            padded_vocab(cfg.image_vocab_size + 1, cfg.vocab_pad_multiple), d, init_method=init, config=mp)
        self.image_row_pos = nn.Embedding(cfg.image_grid, d)
        self.image_col_pos = nn.Embedding(cfg.image_grid, d)
        self.decoder = nn.ModuleList(DecoderLayer(cfg, mp, kernels, init, out_init)
                                     for _ in range(cfg.decoder_layers))
        self.decoder_norm = kernels.layer_norm(d, cfg.layernorm_eps)
        self.head = ColumnParallelLinear(d, cfg.image_vocab_size, config=mp, init_method=init,
                                         bias=False, gather_output=False)
        if self.sequence_parallel:
            mark_sequence_parallel(self.encoder_norm)
            mark_sequence_parallel(self.decoder_norm)
        if not meta:
            for emb in (self.text_pos, self.image_row_pos, self.image_col_pos):
                init(emb.weight)

    # ------------------------------------------------------------------------------------------
    def _to_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, d] embeddings -> [s, b, d] (sequence shard with SP), with embedding dropout."""
        x = x.transpose(0, 1).contiguous()
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x)
        if self.training and self.cfg.dropout > 0:
            rng = get_cuda_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext()
            with rng:
                x = F.dropout(x, self.cfg.dropout, training=True)
        return x

    def text_mask(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[b, T] ids -> [b, 1, 1, T] bool, True where a key may be attended to."""
        return (text_ids != self.cfg.text_pad_id)[:, None, None, :]

    def encode(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ids [b, T] -> (memory [T, b, d] (a sequence shard with SP), key mask [b, 1, 1, T])."""
        mask = self.text_mask(text_ids)
        positions = torch.arange(text_ids.shape[1], device=text_ids.device)
        x = self._to_hidden(self.text_embed(text_ids) + self.text_pos(positions))
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def image_positions(self, start: int, length: int, device) -> torch.Tensor:
        idx = torch.arange(start, start + length, device=device)
        return self.image_row_pos(idx // self.cfg.image_grid) + self.image_col_pos(idx % self.cfg.image_grid)

    def decode(self, image_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
               cache: list[LayerCache] | None = None, start: int = 0) -> torch.Tensor:
        """Decoder input tokens [b, n] at positions start.. -> vocab-parallel logits [n, b, V/tp]."""
        if start + image_in.shape[1] > self.cfg.image_seq_len:
            raise ValueError(f"image positions {start}..{start + image_in.shape[1] - 1} exceed the "
                             f"{self.cfg.image_seq_len} positions of the image grid")
        x = self._to_hidden(self.image_embed(image_in) + self.image_positions(start, image_in.shape[1], image_in.device))
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, memory_mask, cache[i] if cache is not None else None)
        return self.head(self.decoder_norm(x))[0]

    def decoder_input(self, image_codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: [BOS, codes[:-1]]."""
        bos = torch.full_like(image_codes[:, :1], self.bos_id)
        return torch.cat([bos, image_codes[:, :-1]], dim=1)

    def forward(self, text_ids: torch.Tensor, image_codes: torch.Tensor, return_loss: bool = False) -> torch.Tensor:
        """Vocab-parallel logits [H*W, b, V/tp] predicting each image code from the ones before it,
        or with `return_loss` their mean cross-entropy (vocab-parallel, exact at any TP)."""
        memory, mask = self.encode(text_ids)
        logits = self.decode(self.decoder_input(image_codes), memory, mask)
        if not return_loss:
            return logits
        return vocab_parallel_cross_entropy(logits.float(), image_codes.t().contiguous()).mean()

    def loss(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        return self(text_ids, image_codes, return_loss=True)

    # ------------------------------------------------------------------------------------------
    # Incremental decoding (sampling): cross-attention K/V once per prompt, self-attention K/V cached.

    def start_decoding(self, text_ids: torch.Tensor) -> tuple[list[LayerCache], torch.Tensor, torch.Tensor]:
        if self.sequence_parallel:
            raise RuntimeError("incremental decoding needs a model built without sequence parallelism")
        memory, mask = self.encode(text_ids)
        caches = []
        for layer in self.decoder:
            k, v = layer.cross_attn.fn.cross_kv(memory)
            caches.append(LayerCache(cross_k=k, cross_v=v))
        return caches, memory, mask

    def decode_step(self, tokens: torch.Tensor, caches: list[LayerCache], memory, mask) -> torch.Tensor:
        """Next-token logits for decoder inputs `tokens` [b, n] after the cached ones: [b, n, V] (gathered)."""
        logits = self.decode(tokens, memory, mask, cache=caches, start=caches[0].length)
        return gather_from_tensor_model_parallel_region(logits).transpose(0, 1)


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance: a deterministic per-sample choice of which captions become null.


def cfg_drop_mask(sample_index: torch.Tensor, seed: int, prob: float) -> torch.Tensor:
    """True for samples whose caption is dropped. A pure function of (seed, global sample index),
    so the same samples are dropped at any DP size and after a resume."""
    if prob <= 0:
        return torch.zeros_like(sample_index, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    salt = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    x = (sample_index.long() * 2654435761 + salt) % (2**32)
    x = (x ^ (x >> 15)) * 2246822519 % (2**32)
    x = x ^ (x >> 13)
    return (x % 1_000_003).double() / 1_000_003 < prob


def null_condition(text_ids: torch.Tensor, drop: torch.Tensor, pad_id: int, eos_id: int) -> torch.Tensor:
    """Replace the rows of `text_ids` selected by `drop` with the empty caption [EOS, PAD, ...]."""
    empty = torch.full_like(text_ids[0], pad_id)
    empty[0] = eos_id
    return torch.where(drop[:, None], empty[None, :], text_ids)


def gather_sequence(x: torch.Tensor) -> torch.Tensor:
    """Full sequence from a sequence-parallel shard (for inspection/tests)."""
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
