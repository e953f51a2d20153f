"""Image-quality metrics, measured the way the paper's tables are.

* Reconstruction: :func:`psnr` and :func:`ssim` (Wang et al. 2004: Gaussian window 11, sigma 1.5,
  K1 = 0.01, K2 = 0.03) per image, on the [0, 1] scale.
* Tokens: :func:`codebook_usage` (empirical code entropy / used fraction / perplexity per group).
* Generation: FID (Heusel et al. 2017) and improved precision / recall (Kynkaenniemi et al. 2019,
  k = 3), on the 2048-d pool3 features of the TensorFlow FID Inception-v3 (the 2015-12-05 graph that
  ADM's evaluator and pytorch-fid use), via :class:`InceptionFeatures` and :func:`compute_fid`.

The Inception side (weights, resizing, statistics, FID, precision / recall) is :mod:`bitdance.evaluation.fid`; its
names are importable from here as well.

Inception Score is not provided: the file exposes pool3 only, not the 1008-way logits. For the
small 32x32 data sets, :func:`class_accuracy` instead scores class-conditional samples with a shipped
CNN (:class:`DigitClassifier`, ``bitdance/assets/classifier_{mnist,fashion-mnist}.*``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from bitdance.data import fetch_batch
from bitdance.evaluation.fid import InceptionFeatures, feature_statistics, frechet_distance
from bitdance.images import Images, as_nchw

__all__ = ["CLASSIFIER_SIZE", "ASSETS_DIR", "CodebookUsage", "DigitClassifier", "class_accuracy", "classifier_name",
           "classifier_paths", "classify", "codebook_usage", "evaluate_reconstruction", "load_classifier", "psnr",
           "ssim"]


# --------------------------------------------------------------------------------------------------
# Reconstruction metrics


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: images must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images of shape (B, C, H, W), got {tuple(x.shape)}")


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    # [-1, 1] -> [0, 1]; clipping as saving the image would, since decoders overshoot slightly.
    return ((x.double() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [-1, 1], on the [0, 1] scale -> (B,) float64.

    Identical images give ``inf``; average over a data set in dB (mean of per-image values), as usual.
    """
    _check_pair(x, y, "psnr")
    mse = (_to_unit(x) - _to_unit(y)).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [-1, 1] on the [0, 1] scale -> (B,) float64.

    Wang et al. 2004: Gaussian window (11, sigma 1.5), K1 = 0.01, K2 = 0.03, "valid" filtering (no
    padding, as the reference MATLAB code), map mean per channel, then mean over channels. Images
    smaller than the window use the largest odd window that fits.
    """
    _check_pair(x, y, "ssim")
    _, C, H, W = x.shape
    size = min(window, H, W)
    size -= 1 - size % 2  # keep it odd so the window has a centre
    if size < 1:
        raise ValueError(f"ssim: images of size {H}x{W} are too small")
    x, y = _to_unit(x), _to_unit(y)
    g = _gaussian_window(size, sigma, x.device)

    def blur(t):  # separable depthwise Gaussian, valid region only
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, size), groups=C)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, size, 1), groups=C)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(2).mean(2).mean(1)


# --------------------------------------------------------------------------------------------------
# Token statistics


class CodebookUsage(NamedTuple):
    entropy_bits: float  # mean over groups of the empirical code entropy
    max_entropy_bits: float  # log2(codes_per_group): a uniform code distribution
    used_fraction: float  # mean over groups of (distinct codes seen) / codes_per_group
    perplexity: float  # mean over groups of 2^entropy: the effective number of codes


def codebook_usage(indices: torch.Tensor, *, codes_per_group: int) -> CodebookUsage:
    """Code statistics of int64 ``indices`` of shape (..., groups), e.g. ``BinaryTokenizer.indices``."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"codebook_usage: indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() < 1 or indices.numel() == 0:
        raise ValueError(f"codebook_usage: expected non-empty indices of shape (..., groups), "
                         f"got {tuple(indices.shape)}")
    K = int(codes_per_group)
    idx = indices.reshape(-1, indices.shape[-1]).long().cpu()
    if idx.min() < 0 or idx.max() >= K:
        raise ValueError(f"codebook_usage: indices must lie in [0, {K}), "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")
    G = idx.shape[1]
    # one bincount for all groups: group g's codes are offset by g * K
    counts = torch.bincount((idx + torch.arange(G) * K).flatten(), minlength=G * K).view(G, K).double()
    p = counts / counts.sum(1, keepdim=True)
    ent = -(p * torch.log2(p.clamp_min(1e-300))).sum(1)  # 0 log 0 = 0
    return CodebookUsage(
        entropy_bits=float(ent.mean()),
        max_entropy_bits=float(np.log2(K)),
        used_fraction=float((counts > 0).double().mean(1).mean()),
        perplexity=float(torch.exp2(ent).mean()),
    )


# --------------------------------------------------------------------------------------------------
# Class accuracy of generated images (offline stand-in for the Inception Score)

CLASSIFIER_SIZE = 32
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
_CLASSIFIER_NAMES = {"mnist": "mnist", "mnist5k": "mnist", "mnist-5k": "mnist", "fashion-mnist": "fashion-mnist",
                     "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}


class DigitClassifier(torch.nn.Module):
    """Small CNN for 32x32 RGB images in [-1, 1] (MNIST / Fashion-MNIST, grey replicated to RGB).

    Three conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool stages (32 -> 16 -> 8 -> 4 px, ``width``,
    2x and 4x channels), then dropout -> linear(hidden) -> ReLU -> dropout -> linear(num_classes).
    With the defaults (width 16, hidden 256): 288k parameters.
    """

    def __init__(self, num_classes: int = 10, *, width: int = 16, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        nn = torch.nn
        layers, cin = [], 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                       nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin * 16, hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.config = {"num_classes": num_classes, "width": width, "hidden": hidden, "dropout": dropout}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (3, CLASSIFIER_SIZE, CLASSIFIER_SIZE):
            raise ValueError(f"DigitClassifier expects (B, 3, {CLASSIFIER_SIZE}, {CLASSIFIER_SIZE}) images "
                             f"in [-1, 1], got {tuple(x.shape)}")
        return self.head(self.features(x))


def classifier_name(dataset: str) -> str:
    """Canonical classifier asset name (``mnist`` or ``fashion-mnist``) for a dataset name or alias."""
    key = _CLASSIFIER_NAMES.get(str(dataset).strip().lower())
    if key is None:
        raise ValueError(f"no shipped classifier for dataset {dataset!r}; available: mnist, fashion-mnist")
    return key


def classifier_paths(dataset: str, assets: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(weights .safetensors, info .json) of the shipped classifier of ``dataset``."""
    folder = ASSETS_DIR if assets is None else Path(assets)
    name = classifier_name(dataset)
    return folder / f"classifier_{name}.safetensors", folder / f"classifier_{name}.json"


def load_classifier(dataset: str, *, assets: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu") -> DigitClassifier:
    """The shipped classifier of ``dataset`` (``mnist`` / ``fashion-mnist``), in eval mode, float32.

    Its training settings and held-out test accuracy are in ``model.info`` (the asset's .json).
    """
    import json

    from safetensors.torch import load_file

    weights, info_path = classifier_paths(dataset, assets)
    if not weights.is_file() or not info_path.is_file():
        raise FileNotFoundError(f"classifier asset missing: {weights} / {info_path.name} (train it with "
                                f"benchmarks/train_classifier.py --data {classifier_name(dataset)})")
    info = json.loads(info_path.read_text())
    model = DigitClassifier(**info["model"])
    sd = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match DigitClassifier{info['model']} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.info = info
    return model.to(device).eval()


def _classifier_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW or float NCHW in [-1, 1] -> float32 (B, 3, 32, 32) in [-1, 1]."""
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float().clamp(-1, 1)
    if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
    return x


@torch.inference_mode()
def classify(images: Images, *, dataset: str | None = None, model: DigitClassifier | None = None,
             batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """Predicted class ids (N,) int64 of uint8 NHWC or float NCHW [-1, 1] RGB images (any size: resized
    to 32x32), with the shipped classifier of ``dataset`` or a given ``model``."""
    if model is None:
        if dataset is None:
            raise ValueError("classify: give dataset= or model=")
        model = load_classifier(dataset, device=device)
    dev = next(model.parameters()).device
    x = as_nchw(images)
    if isinstance(x, list):
        x = torch.cat([_classifier_input(t) for t in x])
    preds = [model(_classifier_input(c.to(dev))).argmax(1).cpu() for c in x.split(batch_size)]
    return torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)


def class_accuracy(images: Images, labels, *, dataset: str | None = None,
                   model: DigitClassifier | None = None, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> float:
    """Fraction of ``images`` that the shipped ``dataset`` classifier assigns to their ``labels``.

    For class-conditional samples this measures how often the sample shows the requested class (an
    offline, dataset-specific stand-in for the Inception Score's class-confidence part).
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(images)
    if labels.shape[0] != n:
        raise ValueError(f"class_accuracy: {n} images but {labels.shape[0]} labels")
    if n == 0:
        raise ValueError("class_accuracy: no images")
    pred = classify(images, dataset=dataset, model=model, batch_size=batch_size, device=device)
    return float((pred == labels.astype(np.int64)).mean())


# --------------------------------------------------------------------------------------------------
# Tokenizer reconstruction report


def _spread_indices(total: int, n: int) -> torch.Tensor:
    """``n`` indices spread evenly over ``range(total)`` (data sets sorted by class stay balanced)."""
    return torch.arange(n, dtype=torch.long) * total // n


@torch.inference_mode()
def evaluate_reconstruction(tokenizer, dataset, *, num_images: int | None = 1000, batch_size: int = 64,
                            fid: bool = False, device: str | torch.device = "cpu", seed: int = 0,
                            inception_batch_size: int = 50, progress: bool = False) -> dict:
    """Reconstruct ``num_images`` images of ``dataset`` (evenly spread over it; ``None``: all) and report
    PSNR (dB) and SSIM (means of per-image values), reconstruction FID (reals vs reconstructions, only
    with ``fid=True``) and the code statistics of :func:`codebook_usage`.

    Reconstructions are quantised to uint8 first (``to_uint8``), so the numbers are those of the saved
    PNGs, as in the paper's tokenizer tables. A GAN (noise-input) decoder is seeded with ``seed``.
    """
    from tqdm.auto import tqdm

    from bitdance.images import to_uint8

    total = len(dataset)
    if total == 0:
        raise ValueError("evaluate_reconstruction: the data set is empty")
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = total if num_images is None else min(num_images, total)
    if fid and n < 2:
        raise ValueError(f"reconstruction FID needs at least 2 images, got {n}")
    device = torch.device(device)
    tokenizer = tokenizer.to(device).eval()
    dtype = next(tokenizer.parameters()).dtype
    net = InceptionFeatures(device=device, batch_size=inception_batch_size) if fid else None
    gen = torch.Generator(device=device).manual_seed(seed)
    q = tokenizer.quantizer
    psnrs, ssims, codes, feats_real, feats_rec = [], [], [], [], []
    t0 = time.perf_counter()
    idx = _spread_indices(total, n)
    for chunk in tqdm(idx.split(batch_size), desc="reconstructing", unit="batch", disable=not progress):
        x = fetch_batch(dataset, chunk)[0].to(device)
        lat = tokenizer.encode(x.to(dtype))
        codes.append(q.indices(lat).cpu())
        rec_u8 = to_uint8(tokenizer.decode(lat, generator=gen).float())  # (B, H, W, 3) uint8, CPU
        real_u8 = to_uint8(x)
        rec = rec_u8.permute(0, 3, 1, 2).double() / 127.5 - 1
        real = real_u8.permute(0, 3, 1, 2).double() / 127.5 - 1
        psnrs.append(psnr(real, rec))
        ssims.append(ssim(real, rec))
        if net is not None:
            feats_real.append(net.features(real_u8))
            feats_rec.append(net.features(rec_u8))
    usage = codebook_usage(torch.cat(codes), codes_per_group=2**q.bits_per_group)
    rfid = None
    if net is not None:
        fr, ff = np.concatenate(feats_real), np.concatenate(feats_rec)
        rfid = frechet_distance(*feature_statistics(fr), *feature_statistics(ff))
    p = torch.cat(psnrs)
    h, w = lat.shape[-2:]
    return {
        "num_images": n,
        "image_size": list(x.shape[-2:]),
        "psnr_db": float(p.mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "rfid": rfid,
        "codebook": {
            "bits": tokenizer.bits, "groups": q.groups, "bits_per_group": q.bits_per_group,
            "codes_per_group": 2**q.bits_per_group, "tokens_per_image": int(h * w),
            "entropy_bits": usage.entropy_bits, "max_entropy_bits": usage.max_entropy_bits,
            "entropy_ratio": usage.entropy_bits / usage.max_entropy_bits if usage.max_entropy_bits else 1.0,
            "used_fraction": usage.used_fraction, "perplexity": usage.perplexity,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
