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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import __version__
from .checkpoint import (CheckpointError, _umask, load_file, load_into, load_official_generator,
                         load_tokenizer, save_safetensors)
from .config import BitDanceConfig, ConfigError, TokenizerConfig
from .sampler import FlowSampler
from .tokenizer import BinaryTokenizer
from .transformer import BitDance

__all__ = ["BitDancePipeline", "PipelineOutput", "load_component", "save_tokenizer_folder", "to_uint8", "make_grid"]

FORMAT = "bitdance"


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) uint8 numpy array, or (B, 3, H, W) tensor in [-1, 1]
    latents: torch.Tensor  # (B, d, h, w) binary tokens


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding as the reference evaluation does."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows*H, nrow*W, 3) image, row-major, padded with black."""
    B, H, W, C = images.shape
    rows = -(-B // nrow)
    grid = np.zeros((rows * H, nrow * W, C), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = im
    return grid


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (not a bitdance model folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a bitdance config (format={cfg.get('format') if isinstance(cfg, dict) else None!r})")
    return cfg


def load_component(folder: str | os.PathLike, name: str) -> torch.nn.Module:
    """Load ``tokenizer`` or ``generator`` from one of our folders."""
    folder = Path(folder)
    cfg = _read_config(folder)
    if name not in cfg:
        raise CheckpointError(f"{folder}: has no {name} (kind={cfg.get('kind')!r})")
    try:
        if name == "tokenizer":
            module = BinaryTokenizer(TokenizerConfig.from_dict(cfg["tokenizer"]))
        else:
            module = BitDance(BitDanceConfig.from_dict(cfg["generator"]))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder}/config.json: invalid {name} config: {e}") from None
    weights = folder / f"{name}.safetensors"
    load_into(module, load_file(weights), what=f"{name} {weights}")
    return module.eval()


def _write_folder(folder: str | os.PathLike, config: dict, modules: dict[str, torch.nn.Module]) -> None:
    """Write ``config.json`` and ``<name>.safetensors`` into a fresh sibling folder, then swap it in."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, module in modules.items():
            save_safetensors(module.state_dict(), tmp / f"{name}.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.chmod(tmp, 0o777 & ~_umask())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tokenizer_folder(tokenizer: BinaryTokenizer, folder: str | os.PathLike, *, meta: dict | None = None) -> None:
    """A tokenizer in our format: config.json (kind "tokenizer") + tokenizer.safetensors."""
    cfg = {"format": FORMAT, "bitdance_version": __version__, "kind": "tokenizer",
           "tokenizer": tokenizer.config.to_dict(), "meta": dict(meta or {})}
    _write_folder(folder, cfg, {"tokenizer": tokenizer})


class BitDancePipeline:
    """Class-conditional BitDance: generator + tokenizer."""

    def __init__(self, generator: BitDance, tokenizer: BinaryTokenizer, *, meta: dict | None = None):
        if generator.config.tokenizer.z_channels != tokenizer.config.z_channels:
            raise ConfigError(f"generator tokens have {generator.config.latent_dim} bits but the tokenizer "
                              f"has {tokenizer.config.z_channels}")
        if generator.config.down_size != tokenizer.down_factor:
            raise ConfigError(f"generator expects a {generator.config.down_size}x tokenizer, "
                              f"got {tokenizer.down_factor}x")
        self.generator, self.tokenizer = generator.eval(), tokenizer.eval()
        self.meta = dict(meta or {})

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                        use_ema: bool = True, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "BitDancePipeline":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_dir():
            cfg = _read_config(path)
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
        _write_folder(folder, cfg, {"generator": self.generator, "tokenizer": self.tokenizer})

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BitDancePipeline":
        self.generator.to(device=device, dtype=dtype)
        self.tokenizer.to(device=device, dtype=dtype)
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
        if (height or size) != size or (width or size) != size:
            raise ValueError(f"this model generates {size}x{size} images; got height={height}, width={width}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels,
                                 dtype=torch.long).flatten()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
            raise ValueError(f"class labels must be in [0, {cfg.num_classes - 1}], got {labels.tolist()}")
        if not isinstance(sampler, FlowSampler):
            sampler = FlowSampler(num_steps=num_inference_steps, method=sampler,
                                  time_shift=cfg.time_shift if time_shift is None else time_shift)
        latents = self.generator.generate(
            labels.to(self.device), sampler=sampler, guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule, generator=generator, use_kv_cache=use_kv_cache,
            callback=callback)
        if output_type == "latent":
            return PipelineOutput(images=latents, latents=latents)
        images = self.decode(latents, generator=generator, chunk_size=decode_chunk_size)
        if output_type == "pt":
            return PipelineOutput(images=images.clamp(-1, 1), latents=latents)
        arr = to_uint8(images).numpy()
        if output_type == "np":
            return PipelineOutput(images=arr, latents=latents)
        from PIL import Image

        return PipelineOutput(images=[Image.fromarray(a) for a in arr], latents=latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, generator=None, chunk_size: int = 16) -> torch.Tensor:
        return self.tokenizer.decode(latents.to(self.dtype), generator=generator, chunk_size=chunk_size).float()
