"""Random draws that follow the ``torch.Generator`` a user passes, wherever the tensors live.

``torch.randn(..., generator=g, device="cuda")`` refuses a CPU generator. Like diffusers, a CPU generator
may drive sampling on a GPU: the numbers are drawn on the CPU and moved, so one seed gives the same noise
on every device (the results still differ by the devices' arithmetic). A generator on a GPU must match the
tensors' device type.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["randn", "rand", "multinomial", "check_generator"]


def check_generator(generator: torch.Generator | None, device: torch.device | str | None) -> None:
    """Refuse a GPU generator for tensors elsewhere, with a message that says what to pass instead."""
    if generator is None or device is None:
        return
    device = torch.device(device)
    if generator.device.type not in ("cpu", device.type):
        raise ValueError(f"a {generator.device} torch.Generator cannot draw {device} tensors; "
                         f"pass torch.Generator() (CPU, same noise on every device) or torch.Generator('{device}')")


def _draw(fn: Callable, shape: Sequence[int], generator, device, dtype) -> torch.Tensor:
    device = torch.device(device) if device is not None else None
    if generator is None or device is None or generator.device.type == device.type:
        return fn(tuple(shape), generator=generator, device=device, dtype=dtype)
    check_generator(generator, device)
    x = fn(tuple(shape), generator=generator, dtype=dtype)
    if device.type == "cuda":  # pinned + non_blocking: the host does not wait for the GPU's queue
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def randn(shape: Sequence[int], *, generator: torch.Generator | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal samples of ``shape`` on ``device``, drawn with ``generator`` on its own device."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], *, generator: torch.Generator | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform [0, 1) samples of ``shape`` on ``device``, drawn with ``generator`` on its own device."""
    return _draw(torch.rand, shape, generator, device, dtype)


def multinomial(probs: torch.Tensor, num_samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.multinomial`` of (rows, K) ``probs``, drawn on the generator's device, returned on probs'."""
    if generator is None or generator.device.type == probs.device.type:
        return torch.multinomial(probs, num_samples, generator=generator)
    check_generator(generator, probs.device)
    return torch.multinomial(probs.cpu(), num_samples, generator=generator).to(probs.device)
