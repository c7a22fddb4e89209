"""Writes tests/data/vq_reference_outputs.pt: the reference implementations' outputs that tests/test_vq_reference.py
compares vq/conv_vqgan.py's ConvVQGAN (both styles) and vq/dvae.py's DVAE with.

For each of three tiny configurations it builds the reference project's own modules (imported from a local checkout,
nothing of this repository's vq/), fills every parameter with fill_deterministic (values drawn from one seeded
generator in the sorted order of the reference parameter names), runs seeded inputs (seeded_inputs) through the
encoder, the quantizer and the decoder, and saves the configurations, the seeds, a digest of the reference parameter
names and shapes, checksums of the filled values and inputs, and the outputs (float32 / int64 tensors in plain
dicts, about 30 KB: torch.load(weights_only=True) reads it):

  taming    CompVis/taming-transformers 3ba01b241669f5ade541ce990f7650a3b8f65318
            taming/modules/diffusionmodules/model.py (Encoder, Decoder), taming/modules/vqvae/quantize.py
            (VectorQuantizer2, as taming/models/vqgan.py's VQModel builds it; VQModel itself needs Lightning)
  llamagen  FoundationVision/LlamaGen ce98ec41803a74a90ce68c40ababa9eaeffeb4ec
            tokenizer/tokenizer_image/vq_model.py (VQModel's encode / decode_code, with a tiny Encoder / Decoder:
            VQModel hard-codes ch=128)
  dalle     openai/DALL-E 5be4b236bc3ade6943662354117a0e83752cc322
            dall_e/encoder.py, dall_e/decoder.py (Encoder, Decoder; their attrs validators' minimum sizes:
            n_hid 64, vocab_size 512)

To rerun (the reference code needs torch, numpy, einops (taming's quantizer) and attrs (DALL-E's modules); this
project's environment lacks attrs: `pip install --target /tmp/refpy attrs` and PYTHONPATH=/tmp/refpy):

    git clone https://github.com/CompVis/taming-transformers && git -C taming-transformers checkout 3ba01b2
    git clone https://github.com/FoundationVision/LlamaGen && git -C LlamaGen checkout ce98ec4
    git clone https://github.com/openai/DALL-E && git -C DALL-E checkout 5be4b23
    python -m tests.reference.make_vq_golden --taming taming-transformers --llamagen LlamaGen --dalle DALL-E

(from the repository root; a checkout at another commit is refused unless --any-commit). The output depends only on
the reference code and torch's CPU generator: rerunning at these commits rewrites the same numbers.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "data" / "vq_reference_outputs.pt"
SOURCES = {
    "taming": ("CompVis/taming-transformers", "3ba01b241669f5ade541ce990f7650a3b8f65318"),
    "llamagen": ("FoundationVision/LlamaGen", "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec"),
    "dalle": ("openai/DALL-E", "5be4b236bc3ade6943662354117a0e83752cc322"),
}
# Tiny configurations; GroupNorm(32) in the references needs widths that are multiples of 32.
TAMING = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8, "embed_dim": 4, "n_embed": 16,
          "resolution": 8, "attn_resolutions": [4]}
LLAMAGEN = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8, "codebook_embed_dim": 4,
            "codebook_size": 16, "image_size": 8}
DALLE = {"image_size": 16, "n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512, "n_init": 16}  # 4 groups: patch 8
BATCH = {"taming": 2, "llamagen": 2, "dalle": 1}  # (two images where attention could mix them up)
SEEDS = {"taming": (11, 12), "llamagen": (21, 22), "dalle": (31, 32)}  # (parameters, inputs)


def fill_deterministic(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Values for parameters named `shapes`' keys, drawn from one generator seeded `seed` in the sorted order of the
    names, from u uniform in [-1, 1): weights of 2+ dimensions u * sqrt(3 / fan_in) (variance 1 / fan_in), 1-d
    `weight`s (GroupNorm scales) 1 + 0.2 u, other 1-d tensors (biases) 0.2 u. Two models whose names sort alike get
    the same values name for name. (Uniform, not normal: torch.randn's vectorised CPU kernels round differently
    from its scalar one, ATEN_CPU_CAPABILITY=default; torch.rand draws the same bits everywhere.)"""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        u = uniform(shape, g)
        if len(shape) >= 2:
            out[name] = u * math.sqrt(3 / math.prod(shape[1:]))
        elif name.endswith("weight"):
            out[name] = 1 + 0.2 * u
        else:
            out[name] = 0.2 * u
    return out


