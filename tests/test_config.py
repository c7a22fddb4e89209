"""Typed config: presets, dotted overrides, validation messages, the resolved config on disk."""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import torch

from training.config import ConfigError, describe, layout_of, load_config, save_config


def test_preset_and_overrides_in_any_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 128\n  preset: parti-350m\ntrain:\n  steps: 3\n")
    cfg = load_config(path, ["parallel.tp=2", "train.lr=3e-4", "model.num_heads=8"])
    assert cfg.model.encoder_layers == 12 and cfg.model.decoder_layers == 12  # from the preset
    assert cfg.model.hidden_size == 128 and cfg.model.num_heads == 8          # file / override win
    assert cfg.parallel.tp == 2 and cfg.train.steps == 3 and cfg.train.lr == 3e-4
    assert isinstance(cfg.train.lr, float)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=parti-debug", "parallel.sequence_parallel=true", "parallel.tp=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=100", "model.num_heads=3"], "model.hidden_size=100 must be divisible by model.num_heads=3"),
    (["model.num_heads=4", "parallel.tp=8"], "model.num_heads=4 must be divisible by parallel.tp=8"),
    (["model.decoder_layers=3", "parallel.pp=2"], "model.decoder_layers=3 must be divisible by parallel.pp=2"),
    (["parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage=2 needs parallel.pp=1"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "parallel.zero_stage=1"],
     "parallel.sequence_parallel=true works with parallel.pp=1 and parallel.zero_stage=0 only"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "model.text_seq_len=9"],
     "model.text_seq_len=9 must be divisible by parallel.tp=2 with sequence parallelism"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "model.image_grid=3"],
     "model.image_seq_len (image_grid**2)=9 must be divisible by parallel.tp=2 with sequence parallelism"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10 must be divisible"),
    (["kernels.attention=flash3"], "kernels.attention='flash3' must be one of auto, sdpa, math"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["model.text_eos_id=0"], "model.text_pad_id and model.text_eos_id must differ (both 0)"),  # (NaN losses)
    (["model.text_pad_id=-1"], "model.text_pad_id=-1 must be a token id below model.text_vocab_size="),
    (["model.vocab_pad_multiple=0"], "model.vocab_pad_multiple=0 must be positive"),  # (ZeroDivisionError)
    (["model.layernorm_eps=-1.0"], "model.layernorm_eps=-1.0 must be positive"),  # (NaN losses)
    (["model.init_std=-0.02"], "model.init_std=-0.02 must be >= 0"),
    (["model.text_eos_id=1000"], "model.text_eos_id=1000 must be a token id below model.text_vocab_size=1000"),
    (["model.encoder_layers=0"], "model.encoder_layers=0 must be positive"),
    (["model.conv_attention_kernel=-1"], "model.conv_attention_kernel=-1 must be a positive odd number"),
    (["model.dropout=-0.1"], "model.dropout=-0.1 must be in [0, 1)"),
    (["model.attention_dropout=1.0"], "model.attention_dropout=1.0 must be in [0, 1)"),
    (["model.caption_drop_prob=1.0"], "model.caption_drop_prob=1.0 must be in [0, 1)"),
    (["parallel.activation_checkpointing=some"], "parallel.activation_checkpointing='some' must be one of none,"),
    (["parallel.tp=0"], "parallel.tp=0 must be >= 1"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4 must be 0, 1, 2 or 3"),
    (["parallel.zero_overlap_comm=true"], "parallel.zero_overlap_comm applies to ZeRO 1-3"),
    (["parallel.zero_bucket_size=0", "parallel.zero_stage=1"], "parallel.zero_bucket_size=0 must be >= 1"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "parallel.pp=2"],
     "parallel.sequence_parallel=true works with parallel.pp=1 and parallel.zero_stage=0 only"),
    (["parallel.tp=2", "model.image_vocab_size=63"], "model.image_vocab_size=63 must be divisible by parallel.tp=2"),
    (["parallel.tp=8", "model.num_heads=8", "model.vocab_pad_multiple=4"],
     "model.vocab_pad_multiple=4 must be divisible by parallel.tp=8"),
    (["train.adam_beta2=1.0"], "train.adam_beta2=1.0 must be in [0, 1)"),
    (["train.adam_eps=0"], "train.adam_eps=0.0 must be > 0"),
    (["train.ema_decay=1"], "train.ema_decay=1.0 must be in [0, 1) (0: no moving average)"),
    (["train.ema_warmup=true"], "train.ema_warmup warms up the moving average's decay: it needs train.ema_decay > 0"),
    (["train.optimizer=adafactor", "parallel.pp=2", "train.precision=bf16", "model.decoder_layers=2"],
     "train.optimizer=adafactor with parallel.pp > 1 needs train.precision=fp32"),  # (its first save failed)
    (["train.optimizer=sgd"], "train.optimizer='sgd' must be one of adamw, adafactor"),  # (else AdamW, silently)
    (["train.optimizer=adafactor", "parallel.zero_stage=1"], "train.optimizer=adafactor needs parallel.zero_stage=0"),
    (["model.init_text_encoder=/nowhere", "parallel.zero_stage=3"],
     "model.init_text_encoder needs parallel.zero_stage < 3"),
    (["model.freeze_text_encoder=true", "parallel.pp=2", "parallel.zero_stage=1", "model.decoder_layers=2"],
     "model.freeze_text_encoder with parallel.pp > 1 and parallel.zero_stage >= 1 needs train.precision=bf16"),
    (["train.peak_tflops=-1"], "train.peak_tflops=-1.0 must be >= 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0 must be >= 1"),  # (else a ZeroDivisionError)
    (["train.global_batch_size=0"], "train.global_batch_size=0 must be >= 1"),
    (["train.eval_batches=0"], "train.eval_batches=0 must be >= 1"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 must be >= 0"),
    (["train.grad_clip=-1"], "train.grad_clip=-1.0 must be >= 0"),
    # (synthetic is the default: shards named without data.synthetic=false were never read)
    (["data.shards=codes/"], "data.shards='codes/' with data.synthetic=true: the run would train on generated"),
])
def test_validation_names_field_and_rule(overrides, message):
    cfg = load_config(None, ["model.preset=parti-debug", *overrides])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert message in str(err.value)


