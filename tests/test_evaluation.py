"""CLIP score and reranking with a small random open_clip model built here (its weights file and pretrained-tag
preprocessing resolved as open_clip does), and the PartiPrompts / COCO harnesses end to end (generation, CLIP
score per category and challenge, FID, results.json, HTML report, each number under an honest name)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.laion_fixtures import SHARED_DATA
from tests.test_fid import tf32_restored  # noqa: F401  (a fixture)

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
    # One text for several images broadcast to scores against that one text, silently: refused.
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        scorer.score(images[:2], texts[:1])


def test_clip_score_runs_with_tf32_off(tiny_clip, monkeypatch, tf32_restored):
    """CLIP's features with TF32 off (its patch embedding is a convolution: TF32 by default on a GPU), so a
    score does not depend on the device; the flags are restored."""
    from evaluation.clip_score import ClipScorer
    from tests.test_fid import set_tf32, tf32_flags

    folder, _ = tiny_clip
    scorer = ClipScorer.load(f"local-dir:{folder}", device="cpu")
    seen, encode = [], scorer.model.encode_image

    def spy(*args, **kwargs):
        seen.append(tf32_flags())
        return encode(*args, **kwargs)

    monkeypatch.setattr(scorer.model, "encode_image", spy)
    set_tf32("fp32_precision" if hasattr(torch.backends.cudnn.conv, "fp32_precision") else "legacy")
    before = tf32_flags()
    scorer.score(random_images(2), ["a", "b"])
    assert seen == [("ieee", "ieee") if isinstance(before[0], str) else (False, False)] and tf32_flags() == before
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
    torch.testing.assert_close(scorer.score(images, texts), 100 * (image * text).sum(-1).clamp(min=0),
                               atol=1e-4, rtol=0)


def test_clip_weights_must_come_from_a_file(tmp_path):
    from evaluation.clip_score import ClipScorer

    for empty in (None, ""):  # (an empty clip.weights= in a config is no file either)
        with pytest.raises(ValueError, match="--clip-weights"):
            ClipScorer.load("ViT-B-32", empty)
    for missing in (tmp_path / "missing.pt", tmp_path):  # (a folder is not a checkpoint file)
        with pytest.raises(FileNotFoundError, match="do not exist"):
            ClipScorer.load("ViT-B-32", str(missing))
    with pytest.raises(FileNotFoundError, match=r"clip: no such folder; expected an open_clip local-dir"):
        ClipScorer.load(f"local-dir:{tmp_path / 'clip'}")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"weights without their config")
    with pytest.raises(FileNotFoundError, match=r"an open_clip local-dir needs open_clip_config\.json"):
        ClipScorer.load(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_model.safetensors").unlink()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(FileNotFoundError, match=r"no CLIP weights \(expected a \*\.safetensors, \*\.bin or \*\.pth"):
        ClipScorer.load(f"local-dir:{tmp_path}")


def test_random_clip_weights_are_built_untrained_and_said_so(tiny_clip, capsys):
    """--clip-weights random (smoke tests): no file is read, checked or hashed, for a built-in name or a local-dir
    (whose weights file is then not loaded), and the protocol says `random`. check_clip keeps the kind of error
    it names (a missing file stays a FileNotFoundError) and refuses any tag for a local-dir as such. A local-dir
    with its weights is not warned about a missing tag (its config carries what a tag would)."""
    from evaluation.clip_score import ClipScorer, check_clip

    check_clip("ViT-B-32", "random", None)
    folder, model = tiny_clip
    capsys.readouterr()
    ClipScorer.load(f"local-dir:{folder}", device="cpu")
    assert "without a tag" not in capsys.readouterr().err
    scorer = ClipScorer.load(f"local-dir:{folder}", "random", device="cpu")
    assert scorer.protocol["weights"] == "random" and scorer.protocol["weights_sha256"] is None
    assert not torch.equal(scorer.model.visual.conv1.weight, model.visual.conv1.weight)
    with pytest.raises(FileNotFoundError, match=r"^--clip ViT-B-32: CLIP weights \S*missing.pt do not exist$"):
        check_clip("ViT-B-32", str(folder / "missing.pt"), None, "--clip ViT-B-32")
    with pytest.raises(ValueError, match=r"open_clip_config.json already carries its preprocessing .*drop the tag"):
        check_clip(f"local-dir:{folder}", None, "openai")  # (not "no such tag": the tag is wrong for any local-dir)


def test_clip_scores_images_of_any_mode_no_images_and_names_a_metadata_line_that_is_not_an_object(tiny_clip,
                                                                                                   tmp_path):
    """score() scores a caller's greyscale or RGBA image as its RGB version (the convert, or the preprocessing's),
    gives no scores for no images; read_metadata skips blank lines and names a line holding JSON other than an
    object (by its line number)."""
    from evaluation.clip_score import ClipScorer, read_metadata

    scorer = ClipScorer.load(f"local-dir:{tiny_clip[0]}", device="cpu")
    images = [im.convert(mode) for im, mode in zip(random_images(2), ("L", "RGBA"))]
    torch.testing.assert_close(scorer.score(images, ["a", "b"]),
                               scorer.score([im.convert("RGB") for im in images], ["a", "b"]))
    assert scorer.score([], []).shape == (0,)
    (tmp_path / "metadata.jsonl").write_text('{"prompt": "a", "index": 0, "files": []}\n\n')  # (blank lines: skipped)
    assert read_metadata(tmp_path) == [{"prompt": "a", "index": 0, "files": []}]
    (tmp_path / "metadata.jsonl").write_text('{"prompt": "a", "index": 0, "files": []}\n\n3\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:3: no prompt, index, files; expected a JSON object"):
        read_metadata(tmp_path)


def test_score_samples_in_batches_scores_every_listed_image_against_its_own_prompt(tiny_clip, tmp_path):
    """score_samples in batches smaller than the folder (2 of 5 images): every image once, each with its own
    prompt's score, and their mean; a folder without metadata.jsonl is named with what to run."""
    from PIL import Image

    from evaluation.clip_score import ClipScorer, read_metadata, score_samples
    from evaluation.generate import gather_metadata

    scorer = ClipScorer.load(f"local-dir:{tiny_clip[0]}", device="cpu")
    samples = tmp_path / "samples"
    fake_generation(samples, 5)
    images = [Image.open(samples / f"{i:05d}_0.png") for i in range(5)]
    # A random CLIP scores most pairs 0 (cos < 0), where any prompt gives the same score: each image gets a
    # prompt of its own that it scores above 0 with, so a score against another image's prompt shows.
    prompts, pool = [], [f"prompt {k}" for k in range(40)]
    for i, image in enumerate(images):
        pool_scores = scorer.score([image] * len(pool), pool)
        prompts.append(pool.pop(int(pool_scores.argmax())))
        meta = json.loads((samples / f"{i:05d}.json").read_text())
        (samples / f"{i:05d}.json").write_text(json.dumps({**meta, "prompt": prompts[-1]}))
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl is missing: run evaluation\.generate on"):
        read_metadata(samples)
    gather_metadata(samples)
    result = score_samples(scorer, samples, batch_size=2)
    expected = scorer.score(images, prompts)
    assert (expected > 0).all() and not torch.allclose(expected, scorer.score(images, prompts[1:] + prompts[:1]))
    assert result["images"] == 5 and [row["index"] for row in result["per_image"]] == list(range(5))
    torch.testing.assert_close(torch.tensor([row["score"] for row in result["per_image"]]), expected)
    assert result["clip_score"] == pytest.approx(expected.mean().item(), abs=1e-4)


