"""The compiled fp32 sampler under several routings of its products, in one process, alternating (issue 13).

    python benchmarks/compare_routings.py --preset BitDance-B-1x --routings onednn:library mkl:panel
    python benchmarks/compare_routings.py --preset BitDance-B-4x --routings onednn:library mkl:panel mkl:library \
        --json out.json
    python benchmarks/compare_routings.py --preset BitDance-B-1x --routings mkl:panel mkl:panel+int8 mkl:panel+bf16

A routing is ``WIDE:FEW``: the library of the graph of many rows (``$BITDANCE_WIDE_PRODUCTS``: ``mkl`` or
``onednn``) and what runs the products of few rows (``$BITDANCE_FEW_ROW_PRODUCTS``: ``panel``, bitdance's
kernel in the build for torch's kernels, or ``library``); see :mod:`bitdance.compiling`. ``+int8``, ``+bf16`` or
``+fp8`` after it stores the linear layers' weights so (:mod:`bitdance.models.quantized`; computing stays fp32).
Each routing gets its own copy of the preset (random weights, one seed, so the same weights), compiled under it.
One untimed run of each compiles; the tokens of each routing's run are compared with the first routing's (the
routings must not change what is sampled; a storage does, and its share of equal tokens is printed). Then
``--rounds`` rounds time one run of each, in alternating order, with the fp32 matmul peak measured at the start
of each round: on a shared machine, runs minutes apart in separate processes measure the neighbours as much as the
code, and alternating in one process cancels most of that.

2 images, 25 head steps, guidance 4, generator only, as ``benchmarks/side_by_side.py``. Memory: one copy of the
weights per routing plus its packed copies (B-4x with three routings: about 12 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import torch

from bitdance.apps.bench import alternating_rounds, random_generator
from bitdance.compiling import FEW_ROW_PRODUCTS_ENV, WIDE_PRODUCTS_ENV
from bitdance.models.presets import bitdance_preset, list_presets
from bitdance.models.quantized import WEIGHT_FORMATS, quantize_
from bitdance.models.transformer import BitDance
from bitdance.precision import cpu_description
from bitdance.sampling.flow import FlowSampler

ROUTING_CHOICES = ({"mkl", "onednn"}, {"panel", "library"})


def parse_routing(text: str) -> tuple[str, str, str | None]:
    routing, _, storage = text.lower().partition("+")
    wide, _, few = routing.partition(":")
    if wide not in ROUTING_CHOICES[0] or few not in ROUTING_CHOICES[1] or (storage and storage not in WEIGHT_FORMATS):
        raise argparse.ArgumentTypeError(f"routing {text!r}: use WIDE:FEW[+STORAGE] with WIDE mkl or onednn, FEW "
                                         f"panel or library, STORAGE {' / '.join(WEIGHT_FORMATS)} "
                                         "(e.g. mkl:panel+int8)")
    return wide, few, storage or None


def build(preset: str, seed: int) -> BitDance:
    """The preset's generator with ``bitdance bench``'s random weights (one seed: the same for every routing)."""
    torch.manual_seed(seed)
    return random_generator(bitdance_preset(preset)).float().eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="BitDance-B-1x", choices=list_presets(), metavar="PRESET")
    ap.add_argument("--routings", type=parse_routing, nargs="+", required=True, metavar="WIDE:FEW[+STORAGE]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 1 or args.steps < 1:
        ap.error("--rounds, --batch and --steps must be at least 1")
    if len(set(args.routings)) != len(args.routings):
        ap.error(f"--routings names a routing twice: {args.routings}")

    models = {}
    for wide, few, storage in args.routings:  # each routing is read when its model's graphs are built
        os.environ[WIDE_PRODUCTS_ENV], os.environ[FEW_ROW_PRODUCTS_ENV] = wide, few
        gen = build(args.preset, args.seed)
        if storage:
            quantize_(gen, storage)
        gen.compile_sampling()
        models[f"{wide}:{few}" + (f"+{storage}" if storage else "")] = gen
    labels = torch.arange(args.batch) % gen.config.num_classes
    sampler = FlowSampler(num_steps=args.steps)

    def run(gen: BitDance) -> torch.Tensor:
        with torch.no_grad():
            return gen.generate(labels, sampler=sampler, guidance_scale=args.cfg,
                                generator=torch.Generator().manual_seed(args.seed))

    names = list(models)
    tokens = {}
    for name in names:
        t0 = time.perf_counter()
        tokens[name] = run(models[name])
        print(f"{name}: compiled and ran in {time.perf_counter() - t0:.0f} s", flush=True)
    same = {name: bool(torch.equal(tokens[names[0]], tokens[name])) for name in names[1:]}
    # latents (B, C, h, w): a token is equal where all its C bits are
    share = {name: float((tokens[names[0]] == tokens[name]).all(1).float().mean()) for name in names[1:]}
    print(f"tokens equal to {names[0]}'s: {same}; share of equal tokens: {share}", flush=True)
    seconds, peaks = alternating_rounds({name: partial(run, models[name]) for name in names}, args.rounds,
                                        log=lambda line: print(line, flush=True))
    for name in names:
        best = min(seconds[name]) / args.batch
        print(f"{args.preset} {name}: fastest {best:.2f} s/img, "
              f"{min(seconds[names[0]]) / min(seconds[name]):.2f}x {names[0]}'s fastest")
    result = {"preset": args.preset, "batch": args.batch, "steps": args.steps, "cfg": args.cfg,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_description(),
              "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "peaks": peaks, "run_seconds": seconds, "tokens_equal_to_first": same,
              "share_of_tokens_equal_to_first": share}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
