"""The authors' release files: ImageNet training checkpoints (``{model, ema, epochs, args}``, ``vae.*`` =
tokenizer), tokenizers (``ae_*.pt`` / ``.safetensors`` + ``_config.json``) and head weights, read and
written in their layout."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitdance.files import atomic_write, save_safetensors
from bitdance.formats.folders import load_component
from bitdance.formats.hub import resolve
from bitdance.formats.weights import (
    CheckpointError,
    infer_bitdance_config,
    infer_head_config,
    infer_tokenizer_config,
    load_file,
    load_into,
    split_prefix,
    training_args_dict,
)
from bitdance.models.config import TokenizerConfig
from bitdance.models.head import DiffusionHead
from bitdance.models.quantized import weights_format
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.models.transformer import BitDance

__all__ = ["load_tokenizer", "load_head", "load_official_generator", "save_official_generator",
           "save_official_tokenizer"]


def _tokenizer_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and ("model" in obj or "ema" in obj):
        sub = obj.get("ema") or obj.get("model")
        if isinstance(sub, dict) and any(k.startswith("vae.") for k in sub):
            obj = split_prefix(sub, "vae.")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a BitDance tokenizer file")
    sd = {k: v for k, v in obj.items() if k.startswith(("encoder.", "decoder."))}
    if not sd:
        raise CheckpointError(f"{path}: not a BitDance tokenizer file (no encoder.*/decoder.* weights; "
                              f"first keys {list(obj)[:3]})")
    return sd


def _sidecar_config(path: Path) -> dict[str, Any]:
    """Official tokenizers ship ``ae_d16c32_config.json`` / ``ae_config.json`` next to the weights."""
    for cand in (path.with_name(path.stem + "_config.json"), path.with_name("ae_config.json")):
        if cand.exists():
            try:
                return json.loads(cand.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cand}: invalid JSON ({e})") from None
    return {}


def load_tokenizer(path: str | os.PathLike, *, groups: int | None = None, model: str | None = None,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool | None = None, token: str | bool | None = None):
    """Load a tokenizer: official ``.pt`` (``{"state_dict": ...}``), official ``.safetensors``, a
    training checkpoint holding ``vae.*`` keys, or one of our folders (``config.json``); or by name: a
    released tokenizer (``"d32c256"``) or a repository id with ``model=`` the file
    (``"shallowdream204/BitDance-Tokenizer"``, ``model="ae_d32c256.safetensors"``), fetched through
    ``huggingface_hub`` (:mod:`bitdance.formats.hub`)."""
    found = resolve(path, model=model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                    token=token)
    if found.release is not None and found.release.kind != "tokenizer":
        if found.tokenizer is None:
            raise CheckpointError(f"{os.fspath(path)} is a {found.release.kind.replace('_', '-')} model, not a "
                                  "tokenizer")
        found = type(found)(found.tokenizer)  # a generator release: the tokenizer that comes with it
    path = found.path
    if path.is_dir():
        return load_component(path, "tokenizer")
    sd = _tokenizer_state(load_file(path), path)
    overrides: dict[str, Any] = {}
    side = _sidecar_config(path)
    if "gan_decoder" in side:
        overrides["gan_decoder"] = bool(side["gan_decoder"])
    if groups is not None:
        overrides["groups"] = groups
    cfg = infer_tokenizer_config(sd, what=f"tokenizer {path}", **overrides)
    tok = BinaryTokenizer(cfg)
    load_into(tok, sd, what=f"tokenizer {path.name}")
    return tok.eval()


def load_head(path: str | os.PathLike, *, head_dim: int = 64, **overrides):
    """Load a diffusion head network (official ``head.safetensors`` / ``vision_head.safetensors``)."""

    path = Path(path)
    obj = load_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a diffusion head file")
    sd = obj
    for prefix in ("head.net.", "net."):
        if any(k.startswith(prefix) for k in sd):
            sd = split_prefix(sd, prefix)
    cfg = infer_head_config(sd, head_dim=head_dim, **overrides)
    head = DiffusionHead(cfg)
    load_into(head.net, sd, what=f"diffusion head {path.name}")
    return head.eval()


def load_official_generator(path: str | os.PathLike, *, use_ema: bool = True, n_head: int | None = None,
                            tokenizer_groups: int | None = None, tokenizer: TokenizerConfig | None = None):
    """Load an official ImageNet training checkpoint (``{model, ema, epochs, args}``).

    Returns ``(generator, tokenizer_or_None, info)``; ``vae.*`` keys become the tokenizer. Pass the
    config of a separately loaded ``tokenizer`` for files without ``vae.*`` keys.
    """

    path = Path(path)
    obj = load_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a BitDance checkpoint (a {type(obj).__name__}, expected a dict)")
    if "ema" in obj or "model" in obj:
        which = "ema" if use_ema and isinstance(obj.get("ema"), dict) else "model"
        sd = obj.get(which)
        args = obj.get("args")
    elif "emb_norm.weight" in obj:  # a bare state dict
        which, sd, args = "state_dict", obj, None
    else:
        raise CheckpointError(f"{path}: not a BitDance generator checkpoint (top-level keys "
                              f"{sorted(map(str, obj))[:5]})")
    if not isinstance(sd, dict) or "emb_norm.weight" not in sd:
        raise CheckpointError(f"{path}: not a BitDance generator checkpoint (no emb_norm.weight in {which!r})")
    vae = split_prefix(sd, "vae.")
    tok_cfg = tokenizer
    if vae:
        tok_cfg = infer_tokenizer_config(vae, **({"groups": tokenizer_groups} if tokenizer_groups else {}))
    cfg = infer_bitdance_config(sd, args=args, n_head=n_head, tokenizer=tok_cfg)
    model = BitDance(cfg)
    load_into(model, {k: v for k, v in sd.items() if not k.startswith("vae.")}, what=f"generator {path.name}")
    tokenizer = None
    if vae:
        tokenizer = BinaryTokenizer(tok_cfg)
        load_into(tokenizer, vae, what=f"tokenizer in {path.name}")
        tokenizer.eval()
    info = {"weights": which, "epochs": obj.get("epochs"), "args": training_args_dict(args)}
    return model.eval(), tokenizer, info




def save_official_generator(path: str | os.PathLike, model: nn.Module, tokenizer: nn.Module | None = None, *,
                            ema: nn.Module | None = None, epochs: int = 0) -> None:
    """Write a generator in the official training-checkpoint layout (``{model, ema, epochs, args}``,
    ``vae.*`` = tokenizer), e.g. to use our models with the reference code."""
    cfg = model.config
    if cfg.head_type != "diffusion" or cfg.block_attention != "bidirectional":
        raise CheckpointError(f"the official format has no place for ablation models (head_type="
                              f"{cfg.head_type!r}, block_attention={cfg.block_attention!r}); use save_pretrained")
    if weights_format(model) is not None:
        raise CheckpointError(f"the official format holds full-precision weights; this model's are "
                              f"{weights_format(model)} (save it with save_pretrained)")

    def state(m):
        sd = {k: v.detach().cpu() for k, v in m.state_dict().items()}
        if tokenizer is not None:
            sd.update({f"vae.{k}": v.detach().cpu() for k, v in tokenizer.state_dict().items()})
        return sd

    args = argparse.Namespace(
        model="custom", image_size=cfg.image_size, down_size=cfg.down_size, latent_dim=cfg.latent_dim,
        cls_token_num=cfg.cls_token_num, num_classes=cfg.num_classes, parallel_num=cfg.parallel_num,
        diff_batch_mul=cfg.diff_batch_mul, perturb_rate=cfg.perturb_rate, drop_rate=cfg.drop_rate,
        time_schedule=cfg.time_schedule, time_shift=cfg.time_shift, P_mean=cfg.P_mean, P_std=cfg.P_std,
        parallel_mode="patch", n_head=cfg.n_head, class_dropout_prob=cfg.class_dropout_prob, order=cfg.order)
    obj = {"model": state(model), "ema": state(ema if ema is not None else model), "epochs": epochs, "args": args}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_official_tokenizer(path: str | os.PathLike, tokenizer: nn.Module) -> None:
    """Official tokenizer layout: ``.pt`` -> ``{"state_dict": ...}``; ``.safetensors`` -> flat weights
    plus ``<stem>_config.json`` with ``{"ddconfig": ..., "gan_decoder": ...}``."""
    path = Path(path)
    sd = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    if path.suffix == ".safetensors":
        save_safetensors(sd, path)
        side = {"ddconfig": tokenizer.config.ddconfig, "gan_decoder": tokenizer.config.gan_decoder}
        atomic_write(path.with_name(path.stem + "_config.json"),
                     lambda tmp: Path(tmp).write_text(json.dumps(side, indent=2)))
    else:
        atomic_write(path, lambda tmp: torch.save({"state_dict": sd}, tmp))
