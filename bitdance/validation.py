"""Bounds on what a user may ask for, shared by the pipelines, the command line and the studio.

Every check raises :class:`InputError` (a ``ValueError``) with one line that names the argument, the
value and what is allowed, before any work starts: a typo such as ``--steps 1000000000`` must not
allocate gigabytes and run for hours, and a value the sampler would quietly ignore (``nan`` or a
negative guidance) must not produce images that look like the ones asked for.

The bounds (README, "Limits"):

==================  =======================================  ===========================================
argument            allowed                                  why
==================  =======================================  ===========================================
flow steps          1 .. 1000 (integer)                      the paper samples with 25-50
guidance scale      1 .. 100, finite (1 = off)               below 1 pushes away from the condition
seed                0 .. 2^63 - 1 (integer)                  one image per seed (see :func:`seeded`)
images per call     1 .. 256                                 KV cache and decode memory grow with it
image size          positive; the model's size or one of     other sizes have no position embeddings
                    its resolutions
class ids           integers in 0 .. num_classes - 1
output image        .png, .jpg/.jpeg or .webp; not a folder  the writer honours the extension
==================  =======================================  ===========================================
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "InputError", "MAX_FLOW_STEPS", "MAX_GUIDANCE", "MAX_BATCH", "MAX_SEED", "IMAGE_FORMATS",
    "integer", "number", "flow_steps", "guidance_scale", "seed", "class_ids", "image_side",
    "image_format", "image_output", "device", "seeded",
]

MAX_FLOW_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_BATCH = 256
MAX_SEED = 2**63 - 1
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class InputError(ValueError):
    """An argument outside what the library accepts; the message names it and its allowed values."""


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"  # repr of a huge int is slow, or refused past 4300 digits
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def integer(value: Any, name: str, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]; bools, floats and strings are refused (no silent coercion)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value.item())
        else:
            raise InputError(f"{name} must be an integer between {lo} and {hi}, got {_show(value)}")
    value = int(value)
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {_show(value)}")
    return value


def number(value: Any, name: str, lo: float, hi: float) -> float:
    """``value`` as a finite float in [lo, hi]; bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number between {lo:g} and {hi:g}, got {_show(value)}")
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise InputError(f"{name} must be a finite number between {lo:g} and {hi:g}, got {_show(value)}")
    if not lo <= f <= hi:
        raise InputError(f"{name} must be between {lo:g} and {hi:g}, got {f:g}")
    return f


def flow_steps(value: Any, name: str = "num_inference_steps") -> int:
    return integer(value, name, 1, MAX_FLOW_STEPS)


def guidance_scale(value: Any, name: str = "guidance_scale") -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) \
            and float(value) < 1:
        raise InputError(f"{name} must be >= 1 (1 = no guidance; values below 1 push the image away from its "
                         f"condition), got {value:g}")
    return number(value, name, 1.0, MAX_GUIDANCE)


def seed(value: Any, name: str = "seed") -> int:
    return integer(value, name, 0, MAX_SEED)


