"""``bitdance demo``: the whole method on the embedded default data, on a laptop CPU.

Trains a small binary tokenizer and a small next-patch (4x) BitDance model on MNIST-5k, then samples
one row per digit. Everything lands in ``--out``: ``samples.png``, ``reconstructions.png``,
``loss_curves.png``, ``report.json`` and the trained models (``tokenizer/``, ``model/``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write
from .training import TrainConfig, Trainer, generate_class_grid

__all__ = ["run_demo", "plot_curves"]

# Shares of the time budget; the rest is data loading, encoding, sampling and evaluation.
TOKENIZER_SHARE, GENERATOR_SHARE = 0.25, 0.68
GENERATOR_MODEL = {"dim": 256, "n_layer": 4, "n_head": 4, "head_width": 256, "head_depth": 3,
                   "head_adaln_blocks": 3, "cls_token_num": 4, "perturb_rate": 0.1}


def _fit_in(trainer: Trainer, seconds: float, calib_steps: int = 5, log=print) -> dict[str, Any]:
    """Size the run (and its cosine schedule) to a time budget, measured on the first steps."""
    t0 = time.perf_counter()
    for _ in range(calib_steps):
        trainer.train_step()
    per_step = (time.perf_counter() - t0) / calib_steps
    steps = max(calib_steps + 1, int(seconds / per_step))
    trainer.cfg.steps = steps  # the LR schedule reads cfg.steps, so it stretches to the new length
    log(f"{trainer.cfg.task}: {per_step:.3f}s/step -> {steps} steps in {seconds / 60:.1f} min")
    return trainer.fit()


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, *, size=(900, 360)) -> None:
    """A small line plot (one panel per curve) with Pillow, so the demo needs no plotting library."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    n = max(1, len(curves))
    pw = W // n
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (name, pts) in enumerate(curves.items()):
        x0, y0, x1, y1 = i * pw + 55, 30, (i + 1) * pw - 15, H - 40
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, 8), name, fill=(0, 0, 0))
        if len(pts) < 2:
            continue
        xs = np.array([p[0] for p in pts], dtype=float)
        ys = np.array([p[1] for p in pts], dtype=float)
        lo, hi = float(np.min(ys)), float(np.percentile(ys, 98))
        hi = hi if hi > lo else lo + 1e-6
        def to_px(x, y):
            fx = (x - xs[0]) / max(xs[-1] - xs[0], 1e-9)
            fy = (min(y, hi) - lo) / (hi - lo)
            return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)
        draw.line([to_px(x, y) for x, y in zip(xs, ys)], fill=colors[i % len(colors)], width=2)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            _, py = to_px(xs[0], v)
            draw.text((x0 - 52, py - 6), f"{v:.3g}", fill=(80, 80, 80))
        draw.text((x0, y1 + 6), f"step {int(xs[0])}", fill=(80, 80, 80))
        draw.text((x1 - 70, y1 + 6), f"step {int(xs[-1])}", fill=(80, 80, 80))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


@torch.no_grad()
def _tokenizer_quality(tokenizer, data, device, n: int = 500) -> dict[str, float]:
    from .evaluation import psnr, ssim
    from .training import _fetch

    idx = torch.arange(min(n, len(data)))
    x, _ = _fetch(data, idx)
    rec = tokenizer.decode(tokenizer.encode(x.to(device))).float().clamp(-1, 1).cpu()
    return {"psnr": float(psnr(rec, x).mean()), "ssim": float(ssim(rec, x).mean()), "images": len(idx)}


