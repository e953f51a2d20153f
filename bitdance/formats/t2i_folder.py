"""The released text-to-image folder layout (BitDance-14B-16x / -64x), read and written.

Hugging Face Qwen3 files (``config.json``, ``model*.safetensors`` [+ index], tokenizer files),
``ae_config.json`` + ``ae.safetensors`` (the binary image tokenizer), ``vision_head_config.json`` +
``vision_head.safetensors`` (keys ``net.*``) and ``projector.safetensors`` (``fc1.*``, ``fc2.*``).
Sizes in ``vision_head_config.json`` are checked against the head's safetensors header before anything is
built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bitdance.files import atomic_write, save_safetensors
from bitdance.formats.folders import FORMAT, read_json_or_none
from bitdance.formats.official import load_tokenizer, save_official_tokenizer
from bitdance.formats.quantized import empty_params, stored_weights_format, stream_load
from bitdance.formats.weights import (
    CheckpointError,
    infer_head_config,
    load_file,
    load_into,
    safetensors_shapes,
    split_prefix,
)
from bitdance.models.config import ConfigError, T2IConfig
from bitdance.models.quantized import check_weights, quantize_
from bitdance.models.t2i import BitDanceT2I
from bitdance.offload import enable_sequential_offload, to_device_except

__all__ = ["is_text_to_image_folder", "AE_CONFIG", "AE_WEIGHTS", "FIELDS_BESIDE_HEAD_JSON", "HEAD_CONFIG", "HEAD_WEIGHTS", "PROJECTOR_WEIGHTS", "OFFLOADABLE",
           "check_offload", "load_folder", "save_folder"]

# Files of the released folder layout (besides the Hugging Face LLM and tokenizer files).
AE_CONFIG, AE_WEIGHTS = "ae_config.json", "ae.safetensors"
HEAD_CONFIG, HEAD_WEIGHTS = "vision_head_config.json", "vision_head.safetensors"
PROJECTOR_WEIGHTS = "projector.safetensors"
# T2IConfig fields that vision_head_config.json does not hold (down_factor only when it is not the released
# 16). Our save_pretrained keeps them in config.json under "bitdance" (Hugging Face configs carry unknown
# keys along) so that a saved model reloads as it was; a trainer continuing from a folder passes them on.
FIELDS_BESIDE_HEAD_JSON = ("down_factor", "max_res_tokens", "resolutions", "allow_any_resolution")


def load_folder(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                low_cpu_mem_usage: bool = True, load_ae: bool = True, offload: Sequence[str] = (),
                weights: str | None = None, **config_overrides):
    """A :class:`~bitdance.models.t2i.BitDanceT2I` from a released folder, as-is. ``config_overrides`` set
    T2IConfig fields the folder does not store (e.g. ``resolutions``, ``allow_any_resolution``, ``head_dim``).
    ``dtype=None`` keeps the dtype of the stored LLM weights for the whole model.

    ``offload`` names parts that stay on the CPU when ``device`` is a GPU: ``"ae"`` (the image
    tokenizer, used once per image; images are then decoded on the CPU) and ``"lm_head"`` (the LLM's
    text output layer, 0.78B parameters for Qwen3-14B, which image generation never calls) and
    ``"sequential"``: the decoder layers, the head and the image tokenizer stay in host memory and visit the
    device one at a time (:mod:`bitdance.offload`; for GPUs with less memory than the model).

    ``weights`` (``"int8"``, ``"fp8"``, ``"bf16"``; :mod:`bitdance.models.quantized`) stores the linear layers
    of the LLM, the head and the projector that way. Such a model, and any folder whose files already hold
    int8 / fp8 weights (ours, or the fp8 copies users share: :mod:`bitdance.formats.quantized`), is read tensor
    by tensor and quantized as it is read, so memory never holds it in a wider precision."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    offload = check_offload(offload)
    check_weights(weights)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder")
    _check_folder(path, load_ae)
    try:
        head_json = json.loads((path / HEAD_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / HEAD_CONFIG}: invalid JSON ({e})") from None
    try:
        config = T2IConfig.from_vision_head_json(head_json, **config_overrides)
    except ConfigError as e:
        raise CheckpointError(f"{path / HEAD_CONFIG}: {e}") from None

    _check_head_header(path, head_json, config)
    files = llm_files(path) + [path / HEAD_WEIGHTS, path / PROJECTOR_WEIGHTS]
    stored = stored_weights_format(files)
    text_tok = AutoTokenizer.from_pretrained(str(path))
    ae = load_tokenizer(path / AE_WEIGHTS) if load_ae else None
    if weights is None and stored is None:
        llm = Qwen3ForCausalLM.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto",
                                               low_cpu_mem_usage=low_cpu_mem_usage)
        _check_cond_width(path, head_json, llm)
        model = BitDanceT2I(llm, text_tok, config, ae=ae)
        head_sd = load_file(path / HEAD_WEIGHTS)
        net_sd = split_prefix(head_sd, "net.")
        if not net_sd or len(net_sd) != len(head_sd):
            raise CheckpointError(f"{path / HEAD_WEIGHTS}: expected only net.* keys, got e.g. {list(head_sd)[:3]}")
        load_into(model.vision_head.net, net_sd, what=f"vision head {path / HEAD_WEIGHTS}")
        load_into(model.projector, load_file(path / PROJECTOR_WEIGHTS), what=f"projector {path / PROJECTOR_WEIGHTS}")
    else:
        model = _load_quantized(path, head_json, config, text_tok, ae, weights=weights or stored, dtype=dtype)
        llm = model.llm
    target = dtype if dtype is not None else llm.get_input_embeddings().weight.dtype
    model.to(dtype=target)
    if "lm_head" in offload and llm.get_output_embeddings().weight is llm.get_input_embeddings().weight:
        raise ValueError("offload='lm_head': this LLM ties its output layer to the input embeddings "
                         "(tie_word_embeddings), which generation needs on the device")
    if "sequential" in offload:
        if device is None:
            raise ValueError("offload='sequential' needs the device the parts visit (device='cuda', ...)")
        enable_sequential_offload(model, device, ae="ae" not in offload)  # "ae": decode on the host
        return model.eval()
    keep = {id(model.ae)} if "ae" in offload and model.ae is not None else set()
    if "lm_head" in offload:
        keep.add(id(llm.get_output_embeddings()))
    to_device_except(model, device, keep)
    return model.eval()


