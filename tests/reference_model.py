"""A plain-PyTorch Parti encoder-decoder written independently of model_parallel/, for the tests.

It uses nn.Linear with separate per-head Q/K/V matrices, [batch, seq, hidden] tensors and either an
explicit softmax attention ("math": independent of torch SDPA, for correctness tests) or torch SDPA
(for bench/model_step.py, a fair speed baseline). `load_from_parti(ref, parti_state_dict)` copies the
weights of a TP=1 PartiModel, undoing its per-head interleaved QKV layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RefAttention(nn.Module):
    def __init__(self, d, heads, kind):
        super().__init__()
        self.heads, self.kind = heads, kind
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, kv, mask=None, causal=False):
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.wq(x)), split(self.wk(kv)), split(self.wv(kv))
        if causal:
            tri = torch.ones(n, k.shape[2], dtype=torch.bool).tril()
            mask = tri if mask is None else mask & tri
        if self.kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = scores.softmax(-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, n, d))


class RefMLP(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def dalle_masks(c) -> list[torch.Tensor | None]:
    """Each decoder layer's self-attention mask under model.attention_pattern (None: dense causal), bool
    [S, S] over the decoder's stream (caption if decoder-only, BOS, codes[:-1]), built pair by pair from DALL-E's
    description in (row, column) coordinates of the cell each position holds: every position sees the caption
    and BOS; an image token sees, before it, its own row and the part of the row above from its own column on
    (row), its column (column), or the kernel-sized square around it wrapped around the row ends like the row
    pattern (conv, last layer: an earlier token a rows up and b columns over in raster order, q - k = a g + b,
    0 <= a <= k // 2, |b| <= k // 2); column in the layers i = 2, 6, 10, ... (1-based), row elsewhere."""
    layers = c.decoder_layers
    if c.attention_pattern == "dense":
        return [None] * layers
    before = c.text_seq_len + 1 if c.arch == "decoder_only" else 1
    size, g, half = before + c.image_grid ** 2 - 1, c.image_grid, c.conv_attention_kernel // 2
    sees = {
        "row": lambda qr, qc, kr, kc: kr == qr or (kr == qr - 1 and kc >= qc),
        "column": lambda qr, qc, kr, kc: kc == qc,
        "conv": lambda qr, qc, kr, kc: any((qr - kr) * g + qc - kc == a * g + b for a in range(half + 1)
                                           for b in range(-half, half + 1)),
    }
    masks = {}
    for kind, rule in sees.items():
        m = torch.zeros(size, size, dtype=torch.bool)
        for q in range(size):
            for k in range(q + 1):
                m[q, k] = k < before or rule(*divmod(q - before, g), *divmod(k - before, g))
        masks[kind] = m
    kinds = ["conv" if i == layers else "column" if (i - 2) % 4 == 0 else "row" for i in range(1, layers + 1)]
    return [masks[kind] for kind in kinds]


class RefEncoderLayer(nn.Module):
    """Self-attention (bidirectional, or `causal`: the decoder-only stream's layer, under `self_mask` if
    sparse) and MLP."""

    def __init__(self, c, kind, causal=False, self_mask=None):
        super().__init__()
        d = c.hidden_size
        self.causal, self.self_mask = causal, self_mask
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=c.layernorm_eps), nn.LayerNorm(d, eps=c.layernorm_eps)
        self.attn, self.mlp = RefAttention(d, c.num_heads, kind), RefMLP(d, c.ffn_hidden_size)

    def forward(self, x, mask=None):
        h = self.ln1(x)
        x = x + self.attn(h, h, self.self_mask if mask is None else mask, causal=self.causal)
        return x + self.mlp(self.ln2(x))


class RefDecoderLayer(nn.Module):
    def __init__(self, c, kind, self_mask=None):
        super().__init__()
        d = c.hidden_size
        self.self_mask = self_mask
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(d, eps=c.layernorm_eps) for _ in range(3))
        self.self_attn = RefAttention(d, c.num_heads, kind)
        self.cross_attn = RefAttention(d, c.num_heads, kind)
        self.mlp = RefMLP(d, c.ffn_hidden_size)

    def forward(self, x, memory, mask):
        h = self.ln1(x)
        x = x + self.self_attn(h, h, self.self_mask, causal=True)
        x = x + self.cross_attn(self.ln2(x), memory, mask)
        return x + self.mlp(self.ln3(x))


