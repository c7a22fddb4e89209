"""The Parti encoder-decoder: text encoder, image-token decoder with cross-attention, image-vocab head.

    init_parallel(tp=2); seed_everything(cfg.train.seed)
    model = PartiModel(cfg.model, select_kernels(cfg.kernels))
    loss = model.loss(text_ids, image_codes)            # text_ids [b, T] int64, image_codes [b, H*W]

The model knows nothing of parallelism beyond its megatron-core layers' TP group: pipeline stages,
activation checkpointing and the DeepSpeed engine are applied from outside (training/). Each rank
draws only its shard of every split weight, as a slice of a whole that depends on the seed alone
(model_parallel/init.py), so one seed gives the same model at any TP size; megatron-core places its
layers' weights on the current GPU (on CPU without one). Build under `torch.device("meta")` with
`meta=True` to count parameters without allocating them.

Conventions: text ids padded with `text_pad_id` (padding is masked out of attention); the decoder
input is [BOS, codes[:-1]] with BOS = image_vocab_size; positions are learned, 1-D for text and
row + column embeddings for the 2-D image grid; logits are vocab-parallel ([seq, batch, V/tp]).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)

from model_parallel.init import InitKeys, ShardedNormalInit, ensure_model_parallel_rng
from model_parallel.kernels import Kernels, select_kernels
from model_parallel.layers import DecoderLayer, EncoderLayer, LayerCache, mark_sequence_parallel, static_caches


def text_mask(text_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[b, T] ids -> [b, 1, 1, T] bool, True where a key may be attended to."""
    return (text_ids != pad_id)[:, None, None, :]


