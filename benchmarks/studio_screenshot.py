"""Screenshot of the web studio (``bitdance serve``) after finished generations -> docs/assets/studio.png.

    python benchmarks/studio_screenshot.py                                    # tiny random model (noise)
    python benchmarks/studio_screenshot.py --model runs/gen/model --class-names fashion-mnist
    python benchmarks/studio_screenshot.py --model runs/g1x/model --model runs/g4x/model \
        --class-names fashion-mnist --jobs 0,1,2,3:8:1:g1x/model 7,8,9,5:8:2:g4x/model

Starts the studio in-process on a free port, drives Debian's chromium (``apt-get install chromium``)
with playwright (``pip install playwright``; no ``playwright install`` needed), runs one generation per
``--jobs`` entry through the page like a user would, and saves a screenshot of the page.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _pipes(models: list[str] | None) -> dict:
    """name -> pipeline, named like ``bitdance serve`` names them."""
    from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, bitdance_preset
    from bitdance.apps.studio_jobs import model_names

    if models:
        return {n: BitDancePipeline.from_pretrained(m) for n, m in zip(model_names(models), models)}
    torch.manual_seed(0)
    cfg = bitdance_preset("BitDance-T-4x", image_size=32, num_classes=10, cls_token_num=4, tokenizer="tiny-d4c16")
    return {"tiny-4x": BitDancePipeline(BitDance(cfg), BinaryTokenizer(cfg.tokenizer))}


def _class_names(spec: str | None, n: int):
    if spec is None:
        return None
    if spec == "fashion-mnist":
        from bitdance.data import FashionMNIST

        return list(FashionMNIST.CLASS_NAMES)
    if spec == "mnist":
        return [str(i) for i in range(n)]
    return [s.strip() for s in spec.split(",")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", action="append",
                    help="bitdance model folder; repeat for several (default: a tiny model with random weights)")
    ap.add_argument("--class-names", help="'fashion-mnist', 'mnist' or comma-separated names (every model)")
    ap.add_argument("--jobs", nargs="+", default=["0,1,2,3:8:1", "7,8,9,5:8:2"],
                    help="generations as CLASSES:NUM_IMAGES:SEED[:MODEL] (MODEL: a name from the page's "
                    "selector, default the first); the screenshot shows the last one")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--out", default=str(ROOT / "docs/assets/studio.png"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from bitdance.apps.studio import make_server

    pipes = _pipes(args.model)
    first = next(iter(pipes.values()))
    server = make_server(pipes, "127.0.0.1", 0, class_names=_class_names(args.class_names, first.config.num_classes))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server.url + "/")
            for k, job in enumerate(args.jobs):
                classes, num, seed, *model = job.split(":", 3)
                if len(pipes) > 1:
                    page.select_option("#modelsel", model[0] if model else next(iter(pipes)))
                for b in page.query_selector_all("#classes button.on"):
                    b.click()  # un-pick the previous job's classes
                for c in classes.split(","):
                    page.click(f"#classes button[data-cls='{int(c)}']")
                page.fill("#num", num)
                page.fill("#seed", seed)
                page.fill("#steps", str(args.steps))
                page.fill("#guidance", str(args.guidance))
                page.click("#go")
                page.wait_for_selector(f"#history .item:nth-child({k + 1})", timeout=600_000)
                page.wait_for_selector("#status:has-text('Done')", timeout=600_000)
            page.wait_for_timeout(300)  # let the last history images paint
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
