"""Hand-written CPU kernels, compiled from C++ at their first use in a process.

``panel_gemm.cpp``: fp32 products ``x @ W.T`` of up to a few hundred rows (fewer than :data:`PANEL_MAX_ROWS`)
for x86 CPUs with AVX2 and FMA, with ``W`` packed once (:func:`panel_pack`) into panels of two vectors of output
columns that stream from memory one after the other, the lines ahead prefetched while the current ones are
multiplied (below 16 rows a panel at a time; from 16 rows in chunks of 16 KiB that every row tile multiplies
while they sit in the L1, the next chunk's lines prefetched a few per row tile). It is built for two instruction
sets (:data:`PANEL_ISAS`): AVX2 (panels of 16 columns, row tiles of 6) and, on CPUs with AVX-512, AVX-512
(panels of 32, row tiles of 8); :data:`PANEL_ISA` is the one that matches the kernels torch runs in this
process, so forcing torch down to AVX2 (``ATEN_CPU_CAPABILITY=avx2``) forces the kernel down too. ``W`` may also
be int8 or bf16 (the storage of :mod:`bitdance.models.quantized`, packed as stored), widened to fp32 in registers
as it is read: the products are fp32, the weights' bytes a half or a quarter. The compiled
sampler runs them in its frozen CPU graphs (see :mod:`bitdance.compiling`): there ``panel_pack`` of a frozen
weight is folded into a constant at compile time, so a sampling step only calls :func:`panel_linear`.

Why: a sampler step multiplies 4-64 rows by every weight of the head or the transformer, weights that come
from memory at every call (the head's are read 26 times per AR step, but do not stay in the cache in between).
MKL's packed GEMM, which inductor calls for frozen fp32 weights, left the cores waiting on them. Single
products with cold weights ran at 38-43 GFLOP/s (4 rows), 93-102 (16), 123-139 (32) and 159-168 (64) against
46-51, 116-124, 149-158 and 195-201 here, the last at the matmul peak measured the same minute. A whole B-4x
image took 4-13% less time with the kernel's first way than with MKL and 15% less again with the chunks, B-1x
6-17%, B-16x 13% (2-core Xeon with AVX2 kernels forced, paired runs; ``benchmarks/cold_weights.py``,
``docs/benchmarks.md``). At 256 rows MKL is as fast, hence the row limit. Where torch runs AVX-512 kernels
(an Ice Lake Xeon without bf16 units, 2 cores) the compiled sampler had used inductor's C++ templates and
oneDNN instead; with the AVX-512 build and MKL a B-4x image took 9.2 s against 19.3 and B-16x 5.8 against 7.7
(``benchmarks/side_by_side.py``, two runs half an hour apart).

``kv_attention.cpp``: fp32 attention of the few queries of a decode step (up to :data:`KV_MAX_QUERIES`) over
a KV cache, with no mask, writing the step's keys and values into the cache in the same call
(:func:`kv_attention`). The compiled transformer step of the class-conditional models calls it once per
layer in place of torch's fused kernel, which read a cold B-1x cache at 15-20 GB/s; this one prefetches the
values while it reads the keys, and took 28-46% less time over 24 layers' caches (1 and 4 queries per
sequence, ``benchmarks/kv_attention.py``; at 16 the two measured the same, hence the query limit).

The build uses torch's C++ extension builder (``torch.utils.cpp_extension.load``: a C++ compiler, which
torch.compile on CPUs needs anyway; about 10 s once, then cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and links the OpenMP runtime torch already loaded, so the kernel's threads are
torch's (``torch.set_num_threads``).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from bitdance.precision import cpu_flags

__all__ = ["KV_HEAD_DIMS", "KV_MAX_QUERIES", "PANEL_ISA", "PANEL_ISAS", "PANEL_MAX_ROWS", "STORED_MAX_ROWS",
           "KernelError", "kernels_unsupported", "kv_attention", "load_kernels", "panel_linear", "panel_ops",
           "panel_pack", "panel_width"]

# Products of fewer rows go to the kernel; at 256 rows MKL's packed GEMM, cold, ran as fast (195-205 GFLOP/s).
PANEL_MAX_ROWS = 256
# Products of fewer rows (the kernel's row-at-a-time way) read int8 / bf16 weights as stored in compiled sampling;
# from 16 rows, where the kernel computes as much as it reads, they get a widened fp32 copy as before. A B-1x image
# (4 rows) took 2.2-2.9x less time with int8 weights read as stored, 1.5-1.9x with bf16; a B-4x image (16 rows)
# 0.85-0.94x with AVX2 and 0.99-1.27x with AVX-512 (Ice Lake VM, 2 cores, alternating rounds, docs/benchmarks.md).
STORED_MAX_ROWS = 16

# The panel kernel's builds: its instruction set's name, output columns per panel (two vectors), the CPU flags
# it needs, its compiler flags and the suffix of its ops' names (the AVX2 build also holds the KV-cache attention).
PANEL_ISAS: dict[str, dict] = {
    "avx2": dict(name="AVX2", width=16, flags=("avx2", "fma"), cflags=("-mavx2", "-mfma"), suffix=""),
    "avx512": dict(name="AVX-512", width=32, flags=("avx2", "fma", "avx512f"),
                   cflags=("-mavx2", "-mfma", "-mavx512f", "-DBITDANCE_AVX512"), suffix="_avx512"),
}
# The build that matches the vector kernels torch runs in this process (fixed at its start: ATEN_CPU_CAPABILITY).
PANEL_ISA = "avx512" if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512") else "avx2"


def panel_width(isa: str = PANEL_ISA) -> int:
    """Output columns per panel of :func:`panel_pack`'s layout for the ``isa`` build."""
    return PANEL_ISAS[isa]["width"]

