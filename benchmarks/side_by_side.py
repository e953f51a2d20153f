"""bitdance's sampler against the authors' code, in one run, on this machine (issue 13).

    python benchmarks/side_by_side.py --official ../BitDance --out docs/assets/side_by_side.jsonl
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 BITDANCE_DTYPE=fp32 \
        python benchmarks/side_by_side.py --official ../BitDance --out docs/assets/side_by_side.jsonl
    python benchmarks/side_by_side.py --render docs/assets/side_by_side.jsonl

``--official`` is a checkout of github.com/shallowdream204/BitDance (``imagenet_gen/`` is what is used; it
needs ``pip install einops``). Both sides: random weights, fp32, the same preset, batch, 25 head steps,
guidance 4 with the linear schedule, generator only (no tokenizer decode), one process each, the threads
torch picks. bitdance runs ``bitdance bench --no-decode --dtype fp32`` (eager and compiled: one warm-up run,
which compiles); the authors' sampler (``imagenet_gen/src/model_parallel.py`` for 4x/16x, ``model.py`` for
1x) runs eager (``--official-warmup`` adds an untimed run first; eager code gains little from it: 45 vs 41 s
for one B-1x image), as its README shows it (its own ``@torch.compile`` recompiles
at every AR step on a CPU). Each side is timed ``--repeats`` times (default 3) in its process. The 1x model imports ``flash_attn``, which has no CPU build; its uses outside
the KV-cached path get a stand-in through ``F.scaled_dot_product_attention`` (sampling uses the cache).

Rows are written as they come (one JSON object per line), so an interrupted run keeps what it measured.
MFU: FLOPs counted by bitdance's bench for the same preset and settings, over the fp32 matmul peak measured
in bitdance's run of that preset (same process kind, minutes apart); the ratio is what matters.

The table's figure for each side is its fastest timed run, as the peak is the fastest of its timings: on a
shared machine a slower run measures what the neighbours took, and that goes both ways (a peak timed while
they are busy would flatter every MFU). The mean of the runs is shown next to it, and every run's seconds
are in the results file (``run_seconds``).

``--paired`` runs both sides of a preset in one process instead, alternating: each of ``--repeats`` rounds
measures the fp32 matmul peak and then runs every side once (bitdance's compiled and/or eager sampler, on
``bitdance bench``'s random weights, and the authors'), in reverse order every other round, so that the
neighbours' load falls on both sides alike. MFU is then taken against the fastest of the rounds' peaks, and
the table adds the median over the rounds of the authors' seconds over bitdance's in the same round.

The last bitdance run of each preset also measures the MFU ceiling (``bitdance bench --roofline``): the MFU
this machine's memory allows the preset at this batch, every product taken at the slower of reading its
operands once and computing at the peak. A target above the ceiling cannot be met on that machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESETS = ("BitDance-B-16x", "BitDance-B-4x", "BitDance-B-1x")
OFFICIAL_NEEDS = ("einops",)  # what imagenet_gen/src imports beyond torch (flash_attn gets a stand-in)


def _checkout_problem(official: str) -> str | None:
    """Why ``official`` is not a checkout of the authors' repository, or None."""
    if not (Path(official) / "imagenet_gen" / "src" / "model_parallel.py").is_file():
        return (f"--official {official}: no imagenet_gen/src/model_parallel.py there "
                "(a checkout of github.com/shallowdream204/BitDance is needed)")
    return None


