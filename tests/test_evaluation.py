"""CLIP score and reranking with a small random open_clip model built here, and the PartiPrompts / COCO
harnesses end to end (generation, CLIP score per category and challenge, FID, results.json, HTML report)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.laion_fixtures import SHARED_DATA

TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1))


def build_tiny_clip(folder: Path, seed: int = 0):
    """An open_clip local-dir (open_clip_config.json + safetensors) holding a random tiny CLIP."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return model


def random_images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 32, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """FID statistics are cached in the test's own folder, never in the user's ~/.cache."""
    monkeypatch.setenv("PARTI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, build_tiny_clip(folder)


def test_clip_score_equals_open_clip_forward(tiny_clip):
    from evaluation.clip_score import ClipScorer

    folder, model = tiny_clip
    scorer = ClipScorer.load(f"local-dir:{folder}", device="cpu")
    images, texts = random_images(6), ["a red circle", "a blue square", "two cats", "x", "a dog on grass", "sky"]
    # Independent reference: the model's own forward pass (normalised features) on the same preprocessing.
    pixels = torch.stack([scorer.preprocess(im) for im in images])
    with torch.no_grad():
        out = model(pixels, scorer.tokenizer(texts))
    img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    cos = (img * txt).sum(-1)
    expected = 100 * cos.clamp(min=0)
    assert (cos < 0).any() and (cos > 0).any()  # both the clamp to 0 and positive scores are exercised
    torch.testing.assert_close(scorer.score(images, texts, batch_size=4), expected, atol=1e-4, rtol=0)
    assert scorer.protocol["weights"].endswith("open_clip_model.safetensors") and scorer.protocol["weights_sha256"]


def test_clip_score_runs_with_tf32_off(tiny_clip, monkeypatch):
    """CLIP's features with TF32 off (its patch embedding is a convolution: TF32 by default on a GPU), so a
    score does not depend on the device; the flags are restored."""
    from evaluation.clip_score import ClipScorer

    folder, _ = tiny_clip
    scorer = ClipScorer.load(f"local-dir:{folder}", device="cpu")
    seen, encode = [], scorer.model.encode_image

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return encode(*args, **kwargs)

    monkeypatch.setattr(scorer.model, "encode_image", spy)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # (torch's flag modules:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # monkeypatch cannot undo them)
    try:
        scorer.score(random_images(2), ["a", "b"])
        assert seen == [(False, False)] and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert scorer.protocol["precision"] == "float32, TF32 off"


TINY_COCA = dict(embed_dim=32, custom_text=True,
                 vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16, attentional_pool=True,
                                 attn_pooler_heads=2, output_tokens=True),
                 text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1, embed_cls=True,
                               output_tokens=True),
                 multimodal_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1))


def test_reranking_accepts_a_coca_model_from_local_weights(tmp_path):
    """Parti reranked with CoCa: an open_clip CoCa local-dir scores like its own contrastive embeddings."""
    import open_clip
    from safetensors.torch import save_file

    from evaluation.clip_score import ClipScorer

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_COCA, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CoCa(**{k: v for k, v in TINY_COCA.items() if k != "custom_text"}).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    scorer = ClipScorer.load(f"local-dir:{tmp_path}", device="cpu")
    assert type(scorer.model).__name__ == "CoCa"
    images, texts = random_images(4), ["a red circle", "a blue square", "two cats", "sky"]
    with torch.no_grad():
        image = model.encode_image(torch.stack([scorer.preprocess(im) for im in images]), normalize=True)
        text = model.encode_text(scorer.tokenizer(texts), normalize=True)
    torch.testing.assert_close(scorer.score(images, texts), 100 * (image * text).sum(-1).clamp(min=0), atol=1e-4, rtol=0)