def test_standalone_clip_score_warns_of_images_reranked_by_the_same_weights(tiny_clip, tmp_path, capsys):
    """python -m evaluation.clip_score on images kept as the best 1 of 2 per prompt by reranking with the same
    weights (the sha256 evaluation.generate recorded) says the score is biased and gives the mean over all samples;
    with another reranker, or none, it says nothing of it."""
    import hashlib

    from evaluation.clip_score import main
    from evaluation.generate import gather_metadata

    weights = next(p for p in tiny_clip[0].iterdir() if p.suffix in (".bin", ".safetensors", ".pth"))
    samples = tmp_path / "samples"
    fake_generation(samples, 2)
    for sha, says in ((hashlib.sha256(weights.read_bytes()).hexdigest(), True), ("another", False)):
        for i in range(2):
            meta = json.loads((samples / f"{i:05d}.json").read_text())
            (samples / f"{i:05d}.json").write_text(json.dumps({**meta, "keep": 1, "samples_per_prompt": 2,
                                                                "rerank": {"weights_sha256": sha},
                                                                "all_clip_scores": [10.0 * i, 10.0 * i + 5]}))
        gather_metadata(samples)
        main(["--samples", str(samples), "--clip", f"local-dir:{tiny_clip[0]}"])
        out = capsys.readouterr().out
        assert ("warning: each prompt's images are the best 1 of 2, chosen by these same CLIP weights "
                "(evaluation.generate's reranking): the score is biased upward; the mean over all samples is "
                "7.500" in out) == says, out


def test_local_dir_protocol_names_the_file_open_clip_loads(tmp_path):
    """A laion repository holds open_clip_pytorch_model.safetensors beside .bin (here with different weights):
    the protocol names and hashes the file whose tensors the model holds, and a folder with only the
    .safetensors or a .pth loads."""
    import hashlib

    import open_clip
    from safetensors.torch import save_file

    from evaluation.clip_score import ClipScorer

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    states = {}
    for seed, name in enumerate(("open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin", "weights.pth")):
        torch.manual_seed(seed)
        states[name] = open_clip.CLIP(**TINY_CLIP).state_dict()
    for present in (list(states), ["open_clip_pytorch_model.safetensors"], ["weights.pth"]):
        for name, state in states.items():
            (tmp_path / name).unlink(missing_ok=True)
            if name in present:
                (save_file if name.endswith(".safetensors") else torch.save)(state, str(tmp_path / name))
        scorer = ClipScorer.load(f"local-dir:{tmp_path}", device="cpu")
        loaded = scorer.model.visual.conv1.weight
        holder = [n for n, state in states.items() if torch.equal(state["visual.conv1.weight"], loaded)]
        assert holder == [Path(scorer.protocol["weights"]).name]
        assert scorer.protocol["weights_sha256"] == hashlib.sha256((tmp_path / holder[0]).read_bytes()).hexdigest()


def test_clip_tag_gives_the_weights_their_preprocessing_and_activation(tmp_path, monkeypatch, capsys):
    """A checkpoint file for a built-in architecture gets the mean/std and QuickGELU of its open_clip pretrained
    tag (here a tiny architecture and a tag registered for the test). The reference is open_clip's own
    local-dir loading of the same weights with an open_clip_config.json that states them. Without the tag the
    architecture's defaults apply (other scores), with a warning; the protocol records what ran."""
    import open_clip
    from safetensors.torch import save_file

    from evaluation.clip_score import ClipScorer

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test-clip", TINY_CLIP)
    laion_like = {"url": "", "hf_hub": "", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),  # (std apart from mean)
                  "interpolation": "bilinear", "resize_mode": "squash", "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test-clip", {"laion_like": laion_like})
    torch.manual_seed(0)
    state = open_clip.CLIP(**TINY_CLIP).state_dict()
    torch.save(state, tmp_path / "weights.pt")
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    (reference_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {**TINY_CLIP, "quick_gelu": True},
         "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                            "resize_mode": "squash"}}))
    save_file(state, str(reference_dir / "open_clip_model.safetensors"))
    images, texts = random_images(4), ["a red circle", "a blue square", "two cats", "sky"]
    reference_scorer = ClipScorer.load(f"local-dir:{reference_dir}", device="cpu")
    assert reference_scorer.protocol["quick_gelu"] is True  # (the model's activation, from its config: no tag)
    reference = reference_scorer.score(images, texts)

    tagged = ClipScorer.load("tiny-test-clip", str(tmp_path / "weights.pt"), "cpu", tag="laion_like")
    torch.testing.assert_close(tagged.score(images, texts), reference, atol=1e-4, rtol=0)
    assert tagged.protocol["tag"] == "laion_like" and tagged.protocol["quick_gelu"] is True
    assert {k: tagged.protocol["preprocess"][k] for k in ("mean", "std", "interpolation", "resize_mode")} == {
        "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear", "resize_mode": "squash"}
    capsys.readouterr()
    untagged = ClipScorer.load("tiny-test-clip", str(tmp_path / "weights.pt"), "cpu")
    assert "without a tag" in capsys.readouterr().err and untagged.protocol["quick_gelu"] is False
    assert (untagged.score(images, texts) - reference).abs().max() > 1e-3
    with pytest.raises(ValueError, match="'nope' is not an open_clip pretrained tag of tiny-test-clip .*laion_like"):
        ClipScorer.load("tiny-test-clip", str(tmp_path / "weights.pt"), "cpu", tag="nope")
    # A -quickgelu architecture (its config builds QuickGELU) with a tag trained without it: refused, not scored.
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test-clip-quickgelu", {**TINY_CLIP, "quick_gelu": True})
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test-clip-quickgelu",
                        {"gelu_like": {**laion_like, "quick_gelu": False}})
    with pytest.raises(ValueError, match="'gelu_like' was trained without QuickGELU but tiny-test-clip-quickgelu"):
        ClipScorer.load("tiny-test-clip-quickgelu", str(tmp_path / "weights.pt"), "cpu", tag="gelu_like")


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


