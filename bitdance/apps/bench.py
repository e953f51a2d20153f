"""Sampling benchmark with random weights: throughput, counted FLOPs, MFU and peak memory (``bitdance bench``).

No checkpoint is needed: the generator of a preset and its tokenizer are built with random weights in the
chosen dtype. The diffusion head's zero-initialised output/adaLN weights are given small random values so
that the flow does the same work as with trained weights (the cost does not depend on the values anyway).

* FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` over one full generate (+ decode)
  run: matmuls / linears / convolutions / attention (2 FLOPs per multiply-add; attention counted with the
  full L x S score matrix, masks are not discounted). Element-wise work (norms, activations, sampler
  arithmetic) is not counted, as usual for MFU.
* The matmul peak is measured in the same process: a few large square matmuls in the chosen dtype, best one.
* Peak memory: CUDA ``torch.cuda.max_memory_allocated`` over the timed runs; CPU the peak resident set size
  during the timed runs minus the RSS before the models were built (Linux ``/proc/self/clear_refs`` resets
  the high-water mark; without it, ``resource.getrusage`` ru_maxrss, the process-lifetime peak).
* Memory budget: sampling should need no more than the weights, the KV cache and one decode chunk. The bench
  reports the three (weights and KV cache from their shapes, the decode chunk's activations measured during
  the FLOP-counting decode) and their sum next to the peak.
* MFU ceiling (``roofline``): what the memory system lets this preset reach at this batch. The FLOP-counting
  run also records every product (each op with a FLOP formula: matmuls, attention, convolutions) and its
  operands; they are read back once in the same order (``torch.sum`` over each operand of at least
  :data:`READ_MIN_BYTES`, the model's own weights where the operand is one, so caches behave as in sampling),
  each product timed. A product can take no less than the slower of reading its operands and computing its
  FLOPs at the measured peak; the sum over the run is the read-bound floor, and the counted FLOPs over that
  floor at the peak is the ceiling. Few-row products (B-1x, B-4x with small batches) are bound by how fast
  weights stream from memory: where the ceiling is below an MFU target, faster products alone do not reach it
  there (as far as torch's own reduction can read memory, the measure used).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, shape_wrapper

__all__ = ["COMPILE_MODES", "FLOP_MAPPING", "READ_MIN_BYTES", "BenchResult", "ProductLog",
           "compiled_products_note", "count_flops", "measure_matmul_peak", "proc_memory_bytes", "read_floor",
           "random_generator", "record_products", "reset_peak_memory", "run_bench"]


# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """scaled_dot_product_attention: Q K^T (2 B H L S D) + A V (2 B H L S Dv)."""
    *batch, L, D = query_shape
    S, Dv = key_shape[-2], value_shape[-1]
    n = math.prod(batch)
    return 2 * n * L * S * D + 2 * n * L * S * Dv


def _flop_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {aten.scaled_dot_product_attention: _sdpa_flops}
    cpu_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_flops
    return mapping


# torch's registry has the CUDA attention kernels but not the op a CPU (or inference-mode) call dispatches.
FLOP_MAPPING = _flop_mapping()


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(FLOPs counted by FlopCounterMode while running ``fn()``, its result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as fc:
        out = fn()
    return int(fc.get_total_flops()), out


# --------------------------------------------------------------------------------------------
# Read-bound ceiling
# --------------------------------------------------------------------------------------------
# Smaller operands (a few rows of activations, biases) are taken as cache-resident and free: counting them
# would add per-call overheads to the floor, and the floor must stay a floor.
READ_MIN_BYTES = 256 * 1024


@dataclass
class ProductLog:
    """The products one run dispatched, in order: ``flops[i]`` and ``reads[i]``, the operands (inputs and
    output) of at least :data:`READ_MIN_BYTES`, each a flat view of a model tensor it lives in (a weight, a
    buffer) or, for activations, its size in bytes."""

    flops: list[int] = field(default_factory=list)
    reads: list[list[torch.Tensor | int]] = field(default_factory=list)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _ProductRecorder(TorchDispatchMode):
    def __init__(self, tensors: dict[int, torch.Tensor], log: ProductLog):
        super().__init__()
        self.tensors, self.log = tensors, log
        self.formulas = dict(flop_registry)
        self.formulas.update({k: shape_wrapper(v) for k, v in FLOP_MAPPING.items()})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = self.formulas.get(func._overloadpacket)
        if formula is None:  # composite ops (aten.linear under inference mode): log the products they run
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            reads: list[torch.Tensor | int] = []
            for t in tree_flatten((args, kwargs, out))[0]:
                if not isinstance(t, torch.Tensor) or t.numel() * t.element_size() < READ_MIN_BYTES:
                    continue
                owner = self.tensors.get(_storage_key(t))
                # the operand's own bytes, read from the start of the weight or buffer it is a view of
                reads.append(owner[: t.numel()] if owner is not None and owner.numel() >= t.numel()
                             else t.numel() * t.element_size())
            self.log.flops.append(int(formula(*args, **kwargs, out_val=out)))
            self.log.reads.append(reads)
        return out


def record_products(fn: Callable[[], Any], *modules: torch.nn.Module) -> tuple[ProductLog, Any]:
    """Run ``fn()`` and log its products (see :class:`ProductLog`); operands that are views of ``modules``'
    parameters or buffers are logged as those tensors, so that a replay reads the same memory."""
    tensors = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.is_contiguous():
                tensors[_storage_key(t)] = t.detach().reshape(-1)
    log = ProductLog()
    with _ProductRecorder(tensors, log):
        out = fn()
    return log, out


def read_floor(log: ProductLog, peak_flops: float, device: torch.device | str = "cpu") -> float:
    """Seconds the logged products need at least: each the slower of reading its operands once (timed here,
    ``torch.sum`` over each, in the logged order) and computing its FLOPs at ``peak_flops``."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    device = torch.device(device)
    sizes = [r for reads in log.reads for r in reads if isinstance(r, int)]
    scratch = torch.ones(max(sizes, default=4) // 4 + 1, device=device)  # activations: one hot buffer, as in sampling
    total = 0.0
    with torch.inference_mode():
        for flops, reads in zip(log.flops, log.reads):
            seconds = 0.0
            if reads:
                _sync(device)
                t0 = time.perf_counter()
                for r in reads:
                    (scratch[: r // 4] if isinstance(r, int) else r).sum()
                _sync(device)
                seconds = time.perf_counter() - t0
            total += max(seconds, flops / peak_flops)
    return total


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, *, size: int | None = None,
                        trials: int = 3) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls in ``dtype`` (after one warm-up matmul). In fp32 on CPUs, the
    best of torch's matmul (MKL) and oneDNN's with its weight packed once, which compiled sampling uses for
    products of many rows and which is the faster of the two on some CPUs (an AMD EPYC with AVX-512: 224
    against 200 GFLOP/s): a sampler's MFU is not counted against a peak its own kernels beat."""
    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 2048)
    inner = 10 if device.type == "cuda" else 1
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    with torch.inference_mode():
        products = [lambda: torch.mm(a, b, out=c)]
        if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
            products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
        for product in products:
            product()
            _sync(device)
            for _ in range(trials):
                t0 = time.perf_counter()
                for _ in range(inner):
                    product()
                _sync(device)
                best = max(best, 2.0 * n**3 * inner / (time.perf_counter() - t0))
    return best


def alternating_rounds(sides: dict[str, Callable[[], Any]], rounds: int, *, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, log: Callable[[str], None] | None = None,
                       ) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds of each of ``sides`` (name -> function) over ``rounds`` rounds, and the matmul peak measured at the
    start of each round. Every round runs each side once, in reverse order every other round: on a shared machine
    runs minutes apart measure the neighbours as much as the code, and alternating in one process puts their
    load on every side alike."""
    dev = torch.device(device)
    runs: dict[str, list[float]] = {name: [] for name in sides}
    peaks = []
    for r in range(rounds):
        peaks.append(measure_matmul_peak(dev, dtype))
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            _sync(dev)
            t0 = time.perf_counter()
            sides[name]()
            _sync(dev)
            runs[name].append(time.perf_counter() - t0)
        if log:
            log(f"round {r}: " + ", ".join(f"{n} {runs[n][-1]:.2f} s" for n in sides)
                + f"; peak {peaks[-1] / 1e9:.0f} GFLOP/s")
    return runs, peaks


def proc_memory_bytes(field: str, source: str = "/proc/self/status") -> int | None:
    """A memory figure in bytes from a Linux /proc file: this process's ``VmRSS`` (now) or ``VmHWM`` (peak since
    :func:`reset_peak_memory`), or the machine's ``MemTotal`` with ``source="/proc/meminfo"``; None elsewhere."""
    try:
        for line in Path(source).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory() -> bool:
    """Restart this process's ``VmHWM`` from its current RSS (False where ``/proc/self/clear_refs`` is not
    writable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the RSS before the models are built
    counts only live memory; otherwise a long-lived process (a notebook, the test suite) reuses its freed
    pages for the models and the peak-minus-start figure comes out too small, even zero."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the figure may be low in long-lived processes


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _module_bytes(*modules: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


class _PeakSince:
    """Peak memory of a block (CUDA: allocated bytes; CPU: RSS) minus ``baseline``, by default what was in use
    when the block began; ``bytes`` stays None on a CPU whose high-water mark cannot be reset."""

    def __init__(self, device: torch.device, baseline: int | None = None):
        self.device, self.baseline, self.bytes = device, baseline, None

    def __enter__(self):
        _sync(self.device)
        if self.device.type == "cuda":
            self.start = torch.cuda.memory_allocated(self.device) if self.baseline is None else self.baseline
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            now = proc_memory_bytes("VmRSS") if self.baseline is None else self.baseline
            self.start = now if reset_peak_memory() else None
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self.start)
        elif self.start is not None and proc_memory_bytes("VmHWM") is not None:
            self.bytes = max(0, int(proc_memory_bytes("VmHWM") - self.start))
        return False


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    preset: str
    tokenizer: str
    image_size: int
    batch: int
    steps: int  # flow steps of the head
    guidance_scale: float
    dtype: str
    device: str
    threads: int
    decode: bool
    ar_steps: int
    images_per_s: float
    seconds_per_image: float
    flops_per_image: float
    generator_flops_per_image: float
    decode_flops_per_image: float
    achieved_flops: float
    peak_flops: float
    mfu: float
    peak_memory_bytes: int
    peak_memory_method: str
    # what sampling should need at most: weights + KV cache + one decode chunk's activations
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    decode_chunk_bytes: int | None = None
    memory_budget_bytes: int | None = None
    compile_mode: str = "off"
    whole_flow: bool = False  # the head's flow loop compiled as one graph per AR step
    weights: str | None = None  # the generator's linear layers stored in int8 / fp8 / bf16 (None: the dtype)
    # bf16 vs fp32 on the same seed (``compare_fp32``): fraction of equal bits, PSNR of the decoded images
    bf16_bit_agreement: float | None = None
    bf16_token_agreement: float | None = None
    bf16_image_psnr: float | None = None
    # ``roofline``: the seconds per image every product needs at least, and the MFU that allows
    read_floor_seconds_per_image: float | None = None
    mfu_ceiling: float | None = None
    run_seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve(device: str, dtype: str, notes: list[str]) -> tuple[torch.device, torch.dtype, str]:
    from bitdance.precision import auto_precision, bf16_supported, cpu_bf16_reason, mkl_forcing_gap

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available in this torch build / machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    name = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
    if name not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, bf16 or fp32")
    if name == "auto":
        name = auto_precision(dev)
    elif name == "bf16" and not bf16_supported(dev):  # emulated bf16 would time the emulation, not the code
        why = cpu_bf16_reason() if dev.type == "cpu" else "the GPU has no bf16"
        notes.append(f"bf16 is not supported on this {dev.type} ({why}); falling back to fp32")
        name = "fp32"
    gap = mkl_forcing_gap() if dev.type == "cpu" else None
    if gap:  # the peak (and any eager product) would be timed with AVX-512 while the rest runs AVX2
        notes.append(f"torch runs its AVX2 kernels but {gap}")
    return dev, (torch.bfloat16 if name == "bf16" else torch.float32), name


def random_generator(cfg) -> torch.nn.Module:
    """A :class:`~bitdance.models.transformer.BitDance` of ``cfg`` with torch's random initialisation, except that
    the diffusion head's zero-initialised adaLN and output layers get small random weights, so that the flow does
    real work (what the benchmarks time). Seed torch's generator first for reproducible weights."""
    from torch import nn

    from bitdance.models.transformer import BitDance

    gen = BitDance(cfg)
    net = getattr(gen.head, "net", None)
    if cfg.head_type == "diffusion" and net is not None:
        for lin in [*net.ada_ln_blocks, net.final_layer.ada_ln_modulation, net.final_layer.linear]:
            nn.init.normal_(lin.weight, std=0.02)
    return gen