def _official_runner(args):
    """The authors' sampler for ``args.preset`` with random weights, as a function that samples once and returns
    its seconds. Installs a stand-in ``flash_attn`` module and puts their ``imagenet_gen`` on ``sys.path``."""
    import types

    import torch
    import torch.nn.functional as F

    src = Path(args.official) / "imagenet_gen"
    if problem := _checkout_problem(args.official):
        sys.exit(problem)
    if "flash_attn" not in sys.modules:  # imported by model.py's layers; no CPU build exists
        def flash_attn_func(q, k, v, causal=False, dropout_p=0.0, **_):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=causal)
            return o.transpose(1, 2)

        sys.modules["flash_attn"] = types.SimpleNamespace(flash_attn_func=flash_attn_func)
    sys.path.insert(0, str(src))
    P = int(args.preset.rsplit("-", 1)[1].rstrip("x"))
    size = args.preset.split("-")[1]
    if P == 1:
        from src.model import create_model, get_model_args
        argv = ["--model", f"BitDance-{size}", "--patch-size", "1", "--cls-token-num", "64"]
    else:
        from src.model_parallel import create_model, get_model_args
        argv = ["--model", f"BitDance-{size}", "--parallel-num", str(P), "--patch-size", "1",
                "--cls-token-num", "64"]
    model_args = get_model_args().parse_args(argv)
    with torch.random.fork_rng(), torch.no_grad():  # the same weights whatever ran before in the process
        torch.manual_seed(0)
        model = create_model(model_args, "cpu").eval()
        for p in model.parameters():  # zero-initialised adaLN / output layers get values: the flow does real work
            if p.dim() > 0 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model.vae.decode = lambda x: x  # generator only
    labels = torch.arange(args.batch) % 1000

    def run() -> float:
        # eager, as their README runs it: their forward_model's @torch.compile recompiles at every AR step on a
        # CPU (force_eager keeps it off without turning off bitdance's graphs in the same process)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            model.sample(labels, sample_steps=args.steps, cfg_scale=args.cfg, cfg_schedule="linear")
        return time.perf_counter() - t0

    return run


def _official(args) -> None:
    """Time the authors' sampler in a process of its own."""
    import torch

    run = _official_runner(args)
    warm = run() if args.official_warmup else None
    runs = [run() for _ in range(args.repeats)]
    seconds = sum(runs) / len(runs)
    print(json.dumps({"impl": "official", "preset": args.preset, "batch": args.batch, "steps": args.steps,
                      "cfg": args.cfg, "threads": torch.get_num_threads(), "seconds": seconds,
                      "warmup_seconds": warm, "seconds_per_image": seconds / args.batch, "run_seconds": runs}))


def _paired(args) -> None:
    """Both sides in one process, alternating: each round measures the fp32 matmul peak, then runs every side
    once (bitdance eager and/or compiled, the authors' code), in reverse order every other round. Prints the
    results row."""
    import torch

    from bitdance.apps.bench import alternating_rounds, count_flops, random_generator, read_floor, record_products
    from bitdance.models.presets import bitdance_preset
    from bitdance.sampling.flow import FlowSampler

    theirs = _official_runner(args)
    whole = args.preset in args.whole_flow
    with torch.random.fork_rng():
        torch.manual_seed(0)  # bitdance bench's weights (its seed 0)
        gen = random_generator(bitdance_preset(args.preset)).float().eval()
    if "default" in args.compile:
        gen.compile_sampling(whole_flow=whole)
    labels = torch.arange(args.batch) % gen.config.num_classes
    sampler = FlowSampler(num_steps=args.steps)

    def generate():
        g = torch.Generator().manual_seed(0)
        return gen.generate(labels, sampler=sampler, guidance_scale=args.cfg, generator=g)

    def ours(eager: bool):
        def run() -> None:
            with torch.inference_mode():
                if eager:
                    with gen.eager_sampling():
                        generate()
                else:
                    generate()
        return run

    sides = {f"bitdance_{mode}": ours(mode == "off") for mode in args.compile}
    sides["official"] = theirs  # its seconds are timed again, alike
    if "default" in args.compile:
        t0 = time.perf_counter()
        sides["bitdance_default"]()
        print(f"compiling bitdance's sampler: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.official_warmup:
        theirs()
    with torch.inference_mode(), gen.eager_sampling():  # counted on the eager code, as bitdance bench counts
        flops, (log, _) = count_flops(lambda: record_products(generate, gen))
    runs, peaks = alternating_rounds(sides, args.repeats, log=lambda line: print(line, file=sys.stderr, flush=True))
    peak = max(peaks)  # the fastest of the rounds' peaks: the MFU it gives is the lowest
    row = {"preset": args.preset, "batch": args.batch, "steps": args.steps, "cfg": args.cfg,
           "paired": {"round_peaks": peaks, "threads": torch.get_num_threads()}}
    for mode in args.compile:
        mean = sum(runs[f"bitdance_{mode}"]) / args.repeats
        row[f"bitdance_{mode}"] = {"seconds_per_image": mean / args.batch, "flops_per_image": flops / args.batch,
                                   "peak_flops": peak, "mfu": flops / mean / peak, "achieved_flops": flops / mean,
                                   "run_seconds": runs[f"bitdance_{mode}"], "whole_flow": whole and mode != "off"}
    row["mfu_ceiling"] = flops / read_floor(log, peak) / peak
    mean = sum(runs["official"]) / args.repeats
    row["official"] = {"impl": "official", "preset": args.preset, "batch": args.batch, "steps": args.steps,
                       "cfg": args.cfg, "threads": torch.get_num_threads(), "seconds": mean,
                       "seconds_per_image": mean / args.batch, "run_seconds": runs["official"]}
    print(json.dumps(row))


def _json_tail(out: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in:\n{out[-2000:]}")


def _run(cmd: list[str], progress: bool = False) -> dict:
    """The JSON line a child process prints; ``progress``: its stderr goes to ours as it comes."""
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if p.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode})" + (" (its errors are above)" if progress else
                                                                   f":\n{p.stderr[-3000:]}"))
    return _json_tail(p.stdout)