def test_clip_weights_must_come_from_a_file(tmp_path):
    from evaluation.clip_score import ClipScorer

    with pytest.raises(ValueError, match="--clip-weights"):
        ClipScorer.load("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        ClipScorer.load("ViT-B-32", str(tmp_path / "missing.pt"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(FileNotFoundError, match="no CLIP weights"):
        ClipScorer.load(f"local-dir:{tmp_path}")


@pytest.fixture(scope="module")
def sampling_setup(single_process, reference, tmp_path_factory):
    """The reference run exported, a tiny VQ tokenizer and a SentencePiece model, as files."""
    from data_pipeline.text_tokenizer import train_sentencepiece
    from training.export import export
    from vq.tokenizer import ConvVQ, save_image_tokenizer

    root = tmp_path_factory.mktemp("eval")
    export(reference[1], out=root / "export")
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64), root / "vq.pt")
    words = ["a red circle", "a blue square on grass", "two green cats", "a photo of a kitchen", '"quoted" text']
    train_sentencepiece(words * 50, 40, root / "spm.model")
    return [f"model.checkpoint={root / 'export'}", f"model.vq={root / 'vq.pt'}",
            f"model.text_tokenizer={root / 'spm.model'}"], root


def parti_prompt_subset(path: Path) -> Path:
    """Five PartiPrompts rows of different categories (header kept), to keep the test small."""
    lines = (SHARED_DATA / "PartiPrompts.tsv").read_text(encoding="utf-8").splitlines()
    seen, rows = set(), []
    for line in lines[1:]:
        category = line.split("\t")[1]
        if category not in seen:
            seen.add(category)
            rows.append(line)
    path.write_text("\n".join([lines[0], *rows[:5]]) + "\n", encoding="utf-8")
    return path


def test_partiprompts_harness_reranks_and_reports_per_category(sampling_setup, tiny_clip, tmp_path):
    from PIL import Image

    from evaluation.benchmark import run
    from evaluation.clip_score import ClipScorer
    from evaluation.config import load_eval_config

    paths, _ = sampling_setup
    prompts = parti_prompt_subset(tmp_path / "p2.tsv")
    cfg = load_eval_config("configs/eval/partiprompts.yaml", [
        *paths, f"benchmark.prompts={prompts}", f"benchmark.out={tmp_path / 'out'}", f"clip.model=local-dir:{tiny_clip[0]}",
        "sampling.samples_per_prompt=3", "sampling.keep=1", "sampling.batch_size=2", "sampling.top_k=8"])
    results = run(cfg)
    out = tmp_path / "out"
    metadata = [json.loads(line) for line in (out / "images" / "metadata.jsonl").read_text().splitlines()]
    assert len(metadata) == 5 and len(list((out / "images").glob("*.png"))) == 5
    scorer = ClipScorer.load(f"local-dir:{tiny_clip[0]}", device="cpu")
    for meta in metadata:  # the kept sample is the best of the three, and its score is that of the saved PNG
        assert len(meta["all_clip_scores"]) == 3 and meta["clip_scores"][0] == max(meta["all_clip_scores"])
        rescored = scorer.score([Image.open(out / "images" / meta["files"][0])], [meta["prompt"]])
        assert abs(rescored.item() - meta["clip_scores"][0]) < 1e-3
    by_category = {}
    for meta in metadata:
        by_category.setdefault(meta["Category"], []).append(meta["clip_scores"][0])
    for row in results["per_category"]:
        assert abs(row["clip_score"] - np.mean(by_category[row["Category"]])) < 1e-3
    assert sum(r["prompts"] for r in results["per_challenge"]) == 5
    report = (out / "report.html").read_text()
    grids = [line.split('src="')[1].split('"')[0] for line in report.splitlines() if 'src="' in line]
    assert len(grids) == len(by_category) and all((out / g).is_file() for g in grids)
    assert "CLIP score per category" in report and (out / "eval_config.yaml").is_file()


