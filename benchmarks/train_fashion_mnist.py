"""A longer CPU training run on Fashion-MNIST for docs/training.md.

    python benchmarks/train_fashion_mnist.py --out runs/fashion [--tokenizer-steps 800 --generator-steps 900]

Trains a 16-bit, 4x-down binary tokenizer and a 4x (2x2 patch) BitDance generator at 32x32, then
writes the loss curves, a reconstruction grid, class-conditional sample grids (one row per class) and
a JSON summary to docs/assets/ (``--docs`` to change). Resumable: re-running continues both runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bitdance.apps.demo import _tokenizer_quality, plot_curves
from bitdance.data import fetch_batch
from bitdance.files import atomic_write
from bitdance.images import make_grid, to_uint8
from bitdance.training.config import TrainConfig
from bitdance.training.tasks import generate_class_grid
from bitdance.training.trainer import Trainer

GENERATOR_MODEL = {"dim": 256, "n_layer": 4, "n_head": 4, "head_width": 256, "head_depth": 3,
                   "head_adaln_blocks": 3, "cls_token_num": 4, "perturb_rate": 0.1}


def save_png(arr: np.ndarray, path: Path, scale: int = 2) -> None:
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fashion")
    p.add_argument("--docs", default="docs/assets")
    p.add_argument("--tokenizer-steps", type=int, default=800)
    p.add_argument("--generator-steps", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    timings = {}

    tok_cfg = TrainConfig(task="tokenizer", out=str(out / "tokenizer"), data="fashion-mnist", split="train",
                          image_size=32, model="tiny-d4c16", steps=args.tokenizer_steps, batch_size=64, lr=1e-3,
                          warmup_steps=50, ema_decay=0.999, seed=args.seed, log_every=20, ckpt_every=100,
                          resume=True)
    t = time.perf_counter()
    tok_trainer = Trainer(tok_cfg)
    tok_trainer.fit()
    timings["tokenizer_s"] = time.perf_counter() - t

    gen_cfg = TrainConfig(task="generator", out=str(out / "generator"), data="fashion-mnist", split="train",
                          image_size=32, model="BitDance-T-4x", model_overrides=dict(GENERATOR_MODEL),
                          tokenizer=str(out / "tokenizer" / "tokenizer"), steps=args.generator_steps,
                          batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.999, seed=args.seed,
                          log_every=20, ckpt_every=100, sample_every=300, resume=True)
    t = time.perf_counter()
    gen_trainer = Trainer(gen_cfg)
    gen_trainer.fit()
    timings["generator_s"] = time.perf_counter() - t

    device = gen_trainer.d.device
    tokenizer = gen_trainer.task.tokenizer
    model = gen_trainer.inference_copy()
    from bitdance.data import load_dataset

    test = load_dataset("fashion-mnist", image_size=32, split="test")
    quality = _tokenizer_quality(tokenizer, test, device, n=1000)
    x, _ = fetch_batch(test, torch.arange(16) * 37)
    with torch.no_grad():
        rec = tokenizer.decode(tokenizer.encode(x.to(device))).float().cpu()
    save_png(make_grid(np.concatenate([to_uint8(x).numpy(), to_uint8(rec).numpy()]), 16),
             docs / "fashion_reconstructions.png")
    for cfg_scale in (1.0, 3.0):
        arr = generate_class_grid(model, tokenizer, rows=10, cols=10, seed=args.seed, device=device,
                                  num_steps=25, guidance_scale=cfg_scale)
        save_png(make_grid(arr, 10), docs / f"fashion_samples_cfg{cfg_scale:g}.png")
    plot_curves({
        "tokenizer reconstruction L1": [(r["step"], r["rec_loss"]) for r in tok_trainer.history],
        "tokenizer PSNR (train batch)": [(r["step"], r["psnr"]) for r in tok_trainer.history if "psnr" in r],
        "generator loss": [(r["step"], r["loss"]) for r in gen_trainer.history],
    }, docs / "fashion_loss_curves.png", size=(1200, 360))
    summary = {
        "tokenizer": {"steps": tok_trainer.step, "test_psnr_db": round(quality["psnr"], 2),
                      "test_ssim": round(quality["ssim"], 4), "test_images": quality["images"],
                      "final": tok_trainer.history[-1]},
        "generator": {"steps": gen_trainer.step, "final": gen_trainer.history[-1],
                      "parameters": sum(p.numel() for p in model.parameters()), "overrides": GENERATOR_MODEL},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads(),
    }
    atomic_write(docs / "fashion_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