def uniform(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Uniform in [-1, 1), float32."""
    return torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    """A float64 summary of filled values: torch's generator changing would show here first."""
    return float(sum(t.double().abs().sum() for t in tensors.values()))


def layout_digest(shapes: dict[str, tuple[int, ...]]) -> str:
    """sha256 of the sorted names and shapes (what fill_deterministic's values depend on)."""
    text = "\n".join(f"{name} {tuple(shapes[name])}" for name in sorted(shapes))
    return hashlib.sha256(text.encode()).hexdigest()


def seeded_inputs(kind: str, config: dict, seed: int) -> dict[str, torch.Tensor]:
    """The inputs every case runs: images in [-1, 1] and the decoder's input (latents, or for the dVAE a softmax over
    the codes, as its Gumbel relaxation feeds it)."""
    g, batch = torch.Generator().manual_seed(seed), BATCH[kind]
    if kind == "dalle":
        size, grid = config["image_size"], config["image_size"] // 8
        images = uniform((batch, 3, size, size), g)
        soft = torch.softmax(uniform((batch, config["vocab_size"], grid, grid), g) * 5, dim=1)
        return {"images": images, "decoder_in": soft}
    size = config["resolution" if kind == "taming" else "image_size"]
    grid = size // 2 ** (len(config["ch_mult"]) - 1)
    images = uniform((batch, 3, size, size), g)
    return {"images": images, "decoder_in": uniform((batch, config["z_channels"], grid, grid), g) * math.sqrt(3)}


# -- the reference implementations ----------------------------------------------------------------------------------
def _module_from_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _fill(model: torch.nn.Module, seed: int) -> tuple[str, float]:
    params = dict(model.named_parameters())
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    values = fill_deterministic(shapes, seed)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])
    return layout_digest(shapes), checksum(values)


def _code_margin(z: torch.Tensor, codebook: torch.Tensor) -> float:
    """The smallest gap between the nearest and second-nearest code's squared distance: the codes are only a fair
    test where no latent is nearly tied."""
    d = torch.cdist(z.reshape(-1, z.shape[-1]).double(), codebook.double()).pow(2)
    two = d.topk(2, dim=1, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())


def run_taming(root: Path) -> dict:
    model_py = _module_from_file("ref_taming_model", root / "taming/modules/diffusionmodules/model.py")
    quantize_py = _module_from_file("ref_taming_quantize", root / "taming/modules/vqvae/quantize.py")
    c = TAMING
    dd = {"double_z": False, "z_channels": c["z_channels"], "resolution": c["resolution"], "in_channels": 3,
          "out_ch": 3, "ch": c["ch"], "ch_mult": c["ch_mult"], "num_res_blocks": c["num_res_blocks"],
          "attn_resolutions": c["attn_resolutions"], "dropout": 0.0}
    # taming/models/vqgan.py VQModel.__init__, less its loss (and Lightning)
    vq = torch.nn.Module()
    vq.encoder, vq.decoder = model_py.Encoder(**dd), model_py.Decoder(**dd)
    vq.quantize = quantize_py.VectorQuantizer2(c["n_embed"], c["embed_dim"], beta=0.25, sane_index_shape=True)
    vq.quant_conv = torch.nn.Conv2d(c["z_channels"], c["embed_dim"], 1)
    vq.post_quant_conv = torch.nn.Conv2d(c["embed_dim"], c["z_channels"], 1)
    vq.eval()
    param_seed, input_seed = SEEDS["taming"]
    names, fill_sum = _fill(vq, param_seed)
    x = seeded_inputs("taming", c, input_seed)
    with torch.no_grad():
        enc = vq.encoder(x["images"])
        h = vq.quant_conv(enc)  # VQModel.encode
        _, _, (_, _, codes) = vq.quantize(h)
        margin = _code_margin(h.permute(0, 2, 3, 1), vq.quantize.embedding.weight)
        # the transformer's decode_to_img: quantize.get_codebook_entry(indices, (b, h, w, c)), then VQModel.decode
        b, _, gh, gw = h.shape
        q = vq.quantize.get_codebook_entry(codes.reshape(-1), (b, gh, gw, c["embed_dim"]))
        decoded = vq.decoder(vq.post_quant_conv(q))
        dec = vq.decoder(x["decoder_in"])
    return {"config": dict(c), "param_seed": param_seed, "input_seed": input_seed, "param_layout": names,
            "param_checksum": fill_sum, "input_checksum": checksum(x), "code_margin": margin,
            "outputs": {"encoder": enc, "codes": codes, "decoder": dec, "decoded": decoded}}