@pytest.mark.parametrize("path", [None, "configs/train/debug.yaml"])
def test_a_model_section_that_is_not_one_is_refused_naming_it(path):
    """(An AttributeError from the preset check, a TypeError without a file.)"""
    with pytest.raises(ConfigError, match=r"^model must be a section \(mapping\), got 3$"):
        load_config(path, ["model=3"])


def test_world_size_must_fit_layout():
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "model.num_heads=4", "model.decoder_layers=2"])
    cfg.validate(world_size=4)
    with pytest.raises(ConfigError, match="world size 6 must be divisible by parallel.tp x parallel.pp = 4"):
        cfg.validate(world_size=6)
    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel size = 4 x 4"):
        cfg.validate(world_size=4)
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel size = 4 x 4"):
        layout_of(cfg, 4)  # (the trainer's layout: the batch rules too, not only the world size's)


def test_edges_of_the_model_rules_are_allowed_and_a_saved_old_key_is_read_under_its_new_name():
    from model_parallel.config import saved_model_config

    load_config(None, ["model.preset=parti-debug", "model.init_std=0", "model.text_eos_id=999"]).validate()
    assert saved_model_config({"cfg_drop_prob": 0.3}).caption_drop_prob == 0.3


def test_a_layout_knows_its_sizes_and_says_why_it_does_not_fit():
    from model_parallel.layout import ParallelConfig, ParallelLayout

    layout = ParallelLayout.of(ParallelConfig(tp=2, pp=4), world_size=16)
    assert (layout.dp, layout.world_size) == (2, 16)
    assert layout.record() == {"world_size": 16, "tp": 2, "pp": 4}
    assert layout.fits(micro_batch=4, global_batch=16) is None
    assert "global batch 12 is not a multiple of micro-batch 4 x DP 2" in layout.fits(micro_batch=4, global_batch=12)
    dalle = load_config(None, ["model.preset=dalle-debug", "model.text_vocab_size=999"]).model
    assert "model.text_vocab_size=999 must be divisible by parallel.tp=2" in layout.fits(dalle)


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_sise=3"], "unknown key(s) model.hidden_sise (model.hidden_sise: did you mean model.hidden_size?)"),
    (["train..lr=1"], "override 'train..lr=1': an empty key in 'train..lr'"),
    (["train.wandb_project=2024"],
     "train.wandb_project=2024 must be of type str (YAML read the text as a int: quote it"),
    (["model=null"], "model must be a section (mapping), got None"),  # (else the default model, silently)
    (["model.cfg_drop_prob=0.2"], "model.cfg_drop_prob was renamed model.caption_drop_prob: write "
                                  "model.caption_drop_prob=0.2"),
    (["train.steps=ten"], "train.steps='ten' must be of type int"),
    (["model.preset=parti-99b"], "model.preset='parti-99b': no file"),
    (["parallel"], "must look like section.key=value"),
    (["train.steps=010"], "train.steps=010: YAML reads a number with a leading zero as octal"),  # (else 8)
    (["train.wandb_project=007"], "quote it past the shell: train.wandb_project=\"'007'\")"),  # (the shell ate '007')
    (["train.steps=1:30"], "train.steps=1:30: YAML 1.1 reads digits joined by ':' as a base-60 number (90)"),
    (["train.lr=inf"], "train.lr=inf must be a finite number"),  # (else it passed lr > 0)
    (["train.lr=.nan"], "train.lr=nan must be a finite number"),
    (["train.wandb_project=a #b"], "'#' after a space starts a YAML comment"),  # (else 'a')
    (["train.wandb_project='a #b'", "train.seed=-1"], "train.seed=-1 must be >= 0"),  # (quoted: taken whole)
    (["train.steps=[1"], "override train.steps=[1: not a YAML value"),
    (["train.steps=-010"], "train.steps=-010: YAML reads a number with a leading zero as octal"),  # (else -8)
    (["train.lr=1:30.5"], "train.lr=1:30.5: YAML 1.1 reads digits joined by ':' as a base-60 number (90.5)"),
    (["train.wandb_project=a\t#b"], "starts a YAML comment"),  # (a tab before the '#': else 'a')
    (["train.wandb_project=#b"], "starts a YAML comment"),  # (else null)
    (["train.steps=true"], "train.steps=True must be of type int"),  # (a bool is an int to isinstance)
    (["train.lr=true"], "train.lr=True must be of type float"),  # (else 1.0)
    (["train.wandb_project=2024-01-01"], "YAML read the text as a date: quote it"),
    (["train=1", "train.steps=5"], "override 'train.steps': 'train' is not a section"),  # (a TypeError before)
    (["train.skip_steps=5-3"], "train.skip_steps='5-3': expected steps and ranges of steps from 1 on, e.g. "
                               "1201-1300,1450 ('5-3' is not one)"),
    (["train.skip_steps=0"], "train.skip_steps=0: expected steps and ranges"),
    (["train.skip_steps=3-4,x"], "('x' is not one)"),
    (["train.skip_steps=3-4,"], "('' is not one)"),
    (["train.skip_steps=1.5"], "train.skip_steps=1.5: expected steps and ranges of steps, e.g. 1201-1300,1450"),
    (["train.skip_steps=[3]"], "train.skip_steps=[3]: expected steps and ranges of steps"),
])
def test_bad_input_is_refused_clearly(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides).validate()
    assert message in str(err.value)