# Five PartiPrompts rows, to keep the test small: two People and two Animals prompts, the Linguistic Structures
# challenge over two categories. The tiny CLIP scores these well above 0 (it clamps at 0) whatever the images,
# and each a different score, so a group's mean is neither its sum nor its best.
PARTI_SUBSET = {"A boy holds and a girl paints a piece of wood.": ("People", "Linguistic Structures"),
                "The man who whistles tunes pianos.": ("People", "Linguistic Structures"),
                "a plate that has no bananas on it. there is a glass without orange juice next to it.":
                    ("Food & Beverage", "Linguistic Structures"),
                "A high resolution photo of a rat working out in a gym.": ("Animals", "Imagination"),
                "A red dragon dressed in a tuxedo and playing chess. The chess pieces are fashioned after robots.":
                    ("Animals", "Imagination")}


def parti_prompt_subset(path: Path) -> Path:
    """The PARTI_SUBSET rows of PartiPrompts.tsv (header kept)."""
    lines = (SHARED_DATA / "PartiPrompts.tsv").read_text(encoding="utf-8").splitlines()
    rows = [line for line in lines[1:] if line.split("\t")[0] in PARTI_SUBSET]
    assert {tuple(r.split("\t")[:3]) for r in rows} == {(k, *v) for k, v in PARTI_SUBSET.items()}
    path.write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")
    return path


def test_partiprompts_harness_reranks_and_reports_per_category(sampling_setup, tiny_clip, tmp_path):
    from PIL import Image

    from evaluation.benchmark import run
    from evaluation.clip_score import ClipScorer
    from evaluation.config import load_eval_config

    paths, _ = sampling_setup
    prompts = parti_prompt_subset(tmp_path / "p2.tsv")
    cfg = load_eval_config("configs/eval/partiprompts.yaml", [
        *paths, f"benchmark.prompts={prompts}", f"benchmark.out={tmp_path / 'out'}",
        f"clip.model=local-dir:{tiny_clip[0]}", "sampling.samples_per_prompt=3", "sampling.keep=1",
        "sampling.batch_size=2", "sampling.top_k=8"])
    results = run(cfg)
    out = tmp_path / "out"
    metadata = [json.loads(line) for line in (out / "images" / "metadata.jsonl").read_text().splitlines()]
    assert len(metadata) == 5 and len(list((out / "images").glob("*.png"))) == 5
    scorer = ClipScorer.load(f"local-dir:{tiny_clip[0]}", device="cpu")
    kept = []
    for meta in metadata:  # the kept sample is the best of the three, and its score is that of the saved PNG
        assert len(meta["all_clip_scores"]) == 3 and meta["clip_scores"][0] == max(meta["all_clip_scores"])
        rescored = scorer.score([Image.open(out / "images" / meta["files"][0])], [meta["prompt"]])
        assert abs(rescored.item() - meta["clip_scores"][0]) < 1e-3
        kept.append(meta["clip_scores"][0])
    assert min(kept) > 1 and len(set(np.round(kept, 3))) == 5  # (a mean is then neither a sum nor a best)
    # Per category and per challenge (the .tsv's columns, which metadata.jsonl keeps): every group's prompt count
    # and mean kept score, as grouped here by hand.
    for key, expected in (("Category", {"People": 2, "Animals": 2, "Food & Beverage": 1}),
                          ("Challenge", {"Linguistic Structures": 3, "Imagination": 2})):
        groups = {}
        for meta in metadata:
            groups.setdefault(meta[key], []).append(meta["clip_scores"][0])
        assert {name: len(v) for name, v in groups.items()} == expected
        rows = results[f"per_{key.lower()}"]
        assert [row[key] for row in rows] == sorted(groups)
        for row in rows:
            assert row["prompts"] == len(groups[row[key]])
            assert row["clip_score"] == pytest.approx(np.mean(groups[row[key]]), abs=1e-3), (key, row)
    by_category = {}
    for meta in metadata:
        by_category.setdefault(meta["Category"], []).append(meta["clip_scores"][0])
    # clip_score: the mean of the kept images' scores; the kept image is the best of 3 by the scoring model
    # itself: said so, with the mean over every sample.
    assert results["clip_score"] == pytest.approx(np.mean(kept), abs=1e-3)
    assert results["clip_images"] == 5
    every = [score for meta in metadata for score in meta["all_clip_scores"]]
    assert len(every) == 15
    assert results["selected_by_same_model"] and (results["samples_per_prompt"], results["keep"]) == (3, 1)
    assert results["clip_score_all_samples"] == pytest.approx(np.mean(every), abs=1e-9)
    assert results["clip_score"] >= results["clip_score_all_samples"]
    report = (out / "report.html").read_text()
    assert "chosen by the same CLIP model" in report and "clip_score_all_samples" in report
    grids = [line.split('src="')[1].split('"')[0] for line in report.splitlines() if 'src="' in line]
    assert len(grids) == len(by_category) and all((out / g).is_file() for g in grids)
    assert "CLIP score per category" in report and (out / "eval_config.yaml").is_file()
    # A rerun with other sampling settings is refused by generate's resume check: the folder's config stays that
    # of its images (it was rewritten before the check).
    before = (out / "eval_config.yaml").read_text()
    with pytest.raises(ValueError, match=r"sampling\.top_k: 8 then, 4 now"):
        run(dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, top_k=4)))
    assert (out / "eval_config.yaml").read_text() == before


