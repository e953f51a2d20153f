"""bitdance.kernels: the panel kernel's products and the KV-cache attention, their errors, where the compiled
sampler uses them."""

import pytest
import torch
import torch.nn.functional as F

import bitdance.compiling as compiling
from bitdance.kernels import PANEL_ISAS, PANEL_MAX_ROWS, STORED_MAX_ROWS, KernelError, kernels_unsupported

needs_kernel = pytest.mark.skipif(kernels_unsupported() is not None,
                                  reason=f"bitdance's kernels cannot run here: {kernels_unsupported()}")
# Each build of the panel kernel this CPU can run, whichever kernels torch runs in this process.
each_isa = pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.skipif(kernels_unsupported(isa) is not None,
                                                reason=f"the {isa} build cannot run here: {kernels_unsupported(isa)}"))
    for isa in PANEL_ISAS])


@each_isa
@pytest.mark.parametrize("out_features, in_features", [(37, 40), (16, 8), (1, 3), (48, 256), (32, 5)])
def test_panel_linear_matches_the_product(out_features, in_features, isa):
    """Every row-tile height (1-6 rows with AVX2, 1-8 with AVX-512, and more tiles after them), output widths
    that the panel width (16 or 32) divides or not, inputs with leading dimensions or transposed: the product of
    torch, to fp32 rounding."""
    from bitdance.kernels import panel_linear, panel_pack, panel_width

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g)
    packed = panel_pack(weight, isa)
    width = panel_width(isa)
    assert packed.shape == ((out_features + width - 1) // width, in_features, width)
    for rows in range(1, 16):
        x = torch.randn(2, rows, in_features, generator=g)
        got = panel_linear(x, packed, out_features, isa)
        assert got.shape == (2, rows, out_features)
        torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-4)
    x = torch.randn(in_features, 5, generator=g).T  # not contiguous
    torch.testing.assert_close(panel_linear(x, packed, out_features, isa), x @ weight.T, rtol=1e-5, atol=1e-4)


@each_isa
@pytest.mark.parametrize("out_features, in_features", [(37, 40), (48, 600), (1, 300), (16, 7), (70, 260)])
def test_panel_linear_in_chunks_matches_the_product(out_features, in_features, isa):
    """From 16 rows the kernel goes through each panel in chunks of 16 KiB (256 inputs with AVX2, 128 with
    AVX-512; accumulating in the output): inputs that the chunk or the prefetch groups (2, 4, 8 inputs) do not
    divide, a last panel the panel width does not divide, row counts around the switch and tiles of every
    height: the product of torch, to fp32 rounding, and at 15 and 16 rows the same values as the row-at-a-time
    way (one sum per output, in the same order)."""
    from bitdance.kernels import panel_linear, panel_pack

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g)
    packed = panel_pack(weight, isa)
    for rows in (16, 17, 22, 23, 32, 33, 35, 37, 64, 101):
        x = torch.randn(rows, in_features, generator=g)
        torch.testing.assert_close(panel_linear(x, packed, out_features, isa), x @ weight.T, rtol=1e-5, atol=1e-4)
    x = torch.randn(16, in_features, generator=g)
    chunked = panel_linear(x, packed, out_features, isa)
    assert torch.equal(chunked[:15], panel_linear(x[:15], packed, out_features, isa))


@each_isa
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.int8])
def test_panel_linear_of_stored_weights_widens_them(storage, isa):
    """int8 and bf16 weights packed as stored (1 and 2 bytes a weight) give the product with the weight widened
    to fp32, to fp32 rounding: every tile height of the row-at-a-time way with inputs that a prefetch unit (2 or
    4 inputs) does not divide, and the chunked way (chunks of 512 or 1024 inputs) with a last panel the panel
    width does not divide."""
    from bitdance.kernels import panel_linear, panel_pack

    g = torch.Generator().manual_seed(0)
    for out_features, in_features in ((37, 43), (70, 1030), (16, 3)):
        weight = torch.randn(out_features, in_features, generator=g) * 50
        weight = weight.round().clamp(-127, 127).to(storage)
        packed = panel_pack(weight, isa)
        assert packed.dtype == storage
        for rows in (*range(1, 10), 15, 16, 17, 33, 64, 101):
            x = torch.randn(rows, in_features, generator=g)
            expected = x.double() @ weight.double().T
            got = panel_linear(x, packed, out_features, isa)
            assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), (out_features, rows)


