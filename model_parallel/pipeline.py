"""Encoder-decoder pipeline stages for DeepSpeed's PipelineModule, from the same pieces as PartiModel.

    module = build_pipeline(cfg.model, kernels, num_stages=2, init_seed=seed)
    engine = deepspeed.initialize(model=module, ...)[0]; loss = engine.train_batch(data_iter)

megatron-core 0.16 no longer pipelines encoder-decoder models, so the split is done here, as
Megatron-DeepSpeed did: the model's pieces (`piece_classes`) become pipeline layers that pass a tuple.
The text encoder (small: 128 tokens) lives on the first stage; its output (`memory`) travels down the
pipeline beside the image hidden states, every decoder layer cross-attends to it, and its gradient
flows back to stage 0. Decoder layers are balanced over the stages (`partition_method`).

Tuples between layers (ids as int64: every float tensor that crosses a stage must get a gradient):
  input                  (text_ids, image_in)
  encoder side           (text_hidden, text_ids, image_in)
  decoder side           (image_hidden, memory, text_ids)
  last layer             logits [n, b, V/tp]; the loss takes (logits, codes)
"""
from __future__ import annotations

from model_parallel.layers import DecoderLayer, EncoderLayer
from model_parallel.model import (
    FinalNorm,
    ImageEmbedding,
    OutputHead,
    TextEmbedding,
    image_code_loss,
    piece_classes,
    piece_context,
    text_mask,
)


class TextEmbeddingPipe(TextEmbedding):
    def forward(self, inputs):
        text_ids, image_in = inputs
        return super().forward(text_ids), text_ids, image_in


class EncoderLayerPipe(EncoderLayer):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.pad_id = ctx.cfg.text_pad_id

    def forward(self, inputs):
        x, text_ids, image_in = inputs
        return super().forward(x, text_mask(text_ids, self.pad_id)), text_ids, image_in


class EncoderNormPipe(FinalNorm):
    def forward(self, inputs):
        x, text_ids, image_in = inputs
        return super().forward(x), text_ids, image_in


class ImageEmbeddingPipe(ImageEmbedding):
    def forward(self, inputs):
        memory, text_ids, image_in = inputs
        return super().forward(image_in), memory, text_ids


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.pad_id = ctx.cfg.text_pad_id

    def forward(self, inputs):
        x, memory, text_ids = inputs
        return super().forward(x, memory, text_mask(text_ids, self.pad_id)), memory, text_ids


class OutputHeadPipe(OutputHead):
    def forward(self, inputs):
        x, _memory, _text_ids = inputs
        return super().forward(x)


PIPE_CLASS = {TextEmbedding: TextEmbeddingPipe, EncoderLayer: EncoderLayerPipe, FinalNorm: EncoderNormPipe,
              ImageEmbedding: ImageEmbeddingPipe, DecoderLayer: DecoderLayerPipe, OutputHead: OutputHeadPipe}


def pipeline_loss(logits, image_codes):
    return image_code_loss(logits, image_codes)


def build_pipeline(cfg, kernels, num_stages: int, init_seed: int, sequence_parallel: bool = False, tp_group=None):
    """A DeepSpeed PipelineModule whose layer k holds the same weights as PartiModel's piece k."""
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    ctx = piece_context(cfg, kernels, sequence_parallel, tp_group=tp_group)
    specs = [LayerSpec(PIPE_CLASS[cls], ctx) for _, cls in piece_classes(cfg)]
    topology = PipeModelDataParallelTopology(num_pp=num_stages, num_mp=ctx.tp_group.size(),
                                             num_dp=ps.get_data_parallel_world_size())
    return PipelineModule(layers=specs, topology=topology, loss_fn=pipeline_loss,
                          partition_method="type:DecoderLayerPipe", seed_layers=True, base_seed=init_seed,
                          seed_fn=torch.manual_seed)
