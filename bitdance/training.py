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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import validation
from .checkpoint import atomic_write, load_file, remove_stale_temps
from .config import BitDanceConfig, TokenizerConfig, bitdance_preset, tokenizer_preset
from .data import fetch_batch
from .precision import auto_precision, bf16_supported

__all__ = ["TrainConfig", "TrainingError", "train", "main", "bf16_supported"]


# TrainConfig fields that steer a run without changing what it computes, so a resume may change them
# (``steps`` too, with a note: the learning-rate schedule follows it).
RUN_CONTROL_FIELDS = frozenset({"out", "steps", "log_every", "ckpt_every", "sample_every", "final_samples",
                                "max_minutes", "resume", "progress", "cache_latents", "cache_dir", "device",
                                "fsdp", "sample_prompts"})


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume, bad setup)."""


@dataclass
class TrainConfig:
    task: str = "generator"  # "tokenizer" | "generator" | "t2i"
    out: str = "runs/bitdance"
    data: str = "mnist"  # dataset name (mnist, fashion-mnist, twemoji) or an image-folder path
    split: str | None = "train"
    image_size: int = 0  # 0 = the dataset's default
    model: str = ""  # generator preset (BitDance-T-4x) / tokenizer preset (tiny-d4c16)
    model_overrides: dict = field(default_factory=dict)  # e.g. {"dim": 256, "n_layer": 4}
    tokenizer: str = ""  # generator task: trained tokenizer (folder or file)
    steps: int = 1000
    batch_size: int = 64  # global batch
    micro_batch_size: int = 0  # 0 = batch_size / world_size
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): useful EMA in short runs
    precision: str = "auto"  # auto | bf16 | fp32
    seed: int = 0
    device: str = ""  # "" = cuda if available else cpu
    fsdp: bool = False  # shard parameters (torch FSDP2) instead of replicating them (DDP)
    log_every: int = 10
    ckpt_every: int = 200
    sample_every: int = 0  # 0 = only at the end
    final_samples: bool = True  # a sample grid (or reconstructions) when the run ends
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    resume: bool = False
    cache_latents: bool = True  # generator: encode the dataset once with the frozen tokenizer
    cache_dir: str = ""  # where encoded latents are cached ("" = the run folder); share it between runs
    progress: bool = True
    # tokenizer losses
    rec_loss: str = "l1"  # l1 | l2
    entropy_weight: float = 0.1
    commit_weight: float = 0.25
    perceptual: str = "none"  # none | inception
    perceptual_weight: float = 1.0
    gan_weight: float = 0.0  # 0 disables the PatchGAN discriminator
    disc_start: int = 2000
    disc_lr: float = 1e-4
    # text-to-image (t2i task); model_overrides then sets T2IConfig fields (parallel_num, head_width, ...)
    llm: str = ""  # pretrained Hugging Face Qwen3 folder, or a BitDance T2I folder to continue training
    llm_config: dict = field(default_factory=dict)  # from scratch: Qwen3Config fields (hidden_size, ...)
    text_tokenizer: str = ""  # from scratch: Hugging Face tokenizer folder ("" = the --llm folder's)
    distill_from: str = ""  # a T2I folder (e.g. P=16) to inherit from at parallel_num (default 64)
    resolutions: str = ""  # "HxW[:weight],...", e.g. "32x32:3,16x16:1" ("" = the dataset's size)
    text_dropout: float = 0.1  # prompt -> unconditional form, for classifier-free guidance
    text_weight: float = 0.01  # loss = vision + text_weight * text cross-entropy
    perturb_rate: float = 0.1  # bit flips on the fed image tokens (flip if r1 < p * r2)
    sample_prompts: str = ""  # "|"-separated prompts for the sample grid ("" = a few dataset captions)

    def __post_init__(self):
        if self.task not in ("tokenizer", "generator", "t2i"):
            raise TrainingError(f"task must be 'tokenizer', 'generator' or 't2i', got {self.task!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise TrainingError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        try:
            self._check_numbers()
        except validation.InputError as e:
            raise TrainingError(str(e)) from None
        if self.rec_loss not in ("l1", "l2"):
            raise TrainingError(f"rec_loss must be l1 or l2, got {self.rec_loss!r}")
        if self.task == "generator" and not self.tokenizer:
            raise TrainingError("generator training needs a trained tokenizer: --tokenizer PATH "
                                "(train one with 'bitdance train-tokenizer')")
        if self.task == "t2i":
            if not (self.llm or self.llm_config or self.distill_from):
                raise TrainingError("t2i training needs an LLM: --llm-config '{\"hidden_size\": ...}' (from "
                                    "scratch, with --text-tokenizer), --llm FOLDER or --distill-from FOLDER")
            if self.distill_from and (self.llm or self.llm_config):
                raise TrainingError("--distill-from takes the LLM from its folder; drop --llm / --llm-config")
            if not 0 <= self.text_dropout <= 1 or not 0 <= self.perturb_rate <= 1:
                raise TrainingError("text_dropout and perturb_rate must be in [0, 1]")

    def _check_numbers(self) -> None:
        """Documented bounds of the numeric options (README "Limits"), refused by name before any setup."""
        validation.integer(self.steps, "steps", 1, 10**9)
        validation.integer(self.batch_size, "batch_size", 1, 1 << 20)
        validation.integer(self.micro_batch_size, "micro_batch_size", 0, self.batch_size)
        validation.integer(self.warmup_steps, "warmup_steps", 0, 10**9)
        validation.integer(self.image_size, "image_size", 0, 1 << 16)
        validation.integer(self.log_every, "log_every", 1, 10**9)
        validation.integer(self.ckpt_every, "ckpt_every", 0, 10**9)
        validation.integer(self.sample_every, "sample_every", 0, 10**9)
        validation.seed(self.seed)
        validation.number(self.lr, "lr", 1e-12, 1e12)
        validation.number(self.min_lr_ratio, "min_lr_ratio", 0.0, 1.0)
        validation.number(self.weight_decay, "weight_decay", 0.0, 10.0)
        validation.number(self.beta1, "beta1", 0.0, 0.999999)
        validation.number(self.beta2, "beta2", 0.0, 0.999999)
        validation.number(self.grad_clip, "grad_clip", 0.0, 1e6)
        validation.number(self.ema_decay, "ema_decay", 0.0, 1.0)
        validation.number(self.max_minutes, "max_minutes", 0.0, 1e7)

    @property
    def model_name(self) -> str:
        return self.model or ("tiny-d4c16" if self.task == "tokenizer" else "BitDance-T-4x")


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
# Data
# --------------------------------------------------------------------------------------------
def _load_data(cfg: TrainConfig):
    from .data import load_dataset

    return load_dataset(cfg.data, image_size=cfg.image_size or None, split=cfg.split)


@torch.no_grad()
def encode_dataset(tokenizer, ds, device, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """All latents of a dataset as int8 in {-1, +1} (B, d, h, w)."""
    from tqdm.auto import tqdm

    out = []
    it = range(0, len(ds), batch_size)
    for s in tqdm(it, desc="encoding dataset", disable=not progress, leave=False):
        x, _ = fetch_batch(ds, torch.arange(s, min(s + batch_size, len(ds))))
        out.append(tokenizer.encode(x.to(device)).to(torch.int8).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Tasks: what a step computes on one micro-batch
# --------------------------------------------------------------------------------------------
class GeneratorTask:
    def __init__(self, cfg: TrainConfig, d: Dist, log: Callable[[str], None]):
        from .checkpoint import load_tokenizer

        self.cfg = cfg
        self.data = _load_data(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer).to(d.device).eval()
        for p in self.tokenizer.parameters():
            p.requires_grad_(False)
        tcfg = self.tokenizer.config
        size = cfg.image_size or self.data.image_size
        overrides = dict(cfg.model_overrides)
        overrides.setdefault("num_classes", self.data.num_classes)
        self.model_config: BitDanceConfig = bitdance_preset(cfg.model_name, image_size=size, tokenizer=tcfg,
                                                            **overrides)
        from .transformer import BitDance

        self.model = BitDance(self.model_config).to(d.device)
        self.latents = None
        if cfg.cache_latents:
            self.latents = self._cached_latents(d, log)

    def _cached_latents(self, d: Dist, log) -> torch.Tensor:
        path = _latent_cache_path(self.tokenizer, self.cfg,
                                  f"{self.cfg.data}|{self.cfg.split}|{self.model_config.image_size}|{len(self.data)}")
        lat = _load_cached_latents(path, len(self.data))
        if lat is not None:
            return lat
        log(f"encoding {len(self.data)} images with the frozen tokenizer (cached in {path.name})")
        lat = encode_dataset(self.tokenizer, self.data, d.device, progress=self.cfg.progress and d.main)
        if d.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(lat, tmp))
        return lat

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(self, model, idx: torch.Tensor, device, g: torch.Generator):
        if self.latents is not None:
            lat = self.latents[idx].to(device=device, dtype=torch.float32)
            labels = self._labels(idx)
        else:
            x, labels = fetch_batch(self.data, idx)
            with torch.no_grad():
                lat = self.tokenizer.encode(x.to(device))
        loss = model(lat, labels.to(device), generator=g)
        return loss, {"loss": loss.detach()}

    def _labels(self, idx):
        if not hasattr(self, "_all_labels"):
            if hasattr(self.data, "labels"):
                self._all_labels = torch.as_tensor(self.data.labels).long()
            else:
                self._all_labels = torch.tensor([self.data[i][1] for i in range(len(self.data))])
        return self._all_labels[idx]


class TokenizerTask:
    def __init__(self, cfg: TrainConfig, d: Dist, log):
        from .tokenizer import BinaryTokenizer

        self.cfg = cfg
        self.data = _load_data(cfg)
        self.model_config: TokenizerConfig = tokenizer_preset(cfg.model_name, **cfg.model_overrides)
        size = cfg.image_size or self.data.image_size
        if size % self.model_config.down_factor:
            raise TrainingError(f"image size {size} is not divisible by the tokenizer's down factor "
                                f"{self.model_config.down_factor}")
        self.model = BinaryTokenizer(self.model_config).to(d.device)
        self.perceptual = None
        if cfg.perceptual != "none" and cfg.perceptual_weight > 0:
            from .losses import PerceptualLoss

            self.perceptual = PerceptualLoss(network=cfg.perceptual).to(d.device)
        self.disc = None
        if cfg.gan_weight > 0:
            from .losses import PatchDiscriminator

            # Three downsampling layers (pix2pix) unless the images are too small for them.
            n_layers = max(1, min(3, int(math.log2(size / 3))))
            self.disc = PatchDiscriminator(in_channels=self.model_config.out_ch, n_layers=n_layers).to(d.device)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(self, model, idx, device, g):
        cfg = self.cfg
        x, _ = fetch_batch(self.data, idx)
        x = x.to(device)
        out = model(x, generator=g)
        rec = out.reconstruction.float()
        rec_loss = (rec - x).abs().mean() if cfg.rec_loss == "l1" else ((rec - x) ** 2).mean()
        q = out.quant
        loss = rec_loss + cfg.entropy_weight * q.entropy_loss + cfg.commit_weight * q.commitment
        logs = {"loss": loss.detach(), "rec_loss": rec_loss.detach(), "entropy": q.entropy_loss.detach(),
                "commitment": q.commitment.detach(), "sample_entropy": q.per_sample_entropy.detach(),
                "codebook_entropy": q.codebook_entropy.detach()}
        if getattr(self, "monitor", True):  # monitoring on logged steps only: quality and hard code usage
            self._monitor(model, x, rec, q, logs)
        if self.perceptual is not None:
            p = self.perceptual(rec, x)
            loss = loss + cfg.perceptual_weight * p
            logs["perceptual"] = p.detach()
        # What the GAN terms need: the reconstruction and the NLL that sets the adaptive weight.
        self._last = (x, out.reconstruction, loss - cfg.entropy_weight * q.entropy_loss
                      - cfg.commit_weight * q.commitment)
        return loss, logs

    @torch.no_grad()
    def _monitor(self, model, x, rec, q, logs) -> None:
        from .evaluation import codebook_usage, psnr, ssim

        r = rec.detach().clamp(-1, 1)
        logs["psnr"] = psnr(r, x).mean()
        logs["ssim"] = ssim(r, x).mean()
        q_idx = model_quantizer(model).indices(q.quantized.detach())
        logs["code_entropy_bits"] = torch.tensor(codebook_usage(
            q_idx, codes_per_group=2 ** self.model_config.bits_per_group).entropy_bits)


def model_quantizer(model: nn.Module):
    return getattr(model, "module", model).quantizer


# --------------------------------------------------------------------------------------------
# Text-to-image task: a Qwen3 LLM + projector + vision head on a frozen binary tokenizer
# --------------------------------------------------------------------------------------------
class _Spec:
    """What the checkpoint records as ``model_config`` (compared on resume)."""

    def __init__(self, d: dict):
        self.d = json.loads(json.dumps(d, default=str))  # plain types only: the safe loader reads it back

    def to_dict(self) -> dict:
        return self.d


def parse_resolutions(spec: str, default: int) -> tuple[list[tuple[int, int]], list[float]]:
    """``"32x32:3,16x16:1"`` (HxW pixels, optional sampling weight) -> ([(32, 32), (16, 16)], [3.0, 1.0])."""
    if not spec.strip():
        return [(default, default)], [1.0]
    res, weights = [], []
    for item in spec.split(","):
        try:
            size, _, w = item.strip().partition(":")
            h, _, wd = size.lower().partition("x")
            res.append((int(h), int(wd or h)))
            weights.append(float(w) if w else 1.0)
        except ValueError:
            raise TrainingError(f"bad --resolutions item {item!r}; expected HxW[:weight], e.g. 32x32:3") from None
    if any(h < 1 or w < 1 for h, w in res) or any(not x > 0 for x in weights) or len(set(res)) != len(res):
        raise TrainingError(f"bad --resolutions {spec!r}: positive sizes and weights, each size once")
    return res, weights


def dataset_captions(ds) -> list[str]:
    """Captions of a dataset: ``ds.captions`` (Twemoji), or for an image folder the text of a sidecar
    ``<image>.txt`` if there is one, else the class folder name (``_`` -> space)."""
    if hasattr(ds, "captions"):
        return [str(c) for c in ds.captions]
    if hasattr(ds, "samples") and hasattr(ds, "class_names"):
        out = []
        for path, label in ds.samples:
            side = Path(path).with_suffix(".txt")
            text = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
            out.append(text or ds.class_names[label].replace("_", " "))
        return out
    raise TrainingError(f"dataset {type(ds).__name__} has no captions (t2i needs Twemoji or an image folder)")


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 3, S, S') -> (B, 3, h, w): centre crop to the aspect ratio, then antialiased bicubic."""
    import torch.nn.functional as F

    H, W = x.shape[-2:]
    if H * w != W * h:  # crop the longer side
        if H * w > W * h:
            ch = round(W * h / w)
            x = x[..., (H - ch) // 2:(H - ch) // 2 + ch, :]
        else:
            cw = round(H * w / h)
            x = x[..., :, (W - cw) // 2:(W - cw) // 2 + cw]
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


class T2ITrainModule(nn.Module):
    """The trained T2I model behind one ``forward`` (= :func:`bitdance.t2i.training_loss`), so that
    DDP / FSDP see a normal module call; ``net`` is the :class:`bitdance.t2i.BitDanceT2I`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def layers(self):  # FSDP shards these blocks one by one
        return self.net.llm.model.layers

    def forward(self, packed, *, text_weight: float, perturb_rate: float, generator=None):
        from .t2i import training_loss

        loss, logs = training_loss(self.net, packed, text_weight=text_weight, perturb_rate=perturb_rate,
                                   generator=generator)
        if logs["num_text_targets"] == 0:  # all prompts dropped: keep the LM head in the graph for DDP
            loss = loss + 0.0 * self.net.llm.get_output_embeddings().weight.sum()
        return loss, logs


def _latent_cache_path(tokenizer: nn.Module, cfg: "TrainConfig", key: str) -> Path:
    """Cache file named by the tokenizer's weights and the data it encodes: a changed tokenizer or
    dataset never reuses stale latents (the name keeps the generator cache of earlier versions)."""
    tok_sd = tokenizer.state_dict()
    digest = hashlib.sha256()
    for k in sorted(tok_sd):
        digest.update(k.encode())
        digest.update(tok_sd[k].detach().cpu().float().numpy().tobytes())
    digest.update(key.encode())
    return Path(cfg.cache_dir or cfg.out) / f"latents-{digest.hexdigest()[:16]}.pt"


def _load_cached_latents(path: Path, n: int) -> torch.Tensor | None:
    if path.exists():
        try:
            lat = load_file(path)
            if isinstance(lat, torch.Tensor) and lat.shape[0] == n:
                return lat
        except Exception:  # unreadable cache: encode again and overwrite it
            pass
    return None


class T2ITask:
    """Text-to-image training: captions + images encoded by a frozen binary tokenizer, packed
    mixed-resolution rows (:func:`bitdance.t2i.pack_batch`), vision + ``text_weight`` x text loss."""

    T2I_KEYS_NOT_IN_FOLDER = ("resolutions", "allow_any_resolution", "max_res_tokens")

    def __init__(self, cfg: TrainConfig, d: Dist, log):
        from dataclasses import fields as dc_fields

        from .checkpoint import CheckpointError, load_tokenizer
        from .t2i import T2IConfig

        self.cfg = cfg
        self.data = _load_data(cfg)
        self.captions = dataset_captions(self.data)
        size = cfg.image_size or self.data.image_size
        self.res, self.res_weights = parse_resolutions(cfg.resolutions, size)
        valid = {f.name for f in dc_fields(T2IConfig)}
        over = dict(cfg.model_overrides)
        bad = sorted(set(over) - valid)
        if bad:
            raise TrainingError(f"t2i --model-overrides: unknown T2IConfig field(s) {bad}; valid: {sorted(valid)}")
        over.setdefault("P_mean", -0.8)  # the training time distribution of the release
        over.setdefault("P_std", 0.8)
        try:
            net = self._build(cfg, over, log)
        except (CheckpointError, OSError) as e:
            raise TrainingError(str(e).splitlines()[0]) from None
        if getattr(net, "ae", None) is not None:  # --tokenizer (loaded by _build) or the folder's ae
            self.tokenizer = net.ae
        elif cfg.tokenizer:
            self.tokenizer = load_tokenizer(cfg.tokenizer)
        else:
            raise TrainingError("t2i training needs the image tokenizer: --tokenizer PATH (or a folder with ae.safetensors)")
        net.ae = None  # frozen and outside the trained module; added back on export
        tok = self.tokenizer
        if tok.bits != net.config.latent_dim or tok.down_factor != net.config.down_factor:
            raise TrainingError(f"image tokenizer has {tok.bits} bits / down factor {tok.down_factor}; the model "
                                f"expects {net.config.latent_dim} / {net.config.down_factor}")
        for h, w in self.res:
            try:
                net.config.check_resolution(h, w)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        self.tokenizer = tok.to(d.device).eval()
        for p in self.tokenizer.parameters():
            p.requires_grad_(False)
        self.t2i_config = net.config
        self.text_tokenizer = net.text_tokenizer
        self.llm_config = net.llm.config
        self.model = T2ITrainModule(net.float()).to(d.device)
        llm_d = {k: v for k, v in self.llm_config.to_dict().items()
                 if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        self.model_config = _Spec({"llm": llm_d, "t2i": dataclasses.asdict(self.t2i_config),
                                   "vocab": len(self.text_tokenizer)})
        self.latents: dict[tuple[int, int], torch.Tensor] = {}
        if cfg.cache_latents:
            for r in self.res:
                self.latents[r] = self._cached_latents(r, d, log)

    # model --------------------------------------------------------------------------------------
    def _build(self, cfg: TrainConfig, over: dict, log):
        from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

        from .t2i import HEAD_CONFIG, BitDanceT2I, T2IConfig, add_special_tokens, distill_from

        folder_kw = {k: over[k] for k in self.T2I_KEYS_NOT_IN_FOLDER if k in over}
        folder_kw.setdefault("resolutions", tuple(self.res))
        if cfg.distill_from:
            teacher = BitDanceT2I.from_folder(cfg.distill_from, dtype=torch.float32, load_ae=not cfg.tokenizer,
                                              **folder_kw)
            rest = {k: v for k, v in over.items() if k != "parallel_num"}
            rest.setdefault("resolutions", tuple(self.res))
            log(f"distilling {cfg.distill_from} (P={teacher.config.parallel_num}) into "
                f"P={over.get('parallel_num', 64)}")
            net = distill_from(teacher, parallel_num=over.get("parallel_num", 64), **rest)
            return net
        if cfg.llm and (Path(cfg.llm) / HEAD_CONFIG).is_file():  # continue from a T2I folder
            net = BitDanceT2I.from_folder(cfg.llm, dtype=torch.float32, load_ae=not cfg.tokenizer, **folder_kw)
            for k, v in over.items():
                if k not in folder_kw and getattr(net.config, k) != v and k not in ("P_mean", "P_std"):
                    raise TrainingError(f"--model-overrides {k}={v!r} conflicts with {cfg.llm} ({getattr(net.config, k)!r})")
            net.config.P_mean, net.config.P_std = over["P_mean"], over["P_std"]
            net.vision_head.config = net.config.head_config(net.hidden_size)
            return net
        tok_path = cfg.text_tokenizer or cfg.llm
        if not tok_path:
            raise TrainingError("t2i from scratch needs --text-tokenizer FOLDER (a Hugging Face tokenizer)")
        if not Path(tok_path).is_dir():
            raise TrainingError(f"{tok_path}: no such tokenizer folder")
        text_tok = AutoTokenizer.from_pretrained(tok_path)
        if text_tok.pad_token_id is None:
            text_tok.pad_token = text_tok.eos_token or text_tok.unk_token
        P = over.get("parallel_num", T2IConfig.parallel_num)
        add_special_tokens(text_tok, P, over.get("max_res_tokens", 256))
        if cfg.llm:
            if not (Path(cfg.llm) / "config.json").is_file():
                raise TrainingError(f"{cfg.llm}: not a Hugging Face model folder (no config.json)")
            llm = Qwen3ForCausalLM.from_pretrained(cfg.llm, dtype=torch.float32)
            if len(text_tok) > llm.get_input_embeddings().num_embeddings:
                llm.resize_token_embeddings(len(text_tok), mean_resizing=False)
        else:
            lc = dict(cfg.llm_config)
            hidden = int(lc.get("hidden_size", 256))
            heads = int(lc.get("num_attention_heads", max(1, hidden // 64)))
            defaults = {"hidden_size": hidden, "num_hidden_layers": 4, "num_attention_heads": heads,
                        "num_key_value_heads": heads, "head_dim": hidden // heads, "intermediate_size": 3 * hidden,
                        "max_position_embeddings": 4096, "tie_word_embeddings": True}
            try:
                qcfg = Qwen3Config(**{**defaults, **lc, "vocab_size": len(text_tok)})
            except (TypeError, ValueError) as e:
                raise TrainingError(f"--llm-config: {e}") from None
            llm = Qwen3ForCausalLM(qcfg)
        hidden = llm.config.hidden_size
        over.setdefault("head_width", hidden)
        over.setdefault("head_dim", 128 if hidden >= 1024 else 64 if hidden % 64 == 0 else 32)
        ae_like = None
        if cfg.tokenizer:
            from .checkpoint import load_tokenizer

            ae_like = load_tokenizer(cfg.tokenizer)
            over.setdefault("latent_dim", ae_like.bits)
            over.setdefault("down_factor", ae_like.down_factor)
        over.setdefault("resolutions", tuple(self.res))
        try:
            t2i_cfg = T2IConfig(**over)
            return BitDanceT2I(llm, text_tok, t2i_cfg, ae=ae_like)
        except (ValueError, TypeError) as e:
            raise TrainingError(f"t2i model: {e}") from None

    def new_model(self) -> nn.Module:
        """A fresh module of the trained structure (weights to be loaded)."""
        import copy

        from transformers import Qwen3ForCausalLM

        from .t2i import BitDanceT2I

        llm = Qwen3ForCausalLM(copy.deepcopy(self.llm_config))
        return T2ITrainModule(BitDanceT2I(llm, self.text_tokenizer, self.t2i_config))

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    # data ---------------------------------------------------------------------------------------
    def _images(self, idx: torch.Tensor, res: tuple[int, int]) -> torch.Tensor:
        x, _ = fetch_batch(self.data, idx)
        return _resize(x.float(), *res)

    def _cached_latents(self, res: tuple[int, int], d: Dist, log) -> torch.Tensor:
        size = self.cfg.image_size or self.data.image_size
        path = _latent_cache_path(self.tokenizer, self.cfg,
                                  f"t2i|{self.cfg.data}|{self.cfg.split}|{size}|{res}|{len(self.data)}")
        lat = _load_cached_latents(path, len(self.data))
        if lat is not None:
            return lat
        log(f"encoding {len(self.data)} images at {res[0]}x{res[1]} with the frozen tokenizer ({path.name})")
        out = []
        with torch.no_grad():
            for s in range(0, len(self.data), 256):
                x = self._images(torch.arange(s, min(s + 256, len(self.data))), res).to(d.device)
                out.append(self.tokenizer.encode(x).to(torch.int8).cpu())
        lat = torch.cat(out)
        if d.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(lat, tmp))
        return lat

    def loss(self, model, idx: torch.Tensor, device, g: torch.Generator):
        from .t2i import pack_batch

        cfg = self.cfg
        # A CPU generator for the host-side draws (resolution, text dropout), seeded from this micro-batch's.
        cg = torch.Generator().manual_seed(int(torch.randint(1 << 62, (1,), generator=g, device=g.device)))
        choice = torch.multinomial(torch.tensor(self.res_weights), len(idx), replacement=True, generator=cg)
        samples = []
        for j, i in enumerate(idx.tolist()):
            r = self.res[int(choice[j])]
            if r in self.latents:
                lat = self.latents[r][i].float()
            else:
                with torch.no_grad():
                    lat = self.tokenizer.encode(self._images(torch.tensor([i]), r).to(device))[0].float().cpu()
            samples.append((self.captions[i], lat))
        net = self.model.net
        packed = pack_batch(net, samples, text_dropout=cfg.text_dropout, generator=cg)
        loss, logs = model(packed, text_weight=cfg.text_weight, perturb_rate=cfg.perturb_rate, generator=g)
        return loss, {"loss": loss.detach(), "vision": torch.tensor(logs["vision"]),
                      "text": torch.tensor(logs["text"])}

    # sampling -----------------------------------------------------------------------------------
    def sample_prompts(self, n: int = 8) -> list[str]:
        if self.cfg.sample_prompts.strip():
            return [p.strip() for p in self.cfg.sample_prompts.split("|") if p.strip()]
        step = max(1, len(self.captions) // n)
        return [self.captions[i] for i in range(0, len(self.captions), step)][:n]

    @torch.no_grad()
    def sample_images(self, wrapper: nn.Module, prompts: list[str], *, seed: int = 0, num_steps: int = 25,
                      guidance_scale: float = 4.0, res: tuple[int, int] | None = None) -> np.ndarray:
        """(len(prompts), H, W, 3) uint8 generated at ``res`` (default: the first training resolution)."""
        from .images import to_uint8
        from .sampler import FlowSampler

        h, w = res or self.res[0]
        net = wrapper.net
        dev = net.device
        g = torch.Generator(device=dev).manual_seed(seed)
        lat = net.generate(prompts, height=h, width=w, sampler=FlowSampler(num_steps=num_steps),
                           guidance_scale=guidance_scale, generator=g)
        img = self.tokenizer.decode(lat.to(next(self.tokenizer.parameters()).dtype))
        return to_uint8(img).numpy()


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
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_state_dict)

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
        from .pipeline import BitDancePipeline, save_tokenizer_folder

        if self.cfg.task == "tokenizer":
            save_tokenizer_folder(net, self.out / "tokenizer", meta={"step": self.step})
        elif self.cfg.task == "t2i":
            self._export_t2i(net)
        else:
            BitDancePipeline(net, self.task.tokenizer, meta={"step": self.step}).save_pretrained(self.out / "model")

    def _export_t2i(self, wrapper: nn.Module) -> None:
        """OUT/model in the released folder layout (BitDanceT2I.save_folder), written to a temporary
        sibling folder and swapped in, so a crash never leaves a half-written model."""
        import copy

        import dataclasses

        from .pipeline import BitDanceT2IPipeline

        net = wrapper.net
        net.ae = copy.deepcopy(self.task.tokenizer).float().cpu()
        net.cpu()
        # The trained resolutions become the model's allowed list (stored in config.json under
        # "bitdance"), so BitDancePipeline.from_pretrained(OUT/model) accepts them as they are.
        trained = tuple(tuple(int(v) for v in r) for r in self.task.res)
        if not net.config.allow_any_resolution:
            net.config = dataclasses.replace(net.config, resolutions=tuple(dict.fromkeys(trained)))
        meta = {"step": self.step, "resolutions": [list(r) for r in trained]}
        BitDanceT2IPipeline(net, meta=meta).save_pretrained(self.out / "model")

    def inference_copy(self, msd: dict | None = None, ema: dict | None = None) -> nn.Module:
        """A plain (unwrapped, unsharded) module with the EMA weights (raw ones without EMA).
        Without ``msd``/``ema`` it gathers them, which is collective under FSDP."""
        if msd is None:
            msd, _, ema = self.gather(optimizer=False)
        if hasattr(self.task, "new_model"):
            net = self.task.new_model().to(self.d.device)
        else:
            net = type(self.model)(self.task.model_config).to(self.d.device)
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
                self._gan_terms(loss * scale, logs).backward()
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

    # GAN (tokenizer task only) -----------------------------------------------------------------
    def _gan_terms(self, loss: torch.Tensor, logs: dict) -> torch.Tensor:
        disc = getattr(self.task, "disc", None)
        if disc is None or self.step < self.cfg.disc_start:
            return loss
        from .losses import adaptive_weight, generator_adv_loss

        x, rec, nll = self.task._last
        for p in disc.parameters():
            p.requires_grad_(False)
        g_loss = generator_adv_loss(disc(rec))
        for p in disc.parameters():
            p.requires_grad_(True)
        last = self.model.decoder.conv_out.weight
        w = adaptive_weight(nll, g_loss, last) * self.cfg.gan_weight
        logs["g_adv"] = g_loss.detach()
        logs["adv_weight"] = torch.as_tensor(w).detach()
        return loss + w * g_loss

    def _disc_step(self, metrics):
        if self.step < self.cfg.disc_start:
            return
        from .losses import hinge_d_loss

        x, rec, _ = self.task._last
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

        from .images import make_grid, to_uint8

        msd, _, ema = self.gather(optimizer=False)
        if not self.d.main:
            return
        net = self.inference_copy(msd, ema)
        if self.cfg.task == "tokenizer":
            x, _ = fetch_batch(self.task.data, torch.arange(min(16, len(self.task.data))))
            rec = net.decode(net.encode(x.to(self.d.device)))
            arr = np.concatenate([to_uint8(x).numpy(), to_uint8(rec).numpy()])
            grid = make_grid(arr, len(x))
        elif self.cfg.task == "t2i":
            arr = self.task.sample_images(net, self.task.sample_prompts(), seed=self.cfg.seed)
            grid = make_grid(arr, len(arr))
        else:
            arr = generate_class_grid(net, self.task.tokenizer, rows=min(10, self.task.model_config.num_classes),
                                      cols=8, seed=self.cfg.seed, device=self.d.device)
            grid = make_grid(arr, 8)
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
            self.sample_grid(self.out / ("reconstructions.png" if cfg.task == "tokenizer" else "samples.png"))
        self.d.barrier()
        return {"steps": self.step, "seconds": time.perf_counter() - t_start, "stopped_early": stopped_early,
                "final": self.history[-1] if self.history else {}}


@torch.no_grad()
def generate_class_grid(model, tokenizer, *, rows: int, cols: int, seed: int = 0, device=None,
                        num_steps: int = 25, guidance_scale: float = 2.0,
                        guidance_schedule: str = "linear") -> np.ndarray:
    """Samples for classes 0..rows-1, ``cols`` each (row-major), as (rows*cols, H, W, 3) uint8."""
    from .images import to_uint8
    from .sampler import FlowSampler

    labels = torch.arange(rows, device=device).repeat_interleave(cols)
    g = torch.Generator(device=device).manual_seed(seed)
    lat = model.generate(labels, sampler=FlowSampler(num_steps=num_steps), guidance_scale=guidance_scale,
                         guidance_schedule=guidance_schedule, generator=g)
    return to_uint8(tokenizer.decode(lat.to(next(tokenizer.parameters()).dtype), generator=g)).numpy()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job (tokenizer or generator); returns a summary."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        if trainer.tb is not None:
            trainer.tb.close()


# --------------------------------------------------------------------------------------------
# Command line (shared with `bitdance train` / `bitdance train-tokenizer`)
# --------------------------------------------------------------------------------------------
_HELP = {
    "task": "tokenizer | generator | t2i",
    "out": "output folder: checkpoint.pt, metrics.jsonl, samples, exported model",
    "data": "mnist | fashion-mnist | twemoji | path to an image folder (one sub-folder per class)",
    "split": "dataset split (train/test/none)",
    "image_size": "image size in pixels (0 = the dataset's own)",
    "model": "generator preset (BitDance-T-4x) or tokenizer preset (tiny-d4c16)",
    "model_overrides": "JSON dict of config overrides, e.g. '{\"dim\": 256}'",
    "tokenizer": "trained tokenizer folder/file (generator task)",
    "steps": "optimizer steps", "batch_size": "global batch size",
    "micro_batch_size": "per-process micro-batch; smaller than batch / world size = gradient accumulation "
                        "(0 = batch / world size)",
    "lr": "peak AdamW learning rate", "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "the cosine decays to lr x this", "weight_decay": "AdamW weight decay (not on norms, biases, "
    "embeddings, query tokens)", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "gradient-norm clip (0 = off)", "ema_decay": "EMA decay of the exported weights",
    "ema_warmup": "EMA decay min(ema_decay, (1 + step) / (10 + step)), so short runs get a useful EMA",
    "precision": "auto (bf16 autocast where the hardware has bf16 units) | bf16 | fp32",
    "seed": "seed of the weights, the data order and every random draw",
    "device": "cpu, cuda, ... ('' = cuda if available, else cpu)",
    "fsdp": "shard parameters with FSDP instead of replicating them (DDP) under torchrun",
    "log_every": "steps between metric lines", "ckpt_every": "steps between checkpoints",
    "sample_every": "steps between sample grids (0 = only at the end)",
    "final_samples": "write a sample grid (or reconstructions) when the run ends",
    "resume": "continue from OUT/checkpoint.pt",
    "max_minutes": "stop after this many minutes (0 = no limit)",
    "cache_latents": "generator: encode the dataset once with the frozen tokenizer",
    "cache_dir": "where encoded latents are cached ('' = the run folder); share it between runs",
    "progress": "show a progress bar",
    "rec_loss": "tokenizer: l1 | l2 reconstruction loss", "entropy_weight": "tokenizer: group-wise entropy loss weight",
    "commit_weight": "tokenizer: commitment loss weight", "perceptual": "tokenizer: none | inception perceptual loss",
    "perceptual_weight": "tokenizer: perceptual loss weight",
    "gan_weight": "tokenizer: PatchGAN loss weight (0 = no discriminator)",
    "disc_start": "tokenizer: step at which the discriminator starts", "disc_lr": "tokenizer: discriminator lr",
    "llm": "t2i: pretrained Hugging Face Qwen3 folder (or a BitDance T2I folder to continue training)",
    "llm_config": "t2i from scratch: JSON Qwen3Config fields, e.g. '{\"hidden_size\": 256, \"num_hidden_layers\": 4}'",
    "text_tokenizer": "t2i from scratch: Hugging Face tokenizer folder ('' = the --llm folder's)",
    "distill_from": "t2i: a T2I folder (P=16) to inherit from at parallel_num (default 64)",
    "resolutions": "t2i: HxW[:weight],... in pixels, e.g. 32x32:3,16x16:1 ('' = the dataset's size)",
    "text_dropout": "t2i: probability of the unconditional prompt", "text_weight": "t2i: text loss weight",
    "perturb_rate": "t2i: bit-flip rate p on fed image tokens", "sample_prompts": "t2i: '|'-separated prompts",
}


def add_train_args(p: argparse.ArgumentParser, task: str | None = None) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name == "task" and task is not None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        flag = "--" + f.name.replace("_", "-")
        helptext = _HELP[f.name]
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif isinstance(default, dict):
            p.add_argument(flag, type=json.loads, default=default, help=helptext)
        elif f.name == "split":
            p.add_argument(flag, default=default, help=helptext)
        else:
            p.add_argument(flag, type=type(default), default=default, help=helptext)


def config_from_args(args: argparse.Namespace, task: str | None = None) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if task is not None:
        kw["task"] = task
    if kw.get("split") in ("none", "None", ""):
        kw["split"] = None
    return TrainConfig(**kw)


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
