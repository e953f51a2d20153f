"""The KV-cache attention of a compiled decode step: bitdance's kernel against torch's fused one (issue 13).

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/kv_attention.py --queries 1 4 16 --filled 64 300

A B-size model's cache (24 layers, 4 sequences: 2 guided images, 12 heads of 64, 320 positions), fp32. One
timing is one decode step's attention: each of the 24 layers writes the step's keys and values at the filled
position and attends the step's queries over everything cached so far. Before each timing 680 MB are read
(the B transformer's weights, which a sampler streams between two such steps), so the cache comes from memory
as in sampling. Three ways, in milliseconds per step, the mean of ``--repeats`` timings:

* ``kernel``: ``bitdance.kernels.kv_attention`` (what the compiled sampler runs for up to 4 queries);
* ``torch``: ``bitdance::cached_attention``, the copy into the cache and torch's fused kernel over its filled
  part (what the compiled sampler runs for 16 queries, and ran before for every count);
* ``read``: ``torch.sum`` over the same keys and values: how fast this machine reads them at all.

The kernel's outputs are checked against torch's before timing. It needs a C++ compiler and an x86 CPU with
AVX2 and FMA; where it cannot run, the script says why in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from bitdance.kernels import KernelError, kv_attention, load_kernels
from bitdance.models.transformer import cached_attention

LAYERS, SEQUENCES, HEADS, MAX_LEN, DIMS = 24, 4, 12, 320, 64
BETWEEN_STEPS = 170_000_000  # fp32 elements read between two steps: the B transformer's weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 4, 16],
                    help="queries per sequence (B-1x: 1, B-4x: 4, B-16x: 16)")
    ap.add_argument("--filled", type=int, nargs="+", default=[64, 160, 300], help="cached positions before the step")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    for q in args.queries:
        if not 1 <= q <= MAX_LEN:
            ap.error(f"--queries {q}: must be between 1 and {MAX_LEN}")
    for f in args.filled:
        if f < 0 or f + max(args.queries) > MAX_LEN:
            ap.error(f"--filled {f}: the cache holds {MAX_LEN} positions, so at most {MAX_LEN - max(args.queries)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    try:
        load_kernels()
    except KernelError as err:
        print(f"kv_attention.py: {err}", file=sys.stderr)
        return 2

    g = torch.Generator().manual_seed(0)
    shape = (LAYERS, SEQUENCES, HEADS, MAX_LEN, DIMS)
    cache_k, cache_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    between = torch.ones(BETWEEN_STEPS)
    unused_mask = torch.ones(1, 1, dtype=torch.bool)  # every cached position is visible: the op does not read it
    print(f"threads {torch.get_num_threads()}, torch CPU kernels {torch.backends.cpu.get_cpu_capability()}; "
          f"ms per decode step (24 layers), cache from memory")
    print("queries  filled   MB read   kernel    torch     read")
    with torch.inference_mode():
        for n in args.queries:
            q, k, v = (torch.randn(SEQUENCES, n, HEADS, DIMS, generator=g).transpose(1, 2) for _ in range(3))
            for filled in args.filled:
                positions = torch.arange(filled, filled + n)
                end = filled + n
                ck, cv = cache_k.select(0, 0).narrow(2, 0, end), cache_v.select(0, 0).narrow(2, 0, end)
                ck.narrow(2, filled, n).copy_(k)
                cv.narrow(2, filled, n).copy_(v)
                want = F.scaled_dot_product_attention(q, ck, cv)
                got = kv_attention(q, k, v, cache_k, cache_v, 0, positions)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

                def kernel(layer, n=n, q=q, k=k, v=v, positions=positions):
                    kv_attention(q, k, v, cache_k, cache_v, layer, positions)

                def library(layer, q=q, k=k, v=v, positions=positions):
                    cached_attention(q, k, v, cache_k, cache_v, layer, positions, unused_mask, True)

                def read(layer, end=end):
                    cache_k.select(0, layer).narrow(2, 0, end).sum()
                    cache_v.select(0, layer).narrow(2, 0, end).sum()

                ms = {}
                for name, fn in (("kernel", kernel), ("torch", library), ("read", read)):
                    total = 0.0
                    for _ in range(args.repeats):
                        between.sum()
                        t0 = time.perf_counter()
                        for layer in range(LAYERS):
                            fn(layer)
                        total += time.perf_counter() - t0
                    ms[name] = total / args.repeats * 1e3
                mb = LAYERS * SEQUENCES * HEADS * end * DIMS * 8 / 1e6
                print(f"{n:7d} {filled:7d} {mb:9.1f} {ms['kernel']:8.2f} {ms['torch']:8.2f} {ms['read']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
