"""What each training task trains: the binary tokenizer, the class-conditional generator (on latents
encoded once by a frozen tokenizer) and the text-to-image model. A task owns its model, data, loss and
sample grid; :class:`bitdance.training.Trainer` runs any of them."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bitdance.data import fetch_batch
from bitdance.files import atomic_write
from bitdance.formats.weights import load_file
from bitdance.models.config import BitDanceConfig, TokenizerConfig
from bitdance.models.presets import bitdance_preset, tokenizer_preset
from bitdance.training.config import TrainConfig, TrainingError
from bitdance.training.distributed import Dist

__all__ = ["Task", "GeneratorTask", "TokenizerTask", "encode_dataset", "model_quantizer", "load_data",
           "latent_cache_path", "load_cached_latents", "cached_or_encoded", "generate_class_grid"]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def load_data(cfg: TrainConfig):
    from bitdance.data import load_dataset

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


def latent_cache_path(tokenizer: nn.Module, cfg: "TrainConfig", key: str) -> Path:
    """Cache file named by the tokenizer's weights and the data it encodes: a changed tokenizer or
    dataset never reuses stale latents (the name keeps the generator cache of earlier versions)."""
    tok_sd = tokenizer.state_dict()
    digest = hashlib.sha256()
    for k in sorted(tok_sd):
        digest.update(k.encode())
        digest.update(tok_sd[k].detach().cpu().float().numpy().tobytes())
    digest.update(key.encode())
    return Path(cfg.cache_dir or cfg.out) / f"latents-{digest.hexdigest()[:16]}.pt"


def load_cached_latents(path: Path, n: int) -> torch.Tensor | None:
    if path.exists():
        try:
            lat = load_file(path)
            if isinstance(lat, torch.Tensor) and lat.shape[0] == n:
                return lat
        except Exception:  # unreadable cache: encode again and overwrite it
            pass
    return None


def cached_or_encoded(path: Path, n: int, d: Dist, log, what: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The latents cached at ``path`` if they are complete, else ``encode()``'d and cached (by rank 0)."""
    lat = load_cached_latents(path, n)
    if lat is not None:
        return lat
    log(f"encoding {n} images{what} with the frozen tokenizer (cached in {path.name})")
    lat = encode()
    if d.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(lat, tmp))
    return lat


# --------------------------------------------------------------------------------------------
# Tasks: what a step computes on one micro-batch
# --------------------------------------------------------------------------------------------
class Task:
    """What :class:`bitdance.training.Trainer` asks of a task. A task owns its model (``model``, its config
    ``model_config``), its data (``data``) and, for the tokenizer, a discriminator (``disc``)."""

    preview_name = "samples.png"
    disc: nn.Module | None = None

    def loss(self, model: nn.Module, idx: torch.Tensor, device, g: torch.Generator):
        """(loss, logs) of the micro-batch ``idx`` through ``model`` (the wrapped training module)."""
        raise NotImplementedError

    def new_model(self) -> nn.Module:
        """A fresh, unwrapped model of the trained architecture (to load EMA weights into)."""
        return type(self.model)(self.model_config)

    def adversarial(self, loss: torch.Tensor, logs: dict, step: int) -> torch.Tensor:
        """``loss`` plus any adversarial terms of the last micro-batch (none but for a GAN tokenizer)."""
        return loss

    def discriminator_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, reconstructed) images of the last micro-batch, for the discriminator's step."""
        raise NotImplementedError(f"{type(self).__name__} trains no discriminator")

    def export(self, net: nn.Module, out: Path, step: int) -> None:
        """Write the trained ``net`` (EMA weights) as a ready-to-use folder under ``out``."""
        raise NotImplementedError

    def preview(self, net: nn.Module, device, seed: int) -> np.ndarray:
        """One image (H, W, 3) uint8 showing what ``net`` does now."""
        raise NotImplementedError


class GeneratorTask(Task):
    def __init__(self, cfg: TrainConfig, d: Dist, log: Callable[[str], None]):
        from bitdance.formats.official import load_tokenizer

        self.cfg = cfg
        self.data = load_data(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer).to(d.device).eval()
        for p in self.tokenizer.parameters():
            p.requires_grad_(False)
        tcfg = self.tokenizer.config
        size = cfg.image_size or self.data.image_size
        overrides = dict(cfg.model_overrides)
        overrides.setdefault("num_classes", self.data.num_classes)
        self.model_config: BitDanceConfig = bitdance_preset(cfg.model_name, image_size=size, tokenizer=tcfg,
                                                            **overrides)
        from bitdance.models.transformer import BitDance

        self.model = BitDance(self.model_config).to(d.device)
        self.latents = None
        if cfg.cache_latents:
            self.latents = self._cached_latents(d, log)

    def _cached_latents(self, d: Dist, log) -> torch.Tensor:
        path = latent_cache_path(self.tokenizer, self.cfg,
                                  f"{self.cfg.data}|{self.cfg.split}|{self.model_config.image_size}|{len(self.data)}")
        return cached_or_encoded(path, len(self.data), d, log, "", lambda: encode_dataset(
            self.tokenizer, self.data, d.device, progress=self.cfg.progress and d.main))


    def export(self, net: nn.Module, out: Path, step: int) -> None:
        from bitdance.pipelines.class_conditional import BitDancePipeline

        BitDancePipeline(net, self.tokenizer, meta={"step": step}).save_pretrained(out / "model")

    def preview(self, net: nn.Module, device, seed: int) -> np.ndarray:
        from bitdance.images import make_grid

        arr = generate_class_grid(net, self.tokenizer, rows=min(10, self.model_config.num_classes), cols=8, seed=seed,
                                  device=device)
        return make_grid(arr, 8)

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


