"""Image tensors and arrays: the uint8 conversion the reference evaluation uses, and sample grids."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "make_grid"]


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
