"""Binary image tokenizer: a CNN autoencoder whose latent channels are quantized by ``sign``.

Module and parameter names follow the official state dicts (``encoder.*`` / ``decoder.*``) so the
released tokenizers load as-is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bitdance import rng
from bitdance.models.config import TokenizerConfig
from bitdance.models.quantizer import BinaryQuantizer, QuantizerOutput

__all__ = ["BinaryTokenizer", "Encoder", "Decoder", "TokenizerOutput", "depth_to_space"]


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(cin), _norm(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


def depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """DCR depth-to-space: channel (a*block + b)*C + c goes to pixel offset (a, b) of channel c."""
    B, C, H, W = x.shape
    c = C // (block * block)
    x = x.view(B, block, block, c, H, W).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(B, c, H * block, W * block)


class Upsampler(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4 * c, 3, padding=1)

    def forward(self, x):
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm whose scale/shift come from the per-channel std/mean of the binary latents."""

    def __init__(self, z_channels: int, c: int, eps: float = 1e-6):
        super().__init__()
        self.gn = nn.GroupNorm(32, c, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, c)
        self.beta = nn.Linear(z_channels, c)
        self.eps = eps

    def forward(self, x, z):
        zf = z.flatten(2)
        # torch's default (unbiased) variance, as the released weights were trained with it.
        # (A 1x1 latent grid falls back to the biased variance instead of NaN.)
        var = zf.var(dim=-1, correction=1 if zf.shape[-1] > 1 else 0)
        scale = self.gamma((var + self.eps).sqrt())
        shift = self.beta(zf.mean(dim=-1))
        return self.gn(x) * scale[:, :, None, None] + shift[:, :, None, None]


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, nres = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(nres):
                level.block.append(ResBlock(cin, ch * m))
                cin = ch * m
            if i < len(mult) - 1:
                level.downsample = nn.Conv2d(cin, cin, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList([ResBlock(cin, cin) for _ in range(nres)])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                x = blk(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        for blk in self.mid_block:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Decoder; with ``cfg.gan_decoder`` it concatenates Gaussian noise to the latents (d32 tokenizers)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, nres, z = cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels
        self.gan = cfg.gan_decoder
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(2 * z if self.gan else z, cin, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(cin, cin) for _ in range(nres)])
        up, adaptive = [], []
        for i in reversed(range(len(mult))):
            adaptive.insert(0, AdaptiveGroupNorm(z, cin))
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(nres):
                level.block.append(ResBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
            if i > 0:
                level.upsample = Upsampler(cin)
            up.insert(0, level)
        self.up, self.adaptive = nn.ModuleList(up), nn.ModuleList(adaptive)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z, *, generator: torch.Generator | None = None):
        style = z
        if self.gan:
            noise = rng.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = torch.cat([z, noise], dim=1)
        x = self.conv_in(z)
        for blk in self.mid_block:
            x = blk(x)
        for i in reversed(range(len(self.up))):
            x = self.adaptive[i](x, style)
            for blk in self.up[i].block:
                x = blk(x)
            if i > 0:
                x = self.up[i].upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor
    latents: torch.Tensor  # {-1,+1} (straight-through in training)
    pre_quant: torch.Tensor
    quant: QuantizerOutput


class BinaryTokenizer(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> binary latents in {-1,+1} (B, d, H/f, W/f)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.down_factor = config.down_factor  # pixels per token side
        self.bits = config.z_channels  # bits per token
        self.quantizer = BinaryQuantizer(
            bits=config.z_channels,
            groups=config.groups,
            entropy_temperature=config.entropy_temperature,
            sample_minimization_weight=config.sample_minimization_weight,
            batch_maximization_weight=config.batch_maximization_weight,
        )

    def _check_images(self, images: torch.Tensor) -> None:
        f, c = self.down_factor, self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"tokenizer expects images of shape (B, {c}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {images.shape[-2]}x{images.shape[-1]} is not divisible by the "
                             f"tokenizer's down factor {f}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> binary latents in {-1,+1}."""
        self._check_images(images)
        return self.quantizer(self.encoder(images), return_loss=False).quantized

    def decode(self, latents: torch.Tensor, *, generator: torch.Generator | None = None,
               chunk_size: int = 0) -> torch.Tensor:
        """Binary latents (B, d, h, w) -> images in roughly [-1, 1]. ``chunk_size`` bounds memory."""
        if latents.dim() != 4 or latents.shape[1] != self.bits:
            raise ValueError(f"tokenizer expects latents of shape (B, {self.bits}, h, w), "
                             f"got {tuple(latents.shape)}")
        if chunk_size and latents.shape[0] > chunk_size:
            return torch.cat([self.decoder(c, generator=generator) for c in latents.split(chunk_size)])
        return self.decoder(latents, generator=generator)

    def forward(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> TokenizerOutput:
        """Encode, quantize (with losses in training mode) and decode."""
        self._check_images(images)
        pre = self.encoder(images)
        q = self.quantizer(pre)
        rec = self.decoder(q.quantized, generator=generator)
        return TokenizerOutput(rec, q.quantized, pre, q)

    def indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> (B, h, w, groups) integer code indices."""
        return self.quantizer.indices(self.encode(images))

    def decode_indices(self, indices: torch.Tensor, **kw) -> torch.Tensor:
        return self.decode(self.quantizer.from_indices(indices).to(self.decoder.conv_in.weight.dtype), **kw)
