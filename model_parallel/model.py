"""The text-to-image transformer: Parti's encoder-decoder, or a DALL-E-style decoder-only stream.

    init_parallel(tp=2); seed_everything(cfg.train.seed)
    model = PartiModel(cfg.model, select_kernels(cfg.kernels))
    loss = model.loss(text_ids, image_codes)            # text_ids [b, T] int64, image_codes [b, H*W]

model.arch=encoder_decoder (Parti): a text encoder, an image-token decoder that cross-attends to it, an
image-vocab head. model.arch=decoder_only (DALL-E): one causal stream [caption (T tokens, padding included),
BOS, codes[:-1]] through decoder layers without cross-attention; the same embeddings, layers and head, plus
a text head when model.text_loss_weight > 0. Both give image logits for the same inputs and take the same
incremental-decoding calls (the decoder-only caption is prefilled into the KV cache), so sampling,
evaluation, checkpoints and export treat them alike.

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

import dataclasses
import functools
import math

import torch
import torch.nn as nn
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)

from model_parallel.attention_patterns import layer_pattern
from model_parallel.config import ModelConfig
from model_parallel.cross_entropy import plain_cross_entropy
from model_parallel.init import InitKeys, ShardedNormalInit, ensure_model_parallel_rng
from model_parallel.kernels import Kernels, select_kernels
from model_parallel.layers import (
    DecoderLayer,
    EncoderLayer,
    LayerCache,
    PieceContext,
    SampleDropout,
    key_dropout_sites,
    mark_sequence_parallel,
    restart_static_caches,
    static_caches,
)
from model_parallel.state import tensor_parallel_group


def text_mask(text_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[b, T] ids -> [b, 1, 1, T] bool, True where a key may be attended to."""
    return (text_ids != pad_id)[:, None, None, :]


def decoder_input(image_codes: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Teacher forcing: [BOS, codes[:-1]]."""
    bos = torch.full_like(image_codes[:, :1], bos_id)
    return torch.cat([bos, image_codes[:, :-1]], dim=1)


def padded_vocab(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def megatron_config(tp_size: int, sequence_parallel: bool = False, meta: bool = False,
                    dtype: torch.dtype = torch.float32, initialize: bool = True) -> ModelParallelConfig:
    """Initialisation: megatron-core allocates only this rank's shard of each split weight (on
    torch.cuda.current_device(), "cpu" without a GPU) and fills it with the init method, which draws
    just that shard (model_parallel/init.py). With `meta` nothing is initialised and the CPU-init path
    allocates without naming a device, so that `torch.device("meta")` applies. Without `initialize` the
    weights are allocated and left as they are (a checkpoint's load fills them)."""
    if sequence_parallel and tp_size == 1:
        raise ValueError("sequence parallelism needs a tensor-parallel group of 2 or more ranks "
                         "(parallel.sequence_parallel=true needs parallel.tp > 1)")
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=meta,
        perform_initialization=initialize and not meta,
        params_dtype=dtype,
    )


