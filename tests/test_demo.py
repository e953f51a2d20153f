"""`bitdance demo` end to end with a tiny time budget (the real run takes ~11 minutes)."""

import json

import pytest
from PIL import Image

from bitdance.apps.cli import main


def test_demo_writes_every_output(tmp_path, capsys):
    pytest.importorskip("numpy")
    from bitdance.data import DatasetError, load_dataset

    try:
        load_dataset("mnist", image_size=32)
    except DatasetError as e:
        pytest.skip(str(e))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "samples.png" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["tokenizer"]["steps"] >= 6 and report["generator"]["steps"] >= 6
    assert report["tokenizer"]["test_images"] == 500 and report["tokenizer"]["test_psnr_db"] > 5
    assert set(report["timings_s"]) >= {"tokenizer_training_s", "generator_training_s", "total_s"}
    # the demo judges its own samples: 20 per digit, by the shipped MNIST classifier (the figure itself depends
    # on how far a 3-second run gets, so only its form is checked here)
    sampling = report["sampling"]
    assert sampling["samples"] == 200 and 0.0 <= sampling["class_accuracy"] <= 1.0
    assert sampling["classifier"]["name"] == "mnist" and sampling["classifier"]["test_accuracy"] > 0.95
    assert "class accuracy:" in printed and "too slow" in printed  # 3 seconds cannot train a generator
    assert report["precision"] in ("fp32", "bf16") and "bf16_units" in report["cpu"]
    samples = Image.open(out / "samples.png")
    assert samples.size == (10 * 32 * 2, 10 * 32 * 2)  # 10 digits x 10 samples, shown at 2x
    for name in ("reconstructions.png", "loss_curves.png"):
        assert Image.open(out / name).size[0] > 0
    assert (out / "runs" / "generator" / "model" / "config.json").exists()
