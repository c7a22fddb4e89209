"""FID: zero against itself, growing with noise, equal to an independent computation; real TF-Inception weights;
real-set statistics cached by content in the user's cache folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.fid import InceptionFeatures, fid, frechet_distance, statistics


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test caches into its own folder, never into the user's ~/.cache."""
    monkeypatch.setenv("PARTI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception: per-channel mean, spread and coarse layout of the preprocessed image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 10  # features of the order of Inception's, FIDs of the order of 1-100
        coarse = torch.nn.functional.adaptive_avg_pool2d(x[:, :1], 2).flatten(1)
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), coarse], 1)


def tiny_weights(path: Path) -> Path:
    """A TorchScript feature extractor small enough for FID tests that do not test Inception itself."""
    torch.jit.save(torch.jit.script(TinyFeatures()), str(path))
    return path


def image_folder(folder: Path, n: int, seed: int, brightness: int = 0, size: int = 16) -> Path:
    """n random RGB PNGs named 00000.png, ... (the same names for any seed)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.integers(0, 200, (size, size, 3)) + brightness, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return folder


def pytorch_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID as pytorch-fid computes it (scipy's sqrtm of S1 S2, regularised when singular): the reference the
    module's eigendecomposition must equal."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean, _ = linalg.sqrtm((s1 + offset) @ (s2 + offset), disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    assert abs(frechet_distance(*statistics(a), *statistics(a))) < 1e-6
    values = [frechet_distance(*statistics(a), *statistics(a + rng.normal(scale=s, size=a.shape))) for s in (0.1, 0.5, 2.0)]
    assert values[0] < values[1] < values[2]
    b = rng.normal(loc=0.3, size=(300, 16))
    assert frechet_distance(*statistics(a), *statistics(b)) == pytest.approx(pytorch_fid(a, b), rel=1e-9)
    # Fewer images than features (singular covariances), as in a small evaluation.
    few_a, few_b = a[:10], b[:12]
    assert frechet_distance(*statistics(few_a), *statistics(few_b)) == pytest.approx(pytorch_fid(few_a, few_b), rel=1e-6)


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures(device="cpu")


def test_real_weights_give_pool_features_of_real_photos(extractor, tmp_path):
    from tests import laion_fixtures as lf

    photos = lf.coco_mini()[:6]
    for key, jpg, _ in photos:
        (tmp_path / "real").mkdir(exist_ok=True)
        (tmp_path / "real" / f"{key}.jpg").write_bytes(jpg)
    from PIL import Image

    images = [torch.from_numpy(np.array(Image.open(tmp_path / "real" / f"{k}.jpg").convert("RGB"))).permute(2, 0, 1)
              for k, _, _ in photos]
    feats = extractor.features(images)
    assert feats.shape == (6, 2048) and np.isfinite(feats).all() and feats.std(0).mean() > 0
    assert len(extractor.sha256) == 64
    # The folder command: itself is ~0, a noisy copy is not; the protocol is written beside the result.
    (tmp_path / "noisy").mkdir()
    for i, img in enumerate(images):
        noisy = (img.float() + torch.randn(img.shape, generator=torch.Generator().manual_seed(i)) * 60).clamp(0, 255)
        Image.fromarray(noisy.byte().permute(1, 2, 0).numpy()).save(tmp_path / "noisy" / f"{i}.png")
    same = fid(tmp_path / "real", tmp_path / "real")
    other = fid(tmp_path / "real", tmp_path / "noisy")
    assert abs(same["fid"]) < 1e-3 and other["fid"] > 10
    assert other["protocol"]["real_images"] == 6 and other["protocol"]["weights_sha256"] == extractor.sha256
    assert other["protocol"]["real_statistics"]["from_cache"]  # the real statistics were cached by the first call
    assert not list((tmp_path / "real").glob(".*"))  # in the cache folder, not beside the images


def test_real_images_replaced_under_the_same_names_give_the_new_fid(tmp_path, cache_home):
    weights = tiny_weights(tmp_path / "tiny.pt")
    real, fake = image_folder(tmp_path / "real", 8, seed=0), image_folder(tmp_path / "fake", 8, seed=1, brightness=40)
    before = fid(real, fake, weights)
    assert not before["protocol"]["real_statistics"]["from_cache"]
    assert fid(real, fake, weights)["protocol"]["real_statistics"]["from_cache"]  # unchanged images: cached
    image_folder(real, 8, seed=2, brightness=50)  # other images, the same file names
    after = fid(real, fake, weights)
    fresh = fid(real, fake, weights, cache=tmp_path / "fresh-cache")  # computed from scratch
    assert not fresh["protocol"]["real_statistics"]["from_cache"]
    assert after["fid"] == pytest.approx(fresh["fid"], rel=1e-9) and abs(after["fid"] - before["fid"]) > 1
    assert sorted(p.name for p in real.iterdir()) == [f"{i:05d}.png" for i in range(8)]  # nothing written there
    assert len(list((cache_home / "fid").glob("real_*.npz"))) == 2
    # Another feature extractor is another key, even for the same images.
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(TinyFeatures(), torch.nn.Tanh())), str(other))
    assert not fid(real, fake, other)["protocol"]["real_statistics"]["from_cache"]


def test_unfinished_images_of_a_stopped_writer_are_not_counted(tmp_path):
    """evaluation.generate writes x.tmp.png and renames it: a leftover of a stopped run is not a sample."""
    from PIL import Image

    from evaluation.fid import image_files

    for name in ("a.png", "b.png", "c.tmp.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.png"]


def test_features_are_computed_with_tf32_off_and_the_flags_restored():
    """cuDNN convolutions run in TF32 by default on a GPU (and training turns TF32 on for fp32 runs): the
    Inception features, hence FID and its cached real statistics, would depend on the device. They are
    computed with TF32 off, whatever the flags were, and the flags are left as they were; the cache key and
    the protocol say so."""
    from evaluation.fid import PREPROCESSING

    seen = []

    def model(x):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return x.mean((2, 3))

    extractor = object.__new__(InceptionFeatures)
    extractor.device, extractor.model = "cpu", model
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # (torch's flag modules:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # monkeypatch cannot undo them)
    try:
        extractor.features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
        assert seen == [(False, False)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert "TF32 off" in PREPROCESSING