FORCING_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "BITDANCE_DTYPE",
               "BITDANCE_WIDE_PRODUCTS")


def _complete_forcing() -> None:
    """An AVX2 forcing reaches MKL too, in both sides' processes: MKL reads its own variable (at its first call),
    so with torch's two alone the authors' eager products and the peak ran AVX-512 code on an Intel CPU."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "avx2":
        os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")


def _machine() -> dict:
    from bitdance.precision import cpu_description, cpu_flags

    d = cpu_description()
    flags = cpu_flags()
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    env = {k: os.environ[k] for k in FORCING_ENV if k in os.environ}
    return {**d, "flags": keep, "cores": os.cpu_count(), "env": env}


def measure(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for preset in args.presets:
        common = ["--preset", preset, "--batch", str(args.batch), "--steps", str(args.steps), "--cfg", str(args.cfg)]
        row = {"preset": preset, "batch": args.batch, "steps": args.steps, "cfg": args.cfg, "date": stamp,
               "machine": machine}
        if args.paired:
            row.update(_run([sys.executable, __file__, "--_paired", "--official", args.official, "--preset", preset,
                             *common[2:], "--repeats", str(args.repeats), "--compile", *args.compile,
                             *(["--whole-flow", preset] if preset in args.whole_flow else []),
                             *(["--official-warmup"] if args.official_warmup else [])], progress=True))
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            continue
        for compile_mode in args.compile:
            last = compile_mode == args.compile[-1]  # the ceiling depends on the machine, not on compilation
            whole = compile_mode != "off" and preset in args.whole_flow
            ours = _run([sys.executable, "-m", "bitdance.apps.cli", "bench", *common, "--dtype", "fp32", "--no-decode",
                         "--warmup", "1", "--repeats", str(args.repeats), "--compile", compile_mode, "--json",
                         *(["--whole-flow"] if whole else []), *(["--roofline"] if last else [])])
            row[f"bitdance_{compile_mode}"] = {k: ours[k] for k in ("seconds_per_image", "flops_per_image", "peak_flops",
                                                                     "mfu", "achieved_flops", "run_seconds")}
            row[f"bitdance_{compile_mode}"]["whole_flow"] = whole
            if last:
                row["mfu_ceiling"] = ours["mfu_ceiling"]
        theirs = _run([sys.executable, __file__, "--_official", "--official", args.official, "--preset", preset,
                       *common[2:], "--repeats", str(args.repeats),
                       *(["--official-warmup"] if args.official_warmup else [])])
        row["official"] = theirs
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _cell(side: dict, batch: int, flops: float, peak: float) -> tuple[float, str]:
    """A side's figure (its fastest run, or the only one in files written before ``--repeats``) and its cell:
    seconds per image (MFU), with the mean of several runs after it."""
    mean = side["seconds_per_image"]
    best = min(side["run_seconds"]) / batch if "run_seconds" in side else mean
    cell = f"{best:.2f} ({flops / best / peak:.1%})"
    if len(side.get("run_seconds", ())) > 1:
        cell += f"; mean {mean:.2f} ({flops / mean / peak:.1%})"
    return best, cell


def render(path: str) -> str:
    lines = ["| CPU (forced) | preset | bitdance eager s/img (MFU) | bitdance compiled s/img (MFU) | authors' s/img (MFU) "
             "| speed-up eager / compiled | fp32 peak GFLOP/s | MFU ceiling |", "|---|---|---|---|---|---|---|---|"]
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        m = r["machine"]
        kind = "AVX2 (forced)" if m["env"].get("ATEN_CPU_CAPABILITY") == "avx2" else m["capability"]
        ran = [r[k] for k in ("bitdance_off", "bitdance_default") if k in r]
        flops, peak = ran[0]["flops_per_image"], ran[-1]["peak_flops"]
        off, off_cell = _cell(r["official"], r.get("batch", 1), flops, peak)
        cells, ratios = [], []
        for key in ("bitdance_off", "bitdance_default"):
            if key not in r:
                cells.append("—")
                ratios.append("—")
                continue
            ours, cell = _cell(r[key], r.get("batch", 1), flops, r[key]["peak_flops"])
            cells.append(cell + (", whole flow" if r[key].get("whole_flow") else ""))
            ratios.append(f"{off / ours:.2f}x")
            if "paired" in r:  # run i of each side was in round i, next to each other
                pairs = sorted(a / b for a, b in zip(r["official"]["run_seconds"], r[key]["run_seconds"]))
                ratios[-1] += f" (paired: median {statistics.median(pairs):.2f}x)"
        lines.append(f"| {m['model']} {kind} | {r['preset']} | {cells[0]} | {cells[1]} | {off_cell} "
                     f"| {ratios[0]} / {ratios[1]} | {peak / 1e9:.0f} "
                     f"| {'—' if r.get('mfu_ceiling') is None else format(r['mfu_ceiling'], '.1%')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", help="checkout of github.com/shallowdream204/BitDance")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--compile", nargs="+", default=["off", "default"], choices=["off", "default"],
                    help="bitdance runs to make (eager, compiled)")
    ap.add_argument("--whole-flow", nargs="*", default=[], metavar="PRESET",
                    help="presets whose compiled run compiles the head's whole flow loop as one graph (bitdance bench "
                         "--whole-flow; minutes more compilation, untimed): the 1x and 4x ones, where the per-update "
                         "calls' overhead counts; B-16x's loop takes over 10 minutes to compile")
    ap.add_argument("--official-warmup", action="store_true", help="one untimed run of the authors' sampler first")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (the table takes the fastest)")
    ap.add_argument("--out", default="side_by_side.jsonl")
    ap.add_argument("--render", metavar="JSONL", help="print the markdown table of a results file and exit")
    ap.add_argument("--paired", action="store_true",
                    help="both sides in one process per preset, alternating run by run, the peak measured before each "
                         "round (the table adds the median of the rounds' speed-ups); for shared, noisy machines")
    ap.add_argument("--_official", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_paired", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render:
        if not Path(args.render).is_file():
            ap.error(f"--render {args.render}: no such results file")
        print(render(args.render))
    elif args._official:
        _official(args)
    elif args._paired:
        _paired(args)
    else:
        if not args.official:
            ap.error("--official PATH (a checkout of github.com/shallowdream204/BitDance) is needed")
        if args.repeats < 1:
            ap.error(f"--repeats must be at least 1, got {args.repeats}")
        problem = _checkout_problem(args.official)  # checked before bitdance's side runs, not minutes later
        missing = [m for m in OFFICIAL_NEEDS if importlib.util.find_spec(m) is None]
        if problem or missing:
            ap.error(problem or f"the authors' code needs {', '.join(missing)}: pip install {' '.join(missing)}")
        unknown = [p for p in args.whole_flow if p not in args.presets]
        if unknown:
            ap.error(f"--whole-flow {' '.join(unknown)}: not among --presets {' '.join(args.presets)}")
        _complete_forcing()
        measure(args)


if __name__ == "__main__":
    main()
