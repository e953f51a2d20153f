"""``bitdance edit``: inpainting, outpainting and variations of an image file with any BitDance model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bitdance.apps.commands import CLIError, save_image, slug, torch_dtype
from bitdance.apps.options import HelpFormatter, integer, sampling_options
from bitdance.sampling.editing import VARIATIONS

__all__ = ["add_edit_parser", "cmd_edit", "read_image", "box_mask"]


def read_image(path: str, what: str):
    """An image file (a PIL image, loaded), or a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{what} {p}: no such file")
    try:
        with Image.open(p) as im:
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{what} {p}: not a readable image ({type(e).__name__})") from None


def box_mask(boxes: list[list[int]], width: int, height: int):
    """The union of pixel boxes ``x0 y0 x1 y1`` (x1, y1 exclusive) as an (H, W) bool mask."""
    import numpy as np

    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise CLIError(f"--box {x0} {y0} {x1} {y1} is not inside the {width}x{height} image "
                           "(x0 < x1 <= width, y0 < y1 <= height)")
        mask[y0:y1, x0:x1] = True
    return mask


def add_edit_parser(sub) -> argparse.ArgumentParser:
    """``bitdance edit`` in the command's parser (``sub``: its subparsers)."""
    s = sub.add_parser("edit", help="inpaint, outpaint or vary an image with any model (kept tokens stay exact)",
                       formatter_class=HelpFormatter, description="Encode --image with the model's tokenizer, keep its tokens "
                       "outside the region and sample the region anew: --mask FILE (white = regenerate) or --box, "
                       "--strength S (a variation) or --extend-right/--extend-down (outpainting). docs/editing.md "
                       "shows what works and the causal limit (a region cannot see kept tokens after it).")
    s.add_argument("model", metavar="MODEL", help="bitdance folder, official checkpoint (.pt) or text-to-image folder")
    s.add_argument("--image", required=True, help="the image to edit (a same-aspect image is resized to the model's)")
    s.add_argument("--mask", help="image-sized mask: non-zero (white) pixels are regenerated")
    s.add_argument("--box", type=integer, nargs=4, action="append", metavar=("X0", "Y0", "X1", "Y1"),
                   help="a pixel box to regenerate (x1, y1 exclusive); repeat for several")
    s.add_argument("--strength", type=float, help="a variation: the share of tokens regenerated (0-1)")
    s.add_argument("--variation", choices=list(VARIATIONS), default="random",
                   help="which tokens a --strength variation regenerates (flip: all, fed back with bit flips)")
    s.add_argument("--extend-right", type=integer, default=0, help="outpainting: pixels added on the right")
    s.add_argument("--extend-down", type=integer, default=0, help="outpainting: pixels added at the bottom")
    s.add_argument("--margin", type=integer, default=0,
                   help="also regenerate this many tokens after each regenerated one (softer seam)")
    s.add_argument("--mask-threshold", type=float, default=0.0,
                   help="a token is regenerated when more than this share of its pixels is masked (0: any)")
    s.add_argument("--tokenizer", help="tokenizer file (ae_d16c32.pt/.safetensors) if the model has none")
    s.add_argument("--classes", type=int, nargs="+", help="class of the result (class-conditional; several: one "
                   "edit each)")
    s.add_argument("--prompt", action="append", help="text of the result (text-to-image); repeat for several")
    s.add_argument("--num-images", type=integer, default=1, help="edits of the same image (different samples)")
    sampling_options(s, seed_help="seed of the sampling generator (same seed, same edit)", cfg_default=None,
                      cfg_help="classifier-free guidance scale, 1 = off; None = 4.0 class-conditional, 7.5 "
                      "text-to-image", schedule_default="linear")
    s.add_argument("--out", default="edit.png", help="grid PNG, or a folder with --separate")
    s.add_argument("--separate", action="store_true", help="one PNG per edit into the --out folder")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="None = fp32 (text-to-image: the stored dtype)")
    s.set_defaults(fn=cmd_edit)
    return s