@each_isa
def test_panel_kernel_rejects_what_it_cannot_multiply(isa):
    from bitdance.kernels import panel_linear, panel_pack

    packed = panel_pack(torch.randn(20, 8), isa)
    with pytest.raises(RuntimeError, match="does not fit a packed weight"):
        panel_linear(torch.randn(3, 9), packed, 20, isa)
    with pytest.raises(RuntimeError, match="does not fit a packed weight"):
        panel_linear(torch.randn(3, 8), packed, 80, isa)  # more outputs than the panels hold
    with pytest.raises(RuntimeError, match="expected an fp32 CPU input"):
        panel_linear(torch.randn(3, 8).bfloat16(), packed, 20, isa)
    with pytest.raises(RuntimeError, match="must come from panel_pack"):
        panel_linear(torch.randn(3, 8), torch.randn(20, 8), 20, isa)
    with pytest.raises(RuntimeError, match="expected a 2-D fp32, bf16 or int8 CPU weight"):
        panel_pack(torch.randn(2, 20, 8), isa)
    with pytest.raises(RuntimeError, match="expected a 2-D fp32, bf16 or int8 CPU weight"):
        panel_pack(torch.randn(20, 8).half(), isa)
    other = "avx2" if isa == "avx512" else "avx512"
    if kernels_unsupported(other) is None:  # the other build's layout (another panel width) is refused
        with pytest.raises(RuntimeError, match="must come from panel_pack"):
            panel_linear(torch.randn(3, 8), panel_pack(torch.randn(20, 8), other), 20, isa)


def test_few_row_products_choice_and_override(monkeypatch):
    """The kernel by default only where MKL would run the products with AVX2 or AVX-512 kernels; the override
    either way, a value it does not know or a kernel that cannot run named in one line."""
    monkeypatch.setattr(compiling, "load_kernels", lambda isa: None)
    monkeypatch.setattr(compiling, "kernels_unsupported", lambda isa: None)
    cases = [  # torch's kernels, the library of many rows, $BITDANCE_FEW_ROW_PRODUCTS -> the choice
        ("AVX2", "mkl", "", "panel"), ("AVX512", "mkl", "", "panel"), ("DEFAULT", "mkl", "", "library"),
        ("AVX2", "onednn", "", "library"), ("AVX512", "onednn", "", "library"),
        ("AVX2", "onednn", "Panel", "panel"), ("AVX2", "mkl", "library", "library")]
    for capability, wide, forced, expected in cases:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(compiling, "wide_products", lambda w=wide: w)
        monkeypatch.setenv(compiling.FEW_ROW_PRODUCTS_ENV, forced)
        assert compiling.few_row_products() == expected, (capability, wide, forced)
    _check_bad_values_and_builds(monkeypatch, compiling.few_row_products, "BITDANCE_FEW_ROW_PRODUCTS", "panel",
                                 "stay with MKL", "library")


def _check_bad_values_and_builds(monkeypatch, choice, env, on, fallback, off_result):
    """A value the switch does not know is a one-line error naming it; a kernel that cannot build is an error
    where the switch forces it, and a warning (the library stays) where it does not."""
    monkeypatch.setenv(env, "asm")
    with pytest.raises(ValueError, match=f"{env}='asm'"):
        choice()

    def no_compiler(isa):
        raise KernelError("could not build kv_attention.cpp: no compiler")

    monkeypatch.setattr(compiling, "load_kernels", no_compiler)
    monkeypatch.setattr(compiling, "kernels_unsupported", lambda isa: None)
    monkeypatch.setenv(env, on)
    with pytest.raises(KernelError, match=f"{env}={on}: could not build"):
        choice()
    monkeypatch.delenv(env)
    with pytest.warns(RuntimeWarning, match=f"{fallback}: could not build"):
        assert choice() == off_result


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