def test_coco_harness_gives_fid_and_clip_score_at_the_upsampled_resolution(sampling_setup, tiny_clip, tmp_path):
    """With Parti's last stage (a tiny x2 upsampler) and benchmark.resolution=upsampled: FID and CLIP score of
    the 64 px images, the 32 px ones kept beside them, the resolution recorded."""
    from PIL import Image

    from evaluation.benchmark import run
    from evaluation.clip_score import ClipScorer
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
    assert (results["fid_name"], results["fid_real_images"], results["fid_fake_images"]) == ("FID-4/17", 17, 4)
    assert "64x64" in results["fid_protocol"]["real_preprocessing"]  # real photos cropped to the generated size
    upsampled = tmp_path / "coco" / "images_upsampled"
    assert results["fid_protocol"]["fake"] == str(upsampled) and results["fid_protocol"]["fake_images"] == 4
    assert json.loads((upsampled / "fid.json").read_text())["fid"] == results["fid"]
    assert len(list((tmp_path / "coco" / "images").glob("*.png"))) == 4  # the detokenizer's 32 px images
    # clip_score: the mean of the 64 px images' scores, each rescored here against its prompt.
    scorer = ClipScorer.load(f"local-dir:{tiny_clip[0]}", device="cpu")
    metadata = [json.loads(line) for line in (upsampled / "metadata.jsonl").read_text().splitlines()]
    files = [(meta["prompt"], upsampled / name) for meta in metadata for name in meta["files"]]
    assert len(files) == 4 and all(Image.open(f).size == (64, 64) for _, f in files)
    scores = scorer.score([Image.open(f) for _, f in files], [prompt for prompt, _ in files]).tolist()
    assert results["clip_score"] == pytest.approx(np.mean(scores), abs=1e-3)


def fake_generation(images: Path, prompts: int, size: int = 32) -> None:
    """A folder as evaluation.generate leaves it: a PNG and a .json per prompt (no model needed)."""
    from PIL import Image

    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(prompts):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{i:05d}_0.png")
        meta = {"prompt": f"prompt {i}", "index": i, "files": [f"{i:05d}_0.png"]}
        (images / f"{i:05d}.json").write_text(json.dumps(meta))


def test_coco_scoring_takes_this_runs_prompts_and_names_a_small_fid(tmp_path, monkeypatch):
    """Scoring after generation (a tiny feature extractor for Inception): a folder an earlier run with a larger
    benchmark.limit filled (5 prompts) scored for 3 prompts gives the FID of those 3 images only (the reference:
    fid() on a folder holding just them); it is named FID-3/17 with both image counts and a warning in
    results.json, the report and the printed line; real photos are centre-cropped to the generated 32x32; a
    reader of the earlier results.json keeps reading it whole (an atomic replace)."""
    import shutil

    import evaluation.fid as fid_module
    from evaluation.benchmark import score, summary_line
    from evaluation.config import load_eval_config
    from evaluation.fid import fid
    from evaluation.generate import gather_metadata
    from tests.test_fid import tiny_weights

    monkeypatch.setattr(fid_module, "default_weights", lambda: tiny_weights(tmp_path / "tiny.pt"))
    out, real = tmp_path / "coco", SHARED_DATA / "coco_mini" / "images"
    fake_generation(out / "images", 5)
    gather_metadata(out / "images", 3)
    cfg = load_eval_config("configs/eval/coco30k.yaml", ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c",
                                                         f"benchmark.real={real}", f"benchmark.out={out}"])
    (out / "results.json").write_text('{"old": 1}')
    with open(out / "results.json") as reader:
        results = score(cfg, out, None)
        assert reader.read() == '{"old": 1}'
    only_these = tmp_path / "three"
    only_these.mkdir()
    for i in range(3):
        shutil.copy(out / "images" / f"{i:05d}_0.png", only_these)
    assert results["fid"] == pytest.approx(fid(real, only_these, real_size=32)["fid"], rel=1e-9)
    assert (results["fid_name"], results["fid_fake_images"], results["fid_real_images"]) == ("FID-3/17", 3, 17)
    assert "3 generated" in results["fid_warning"] and "32x32" in results["fid_protocol"]["real_preprocessing"]
    assert json.loads((out / "results.json").read_text())["fid_fake_images"] == 3
    report = (out / "report.html").read_text()
    assert "FID-3/17" in report and "fid_fake_images" in report and "Warning:</b> FID over 3 generated" in report
    line = summary_line(cfg, results)
    assert "{'FID-3/17': " in line and "(3 generated vs 17 real images)" in line


def test_eval_config_names_what_is_missing():
    from evaluation.config import load_eval_config
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="model.checkpoint"):
        load_eval_config("configs/eval/partiprompts.yaml")
    with pytest.raises(ConfigError, match="benchmark.real"):
        load_eval_config("configs/eval/coco30k.yaml", ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c"])
    paths = ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c"]
    with pytest.raises(ConfigError, match="benchmark.resolution=upsampled needs model.upsampler"):
        load_eval_config("configs/eval/partiprompts.yaml", [*paths, "benchmark.resolution=upsampled"])
    with pytest.raises(ConfigError, match="clip.tag='openai' .* needs clip.model=ARCHITECTURE and clip.weights=FILE"):
        load_eval_config("configs/eval/partiprompts.yaml", [*paths, "clip.model=local-dir:/m", "clip.tag=openai"])
    with pytest.raises(ConfigError, match="clip.weights='w.pt' clip.tag='' without clip.model: set clip.model"):
        load_eval_config("configs/eval/coco30k.yaml", [*paths, "benchmark.real=r", "clip.weights=w.pt"])  # (ignored:
        # no CLIP score, without a word)
    with pytest.raises(ConfigError, match="benchmark.limit=-1 must be >= 0"):
        load_eval_config("configs/eval/coco30k.yaml", [*paths, "benchmark.real=r", "benchmark.limit=-1"])
    assert load_eval_config("configs/eval/coco30k.yaml", [*paths, "benchmark.real=r"]).benchmark.real_center_crop


def other_export(export: Path, out: Path) -> Path:
    """An export of other weights (the same model with its weights perturbed), as training.export lays it out."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    weights = load_file(str(export / "model.safetensors"))
    save_file({n: t + 0.01 for n, t in weights.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((export / "config.json").read_text())
    return out


def test_fid_scores_every_kept_sample_of_the_listed_prompts(tmp_path, monkeypatch):
    """fid_results hands fid() each listed prompt's every kept file (COCO draws several per caption without
    reranking), not one per prompt, and the real images' crop size."""
    from types import SimpleNamespace

    from evaluation import benchmark

    calls = []
    monkeypatch.setattr(benchmark, "fid", lambda real, fake, real_size, fake_files: calls.append(
        (real_size, fake_files)) or {"fid": 1.0, "name": "FID", "real_images": 9, "fake_images": len(fake_files),
                                     "warning": None, "protocol": {}})
    cfg = SimpleNamespace(benchmark=SimpleNamespace(real=str(tmp_path / "real"), real_center_crop=True))
    metadata = [{"index": i, "files": [f"{i:05d}_{r}.png" for r in range(2)]} for i in range(3)]
    results = benchmark.fid_results(cfg, tmp_path, metadata, (32, 32))
    assert calls == [(32, [tmp_path / name for meta in metadata for name in meta["files"]])]
    assert results["fid_fake_images"] == 6

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
    message = refused("--checkpoint", str(root / "export"), "--guidance-scale", "1.2", "--compile-decode")
    assert "decoding: 'kv_cache' then, 'static_cache+inductor' now" in message
    # The same checkpoint and settings resume: the second prompt is added, the first image stays; a folder
    # written before the decoder was recorded (the growing cache's) resumes as the growing cache's.
    for name in ("generation.json", "00000.json"):
        record = json.loads((out / name).read_text())
        del record["decoding"]
        (out / name).write_text(json.dumps(record))
    main([*common, "--checkpoint", str(root / "export"), "--guidance-scale", "1.2"])
    assert (out / "00001.json").is_file() and (out / "00000_0.png").read_bytes() == first["00000_0.png"]
    # A rerun with a smaller --limit gathers only its own prompts into metadata.jsonl (not the earlier run's 2nd).
    main([*common, "--checkpoint", str(root / "export"), "--guidance-scale", "1.2", "--limit", "1"])
    assert [json.loads(line)["index"] for line in (out / "metadata.jsonl").read_text().splitlines()] == [0]


