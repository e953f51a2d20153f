"""``bitdance bench --memory``: what loading and generating take in memory, per weight storage.

Each option runs in a fresh process (peaks of one option must not hide in another's), which reports
the peak resident memory (``VmHWM``, reset between phases through ``/proc/self/clear_refs``) of

* ``load``: building / reading the model with that storage;
* ``step``: the prompt's prefill and the first AR steps of one image (with guidance: 2 sequences);
* ``decode``: decoding one image with the binary tokenizer;

and the seconds per AR step, from which the time of a whole image is projected. On a GPU the device's peaks
(``torch.cuda.max_memory_allocated``) are reported too, and an option ``int8+offload`` (any storage
``+offload``) runs with sequential offload (:mod:`bitdance.offload`).

``--random-weights`` builds a model of a released name's shapes (:data:`bitdance.models.presets.T2I_SHAPES`)
tensor by tensor with random values, each quantized as soon as it is drawn, so a 14B model is measured without
its download and without ever holding it in a wider precision. Options whose weights alone do not fit in this
machine's memory are reported with their computed size and not run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from bitdance.apps.bench import proc_memory_bytes, reset_peak_memory

__all__ = ["MEMORY_OPTIONS", "peak_gib", "build_random_t2i", "weight_bytes", "measure", "parse_option",
           "run_memory_bench"]

MEMORY_OPTIONS = ("bf16", "int8", "fp8")
PROMPT = "a red fox sitting in a snowy forest at dawn, soft light, detailed fur, photograph"


def peak_gib() -> float | None:
    """Peak resident memory of this process since the last :func:`~bitdance.apps.bench.reset_peak_memory` (GiB;
    None off Linux)."""
    peak = proc_memory_bytes("VmHWM")
    return None if peak is None else peak / 2**30


def _byte_tokenizer(parallel_num: int, max_res_tokens: int = 256):
    """A byte-level text tokenizer with the BitDance special tokens (the prompt's length in tokens is its length
    in bytes: an upper bound of the Qwen tokenizer's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from bitdance.models.t2i import add_special_tokens

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>")
    add_special_tokens(fast, parallel_num, max_res_tokens)
    return fast


def _fill_random_(module: nn.Module, dtype: torch.dtype, gen: torch.Generator, std: float = 0.02) -> None:
    """Give every meta parameter / quantized shell of ``module`` random values, one tensor at a time."""
    from bitdance.models.quantized import QuantizedLinear, quantize_weight

    for mod in module.modules():
        if isinstance(mod, QuantizedLinear):
            if mod.weight.device.type == "meta":
                rows = max(1, (1 << 24) // mod.in_features)  # draw 16M values at a time in fp32
                qs, ss = [], []
                for r in range(0, mod.out_features, rows):
                    n = min(rows, mod.out_features - r)
                    w = torch.randn(n, mod.in_features, generator=gen) * std
                    q, s = quantize_weight(w, mod.storage)
                    qs.append(q)
                    ss.append(s)
                mod._buffers["weight"] = torch.cat(qs)
                mod._buffers["weight_scale"] = torch.cat(ss) if ss[0] is not None else None
                mod._buffers["compute"] = torch.empty(0, dtype=dtype)
                if mod.bias is not None:
                    mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=dtype), requires_grad=False)
            continue
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                t = torch.empty(p.shape, dtype=dtype)
                if name in ("weight",) and p.dim() == 1:
                    t.fill_(1.0)  # norms
                elif p.dim() == 1:
                    t.zero_()
                else:
                    t.normal_(0.0, std, generator=gen)
                mod._parameters[name] = nn.Parameter(t, requires_grad=False)


