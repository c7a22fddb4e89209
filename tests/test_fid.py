"""FID: zero against itself, growing with noise, equal to an independent computation; real TF-Inception weights;
real-set statistics cached by content in the user's cache folder; real images centre-cropped to the generated
size on request; few images named FID-N; TF32 off under either of torch's precision APIs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.fid import InceptionFeatures, fid, frechet_distance, statistics

ROOT = Path(__file__).resolve().parent.parent


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
        feats = torch.cat([x.mean((2, 3)), x.std((2, 3)), coarse], 1)
        # zero-padded to Inception's 2048 pool features (the extractor checks the count; zeros add 0 to a FID)
        return torch.nn.functional.pad(feats, (0, 2048 - feats.shape[1]))


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
    values = [frechet_distance(*statistics(a), *statistics(a + rng.normal(scale=s, size=a.shape)))
              for s in (0.1, 0.5, 2.0)]
    assert values[0] < values[1] < values[2]
    b = rng.normal(loc=0.3, size=(300, 16))
    assert frechet_distance(*statistics(a), *statistics(b)) == pytest.approx(pytorch_fid(a, b), rel=1e-9)
    # Fewer images than features (singular covariances), as in a small evaluation.
    few_a, few_b = a[:10], b[:12]
    assert (frechet_distance(*statistics(few_a), *statistics(few_b))
            == pytest.approx(pytorch_fid(few_a, few_b), rel=1e-6))


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
    # The weights' input contract: 299 x 299 in [-1, 1] as TF-Inception's (x - 128) / 128 (features of inputs
    # scaled otherwise are still finite and varied): an image of black and white halves keeps 0 and 255 at its
    # corners through the resize.
    seen, model = [], extractor.model
    extractor.model = lambda x: seen.append(x) or model(x)
    try:
        halves = torch.zeros(3, 32, 32, dtype=torch.uint8)
        halves[:, :, 16:] = 255
        extractor.features([halves])
    finally:
        extractor.model = model
    assert seen[0].shape == (1, 3, 299, 299)
    assert (float(seen[0].min()), float(seen[0].max())) == pytest.approx((-1, 127 / 128), abs=1e-5)
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


def test_a_real_folder_of_lossless_bmp_and_tiff_files_gives_the_fid_of_its_pngs(tmp_path, cache_home):
    """A real set kept as BMP or TIFF (lossless: the same pixels) is read whole; FID read only png/jpg/webp,
    so such files were left out without a word (a folder of them: 'needs at least 2 images, found 0')."""
    from PIL import Image

    weights = tiny_weights(tmp_path / "tiny.pt")
    real, fake = image_folder(tmp_path / "real", 6, seed=0), image_folder(tmp_path / "fake", 6, seed=1, brightness=40)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, png in enumerate(sorted(real.iterdir())):
        Image.open(png).save(mixed / f"{i:05d}.{('bmp', 'tif', 'tiff')[i % 3]}")
    expected = fid(real, fake, weights)
    got = fid(mixed, fake, weights)
    assert got["protocol"]["real_images"] == 6 and got["fid"] == pytest.approx(expected["fid"], rel=1e-9)


def test_16_bit_and_transparent_images_are_read_as_the_data_pipeline_reads_them(tmp_path, cache_home):
    """PIL's convert("RGB") clips 16-bit values at 255 (a 16-bit copy of a set read almost white: FID 700 against
    the 8-bit set) and keeps the hidden colour of transparent pixels; the data pipeline's to_rgb scales 16 bits
    and composites on white."""
    from PIL import Image

    from evaluation.fid import read_image

    weights = tiny_weights(tmp_path / "tiny.pt")
    grey8, grey16 = tmp_path / "grey8", tmp_path / "grey16"
    grey8.mkdir(), grey16.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (16, 16)).astype(np.uint16)
        Image.fromarray(pixels.astype(np.uint8), "L").save(grey8 / f"{i}.png")
        Image.fromarray(pixels * 257).save(grey16 / f"{i}.png")  # (mode I;16: the same picture in 16 bits)
    assert Image.open(grey16 / "0.png").mode == "I;16"
    assert abs(fid(grey16, grey8, weights)["fid"]) < 1e-3
    assert "16-bit scaled to 8, transparency on white" in fid(grey16, grey8, weights)["protocol"]["preprocessing"]
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent red: white
    assert read_image(tmp_path / "clear.png").eq(255).all()


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


def stand_in(sha256: str = "a" * 64) -> tuple[InceptionFeatures, list[int]]:
    """An extractor whose model is per-channel means and spreads (no weights loaded: fast), and the batch sizes
    it was called with (an empty list: nothing was computed)."""
    calls = []

    def model(x):
        calls.append(len(x))
        return torch.nn.functional.pad(torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) * 10, (0, 2048 - 6))

    extractor = InceptionFeatures.__new__(InceptionFeatures)
    extractor.device, extractor.path, extractor.sha256, extractor.model = "cpu", Path("stand-in.pt"), sha256, model
    return extractor, calls


def bmp_folder(folder: Path, n: int, seed: int) -> list[Path]:
    """n random 8x8 BMPs: uncompressed, so any pixels give files of the same size."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.bmp")
    return sorted(folder.iterdir())


