"""Rectified-flow samplers for the binary diffusion head (separate from the models, diffusers-style).

Time runs from t = 0 (pure noise) to t = 1 (data). The head predicts the clean sample x, and the
velocity is v = (x_pred - x_t) / max(1 - t, 0.05). The official sampler integrates on
``linspace(0, 1 - last_step_size, num_steps + 1)`` with Euler-Maruyama steps and finishes with one
deterministic Euler step of size ``last_step_size``; classifier-free guidance acts on the velocity.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from bitdance import rng, validation

__all__ = ["FlowSampler", "time_shift", "guidance_at", "guided_velocity", "flow_update", "integrate"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


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
        validation.flow_steps(self.num_steps, "num_steps")
        if self.method not in ("euler_maruyama", "euler"):
            raise ValueError(f"unknown sampling method {self.method!r}; use 'euler_maruyama' or 'euler'")
        if not 0.0 < self.last_step_size < 1.0:
            raise ValueError(f"last_step_size must be in (0, 1), got {self.last_step_size}")
        validation.number(self.time_shift, "time_shift", 1e-3, 1e3)

    def timesteps(self, device=None) -> torch.Tensor:
        t = torch.linspace(0, 1 - self.last_step_size, self.num_steps + 1, device=device, dtype=torch.float32)
        return time_shift(t, self.time_shift)

    def flow_times(self, device=None) -> torch.Tensor:
        """The num_steps + 1 flow times at which :meth:`sample` evaluates the denoiser, in order (once each):
        the grid's times accumulated step by step in float32, as the loop does, then 1 - last_step_size.
        Callers may precompute what depends on the time alone (the head's adaLN outputs). Kept per device:
        the head and the loop both ask at every AR step, and the grid never changes (the sampler is frozen)."""
        return _flow_times(self, str(torch.device(device) if device is not None else "cpu")).clone()

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
        step: Step | None = None,
    ) -> torch.Tensor:
        """Integrate from noise of ``shape`` to (continuous) samples.

        ``denoise(x_in, t)`` returns the predicted clean sample for ``x_in``; ``t`` is a 0-d float32
        tensor. With ``guidance_scale > 1`` the denoiser receives ``[x, x]`` (conditional rows first,
        then unconditional rows) and the guided velocity is ``u + s * (c - u)``.
        ``step(x, t, dt, noise)``, if given, replaces one update ``flow_update(x, guided_velocity(denoise, x,
        t, guidance_scale), t, dt, noise)`` by an equivalent one (e.g. compiled as a whole); its ``noise`` is
        None for deterministic steps and its ``t``, ``dt`` are 0-d float32 tensors.
        """
        x, noises = self.draws(shape, generator=generator, device=device)
        times, dts = self.flow_times(x.device), self.step_sizes(x.device)
        if step is None:
            guided = guidance_scale > 1.0
            return integrate(lambda z, i: guided_velocity(denoise, z, times[i], guidance_scale, guided),
                             x, noises, times, dts)
        for i in range(self.num_steps):
            x = step(x, times[i], dts[i], None if noises is None else noises[i])
        return step(x, times[-1], dts[-1], None)  # the last, deterministic Euler step to t = 1

    def draws(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything :meth:`sample` draws, in its order: the starting noise of ``shape`` (float32) and, for
        Euler-Maruyama, the noise of each stochastic step stacked to (num_steps, *shape) (None for Euler).
        Each is drawn on its own, as the reference code draws them step by step: the network draws nothing, so
        a seed gives the same numbers drawn up front (and a sampler loop compiled as a whole can take them)."""
        x = rng.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if self.method != "euler_maruyama":
            return x, None
        noise = [rng.randn(shape, generator=generator, device=x.device, dtype=x.dtype) for _ in range(self.num_steps)]
        return x, torch.stack(noise)

    def step_sizes(self, device=None) -> torch.Tensor:
        """The num_steps + 1 step sizes that go with :meth:`flow_times`: the grid's, then ``last_step_size``."""
        return _step_sizes(self, str(torch.device(device) if device is not None else "cpu")).clone()


def integrate(velocity: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, noises: torch.Tensor | None,
              times: torch.Tensor, dts: torch.Tensor) -> torch.Tensor:
    """:meth:`FlowSampler.sample`'s loop on its draws (:meth:`FlowSampler.draws`), with no state outside its
    arguments, so that ``torch.compile`` can trace it whole. ``velocity(x, i)`` is the (guided) velocity at
    ``times[i]``. Every time but the last takes an Euler-Maruyama step of ``dts[i]`` with ``noises[i]`` (plain
    Euler where ``noises`` is None); the last a deterministic Euler step of ``dts[-1]`` to t = 1."""
    last = times.shape[0] - 1
    for i in range(last):
        x = flow_update(x, velocity(x, i), times[i], dts[i], None if noises is None else noises[i])
    return flow_update(x, velocity(x, last), times[last], dts[last])


@functools.lru_cache(maxsize=32)
def _step_sizes(sampler: FlowSampler, device: str) -> torch.Tensor:
    last = torch.full((1,), sampler.last_step_size, device=device, dtype=torch.float32)
    return torch.cat([sampler.timesteps(device).diff(), last])


@functools.lru_cache(maxsize=32)
def _flow_times(sampler: FlowSampler, device: str) -> torch.Tensor:
    dts = sampler.timesteps(device).diff()
    t = torch.zeros((), device=device, dtype=torch.float32)
    out = []
    for i in range(sampler.num_steps):
        out.append(t)
        t = t + dts[i]
    out.append(torch.full((), 1 - sampler.last_step_size, device=device, dtype=torch.float32))
    return torch.stack(out)


def guided_velocity(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor,
                    guidance_scale: float | torch.Tensor = 1.0, guided: bool | None = None) -> torch.Tensor:
    """Velocity of x-prediction, v = (x_pred - x) / max(1 - t, 0.05), with classifier-free guidance
    ``u + s * (c - u)`` when guided (``guided`` defaults to ``guidance_scale > 1`` for a float scale;
    a tensor scale, as compiled code passes it, needs ``guided`` given)."""
    if guided is None:
        guided = float(guidance_scale) > 1.0
    x_in = torch.cat([x, x]) if guided else x
    v = (denoise(x_in, t).float() - x_in) / (1 - t).clamp_min(0.05)
    if guided:
        cond, uncond = v.chunk(2)
        v = uncond + guidance_scale * (cond - uncond)
    return v


def flow_update(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """One step from t to t + dt: Euler-Maruyama with ``noise``, plain Euler without."""
    if noise is None:
        return x + v * dt
    # Score of the Gaussian path x_t = t x + (1 - t) eps, written as in the reference code.
    score = (t * v - x) / ((1 - t) ** 2 + t * (1 - t))
    drift = v + (1 - t) * score
    return x + drift * dt + (2.0 * (1.0 - t) * dt).sqrt() * noise