def class_ids(labels: Any, num_classes: int, name: str = "class labels") -> torch.Tensor:
    """Class ids (an int, a sequence or an integer tensor) -> a 1-d long tensor, checked."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise InputError(f"{name} must hold integer class ids, got a {labels.dtype} tensor")
        ids = labels.flatten().long().cpu()
    else:
        items = [labels] if isinstance(labels, (numbers.Number, str, bytes)) else labels
        try:
            items = list(items)
        except TypeError:
            raise InputError(f"{name} must be a class id or a sequence of class ids, got {_show(labels)}") from None
        for item in items:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise InputError(f"{name} must hold integer class ids, got {_show(item)}")
        ids = torch.tensor([int(i) for i in items] if items else [], dtype=torch.long)
    if ids.numel() == 0:
        raise InputError(f"{name} is empty")
    if ids.numel() > MAX_BATCH:
        raise InputError(f"{name}: {ids.numel()} images in one call; at most {MAX_BATCH} (sample-npz makes "
                         f"any number in batches)")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_classes:
        shown = ids.tolist() if ids.numel() <= 16 else f"{ids.numel()} ids from {lo} to {hi}"
        raise InputError(f"{name} must be in [0, {num_classes - 1}] (this model's classes), got {shown}")
    return ids


def image_side(value: Any, name: str) -> int | None:
    """A height or width in pixels (``None`` = the model's choice); 0 and negatives are refused."""
    if value is None:
        return None
    return integer(value, name, 1, 1 << 16)


def image_format(path: str | os.PathLike) -> str:
    """The PIL format an image path's extension asks for; an extension we cannot write is refused."""
    ext = Path(path).suffix.lower()
    if ext not in IMAGE_FORMATS:
        raise InputError(f"{path}: cannot write images as {ext or 'a file without an extension'}; use "
                         f"{', '.join(IMAGE_FORMATS)}")
    fmt = IMAGE_FORMATS[ext]
    if fmt == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise InputError(f"{path}: this Pillow build cannot write WebP; use .png or .jpg")
    return fmt


def image_output(path: str | os.PathLike, *, separate: bool) -> Path:
    """Check where images go before any work: one grid image, or (``separate``) a folder of PNGs."""
    path = Path(path)
    if separate:
        if path.exists() and not path.is_dir():
            raise InputError(f"--out {path} is an existing file; --separate writes one PNG per image into a folder")
        parent = path
    else:
        if path.is_dir():
            raise InputError(f"--out {path} is a folder; give an image path (e.g. {path / 'samples.png'}) or "
                             "pass --separate to write one PNG per image into it")
        image_format(path)
        parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise InputError(f"--out {path}: cannot write under {parent}")
    return path


def device(name: Any) -> torch.device:
    """A device string -> ``torch.device``, refusing unknown names and devices this machine lacks."""
    if isinstance(name, torch.device):
        dev = name
    else:
        try:
            dev = torch.device(str(name))
        except (RuntimeError, ValueError):
            raise InputError(f"unknown device {_show(name)}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {dev}: CUDA is not available (torch {torch.__version__}"
                             f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {dev}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {dev}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise InputError(f"device {dev}: not supported; use cpu, cuda, cuda:N or mps")
    return dev


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------
# torch's CPU generator (mt19937) keeps only the low 32 bits of a manual seed, so seeds 0 and 2^32 would
# give the same images. Seeds below 2^32 keep torch's own seeding (the images every earlier release gave);
# larger ones fill the whole 624-word state from numpy's SeedSequence, so every seed has its own stream.
_MT_WORDS = 624
_STATE_BYTES = 5056  # sizeof(CPUGeneratorImplState) in torch >= 1.5: seed, left, seeded, next, state[624], ...


def seeded(value: Any, device: torch.device | str = "cpu", *, name: str = "seed") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with a checked seed in [0, 2^63)."""
    s = seed(value, name)
    g = torch.Generator(device=device)
    g.manual_seed(s)
    if s < 2**32 or g.device.type != "cpu":  # CUDA's Philox takes all 64 bits
        return g
    state = g.get_state().numpy().copy()
    if state.size != _STATE_BYTES:  # a layout we do not know: say so rather than collide silently
        raise InputError(f"{name} {s} needs more than 32 bits, which this torch version's CPU generator cannot "
                         f"take; use a seed below 2^32")
    words = np.random.SeedSequence(s).generate_state(_MT_WORDS, np.uint32).astype(np.uint64)
    words[0] |= np.uint64(0x80000000)  # mt19937's seeding guarantees a non-zero state the same way
    state[24:24 + 8 * _MT_WORDS] = np.frombuffer(words.astype("<u8").tobytes(), dtype=np.uint8)
    state[12:16] = np.frombuffer(np.int32(1).tobytes(), dtype=np.uint8)  # seeded
    state[8:12] = np.frombuffer(np.int32(1).tobytes(), dtype=np.uint8)  # left: regenerate on the next draw
    state[16:24] = 0  # next
    g.set_state(torch.from_numpy(state))
    return g