def test_skip_steps_reads_steps_and_ranges():
    from training.config import step_ranges

    assert step_ranges("", "k") == [] and step_ranges(1450, "k") == [(1450, 1450)]
    assert step_ranges(" 1450, 1201 - 1300,7", "k") == [(7, 7), (1201, 1300), (1450, 1450)]
    assert load_config(None, ["train.skip_steps=1201-1300,1450"]).validate().train.skip_steps == "1201-1300,1450"
    assert load_config(None, ["train.skip_steps=9"]).validate().train.skip_steps == 9


@pytest.mark.parametrize("override, value", [
    ("train.wandb_project=", ""),  # (YAML reads nothing as null, which a str key refuses)
    (" train.steps = 5 ", 5),
    ("train.wandb_project=08:15", "08:15"),  # (YAML 1.1 reads it as text, not base 60: taken as written)
    ("train.wandb_project=0:30", "0:30"),
    ("train.wandb_project=09", "09"),  # (not an octal number either)
])
def test_overrides_that_yaml_reads_as_meant_are_taken(override, value):
    key = override.split("=")[0].strip().split(".")[1]
    assert getattr(load_config(None, [override]).train, key) == value


def test_an_optional_number_is_null_or_a_number():
    """`float | None` (sampling.guidance_scale): null, a float (an int made one), or refused naming the key."""
    from common.config import build
    from evaluation.config import SamplingSettings

    assert build(SamplingSettings, {"guidance_scale": None}).guidance_scale is None
    scale = build(SamplingSettings, {"guidance_scale": 3}).guidance_scale
    assert scale == 3.0 and isinstance(scale, float)
    with pytest.raises(ConfigError, match=r"^sampling\.guidance_scale='abc' must be of type float$"):
        build(SamplingSettings, {"guidance_scale": "abc"}, "sampling.")


@pytest.mark.parametrize("value, message", [
    ("5", r"^model\.ch_mult=5 must be a list"),  # (vq.train's vqgan_shape met it as a TypeError traceback)
    ("abc", r"^model\.ch_mult='abc' must be a list"),
    ("[1, 2.5]", r"^model\.ch_mult\[1\]=2\.5 must be of type int$"),
    ("[true, 2]", r"^model\.ch_mult\[0\]=True must be of type int$"),
])
def test_a_list_key_is_a_list_of_its_type_or_null(value, message):
    """`list[int] | None` (vq's model.ch_mult): null, a list of ints, or refused naming the key (and the item)."""
    from common.config import load_typed
    from vq.config import VQConfig

    assert load_typed(VQConfig, None, ["model.ch_mult=null"]).model.ch_mult is None
    assert load_typed(VQConfig, None, ["model.ch_mult=[1, 2]"]).model.ch_mult == [1, 2]
    with pytest.raises(ConfigError, match=message):
        load_typed(VQConfig, None, [f"model.ch_mult={value}"])


def test_a_subclass_documents_its_keys_in_its_own_words():
    """describe() takes a key's documentation from the class that last declares it (SamplingSettings over
    SamplingConfig, whose guidance_scale says None where a config file says null)."""
    from evaluation.config import SamplingSettings

    assert "guidance_scale: 1.2  # Classifier-free guidance scale (null: unguided;" in describe(SamplingSettings())


