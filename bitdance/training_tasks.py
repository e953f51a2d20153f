"""What each training task trains: the binary tokenizer, the class-conditional generator (on latents
encoded once by a frozen tokenizer) and the text-to-image model. A task owns its model, data, loss and
sample grid; :class:`bitdance.training.Trainer` runs any of them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write, load_file
from .config import BitDanceConfig, TokenizerConfig, bitdance_preset, tokenizer_preset
from .data import fetch_batch
from .distributed import Dist
from .training_config import TrainConfig, TrainingError

__all__ = ["GeneratorTask", "TokenizerTask", "T2ITask", "T2ITrainModule", "encode_dataset", "model_quantizer",
           "parse_resolutions", "dataset_captions"]


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
        return _cached_or_encoded(path, len(self.data), d, log, "", lambda: encode_dataset(
            self.tokenizer, self.data, d.device, progress=self.cfg.progress and d.main))


    def export(self, net: nn.Module, out: Path, step: int) -> None:
        from .pipeline import BitDancePipeline

        BitDancePipeline(net, self.tokenizer, meta={"step": step}).save_pretrained(out / "model")

    def preview(self, net: nn.Module, device, seed: int) -> np.ndarray:
        from .images import make_grid

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


    preview_name = "reconstructions.png"

    def export(self, net: nn.Module, out: Path, step: int) -> None:
        from .pipeline import save_tokenizer_folder

        save_tokenizer_folder(net, out / "tokenizer", meta={"step": step})

    def preview(self, net: nn.Module, device, seed: int) -> np.ndarray:
        from .images import make_grid, to_uint8

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
        from .losses import adaptive_weight, generator_adv_loss

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
        from .t2i_training import training_loss

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


def _cached_or_encoded(path: Path, n: int, d: Dist, log, what: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The latents cached at ``path`` if they are complete, else ``encode()``'d and cached (by rank 0)."""
    lat = _load_cached_latents(path, n)
    if lat is not None:
        return lat
    log(f"encoding {n} images{what} with the frozen tokenizer (cached in {path.name})")
    lat = encode()
    if d.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(lat, tmp))
    return lat


class T2ITask(Task):
    """Text-to-image training: captions + images encoded by a frozen binary tokenizer, packed
    mixed-resolution rows (:func:`bitdance.t2i.pack_batch`), vision + ``text_weight`` x text loss."""

    T2I_KEYS_NOT_IN_FOLDER = ("resolutions", "allow_any_resolution", "max_res_tokens")

    def __init__(self, cfg: TrainConfig, d: Dist, log):
        from dataclasses import fields as dc_fields

        from .checkpoint import CheckpointError, load_tokenizer
        from .config import T2IConfig

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

        from .config import T2IConfig
        from .t2i import HEAD_CONFIG, BitDanceT2I, add_special_tokens
        from .t2i_training import distill_from

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

    def export(self, wrapper: nn.Module, out: Path, step: int) -> None:
        """OUT/model in the released folder layout (BitDanceT2I.save_folder), written to a temporary
        sibling folder and swapped in, so a crash never leaves a half-written model."""
        import copy

        import dataclasses

        from .pipeline import BitDanceT2IPipeline

        net = wrapper.net
        net.ae = copy.deepcopy(self.tokenizer).float().cpu()
        net.cpu()
        # The trained resolutions become the model's allowed list (stored in config.json under
        # "bitdance"), so BitDancePipeline.from_pretrained(OUT/model) accepts them as they are.
        trained = tuple(tuple(int(v) for v in r) for r in self.res)
        if not net.config.allow_any_resolution:
            net.config = dataclasses.replace(net.config, resolutions=tuple(dict.fromkeys(trained)))
        meta = {"step": step, "resolutions": [list(r) for r in trained]}
        BitDanceT2IPipeline(net, meta=meta).save_pretrained(out / "model")


    def preview(self, net: nn.Module, device, seed: int) -> np.ndarray:
        from .images import make_grid

        arr = self.sample_images(net, self.sample_prompts(), seed=seed)
        return make_grid(arr, len(arr))

    def new_model(self) -> nn.Module:
        """A fresh module of the trained structure (weights to be loaded)."""
        import copy

        from transformers import Qwen3ForCausalLM

        from .t2i import BitDanceT2I

        llm = Qwen3ForCausalLM(copy.deepcopy(self.llm_config))
        return T2ITrainModule(BitDanceT2I(llm, self.text_tokenizer, self.t2i_config))


    # data ---------------------------------------------------------------------------------------
    def _images(self, idx: torch.Tensor, res: tuple[int, int]) -> torch.Tensor:
        x, _ = fetch_batch(self.data, idx)
        return _resize(x.float(), *res)

    def _cached_latents(self, res: tuple[int, int], d: Dist, log) -> torch.Tensor:
        size = self.cfg.image_size or self.data.image_size
        path = _latent_cache_path(self.tokenizer, self.cfg,
                                  f"t2i|{self.cfg.data}|{self.cfg.split}|{size}|{res}|{len(self.data)}")

        @torch.no_grad()
        def encode() -> torch.Tensor:
            out = []
            for s in range(0, len(self.data), 256):
                x = self._images(torch.arange(s, min(s + 256, len(self.data))), res).to(d.device)
                out.append(self.tokenizer.encode(x).to(torch.int8).cpu())
            return torch.cat(out)

        return _cached_or_encoded(path, len(self.data), d, log, f" at {res[0]}x{res[1]}", encode)

    def loss(self, model, idx: torch.Tensor, device, g: torch.Generator):
        from .t2i_training import pack_batch

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
