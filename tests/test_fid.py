"""FID: zero against itself, growing with noise, equal to an independent computation; real TF-Inception weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.fid import InceptionFeatures, fid, frechet_distance, statistics


def independent_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Tr(sqrt(S1 S2)) from the eigenvalues of S1 S2 (not scipy's sqrtm, which the module uses)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    assert abs(frechet_distance(*statistics(a), *statistics(a))) < 1e-6
    values = [frechet_distance(*statistics(a), *statistics(a + rng.normal(scale=s, size=a.shape))) for s in (0.1, 0.5, 2.0)]
    assert values[0] < values[1] < values[2]
    b = rng.normal(loc=0.3, size=(300, 16))
    assert frechet_distance(*statistics(a), *statistics(b)) == pytest.approx(independent_fid(a, b), rel=1e-6)


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

    images = [torch.from_numpy(np.asarray(Image.open(tmp_path / "real" / f"{k}.jpg").convert("RGB"))).permute(2, 0, 1)
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
    assert list((tmp_path / "real").glob(".fid_stats_*.npz"))  # the real statistics were cached
