"""The runner of ``reproduce_results.py``: trains, samples and scores every row of the four tables, each
cached so a re-run resumes (the command line and what the tables mean: ``reproduce_results.py``)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitdance.files import atomic_write

# The settings and the page live in their own files next to this one (run as a script or loaded by path).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce_report import (  # noqa: E402
    plot_series,
    render_markdown,
    sample_strip,
)
from reproduce_settings import (  # noqa: E402
    DATA,
    GENERATOR_MODEL,
    GENERATOR_TRAIN,
    HEAD_STEPS_SWEEP,
    HEAD_TABLE_BITS,
    HEAD_TABLE_P,
    HEAD_TYPES,
    IMAGE_SIZE,
    PARALLEL_NUMS,
    PARALLEL_TABLE_BITS,
    SAMPLE_SEED,
    SAMPLING,
    TABLES,
    TOKENIZER_ARCH,
    TOKENIZER_BITS,
    TOKENIZER_PRESET,
    TOKENIZER_TRAIN,
    TRAIN_SEED,
    Budget,
    SettingsError,
    cpu_name,
    estimate_seconds,
    generator_run_name,
    jsonable,
    read_json,
    save_result,
    settings_of,
    tokenizer_groups,
    tokenizer_run_name,
    write_json,
)

__all__ = ["Reproduction"]


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
            if old != json.loads(json.dumps(self.settings, default=jsonable)):
                diff = _diff_keys(old, json.loads(json.dumps(self.settings, default=jsonable)))
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
            from bitdance.evaluation.fid import InceptionFeatures

            self._inception = InceptionFeatures(batch_size=50)
        return self._inception

    @property
    def classifier(self):
        if self._classifier is None:
            from bitdance.evaluation.metrics import load_classifier

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
        from bitdance.training.trainer import Trainer

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

        self.log(f"[train] {name}: {cfg.steps} steps at batch {cfg.batch_size}")
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
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
        from bitdance.training.config import TrainConfig

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
        from bitdance.training.config import TrainConfig

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
                          progress=b.name == "full", final_samples=False)  # grids come from the FID samples
        same_tok = [generator_run_name(h, P, bits) for h in HEAD_TYPES for P in PARALLEL_NUMS]
        info = self._train(name, cfg, "model", link_from=[n for n in same_tok if n != name])
        return self.runs / name / "model", info

    # sampling and scoring ----------------------------------------------------------------------
    def samples(self, run_name: str, model_dir: Path, head_steps: int) -> tuple[Path, dict]:
        """``fid_images`` class-balanced samples through ``bitdance.evaluation.samples.sample_npz`` (the
        sampler of ``bitdance sample-npz``: batch b seeded from (SAMPLE_SEED, b)), cached as
        OUT/samples/KEY.npz with their timing."""
        from bitdance.evaluation.samples import sample_npz, weights_fingerprint
        from bitdance.pipelines.class_conditional import BitDancePipeline

        b = self.budget
        key = (f"{run_name}_steps{head_steps}_cfg{self.guidance_scale:g}_n{b.fid_images}_bs{b.sample_batch}"
               f"_seed{SAMPLE_SEED}")
        path = self.out / "samples" / f"{key}.npz"
        meta_path = path.with_suffix(".json")
        if path.is_file() and meta_path.is_file():
            return path, read_json(meta_path)
        pipe = BitDancePipeline.from_pretrained(model_dir)
        self.log(f"[sample] {key}")
        run = sample_npz(pipe, path, num_samples=b.fid_images, batch_size=b.sample_batch, seed=SAMPLE_SEED,
                         num_inference_steps=head_steps, guidance_scale=self.guidance_scale,
                         guidance_schedule=SAMPLING["guidance_schedule"], sampler=SAMPLING["sampler"],
                         overwrite=True, record={"weights": weights_fingerprint(model_dir)}, progress=False)
        meta = {"key": key, "images": b.fid_images, "batch": b.sample_batch, "threads": torch.get_num_threads(),
                "seconds": round(run.seconds, 2), "seconds_per_image": run.seconds / max(run.sampled, 1),
                "head_steps": head_steps, "ar_steps": pipe.config.num_steps, "guidance_scale": self.guidance_scale,
                "seed": SAMPLE_SEED, "seeding": "bitdance.evaluation.samples.batch_seed(seed, batch)"}
        write_json(meta_path, meta)
        self._timed(f"sample {key}", run.seconds)
        return path, meta

    def latency(self, run_name: str, model_dir: Path, head_steps: int) -> dict:
        """Seconds per image generated one at a time (batch 1, guidance on, decoding included): the
        latency that next-patch prediction is meant to cut. One warm-up image, then ``latency_images``."""
        from bitdance.pipelines.class_conditional import BitDancePipeline

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
        from bitdance.evaluation.fid import feature_statistics, load_stats_npz, save_stats_npz
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
                    save_result(part, np.save, self.inception.features(to_uint8(x)).astype(np.float32))
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
        from bitdance.evaluation.fid import feature_statistics, frechet_distance
        from bitdance.evaluation.metrics import class_accuracy

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
        from bitdance.evaluation.metrics import evaluate_reconstruction
        from bitdance.formats.official import load_tokenizer

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
    from bitdance.evaluation.metrics import classifier_paths

    try:
        return read_json(classifier_paths(DATA)[1])["test"]["accuracy"]
    except (OSError, KeyError, ValueError):
        return None


def _bf16() -> bool:
    from bitdance.precision import auto_precision

    return auto_precision("cpu") == "bf16"