def test_real_statistics_are_cached_by_the_images_contents_crop_and_weights(tmp_path, cache_home):
    """The cache key is the multiset of the images' bytes, the crop size and the weights' sha256: names, order,
    the folder and the weights' path do not matter; an image replaced by one of the same size and modification
    time does, and so do duplicates (they weigh in the mean and covariance)."""
    from evaluation.fid import folder_features, real_statistics, real_statistics_key

    extractor, calls = stand_in()
    files = bmp_folder(tmp_path / "real", 4, seed=0)
    mu, sigma, info = real_statistics(extractor, files)
    assert not info["from_cache"] and calls == [4]
    assert info["cache"] == str(cache_home / "fid" / f"real_{info['key'][:32]}.npz") and Path(info["cache"]).is_file()
    # The same bytes under other names, in another folder, in another order, weights moved: no Inception pass.
    moved = tmp_path / "moved"
    moved.mkdir()
    renamed = [f.rename(moved / f"x{i}.bmp") for i, f in enumerate(reversed(files))]
    extractor.path = Path("elsewhere/stand-in.pt")
    cached_mu, cached_sigma, cached = real_statistics(extractor, renamed)
    assert cached["from_cache"] and cached["key"] == info["key"] and calls == [4]
    np.testing.assert_array_equal(cached_mu, mu)
    np.testing.assert_array_equal(cached_sigma, sigma)
    # One image replaced by another of the same size and modification time: computed anew, from the new pixels.
    before = renamed[0].stat()
    bmp_folder(tmp_path / "other", 1, seed=1)[0].replace(renamed[0])
    os.utime(renamed[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    after = renamed[0].stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    new_mu, new_sigma, new = real_statistics(extractor, renamed)
    assert not new["from_cache"] and calls == [4, 4]
    expected_mu, expected_sigma = statistics(folder_features(extractor, renamed))
    np.testing.assert_allclose(new_mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(new_sigma, expected_sigma, rtol=1e-12, atol=1e-12)
    assert np.abs(new_mu - mu).max() > 0.1
    # Other keys: a duplicated image, another crop size, other weights.
    a, b = renamed[:2]
    assert real_statistics_key(extractor, [a, a, b]) != real_statistics_key(extractor, [a, b, b])
    keys = {real_statistics_key(extractor, renamed, size) for size in (None, 8, 16)}
    keys.add(real_statistics_key(stand_in(sha256="b" * 64)[0], renamed))
    assert len(keys) == 4 and new["key"] in keys
    # The crop size is applied, not only keyed: the statistics of the images resized as the generated ones are.
    cropped_mu, _, cropped = real_statistics(extractor, renamed, real_size=4)
    assert not cropped["from_cache"] and np.abs(cropped_mu - new_mu).max() > 0.1
    np.testing.assert_allclose(cropped_mu, statistics(folder_features(extractor, renamed, size=4))[0], rtol=1e-12)


@pytest.mark.parametrize("damage", ["empty", "not an npz", "truncated", "bit flipped", "another key"])
def test_a_damaged_cache_file_is_computed_anew_and_replaced(tmp_path, cache_home, damage):
    """A cache file that cannot be read (a copy cut short, a flipped bit; atomic writes prevent neither) or that
    holds another key's statistics (the file name is the key's first 32 hex digits) is not used: the statistics
    are computed and the file written again."""
    from evaluation.fid import real_statistics

    extractor, calls = stand_in()
    files = bmp_folder(tmp_path / "real", 3, seed=0)
    mu, sigma, info = real_statistics(extractor, files)
    path = Path(info["cache"])
    good = path.read_bytes()
    path.write_bytes({"empty": b"", "not an npz": b"not an npz", "truncated": good[:len(good) // 2],
                      "bit flipped": good[:2000] + bytes([good[2000] ^ 1]) + good[2001:]}.get(damage, good))
    if damage == "another key":
        np.savez(path, mu=mu + 1, sigma=sigma, key=np.array("0" * 64))
    again_mu, again_sigma, again = real_statistics(extractor, files)
    assert not again["from_cache"] and again["cache"] == str(path) and calls == [3, 3]
    np.testing.assert_array_equal(again_mu, mu)
    np.testing.assert_array_equal(again_sigma, sigma)
    assert real_statistics(extractor, files)[2]["from_cache"] and calls == [3, 3]  # written again


def test_an_unwritable_cache_is_a_warning_and_the_statistics_are_still_returned(tmp_path, capsys):
    from evaluation.fid import real_statistics

    extractor, calls = stand_in()
    files = bmp_folder(tmp_path / "real", 3, seed=0)
    mu, sigma, _ = real_statistics(extractor, files, cache=tmp_path / "elsewhere")
    blocked = tmp_path / "a file"
    blocked.write_text("")  # (as root, permissions refuse nothing: a file where the cache folder should be)
    for _ in range(2):  # nothing was cached: each call computes
        got_mu, got_sigma, info = real_statistics(extractor, files, cache=blocked)
        assert info == {"cache": None, "key": info["key"], "from_cache": False}
        assert "warning: real FID statistics not cached (" in capsys.readouterr().err
        np.testing.assert_array_equal(got_mu, mu)
        np.testing.assert_array_equal(got_sigma, sigma)
    assert calls == [3, 3, 3]


# Run in a child process as the user a folder of mode 000 refuses: root without the capabilities that let it enter.
LOCKED_CACHE_CHILD = """
import os, sys
from pathlib import Path
import numpy as np
from evaluation.fid import real_statistics
from tests.test_fid import bmp_folder, stand_in
tmp = Path(sys.argv[1])
try:
    os.listdir(tmp / "locked")
    sys.exit("the locked folder could be read: the check would prove nothing")
except PermissionError:
    pass
extractor, calls = stand_in()
mu, _, info = real_statistics(extractor, bmp_folder(tmp / "real", 3, seed=0), cache=tmp / "locked")
assert info["cache"] is None and not info["from_cache"] and calls == [3], (info, calls)
np.save(tmp / "mu.npy", mu)
"""
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
            "-dac_override,-dac_read_search"]


def test_a_cache_folder_that_cannot_be_searched_is_a_warning_too(tmp_path):
    """A cache folder the user may not enter (another user's shared $PARTI_CACHE_DIR): statistics computed and
    returned with the warning, not a PermissionError from looking for the cache file. As root (CI), the child
    process runs under setpriv without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, as another user would."""
    import shutil
    import subprocess
    import sys

    from evaluation.fid import real_statistics
    from model_parallel.state import child_environment

    prefix = DROP_DAC if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("root enters any folder, and setpriv (util-linux), which drops that right, is not installed")
    (tmp_path / "locked").mkdir(mode=0)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", LOCKED_CACHE_CHILD, str(tmp_path)], cwd=ROOT,
                              env=child_environment(), capture_output=True, text=True, timeout=300, check=False)
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: real FID statistics not cached (" in proc.stderr
    extractor, _ = stand_in()
    files = sorted((tmp_path / "real").iterdir())
    np.testing.assert_allclose(np.load(tmp_path / "mu.npy"),  # (another process: float32 sums may round apart)
                               real_statistics(extractor, files, cache=tmp_path / "open")[0], rtol=1e-6)


def test_the_cache_folder_is_the_override_else_parti_cache_dir_else_xdg_cache_home_else_home(tmp_path, monkeypatch):
    from evaluation.fid import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PARTI_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "parti"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "parti"
    monkeypatch.setenv("PARTI_CACHE_DIR", str(tmp_path / "parti"))
    assert cache_dir() == tmp_path / "parti"
    assert cache_dir(tmp_path / "given") == tmp_path / "given"


def test_fid_reads_the_real_statistics_from_the_cache_it_is_given_at_its_crop_size(tmp_path, monkeypatch):
    """fid() hands its cache folder and real_size to the cache and reports where the statistics came from."""
    import evaluation.fid as fid_module

    extractor, calls = stand_in()
    monkeypatch.setattr(fid_module, "InceptionFeatures", lambda weights: extractor)
    monkeypatch.setattr(fid_module, "frechet_distance", lambda *stats: 0.0)  # (2048x2048 eigh: ~20 s here)
    real, fake = image_folder(tmp_path / "real", 3, seed=0, size=12), image_folder(tmp_path / "fake", 2, seed=1)
    cache = tmp_path / "given"
    first = fid(real, fake, cache=cache, real_size=8)["protocol"]["real_statistics"]
    assert not first["from_cache"] and Path(first["cache"]).parent == cache / "fid"
    second = fid(real, fake, cache=cache, real_size=8)
    assert second["protocol"]["real_statistics"] == {**first, "from_cache": True}
    assert not fid(real, fake, cache=cache)["protocol"]["real_statistics"]["from_cache"]  # uncropped: another key
    assert calls == [3, 2, 2, 3, 2]  # (real, fake; fake only; real, fake)
    assert not (tmp_path / "cache").exists()  # (nothing in $PARTI_CACHE_DIR: the given folder was used)


def test_unfinished_images_of_a_stopped_writer_are_not_counted(tmp_path):
    """evaluation.generate writes x.tmp.png and renames it: a leftover of a stopped run is not a sample."""
    from PIL import Image

    from evaluation.fid import image_files

    for name in ("a.png", "b.png", "c.tmp.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.png"]


def test_a_folder_is_every_image_under_it_and_needs_two(tmp_path):
    """image_files: images in subfolders and with upper-case suffixes count (the module docstring: "every image
    under it"); one image is refused by name (a covariance of one image is NaN), by fid() too when the generated
    images are given as a list, and before any weights are loaded."""
    from PIL import Image

    from evaluation.fid import image_files

    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.jpg", "C.PNG", "notes.txt"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG") if name != "notes.txt" else \
            (tmp_path / name).write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == ["C.PNG", "a.png", "sub/b.jpg"]
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "x.png")
    with pytest.raises(ValueError, match="FID needs at least 2 images, found 1"):
        image_files(one)
    with pytest.raises(ValueError, match="FID needs at least 2 generated images, found 1"):
        fid(tmp_path, one, weights=tmp_path / "never_loaded.pt", fake_files=[one / "x.png"])


def test_a_real_size_below_one_is_refused(tmp_path):
    from evaluation.fid import main

    with pytest.raises(SystemExit) as exit:
        main(["--real", str(tmp_path), "--fake", str(tmp_path), "--real-size", "0"])
    assert exit.value.code == 2  # (argparse's usage error, before any folder is read)


def tf32_flags() -> tuple:
    """The TF32 switches for matmuls and cuDNN convolutions, read through torch's fp32_precision API where it
    exists (its getters never refuse; the legacy allow_tf32 ones raise once a process has used the new API)."""
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        return torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32


def set_tf32(api: str) -> None:
    """TF32 on, through the legacy switches (as training/flops.py does) or the fp32_precision API."""
    if api == "legacy":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"


@pytest.fixture
def tf32_restored():
    """torch's flag modules are not undone by monkeypatch: the flags are put back by hand, the legacy state
    first (its setters set both APIs' flags), then the fp32_precision flags as they were."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    legacy = torch.get_float32_matmul_precision(), cudnn.allow_tf32
    new = tf32_flags() if hasattr(getattr(cudnn, "conv", None), "fp32_precision") else None
    yield
    torch.set_float32_matmul_precision(legacy[0])
    cudnn.allow_tf32 = legacy[1]
    if new is not None:
        matmul.fp32_precision, cudnn.conv.fp32_precision = new
    assert (torch.get_float32_matmul_precision(), cudnn.allow_tf32) == legacy  # (readable again: not a mix)


@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
def test_features_are_computed_with_tf32_off_and_the_flags_restored(api, tf32_restored):
    """cuDNN convolutions run in TF32 by default on a GPU (and training turns TF32 on for fp32 runs): the
    Inception features, hence FID and its cached real statistics, would depend on the device. They are
    computed with TF32 off, whatever the flags were and whichever of torch's APIs set them (mixing the legacy
    switches with the fp32_precision API is an error in torch >= 2.9), and the flags are left as they were;
    the cache key and the protocol say so."""
    from evaluation.fid import PREPROCESSING

    if api == "fp32_precision" and not hasattr(torch.backends.cudnn.conv, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 switches")
    seen = []

    def model(x):
        seen.append(tf32_flags())
        return x.mean((2, 3)).repeat(1, 1024)[:, :2048]

    extractor = object.__new__(InceptionFeatures)
    extractor.device, extractor.model, extractor.path = "cpu", model, Path("stand-in")
    set_tf32(api)
    before = tf32_flags()
    extractor.features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert seen == [("ieee", "ieee") if isinstance(before[0], str) else (False, False)]
    assert tf32_flags() == before and before in (("tf32", "tf32"), (True, True))
    assert "TF32 off" in PREPROCESSING


def test_real_images_are_centre_cropped_to_the_generated_size(tmp_path):
    """Generated images are undistorted squares; a wide real photo stretched to 299x299 is not what they are
    compared with. With real_size the real side is the centre square at the generated size: here real
    32x16 photos (white margins left and right) against their centre 16x16 pixels cut out independently
    (numpy slicing) give FID 0, while the stretched photos do not."""
    from PIL import Image

    weights = tiny_weights(tmp_path / "tiny.pt")
    real, fake = tmp_path / "real", image_folder(tmp_path / "fake", 6, seed=0)  # the 16x16 centres
    real.mkdir()
    for path in sorted(fake.iterdir()):
        centre = np.array(Image.open(path))
        margin = np.full((16, 8, 3), 255, np.uint8)
        Image.fromarray(np.concatenate([margin, centre, margin], axis=1)).save(real / path.name)
        assert np.array_equal(np.array(Image.open(real / path.name))[:, 8:24], centre)
    stretched = fid(real, tmp_path / "fake", weights)
    cropped = fid(real, tmp_path / "fake", weights, real_size=16)
    assert abs(cropped["fid"]) < 1e-6 and stretched["fid"] > 1
    assert not cropped["protocol"]["real_statistics"]["from_cache"]  # another preprocessing, another cache key
    assert "16x16" in cropped["protocol"]["real_preprocessing"]
    assert "16x16" not in stretched["protocol"]["real_preprocessing"]
    assert fid(real, tmp_path / "fake", weights, real_size=16)["protocol"]["real_statistics"]["from_cache"]


def test_few_images_are_named_fid_n_with_a_warning_and_the_value_survives_an_unwritable_folder(tmp_path, monkeypatch,
                                                                                               capsys):
    """FID is biased upward at small N: over fewer than 30,000 generated images it is FID-N, with the counts
    and a warning, in fid.json and the printed line. A folder fid.json cannot be written to does not lose the
    value computed before: it is printed, with a warning, and an earlier fid.json stays."""
    import evaluation.fid as fid_module
    from evaluation.fid import fid_name, small_sample_warning

    weights = tiny_weights(tmp_path / "tiny.pt")
    real, fake = image_folder(tmp_path / "real", 8, seed=0), image_folder(tmp_path / "fake", 5, seed=1, brightness=40)
    result = fid(real, fake, weights)
    assert result["name"] == "FID-5/8" and (result["real_images"], result["fake_images"]) == (8, 5)
    assert "5 generated" in result["warning"] and "30,000" in result["warning"] and "2,048" in result["warning"]
    assert json.loads((fake / "fid.json").read_text())["name"] == "FID-5/8"
    assert fid_name(30_000, 40_504) == "FID" and small_sample_warning(30_000, 40_504) is None
    assert fid_name(5_000, 40_504) == "FID-5000" and "2,048" not in small_sample_warning(5_000, 40_504)
    # COCO val2017's 5,000 real images against 30,000 generated: biased too (~6 points in a simulation)
    assert fid_name(30_000, 5_000) == "FID-30000/5000" and "5,000 real" in small_sample_warning(30_000, 5_000)

    (fake / "fid.json").write_text('{"fid": 12.5}')  # an earlier result

    def refused(path, data, sync=True):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fid_module, "write_atomic", refused)
    fid_module.main(["--real", str(real), "--fake", str(fake), "--weights", str(weights)])
    out, err = capsys.readouterr()
    assert f"FID-5/8 {result['fid']:.4f}  (8 real, 5 generated; fid.json not written)" in out
    assert "fid.json not written (" in err and "Permission denied" in err and "warning: FID over 5 generated" in err
    assert (fake / "fid.json").read_text() == '{"fid": 12.5}'


class ClassProbabilities(torch.nn.Module):
    """A stand-in for clean-fid's inception-2015-12-05.pt called without return_features: 1008 class probabilities."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).repeat(1, 336).softmax(1)


