"""The text-to-image pipeline: a BitDanceT2I model (Qwen3 + vision head + binary tokenizer) in the released
folder layout."""

from __future__ import annotations

import json
import os
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from bitdance import validation
from bitdance.formats.folders import FORMAT, read_json_or_none, replace_folder
from bitdance.formats.hub import resolve
from bitdance.formats.quantized import recorded_weights
from bitdance.formats.t2i_folder import FIELDS_BESIDE_HEAD_JSON, check_offload, load_folder, save_folder
from bitdance.formats.weights import CheckpointError
from bitdance.images import image_tensor
from bitdance.models.config import ConfigError, T2IConfig
from bitdance.models.quantized import check_weights, weights_format
from bitdance.models.t2i import BitDanceT2I
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.models.transformer import generation_order
from bitdance.pipelines.base import EditOptions, Pipeline, PipelineOutput, SamplingOptions
from bitdance.sampling.autoregressive import KnownTokens
from bitdance.version import __version__

if TYPE_CHECKING:  # Unpack is in typing from Python 3.11 (the annotation is never evaluated)
    from typing_extensions import Unpack


def _compile_head(head, mode: str | None, whole_flow: bool) -> None:
    if not hasattr(head, "compile_sampling"):
        raise ValueError(f"compile applies to the diffusion head, not to a {type(head).__name__}")
    head.compile_sampling(mode=mode, whole_flow=whole_flow)


