"""``torch.compile`` of the sampler's hot loops, with the weights frozen into the graph on CPUs.

Sampling multiplies few rows by large weights: a B-4x head step has 16 rows (4 sequences x 4 tokens)
against 38M parameters, a B-1x transformer step 4 rows against 170M. BLAS handles such products far
below a CPU's peak (it repacks the weight matrix at every call: measured 11-17 GFLOP/s at 4 rows and
55-63 at 16 on a 2-core AVX2 EPYC whose large-matmul peak is 180). Inductor's C++ GEMM templates pack
each weight once, at compile time, and then run close to the memory bandwidth (58 and 107 GFLOP/s),
but only for weights that are constants of the graph: inductor's "freezing". So on CPUs the compiled
loops are built with ``freezing`` and ``max_autotune`` restricted to the C++ templates switched on while
they compile. (Letting inductor also time BLAS and keep the faster per shape picked BLAS for the 4-row
products of B-1x: it times each product alone, with its weights hot in the cache, where sampling streams
them from memory. The head step then ran at the eager speed, against 3.7x faster with the templates.)

Products with many rows (64 in a B-16x step: 4 sequences x 16 tokens) are compute-bound, and there the
BLAS libraries' kernels, with each weight packed once into their own layout, beat the templates: the
products of a B head's blocks at 64 rows ran at 150-166 GFLOP/s in oneDNN against 122-139 (AVX2 forced,
2-core AMD EPYC), and a B-16x image took 7.0-9.1 s against 9.5-16 (the templates' speed depends on the block
sizes their autotuning picked on a busy machine). So calls with at least :data:`ONEDNN_MIN_ROWS` rows in fp32
go to a second graph, compiled without the templates and with inductor's C++ wrapper. Which library packs
its weights depends on the CPU (:func:`wide_products`): inductor hands a frozen fp32 product to MKL's packed
GEMM when the row count is static and to oneDNN's when it is symbolic. On Intel CPUs the second graph is
compiled with static shapes, for MKL, where torch runs its AVX2 or AVX-512 kernels: a B-16x image took 10.7%
less time than with oneDNN and dynamic rows, and 6.7% less than with oneDNN and static rows (2-core Xeon, AVX2
forced, MKL included; one run each); with AVX-512 it is what lets bitdance's kernel take the products below
256 rows (see below). It then compiles once per row count, each graph holding its own packed weights.
Elsewhere it is compiled with dynamic shapes, for oneDNN, and one graph serves every batch size: on an AMD EPYC
MKL's packed GEMM ran 64-row products at 100-140 GFLOP/s against oneDNN's 170 (AVX2). Either way a process
that runs both graphs holds two packed copies of the weights.

Frozen weights are copies: a compiled loop notices when the module's parameters were written since
(``load_state_dict``, an optimizer step), or its modules switched between training and evaluation, and
compiles again. That check runs once per autoregressive step, so the CPU graphs are built without dynamo's
guards on the module (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``), which it would evaluate at
every call: 140-240 us a call, 4% of a B-1x image, before; 60-100 us after (AVX2 forced, 2 cores).

With AVX2 kernels the graphs of few rows are traced under :class:`PaddedProducts`, which gives the templates'
widest micro-kernel products whose width it would not divide. Where :func:`few_row_products` says "panel" (by
default on Intel CPUs running AVX2 or AVX-512 kernels, where MKL's packed GEMM would take them), fp32 products of
fewer than :data:`~bitdance.kernels.PANEL_MAX_ROWS` rows (with static rows: where oneDNN takes the graph of many
rows, only those under :data:`ONEDNN_MIN_ROWS`) are traced under :class:`PanelProducts` instead and run the
hand-written kernel of :mod:`bitdance.kernels` in the build for torch's kernels (AVX2 or AVX-512), each weight
packed for it at compile time (a B-4x image 4-13% less time than with MKL and 15% less again since the kernel
takes 16 rows and more in chunks, B-1x 6-17%, B-16x 13%: paired runs, 2-core Xeon, AVX2 forced). Only the hoisted adaLN
product of B-4x and B-16x (16 or 64 rows times 26 flow times) stays with MKL. Quantized layers with int8 or bf16
weights computing in fp32 (:mod:`bitdance.models.quantized`) call :data:`weight_only_linear` in compiled code, which
the kernel runs on the weight as stored at fewer than :data:`~bitdance.kernels.STORED_MAX_ROWS` rows (1 or 2 bytes a
weight from memory instead of 4: B-1x 2.2-2.9x faster with int8). The transformer's compiled decode
step attends over its KV cache with the kernel of :mod:`bitdance.kernels` where :func:`kv_attention_fits` and
:func:`kv_attention_kernel` say so (fp32, no mask to apply, up to four queries per sequence: B-1x and B-4x),
with torch's fused kernel otherwise. On GPUs the weights stay inputs of the graph, and ``mode`` selects the
usual inductor modes ("reduce-overhead" = CUDA graphs).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bitdance.kernels import (
    KV_HEAD_DIMS,
    KV_MAX_QUERIES,
    PANEL_ISA,
    PANEL_MAX_ROWS,
    STORED_MAX_ROWS,
    KernelError,
    kernels_unsupported,
    load_kernels,
    panel_ops,
)
from bitdance.precision import cpu_vendor, separate_compile_cache

__all__ = ["AVX2_TEMPLATE_WIDTH", "CPU_INDUCTOR_OPTIONS", "CPU_TEMPLATE_OPTIONS", "CPU_WIDE_OPTIONS",
           "FEW_ROW_PRODUCTS_ENV", "KV_ATTENTION_ENV", "ONEDNN_MIN_ROWS", "WIDE_PRODUCTS_ENV", "FrozenCompiled",
           "PaddedProducts", "PanelProducts", "few_row_products", "kv_attention_fits", "kv_attention_kernel",
           "rows_of", "weight_only_linear", "wide_min_rows", "wide_products"]

# What the CPU compilation switches on (inductor config names): freezing around every compiled call (it is
# decided before per-function options apply, see FrozenCompiled.active), and for the graph of few rows the C++
# GEMM templates as that function's options. The graph of many rows takes oneDNN's kernels, inductor's
# choice for frozen fp32 weights with dynamic rows once the templates are not asked for.
CPU_INDUCTOR_OPTIONS: dict[str, Any] = {"freezing": True}
CPU_TEMPLATE_OPTIONS: dict[str, Any] = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}
# The graph of many rows calls its kernels from C++ rather than from Python: while the Python wrapper runs
# between two kernels, the second core waits (11% of its time in a B-16x head step; AVX2 forced, 2 cores).
# A B-16x image, where every graph is this one, took 1.7% less time (median of 4 alternating rounds, tokens
# identical). The graph of few rows keeps the Python wrapper: with the C++ one a B-1x image took 1.7% more.
CPU_WIDE_OPTIONS: dict[str, Any] = {"cpp_wrapper": True}

# Rows (of a call's first tensor: its elements over its last dimension) from which fp32 products go to the graph
# of many rows (oneDNN or MKL, see wide_products; the name is from when it was oneDNN's everywhere).
# Measured with the B head's block products (AVX2 forced, 2 cores): the templates are faster at 4 and 16 rows
# (59 / 84-94 GFLOP/s against 28 / 72), oneDNN at 64 (155 against 139).
ONEDNN_MIN_ROWS = 32

# Overrides :func:`wide_products` for the whole process ("mkl" or "onednn"), e.g. to compare the two.
WIDE_PRODUCTS_ENV = "BITDANCE_WIDE_PRODUCTS"


def wide_products() -> str:
    """The library that runs the fp32 products of the graph of many rows on CPUs: ``"mkl"`` (its packed GEMM;
    the graph is then compiled with static rows) on Intel CPUs running torch's AVX2 or AVX-512 kernels where
    torch has MKL, else ``"onednn"`` (dynamic rows). ``$BITDANCE_WIDE_PRODUCTS`` overrides the choice."""
    forced = os.environ.get(WIDE_PRODUCTS_ENV, "").strip().lower()
    if forced:
        if forced not in ("mkl", "onednn"):
            raise ValueError(f"{WIDE_PRODUCTS_ENV}={os.environ[WIDE_PRODUCTS_ENV]!r}: use mkl or onednn")
        if forced == "mkl" and not torch.backends.mkl.is_available():
            raise ValueError(f"{WIDE_PRODUCTS_ENV}=mkl: this torch build has no MKL")
        return forced
    intel_mkl = cpu_vendor() == "GenuineIntel" and torch.backends.mkl.is_available()
    return "mkl" if _runs_x86_vector_kernels() and intel_mkl else "onednn"


def _runs_avx2_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability().upper() == "AVX2"


def _runs_x86_vector_kernels() -> bool:
    """torch runs its AVX2 or its AVX-512 kernels (x86; not forced below AVX2)."""
    return torch.backends.cpu.get_cpu_capability().upper() in ("AVX2", "AVX512")


# Overrides :func:`few_row_products` for the whole process ("panel" or "library").
FEW_ROW_PRODUCTS_ENV = "BITDANCE_FEW_ROW_PRODUCTS"


def few_row_products() -> str:
    """What runs the fp32 products of fewer than :data:`~bitdance.kernels.PANEL_MAX_ROWS` rows in the compiled
    CPU graphs: ``"panel"`` (the kernel of :mod:`bitdance.kernels`, in the build for torch's kernels: AVX2 or
    AVX-512) where torch runs its AVX2 or AVX-512 kernels, :func:`wide_products` is MKL and the kernel builds,
    else ``"library"`` (MKL or inductor's C++ GEMM templates, as the graph has it). The kernel was measured
    against MKL only (on Intel CPUs), so by default it replaces MKL only; ``$BITDANCE_FEW_ROW_PRODUCTS`` forces
    either (``panel`` raises :class:`~bitdance.kernels.KernelError` where the kernel cannot run)."""

    def wanted() -> bool:
        return _runs_x86_vector_kernels() and wide_products() == "mkl" and not kernels_unsupported(PANEL_ISA)

    chosen = _kernel_choice(FEW_ROW_PRODUCTS_ENV, "panel", "library", wanted, "few-row products stay with MKL",
                            PANEL_ISA)
    return "panel" if chosen else "library"


def _kernel_choice(env: str, on: str, off: str, wanted: Callable[[], bool], fallback: str, isa: str) -> bool:
    """Whether a kernel of :mod:`bitdance.kernels` (its ``isa`` build) runs: ``$env`` = ``on`` / ``off`` forces
    it, else ``wanted()`` decides, and a kernel that fails to build leaves the library with a warning
    (``fallback``: what stays). A value the switch does not know, or a forced kernel that cannot run, is a
    one-line error."""
    forced = os.environ.get(env, "").strip().lower()
    if forced not in ("", on, off):
        raise ValueError(f"{env}={os.environ[env]!r}: use {on} or {off}")
    if forced == off or (not forced and not wanted()):
        return False
    try:
        load_kernels(isa)
    except KernelError as err:
        if forced:
            raise KernelError(f"{env}={on}: {err}") from err
        warnings.warn(f"{fallback}: {err}", RuntimeWarning, stacklevel=3)
        return False
    return True


# Overrides :func:`kv_attention_kernel` for the whole process ("kernel" or "library").
KV_ATTENTION_ENV = "BITDANCE_KV_ATTENTION"


@torch.compiler.assume_constant_result  # read while dynamo traces the decode step: evaluated, not traced
def kv_attention_kernel() -> bool:
    """Whether the compiled CPU decode step attends over its KV cache with :func:`bitdance.kernels.kv_attention`
    (fp32, every cached position visible, at most :data:`~bitdance.kernels.KV_MAX_QUERIES` queries per
    sequence; the caller checks those) rather than torch's fused kernel. By default wherever the kernel builds:
    it read the cache faster than torch's kernel with AVX2 and with AVX-512 (``bitdance.kernels``).
    ``$BITDANCE_KV_ATTENTION`` = ``kernel`` / ``library`` forces either (``kernel`` raises
    :class:`~bitdance.kernels.KernelError` where the kernel cannot run)."""
    return _kernel_choice(KV_ATTENTION_ENV, "kernel", "library", lambda: not kernels_unsupported("avx2"),
                          "the KV-cache attention stays with torch's kernel", "avx2")


def kv_attention_fits(q: torch.Tensor, dense: bool) -> bool:
    """Whether a decode step's attention (queries ``q``: (batch, heads, queries, dims)) is one the KV-cache
    kernel takes: CPU fp32, every cached position visible (``dense``), few queries, a head size it has."""
    return (dense and q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-2] <= KV_MAX_QUERIES
            and q.shape[-1] in KV_HEAD_DIMS)


@torch.compiler.assume_constant_result  # read while dynamo traces (the head's attention): evaluated, not traced
def wide_min_rows() -> int:
    """Rows from which an fp32 call takes the graph of many rows: :data:`ONEDNN_MIN_ROWS` with oneDNN, 1 with
    MKL, whose packed GEMM also beat the C++ templates at the 4 and 16 rows of B-1x and B-4x (2-core Xeon, AVX2
    forced: a B-1x image 8.6% less time, B-4x 3.6%; one process, 3 alternating rounds each, tokens
    identical). The graph of few rows then serves bf16 only."""
    return 1 if wide_products() == "mkl" else ONEDNN_MIN_ROWS


# The widest fp32 micro-kernel of inductor's C++ GEMM template with AVX2 (3 vectors of 8). The template ranks
# its micro-kernels first by whether their width divides the product's, so a 4096-wide product (the B
# transformer's SwiGLU input) got the 16-wide one, which streamed its weight at 21 GB/s against 27 for the
# 24-wide one (4 rows; at 16 rows 9-10 against 11-13 GB/s; AVX2 forced, 2 cores). A whole B-1x image took
# 4.6% less time (B-4x: 3%). With AVX-512 the two widths (48 against 32) measured the same, so only AVX2 pads.
AVX2_TEMPLATE_WIDTH = 24


# ``x @ weight.T`` with ``weight`` widened to x's dtype (int8 / bf16 storage, bitdance.models.quantized), as one
# op: composite, so a graph traced without a mode that handles it holds the widening and the product as before
# (under freezing inductor folds the widened weight into a constant), while PanelProducts sees the stored weight.
_LIBRARY = torch.library.Library("bitdance", "FRAGMENT")
_LIBRARY.define("weight_only_linear(Tensor x, Tensor weight) -> Tensor")
_LIBRARY.impl("weight_only_linear", lambda x, weight: F.linear(x, weight.to(x.dtype)), "CompositeImplicitAutograd")
weight_only_linear = torch.ops.bitdance.weight_only_linear


def _panel_fits(x: torch.Tensor) -> bool:
    """Whether PanelProducts takes a product with fp32 input ``x``: on a CPU, static rows, fewer than the limit."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and all(isinstance(d, int) for d in x.shape)
            and rows_of(x) < PANEL_MAX_ROWS)


