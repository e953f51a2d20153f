"""The precision policy: native bf16 only where the hardware computes it, ``$BITDANCE_DTYPE`` overrides."""

import pytest
import torch

from bitdance import precision
from bitdance.precision import DTYPE_ENV, PrecisionError, auto_dtype, bf16_supported, forced_dtype


def _flags(monkeypatch, flags):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))


def test_forced_dtype_values(monkeypatch):
    for raw, want in [("fp32", "fp32"), ("FP32", "fp32"), ("float32", "fp32"), ("bf16", "bf16"),
                      ("bfloat16", "bf16"), ("auto", None), ("", None), (" fp32 ", "fp32")]:
        monkeypatch.setenv(DTYPE_ENV, raw)
        assert forced_dtype() == want, raw
    monkeypatch.delenv(DTYPE_ENV)
    assert forced_dtype() is None
    monkeypatch.setenv(DTYPE_ENV, "fp16")
    with pytest.raises(PrecisionError, match="BITDANCE_DTYPE='fp16'"):
        forced_dtype()


def test_no_bf16_units_means_fp32(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    _flags(monkeypatch, {"avx2", "fma"})
    assert not bf16_supported("cpu")
    assert "avx512_bf16" in precision.cpu_bf16_reason()
    assert auto_dtype("cpu") == torch.float32
    monkeypatch.setenv(DTYPE_ENV, "bf16")  # forced: for numerics checks, even where it is emulated
    assert auto_dtype("cpu") == torch.bfloat16


def test_bf16_units_switched_off_count_as_none(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    _flags(monkeypatch, {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not bf16_supported("cpu") and "ATEN_CPU_CAPABILITY" in precision.cpu_bf16_reason()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not bf16_supported("cpu") and "ONEDNN_MAX_CPU_ISA" in precision.cpu_bf16_reason()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert bf16_supported("cpu") and auto_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv(DTYPE_ENV, "fp32")  # the switch the test suite is run under on bf16 machines
    assert auto_dtype("cpu") == torch.float32


def test_cpu_description_names_the_cpu_and_its_bf16_units(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo", lambda: {"model name": "Test CPU 9000", "flags": "fpu avx2 fma"})
    d = precision.cpu_description()
    assert d["model"] == "Test CPU 9000" and d["bf16_units"] is False and "avx512_bf16" in d["no_bf16_because"]
    assert precision.auto_precision("cpu") == "fp32"


def test_an_avx2_forcing_that_misses_mkl_is_named(monkeypatch):
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA do not reach MKL: on an Intel CPU with AVX-512 the forcing is
    incomplete until MKL_ENABLE_INSTRUCTIONS=AVX2; AMD CPUs and unforced processes have nothing to report."""
    info = {"model name": "Test Xeon", "vendor_id": "GenuineIntel", "flags": "avx2 fma avx512f"}
    monkeypatch.setattr(precision, "_cpuinfo", lambda: info)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    gap = precision.mkl_forcing_gap()
    assert "MKL_ENABLE_INSTRUCTIONS=AVX2" in gap and precision.cpu_description()["mkl_not_forced"] == gap
    assert precision.cpu_description()["vendor"] == "GenuineIntel"
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "avx2")
    assert precision.mkl_forcing_gap() is None and "mkl_not_forced" not in precision.cpu_description()
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert precision.mkl_forcing_gap() is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    info["vendor_id"] = "AuthenticAMD"
    assert precision.mkl_forcing_gap() is None


def test_training_auto_precision_follows_the_switch(monkeypatch, tmp_path):
    from bitdance.training.config import TrainConfig
    from bitdance.training.trainer import Trainer

    monkeypatch.setenv(DTYPE_ENV, "fp32")
    cfg = TrainConfig(task="tokenizer", out=str(tmp_path), data="mnist", split=None, image_size=32,
                      model="tiny-d4c16", steps=1, batch_size=2, progress=False, precision="auto")
    assert Trainer(cfg).precision == "fp32"


def test_compile_cache_is_kept_apart_per_instruction_set(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    avx2 = precision.separate_compile_cache()
    assert avx2.endswith("bitdance-avx2")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = precision.separate_compile_cache()
    assert limited.endswith("bitdance-avx512-onednn_avx2") and limited != avx2
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == limited
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")  # the user's choice is kept
    assert precision.separate_compile_cache() is None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes there itself
    assert precision.separate_compile_cache() == limited