class ReferenceParti(nn.Module):
    def __init__(self, c, kind="math"):
        super().__init__()
        self.c = c
        d = c.hidden_size
        self.text_embed = nn.Embedding(c.text_vocab_size, d)
        self.text_pos = nn.Embedding(c.text_seq_len, d)
        self.encoder = nn.ModuleList(RefEncoderLayer(c, kind) for _ in range(c.encoder_layers))
        self.enc_ln = nn.LayerNorm(d, eps=c.layernorm_eps)
        self.image_embed = nn.Embedding(c.image_vocab_size + 1, d)
        self.row_pos, self.col_pos = nn.Embedding(c.image_grid, d), nn.Embedding(c.image_grid, d)
        self.decoder = nn.ModuleList(RefDecoderLayer(c, kind, m) for m in dalle_masks(c))
        self.dec_ln = nn.LayerNorm(d, eps=c.layernorm_eps)
        self.head = nn.Linear(d, c.image_vocab_size, bias=False)

    def forward(self, text, codes):
        """Logits [b, n, V]."""
        c = self.c
        mask = (text != c.text_pad_id)[:, None, None, :]
        x = self.text_embed(text) + self.text_pos(torch.arange(text.shape[1]))
        for layer in self.encoder:
            x = layer(x, mask)
        memory = self.enc_ln(x)
        inp = torch.cat([torch.full_like(codes[:, :1], c.image_vocab_size), codes[:, :-1]], 1)
        pos = torch.arange(codes.shape[1])
        y = self.image_embed(inp) + self.row_pos(pos // c.image_grid) + self.col_pos(pos % c.image_grid)
        for layer in self.decoder:
            y = layer(y, memory, mask)
        return self.head(self.dec_ln(y))

    def loss(self, text, codes):
        logits = self(text, codes)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))


def _copy(dst: nn.Linear, w, b=None):
    dst.weight.data.copy_(w)
    if b is not None:
        dst.bias.data.copy_(b)


def _load_attention(ref: RefAttention, sd, prefix, heads, cross):
    d = ref.wq.weight.shape[0]
    hd = d // heads
    if cross:
        _copy(ref.wq, sd[prefix + "q.weight"], sd[prefix + "q.bias"])
        w = sd[prefix + "kv.weight"].view(heads, 2, hd, d)
        b = sd[prefix + "kv.bias"].view(heads, 2, hd)
        parts = [(ref.wk, 0), (ref.wv, 1)]
    else:
        w = sd[prefix + "qkv.weight"].view(heads, 3, hd, d)
        b = sd[prefix + "qkv.bias"].view(heads, 3, hd)
        parts = [(ref.wq, 0), (ref.wk, 1), (ref.wv, 2)]
    for lin, i in parts:
        _copy(lin, w[:, i].reshape(d, d), b[:, i].reshape(d))
    _copy(ref.wo, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])


def _load_embeddings(ref, sd: dict, text: str, image: str) -> None:
    """The caption and image tables and positions from the pieces named `text` and `image` (unpadded)."""
    c = ref.c
    ref.text_embed.weight.data.copy_(sd[f"{text}.embed.weight"][: c.text_vocab_size])
    ref.text_pos.weight.data.copy_(sd[f"{text}.pos.weight"])
    ref.image_embed.weight.data.copy_(sd[f"{image}.embed.weight"][: c.image_vocab_size + 1])
    ref.row_pos.weight.data.copy_(sd[f"{image}.row_pos.weight"])
    ref.col_pos.weight.data.copy_(sd[f"{image}.col_pos.weight"])


