"""The studio's edit requests: the image (an upload, or a result in the history) and the painted mask, as
the page sends them (``"edit": {"source": "data:image/png;base64,..." | {"job": ID, "index": K},
"mask": "data:image/png;base64,..."}``), decoded and checked before a job is queued."""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from bitdance.images import mask_tensor

__all__ = ["MAX_EDIT_SIDE", "parse_edit"]

# Largest side of an image to edit (the page scales uploads to the model's size first).
MAX_EDIT_SIDE = 2048
_DATA_URL = re.compile(r"data:image/(png|jpeg|webp);base64,([A-Za-z0-9+/=\s]+)")


def _decode(url: Any, what: str, error: Callable[[str], Exception]):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str):
        raise error(f"{what} must be a data:image/png;base64,... URL")
    m = _DATA_URL.fullmatch(url.strip())
    if m is None:
        raise error(f"{what} must be a data:image/(png|jpeg|webp);base64,... URL")
    try:
        raw = base64.b64decode(m.group(2), validate=False)
        with Image.open(io.BytesIO(raw)) as im:
            size = im.size
            if max(size) <= MAX_EDIT_SIDE:  # the header alone: a huge image is never decoded
                im.load()
                image = im.copy()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise error(f"{what} is not a readable image ({type(e).__name__})") from None
    if max(size) > MAX_EDIT_SIDE:
        raise error(f"{what} is {size[0]}x{size[1]}; at most {MAX_EDIT_SIDE} px a side")
    return image


def parse_edit(edit: Any, *, job_image: Callable[[str, int], bytes | None],
               error: Callable[..., Exception]) -> dict[str, Any]:
    """``edit`` -> {"image": (H, W, 3) uint8, "mask": (H, W) bool, "source": str, "masked": share}.
    ``job_image(id, index)`` is the PNG of a finished job's image (None: no such job or image); ``error``
    makes the StudioError to raise."""
    from PIL import Image

    def bad(message: str) -> Exception:
        return error(message, field="edit")

    if not isinstance(edit, dict) or set(edit) - {"source", "mask"} or "source" not in edit:
        raise bad('edit must be {"source": image, "mask": image}')
    source = edit["source"]
    if isinstance(source, dict):
        job, index = source.get("job"), source.get("index", 0)
        if not isinstance(job, str) or isinstance(index, bool) or not isinstance(index, int):
            raise bad('an edit source from the history is {"job": ID, "index": K}')
        png = job_image(job, index)
        if png is None:
            raise bad(f"no finished result {job}#{index} in the history (it may have been evicted)")
        image = Image.open(io.BytesIO(png))
        label = f"result {job}#{index}"
    else:
        image = _decode(source, "the image to edit", bad)
        label = "upload"
    image = np.asarray(image.convert("RGB"))
    if "mask" not in edit:
        raise bad("paint the region to regenerate (the mask is missing)")
    mask = mask_tensor(_decode(edit["mask"], "the mask", bad))[0].numpy() > 0
    if mask.shape != image.shape[:2]:
        raise bad(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                  f"{image.shape[1]}x{image.shape[0]}")
    if not mask.any():
        raise bad("the mask is empty: paint the region to regenerate")
    if mask.all():
        raise bad("the mask covers the whole image: nothing would be kept (generate instead)")
    return {"image": image, "mask": mask, "source": label, "masked": round(float(mask.mean()), 3)}
