"""How fast a CPU multiplies few rows by a B head's weights: BLAS against inductor's C++ GEMM templates.

    python benchmarks/small_gemm.py                       # rows 4 16 64 256
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/small_gemm.py --rows 4 16 64

The products are shaped like those of the 6 blocks of the BitDance-B head (width 768: W->3W, 3W->W, SwiGLU
W->3W and 1.5W->W, with biases; 149 MB of fp32 weights, more than a 32 MB L3). Three ways, interleaved,
best of 3:

* ``eager``: ``nn.Linear`` (BLAS; it repacks the weight matrix at every call);
* ``eager W.x^T``: the same product as ``addmm(bias, W, x^T)``, with the weight as the left operand;
* ``compiled``: ``torch.compile`` with the weights frozen and ``max_autotune`` (what
  ``BitDance.compile_sampling`` does on CPUs): C++ GEMM templates with weights packed once.

Prints GFLOP/s per row count, the weight bytes streamed per second, the fp32 matmul peak (2048^3,
``bitdance.apps.bench.measure_matmul_peak``) and the
memory bandwidth (a 1 GB copy) measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch._inductor.config as inductor_config
from torch import nn

from bitdance.apps.bench import measure_matmul_peak
from bitdance.compiling import CPU_INDUCTOR_OPTIONS, CPU_TEMPLATE_OPTIONS
from bitdance.precision import cpu_description, separate_compile_cache

W = 768


class Blocks(nn.Module):
    def __init__(self, transposed: bool = False):
        super().__init__()
        layers = []
        for _ in range(6):
            layers += [nn.Linear(W, 3 * W), nn.Linear(3 * W, W), nn.Linear(W, 3 * W), nn.Linear(3 * W // 2, W)]
        self.layers, self.transposed = nn.ModuleList(layers), transposed

    def lin(self, layer: nn.Linear, x):
        if self.transposed:
            return torch.addmm(layer.bias[:, None], layer.weight, x.t()).t()
        return layer(x)

    def forward(self, x):
        for i in range(0, len(self.layers), 4):
            x = x + self.lin(self.layers[i + 1], self.lin(self.layers[i], x))
            a, b = self.lin(self.layers[i + 2], x).chunk(2, dim=-1)
            x = x + self.lin(self.layers[i + 3], a * b)
        return x


def _best(fn, flops: float, reps: int = 10) -> float:
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return flops * reps / (time.perf_counter() - t0)


def _copy_bandwidth() -> float:
    src = torch.ones(2**28)  # 1 GiB
    dst = torch.empty_like(src)
    return max(_best(lambda: dst.copy_(src), 2 * src.nbytes, reps=2) for _ in range(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    separate_compile_cache()
    torch.manual_seed(0)
    peak = measure_matmul_peak(torch.device("cpu"), torch.float32)
    bandwidth = _copy_bandwidth()
    model = Blocks().eval()
    transposed = Blocks(transposed=True).eval()
    transposed.load_state_dict(model.state_dict())
    weight_bytes = sum(layer.weight.nbytes for layer in model.layers)
    rows_out = []
    with torch.no_grad(), inductor_config.patch({**CPU_INDUCTOR_OPTIONS, **CPU_TEMPLATE_OPTIONS}):
        for rows in args.rows:
            torch._dynamo.reset()
            x = torch.randn(rows, W)
            flops = 2 * rows * sum(layer.weight.numel() for layer in model.layers)
            compiled = torch.compile(model)
            compiled(x)
            ways = {"eager": lambda: model(x), "eager W.x^T": lambda: transposed(x), "compiled": lambda: compiled(x)}
            best = {k: 0.0 for k in ways}
            for _ in range(3):
                for k, fn in ways.items():
                    best[k] = max(best[k], _best(fn, flops))
            row = {"rows": rows, **{k: v / 1e9 for k, v in best.items()},
                   **{f"{k} weight GB/s": v / flops * weight_bytes / 1e9 for k, v in best.items()}}
            rows_out.append(row)
            print(f"rows {rows:4d}: " + "  ".join(f"{k} {v / 1e9:6.1f} GFLOP/s ({v / peak:.0%})" for k, v in best.items()),
                  flush=True)
    summary = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "peak_gflops": peak / 1e9,
               "copy_gb_s": bandwidth / 1e9, "weight_mb": weight_bytes / 1e6, "rows": rows_out}
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s, memory copy {bandwidth / 1e9:.1f} GB/s, "
          f"weights {weight_bytes / 1e6:.0f} MB")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