def run_llamagen(root: Path) -> dict:
    vq_model = _module_from_file("ref_llamagen_vq_model", root / "tokenizer/tokenizer_image/vq_model.py")
    c = LLAMAGEN
    # vq_model.VQModel.__init__ with a tiny Encoder / Decoder (it builds them at ch=128)
    vq = vq_model.VQModel.__new__(vq_model.VQModel)
    torch.nn.Module.__init__(vq)
    vq.encoder = vq_model.Encoder(ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
                                  z_channels=c["z_channels"], dropout=0.0)
    vq.decoder = vq_model.Decoder(ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
                                  z_channels=c["z_channels"], dropout=0.0)
    vq.quantize = vq_model.VectorQuantizer(c["codebook_size"], c["codebook_embed_dim"], 0.25, 0.0, True, True)
    vq.quant_conv = torch.nn.Conv2d(c["z_channels"], c["codebook_embed_dim"], 1)
    vq.post_quant_conv = torch.nn.Conv2d(c["codebook_embed_dim"], c["z_channels"], 1)
    vq.eval()
    param_seed, input_seed = SEEDS["llamagen"]
    names, fill_sum = _fill(vq, param_seed)
    x = seeded_inputs("llamagen", c, input_seed)
    with torch.no_grad():
        enc = vq.encoder(x["images"])
        quant, _, (_, _, codes) = vq.encode(x["images"])
        h = torch.nn.functional.normalize(vq.quant_conv(enc).permute(0, 2, 3, 1), dim=-1)
        margin = _code_margin(h, torch.nn.functional.normalize(vq.quantize.embedding.weight, dim=-1))
        codes = codes.reshape(quant.shape[0], quant.shape[2], quant.shape[3])
        decoded = vq.decode_code(codes.reshape(-1), shape=tuple(quant.shape))
        dec = vq.decoder(x["decoder_in"])
    return {"config": dict(c), "param_seed": param_seed, "input_seed": input_seed, "param_layout": names,
            "param_checksum": fill_sum, "input_checksum": checksum(x), "code_margin": margin,
            "outputs": {"encoder": enc, "codes": codes, "decoder": dec, "decoded": decoded}}


def run_dalle(root: Path) -> dict:
    # dall_e/__init__.py fetches checkpoints (requests); only its modules are needed: a package without __init__
    package = types.ModuleType("dall_e")
    package.__path__ = [str(root / "dall_e")]
    sys.modules["dall_e"] = package
    encoder_py, decoder_py = importlib.import_module("dall_e.encoder"), importlib.import_module("dall_e.decoder")
    c = DALLE
    vq = torch.nn.Module()
    vq.encoder = encoder_py.Encoder(n_hid=c["n_hid"], n_blk_per_group=c["n_blk_per_group"],
                                    vocab_size=c["vocab_size"], device=torch.device("cpu"))
    vq.decoder = decoder_py.Decoder(n_init=c["n_init"], n_hid=c["n_hid"], n_blk_per_group=c["n_blk_per_group"],
                                    vocab_size=c["vocab_size"], device=torch.device("cpu"))
    vq.eval()
    param_seed, input_seed = SEEDS["dalle"]
    names, fill_sum = _fill(vq, param_seed)
    x = seeded_inputs("dalle", c, input_seed)
    with torch.no_grad():
        logits = vq.encoder(x["images"])
        top2 = logits.topk(2, dim=1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        dec = vq.decoder(x["decoder_in"])
    return {"config": dict(c), "param_seed": param_seed, "input_seed": input_seed, "param_layout": names,
            "param_checksum": fill_sum, "input_checksum": checksum(x), "code_margin": margin,
            "outputs": {"encoder": logits, "codes": logits.argmax(1), "decoder": dec}}


def _commit(root: Path, kind: str, any_commit: bool) -> str:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    if commit != SOURCES[kind][1] and not any_commit:
        raise SystemExit(f"{root}: at commit {commit}, not {SOURCES[kind][1]} ({SOURCES[kind][0]}); "
                         "check that one out, or pass --any-commit")
    return commit


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taming", type=Path, required=True, help="a CompVis/taming-transformers checkout")
    parser.add_argument("--llamagen", type=Path, required=True, help="a FoundationVision/LlamaGen checkout")
    parser.add_argument("--dalle", type=Path, required=True, help="an openai/DALL-E checkout")
    parser.add_argument("--any-commit", action="store_true", help="accept checkouts at other commits")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    golden = {"format": 1, "sources": {}}
    for kind, run in (("taming", run_taming), ("llamagen", run_llamagen), ("dalle", run_dalle)):
        root = getattr(args, kind)
        golden["sources"][kind] = {"repository": SOURCES[kind][0], "commit": _commit(root, kind, args.any_commit)}
        golden[kind] = case = run(root)
        case["outputs"] = {k: v.contiguous().clone() for k, v in case["outputs"].items()}  # (no shared storages)
        if case["code_margin"] < 1e-3:
            raise SystemExit(f"{kind}: two codes nearly tied (margin {case['code_margin']:.2e}): change its seeds")
        shapes = {k: tuple(v.shape) for k, v in case["outputs"].items()}
        print(f"{kind}: code margin {case['code_margin']:.3g}, outputs {shapes}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(golden, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
