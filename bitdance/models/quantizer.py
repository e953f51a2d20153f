"""Lookup-free binary quantizer with the group-wise entropy loss.

Each latent channel is quantized by ``sign`` (x > 0 -> +1, else -1), so a token of d channels is one
of 2^d codes and no codebook is stored. To keep that huge implicit codebook in use, training adds an
entropy loss computed per *group* of d/g channels: 2^(d/g) codes per group stays tractable even when
2^d does not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BinaryQuantizer", "QuantizerOutput", "binarize", "bits_to_indices", "indices_to_bits"]


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # {-1,+1}, straight-through gradient in training
    entropy_loss: torch.Tensor  # per_sample_entropy * w_s - codebook_entropy * w_b
    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor
    commitment: torch.Tensor  # mse(x, sign(x))


def binarize(x: torch.Tensor) -> torch.Tensor:
    """Project onto the hypercube: +1 where x > 0, -1 elsewhere (never 0, unlike ``torch.sign``)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, one, -one)


def bits_to_indices(bits: torch.Tensor, *, groups: int = 1) -> torch.Tensor:
    """(..., d) values in {-1,+1} -> (..., groups) int64 code indices; bit k of a group has weight 2^k."""
    d = bits.shape[-1]
    assert d % groups == 0, f"{d} bits cannot be split into {groups} groups"
    k = d // groups
    assert k <= 62, f"{k} bits per group do not fit an int64 index; use more groups"
    weights = 2 ** torch.arange(k, device=bits.device, dtype=torch.long)
    b = (bits > 0).long().reshape(*bits.shape[:-1], groups, k)
    return (b * weights).sum(-1)


def indices_to_bits(indices: torch.Tensor, *, bits_per_group: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`bits_to_indices`: (..., groups) int64 -> (..., groups * bits_per_group) in {-1,+1}."""
    weights = 2 ** torch.arange(bits_per_group, device=indices.device, dtype=torch.long)
    b = (indices.long().unsqueeze(-1) & weights) != 0
    return (b.to(dtype) * 2 - 1).flatten(-2)


class BinaryQuantizer(nn.Module):
    """Sign quantizer for (B, d, H, W) features with the group-wise entropy loss (no parameters)."""

    def __init__(
        self,
        *,
        bits: int,
        groups: int = 1,
        entropy_temperature: float = 0.01,
        sample_minimization_weight: float = 1.0,
        batch_maximization_weight: float = 1.0,
    ):
        super().__init__()
        assert bits % groups == 0, f"bits={bits} must be divisible by groups={groups}"
        self.bits, self.groups = bits, groups
        self.bits_per_group = bits // groups
        assert self.bits_per_group <= 16, (
            f"{self.bits_per_group} bits per group would need 2^{self.bits_per_group} codes; use more groups"
        )
        self.temperature = entropy_temperature
        self.sample_weight = sample_minimization_weight
        self.batch_weight = batch_maximization_weight
        codes = indices_to_bits(torch.arange(2**self.bits_per_group)[:, None], bits_per_group=self.bits_per_group)
        self.register_buffer("codebook", codes, persistent=False)  # (2^k, k) in {-1,+1}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}"

    def entropy(self, x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample entropy, codebook entropy) of channels-last features x (..., bits)."""
        xg = x.reshape(-1, self.groups, self.bits_per_group).float()
        # A temperature of 0.01 amplifies rounding errors 100x: keep this in fp32 under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = 2.0 * xg @ self.codebook.t() / self.temperature  # (N, g, 2^k)
            probs = logits.softmax(-1)
            # The eps inside log_softmax is a constant shift (a no-op), kept as in the reference code.
            per_sample = -(probs * F.log_softmax(logits + eps, -1)).sum(-1).mean()
            avg = probs.reshape(-1, probs.shape[-1]).mean(0)  # one distribution over tokens and groups
            codebook = -(avg * torch.log(avg + eps)).sum()
        return per_sample, codebook

    def forward(self, x: torch.Tensor, *, return_loss: bool | None = None) -> QuantizerOutput:
        assert x.dim() >= 2 and x.shape[1] == self.bits, (
            f"expected features (B, {self.bits}, ...), got shape {tuple(x.shape)}"
        )
        q = binarize(x)
        zero = x.new_zeros(())
        if return_loss is None:
            return_loss = self.training
        if return_loss:
            xl = x.movedim(1, -1)
            per_sample, codebook = self.entropy(xl)
            entropy_loss = self.sample_weight * per_sample - self.batch_weight * codebook
            commitment = F.mse_loss(x, q.detach())
        else:
            per_sample = codebook = entropy_loss = commitment = zero
        if self.training:
            q = x + (q - x).detach()  # straight-through estimator
        return QuantizerOutput(q, entropy_loss, per_sample, codebook, commitment)

    def indices(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) latents -> (B, H, W, groups) code indices."""
        return bits_to_indices(latents.movedim(1, -1), groups=self.groups)

    def from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W, groups) code indices -> (B, d, H, W) latents in {-1,+1}."""
        return indices_to_bits(indices, bits_per_group=self.bits_per_group).movedim(-1, 1)
