"""Image tensors and arrays: the uint8 conversion the reference evaluation uses, and sample grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["Images", "as_nchw", "to_uint8", "make_grid"]

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