def _linear_operands(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``F.linear``'s input, weight and bias, however the call passed them."""
    return args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")


class PaddedProducts(TorchFunctionMode):
    """While active: an fp32 ``F.linear`` whose output width is not a multiple of :data:`AVX2_TEMPLATE_WIDTH`
    runs with its weight (and bias) padded with zero rows up to one, and the padding sliced off its output.
    The CPU graphs of few rows are traced under it when torch runs AVX2 kernels: under freezing the padded
    weight is folded into a constant once, and each output column is the same dot product as unpadded."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_operands(args, kwargs)
            width = weight.shape[0]
            if weight.dim() == 2 and weight.dtype == x.dtype == torch.float32 and width % AVX2_TEMPLATE_WIDTH:
                pad = -width % AVX2_TEMPLATE_WIDTH
                bias = None if bias is None else F.pad(bias, (0, pad))
                return F.linear(x, F.pad(weight, (0, 0, 0, pad)), bias)[..., :width]
        return func(*args, **kwargs)


class PanelProducts(TorchFunctionMode):
    """While active: an fp32 ``F.linear`` of a 2-D weight with fewer than
    :data:`~bitdance.kernels.PANEL_MAX_ROWS` rows (static ones: a symbolic row count is left alone) runs
    ``bitdance::panel_linear`` on ``bitdance::panel_pack(weight)``, those of the build for the kernels torch runs
    (:data:`~bitdance.kernels.PANEL_ISA`). Traced into a frozen graph, the packing of each weight is folded into
    a constant. So does :data:`weight_only_linear` of an fp32 input: an int8 or bf16 weight with fewer than
    :data:`~bitdance.kernels.STORED_MAX_ROWS` rows packed as stored (the kernel widens each weight as it loads it,
    and the graph holds 1 or 2 bytes per weight instead of the 4 of a widened constant), any other packed widened.
    Needs :func:`~bitdance.kernels.load_kernels` to have run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_operands(args, kwargs)
            if weight.dim() == 2 and weight.dtype == torch.float32 and _panel_fits(x):
                pack, linear = panel_ops(PANEL_ISA)
                out = linear(x, pack(weight), weight.shape[0])
                return out if bias is None else out + bias
        elif func is weight_only_linear or func is weight_only_linear.default:
            x, weight = args
            if weight.dim() == 2 and _panel_fits(x):  # fp8 as before: widened, then the kernel as for fp32
                pack, linear = panel_ops(PANEL_ISA)
                narrow = weight.dtype in (torch.int8, torch.bfloat16) and rows_of(x) < STORED_MAX_ROWS
                return linear(x, pack(weight if narrow else weight.to(torch.float32)), weight.shape[0])
        return func(*args, **kwargs)


def rows_of(t: torch.Tensor) -> int:
    """Rows ``t`` gives a product with a weight: its elements over its last dimension."""
    return t.numel() // max(t.shape[-1], 1)


def _bound_forward(self, *args):
    with self.products() if self.products is not None else contextlib.nullcontext():
        return self.fn(self.module, *args)


class _Bound(nn.Module):
    """``fn(module, *args)`` as a module whose submodule holds the weights: inductor freezes the parameters
    of the module it compiles, not those of a module passed in as an argument.

    Dynamo keeps its compiled graphs (and counts them against ``recompile_limit``) per code object, so each
    instance gets a forward with a code object of its own: otherwise the graphs of every compiled loop in
    the process (head and transformer, each model, each batch size) would share one count."""

    _count = itertools.count()

    def __init__(self, fn: Callable[..., Any], module: nn.Module, *,
                 products: type[TorchFunctionMode] | None = None):
        super().__init__()
        self.fn, self.module, self.products = fn, module, products  # the mode the graph is traced under
        name = f"forward_{getattr(fn, '__name__', 'fn').strip('_')}_{next(self._count)}"
        code = _bound_forward.__code__.replace(co_name=name, co_qualname=name)
        self.forward = types.MethodType(types.FunctionType(code, _bound_forward.__globals__, name), self)


def _recompile_room():
    """One graph per batch size x {guided, unguided} step (in the graph of few rows or of many): more than
    dynamo's default of 8 per code object for a studio serving several batch sizes (``fullgraph`` turns the
    limit into an error)."""
    return torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit))


