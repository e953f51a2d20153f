"""`bitdance bench`: figures, FLOP count checked against an independent FlopCounterMode count, bf16 fallback."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bitdance.apps.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = ["images_per_s", "seconds_per_image", "flops_per_image", "achieved_flops", "peak_flops", "mfu",
        "peak_memory_bytes"]
TINY = ["bench", "--preset", "BitDance-T-4x", "--image-size", "32", "--batch", "1", "--steps", "2", "--cfg", "2",
        "--tokenizer", "tiny-d4c16", "--json"]


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), "\n".join(out)


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs):
    # written here independently of bitdance.apps.bench: Q K^T and A V, 2 FLOPs per multiply-add
    b = 1
    for d in q[:-2]:
        b *= d
    return 2 * b * q[-2] * k[-2] * q[-1] + 2 * b * q[-2] * k[-2] * v[-1]


def _independent_count() -> int:
    from bitdance.models.presets import bitdance_preset, tokenizer_preset
    from bitdance.models.tokenizer import BinaryTokenizer
    from bitdance.models.transformer import BitDance
    from bitdance.sampling.flow import FlowSampler

    cfg = bitdance_preset("BitDance-T-4x", image_size=32, tokenizer=tokenizer_preset("tiny-d4c16"))
    gen, tok = BitDance(cfg).eval(), BinaryTokenizer(cfg.tokenizer).eval()
    # FlopCounterMode decomposes F.scaled_dot_product_attention; on CPU it lands on this kernel, which
    # torch's own registry does not know
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        lat = gen.generate(torch.tensor([0]), sampler=FlowSampler(num_steps=2), guidance_scale=2.0,
                           generator=torch.Generator().manual_seed(0))
        tok.decode(lat)
    return fc.get_total_flops()


def test_bench_json_fp32(capsys):
    assert main(TINY + ["--dtype", "fp32"]) == 0
    r, text = _last_json(capsys)
    for k in KEYS:
        assert k in r, k
        assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert r["dtype"] == "fp32" and r["batch"] == 1 and r["decode"] is True
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["peak_flops"], rel=1e-9)
    assert r["achieved_flops"] == pytest.approx(r["flops_per_image"] * r["images_per_s"], rel=1e-9)
    assert r["seconds_per_image"] == pytest.approx(1 / r["images_per_s"], rel=1e-9)
    assert r["flops_per_image"] == pytest.approx(r["generator_flops_per_image"] + r["decode_flops_per_image"])
    assert r["decode_flops_per_image"] > 0
    assert r["flops_per_image"] == pytest.approx(_independent_count(), rel=0.01)
    assert "MFU" in text and "peak memory" in text


def test_bench_bf16_fallback(monkeypatch, capsys):
    import bitdance.precision

    monkeypatch.setattr(bitdance.precision, "bf16_supported", lambda device: False)
    assert main(TINY + ["--dtype", "bf16", "--no-decode", "--warmup", "0"]) == 0
    r, text = _last_json(capsys)
    assert "falling back to fp32" in text
    assert r["dtype"] == "fp32" and r["notes"] and r["decode_flops_per_image"] == 0
    assert r["flops_per_image"] == r["generator_flops_per_image"] > 0
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in KEYS)


def test_bench_unknown_preset(capsys):
    assert main(["bench", "--preset", "BitDance-Q-4x", "--json"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitdance bench: error:") and "unknown preset" in err[0]
    assert cap.out == ""


def test_bench_compare_fp32(capsys):
    """With --dtype fp32 the comparison run is the same computation: everything agrees exactly."""
    assert main(TINY + ["--dtype", "fp32", "--compare-fp32"]) == 0
    r, text = _last_json(capsys)
    assert r["bf16_bit_agreement"] == 1.0 and r["bf16_token_agreement"] == 1.0
    assert r["bf16_image_psnr"] == float("inf")
    assert "vs fp32" in text


def test_bench_compare_bf16_reports_agreement(monkeypatch, capsys):
    """Runs on every CPU: where bf16 is emulated the bench is told it is native (slower, same numbers)."""
    import bitdance.apps.bench
    import bitdance.precision

    monkeypatch.setattr(bitdance.precision, "bf16_supported", lambda device: True)
    measure = bitdance.apps.bench.measure_matmul_peak  # emulated bf16 runs a 2048^3 matmul for minutes: a small one
    monkeypatch.setattr(bitdance.apps.bench, "measure_matmul_peak", lambda dev, dt, size=None: measure(dev, dt, size=128))
    assert main(TINY + ["--dtype", "bf16", "--compare-fp32", "--no-decode"]) == 0
    r, _ = _last_json(capsys)
    assert 0.5 < r["bf16_bit_agreement"] <= 1.0
    assert 0.0 <= r["bf16_token_agreement"] <= r["bf16_bit_agreement"]
    assert r["bf16_image_psnr"] is None  # nothing decoded


def test_bench_compile_needs_a_warmup(capsys):
    assert main(TINY + ["--compile", "default", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warm-up" in err[0]
    assert main(TINY + ["--whole-flow"]) == 2  # compiles the flow loop: needs --compile
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--whole-flow" in err[0] and "--compile" in err[0]


def test_bench_with_stored_weights(capsys):
    """--weights stores the generator's linear layers so (computing in fp32): named in the report and the JSON, the
    FLOPs those of the unquantized model, the weights' bytes smaller; more than one storage, +offload or --roofline
    with it are one-line errors."""
    assert main(TINY + ["--dtype", "fp32", "--no-decode"]) == 0
    full, _ = _last_json(capsys)
    assert main(TINY + ["--dtype", "fp32", "--no-decode", "--weights", "int8"]) == 0
    r, text = _last_json(capsys)
    assert r["weights"] == "int8" and full["weights"] is None and ", int8 weights" in text
    assert r["flops_per_image"] == pytest.approx(full["flops_per_image"], rel=1e-9)
    assert r["weights_bytes"] < full["weights_bytes"]
    for extra, words in ((["--weights", "int8", "fp8"], "one storage"), (["--weights", "int8+offload"], "one storage"),
                         (["--weights", "bf16", "--roofline"], "--roofline")):
        assert main(TINY + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_cpu_peak_memory_survives_freed_heap_pages():
    """In a long-lived process the freed heap is reused by the models; the peak must still count them."""
    from bitdance.apps.bench import run_bench

    junk = [torch.randn(1000) for _ in range(100_000)]  # 400 MB in small heap blocks, then freed
    del junk
    r = run_bench(preset="BitDance-T-4x", image_size=32, batch=1, steps=2, guidance_scale=2.0, tokenizer="tiny-d4c16",
                  dtype="fp32", decode=False, warmup=0, log=lambda *a: None)
    assert r.peak_memory_bytes > 8 * 2**20, r.peak_memory_method  # the weights alone are 36 MB


def _side_by_side():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "side_by_side.py"
    spec = importlib.util.spec_from_file_location("side_by_side", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def test_side_by_side_table_and_missing_checkout(tmp_path):
    """benchmarks/side_by_side.py: the table of a results file (speed-up = the authors' seconds over ours, MFU
    at bitdance's counted FLOPs), and a clear error where --official is no checkout of the authors' code."""
    import subprocess
    import sys

    mod, path = _side_by_side()
    machine = {"model": "AMD EPYC", "capability": "AVX512", "env": {"ATEN_CPU_CAPABILITY": "avx2"}}
    ours = lambda s, mfu: {"seconds_per_image": s, "flops_per_image": 1e12, "peak_flops": 1e11, "mfu": mfu,  # noqa: E731
                           "achieved_flops": 1e12 / s}
    row = {"preset": "BitDance-B-4x", "machine": machine, "bitdance_off": ours(20.0, 0.5),
           "bitdance_default": ours(10.0, 1.0), "official": {"seconds_per_image": 30.0}}
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(row) + "\n")
    table = mod.render(str(results)).splitlines()
    assert table[2] == ("| AMD EPYC AVX2 (forced) | BitDance-B-4x | 20.00 (50.0%) | 10.00 (100.0%) | 30.00 (33.3%) "
                        "| 1.50x / 3.00x | 100 | — |")
    # several timed runs: each side's figure is its fastest run (as the peak is the fastest timing), the mean after it
    runs = {"batch": 2, "bitdance_default": {**ours(12.0, 0.8), "run_seconds": [20.0, 28.0, 24.0]},
            "official": {"seconds_per_image": 35.0, "run_seconds": [60.0, 80.0]}, "mfu_ceiling": 0.3125}
    results.write_text(json.dumps({**row, **runs}) + "\n")
    assert mod.render(str(results)).splitlines()[2] == (
        "| AMD EPYC AVX2 (forced) | BitDance-B-4x | 20.00 (50.0%) | 10.00 (100.0%); mean 12.00 (83.3%) "
        "| 30.00 (33.3%); mean 35.00 (28.6%) | 1.50x / 3.00x | 100 | 31.2% |")
    whole = {**row, "bitdance_default": {**ours(10.0, 1.0), "whole_flow": True}}  # side_by_side.py --whole-flow
    results.write_text(json.dumps(whole) + "\n")
    assert "| 10.00 (100.0%), whole flow |" in mod.render(str(results))
    # --paired: run i of each side ran in round i, next to each other; the median of those rounds' ratios is added
    paired = {"preset": "BitDance-B-4x", "machine": machine, "batch": 2, "paired": {"round_peaks": [1e11] * 3},
              "bitdance_default": {**ours(12.0, 0.8), "run_seconds": [20.0, 30.0, 24.0]},
              "official": {"seconds_per_image": 30.0, "run_seconds": [60.0, 60.0, 66.0]}}
    results.write_text(json.dumps(paired) + "\n")
    assert "| — / 3.00x (paired: median 2.75x) |" in mod.render(str(results))  # 3.0, 2.0, 2.75
    p = subprocess.run([sys.executable, str(path), "--_official", "--official", str(tmp_path), "--preset",
                        "BitDance-B-4x"], capture_output=True, text=True)
    assert p.returncode != 0 and "no imagenet_gen/src/model_parallel.py there" in p.stderr


def test_side_by_side_checks_before_measuring(tmp_path, monkeypatch, capsys):
    """A wrong --official path or a missing dependency of the authors' code stops the run at once, with the
    fix, before bitdance's side spends minutes measuring; --render of a missing file is a one-line error."""
    mod, _ = _side_by_side()
    monkeypatch.setattr(mod, "measure", lambda args: pytest.fail("measured despite a bad set-up"))
    monkeypatch.setattr("sys.argv", ["side_by_side.py", "--official", str(tmp_path)])
    with pytest.raises(SystemExit):
        mod.main()
    assert "no imagenet_gen/src/model_parallel.py there" in capsys.readouterr().err
    src = tmp_path / "imagenet_gen" / "src"
    src.mkdir(parents=True)
    (src / "model_parallel.py").write_text("")
    # json is always there and einops may not be: only what is missing is named
    monkeypatch.setattr(mod, "OFFICIAL_NEEDS", ("json", "no_such_module_for_the_authors"))
    monkeypatch.setattr("sys.argv", ["side_by_side.py", "--official", str(tmp_path)])
    with pytest.raises(SystemExit):
        mod.main()
    err = capsys.readouterr().err
    assert "needs no_such_module_for_the_authors: pip install no_such_module_for_the_authors" in err
    monkeypatch.setattr(mod, "OFFICIAL_NEEDS", ())
    monkeypatch.setattr("sys.argv", ["side_by_side.py", "--official", str(tmp_path), "--presets", "BitDance-B-4x",
                                     "--whole-flow", "BitDance-B-1x"])
    with pytest.raises(SystemExit):
        mod.main()
    assert "--whole-flow BitDance-B-1x: not among --presets BitDance-B-4x" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["side_by_side.py", "--render", str(tmp_path / "none.jsonl")])
    with pytest.raises(SystemExit):
        mod.main()
    assert "none.jsonl: no such results file" in capsys.readouterr().err


