"""Cross-check the FID command path against a direct computation from the same Inception features.

    python benchmarks/fid_check.py                    # 1,000 images per set (~15 min on a 2-core CPU)
    python benchmarks/fid_check.py --num-images 100   # quick check (~1.5 min)

Three 32x32 image sets, ``--num-images`` each, evenly spread over their source so every class is
present: Fashion-MNIST train, Fashion-MNIST test and MNIST-5k (all 5,000 digits). They are written as
ADM-style .npz files (``arr_0`` uint8 NHWC) into a temporary folder, then

* the CLI path: ``bitdance eval fid --real train.npz --fake X.npz --cache train_stats.npz --json`` for
  X = test and X = mnist (run in-process; the second run reads the train statistics from the cache),
* the direct path: ``InceptionFeatures.features`` of each array, ``feature_statistics`` and
  ``frechet_distance``,

and asserts both agree to 1e-3. Expected: FID(train, test) small (same distribution; sampling noise
only, which grows as the sets shrink) and FID(train, MNIST) large (another data set).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bitdance.apps.cli import main as cli_main
from bitdance.data import load_dataset
from bitdance.evaluation.fid import InceptionFeatures, feature_statistics, frechet_distance
from bitdance.images import to_uint8

TOLERANCE = 1e-3


def subset(name: str, split: str | None, n: int) -> np.ndarray:
    ds = load_dataset(name, image_size=32, split=split)
    if n > len(ds):
        raise SystemExit(f"{name} {split}: only {len(ds)} images, asked for {n}")
    x, _ = ds.batch(torch.arange(n) * len(ds) // n)
    return to_uint8(x).numpy()


def cli_fid(real: Path, fake: Path, cache: Path, batch_size: int) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["eval", "fid", "--real", str(real), "--fake", str(fake), "--cache", str(cache),
                       "--batch-size", str(batch_size), "--json"])
    if rc != 0:
        raise SystemExit(f"bitdance eval fid failed (exit {rc})")
    lines = buf.getvalue().strip().splitlines()
    res = json.loads(lines[-1])
    printed = float(next(ln for ln in lines if ln.startswith("FID: ")).split()[1])
    assert abs(printed - res["fid"]) < 1e-6, (printed, res["fid"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1000, help="images per set")
    p.add_argument("--batch-size", type=int, default=50, help="Inception batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.num_images
    t0 = time.perf_counter()
    sets = {"fashion_train": subset("fashion-mnist", "train", n), "fashion_test": subset("fashion-mnist", "test", n),
            "mnist": subset("mnist", None, n)}

    with tempfile.TemporaryDirectory(prefix="fid_check.") as tmp:
        tmp = Path(tmp)
        for k, a in sets.items():
            np.savez(tmp / f"{k}.npz", arr_0=a)
        cache = tmp / "fashion_train_stats.npz"
        t_cli = time.perf_counter()
        via_cli = {k: cli_fid(tmp / "fashion_train.npz", tmp / f"{k}.npz", cache, args.batch_size)
                   for k in ("fashion_test", "mnist")}
        t_cli = time.perf_counter() - t_cli

    t_direct = time.perf_counter()
    net = InceptionFeatures(batch_size=args.batch_size)
    stats = {k: feature_statistics(net.features(a)) for k, a in sets.items()}
    direct = {k: frechet_distance(*stats["fashion_train"], *stats[k]) for k in ("fashion_test", "mnist")}
    t_direct = time.perf_counter() - t_direct

    print(f"{n} images per set, 32x32; CLI path {t_cli:.0f}s, direct {t_direct:.0f}s")
    print(f"{'pair':<34} {'CLI (compute_fid)':>18} {'direct':>14} {'|diff|':>10}")
    ok = True
    for k, label in (("fashion_test", "Fashion-MNIST train vs test"), ("mnist", "Fashion-MNIST train vs MNIST-5k")):
        a, b = via_cli[k]["fid"], direct[k]
        ok &= abs(a - b) < TOLERANCE
        print(f"{label:<34} {a:18.6f} {b:14.6f} {abs(a - b):10.2e}   "
              f"(precision {via_cli[k]['precision']:.3f}, recall {via_cli[k]['recall']:.3f})")
    assert ok, f"CLI and direct FIDs differ by more than {TOLERANCE}"
    assert direct["fashion_test"] < direct["mnist"], "train-vs-test FID should be far below train-vs-MNIST"
    print(f"OK: both paths agree to {TOLERANCE} ({time.perf_counter() - t0:.0f}s total)")


if __name__ == "__main__":
    main()
