"""What smaller weights cost: the same samples (same seed, same conditions) from a model loaded with each
weight storage, compared with the bf16-stored model.

Bits are compared as generated (before decoding): ``bit_agreement`` is the share of equal bits,
``token_agreement`` the share of tokens whose d bits are all equal. Generation is autoregressive, so one
flipped bit early changes what follows: the figures measure drift of whole samples, not per-layer error.
``psnr_db`` compares the decoded images (in [-1, 1], peak-to-peak 2) with the reference's (None: identical). All loads compute
in the same dtype, so the figures isolate the storage of the weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from bitdance.models.quantized import WEIGHT_FORMATS, check_weights

__all__ = ["compare_weights", "agreement"]


def agreement(latents: torch.Tensor, reference: torch.Tensor, images: torch.Tensor,
              ref_images: torch.Tensor) -> dict[str, float]:
    """Bit / token agreement of (B, d, h, w) latents and PSNR (dB) of images in [-1, 1]."""
    same = latents == reference
    mse = ((images.clamp(-1, 1) - ref_images.clamp(-1, 1)).float() ** 2).mean().item()
    return {"bit_agreement": same.float().mean().item(),
            "token_agreement": same.all(dim=1).float().mean().item(),
            "psnr_db": None if mse == 0 else 10 * math.log10(4.0 / mse)}


def _bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def compare_weights(source: str | os.PathLike, *, formats: Sequence[str] = ("int8", "fp8"),
                    conditions: Sequence[Any] | None = None, seed: int = 0, num_inference_steps: int = 25,
                    guidance_scale: float = 3.0, dtype: torch.dtype = torch.float32, height: int | None = None,
                    width: int | None = None, device: str = "cpu", classifier: str | None = None,
                    **load_kwargs) -> dict[str, Any]:
    """Generate with the bf16-stored model and with each of ``formats``; return the agreement figures.

    ``conditions``: class labels (class-conditional; default the first 10 classes) or prompts (text-to-image;
    required). ``classifier`` (``"mnist"`` / ``"fashion-mnist"``, class-conditional models): also the share of each
    load's samples that the shipped classifier assigns to the class asked for. ``load_kwargs`` go to
    ``from_pretrained`` (hub options, T2I config overrides)."""
    from bitdance.pipelines import BitDancePipeline

    for f in formats:
        check_weights(f)
    formats = [f for f in formats if f != "bf16"]

    def load(weights):
        return BitDancePipeline.from_pretrained(source, dtype=dtype, device=device, weights=weights, **load_kwargs)

    def run(pipe):
        kw: dict[str, Any] = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                  generator=torch.Generator(device).manual_seed(seed), output_type="pt")
        if pipe.kind == "text_to_image":
            if not conditions:
                raise ValueError("a text-to-image model needs prompts to compare on")
            if height is not None:
                kw.update(height=height, width=width if width is not None else height)
            out = pipe(list(conditions), **kw)
        else:
            out = pipe(list(conditions) if conditions else list(range(min(10, pipe.config.num_classes))), **kw)
        return out.latents, out.images

    reports: dict[str, Any] = {}
    ref_pipe = load("bf16")
    kind = ref_pipe.kind
    labels = None
    if classifier is not None:
        from bitdance.evaluation.metrics import class_accuracy

        if kind != "class_conditional":
            raise ValueError("classifier= measures class-conditional samples; this is a text-to-image model")
        labels = list(conditions) if conditions else list(range(min(10, ref_pipe.config.num_classes)))

    def accuracy(images):
        return {} if labels is None else {"class_accuracy": class_accuracy(images, labels, dataset=classifier)}

    t = time.perf_counter()
    ref_lat, ref_img = run(ref_pipe)
    reports["bf16"] = {"bytes": _bytes(ref_pipe.model), "seconds": time.perf_counter() - t, **accuracy(ref_img)}
    del ref_pipe
    full = load(None)
    t = time.perf_counter()
    lat, img = run(full)
    reports["full"] = {"bytes": _bytes(full.model), "seconds": time.perf_counter() - t,
                       **agreement(lat, ref_lat, img, ref_img), **accuracy(img)}
    del full
    for f in formats:
        pipe = load(f)
        t = time.perf_counter()
        lat, img = run(pipe)
        reports[f] = {"bytes": _bytes(pipe.model), "seconds": time.perf_counter() - t,
                      **agreement(lat, ref_lat, img, ref_img), **accuracy(img)}
        del pipe
    return {"source": os.fspath(source), "kind": kind, "reference": "bf16", "seed": seed,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
            "compute_dtype": str(dtype).removeprefix("torch."), "samples": int(ref_lat.shape[0]),
            "classifier": classifier, "formats": reports, "weight_formats": list(WEIGHT_FORMATS)}
