"""The attention pattern of next-patch prediction, built in one place for every model and for training.

Positions belong to *blocks*: each causal position (a class token, a text token) is a block of its own, and
after them every P positions form one block. A position sees every earlier position and its whole block,
so the P tokens of one AR step see each other (the paper's bidirectional block) and nothing later.
"""

from __future__ import annotations

import torch

__all__ = ["block_ids", "block_mask", "block_causal_mask"]


def block_ids(length: int, num_causal: int, block: int, device=None) -> torch.Tensor:
    """(length,) block id of each position: the first ``num_causal`` one each, then ``block`` per id."""
    pos = torch.arange(length, device=device)
    return torch.where(pos < num_causal, pos, num_causal + torch.div(pos - num_causal, block, rounding_mode="floor"))


def block_mask(blocks: torch.Tensor) -> torch.Tensor:
    """Boolean (L, L) from (L,) non-decreasing block ids, True = may attend: earlier positions and the
    query's own block."""
    pos = torch.arange(blocks.shape[0], device=blocks.device)
    return (pos[None, :] <= pos[:, None]) | (blocks[None, :] == blocks[:, None])


def block_causal_mask(length: int, num_causal: int, block: int, device=None) -> torch.Tensor:
    """Boolean (length, length), True = may attend: causal for the first ``num_causal`` positions,
    then blocks of ``block`` positions that see each other and everything before."""
    return block_mask(block_ids(length, num_causal, block, device=device))