def llm_files(path: Path) -> list[Path]:
    """The LLM's safetensors files of a folder: the shards its index lists, or ``model.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return [path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    return [path / "model.safetensors"]


def _check_cond_width(path: Path, head_json: dict[str, Any], llm) -> None:
    if head_json.get("ch_cond", llm.config.hidden_size) != llm.config.hidden_size:
        raise CheckpointError(f"{path / HEAD_CONFIG}: ch_cond={head_json['ch_cond']} does not match the "
                              f"LLM hidden size {llm.config.hidden_size}")


def _load_quantized(path: Path, head_json: dict[str, Any], config: T2IConfig, text_tok, ae, *, weights: str,
                    dtype: torch.dtype | None) -> BitDanceT2I:
    """The model built without memory (:func:`~bitdance.formats.quantized.empty_params`), its linear layers made
    ``weights`` shells, then filled one tensor at a time."""
    from transformers import AutoConfig, Qwen3ForCausalLM

    llm_config = AutoConfig.from_pretrained(str(path))
    tied = bool(getattr(llm_config, "tie_word_embeddings", False))
    with empty_params():
        llm = Qwen3ForCausalLM(llm_config)
        _check_cond_width(path, head_json, llm)
        model = BitDanceT2I(llm, text_tok, config, ae=ae)
    # A tied output layer is the embedding table itself: it stays as wide as the embeddings.
    quantize_(model.llm, weights, skip=("lm_head",) if tied else ())
    quantize_(model.vision_head, weights)
    quantize_(model.projector, weights)
    stream_load(model.llm, llm_files(path), dtype=dtype, what=f"LLM {path}",
                tied=("lm_head.weight",) if tied else ())
    if tied:
        model.llm.tie_weights()
    stream_load(model.vision_head.net, [path / HEAD_WEIGHTS], dtype=dtype, prefix="net.",
                what=f"vision head {path / HEAD_WEIGHTS}")
    stream_load(model.projector, [path / PROJECTOR_WEIGHTS], dtype=dtype, what=f"projector {path / PROJECTOR_WEIGHTS}")
    return model


def save_folder(model, path: str | os.PathLike, *, max_shard_size: str | int | None = None) -> None:
    """Write the released layout (LLM + tokenizer files, ae_*, vision_head_*, projector).
    ``max_shard_size`` shards the LLM weights (``model-*.safetensors`` + index) as the release does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.llm.save_pretrained(str(path), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    model.text_tokenizer.save_pretrained(str(path))
    if model.ae is not None:
        save_official_tokenizer(path / AE_WEIGHTS, model.ae)
    head_json = model.config.vision_head_json(model.hidden_size)
    atomic_write(path / HEAD_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(head_json, indent=2)))
    save_safetensors({f"net.{k}": v for k, v in model.vision_head.net.state_dict().items()}, path / HEAD_WEIGHTS)
    save_safetensors(dict(model.projector.state_dict()), path / PROJECTOR_WEIGHTS)