def _build(preset: str, image_size: int, tokenizer: str | None, seed: int, device, dtype, model: str | None = None):

    if model is not None:  # trained weights: what the bf16-vs-fp32 check is meaningful on
        from bitdance.pipelines.class_conditional import BitDancePipeline

        pipe = BitDancePipeline.from_pretrained(model, tokenizer=tokenizer)
        if pipe.kind != "class_conditional":
            raise ValueError(f"{model}: bench --model takes class-conditional models")
        return (pipe.config, pipe.model.to(device=device, dtype=dtype).eval(),
                pipe.tokenizer.to(device=device, dtype=dtype).eval())

    from bitdance.models.presets import bitdance_preset, tokenizer_preset
    from bitdance.models.tokenizer import BinaryTokenizer

    overrides: dict[str, Any] = {"image_size": image_size}
    if tokenizer:
        overrides["tokenizer"] = tokenizer_preset(tokenizer)
    cfg = bitdance_preset(preset, **overrides)
    device = torch.device(device)
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), device:  # built where they run: fast random init on a GPU
        torch.manual_seed(seed)
        gen = random_generator(cfg)
        tok = BinaryTokenizer(cfg.tokenizer)
    gen = gen.to(device=device, dtype=dtype).eval()
    tok = tok.to(device=device, dtype=dtype).eval()
    return cfg, gen, tok


