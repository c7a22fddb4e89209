"""The shape of the model (`ModelConfig`, the `model:` section of a run) and its presets.

`model.arch` picks the family: Parti's encoder-decoder (a text encoder, an image decoder that cross-attends to
it) or a DALL-E-style decoder-only transformer (one causal stream: the padded caption, then the image tokens).

    cfg = model_config("parti-350m")                     # configs/model/parti-350m.yaml
    cfg = model_config("parti-tiny", {"dropout": 0.1})   # a preset with keys laid over it

`preset: parti-350m` in a `model:` section loads configs/model/parti-350m.yaml first; the section's
other keys override the preset's, whatever their order.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.config import CONFIG_ROOT, ConfigError, build, merge, read_yaml, require


@dataclass
class ModelConfig:
    """Shape of the text-to-image transformer."""

    preset: str = ""
    """Name of a preset under configs/model/ whose values are the defaults for this section ('' = none)."""
    arch: str = "encoder_decoder"
    """encoder_decoder (Parti: text encoder + image decoder with cross-attention) or decoder_only (DALL-E: one
    causal stream of text_seq_len caption tokens, padding included, then the image tokens; no encoder, so
    encoder_layers must be 0; caption padding is not masked: each padded position has its own position
    embedding, the role of DALL-E's per-position padding tokens; DALL-E's sparse masks: attention_pattern)."""
    text_loss_weight: float = 0.0
    """decoder_only: the loss is (1 - w) x image-token cross-entropy + w x next-caption-token cross-entropy
    (over non-padding targets, from a text head of its own); DALL-E used w = 1/8. 0: image tokens only."""
    encoder_layers: int = 2
    """Number of text-encoder transformer layers (bidirectional self-attention + MLP)."""
    decoder_layers: int = 2
    """Number of image-decoder layers (causal self-attention + cross-attention + MLP)."""
    hidden_size: int = 64
    """Model width d."""
    ffn_hidden_size: int = 256
    """Width of the MLP's inner layer (Parti: 4d)."""
    num_heads: int = 4
    """Attention heads (Parti: d/64)."""
    text_vocab_size: int = 1000
    """SentencePiece vocabulary size, special tokens included (Parti: 16000)."""
    text_seq_len: int = 16
    """Text tokens per caption after truncation/padding (Parti: 128)."""
    image_vocab_size: int = 64
    """VQ codebook size (Parti: 8192). The decoder's input vocabulary adds one BOS token."""
    image_grid: int = 4
    """Image tokens per side; the image sequence is image_grid**2 long (Parti: 32 -> 1024)."""
    text_pad_id: int = 0
    """Token id that pads captions; padded positions are masked out of attention."""
    text_eos_id: int = 3
    """End-of-sentence id; the null (unconditional) caption is [EOS] alone."""
    vocab_pad_multiple: int = 128
    """Embedding tables are padded to a multiple of this (independent of TP, so checkpoints reshard)."""
    dropout: float = 0.0
    """Dropout on residual branches and embeddings. In training its masks are a pure function of (train.seed,
    each sample's position in the run's sample stream, model piece, dropout site, element), so a run gives
    the same losses at any DP/TP/PP layout, ZeRO stage or sequence parallelism, and after a resume on
    another one (it costs a few integer ops per activation element of each dropout site)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities, inside the fused attention kernel (SDPA/flash), drawn from
    torch's per-tensor-parallel-rank generator: unlike model.dropout, a run with it on depends on the
    layout (DP/TP/PP) it runs at, unless model.attention_dropout_invariant is set. As in Megatron-LM, that
    generator is seeded alike on every data-parallel rank: the k-th sample of each rank's micro-batch draws the
    same masks (model.attention_dropout_invariant keys them by sample instead)."""
    attention_dropout_invariant: bool = False
    """Key attention-probability dropout by sample too (as model.dropout is), so that model.attention_dropout
    > 0 gives the same run at any layout. Costs the fused attention kernel in training: attention then
    computes softmax(QK^T)V explicitly, holding the [batch, heads, queries, keys] probabilities (time and
    memory grow with the square of the sequence; parallel.activation_checkpointing=selective does not
    recompute this path, full does). No effect when model.attention_dropout is 0, nor in sampling."""
    attention_pattern: str = "dense"
    """Decoder self-attention: dense (causal) or dalle, DALL-E's sparse masks over the image tokens (row,
    column, and conv in the last layer; model_parallel/attention_patterns.py): every position still sees the
    whole caption (decoder-only) and BOS. Computed densely under a mask: no FLOPs saved, and on a GPU SDPA
    takes a kernel that accepts a mask (cuDNN's or the memory-efficient one), not flash."""
    conv_attention_kernel: int = 11
    """attention_pattern=dalle: side of the square neighbourhood the last layer's conv mask sees (odd)."""
    layernorm_eps: float = 1e-5
    """Epsilon of every layer norm."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation (output projections scaled by 1/sqrt(2L))."""
    caption_drop_prob: float = 0.1
    """Probability that a training caption is replaced by the null caption (for classifier-free guidance)."""
    init_text_encoder: str = ""
    """Warm start: the output folder of `python -m training.text_encoder` (a text encoder pre-trained with
    masked-token prediction): a fresh run starts with its text embedding, encoder layers and encoder norm, at
    any TP/PP ('' = none; a resumed run takes its checkpoint's weights)."""
    freeze_text_encoder: bool = False
    """Keep the text encoder's weights as they are: its parameters get learning rate 0 (and no weight decay),
    so they never change; their gradients are zeroed as they are made, so the clipping norm (and the logged
    grad_norm) covers only what trains."""

    @property
    def image_seq_len(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def decoder_only(self) -> bool:
        return self.arch == "decoder_only"

    @property
    def prefix_len(self) -> int:
        """Positions before the first image token in the decoder's stream (the caption, decoder_only)."""
        return self.text_seq_len if self.decoder_only else 0

    @property
    def stream_len(self) -> int:
        """Length of the decoder's causal stream (its KV cache): caption (decoder_only) + image tokens."""
        return self.prefix_len + self.image_seq_len

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the field for the first broken rule (layout rules: ParallelLayout)."""
        require(self.arch in ARCHS, f"model.arch={self.arch!r} must be one of {', '.join(ARCHS)}")
        for name in ("decoder_layers", "hidden_size", "ffn_hidden_size", "num_heads", "text_vocab_size",
                     "text_seq_len", "image_vocab_size", "image_grid", "vocab_pad_multiple", "layernorm_eps"):
            require(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        require(self.init_std >= 0, f"model.init_std={self.init_std} must be >= 0")
        for name in ("text_pad_id", "text_eos_id"):  # (a pad id outside masked nothing, or took a padding row)
            require(0 <= getattr(self, name) < self.text_vocab_size,
                    f"model.{name}={getattr(self, name)} must be a token id below model.text_vocab_size="
                    f"{self.text_vocab_size}")
        # (the null caption [EOS, PAD, ...] would be all padding: every attention row over it masked, NaN where the
        # softmax is explicit)
        require(self.text_pad_id != self.text_eos_id, f"model.text_pad_id and model.text_eos_id must differ (both "
                f"{self.text_pad_id})")
        if self.decoder_only:
            require(self.encoder_layers == 0, f"model.encoder_layers={self.encoder_layers} must be 0 with "
                    "model.arch=decoder_only (its caption is the start of the decoder's stream, not encoded)")
            for name in ("init_text_encoder", "freeze_text_encoder"):
                require(not getattr(self, name), f"model.{name} needs model.arch=encoder_decoder (a decoder-only "
                        "model has no text encoder)")
        else:
            require(self.encoder_layers > 0, f"model.encoder_layers={self.encoder_layers} must be positive")
            require(self.text_loss_weight == 0, f"model.text_loss_weight={self.text_loss_weight} needs "
                    "model.arch=decoder_only (the encoder-decoder predicts image tokens only)")
        require(0.0 <= self.text_loss_weight < 1.0, f"model.text_loss_weight={self.text_loss_weight} must be in [0, 1)")
        require(self.attention_pattern in PATTERNS,
                f"model.attention_pattern={self.attention_pattern!r} must be one of {', '.join(PATTERNS)}")
        require(self.conv_attention_kernel > 0 and self.conv_attention_kernel % 2 == 1,
                f"model.conv_attention_kernel={self.conv_attention_kernel} must be a positive odd number")
        require(self.hidden_size % self.num_heads == 0,
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}")
        for name in ("dropout", "attention_dropout", "caption_drop_prob"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"model.{name}={value} must be in [0, 1)")
        return self


ARCHS = ("encoder_decoder", "decoder_only")
PATTERNS = ("dense", "dalle")
"""model.attention_pattern's values (model_parallel/attention_patterns.py)."""

RENAMED = {"cfg_drop_prob": "caption_drop_prob"}
"""Keys renamed since configs were written with them: old name -> new name."""


def model_preset(name: str) -> dict:
    """The raw values of configs/model/<name>.yaml."""
    path = CONFIG_ROOT / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / "model").glob("*.yaml"))
        raise ConfigError(f"model.preset={name!r}: no file {path}; known presets: {', '.join(known)}")
    return read_yaml(path)


def resolve_model_section(raw: dict) -> dict:
    """A `model:` section with its preset's values filled in underneath it (null is refused, as for any other
    section: an emptied `model:` trained the default model)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"model must be a section (mapping), got {raw!r}")
    section = dict(raw)
    for old, new in RENAMED.items():
        if old in section:
            raise ConfigError(f"model.{old} was renamed model.{new}: write model.{new}={section[old]!r}")
    return merge(model_preset(section["preset"]), section) if section.get("preset") else section


def model_config(preset: str = "", overrides: dict | None = None) -> ModelConfig:
    """ModelConfig of a preset (none: the defaults) with `overrides` laid over it."""
    return build(ModelConfig, resolve_model_section({"preset": preset, **(overrides or {})}), "model.")


def saved_model_config(section: dict) -> ModelConfig:
    """ModelConfig of a `model:` section written by a run (checkpoint, export): a key renamed since is
    read under its new name (the run wrote what was right then), unknown keys are still refused. The section
    is the run's resolved config, so its preset is not applied again: a key added since the run takes its
    default (what the run did), not the preset's value of today."""
    section = {RENAMED.get(k, k): v for k, v in section.items()}
    return build(ModelConfig, section, "model.")
