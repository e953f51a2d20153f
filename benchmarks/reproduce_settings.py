"""What benchmarks/reproduce_results.py measures, at which budget, and what it costs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitdance.files import atomic_write

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
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=jsonable) + "\n"))


def jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def save_result(path: Path, fn, *args, **kwargs) -> None:
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
