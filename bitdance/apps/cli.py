"""The ``bitdance`` command line: the parser and ``main``. What each command does is in
:mod:`bitdance.apps.commands` and :mod:`bitdance.apps.eval_commands`."""

from __future__ import annotations

import argparse
import sys

from bitdance.apps.bench import COMPILE_MODES
from bitdance.apps.commands import (
    CLIError,
    cmd_bench,
    cmd_convert,
    cmd_demo,
    cmd_download,
    cmd_info,
    cmd_presets,
    cmd_sample,
    cmd_serve,
    cmd_train,
)
from bitdance.apps.edit_command import add_edit_parser
from bitdance.apps.eval_commands import (
    cmd_eval_accuracy,
    cmd_eval_fid,
    cmd_eval_recon,
    cmd_eval_weights,
    cmd_sample_npz,
)
from bitdance.apps.options import HelpFormatter, hub_options, integer, sampling_options, weights_option

__all__ = ["main", "build_parser", "CLIError"]


def _eval_command(esub, name: str, fn) -> argparse.ArgumentParser:
    """``bitdance eval NAME``, with the options every evaluation command has; the command's docstring is its
    help (first line) and description (the rest)."""
    summary, _, rest = (fn.__doc__ or "").strip().partition("\n")
    e = esub.add_parser(name, formatter_class=HelpFormatter, help=summary.strip(),
                        description=" ".join(rest.split()) or None)
    e.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    e.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    e.set_defaults(fn=fn, command=f"eval {name}")
    return e


COMPILE_HELP = ("torch.compile the diffusion head's inner loop and, on CPUs, the transformer's cached step "
                "(weights frozen; C++ GEMM templates for few rows, oneDNN for fp32 products of 32 rows or more, "
                "MKL's packed GEMM for every fp32 product on Intel CPUs running AVX2 kernels, there with "
                "bitdance's own kernel for products of fewer than 256 rows; "
                "reduce-overhead = CUDA graphs on GPU)")
