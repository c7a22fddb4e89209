"""Our re-implementations of the public VQ tokenizers compute what the reference code computes.

tests/data/vq_reference_outputs.pt holds the outputs of taming-transformers' VQGAN, LlamaGen's VQ model and DALL-E's
dVAE (tiny configurations; the reference repositories and commits are in the file and in
tests/reference/make_vq_golden.py, which wrote it from the reference code itself). Here our models get the same
parameters: the reference parameter names (ours, for the two VQGANs, whose loaders take the reference checkpoints'
names; DALL-E's `blocks.*.w` / `.b` for the dVAE) filled by the same fill_deterministic, the VQGANs loaded through
load_taming_vqgan / load_llamagen_vq from checkpoints laid out as the projects save them. The same seeded inputs
must then give the reference encoder outputs, codes and decoder outputs (to TOL). test_vq_loaders.py checks key
layouts only: a ResBlock without its second SiLU or an attention unscaled by 1/sqrt(C) passed it; here they fail.
The reference code is not a dependency: tests/reference/make_vq_golden.py says how to rewrite the file.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.reference.make_vq_golden import checksum, fill_deterministic, layout_digest, seeded_inputs
from vq.conv_vqgan import ConvVQGAN, load_llamagen_vq, load_taming_vqgan
from vq.dvae import DVAE

GOLDEN = Path(__file__).parent / "data" / "vq_reference_outputs.pt"
# Our float32 outputs differ from the reference's by up to 6e-6 here (SDPA against bmm-softmax-bmm, summation
# orders; the same under ATEN_CPU_CAPABILITY=default, avx2, avx512); a wrong activation, scale, padding or resampling
# moves them by 1e-2 to 1.
TOL = {"rtol": 1e-5, "atol": 2e-5}


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def reference_values(names_shapes: dict[str, tuple], case: dict) -> dict[str, torch.Tensor]:
    """fill_deterministic's values for the reference parameter names, after checking that they are the reference
    model's names and shapes and that the generator still draws what it drew for the file."""
    assert layout_digest(names_shapes) == case["param_layout"], (
        "the parameter names or shapes differ from the reference model's")
    values = fill_deterministic(names_shapes, case["param_seed"])
    assert checksum(values) == pytest.approx(case["param_checksum"], rel=1e-9), (
        "torch's generator draws other values than when tests/data/vq_reference_outputs.pt was written: "
        "rerun tests/reference/make_vq_golden.py")
    return values


def inputs(kind: str, case: dict) -> dict[str, torch.Tensor]:
    x = seeded_inputs(kind, case["config"], case["input_seed"])
    assert checksum(x) == pytest.approx(case["input_checksum"], rel=1e-9), "torch's generator changed: see above"
    return x


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def check_conv_vqgan(model: ConvVQGAN, kind: str, case: dict) -> None:
    x, out = inputs(kind, case), case["outputs"]
    with torch.no_grad():
        close(model.encoder(x["images"]), out["encoder"], f"{kind} encoder")
        close(model.decoder(x["decoder_in"]), out["decoder"], f"{kind} decoder")
    assert torch.equal(model.encode(x["images"]), out["codes"]), f"{kind} codes"
    close(model.decode(out["codes"]), out["decoded"].clamp(-1, 1), f"{kind} decode(codes)")


def test_taming_vqgan_matches_taming_transformers(golden, tmp_path):
    case = golden["taming"]
    c = case["config"]
    shape = ConvVQGAN("taming", c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"], c["embed_dim"],
                      c["n_embed"], c["resolution"], c["attn_resolutions"])
    state = reference_values({k: tuple(p.shape) for k, p in shape.named_parameters()}, case)
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")  # as taming's Lightning saves it
    ddconfig = {"double_z": False, "z_channels": c["z_channels"], "resolution": c["resolution"], "in_channels": 3,
                "out_ch": 3, "ch": c["ch"], "ch_mult": c["ch_mult"], "num_res_blocks": c["num_res_blocks"],
                "attn_resolutions": c["attn_resolutions"], "dropout": 0.0}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": {"params": {
        "embed_dim": c["embed_dim"], "n_embed": c["n_embed"], "ddconfig": ddconfig}}}))
    check_conv_vqgan(load_taming_vqgan(tmp_path / "last.ckpt", tmp_path / "model.yaml"), "taming", case)


def test_llamagen_vq_matches_llamagen(golden, tmp_path):
    case = golden["llamagen"]
    c = case["config"]
    args = {"codebook_size": c["codebook_size"], "codebook_embed_dim": c["codebook_embed_dim"],
            "ch_mult": tuple(c["ch_mult"]), "z_channels": c["z_channels"], "image_size": c["image_size"],
            "ch": c["ch"], "num_res_blocks": c["num_res_blocks"]}
    shape = ConvVQGAN("llamagen", c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"],
                      c["codebook_embed_dim"], c["codebook_size"], c["image_size"], [], l2_norm=True)
    state = reference_values({k: tuple(p.shape) for k, p in shape.named_parameters()}, case)
    state["quantize.codebook_used"] = torch.zeros(65536)  # LlamaGen's usage buffer
    torch.save({"model": state}, tmp_path / "vq.pt")  # as LlamaGen's train_vq.py saves it
    check_conv_vqgan(load_llamagen_vq(tmp_path / "vq.pt", **args), "llamagen", case)


def dalle_name(ours: str) -> str:
    """Our DVAE's parameter name -> DALL-E's: `encoder.group_1.block_1.res_path.conv_1.weight` is the Encoder's
    `blocks.group_1.block_1.res_path.conv_1.w` (its Conv2d keeps `w` and `b`)."""
    side, *path, leaf = ours.split(".")
    return ".".join([side, "blocks", *path, {"weight": "w", "bias": "b"}[leaf]])


def test_dvae_matches_dall_e(golden):
    case = golden["dalle"]
    c = case["config"]
    model = DVAE(image_size=c["image_size"], patch=8, n_hid=c["n_hid"], code_dim=c["n_init"],
                 codebook_size=c["vocab_size"], res_blocks=c["n_blk_per_group"]).eval()
    params = dict(model.named_parameters())
    values = reference_values({dalle_name(k): tuple(p.shape) for k, p in params.items()}, case)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[dalle_name(name)])
    x, out = inputs("dalle", case), case["outputs"]
    with torch.no_grad():
        close(model.logits(x["images"]), out["encoder"], "dVAE encoder logits")
        close(model.pixels(x["decoder_in"]), out["decoder"], "dVAE decoder")
    assert torch.equal(model.encode(x["images"]), out["codes"]), "dVAE codes"
