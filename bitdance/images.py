"""Image tensors and arrays: the uint8 conversion the reference evaluation uses, and sample grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["Images", "as_nchw", "to_uint8", "make_grid", "image_tensor", "mask_tensor"]

# What the metrics take: (N, H, W, 3) uint8 or (N, 3, H, W) float in [-1, 1], or a list of uint8 (H, W, 3)
# arrays of different sizes.
Images = np.ndarray | torch.Tensor | Sequence[np.ndarray]


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


def as_nchw(images) -> torch.Tensor | list[torch.Tensor]:
    """Check an image batch and view it as NCHW (uint8 or float), without converting all of it."""
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            t = torch.as_tensor(np.asarray(im))
            if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[-1] != 3:
                raise ValueError(f"a list of images must hold uint8 (H, W, 3) arrays, "
                                 f"got {t.dtype} {tuple(t.shape)}")
            out.append(t.permute(2, 0, 1)[None])
        return out
    t = torch.as_tensor(images)
    if t.dim() != 4:
        raise ValueError(f"expected a batch of images (N, H, W, 3) uint8 or (N, 3, H, W) float, "
                         f"got {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        if t.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC with 3 channels, got {tuple(t.shape)}")
        return t.permute(0, 3, 1, 2)
    if t.dtype.is_floating_point:
        if t.shape[1] != 3:
            raise ValueError(f"float images must be NCHW with 3 channels in [-1, 1], got {tuple(t.shape)}")
        return t.detach()
    raise TypeError(f"images must be uint8 (NHWC) or float (NCHW, [-1, 1]), got {t.dtype}")


def image_tensor(image) -> torch.Tensor:
    """One image or a batch, as a user gives it, -> (B, 3, H, W) float in [-1, 1]: a PIL image, a uint8 array
    (H, W, 3) / (B, H, W, 3) (grey (H, W) too), or a float tensor (3, H, W) / (B, 3, H, W) in [-1, 1]."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 (H, W, 3), got {image.dtype}")
        t = torch.from_numpy(np.array(image))  # a copy: PIL arrays are read-only
        if t.dim() == 2:
            t = t[..., None].expand(*t.shape, 3)
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3) or (B, H, W, 3) uint8, "
                             f"got {tuple(image.shape)}")
        return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] != 3 or not t.dtype.is_floating_point:
            raise ValueError(f"an image tensor must be float (3, H, W) or (B, 3, H, W) in [-1, 1], got "
                             f"{t.dtype} {tuple(image.shape)}")
        return t.float().clamp(-1, 1)
    raise TypeError(f"image must be a PIL image, a uint8 array or a float tensor, got {type(image).__name__}")


def mask_tensor(mask) -> torch.Tensor:
    """A mask as a user gives it -> (B, H, W) float in [0, 1] (1: regenerate): a PIL image (any non-zero
    channel counts, e.g. white paint on black, or paint on a transparent layer), a bool / uint8 / float
    array or tensor (H, W) or (B, H, W)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:  # paint on a transparent layer
            canvas = Image.new("RGBA", mask.size, (0, 0, 0, 255))
            canvas.alpha_composite(mask.convert("RGBA"))
            mask = canvas
        mask = np.asarray(mask.convert("RGB")).max(axis=-1)  # any non-zero channel: regenerate
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a PIL image, an array or a tensor, got {type(mask).__name__}")
    t = mask.detach()
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"mask must be (H, W) or (B, H, W), got {tuple(mask.shape)}")
    if t.dtype == torch.bool:
        return t.float()
    if t.dtype == torch.uint8:
        return (t > 0).float()
    if t.dtype.is_floating_point:
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError("a float mask must lie in [0, 1] (1: regenerate)")
        return t.float()
    return (t != 0).float()