def _t2i_shell(name: str, weights: str | None):
    """A :class:`~bitdance.models.t2i.BitDanceT2I` of the shapes of released ``name``: parameters on the meta
    device, linear layers ``weights`` shells (:func:`~bitdance.models.quantized.quantize_`'s choice of layers)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bitdance.formats.quantized import empty_params
    from bitdance.models.config import T2IConfig
    from bitdance.models.presets import T2I_SHAPES, tokenizer_preset
    from bitdance.models.quantized import quantize_
    from bitdance.models.t2i import BitDanceT2I
    from bitdance.models.tokenizer import BinaryTokenizer

    if name not in T2I_SHAPES:
        raise ValueError(f"no text-to-image shapes for {name!r}; known: {', '.join(T2I_SHAPES)}")
    spec = T2I_SHAPES[name]
    config = T2IConfig(parallel_num=spec["parallel_num"])
    with empty_params():
        llm = Qwen3ForCausalLM(Qwen3Config(**spec["llm"]))
        ae = BinaryTokenizer(tokenizer_preset(spec["tokenizer"]))
        model = BitDanceT2I(llm, _byte_tokenizer(config.parallel_num), config, ae=ae)
    if weights is not None:
        for part in (model.llm, model.vision_head, model.projector):
            quantize_(part, weights)
    return model


def build_random_t2i(name: str, *, weights: str | None, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A :class:`~bitdance.models.t2i.BitDanceT2I` of the shapes of released ``name`` with random weights,
    built without memory and filled tensor by tensor (each quantized right after it is drawn)."""
    model = _t2i_shell(name, weights)
    gen = torch.Generator().manual_seed(seed)
    for part in (model.llm, model.vision_head, model.projector):
        _fill_random_(part, dtype, gen)
    _fill_random_(model.ae, dtype, gen, std=0.01)
    return model.eval()


def weight_bytes(name: str, weights: str | None) -> int:
    """Bytes of the weights of released ``name``'s shapes with ``weights`` storage and everything else in bf16,
    counted on the shell :func:`build_random_t2i` fills."""
    from bitdance.models.quantized import QuantizedLinear

    model = _t2i_shell(name, weights)
    total = sum(p.numel() * 2 for p in model.parameters())
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in (m.weight, m.weight_scale) if t is not None)
    return total


def measure(name: str, *, weights: str | None, random_weights: bool, height: int, width: int, steps: int,
            ar_steps: int, guidance_scale: float, dtype: torch.dtype, decode: bool, seed: int = 0,
            device: str = "cpu", offload: bool = False, **load_kwargs) -> dict[str, Any]:
    """One option, in this process: load (or build), then ``ar_steps`` AR steps of one image, then a decode.
    On a GPU (``device``) the device's peaks are reported too, and ``offload`` runs with sequential offload."""
    with torch.no_grad():
        return _measure(name, weights=weights, random_weights=random_weights, height=height, width=width,
                        steps=steps, ar_steps=ar_steps, guidance_scale=guidance_scale, dtype=dtype, decode=decode,
                        seed=seed, device=torch.device(device), offload=offload, **load_kwargs)


