"""Smaller weights: linear layers whose weight is stored in int8, fp8 or bf16 and computed in the model's dtype.

========  ==============  ====================================================================
storage   bytes / weight  weight as computed
========  ==============  ====================================================================
``int8``  1               ``q * s[o]``, ``q = round(w / s[o])`` in [-127, 127], ``s[o] = max|w[o, :]| / 127``
``fp8``   1               ``q * s[o]``, ``q = float8_e4m3fn(w / s[o])``, ``s[o] = max|w[o, :]| / 448``
``bf16``  2               ``bf16(w)``
========  ==============  ====================================================================

The scale is per output channel (fp32); files that carry one scale per tensor, or none (fp8 copies made by a
plain cast), load too. A layer computes ``linear(x, q.to(x.dtype)) * s + bias``: scaling the *output* by the
per-channel scale is the same product as scaling the weight rows, and it costs one multiply per output
instead of one per weight. With bf16 activations and int8 weights this is exactly the pattern inductor's
CPU backend turns into its fused weight-only-int8 kernel.

Compiled sampling on CPUs (``pipe.compile()``) freezes the weights into the graph. Where bitdance's panel kernel
runs the products of fewer than 256 rows (:func:`bitdance.compiling.few_row_products`: by default on Intel CPUs
running AVX2 or AVX-512 kernels), an fp32-computed layer with int8 or bf16 weights reaches it as one op
(:data:`bitdance.compiling.weight_only_linear`), and in its products of fewer than 16 rows
(:data:`bitdance.kernels.STORED_MAX_ROWS`: 1x sampling at small batches) the graph keeps the weight as stored,
packed for the kernel, which widens each weight in registers as it reads it: 1 or 2 bytes a weight come from
memory instead of 4, and those memory-bound products run faster (B-1x 2.2-2.9x with int8; docs/benchmarks.md).
Everywhere else (16 rows and more, fp8 weights, other CPUs, bf16 computing) the graph holds a copy widened to the
compute dtype: it runs at the unquantized speed and holds widened weights, so there compile full-precision
models, or keep quantized ones eager, where memory is short.

Only the weights shrink; activations, norms and embeddings stay in the compute dtype. Linear layers with
fewer than ``min_features`` (64) inputs stay as they are: they are the ones that read the d bits of a token
(``d x width`` weights, a rounding error of them reaches every later layer, and they weigh next to nothing).

Why not a library: ``torchao`` 0.18 quantizes int8 on torch 2.13's CPU build, but its weights are tensor
subclasses that safetensors cannot store, it has no reader for the fp8-with-scales copies that users share,
and a 14B model must be quantized tensor by tensor while it is read (:mod:`bitdance.formats.quantized`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bitdance.compiling import weight_only_linear

__all__ = ["WEIGHT_FORMATS", "STORAGE_DTYPES", "QuantizedLinear", "quantize_", "quantize_weight", "channel_scales",
           "linear_dtype", "weights_format", "check_weights"]

WEIGHT_FORMATS = ("bf16", "int8", "fp8")
STORAGE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def check_weights(weights: str | None) -> str | None:
    """``weights`` as given when it names a storage format (or is None), else a one-line ValueError."""
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_FORMATS)} (or leave it unset for "
                         "the stored precision)")
    return weights


def quantize_weight(w: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(q, per-output-channel scale) of a (out, in) weight; scale None for bf16 storage."""
    if storage == torch.bfloat16:
        return w.to(torch.bfloat16), None
    if storage not in _QMAX:
        raise ValueError(f"no quantizer for {storage}")
    w32 = w.to(torch.float32)
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / _QMAX[storage], torch.ones_like(amax))  # an all-zero row stays zero
    r = w32 / scale[:, None]
    q = r.round_().clamp_(-127, 127).to(torch.int8) if storage == torch.int8 else r.to(storage)
    return q, scale


