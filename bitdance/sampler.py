"""Rectified-flow samplers for the binary diffusion head (separate from the models, diffusers-style).

Time runs from t = 0 (pure noise) to t = 1 (data). The head predicts the clean sample x, and the
velocity is v = (x_pred - x_t) / max(1 - t, 0.05). The official sampler integrates on
``linspace(0, 1 - last_step_size, num_steps + 1)`` with Euler-Maruyama steps and finishes with one
deterministic Euler step of size ``last_step_size``; classifier-free guidance acts on the velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

__all__ = ["FlowSampler", "time_shift", "guidance_at"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_shift(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """SANA-style shift of flow times; shift > 1 spends more steps near the noise end."""
    return (1 / shift) / ((1 / shift) + (1 / t - 1))


def guidance_at(scale: float, step: int, num_steps: int, schedule: str = "linear") -> float:
    """Guidance scale at autoregressive step ``step`` of ``num_steps``.

    "linear" ramps from 1 (no guidance) at the first step towards ``scale`` (official default);
    "constant" uses ``scale`` throughout.
    """
    if scale <= 1.0:
        return 1.0
    if schedule == "constant":
        return float(scale)
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * step / num_steps
    raise ValueError(f"unknown guidance schedule {schedule!r}; use 'linear' or 'constant'")


@dataclass(frozen=True)
class FlowSampler:
    """Euler-Maruyama (official default) or plain Euler integration of the head's flow."""

    num_steps: int = 50
    method: Literal["euler_maruyama", "euler"] = "euler_maruyama"
    last_step_size: float = 0.05
    time_shift: float = 1.0

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.method not in ("euler_maruyama", "euler"):
            raise ValueError(f"unknown sampling method {self.method!r}; use 'euler_maruyama' or 'euler'")
        if not 0.0 < self.last_step_size < 1.0:
            raise ValueError(f"last_step_size must be in (0, 1), got {self.last_step_size}")

    def timesteps(self, device=None) -> torch.Tensor:
        t = torch.linspace(0, 1 - self.last_step_size, self.num_steps + 1, device=device, dtype=torch.float32)
        return time_shift(t, self.time_shift)

    @property
    def num_function_evals(self) -> int:
        return self.num_steps + 1

    @torch.no_grad()
    def sample(
        self,
        denoise: Denoiser,
        shape: tuple[int, ...],
        *,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Integrate from noise of ``shape`` to (continuous) samples.

        ``denoise(x_in, t)`` returns the predicted clean sample for ``x_in``; ``t`` is a 0-d float32
        tensor. With ``guidance_scale > 1`` the denoiser receives ``[x, x]`` (conditional rows first,
        then unconditional rows) and the guided velocity is ``u + s * (c - u)``.
        """
        guided = guidance_scale > 1.0
        mult = 2 if guided else 1
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        dts = self.timesteps(x.device).diff()
        t = torch.zeros((), device=x.device, dtype=torch.float32)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = torch.cat([x] * mult) if guided else x
            v = (denoise(x_in, t).float() - x_in) / (1 - t).clamp_min(0.05)
            if guided:
                cond, uncond = v.chunk(2)
                v = uncond + guidance_scale * (cond - uncond)
            return v

        stochastic = self.method == "euler_maruyama"
        for i in range(self.num_steps):
            v = velocity(x, t)
            dt = dts[i]
            if stochastic:
                # Score of the Gaussian path x_t = t x + (1 - t) eps, written as in the reference code.
                score = (t * v - x) / ((1 - t) ** 2 + t * (1 - t))
                drift = v + (1 - t) * score
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + drift * dt + (2.0 * (1.0 - t) * dt).sqrt() * noise
            else:
                x = x + v * dt
            t = t + dt
        t_last = torch.full((), 1 - self.last_step_size, device=x.device, dtype=torch.float32)
        return x + velocity(x, t_last) * self.last_step_size