def run_bench(
    preset: str = "BitDance-B-16x",
    *,
    batch: int = 2,
    steps: int = 25,
    guidance_scale: float = 4.0,
    image_size: int = 256,
    dtype: str = "auto",
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 1,
    decode: bool = True,
    tokenizer: str | None = None,
    seed: int = 0,
    peak_size: int | None = None,
    compile: str = "off",
    whole_flow: bool = False,
    weights: str | None = None,
    compare_fp32: bool = False,
    model: str | None = None,
    profile: str | Path | None = None,
    roofline: bool = False,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time ``repeats`` sampling runs (after ``warmup``) of ``batch`` images with random weights, count the
    FLOPs of one more run, measure the matmul peak, and return the figures (see the module docstring).

    ``compile``: "off", or a ``torch.compile`` mode for the diffusion head's inner loop and, on CPUs, the
    transformer's cached step (:meth:`~bitdance.models.transformer.BitDance.compile_sampling`; "default",
    "reduce-overhead" = CUDA graphs on GPUs, "max-autotune"); compilation happens in the warm-up run.
    ``whole_flow``: with ``compile``, the head's whole flow loop of an AR step as one graph (longer compilation).
    ``weights``: "int8", "fp8" or "bf16": the generator's linear layers store their weights so
    (:func:`~bitdance.models.quantized.quantize_`, as ``from_pretrained(weights=...)`` does) and compute in
    ``dtype``; the FLOPs and the peak are those of ``dtype``.
    ``compare_fp32``: also sample the same seed with the fp32 model and report how many bits/tokens agree
    and the PSNR between the decoded images (only meaningful when ``dtype`` is bf16; with random weights
    the flow is near-chaotic, so check quality on trained weights).
    ``model``: a class-conditional checkpoint/folder to use instead of random weights (``preset``, ``image_size``
    are then taken from it, ``tokenizer`` is a tokenizer file as for ``bitdance sample``).
    ``profile``: a folder; one more run goes through ``torch.profiler`` and leaves ``profile.txt`` (the ops
    that took the most time, on the device and on the host) and ``trace.json.gz`` (open in Perfetto or
    chrome://tracing) there.
    ``roofline``: also log the products of the FLOP-counting run, read their operands back once and report the
    read-bound floor and the MFU ceiling it allows (see the module docstring).
    """
    from bitdance.sampling.flow import FlowSampler

    for name, v, lo in (("batch", batch, 1), ("steps", steps, 1), ("image_size", image_size, 1),
                        ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile!r}; use one of {', '.join(COMPILE_MODES)}")
    if whole_flow and compile == "off":
        raise ValueError("whole_flow compiles the head's flow loop: it needs compile")
    if weights is not None:
        from bitdance.models.quantized import check_weights, quantize_

        check_weights(weights)
        if roofline:
            raise ValueError("roofline reads every product's weight as fp32; it does not model weights storage")
    if compile != "off" and warmup < 1:
        raise ValueError("compile needs at least one warm-up run (compilation must not be timed)")
    say = log or (lambda s: None)
    notes: list[str] = []
    dev, tdtype, dname = _resolve(device, dtype, notes)
    for n in notes:
        say(n)

    _release_free_memory()
    rss0 = proc_memory_bytes("VmRSS")
    maxrss0 = _maxrss_bytes()
    mcfg, gen, tok = _build(preset, image_size, tokenizer, seed, dev, tdtype, model)
    if weights is not None:
        quantize_(gen, weights)
    if model is not None:
        from bitdance.models.presets import match_preset

        preset, image_size = f"{model} ({match_preset(mcfg) or 'custom'})", mcfg.image_size
    tok_name = tokenizer if (tokenizer and model is None) else None
    tok_name = tok_name or next((k for k, v in _tokenizer_presets().items() if v == mcfg.tokenizer), "custom")
    if compile != "off":
        gen.compile_sampling(mode=None if compile == "default" else compile, whole_flow=whole_flow)
        if dev.type == "cpu" and tdtype == torch.float32:
            notes.append(compiled_products_note())
    sampler = FlowSampler(num_steps=steps)
    labels = (torch.arange(batch) % mcfg.num_classes).to(dev)

    def generate():
        g = torch.Generator(device=dev).manual_seed(seed)
        return gen.generate(labels, sampler=sampler, guidance_scale=guidance_scale, generator=g), g

    def decode_fn(latents, g):
        return tok.decode(latents.to(tdtype), generator=g, chunk_size=DECODE_CHUNK)

    def one_run():
        latents, g = generate()
        return decode_fn(latents, g) if decode else latents

    with torch.inference_mode():
        for i in range(warmup):
            say(f"warm-up run {i + 1}/{warmup}")
            one_run()
        _sync(dev)

        # timed runs, with the memory high-water mark reset just before (CUDA: absolute; CPU: over the RSS
        # before the models were built)
        times = []
        with _PeakSince(dev, baseline=0 if dev.type == "cuda" else rss0) as timed_peak:
            for i in range(repeats):
                _sync(dev)
                t0 = time.perf_counter()
                one_run()
                _sync(dev)
                times.append(time.perf_counter() - t0)
                say(f"timed run {i + 1}/{repeats}: {times[-1]:.3f}s")
        if dev.type == "cuda":
            peak_mem, mem_method = timed_peak.bytes, "cuda max_memory_allocated (weights + activations)"
        elif timed_peak.bytes is not None:
            peak_mem = timed_peak.bytes
            mem_method = "cpu peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the models were built"
        else:
            peak_mem = int(_maxrss_bytes() - maxrss0)
            mem_method = "cpu getrusage ru_maxrss increase over the start of the bench (lifetime peak)"

        say("counting FLOPs (one more run under FlopCounterMode)" + (", logging its products" if roofline else ""))
        logs: list[ProductLog] = []

        def counted(fn):
            if not roofline:
                return count_flops(fn)
            flops, (log, out) = count_flops(lambda: record_products(fn, gen, tok))
            logs.append(log)
            return flops, out

        with gen.eager_sampling():  # count on the eager code: same ops, and the counter sees every one
            gen_flops, (latents, g) = counted(generate)
        dec_flops, decode_mem = 0, None
        if decode:  # the KV cache is gone by now: this peak is one decode chunk's activations (+ outputs)
            with _PeakSince(dev) as chunk_peak:
                dec_flops = counted(lambda: decode_fn(latents, g))[0]
            decode_mem = chunk_peak.bytes

        if profile is not None:
            say(f"profiling one more run into {profile}")
            _profile(one_run, dev, Path(profile))

        agreement = {}
        if compare_fp32:
            say("sampling the same seed in fp32 for the bf16 quality check")
            agreement = _compare_fp32(preset, image_size, tokenizer, seed, dev, latents, decode_fn(latents, g),
                                      labels, sampler, guidance_scale, decode, model)

    say("measuring the matmul peak")
    peak = measure_matmul_peak(dev, tdtype, size=peak_size)
    floor = None
    if roofline:
        say("reading every product's operands once, in the sampler's order (the read-bound floor)")
        floor = sum(read_floor(log, peak, dev) for log in logs)

    sec = sum(times) / len(times)
    weight_bytes = _module_bytes(gen, tok)
    kv = gen.kv_cache_bytes(batch * (2 if guidance_scale > 1.0 else 1))
    budget = None if (decode and decode_mem is None) else weight_bytes + kv + (decode_mem or 0)
    flops_per_image = (gen_flops + dec_flops) / batch
    ips = batch / sec
    achieved = flops_per_image * ips
    return BenchResult(
        preset=preset, tokenizer=tok_name, image_size=image_size, batch=batch, steps=steps, guidance_scale=guidance_scale, dtype=dname,
        device=str(dev), threads=torch.get_num_threads(), decode=decode, ar_steps=mcfg.num_steps,
        images_per_s=ips, seconds_per_image=sec / batch, flops_per_image=flops_per_image,
        generator_flops_per_image=gen_flops / batch, decode_flops_per_image=dec_flops / batch,
        achieved_flops=achieved, peak_flops=peak, mfu=achieved / peak, peak_memory_bytes=peak_mem,
        peak_memory_method=mem_method, weights_bytes=weight_bytes, kv_cache_bytes=kv, decode_chunk_bytes=decode_mem,
        memory_budget_bytes=budget, compile_mode=compile, whole_flow=whole_flow, weights=weights, run_seconds=times,
        notes=notes,
        read_floor_seconds_per_image=None if floor is None else floor / batch,
        mfu_ceiling=None if floor is None else (gen_flops + dec_flops) / floor / peak, **agreement)


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
DECODE_CHUNK = 16  # images per tokenizer decode call, as the pipeline's default decode_chunk_size


def compiled_products_note() -> str:
    """Which kernels run the fp32 products and the KV-cache attention of the compiled CPU sampler, in one line
    for the report."""
    from bitdance.compiling import ONEDNN_MIN_ROWS, few_row_products, kv_attention_kernel, wide_products
    from bitdance.kernels import KV_MAX_QUERIES, PANEL_ISA, PANEL_ISAS, PANEL_MAX_ROWS

    if wide_products() == "onednn":  # rows from ONEDNN_MIN_ROWS on take the graph of symbolic rows: oneDNN
        few, wide, rows = "inductor's C++ GEMM templates", "oneDNN", ONEDNN_MIN_ROWS
    else:
        few, wide, rows = "MKL's packed GEMM", "MKL's packed GEMM", PANEL_MAX_ROWS
    if few_row_products() == "panel":
        few = f"bitdance's panel kernel ({PANEL_ISAS[PANEL_ISA]['name']})"
    products = (f"{wide} at every row count" if few == wide else f"{few} below {rows} rows, {wide} from {rows} rows")
    attention = "bitdance's kernel" if kv_attention_kernel() else "torch's fused kernel"
    return (f"compiled fp32 products: {products}; KV-cache attention of up to {KV_MAX_QUERIES} queries per "
            f"sequence: {attention}")


def _profile(fn: Callable[[], Any], dev: torch.device, folder: Path) -> None:
    """Run ``fn`` under torch.profiler; write the op tables and a gzipped Chrome trace into ``folder``."""
    import gzip
    import shutil
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(dev)
    folder.mkdir(parents=True, exist_ok=True)
    ka = prof.key_averages()
    parts = []
    if dev.type == "cuda":
        parts += ["# ops by time on the GPU", ka.table(sort_by="self_cuda_time_total", row_limit=30)]
    parts += ["# ops by time on the host", ka.table(sort_by="self_cpu_time_total", row_limit=30)]
    (folder / "profile.txt").write_text("\n".join(parts) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(folder / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)


def _compare_fp32(preset, image_size, tokenizer, seed, dev, latents, images, labels, sampler, guidance_scale,
                  decode, model=None) -> dict:
    """Agreement of the benchmarked run with the fp32 model on the same seed: bits, whole tokens, image PSNR."""
    _, gen32, tok32 = _build(preset, image_size, tokenizer, seed, dev, torch.float32, model)
    g = torch.Generator(device=dev).manual_seed(seed)
    ref = gen32.generate(labels, sampler=sampler, guidance_scale=guidance_scale, generator=g)
    same = latents.float() == ref
    out = {"bf16_bit_agreement": same.float().mean().item(),
           "bf16_token_agreement": same.all(dim=1).float().mean().item()}  # a token = all d bits of a position
    if decode:
        ref_img = tok32.decode(ref, generator=g, chunk_size=DECODE_CHUNK)
        a = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
        b = ((ref_img.float().clamp(-1, 1) + 1) * 127.5).round()
        mse = ((a - b) ** 2).mean().item()
        out["bf16_image_psnr"] = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return out


def _tokenizer_presets():
    from bitdance.models.presets import TOKENIZER_PRESETS

    return TOKENIZER_PRESETS
