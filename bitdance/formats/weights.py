"""Weights files as data: the safe reader of ``.pt`` / ``.safetensors`` files, their headers, and the
architecture read off the tensors' shapes.

Official files are opened with ``torch.load(weights_only=True)`` and an explicit allow-list
(``argparse.Namespace``, the training arguments); nothing else is ever unpickled. Architectures are
read off the tensors' shapes, so any size of official checkpoint loads without a config file.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitdance.models.config import BitDanceConfig, ConfigError, HeadConfig, TokenizerConfig
from bitdance.models.presets import GENERATOR_SIZES

__all__ = ["SAFE_GLOBALS", "CheckpointError", "load_file", "safetensors_header", "safetensors_shapes", "check_config_fits",
           "check_shapes_fit", "split_prefix", "load_into", "infer_tokenizer_config", "infer_head_config",
           "infer_bitdance_config", "training_args_dict"]

SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable, foreign, or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Raw file access
# --------------------------------------------------------------------------------------------
def load_file(path: str | os.PathLike) -> Any:
    """Load a ``.safetensors`` file (-> dict of tensors) or a PyTorch pickle with the safe loader."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a weights file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header.
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(path))
        except Exception as e:  # SafetensorsError's import path differs across versions
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, OSError... depending on damage
        raise CheckpointError(_refusal(path, str(e)) or f"{path}: cannot read as a PyTorch checkpoint (corrupt, "
                              f"truncated or foreign file): {_first_line(e)}") from None


# The wordings torch has used for a global the safe loader will not import (1.13-2.5, and 2.6+).
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL)\s+([\w.<>]+)")
# Lines of torch's message that are advice to the caller, never passed on: re-running with
# weights_only=False is exactly what must not be done with a file of unknown origin.
_ADVICE = ("weights_only", "Weights only load failed", "Check the documentation", "In PyTorch 2.6",
           "trusted source", "add_safe_globals", "safe_globals")


