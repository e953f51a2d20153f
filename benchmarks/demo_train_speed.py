"""Training speed of `bitdance demo`'s two trainings: seconds per step, counted FLOPs per step, MFU.

    python benchmarks/demo_train_speed.py                      # this CPU as it is (bf16 where native)
    BITDANCE_DTYPE=fp32 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/demo_train_speed.py
                                                               # a CPU without bf16 units, on a bigger one
    python benchmarks/demo_train_speed.py --json out.json --steps 8

Runs the demo's real trainers (same data, model sizes, batch and precision as `bitdance demo`) for a few
steps each, counts the FLOPs of one step with torch's FlopCounterMode (forward + backward), and measures
the matmul peak of the training dtype in the same process, so MFU = counted FLOP/s / that peak. The row
"generator (before)" is the demo generator of earlier versions (4 flow times per condition, one adaLN
linear per head block), timed in the same run for a ratio that does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time

import torch

from bitdance.apps.bench import count_flops, measure_matmul_peak
from bitdance.apps.demo import BATCH_SIZE, GENERATOR_MODEL
from bitdance.precision import auto_dtype, cpu_description
from bitdance.training.config import TrainConfig
from bitdance.training.trainer import Trainer

BEFORE = dict(GENERATOR_MODEL, head_adaln_blocks=3, diff_batch_mul=4)  # and lr 1e-3, warm-up 100


def time_trainer(trainer: Trainer, steps: int) -> dict:
    trainer.train_step()  # warm-up: one-off allocations
    flops, _ = count_flops(trainer.train_step)
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    per_step = (time.perf_counter() - t) / steps
    return {"seconds_per_step": per_step, "flops_per_step": flops, "achieved_flops": flops / per_step,
            "images_per_s": trainer.cfg.batch_size / per_step, "precision": trainer.precision}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per training")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = auto_dtype("cpu")
    peak = measure_matmul_peak(torch.device("cpu"), dtype)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(data="mnist", split=None, image_size=32, steps=10**6, batch_size=BATCH_SIZE, lr=1e-3,
                      log_every=10**6, ckpt_every=0, final_samples=False, progress=False)
        tok = Trainer(TrainConfig(task="tokenizer", out=f"{tmp}/tok", model="tiny-d4c16", **common))
        rows["tokenizer"] = time_trainer(tok, args.steps)
        tok.export(tok.inference_copy())
        for name, over in (("generator", GENERATOR_MODEL), ("generator (before)", BEFORE)):
            gen = Trainer(TrainConfig(task="generator", out=f"{tmp}/gen", model="BitDance-T-4x",
                                      model_overrides=dict(over), tokenizer=f"{tmp}/tok/tokenizer",
                                      cache_dir=f"{tmp}/cache", **common))
            rows[name] = time_trainer(gen, args.steps)
    for r in rows.values():
        r["mfu"] = r["achieved_flops"] / peak
    cpu = cpu_description()
    result = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "capability": cpu["capability"], "machine": platform.machine(),
              "matmul_peak_flops": peak, "peak_dtype": str(dtype).removeprefix("torch."), "trainings": rows,
              "generator_speedup_vs_before": rows["generator (before)"]["seconds_per_step"]
              / rows["generator"]["seconds_per_step"]}
    print(f"CPU: {result['cpu']['model']} ({result['capability']}, {result['threads']} threads); "
          f"{result['peak_dtype']} matmul peak {peak / 1e9:.0f} GFLOP/s")
    print("| training | precision | s/step | images/s | GFLOP/step | GFLOP/s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['precision']} | {r['seconds_per_step']:.3f} | {r['images_per_s']:.1f} | "
              f"{r['flops_per_step'] / 1e9:.1f} | {r['achieved_flops'] / 1e9:.0f} | {100 * r['mfu']:.1f}% |")
    print(f"generator step {result['generator_speedup_vs_before']:.2f}x faster than before (same run)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