# Queries per sequence up to which the KV-cache kernel runs (B-1x: 1, B-4x: 4; B-16x's 16 stay with torch).
KV_MAX_QUERIES = 4
KV_HEAD_DIMS = (32, 64, 128)  # head sizes kv_attention.cpp has a specialisation for

SOURCES = tuple(Path(__file__).resolve().parent / name for name in ("panel_gemm.cpp", "kv_attention.cpp"))


class KernelError(RuntimeError):
    """A kernel this CPU or this installation cannot run (no AVX2/FMA, no C++ compiler, a failed build)."""


def kernels_unsupported(isa: str = "avx2") -> str | None:
    """Why this machine cannot run the kernels built for ``isa`` (one phrase), or None where it can (x86 with
    AVX2 and FMA, and AVX-512 for its build; whether they build is known only once :func:`load_kernels` has
    tried)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86 CPU, this one is {platform.machine() or 'unknown'}"
    missing = set(PANEL_ISAS[isa]["flags"]) - cpu_flags()
    if missing:
        return f"the CPU lacks {' and '.join(sorted(missing))}"
    return None


def load_kernels(isa: str = PANEL_ISA) -> None:
    """Build (once per source version; torch caches it on disk) and register ``torch.ops.bitdance.panel_pack``,
    ``panel_linear`` and ``kv_attention``, and for ``isa="avx512"`` also ``panel_pack_avx512`` and
    ``panel_linear_avx512``, with their shapes for tracing and their FLOPs for ``FlopCounterMode``. Raises
    :class:`KernelError` with a one-line reason where they cannot run (tried once per process and build)."""
    for build in dict.fromkeys(("avx2", isa)):
        failure = _load_kernels(build)
        if failure:
            raise KernelError(failure)


@functools.cache
def _load_kernels(isa: str) -> str | None:
    reason = kernels_unsupported(isa)
    if reason:
        return f"bitdance's CPU kernels ({PANEL_ISAS[isa]['name']}) cannot run here: {reason}"
    from torch.utils.cpp_extension import load

    build = PANEL_ISAS[isa]
    sources = SOURCES if isa == "avx2" else SOURCES[:1]
    try:
        load(name=f"bitdance_kernels{build['suffix']}", sources=[str(p) for p in sources], is_python_module=False,
             extra_cflags=["-O3", *build["cflags"], "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, ImportError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return f"could not build {' and '.join(p.name for p in sources)}: {first}"

    from torch.utils.flop_counter import register_flop_formula

    width, suffix = build["width"], build["suffix"]

    @torch.library.register_fake(f"bitdance::panel_pack{suffix}")
    def _(w):
        return w.new_empty(((w.shape[0] + width - 1) // width, w.shape[1], width))

    @torch.library.register_fake(f"bitdance::panel_linear{suffix}")
    def _(x, packed, n):
        return x.new_empty((*x.shape[:-1], n))

    @register_flop_formula(getattr(torch.ops.bitdance, f"panel_linear{suffix}"))
    def _(x_shape, packed_shape, n, *args, out_shape=None, **kwargs):
        return 2 * torch.Size(x_shape).numel() * n

    if isa != "avx2":
        return None

    @torch.library.register_fake("bitdance::kv_attention")
    def _(q, k, v, cache_k, cache_v, layer, positions):
        return torch.empty_like(q)

    # as torch's formula for attention: 2 FLOPs per multiply-add of the scores and of the weighted values,
    # over every key the queries see (the raw arguments: the keys' count is the block's end)
    @register_flop_formula(torch.ops.bitdance.kv_attention, get_raw=True)
    def _(q, k, v, cache_k, cache_v, layer, positions, *args, out_val=None, **kwargs):
        batch, heads, queries, dims = q.shape
        return 4 * batch * heads * queries * (int(positions.reshape(-1)[0]) + queries) * dims

    return None


def panel_ops(isa: str = PANEL_ISA) -> tuple:
    """The ``(panel_pack, panel_linear)`` ops of the ``isa`` build (registered by :func:`load_kernels`)."""
    suffix = PANEL_ISAS[isa]["suffix"]
    return getattr(torch.ops.bitdance, f"panel_pack{suffix}"), getattr(torch.ops.bitdance, f"panel_linear{suffix}")


def panel_pack(weight: torch.Tensor, isa: str = PANEL_ISA) -> torch.Tensor:
    """``weight`` ([out, in], fp32, bf16 or int8: kept in its dtype) in the ``isa`` build's layout:
    [ceil(out / width), in, width], zero-padded (width: :func:`panel_width`)."""
    load_kernels(isa)
    return panel_ops(isa)[0](weight)


def panel_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, isa: str = PANEL_ISA) -> torch.Tensor:
    """``x @ weight.T`` for fp32 ``x`` [..., in] and ``packed = panel_pack(weight, isa)``: [..., out_features], fp32
    (an int8 or bf16 weight widened as it is read; a quantized layer's per-channel scale is the caller's)."""
    load_kernels(isa)
    return panel_ops(isa)[1](x, packed, out_features)


def kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 layer: int, positions: torch.Tensor) -> torch.Tensor:
    """Write ``k``, ``v`` (B, H, n, D) into ``cache_k[layer]``, ``cache_v[layer]`` (contiguous, (layers, B, H,
    max_len, D)) at ``positions`` (the n consecutive positions of one block, int64; only the first is read) and
    return the attention of ``q`` (B, H, n, D) over every position up to the block's end, unmasked: as
    ``F.scaled_dot_product_attention(q, cache_k[layer, :, :, :end], cache_v[layer, :, :, :end])``. fp32, head
    dimensions in :data:`KV_HEAD_DIMS`."""
    load_kernels("avx2")
    return torch.ops.bitdance.kv_attention(q, k, v, cache_k, cache_v, layer, positions)