def _refusal(path: Path, message: str) -> str | None:
    """The safe loader's refusal in our words, or None when it was not a refusal (a damaged file)."""
    glob = _GLOBAL.search(message)
    if glob:
        return (f"{path}: refusing to unpickle {glob.group(1)}: only tensors, containers and argparse.Namespace "
                "are loaded from .pt files (not a BitDance checkpoint, or a file that runs code when loaded)")
    if "Weights only load failed" not in message and "WeightsUnpickler" not in message:
        return None
    detail = [ln.strip() for ln in message.splitlines()
              if ln.strip() and not any(a in ln for a in _ADVICE)]
    detail = [re.sub(r"^WeightsUnpickler error:\s*", "", d) for d in detail]
    why = detail[0][:200] if detail else "the safe loader refused it"
    return f"{path}: cannot read as a PyTorch checkpoint (corrupt, truncated or foreign file): {why}"


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names -> (safetensors dtype name such as ``"BF16"``, ``"I8"``, ``"F8_E4M3"``; shape), from the
    file's header, without reading the tensors (milliseconds)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (s.get_dtype(), tuple(int(n) for n in s.get_shape()))
                    for k in f.keys() for s in [f.get_slice(k)]}
    except Exception as e:  # SafetensorsError's import path differs across versions
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (:func:`safetensors_header`)."""
    return {k: shape for k, (_, shape) in safetensors_header(path).items()}


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def _generator_fields(sd: dict[str, torch.Tensor], down_factor: int) -> list[tuple[str, Any, str]]:
    """(config field, value the tensors imply, the tensor it comes from) for a BitDance state dict."""
    out: list[tuple[str, Any, str]] = []

    def shape(key):
        return tuple(sd[key].shape) if key in sd else None

    if shape("emb_norm.weight"):
        out.append(("dim", shape("emb_norm.weight")[0], "emb_norm.weight"))
    if any(k.startswith("layers.") for k in sd):
        out.append(("n_layer", _count(sd, r"layers\.(\d+)\."), "layers.*"))
    cls = shape("cls_embedding.weight")
    if cls and shape("emb_norm.weight"):
        out.append(("num_classes", cls[0] - 1, "cls_embedding.weight"))
        out.append(("cls_token_num", cls[1] // shape("emb_norm.weight")[0], "cls_embedding.weight"))
    out.append(("parallel_num", shape("query_token")[1] + 1 if shape("query_token") else 1, "query_token"))
    if shape("proj_in.w1.weight"):
        out.append(("tokenizer.z_channels", shape("proj_in.w1.weight")[1], "proj_in.w1.weight"))
    pos = shape("pos_for_diff.weight")
    if pos and math.isqrt(pos[0]) ** 2 == pos[0]:
        out.append(("image_size", math.isqrt(pos[0]) * down_factor, "pos_for_diff.weight"))
    if shape("head.net.cond_embed.weight"):
        out.append(("head_width", shape("head.net.cond_embed.weight")[0], "head.net.cond_embed.weight"))
    if any(k.startswith("head.net.res_blocks.") for k in sd):
        out.append(("head_depth", _count(sd, r"head\.net\.res_blocks\.(\d+)\."), "head.net.res_blocks.*"))
    if any(k.startswith("head.net.ada_ln_blocks.") for k in sd):
        out.append(("head_adaln_blocks", _count(sd, r"head\.net\.ada_ln_blocks\.(\d+)\."),
                    "head.net.ada_ln_blocks.*"))
    return out


def check_config_fits(config: BitDanceConfig | TokenizerConfig, shapes: dict[str, tuple[int, ...]], *,
                      what: str) -> None:
    """Refuse, naming the config key, a config whose sizes disagree with a weights file's tensor shapes.

    Runs on the file's header before anything is built, so ``dim: 1000000000`` in a config.json is
    refused in milliseconds instead of allocating 176 GB."""
    sd = _meta(shapes)
    if isinstance(config, TokenizerConfig):
        try:
            found = infer_tokenizer_config(sd, what=what, groups=config.groups)
        except CheckpointError:
            return  # not a tokenizer layout we can read sizes off; the full shape check still runs
        pairs = [(f, getattr(found, f), "encoder.* / decoder.*") for f in
                 ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch", "gan_decoder")]
    else:
        pairs = _generator_fields(sd, config.tokenizer.down_factor)
    for field_name, in_file, source in pairs:
        owner, attr = (config.tokenizer, field_name.split(".", 1)[1]) if field_name.startswith("tokenizer.") \
            else (config, field_name)
        stated = getattr(owner, attr)
        if stated != in_file:
            raise CheckpointError(f"{what}: config.json says {field_name} = {stated!r} but the weights have "
                                  f"{field_name} = {in_file!r} (from {source})")


def check_shapes_fit(module: nn.Module, shapes: dict[str, tuple[int, ...]], *, what: str) -> None:
    """:func:`load_into`'s check against a header's shapes (``module`` may live on the meta device)."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    shape = [f"{k} {shapes[k]} vs {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
    _report(what, missing, unexpected, shape)


def split_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], *, what: str = "model") -> None:
    """Strict load with a one-line error naming the first offending keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    _report(what, missing, unexpected, shape)
    module.load_state_dict(sd, strict=True)


def _report(what: str, missing: list[str], unexpected: list[str], shape: list[str]) -> None:
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} "
                        f"({len(unexpected)})")
    if shape:
        problems.append(f"shape mismatch {shape[:3]}{' ...' if len(shape) > 3 else ''} (file vs model)")
    if problems:
        raise CheckpointError(f"{what}: weights do not fit: " + "; ".join(problems))


def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def _need(sd, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what}: not a BitDance state dict (no {key!r})")
    return sd[key]


# --------------------------------------------------------------------------------------------
# Architecture inference from tensor shapes
# --------------------------------------------------------------------------------------------
def infer_tokenizer_config(sd: dict[str, torch.Tensor], *, what: str = "tokenizer", **overrides) -> TokenizerConfig:
    """TokenizerConfig from ``encoder.*`` / ``decoder.*`` shapes."""
    ch, cin = _need(sd, "encoder.conv_in.weight", what).shape[:2]
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    nres = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    mult = tuple(int(_need(sd, f"encoder.down.{i}.block.0.conv2.weight", what).shape[0]) // int(ch)
                 for i in range(levels))
    z = int(_need(sd, "encoder.conv_out.weight", what).shape[0])
    dec_in = int(_need(sd, "decoder.conv_in.weight", what).shape[1])
    out_ch = int(_need(sd, "decoder.conv_out.weight", what).shape[0])
    kw: dict[str, Any] = dict(ch=int(ch), ch_mult=mult, num_res_blocks=nres, z_channels=z, in_channels=int(cin),
                              out_ch=out_ch, gan_decoder=dec_in == 2 * z)
    if "groups" not in overrides:
        # Official tokenizers use 8-bit entropy groups (4 groups for 32 bits).
        kw["groups"] = max(1, z // 8) if z % 8 == 0 else 1
    kw.update(overrides)
    try:
        return TokenizerConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{what}: {e}") from None


def infer_head_config(sd: dict[str, torch.Tensor], *, head_dim: int = 64, **overrides) -> HeadConfig:
    """HeadConfig from a head network's state dict (keys ``time_embed.*``, ``res_blocks.*``, ...)."""
    what = "diffusion head"
    W, cin = _need(sd, "input_proj.weight", what).shape
    transformer = any(".attn." in k for k in sd)
    kw: dict[str, Any] = dict(
        variant="transformer" if transformer else "mlp",
        in_channels=int(cin),
        cond_channels=int(_need(sd, "cond_embed.weight", what).shape[1]),
        width=int(W),
        depth=_count(sd, r"res_blocks\.(\d+)\."),
        adaln_blocks=_count(sd, r"ada_ln_blocks\.(\d+)\."),
        head_dim=head_dim,
    )
    kw.update(overrides)
    try:
        return HeadConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{what}: {e}") from None