def test_side_by_side_paired_rows(tmp_path, monkeypatch):
    """--paired: one child process per preset runs both sides (--_paired), with the compile modes, the warm-up and
    --whole-flow only for the presets named; its row is written with the run's date and machine, row by row."""
    mod, _ = _side_by_side()
    calls = []

    def child(cmd, progress=False):
        calls.append(cmd)
        preset = cmd[cmd.index("--preset") + 1]
        return {"preset": preset, "paired": {"round_peaks": [1e11]}, "official": {"run_seconds": [1.0]}}

    monkeypatch.setattr(mod, "_run", child)
    out = tmp_path / "p.jsonl"
    monkeypatch.setattr("sys.argv", ["side_by_side.py", "--official", str(tmp_path), "--paired", "--compile", "default",
                                     "--presets", "BitDance-B-4x", "BitDance-B-1x", "--whole-flow", "BitDance-B-1x",
                                     "--repeats", "5", "--out", str(out)])
    monkeypatch.setattr(mod, "_checkout_problem", lambda official: None)
    monkeypatch.setattr(mod, "OFFICIAL_NEEDS", ())
    mod.main()
    assert all("--_paired" in c and c[c.index("--repeats") + 1] == "5" and c[c.index("--compile") + 1] == "default"
               for c in calls)
    assert "--whole-flow" not in calls[0] and calls[1][calls[1].index("--whole-flow") + 1] == "BitDance-B-1x"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["preset"] for r in rows] == ["BitDance-B-4x", "BitDance-B-1x"]
    assert all("paired" in r and "machine" in r and "date" in r for r in rows)


