"""DALL-E's sparse attention (model.attention_pattern=dalle): the masks equal a pair-by-pair construction from
the paper's description, DALL-E's layer schedule, a row layer then a column layer reach every earlier image
token, the encoder-decoder under the masks equals the plain-PyTorch reference and its cached decoding (the
decoder-only one is tests/test_decoder_only.py's, whose preset uses them at every layout), and runs saved before
the key stay dense.

Run: python -m pytest tests/test_attention_patterns.py -q
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model_parallel.attention_patterns import AttentionPattern, dalle_kind, layer_pattern
from tests.conftest import debug_batch, debug_model_config
from tests.reference_model import ReferenceParti, dalle_masks, load_from_parti


def _cfg(arch: str, grid: int, kernel: int, layers: int = 4):
    from model_parallel.config import model_config

    sets = {"arch": arch, "image_grid": grid, "decoder_layers": layers, "attention_pattern": "dalle",
            "conv_attention_kernel": kernel, "text_seq_len": 5}
    if arch == "decoder_only":
        sets["encoder_layers"] = 0
    return model_config("", sets).validate()


@pytest.mark.parametrize("arch, grid, kernel", [("decoder_only", 4, 3), ("decoder_only", 5, 5),
                                                ("encoder_decoder", 6, 3), ("encoder_decoder", 4, 11),
                                                ("decoder_only", 8, 11), ("encoder_decoder", 6, 7)])  # (kernel >
# the grid, < twice it: the wrapped square's rows overlap)
def test_masks_equal_the_pairwise_construction(arch, grid, kernel):
    cfg = _cfg(arch, grid, kernel)
    size = cfg.stream_len
    everything = torch.arange(size)
    for layer, expected in enumerate(dalle_masks(cfg)):
        pattern = layer_pattern(cfg, layer)
        torch.testing.assert_close(pattern.mask(everything, size), expected, msg=f"layer {layer}")
        # A decoding step's queries (one position, a chunk) over the keys cached so far: rows of the same mask.
        for queries in (torch.tensor([size - 1]), torch.tensor([cfg.prefix_len + 3]), torch.arange(7, 11)):
            keys = int(queries.max()) + 1
            assert torch.equal(pattern.mask(queries, keys), expected[queries, :keys])
        # A static cache: keys past the query (unwritten yet) are never seen.
        assert not pattern.mask(torch.tensor([8]), size)[0, 9:].any()
    assert not torch.equal(dalle_masks(cfg)[0], dalle_masks(cfg)[1])  # row and column differ


def test_dalle_schedule_and_dense_default():
    kinds = [dalle_kind(i, 64) for i in range(64)]
    assert kinds[:8] == ["row", "column", "row", "row", "row", "column", "row", "row"]
    assert kinds[-1] == "conv" and kinds.count("conv") == 1
    assert kinds.count("column") == 16 and kinds.count("row") == 47
    assert layer_pattern(debug_model_config(), 0) is None  # parti presets stay dense


def test_row_then_column_reaches_every_earlier_image_token():
    """DALL-E's reason for alternating: a row layer, then a column layer, connect each image token to every
    image token before it (two hops), although each sees about one row's worth."""
    grid, prefix = 6, 3
    size, positions = prefix + grid * grid, torch.arange(prefix + grid * grid)
    row = AttentionPattern("row", prefix, grid).mask(positions, size).float()
    column = AttentionPattern("column", prefix, grid).mask(positions, size).float()
    reach = (column @ row) > 0  # the column layer reads what the row layer gathered
    assert torch.equal(reach, torch.ones(size, size, dtype=torch.bool).tril())
    assert row.sum(1).max() == prefix + grid + 1 and column.sum(1).max() == prefix + grid


def test_encoder_decoder_under_the_masks_equals_reference(single_process):
    from model_parallel.model import PartiModel
    from model_parallel.state import seed_everything

    cfg = debug_model_config(**{"model.attention_pattern": "dalle", "model.conv_attention_kernel": 3,
                                "model.decoder_layers": 4})  # row, column, row, conv
    seed_everything(0)
    model = PartiModel(cfg, init_seed=0).eval()
    ref = load_from_parti(ReferenceParti(cfg, kind="math"), model.state_dict())
    text, codes = debug_batch(cfg)
    with torch.no_grad():
        logits = model(text, codes).transpose(0, 1)
        torch.testing.assert_close(logits, ref(text, codes), rtol=1e-5, atol=1e-5)
        dense = PartiModel(dataclasses.replace(cfg, attention_pattern="dense"), init_seed=0).eval()
        dense.load_state_dict(model.state_dict())
        assert not torch.allclose(dense(text, codes).transpose(0, 1), logits, atol=1e-3)  # the masks matter
        inputs = model.decoder_input(codes)
        for static, chunk in ((True, 1), (False, 1), (False, 5)):  # static and growing caches under the masks
            caches, memory, mask = model.start_decoding(text, static=static)
            steps = [model.decode_step(inputs[:, i:i + chunk], caches, memory, mask)
                     for i in range(0, inputs.shape[1], chunk)]
            torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=1e-5, atol=1e-5, msg=f"{static} {chunk}")


def test_a_run_saved_before_the_key_resumes_dense_and_only_so():
    """A dalle-debug run from before model.attention_pattern was dense: resuming it under today's preset (the
    masks) is refused, naming the pattern; with model.attention_pattern=dense it resumes (the conv kernel, 3
    in the preset against the default 11 the old run compares with, does nothing in a dense network); a kernel
    change under the masks is refused."""
    from training.config import config_to_dict, load_config, resume_changes

    def config(*sets):
        return load_config("configs/train/debug.yaml", ["model.preset=dalle-debug", *sets]).validate()

    saved = config_to_dict(config())
    del saved["model"]["attention_pattern"], saved["model"]["conv_attention_kernel"]
    refused = resume_changes(saved, config())["refused"]
    assert [key for key, _, _ in refused] == ["model.attention_pattern", "model.conv_attention_kernel"]
    assert resume_changes(saved, config("model.attention_pattern=dense"))["refused"] == []
    assert resume_changes(config_to_dict(config()), config("model.conv_attention_kernel=5"))["refused"] != []


def test_a_saved_section_without_the_key_stays_dense():
    """An export written before model.attention_pattern existed was dense: it is read so, although its preset
    (dalle-debug) now asks for the masks; the saved section is the run's resolved config."""
    from common.config import to_dict
    from model_parallel.config import model_config, saved_model_config

    section = to_dict(model_config("dalle-debug"))
    assert section["attention_pattern"] == "dalle"
    del section["attention_pattern"], section["conv_attention_kernel"]
    assert saved_model_config(section).attention_pattern == "dense"


def test_the_command_draws_each_mask(capsys):
    from model_parallel.attention_patterns import main

    main(["--grid", "3", "--prefix", "2", "--kernel", "3"])
    blocks = capsys.readouterr().out.strip().split("\n\n")
    assert [b.splitlines()[0].split()[0] for b in blocks] == ["row", "column", "conv"]
    for block, kind in zip(blocks, ("row", "column", "conv")):
        lines = block.splitlines()[1:]
        mask = AttentionPattern(kind, 2, 3, 3).mask(torch.arange(11), 11)
        assert lines == ["".join("#" if x else "." for x in row) for row in mask.tolist()]
    assert blocks[0].splitlines()[1 + 6] == "##.####...."  # cell (1, 1): cells 1..4 of the raster order
