"""A hand-written AVX2 product with prefetching, put into the compiled sampler in place of MKL's (issue 13).

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 BITDANCE_DTYPE=fp32 \
        python benchmarks/panel_gemm.py --preset BitDance-B-4x --compile default --no-decode --dtype fp32

An experiment, not part of bitdance: the kernel (``benchmarks/kernels/panel_gemm.cpp``, compiled at the first
run with torch's C++ extension builder, so it needs a C++ compiler and an x86 CPU with AVX2 and FMA) asks for
the next part of a cold weight while it multiplies the current one. ``benchmarks/cold_weights.py --libraries
mkl panel panel-prefetch`` times it on single products. Here every fp32 ``nn.Linear`` of the models that
``--compile`` compiles gets its weight packed for the kernel at compile time, and its products of fewer than
``--max-rows`` rows run the kernel inside the compiled graphs (the rest, and everything else, as shipped); the
other arguments go to ``bitdance bench`` unchanged, so its MFU and FLOP count cover the same work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).resolve().parent / "kernels" / "panel_gemm.cpp"


def load() -> None:
    """Compile (once; torch caches the build) and register ``torch.ops.bitdance_bench.panel_pack`` and
    ``panel_linear``, with their FLOP formula for ``FlopCounterMode``; a one-line exit where it cannot run."""
    if hasattr(torch.ops.bitdance_bench, "panel_linear"):
        return
    from bitdance.precision import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        sys.exit("panel_gemm: the kernel needs an x86 CPU with AVX2 and FMA")
    from torch.utils.cpp_extension import load as build

    try:
        build(name="bitdance_bench_panel_gemm", sources=[str(SOURCE)], is_python_module=False,
              extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError) as err:
        sys.exit(f"panel_gemm: could not build {SOURCE.name} ({str(err).splitlines()[0]})")

    @torch.library.register_fake("bitdance_bench::panel_linear")
    def _(x, packed, n, prefetch):
        return x.new_empty((*x.shape[:-1], n))

    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.bitdance_bench.panel_linear)
    def _(x_shape, packed_shape, n, prefetch, *args, out_shape=None, **kwargs):
        return 2 * torch.Size(x_shape).numel() * n

    # every row-tile height (1-6, and a 7th row) and a last panel of fewer than 16 columns
    w, x = torch.randn(37, 40), torch.randn(7, 40)
    for prefetch in (False, True):
        for rows in range(1, 8):
            got = torch.ops.bitdance_bench.panel_linear(x[:rows], torch.ops.bitdance_bench.panel_pack(w), 37,
                                                        prefetch)
            if not torch.allclose(got, x[:rows] @ w.T, rtol=1e-4, atol=1e-4):
                sys.exit(f"panel_gemm: the kernel's product of {rows} rows differs from torch's")


def _install(max_rows: int, prefetch: bool) -> None:
    from bitdance import compiling

    shipped_forward = nn.Linear.forward

    def forward(self, x):
        packed = getattr(self, "panel_packed", None)
        if packed is None or x.dtype != torch.float32 or x.numel() // x.shape[-1] >= max_rows:
            return shipped_forward(self, x)
        y = torch.ops.bitdance_bench.panel_linear(x, packed, self.out_features, prefetch)
        return y if self.bias is None else y + self.bias

    shipped_init = compiling.FrozenCompiled.__init__

    def init(self, fn, module, **kwargs):
        # packed before the graphs are built: a buffer of the compiled module is frozen into them as a constant
        for m in module.modules():
            if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 and not hasattr(m, "panel_packed"):
                m.register_buffer("panel_packed", torch.ops.bitdance_bench.panel_pack(m.weight.detach()),
                                  persistent=False)
        shipped_init(self, fn, module, **kwargs)

    nn.Linear.forward = forward
    compiling.FrozenCompiled.__init__ = init


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="other arguments: bitdance bench's")
    ap.add_argument("--max-rows", type=int, default=32, help="products of fewer rows run the kernel")
    ap.add_argument("--no-prefetch", action="store_true", help="the same kernel without prefetching")
    ap.add_argument("--compile", default="off", help="as bitdance bench's; anything but off")
    args, rest = ap.parse_known_args()
    if args.max_rows < 1:
        ap.error(f"--max-rows must be positive, got {args.max_rows}")
    if args.compile == "off":
        ap.error("pass --compile default (the kernel replaces products in the compiled graphs)")
    load()
    _install(args.max_rows, not args.no_prefetch)
    from bitdance.apps.cli import main as cli

    return cli(["bench", "--compile", args.compile, *rest])


if __name__ == "__main__":
    sys.exit(main())
