"""Which floating-point precision to compute in, on this machine.

bf16 pays only where the hardware has bf16 units (``avx512_bf16`` / ``amx_bf16`` CPUs, Ampere+ GPUs):
there bf16 matmuls run several times faster than fp32. Everywhere else bf16 is emulated and far
*slower* than fp32 (measured: 0.4 GFLOP/s against 160 for fp32 on an AVX2 EPYC), so "auto" must never
pick it there.

``BITDANCE_DTYPE`` overrides the automatic choice for the whole process (training's
``precision="auto"``, ``bitdance bench``'s default, text-to-image folders loaded in their stored dtype):

* ``fp32``: compute in fp32 even on bf16 hardware (what CPUs without bf16 units do; the test suite
  passes under it, so one machine can check both kinds);
* ``bf16``: pick bf16 even where it is emulated (for numerics checks only: it is slow);
* unset, empty or ``auto``: the hardware decides.

An explicit request (``--precision bf16``, ``--dtype bf16``) is still honoured, with a warning where
the hardware has no bf16 units.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

__all__ = ["DTYPE_ENV", "PrecisionError", "forced_dtype", "bf16_supported", "auto_dtype", "auto_precision",
           "cpu_bf16_reason", "cpu_description", "cpu_flags", "cpu_vendor", "mkl_forcing_gap", "separate_compile_cache"]

DTYPE_ENV = "BITDANCE_DTYPE"
_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "auto": None, "": None}


class PrecisionError(ValueError):
    """A precision setting that names no known dtype."""


def forced_dtype() -> str | None:
    """``"fp32"`` / ``"bf16"`` when ``$BITDANCE_DTYPE`` forces one, else None."""
    raw = os.environ.get(DTYPE_ENV, "").strip().lower()
    if raw not in _NAMES:
        raise PrecisionError(f"{DTYPE_ENV}={os.environ[DTYPE_ENV]!r}: use fp32, bf16 or auto")
    return _NAMES[raw]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (``avx2``, ``avx512_bf16``...), empty where unknown."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo names it (``GenuineIntel``, ``AuthenticAMD``), or "" where unknown."""
    return _cpuinfo().get("vendor_id", "")


def mkl_forcing_gap() -> str | None:
    """Where torch is forced down to its AVX2 kernels on an Intel CPU with AVX-512 but MKL is not: one phrase
    saying so, else None. ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` do not reach MKL, which picks its
    own code path from the CPU at its first call; on Intel CPUs that is AVX-512 unless
    ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (measured on a 2-core Xeon: fp32 matmul peak 393 GFLOP/s against 233). On
    AMD CPUs MKL runs its AVX2 code anyway."""
    if torch.backends.cpu.get_cpu_capability().upper() != "AVX2":
        return None
    if cpu_vendor() != "GenuineIntel" or "avx512f" not in cpu_flags():
        return None
    if os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper() in ("AVX2", "AVX", "SSE4_2"):
        return None
    return "MKL still runs its AVX-512 code: set MKL_ENABLE_INSTRUCTIONS=AVX2 as well"


def cpu_bf16_reason() -> str | None:
    """None when the CPU computes bf16 natively in this process, else why not (one phrase)."""
    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return "no avx512_bf16/amx_bf16 in /proc/cpuinfo"
    # The units may be there but switched off for this process: ATEN_CPU_CAPABILITY=avx2 and
    # ONEDNN_MAX_CPU_ISA=AVX2 make torch emulate bf16 with AVX2 code, which is very slow.
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if not cap.startswith("AVX512"):
        return f"torch runs its {cap} kernels (ATEN_CPU_CAPABILITY)"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa != "ALL" and not ("AVX512" in isa or "AMX" in isa):
        return f"oneDNN is limited to {isa} (ONEDNN_MAX_CPU_ISA)"
    return None


def bf16_supported(device: torch.device | str) -> bool:
    """True where bf16 matmuls run natively (fast) on ``device`` in this process."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_reason() is None
    return False


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """The compute dtype "auto" means on ``device``: ``$BITDANCE_DTYPE`` if set, else bf16 where native."""
    forced = forced_dtype()
    if forced is not None:
        return torch.bfloat16 if forced == "bf16" else torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def auto_precision(device: torch.device | str) -> str:
    """:func:`auto_dtype` as the name the CLI and reports use: ``"bf16"`` or ``"fp32"``."""
    return "bf16" if auto_dtype(device) == torch.bfloat16 else "fp32"


def cpu_description() -> dict:
    """The CPU this process runs on, for reports: model name, vendor, torch's kernel level, bf16 units (and
    why not), and whether MKL escaped an AVX2 forcing (:func:`mkl_forcing_gap`)."""
    import platform

    reason = cpu_bf16_reason()
    gap = mkl_forcing_gap()
    return {"model": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
            "vendor": cpu_vendor(), "capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_units": reason is None, **({"no_bf16_because": reason} if reason else {}),
            **({"mkl_not_forced": gap} if gap else {})}


def separate_compile_cache() -> str | None:
    """Keep inductor's compiled CPU kernels of different instruction sets apart; returns the folder chosen.

    Inductor's on-disk cache does not tell kernels built under ``ATEN_CPU_CAPABILITY=avx2`` /
    ``ONEDNN_MAX_CPU_ISA`` from those built with the CPU's full instruction set, and loading the one in
    the other process aborted the interpreter (torch 2.13, the compiled sampler step, both orders tried
    on an AVX-512 CPU). So unless ``TORCHINDUCTOR_CACHE_DIR`` is set, each (capability, oneDNN limit)
    gets its own folder below inductor's default one. Inductor writes its default folder into that
    variable the first time it looks (any earlier compilation in the process, e.g. by another library),
    so that value counts as unset.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return None

    tag = torch.backends.cpu.get_cpu_capability().lower().replace(" ", "_")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower()
    if isa and isa != "all":
        tag += f"-onednn_{isa}"
    folder = os.path.join(default_cache_dir(), f"bitdance-{tag}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder
