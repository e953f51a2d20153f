"""Our folders: ``config.json`` (``format: bitdance``, a ``kind``) + ``<component>.safetensors``; and the
JSON reading and atomic folder replacement the text-to-image folders share."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from bitdance.files import current_umask, remove_stale_temps, save_safetensors, temp_sibling_prefix
from bitdance.formats.quantized import recorded_weights
from bitdance.formats.weights import (
    CheckpointError,
    check_config_fits,
    check_shapes_fit,
    load_file,
    load_into,
    safetensors_shapes,
)
from bitdance.models.config import BitDanceConfig, ConfigError, TokenizerConfig
from bitdance.models.quantized import quantize_
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.models.transformer import BitDance
from bitdance.version import __version__

__all__ = ["FORMAT", "KINDS", "read_folder_config", "load_component", "write_folder", "replace_folder",
           "read_json_or_none", "save_tokenizer_folder"]

# --------------------------------------------------------------------------------------------
# Our folders: config.json + <component>.safetensors
# --------------------------------------------------------------------------------------------
FORMAT = "bitdance"
KINDS = ("class_conditional", "tokenizer", "text_to_image")


def read_folder_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of one of our folders, checked: JSON, our format, a known kind."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (not a bitdance model folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a bitdance config (format={cfg.get('format') if isinstance(cfg, dict) else None!r})")
    if cfg.get("kind") not in KINDS:
        raise CheckpointError(f"{cfg_path}: unknown kind {cfg.get('kind')!r}; a bitdance folder is one of {list(KINDS)}")
    return cfg


def load_component(folder: str | os.PathLike, name: str) -> torch.nn.Module:
    """Load ``tokenizer`` or ``generator`` from one of our folders.

    The config is checked as data (types, signs), then against the weights file's header (every size it
    states must match the tensors'), and only then is the module built: a hostile or mistyped config.json
    is refused in milliseconds, naming the key."""
    folder = Path(folder)
    cfg = read_folder_config(folder)
    if name not in cfg:
        raise CheckpointError(f"{folder}: has no {name} (kind={cfg.get('kind')!r})")

    cls = BinaryTokenizer if name == "tokenizer" else BitDance
    try:
        config = (TokenizerConfig if name == "tokenizer" else BitDanceConfig).from_dict(cfg[name])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder}/config.json: invalid {name} config: {e}") from None
    weights = folder / f"{name}.safetensors"
    what = f"{name} {weights}"
    stored = cfg.get("weights", {})
    stored = recorded_weights(stored.get(name) if isinstance(stored, dict) else None,
                              f"{folder}/config.json: weights.{name}")
    shapes = safetensors_shapes(weights)
    check_config_fits(config, shapes, what=f"{folder}/config.json ({name})")
    with torch.device("meta"):  # sizes agree with the file: build without memory to compare every tensor
        probe = cls(config)
        if stored:
            quantize_(probe, stored)
    check_shapes_fit(probe, shapes, what=what)
    module = cls(config)
    if stored:
        quantize_(module, stored)
    load_into(module, load_file(weights), what=what)
    return module.eval()


def write_folder(folder: str | os.PathLike, config: dict, modules: dict[str, torch.nn.Module]) -> None:
    """Write ``config.json`` and ``<name>.safetensors`` into a fresh sibling folder, then swap it in."""

    def fill(tmp: Path) -> None:
        for name, module in modules.items():
            save_safetensors(module.state_dict(), tmp / f"{name}.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    replace_folder(folder, fill)


def replace_folder(folder: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """``fill`` a fresh sibling folder, then swap it in for ``folder``: a failure midway leaves the
    previous contents untouched."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is an existing file, not a model folder; give another path")
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder.parent, folder.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_sibling_prefix(folder), dir=folder.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None




def save_tokenizer_folder(tokenizer: BinaryTokenizer, folder: str | os.PathLike, *, meta: dict | None = None) -> None:
    """A tokenizer in our format: config.json (kind "tokenizer") + tokenizer.safetensors."""
    cfg = {"format": FORMAT, "bitdance_version": __version__, "kind": "tokenizer",
           "tokenizer": tokenizer.config.to_dict(), "meta": dict(meta or {})}
    write_folder(folder, cfg, {"tokenizer": tokenizer})

