"""Train the small class-accuracy CNN shipped in bitdance/assets (used by ``bitdance eval accuracy``).

    python benchmarks/train_classifier.py --data mnist           # MNIST-5k train split (4,500 digits)
    python benchmarks/train_classifier.py --data fashion-mnist   # Fashion-MNIST train split (60,000)

Trains :class:`bitdance.evaluation.DigitClassifier` on 32x32 RGB images in [-1, 1] (the 28x28 grey
images zero-padded to 32 and replicated to 3 channels, exactly as ``bitdance.data`` feeds the tokenizer
and generator), on CPU with one torch thread, then measures accuracy on the held-out test split
(MNIST-5k: the last 50 digits of each class; Fashion-MNIST: the 10,000 test images) with the weights
as stored (float16), and writes ``classifier_<data>.safetensors`` + ``classifier_<data>.json`` (test
accuracy, settings, timings) into ``--out`` (default: the package's assets folder).

Light augmentation (random shifts of up to 2 px; small rotations/scalings for digits, horizontal
flips for clothes) so the classifier tolerates the small misplacements of generated samples.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitdance.data import load_dataset
from bitdance.evaluation.metrics import (
    ASSETS_DIR,
    DigitClassifier,
    classifier_name,
    classify,
    load_classifier,
)
from bitdance.files import atomic_write, save_safetensors

DEFAULTS = {  # per data set: epochs, batch size, peak learning rate, augmentation
    "mnist": {"epochs": 30, "batch_size": 64, "lr": 3e-3, "rotate_deg": 10.0, "scale": 0.1, "hflip": False},
    "fashion-mnist": {"epochs": 4, "batch_size": 128, "lr": 3e-3, "rotate_deg": 0.0, "scale": 0.0,
                      "hflip": True},
}
SHIFT_PX = 2.0


def augment(x: torch.Tensor, g: torch.Generator, *, rotate_deg: float, scale: float, hflip: bool) -> torch.Tensor:
    """Random affine per image (shift <= 2 px, rotation, scaling, optional flip), zero (= -1) filled."""
    B, _, H, _ = x.shape
    ang = (torch.rand(B, generator=g) * 2 - 1) * math.radians(rotate_deg)
    s = 1 + (torch.rand(B, generator=g) * 2 - 1) * scale
    t = (torch.rand(B, 2, generator=g) * 2 - 1) * (2 * SHIFT_PX / H)  # normalised coordinates
    flip = torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0) if hflip else torch.ones(B)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos * flip, -sin, t[:, 0]], 1), torch.stack([sin * flip, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, choices=["mnist", "fashion-mnist"])
    p.add_argument("--out", default=str(ASSETS_DIR), help="folder for the .safetensors + .json")
    p.add_argument("--epochs", type=int, help="default: 30 (mnist), 4 (fashion-mnist)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name = classifier_name(args.data)
    hp = dict(DEFAULTS[name])
    for k in ("epochs", "batch_size", "lr"):
        if getattr(args, k) is not None:
            hp[k] = getattr(args, k)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    train_ds = load_dataset(args.data, image_size=32, split="train")
    test_ds = load_dataset(args.data, image_size=32, split="test")
    x_test, y_test = test_ds.batch(torch.arange(len(test_ds)))
    print(f"{name}: {len(train_ds)} train / {len(test_ds)} test images "
          f"(loaded in {time.perf_counter() - t0:.1f}s)", flush=True)

    model = DigitClassifier(len(train_ds.class_names), width=args.width, hidden=args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = len(train_ds) // hp["batch_size"]  # drop the last partial batch
    total = steps_per_epoch * hp["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=total, pct_start=0.15)
    aug = {k: hp[k] for k in ("rotate_deg", "scale", "hflip")}

    t_train = time.perf_counter()
    for epoch in range(hp["epochs"]):
        model.train()
        perm = torch.randperm(len(train_ds), generator=g)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            x, y = train_ds.batch(perm[i * hp["batch_size"]:(i + 1) * hp["batch_size"]])
            loss = F.cross_entropy(model(augment(x, g, **aug)), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
        model.eval()
        acc = float((torch.from_numpy(classify(x_test, model=model)) == y_test).float().mean())
        print(f"epoch {epoch + 1}/{hp['epochs']}: loss {loss_sum / steps_per_epoch:.4f}, test acc {acc:.4f} "
              f"({time.perf_counter() - t_train:.0f}s)", flush=True)
    train_s = time.perf_counter() - t_train

    # store float16 (halves the asset size) and measure the accuracy of exactly what ships
    out = Path(args.out)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    weights, info_path = out / f"classifier_{name}.safetensors", out / f"classifier_{name}.json"
    save_safetensors(sd, weights, metadata={"format": "bitdance-classifier", "dataset": name})
    info = {
        "dataset": name, "model": model.config, "parameters": n_params, "input": "32x32 RGB in [-1, 1]",
        "weights_dtype": "float16",
        "train": {"split": "train", "images": len(train_ds), **hp, "shift_px": SHIFT_PX, "optimizer": "AdamW",
                  "weight_decay": 5e-4, "schedule": "one-cycle (15% warm-up)", "label_smoothing": 0.05,
                  "seed": args.seed, "threads": args.threads, "train_seconds": round(train_s, 1),
                  "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "test": {"split": "test", "images": len(test_ds)},
    }
    atomic_write(info_path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    shipped = load_classifier(name, assets=out)
    pred = classify(x_test, model=shipped)
    test_acc = float((pred == y_test.numpy()).mean())
    per_class = [float((pred[y_test.numpy() == c] == c).mean()) for c in range(len(test_ds.class_names))]
    info["test"].update({"accuracy": round(test_acc, 5), "per_class_accuracy": [round(a, 4) for a in per_class]})
    atomic_write(info_path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    print(f"{name}: held-out test accuracy {test_acc:.4f} ({round(test_acc * len(test_ds))}/{len(test_ds)}) "
          f"after {train_s:.0f}s of training; {n_params} parameters; wrote {weights} "
          f"({weights.stat().st_size / 1024:.0f} KiB) and {info_path}")


if __name__ == "__main__":
    main()
