"""Sequential offload: a model larger than the accelerator's memory, with its big parts visiting it one at a time.

The weights of each *unit* (an LLM decoder layer, the diffusion head, the image tokenizer) live in host memory
(pinned where the device is a GPU, so copies run asynchronously); a unit's weights are copied to the device
right before it runs and dropped right after, which costs one host-to-device copy per use and no copy back.
Everything else (embeddings, final norm, projector) stays on the device. For the 14B text-to-image model the
device then holds one decoder layer (0.66 GB in bf16), the head (3.5 GB; 1.75 GB in int8) during its flow
steps, the KV cache and activations, instead of 34 GB.

The head runs all its flow steps of one AR step per visit, so it is copied once per AR step, not per flow
step; the LLM's layers are copied once per AR step each (prefill included).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["OffloadedUnit", "enable_sequential_offload", "offloaded_units", "to_device_except"]


class OffloadedUnit:
    """The weights of ``module`` kept in host memory and brought to ``device`` inside ``with unit:``."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, torch.device(device)
        self.visits = 0
        self._depth = 0
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._slots: list[tuple[dict, str, torch.Tensor]] = []
        for m in module.modules():
            for table in (m._parameters, m._buffers):
                for name, t in table.items():
                    if t is None:
                        continue
                    host = t.data.cpu()
                    if pin:
                        host = host.pin_memory()
                    self._set(table, name, host)
                    self._slots.append((table, name, host))

    @staticmethod
    def _set(table: dict, name: str, value: torch.Tensor) -> None:
        t = table[name]
        if isinstance(t, nn.Parameter):
            t.data = value
        else:
            table[name] = value

    def __enter__(self) -> nn.Module:
        self._depth += 1
        if self._depth == 1:
            self.visits += 1
            for table, name, host in self._slots:
                self._set(table, name, host.to(self.device, non_blocking=True))
        return self.module

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for table, name, host in self._slots:  # the device copies are dropped, the host ones kept
                self._set(table, name, host)


def _around(unit: OffloadedUnit, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with unit:
            return fn(*args, **kwargs)

    return call


def _forward_hooks(unit: OffloadedUnit) -> None:
    def enter(module, args):  # a pre-hook's return value would replace the arguments
        unit.__enter__()

    def leave(module, args, out):
        unit.__exit__(None, None, None)

    unit.module.register_forward_pre_hook(enter)
    unit.module.register_forward_hook(leave)


def enable_sequential_offload(model: nn.Module, device: str | torch.device, *, ae: bool = True
                              ) -> list[OffloadedUnit]:
    """Run a :class:`~bitdance.models.t2i.BitDanceT2I` on ``device`` with its decoder layers, head and (``ae``)
    image tokenizer offloaded (see the module's doc; ``ae=False`` leaves the tokenizer on the host, where images
    are then decoded); the LLM's text output layer, which generation never calls, stays on the host. Returns the
    units (``visits`` counts their trips to the device)."""
    device = torch.device(device)
    llm = model.llm
    units = [OffloadedUnit(layer, device) for layer in llm.model.layers]
    for unit in units:
        _forward_hooks(unit)
    head = OffloadedUnit(model.vision_head, device)
    model.vision_head.sample = _around(head, model.vision_head.sample)
    units.append(head)
    if model.ae is not None and ae:
        unit = OffloadedUnit(model.ae, device)
        model.ae.decode = _around(unit, model.ae.decode)
        model.ae.execution_device = device
        units.append(unit)
    stay = {id(u.module) for u in units} | {id(llm.get_output_embeddings()), id(model.ae)}
    to_device_except(model, device, stay)
    model.offload_units = units
    return units


def offloaded_units(model: nn.Module) -> list[OffloadedUnit]:
    return list(getattr(model, "offload_units", []))


def to_device_except(module: nn.Module, device, keep: set[int]) -> None:
    """Move ``module`` to ``device`` leaving the submodules whose id() is in ``keep`` where they are, without
    ever moving those (so they never take device memory, not even briefly)."""
    if device is None or id(module) in keep:
        return
    if not any(id(m) in keep for m in module.modules()):
        module.to(device)
        return
    for child in module.children():
        to_device_except(child, device, keep)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        module._buffers[name] = b.to(device)
