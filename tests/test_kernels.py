"""The panel kernel (bitdance.kernels): its products, its errors, where the compiled sampler uses it."""

import pytest
import torch

import bitdance.compiling as compiling
from bitdance.kernels import PANEL_MAX_ROWS, KernelError, panel_gemm_unsupported

needs_kernel = pytest.mark.skipif(panel_gemm_unsupported() is not None,
                                  reason=f"the panel kernel cannot run here: {panel_gemm_unsupported()}")


@needs_kernel
@pytest.mark.parametrize("out_features, in_features", [(37, 40), (16, 8), (1, 3), (48, 256)])
def test_panel_linear_matches_the_product(out_features, in_features):
    """Every row-tile height (1-6 rows, and more tiles after them), output widths that 16 divides or not,
    inputs with leading dimensions or transposed: the product of torch, to fp32 rounding."""
    from bitdance.kernels import panel_linear, panel_pack

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g)
    packed = panel_pack(weight)
    assert packed.shape == ((out_features + 15) // 16, in_features, 16)
    for rows in range(1, 14):
        x = torch.randn(2, rows, in_features, generator=g)
        got = panel_linear(x, packed, out_features)
        assert got.shape == (2, rows, out_features)
        torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-4)
    x = torch.randn(in_features, 5, generator=g).T  # not contiguous
    torch.testing.assert_close(panel_linear(x, packed, out_features), x @ weight.T, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_panel_kernel_rejects_what_it_cannot_multiply():
    from bitdance.kernels import panel_linear, panel_pack

    packed = panel_pack(torch.randn(20, 8))
    with pytest.raises(RuntimeError, match="does not fit a packed weight"):
        panel_linear(torch.randn(3, 9), packed, 20)
    with pytest.raises(RuntimeError, match="does not fit a packed weight"):
        panel_linear(torch.randn(3, 8), packed, 40)  # more outputs than the panels hold
    with pytest.raises(RuntimeError, match="expected an fp32 CPU input"):
        panel_linear(torch.randn(3, 8).bfloat16(), packed, 20)
    with pytest.raises(RuntimeError, match="must come from panel_pack"):
        panel_linear(torch.randn(3, 8), torch.randn(20, 8), 20)
    with pytest.raises(RuntimeError, match="expected a 2-D fp32 CPU weight"):
        panel_pack(torch.randn(2, 20, 8))


def test_few_row_products_choice_and_override(monkeypatch):
    """The kernel by default only where MKL would run the products with AVX2 kernels; the override either way,
    a value it does not know or a kernel that cannot run named in one line."""
    monkeypatch.setattr(compiling, "load_panel_gemm", lambda: None)
    monkeypatch.setattr(compiling, "panel_gemm_unsupported", lambda: None)
    cases = [  # torch's kernels, the library of many rows, $BITDANCE_FEW_ROW_PRODUCTS -> the choice
        ("AVX2", "mkl", "", "panel"), ("AVX512", "mkl", "", "library"), ("AVX2", "onednn", "", "library"),
        ("AVX2", "onednn", "Panel", "panel"), ("AVX2", "mkl", "library", "library")]
    for capability, wide, forced, expected in cases:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(compiling, "wide_products", lambda w=wide: w)
        monkeypatch.setenv(compiling.FEW_ROW_PRODUCTS_ENV, forced)
        assert compiling.few_row_products() == expected, (capability, wide, forced)
    monkeypatch.setenv(compiling.FEW_ROW_PRODUCTS_ENV, "asm")
    with pytest.raises(ValueError, match="BITDANCE_FEW_ROW_PRODUCTS='asm'"):
        compiling.few_row_products()

    def no_compiler():
        raise KernelError("could not build panel_gemm.cpp: no compiler")

    monkeypatch.setattr(compiling, "load_panel_gemm", no_compiler)
    monkeypatch.setenv(compiling.FEW_ROW_PRODUCTS_ENV, "panel")
    with pytest.raises(KernelError, match="BITDANCE_FEW_ROW_PRODUCTS=panel: could not build"):
        compiling.few_row_products()
    monkeypatch.delenv(compiling.FEW_ROW_PRODUCTS_ENV)
    with pytest.warns(RuntimeWarning, match="stay with MKL: could not build"):
        assert compiling.few_row_products() == "library"


@needs_kernel
def test_frozen_graphs_run_the_kernel_on_few_rows(monkeypatch):
    """Traced under the kernel, a frozen graph calls panel_linear with the packing folded into a constant,
    gives the module's outputs, and leaves products of PANEL_MAX_ROWS rows and more to the library."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv(compiling.FEW_ROW_PRODUCTS_ENV, "panel")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 40), torch.nn.GELU(), torch.nn.Linear(40, 24, bias=False))
    frozen = compiling.FrozenCompiled(lambda m, x: m(x), net)
    assert frozen.few_row_products == "panel"
    x = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        out, code = run_and_get_code(frozen, x)
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
        code = "\n".join(code)
        assert code.count("panel_linear") >= 2 and "panel_pack" not in code
        many = torch.randn(PANEL_MAX_ROWS, 32, generator=g)
        out, code = run_and_get_code(frozen, many)
        torch.testing.assert_close(out, net(many), rtol=1e-5, atol=1e-5)
        assert "panel_linear" not in "\n".join(code)


def test_bench_names_the_kernels_of_the_compiled_products(monkeypatch):
    from bitdance.apps.bench import compiled_products_note

    for wide, few, expected in (("mkl", "panel", "bitdance's panel kernel below 32 rows, MKL's packed GEMM from"),
                                ("mkl", "library", "MKL's packed GEMM at every row count"),
                                ("onednn", "library", "inductor's C++ GEMM templates below 32 rows, oneDNN from")):
        monkeypatch.setattr(compiling, "wide_products", lambda wide=wide: wide)
        monkeypatch.setattr(compiling, "few_row_products", lambda few=few: few)
        assert expected in compiled_products_note()
