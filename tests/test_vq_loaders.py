"""Public VQ checkpoints: state dicts with exactly the taming-transformers and LlamaGen key layouts.

The layouts are written out here from the two projects' documented module trees, independently of
vq/conv_vqgan.py, with small channel counts; random tensors of those shapes are saved as the projects
save them (Lightning `state_dict`, LlamaGen `model`) and must load with every key consumed.
"""
from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch
import yaml

from vq.conv_vqgan import load_llamagen_vq, load_taming_vqgan
from vq.tokenizer import load_image_tokenizer, save_image_tokenizer

CH, MULT, NRB, Z, EMBED, N_EMBED, RES = 32, [1, 2], 1, 16, 8, 24, 32


def _resblock(keys, p, cin, cout):
    keys.update({p + "norm1.weight": (cin,), p + "norm1.bias": (cin,), p + "conv1.weight": (cout, cin, 3, 3),
                 p + "conv1.bias": (cout,), p + "norm2.weight": (cout,), p + "norm2.bias": (cout,),
                 p + "conv2.weight": (cout, cout, 3, 3), p + "conv2.bias": (cout,)})
    if cin != cout:
        keys.update({p + "nin_shortcut.weight": (cout, cin, 1, 1), p + "nin_shortcut.bias": (cout,)})


def _attn(keys, p, c):
    keys.update({p + "norm.weight": (c,), p + "norm.bias": (c,)})
    for m in ("q", "k", "v", "proj_out"):
        keys.update({p + f"{m}.weight": (c, c, 1, 1), p + f"{m}.bias": (c,)})


def layout(style: str) -> dict[str, tuple]:
    taming = style == "taming"
    keys = {"encoder.conv_in.weight": (CH, 3, 3, 3), "encoder.conv_in.bias": (CH,)}
    c = CH
    for i, m in enumerate(MULT):  # encoder levels, full resolution first
        lvl = f"encoder.down.{i}." if taming else f"encoder.conv_blocks.{i}."
        for j in range(NRB):
            _resblock(keys, lvl + ("block." if taming else "res.") + f"{j}.", c, CH * m)
            c = CH * m
            if i == len(MULT) - 1:  # the lowest resolution (16 = attn_resolutions for taming)
                _attn(keys, lvl + f"attn.{j}.", c)
        if i != len(MULT) - 1:
            keys.update({lvl + "downsample.conv.weight": (c, c, 3, 3), lvl + "downsample.conv.bias": (c,)})
    mids = ["mid.block_1.", "mid.attn_1.", "mid.block_2."] if taming else ["mid.0.", "mid.1.", "mid.2."]
    for side in ("encoder.", "decoder."):
        _resblock(keys, side + mids[0], c, c), _attn(keys, side + mids[1], c), _resblock(keys, side + mids[2], c, c)
    keys.update({"encoder.norm_out.weight": (c,), "encoder.norm_out.bias": (c,),
                 "encoder.conv_out.weight": (Z, c, 3, 3), "encoder.conv_out.bias": (Z,),
                 "quant_conv.weight": (EMBED, Z, 1, 1), "quant_conv.bias": (EMBED,),
                 "quantize.embedding.weight": (N_EMBED, EMBED),
                 "post_quant_conv.weight": (Z, EMBED, 1, 1), "post_quant_conv.bias": (Z,),
                 "decoder.conv_in.weight": (c, Z, 3, 3), "decoder.conv_in.bias": (c,)})
    for k, i in enumerate(reversed(range(len(MULT)))):  # decoder levels, lowest resolution first
        lvl = f"decoder.up.{i}." if taming else f"decoder.conv_blocks.{k}."
        for j in range(NRB + 1):
            _resblock(keys, lvl + ("block." if taming else "res.") + f"{j}.", c, CH * MULT[i])
            c = CH * MULT[i]
            if i == len(MULT) - 1:
                _attn(keys, lvl + f"attn.{j}.", c)
        if i != 0:
            keys.update({lvl + "upsample.conv.weight": (c, c, 3, 3), lvl + "upsample.conv.bias": (c,)})
    keys.update({"decoder.norm_out.weight": (c,), "decoder.norm_out.bias": (c,),
                 "decoder.conv_out.weight": (3, c, 3, 3), "decoder.conv_out.bias": (3,)})
    if not taming:
        keys["quantize.codebook_used"] = (65536,)
    return keys


