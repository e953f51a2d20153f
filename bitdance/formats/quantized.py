"""Quantized weights in files: what a safetensors file stores, the key names of shared fp8 copies, and
loading a model tensor by tensor so that a 14B model never exists in a wider precision in memory.

Layouts read (besides our own, ``<layer>.weight`` int8/fp8 + ``<layer>.weight_scale`` fp32 per output
channel):

* fp8 copies made for ComfyUI and similar tools: ``<layer>.weight`` in ``float8_e4m3fn`` (or ``float8_e5m2``)
  with the scale beside it as ``<layer>.weight_scale``, ``<layer>.scale_weight``, ``<layer>.weight.scale`` or
  ``<layer>.weight_scales``, one per tensor or one per output channel; the weight is ``q.float() * scale``.
  ``<layer>.input_scale`` (activation scales of fp8 *compute*, not needed for weight-only use) and
  ``*.comfy_quant`` (tool metadata) are skipped;
* fp8 copies made by a plain cast (no scale at all): the fp8 values are the weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from bitdance.formats.weights import CheckpointError, safetensors_header
from bitdance.models.quantized import WEIGHT_FORMATS, QuantizedLinear, channel_scales, quantize_weight

__all__ = ["SCALE_SUFFIXES", "SKIPPED_SUFFIXES", "stored_weights_format", "recorded_weights", "empty_params",
           "stream_load"]

SCALE_SUFFIXES = ("weight_scale", "scale_weight", "weight.scale", "weight_scales")
SKIPPED_SUFFIXES = ("input_scale", "comfy_quant")
# safetensors dtype names of one-byte weights, and torch's
_QUANTIZED_NAMES = {"I8": "int8", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}
_QUANTIZED = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def stored_weights_format(paths: Iterable[str | os.PathLike]) -> str | None:
    """``"int8"`` / ``"fp8"`` when these safetensors files hold quantized ``*.weight`` tensors (read from
    their headers, milliseconds), else None."""
    for p in paths:
        for key, (dtype, _) in safetensors_header(p).items():
            if key.endswith("weight") and dtype in _QUANTIZED_NAMES:
                return _QUANTIZED_NAMES[dtype]
    return None


def recorded_weights(value, where: str) -> str | None:
    """The weight storage a folder's config.json records (None: full precision), checked."""
    if value is not None and value not in WEIGHT_FORMATS:
        raise CheckpointError(f"{where} = {value!r}; one of {list(WEIGHT_FORMATS)}")
    return value