def test_report_grids_are_named_apart_and_its_text_is_not_markup(tmp_path):
    """Grid files were named by their category's characters: "Food & Drink" and "Food / Drink" wrote one file (both
    sections showed the second's samples), and a long name was too long for a file. Paths and settings in the
    report's intro went in as markup (a folder named <script> ran in the reader's browser)."""
    from PIL import Image

    from common.config import load_typed
    from evaluation.benchmark import write_report
    from evaluation.config import EvalConfig

    images = tmp_path / "images"
    images.mkdir()
    categories = ["Food & Drink", "Food / Drink", "x" * 300]
    metadata = []
    for i, (name, colour) in enumerate(zip(categories, ("red", "blue", "green"))):
        Image.new("RGB", (16, 16), colour).save(images / f"{i:05d}_0.png")
        metadata.append({"prompt": f"prompt {i}", "index": i, "files": [f"{i:05d}_0.png"], "Category": name})
    cfg = load_typed(EvalConfig, "configs/eval/partiprompts.yaml",
                     ["model.checkpoint=/shared/<script>alert(1)</script>/export"])
    report = write_report(cfg, tmp_path, images, {"clip_score": 30.0}, metadata, []).read_text()
    grids = [line.split('src="')[1].split('"')[0] for line in report.splitlines() if 'src="' in line]
    assert len(set(grids)) == 3
    colours = [Image.open(tmp_path / g).convert("RGB").getpixel((8, 8)) for g in grids]
    assert len(set(colours)) == 3  # each section its own category's samples
    assert "<script>" not in report and "&lt;script&gt;alert(1)&lt;/script&gt;" in report


def test_report_of_prompts_without_a_category_or_with_a_damaged_image(tmp_path):
    """A .tsv row short of its Category field (None) or a JSONL line without one stopped the report with a
    TypeError or KeyError after the whole run; group_scores puts such prompts under "(none)", and so do the grids
    now. Without a CLIP scorer the grids were the first to open the images: a damaged one was PIL's OSError
    without its name, not the ValueError naming the file that CLIP score and FID give."""
    from PIL import Image

    from common.config import load_typed
    from evaluation.benchmark import score, write_report
    from evaluation.config import EvalConfig
    from evaluation.generate import gather_metadata
    from evaluation.prompts import read_prompts

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (16, 16), colour).save(images / f"{i:05d}_0.png")
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\nA cat\tAnimals\nA dog\nA cow\tAnimals\n", encoding="utf-8")
    short = [json.loads(json.dumps({**p, "index": i, "files": [f"{i:05d}_0.png"]}))  # (as metadata.jsonl reads back)
             for i, p in enumerate(read_prompts(tmp_path / "p.tsv"))]
    assert short[1]["Category"] is None
    without = [{k: v for k, v in meta.items() if k != "Category" or v} for meta in short]  # (JSONL: no key at all)
    cfg = load_typed(EvalConfig, "configs/eval/partiprompts.yaml", [])
    for metadata in (short, without):
        report = write_report(cfg, tmp_path, images, {"clip_score": 30.0}, metadata, []).read_text()
        assert "<h2>Samples: (none)</h2>" in report and "<h2>Samples: Animals</h2>" in report
        grids = [line.split('src="')[1].split('"')[0] for line in report.splitlines() if 'src="' in line]
        colours = [Image.open(tmp_path / g).convert("RGB").getpixel((8, 8)) for g in grids]
        assert colours == [(0, 0, 255), (255, 0, 0)]  # "(none)" (the dog) sorts before Animals (the cat first)

    fake_generation(tmp_path / "out" / "images", 2)
    broken = tmp_path / "out" / "images" / "00001_0.png"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
    gather_metadata(tmp_path / "out" / "images", 2)
    cfg = load_typed(EvalConfig, "configs/eval/partiprompts.yaml", ["benchmark.name=prompts"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken))}: not a readable image"):
        score(cfg, tmp_path / "out", None)