def test_alternating_rounds_order_and_peaks(monkeypatch):
    """`alternating_rounds` measures the peak before each round and runs every side once a round, in reverse
    order every other round; each side gets its own list of seconds."""
    from bitdance.apps import bench

    calls = []
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda dev, dtype: calls.append("peak") or 1e9 * len(calls))
    sides = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    lines = []
    runs, peaks = bench.alternating_rounds(sides, 3, log=lines.append)
    assert calls == ["peak", "a", "b", "peak", "b", "a", "peak", "a", "b"]
    assert peaks == [1e9, 4e9, 7e9] and [len(v) for v in runs.values()] == [3, 3] and len(lines) == 3


def test_side_by_side_forcing_reaches_mkl(monkeypatch):
    """Under ATEN_CPU_CAPABILITY=avx2 both sides' processes get MKL_ENABLE_INSTRUCTIONS=AVX2 (MKL ignores
    torch's variables: on an Intel CPU the peak and the authors' products ran AVX-512 without it); a value
    already set is kept, and an unforced run is left alone. The results file records the variable."""
    mod, _ = _side_by_side()
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    mod._complete_forcing()
    assert "MKL_ENABLE_INSTRUCTIONS" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    mod._complete_forcing()
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert mod._machine()["env"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    mod._complete_forcing()
    assert os.environ["MKL_ENABLE_INSTRUCTIONS"] == "SSE4_2"


def test_product_log_reads_the_weights_it_used():
    """`record_products` logs each product with its FLOPs and its operands of at least READ_MIN_BYTES: a weight
    as a view of the parameter itself (a replay reads the same memory), an activation as its byte count; a few
    rows of input are left out. Composite ops (linear under inference mode) are logged as what they run."""
    from bitdance.apps.bench import READ_MIN_BYTES, count_flops, record_products

    lin = torch.nn.Linear(512, 1024)  # weight 2 MiB
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    rows = torch.randn(4, 512)
    image = torch.randn(1, 8, 128, 128)  # 512 KiB in and out
    with torch.inference_mode():
        flops, (log, _) = count_flops(lambda: record_products(lambda: (lin(rows), conv(image)), lin, conv))
    assert log.flops == [2 * 4 * 512 * 1024, 2 * 8 * 8 * 9 * 128 * 128] and sum(log.flops) == flops
    (weight,), (act_in, act_out) = log.reads
    assert weight.untyped_storage().data_ptr() == lin.weight.untyped_storage().data_ptr()
    assert weight.numel() == lin.weight.numel()
    assert act_in == act_out == image.numel() * 4 >= READ_MIN_BYTES  # the conv's own weight is too small


def test_read_floor_is_at_least_the_compute_time():
    """Each product counts the slower of reading its operands and computing at the peak: a log without reads
    gives exactly FLOPs / peak, with reads no less; a peak of zero is an error."""
    from bitdance.apps.bench import ProductLog, read_floor

    log = ProductLog(flops=[10**9, 3 * 10**9], reads=[[], []])
    assert read_floor(log, 1e12) == pytest.approx(4e-3, rel=1e-12)
    big = torch.ones(2**20)
    log = ProductLog(flops=[10**9, 10**3], reads=[[big], [big, 2**22]])
    floor = read_floor(log, 1e12)
    assert floor >= 1e-3 + 1e-9 and math.isfinite(floor)
    with pytest.raises(ValueError, match="peak_flops"):
        read_floor(log, 0.0)


def test_bench_roofline(capsys):
    """--roofline: the read-bound floor and the MFU ceiling it allows (never above 100%: the floor holds every
    product's compute time at the peak); --memory does not take it."""
    assert main(TINY + ["--dtype", "fp32", "--roofline"]) == 0
    r, text = _last_json(capsys)
    assert 0 < r["mfu_ceiling"] <= 1 + 1e-9
    assert r["read_floor_seconds_per_image"] * r["peak_flops"] * r["mfu_ceiling"] == pytest.approx(
        r["flops_per_image"], rel=1e-9)
    assert "MFU ceiling" in text and "read-bound floor" in text
    assert main(TINY + ["--dtype", "fp32"]) == 0
    assert _last_json(capsys)[0]["mfu_ceiling"] is None
    assert main(["bench", "--memory", "--roofline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--roofline" in err[0]


def _script_error(script: str, *args: str) -> tuple[int, str]:
    """Exit status and last stderr line of ``python benchmarks/<script> <args>``."""
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    p = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, check=False)
    return p.returncode, (p.stderr.strip().splitlines() or [""])[-1]


def test_cold_weights_rejects_bad_rows():
    code, err = _script_error("cold_weights.py", "--rows", "16", "0")
    assert code == 2 and "--rows must be positive" in err


def test_kv_attention_benchmark_rejects_what_the_cache_cannot_hold():
    code, err = _script_error("kv_attention.py", "--queries", "4", "--filled", "317")
    assert code == 2 and "--filled 317: the cache holds 320 positions, so at most 316" in err


def test_compare_routings_checks_its_arguments(capsys):
    """benchmarks/compare_routings.py: a routing it does not know, or one named twice, is a one-line error before
    anything is built; each routing's copy of a preset gets the same weights."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_routings.py"
    spec = importlib.util.spec_from_file_location("compare_routings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_routing("MKL:Panel") == ("mkl", "panel", None)
    assert mod.parse_routing("mkl:panel+INT8") == ("mkl", "panel", "int8")
    for bad in (["mkl"], ["blas:panel"], ["mkl:asm"], ["mkl:panel+int4"], ["mkl:panel", "mkl:panel"]):
        with pytest.raises(SystemExit):
            mod.main(["--preset", "BitDance-T-4x", "--routings", *bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "routing" in err and ("WIDE:FEW" in err or "twice" in err), err
    a, b = mod.build("BitDance-T-4x", 0), mod.build("BitDance-T-4x", 0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.head.net.final_layer.linear.weight.abs().sum() > 0  # the flow does real work
