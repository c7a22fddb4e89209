"""Sampling: guidance scale 1 = unguided, top-k 1 = greedy, KV cache = full recomputation, TP=2 = TP=1."""
from __future__ import annotations

import json

import torch

from evaluation.sampling import SamplingConfig, filter_logits, sample
from tests.conftest import debug_batch, debug_model_config


def debug_model(seed=0):
    """The debug model (random weights) in eval mode."""
    from model_parallel.model import PartiModel

    return PartiModel(debug_model_config(), init_seed=seed).eval()


def run(model, cfg, seed=3, **kw):
    text, _ = debug_batch(model.cfg, batch=3)
    return sample(model, text, cfg, torch.Generator().manual_seed(seed), **kw)


def test_kv_cache_sampling_equals_full_recomputation(single_process):
    model = debug_model()
    for cfg in (SamplingConfig(), SamplingConfig(top_k=5, temperature=0.7), SamplingConfig(guidance_scale=3.0)):
        assert torch.equal(run(model, cfg), run(model, cfg, use_cache=False))


def test_guidance_scale_one_equals_unguided(single_process):
    model = debug_model()
    assert torch.equal(run(model, SamplingConfig(guidance_scale=1.0)), run(model, SamplingConfig()))
    assert not torch.equal(run(model, SamplingConfig(guidance_scale=4.0)), run(model, SamplingConfig()))


def test_top_k_one_equals_greedy(single_process):
    model = debug_model()
    greedy = run(model, SamplingConfig(temperature=0))
    assert torch.equal(run(model, SamplingConfig(top_k=1), seed=1), greedy)
    assert torch.equal(run(model, SamplingConfig(top_k=1), seed=2), greedy)
    assert not torch.equal(run(model, SamplingConfig(), seed=1), greedy)


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, float(probs[0]) - 0.01)).tolist() == [[False, True, True, True]]


def tp_samples(tp):
    from model_parallel.state import init_parallel

    init_parallel(tp)
    return run(debug_model(), SamplingConfig(top_p=0.9, guidance_scale=1.5))


def test_tp2_samples_equal_tp1(pool2):
    tp1 = pool2.run(tp_samples, 1)[0]
    a, b = pool2.run(tp_samples, 2)
    assert torch.equal(a, tp1) and torch.equal(b, tp1)


def test_per_row_generators_make_rows_independent_of_the_batch(single_process):
    model = debug_model()
    text, _ = debug_batch(model.cfg, batch=3)
    cfg = SamplingConfig(top_p=0.95)
    together = sample(model, text, cfg, [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = sample(model, text[1:2], cfg, [torch.Generator().manual_seed(8)])
    assert torch.equal(together[1:2], alone)


def test_parti_prompts_reader_keeps_every_prompt():
    from evaluation.prompts import read_prompts
    from tests.laion_fixtures import SHARED_DATA

    prompts = read_prompts(SHARED_DATA / "PartiPrompts.tsv")
    assert len(prompts) == 1632
    quoted = [p for p in prompts if p["prompt"].startswith('"')]
    assert quoted and all(p["prompt"].endswith('"') or '"' in p["prompt"][1:] for p in quoted)
    assert len({p["Category"] for p in prompts}) == 12 and len({p["Challenge"] for p in prompts}) == 11
    coco = read_prompts(SHARED_DATA / "coco_30k.csv")
    assert len(coco) == 30000 and coco[0]["prompt"] == "A bicycle replica with a clock as the front wheel."


def test_generate_writes_images_and_metadata_and_resumes(single_process, reference, tmp_path):
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from evaluation.generate import gather_metadata, generate
    from evaluation.prompts import read_prompts
    from training.export import export, load_exported
    from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

    model = load_exported(export(reference[1], out=tmp_path / "export"))
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64), tmp_path / "vq.pt")
    vq = load_image_tokenizer(tmp_path / "vq.pt")
    words = ["a red circle", "a blue square on grass", "two green cats", '"quoted" text']
    tok = TextTokenizer(train_sentencepiece(words * 50, 40, tmp_path / "spm.model"), model.cfg.text_seq_len)
    (tmp_path / "prompts.txt").write_text("\n".join(words) + "\n")
    prompts = read_prompts(tmp_path / "prompts.txt")
    cfg = SamplingConfig(guidance_scale=1.2, top_k=20)
    out = tmp_path / "samples"
    assert generate(model, vq, tok, prompts, out, cfg, samples_per_prompt=2, batch_size=3, rank=1, world=2) == 2
    assert generate(model, vq, tok, prompts, out, cfg, samples_per_prompt=2, batch_size=5, rank=0, world=2) == 2
    assert len(list(out.glob("*.png"))) == 8
    first = (out / "00003_1.png").read_bytes()
    assert generate(model, vq, tok, prompts, out, cfg, samples_per_prompt=2) == 0  # all done: skipped
    lines = gather_metadata(out).read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[3])["prompt"] == '"quoted" text'
    again = tmp_path / "again"  # one process, another batch size: the same images
    generate(model, vq, tok, prompts, again, cfg, samples_per_prompt=2, batch_size=8)
    assert (again / "00003_1.png").read_bytes() == first