@needs_kernel
@pytest.mark.parametrize("weights", ["int8", "bf16", "fp8"])
def test_frozen_graphs_keep_quantized_weights_as_stored(monkeypatch, weights):
    """Quantized layers (bitdance.models.quantized) in a frozen graph: below STORED_MAX_ROWS rows int8 and bf16
    weights reach the kernel as stored, so the graph's constants are 1 or 2 bytes a weight (not the widened fp32
    copy it held before); from there to PANEL_MAX_ROWS the kernel gets the widened weight, and from PANEL_MAX_ROWS
    the library. fp8, which the kernel does not read, is widened at every row count (and runs the kernel below
    PANEL_MAX_ROWS, as before). The outputs are the eager layers' throughout."""
    from torch._inductor.utils import run_and_get_code

    from bitdance.kernels import panel_width
    from bitdance.models.quantized import quantize_

    monkeypatch.setenv(compiling.FEW_ROW_PRODUCTS_ENV, "panel")
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.GELU(), torch.nn.Linear(80, 24))
    assert quantize_(net, weights) == 2
    frozen = compiling.FrozenCompiled(lambda m, x: m(x), net)
    stored = {"int8": "torch.int8", "bf16": "torch.bfloat16", "fp8": None}[weights]
    width = panel_width()  # of the build for the kernels torch runs here
    first = f"({-(-80 // width)}, 96, {width})"  # the first layer's weight packed for the kernel
    with torch.no_grad():
        for rows in (4, STORED_MAX_ROWS - 1, STORED_MAX_ROWS, PANEL_MAX_ROWS):
            x = torch.randn(rows, 96)
            out, code = run_and_get_code(frozen, x)
            torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
            code = "\n".join(code)
            as_stored = rows < STORED_MAX_ROWS and stored is not None
            assert ("panel_linear" in code) is (rows < PANEL_MAX_ROWS), rows
            assert (f"{stored} {first}" in code) is as_stored, rows  # the first weight, packed as stored
            assert (f"torch.float32 {first}" in code) is (not as_stored and rows < PANEL_MAX_ROWS), rows


@needs_kernel
def test_with_mkl_the_kernel_takes_every_product_below_its_row_limit(monkeypatch):
    """Where MKL runs the graph of many rows (static rows), its products of up to PANEL_MAX_ROWS - 1 rows (B-16x's
    64) run the kernel, and those of PANEL_MAX_ROWS rows stay with MKL."""
    from torch._inductor.utils import run_and_get_code

    if not torch.backends.mkl.is_available():
        pytest.skip("this torch build has no MKL")
    monkeypatch.setenv(compiling.WIDE_PRODUCTS_ENV, "mkl")
    monkeypatch.setenv(compiling.FEW_ROW_PRODUCTS_ENV, "panel")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.GELU(), torch.nn.Linear(40, 24))
    frozen = compiling.FrozenCompiled(lambda m, x: m(x), net)
    with torch.no_grad():
        for rows, kernel in ((64, True), (PANEL_MAX_ROWS, False)):
            x = torch.randn(rows, 300, generator=g)
            assert frozen.graph_for(x) == "wide"
            out, code = run_and_get_code(frozen, x)
            torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
            assert ("panel_linear" in "\n".join(code)) is kernel, rows