def decoder_input(image_codes: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Teacher forcing: [BOS, codes[:-1]]."""
    bos = torch.full_like(image_codes[:, :1], bos_id)
    return torch.cat([bos, image_codes[:, :-1]], dim=1)


def padded_vocab(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def megatron_config(sequence_parallel: bool = False, meta: bool = False,
                    dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    """Initialisation: megatron-core allocates only this rank's shard of each split weight (on
    torch.cuda.current_device(), "cpu" without a GPU) and fills it with the init method, which draws
    just that shard (model_parallel/init.py). With `meta` nothing is initialised and the CPU-init path
    allocates without naming a device, so that `torch.device("meta")` applies."""
    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        sequence_parallel=sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1,
        use_cpu_initialization=meta,
        perform_initialization=not meta,
        params_dtype=dtype,
    )


def _to_hidden(x: torch.Tensor, dropout: float, sequence_parallel: bool, training: bool) -> torch.Tensor:
    """[b, s, d] embeddings -> [s, b, d] (this rank's sequence shard with SP), with embedding dropout."""
    x = x.transpose(0, 1).contiguous()
    if sequence_parallel:
        x = scatter_to_sequence_parallel_region(x)
    if training and dropout > 0:
        rng = get_cuda_rng_tracker().fork() if sequence_parallel else contextlib.nullcontext()
        with rng:
            x = F.dropout(x, dropout, training=True)
    return x


class PositionEmbedding(nn.Embedding):
    """A learned position table initialised by `init` inside its own constructor: deepspeed.zero.Init
    partitions a module's parameters as soon as its constructor returns, so an initialisation applied
    afterwards by the parent would write to an empty placeholder (and leave torch's N(0, 1) defaults)."""

    def __init__(self, positions: int, hidden: int, init, perform_initialization: bool):
        super().__init__(positions, hidden)
        if perform_initialization:
            init(self.weight)


class TextEmbedding(nn.Module):
    """Caption ids [b, T] -> token + position embeddings [T, b, d]."""

    def __init__(self, cfg, mp: ModelParallelConfig, kernels: Kernels, init, out_init):
        super().__init__()
        self.cfg, self.sequence_parallel = cfg, mp.sequence_parallel
        self.embed = VocabParallelEmbedding(padded_vocab(cfg.text_vocab_size, cfg.vocab_pad_multiple),
                                            cfg.hidden_size, init_method=init, config=mp)
        self.pos = PositionEmbedding(cfg.text_seq_len, cfg.hidden_size, init, mp.perform_initialization)

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(text_ids.shape[1], device=text_ids.device)
        return _to_hidden(self.embed(text_ids) + self.pos(positions), self.cfg.dropout,
                          self.sequence_parallel, self.training)


class ImageEmbedding(nn.Module):
    """Decoder input tokens [b, n] at grid positions start.. -> embeddings with row + column positions."""

    def __init__(self, cfg, mp: ModelParallelConfig, kernels: Kernels, init, out_init):
        super().__init__()
        self.cfg, self.sequence_parallel = cfg, mp.sequence_parallel
        self.embed = VocabParallelEmbedding(padded_vocab(cfg.image_vocab_size + 1, cfg.vocab_pad_multiple),
                                            cfg.hidden_size, init_method=init, config=mp)
        self.row_pos = PositionEmbedding(cfg.image_grid, cfg.hidden_size, init, mp.perform_initialization)
        self.col_pos = PositionEmbedding(cfg.image_grid, cfg.hidden_size, init, mp.perform_initialization)

    def forward(self, tokens: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """`start`: an int, or an int64 [1] device tensor (static-cache decoding: no host sync, so the
        bounds are not checked here; the sampler never passes the end of the grid)."""
        if not torch.is_tensor(start) and start + tokens.shape[1] > self.cfg.image_seq_len:
            raise ValueError(f"image positions {start}..{start + tokens.shape[1] - 1} exceed the "
                             f"{self.cfg.image_seq_len} positions of the image grid")
        idx = start + torch.arange(tokens.shape[1], device=tokens.device)
        pos = self.row_pos(idx // self.cfg.image_grid) + self.col_pos(idx % self.cfg.image_grid)
        return _to_hidden(self.embed(tokens) + pos, self.cfg.dropout, self.sequence_parallel, self.training)


class FinalNorm(nn.Module):
    """The layer norm that closes the encoder."""

    def __init__(self, cfg, mp: ModelParallelConfig, kernels: Kernels, init, out_init):
        super().__init__()
        self.norm = kernels.layer_norm(cfg.hidden_size, cfg.layernorm_eps)
        if mp.sequence_parallel:
            mark_sequence_parallel(self.norm)

    def forward(self, x):
        return self.norm(x)


class OutputHead(nn.Module):
    """Decoder final norm and the projection to vocab-parallel image-code logits [n, b, V/tp]."""

    def __init__(self, cfg, mp: ModelParallelConfig, kernels: Kernels, init, out_init):
        super().__init__()
        self.norm = FinalNorm(cfg, mp, kernels, init, out_init)
        self.proj = ColumnParallelLinear(cfg.hidden_size, cfg.image_vocab_size, config=mp, init_method=init,
                                         bias=False, gather_output=False)

    def forward(self, x):
        return self.proj(self.norm(x))[0]


def model_pieces(cfg, kernels: Kernels | None = None, sequence_parallel: bool = False, meta: bool = False):
    """The model as an ordered list of (class, constructor args): the same list builds PartiModel and
    the pipeline stages (model_parallel/pipeline.py). Piece k is built right after
    torch.manual_seed(init_seed + k), so its weights do not depend on which pieces a rank builds (the
    init methods key each weight by that seed: model_parallel/init.py). Output projections (`out_init`)
    get megatron's scaled std, init_std / sqrt(2 * layers)."""
    mp = megatron_config(sequence_parallel, meta)
    if mp.perform_initialization:
        ensure_model_parallel_rng()
    keys = InitKeys()
    args = (cfg, mp, kernels or select_kernels(), ShardedNormalInit(cfg.init_std, keys),
            ShardedNormalInit(cfg.init_std / math.sqrt(2.0 * (cfg.encoder_layers + cfg.decoder_layers)), keys))
    return ([(TextEmbedding, args)] + [(EncoderLayer, args)] * cfg.encoder_layers + [(FinalNorm, args)]
            + [(ImageEmbedding, args)] + [(DecoderLayer, args)] * cfg.decoder_layers + [(OutputHead, args)])


def piece_names(cfg) -> list[str]:
    """PartiModel's attribute path of each piece of `model_pieces`: the layout-independent parameter
    names that checkpoints use (a pipeline stage's layer k holds piece k)."""
    return (["text_embedding"] + [f"encoder.{i}" for i in range(cfg.encoder_layers)]
            + ["encoder_norm", "image_embedding"] + [f"decoder.{i}" for i in range(cfg.decoder_layers)] + ["head"])


class PartiModel(nn.Module):
    def __init__(self, cfg, kernels: Kernels | None = None, sequence_parallel: bool = False,
                 meta: bool = False, init_seed: int = 1234):
        super().__init__()
        self.cfg = cfg
        pieces = model_pieces(cfg, kernels, sequence_parallel, meta)
        self.sequence_parallel = pieces[0][1][1].sequence_parallel
        self.bos_id = cfg.image_vocab_size
        built = []
        with torch.random.fork_rng(devices=[]):
            for k, (cls, args) in enumerate(pieces):
                torch.manual_seed(init_seed + k)
                built.append(cls(*args))
        e = cfg.encoder_layers
        self.text_embedding = built[0]
        self.encoder = nn.ModuleList(built[1:1 + e])
        self.encoder_norm = built[1 + e]
        self.image_embedding = built[2 + e]
        self.decoder = nn.ModuleList(built[3 + e:-1])
        self.head = built[-1]

    # ------------------------------------------------------------------------------------------
    def text_mask(self, text_ids: torch.Tensor) -> torch.Tensor:
        return text_mask(text_ids, self.cfg.text_pad_id)

    def encode(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ids [b, T] -> (memory [T, b, d] (a sequence shard with SP), key mask [b, 1, 1, T])."""
        mask = self.text_mask(text_ids)
        x = self.text_embedding(text_ids)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def decode(self, image_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
               cache: list[LayerCache] | None = None, start: int = 0) -> torch.Tensor:
        """Decoder input tokens [b, n] at positions start.. -> vocab-parallel logits [n, b, V/tp]."""
        x = self.image_embedding(image_in, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, memory_mask, cache[i] if cache is not None else None)
        return self.head(x)

    def decoder_input(self, image_codes: torch.Tensor) -> torch.Tensor:
        return decoder_input(image_codes, self.bos_id)

    def forward(self, text_ids: torch.Tensor, image_codes: torch.Tensor, return_loss: bool = False) -> torch.Tensor:
        """Vocab-parallel logits [H*W, b, V/tp] predicting each image code from the ones before it,
        or with `return_loss` their mean cross-entropy (vocab-parallel, exact at any TP)."""
        memory, mask = self.encode(text_ids)
        logits = self.decode(self.decoder_input(image_codes), memory, mask)
        if not return_loss:
            return logits
        return image_code_loss(logits, image_codes)

    def loss(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        return self(text_ids, image_codes, return_loss=True)

    # ------------------------------------------------------------------------------------------
    # Incremental decoding (sampling): cross-attention K/V once per prompt, self-attention K/V cached.

    def start_decoding(self, text_ids: torch.Tensor, static: bool = False
                       ) -> tuple[list[LayerCache], torch.Tensor, torch.Tensor]:
        """Encode the captions and precompute every decoder layer's cross-attention K/V. With `static`,
        the self-attention caches are preallocated to the whole image with a device-side write position
        (layers.StaticPosition), so every decode_step has the same shapes: what a CUDA graph needs."""
        if self.sequence_parallel:
            raise RuntimeError("incremental decoding needs a model built without sequence parallelism")
        memory, mask = self.encode(text_ids)
        cross = [layer.cross_attn.fn.cross_kv(memory) for layer in self.decoder]
        if static:
            return static_caches(cross, self.cfg.image_seq_len), memory, mask
        return [LayerCache(cross_k=k, cross_v=v) for k, v in cross], memory, mask

    def decode_step(self, tokens: torch.Tensor, caches: list[LayerCache], memory, mask) -> torch.Tensor:
        """Next-token logits for decoder inputs `tokens` [b, n] after the cached ones: [b, n, V] (gathered)."""
        position = caches[0].static
        if position is None:
            logits = self.decode(tokens, memory, mask, cache=caches, start=caches[0].length)
        else:
            position.begin(tokens.shape[1])
            logits = self.decode(tokens, memory, mask, cache=caches, start=position.next)
            position.end(tokens.shape[1])
        return gather_from_tensor_model_parallel_region(logits).transpose(0, 1)


def image_code_loss(logits: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of vocab-parallel logits [n, b, V/tp] against codes [b, n]."""
    return vocab_parallel_cross_entropy(logits.float(), image_codes.t().contiguous()).mean()


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance: a deterministic per-sample choice of which captions become null.


def caption_drop_mask(sample_index: torch.Tensor, seed: int, prob: float) -> torch.Tensor:
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