def test_an_empty_or_odd_config_file(tmp_path):
    """An empty file is all defaults; a key YAML cannot hash (a list) is refused as bad YAML, not a TypeError."""
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == load_config(None)
    path.write_text("train:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match="empty.yaml: not valid YAML .*unhashable"):
        load_config(path)


def test_the_resolved_config_keeps_the_order_of_the_fields(tmp_path):
    """config.yaml lists sections and keys as the dataclasses declare them (model first), not sorted."""
    import dataclasses

    import yaml

    cfg = load_config(None)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == [f.name for f in dataclasses.fields(cfg)]
    assert list(saved["train"]) == [f.name for f in dataclasses.fields(cfg.train)]


def test_a_section_given_whole_keeps_the_overrides_before_it():
    """train={steps: 10} after train.lr=5e-4 replaced the section the first had made: the lr was lost."""
    cfg = load_config("configs/train/debug.yaml", ["train.lr=5e-4", "train={steps: 10}"])
    assert (cfg.train.lr, cfg.train.steps) == (5e-4, 10)


def test_a_preset_override_of_a_saved_config_is_refused(tmp_path):
    """A run's config.yaml sets every model key: model.preset=<another> over it changed the name only, and the run
    trained the file's model as the new preset. A config that sets only some keys takes the new preset under
    them; the file's own preset again changes nothing."""
    save_config(load_config("configs/train/debug.yaml"), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"model.preset=parti-tiny: .*config.yaml sets every key of that preset in "
                                          r"its model section .* train parti-debug's model under the name parti-tiny"):
        load_config(tmp_path / "config.yaml", ["model.preset=parti-tiny"])
    assert load_config(tmp_path / "config.yaml", ["model.preset=parti-debug"]).model.hidden_size == 64
    (tmp_path / "some.yaml").write_text("model:\n  preset: parti-debug\n  dropout: 0.2\n")
    cfg = load_config(tmp_path / "some.yaml", ["model.preset=parti-tiny"]).model
    assert (cfg.hidden_size, cfg.dropout) == (load_config(None, ["model.preset=parti-tiny"]).model.hidden_size, 0.2)
    # Some of the new preset's keys set (to other values): they apply over it, as any model key in the file does.
    (tmp_path / "some.yaml").write_text("model:\n  preset: parti-debug\n  hidden_size: 64\n")
    cfg = load_config(tmp_path / "some.yaml", ["model.preset=parti-tiny"]).model
    assert (cfg.hidden_size, cfg.decoder_layers) == (
        64, load_config(None, ["model.preset=parti-tiny"]).model.decoder_layers)
    # The file's own preset again, over a saved config whose model differs from that preset: nothing changes.
    save_config(load_config("configs/train/debug.yaml", ["model.decoder_layers=3"]), tmp_path / "other.yaml")
    assert load_config(tmp_path / "other.yaml", ["model.preset=parti-debug"]).model.decoder_layers == 3


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    for text, kind in (("[]\n", "list"), ("false\n", "bool"), ("0\n", "int"), ("''\n", "str")):
        path.write_text(text)  # (an empty list or a false value was taken for an empty file: all defaults)
        with pytest.raises(ConfigError, match=f"bad.yaml: expected a mapping of sections, got {kind}$"):
            load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    path.write_bytes(b"train:\n  wandb_project: caf\xe9\n")  # (latin-1: a traceback before)
    with pytest.raises(ConfigError, match=r"bad.yaml: not UTF-8 text \(invalid continuation byte at byte 27\)"):
        load_config(path)
    path.write_text("train:\n  2: 2\n  yes: 3\n")  # (keys YAML reads as a number and a bool: a TypeError before)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.2, train.True"):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-3\n  steps: 5\n  lr: 3.0e-3\n")  # (PyYAML would keep the last lr)
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'lr' appears twice in one section \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("train: {steps: [}\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    path.write_text("base: &b {lr: 1.0e-3, steps: 5}\ntrain:\n  <<: *b\n  lr: 3.0e-3\n")  # (a merge's keys: defaults)
    with pytest.raises(ConfigError, match="unknown key.*base"):
        load_config(path)
    path.write_text("model: {dropout: 0.1}\ntrain: {dropout: 0.1, steps: 5}\n")  # (one key in two sections is fine)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)


def test_every_field_is_documented():
    text = describe(load_config(None))
    for line in text.splitlines():
        assert line.rstrip().split("#", 1)[1].strip(), f"undocumented: {line}"
    assert "parallel.tp" not in text and "  tp: 1  # Tensor-parallel size" in text


@pytest.mark.parametrize("decay, middle, end", [("cosine", 0.55, 0.1), ("linear", 0.55, 0.1), ("constant", 1.0, 1.0)])
def test_lr_schedule(decay, middle, end):
    from common.schedule import lr_lambda

    cfg = load_config(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=4", "train.steps=14",
                             f"train.lr_decay={decay}"])
    f = lr_lambda(cfg.train)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(middle) and f(14) == pytest.approx(end) and f(100) == pytest.approx(end)


@pytest.mark.parametrize("decay", ["minus_sqrt", "linear", "cosine", "exponential"])
def test_a_stable_phase_gives_megatron_core_wsd_schedule(decay):
    """train.lr_stable_steps: after a 3-step warmup, 7 steps at lr, then `decay` over 6 steps to min_lr and min_lr
    after: the rates of megatron-core's OptimizerParamScheduler with lr_decay_style WSD (its lr_decay_steps count
    warmup, stable and decay steps; lr_wsd_decay_style = the shape) at every step after the warmup."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from common.schedule import lr_lambda

    cfg = load_config(None, ["train.lr=3e-3", "train.min_lr=3e-5", "train.warmup_steps=3", "train.steps=30",
                             "train.lr_stable_steps=7", f"train.lr_decay={decay}", "train.lr_decay_steps=6"])
    f = lr_lambda(cfg.train)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    megatron = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=3e-3, min_lr=3e-5, lr_warmup_steps=3,
                                       lr_decay_steps=3 + 7 + 6, lr_decay_style="WSD", start_wd=0.0, end_wd=0.0,
                                       wd_incr_steps=30, wd_incr_style="constant", wsd_decay_steps=6,
                                       lr_wsd_decay_style=decay)
    reference = []
    for step in range(30):
        megatron.num_steps = step
        reference.append(megatron.get_lr(opt.param_groups[0]))
    assert [3e-3 * f(s) for s in range(3, 30)] == pytest.approx(reference[3:], rel=1e-9)
    assert reference[3:11] == pytest.approx([3e-3] * 8) and 3e-5 < reference[12] < reference[10]  # (both phases)
    to_the_end = lr_lambda(load_config(None, ["train.lr=3e-3", "train.min_lr=3e-5", "train.warmup_steps=3",
                                              "train.lr_stable_steps=7", "train.steps=16", f"train.lr_decay={decay}",
                                              "train.lr_decay_steps=0"]).train)
    assert [to_the_end(s) for s in range(3, 30)] == [f(s) for s in range(3, 30)]  # (0: the decay ends at train.steps)


def test_the_readmes_cool_down_decays_from_its_branch_step_to_min_lr():
    """training/README's WSD cool-down command (a branch from step 20000 of the preset's run): the peak rate up to
    the branch's step, then the decay, min_lr at its last step (with the preset's warmup, not another's)."""
    from common.schedule import lr_lambda

    (command,) = [c for c in _doc_code("training/README.md") if "train.lr_stable_steps=" in c and "--config" in c]
    cfg = load_config(re.search(r"--config (\S+)", command).group(1), _overrides(command))
    f, branch = lr_lambda(cfg.train), int(re.search(r"step_(\d+)", command).group(1))
    assert f(branch - 1) == f(branch) == 1.0 and f(branch + 1) < 1.0
    assert cfg.train.lr * f(cfg.train.steps - 1) == pytest.approx(cfg.train.min_lr, rel=0.05)