def training_args_dict(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, dict):
        return args
    return {}


def infer_bitdance_config(sd: dict[str, torch.Tensor], *, args: Any = None, n_head: int | None = None,
                          tokenizer: TokenizerConfig | None = None) -> BitDanceConfig:
    """BitDanceConfig from an official (or our) generator state dict; ``args`` are the training args."""
    what = "generator"
    a = training_args_dict(args)
    dim = int(_need(sd, "emb_norm.weight", what).shape[0])
    n_layer = _count(sd, r"layers\.(\d+)\.attention\.wqkv")
    if n_head is None and a.get("n_head"):
        n_head = int(a["n_head"])
    if n_head is None:
        size = str(a.get("model", "")).split("-")[-1].upper()
        n_head = GENERATOR_SIZES[size]["n_head"] if size in GENERATOR_SIZES and \
            GENERATOR_SIZES[size]["dim"] == dim else max(1, dim // 64)  # every released model uses 64-d heads
    rows, width = _need(sd, "cls_embedding.weight", what).shape
    P = int(sd["query_token"].shape[1]) + 1 if "query_token" in sd else 1
    latent_dim = int(_need(sd, "proj_in.w1.weight", what).shape[1])
    num_tokens = int(_need(sd, "pos_for_diff.weight", what).shape[0])
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise CheckpointError(f"{what}: pos_for_diff has {num_tokens} rows, not a square token grid")
    if tokenizer is None:
        vae = split_prefix(sd, "vae.")
        if vae:
            tokenizer = infer_tokenizer_config(vae)
        else:  # generator-only file: the down factor is all the generator needs of its tokenizer
            levels = int(math.log2(int(a.get("down_size", 16)))) + 1
            tokenizer = TokenizerConfig(z_channels=latent_dim, groups=max(1, latent_dim // 8)
                                        if latent_dim % 8 == 0 else 1, ch_mult=(1,) * levels)
    if tokenizer.z_channels != latent_dim:
        raise CheckpointError(f"{what}: tokens have {latent_dim} bits but the tokenizer has "
                              f"{tokenizer.z_channels}")
    head = split_prefix(sd, "head.net.")
    head_cfg = infer_head_config(head) if head else None
    if head_cfg is None:
        raise CheckpointError(f"{what}: no diffusion head weights (head.net.*)")
    if (head_cfg.variant == "transformer") != (P > 1):
        raise CheckpointError(f"{what}: a {head_cfg.variant} head does not fit parallel_num={P}")
    kw: dict[str, Any] = dict(
        dim=dim, n_layer=n_layer, n_head=n_head,
        head_depth=head_cfg.depth, head_width=head_cfg.width, head_adaln_blocks=head_cfg.adaln_blocks,
        parallel_num=P, image_size=grid * tokenizer.down_factor,
        num_classes=int(rows) - 1, cls_token_num=int(width) // dim, tokenizer=tokenizer,
    )
    # Training hyper-parameters recorded in the official args (names differ slightly).
    for src, dst in [("diff_batch_mul", "diff_batch_mul"), ("perturb_rate", "perturb_rate"),
                     ("drop_rate", "drop_rate"), ("time_schedule", "time_schedule"),
                     ("time_shift", "time_shift"), ("P_mean", "P_mean"), ("P_std", "P_std"),
                     ("class_dropout_prob", "class_dropout_prob"), ("order", "order")]:
        if src in a and a[src] is not None:
            kw[dst] = a[src]
    if a.get("parallel_mode") == "standard" and P > 1:
        raise CheckpointError(f"{what}: parallel_mode='standard' (channel-stacked patches) is not supported; "
                              "BitDance uses patch-wise raster order")
    try:
        return BitDanceConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{what}: {e}") from None


