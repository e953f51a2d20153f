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

from bitdance import validation
from bitdance.files import atomic_write
from bitdance.training.config import TrainConfig
from bitdance.training.distributed import Dist
from bitdance.training.tasks import generate_class_grid
from bitdance.training.trainer import Trainer

__all__ = ["run_demo", "plot_curves"]

# Shares of the time budget; the rest is data loading, encoding, sampling and evaluation.
TOKENIZER_SHARE, GENERATOR_SHARE = 0.25, 0.68
# Sized for CPUs without bf16 units (fp32 at 100-160 GFLOP/s on 2 cores). The head is most of the cost of
# a step, so it draws one flow time per condition (diff_batch_mul=1; the official 4 quadruples the head's
# work for a lower-variance loss) and its three blocks share one adaLN linear (the official models share
# one between 2-3 blocks too). With the same trunk a step then costs 148 instead of 394 GFLOP: on a 2-core
# AVX2 EPYC 1.33 s instead of 4.31 s in fp32 (docs/benchmarks.md, benchmarks/demo_train_speed.py).
GENERATOR_MODEL = {"dim": 256, "n_layer": 4, "n_head": 4, "head_width": 256, "head_depth": 3,
                   "head_adaln_blocks": 1, "cls_token_num": 4, "perturb_rate": 0.1, "diff_batch_mul": 1}
BATCH_SIZE, GENERATOR_LR = 64, 2e-3
# Generator steps for digits of the requested class, measured with this model on one fp32 tokenizer
# (200 samples, guidance 3 constant): 250 steps at lr 2e-3 -> 99.5% classified as asked (88.5% with the
# linear schedule); at lr 1e-3, 150 steps -> 55%, 300 -> 99%. Fewer steps than this get a warning at the start.
MIN_GENERATOR_STEPS = 250
# Samples: SAMPLES_PER_CLASS per digit are classified; the first 10 of each make the picture. Guidance is
# constant: the official linear ramp (from 1 at the first AR step) leaves the first of only 16 AR steps
# unguided, and those decide which digit is drawn (88.5% vs 99.5% classified as asked, same model).
SAMPLES_PER_CLASS, HEAD_STEPS, GUIDANCE, SCHEDULE = 20, 25, 3.0, "constant"


