"""How an image is made: the next-patch loop that every BitDance model runs.

An image is a grid of h x w binary tokens (d bits each). They are generated P at a time, in the model's
generation order (p x p patches in raster order, raster order inside a patch), in h*w/P autoregressive
steps. One step:

1. the model turns everything generated so far into a *condition* for each of the next P tokens
   (a transformer with a KV cache: the model's side, behind :class:`BlockSource`);
2. the head samples the d bits of those P tokens jointly from the condition (the binary diffusion head:
   rectified flow, guided with the scale of this step; or one of the classification heads);
3. the samples are projected onto the hypercube with ``sign`` (:func:`binarize_sample`), written into
   the grid and fed back.

Guidance runs the unconditional sequences in the same batch: rows 0..B-1 are conditional, rows B..2B-1
unconditional. Where the step's scale is above 1 the head returns one sample per image and both halves
are fed the same tokens (the authors' code does the same); where it is 1 (the first steps of the linear
schedule) the head samples the two halves independently.

The class-conditional model (:meth:`bitdance.BitDance.generate`) and the text-to-image model
(:meth:`bitdance.models.t2i.BitDanceT2I.generate`) differ only in their :class:`BlockSource`.

Editing (:class:`KnownTokens`) runs the same loop: tokens the edit keeps are written into the grid from the
start and fed back when their block comes, exactly as encoded (a block that is kept whole is never sampled);
the rest is sampled as usual. In generation order a regenerated token sees only the tokens before it, so
kept tokens after a region cannot steer it: that is the causal limit of editing an AR model without
retraining (``docs/editing.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bitdance.sampling.flow import FlowSampler, guidance_at

__all__ = ["BlockSource", "KnownTokens", "binarize_sample", "generate_blocks"]


class BlockSource(Protocol):
    """The model's side of the loop: conditions for the head, one block of P tokens at a time."""

    def first(self) -> torch.Tensor:
        """Condition (R, P, width) of block 0, from the prefix alone (class or text tokens)."""

    def next(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the tokens (R, P, d) of block ``block``; return the condition of block ``block + 1``."""


@dataclass
class KnownTokens:
    """What an edit keeps. ``tokens`` (B, d, h, w) in {-1, +1} (the encoded image), ``keep`` (B, h, w) bool:
    True where a token is kept, False where it is regenerated. ``feed`` (B, d, h, w), if given, is fed back
    in place of every block's sampled tokens (teacher forcing, e.g. with bit flips for variations); the
    output still holds the samples."""

    tokens: torch.Tensor
    keep: torch.Tensor
    feed: torch.Tensor | None = None

    def check(self, batch: int, latent_dim: int, grid: tuple[int, int]) -> None:
        h, w = grid
        if tuple(self.tokens.shape) != (batch, latent_dim, h, w):
            raise ValueError(f"known tokens must be ({batch}, {latent_dim}, {h}, {w}), got {tuple(self.tokens.shape)}")
        if tuple(self.keep.shape) != (batch, h, w) or self.keep.dtype != torch.bool:
            raise ValueError(f"keep must be a ({batch}, {h}, {w}) bool tensor, got {tuple(self.keep.shape)} "
                             f"{self.keep.dtype}")
        if self.feed is not None and self.feed.shape != self.tokens.shape:
            raise ValueError(f"feed must have the shape of the known tokens, got {tuple(self.feed.shape)}")


def _raster(x: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B, h*w, d)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def binarize_sample(sample: torch.Tensor) -> torch.Tensor:
    """The head's samples onto {-1, +1}: ``sign``, as the authors' samplers do (an exact 0, which a
    continuous sample reaches with probability zero, stays 0 there too)."""
    return torch.sign(sample)


def generate_blocks(source: BlockSource, head: Any, *, batch: int, grid: tuple[int, int], order: torch.Tensor,
                    parallel_num: int, latent_dim: int, sampler: FlowSampler | None = None,
                    guidance_scale: float = 1.0, guidance_schedule: str = "constant",
                    generator: torch.Generator | None = None,
                    callback: Callable[[int, int, torch.Tensor], None] | None = None,
                    head_kwargs: dict[str, Any] | None = None, device=None,
                    known: KnownTokens | None = None) -> torch.Tensor:
    """Binary latents (batch, latent_dim, h, w) generated block by block (see the module docstring).

    ``order[n]`` is the raster index (row * w + col) of the n-th generated token. ``head.sample(cond,
    sampler=, guidance_scale=, generator=, **head_kwargs)`` samples a block; ``callback(step, num_steps,
    latents_so_far)`` runs after each step with the grid so far (tokens not generated yet are 0; kept
    tokens of an edit are there from the start).
    """
    h, w = grid
    P, B = parallel_num, batch
    num_steps = (h * w) // P
    latents = torch.zeros(B, h * w, latent_dim, device=device)
    keep = feed = kept_tokens = None
    if known is not None:
        known.check(B, latent_dim, grid)
        kept_tokens = _raster(known.tokens).to(latents.device, latents.dtype)
        keep = known.keep.reshape(B, h * w).to(latents.device)
        feed = _raster(known.feed).to(latents.device, latents.dtype) if known.feed is not None else None
        latents[keep] = kept_tokens[keep]

    def spatial() -> torch.Tensor:
        return latents.view(B, h, w, latent_dim).permute(0, 3, 1, 2).contiguous()

    order = order.to(latents.device)
    cond = source.first()
    for step in range(num_steps):
        idx = order[step * P:(step + 1) * P]
        rows = cond.shape[0]
        block_keep = None if keep is None else keep[:, idx]
        if block_keep is not None:
            block_known = kept_tokens[:, idx].repeat(rows // B, 1, 1)
        if block_keep is not None and feed is None and bool(block_keep.all()):
            tokens = block_known  # kept whole: nothing to sample
        else:
            scale = guidance_at(guidance_scale, step, num_steps, guidance_schedule)
            sample = head.sample(cond, sampler=sampler, guidance_scale=scale, generator=generator,
                                 **(head_kwargs or {}))
            tokens = binarize_sample(sample)
            if tokens.shape[0] != rows:  # guided: one sample per image, fed to both halves
                tokens = torch.cat([tokens] * (rows // tokens.shape[0]))
            if block_keep is not None:
                k = block_keep.repeat(rows // B, 1).unsqueeze(-1)
                tokens = torch.where(k, block_known.to(tokens.dtype), tokens)
        latents[:, idx] = tokens[:B].to(latents.dtype)
        if callback is not None:
            callback(step, num_steps, spatial())
        if step + 1 < num_steps:
            fed = tokens if feed is None else feed[:, idx].repeat(rows // B, 1, 1).to(tokens.dtype)
            cond = source.next(step, fed)
    return spatial()
