"""diffusers-style pipeline: ``from_pretrained`` -> ``__call__(..., generator=...)`` -> ``save_pretrained``.

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
:mod:`bitdance.t2i`; ``BitDancePipeline.from_pretrained`` dispatches to it for such folders. Both kinds
share :class:`PipelineOutput`, the output types and ``callback(step, num_steps, partial_latents)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import validation
from .checkpoint import (FORMAT, CheckpointError, load_component, load_official_generator, load_tokenizer,
                         read_folder_config, replace_folder, write_folder)
from .config import BitDanceConfig, ConfigError, T2IConfig
from .images import make_grid, to_uint8
from .sampler import FlowSampler
from .t2i import BitDanceT2I
from .t2i_folder import AE_WEIGHTS, HEAD_CONFIG, check_offload
from .tokenizer import BinaryTokenizer
from .transformer import BitDance
from .version import __version__

__all__ = ["Pipeline", "BitDancePipeline", "BitDanceT2IPipeline", "PipelineOutput", "is_text_to_image_folder", "load_component",
           "save_tokenizer_folder", "to_uint8", "make_grid"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# T2IConfig fields that vision_head_config.json does not hold; save_pretrained keeps them in config.json
# under "bitdance" (Hugging Face configs carry unknown keys along) so a saved model reloads as it was.
_T2I_EXTRA_FIELDS = ("down_factor", "max_res_tokens", "resolutions", "allow_any_resolution")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) uint8 numpy array, or (B, 3, H, W) tensor in [-1, 1]
    latents: torch.Tensor  # (B, d, h, w) binary tokens


def _check_call(output_type: Any, guidance_scale: Any, generator: Any, decode_chunk_size: Any) -> None:
    """The arguments both pipelines share, checked before any work (see :mod:`bitdance.validation`)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    validation.guidance_scale(guidance_scale)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__} (for a seed, "
                         "pass bitdance.validation.seeded(seed))")
    validation.integer(decode_chunk_size, "decode_chunk_size", 1, validation.MAX_BATCH)


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


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_text_to_image_folder(path: str | os.PathLike) -> bool:
    """True for a released text-to-image folder (it has vision_head_config.json) or a folder whose
    config.json says kind "text_to_image" (ours: top level, or under "bitdance" in the LLM config)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / HEAD_CONFIG).is_file():
        return True
    cfg = _json_or_none(path / "config.json")
    if not isinstance(cfg, dict):
        return False
    ours = cfg.get("bitdance") if isinstance(cfg.get("bitdance"), dict) else cfg
    return ours.get("format") == FORMAT and ours.get("kind") == "text_to_image"


def save_tokenizer_folder(tokenizer: BinaryTokenizer, folder: str | os.PathLike, *, meta: dict | None = None) -> None:
    """A tokenizer in our format: config.json (kind "tokenizer") + tokenizer.safetensors."""
    cfg = {"format": FORMAT, "bitdance_version": __version__, "kind": "tokenizer",
           "tokenizer": tokenizer.config.to_dict(), "meta": dict(meta or {})}
    write_folder(folder, cfg, {"tokenizer": tokenizer})


class Pipeline:
    """What both pipelines share: argument checks, the flow sampler, decoding and the output formats.

    A subclass names its ``kind``, its ``image_tokenizer`` (the binary autoencoder that decodes latents) and
    its ``config`` (whose ``time_shift`` is the flow sampler's default), checks its own inputs and generates;
    :meth:`_sampler` builds the flow sampler and :meth:`_finish` decodes and formats the output.
    """

    kind = ""

    def __init__(self, *, meta: dict | None = None):
        self.meta = dict(meta or {})

    @property
    def image_tokenizer(self) -> BinaryTokenizer:
        raise NotImplementedError

    def _sampler(self, sampler: str | FlowSampler, num_inference_steps: int, time_shift: float | None) -> FlowSampler:
        if isinstance(sampler, FlowSampler):
            return sampler
        return FlowSampler(num_steps=validation.flow_steps(num_inference_steps), method=sampler,
                           time_shift=self.config.time_shift if time_shift is None else time_shift)

    def _finish(self, latents: torch.Tensor, output_type: str, generator, decode_chunk_size: int) -> PipelineOutput:
        if output_type == "latent":
            return PipelineOutput(images=latents, latents=latents)
        images = self.decode(latents, generator=generator, chunk_size=decode_chunk_size)
        return _format_images(images, latents, output_type)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, generator=None, chunk_size: int = 16) -> torch.Tensor:
        """(B, d, h, w) tokens -> float images (B, 3, H, W) in [-1, 1]. Partial grids from a ``callback``
        (ungenerated tokens 0) decode too: that is how a UI shows the image forming. Runs where the image
        tokenizer lives (the CPU when a text-to-image model offloads it)."""
        tok = self.image_tokenizer
        latents = _check_latents(latents, tok.bits)
        p = next(tok.parameters())
        return tok.decode(latents.to(p.device, p.dtype), generator=generator, chunk_size=chunk_size).float().clamp(-1, 1)


class BitDancePipeline(Pipeline):
    """Class-conditional BitDance: generator + tokenizer.

    ``from_pretrained`` returns a :class:`BitDanceT2IPipeline` for text-to-image folders (like diffusers'
    ``DiffusionPipeline.from_pretrained``); ``pipe.kind`` tells the two apart.
    """

    kind = "class_conditional"

    def __init__(self, generator: BitDance, tokenizer: BinaryTokenizer, *, meta: dict | None = None):
        if generator.config.tokenizer.z_channels != tokenizer.config.z_channels:
            raise ConfigError(f"generator tokens have {generator.config.latent_dim} bits but the tokenizer "
                              f"has {tokenizer.config.z_channels}")
        if generator.config.down_size != tokenizer.down_factor:
            raise ConfigError(f"generator expects a {generator.config.down_size}x tokenizer, "
                              f"got {tokenizer.down_factor}x")
        super().__init__(meta=meta)
        self.generator, self.tokenizer = generator.eval(), tokenizer.eval()

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                        use_ema: bool = True, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None,
                        **t2i_overrides) -> "BitDancePipeline | BitDanceT2IPipeline":
        """Class-conditional folder or official checkpoint -> this class; a text-to-image folder ->
        :class:`BitDanceT2IPipeline` (``t2i_overrides`` go to its ``from_pretrained``)."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_dir() and is_text_to_image_folder(path):
            if tokenizer is not None:
                raise CheckpointError(f"{path}: a text-to-image folder brings its own image tokenizer "
                                      f"({AE_WEIGHTS}); tokenizer= is for class-conditional checkpoints")
            if not (path / HEAD_CONFIG).is_file():
                raise CheckpointError(f"{path}: config.json says kind 'text_to_image' but {HEAD_CONFIG} is "
                                      "missing (not a complete BitDance text-to-image folder)")
            return BitDanceT2IPipeline.from_pretrained(path, device=device, dtype=dtype, **t2i_overrides)
        if t2i_overrides:
            raise TypeError(f"unexpected arguments for a class-conditional model: {sorted(t2i_overrides)}")
        if path.is_dir():
            cfg = read_folder_config(path)
            if cfg.get("kind") != "class_conditional":
                raise CheckpointError(f"{path}: a {cfg.get('kind')!r} folder, not a class-conditional model")
            gen = load_component(path, "generator")
            tok = load_tokenizer(tokenizer) if tokenizer else load_component(path, "tokenizer")
            meta = cfg.get("meta", {})
        else:
            separate = load_tokenizer(tokenizer) if tokenizer is not None else None
            gen, tok, info = load_official_generator(
                path, use_ema=use_ema, tokenizer=separate.config if separate is not None else None)
            tok = separate if separate is not None else tok
            if tok is None:
                raise CheckpointError(f"{path}: holds no tokenizer weights (vae.*); give a tokenizer file "
                                      "(tokenizer=... in Python, --tokenizer on the command line)")
            meta = {"source": str(path), **{k: v for k, v in info.items() if k != "args"}}
        pipe = cls(gen, tok, meta=meta)
        return pipe.to(device=device, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json + safetensors. The folder is replaced as a whole: a failure midway
        leaves the previous contents untouched."""
        cfg = {"format": FORMAT, "bitdance_version": __version__, "kind": "class_conditional",
               "generator": self.generator.config.to_dict(), "tokenizer": self.tokenizer.config.to_dict(),
               "meta": self.meta}
        write_folder(folder, cfg, {"generator": self.generator, "tokenizer": self.tokenizer})

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BitDancePipeline":
        self.generator.to(device=device, dtype=dtype)
        self.tokenizer.to(device=device, dtype=dtype)
        return self

    def compile(self, mode: str | None = None) -> "BitDancePipeline":
        """``torch.compile`` the diffusion head's inner loop, where sampling spends most of its time
        (:meth:`BitDance.compile_sampling`). On CPUs the weights are frozen into the graph (compiled again by
        itself if they change) and its few-row products get inductor's C++ GEMM templates: 1.6-2.4x the
        authors' fp32 speed for B-4x / B-1x. ``mode="reduce-overhead"`` adds CUDA graphs on GPUs; ``"off"``
        undoes it. The first call after compiling (and after each new batch size) pays the compilation (a
        minute or two on a CPU); outputs stay the same up to float rounding."""
        self.generator.compile_sampling(mode=mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.generator.pos_for_diff.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generator.pos_for_diff.weight.dtype

    @property
    def config(self) -> BitDanceConfig:
        return self.generator.config

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        guidance_schedule: str = "linear",
        sampler: str | FlowSampler = "euler_maruyama",
        time_shift: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        use_kv_cache: bool = True,
        decode_chunk_size: int = 16,
    ) -> PipelineOutput:
        cfg = self.config
        size = cfg.image_size
        height = validation.image_side(height, "height")
        width = validation.image_side(width, "width")
        if (height or size) != size or (width or size) != size:
            raise ValueError(f"this model generates {size}x{size} images; got height={height}, width={width}")
        _check_call(output_type, guidance_scale, generator, decode_chunk_size)
        labels = validation.class_ids(class_labels, cfg.num_classes)
        if guidance_schedule not in ("linear", "constant"):
            raise ValueError(f"guidance_schedule must be 'linear' or 'constant', got {guidance_schedule!r}")
        latents = self.generator.generate(
            labels.to(self.device), sampler=self._sampler(sampler, num_inference_steps, time_shift),
            guidance_scale=guidance_scale, guidance_schedule=guidance_schedule, generator=generator,
            use_kv_cache=use_kv_cache, callback=callback)
        return self._finish(latents, output_type, generator, decode_chunk_size)

    @property
    def image_tokenizer(self) -> BinaryTokenizer:
        return self.tokenizer


def _compile_head(head, mode: str | None) -> None:
    if not hasattr(head, "compile_sampling"):
        raise ValueError(f"compile applies to the diffusion head, not to a {type(head).__name__}")
    head.compile_sampling(mode=mode)


class BitDanceT2IPipeline(Pipeline):
    """Text-to-image BitDance (Qwen3 LLM + projector + vision head + image tokenizer), diffusers-style.

    Reads and writes the released folder layout (see :mod:`bitdance.t2i`); the same ``__call__`` options,
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
                        offload: Sequence[str] = (), **config_overrides) -> "BitDanceT2IPipeline":
        """Load a released text-to-image folder (e.g. ``BitDance-14B-16x``) or one written by
        :meth:`save_pretrained`. ``config_overrides`` set :class:`~bitdance.t2i.T2IConfig` fields
        (e.g. ``resolutions``); ``dtype=None`` keeps the stored dtype (bf16 in the release) unless
        ``$BITDANCE_DTYPE`` forces one (:mod:`bitdance.precision`).
        ``offload=("ae", "lm_head")`` keeps the image tokenizer and the unused text output layer on the
        CPU when ``device`` is a GPU (see :meth:`bitdance.t2i.BitDanceT2I.from_folder`)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such folder (a text-to-image model is a folder)")
        stored = _json_or_none(path / "config.json")
        ours = stored.get("bitdance") if isinstance(stored, dict) else None
        extra = ours.get("t2i", {}) if isinstance(ours, dict) else {}
        if not isinstance(extra, dict):
            raise CheckpointError(f"{path / 'config.json'}: 'bitdance.t2i' must be an object, got {extra!r}")
        unknown = sorted(set(extra) - set(_T2I_EXTRA_FIELDS))
        if unknown:
            raise CheckpointError(f"{path / 'config.json'}: unknown 'bitdance.t2i' fields {unknown}")
        valid = {f.name for f in dataclass_fields(T2IConfig)}
        bad = sorted(set(config_overrides) - valid)
        if bad:  # a caller's typo, not a broken folder
            raise TypeError(f"unknown text-to-image config field(s) {bad}; T2IConfig has {sorted(valid)}")
        from .precision import forced_dtype

        if dtype is None and forced_dtype() is not None:
            dtype = torch.bfloat16 if forced_dtype() == "bf16" else torch.float32
        offload = check_offload(offload)  # a caller's mistake: checked here so it is not reported as a bad folder
        try:
            model = BitDanceT2I.from_folder(path, dtype=dtype, device=device, low_cpu_mem_usage=low_cpu_mem_usage,
                                            offload=offload, **{**extra, **config_overrides})
        except (ConfigError, TypeError, ValueError) as e:  # e.g. malformed stored resolutions
            raise CheckpointError(f"{path}: invalid text-to-image config: {e}") from None
        meta = ours.get("meta", {}) if isinstance(ours, dict) and isinstance(ours.get("meta"), dict) else {}
        return cls(model, meta={"source": str(path), **meta})

    def save_pretrained(self, folder: str | os.PathLike, *, max_shard_size: str | int | None = None) -> None:
        """Write the released layout (Qwen3 + tokenizer files, ae_*, vision_head_*, projector) into a
        fresh sibling folder and swap it in, so a failure midway leaves the previous contents intact.
        config.json also records ``{"bitdance": {"kind": "text_to_image", "t2i": {resolutions, ...}}}``."""

        def fill(tmp: Path) -> None:
            self.model.save_folder(tmp, max_shard_size=max_shard_size)
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            c = self.model.config
            t2i = {k: getattr(c, k) for k in _T2I_EXTRA_FIELDS}
            t2i["resolutions"] = [list(r) for r in c.resolutions]
            cfg["bitdance"] = {"format": FORMAT, "bitdance_version": __version__, "kind": self.kind,
                               "t2i": t2i, "meta": {k: v for k, v in self.meta.items() if k != "source"}}
            cfg_path.write_text(json.dumps(cfg, indent=2))

        replace_folder(folder, fill)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BitDanceT2IPipeline":
        self.model.to(device=device, dtype=dtype)
        return self

    def compile(self, mode: str | None = None) -> "BitDanceT2IPipeline":
        """``torch.compile`` the vision head's inner loop (see :meth:`BitDancePipeline.compile`)."""
        _compile_head(self.model.vision_head, mode)
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
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str | FlowSampler = "euler_maruyama",
        time_shift: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        use_kv_cache: bool = True,
        decode_chunk_size: int = 16,
    ) -> PipelineOutput:
        """Images for ``prompt`` (one or a list). ``height`` / ``width`` default to
        :attr:`default_resolution`; giving only one makes a square. Guidance is a constant scale
        (1: off; below 1 is refused). ``callback(step, num_steps, partial_latents)`` runs after each AR
        step; ``pipe.decode(partial_latents)`` shows the image so far."""
        _check_call(output_type, guidance_scale, generator, decode_chunk_size)
        height = validation.image_side(height, "height")
        width = validation.image_side(width, "width")
        if height is None and width is None:
            height, width = self.default_resolution
        height = width if height is None else height
        width = height if width is None else width
        h, w = self.config.check_resolution(height, width)
        prompts = self._check_prompts(prompt, h, w)
        latents = self.model.generate(prompts, height=height, width=width,
                                      sampler=self._sampler(sampler, num_inference_steps, time_shift),
                                      guidance_scale=guidance_scale, generator=generator,
                                      use_kv_cache=use_kv_cache, callback=callback)
        return self._finish(latents, output_type, generator, decode_chunk_size)

    @property
    def image_tokenizer(self) -> BinaryTokenizer:
        return self.model.ae