def test_benchmark_aggregates_and_grid_placement_by_hand(tmp_path):
    """score_samples: the mean over every listed image, each under its prompt's index (a stand-in scorer);
    per_prompt_scores: the mean of each prompt's kept images; group_scores: the mean over a group's prompts;
    clip_selection: biased (and warned) only when keep < samples_per_prompt, with the mean over every sample;
    image_grid: image n at column n % columns, row n // columns."""
    from types import SimpleNamespace

    from PIL import Image

    from evaluation.benchmark import clip_selection, group_scores, per_prompt_scores
    from evaluation.clip_score import score_samples
    from evaluation.report import image_grid

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    listed = [{"prompt": "a", "index": 0, "files": ["a.png", "b.png"]}, {"prompt": "b", "index": 1, "files": ["c.png"]}]
    scorer = SimpleNamespace(protocol={}, score=lambda images, texts, batch_size: torch.tensor(
        [{"a": 10.0, "b": 40.0}[t] for t in texts]))
    scored = score_samples(scorer, tmp_path, metadata=listed)
    assert scored["clip_score"] == pytest.approx(20.0) and scored["images"] == 3
    assert [(r["file"], r["index"], r["score"]) for r in scored["per_image"]] == [
        ("a.png", 0, 10.0), ("b.png", 0, 10.0), ("c.png", 1, 40.0)]

    clip = {"per_image": [{"index": 0, "score": 10.0}, {"index": 0, "score": 20.0}, {"index": 1, "score": 40.0}]}
    metadata = [{"index": 0, "Category": "A", "all_clip_scores": [10.0, 20.0, 0.0]},
                {"index": 1, "Category": "B", "all_clip_scores": [40.0, 5.0, 3.0]}]
    rows = per_prompt_scores(clip, metadata)
    assert [r["clip_score"] for r in rows] == [15.0, 40.0]
    rows.append({"Category": "A", "clip_score": 25.0})
    assert group_scores(rows, "Category") == [{"Category": "A", "prompts": 2, "clip_score": 20.0},
                                              {"Category": "B", "prompts": 1, "clip_score": 40.0}]
    odd = [{"Category": "B", "clip_score": 1.0}, {"Category": None, "clip_score": 2.0}, {"clip_score": 4.0},
           {"Category": "A", "clip_score": 8.0}]  # (a .tsv row short of the field; a JSONL line without it)
    assert group_scores(odd, "Category") == [{"Category": "(none)", "prompts": 2, "clip_score": 3.0},
                                             {"Category": "A", "prompts": 1, "clip_score": 8.0},
                                             {"Category": "B", "prompts": 1, "clip_score": 1.0}]  # (sorted by name)

    def cfg(keep):
        return SimpleNamespace(sampling=SimpleNamespace(samples_per_prompt=3, keep=keep),
                               clip=SimpleNamespace(model="m"), benchmark=SimpleNamespace(resolution="base"))

    biased = clip_selection(cfg(2), metadata)
    assert biased["selected_by_same_model"] and biased["clip_score_all_samples"] == pytest.approx(78 / 6)
    assert "clip_warning" in biased and "before upsampling" not in biased["clip_warning"]
    upsampled = cfg(2)
    upsampled.benchmark.resolution = "upsampled"  # (all_clip_scores are the detokenizer's images' scores)
    assert clip_selection(upsampled, metadata)["clip_warning"].endswith("all samples (scored before upsampling)")
    for keep in (0, 3):  # every sample kept: nothing was selected
        plain = clip_selection(cfg(keep), metadata)
        assert not plain["selected_by_same_model"] and "clip_warning" not in plain and plain["keep"] == 3

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = image_grid([Image.new("RGB", (4, 4), c) for c in colours], columns=2, cell=4)
    assert grid.size == (8, 8)
    assert [grid.getpixel(xy) for xy in ((1, 1), (5, 1), (1, 5), (5, 5))] == [*colours, (255, 255, 255)]


def test_benchmark_run_passes_its_settings_and_scores_this_runs_prompts(single_process, tmp_path, monkeypatch, capsys):
    """run() without a model (generation stood in for, into a folder an earlier run with a larger limit filled with
    5 prompts): generate() gets the config's sampling settings, the CLIP scorer for reranking only when there is a
    choice, keep, the upsampler and compile_decode; the FID weights are looked for before generation; only this
    run's 3 prompts are scored; eval_config.yaml is written. main() prints the summary line and each warning."""
    from types import SimpleNamespace

    import yaml

    from evaluation import benchmark
    from evaluation.config import load_eval_config

    out = tmp_path / "out"
    fake_generation(out / "images", 5)
    (out / "images" / "00000_1.png").write_bytes((out / "images" / "00000_0.png").read_bytes())
    (out / "images" / "00000.json").write_text(json.dumps({"prompt": "prompt 0", "index": 0,
                                                           "files": ["00000_0.png", "00000_1.png"]}))  # (keep 2)
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(5)), encoding="utf-8")
    stand_in = SimpleNamespace(protocol={"weights": "w"}, score=lambda images, texts, batch_size=64: torch.tensor(
        [10.0 + int(t.split()[1]) for t in texts]))
    calls = []
    monkeypatch.setattr(benchmark, "load_for_sampling", lambda *a: ("model", "vq", "tok"))
    monkeypatch.setattr(benchmark, "check_clip", lambda *a: None)
    monkeypatch.setattr(benchmark.ClipScorer, "load", lambda *a, **k: stand_in)
    monkeypatch.setattr(benchmark, "generate", lambda *a, **k: calls.append((a, k)))

    def config(*sets):
        return load_eval_config("configs/eval/partiprompts.yaml", [
            "model.checkpoint=c", "model.vq=v", "model.text_tokenizer=t", "clip.model=local-dir:x",
            f"benchmark.prompts={tmp_path / 'p.txt'}", f"benchmark.out={out}", "benchmark.limit=3",
            "benchmark.device=cpu", "sampling.batch_size=2", "sampling.seed=7", *sets])

    cfg = config("sampling.samples_per_prompt=3", "sampling.keep=2", "sampling.compile_decode=true", "sampling.top_k=5")
    results = benchmark.run(cfg)
    (args, kwargs), = calls
    assert args[:4] == ("model", "vq", "tok", [{"prompt": f"prompt {i}"} for i in range(3)])
    assert args[4] == out / "images" and args[5] == cfg.sampling.per_code() and args[5].top_k == 5
    assert args[6:] == (3, 7, 2, 0, 1, stand_in, 2, None) and kwargs == {"compile_decode": True}
    assert results["prompts"] == 3 and results["clip_images"] == 4  # (not the earlier run's 5 prompts)
    assert results["clip_score"] == pytest.approx((10 + 10 + 11 + 12) / 4)
    assert yaml.safe_load((out / "eval_config.yaml").read_text())["sampling"]["keep"] == 2
    calls.clear()
    benchmark.run(config("sampling.samples_per_prompt=1", "sampling.keep=0"))
    assert calls[0][0][11] is None  # one sample per prompt: nothing to rerank

    def no_weights():
        raise FileNotFoundError("no FID weights")

    monkeypatch.setattr(benchmark, "default_weights", no_weights)
    calls.clear()
    with pytest.raises(FileNotFoundError, match="no FID weights"):
        benchmark.run(config("benchmark.name=coco30k", f"benchmark.real={SHARED_DATA / 'coco_mini' / 'images'}"))
    assert not calls  # refused before hours of generation

    monkeypatch.setattr(benchmark, "run", lambda cfg: {
        "prompts": 3, "clip_score": 21.23456, "clip_warning": "chosen by the same model", "fid_warning": None})
    benchmark.main(["--config", "configs/eval/partiprompts.yaml", "--set", "model.checkpoint=c", "model.vq=v",
                    "model.text_tokenizer=t", "clip.model=local-dir:x", f"benchmark.out={out}"])
    printed = capsys.readouterr()
    assert printed.out == f"partiprompts: 3 prompts {{'clip_score': 21.2346}}; report {out / 'report.html'}\n"
    assert printed.err.splitlines()[-1:] == ["warning: chosen by the same model"] and "None" not in printed.err