def load_from_parti(ref: ReferenceParti, sd: dict) -> ReferenceParti:
    c = ref.c
    h = c.num_heads
    _load_embeddings(ref, sd, "text_embedding", "image_embedding")
    ln = lambda mod, p: (mod.weight.data.copy_(sd[p + "weight"]), mod.bias.data.copy_(sd[p + "bias"]))
    mlp = lambda mod, p: (_copy(mod.fc1, sd[p + "fc1.weight"], sd[p + "fc1.bias"]),
                          _copy(mod.fc2, sd[p + "fc2.weight"], sd[p + "fc2.bias"]))
    for i, layer in enumerate(ref.encoder):
        p = f"encoder.{i}."
        ln(layer.ln1, p + "attn.norm."), ln(layer.ln2, p + "mlp.norm.")
        _load_attention(layer.attn, sd, p + "attn.fn.", h, cross=False)
        mlp(layer.mlp, p + "mlp.fn.")
    ln(ref.enc_ln, "encoder_norm.norm.")
    for i, layer in enumerate(ref.decoder):
        p = f"decoder.{i}."
        ln(layer.ln1, p + "self_attn.norm."), ln(layer.ln2, p + "cross_attn.norm."), ln(layer.ln3, p + "mlp.norm.")
        _load_attention(layer.self_attn, sd, p + "self_attn.fn.", h, cross=False)
        _load_attention(layer.cross_attn, sd, p + "cross_attn.fn.", h, cross=True)
        mlp(layer.mlp, p + "mlp.fn.")
    ln(ref.dec_ln, "head.norm.norm.")
    ref.head.weight.data.copy_(sd["head.proj.weight"])
    return ref


# ----------------------------------------------------------------------------------------------
# Decoder-only (DALL-E): one causal stream, caption (padding included, not masked) then [BOS, codes[:-1]].


class ReferenceDecoderOnly(nn.Module):
    def __init__(self, c, kind="math"):
        super().__init__()
        self.c = c
        d = c.hidden_size
        self.text_embed, self.text_pos = nn.Embedding(c.text_vocab_size, d), nn.Embedding(c.text_seq_len, d)
        self.image_embed = nn.Embedding(c.image_vocab_size + 1, d)
        self.row_pos, self.col_pos = nn.Embedding(c.image_grid, d), nn.Embedding(c.image_grid, d)
        self.layers = nn.ModuleList(RefEncoderLayer(c, kind, causal=True, self_mask=m) for m in dalle_masks(c))
        self.ln = nn.LayerNorm(d, eps=c.layernorm_eps)
        self.head = nn.Linear(d, c.image_vocab_size, bias=False)
        self.text_head = nn.Linear(d, c.text_vocab_size, bias=False)

    def hidden(self, text, codes):
        c = self.c
        inp = torch.cat([torch.full_like(codes[:, :1], c.image_vocab_size), codes[:, :-1]], 1)
        pos = torch.arange(codes.shape[1])
        x = torch.cat([self.text_embed(text) + self.text_pos(torch.arange(text.shape[1])),
                       self.image_embed(inp) + self.row_pos(pos // c.image_grid) + self.col_pos(pos % c.image_grid)], 1)
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)

    def forward(self, text, codes):
        """Image logits [b, n, V]."""
        return self.head(self.hidden(text, codes)[:, text.shape[1]:])

    def loss(self, text, codes):
        h = self.hidden(text, codes)
        T, w = text.shape[1], self.c.text_loss_weight
        logits = self.head(h[:, T:])
        image = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))
        if w == 0:
            return image
        text_logits = self.text_head(h[:, :T - 1])
        targets = text[:, 1:].masked_fill(text[:, 1:] == self.c.text_pad_id, -100)
        caption = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), targets.reshape(-1),
                                  ignore_index=-100)
        return (1 - w) * image + w * caption


def load_decoder_only(ref: ReferenceDecoderOnly, sd: dict) -> ReferenceDecoderOnly:
    c = ref.c
    _load_embeddings(ref, sd, "embedding.text", "embedding.image")
    ln = lambda mod, p: (mod.weight.data.copy_(sd[p + "weight"]), mod.bias.data.copy_(sd[p + "bias"]))
    for i, layer in enumerate(ref.layers):
        p = f"decoder.{i}."
        ln(layer.ln1, p + "self_attn.norm."), ln(layer.ln2, p + "mlp.norm.")
        _load_attention(layer.attn, sd, p + "self_attn.fn.", c.num_heads, cross=False)
        _copy(layer.mlp.fc1, sd[p + "mlp.fn.fc1.weight"], sd[p + "mlp.fn.fc1.bias"])
        _copy(layer.mlp.fc2, sd[p + "mlp.fn.fc2.weight"], sd[p + "mlp.fn.fc2.bias"])
    ln(ref.ln, "head.norm.norm.")
    ref.head.weight.data.copy_(sd["head.proj.weight"])
    if "head.text_proj.weight" in sd:
        ref.text_head.weight.data.copy_(sd["head.text_proj.weight"])
    return ref