def cmd_edit(args) -> None:
    import numpy as np
    import torch

    from bitdance import validation
    from bitdance.formats.t2i_folder import is_text_to_image_folder
    from bitdance.images import make_grid
    from bitdance.pipelines.class_conditional import BitDancePipeline

    t2i = is_text_to_image_folder(args.model)
    if t2i and args.classes:
        raise CLIError(f"{args.model} is a text-to-image model: give --prompt TEXT, not --classes")
    if t2i and not args.prompt:
        raise CLIError(f"{args.model} is a text-to-image model: give --prompt TEXT")
    if not t2i and args.prompt:
        raise CLIError(f"{args.model} is a class-conditional model: give --classes ID ..., not --prompt")
    if not t2i and not args.classes:
        raise CLIError("give the class of the result: --classes ID [ID ...] (several: one edit each)")
    given = (("--mask", args.mask), ("--box", args.box), ("--strength", args.strength is not None),
             ("--extend-right/--extend-down", args.extend_right or args.extend_down))
    modes = [name for name, on in given if on]
    if len(modes) != 1:
        raise CLIError("say what to regenerate with one of --mask FILE, --box X0 Y0 X1 Y1, --strength S "
                       "(a variation) or --extend-right/--extend-down PIXELS (outpainting)"
                       + (f"; got {' and '.join(modes)}" if modes else ""))
    validation.flow_steps(args.steps, "--steps")
    validation.seed(args.seed, "--seed")
    if args.cfg is not None:
        validation.guidance_scale(args.cfg, "--cfg")
    validation.integer(args.num_images, "--num-images", 1, validation.MAX_BATCH)
    out_path = validation.image_output(args.out, separate=args.separate)
    image = read_image(args.image, "--image")
    mask = None
    if args.mask:
        mask = read_image(args.mask, "--mask")
        if mask.size != image.size:
            raise CLIError(f"--mask is {mask.size[0]}x{mask.size[1]} but --image is {image.size[0]}x"
                           f"{image.size[1]}; give an image-sized mask")
    elif args.box:
        mask = box_mask(args.box, *image.size)
    device = validation.device(args.device or "cpu")
    torch.set_grad_enabled(False)
    dtype = torch_dtype(args.dtype) if args.dtype else (None if t2i else torch.float32)
    pipe = BitDancePipeline.from_pretrained(args.model, tokenizer=args.tokenizer, device=device, dtype=dtype)
    gen = validation.seeded(args.seed, pipe.device, name="--seed")
    conditions = list(args.prompt or args.classes)
    n = max(len(conditions), args.num_images)
    if len(conditions) == 1:
        conditions = conditions * n
    elif len(conditions) != n:
        raise CLIError(f"--num-images {args.num_images} with {len(conditions)} conditions: give one "
                       "condition, or as many as images")
    common = {"num_inference_steps": args.steps, "sampler": args.sampler, "generator": gen,
              "output_type": "np", "margin": args.margin, "mask_threshold": args.mask_threshold}
    if t2i:
        common.update(prompt=conditions, guidance_scale=7.5 if args.cfg is None else args.cfg)
        names = [f"prompt-{slug(p)}" for p in conditions]
    else:
        common.update(class_labels=conditions, guidance_scale=4.0 if args.cfg is None else args.cfg,
                      guidance_schedule=args.schedule)
        names = [f"class{c}" for c in conditions]
    t0 = time.perf_counter()
    if args.extend_right or args.extend_down:
        out = pipe.outpaint(image, right=args.extend_right, down=args.extend_down, **common)
    elif args.strength is not None:
        out = pipe.edit(image, strength=args.strength, variation=args.variation, **common)
    else:  # one image and one mask for every condition
        out = pipe.edit(image, mask, **common)
    dt = time.perf_counter() - t0
    share = float(out.regenerated.float().mean())
    if args.separate:
        out_path.mkdir(parents=True, exist_ok=True)
        for i, (name, im) in enumerate(zip(names, out.images)):
            save_image(im, out_path / f"{i:04d}_{name}.png")
    else:
        save_image(make_grid(np.asarray(out.images), min(n, 8)), out_path)
    print(f"wrote {n} edit(s) to {out_path} in {dt:.1f}s ({100 * share:.0f}% of the tokens regenerated)")
