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
:mod:`bitdance.formats.t2i_folder`; ``BitDancePipeline.from_pretrained`` dispatches to it for such folders.
Both kinds share :class:`PipelineOutput`, the output types, the call options (:class:`SamplingOptions`) and
editing (``edit`` / ``outpaint``, :class:`EditOptions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypedDict

import torch
import torch.nn.functional as F

from bitdance import validation
from bitdance.images import image_tensor, mask_tensor, to_uint8
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.models.transformer import flip_bits
from bitdance.sampling.autoregressive import KnownTokens
from bitdance.sampling.editing import VARIATIONS, token_mask, variation_mask, with_margin
from bitdance.sampling.flow import FlowSampler

__all__ = ["Pipeline", "PipelineOutput", "OUTPUT_TYPES", "SamplingOptions", "SAMPLING_DEFAULTS",
           "EditOptions", "EDIT_DEFAULTS"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) uint8 numpy array, or (B, 3, H, W) tensor in [-1, 1]
    latents: torch.Tensor  # (B, d, h, w) binary tokens
    regenerated: torch.Tensor | None = None  # edits: (B, h, w) bool, True where a token was sampled anew


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
    """The keyword options of every pipeline call besides the condition and guidance (defaults in
    :data:`SAMPLING_DEFAULTS`).

    ``num_inference_steps``: flow steps of the head per AR step; ``sampler``: ``"euler_maruyama"`` (the
    official head sampler), ``"euler"`` (deterministic) or a :class:`~bitdance.sampling.flow.FlowSampler`;
    ``time_shift``: the flow's time shift (None: the model's); ``generator``: the ``torch.Generator`` of every
    random draw; ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``;
    ``callback(step, num_steps, partial_latents)``: after each AR step
    (``pipe.decode(partial_latents)`` shows the image so far); ``use_kv_cache``: False recomputes the whole
    sequence each step (slow, for checks); ``decode_chunk_size``: images per tokenizer decode.
    """

    num_inference_steps: int
    sampler: str | FlowSampler
    time_shift: float | None
    generator: torch.Generator | None
    output_type: str
    callback: Callable[[int, int, torch.Tensor], None] | None
    use_kv_cache: bool
    decode_chunk_size: int


class EditOptions(SamplingOptions, total=False):
    """The keyword options of ``edit`` / ``outpaint`` besides the image, mask, condition and guidance, on top
    of :class:`SamplingOptions` (defaults in :data:`EDIT_DEFAULTS`).

    ``strength`` in [0, 1] (with no mask): a variation that regenerates that share; ``variation``: "random",
    "blocks", "tail" or "flip" (see :data:`bitdance.sampling.editing.VARIATIONS`); ``margin``: also regenerate
    that many tokens after each regenerated one in generation order; ``mask_threshold``: a token is
    regenerated when more than this share of its pixels is masked (0: any).
    """

    strength: float | None
    variation: str
    margin: int
    mask_threshold: float


EDIT_DEFAULTS: dict[str, Any] = {"strength": None, "variation": "random", "margin": 0, "mask_threshold": 0.0}

SAMPLING_DEFAULTS: dict[str, Any] = {"num_inference_steps": 50, "sampler": "euler_maruyama",
                                     "time_shift": None, "generator": None, "output_type": "pil",
                                     "callback": None, "use_kv_cache": True, "decode_chunk_size": 16}


class Pipeline:
    """What both pipelines share: argument checks, the flow sampler, decoding and the output formats.

    ``__call__(condition, *, guidance_scale, ..., **options)`` takes the :class:`SamplingOptions` as
    ``options``, ``edit(image, mask, *, condition, guidance_scale, ..., **options)`` the :class:`EditOptions`.
    A subclass names its ``kind``, its ``image_tokenizer`` (the binary autoencoder that decodes latents), its
    ``config`` (whose ``time_shift`` is the flow sampler's default) and its generation order, checks its own
    inputs and generates; :meth:`_sampler` builds the flow sampler, :meth:`_known_tokens` what an edit keeps,
    and :meth:`_finish` decodes and formats the output.
    """

    kind = ""

    def __init__(self, *, meta: dict | None = None):
        self.meta = dict(meta or {})

    def _options(self, options: dict[str, Any], guidance_scale: Any, call: str = "__call__") -> dict:
        """The call's :class:`SamplingOptions` with their defaults, checked before any work (see
        :mod:`bitdance.validation`); an unknown name is a TypeError, as for any keyword argument."""
        unknown = sorted(set(options) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__}.{call}() got an unexpected keyword argument "
                            f"{unknown[0]!r}")
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

    def _sampler(self, opts: dict[str, Any]) -> FlowSampler:
        if isinstance(opts["sampler"], FlowSampler):
            return opts["sampler"]
        shift = opts["time_shift"]
        steps = validation.flow_steps(opts["num_inference_steps"])
        return FlowSampler(num_steps=steps, method=opts["sampler"],
                           time_shift=self.config.time_shift if shift is None else shift)

    def _finish(self, latents: torch.Tensor, opts: dict[str, Any],
                known: KnownTokens | None = None) -> PipelineOutput:
        regenerated = None if known is None else ~known.keep
        if opts["output_type"] == "latent":
            return PipelineOutput(images=latents, latents=latents, regenerated=regenerated)
        images = self.decode(latents, generator=opts["generator"], chunk_size=opts["decode_chunk_size"])
        out = _format_images(images, latents, opts["output_type"])
        out.regenerated = regenerated
        return out

    # ---- editing: what both pipelines share -------------------------------------------------------------
    def _generation_order(self, h: int, w: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def _parallel_num(self) -> int:
        return self.config.parallel_num

    def _edit_inputs(self, image, mask, *, size: tuple[int, int],
                     batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) image in [-1, 1] at ``size`` and the (B, H, W) pixel mask (None: no mask), both
        checked; a same-aspect image of another size is resized (the mask with it), any other is refused."""
        img = image_tensor(image)
        h0, w0 = img.shape[-2:]
        m = None
        if mask is not None:
            m = mask_tensor(mask)
            if tuple(m.shape[-2:]) != (h0, w0):
                raise ValueError(f"the mask is {m.shape[-1]}x{m.shape[-2]} (WxH) but the image is {w0}x{h0}; "
                                 "give an image-sized mask")
        H, W = size
        if (h0, w0) != (H, W):
            if h0 * W != w0 * H:
                raise ValueError(f"the image is {w0}x{h0} (WxH) but this model makes {W}x{H}: crop it to "
                                 "that aspect ratio first (a same-aspect image is resized)")
            img = F.interpolate(img, size=(H, W), mode="bicubic", antialias=True, align_corners=False)
            img = img.clamp(-1, 1)
            if m is not None:  # coverage per pixel, so that "any masked pixel" survives downscaling
                m = F.interpolate(m[:, None], size=(H, W), mode="area")[:, 0]
        for name, t in (("image", img), ("mask", m)):
            if t is not None and t.shape[0] not in (1, batch):
                raise ValueError(f"{t.shape[0]} {name}s for {batch} conditions: give one {name} or one per "
                                 "condition")
        img = img.expand(batch, -1, -1, -1) if img.shape[0] == 1 else img
        m = m.expand(batch, -1, -1) if m is not None and m.shape[0] == 1 else m
        return img, m

    def _outpaint_inputs(self, img: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``img`` (B, 3, h, w) at the top-left of a mid-grey canvas of ``size``, and the mask of the rest."""
        (h0, w0), (H, W) = img.shape[-2:], size
        if h0 > H or w0 > W or (h0, w0) == (H, W):
            raise ValueError(f"outpainting extends an image: {w0}x{h0} (WxH) must be smaller than the canvas "
                             f"{W}x{H} in width or height and not larger in either")
        canvas = torch.zeros(img.shape[0], 3, H, W)
        canvas[:, :, :h0, :w0] = img
        mask = torch.ones(img.shape[0], H, W)
        mask[:, :h0, :w0] = 0
        return canvas, mask

    def _split_edit_options(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the :class:`EditOptions` of a call with their defaults, the rest: sampling options)."""
        edit = {**EDIT_DEFAULTS, **{k: v for k, v in options.items() if k in EDIT_DEFAULTS}}
        return edit, {k: v for k, v in options.items() if k not in EDIT_DEFAULTS}

    def _known_tokens(self, image, mask, *, size: tuple[int, int], batch: int, edit: dict[str, Any],
                      generator) -> KnownTokens:
        """Encode the image and decide, per token, keep or regenerate (mask, or a variation of ``strength``,
        plus ``margin`` tokens after each regenerated one in generation order)."""
        strength, variation = edit["strength"], edit["variation"]
        margin, mask_threshold = edit["margin"], edit["mask_threshold"]
        if (mask is None) == (strength is None):
            raise ValueError("give a mask (what to regenerate) or a strength in [0, 1] (a variation), not "
                             + ("both" if mask is not None else "neither"))
        validation.integer(margin, "margin", 0, 1 << 20)
        if variation not in VARIATIONS:
            raise ValueError(f"variation must be one of {list(VARIATIONS)}, got {variation!r}")
        img, m = self._edit_inputs(image, mask, size=size, batch=batch)
        tok = self.image_tokenizer
        f = tok.down_factor
        H, W = size
        if H % f or W % f:
            raise ValueError(f"{W}x{H} is not a multiple of the tokenizer's {f} px tokens")
        h, w = H // f, W // f
        order = self._generation_order(h, w)
        if m is not None:
            regen = token_mask(m, f, threshold=mask_threshold)
            if not bool(regen.any()):
                raise ValueError("the mask covers no token: nothing to regenerate (paint the region to redo)")
            if bool(regen.all()):
                raise ValueError("the mask covers the whole image: nothing is kept (generate a new image, or "
                                 "use a variation with strength=)")
        else:
            regen = variation_mask(validation.number(strength, "strength", 0.0, 1.0), variation, batch=batch,
                                   grid=(h, w), order=order, parallel_num=self._parallel_num,
                                   generator=generator)
        regen = with_margin(regen.cpu(), order, margin)
        p = next(tok.parameters())
        tokens = tok.encode(img.to(p.device, p.dtype)).float()
        feed = None
        if m is None and variation == "flip":
            feed = flip_bits(tokens, float(strength), generator=generator)
        return KnownTokens(tokens=tokens, keep=~regen.to(tokens.device), feed=feed)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, generator=None, chunk_size: int = 16) -> torch.Tensor:
        """(B, d, h, w) tokens -> float images (B, 3, H, W) in [-1, 1]. Partial grids from a ``callback``
        (ungenerated tokens 0) decode too: that is how a UI shows the image forming. Runs where the image
        tokenizer lives (the CPU when a text-to-image model offloads it)."""
        tok = self.image_tokenizer
        latents = _check_latents(latents, tok.bits)
        p = next(tok.parameters())
        return tok.decode(latents.to(p.device, p.dtype), generator=generator, chunk_size=chunk_size).float().clamp(-1, 1)