OFFLOADABLE = ("ae", "lm_head", "sequential")


def _check_head_header(path: Path, head_json: dict[str, Any], config: T2IConfig) -> None:
    """vision_head_config.json against the head's safetensors header, before anything is built."""
    shapes = safetensors_shapes(path / HEAD_WEIGHTS)
    net = {k[len("net."):]: torch.empty(v, device="meta") for k, v in shapes.items() if k.startswith("net.")}
    try:
        found = infer_head_config(net, head_dim=config.head_dim)
    except CheckpointError:
        return  # not the layout sizes can be read from; load_into's full check still runs
    pairs = [("ch_latent", config.head_width, found.width), ("depth_latent", config.head_depth, found.depth),
             ("depth_adanln", config.head_adaln, found.adaln_blocks), ("ch_target", config.latent_dim, found.in_channels)]
    if "ch_cond" in head_json:
        pairs.append(("ch_cond", head_json["ch_cond"], found.cond_channels))
    for key, stated, in_file in pairs:
        if stated != in_file:
            raise CheckpointError(f"{path / HEAD_CONFIG}: {key} = {stated!r} but {HEAD_WEIGHTS} has {key} = {in_file}")


def check_offload(offload: Sequence[str]) -> tuple[str, ...]:
    """``offload`` as a tuple of OFFLOADABLE names, or a ValueError (a bare string is a mistake: it would
    split into characters)."""
    if isinstance(offload, str) or any(o not in OFFLOADABLE for o in offload):
        raise ValueError(f"offload takes a list of {' and/or '.join(map(repr, OFFLOADABLE))}, got {offload!r}")
    return tuple(offload)


def _check_folder(path: Path, need_ae: bool) -> None:
    """CheckpointError naming the first missing file of the released layout."""
    required = ["config.json", HEAD_CONFIG, HEAD_WEIGHTS, PROJECTOR_WEIGHTS] + ([AE_CONFIG, AE_WEIGHTS] if need_ae else [])
    for name in required:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name} (not a BitDance text-to-image folder)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        for s in shards:
            if not (path / s).is_file():
                raise CheckpointError(f"{path}: missing {s} (listed in model.safetensors.index.json)")
    elif not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: missing model.safetensors (or model.safetensors.index.json + shards)")
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        raise CheckpointError(f"{path}: missing tokenizer.json (the Qwen text tokenizer files)")


def is_text_to_image_folder(path: str | os.PathLike) -> bool:
    """True for a released text-to-image folder (it has vision_head_config.json) or a folder whose
    config.json says kind "text_to_image" (ours: top level, or under "bitdance" in the LLM config)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / HEAD_CONFIG).is_file():
        return True
    cfg = read_json_or_none(path / "config.json")
    if not isinstance(cfg, dict):
        return False
    ours = cfg.get("bitdance") if isinstance(cfg.get("bitdance"), dict) else cfg
    return ours.get("format") == FORMAT and ours.get("kind") == "text_to_image"