def test_lr_decay_steps_end_the_cosine_early_as_torch_cosine_annealing_does():
    """train.lr_decay_steps=10 of 30 steps: after a 5-step warmup, the rates of torch's CosineAnnealingLR
    (T_max 10, eta_min = min_lr), then min_lr to the end (DALL-E's dVAE: 1.2M steps of decay in 3M)."""
    from common.schedule import lr_lambda

    cfg = load_config(None, ["train.lr=2e-3", "train.min_lr=1e-4", "train.warmup_steps=5", "train.steps=30",
                             "train.lr_decay_steps=10"])
    f = lr_lambda(cfg.train)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4)
    reference = []
    for _ in range(11):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert [2e-3 * f(s) for s in range(5, 16)] == pytest.approx(reference, rel=1e-9)
    assert [2e-3 * f(s) for s in range(15, 30)] == pytest.approx([1e-4] * 15, rel=1e-12)


@pytest.mark.parametrize("override, message", [
    ("train.lr_decay=step", r"train\.lr_decay='step' must be one of cosine, linear, minus_sqrt, exponential, constant"),
    ("train.min_lr=-0.5", r"train\.min_lr=-0\.5 must be >= 0"),
    ("train.lr_decay_steps=-1", r"train\.lr_decay_steps=-1 must be >= 0"),
    ("train.lr_stable_steps=-1", r"train\.lr_stable_steps=-1 must be >= 0 \(steps at lr between the warmup"),
    ("train.lr=1e-4", r"train\.min_lr=0\.0003 must be <= train\.lr=0\.0001: the cosine decay goes from lr down"),
])
def test_bad_schedule_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/train/debug.yaml", ["train.lr_decay=cosine", override]).validate()
    if override == "train.lr=1e-4":  # (a constant rate never reaches min_lr)
        load_config("configs/train/debug.yaml", ["train.lr_decay=constant", override]).validate()


def test_the_schedules_edges_are_allowed_and_a_zero_rate_is_refused():
    """min_lr=0 (decay to nothing) and warmup_steps=0 are valid; lr=0 is refused naming lr (the schedule is
    relative to it), before the min_lr <= lr rule it would also break."""
    load_config("configs/train/debug.yaml", ["train.min_lr=0", "train.warmup_steps=0"]).validate()
    with pytest.raises(ConfigError, match=r"train\.lr=0\.0 must be > 0"):
        load_config("configs/train/debug.yaml", ["train.lr=0"]).validate()


TRAINING_PRESETS = ["parti-350m", "parti-750m", "parti-3b", "parti-20b"]


@pytest.mark.parametrize("name", TRAINING_PRESETS)
def test_training_presets_fit_their_cluster_with_the_planners_layout(name):
    """configs/train/parti-*.yaml: valid at the world size of the cluster its header states, and its layout,
    micro-batch and recomputation are the planner's fastest for that cluster, by the planner command in its
    header (so preset and planner do not drift apart)."""
    import re
    from pathlib import Path

    from model_parallel.layout import ParallelLayout
    from training.config import load_config
    from training.plan import Hardware, plan, zero_stages

    path = f"configs/train/{name}.yaml"
    cluster = re.search(r"^# cluster: (\d+) nodes x (\d+) GPUs of (\d+) GB$", Path(path).read_text(), re.MULTILINE)
    nodes, gpus, memory = map(int, cluster.groups())
    cfg = load_config(path).validate(world_size=nodes * gpus)
    t, p = cfg.train, cfg.parallel
    ParallelLayout.of(p, nodes * gpus).check(cfg.model, t.micro_batch_size, t.global_batch_size)
    assert cfg.model.preset == name and (t.steps, t.global_batch_size) == (450_000, 8192)
    assert t.min_lr == pytest.approx(0.025 * t.lr)  # the paper's final ratio
    assert (cfg.model.text_seq_len, cfg.model.image_seq_len) == (128, 1024)
    command = re.search(r"^#   python -m training\.plan (.*)$", Path(path).read_text(), re.MULTILINE).group(1).split()
    flags = dict(zip(command[::2], command[1::2]))  # the header's planner command: what it plans for is the preset's
    assert (flags["--model"], int(flags["--nodes"]), int(flags["--global-batch"]), float(flags["--dropout"])) == (
        name, nodes, t.global_batch_size, cfg.model.dropout)
    best = plan(name, nodes, Hardware(gpus_per_node=gpus), memory, t.global_batch_size, precision=t.precision,
                dropout=cfg.model.dropout, stages=zero_stages(flags.get("--zero", "0,1,2,3")))[0][0]
    assert ((best.tp, best.pp, best.zero, best.micro_batch, best.recompute)
            == (p.tp, p.pp, p.zero_stage, t.micro_batch_size, p.activation_checkpointing))


def test_a_command_leaves_the_objects_alive_at_exit_to_the_os(tmp_path):
    """common.cli.command registers a gc.freeze for the interpreter's exit, so its last collection skips the
    objects alive then (~2 s per process with torch, megatron-core and DeepSpeed imported). A handler registered
    before it runs after it (exit handlers run last-in, first-out) and sees them frozen; the process's other exit
    work (a flushed file) still happens."""
    import subprocess
    import sys

    code = f"""
import atexit, gc
atexit.register(lambda: open({str(tmp_path / 'frozen')!r}, 'w').write(str(gc.get_freeze_count())))
from common.cli import command
with command():
    log = open({str(tmp_path / 'log')!r}, 'w')
    log.write('written')
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    assert int((tmp_path / "frozen").read_text()) > 1000 and (tmp_path / "log").read_text() == "written"



DEAF_HELPER = """
import multiprocessing, os, time
from common.cli import command
from common.preemption import ignore_stop_signals

def deaf():  # a helper that ignores SIGTERM, as data workers do
    ignore_stop_signals()
    for fd in (1, 2):  # (the test reads the command's output to its end: an orphan must not hold it open)
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    time.sleep(600)
"""


def _exit_of(code: str):
    """Run `code` (after DEAF_HELPER) in a fresh interpreter at the repository root: (its outcome, seconds)."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", DEAF_HELPER + code], cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True, timeout=60, check=False)
    return done, time.monotonic() - start


