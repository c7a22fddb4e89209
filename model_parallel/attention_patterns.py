"""DALL-E's sparse self-attention patterns (Ramesh et al. 2021, appendix B.1), as boolean masks.

`model.attention_pattern=dalle` gives each decoder layer's self-attention one of three masks over the image
tokens; every position still sees every position before the image (the caption and BOS) and the caption is
causal as before:
- row: an image token sees the `image_grid` image tokens before it and itself (its row so far and the end of
  the row above: the previous row's token in its own column is the oldest);
- column: the image tokens of its own column, in every row so far;
- conv: the tokens before it in the `model.conv_attention_kernel`-wide square around it, the square wrapping
  around the row ends as the row pattern does (the paper's figure 11(d): "a causal convolutional attention
  pattern with wraparound behavior (similar to the row attention)"): up to k // 2 rows up, k // 2 raster
  positions either side, so a token at a row's start sees the end of the rows above, as many tokens as one
  mid-row (a box clipped at the image's edges, as lucidrains' DALLE-pytorch has it, sees about half as many there).
DALL-E's schedule over layers i = 1..L: column where (i - 2) mod 4 == 0, row elsewhere, conv in the last.
A row layer followed by a column layer reaches every earlier image token, so depth loses no context.
`python -m model_parallel.attention_patterns [--grid 4 --prefix 7 --kernel 3]` draws the three masks (as the
paper's figure 11 does: a row per query position, `#` where it attends).

Positions are stream positions (the decoder's KV-cache positions): the caption (decoder-only), then BOS,
then the image codes, so position `prefix + c` (prefix = caption + BOS) holds the code of cell c of the
raster order, as in DALL-E, where the masks are over the image tokens the stream holds.

The masks are computed, not stored: a mask of the query and key positions at hand (training's whole
stream, a prefill chunk, one decoding step, a static cache's write positions), a few integer ops per
(query, key) pair, so there is nothing to shard, save or load. Attention stays SDPA with that mask: the
masked scores are still computed (no FLOPs saved; on a GPU the mask rules out the flash kernel, SDPA takes
cuDNN's or the memory-efficient one).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn


def dalle_kind(layer: int, layers: int) -> str:
    """DALL-E's mask for decoder layer `layer` (0-based) of `layers`: conv in the last layer, column where
    the 1-based index i has (i - 2) mod 4 == 0, row elsewhere."""
    if layer == layers - 1:
        return "conv"
    return "column" if (layer + 1 - 2) % 4 == 0 else "row"


class AttentionPattern(nn.Module):
    """One layer's sparse self-attention over a stream of `prefix` positions and then `grid` x `grid` image
    tokens in raster order (see the module docstring), as one rule for the three kinds on the raster distance
    d >= 0 back to an earlier image token: d <= `window`, d a multiple of `period`, and d = a x grid + b with
    0 <= a <= `radius` rows and |b| <= `radius` (b >= 0 in the token's own row: causal), which wraps around
    the row ends (radius = grid: no limit, for row and column). The three numbers are 0-dim int64 buffers, not
    Python ints (as the dropout keys, layers.KeyedSite): torch.compile specialises on a module's int
    attributes, so ints would compile the shared layer code once per kind; made on the CPU explicitly (real in
    a meta-device build), moved with the module; not saved (derived from the config)."""

    def __init__(self, kind: str, prefix: int, grid: int, kernel: int = 11):
        super().__init__()
        self.kind, self.prefix, self.grid = kind, prefix, grid  # prefix, grid: the same in every layer
        window, period, radius = {"row": (grid, 1, grid), "column": (grid * grid, grid, grid),
                                "conv": (grid * grid, 1, kernel // 2)}[kind]
        for name, value in (("window", window), ("period", period), ("radius", radius)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.long, device="cpu"), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.kind}, prefix={self.prefix}, grid={self.grid}, radius={int(self.radius)}"

    def mask(self, queries: torch.Tensor, keys: int) -> torch.Tensor:
        """bool [n, keys]: True where the query at stream position queries[i] (int64 [n]) may attend to
        stream position j < keys. Causal included (so a static cache's unwritten positions are excluded)."""
        q = queries[:, None]
        k = torch.arange(keys, device=queries.device)[None, :]
        d = q - k  # raster distance back (only d >= 0 is kept: causal)
        # d = a x grid + b for some 0 <= a <= radius, |b| <= radius: the nearest such row a (d / grid rounded,
        # clamped) is within radius if any is (a kernel wider than the grid has several; for d >= 0 and a = 0, b >= 0)
        # (torch.minimum, not clamp(max=tensor): clamp reads a tensor bound back as a Python number, which splits a
        # compiled decoding step into many graphs)
        rows = torch.minimum((d + self.grid // 2).div(self.grid, rounding_mode="floor").clamp(min=0), self.radius)
        image = (d <= self.window) & (d % self.period == 0) & ((d - rows * self.grid).abs() <= self.radius)
        return (k <= q) & ((k < self.prefix) | image)


def layer_pattern(cfg, layer: int) -> AttentionPattern | None:
    """The self-attention pattern of decoder layer `layer` of a model (ModelConfig `cfg`); None: dense causal."""
    if cfg.attention_pattern == "dense":
        return None
    return AttentionPattern(dalle_kind(layer, cfg.decoder_layers), cfg.prefix_len + 1, cfg.image_grid,
                            cfg.conv_attention_kernel)


def draw(pattern: AttentionPattern) -> str:
    """The pattern's mask over its whole stream as text: a line per query position, '#' where it attends."""
    size = pattern.prefix + pattern.grid * pattern.grid
    mask = pattern.mask(torch.arange(size), size)
    return "\n".join("".join("#" if seen else "." for seen in row) for row in mask.tolist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw DALL-E's sparse attention masks.")
    parser.add_argument("--grid", type=int, default=4, help="image tokens per side")
    parser.add_argument("--prefix", type=int, default=7, help="positions before the image (caption + BOS)")
    parser.add_argument("--kernel", type=int, default=3, help="side of the conv mask's square")
    args = parser.parse_args(argv)
    for kind in ("row", "column", "conv"):
        kernel = f", kernel {args.kernel}" if kind == "conv" else ""
        print(f"{kind} (prefix {args.prefix}, grid {args.grid}{kernel})")
        print(draw(AttentionPattern(kind, args.prefix, args.grid, args.kernel)) + "\n")


if __name__ == "__main__":
    main()