@needs_kernel
@pytest.mark.parametrize("dims", [32, 64, 128])
def test_kv_attention_writes_the_cache_and_attends_over_it(dims):
    """The block's keys and values land in the layer's cache at its positions and nowhere else, and the output
    is torch's attention over the cache up to the block's end, for 1-4 queries, at the cache's start, middle
    and end, with q, k, v in the layout the transformer passes them (heads transposed)."""
    from bitdance.kernels import kv_attention

    g = torch.Generator().manual_seed(0)
    layers, batch, heads, max_len = 3, 2, 3, 40
    cache_k = torch.randn(layers, batch, heads, max_len, dims, generator=g)
    cache_v = torch.randn(layers, batch, heads, max_len, dims, generator=g)
    for queries, start in ((1, 0), (1, 17), (3, 20), (4, 36)):
        q, k, v = (torch.randn(batch, queries, heads, dims, generator=g).transpose(1, 2) for _ in range(3))
        positions = torch.arange(start, start + queries)
        want_k, want_v = cache_k.clone(), cache_v.clone()
        want_k[1, :, :, start:start + queries] = k
        want_v[1, :, :, start:start + queries] = v
        end = start + queries
        want = F.scaled_dot_product_attention(q, want_k[1, :, :, :end], want_v[1, :, :, :end])
        got = kv_attention(q, k, v, cache_k, cache_v, 1, positions)
        assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)
        assert got.shape == q.shape and got.stride() == torch.empty_like(q).stride()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kv_attention_rejects_what_it_cannot_attend():
    from bitdance.kernels import kv_attention

    cache = torch.zeros(2, 1, 2, 8, 64)
    q = torch.randn(1, 2, 1, 64)
    with pytest.raises(RuntimeError, match="outside the cache of 8"):
        kv_attention(q, q, q, cache, cache.clone(), 0, torch.tensor([8]))
    with pytest.raises(RuntimeError, match="layer 2 out of range"):
        kv_attention(q, q, q, cache, cache.clone(), 2, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="head dims 32, 64 or 128, got 48"):
        kv_attention(q[..., :48], q[..., :48], q[..., :48], cache[..., :48], cache[..., :48], 0, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="fp32 CPU tensors only"):
        kv_attention(q.bfloat16(), q, q, cache, cache.clone(), 0, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="the caches must be contiguous"):
        kv_attention(q, q, q, cache.transpose(1, 2), cache.transpose(1, 2), 0, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="positions must be a CPU int64 tensor"):
        kv_attention(q, q, q, cache, cache.clone(), 0, torch.tensor([0.0]))


def test_kv_attention_choice_and_override(monkeypatch):
    """The kernel by default wherever it builds, for fp32 CPU decode steps with every cached position visible
    and few queries; the override either way; a bad value or a kernel that cannot run named in one line."""
    monkeypatch.setattr(compiling, "load_kernels", lambda isa: None)
    for unsupported, forced, expected in ((None, "", True), ("the CPU lacks avx2", "", False),
                                          (None, "Library", False), (None, "kernel", True)):
        monkeypatch.setattr(compiling, "kernels_unsupported", lambda isa, u=unsupported: u)
        monkeypatch.setenv(compiling.KV_ATTENTION_ENV, forced)
        assert compiling.kv_attention_kernel() is expected, (unsupported, forced)
    q = torch.zeros(2, 12, 4, 64)
    assert compiling.kv_attention_fits(q, dense=True)
    assert not compiling.kv_attention_fits(q, dense=False)  # a mask to apply: torch's kernel
    assert not compiling.kv_attention_fits(torch.zeros(2, 12, 16, 64), dense=True)  # B-16x's 16 queries
    assert not compiling.kv_attention_fits(q.bfloat16(), dense=True)
    assert not compiling.kv_attention_fits(torch.zeros(2, 12, 4, 48), dense=True)
    _check_bad_values_and_builds(monkeypatch, compiling.kv_attention_kernel, "BITDANCE_KV_ATTENTION", "kernel",
                                 "stays with torch's kernel", False)


def test_bench_names_the_kernels_of_the_compiled_products(monkeypatch):
    from bitdance.apps.bench import compiled_products_note
    from bitdance.kernels import PANEL_ISA

    isa = PANEL_ISAS[PANEL_ISA]["name"]

    for wide, few, kv, expected in (
            ("mkl", "panel", True, f"bitdance's panel kernel ({isa}) below 256 rows, MKL's packed GEMM from 256 rows"),
            ("mkl", "library", True, "MKL's packed GEMM at every row count"),
            ("onednn", "library", False, "inductor's C++ GEMM templates below 32 rows, oneDNN from"),
            ("onednn", "panel", False, f"bitdance's panel kernel ({isa}) below 32 rows, oneDNN from 32 rows"),
            ("mkl", "panel", True, "KV-cache attention of up to 4 queries per sequence: bitdance's kernel"),
            ("mkl", "panel", False, "KV-cache attention of up to 4 queries per sequence: torch's fused kernel")):
        monkeypatch.setattr(compiling, "wide_products", lambda wide=wide: wide)
        monkeypatch.setattr(compiling, "few_row_products", lambda few=few: few)
        monkeypatch.setattr(compiling, "kv_attention_kernel", lambda kv=kv: kv)
        assert expected in compiled_products_note()
