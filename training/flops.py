"""FLOPs of the Parti encoder-decoder per training sample, and peak device FLOP/s for MFU.

Counted as 2 FLOPs per multiply-add of every matrix product, forward only, then x3 for training
(backward = 2x forward; activation recomputation is not counted, as in the PaLM MFU definition).
With d = hidden, f = MLP width, T = text length, N = image length, V = image vocabulary:

  encoder layer: 2T(4d^2 + 2df)          QKV + output projections, MLP
                 + 4T^2 d                 scores QK^T and probs x V
  decoder layer: 2N(4d^2 + 2df)          self-attention projections, MLP
                 + 4N^2 d                 causal self-attention, counted in full (as Megatron does)
                 + 2N(2d^2) + 2T(2d^2)   cross-attention: Q/output on the image, K/V on the text
                 + 4NTd                   cross-attention scores and probs x V
  head:          2NdV
Embedding lookups and norms are left out (negligible).
"""
from __future__ import annotations

import torch

# Dense bf16 peak TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 70.0, "L40S": 362.0,
                    "V100": 125.0, "MI300X": 1307.0}


def encoder_layer_flops(m) -> float:
    d, f, T = m.hidden_size, m.ffn_hidden_size, m.text_seq_len
    return 2 * T * (4 * d * d + 2 * d * f) + 4 * T * T * d


def decoder_layer_flops(m) -> float:
    d, f, T, N = m.hidden_size, m.ffn_hidden_size, m.text_seq_len, m.image_seq_len
    return 2 * N * (4 * d * d + 2 * d * f) + 4 * N * N * d + 2 * N * 2 * d * d + 2 * T * 2 * d * d + 4 * N * T * d


def head_flops(m) -> float:
    return 2 * m.image_seq_len * m.hidden_size * m.image_vocab_size


def forward_flops_per_sample(m) -> float:
    return m.encoder_layers * encoder_layer_flops(m) + m.decoder_layers * decoder_layer_flops(m) + head_flops(m)


def train_flops_per_sample(m) -> float:
    return 3 * forward_flops_per_sample(m)


def peak_flops_per_device() -> float | None:
    """Peak bf16 FLOP/s of this process's GPU, or None when unknown (CPU: see bench/train_throughput)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