def _to_hidden(x: torch.Tensor, sequence_parallel: bool, tp_group) -> torch.Tensor:
    """[b, s, d] embeddings -> [s, b, d] (this rank's sequence shard with SP)."""
    x = x.transpose(0, 1).contiguous()
    if sequence_parallel:
        x = scatter_to_sequence_parallel_region(x, group=tp_group)
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

    def __init__(self, ctx: PieceContext):
        super().__init__()
        cfg = ctx.cfg
        self.cfg, self.sequence_parallel, self.tp_group = cfg, ctx.mp.sequence_parallel, ctx.tp_group
        self.embed = VocabParallelEmbedding(padded_vocab(cfg.text_vocab_size, cfg.vocab_pad_multiple),
                                            cfg.hidden_size, init_method=ctx.init, config=ctx.mp, tp_group=ctx.tp_group)
        self.pos = PositionEmbedding(cfg.text_seq_len, cfg.hidden_size, ctx.init, ctx.mp.perform_initialization)
        self.drop = SampleDropout(cfg.dropout, ctx.mp.sequence_parallel, ctx.tp_group, ctx.kernels.keep_mask)

    def tokens(self, text_ids: torch.Tensor) -> torch.Tensor:
        """[b, T] ids -> [b, T, d] token + position embeddings."""
        if text_ids.shape[1] > self.cfg.text_seq_len:  # (else the position table's lookup: "index out of range")
            raise ValueError(f"captions of {text_ids.shape[1]} tokens exceed the model.text_seq_len="
                             f"{self.cfg.text_seq_len} positions of the text position embedding")
        return self.embed(text_ids) + self.pos(torch.arange(text_ids.shape[1], device=text_ids.device))

    def forward(self, text_ids: torch.Tensor, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.drop(_to_hidden(self.tokens(text_ids), self.sequence_parallel, self.tp_group), sample_index)


class ImageEmbedding(nn.Module):
    """Decoder input tokens [b, n] at grid positions start.. -> embeddings with row + column positions."""

    def __init__(self, ctx: PieceContext):
        super().__init__()
        cfg, init, perform = ctx.cfg, ctx.init, ctx.mp.perform_initialization
        self.cfg, self.sequence_parallel, self.tp_group = cfg, ctx.mp.sequence_parallel, ctx.tp_group
        self.embed = VocabParallelEmbedding(padded_vocab(cfg.image_vocab_size + 1, cfg.vocab_pad_multiple),
                                            cfg.hidden_size, init_method=init, config=ctx.mp, tp_group=ctx.tp_group)
        self.row_pos = PositionEmbedding(cfg.image_grid, cfg.hidden_size, init, perform)
        self.col_pos = PositionEmbedding(cfg.image_grid, cfg.hidden_size, init, perform)
        self.drop = SampleDropout(cfg.dropout, ctx.mp.sequence_parallel, ctx.tp_group, ctx.kernels.keep_mask)

    def tokens(self, tokens: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """[b, n] decoder inputs at grid positions start.. -> [b, n, d]. `start`: an int, or an int64 [1]
        device tensor (static-cache decoding: no host sync, so the bounds are not checked here; the
        sampler never passes the end of the grid)."""
        if not torch.is_tensor(start) and start + tokens.shape[1] > self.cfg.image_seq_len:
            raise ValueError(f"image positions {start}..{start + tokens.shape[1] - 1} exceed the "
                             f"{self.cfg.image_seq_len} positions of the image grid")
        idx = start + torch.arange(tokens.shape[1], device=tokens.device)
        return self.embed(tokens) + self.row_pos(idx // self.cfg.image_grid) + self.col_pos(idx % self.cfg.image_grid)

    def forward(self, tokens: torch.Tensor, start: int | torch.Tensor = 0,
                sample_index: torch.Tensor | None = None) -> torch.Tensor:
        x = _to_hidden(self.tokens(tokens, start), self.sequence_parallel, self.tp_group)
        return self.drop(x, sample_index)


class StreamEmbedding(nn.Module):
    """Decoder-only: caption ids [b, T] and/or image decoder inputs [b, n] (grid positions start..) -> one
    stream [T + n, b, d], the caption first; each part with its own token table and positions (1-D for the
    caption, row + column for the grid). The parts are joined before the sequence-parallel scatter and the
    dropout, so a sequence shard and a dropout mask are those of the whole stream. (The parts' own dropout
    sites stay unused: they keep the parts' modules those of the encoder-decoder.)"""

    def __init__(self, ctx: PieceContext):
        super().__init__()
        self.text, self.image = TextEmbedding(ctx), ImageEmbedding(ctx)
        self.sequence_parallel, self.tp_group = ctx.mp.sequence_parallel, ctx.tp_group
        self.drop = SampleDropout(ctx.cfg.dropout, ctx.mp.sequence_parallel, ctx.tp_group, ctx.kernels.keep_mask)

    def forward(self, text_ids: torch.Tensor | None, image_in: torch.Tensor | None, start: int | torch.Tensor = 0,
                sample_index: torch.Tensor | None = None) -> torch.Tensor:
        parts = ([self.text.tokens(text_ids)] if text_ids is not None else []) + \
                ([self.image.tokens(image_in, start)] if image_in is not None else [])
        x = _to_hidden(torch.cat(parts, dim=1), self.sequence_parallel, self.tp_group)
        return self.drop(x, sample_index)


class FinalNorm(nn.Module):
    """The layer norm that closes the encoder."""

    def __init__(self, ctx: PieceContext):
        super().__init__()
        self.norm = ctx.kernels.layer_norm(ctx.cfg.hidden_size, ctx.cfg.layernorm_eps)
        if ctx.mp.sequence_parallel:
            mark_sequence_parallel(self.norm)

    def forward(self, x):
        return self.norm(x)


def loss_cross_entropy(ctx: PieceContext):
    """The loss's (logits, target) -> per-token cross-entropy: kernels.cross_entropy over the piece's TP group."""
    return functools.partial(ctx.kernels.cross_entropy, tp_group=ctx.tp_group)


class OutputHead(nn.Module):
    """Decoder final norm and the projection to vocab-parallel image-code logits [n, b, V/tp]; decoder-only
    with model.text_loss_weight > 0, a second projection to next-caption-token logits."""

    def __init__(self, ctx: PieceContext):
        super().__init__()
        cfg = ctx.cfg
        self.norm = FinalNorm(ctx)
        self.sequence_parallel, self.tp_group, self.prefix = ctx.mp.sequence_parallel, ctx.tp_group, cfg.prefix_len
        # Under sequence parallelism the positions are gathered once, in `_whole`, so that each projection sees
        # only the positions it is wanted for (the image head the image's; the text head the caption's but the
        # last, where the whole stream is 9x as many). So the projections are built without SP's own gather and
        # without the all-reduce of their input gradient: `_whole` reduce-scatters it back to the shards, as an
        # SP column-parallel layer does within itself.
        mp = dataclasses.replace(ctx.mp, sequence_parallel=False)
        column = dict(config=mp, init_method=ctx.init, bias=False, gather_output=False, tp_group=ctx.tp_group,
                      disable_grad_reduce=ctx.mp.sequence_parallel)
        self.proj = ColumnParallelLinear(cfg.hidden_size, cfg.image_vocab_size, **column)
        if cfg.decoder_only and cfg.text_loss_weight > 0:
            self.text_proj = ColumnParallelLinear(cfg.hidden_size, cfg.text_vocab_size, **column)
        self.cross_entropy = loss_cross_entropy(ctx)

    def forward(self, x, prefix: int = 0):
        """Image logits of hidden states [s, b, d] whose first `prefix` positions are the caption."""
        return self.proj(self._whole(x)[prefix:])[0]

    def stream_logits(self, x) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder-only training on the whole stream: (image logits [N, b, V/tp], logits [T-1, b, Vt/tp] of
        caption tokens 1.. from the positions before them, or None without a text loss)."""
        h = self._whole(x)
        image = self.proj(h[self.prefix:])[0]
        text = self.text_proj(h[:self.prefix - 1])[0] if hasattr(self, "text_proj") else None
        return image, text

    def _whole(self, x):
        """The final norm of hidden states [s, b, d], every position of them (under SP, the shards gathered)."""
        h = self.norm(x)
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        return h


def piece_classes(cfg: ModelConfig) -> list[tuple[str, type[nn.Module]]]:
    """The model's pieces in order, each with its attribute path in PartiModel: the one statement of the
    order, which builds PartiModel and the pipeline stages (model_parallel/pipeline.py: stage layer k is
    piece k) and names parameters in checkpoints the same at any layout."""
    if cfg.decoder_only:
        return ([("embedding", StreamEmbedding)] + [(f"decoder.{i}", DecoderLayer) for i in range(cfg.decoder_layers)]
                + [("head", OutputHead)])
    return ([("text_embedding", TextEmbedding)] + [(f"encoder.{i}", EncoderLayer) for i in range(cfg.encoder_layers)]
            + [("encoder_norm", FinalNorm), ("image_embedding", ImageEmbedding)]
            + [(f"decoder.{i}", DecoderLayer) for i in range(cfg.decoder_layers)] + [("head", OutputHead)])


def piece_names(cfg: ModelConfig) -> list[str]:
    return [name for name, _ in piece_classes(cfg)]


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """megatron-core marks a tensor-parallel weight (tensor_model_parallel, partition_dim, partition_stride)
    in its initialisation only, which a meta build or one without `initialize` skips: mark them as it would
    (column-parallel and vocab-parallel weights split rows, row-parallel ones columns; stride 1)."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def piece_context(cfg: ModelConfig, kernels: Kernels | None = None, sequence_parallel: bool = False,
                  meta: bool = False, tp_group=None, initialize: bool = True) -> PieceContext:
    """What each piece is built from. `tp_group`: the tensor-parallel group (default: this rank's, from
    model_parallel.state). Output projections (`out_init`) get megatron's scaled std,
    init_std / sqrt(2 * layers); the init methods key each weight by the seed its piece is built after
    (model_parallel/init.py), so a piece's weights do not depend on which pieces a rank builds."""
    tp_group = tp_group if tp_group is not None else tensor_parallel_group()
    mp = megatron_config(tp_group.size(), sequence_parallel, meta, initialize=initialize)
    if mp.perform_initialization:
        ensure_model_parallel_rng(tp_group.rank())
    keys = InitKeys()
    out_std = cfg.init_std / math.sqrt(2.0 * (cfg.encoder_layers + cfg.decoder_layers))
    return PieceContext(cfg, mp, kernels or select_kernels(), ShardedNormalInit(cfg.init_std, keys, tp_group),
                        ShardedNormalInit(out_std, keys, tp_group), tp_group)


def place_piece(piece: nn.Module, cfg: ModelConfig, init_seed: int, k: int) -> None:
    """What piece k learns of its place once built, by PartiModel or as a pipeline stage's layer k: the keys of
    its dropout sites (init_seed, k, site) and, for decoder layer i, its self-attention pattern (the layers
    are one class: model.attention_pattern varies the mask with the depth)."""
    key_dropout_sites(piece, init_seed, k)
    stack, _, index = piece_names(cfg)[k].partition(".")
    if stack == "decoder":
        piece.self_attn.fn.pattern = layer_pattern(cfg, int(index))


def build_pieces(module: nn.Module, ctx: PieceContext, init_seed: int, keep=lambda name: True) -> None:
    """Build the model's pieces that `keep` accepts onto `module` under their names (stacks as ModuleLists),
    piece k right after torch.manual_seed(init_seed + k), its dropout sites keyed by (init_seed, k): the same
    weights and masks whatever subset is built (PartiModel builds all; training.text_encoder the encoder)."""
    # (torch.manual_seed seeds the GPUs' generators too: the caller's CUDA state comes back as its CPU state does)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for k, (name, cls) in enumerate(piece_classes(ctx.cfg)):
            if not keep(name):
                continue
            torch.manual_seed(init_seed + k)
            piece = cls(ctx)
            place_piece(piece, ctx.cfg, init_seed, k)
            stack, _, index = name.partition(".")
            if not index:
                setattr(module, name, piece)
            else:
                if index == "0":  # (registered where the first layer comes: parameter order as built)
                    setattr(module, stack, nn.ModuleList())
                getattr(module, stack).append(piece)


def move_buffers(model: nn.Module, device) -> None:
    """Put the model's buffers (dropout keys, attention-pattern numbers: made on the CPU, not saved) on
    `device`, for a model whose parameters got there another way than .to(device): zero.Init's placement,
    or load_exported's assignment."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))


class PartiModel(nn.Module):
    """Piece k is built right after torch.manual_seed(init_seed + k) (as DeepSpeed's pipeline builds its
    layers with seed_layers), so one seed gives the same weights at any TP/PP layout. Its dropout sites
    are keyed by (init_seed, k, site) (layers.key_dropout_sites): given each sample's position in the run's
    sample stream (`sample_index`), training draws the same dropout masks at any DP/TP/PP layout."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None, sequence_parallel: bool = False,
                 meta: bool = False, init_seed: int = 1234, tp_group=None, initialize: bool = True):
        super().__init__()
        self.cfg = cfg
        ctx = piece_context(cfg, kernels, sequence_parallel, meta, tp_group, initialize)
        self.sequence_parallel, self.tp_group = ctx.mp.sequence_parallel, ctx.tp_group
        self.bos_id = cfg.image_vocab_size
        build_pieces(self, ctx, init_seed)
        if not ctx.mp.perform_initialization:
            mark_tensor_parallel_weights(self)

    # ------------------------------------------------------------------------------------------
    def text_mask(self, text_ids: torch.Tensor) -> torch.Tensor:
        return text_mask(text_ids, self.cfg.text_pad_id)

    def encode(self, text_ids: torch.Tensor, sample_index: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text ids [b, T] -> (memory [T, b, d] (a sequence shard with SP), key mask [b, 1, 1, T]). Decoder-only:
        (the caption's part of the stream [T, b, d], None): what `decode` continues."""
        if self.cfg.decoder_only:
            return self.embedding(text_ids, None, sample_index=sample_index), None
        mask = self.text_mask(text_ids)
        x = self.text_embedding(text_ids, sample_index)
        for layer in self.encoder:
            x = layer(x, mask, sample_index)
        return self.encoder_norm(x), mask

    def decode(self, image_in: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor | None,
               cache: list[LayerCache] | None = None, start: int | torch.Tensor = 0,
               sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input tokens [b, n] at positions start.. -> vocab-parallel logits [n, b, V/tp]. Decoder-only:
        `memory` (encode's) is put before them in the stream, or is None when `cache` holds it already."""
        layers = self.decoder
        if not self.cfg.decoder_only:
            x = self.image_embedding(image_in, start, sample_index)
            for i, layer in enumerate(layers):
                x = layer(x, memory, memory_mask, cache[i] if cache is not None else None, sample_index)
            return self.head(x)
        x, prefix = self.embedding(None, image_in, start, sample_index), 0
        if memory is not None:
            x, prefix = torch.cat([memory, x]), memory.shape[0]
        for i, layer in enumerate(layers):
            x = layer(x, cache=cache[i] if cache is not None else None, sample_index=sample_index)
        return self.head(x, prefix)

    def decoder_input(self, image_codes: torch.Tensor) -> torch.Tensor:
        return decoder_input(image_codes, self.bos_id)

    def forward(self, text_ids: torch.Tensor, image_codes: torch.Tensor, return_loss: bool = False,
                sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """Vocab-parallel logits [H*W, b, V/tp] predicting each image code from the ones before it,
        or with `return_loss` their mean cross-entropy (vocab-parallel, exact at any TP; decoder-only with
        model.text_loss_weight, mixed with the caption's: stream_loss).
        `sample_index` (int64 [b]): each sample's position in the run's sample stream (training's
        engine.MicroBatch.positions), which keys its dropout masks; None: dropout draws from torch's
        generators (reproducible at the same layout only). Unused in eval mode."""
        image_in = self.decoder_input(image_codes)
        if self.cfg.decoder_only:
            self._check_caption_length(text_ids)
            x = self.embedding(text_ids, image_in, sample_index=sample_index)
            for layer in self.decoder:
                x = layer(x, sample_index=sample_index)
            logits, text_logits = self.head.stream_logits(x)
            if not return_loss:
                return logits
            return stream_loss(self.cfg, logits, image_codes, text_logits, text_ids, self.head.cross_entropy)
        memory, mask = self.encode(text_ids, sample_index)
        logits = self.decode(image_in, memory, mask, sample_index=sample_index)
        return image_code_loss(logits, image_codes, self.head.cross_entropy) if return_loss else logits

    def _check_caption_length(self, text_ids: torch.Tensor) -> None:
        """A decoder-only stream is the caption's model.text_seq_len positions, then the image's: the output
        head, the attention pattern and decode_step (its static cache's write position) all place the image
        there, so a shorter caption would shift every image position."""
        if text_ids.shape[1] != self.cfg.text_seq_len:
            raise ValueError(f"a decoder-only model takes captions of model.text_seq_len={self.cfg.text_seq_len} "
                             f"tokens (padded with text_pad_id), not {text_ids.shape[1]}")

    def loss(self, text_ids: torch.Tensor, image_codes: torch.Tensor,
             sample_index: torch.Tensor | None = None) -> torch.Tensor:
        return self(text_ids, image_codes, return_loss=True, sample_index=sample_index)

    # ------------------------------------------------------------------------------------------
    # Incremental decoding (sampling): cross-attention K/V once per prompt (encoder-decoder) or the
    # caption's K/V prefilled (decoder-only); self-attention K/V of the image tokens cached as they come.

    def start_decoding(self, text_ids: torch.Tensor, static: bool = False, into: list[LayerCache] | None = None
                       ) -> tuple[list[LayerCache], torch.Tensor | None, torch.Tensor | None]:
        """Encode the captions and precompute every decoder layer's cross-attention K/V (decoder-only: run
        the caption through the layers into their self-attention caches). With `static`, the
        self-attention caches are preallocated to the whole stream with a device-side write position
        (layers.StaticPosition), so every decode_step has the same shapes: what a CUDA graph needs. `into`:
        static caches of an earlier start with captions of this shape, restarted in place for these (a CUDA
        graph's buffers; no second set of caches allocated)."""
        if self.sequence_parallel:
            raise RuntimeError("incremental decoding needs a model built without sequence parallelism")
        if self.cfg.decoder_only:
            self._check_caption_length(text_ids)
        memory, mask = self.encode(text_ids)
        if self.cfg.decoder_only:
            return self._prefill(memory, static, into), None, None
        cross = [layer.cross_attn.fn.cross_kv(memory) for layer in self.decoder]
        if into is not None:
            return restart_static_caches(into, cross), memory, mask
        if static:
            return static_caches(cross[0][0], len(cross), self.cfg.stream_len, cross), memory, mask
        return [LayerCache(cross_k=k, cross_v=v) for k, v in cross], memory, mask

    def _prefill(self, caption: torch.Tensor, static: bool, into: list[LayerCache] | None = None) -> list[LayerCache]:
        """Decoder-only: caches holding the caption's keys and values ([T, b, d] stream embeddings); `into`:
        static caches to restart and fill instead of new ones."""
        if into is not None:
            caches = restart_static_caches(into)
        elif static:
            heads = self.cfg.num_heads // self.tp_group.size()
            like = caption.new_empty(caption.shape[1], heads, 0, self.cfg.head_dim)
            caches = static_caches(like, len(self.decoder), self.cfg.stream_len)
        else:
            caches = [LayerCache() for _ in self.decoder]
        position, x = caches[0].static, caption
        if position is not None:
            position.begin(caption.shape[0])
        for layer, cache in zip(self.decoder, caches):
            x = layer(x, cache=cache)
        if position is not None:
            position.end(caption.shape[0])
        return caches

    def decode_step(self, tokens: torch.Tensor, caches: list[LayerCache], memory, mask) -> torch.Tensor:
        """Next-token logits for decoder inputs `tokens` [b, n] after the cached ones: [b, n, V] (gathered)."""
        position, prefix = caches[0].static, self.cfg.prefix_len
        if position is None:
            logits = self.decode(tokens, memory, mask, cache=caches, start=caches[0].length - prefix)
        else:
            position.begin(tokens.shape[1])
            logits = self.decode(tokens, memory, mask, cache=caches, start=position.next - prefix)
            position.end(tokens.shape[1])
        return gather_from_tensor_model_parallel_region(logits, group=self.tp_group).transpose(0, 1)


def image_code_loss(logits: torch.Tensor, image_codes: torch.Tensor, cross_entropy=plain_cross_entropy) -> torch.Tensor:
    """Mean cross-entropy of vocab-parallel logits [n, b, V/tp] against codes [b, n]; `cross_entropy`: a
    (logits, target) -> per-token loss function (OutputHead.cross_entropy: kernels.cross_entropy over the model's
    TP group)."""
    return cross_entropy(logits, image_codes.t().contiguous()).mean()


def stream_loss(cfg: ModelConfig, logits: torch.Tensor, image_codes: torch.Tensor,
                text_logits: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                cross_entropy=plain_cross_entropy) -> torch.Tensor:
    """Decoder-only: (1 - w) x image_code_loss + w x the mean cross-entropy of caption tokens 1.. that are not
    padding (w = model.text_loss_weight, DALL-E's 1/8; the mean is over this micro-batch's caption tokens,
    as Megatron normalises by a micro-batch's tokens). Without text logits, image_code_loss."""
    loss = image_code_loss(logits, image_codes, cross_entropy)
    if text_logits is None:
        return loss
    targets = text_ids[:, 1:].t().contiguous()
    per_token = cross_entropy(text_logits, targets)
    real = (targets != cfg.text_pad_id).float()
    text = (per_token * real).sum() / real.sum().clamp(min=1)
    return (1 - cfg.text_loss_weight) * loss + cfg.text_loss_weight * text


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance: a deterministic per-sample choice of which captions become null.


def caption_drop_mask(sample_index: torch.Tensor, seed: int, prob: float) -> torch.Tensor:
    """True for samples whose caption is dropped. A pure function of (seed, global sample index),
    so the same samples are dropped at any DP size and after a resume. The index's high 32 bits are mixed
    in (zero below 2^32, where the choices are those of the low bits alone), so the pattern does not repeat
    every 2^32 samples (524k steps at a batch of 8192)."""
    if prob <= 0:
        return torch.zeros_like(sample_index, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    salt = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    index = sample_index.long()
    x = ((index * 2654435761 + salt) % (2**32)) ^ ((index >> 32) * 2246822519 % (2**32))
    x = (x ^ (x >> 15)) * 2246822519 % (2**32)
    x = x ^ (x >> 13)
    return (x % 1_000_003).double() / 1_000_003 < prob


def null_condition(text_ids: torch.Tensor, drop: torch.Tensor, pad_id: int, eos_id: int) -> torch.Tensor:
    """Replace the rows of `text_ids` selected by `drop` with the empty caption [EOS, PAD, ...]."""
    empty = torch.full_like(text_ids[0], pad_id)
    empty[0] = eos_id
    return torch.where(drop[:, None], empty[None, :], text_ids)