class _Peaks:
    """Host (and, on a GPU, device) peak memory of one phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        reset_peak_memory()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self, out: dict[str, Any], phase: str) -> None:
        out[f"{phase}_peak_gib"] = peak_gib()
        if self.cuda:
            torch.cuda.synchronize()
            out[f"device_{phase}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def _measure(name, *, weights, random_weights, height, width, steps, ar_steps, guidance_scale, dtype, decode, seed,
             device, offload, **load_kwargs) -> dict[str, Any]:
    from bitdance.offload import enable_sequential_offload
    from bitdance.sampling.flow import FlowSampler

    peaks = _Peaks(device)
    peaks.reset()
    t = time.perf_counter()
    if random_weights:
        model = build_random_t2i(name, weights=weights, dtype=dtype, seed=seed)
        if offload:
            enable_sequential_offload(model, device)
        else:
            model.to(device)
    else:
        from bitdance.pipelines import BitDancePipeline

        model = BitDancePipeline.from_pretrained(name, dtype=dtype, weights=weights, device=device,
                                                 offload=("sequential",) if offload else (), **load_kwargs).model
    load_s = time.perf_counter() - t
    out: dict[str, Any] = {"weights": weights or "as stored", "offload": offload, "device": str(device),
                           "load_s": load_s}
    peaks.read(out, "load")
    out["model_gib"] = sum(x.numel() * x.element_size() for x in
                           {id(x): x for x in list(model.parameters()) + list(model.buffers())}.values()) / 2**30
    h, w = model.config.check_resolution(height, width)
    total = (h * w) // model.config.parallel_num
    times: list[float] = []

    class _Enough(Exception):
        pass

    def callback(step, num_steps, latents):
        times.append(time.perf_counter())
        if len(times) >= ar_steps:
            raise _Enough

    peaks.reset()
    t0 = time.perf_counter()
    try:
        model.generate([PROMPT], height=height, width=width, sampler=FlowSampler(num_steps=steps),
                       guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), callback=callback)
    except _Enough:
        pass
    peaks.read(out, "step")
    out["first_step_s"] = times[0] - t0  # prefill + the first AR step
    gaps = [b - a for a, b in zip(times, times[1:])]
    out["ar_step_s"] = sum(gaps) / len(gaps) if gaps else out["first_step_s"]
    out["ar_steps_per_image"] = total
    out["measured_ar_steps"] = len(times)
    if decode:
        peaks.reset()
        t = time.perf_counter()
        lat = torch.randint(0, 2, (1, model.config.latent_dim, h, w), device=device).float() * 2 - 1
        model.decode(lat)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["decode_s"] = time.perf_counter() - t
        peaks.read(out, "decode")
    out["projected_image_s"] = out["first_step_s"] + (total - 1) * out["ar_step_s"] + out.get("decode_s", 0.0)
    return out


def parse_option(option: str) -> tuple[str | None, bool]:
    """``"int8"`` -> ("int8", False); ``"int8+offload"`` -> ("int8", True); ``"stored"`` -> (None, False)."""
    base, plus, rest = option.partition("+")
    if base not in ("stored", *MEMORY_OPTIONS) or (plus and rest != "offload"):
        raise ValueError(f"memory option {option!r}: one of {', '.join(('stored', *MEMORY_OPTIONS))}, optionally "
                         "followed by +offload (sequential offload, for a GPU)")
    return (None if base == "stored" else base), bool(plus)


def run_memory_bench(name: str, *, options: list[str], random_weights: bool, height: int, width: int, steps: int,
                     ar_steps: int, guidance_scale: float, dtype: str, decode: bool, device: str = "cpu",
                     timeout_s: float = 3600) -> list[dict[str, Any]]:
    """Each option in a child process (``python -m bitdance.apps.bench_memory``); rows of results."""
    total = proc_memory_bytes("MemTotal", "/proc/meminfo")
    total = None if total is None else total / 2**30
    parsed = [parse_option(o) for o in options]  # every bad option before the first slow run
    rows = []
    for opt, (weights, offload) in zip(options, parsed):
        row: dict[str, Any] = {"option": opt}
        if random_weights:
            need = weight_bytes(name, weights) / 2**30
            row["weights_gib_computed"] = need
            if total is not None and need > 0.9 * total:
                row["skipped"] = f"its weights alone need {need:.1f} GiB; this machine has {total:.1f} GiB"
                rows.append(row)
                continue
        cmd = [sys.executable, "-m", "bitdance.apps.bench_memory", json.dumps(
            dict(name=name, weights=weights, random_weights=random_weights, height=height, width=width, steps=steps,
                 ar_steps=ar_steps, guidance_scale=guidance_scale, dtype=dtype, decode=decode, device=device,
                 offload=offload))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            row["error"] = (err[-1] if err else f"exit status {proc.returncode}")[:300]
        else:
            row.update(json.loads(lines[-1]))
        rows.append(row)
    return rows


def _main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec.pop("dtype")]
    result = measure(**spec, dtype=dtype)
    print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}))


if __name__ == "__main__":
    _main(sys.argv[1:])
