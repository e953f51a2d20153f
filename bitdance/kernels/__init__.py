"""Hand-written CPU kernels, compiled from C++ at their first use in a process.

``panel_gemm.cpp``: fp32 products ``x @ W.T`` of few rows (fewer than :data:`PANEL_MAX_ROWS`) for x86 CPUs
with AVX2 and FMA, with ``W`` packed once (:func:`panel_pack`) into panels of 16 output columns that stream
from memory one after the other, the next one prefetched while the current one is multiplied. The compiled
sampler runs them in its frozen CPU graphs (see :mod:`bitdance.compiling`): there ``panel_pack`` of a frozen
weight is folded into a constant at compile time, so a sampling step only calls :func:`panel_linear`.

Why: a sampler step multiplies 4-16 rows by every weight of the head or the transformer, few enough that the
product's speed is that of the weights streaming in from memory. MKL's packed GEMM, which inductor calls for
frozen fp32 weights, left the cores waiting on them: single products with cold weights ran at 38-43 GFLOP/s
(4 rows) and 96-106 (16 rows) against 46-51 and 109-111 here, and a whole B-4x image took 4-13% less time with
this kernel, B-1x 6-17% (2-core Xeon with AVX2 kernels forced, paired runs; ``benchmarks/cold_weights.py``,
``docs/benchmarks.md``). From 64 rows on MKL is faster, hence the row limit.

The build uses torch's C++ extension builder (``torch.utils.cpp_extension.load``: a C++ compiler, which
torch.compile on CPUs needs anyway; about 7 s once, then cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and links the OpenMP runtime torch already loaded, so the kernel's threads are
torch's (``torch.set_num_threads``).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from bitdance.precision import cpu_flags

__all__ = ["PANEL_MAX_ROWS", "PANEL_WIDTH", "KernelError", "load_panel_gemm", "panel_gemm_unsupported",
           "panel_linear", "panel_pack"]

# Products of fewer rows go to the kernel; at 64 rows MKL's packed GEMM ran 163-166 GFLOP/s against 147-153.
PANEL_MAX_ROWS = 32
PANEL_WIDTH = 16  # output columns per panel (two AVX2 vectors)

SOURCE = Path(__file__).resolve().parent / "panel_gemm.cpp"


class KernelError(RuntimeError):
    """A kernel this CPU or this installation cannot run (no AVX2/FMA, no C++ compiler, a failed build)."""


def panel_gemm_unsupported() -> str | None:
    """Why this machine cannot run the panel kernel (one phrase), or None where it can (x86 with AVX2 and FMA;
    whether it builds is known only once :func:`load_panel_gemm` has tried)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86 CPU, this one is {platform.machine() or 'unknown'}"
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        return f"the CPU lacks {' and '.join(sorted(missing))}"
    return None


def load_panel_gemm() -> None:
    """Build (once per source version; torch caches it on disk) and register ``torch.ops.bitdance.panel_pack``
    and ``panel_linear``, with their shapes for tracing and their FLOPs for ``FlopCounterMode``. Raises
    :class:`KernelError` with a one-line reason where it cannot run (tried once per process)."""
    failure = _load_panel_gemm()
    if failure:
        raise KernelError(failure)


@functools.cache
def _load_panel_gemm() -> str | None:
    reason = panel_gemm_unsupported()
    if reason:
        return f"the panel kernel cannot run here: {reason}"
    from torch.utils.cpp_extension import load

    try:
        load(name="bitdance_panel_gemm", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, ImportError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return f"could not build {SOURCE.name}: {first}"

    @torch.library.register_fake("bitdance::panel_pack")
    def _(w):
        return w.new_empty(((w.shape[0] + PANEL_WIDTH - 1) // PANEL_WIDTH, w.shape[1], PANEL_WIDTH))

    @torch.library.register_fake("bitdance::panel_linear")
    def _(x, packed, n):
        return x.new_empty((*x.shape[:-1], n))

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.bitdance.panel_linear)
    def _(x_shape, packed_shape, n, *args, out_shape=None, **kwargs):
        return 2 * torch.Size(x_shape).numel() * n

    return None


def panel_pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ([out, in], fp32) in the kernel's layout: [ceil(out / 16), in, 16], zero-padded."""
    load_panel_gemm()
    return torch.ops.bitdance.panel_pack(weight)


def panel_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ weight.T`` for fp32 ``x`` [..., in] and ``packed = panel_pack(weight)``: [..., out_features]."""
    load_panel_gemm()
    return torch.ops.bitdance.panel_linear(x, packed, out_features)