def _warmup_for(steps: int) -> int:
    """Linear warm-up of about a tenth of the run (at most 100 steps): a fixed 100 would eat most of
    a short run on a slow CPU."""
    return max(1, min(100, steps // 10))


def _fit_in(trainer: Trainer, seconds: float, calib_steps: int = 5, log=print) -> dict[str, Any]:
    """Size the run (and its cosine schedule) to a time budget, measured on the first steps."""
    trainer.train_step()  # the first step pays one-off allocations: timing it would undersize the run
    t0 = time.perf_counter()
    for _ in range(calib_steps - 1):
        trainer.train_step()
    per_step = (time.perf_counter() - t0) / (calib_steps - 1)
    steps = max(calib_steps + 1, int(seconds / per_step))
    trainer.cfg.steps = steps  # the LR schedule reads cfg.steps, so it stretches to the new length
    trainer.cfg.warmup_steps = _warmup_for(steps)
    # A shared machine can slow down after the calibration: a hard stop at 1.2x keeps the run's promise
    # on time (the schedule then ends early, on a small learning rate).
    trainer.cfg.max_minutes = 1.2 * seconds / 60
    log(f"{trainer.cfg.task}: {per_step:.3f}s/step -> {steps} steps in {seconds / 60:.1f} min")
    summary = trainer.fit()
    if summary.get("stopped_early"):
        log(f"{trainer.cfg.task}: the machine slowed down; stopped at step {summary['steps']} of {steps} "
            f"to stay within the time budget")
    return summary


def generator_step_seconds(device: torch.device, *, data_classes: int = 10, repeats: int = 2) -> float:
    """Seconds per demo generator training step on ``device``, timed on random tokens before anything is
    trained (so the demo can say at the start whether the budget is enough), in the precision the
    trainer will pick."""
    from bitdance.models.presets import bitdance_preset, tokenizer_preset
    from bitdance.models.transformer import BitDance
    from bitdance.precision import auto_precision

    cfg = bitdance_preset("BitDance-T-4x", image_size=32, tokenizer=tokenizer_preset("tiny-d4c16"),
                          num_classes=data_classes, **GENERATOR_MODEL)
    model = BitDance(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    lat = torch.randint(0, 2, (BATCH_SIZE, cfg.latent_dim, cfg.grid_size, cfg.grid_size), generator=g).float() * 2 - 1
    lat, labels = lat.to(device), torch.randint(0, data_classes, (BATCH_SIZE,), generator=g).to(device)
    bf16 = auto_precision(device) == "bf16"
    times = []
    for _ in range(repeats + 1):  # the first step pays one-off allocations
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(lat, labels, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times[1:])


# What the generator's steps get of a budget: the tokenizer's share and the 10% kept for sampling and
# evaluation go, and so do about 30 s of start-up and dataset encoding.
_SETUP_SECONDS = 30.0


def generator_seconds(budget_s: float) -> float:
    """Seconds of generator steps that a demo with a budget of ``budget_s`` seconds runs."""
    return max(30.0, min(GENERATOR_SHARE, 0.9 - TOKENIZER_SHARE) * budget_s - _SETUP_SECONDS)


def minutes_needed(step_seconds: float) -> float:
    """The ``--minutes`` at which the generator gets MIN_GENERATOR_STEPS steps at ``step_seconds`` each."""
    share = min(GENERATOR_SHARE, 0.9 - TOKENIZER_SHARE)
    return math.ceil((MIN_GENERATOR_STEPS * step_seconds + _SETUP_SECONDS) / share / 60)


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
    from bitdance.data import fetch_batch
    from bitdance.evaluation.metrics import psnr, ssim

    idx = torch.arange(min(n, len(data)))
    x, _ = fetch_batch(data, idx)
    rec = tokenizer.decode(tokenizer.encode(x.to(device))).float().clamp(-1, 1).cpu()
    return {"psnr": float(psnr(rec, x).mean()), "ssim": float(ssim(rec, x).mean()), "images": len(idx)}


def run_demo(out: str | Path = "bitdance-demo", *, minutes: float = 12.0, seed: int = 0,
             data: str = "mnist", log=print) -> dict[str, Any]:
    from PIL import Image

    from bitdance.data import load_dataset
    from bitdance.evaluation.metrics import class_accuracy, classifier_name, load_classifier
    from bitdance.images import make_grid, to_uint8
    from bitdance.precision import auto_precision, cpu_description

    validation.number(minutes, "--minutes", 0.01, 24 * 60.0)
    validation.seed(seed, "--seed")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise validation.InputError(f"--out {out} is an existing file; the demo writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    budget = 60 * minutes
    timings: dict[str, float] = {}

    # 0. is the budget enough on this machine? (timed on the device and in the precision the trainers take)
    device = Dist().device
    step_s = generator_step_seconds(device)
    planned = int(generator_seconds(budget) / step_s)
    log(f"demo: {auto_precision(device)} on {device} ({torch.get_num_threads()} threads); generator "
        f"{step_s:.2f} s/step -> about {planned} steps in {minutes:g} min")
    if planned < MIN_GENERATOR_STEPS:
        log(f"demo: warning: this machine is too slow for a good result in {minutes:g} min: the generator "
            f"needs about {MIN_GENERATOR_STEPS} steps for digits of the requested class, and gets about "
            f"{planned}. Run with --minutes {minutes_needed(step_s):g} for that (continuing anyway).")

    # 1. tokenizer ------------------------------------------------------------------------------
    tok_cfg = TrainConfig(task="tokenizer", out=str(out / "runs" / "tokenizer"), data=data, split=None,
                          image_size=32, model="tiny-d4c16", steps=10**6, batch_size=BATCH_SIZE, lr=1e-3,
                          warmup_steps=50, ema_decay=0.999, seed=seed, log_every=25, ckpt_every=0,
                          final_samples=False, progress=True)
    t = time.perf_counter()
    tok_trainer = Trainer(tok_cfg)
    tok_summary = _fit_in(tok_trainer, TOKENIZER_SHARE * budget, log=log)
    timings["tokenizer_training_s"] = time.perf_counter() - t
    tok_path = Path(tok_cfg.out) / "tokenizer"

    # 2. generator ------------------------------------------------------------------------------
    gen_cfg = TrainConfig(task="generator", out=str(out / "runs" / "generator"), data=data, split=None,
                          image_size=32, model="BitDance-T-4x", model_overrides=dict(GENERATOR_MODEL),
                          tokenizer=str(tok_path), steps=10**6, batch_size=BATCH_SIZE, lr=GENERATOR_LR, warmup_steps=100,
                          ema_decay=0.999, seed=seed, log_every=25, ckpt_every=0, final_samples=False,
                          progress=True)
    t = time.perf_counter()
    gen_trainer = Trainer(gen_cfg)
    remaining = budget - (time.perf_counter() - t_start)
    gen_summary = _fit_in(gen_trainer, min(GENERATOR_SHARE * budget, max(30.0, remaining - 0.1 * budget)),
                          log=log)
    timings["generator_training_s"] = time.perf_counter() - t

    # 3. samples, and how often they show the digit asked for -----------------------------------
    t = time.perf_counter()
    model = gen_trainer.inference_copy()
    tokenizer = gen_trainer.task.tokenizer
    arr = generate_class_grid(model, tokenizer, rows=10, cols=SAMPLES_PER_CLASS, seed=seed, device=device,
                              num_steps=HEAD_STEPS, guidance_scale=GUIDANCE, guidance_schedule=SCHEDULE)
    labels = np.repeat(np.arange(10), SAMPLES_PER_CLASS)
    shown = arr.reshape(10, SAMPLES_PER_CLASS, *arr.shape[1:])[:, :10].reshape(100, *arr.shape[1:])
    grid = make_grid(shown, 10)
    atomic_write(out / "samples.png", lambda tmp: Image.fromarray(grid).resize(
        (grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(tmp, format="PNG"))
    timings["sampling_s"] = time.perf_counter() - t
    try:
        clf_name = classifier_name(data)
    except ValueError:  # an image folder: no shipped classifier to judge the samples
        clf_name, clf, accuracy = None, None, None
        log(f"demo: no shipped classifier for {data!r}; class accuracy not measured")
    else:
        clf = load_classifier(clf_name)
        accuracy = class_accuracy(arr, labels, model=clf)
        log(f"demo: {100 * accuracy:.1f}% of {len(labels)} samples are classified as the class asked for "
            f"(shipped {clf_name} classifier, {100 * clf.info['test']['accuracy']:.1f}% on real test images)")

    test = load_dataset(data, image_size=32, split="test" if data.startswith("mnist") else None)
    quality = _tokenizer_quality(tokenizer, test, device)
    from bitdance.data import fetch_batch

    x, _ = fetch_batch(test, torch.arange(0, len(test), max(1, len(test) // 16))[:16])
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
                      "seconds_per_step": _per_step(tok_trainer), "path": str(tok_path)},
        "generator": {"preset": "BitDance-T-4x", "overrides": GENERATOR_MODEL, "steps": gen_summary["steps"],
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "final_loss": float(np.mean(final_losses)) if final_losses else math.nan,
                      "seconds_per_step": _per_step(gen_trainer), "min_steps_for_good_digits": MIN_GENERATOR_STEPS,
                      "path": str(Path(gen_cfg.out) / "model")},
        "sampling": {"head_steps": HEAD_STEPS, "guidance_scale": GUIDANCE, "schedule": SCHEDULE,
                     "samples": len(labels), "rows": "digits 0-9", "class_accuracy": accuracy,
                     "classifier": None if clf is None else {"name": clf_name,
                                                              "test_accuracy": clf.info["test"]["accuracy"]}},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "precision": gen_trainer.precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
    }
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report


def _per_step(trainer: Trainer) -> float | None:
    """Mean seconds per step over the logged intervals (metrics carry images/s)."""
    rates = [r["img_per_s"] for r in trainer.history if r.get("img_per_s")]
    return round(trainer.cfg.batch_size / float(np.mean(rates)), 4) if rates else None