def test_weights_of_another_contract_are_refused_naming_the_file(tmp_path):
    """A FID computed on class probabilities (or on a state dict's nothing) would be a number of another quantity:
    a TorchScript file that does not return [N, 2048] pool features, and a file that is not TorchScript
    (pytorch-fid's .pth state dict), are refused in one line naming the file and the contract."""
    real, fake = image_folder(tmp_path / "real", 4, seed=0), image_folder(tmp_path / "fake", 4, seed=1)
    probabilities = tmp_path / "probabilities.pt"
    torch.jit.save(torch.jit.script(ClassProbabilities()), str(probabilities))
    with pytest.raises(ValueError, match=r"probabilities\.pt: returned \[4, 1008\] for 4 images; expected a "
                                         r"TorchScript TF-Inception .*\[N, 2048\] pool features"):
        fid(real, fake, probabilities)
    state_dict = tmp_path / "pt_inception.pth"
    torch.save({"conv.weight": torch.zeros(2, 3)}, str(state_dict))
    with pytest.raises(ValueError, match=r"pt_inception\.pth: not a TorchScript Inception \(.*\); expected"):
        fid(real, fake, state_dict)


def test_a_generate_folder_is_scored_on_the_images_its_metadata_lists(tmp_path, capsys):
    """evaluation.generate's folder after a rerun with a smaller --limit still holds the earlier run's images (and a
    benchmark's folder may hold grids): the command scores what metadata.jsonl lists, as the benchmark does."""
    import shutil

    from evaluation.fid import main

    real, fake = image_folder(tmp_path / "real", 6, seed=0), image_folder(tmp_path / "fake", 5, seed=1)
    (fake / "metadata.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "index": i, "files": [f"{i:05d}.png"]})
                                                 + "\n" for i in range(3)))
    weights = tiny_weights(tmp_path / "tiny.pt")
    main(["--real", str(real), "--fake", str(fake), "--weights", str(weights)])
    listed = tmp_path / "listed"
    listed.mkdir()
    for i in range(3):
        shutil.copy(fake / f"{i:05d}.png", listed)
    out = capsys.readouterr().out
    assert "(6 real, 3 generated;" in out
    assert json.loads((fake / "fid.json").read_text())["fid"] == pytest.approx(fid(real, listed, weights)["fid"])