def test_report_page_escapes_its_text_and_replaces_a_page_whole(tmp_path):
    """write_html, table_html and image_html put text (a category from a user's prompt file, a path) in as text,
    never as markup; a reader of the earlier page keeps reading it whole (an atomic replace)."""
    from evaluation.report import image_html, table_html, write_html

    table = table_html([{"Category": "<b>Food</b>", "clip_score": 1.23456, "prompts": 2}], digits=3)
    assert table == ("<table><tr><th>Category</th><th>clip_score</th><th>prompts</th></tr><tr><td>&lt;b&gt;Food"
                     "&lt;/b&gt;</td><td>1.235</td><td>2</td></tr></table>")
    assert "<th>a&amp;b</th>" in table_html([{"a&b": 1}])
    assert table_html([{"a": 1}, {"a": 2, "b": 3}]).count("<th>") == 1  # (the first row's columns)
    assert image_html('grids/"x".png', "<i>cap</i>", 80) == ('<figure><img src="grids/&quot;x&quot;.png" width="80">'
                                                            "<figcaption>&lt;i&gt;cap&lt;/i&gt;</figcaption></figure>")
    page = tmp_path / "report.html"
    page.write_text("earlier")
    with open(page) as reader:
        write_html(page, "<T>", [("Samples: <script>", "<p>body</p>")], intro="<b>intro</b>")
        assert reader.read() == "earlier"
    text = page.read_text()
    assert "<title>&lt;T&gt;</title>" in text and "<h1>&lt;T&gt;</h1>" in text
    assert "<h2>Samples: &lt;script&gt;</h2>\n<p>body</p>" in text and "<p><b>intro</b></p>" in text  # (intro, body:
    # markup the caller made)


def test_image_grid_keeps_small_images_pixelated_and_three_caption_lines(tmp_path, monkeypatch):
    """A sample smaller than its cell is scaled up by nearest neighbour (its pixels, not a blur); a caption wraps
    onto at most three lines. line_plot: log y when asked, a legend for more than one series."""
    import matplotlib.pyplot as plt
    from PIL import Image, ImageChops

    from evaluation.report import image_grid, line_plot

    checker = Image.fromarray(np.kron([[0, 255], [255, 0]], np.ones((2, 2))).astype(np.uint8)).convert("RGB")
    grid = image_grid([checker], columns=1, cell=16)
    assert {tuple(p) for p in np.asarray(grid).reshape(-1, 3).tolist()} == {(0, 0, 0), (255, 255, 255)}

    def caption_height(text):
        grid = image_grid([Image.new("RGB", (4, 4), "white")], [text], columns=1, cell=60)  # (10 characters a line)
        box = ImageChops.invert(grid.crop((0, 60, 60, 100))).getbbox()
        return box[3] - box[1]

    heights = [caption_height(" ".join(["abcdefgh"] * lines)) for lines in (1, 2, 3, 4)]  # (a word a line)
    assert heights[0] < heights[1] < heights[2] == heights[3]  # (the fourth line not drawn)

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    line_plot(tmp_path / "a.png", {"loss": ([1, 2], [1.0, 0.1])}, "step", "loss", logy=True)
    line_plot(tmp_path / "b.png", {"a": ([1, 2], [1, 2]), "b": ([1, 2], [2, 3])}, "step", "y", title="t")
    (first,), (second,) = figures[0].axes, figures[1].axes
    assert (first.get_yscale(), second.get_yscale()) == ("log", "linear")
    assert first.get_legend() is None and second.get_legend() is not None and second.get_title() == "t"
    assert (first.get_xlabel(), first.get_ylabel()) == ("step", "loss") and (tmp_path / "a.png").is_file()


def test_report_grids_show_each_prompts_best_image_and_the_warnings_once(tmp_path):
    """A grid holds the first benchmark.grid_prompts prompts (at most 4 a row), each by its first (best) file and
    its prompt as caption; a warning is said in the intro (as text), not in the summary table, and an empty one not
    at all; the intro says whether the samples were reranked. generated_size and fid_results refuse what they
    cannot measure (no prompt; real_center_crop of images that are not square)."""
    from PIL import Image

    from common.config import load_typed
    from evaluation.benchmark import fid_results, generated_size, write_report
    from evaluation.config import EvalConfig

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), "red").save(images / "best.png")
    Image.new("RGB", (16, 16), "blue").save(images / "worse.png")
    metadata = [{"prompt": f"prompt {i}", "index": i, "files": ["best.png", "worse.png"]} for i in range(5)]
    results = {"clip_score": 30.0, "clip_warning": "<biased>", "fid_warning": None}

    def report(*sets):
        cfg = load_typed(EvalConfig, "configs/eval/partiprompts.yaml", ["clip.model=local-dir:c", *sets])
        return write_report(cfg, tmp_path, images, results, metadata, []).read_text()

    text = report("benchmark.grid_prompts=3")
    grid = Image.open(tmp_path / "grids" / "samples_000.png").convert("RGB")
    assert grid.size == (3 * 160, 160 + 40)  # three prompts in a row, captions below
    assert {grid.getpixel((80 + 160 * k, 80)) for k in range(3)} == {(255, 0, 0)}
    assert min(grid.crop((0, 160, 160, 200)).getdata()) < (128, 128, 128)  # (a caption written)
    assert text.count("<b>Warning:</b>") == 1 and "<b>Warning:</b> &lt;biased&gt;" in text
    assert "clip_warning" not in text and "Samples reranked by CLIP score" in text
    Image.open(tmp_path / "grids" / "samples_000.png").close()
    report("benchmark.grid_prompts=8")
    assert Image.open(tmp_path / "grids" / "samples_000.png").size == (4 * 160, 2 * 200)  # 5 prompts: 4 + 1
    assert "The first sample is shown" in report("sampling.samples_per_prompt=1", "sampling.keep=0")

    with pytest.raises(ValueError, match="metadata.jsonl lists no prompts"):
        generated_size(images, [])
    cfg = load_typed(EvalConfig, "configs/eval/coco30k.yaml", ["benchmark.real=r"])
    with pytest.raises(ValueError, match=r"are 32x16, not square; set benchmark.real_center_crop=false"):
        fid_results(cfg, images, metadata, (32, 16))


