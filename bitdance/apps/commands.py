"""What the ``bitdance`` commands do (sample, info, convert, train, demo, serve, bench); the parser is
:mod:`bitdance.apps.cli`, the evaluation commands :mod:`bitdance.apps.eval_commands`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bitdance.apps.options import hub_kwargs

__all__ = ["CLIError", "describe", "torch_dtype", "cmd_presets", "cmd_info", "cmd_sample", "cmd_convert", "cmd_train",
           "cmd_demo", "cmd_serve", "cmd_bench"]


class CLIError(Exception):
    """A mistake in the command line, reported in one line."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def torch_dtype(name: str):
    """``--dtype`` value -> torch dtype."""
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16}[name]


def save_image(array, path: Path) -> None:
    """Write in the format the extension names (checked before sampling by ``validation.image_output``)."""
    from PIL import Image

    from bitdance.files import atomic_write
    from bitdance.validation import image_format

    fmt = image_format(path)
    extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt, **extra))


def _params(module) -> int:
    """Parameters, counting the weights of quantized layers (buffers there) too."""
    from bitdance.models.quantized import QuantizedLinear

    return sum(p.numel() for p in module.parameters()) + sum(
        m.weight.numel() for m in module.modules() if isinstance(m, QuantizedLinear))


def describe(path: str | Path, *, model: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """What a checkpoint file or folder is (used by ``bitdance info``); released names and repository ids are
    fetched first (:mod:`bitdance.formats.hub`)."""
    import torch

    from bitdance.formats.folders import load_component, read_folder_config
    from bitdance.formats.hub import resolve
    from bitdance.formats.official import load_official_generator, load_tokenizer
    from bitdance.formats.weights import CheckpointError, load_file

    path = resolve(path, model=model, revision=revision).path
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
        from bitdance.formats.official import load_head

        head = load_head(path)
        return {"path": str(path), "format": "diffusion head", "kind": "head", "head": head.config.to_dict(),
                "parameters": _params(head)}
    del torch
    raise CheckpointError(f"{path}: not a BitDance checkpoint")


def _generator_info(gen) -> dict[str, Any]:
    from bitdance.models.presets import match_preset

    c = gen.config
    from bitdance.models.quantized import weights_format

    return {"preset": match_preset(c) or "custom", "parameters": _params(gen),
            "weights": weights_format(gen) or "full precision", "parallel_num": c.parallel_num,
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

    if args.released:
        from bitdance.formats.hub import released_table

        rows = released_table()
        print(f"{'released name':<18} {'kind':<17} {'repository':<36} files")
        for r in rows:
            print(f"{r['name']:<18} {r['kind']:<17} {r['repository']:<36} {r['files']}  ({r['about']})")
        print("\nAny command that takes a model path takes these names, or a repository id (with --model-file\n"
              "where it holds several models). Files come through the Hugging Face cache; fetch ahead of time\n"
              "with `bitdance download NAME`.")
        return

    from bitdance.models.presets import TOKENIZER_PRESETS, bitdance_preset, list_presets
    from bitdance.models.transformer import BitDance

    print(f"{'generator preset':<18} {'params':>9} {'P':>3} {'AR steps':>8}  (256 px, d16c32 tokenizer)")
    for name in list_presets():
        cfg = bitdance_preset(name)
        with torch.device("meta"):
            n = _params(BitDance(cfg))
        print(f"{name:<18} {n / 1e6:8.1f}M {cfg.parallel_num:>3} {cfg.num_steps:>8}")
    print(f"\n{'tokenizer preset':<18} {'bits':>5} {'down':>5} {'groups':>6} gan")
    for name, t in TOKENIZER_PRESETS.items():
        print(f"{name:<18} {t.z_channels:>5} {t.down_factor:>5} {t.groups:>6} {t.gan_decoder}")


def cmd_download(args) -> None:
    from bitdance.formats.hub import download

    found = download(args.name, local_dir=args.dir, **hub_kwargs(args))
    print(f"{args.name}: {found.path}")
    if found.tokenizer is not None:
        print(f"tokenizer: {found.tokenizer}")


def cmd_info(args) -> None:
    info = describe(args.path, **hub_kwargs(args))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    for k, v in info.items():
        if k == "config":
            continue
        print(f"{k}: {v}")


def _check_whole_flow(args) -> None:
    """``--whole-flow`` without ``--compile`` (sample, bench): refused before any model is loaded."""
    if args.whole_flow and args.compile == "off":
        raise CLIError("--whole-flow compiles the head's flow loop: give --compile too")


def cmd_sample(args) -> None:
    import numpy as np
    import torch

    from bitdance.formats.t2i_folder import is_text_to_image_folder
    from bitdance.images import make_grid
    from bitdance.pipelines.class_conditional import BitDancePipeline

    if args.model_path and args.model and args.model_path != args.model:
        raise CLIError(f"two models given ({args.model_path} and --model {args.model}); give one")
    model = args.model_path or args.model
    if not model:
        raise CLIError("no model given: bitdance sample MODEL [--classes ID ... | --prompt TEXT]")
    _check_whole_flow(args)
    from bitdance.formats.hub import resolve

    found = resolve(model, **hub_kwargs(args))  # a released name or repository id: fetched (or found cached)
    model, tokenizer = found.path, args.tokenizer or found.tokenizer
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
    from bitdance import validation

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
    from bitdance.precision import bf16_supported

    # Text-to-image keeps the stored dtype (bf16 in the release) unless --dtype or $BITDANCE_DTYPE says otherwise.
    dtype = torch_dtype(args.dtype) if args.dtype else (None if t2i else torch.float32)
    if dtype == torch.bfloat16:
        if not bf16_supported(device):
            print(f"note: no bf16 support on this {device}; sampling in fp32", file=sys.stderr)
            dtype = torch.float32
    pipe = BitDancePipeline.from_pretrained(model, tokenizer=tokenizer, device=device, dtype=dtype,
                                            weights=args.weights)
    if args.compile != "off":
        pipe.compile(None if args.compile == "default" else args.compile, whole_flow=args.whole_flow)
    gen = validation.seeded(args.seed, pipe.device, name="--seed")
    common = {"height": args.height, "width": args.width, "num_inference_steps": args.steps,
              "sampler": args.sampler, "generator": gen, "output_type": "np", "use_kv_cache": not args.no_kv_cache}
    t0 = time.perf_counter()
    if pipe.kind == "text_to_image":
        names = [f"prompt-{slug(p)}" for p in args.prompt]
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
            save_image(im, out_path / f"{i:04d}_{name}.png")
    else:
        save_image(make_grid(np.asarray(out.images), args.nrow or min(len(names), 8)), out_path)
    print(f"wrote {len(names)} image(s) to {out_path} in {dt:.1f}s ({len(names) / dt:.2f} img/s)")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe piece of a prompt."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "empty"


def cmd_convert(args) -> None:
    from bitdance.formats.official import save_official_generator, save_official_tokenizer
    from bitdance.pipelines.class_conditional import BitDancePipeline

    src, dst = args.src, Path(args.dst)
    if args.weights is not None and dst.suffix in (".pt", ".pth"):
        raise CLIError(f"--weights {args.weights} writes a bitdance folder; {dst} is an official .pt, which holds "
                       "full-precision weights only")
    pipe = BitDancePipeline.from_pretrained(src, tokenizer=args.tokenizer, use_ema=not args.raw, weights=args.weights,
                                            **hub_kwargs(args))
    if dst.suffix in (".pt", ".pth"):
        save_official_generator(dst, pipe.model, pipe.tokenizer)
        if args.tokenizer_out:
            save_official_tokenizer(args.tokenizer_out, pipe.tokenizer)
    else:
        pipe.save_pretrained(dst)
    print(f"converted {src} -> {dst}")


def cmd_train(args, task: str) -> None:
    from bitdance.training.config import config_from_args
    from bitdance.training.trainer import train

    summary = train(config_from_args(args, task))
    print(json.dumps(summary))


def cmd_demo(args) -> None:
    from bitdance.apps.demo import run_demo

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


def _bench_memory(args) -> None:
    from bitdance import validation
    from bitdance.apps.bench_memory import MEMORY_OPTIONS, parse_option, run_memory_bench
    from bitdance.models.presets import T2I_SHAPES
    from bitdance.precision import auto_precision

    if not args.model:
        raise CLIError("--memory measures a text-to-image model: give --model (a released name, repository id or "
                       f"folder; with --random-weights one of {', '.join(T2I_SHAPES)})")
    if args.random_weights and args.model not in T2I_SHAPES:
        raise CLIError(f"--random-weights builds the shapes of {', '.join(T2I_SHAPES)}; got {args.model!r}")
    validation.flow_steps(args.steps, "--steps")
    validation.guidance_scale(args.cfg, "--cfg")
    validation.integer(args.ar_steps, "--ar-steps", 2, 4096)
    dtype = args.dtype if args.dtype != "auto" else auto_precision(args.device)
    try:
        for option in args.weights or ():
            parse_option(option)
    except ValueError as e:
        raise CLIError(str(e)) from None
    rows = run_memory_bench(args.model, options=args.weights or list(MEMORY_OPTIONS), random_weights=args.random_weights,
                            height=args.height, width=args.width or args.height, steps=args.steps,
                            ar_steps=args.ar_steps, guidance_scale=args.cfg, dtype=dtype, decode=not args.no_decode,
                            device=args.device)
    print(f"{args.model}{' (random weights)' if args.random_weights else ''}, {args.height}x{args.width or args.height}"
          f", {args.steps} flow steps, guidance {args.cfg:g}, compute {dtype}")
    print(f"{'weights':>8} {'model GiB':>9} {'load peak':>9} {'step peak':>9} {'decode peak':>11} {'s/AR step':>9} "
          f"{'s/image':>8}")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['option']:>8}  {'not run: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r['error']}")
            continue
        print(f"{r['option']:>8} {r['model_gib']:9.2f} {r['load_peak_gib']:9.2f} {r['step_peak_gib']:9.2f} "
              f"{r.get('decode_peak_gib') or float('nan'):11.2f} {r['ar_step_s']:9.2f} {r['projected_image_s']:8.1f}")
        if "device_step_peak_gib" in r:
            print(f"{'':>8} {args.device} peaks (GiB): load {r['device_load_peak_gib']:.2f}, step "
                  f"{r['device_step_peak_gib']:.2f}, decode {r.get('device_decode_peak_gib') or float('nan'):.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "random_weights": args.random_weights,
                                              "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(rows))


def cmd_serve(args) -> None:
    from bitdance.apps.studio import serve
    from bitdance.validation import device

    device(args.device)
    serve(args.model, tokenizer=args.tokenizer, host=args.host, port=args.port, device=args.device,
          dtype=torch_dtype(args.dtype) if args.dtype else None, preview_interval=args.preview_interval,
          allow_hosts=args.allow_host or (), weights=args.weights)


def cmd_bench(args) -> None:
    from bitdance import validation
    from bitdance.apps.bench import run_bench

    if args.memory:
        if args.roofline:
            raise CLIError("--roofline goes with the timing bench, not with --memory")
        return _bench_memory(args)
    if args.random_weights:
        raise CLIError("--random-weights goes with --memory")
    weights = None
    if args.weights:
        from bitdance.models.quantized import WEIGHT_FORMATS

        if len(args.weights) > 1 or args.weights[0] not in WEIGHT_FORMATS:
            raise CLIError(f"--weights {' '.join(args.weights)}: the timing bench takes one storage, "
                           f"{' / '.join(WEIGHT_FORMATS)} (several, and +offload, go with --memory)")
        if args.roofline:
            raise CLIError("--roofline reads every product's weight as fp32; it does not model --weights")
        weights = args.weights[0]

    _check_whole_flow(args)
    validation.flow_steps(args.steps, "--steps")
    validation.guidance_scale(args.cfg, "--cfg")
    validation.integer(args.batch, "--batch", 1, validation.MAX_BATCH)
    validation.integer(args.image_size, "--image-size", 16, 4096)
    validation.seed(args.seed, "--seed")
    validation.device(args.device)
    r = run_bench(args.preset, batch=args.batch, steps=args.steps, guidance_scale=args.cfg, image_size=args.image_size,
                  dtype=args.dtype, device=args.device, warmup=args.warmup, repeats=args.repeats,
                  decode=not args.no_decode, tokenizer=args.tokenizer, seed=args.seed, compile=args.compile,
                  whole_flow=args.whole_flow, weights=weights,
                  compare_fp32=args.compare_fp32, model=args.model, profile=args.profile, roofline=args.roofline,
                  log=None if args.json else (lambda m: print(m, file=sys.stderr)))
    for note in r.notes:
        print(f"note: {note}")
    print(f"{r.preset} + {r.tokenizer} tokenizer, {r.image_size} px, batch {r.batch}, {r.ar_steps} AR steps x "
          f"{r.steps} flow steps, guidance {r.guidance_scale:g}, {r.dtype} on {r.device} ({r.threads} threads)"
          f"{f', {r.weights} weights' if r.weights else ''}"
          f"{'' if r.decode else ', no decode'}")
    print(f"images/s:            {r.images_per_s:.4g}")
    print(f"seconds per image:   {r.seconds_per_image:.4g}")
    print(f"FLOPs per image:     {r.flops_per_image:.4g} (generator {r.generator_flops_per_image:.4g}, "
          f"decode {r.decode_flops_per_image:.4g}; counted by FlopCounterMode)")
    print(f"achieved FLOP/s:     {r.achieved_flops:.4g}")
    print(f"matmul peak FLOP/s:  {r.peak_flops:.4g} ({r.dtype}, measured)")
    print(f"MFU:                 {100 * r.mfu:.2f}%")
    if r.mfu_ceiling is not None:
        print(f"read-bound floor:    {r.read_floor_seconds_per_image:.4g} s/image (each product at the peak or "
              f"at the speed of reading its operands once, whichever is slower)")
        print(f"MFU ceiling:         {100 * r.mfu_ceiling:.2f}% (what this machine's memory allows at this batch)")
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
