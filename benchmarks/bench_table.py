"""Run `bitdance bench` over the configurations of docs/benchmarks.md and write their figures.

    python benchmarks/bench_table.py --device cpu --out docs/assets/bench_cpu.json      # ~10 min on 2 cores
    python benchmarks/bench_table.py --device cuda --batch 64 --out docs/assets/bench_cuda.json --compile reduce-overhead
    python benchmarks/bench_table.py --render docs/assets/bench_cuda.json   # the markdown rows of a JSON-lines file

Each configuration runs in its own process (a fresh allocator, so peak memory is per configuration) and
its JSON line is appended to --out as it finishes (a configuration measured again replaces nothing: both
lines stay, read the newest). The script prints one markdown row per configuration for the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = [  # (preset, extra args)
    ("BitDance-B-16x", ["--compare-fp32"]),
    ("BitDance-B-16x", ["--no-decode"]),
    ("BitDance-B-4x", []),
    ("BitDance-B-1x", []),
]


def row(r: dict) -> str:
    gf = r["flops_per_image"] / 1e9
    agree = ("" if r.get("bf16_bit_agreement") is None else
             f"{100 * r['bf16_bit_agreement']:.1f}% / {100 * r['bf16_token_agreement']:.1f}%"
             + ("" if r.get("bf16_image_psnr") is None else f" / {r['bf16_image_psnr']:.1f} dB"))
    return (f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['steps']} | {r.get('guidance_scale', r.get('cfg')):g} | {r['dtype']} | "
            f"{'yes' if r['decode'] else 'no'} | {r.get('compile_mode', 'off')} | "
            f"{r['seconds_per_image'] * r['batch']:.2f} | {r['seconds_per_image']:.2f} | {r['images_per_s']:.3f} | "
            f"{gf:,.0f} ({r['generator_flops_per_image'] / 1e9:,.0f} + {r['decode_flops_per_image'] / 1e9:,.0f}) | "
            f"{r['achieved_flops'] / 1e9:,.0f} | {r['peak_flops'] / 1e9:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB | {_budget(r)} | {agree or '—'} |")


def _budget(r: dict) -> str:
    """weights + KV cache + one decode chunk, the memory sampling should stay within."""
    if r.get("memory_budget_bytes") is None:
        return "—"
    return (f"{r['memory_budget_bytes'] / 2**20:,.0f} MiB ({r['weights_bytes'] / 2**20:,.0f} + "
            f"{r['kv_cache_bytes'] / 2**20:,.0f} + {(r.get('decode_chunk_bytes') or 0) / 2**20:,.0f})")


def render(path: Path) -> str:
    """The table (header + one row per JSON line) of a file written by this script or `bitdance bench --json`."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for line in path.read_text().splitlines():
        if line.strip():
            lines.append(row(json.loads(line)))
    return "\n".join(lines)


HEADER = ("| preset | px | batch | head steps | cfg | dtype | decode | compile | s / batch | s / image | images/s | "
          "GFLOP / image (gen + decode) | achieved GFLOP/s | matmul peak GFLOP/s | MFU | peak memory | "
          "budget: weights + KV + decode chunk | bf16 vs fp32 (bits / tokens / PSNR) |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--compile", default="off")
    p.add_argument("--only", help="comma-separated presets to run (default: all)")
    p.add_argument("--out", type=Path, help="JSON-lines file, appended to")
    p.add_argument("--render", type=Path, metavar="JSONL", help="only print the table of an existing file")
    args = p.parse_args()
    if args.render:
        print(render(args.render))
        return 0
    if args.out is None:
        p.error("--out is required (or --render)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for preset, extra in CONFIGS:
        if only and preset not in only:
            continue
        cmd = [sys.executable, "-m", "bitdance.apps.cli", "bench", "--preset", preset, "--batch", str(args.batch),
               "--steps", str(args.steps), "--cfg", str(args.cfg), "--image-size", str(args.image_size),
               "--dtype", args.dtype, "--device", args.device, "--compile", args.compile, "--json", *extra]
        print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            print(res.stdout + res.stderr, file=sys.stderr)
            return res.returncode
        r = json.loads(res.stdout.strip().splitlines()[-1])
        with args.out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        rows.append(row(r))
        print(rows[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