def bilinear_half_pixel(image: np.ndarray, size: int) -> np.ndarray:
    """[C, H, W] -> [C, size, size] by pytorch-fid's resize (bilinear, pixel centres at i + 0.5: torch's
    align_corners=False, no antialiasing), written out as two interpolation matrices."""
    def weights(n_in: int) -> np.ndarray:
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, None)
        low = np.floor(src).astype(int)
        high, frac = np.minimum(low + 1, n_in - 1), src - low
        w = np.zeros((size, n_in))
        np.add.at(w, (np.arange(size), low), 1 - frac)
        np.add.at(w, (np.arange(size), high), frac)
        return w

    rows, cols = weights(image.shape[1]), weights(image.shape[2])
    return rows @ image.astype(np.float64) @ cols.T  # (per channel: [size, H] @ [H, W] @ [W, size])


def test_non_finite_features_name_the_weights():
    """Weights that give NaN or inf (broken or untrusted files: images are finite) stop FID with the weights'
    path, before anything is cached; numpy's eigh failed later with "Eigenvalues did not converge" alone."""
    extractor, _ = stand_in()
    images = [torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2
    assert extractor.features(images).shape == (2, 2048)  # (the stand-in's features are finite)
    for bad in (float("nan"), float("inf")):
        extractor.model = lambda x, bad=bad: torch.zeros(len(x), 2048).index_fill_(1, torch.tensor([5]), bad)
        with pytest.raises(ValueError, match=r"stand-in\.pt: returned non-finite features \(NaN or inf\) for 2 "):
            extractor.features(images)


def test_inception_sees_images_resized_as_pytorch_fid_resizes_them():
    """The protocol's resize (module docstring: pytorch-fid's, bilinear without antialiasing, align_corners=False)
    and scaling ((x - 128) / 128) of a non-square image, against the resize written out by hand: another mode or
    corner convention moves FID and no other test saw it (their images are flat halves)."""
    image = torch.randint(0, 256, (3, 48, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    seen = []

    def model(x):
        seen.append(x)
        return torch.zeros(len(x), 2048)

    extractor, _ = stand_in()
    extractor.model = model
    extractor.features([image])
    expected = (bilinear_half_pixel(image.numpy(), 299) - 128) / 128
    assert seen[0].dtype == torch.float32 and seen[0].shape == (1, 3, 299, 299)
    assert np.abs(seen[0][0].double().numpy() - expected).max() < 1e-5
    # Larger than 299 (a COCO photo): shrunk with the same two-tap filter, not an antialiased one.
    large = torch.randint(0, 256, (3, 320, 480), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    extractor.features([large])
    expected = (bilinear_half_pixel(large.numpy(), 299) - 128) / 128
    assert np.abs(seen[1][0].double().numpy() - expected).max() < 1e-3  # (torch's float32 source coordinates)


def test_statistics_use_the_unbiased_covariance_and_names_switch_at_the_protocols_counts():
    """statistics(): the mean and the N - 1 covariance (pytorch-fid's np.cov), here against torch.cov; the result's
    name and warning change exactly at 30,000 images of each kind and at 2,048 (the feature count)."""
    from evaluation.fid import fid_name, small_sample_warning

    feats = np.random.default_rng(0).normal(size=(7, 3))
    mu, sigma = statistics(feats)
    np.testing.assert_allclose(mu, torch.tensor(feats).mean(0).numpy())
    np.testing.assert_allclose(sigma, torch.cov(torch.tensor(feats).T, correction=1).numpy())
    assert (fid_name(30_000, 30_000), fid_name(29_999, 30_000), fid_name(30_000, 29_999)) == (
        "FID", "FID-29999", "FID-30000/29999")
    assert small_sample_warning(30_000, 30_000) is None
    assert "singular" not in small_sample_warning(2_048, 30_000) and "singular" in small_sample_warning(2_047, 30_000)
    assert "singular" in small_sample_warning(30_000, 2_047)


def test_images_are_read_upright_and_every_one_in_batches(tmp_path):
    """read_image: [3, H, W] as PIL lays the pixels out (a transposed image is another Inception input, and on
    square images a FID against itself does not see it); folder_features: every file once, in order, whatever the
    batch size (the tests' folders hold fewer images than one default batch)."""
    from types import SimpleNamespace

    from PIL import Image

    from evaluation.fid import folder_features, read_image

    wide = np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8)  # H 3, W 5
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert torch.equal(read_image(tmp_path / "wide.png"), torch.from_numpy(wide).permute(2, 0, 1))
    files = sorted(image_folder(tmp_path / "five", 5, seed=1).iterdir())
    means = SimpleNamespace(features=lambda images: np.array([[float(img.double().mean())] for img in images]))
    expected = np.array([[float(read_image(f).double().mean())] for f in files])
    for batch_size in (1, 2, 32):
        np.testing.assert_array_equal(folder_features(means, files, batch_size=batch_size), expected)