@pytest.mark.parametrize("sets, expected", [
    (["benchmark.name=PartiPrompts"], r"benchmark.name='PartiPrompts' must be one of partiprompts, coco30k, prompts$"),
    (["benchmark.resolution=high"], r"benchmark.resolution='high' must be base or upsampled$"),
    (["clip.model="], r"sampling.keep ranks samples by CLIP score: set clip.model"),  # (the config keeps 1 of 4)
    (["clip.model=ViT-B-32", "clip.tag=openai"], r"clip.tag='openai' names the open_clip pretrained weights"),
    (["clip.model=ViT-B-32", "clip.weights=random", "clip.tag=openai"], r"clip.tag='openai' names the open_clip"),
    (["sampling.seed=-1"], r"sampling.seed=-1 must be in \[0, 2\*\*32\)$"),
    (["benchmark.grid_prompts=0"], r"benchmark.grid_prompts=0 must be >= 1"),
    (["sampling.keep=5"], r"--keep 5 keeps more than the 4 sample\(s\) per prompt"),
    (["sampling.samples_per_prompt=0", "sampling.keep=0"], r"sampling.samples_per_prompt\) must be >= 1, not 0$"),
    (["model.text_tokenizer="], r"^model.text_tokenizer must be set"),
])
def test_eval_config_refuses_each_bad_override(sets, expected):
    from common.config import ConfigError
    from evaluation.config import load_eval_config

    paths = ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c", "clip.model=local-dir:m"]
    with pytest.raises(ConfigError, match=expected):
        load_eval_config("configs/eval/partiprompts.yaml", [*paths, *sets])


def test_eval_config_defaults_are_the_documented_ones():
    """The defaults a config file that leaves a key out gets (as each key's documentation says), every benchmark
    name accepted, and per_code(): the code-choosing settings alone, as a SamplingConfig (what generation.json
    records)."""
    from evaluation.config import load_eval_config
    from evaluation.sampling import SamplingConfig

    cfg = load_eval_config(None, ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c"])
    s, b = cfg.sampling, cfg.benchmark
    assert (s.guidance_scale, s.samples_per_prompt, s.keep, s.seed, s.batch_size, s.compile_decode) == (1.2, 1, 0, 0, 0,
                                                                                                         False)
    assert (b.name, b.prompts, b.real, b.real_center_crop, b.limit, b.out, b.grid_prompts, b.device, b.resolution) == (
        "partiprompts", "shared:PartiPrompts.tsv", "", True, 0, "eval", 8, "auto", "base")
    assert (cfg.model.upsampler, cfg.clip.model, cfg.clip.weights, cfg.clip.tag) == ("", "", "", "")
    for name in ("partiprompts", "coco30k", "prompts"):
        assert load_eval_config(None, ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c", "benchmark.real=r",
                                       f"benchmark.name={name}"]).benchmark.name == name
    cfg = load_eval_config("configs/eval/partiprompts.yaml",
                           ["model.checkpoint=a", "model.vq=b", "model.text_tokenizer=c", "clip.model=m",
                            "sampling.top_p=0.9", "sampling.seed=3"])
    assert cfg.sampling.per_code() == SamplingConfig(temperature=1.0, top_k=0, top_p=0.9, guidance_scale=1.2)


def test_benchmark_places_the_upsampler_on_the_device_after_init_distributed(single_process, tmp_path, monkeypatch):
    """The upsampler file is checked before anything else is loaded, but the module reaches the device only after
    init_distributed has chosen this rank's GPU: placed on "cuda" before, every rank's upsampler was on GPU 0."""
    from evaluation import benchmark
    from evaluation.config import load_eval_config

    events = []
    real_init = benchmark.init_distributed

    class Upsampler(torch.nn.Linear):
        def to(self, *args, **kwargs):
            events.append(("to", args))
            return super().to(*args, **kwargs)

    def load(path, device, flag):
        events.append(("load", device))
        return Upsampler(1, 1)

    monkeypatch.setattr(benchmark, "load_upsampler_for_sampling", load)
    monkeypatch.setattr(benchmark, "init_distributed", lambda **k: (events.append(("init",)), real_init(**k)))
    monkeypatch.setattr(benchmark, "use_device", lambda *a: "cuda:7")  # (stands for "cuda": the rank's GPU)
    monkeypatch.setattr(benchmark, "load_for_sampling", lambda *a: ("model", "vq", "tok"))
    monkeypatch.setattr(Upsampler, "_apply", lambda self, fn, recurse=True: self)  # (no GPU here)
    given = []
    monkeypatch.setattr(benchmark, "generate", lambda *a, **k: given.append(a[13]))
    monkeypatch.setattr(benchmark, "score", lambda *a: {})
    monkeypatch.setattr(benchmark, "gather_metadata", lambda *a: None)
    (tmp_path / "p.txt").write_text("a prompt\n", encoding="utf-8")
    benchmark.run(load_eval_config("configs/eval/partiprompts.yaml", [
        "model.checkpoint=c", "model.vq=v", "model.text_tokenizer=t", "model.upsampler=u.pt",
        f"benchmark.prompts={tmp_path / 'p.txt'}", f"benchmark.out={tmp_path / 'out'}", "sampling.samples_per_prompt=1",
        "sampling.keep=0"]))
    assert events == [("load", "cpu"), ("init",), ("to", ("cuda:7",))]
    assert isinstance(given[0], Upsampler)


def test_standalone_clip_score_does_not_warn_of_a_selection_without_reranking():
    """--keep 1 of 2 without --clip (the first sample kept, no reranking) scored with untrained weights: neither
    records a weights file (sha256 None), which is not the same weights; no warning."""
    from evaluation.clip_score import same_model_selection

    meta = [{"keep": 1, "samples_per_prompt": 2, "rerank": None, "files": ["00000_0.png"]}]
    assert same_model_selection(meta, {"weights": "random", "weights_sha256": None}) is None
    meta[0]["rerank"] = {"weights_sha256": None}
    assert same_model_selection(meta, {"weights": "random", "weights_sha256": None}) is None