class BitDanceT2IPipeline(Pipeline):
    """Text-to-image BitDance (Qwen3 LLM + projector + vision head + image tokenizer), diffusers-style.

    Reads and writes the released folder layout (see :mod:`bitdance.models.t2i`); the same ``__call__`` options,
    ``callback`` and :class:`PipelineOutput` as :class:`BitDancePipeline`, with prompts instead of classes.
    """

    kind = "text_to_image"
    max_prompt_chars = 20_000  # refuse before tokenizing: a UI may pass anything

    def __init__(self, model: BitDanceT2I, *, meta: dict | None = None):
        if model.ae is None:
            raise ConfigError("a text-to-image pipeline needs the model's image tokenizer (ae)")
        super().__init__(meta=meta)
        self.model = model.eval()

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, low_cpu_mem_usage: bool = True,
                        offload: Sequence[str] = (), weights: str | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        token: str | bool | None = None, **config_overrides) -> "BitDanceT2IPipeline":
        """Load a released text-to-image folder (e.g. ``BitDance-14B-16x``) or one written by
        :meth:`save_pretrained`. ``config_overrides`` set :class:`~bitdance.models.config.T2IConfig` fields
        (e.g. ``resolutions``); ``dtype=None`` keeps the stored dtype (bf16 in the release) unless
        ``$BITDANCE_DTYPE`` forces one (:mod:`bitdance.precision`).
        ``offload=("ae", "lm_head")`` keeps the image tokenizer and the unused text output layer on the
        CPU when ``device`` is a GPU (see :func:`bitdance.formats.t2i_folder.load_folder`).
        ``weights="int8"`` / ``"fp8"`` / ``"bf16"`` stores the linear layers of the LLM, head and projector that
        way, quantized tensor by tensor while reading (:mod:`bitdance.models.quantized`); folders that already
        hold int8 / fp8 weights (written by ``bitdance convert --weights``, or the fp8 copies users share) load
        as stored.
        ``path`` may be a released name (``"BitDance-14B-64x"``) or a repository id, fetched through
        ``huggingface_hub`` with ``revision`` / ``cache_dir`` / ``local_files_only`` / ``token``
        (:mod:`bitdance.formats.hub`; only the files the folder's loader reads)."""
        path = resolve(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                       token=token).path
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such folder (a text-to-image model is a folder)")
        stored = read_json_or_none(path / "config.json")
        ours = stored.get("bitdance") if isinstance(stored, dict) else None
        extra = ours.get("t2i", {}) if isinstance(ours, dict) else {}
        if not isinstance(extra, dict):
            raise CheckpointError(f"{path / 'config.json'}: 'bitdance.t2i' must be an object, got {extra!r}")
        unknown = sorted(set(extra) - set(FIELDS_BESIDE_HEAD_JSON))
        if unknown:
            raise CheckpointError(f"{path / 'config.json'}: unknown 'bitdance.t2i' fields {unknown}")
        valid = {f.name for f in dataclass_fields(T2IConfig)}
        bad = sorted(set(config_overrides) - valid)
        if bad:  # a caller's typo, not a broken folder
            raise TypeError(f"unknown text-to-image config field(s) {bad}; T2IConfig has {sorted(valid)}")
        from bitdance.precision import forced_dtype

        if dtype is None and forced_dtype() is not None:
            dtype = torch.bfloat16 if forced_dtype() == "bf16" else torch.float32
        offload = check_offload(offload)  # a caller's mistake: checked here so it is not reported as a bad folder
        check_weights(weights)
        if weights is None and isinstance(ours, dict):
            weights = recorded_weights(ours.get("weights"), f"{path / 'config.json'}: bitdance.weights")
        try:
            model = load_folder(path, dtype=dtype, device=device, low_cpu_mem_usage=low_cpu_mem_usage,
                                offload=offload, weights=weights, **{**extra, **config_overrides})
        except (ConfigError, TypeError, ValueError) as e:  # e.g. malformed stored resolutions
            raise CheckpointError(f"{path}: invalid text-to-image config: {e}") from None
        meta = ours.get("meta", {}) if isinstance(ours, dict) and isinstance(ours.get("meta"), dict) else {}
        return cls(model, meta={"source": str(path), **meta})

    def save_pretrained(self, folder: str | os.PathLike, *, max_shard_size: str | int | None = None) -> None:
        """Write the released layout (Qwen3 + tokenizer files, ae_*, vision_head_*, projector) into a
        fresh sibling folder and swap it in, so a failure midway leaves the previous contents intact.
        config.json also records ``{"bitdance": {"kind": "text_to_image", "t2i": {resolutions, ...}}}``."""

        def fill(tmp: Path) -> None:
            save_folder(self.model, tmp, max_shard_size=max_shard_size)
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            c = self.model.config
            t2i = {k: getattr(c, k) for k in FIELDS_BESIDE_HEAD_JSON}
            t2i["resolutions"] = [list(r) for r in c.resolutions]
            cfg["bitdance"] = {"format": FORMAT, "bitdance_version": __version__, "kind": self.kind,
                               "t2i": t2i, "meta": {k: v for k, v in self.meta.items() if k != "source"}}
            if weights_format(self.model) is not None:
                cfg["bitdance"]["weights"] = weights_format(self.model)
            cfg_path.write_text(json.dumps(cfg, indent=2))

        replace_folder(folder, fill)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BitDanceT2IPipeline":
        self.model.to(device=device, dtype=dtype)
        return self

    def compile(self, mode: str | None = None, *, whole_flow: bool = False) -> "BitDanceT2IPipeline":
        """``torch.compile`` the vision head's inner loop (see :meth:`BitDancePipeline.compile`)."""
        _compile_head(self.model.vision_head, mode, whole_flow)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.projector.fc1.weight.dtype

    @property
    def config(self) -> T2IConfig:
        return self.model.config

    @property
    def default_resolution(self) -> tuple[int, int]:
        """(height, width) used when none is given: the largest allowed square (1024x1024 for the
        released models), else the first allowed resolution."""
        cfg = self.config
        ok = []
        for h, w in cfg.resolutions:
            try:
                cfg.check_resolution(h, w)
                ok.append((h, w))
            except ValueError:
                pass
        if not ok:
            raise ValueError("this model lists no usable resolution; pass height and width")
        squares = [r for r in ok if r[0] == r[1]]
        return max(squares) if squares else ok[0]

    # ---------------------------------------------------------------------------------------
    def _check_prompts(self, prompt: Any, h: int, w: int) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        # ValueError (not TypeError) throughout: the CLI and the studio report ValueErrors as user errors.
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(  # noqa: TRY004
                f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if not prompts:
            raise ValueError("prompt list is empty")
        if len(prompts) > validation.MAX_BATCH:
            raise validation.InputError(f"prompt: {len(prompts)} images in one call; at most {validation.MAX_BATCH}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} must be a string, got {type(p).__name__}")  # noqa: TRY004
            if len(p) > self.max_prompt_chars:
                raise ValueError(f"prompt {i} is too long: {len(p)} characters (at most {self.max_prompt_chars})")
        # Text + image tokens must fit the LLM's positions.
        limit = getattr(self.model.llm.config, "max_position_embeddings", None)
        if limit:
            for i, p in enumerate(prompts):
                n = len(self.model.prefix_ids(p, h)) + h * w
                if n > limit:
                    raise ValueError(f"prompt {i} is too long: its {n - h * w} text tokens + {h * w} image tokens "
                                     f"exceed the model's {limit} positions")
        return list(prompts)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None,
                 guidance_scale: float = 7.5, **options: Unpack[SamplingOptions]) -> PipelineOutput:
        """Images for ``prompt`` (one or a list). ``height`` / ``width`` default to
        :attr:`default_resolution`; giving only one makes a square. Guidance is a constant scale
        (1: off; below 1 is refused). ``options``: :class:`~bitdance.pipelines.base.SamplingOptions` (sampler,
        generator, output_type, ``callback(step, num_steps, partial_latents)``, ...)."""
        opts = self._options(options, guidance_scale)
        height = validation.image_side(height, "height")
        width = validation.image_side(width, "width")
        if height is None and width is None:
            height, width = self.default_resolution
        height = width if height is None else height
        width = height if width is None else width
        return self._generate(prompt, height, width, guidance_scale, opts)

    def _generate(self, prompt, height: int, width: int, guidance_scale: float, opts: dict,
                  known: KnownTokens | None = None) -> PipelineOutput:
        h, w = self.config.check_resolution(height, width)
        prompts = self._check_prompts(prompt, h, w)
        if known is not None and len(prompts) == 1 and known.tokens.shape[0] > 1:
            prompts = prompts * known.tokens.shape[0]
        latents = self.model.generate(prompts, height=height, width=width,
                                      sampler=self._sampler(opts),
                                      guidance_scale=guidance_scale, generator=opts["generator"],
                                      use_kv_cache=opts["use_kv_cache"], callback=opts["callback"], known=known)
        return self._finish(latents, opts, known)

    @torch.no_grad()
    def edit(self, image, mask=None, *, prompt: str | Sequence[str], height: int | None = None,
             width: int | None = None, guidance_scale: float = 7.5, **options: Unpack[EditOptions]) -> PipelineOutput:
        """Regenerate part of ``image`` following ``prompt``, keeping every other token exactly as the folder's
        tokenizer encodes it. The output has the image's size (or ``height`` x ``width``; a same-aspect image
        is resized), which must be an allowed resolution. ``mask`` and the
        :class:`~bitdance.pipelines.base.EditOptions` as in :meth:`BitDancePipeline.edit`."""
        edit, sampling = self._split_edit_options(options)
        opts = self._options(sampling, guidance_scale, call="edit")
        img = image_tensor(image)
        img_h, img_w = img.shape[-2:]
        height, width = validation.image_side(height, "height"), validation.image_side(width, "width")
        if height is None and width is None:
            height, width = img_h, img_w
        elif height is None:  # the other side keeps the image's aspect
            height = round(width * img_h / img_w)
        elif width is None:
            width = round(height * img_w / img_h)
        self.config.check_resolution(height, width)
        batch = max(1 if isinstance(prompt, str) else len(prompt), img.shape[0])
        known = self._known_tokens(img, mask, size=(height, width), batch=batch, edit=edit,
                                   generator=opts["generator"])
        return self._generate(prompt, height, width, guidance_scale, opts, known)

    def outpaint(self, image, *, prompt: str | Sequence[str], right: int = 0, down: int = 0,
                 **kwargs) -> PipelineOutput:
        """Extend ``image`` by ``right`` / ``down`` pixels: the larger canvas must be an allowed resolution
        (e.g. 512x512 -> 640x384 is not an extension, 384x384 -> 384x640 is); the image sits at its top-left
        and everything else is generated (the :meth:`edit` options apply)."""
        img = image_tensor(image)
        validation.integer(right, "right", 0, 1 << 16)
        validation.integer(down, "down", 0, 1 << 16)
        height, width = img.shape[-2] + down, img.shape[-1] + right
        self.config.check_resolution(height, width)
        canvas, mask = self._outpaint_inputs(img, (height, width))
        return self.edit(canvas, mask, prompt=prompt, **kwargs)

    def _generation_order(self, h: int, w: int) -> torch.Tensor:
        return generation_order(h, w, self.config.patch_size)

    @property
    def image_tokenizer(self) -> BinaryTokenizer:
        return self.model.ae