def test_a_command_exits_although_a_helper_process_ignores_sigterm():
    """multiprocessing's exit handler sends SIGTERM to daemonic helpers and waits for each without a limit;
    data workers ignore SIGTERM (the trainer handles a job's stop), so one still running kept the process from
    exiting (a VQ run on an H200). common.cli.exit_promptly kills such a helper after HELPER_GRACE_S and names
    it; a helper that ends on SIGTERM ends as before, unnamed."""
    done, seconds = _exit_of("""
with command():
    fork = multiprocessing.get_context("fork")
    helpers = [fork.Process(target=deaf, daemon=True), fork.Process(target=time.sleep, args=(600,), daemon=True)]
    for p in helpers:
        p.start()
    time.sleep(0.5)  # (the first has ignored SIGTERM by now)
    print(*(p.pid for p in helpers), flush=True)
""")
    assert done.returncode == 0 and seconds < 30, done.stderr
    deaf, polite = map(int, done.stdout.split())
    assert f"(pid {deaf}) was still running" in done.stderr and f"pid {polite}" not in done.stderr, done.stderr
    for pid in (deaf, polite):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_command_exits_although_a_live_data_loader_holds_deaf_workers():
    """A DataLoader iterator still alive at exit keeps its workers (which ignore SIGTERM, as the trainers' do)
    registered with torch, whose SIGCHLD handler raises when one dies by a signal: ending the first must not stop
    the handler before the second."""
    done, seconds = _exit_of("""
import torch

class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield 0

with command():
    loader = torch.utils.data.DataLoader(Endless(), batch_size=None, num_workers=2, multiprocessing_context="fork",
                                         worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    next(batches)  # (alive until after the exit handlers)
    time.sleep(2)  # (both workers have set SIGTERM aside by now)
""")
    assert done.returncode == 0 and seconds < 40, done.stderr
    assert done.stderr.count("was still running") == 2, done.stderr


def test_a_script_exits_although_an_error_leaves_its_readers_workers_running():
    """Outside a command's frame (a library user's script), an error that leaves a read-ahead reader open kept
    the process from exiting: its workers ignore SIGTERM. A reader that starts workers registers exit_promptly."""
    done, seconds = _exit_of("""
from data_pipeline.loader import CaptionDrop, ReadAhead
from data_pipeline.sampler import GlobalBatchSampler
from data_pipeline.synthetic import SyntheticCodes
from model_parallel.config import model_config

dataset = SyntheticCodes(model_config("parti-debug"), size=16, seed=0)
reader = ReadAhead(dataset, GlobalBatchSampler(16, 4, 0), 0, 4, 0, 1, 2, CaptionDrop(0, 0.0, 0, 3), workers=2)
reader.next_step()
raise RuntimeError("an error before the reader is closed")
""")
    assert done.returncode == 1 and seconds < 40, (seconds, done.stderr[-2000:])
    assert "RuntimeError: an error before the reader is closed" in done.stderr


def test_a_command_exits_although_a_helper_outlives_sigkill():
    """A helper that has not ended even a second after SIGKILL (a process still tearing down its memory;
    simulated: the kill is not sent) does not hold the exit either: multiprocessing no longer waits for it."""
    import os
    import signal

    done, _ = _exit_of("""
with command():
    helper = multiprocessing.get_context("fork").Process(target=deaf, daemon=True)
    helper.kill = lambda: None  # (the SIGKILL that would end it is not sent)
    helper.start()
    time.sleep(0.5)
    print(helper.pid, flush=True)
""")
    pid = int(done.stdout)
    try:
        assert done.returncode == 0 and f"(pid {pid}) was still running" in done.stderr, done.stderr
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_config_error_is_reported_before_megatron_and_deepspeed_are_imported(tmp_path):
    """training.train checks the config first: a typo costs the import of torch (~2 s), not of megatron-core
    and DeepSpeed as well (~5 s more, on every rank of every node), and nothing is written."""
    import subprocess
    import sys

    code = f"""
import sys
from training.train import main
try:
    main(["--config", "configs/train/debug.yaml", "--set", "train.stepz=3", "--run-dir", {str(tmp_path / 'run')!r}])
except SystemExit as e:
    print(repr(str(e.code)), sorted(m for m in ("megatron", "deepspeed") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True).stdout
    assert out.startswith("'config error: unknown key(s) train.stepz") and out.endswith(" []\n"), out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change", ["train.global_batch_size=16", "train.eval_batches=3"])
def test_a_resume_that_changes_the_held_out_samples_says_so(change):
    """The held-out set is train.eval_batches global batches: either changed on resume, valid_loss is measured on
    other samples from there on (its curve jumps with the weights unchanged)."""
    from training.config import change_messages, config_to_dict, load_config, resume_changes

    saved = config_to_dict(load_config("configs/train/debug.yaml", []))
    messages = change_messages(resume_changes(saved, load_config("configs/train/debug.yaml", [change])), 6)
    key = change.split("=")[0]
    assert any(m.startswith(f"warning: {key} changed on resume") and "held-out loss is measured on other samples"
               in m for m in messages), messages


def test_a_resume_that_names_its_held_out_set_notes_it_and_one_of_other_folders_warns():
    """data.valid_shards from a folder to the same folder named (coco=...), or a set renamed: the same samples, a
    note; to another folder, named sets of other folders, or names swapped between sets, a warning."""
    from training.config import config_to_dict, load_config, resume_changes

    saved = config_to_dict(load_config("configs/train/debug.yaml", ["data.valid_shards=codes/v"]))
    for new, kind in (("coco=codes/v", "noted"), ("codes/w", "warned"), ("coco=codes/v,laion=codes/w", "warned")):
        changes = resume_changes(saved, load_config("configs/train/debug.yaml", [f"data.valid_shards={new}"]))
        assert [c[0] for c in changes[kind]] == ["data.valid_shards"], (new, changes)
    saved = config_to_dict(load_config("configs/train/debug.yaml", ["data.valid_shards=a=codes/v,b=codes/w"]))
    for new, kind in (("c=codes/v,b=codes/w", "noted"), ("b=codes/v,a=codes/w", "warned")):  # (swapped: warned)
        changes = resume_changes(saved, load_config("configs/train/debug.yaml", [f"data.valid_shards={new}"]))
        assert [c[0] for c in changes[kind]] == ["data.valid_shards"], (new, changes)


def test_a_resume_compares_numbers_by_value_and_reports_every_kind_of_change():
    """A saved 1 (YAML int) against 1.0 is no change; a layout change is noted, an lr change applied, each in its
    own log line."""
    from training.config import change_messages, config_to_dict, load_config, resume_changes

    saved = config_to_dict(load_config("configs/train/debug.yaml", ["train.grad_clip=1.0"]))
    saved["train"]["grad_clip"] = 1
    changes = resume_changes(saved, load_config("configs/train/debug.yaml", ["train.grad_clip=1.0"]))
    assert changes == {"refused": [], "applied": [], "warned": [], "noted": []}
    changes = resume_changes(saved, load_config("configs/train/debug.yaml",
                                                ["train.grad_clip=1.0", "train.lr=5e-4", "parallel.zero_stage=1"]))
    before = config_to_dict(load_config("configs/train/debug.yaml"))
    assert changes["applied"] == [("train.lr", before["train"]["lr"], 5e-4)]
    assert changes["noted"] == [("parallel.zero_stage", before["parallel"]["zero_stage"], 1)]
    messages = change_messages(changes, 6)
    assert messages == [f"config changes applied from step 6 on: train.lr {before['train']['lr']!r} -> 0.0005",
                        f"config changes on resume: parallel.zero_stage {before['parallel']['zero_stage']!r} -> 1"]


def test_a_resume_that_changes_the_optimizer_or_the_network_is_refused():
    """A checkpoint's optimizer state is its optimizer's (AdamW's moments, Adafactor's factors), and its weights
    its network's: a change of either is refused; a change of what the network does not hold is not."""
    from training.config import config_to_dict, load_config, resume_changes

    saved = config_to_dict(load_config("configs/train/debug.yaml", []))
    for change, kind in (("train.optimizer=adafactor", "refused"), ("model.hidden_size=32", "refused"),
                         ("train.lr=1e-4", "applied"), ("train.grad_clip=0.5", "applied"),
                         ("model.dropout=0.2", "noted"), ("model.caption_drop_prob=0.3", "noted")):
        changes = resume_changes(saved, load_config("configs/train/debug.yaml", [change]))
        found = [c[0] for c in changes[kind]]
        assert found == [change.split("=")[0]], (change, changes)


