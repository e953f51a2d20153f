"""Training of binary tokenizers, class-conditional BitDance generators and text-to-image models.

One script for one CPU process or many devices::

    python -m bitdance.training tokenizer --data mnist --out runs/tok
    python -m bitdance.training generator --data mnist --tokenizer runs/tok/tokenizer --out runs/gen
    python -m bitdance.training t2i --data twemoji --tokenizer runs/tok/tokenizer --text-tokenizer QWEN_TOK \
        --llm-config '{"hidden_size": 256, "num_hidden_layers": 4}' --resolutions 32x32:3,16x16:1 --out runs/t2i
    torchrun --nproc_per_node 8 -m bitdance.training generator ... [--fsdp]

(``bitdance train-tokenizer`` / ``bitdance train`` / ``bitdance train-t2i`` are the same entry points.)

Determinism is by construction: the data order and every random draw of a step (bit flips, label
drop, flow times and noise, dropout) are pure functions of (seed, step, micro-batch). The global
batch is cut into micro-batches that are spread over the ranks, so a run on W processes computes
the same step as one process on the same global batch, and a resumed run continues exactly where
the killed one stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bitdance.files import atomic_write, remove_stale_temps
from bitdance.formats.weights import load_file
from bitdance.precision import auto_precision, bf16_supported
from bitdance.training.config import (
    RUN_CONTROL_FIELDS,
    TrainConfig,
    TrainingError,
    add_train_args,
    config_from_args,
)
from bitdance.training.distributed import Dist
from bitdance.training.t2i import T2ITask
from bitdance.training.tasks import GeneratorTask, TokenizerTask

__all__ = ["Trainer", "EMA", "train", "main", "build_parser", "global_batch_indices", "lr_lambda"]


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------
def _seed_for(*parts: int) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def global_batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: a stream of per-epoch permutations (stateless)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_for(seed, epoch)))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset: offset + take].tolist())
    return torch.tensor(out)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# --------------------------------------------------------------------------------------------
# Exponential moving average that works for plain, DDP and FSDP-sharded parameters
# --------------------------------------------------------------------------------------------
class EMA:
    def __init__(self, module: nn.Module, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for n, p in module.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        params = [p.detach().float() for n, p in module.named_parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: _full(t).cpu() for n, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise TrainingError(f"EMA state lacks {missing[:3]}")
        for n, t in zip(self.names, self.shadow):
            _copy_into(t, sd[n])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _copy_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    if hasattr(dst, "to_local") and hasattr(dst, "placements"):  # an FSDP shard: take our slice
        from torch.distributed.tensor import distribute_tensor

        dst.copy_(distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements))
    else:
        dst.copy_(full.to(dst.device, dst.dtype))


def _strip(name: str) -> str:
    return name.removeprefix("module.").replace("._orig_mod", "")


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.d = Dist(cfg.device)
        self.out = Path(cfg.out)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temps(self.out):  # what interrupted checkpoint and export writes left
                self.log(f"removed {stale.name}, left by an interrupted write")
        self.d.barrier()
        torch.manual_seed(cfg.seed)
        task_cls = {"tokenizer": TokenizerTask, "generator": GeneratorTask, "t2i": T2ITask}[cfg.task]
        self.task = task_cls(cfg, self.d, self.log)
        self.model = self.task.model
        self.amp = self._precision()
        self.micro = cfg.micro_batch_size or max(1, cfg.batch_size // self.d.world)
        if cfg.batch_size % self.micro or (cfg.batch_size // self.micro) % self.d.world:
            raise TrainingError(f"global batch {cfg.batch_size} must split into micro-batches of "
                                f"{self.micro} shared evenly by {self.d.world} processes")
        self.n_micro = cfg.batch_size // self.micro
        self.ddp_model = self._wrap(self.model)
        self.opt = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.disc_opt = None
        if getattr(self.task, "disc", None) is not None:
            self.disc_opt = torch.optim.Adam(self.task.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
            # Replicated like the model, so every rank keeps the same discriminator.
            self.disc_ddp = self._wrap(self.task.disc) if not cfg.fsdp else self.task.disc
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.tb = None
        if self.d.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except Exception:  # tensorboard is optional: metrics.jsonl is always written
                self.tb = None
        if cfg.resume:
            self._resume()

    # setup -----------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.d.main:
            print(f"[bitdance] {msg}", file=sys.stderr, flush=True)

    def _precision(self):
        dev = self.d.device
        want = self.cfg.precision
        if want == "auto":  # the hardware decides, unless $BITDANCE_DTYPE does
            want = auto_precision(dev)
            if want == "fp32":
                self.log(f"training in fp32 on this {dev.type}")
        self.precision = want  # what this run actually uses
        if want == "fp32":
            return nullcontext
        if not bf16_supported(dev):
            self.log(f"warning: bf16 on this {dev.type} is emulated, not native; it will be slow")
        return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.d.enabled:
            return model
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in getattr(model, "layers", []):
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.d.device.index] if self.d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def _param_groups(self):
        model = self.model
        no_decay = model.no_weight_decay_names() if hasattr(model, "no_weight_decay_names") else {
            n for n, p in model.named_parameters() if p.dim() < 2}
        decay, other = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (other if n in no_decay else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]

    # checkpointing ---------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def gather(self, optimizer: bool = True) -> tuple[dict, dict | None, dict | None]:
        """Full (unsharded, CPU) model, optimizer and EMA states. Collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer:
            msd, osd = get_state_dict(self.model, self.opt, options=opts)
        else:
            msd, osd = get_model_state_dict(self.model, options=opts), None
        return msd, osd, (self.ema.state_dict() if self.ema else None)

    def save_checkpoint(self) -> None:
        msd, osd, ema = self.gather()
        if not self.d.main:
            return
        obj = {
            "format": "bitdance-train", "version": 1, "task": self.cfg.task, "step": self.step,
            "train_config": dataclasses.asdict(self.cfg), "model_config": self.task.model_config.to_dict(),
            "model": msd, "ema": ema, "optimizer": osd, "scheduler": self.sched.state_dict(),
            "history": self.history,
        }
        if self.disc_opt is not None:
            obj["disc"] = self.task.disc.state_dict()
            obj["disc_optimizer"] = self.disc_opt.state_dict()
        atomic_write(self.ckpt_path, lambda tmp: torch.save(obj, tmp))
        self.export(self.inference_copy(msd, ema))

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if not self.ckpt_path.exists():
            self.log(f"no checkpoint at {self.ckpt_path}; starting from scratch")
            return
        obj = load_file(self.ckpt_path)
        if not isinstance(obj, dict) or obj.get("format") != "bitdance-train":
            raise TrainingError(f"{self.ckpt_path}: not a bitdance training checkpoint")
        if obj["task"] != self.cfg.task or obj["model_config"] != self.task.model_config.to_dict():
            raise TrainingError(f"{self.ckpt_path}: was trained with a different task/model config; "
                                "use another --out or the same settings")
        self._check_resume_settings(obj.get("train_config"))
        set_state_dict(self.model, self.opt, model_state_dict=obj["model"], optim_state_dict=obj["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        self.sched.load_state_dict(obj["scheduler"])
        if self.ema is not None and obj.get("ema") is not None:
            self.ema.load_state_dict(obj["ema"])
        if self.disc_opt is not None and "disc" in obj:
            self.task.disc.load_state_dict(obj["disc"])
            self.disc_opt.load_state_dict(obj["disc_optimizer"])
        self.step = int(obj["step"])
        self.history = list(obj.get("history", []))
        self.log(f"resumed from {self.ckpt_path} at step {self.step}")

    def _check_resume_settings(self, saved: Any) -> None:
        """A resumed run continues exactly where the interrupted one stopped only with the same options:
        refuse, naming them, the ones that change the result; say what a longer --steps changes."""
        if not isinstance(saved, dict):
            return  # checkpoints of older releases do not record them
        now = dataclasses.asdict(self.cfg)
        changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
                   if k not in RUN_CONTROL_FIELDS and k in saved and saved[k] != now[k]]
        if changed:
            raise TrainingError(f"{self.ckpt_path}: cannot resume with other settings than it was trained with "
                                f"({', '.join(changed)}): they change the result; pass the same values or "
                                "use another --out")
        if saved.get("steps") not in (None, now["steps"]):
            self.log(f"note: --steps {saved['steps']} -> {now['steps']}: the learning-rate schedule stretches to the "
                     "new length, so the result differs from a run started with it")

    def export(self, net: nn.Module) -> None:
        """Write weights as a ready-to-use folder: out/tokenizer or out/model (rank 0)."""
        self.task.export(net, self.out, self.step)

    def inference_copy(self, msd: dict | None = None, ema: dict | None = None) -> nn.Module:
        """A plain (unwrapped, unsharded) module with the EMA weights (raw ones without EMA).
        Without ``msd``/``ema`` it gathers them, which is collective under FSDP."""
        if msd is None:
            msd, _, ema = self.gather(optimizer=False)
        net = self.task.new_model().to(self.d.device)
        net.load_state_dict({_strip(k): v for k, v in msd.items()})
        if ema is not None:
            with torch.no_grad():
                for n, p in net.named_parameters():
                    if n in ema:
                        p.copy_(ema[n].to(p.dtype))
        return net.eval()

    # the step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, d = self.cfg, self.d
        idx = global_batch_indices(self.step, cfg.batch_size, len(self.task.data), cfg.seed)
        mine = [i for i in range(self.n_micro) if i % d.world == d.rank]
        scale = d.world / self.n_micro  # DDP averages over ranks -> the mean over micro-batches
        self.ddp_model.train()
        self.task.monitor = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for j, i in enumerate(mine):
            g = torch.Generator(device=d.device).manual_seed(_seed_for(cfg.seed, self.step, i))
            torch.manual_seed(_seed_for(cfg.seed, self.step, i, 1))  # dropout
            sync = j == len(mine) - 1
            ctx = self.ddp_model.no_sync() if (d.enabled and not sync and hasattr(self.ddp_model, "no_sync")) \
                else nullcontext()
            with ctx:
                with self.amp():
                    loss, logs = self.task.loss(self.ddp_model, idx[i * self.micro:(i + 1) * self.micro],
                                                d.device, g)
                # Always backward, even on a non-finite loss: every rank must reach the gradient
                # all-reduce; the check below stops the run before the optimizer uses those gradients.
                self.task.adversarial(loss * scale, logs, self.step).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().float() * scale
        keys = sorted(sums)
        metrics = dict(zip(keys, d.mean(torch.stack([sums[k].cpu() for k in keys]).tolist())))
        if not all(math.isfinite(v) for v in metrics.values()):
            self._stop("loss", metrics)
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([
                torch.linalg.vector_norm(p.grad) for p in self.model.parameters() if p.grad is not None]))
        metrics["grad_norm"] = float(_full(gnorm)) if isinstance(gnorm, torch.Tensor) else float(gnorm)
        if not math.isfinite(metrics["grad_norm"]):  # stepping would poison the weights
            self._stop("gradients", metrics)
        self.opt.step()
        self.sched.step()
        if self.disc_opt is not None:
            self._disc_step(metrics)
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        metrics["lr"] = self.sched.get_last_lr()[0]
        self.step += 1
        return metrics

    def _stop(self, what: str, metrics: dict) -> None:
        last = f"step {self._last_ckpt_step}" if getattr(self, "_last_ckpt_step", None) is not None \
            else "none written yet"
        raise TrainingError(f"non-finite {what} at step {self.step} ({metrics}); stopping. Last good "
                            f"checkpoint: {self.ckpt_path} ({last}); lower --lr or use --precision fp32")

    def _disc_step(self, metrics):
        if self.step < self.cfg.disc_start:
            return
        from bitdance.training.losses import hinge_d_loss

        x, rec = self.task.discriminator_batch()
        disc = self.disc_ddp
        self.disc_opt.zero_grad(set_to_none=True)
        real, fake = disc(torch.cat([x, rec.detach().to(x.dtype)])).chunk(2)  # one forward for DDP
        d_loss = hinge_d_loss(real, fake)
        d_loss.backward()
        self.disc_opt.step()
        metrics["d_loss"] = d_loss.item()

    # sampling / reporting --------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        from PIL import Image

        msd, _, ema = self.gather(optimizer=False)
        if not self.d.main:
            return
        grid = self.task.preview(self.inference_copy(msd, ema), self.d.device, self.cfg.seed)
        atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))

    def _record(self, metrics: dict[str, float], dt: float, imgs: int) -> None:
        row = {"step": self.step, **{k: round(v, 6) for k, v in metrics.items()},
               "img_per_s": round(imgs / max(dt, 1e-9), 2)}
        self.history.append(row)
        if self.d.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in metrics.items():
                    self.tb.add_scalar(f"train/{k}", v, self.step)

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        if self.step >= cfg.steps:  # a finished run: nothing to redo
            self.log(f"{self.ckpt_path} is already at step {self.step} >= {cfg.steps}; nothing to train")
            return {"steps": self.step, "seconds": 0.0, "stopped_early": False,
                    "final": self.history[-1] if self.history else {}}
        self._last_ckpt_step = self.step if self.ckpt_path.exists() else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.d.main),
                   desc=f"train {cfg.task}", dynamic_ncols=True)
        t_log, n_log = time.perf_counter(), 0
        stopped_early = False
        while self.step < cfg.steps:
            metrics = self.train_step()
            n_log += cfg.batch_size
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                dt = time.perf_counter() - t_log
                self._record(metrics, dt, n_log)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{n_log / max(dt, 1e-9):.1f}")
                t_log, n_log = time.perf_counter(), 0
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
                self._last_ckpt_step = self.step
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample_grid(self.out / f"samples_{self.step:07d}.png")
            if cfg.max_minutes and time.perf_counter() - t_start > 60 * cfg.max_minutes:
                stopped_early = self.step < cfg.steps
                break
        bar.close()
        self.save_checkpoint()
        if cfg.final_samples:
            self.sample_grid(self.out / self.task.preview_name)
        self.d.barrier()
        return {"steps": self.step, "seconds": time.perf_counter() - t_start, "stopped_early": stopped_early,
                "final": self.history[-1] if self.history else {}}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job (tokenizer or generator); returns a summary."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        if trainer.tb is not None:
            trainer.tb.close()


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass  # the module docstring as written, and every option's default


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m bitdance.training TASK ...`` (also what torchrun runs)."""
    p = argparse.ArgumentParser(prog="python -m bitdance.training", description=__doc__, formatter_class=_Formatter)
    p.add_argument("task", choices=["tokenizer", "generator", "t2i"])
    add_train_args(p, task="positional")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = train(config_from_args(args, args.task))
    except (TrainingError, ValueError) as e:
        print(f"bitdance training: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