def test_coco_harness_gives_fid_and_clip_score_at_the_upsampled_resolution(sampling_setup, tiny_clip, tmp_path):
    """With Parti's last stage (a tiny x2 upsampler) and benchmark.resolution=upsampled: FID and CLIP score of
    the 64 px images, the 32 px ones kept beside them, the resolution recorded."""
    from evaluation.benchmark import run
    from evaluation.config import load_eval_config
    from sr.model import SRModelConfig, build_wdsr, save_upsampler

    paths, _ = sampling_setup
    save_upsampler(build_wdsr(SRModelConfig(preset="tiny")), SRModelConfig(preset="tiny"), tmp_path / "sr.pt")
    cfg = load_eval_config("configs/eval/coco30k.yaml", [
        *paths, "benchmark.limit=4", f"benchmark.out={tmp_path / 'coco'}", f"clip.model=local-dir:{tiny_clip[0]}",
        f"benchmark.real={SHARED_DATA / 'coco_mini' / 'images'}", f"model.upsampler={tmp_path / 'sr.pt'}",
        "benchmark.resolution=upsampled"])
    results = run(cfg)
    assert results["prompts"] == 4 and results["clip_images"] == 4 and results["resolution"] == "upsampled (64x64)"
    assert results["fid"] > 0 and results["fid_protocol"]["real_images"] == 17
    upsampled = tmp_path / "coco" / "images_upsampled"
    assert results["fid_protocol"]["fake"] == str(upsampled) and results["fid_protocol"]["fake_images"] == 4
    assert json.loads((upsampled / "fid.json").read_text())["fid"] == results["fid"]
    assert len(list((tmp_path / "coco" / "images").glob("*.png"))) == 4  # the detokenizer's 32 px images


def test_eval_config_names_what_is_missing():
    from evaluation.config import load_eval_config
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="model.checkpoint"):
        load_eval_config("configs/eval/partiprompts.yaml")
    with pytest.raises(ConfigError, match="benchmark.real"):
        load_eval_config("configs/eval/coco30k.yaml", ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c"])
    with pytest.raises(ConfigError, match="benchmark.resolution=upsampled needs model.upsampler"):
        load_eval_config("configs/eval/partiprompts.yaml", ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c",
                                                            "benchmark.resolution=upsampled"])


def other_export(export: Path, out: Path) -> Path:
    """An export of other weights (the same model with its weights perturbed), as training.export lays it out."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    weights = load_file(str(export / "model.safetensors"))
    save_file({n: t + 0.01 for n, t in weights.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((export / "config.json").read_text())
    return out


def test_generate_refuses_to_resume_with_another_checkpoint_or_settings(sampling_setup, tmp_path):
    """A rerun into the same --out continues only with the same checkpoint and settings; otherwise it stops
    with one line naming what differs, and the images already there are left as they were."""
    from evaluation.generate import main

    _, root = sampling_setup
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\ntwo green cats\n", encoding="utf-8")
    common = ["--vq", str(root / "vq.pt"), "--text-tokenizer", str(root / "spm.model"), "--prompts", str(prompts),
              "--out", str(out), "--top-k", "8"]
    main([*common, "--checkpoint", str(root / "export"), "--guidance-scale", "1.2", "--limit", "1"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "00000_0.png" in first and json.loads(first["generation.json"])["sampling"]["guidance_scale"] == 1.2

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit:
            main([*common, *argv])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # nothing rewritten, nothing added
        assert isinstance(exit.value.code, str) and "\n" not in exit.value.code and "new --out" in exit.value.code
        return exit.value.code

    message = refused("--checkpoint", str(root / "export"), "--guidance-scale", "3.0")
    assert "sampling.guidance_scale: 1.2 then, 3.0 now" in message and str(out) in message
    other = other_export(root / "export", tmp_path / "other_export")
    message = refused("--checkpoint", str(other), "--guidance-scale", "1.2")
    assert f"checkpoint.path: '{root / 'export'}' then, '{other}' now" in message
    assert "checkpoint.weights_mtime_ns" in message
    from data_pipeline.text_tokenizer import train_sentencepiece

    train_sentencepiece(["a blue cat", "three red squares", "a kitchen photo"] * 50, 40, tmp_path / "other_spm.model")
    message = refused("--checkpoint", str(root / "export"), "--guidance-scale", "1.2",
                      "--text-tokenizer", str(tmp_path / "other_spm.model"))
    assert "text_tokenizer:" in message
    # The same checkpoint and settings resume: the second prompt is added, the first image stays.
    main([*common, "--checkpoint", str(root / "export"), "--guidance-scale", "1.2"])
    assert (out / "00001.json").is_file() and (out / "00000_0.png").read_bytes() == first["00000_0.png"]
