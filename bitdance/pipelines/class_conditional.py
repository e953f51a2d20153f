"""The class-conditional pipeline: a BitDance generator and its binary tokenizer, from our folders or the
official ImageNet files."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Sequence

import torch

from bitdance import validation
from bitdance.formats.folders import (
    FORMAT,
    load_component,
    read_folder_config,
    write_folder,
)
from bitdance.formats.hub import resolve
from bitdance.formats.official import load_official_generator, load_tokenizer
from bitdance.formats.t2i_folder import AE_WEIGHTS, HEAD_CONFIG, is_text_to_image_folder
from bitdance.formats.weights import CheckpointError
from bitdance.images import image_tensor
from bitdance.models.config import BitDanceConfig, ConfigError
from bitdance.models.quantized import check_weights, quantize_, weights_format
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.models.transformer import BitDance
from bitdance.pipelines.base import EditOptions, Pipeline, PipelineOutput, SamplingOptions
from bitdance.pipelines.text_to_image import BitDanceT2IPipeline
from bitdance.sampling.autoregressive import KnownTokens
from bitdance.version import __version__

if TYPE_CHECKING:  # Unpack is in typing from Python 3.11 (the annotation is never evaluated)
    from typing_extensions import Unpack


class BitDancePipeline(Pipeline):
    """Class-conditional BitDance: generator + tokenizer.

    ``from_pretrained`` returns a :class:`BitDanceT2IPipeline` for text-to-image folders (like diffusers'
    ``DiffusionPipeline.from_pretrained``); ``pipe.kind`` tells the two apart.
    """

    kind = "class_conditional"

    def __init__(self, model: BitDance, tokenizer: BinaryTokenizer, *, meta: dict | None = None):
        if model.config.tokenizer.z_channels != tokenizer.config.z_channels:
            raise ConfigError(f"generator tokens have {model.config.latent_dim} bits but the tokenizer "
                              f"has {tokenizer.config.z_channels}")
        if model.config.down_size != tokenizer.down_factor:
            raise ConfigError(f"generator expects a {model.config.down_size}x tokenizer, "
                              f"got {tokenizer.down_factor}x")
        super().__init__(meta=meta)
        # `model` as in BitDanceT2IPipeline; `generator` is the torch.Generator of a call
        self.model, self.tokenizer = model.eval(), tokenizer.eval()

    @property
    def generator(self) -> BitDance:
        """Deprecated name of :attr:`model` (removed in 0.3): ``generator`` is the torch.Generator of a call."""
        warnings.warn("BitDancePipeline.generator is now BitDancePipeline.model", DeprecationWarning, stacklevel=2)
        return self.model

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                        use_ema: bool = True, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, weights: str | None = None, model: str | None = None,
                        revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        token: str | bool | None = None,
                        **t2i_overrides) -> "BitDancePipeline | BitDanceT2IPipeline":
        """Class-conditional folder or official checkpoint -> this class; a text-to-image folder ->
        :class:`BitDanceT2IPipeline` (``t2i_overrides`` go to its ``from_pretrained``).

        ``path`` may also be a released name (``"BitDance-B-16x"``, ``"BitDance-14B-64x"``) or a Hugging Face
        repository id (``"shallowdream204/BitDance-ImageNet"`` with ``model="BitDance_B_16x.pt"``): the files
        are fetched through ``huggingface_hub`` (``revision``, ``cache_dir``, ``local_files_only``, ``token``;
        see :mod:`bitdance.formats.hub`), the release's tokenizer with them. ``tokenizer`` takes a path or a
        released tokenizer name (``"d16c32"``) too.

        ``weights="int8"`` / ``"fp8"`` / ``"bf16"`` stores the generator's linear layers that way
        (:mod:`bitdance.models.quantized`; the image tokenizer, a CNN, stays as it is). A folder saved from such a
        pipeline holds the quantized weights and loads as stored."""
        check_weights(weights)
        hub = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        found = resolve(path, model=model, revision=revision, **hub)
        if found.release is not None and found.release.kind == "tokenizer":
            raise CheckpointError(f"{os.fspath(path)} is an image tokenizer, not a generator; load it with "
                                  "bitdance.load_tokenizer")
        path = found.path
        if tokenizer is None:
            tokenizer = found.tokenizer
        if path.is_dir() and is_text_to_image_folder(path):
            if tokenizer is not None:
                raise CheckpointError(f"{path}: a text-to-image folder brings its own image tokenizer "
                                      f"({AE_WEIGHTS}); tokenizer= is for class-conditional checkpoints")
            if not (path / HEAD_CONFIG).is_file():
                raise CheckpointError(f"{path}: config.json says kind 'text_to_image' but {HEAD_CONFIG} is "
                                      "missing (not a complete BitDance text-to-image folder)")
            return BitDanceT2IPipeline.from_pretrained(path, device=device, dtype=dtype, weights=weights,
                                                       **t2i_overrides)
        if t2i_overrides:
            raise TypeError(f"unexpected arguments for a class-conditional model: {sorted(t2i_overrides)}")
        if path.is_dir():
            cfg = read_folder_config(path)
            if cfg.get("kind") != "class_conditional":
                raise CheckpointError(f"{path}: a {cfg.get('kind')!r} folder, not a class-conditional model")
            gen = load_component(path, "generator")
            tok = load_tokenizer(tokenizer, **hub) if tokenizer else load_component(path, "tokenizer")
            meta = cfg.get("meta", {})
        else:
            separate = load_tokenizer(tokenizer, **hub) if tokenizer is not None else None
            gen, tok, info = load_official_generator(
                path, use_ema=use_ema, tokenizer=separate.config if separate is not None else None)
            tok = separate if separate is not None else tok
            if tok is None:
                raise CheckpointError(f"{path}: holds no tokenizer weights (vae.*); give a tokenizer file "
                                      "(tokenizer=... in Python, --tokenizer on the command line)")
            meta = {"source": str(path), **{k: v for k, v in info.items() if k != "args"}}
        if weights is not None:
            stored = weights_format(gen)
            if stored is not None and stored != weights:
                raise CheckpointError(f"{path}: its weights are stored as {stored}; load the full-precision "
                                      f"model to get {weights}")
            quantize_(gen, weights)
        pipe = cls(gen, tok, meta=meta)
        return pipe.to(device=device, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json + safetensors. The folder is replaced as a whole: a failure midway
        leaves the previous contents untouched."""
        cfg = {"format": FORMAT, "bitdance_version": __version__, "kind": "class_conditional",
               "generator": self.model.config.to_dict(), "tokenizer": self.tokenizer.config.to_dict(),
               "meta": self.meta}
        if weights_format(self.model) is not None:
            cfg["weights"] = {"generator": weights_format(self.model)}
        write_folder(folder, cfg, {"generator": self.model, "tokenizer": self.tokenizer})

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BitDancePipeline":
        self.model.to(device=device, dtype=dtype)
        self.tokenizer.to(device=device, dtype=dtype)
        return self

    def compile(self, mode: str | None = None, *, whole_flow: bool = False) -> "BitDancePipeline":
        """``torch.compile`` the diffusion head's inner loop, where sampling spends most of its time, and on CPUs
        the transformer's KV-cached step (:meth:`BitDance.compile_sampling`). On CPUs the weights are frozen into
        the graphs (compiled again by themselves if they change) and the few-row products get inductor's C++ GEMM
        templates: 2.3x / 4.5x the authors' fp32 speed for B-4x / B-1x (AVX2, 2 cores). ``mode="reduce-overhead"`` adds CUDA graphs on GPUs; ``"off"``
        undoes it. The first call after compiling (and after each new batch size) pays the compilation (a
        minute or two on a CPU); outputs stay the same up to float rounding. ``whole_flow=True`` compiles the
        head's whole flow loop of an AR step as one graph (B-1x heads 13% faster on a CPU; the first compilation
        takes minutes, see :meth:`~bitdance.models.head.DiffusionHead.compile_sampling`)."""
        self.model.compile_sampling(mode=mode, whole_flow=whole_flow)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.pos_for_diff.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pos_for_diff.weight.dtype

    @property
    def config(self) -> BitDanceConfig:
        return self.model.config

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, class_labels: int | Sequence[int] | torch.Tensor, *, guidance_scale: float = 4.0,
                 guidance_schedule: str = "linear", height: int | None = None, width: int | None = None,
                 **options: Unpack[SamplingOptions]) -> PipelineOutput:
        """Images of ``class_labels`` (one id, a list or an integer tensor). ``guidance_schedule``: "linear"
        (the official ramp over the AR steps) or "constant"; ``height`` / ``width`` may only restate the
        model's size. ``options``: :class:`~bitdance.pipelines.base.SamplingOptions` (sampler, generator,
        output_type, callback, ...)."""
        cfg = self.config
        size = cfg.image_size
        height = validation.image_side(height, "height")
        width = validation.image_side(width, "width")
        if (height or size) != size or (width or size) != size:
            raise ValueError(f"this model generates {size}x{size} images; got height={height}, width={width}")
        opts = self._options(options, guidance_scale)
        labels = validation.class_ids(class_labels, cfg.num_classes)
        return self._generate(labels, guidance_scale, guidance_schedule, opts)

    def _generate(self, labels: torch.Tensor, guidance_scale: float, guidance_schedule: str, opts: dict,
                  known: KnownTokens | None = None) -> PipelineOutput:
        if guidance_schedule not in ("linear", "constant"):
            raise ValueError(f"guidance_schedule must be 'linear' or 'constant', got {guidance_schedule!r}")
        latents = self.model.generate(
            labels.to(self.device), sampler=self._sampler(opts),
            guidance_scale=guidance_scale, guidance_schedule=guidance_schedule, generator=opts["generator"],
            use_kv_cache=opts["use_kv_cache"], callback=opts["callback"], known=known)
        return self._finish(latents, opts, known)

    @torch.no_grad()
    def edit(self, image, mask=None, *, class_labels: int | Sequence[int] | torch.Tensor, guidance_scale: float = 4.0,
             guidance_schedule: str = "linear", **options: Unpack[EditOptions]) -> PipelineOutput:
        """Regenerate part of ``image`` (PIL, uint8 array or float tensor; a same-aspect image of another size
        is resized) as ``class_labels``, keeping every other token exactly as the tokenizer encodes it.

        ``mask`` (image-sized; white / True / 1 = regenerate) marks the region: a token is regenerated when
        more than ``mask_threshold`` of its pixels are masked (0: any). Without a mask, ``strength`` in
        [0, 1] makes a variation: ``variation`` "random" (that share of the tokens), "blocks" (of the AR
        blocks), "tail" (the last tokens in generation order) or "flip" (every token resampled while the
        fed-back tokens are the encoded ones with bits flipped at rate ``strength``). ``margin`` also
        regenerates that many tokens after each regenerated one in generation order (a softer seam). A
        different class with the lower rows masked is a "class swap". ``output.regenerated`` (B, h, w) says
        which tokens were sampled; the others come back bit-identical to the encoded image
        (``docs/editing.md``: what works, and the causal limit)."""
        edit, sampling = self._split_edit_options(options)
        opts = self._options(sampling, guidance_scale, call="edit")
        labels = validation.class_ids(class_labels, self.config.num_classes)
        image = image_tensor(image)
        if len(labels) == 1 and image.shape[0] > 1:
            labels = labels.repeat(image.shape[0])
        size = self.config.image_size
        known = self._known_tokens(image, mask, size=(size, size), batch=len(labels), edit=edit,
                                   generator=opts["generator"])
        return self._generate(labels, guidance_scale, guidance_schedule, opts, known)

    def outpaint(self, image, *, class_labels: int | Sequence[int] | torch.Tensor, right: int | None = None,
                 down: int | None = None, **kwargs) -> PipelineOutput:
        """Extend ``image`` (smaller than the model's images) by ``right`` / ``down`` pixels to the model's size
        (the default: whatever is missing): it sits at the top-left of the canvas and everything else is
        generated (the :meth:`edit` options apply)."""
        size = self.config.image_size
        image = image_tensor(image)
        h0, w0 = image.shape[-2:]
        right = size - w0 if right is None else validation.integer(right, "right", 0, 1 << 16)
        down = size - h0 if down is None else validation.integer(down, "down", 0, 1 << 16)
        if (h0 + down, w0 + right) != (size, size):
            raise ValueError(f"this model makes {size}x{size} images: extending {w0}x{h0} (WxH) by right={right}, "
                             f"down={down} gives {w0 + right}x{h0 + down}")
        canvas, mask = self._outpaint_inputs(image, (size, size))
        return self.edit(canvas, mask, class_labels=class_labels, **kwargs)

    def _generation_order(self, h: int, w: int) -> torch.Tensor:
        return self.model.order

    @property
    def image_tokenizer(self) -> BinaryTokenizer:
        return self.tokenizer