@dataclasses.dataclass
class _Knobs:
    top_k: int = 0
    """Keep the k likeliest tokens
    (0: all)."""
    temperature: float = 1.0
    name: str = "a"
    cap: float | None = None
    """At most this."""


def test_a_commands_help_and_flags_come_from_its_docstring_and_config_class():
    """common.cli: the --help description is the docstring's first paragraph on one line (none for no docstring);
    add_dataclass_args makes one flag per field (underscores as dashes) typed as the field (`float | None`: float),
    its default the field's and its help the field's documentation; dataclass_from_args builds the class back."""
    from common.cli import add_dataclass_args, config_parser, dataclass_from_args, description

    assert description("Sample images\n  from a prompt.\n\nMore text.") == "Sample images from a prompt."
    assert description(None) is None and description("  \n ") is None
    parser = config_parser("Train it.\n\nDetails.", where="configs/vq/", example="train.steps=5")
    assert parser.description == "Train it." and "configs/vq/" in parser.format_help()
    assert parser.parse_args(["--set", "train.steps=5"]).set == ["train.steps=5"]
    add_dataclass_args(parser, _Knobs)
    assert dataclass_from_args(_Knobs, parser.parse_args([])) == _Knobs()
    args = parser.parse_args(["--top-k", "8", "--temperature", "0.5", "--name", "b", "--cap", "2"])
    knobs = dataclass_from_args(_Knobs, args)
    assert knobs == _Knobs(8, 0.5, "b", 2.0) and isinstance(knobs.top_k, int) and isinstance(knobs.cap, float)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["top_k"] == "Keep the k likeliest tokens (0: all)." and helps["name"] == ""
    assert helps["cap"] == "At most this."


def test_a_command_ends_a_wrong_kind_of_path_or_a_stop_in_one_line_with_its_status(monkeypatch, capsys):
    """common.cli.command: a path of the wrong kind and each of `errors` end as `<label>: <message>`, other errors
    pass through; a Preempted stop exits with the requeue status (75, 0 under torchrun), said on rank 0 only."""
    from common.cli import command
    from common.preemption import Preempted

    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("RANK", "0")
    for error in (FileExistsError("out is a file"), NotADirectoryError("out is a file"),
                  IsADirectoryError("out is a file")):
        with pytest.raises(SystemExit) as exit_, command(label="generate"):
            raise error
        assert exit_.value.code == "generate: out is a file"
    with pytest.raises(SystemExit) as exit_, command(errors=(KeyError,)):
        raise KeyError("k")
    assert exit_.value.code == "error: 'k'"
    with pytest.raises(ValueError), command(errors=(KeyError,)):
        raise ValueError("not ours")
    with pytest.raises(SystemExit) as exit_, command():
        raise Preempted(4, "SIGUSR1", "/runs/a")
    assert exit_.value.code == 75
    assert capsys.readouterr().err == ("stopped by SIGUSR1 after step 4; checkpoint saved; /runs/a/REQUEUE written; "
                                       "exit status 75: run again (requeue) to continue\n")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(SystemExit) as exit_, command():
        raise Preempted(4, "SIGUSR1", "/runs/a")
    assert exit_.value.code == 0 and capsys.readouterr().err == ""


