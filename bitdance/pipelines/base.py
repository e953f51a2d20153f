"""diffusers-style pipelines: ``from_pretrained`` -> ``__call__(..., generator=...)`` -> ``save_pretrained``.

This module holds what both pipelines share (:class:`Pipeline`, :class:`PipelineOutput`); the two thin
subclasses are :mod:`bitdance.pipelines.class_conditional` and :mod:`bitdance.pipelines.text_to_image`.

Our own folder format::

    model_dir/
      config.json              {"format": "bitdance", "kind": "class_conditional", "generator": {...},
                                "tokenizer": {...}}
      generator.safetensors
      tokenizer.safetensors

``from_pretrained`` also accepts an official ImageNet checkpoint (``BitDance_B_16x.pt``, whose
``vae.*`` keys hold the tokenizer) and, optionally, a separate tokenizer file (``ae_d16c32.pt`` or
``.safetensors``).

Text-to-image models (:class:`BitDanceT2IPipeline`) use the released folder layout of
:mod:`bitdance.formats.t2i_folder`; ``BitDancePipeline.from_pretrained`` dispatches to it for such folders. Both kinds
share :class:`PipelineOutput`, the output types and ``callback(step, num_steps, partial_latents)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypedDict

import torch

from bitdance import validation
from bitdance.images import to_uint8
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.sampling.flow import FlowSampler

__all__ = ["Pipeline", "PipelineOutput", "OUTPUT_TYPES", "SamplingOptions", "SAMPLING_DEFAULTS"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# T2IConfig fields that vision_head_config.json does not hold; save_pretrained keeps them in config.json
# under "bitdance" (Hugging Face configs carry unknown keys along) so a saved model reloads as it was.
_T2I_EXTRA_FIELDS = ("down_factor", "max_res_tokens", "resolutions", "allow_any_resolution")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) uint8 numpy array, or (B, 3, H, W) tensor in [-1, 1]
    latents: torch.Tensor  # (B, d, h, w) binary tokens



def _check_latents(latents: Any, bits: int) -> torch.Tensor:
    if not torch.is_tensor(latents) or latents.dim() != 4 or latents.shape[1] != bits:
        shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"latents must be a (B, {bits}, h, w) tensor, got {shape}")
    return latents


def _format_images(images: torch.Tensor, latents: torch.Tensor, output_type: str) -> PipelineOutput:
    """Decoded (B, 3, H, W) images in [-1, 1] -> the requested output type."""
    if output_type == "pt":
        return PipelineOutput(images=images.clamp(-1, 1), latents=latents)
    arr = to_uint8(images).numpy()
    if output_type == "np":
        return PipelineOutput(images=arr, latents=latents)
    from PIL import Image

    return PipelineOutput(images=[Image.fromarray(a) for a in arr], latents=latents)


class SamplingOptions(TypedDict, total=False):
    """The keyword options of every pipeline call besides the condition, steps and guidance (defaults in
    :data:`SAMPLING_DEFAULTS`).

    ``sampler``: ``"euler_maruyama"`` (the official head sampler), ``"euler"`` (deterministic) or a
    :class:`~bitdance.sampling.flow.FlowSampler`; ``time_shift``: the flow's time shift (None: the model's);
    ``generator``: the ``torch.Generator`` of every random draw; ``output_type``: ``"pil"``, ``"np"``, ``"pt"``
    or ``"latent"``; ``callback(step, num_steps, partial_latents)``: after each AR step
    (``pipe.decode(partial_latents)`` shows the image so far); ``use_kv_cache``: False recomputes the whole
    sequence each step (slow, for checks); ``decode_chunk_size``: images per tokenizer decode.
    """

    sampler: str | FlowSampler
    time_shift: float | None
    generator: torch.Generator | None
    output_type: str
    callback: Callable[[int, int, torch.Tensor], None] | None
    use_kv_cache: bool
    decode_chunk_size: int


SAMPLING_DEFAULTS: dict[str, Any] = {"sampler": "euler_maruyama", "time_shift": None, "generator": None,
                                     "output_type": "pil", "callback": None, "use_kv_cache": True,
                                     "decode_chunk_size": 16}


class Pipeline:
    """What both pipelines share: argument checks, the flow sampler, decoding and the output formats.

    ``__call__(condition, *, num_inference_steps, guidance_scale, ..., **options)`` takes the
    :class:`SamplingOptions` as ``options``. A subclass names its ``kind``, its ``image_tokenizer`` (the binary autoencoder that decodes latents) and
    its ``config`` (whose ``time_shift`` is the flow sampler's default), checks its own inputs and generates;
    :meth:`_sampler` builds the flow sampler and :meth:`_finish` decodes and formats the output.
    """

    kind = ""

    def __init__(self, *, meta: dict | None = None):
        self.meta = dict(meta or {})

    def _options(self, options: dict[str, Any], guidance_scale: Any) -> dict[str, Any]:
        """The call's :class:`SamplingOptions` with their defaults, checked before any work (see
        :mod:`bitdance.validation`); an unknown name is a TypeError, as for any keyword argument."""
        unknown = sorted(set(options) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}.__call__() got an unexpected keyword argument {unknown[0]!r}")
        opts = {**SAMPLING_DEFAULTS, **options}
        output_type, generator = opts["output_type"], opts["generator"]
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        validation.guidance_scale(guidance_scale)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__} (for a seed, "
                             "pass bitdance.validation.seeded(seed))")
        validation.integer(opts["decode_chunk_size"], "decode_chunk_size", 1, validation.MAX_BATCH)
        return opts

    @property
    def image_tokenizer(self) -> BinaryTokenizer:
        raise NotImplementedError

    def _sampler(self, opts: dict[str, Any], num_inference_steps: int) -> FlowSampler:
        if isinstance(opts["sampler"], FlowSampler):
            return opts["sampler"]
        shift = opts["time_shift"]
        return FlowSampler(num_steps=validation.flow_steps(num_inference_steps), method=opts["sampler"],
                           time_shift=self.config.time_shift if shift is None else shift)

    def _finish(self, latents: torch.Tensor, opts: dict[str, Any]) -> PipelineOutput:
        if opts["output_type"] == "latent":
            return PipelineOutput(images=latents, latents=latents)
        images = self.decode(latents, generator=opts["generator"], chunk_size=opts["decode_chunk_size"])
        return _format_images(images, latents, opts["output_type"])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, generator=None, chunk_size: int = 16) -> torch.Tensor:
        """(B, d, h, w) tokens -> float images (B, 3, H, W) in [-1, 1]. Partial grids from a ``callback``
        (ungenerated tokens 0) decode too: that is how a UI shows the image forming. Runs where the image
        tokenizer lives (the CPU when a text-to-image model offloads it)."""
        tok = self.image_tokenizer
        latents = _check_latents(latents, tok.bits)
        p = next(tok.parameters())
        return tok.decode(latents.to(p.device, p.dtype), generator=generator, chunk_size=chunk_size).float().clamp(-1, 1)


