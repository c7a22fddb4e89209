"""Parameter counts of the presets on the meta device against the Parti paper and a real build."""
from __future__ import annotations

import pytest

from model_parallel.config import model_config
from model_parallel.param_count import PAPER_SIZES, count_parameters, main


@pytest.mark.parametrize("preset", sorted(PAPER_SIZES))
def test_parti_sizes_within_5_percent(single_process, preset):
    total = count_parameters(model_config(preset))["total"]
    assert abs(total / PAPER_SIZES[preset] - 1) < 0.05, (preset, total)


def test_meta_count_equals_built_model(single_process):
    from model_parallel.model import PartiModel
    from tests.conftest import debug_model_config

    built = sum(p.numel() for p in PartiModel(debug_model_config()).parameters())
    assert count_parameters(model_config("parti-debug"))["total"] == built == 313_088


@pytest.mark.parametrize("preset", ["parti-debug", "dalle-debug"])
def test_counts_by_part_equal_the_built_models_named_parameters(single_process, preset):
    """Each part against a hand sum over the built model's parameter names: the embeddings, the encoder with its
    final norm, the decoder layers, the head (its final norm and projections)."""
    from model_parallel.model import PartiModel
    from tests.conftest import debug_model_config

    parts = {"embeddings": ("text_embedding.", "image_embedding.", "embedding."),
             "encoder": ("encoder.", "encoder_norm."), "decoder": ("decoder.",), "head": ("head.",)}
    named = dict(PartiModel(debug_model_config(**{"model.preset": preset})).named_parameters())
    by_hand = {part: sum(p.numel() for name, p in named.items() if name.startswith(prefixes))
               for part, prefixes in parts.items()}
    assert sum(by_hand.values()) == sum(p.numel() for p in named.values())  # (every parameter in one part)
    assert by_hand["head"] > 0 and (by_hand["encoder"] > 0) == (preset == "parti-debug")
    counted = count_parameters(model_config(preset))
    assert counted == {**by_hand, "total": sum(by_hand.values())}


def test_command_prints_every_preset(single_process, capsys):
    main([])
    out = capsys.readouterr().out
    assert "20,540,899,328" in out.split("parti-20b")[1]
    for preset in ("parti-debug", "parti-tiny", *PAPER_SIZES):
        assert preset in out
    with pytest.raises(SystemExit, match=r"^config error: model.preset='nosuch': no file .*known presets: "):
        main(["--model", "parti-debug", "--model", "nosuch"])  # (a traceback, after parti-debug's row)
    assert capsys.readouterr().out == ""


def test_dalle_12b_exact_count_by_hand(single_process):
    """DALL-E's shape (64 layers, d 3968, 62 heads, 256 + 1024 tokens, text loss on), counted by hand."""
    d, f, layers = 3968, 4 * 3968, 64
    attention = 3 * d * d + 3 * d + d * d + d + 2 * d          # fused QKV, output projection, pre-norm
    mlp = d * f + f + f * d + d + 2 * d
    embeddings = 16384 * d + 256 * d + 8320 * d + 2 * 32 * d   # caption table, positions; image table (8193 -> 8320)
    head = 2 * d + 8192 * d + 16384 * d                        # final norm, image head, caption head
    total = layers * (attention + mlp) + embeddings + head
    assert count_parameters(model_config("dalle-12b"))["total"] == total == 12_292_300_544


def test_command_rows_hold_each_parts_count_and_the_papers_difference(single_process, capsys):
    """Each row of the table: the preset's count_parameters total and parts under their own headings, the paper's
    size and the relative difference to it (the count over the paper's, minus one); the small presets first;
    --model prints the presets asked for only."""
    main(["--model", "parti-debug", "--model", "parti-20b"])
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["preset", "total", "embeddings", "encoder", "decoder", "head", "paper"]
    assert [row.split()[0] for row in rows] == ["parti-debug", "parti-20b"]
    for row, preset in zip(rows, ("parti-debug", "parti-20b")):
        c = count_parameters(model_config(preset))
        numbers = [int(cell.replace(",", "")) for cell in row.split()[1:6]]
        assert numbers == [c["total"], c["embeddings"], c["encoder"], c["decoder"], c["head"]], preset
    assert rows[0].split()[6:] == [] and rows[1].split()[6:] == ["20.50B", "(+0.2%)"]  # 20,540,899,328 / 20.5e9
    from model_parallel.param_count import presets

    assert presets()[:4] == ["parti-debug", "parti-tiny", "dalle-debug", "parti-350m"]
