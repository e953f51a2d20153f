"""Which tokens an edit regenerates.

An edit encodes the user's image, keeps some tokens and samples the rest with the same loop as generation
(:class:`~bitdance.sampling.autoregressive.KnownTokens`). This module turns what the user gives into the
token mask: a pixel mask (a token is regenerated when more than ``threshold`` of its pixels are masked;
0 means any pixel), a margin along the generation order, and the masks of variations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitdance import rng

__all__ = ["VARIATIONS", "token_mask", "with_margin", "variation_mask"]

# How a variation picks what to regenerate (strength in [0, 1] is the share): random tokens, random AR
# blocks, the last tokens in generation order (the first ones kept), or every token with the fed-back
# tokens perturbed by bit flips at rate `strength` (the model's own training noise; see the pipelines).
VARIATIONS = ("random", "blocks", "tail", "flip")


def token_mask(mask: torch.Tensor, down_factor: int, *, threshold: float = 0.0) -> torch.Tensor:
    """(B, H, W) pixel mask (True or > 0: regenerate) -> (B, H/f, W/f) bool: True where a token is
    regenerated, i.e. where more than ``threshold`` of its f x f pixels are masked."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"mask_threshold must be in [0, 1), got {threshold}")
    frac = F.avg_pool2d(mask.float().clamp(0, 1)[:, None], down_factor)[:, 0]
    return frac > threshold


def with_margin(regen: torch.Tensor, order: torch.Tensor, margin: int) -> torch.Tensor:
    """``regen`` (B, h, w) plus the ``margin`` tokens that follow each regenerated token in generation order
    (``order[n]`` = raster index of the n-th generated token): the tokens just after a region are resampled
    with it, which softens the seam where a kept token cannot see the region's new content."""
    if margin <= 0:
        return regen
    B, h, w = regen.shape
    flat = regen.reshape(B, h * w)
    order = order.to(flat.device)
    in_order = flat[:, order].float()
    grown = F.max_pool1d(F.pad(in_order[:, None], (margin, 0)), margin + 1, stride=1)[:, 0] > 0
    out = torch.zeros_like(flat)
    out[:, order] = grown
    return out.reshape(B, h, w)


def variation_mask(strength: float, method: str, *, batch: int, grid: tuple[int, int], order: torch.Tensor,
                   parallel_num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, h, w) bool: the tokens a variation of ``strength`` regenerates (``method`` in :data:`VARIATIONS`;
    "flip" regenerates every token)."""
    if method not in VARIATIONS:
        raise ValueError(f"variation must be one of {list(VARIATIONS)}, got {method!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    h, w = grid
    n = h * w
    order = order.cpu()
    if method == "flip":
        return torch.ones(batch, h, w, dtype=torch.bool)
    if method == "random":
        regen_in_order = rng.rand((batch, n), generator=generator).cpu() < strength
    elif method == "blocks":
        blocks = rng.rand((batch, n // parallel_num), generator=generator).cpu() < strength
        regen_in_order = blocks.repeat_interleave(parallel_num, dim=1)
    else:  # tail: whole blocks from the end
        kept_blocks = round((1.0 - strength) * (n // parallel_num))
        regen_in_order = torch.zeros(batch, n, dtype=torch.bool)
        regen_in_order[:, kept_blocks * parallel_num:] = True
    out = torch.zeros(batch, n, dtype=torch.bool)
    out[:, order] = regen_in_order
    return out.reshape(batch, h, w)
