"""Pipeline stages for DeepSpeed's PipelineModule, from the same pieces as PartiModel (either arch).

    module = build_pipeline(cfg.model, kernels, num_stages=2, init_seed=seed)
    engine = deepspeed.initialize(model=module, ...)[0]; loss = engine.train_batch(data_iter)

megatron-core 0.16 no longer pipelines encoder-decoder models, so the split is done here, as
Megatron-DeepSpeed did: the model's pieces (`piece_classes`) become pipeline layers that pass a tuple.
The text encoder (small: 128 tokens) lives on the first stage; its output (`memory`) travels down the
pipeline beside the image hidden states, every decoder layer cross-attends to it, and its gradient
flows back to stage 0. Decoder layers are balanced over the stages (`partition_method`).

Tuples between layers (ids as int64: every float tensor that crosses a stage must get a gradient):
  input                  (text_ids, image_in, sample_index)
  encoder side           (text_hidden, text_ids, image_in, sample_index)
  decoder side           (image_hidden, memory, text_ids, sample_index)
  last layer             logits [n, b, V/tp]; the loss takes (logits, codes)
Decoder-only (no memory carried down): input (text_ids, image_in, sample_index), then (stream_hidden,
text_ids, sample_index), last layer logits, or (logits, text logits, text_ids) with a text loss.
`sample_index` (int64 [b]): each sample's position in the run's sample stream, the key of its dropout
masks (layers.SampleDropout), which travels with the samples so that every stage draws the masks that
PartiModel draws for them; layer k's dropout sites are keyed as PartiModel's piece k's.
"""
from __future__ import annotations

from model_parallel.layers import DecoderLayer, EncoderLayer
from model_parallel.model import (
    FinalNorm,
    ImageEmbedding,
    OutputHead,
    StreamEmbedding,
    TextEmbedding,
    loss_cross_entropy,
    piece_classes,
    piece_context,
    mark_tensor_parallel_weights,
    piece_names,
    place_piece,
    stream_loss,
    text_mask,
)

TEXT_ENCODER_PIECES = ("text_embedding", "encoder", "encoder_norm")
"""The pieces that make the text encoder (names' first component): what training.text_encoder pre-trains."""


def canonical_parameters(module, model_cfg) -> dict:
    """PartiModel's parameter names for the parameters this rank holds, whether `module` is built of pieces
    under their names (PartiModel, training.text_encoder's encoder) or is a pipeline stage (its layer k,
    named "k", is piece k): the names checkpoints use at any layout."""
    names, out = piece_names(model_cfg), {}
    for name, p in module.named_parameters():
        index, _, rest = name.partition(".")
        out[f"{names[int(index)]}.{rest}" if index.isdigit() else name] = p
    return out


def is_text_encoder(name: str) -> bool:
    """Whether a canonical parameter name belongs to the text encoder (TEXT_ENCODER_PIECES)."""
    return name.split(".")[0] in TEXT_ENCODER_PIECES


class TextEmbeddingPipe(TextEmbedding):
    def forward(self, inputs):
        text_ids, image_in, sample_index = inputs
        return super().forward(text_ids, sample_index), text_ids, image_in, sample_index


class EncoderLayerPipe(EncoderLayer):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.pad_id = ctx.cfg.text_pad_id

    def forward(self, inputs):
        x, text_ids, image_in, sample_index = inputs
        return super().forward(x, text_mask(text_ids, self.pad_id), sample_index), text_ids, image_in, sample_index


class EncoderNormPipe(FinalNorm):
    def forward(self, inputs):
        x, text_ids, image_in, sample_index = inputs
        return super().forward(x), text_ids, image_in, sample_index


class ImageEmbeddingPipe(ImageEmbedding):
    def forward(self, inputs):
        memory, text_ids, image_in, sample_index = inputs
        return super().forward(image_in, sample_index=sample_index), memory, text_ids, sample_index


class StreamEmbeddingPipe(StreamEmbedding):
    def forward(self, inputs):
        text_ids, image_in, sample_index = inputs
        return super().forward(text_ids, image_in, sample_index=sample_index), text_ids, sample_index


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.pad_id = ctx.cfg.text_pad_id

    def forward(self, inputs):
        if not hasattr(self, "cross_attn"):  # decoder-only
            x, text_ids, sample_index = inputs
            return super().forward(x, sample_index=sample_index), text_ids, sample_index
        x, memory, text_ids, sample_index = inputs
        x = super().forward(x, memory, text_mask(text_ids, self.pad_id), sample_index=sample_index)
        return x, memory, text_ids, sample_index


class OutputHeadPipe(OutputHead):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.decoder_only = ctx.cfg.decoder_only

    def forward(self, inputs):
        if not self.decoder_only:
            return super().forward(inputs[0])
        x, text_ids, _sample_index = inputs
        logits, text_logits = self.stream_logits(x)
        return logits if text_logits is None else (logits, text_logits, text_ids)


PIPE_CLASS = {TextEmbedding: TextEmbeddingPipe, EncoderLayer: EncoderLayerPipe, FinalNorm: EncoderNormPipe,
              ImageEmbedding: ImageEmbeddingPipe, StreamEmbedding: StreamEmbeddingPipe,
              DecoderLayer: DecoderLayerPipe, OutputHead: OutputHeadPipe}


class PipelineLoss:
    """The last stage's loss of its output and the image codes (PartiModel.loss's, either arch)."""

    def __init__(self, cfg, cross_entropy):
        self.cfg, self.cross_entropy = cfg, cross_entropy

    def __call__(self, outputs, image_codes):
        if isinstance(outputs, tuple):  # decoder-only with a text loss
            logits, text_logits, text_ids = outputs
            return stream_loss(self.cfg, logits, image_codes, text_logits, text_ids, self.cross_entropy)
        return stream_loss(self.cfg, outputs, image_codes, cross_entropy=self.cross_entropy)


def build_pipeline(cfg, kernels, num_stages: int, init_seed: int, sequence_parallel: bool = False, tp_group=None,
                   initialize: bool = True):
    """A DeepSpeed PipelineModule whose layer k holds the same weights as PartiModel's piece k."""
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    ctx = piece_context(cfg, kernels, sequence_parallel, tp_group=tp_group, initialize=initialize)
    specs = [LayerSpec(PIPE_CLASS[cls], ctx) for _, cls in piece_classes(cfg)]
    topology = PipeModelDataParallelTopology(num_pp=num_stages, num_mp=ctx.tp_group.size(),
                                             num_dp=ps.get_data_parallel_world_size())
    module = PipelineModule(layers=specs, topology=topology, loss_fn=PipelineLoss(cfg, loss_cross_entropy(ctx)),
                            partition_method="type:DecoderLayerPipe", seed_layers=True, base_seed=init_seed,
                            seed_fn=torch.manual_seed)
    for name, layer in module.named_children():  # this stage's layers, named by their index k among all
        if name.isdigit():
            place_piece(layer, cfg, init_seed, int(name))
    if not initialize:
        mark_tensor_parallel_weights(module)
    return module
