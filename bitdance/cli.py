"""The ``bitdance`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16}[name]


def _save_png(array, path: Path) -> None:
    from PIL import Image

    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _match_preset(cfg) -> str | None:
    from .config import GENERATOR_SIZES, PARALLEL_VARIANTS

    for size, dims in GENERATOR_SIZES.items():
        if all(getattr(cfg, k) == v for k, v in dims.items()):
            for name, P in PARALLEL_VARIANTS.items():
                if P == cfg.parallel_num:
                    return f"BitDance-{size}-{name}"
    return None


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(path: str | Path) -> dict[str, Any]:
    """What a checkpoint file or folder is (used by ``bitdance info``)."""
    import torch

    from .checkpoint import CheckpointError, load_file, load_official_generator, load_tokenizer
    from .pipeline import _read_config, load_component

    path = Path(path)
    if path.is_dir():
        cfg = _read_config(path)
        out: dict[str, Any] = {"path": str(path), "format": "bitdance folder", "kind": cfg.get("kind")}
        if "generator" in cfg:
            gen = load_component(path, "generator")
            out.update(_generator_info(gen))
        if "tokenizer" in cfg:
            out["tokenizer"] = _tokenizer_info(load_component(path, "tokenizer"))
        out["meta"] = cfg.get("meta", {})
        return out
    obj = load_file(path)
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj or "emb_norm.weight" in obj):
        gen, tok, info = load_official_generator(path)
        out = {"path": str(path), "format": "official training checkpoint", "kind": "class_conditional",
               **_generator_info(gen), "weights": info["weights"], "epochs": info["epochs"]}
        if tok is not None:
            out["tokenizer"] = _tokenizer_info(tok)
        return out
    if isinstance(obj, dict) and ("state_dict" in obj or any(
            isinstance(k, str) and k.startswith("encoder.") for k in obj)):
        return {"path": str(path), "format": "official tokenizer", "kind": "tokenizer",
                "tokenizer": _tokenizer_info(load_tokenizer(path))}
    if isinstance(obj, dict) and any(isinstance(k, str) and "input_proj" in k for k in obj):
        from .checkpoint import load_head

        head = load_head(path)
        return {"path": str(path), "format": "diffusion head", "kind": "head", "head": head.config.to_dict(),
                "parameters": _params(head)}
    del torch
    raise CheckpointError(f"{path}: not a BitDance checkpoint")


def _generator_info(gen) -> dict[str, Any]:
    c = gen.config
    return {"preset": _match_preset(c) or "custom", "parameters": _params(gen), "parallel_num": c.parallel_num,
            "image_size": c.image_size, "num_classes": c.num_classes, "ar_steps": c.num_steps,
            "head": c.head.variant, "config": c.to_dict()}


def _tokenizer_info(tok) -> dict[str, Any]:
    c = tok.config
    return {"bits": c.z_channels, "down_factor": c.down_factor, "groups": c.groups,
            "gan_decoder": c.gan_decoder, "parameters": _params(tok)}


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def cmd_presets(args) -> None:
    import torch

    from .config import TOKENIZER_PRESETS, bitdance_preset, list_presets
    from .transformer import BitDance

    print(f"{'generator preset':<18} {'params':>9} {'P':>3} {'AR steps':>8}  (256 px, d16c32 tokenizer)")
    for name in list_presets():
        cfg = bitdance_preset(name)
        with torch.device("meta"):
            n = _params(BitDance(cfg))
        print(f"{name:<18} {n / 1e6:8.1f}M {cfg.parallel_num:>3} {cfg.num_steps:>8}")
    print(f"\n{'tokenizer preset':<18} {'bits':>5} {'down':>5} {'groups':>6} gan")
    for name, t in TOKENIZER_PRESETS.items():
        print(f"{name:<18} {t.z_channels:>5} {t.down_factor:>5} {t.groups:>6} {t.gan_decoder}")


def cmd_info(args) -> None:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    for k, v in info.items():
        if k == "config":
            continue
        print(f"{k}: {v}")


def cmd_sample(args) -> None:
    import numpy as np
    import torch

    from .pipeline import BitDancePipeline, make_grid

    torch.set_grad_enabled(False)
    pipe = BitDancePipeline.from_pretrained(args.model, tokenizer=args.tokenizer, device=args.device,
                                            dtype=_dtype(args.dtype))
    labels = args.classes or list(range(min(8, pipe.config.num_classes)))
    gen = torch.Generator(device=pipe.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = pipe(labels, num_inference_steps=args.steps, guidance_scale=args.cfg, guidance_schedule=args.schedule,
               sampler=args.sampler, generator=gen, output_type="np", use_kv_cache=not args.no_kv_cache)
    dt = time.perf_counter() - t0
    out_path = Path(args.out)
    if args.separate:
        out_path.mkdir(parents=True, exist_ok=True)
        for i, (lab, im) in enumerate(zip(labels, out.images)):
            _save_png(im, out_path / f"{i:04d}_class{lab}.png")
    else:
        _save_png(make_grid(np.asarray(out.images), args.nrow or min(len(labels), 8)), out_path)
    print(f"wrote {len(labels)} image(s) to {out_path} in {dt:.1f}s ({len(labels) / dt:.2f} img/s)")


def cmd_convert(args) -> None:
    from .checkpoint import save_official_generator, save_official_tokenizer
    from .pipeline import BitDancePipeline

    src, dst = Path(args.src), Path(args.dst)
    pipe = BitDancePipeline.from_pretrained(src, tokenizer=args.tokenizer, use_ema=not args.raw)
    if dst.suffix in (".pt", ".pth"):
        save_official_generator(dst, pipe.generator, pipe.tokenizer)
        if args.tokenizer_out:
            save_official_tokenizer(args.tokenizer_out, pipe.tokenizer)
    else:
        pipe.save_pretrained(dst)
    print(f"converted {src} -> {dst}")


def cmd_train(args, task: str) -> None:
    from .training import config_from_args, train

    summary = train(config_from_args(args, task))
    print(json.dumps(summary))


def cmd_demo(args) -> None:
    from .demo import run_demo

    report = run_demo(args.out, minutes=args.minutes, seed=args.seed, data=args.data)
    out = Path(args.out)
    print(f"tokenizer: PSNR {report['tokenizer']['test_psnr_db']:.2f} dB on {report['tokenizer']['test_images']} "
          f"held-out images; generator: final loss {report['generator']['final_loss']:.4f} after "
          f"{report['generator']['steps']} steps; total {report['timings_s']['total_s'] / 60:.1f} min")
    for name in ("samples.png", "reconstructions.png", "loss_curves.png", "report.json"):
        print(f"wrote {out / name}")


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="bitdance", description="BitDance: autoregressive image generation with "
                                "binary tokens. Run 'bitdance COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"bitdance {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("presets", help="list model and tokenizer presets with parameter counts", formatter_class=fmt)
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("info", help="describe a checkpoint: preset, parameters, P, tokenizer, training step",
                       formatter_class=fmt)
    s.add_argument("path", help="official .pt / tokenizer / head file, or a bitdance model folder")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("sample", help="generate class-conditional images into a grid PNG or files",
                       formatter_class=fmt)
    s.add_argument("--model", required=True, help="bitdance folder or official checkpoint (.pt)")
    s.add_argument("--tokenizer", help="tokenizer file (ae_d16c32.pt/.safetensors) if the model has none")
    s.add_argument("--classes", type=int, nargs="+", help="class ids (default: the first 8 classes)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=50, help="diffusion-head sampling steps")
    s.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--schedule", choices=["linear", "constant"], default="linear", help="guidance schedule")
    s.add_argument("--sampler", choices=["euler_maruyama", "euler"], default="euler_maruyama")
    s.add_argument("--out", default="samples.png", help="grid PNG, or a folder with --separate")
    s.add_argument("--separate", action="store_true", help="one PNG per image into the --out folder")
    s.add_argument("--nrow", type=int, default=0, help="grid columns (default: min(n, 8))")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--no-kv-cache", action="store_true", help="recompute the sequence each step (slow, for checks)")
    s.set_defaults(fn=cmd_sample)

    from .training import add_train_args

    s = sub.add_parser("demo", help="train a small tokenizer + 4x model on MNIST-5k on CPU and sample digits",
                       formatter_class=fmt)
    s.add_argument("--out", default="bitdance-demo", help="output folder")
    s.add_argument("--minutes", type=float, default=12.0, help="time budget; more minutes, better digits")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data", default="mnist", help="dataset (mnist, fashion-mnist) at 32x32")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("train-tokenizer", help="train a binary tokenizer (one process, or under torchrun)",
                       formatter_class=fmt)
    add_train_args(s, task="tokenizer")
    s.set_defaults(fn=lambda a: cmd_train(a, "tokenizer"))

    s = sub.add_parser("train", help="train a class-conditional BitDance generator on a trained tokenizer",
                       formatter_class=fmt)
    add_train_args(s, task="generator")
    s.set_defaults(fn=lambda a: cmd_train(a, "generator"))

    s = sub.add_parser("convert", help="official checkpoint (+tokenizer) -> bitdance folder, or back to .pt",
                       formatter_class=fmt)
    s.add_argument("src", help="official .pt or a bitdance folder")
    s.add_argument("dst", help="output folder (bitdance format) or a .pt path (official format)")
    s.add_argument("--tokenizer", help="separate tokenizer file for the source")
    s.add_argument("--tokenizer-out", help="with a .pt destination: also write the tokenizer here (.pt/.safetensors)")
    s.add_argument("--raw", action="store_true", help="take the raw 'model' weights instead of 'ema'")
    s.set_defaults(fn=cmd_convert)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .training import TrainingError

    try:
        args.fn(args)
    except (CheckpointError, ConfigError, CLIError, TrainingError, ValueError, FileNotFoundError) as e:
        print(f"bitdance {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