WHOLE_FLOW_HELP = ("with --compile: the head's whole flow loop of an AR step as one graph, not one per flow step "
                   "(B-1x / B-4x sampling 8%% / 6%% faster on a 2-core AVX2 CPU; the first compilation takes minutes)")


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = argparse.ArgumentParser(prog="bitdance", description="BitDance: autoregressive image generation with "
                                "binary tokens. Run 'bitdance COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"bitdance {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("presets", help="list model and tokenizer presets with parameter counts", formatter_class=fmt)
    s.add_argument("--released", action="store_true", help="list the released models instead: the names "
                   "every command and from_pretrained take, with their Hugging Face repositories")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("download", help="fetch a released model (name or repository id) into the Hugging Face "
                       "cache, or a folder, ahead of time", formatter_class=fmt)
    s.add_argument("name", help="released name (bitdance presets --released) or repository id (org/name)")
    hub_options(s)
    s.add_argument("--dir", help="put the files in this folder instead of the Hugging Face cache")
    s.set_defaults(fn=cmd_download)

    s = sub.add_parser("info", help="describe a checkpoint: preset, parameters, P, tokenizer, training step",
                       formatter_class=fmt)
    s.add_argument("path", help="official .pt / tokenizer / head file, a bitdance model folder, or a released "
                   "name / repository id")
    hub_options(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("sample", help="generate images (class ids or text prompts) into a grid PNG or files",
                       formatter_class=fmt, description="bitdance sample MODEL --classes 1 2 3 (class-conditional) "
                       "or bitdance sample MODEL --prompt 'a red heart' (text-to-image folder)")
    s.add_argument("model_path", nargs="?", metavar="MODEL",
                   help="bitdance folder, official checkpoint (.pt), text-to-image folder, or a released name "
                   "(BitDance-B-16x, BitDance-14B-64x) / Hugging Face repository id")
    s.add_argument("--model", help="the same as MODEL")
    hub_options(s)
    s.add_argument("--tokenizer", help="tokenizer file (ae_d16c32.pt/.safetensors) or released tokenizer name "
                   "(d16c32) if the model has none")
    s.add_argument("--classes", type=int, nargs="+", help="class ids, class-conditional models; None = the "
                   "first 8 classes")
    s.add_argument("--prompt", action="append", help="text prompt, text-to-image models; repeat for several images")
    s.add_argument("--height", type=int, help="image height in pixels; None = the model's (text-to-image: the "
                   "largest allowed square, 1024 for the released models)")
    s.add_argument("--width", type=int, help="image width in pixels; None = as --height")
    sampling_options(s, seed_help="seed of the sampling generator (same seed, same images)", cfg_default=None,
                      cfg_help="classifier-free guidance scale, 1 = off; None = 4.0 class-conditional, 7.5 "
                      "text-to-image", schedule_default=None,
                      schedule_help="guidance schedule of class-conditional models; None = linear")
    s.add_argument("--out", default="samples.png", help="grid PNG, or a folder with --separate")
    s.add_argument("--separate", action="store_true", help="one PNG per image into the --out folder")
    s.add_argument("--nrow", type=int, default=0, help="grid columns (0 = min(n, 8))")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", choices=["fp32", "bf16"], help="None = fp32 (text-to-image: the stored dtype)")
    weights_option(s)
    s.add_argument("--no-kv-cache", action="store_true", help="recompute the sequence each step (slow, for checks)")
    s.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help=f"{COMPILE_HELP}; 1.3-2.0x / 1.8-2.6x / 4.5x the authors' fp32 speed for 16x / 4x / 1x "
                        "models on a 2-core AVX2 CPU; compiling takes a minute or two")
    s.add_argument("--whole-flow", action="store_true", help=WHOLE_FLOW_HELP)
    s.set_defaults(fn=cmd_sample)

    add_edit_parser(sub)

    from bitdance.training.config import add_train_args

    s = sub.add_parser("demo", help="train a small tokenizer + 4x model on MNIST-5k on CPU and sample digits",
                       formatter_class=fmt)
    s.add_argument("--out", default="bitdance-demo", help="output folder")
    s.add_argument("--minutes", type=float, default=12.0, help="time budget; more minutes, better digits")
    s.add_argument("--seed", type=integer, default=0, help="seed of both trainings and the samples")
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
    s.add_argument("src", help="official .pt, a bitdance folder, or a released name / repository id")
    hub_options(s)
    s.add_argument("dst", help="output folder (bitdance format) or a .pt path (official format)")
    s.add_argument("--tokenizer", help="separate tokenizer file for the source")
    s.add_argument("--tokenizer-out", help="with a .pt destination: also write the tokenizer here (.pt/.safetensors)")
    s.add_argument("--raw", action="store_true", help="take the raw 'model' weights instead of 'ema'")
    weights_option(s, "write")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("eval", help="measure like the paper: FID/precision/recall, tokenizer reconstruction, "
                       "class accuracy", formatter_class=fmt,
                       description="Run 'bitdance eval METRIC --help' for a metric's options.")
    esub = s.add_subparsers(dest="eval_command", metavar="METRIC", required=True)
    e = _eval_command(esub, "fid", cmd_eval_fid)
    e.add_argument("--real", required=True, help="reference: image folder, ADM-style .npz (arr_0 uint8 NHWC), or "
                   "a statistics .npz (mu/sigma)")
    e.add_argument("--fake", required=True, help="samples: image folder or .npz (arr_0 uint8 NHWC)")
    e.add_argument("--cache", help="statistics .npz of the real side: written on first use, then read instead of "
                   "re-encoding --real")
    e.add_argument("--batch-size", type=int, default=50, help="Inception batch size")
    e.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall")
    e.add_argument("--max-images", type=int, help="use only the first N images of each side")

    e = _eval_command(esub, "recon", cmd_eval_recon)
    e.add_argument("--tokenizer", required=True, help="tokenizer file (.pt/.safetensors) or bitdance folder")
    e.add_argument("--data", required=True, help="dataset name (mnist, fashion-mnist, twemoji) or an image folder")
    e.add_argument("--split", help="split (default: test where the dataset has one, else all images)")
    e.add_argument("--image-size", type=int, help="image size (default: the dataset's; 256 for a folder)")
    e.add_argument("--num-images", type=int, default=1000, help="images, evenly spread over the split")
    e.add_argument("--batch-size", type=int, default=64, help="images per encode/decode batch")
    e.add_argument("--fid", action=argparse.BooleanOptionalAction, default=None,
                   help="compute rFID (default: only on CUDA; slow on CPU)")
    e.add_argument("--seed", type=integer, default=0, help="seed of a noise-input (GAN) decoder")

    e = _eval_command(esub, "weights", cmd_eval_weights)
    e.add_argument("model", help="bitdance folder, official checkpoint, text-to-image folder, or a released name")
    e.add_argument("--tokenizer", help="tokenizer file if the model has none")
    e.add_argument("--weights", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"],
                   help="storages to compare with bf16")
    e.add_argument("--classes", type=int, nargs="+", help="class ids (class-conditional; default 0..9)")
    e.add_argument("--repeat", type=integer, default=1, help="samples per class id / prompt")
    e.add_argument("--prompt", action="append", help="prompt (text-to-image; repeat for several)")
    e.add_argument("--height", type=integer, help="text-to-image height in pixels (default: the model's)")
    e.add_argument("--width", type=integer, help="text-to-image width in pixels (default: as --height)")
    e.add_argument("--any-resolution", action="store_true", help="text-to-image: accept any multiple of the patch "
                   "size, not only the model's listed resolutions (allow_any_resolution)")
    e.add_argument("--steps", type=integer, default=25, help="head flow steps per AR step")
    e.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
    e.add_argument("--seed", type=integer, default=0, help="seed (the same for every storage)")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype of every load")
    e.add_argument("--classifier", choices=["mnist", "fashion-mnist"], help="also the class accuracy of each "
                   "load's samples by the shipped classifier (class-conditional models of that dataset)")
    e.add_argument("--out", help="also write the report here (.json)")

    e = _eval_command(esub, "accuracy", cmd_eval_accuracy)
    e.add_argument("--images", required=True, help=".npz with arr_0 (uint8 NHWC) and labels (e.g. from sample-npz)")
    e.add_argument("--data", required=True, help="classifier: mnist or fashion-mnist")
    e.add_argument("--batch-size", type=int, default=256, help="images per classifier batch")
    e.add_argument("--max-images", type=int, help="only the first N images")

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
    sampling_options(s, seed_help="batch k is seeded from (seed, k)", cfg_default=4.0,
                      cfg_help="classifier-free guidance scale (1 = off)", schedule_default="linear")
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
    s.add_argument("--seed", type=integer, default=0, help="sampling seed")
    s.add_argument("--no-decode", action="store_true", help="time the generator only (no tokenizer decode)")
    s.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help=f"{COMPILE_HELP}; compiled during the warm-up")
    s.add_argument("--whole-flow", action="store_true", help=WHOLE_FLOW_HELP)
    s.add_argument("--compare-fp32", action="store_true",
                   help="also sample the same seed in fp32: report bit/token agreement and image PSNR")
    s.add_argument("--profile", metavar="DIR", help="profile one more run: DIR/profile.txt (top ops on the device "
                   "and the host) and DIR/trace.json.gz (Perfetto / chrome://tracing)")
    s.add_argument("--roofline", action="store_true", help="also the MFU ceiling this machine's memory allows: "
                   "every product of one run timed at the slower of reading its operands once and computing at the "
                   "measured peak")
    s.add_argument("--memory", action="store_true", help="instead: peak memory of loading, of the first AR steps "
                   "and of decoding one image, and seconds per AR step, for each --weights storage, each in a fresh "
                   "process (text-to-image --model: a released name, repository id or folder)")
    s.add_argument("--weights", nargs="+", metavar="OPTION",
                   help="the timing bench: one storage for the generator's linear layers, int8 / fp8 / bf16, "
                   "computing in --dtype (compiled fp32 on Intel CPUs, int8 and bf16 weights are read as stored in "
                   "products of fewer than 16 rows). "
                   "With --memory: the storages to measure, bf16 / int8 / fp8 / stored (as the files hold), each "
                   "optionally +offload (sequential offload, with --device cuda); default: bf16 int8 fp8")
    s.add_argument("--random-weights", action="store_true", help="with --memory: build --model's shapes "
                   "(BitDance-14B-16x / -64x) with random weights, quantized tensor by tensor, without downloading")
    s.add_argument("--height", type=integer, default=512, help="with --memory: image height (pixels)")
    s.add_argument("--width", type=integer, help="with --memory: image width (default: as --height)")
    s.add_argument("--ar-steps", type=integer, default=2, help="with --memory: AR steps to run and time (>= 2)")
    s.add_argument("--out", help="with --memory: also write the rows here (.json)")
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
    weights_option(s)
    s.add_argument("--preview-interval", type=float, default=0.3,
                   help="least seconds between two progress previews (0: every step)")
    s.set_defaults(fn=cmd_serve)
    return p


def _version() -> str:
    from bitdance.version import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from bitdance.formats.weights import CheckpointError
    from bitdance.models.config import ConfigError
    from bitdance.training.config import TrainingError

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