class TokenizerTask(Task):
    def __init__(self, cfg: TrainConfig, d: Dist, log):
        from bitdance.models.tokenizer import BinaryTokenizer

        self.cfg = cfg
        self.data = load_data(cfg)
        self.model_config: TokenizerConfig = tokenizer_preset(cfg.model_name, **cfg.model_overrides)
        size = cfg.image_size or self.data.image_size
        if size % self.model_config.down_factor:
            raise TrainingError(f"image size {size} is not divisible by the tokenizer's down factor "
                                f"{self.model_config.down_factor}")
        self.model = BinaryTokenizer(self.model_config).to(d.device)
        self.perceptual = None
        if cfg.perceptual != "none" and cfg.perceptual_weight > 0:
            from bitdance.training.losses import PerceptualLoss

            self.perceptual = PerceptualLoss(network=cfg.perceptual).to(d.device)
        self.disc = None
        if cfg.gan_weight > 0:
            from bitdance.training.losses import PatchDiscriminator

            # Three downsampling layers (pix2pix) unless the images are too small for them.
            n_layers = max(1, min(3, int(math.log2(size / 3))))
            self.disc = PatchDiscriminator(in_channels=self.model_config.out_ch, n_layers=n_layers).to(d.device)


    preview_name = "reconstructions.png"

    def export(self, net: nn.Module, out: Path, step: int) -> None:
        from bitdance.formats.folders import save_tokenizer_folder

        save_tokenizer_folder(net, out / "tokenizer", meta={"step": step})

    def preview(self, net: nn.Module, device, seed: int) -> np.ndarray:
        from bitdance.images import make_grid, to_uint8

        x, _ = fetch_batch(self.data, torch.arange(min(16, len(self.data))))
        rec = net.decode(net.encode(x.to(device)))
        return make_grid(np.concatenate([to_uint8(x).numpy(), to_uint8(rec).numpy()]), len(x))

    def discriminator_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, rec, _ = self._last
        return x, rec

    def adversarial(self, loss: torch.Tensor, logs: dict, step: int) -> torch.Tensor:
        """The generator side of the PatchGAN (from ``disc_start`` on), weighted adaptively against the
        reconstruction loss at the decoder's last layer (VQGAN)."""
        if self.disc is None or step < self.cfg.disc_start:
            return loss
        from bitdance.training.losses import adaptive_weight, generator_adv_loss

        x, rec, nll = self._last
        for p in self.disc.parameters():
            p.requires_grad_(False)
        g_loss = generator_adv_loss(self.disc(rec))
        for p in self.disc.parameters():
            p.requires_grad_(True)
        w = adaptive_weight(nll, g_loss, self.model.decoder.conv_out.weight) * self.cfg.gan_weight
        logs["g_adv"] = g_loss.detach()
        logs["adv_weight"] = torch.as_tensor(w).detach()
        return loss + w * g_loss

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
        from bitdance.evaluation.metrics import codebook_usage, psnr, ssim

        r = rec.detach().clamp(-1, 1)
        logs["psnr"] = psnr(r, x).mean()
        logs["ssim"] = ssim(r, x).mean()
        q_idx = model_quantizer(model).indices(q.quantized.detach())
        logs["code_entropy_bits"] = torch.tensor(codebook_usage(
            q_idx, codes_per_group=2 ** self.model_config.bits_per_group).entropy_bits)


def model_quantizer(model: nn.Module):
    return getattr(model, "module", model).quantizer


@torch.no_grad()
def generate_class_grid(model, tokenizer, *, rows: int, cols: int, seed: int = 0, device=None,
                        num_steps: int = 25, guidance_scale: float = 2.0,
                        guidance_schedule: str = "linear") -> np.ndarray:
    """Samples for classes 0..rows-1, ``cols`` each (row-major), as (rows*cols, H, W, 3) uint8."""
    from bitdance.images import to_uint8
    from bitdance.sampling.flow import FlowSampler

    labels = torch.arange(rows, device=device).repeat_interleave(cols)
    g = torch.Generator(device=device).manual_seed(seed)
    lat = model.generate(labels, sampler=FlowSampler(num_steps=num_steps), guidance_scale=guidance_scale,
                         guidance_schedule=guidance_schedule, generator=g)
    return to_uint8(tokenizer.decode(lat.to(next(tokenizer.parameters()).dtype), generator=g)).numpy()