def run_demo(out: str | Path = "bitdance-demo", *, minutes: float = 12.0, seed: int = 0,
             data: str = "mnist", log=print) -> dict[str, Any]:
    from PIL import Image

    from .data import load_dataset
    from .pipeline import make_grid, to_uint8

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    budget = 60 * minutes
    timings: dict[str, float] = {}

    # 1. tokenizer ------------------------------------------------------------------------------
    tok_cfg = TrainConfig(task="tokenizer", out=str(out / "runs" / "tokenizer"), data=data, split=None,
                          image_size=32, model="tiny-d4c16", steps=10**6, batch_size=64, lr=1e-3,
                          warmup_steps=50, ema_decay=0.999, seed=seed, log_every=25, ckpt_every=0,
                          progress=True)
    t = time.perf_counter()
    tok_trainer = Trainer(tok_cfg)
    tok_summary = _fit_in(tok_trainer, TOKENIZER_SHARE * budget, log=log)
    timings["tokenizer_training_s"] = time.perf_counter() - t
    tok_path = Path(tok_cfg.out) / "tokenizer"

    # 2. generator ------------------------------------------------------------------------------
    gen_cfg = TrainConfig(task="generator", out=str(out / "runs" / "generator"), data=data, split=None,
                          image_size=32, model="BitDance-T-4x", model_overrides=dict(GENERATOR_MODEL),
                          tokenizer=str(tok_path), steps=10**6, batch_size=64, lr=1e-3, warmup_steps=100,
                          ema_decay=0.999, seed=seed, log_every=25, ckpt_every=0, progress=True)
    t = time.perf_counter()
    gen_trainer = Trainer(gen_cfg)
    remaining = budget - (time.perf_counter() - t_start)
    gen_summary = _fit_in(gen_trainer, min(GENERATOR_SHARE * budget, max(30.0, remaining - 0.1 * budget)),
                          log=log)
    timings["generator_training_s"] = time.perf_counter() - t

    # 3. outputs --------------------------------------------------------------------------------
    t = time.perf_counter()
    device = gen_trainer.d.device
    model = gen_trainer.inference_copy()
    tokenizer = gen_trainer.task.tokenizer
    arr = generate_class_grid(model, tokenizer, rows=10, cols=10, seed=seed, device=device,
                              num_steps=25, guidance_scale=3.0)
    grid = make_grid(arr, 10)
    atomic_write(out / "samples.png", lambda tmp: Image.fromarray(grid).resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(tmp, format="PNG"))
    timings["sampling_100_images_s"] = time.perf_counter() - t

    test = load_dataset(data, image_size=32, split="test" if data.startswith("mnist") else None)
    quality = _tokenizer_quality(tokenizer, test, device)
    from .training import _fetch

    x, _ = _fetch(test, torch.arange(0, len(test), max(1, len(test) // 16))[:16])
    rec = tokenizer.decode(tokenizer.encode(x.to(device))).float().cpu()
    rgrid = make_grid(np.concatenate([to_uint8(x).numpy(), to_uint8(rec).numpy()]), 16)
    atomic_write(out / "reconstructions.png", lambda tmp: Image.fromarray(rgrid).resize(
        (rgrid.shape[1] * 2, rgrid.shape[0] * 2), Image.NEAREST).save(tmp, format="PNG"))

    curves = {
        "tokenizer reconstruction L1": [(r["step"], r["rec_loss"]) for r in tok_trainer.history if "rec_loss" in r],
        "generator loss (velocity MSE)": [(r["step"], r["loss"]) for r in gen_trainer.history],
    }
    plot_curves(curves, out / "loss_curves.png")
    timings["total_s"] = time.perf_counter() - t_start

    final_losses = [r["loss"] for r in gen_trainer.history[-5:]]
    report = {
        "data": data,
        "tokenizer": {"preset": "tiny-d4c16", "steps": tok_summary["steps"], "test_psnr_db": quality["psnr"],
                      "test_ssim": quality["ssim"], "test_images": quality["images"],
                      "final_rec_loss": tok_trainer.history[-1].get("rec_loss") if tok_trainer.history else None,
                      "path": str(tok_path)},
        "generator": {"preset": "BitDance-T-4x", "overrides": GENERATOR_MODEL, "steps": gen_summary["steps"],
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "final_loss": float(np.mean(final_losses)) if final_losses else math.nan,
                      "path": str(Path(gen_cfg.out) / "model")},
        "sampling": {"head_steps": 25, "guidance_scale": 3.0, "schedule": "linear", "rows": "digits 0-9"},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report