@contextlib.contextmanager
def empty_params() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation) and their
    buffers for real: a buffer such as RoPE's frequencies is computed in ``__init__`` and is not in any
    file."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _Files:
    """The tensors of several safetensors files under one key space (a sharded model), opened lazily."""

    def __init__(self, paths: Iterable[str | os.PathLike], prefix: str = ""):
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for p in map(Path, paths):
            for k in safetensors_header(p):
                if not k.startswith(prefix):
                    continue
                name = k[len(prefix):]
                if name in self.where:
                    raise CheckpointError(f"{p}: tensor {k} is also in {self.where[name]}")
                self.where[name] = p
        self.prefix = prefix

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.where[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(self.prefix + name)

    def scale_key(self, layer: str) -> str | None:
        found = [layer + "." + s for s in SCALE_SUFFIXES if layer + "." + s in self.where]
        if len(found) > 1:
            raise CheckpointError(f"{self.where[found[0]]}: {layer} has several weight scales {found}")
        return found[0] if found else None

    def scale(self, layer: str, out_features: int, what: str) -> torch.Tensor | None:
        """The layer's stored scale as one fp32 value per output channel (None where there is none)."""
        key = self.scale_key(layer)
        if key is None:
            return None
        try:
            return channel_scales(self.get(key), out_features)
        except ValueError as e:
            raise CheckpointError(f"{what}: {e}") from None


def _replace(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor


def _dequantized(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    w = q.to(torch.float32)
    return w if scale is None else w * scale.reshape(-1, *[1] * (w.dim() - 1))


def stream_load(module: nn.Module, paths: Iterable[str | os.PathLike], *, dtype: torch.dtype | None,
                prefix: str = "", what: str = "model", tied: Iterable[str] = ()) -> None:
    """Fill ``module`` (parameters on the meta device, see :func:`empty_params`; its quantized layers already
    :class:`QuantizedLinear` shells) from safetensors files, one tensor at a time: a quantized layer takes its
    stored int8 / fp8 weight and scale as they are, or quantizes a wider stored weight right after reading it;
    every other tensor is cast to ``dtype`` (None: as stored). Keys are checked both ways (missing,
    unexpected, shape) before anything is read. ``tied``: parameter names that share another's tensor and may
    be absent from the files (``lm_head.weight`` of a model with tied embeddings)."""
    files = _Files(paths, prefix)
    expected: dict[str, tuple[nn.Module, str, torch.Size]] = {}
    layers: dict[str, QuantizedLinear] = {}
    for mname, mod in module.named_modules():
        base = mname + "." if mname else ""
        if isinstance(mod, QuantizedLinear):
            layers[mname] = mod
            if mod.bias is not None:
                expected[base + "bias"] = (mod, "bias", mod.bias.shape)
            continue
        for n, t in list(mod._parameters.items()) + [(n, b) for n, b in mod._buffers.items()
                                                      if n not in mod._non_persistent_buffers_set]:
            if t is not None:
                expected[base + n] = (mod, n, t.shape)
    # A weight's scale may sit beside a quantized layer, or beside a layer stored quantized that stays wide here.
    owners = [*layers] + [n[: -len(".weight")] for n in expected if n.endswith(".weight")]
    accounted = {k for k in (files.scale_key(o) for o in owners) if k is not None} | {o + ".weight" for o in layers}
    stored = {k for k in files.where if k not in accounted and not k.endswith(SKIPPED_SUFFIXES)}
    missing = [layer + ".weight" for layer in layers if layer + ".weight" not in files.where]
    missing += [k for k in expected if k not in files.where and k not in tied]
    unexpected = sorted(stored - set(expected))
    if missing or unexpected:
        parts = ([f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)})"] if missing else []) + \
                ([f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)})"]
                 if unexpected else [])
        raise CheckpointError(f"{what}: weights do not fit: " + "; ".join(parts))
    seen: dict[torch.dtype, int] = {}
    for name, (mod, attr, shape) in expected.items():
        if name not in files.where:
            continue
        t = files.get(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{what}: {prefix + name} has shape {tuple(t.shape)}, the model {tuple(shape)}")
        if t.dtype in _QUANTIZED:  # a layer stored quantized that this model keeps wide
            layer = name[: -len(".weight")] if name.endswith(".weight") else name
            t = _dequantized(t, files.scale(layer, t.shape[0], f"{what}: {prefix + name}"))
        elif t.is_floating_point():
            seen[t.dtype] = seen.get(t.dtype, 0) + t.numel()
        _replace(mod, attr, t if dtype is None or not t.is_floating_point() else t.to(dtype))
    compute = dtype or (max(seen, key=seen.get) if seen else torch.float32)
    for layer, mod in layers.items():
        key = layer + ".weight"
        q = files.get(key)
        if tuple(q.shape) != (mod.out_features, mod.in_features):
            raise CheckpointError(f"{what}: {prefix + key} has shape {tuple(q.shape)}, the model "
                                  f"{(mod.out_features, mod.in_features)}")
        scale = files.scale(layer, mod.out_features, f"{what}: {prefix + key}")
        if q.dtype != mod.storage:  # stored wider (or in another one-byte format): quantized as it is read
            q, scale = quantize_weight(_dequantized(q, scale), mod.storage)
        mod._buffers["weight"] = q
        mod._buffers["weight_scale"] = scale
        mod._buffers["compute"] = torch.empty(0, dtype=compute)
        if mod.bias is not None and mod.bias.dtype != compute:
            mod.bias = nn.Parameter(mod.bias.to(compute), requires_grad=False)
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left and not set(left) <= set(tied):
        raise CheckpointError(f"{what}: {left[0]} was not filled from the files")