def channel_scales(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """One fp32 scale per output channel, from one per tensor or one per channel in any shape ((out,), (out, 1));
    ValueError for any other count."""
    if scale.numel() not in (1, out_features):
        raise ValueError(f"a weight scale of shape {tuple(scale.shape)} for {out_features} output channels "
                         "(expected one per tensor or one per channel)")
    return scale.reshape(-1).to(torch.float32).expand(out_features).contiguous()


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with its weight stored in int8 / fp8 (+ fp32 per-output-channel ``weight_scale``) or bf16.

    State-dict keys: ``weight`` (the stored tensor), ``weight_scale`` (absent for bf16 and scale-less fp8),
    ``bias``. ``.to(dtype)`` changes the compute dtype (bias and activations) and never the stored weight.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 storage: torch.dtype = torch.int8, scaled: bool = True, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if storage not in (torch.bfloat16, *_QMAX):
            raise ValueError(f"QuantizedLinear: unsupported storage {storage}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=storage, device=device))
        scaled = scaled and storage != torch.bfloat16
        self.register_buffer("weight_scale", torch.ones(out_features, device=device) if scaled else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        # An empty tensor that follows .to(dtype / device): the compute dtype even without a bias.
        self.register_buffer("compute", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, storage: torch.dtype) -> "QuantizedLinear":
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, storage=storage,
                  dtype=w.dtype, device=w.device)
        if w.device.type == "meta":
            return out
        q, scale = quantize_weight(w.detach(), storage)
        out.weight = q
        if scale is not None:
            out.weight_scale = scale
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.compute.dtype

    @property
    def storage(self) -> torch.dtype:
        return self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.weight, self.weight_scale
        if (w.dtype == torch.int8 and scale is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and x.numel() // x.shape[-1] <= _PACKED_ROWS and not torch.compiler.is_compiling()):
            # Few rows: torch's int8 x bf16 kernel reads the int8 weight directly (2x a bf16 product's speed).
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w, scale.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            # compiled: one op, which the frozen CPU graphs run on the stored weight (bitdance.compiling)
            y = weight_only_linear(x, w) if torch.compiler.is_compiling() else F.linear(x, _widened(w, x.dtype))
            if scale is not None:
                y = y * scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight as computed, (out, in) in fp32."""
        w = self.weight.to(torch.float32)
        return w if self.weight_scale is None else w * self.weight_scale.to(torch.float32)[:, None]

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) casts every floating tensor: it would turn fp8 weights and their fp32 scales
        # into the compute dtype. Move them to the new device only, and let the rest follow fn.
        kept = {n: self._buffers[n] for n in ("weight", "weight_scale") if self._buffers.get(n) is not None}
        for n in kept:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.compute.device
            for n, t in kept.items():
                self._buffers[n] = t if t.device == device else t.to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # One scale per tensor, or (out, 1) columns, are the same thing spread over the output channels.
        key = prefix + "weight_scale"
        s = state_dict.get(key)
        if s is not None and self.weight_scale is not None and s.numel() in (1, self.out_features):
            state_dict[key] = channel_scales(s, self.out_features)
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != self.weight.dtype:
            error_msgs.append(f"{prefix}weight: stored as {w.dtype}, this layer holds {self.weight.dtype}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        scale = "per-channel scale" if self.weight_scale is not None else "no scale"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"storage={str(self.storage).removeprefix('torch.')} ({scale}), "
                f"dtype={str(self.dtype).removeprefix('torch.')}")


_PACKED_ROWS = 32
_workspaces: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _widened(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)``, written into one reused buffer per (dtype, device) when nothing keeps it: a fresh
    tensor of a large layer's size costs more in page faults than the conversion itself (measured: 67 ms
    against 7-9 ms for a 17408 x 5120 int8 weight into bf16 on a 2-core EPYC). Products consume the buffer
    before the next layer writes it (in stream order on a GPU); autograd and compiled graphs get a tensor of
    their own. The buffer is a normal tensor even when made under ``torch.inference_mode``: an inference tensor
    could not be written again outside it (sampling under ``no_grad`` after a benchmark in the same process)."""
    if w.dtype == dtype:
        return w
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return w.to(dtype)
    key = (dtype, w.device)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < w.numel():
        with torch.inference_mode(False):
            buf = _workspaces[key] = torch.empty(w.numel(), dtype=dtype, device=w.device)
    return buf[: w.numel()].view(w.shape).copy_(w)


def _linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[nn.Module, str, str, nn.Linear]]:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            yield module, name, prefix + name, child
        else:
            yield from _linears(child, prefix + name + ".")


def quantize_(module: nn.Module, weights: str, *, min_features: int = 64,
              skip: tuple[str, ...] = ()) -> int:
    """Replace the ``nn.Linear`` layers of ``module`` in place by :class:`QuantizedLinear` of storage
    ``weights`` (``"int8"``, ``"fp8"``, ``"bf16"``); returns how many. Layers with fewer than ``min_features``
    inputs, and those whose qualified name starts with one of ``skip``, stay. Layers on the meta device become
    empty shells of the right storage (for loading quantized files into)."""
    storage = STORAGE_DTYPES[check_weights(weights)]
    n = 0
    for parent, name, qualified, lin in list(_linears(module)):
        if lin.in_features < min_features or any(qualified.startswith(s) for s in skip):
            continue
        setattr(parent, name, QuantizedLinear.from_linear(lin, storage))
        n += 1
    return n


def weights_format(module: nn.Module) -> str | None:
    """``"int8"`` / ``"fp8"`` / ``"bf16"`` when ``module`` holds quantized layers (the first one's storage), else
    None."""
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            if m.storage == torch.int8:
                return "int8"
            return "bf16" if m.storage == torch.bfloat16 else "fp8"
    return None


def linear_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in (its weight's for ``nn.Linear``), quantized or not."""
    return layer.dtype if isinstance(layer, QuantizedLinear) else layer.weight.dtype
