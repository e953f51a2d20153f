"""The process group a training run sees: one process by default, every rank under torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["Dist"]


class Dist:
    """The process group as seen by this process (world size 1 without torchrun)."""

    def __init__(self, device: str = ""):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device:
            self.device = torch.device(device)
            if self.device.type == "cuda" and self.device.index is None:  # torchrun: one GPU per local rank
                self.device = torch.device("cuda", local)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def barrier(self):
        if self.enabled:
            dist.barrier()