def random_state(keys):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in keys.items()}


def lightning_callback_class(monkeypatch):
    """Lightning's ModelCheckpoint class as pickle sees it (a class reference by module and name), from a module
    that exists only while the checkpoint is written: loading must not need (or import) Lightning."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    cls = type("ModelCheckpoint", (), {"__module__": name})
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.setitem(sys.modules, part, types.ModuleType(part))
    sys.modules[name].ModelCheckpoint = cls
    return cls


@pytest.fixture
def taming_files(tmp_path):
    state = random_state(layout("taming"))
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)  # training-only entries
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    # As taming's Lightning (1.0) saves it: callback states keyed by the callback's class.
    with pytest.MonkeyPatch.context() as monkeypatch:
        callbacks = {lightning_callback_class(monkeypatch): {"best_model_score": torch.tensor(0.5),
                                                             "best_model_path": ""}}
        torch.save({"state_dict": state, "global_step": 10, "callbacks": callbacks, "optimizer_states": [],
                    "pytorch-lightning_version": "1.0.8"}, tmp_path / "last.ckpt")
    cfg = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": EMBED, "n_embed": N_EMBED, "lossconfig": {"target": "x"},
        "ddconfig": {"double_z": False, "z_channels": Z, "resolution": RES, "in_channels": 3, "out_ch": 3,
                     "ch": CH, "ch_mult": MULT, "num_res_blocks": NRB, "attn_resolutions": [16], "dropout": 0.0}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "last.ckpt", tmp_path / "model.yaml", state


def check_tokenizer(tok, state, tmp_path):
    for name, tensor in tok.state_dict().items():  # every loaded tensor is the checkpoint's
        torch.testing.assert_close(tensor, state[name])
    images = torch.rand(2, 3, RES, RES) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, RES // 2, RES // 2) and codes.max() < N_EMBED
    assert tok.decode(codes).shape == images.shape
    save_image_tokenizer(tok, tmp_path / "export.pt")  # and it becomes a pipeline tokenizer
    assert torch.equal(load_image_tokenizer(tmp_path / "export.pt").encode(images), codes)


def test_taming_checkpoint_loads_every_key(taming_files, tmp_path):
    ckpt, config, state = taming_files
    check_tokenizer(load_taming_vqgan(ckpt, config), state, tmp_path)


def test_llamagen_checkpoint_loads_every_key(tmp_path):
    state = random_state(layout("llamagen"))
    # As LlamaGen's train_vq.py saves it: its argparse arguments too.
    args = argparse.Namespace(vq_model="VQ-16", codebook_size=N_EMBED, image_size=RES, results_dir="results")
    torch.save({"model": state, "steps": 10, "args": args}, tmp_path / "vq_ds16_c2i.pt")
    tok = load_llamagen_vq(tmp_path / "vq_ds16_c2i.pt", codebook_size=N_EMBED, codebook_embed_dim=EMBED,
                           ch_mult=tuple(MULT), z_channels=Z, image_size=RES, ch=CH, num_res_blocks=NRB)
    check_tokenizer(tok, state, tmp_path)


def test_mismatched_checkpoint_names_the_keys(taming_files, tmp_path):
    _, config, state = taming_files
    state = dict(state)
    state.pop("encoder.mid.attn_1.q.weight")
    state["encoder.mid.attn_2.q.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(KeyError, match=r"1 missing key\(s\) \['encoder.mid.attn_1.q.weight'\]; "
                                       r"1 unexpected key\(s\) \['encoder.mid.attn_2.q.weight'\]"):
        load_taming_vqgan(tmp_path / "bad.ckpt", config)
    torch.save({"state_dict": {**taming_files[2], "extra.weight": torch.zeros(1)}}, tmp_path / "extra.ckpt")
    with pytest.raises(KeyError, match=r"0 missing key\(s\) \[\]; 1 unexpected key\(s\) \['extra.weight'\]"):
        load_taming_vqgan(tmp_path / "extra.ckpt", config)  # (an extra key alone is refused too)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["params"]["ddconfig"]["double_z"] = True  # (a KL autoencoder's: twice the channels out)
    (tmp_path / "kl.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"kl\.yaml: only the VQGAN image setting \(double_z false"):
        load_taming_vqgan(taming_files[0], tmp_path / "kl.yaml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llamagen_vq(tmp_path / "missing.pt")


def test_a_checkpoint_holding_other_pickled_objects_is_refused_unrun(taming_files, tmp_path, monkeypatch):
    """Only Lightning's callback classes are read as stand-ins: any other pickled object is refused, naming it and
    how to keep only the weights of a file one trusts."""
    from common.checkpoints import CheckpointError

    _, config, state = taming_files
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "somelib", types.ModuleType("somelib"))
        sys.modules["somelib"].Thing = type("Thing", (), {"__module__": "somelib"})
        torch.save({"state_dict": state, "hparams": sys.modules["somelib"].Thing}, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match=r"odd.ckpt: refused: it holds a pickled somelib.Thing, .* if you trust "
                                              r"it, keep only its weights: torch.save\(\{'state_dict': torch.load"):
        load_taming_vqgan(tmp_path / "odd.ckpt", config)


def patchgan_layout(ndf: int = 64, n_layers: int = 3) -> dict[str, tuple]:
    """taming's NLayerDiscriminator (the pix2pix PatchGAN, `loss.discriminator.*` in its checkpoints): a 4x4
    conv with bias, n_layers bias-free 4x4 convs each followed by BatchNorm, a last 4x4 conv with bias."""
    keys, c, i = {"main.0.weight": (ndf, 3, 4, 4), "main.0.bias": (ndf,)}, ndf, 2
    for n in range(1, n_layers + 1):
        out = ndf * min(2**n, 8)
        keys[f"main.{i}.weight"] = (out, c, 4, 4)
        keys.update({f"main.{i + 1}.{p}": (out,) for p in ("weight", "bias", "running_mean", "running_var")})
        c, i = out, i + 3  # conv, BatchNorm, LeakyReLU
    keys.update({f"main.{i}.weight": (1, c, 4, 4), f"main.{i}.bias": (1,)})
    return keys


def test_vq_train_starts_from_a_taming_checkpoint(single_process, taming_files, tmp_path):
    """train.init_from=<taming last.ckpt> with model.kind=vqgan of its shape: every VQModel weight and, with
    loss.discriminator=patchgan, every PatchGAN tensor is the checkpoint's (the code-usage statistics taming does
    not keep start at zero), also once converted to an export; a model section of another shape is refused naming
    the key."""
    from common.config import ConfigError, load_typed
    from tests import laion_fixtures as lf
    from vq.config import VQConfig
    from vq.train import VQTrainer

    state = taming_files[2]
    disc = random_state(patchgan_layout())
    disc.update({f"main.{i}.num_batches_tracked": torch.tensor(7) for i in (3, 6, 9)})
    torch.save({"state_dict": {**state, **{f"loss.discriminator.{k}": v for k, v in disc.items()}}},
               tmp_path / "gan.ckpt")
    lf.write_tar(tmp_path / "data.tar", lf.synthetic_samples(2))
    shape = ["model.kind=vqgan", f"model.width={CH}", "model.ch_mult=[1,2]", f"model.res_blocks={NRB}", "model.patch=2",
             f"model.z_channels={Z}", f"model.code_dim={EMBED}", f"model.image_size={RES}",
             "model.attn_resolutions=[16]", "loss.perceptual=0", "loss.discriminator=patchgan", "loss.adversarial=0.8",
             "train.batch_size=2", f"train.init_from={tmp_path / 'gan.ckpt'}"]
    trainer = VQTrainer(load_typed(VQConfig, None, [*shape, f"model.codebook_size={N_EMBED}"]),
                        str(tmp_path / "data.tar"), tmp_path / "run")
    trainer.resume()  # no checkpoint in the run directory: step 0 from train.init_from
    for name, tensor in trainer.model.state_dict().items():
        expected = torch.zeros_like(tensor) if name in ("usage", "last_used", "step") else state[name]
        torch.testing.assert_close(tensor, expected, msg=name)
    for name, tensor in trainer.losses.discriminator.state_dict().items():
        torch.testing.assert_close(tensor, disc[name], msg=name)
    # Without a discriminator to take it, the log names the setting that leaves it out (it blamed loss.discriminator)
    from vq.init_weights import load_initial_weights
    assert load_initial_weights(str(tmp_path / "gan.ckpt"), trainer.model, None).endswith(
        "(not its discriminator: loss.adversarial=0: no discriminator)")
    # The same weights converted first (load_taming_vqgan + save_image_tokenizer, as vq/README shows).
    save_image_tokenizer(load_taming_vqgan(*taming_files[:2]), tmp_path / "converted.pt")
    converted = VQTrainer(load_typed(VQConfig, None, [*shape, f"model.codebook_size={N_EMBED}",
                                                      f"train.init_from={tmp_path / 'converted.pt'}"]),
                          str(tmp_path / "data.tar"), tmp_path / "run3")
    converted.resume()
    assert all(torch.equal(tensor, trainer.model.state_dict()[name])
               for name, tensor in converted.model.state_dict().items())
    wider = VQTrainer(load_typed(VQConfig, None, [*shape, "model.codebook_size=32"]), str(tmp_path / "data.tar"),
                      tmp_path / "run2")
    with pytest.raises(ConfigError, match=r"gan.ckpt does not fit the configured model \(1 other shape\(s\): "
                                          r"quantize.embedding.weight \(24, 8\) \(the model's: \(32, 8\)\)\)"):
        wider.resume()


def test_init_from_gives_taming_patchgan_weights_only_to_a_patchgan(taming_files, tmp_path):
    """load_initial_weights with a taming checkpoint: its PatchGAN weights go into a PatchGAN only (loading them
    into the default StyleGAN-style discriminator would be refused as a misfit), and a checkpoint without them
    leaves a PatchGAN as built, the log saying why; a missing file, a damaged export or a model.kind other than
    vqgan is a ConfigError naming train.init_from, not a traceback."""
    from common.config import ConfigError, load_typed
    from vq.config import VQConfig
    from vq.init_weights import load_initial_weights
    from vq.losses import Discriminator, PatchGAN
    from vq.train import build_model

    vq_state = {k: v for k, v in taming_files[2].items() if not k.startswith("loss.")}
    disc = {f"loss.discriminator.{k}": v for k, v in random_state(patchgan_layout()).items()}
    torch.save({"state_dict": {**vq_state, **disc}}, tmp_path / "gan.ckpt")
    torch.save({"state_dict": vq_state}, tmp_path / "vq_only.ckpt")
    shape = ["model.kind=vqgan", f"model.width={CH}", "model.ch_mult=[1,2]", f"model.res_blocks={NRB}",
             "model.patch=2", f"model.z_channels={Z}", f"model.code_dim={EMBED}", f"model.image_size={RES}",
             "model.attn_resolutions=[16]", f"model.codebook_size={N_EMBED}"]
    model = build_model(load_typed(VQConfig, None, shape))
    for name, discriminator, why in (("gan.ckpt", Discriminator(RES), "loss.discriminator is not patchgan"),
                                     ("vq_only.ckpt", PatchGAN(), "it has none")):
        built = {k: v.clone() for k, v in discriminator.state_dict().items()}
        assert load_initial_weights(str(tmp_path / name), model, discriminator).endswith(
            f"(not its discriminator: {why})")
        assert all(torch.equal(v, built[k]) for k, v in discriminator.state_dict().items())
    with pytest.raises(ConfigError, match=rf"^train.init_from={tmp_path / 'none.ckpt'}: no such file$"):
        load_initial_weights(str(tmp_path / "none.ckpt"), model, None)
    torch.save({"kind": "vqgan", "state_dict": vq_state}, tmp_path / "edited.pt")  # (an export without its config)
    with pytest.raises(ConfigError, match=rf"^train.init_from={tmp_path / 'edited.pt'}: .*without its config"):
        load_initial_weights(str(tmp_path / "edited.pt"), model, None)
    vqvae = build_model(load_typed(VQConfig, None, ["model.kind=vqvae", "model.width=16", "model.image_size=16"]))
    with pytest.raises(ConfigError, match=r"gan.ckpt: not a tokenizer export \(no `kind`\); only model.kind=vqgan"):
        load_initial_weights(str(tmp_path / "gan.ckpt"), vqvae, None)
