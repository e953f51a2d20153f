"""How much slower a product runs when its weight comes from memory rather than from the core's cache (issue 13).

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/cold_weights.py --rows 4 16 64

For each row count (4, 16 and 64 are what B-1x, B-4x and B-16x's head products have with 2 guided images) and
each weight shape of the B-size head, fp32, each library's packed GEMM (MKL's and oneDNN's, as compiled
sampling uses them):

* hot: one 256 x 768 weight (0.75 MB, stays in the L2 cache) multiplied many times;
* cold: 60 distinct weights of the shape one after the other (more than a 2-core VM's share of the L3), as
  sampling meets its weights: each layer's once per step.

GFLOP/s are the best of 7 timings, next to the fp32 matmul peak measured the way ``bitdance bench`` does. Where
cold is far below hot, the kernel waits for its weights instead of computing while they stream in: that is
what a product costs beyond the ceiling of ``bitdance bench --roofline``, which takes each product at the
slower of the two, not their sum. ``--libraries mkl panel`` compares MKL with the prefetching kernel that
compiled sampling runs instead of MKL for the few-row products where it takes MKL's (:mod:`bitdance.kernels`;
it needs a C++ compiler and AVX2), ``panel-avx512`` the kernel's AVX-512 build (CPUs with AVX-512).
``--storage bf16 int8`` also runs the kernel with the weights stored in bf16 or int8 (as compiled sampling of a
model loaded with ``weights="bf16"`` / ``"int8"`` does; the products stay fp32, 2 or 1 bytes a weight are read).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bitdance.apps.bench import measure_matmul_peak
from bitdance.kernels import KernelError, load_kernels, panel_ops
from bitdance.models.quantized import STORAGE_DTYPES, quantize_weight

K = 768
SHAPES = (768, 2304, 3072)  # output widths of the B head's products (attention out, q/k/v, MLP)
COLD_WEIGHTS = 60
PANEL_LIBRARIES = {"panel": "avx2", "panel-avx512": "avx512"}  # the kernel's builds (bitdance.kernels.PANEL_ISAS)
LIBRARIES = ("mkl", "onednn", *PANEL_LIBRARIES)


STORAGES = ("fp32", "bf16", "int8")


def _stored(w: torch.Tensor, storage: str) -> torch.Tensor:
    """``w`` as a quantized layer stores it (its per-channel scale, which the caller applies, left out)."""
    return w if storage == "fp32" else quantize_weight(w, STORAGE_DTYPES[storage])[0]


def _gflops(weights: list[torch.Tensor], rows: int, library: str, repeat: int, storage: str = "fp32") -> float:
    xs = [torch.randn(rows, w.shape[1]) for w in weights]
    if library == "mkl":
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
        calls = [lambda x=x, p=p, w=w: torch.ops.mkl._mkl_linear(x, p, w, None, rows)
                 for x, p, w in zip(xs, packed, weights)]
    elif library in PANEL_LIBRARIES:
        pack, linear = panel_ops(PANEL_LIBRARIES[library])  # the ops, as the others'
        packed = [pack(_stored(w, storage)) for w in weights]
        calls = [lambda x=x, p=p, n=w.shape[0]: linear(x, p, n) for x, p, w in zip(xs, packed, weights)]
    else:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
        calls = [lambda x=x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                 for x, p in zip(xs, packed)]

    def run():
        for _ in range(repeat):
            for call in calls:
                call()

    run()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return sum(2 * rows * w.numel() for w in weights) * repeat / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 16, 64], help="rows of each product")
    ap.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=["mkl", "onednn"],
                    help="panel: bitdance's kernel for few rows (bitdance.kernels), its AVX2 build; "
                         "panel-avx512: its AVX-512 build")
    ap.add_argument("--storage", nargs="+", choices=STORAGES, default=["fp32"],
                    help="the weights' storage for the kernel's libraries (MKL and oneDNN: fp32 only)")
    args = ap.parse_args()
    if any(r < 1 for r in args.rows):
        ap.error(f"--rows must be positive, got {args.rows}")
    available = {"mkl": torch.backends.mkl.is_available(), "onednn": torch.backends.mkldnn.is_available()}
    missing = [lib for lib in args.libraries if not available.get(lib, True)]
    if missing:
        sys.exit(f"cold_weights.py: this torch build has no {' or '.join(missing)}")
    for isa in {PANEL_LIBRARIES[lib] for lib in args.libraries if lib in PANEL_LIBRARIES}:
        try:
            load_kernels(isa)
        except KernelError as err:
            sys.exit(f"cold_weights.py: {err}")
    torch.manual_seed(0)
    peak = measure_matmul_peak(torch.device("cpu"), torch.float32) / 1e9
    print(f"fp32 matmul peak {peak:.0f} GFLOP/s, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}")
    print("| rows | weight | library | storage | hot GFLOP/s | cold GFLOP/s | cold / hot |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        hot = [torch.randn(256, K)]
        for rows in args.rows:
            for n in SHAPES:
                cold = [torch.randn(n, K) for _ in range(COLD_WEIGHTS)]
                for lib in args.libraries:
                    for storage in args.storage if lib in PANEL_LIBRARIES else ["fp32"]:
                        h = _gflops(hot, rows, lib, repeat=200, storage=storage)
                        c = _gflops(cold, rows, lib, repeat=1, storage=storage)
                        print(f"| {rows} | {n} x {K} | {lib} | {storage} | {h:.0f} ({h / peak:.0%}) | {c:.0f} "
                              f"({c / peak:.0%}) | {c / h:.2f} |", flush=True)


if __name__ == "__main__":
    main()
