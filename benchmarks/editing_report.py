"""Measure editing on a trained class-conditional model: the table and pictures of docs/editing.md.

    python benchmarks/editing_report.py --model bitdance-demo/runs/generator/model --data mnist \
        --name mnist --out docs/assets            # the demo's model (bitdance demo)
    python benchmarks/editing_report.py --model runs/fashion/generator/model --data fashion-mnist \
        --name fashion --out docs/assets          # benchmarks/train_fashion_mnist.py

On ``--num-images`` test images (class-balanced) it runs, with one seed:

* bottom half regenerated with the true class (completion): the shipped classifier's accuracy on the
  results, and the PSNR of the kept top half against the original next to that of the tokenizer's own
  reconstruction (kept tokens are bit-identical, so the two differ only where the decoder sees the new half);
* the same with another class (class swap: the top half of one class, the bottom drawn as another);
* the top half regenerated, the bottom kept (the causal limit: the top cannot see what it must join), with
  and without a one-row margin; seams are measured as the mean absolute step across the boundary row
  relative to that of the original images (1.0: as smooth as real images);
* a variations strip for several strengths.

Writes ``NAME_editing.json`` and ``NAME_editing_*.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bitdance.data import fetch_batch, load_dataset
from bitdance.evaluation.metrics import classify, load_classifier, psnr
from bitdance.files import atomic_write
from bitdance.images import make_grid, to_uint8
from bitdance.pipelines.class_conditional import BitDancePipeline


def seam(images: torch.Tensor, row: int) -> float:
    """Mean absolute step between pixel rows ``row - 1`` and ``row`` of (B, 3, H, W) images."""
    return float((images[:, :, row] - images[:, :, row - 1]).abs().mean())


def run(args) -> dict:
    torch.manual_seed(0)
    pipe = BitDancePipeline.from_pretrained(args.model)
    size = pipe.config.image_size
    ds = load_dataset(args.data, image_size=size, split="test")
    classifier = load_classifier(args.data)
    labels_all = np.asarray([int(ds[i][1]) for i in range(len(ds))])
    per_class = args.num_images // pipe.config.num_classes
    idx = np.concatenate([np.flatnonzero(labels_all == c)[:per_class] for c in range(pipe.config.num_classes)])
    x, y = fetch_batch(ds, torch.as_tensor(idx))
    x = x.float()
    y = y.long()
    n = len(idx)
    half = size // 2
    bottom = torch.zeros(n, size, size)
    bottom[:, half:] = 1
    top = 1 - bottom
    ref_tokens = pipe.tokenizer.encode(x)
    recon = pipe.decode(ref_tokens)
    quarter = size // 4
    common = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, guidance_schedule="constant",
                  output_type="pt")

    def edit(mask, labels, **kw):
        t0 = time.perf_counter()
        out = pipe.edit(x, mask, class_labels=labels, generator=torch.Generator().manual_seed(args.seed),
                        **common, **kw)
        return out, time.perf_counter() - t0

    def identical(out) -> float:
        """Share of the kept tokens that come back bit-identical to the encoded image (must be 1.0)."""
        kept = ~out.regenerated
        return float((out.latents == ref_tokens).all(1)[kept].float().mean())

    def acc(images, labels):
        return float((classify(images, model=classifier) == labels.numpy()).mean())

    rows, pictures = {}, {}
    real_seam = seam(x, half)
    out, dt = edit(bottom, y)
    rows["complete bottom (true class)"] = {
        "accuracy": acc(out.images, y), "kept_tokens_identical": identical(out),
        "psnr_kept_top": float(psnr(out.images[:, :, :half], x[:, :, :half]).mean()),
        "psnr_tokenizer_top": float(psnr(recon[:, :, :half], x[:, :, :half]).mean()),
        "psnr_kept_top_quarter": float(psnr(out.images[:, :, :quarter], x[:, :, :quarter]).mean()),
        "psnr_tokenizer_top_quarter": float(psnr(recon[:, :, :quarter], x[:, :, :quarter]).mean()),
        "seam": seam(out.images, half) / real_seam, "seconds_per_image": dt / n}
    pictures["complete"] = out.images
    swap = (y + 1 + torch.randint(0, pipe.config.num_classes - 1, (n,), generator=torch.Generator().manual_seed(1))
            ) % pipe.config.num_classes
    out, dt = edit(bottom, swap)
    rows["class swap (bottom as another class)"] = {
        "accuracy": acc(out.images, swap), "accuracy_original_class": acc(out.images, y),
        "kept_tokens_identical": identical(out),
        "psnr_kept_top": float(psnr(out.images[:, :, :half], x[:, :, :half]).mean()),
        "seam": seam(out.images, half) / real_seam, "seconds_per_image": dt / n}
    pictures["swap"] = out.images
    for margin in (0, size // pipe.tokenizer.down_factor):
        out, dt = edit(top, y, margin=margin)
        kept_rows = slice(half + (pipe.tokenizer.down_factor if margin else 0), size)
        rows[f"top regenerated (causal limit){', margin ' + str(margin) + ' tokens' if margin else ''}"] = {
            "accuracy": acc(out.images, y), "kept_tokens_identical": identical(out),
            "psnr_kept_bottom": float(psnr(out.images[:, :, kept_rows], x[:, :, kept_rows]).mean()),
            "psnr_tokenizer_bottom": float(psnr(recon[:, :, kept_rows], x[:, :, kept_rows]).mean()),
            "seam": seam(out.images, half) / real_seam, "seconds_per_image": dt / n}
        pictures[f"top_margin{margin}"] = out.images
    strengths = [0.0, 0.25, 0.5, 0.75, 1.0]
    strip = []
    for method in ("random", "tail", "flip"):
        row = []
        for s in strengths:
            kw = dict(variation=method, strength=s if method != "flip" else s / 2)
            out = pipe.edit(x[:1], class_labels=y[:1], generator=torch.Generator().manual_seed(args.seed),
                            **common, **kw)
            row.append(out.images[0])
        strip.append(torch.stack(row))
    rows["reference: tokenizer reconstruction"] = {"accuracy": acc(recon, y),
                                                     "psnr": float(psnr(recon, x).mean())}
    rows["reference: real test images"] = {"accuracy": acc(x, y)}

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = min(10, n)
    pick = torch.as_tensor([int(i) for i in np.linspace(0, n - 1, shown)])
    for key, imgs in pictures.items():
        masked = x.clone()
        masked[:, :, half:] = 0 if key in ("complete", "swap") else masked[:, :, half:]
        if key.startswith("top"):
            masked[:, :, :half] = 0
        grid = make_grid(to_uint8(torch.cat([x[pick], masked[pick], imgs[pick]])).numpy(), shown)
        _save_png(out_dir / f"{args.name}_editing_{key}.png", grid, scale=args.scale)
    grid = make_grid(to_uint8(torch.cat(strip)).numpy(), len(strengths))
    _save_png(out_dir / f"{args.name}_editing_variations.png", grid, scale=args.scale)
    report = {"model": str(args.model), "data": args.data, "images": n, "steps": args.steps, "cfg": args.cfg,
              "seed": args.seed, "rows": rows, "variation_strengths": strengths,
              "variation_methods": ["random", "tail", "flip (rate = strength / 2)"],
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    atomic_write(out_dir / f"{args.name}_editing.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report


def render(report: dict) -> str:
    """The markdown table of docs/editing.md for one report."""
    def f(v, spec=".1f", scale=1.0):
        return "" if v is None else format(v * scale, spec)

    lines = ["| edit | class accuracy | kept tokens identical | PSNR kept half (dB) | PSNR of the tokenizer "
             "there (dB) | PSNR far quarter: edit / tokenizer | seam vs real |", "|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        if name.startswith("reference"):
            continue
        kept = r.get("psnr_kept_top", r.get("psnr_kept_bottom"))
        tok = r.get("psnr_tokenizer_top", r.get("psnr_tokenizer_bottom"))
        far = (f"{f(r['psnr_kept_top_quarter'])} / {f(r['psnr_tokenizer_top_quarter'])}"
               if "psnr_kept_top_quarter" in r else "")
        acc = f(r["accuracy"], ".0f", 100) + "%"
        if "accuracy_original_class" in r:
            acc += f" (original class: {f(r['accuracy_original_class'], '.0f', 100)}%)"
        lines.append(f"| {name} | {acc} | {f(r.get('kept_tokens_identical'), '.0f', 100)}% | {f(kept)} | "
                     f"{f(tok)} | {far} | {f(r.get('seam'), '.2f')} |")
    ref = report["rows"]
    lines.append(f"| reference: the tokenizer's reconstruction | {f(ref['reference: tokenizer reconstruction']['accuracy'], '.0f', 100)}% | | | "
                 f"{f(ref['reference: tokenizer reconstruction']['psnr'])} (whole image) | | |")
    lines.append(f"| reference: the real test images | {f(ref['reference: real test images']['accuracy'], '.0f', 100)}% | | | | | 1.00 |")
    return "\n".join(lines)


def _save_png(path: Path, grid: np.ndarray, *, scale: int) -> None:
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a class-conditional bitdance folder")
    p.add_argument("--data", help="mnist or fashion-mnist (its test split, its shipped classifier)")
    p.add_argument("--name", help="prefix of the output files")
    p.add_argument("--render", metavar="JSON", help="print the markdown table of a finished report, then exit")
    p.add_argument("--out", default="docs/assets")
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2, help="pixel scale of the pictures")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    if not (args.model and args.data and args.name):
        p.error("--model, --data and --name are required (or --render JSON)")
    report = run(args)
    print(json.dumps(report["rows"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