def _cloned(out):
    """A CUDA graph's outputs (tensors, possibly in nested tuples, or None) copied out of its memory pool."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_cloned(o) for o in out)
    return out


class FrozenCompiled:
    """``fn(module, *args)`` compiled as a whole (``fullgraph``), called as ``compiled(*args)``.

    On CPUs the module's weights are frozen into the graph (see the module docstring) and the graph is
    compiled again, transparently, when they have been written since. ``mode`` applies to GPUs only
    ("reduce-overhead" / "max-autotune" capture CUDA graphs; the output is then copied, since each replay
    overwrites the previous one and sampling loops feed outputs back in)."""

    def __init__(self, fn: Callable[..., Any], module: nn.Module, *, mode: str | None = None,
                 dynamic: bool = False, rows: Callable[..., int] | None = None):
        self.fn, self.module, self.mode, self.dynamic, self.rows = fn, module, mode, dynamic, rows
        self.wide_products: str | None = None  # set where there is a graph of many rows (CPUs)
        self.few_row_products: str | None = None  # set on CPUs: "panel" or "library"
        self.min_rows = ONEDNN_MIN_ROWS
        params = list(module.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.frozen = self.device.type == "cpu"
        self._active = False
        self._build()

    def _build(self) -> None:
        separate_compile_cache()
        if self.frozen:
            guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self.wide_products, self.min_rows = wide_products(), wide_min_rows()
            self.few_row_products = few_row_products()
            panel = PanelProducts if self.few_row_products == "panel" else None
            few = panel or (PaddedProducts if _runs_avx2_kernels() else None)
            self._compiled = torch.compile(_Bound(self.fn, self.module, products=few),
                                           dynamic=self.dynamic, fullgraph=True,
                                           options={**CPU_TEMPLATE_OPTIONS, **guards})
            # built now, compiled at its first call: a model sampled only with few rows never compiles it.
            # Static rows (MKL) means static: dynamic=None would turn the rows symbolic at the second row count.
            # With MKL every fp32 call comes here, and the products of few rows of a call go to the kernel.
            self._compiled_wide = torch.compile(_Bound(self.fn, self.module, products=panel),
                                                dynamic=self.wide_products == "onednn", fullgraph=True,
                                                options={**CPU_WIDE_OPTIONS, **guards})
        else:
            self._compiled = torch.compile(_Bound(self.fn, self.module), mode=self.mode, dynamic=self.dynamic,
                                           fullgraph=True)
            self._compiled_wide = None
        self._copy_out = not self.frozen and self.mode in ("reduce-overhead", "max-autotune")
        self._weights = self._weights_state()

    def graph_for(self, *args) -> str:
        """Which graph a call with ``args`` runs: "wide" (fp32 with at least :func:`wide_min_rows` rows on a
        CPU, as of construction: the products in :attr:`wide_products`) or "static" (everything else). A call's
        rows are ``rows(*args)`` where the constructor got that function, else those of its first tensor
        (elements over last dimension)."""
        if self._compiled_wide is None:
            return "static"
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.dtype != torch.float32 or first.dim() == 0:
            return "static"
        rows = self.rows(*args) if self.rows is not None else rows_of(first)
        return "wide" if rows >= self.min_rows else "static"

    def _weights_state(self) -> tuple:
        return (tuple((p.data_ptr(), p._version) for p in self.module.parameters()),
                tuple(m.training for m in self.module.modules()))

    def refresh(self) -> bool:
        """Compile again if frozen weights were written since, or a submodule was switched between training
        and evaluation; True when it did. Cheap (one pass over the parameters' version counters and the
        modules' flags): samplers call it once per autoregressive step. On CPUs it stands in for dynamo's guards
        on the module, which the graphs are built without (see the module docstring)."""
        if self.frozen and self._weights_state() != self._weights:
            torch._dynamo.reset()  # the old graphs hold the old weights
            self._build()
            return True
        return False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Compilation happens lazily, inside a call (and again for a new shape), so the compile options must
        be in force then (freezing as a patch: inductor reads it before a function's own ``options``). Setting them costs about 60 us, as much as a small kernel: a loop of calls holds
        this once around itself instead of paying it per call."""
        if self._active:
            yield
            return
        patches = [_recompile_room()]
        if self.frozen:
            patches.append(torch._inductor.config.patch(CPU_INDUCTOR_OPTIONS))
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            self._active = True
            try:
                yield
            finally:
                self._active = False

    def __call__(self, *args):
        compiled = self._compiled_wide if self.graph_for(*args) == "wide" else self._compiled
        with self.active():
            out = compiled(*args)
        return _cloned(out) if self._copy_out else out