def test_an_error_line_names_the_rank_that_prints_it_beside_rank_0(monkeypatch):
    """Every rank of a launch prints why it stopped; a rank other than 0 says which it is, so torchrun's copies of
    one error read as copies (and a node's own error as that node's)."""
    from common.cli import command
    from common.config import ConfigError

    monkeypatch.delenv("SLURM_PROCID", raising=False)
    for rank, expected in (("0", "config error: train.steps=-1"), ("3", "rank 3: config error: train.steps=-1")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_, command():
            raise ConfigError("train.steps=-1")
        assert exit_.value.code == expected
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "1")  # (a bare srun: its task id is the rank)
    with pytest.raises(SystemExit) as exit_, command(errors=(FileNotFoundError,), label="vq.train"):
        raise FileNotFoundError("photos/: no such folder")
    assert exit_.value.code == "rank 1: vq.train: photos/: no such folder"


DOCS = ("README.md", "slurm/README.md", "bench/README.md", "training/README.md", "vq/README.md", "sr/README.md",
        "evaluation/README.md", "data_pipeline/README.md", "common/README.md", "model_parallel/README.md",
        "demo/README.md")
PRESET = "configs/train/parti-350m.yaml"


def _doc_code(path: str) -> list[str]:
    """The code of a Markdown file, a command a string: fenced and indented lines (a trailing backslash joins
    the next) and inline spans (which may wrap over lines), with tables' escaped pipes unescaped."""
    text = re.sub(r"\\\n\s*", " ", Path(path).read_text()).replace("\\|", "|")
    fenced = re.findall(r"^```\w*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    lines = [line for block in fenced for line in block.splitlines()] + re.findall(r"^    (\S.*)$", text, re.MULTILINE)
    return lines + [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]


def _overrides(command: str) -> list[str]:
    """The KEY=VALUE words after each --set (optional parts' brackets dropped; placeholders and `...` skipped)."""
    try:
        words = shlex.split(command.replace("[", " ").replace("]", " "))
    except ValueError:  # (an apostrophe in prose)
        words = command.split()
    found, taking = [], False
    for word in words:
        taking = word == "--set" or (taking and not word.startswith("-"))
        if taking and re.match(r"\w+(\.\w+)*=", word) and word.lower() not in ("key=value", "section.key=value"):
            found.append(word)
    return found


def _has_key(config, dotted: str) -> bool:
    for name in dotted.split("."):
        if not (dataclasses.is_dataclass(config) and name in {f.name for f in dataclasses.fields(config)}):
            return False
        config = getattr(config, name)
    return True


def test_the_docs_commands_name_real_config_keys_and_files():
    """What a user copies from the READMEs works: every config file their commands name loads, with every `--set`
    override of the command (by the loader of its configs/<kind>/ file, or the demo's; a bare `--set ...` hint by
    any), every key named in the prose (`train.async_save`) is a field of one of the configs, and every configs/,
    bench/, slurm/ and tests/ file named exists. A renamed key or file, or a value of the wrong type, fails here."""
    from common.config import load_typed
    from demo.run import DemoConfig
    from evaluation.config import EvalConfig
    from sr.config import SRConfig
    from training.config import Config
    from vq.config import VQConfig

    def typed(cls):
        return lambda path, sets: load_typed(cls, path, sets)

    loaders = {"train": lambda path, sets: load_config(path, sets).validate(), "demo": typed(DemoConfig),
               "vq": typed(VQConfig), "sr": typed(SRConfig), "eval": typed(EvalConfig),
               "model": lambda path, sets: load_config(None, [f"model.preset={Path(path).stem}", *sets]).validate()}
    configs = [Config(), VQConfig(), SRConfig(), EvalConfig()]
    sections = {f.name for c in configs for f in dataclasses.fields(c)}
    loaded, keys, failures = set(), 0, []
    for doc in DOCS:
        for code in _doc_code(doc):
            named = r"(?<![\w/.])((?:configs|bench|slurm|tests)/[\w./{},-]+\.(?:yaml|py|sbatch|sh))"
            for name in re.findall(named, code):
                head, braces, tail = re.fullmatch(r"([^{]*)(?:\{([^}]*)\})?(.*)", name).groups()
                for each in braces.split(",") if braces else [""]:
                    if not Path(head + each + tail).is_file():
                        failures.append(f"{doc}: `{code}` names {head + each + tail}, which is not a file")
            key = re.match(r"(\w+)\.[\w.]*\w(?=[ =:]|$)", code)
            if key and key[1] in sections and Path(key[0]).suffix not in (".sbatch", ".py"):  # (not train.sbatch)
                keys += 1
                if not any(_has_key(c, key[0]) for c in configs):
                    failures.append(f"{doc}: `{code}`: {key[0]} is not a config key")
            sets = _overrides(code)
            path, kind = next(iter(re.findall(r"(?<![\w/.])(configs/(\w+)/[\w.-]+\.yaml)\b", code)), (None, None))
            if not (sets or path):
                continue
            kinds = (["demo"] if re.search(r"-m demo\b", code) else [kind] if path
                     else [k for k in loaders if k != "model"])  # (a model preset is named by its file)
            errors = []
            for kind in kinds:
                try:  # (a bare hint follows a training preset's command: one of shards, data.synthetic=false)
                    loaders[kind](path or (PRESET if kind == "train" else None), sets)
                    loaded.add(kind)
                    break
                except ConfigError as e:
                    errors.append(f"{kind}: {e}")
            else:
                failures.append(f"{doc}: `{code}`: {'; '.join(errors)}")
    assert not failures, "\n".join(failures)
    assert loaded == set(loaders) and keys > 0, (loaded, keys)  # (the extraction found what it checks)
