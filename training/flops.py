"""FLOPs of the model per training sample (either model.arch), and peak device FLOP/s for MFU.

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
Decoder-only (model.arch=decoder_only), S = T + N the stream, V_t the caption vocabulary:
  decoder layer: 2S(4d^2 + 2df) + 4S^2 d   (also under model.attention_pattern=dalle: the masked scores are
                                           computed, SDPA under a mask)
  head:          2NdV + 2(T-1)dV_t       the caption head only with model.text_loss_weight > 0
Embedding lookups and norms are left out (negligible).
Activation recomputation runs part of the forward again (`recomputed_layer_flops`): full recomputation a
layer's whole forward, selective the attention core (4T^2 d encoder; 4N^2 d + 4NTd decoder; 4S^2 d
decoder-only). Those FLOPs are executed but not in MFU's numerator: the layout planner counts them in time.
"""
from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s by the exact name torch.cuda.get_device_name() reports,
# from the vendors' datasheets. Exact names: the PCIe and NVL parts of a chip have lower clocks and power
# (H100 PCIe 756, H100 NVL 835 against 989 for the SXM part), so a substring match would overstate them.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,   # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,             # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "AMD Instinct MI300X": 1307.0,
}
# fp32 runs use TF32 tensor cores (enabled by `enable_tf32`); their dense peak is half the bf16 one on
# every part above (A100 156, H100 SXM 495, L40S 183, MI300X 654).
TF32_FRACTION_OF_BF16 = 0.5


def encoder_layer_flops(m) -> float:
    d, f, T = m.hidden_size, m.ffn_hidden_size, m.text_seq_len
    return 2 * T * (4 * d * d + 2 * d * f) + 4 * T * T * d


def decoder_layer_flops(m) -> float:
    d, f, T, N = m.hidden_size, m.ffn_hidden_size, m.text_seq_len, m.image_seq_len
    if m.decoder_only:
        S = m.stream_len
        return 2 * S * (4 * d * d + 2 * d * f) + 4 * S * S * d
    return 2 * N * (4 * d * d + 2 * d * f) + 4 * N * N * d + 2 * N * 2 * d * d + 2 * T * 2 * d * d + 4 * N * T * d


def recomputed_layer_flops(m, recompute: str) -> tuple[float, float]:
    """Forward FLOPs per sample that activation recomputation (none, selective, full) runs again in one
    (encoder layer, decoder layer)."""
    if recompute == "full":
        return encoder_layer_flops(m), decoder_layer_flops(m)
    if recompute == "selective":
        T, N, d = m.text_seq_len, m.image_seq_len, m.hidden_size
        decoder = 4 * m.stream_len**2 * d if m.decoder_only else 4 * N * N * d + 4 * N * T * d
        return 4 * T * T * d, decoder
    return 0.0, 0.0


def head_flops(m) -> float:
    text = (2 * (m.text_seq_len - 1) * m.hidden_size * m.text_vocab_size
            if m.decoder_only and m.text_loss_weight > 0 else 0)
    return 2 * m.image_seq_len * m.hidden_size * m.image_vocab_size + text


def forward_flops_per_sample(m) -> float:
    return m.encoder_layers * encoder_layer_flops(m) + m.decoder_layers * decoder_layer_flops(m) + head_flops(m)


def train_flops_per_sample(m) -> float:
    return 3 * forward_flops_per_sample(m)


def peak_flops(precision: str, override_tflops: float = 0.0,
               device_name: str | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s per device that MFU is divided by, where it comes from). `override_tflops` (the
    `train.peak_tflops` key) wins; otherwise the table above for this GPU's exact name: the bf16 peak for
    bf16 runs, the TF32 peak for fp32 runs. (None, why) on CPU or for a GPU the table does not know."""
    if override_tflops > 0:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s from train.peak_tflops"
    if device_name is None:
        if not torch.cuda.is_available():
            return None, "no peak on CPU (bench/train_throughput.py measures a matmul instead)"
        device_name = torch.cuda.get_device_name()
    bf16 = PEAK_BF16_TFLOPS.get(device_name)
    if bf16 is None:
        return None, f"peak of {device_name!r} unknown: set train.peak_tflops for MFU"
    if precision == "bf16":
        return bf16 * 1e12, f"{bf16:g} TFLOP/s dense bf16 of {device_name}"
    tf32 = bf16 * TF32_FRACTION_OF_BF16
    return tf32 * 1e12, f"{tf32:g} TFLOP/s dense TF32 of {device_name} (fp32 run, TF32 on)"


def enable_tf32() -> None:
    """fp32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation), as Megatron and most GPU training does; torch leaves matmul TF32 off by default."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
