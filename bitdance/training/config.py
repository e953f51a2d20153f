"""Training options: :class:`TrainConfig` (one dataclass for the three tasks, checked on creation), its
command-line options (:func:`add_train_args`, :func:`config_from_args`) and :class:`TrainingError`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from bitdance import validation

__all__ = ["TrainConfig", "TrainingError", "RUN_CONTROL_FIELDS", "add_train_args", "config_from_args"]


# TrainConfig fields that steer a run without changing what it computes, so a resume may change them
# (``steps`` too, with a note: the learning-rate schedule follows it).
RUN_CONTROL_FIELDS = frozenset({"out", "steps", "log_every", "ckpt_every", "sample_every", "final_samples",
                                "max_minutes", "resume", "progress", "cache_latents", "cache_dir", "device",
                                "fsdp", "sample_prompts"})


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume, bad setup)."""


@dataclass
class TrainConfig:
    task: str = "generator"  # "tokenizer" | "generator" | "t2i"
    out: str = "runs/bitdance"
    data: str = "mnist"  # dataset name (mnist, fashion-mnist, twemoji) or an image-folder path
    split: str | None = "train"
    image_size: int = 0  # 0 = the dataset's default
    model: str = ""  # generator preset (BitDance-T-4x) / tokenizer preset (tiny-d4c16)
    model_overrides: dict = field(default_factory=dict)  # e.g. {"dim": 256, "n_layer": 4}
    tokenizer: str = ""  # generator task: trained tokenizer (folder or file)
    steps: int = 1000
    batch_size: int = 64  # global batch
    micro_batch_size: int = 0  # 0 = batch_size / world_size
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): useful EMA in short runs
    precision: str = "auto"  # auto | bf16 | fp32
    seed: int = 0
    device: str = ""  # "" = cuda if available else cpu
    fsdp: bool = False  # shard parameters (torch FSDP2) instead of replicating them (DDP)
    log_every: int = 10
    ckpt_every: int = 200
    sample_every: int = 0  # 0 = only at the end
    final_samples: bool = True  # a sample grid (or reconstructions) when the run ends
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    resume: bool = False
    cache_latents: bool = True  # generator: encode the dataset once with the frozen tokenizer
    cache_dir: str = ""  # where encoded latents are cached ("" = the run folder); share it between runs
    progress: bool = True
    # tokenizer losses
    rec_loss: str = "l1"  # l1 | l2
    entropy_weight: float = 0.1
    commit_weight: float = 0.25
    perceptual: str = "none"  # none | inception
    perceptual_weight: float = 1.0
    gan_weight: float = 0.0  # 0 disables the PatchGAN discriminator
    disc_start: int = 2000
    disc_lr: float = 1e-4
    # text-to-image (t2i task); model_overrides then sets T2IConfig fields (parallel_num, head_width, ...)
    llm: str = ""  # pretrained Hugging Face Qwen3 folder, or a BitDance T2I folder to continue training
    llm_config: dict = field(default_factory=dict)  # from scratch: Qwen3Config fields (hidden_size, ...)
    text_tokenizer: str = ""  # from scratch: Hugging Face tokenizer folder ("" = the --llm folder's)
    distill_from: str = ""  # a T2I folder (e.g. P=16) to inherit from at parallel_num (default 64)
    resolutions: str = ""  # "HxW[:weight],...", e.g. "32x32:3,16x16:1" ("" = the dataset's size)
    text_dropout: float = 0.1  # prompt -> unconditional form, for classifier-free guidance
    text_weight: float = 0.01  # loss = vision + text_weight * text cross-entropy
    perturb_rate: float = 0.1  # bit flips on the fed image tokens (flip if r1 < p * r2)
    sample_prompts: str = ""  # "|"-separated prompts for the sample grid ("" = a few dataset captions)

    def __post_init__(self):
        if self.task not in ("tokenizer", "generator", "t2i"):
            raise TrainingError(f"task must be 'tokenizer', 'generator' or 't2i', got {self.task!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise TrainingError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        try:
            self._check_numbers()
        except validation.InputError as e:
            raise TrainingError(str(e)) from None
        if self.rec_loss not in ("l1", "l2"):
            raise TrainingError(f"rec_loss must be l1 or l2, got {self.rec_loss!r}")
        if self.task == "generator" and not self.tokenizer:
            raise TrainingError("generator training needs a trained tokenizer: --tokenizer PATH "
                                "(train one with 'bitdance train-tokenizer')")
        if self.task == "t2i":
            if not (self.llm or self.llm_config or self.distill_from):
                raise TrainingError("t2i training needs an LLM: --llm-config '{\"hidden_size\": ...}' (from "
                                    "scratch, with --text-tokenizer), --llm FOLDER or --distill-from FOLDER")
            if self.distill_from and (self.llm or self.llm_config):
                raise TrainingError("--distill-from takes the LLM from its folder; drop --llm / --llm-config")
            if not 0 <= self.text_dropout <= 1 or not 0 <= self.perturb_rate <= 1:
                raise TrainingError("text_dropout and perturb_rate must be in [0, 1]")

    def _check_numbers(self) -> None:
        """Documented bounds of the numeric options (README "Limits"), refused by name before any setup."""
        validation.integer(self.steps, "steps", 1, 10**9)
        validation.integer(self.batch_size, "batch_size", 1, 1 << 20)
        validation.integer(self.micro_batch_size, "micro_batch_size", 0, self.batch_size)
        validation.integer(self.warmup_steps, "warmup_steps", 0, 10**9)
        validation.integer(self.image_size, "image_size", 0, 1 << 16)
        validation.integer(self.log_every, "log_every", 1, 10**9)
        validation.integer(self.ckpt_every, "ckpt_every", 0, 10**9)
        validation.integer(self.sample_every, "sample_every", 0, 10**9)
        validation.seed(self.seed)
        validation.number(self.lr, "lr", 1e-12, 1e12)
        validation.number(self.min_lr_ratio, "min_lr_ratio", 0.0, 1.0)
        validation.number(self.weight_decay, "weight_decay", 0.0, 10.0)
        validation.number(self.beta1, "beta1", 0.0, 0.999999)
        validation.number(self.beta2, "beta2", 0.0, 0.999999)
        validation.number(self.grad_clip, "grad_clip", 0.0, 1e6)
        validation.number(self.ema_decay, "ema_decay", 0.0, 1.0)
        validation.number(self.max_minutes, "max_minutes", 0.0, 1e7)

    @property
    def model_name(self) -> str:
        return self.model or ("tiny-d4c16" if self.task == "tokenizer" else "BitDance-T-4x")


# --------------------------------------------------------------------------------------------
# Command line (shared with `bitdance train` / `bitdance train-tokenizer`)
# --------------------------------------------------------------------------------------------
_HELP = {
    "task": "tokenizer | generator | t2i",
    "out": "output folder: checkpoint.pt, metrics.jsonl, samples, exported model",
    "data": "mnist | fashion-mnist | twemoji | path to an image folder (one sub-folder per class)",
    "split": "dataset split (train/test/none)",
    "image_size": "image size in pixels (0 = the dataset's own)",
    "model": "generator preset (BitDance-T-4x) or tokenizer preset (tiny-d4c16)",
    "model_overrides": "JSON dict of config overrides, e.g. '{\"dim\": 256}'",
    "tokenizer": "trained tokenizer folder/file (generator task)",
    "steps": "optimizer steps", "batch_size": "global batch size",
    "micro_batch_size": "per-process micro-batch; smaller than batch / world size = gradient accumulation "
                        "(0 = batch / world size)",
    "lr": "peak AdamW learning rate", "warmup_steps": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "the cosine decays to lr x this", "weight_decay": "AdamW weight decay (not on norms, biases, "
    "embeddings, query tokens)", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "gradient-norm clip (0 = off)", "ema_decay": "EMA decay of the exported weights",
    "ema_warmup": "EMA decay min(ema_decay, (1 + step) / (10 + step)), so short runs get a useful EMA",
    "precision": "auto (bf16 autocast where the hardware has bf16 units) | bf16 | fp32",
    "seed": "seed of the weights, the data order and every random draw",
    "device": "cpu, cuda, ... ('' = cuda if available, else cpu)",
    "fsdp": "shard parameters with FSDP instead of replicating them (DDP) under torchrun",
    "log_every": "steps between metric lines", "ckpt_every": "steps between checkpoints",
    "sample_every": "steps between sample grids (0 = only at the end)",
    "final_samples": "write a sample grid (or reconstructions) when the run ends",
    "resume": "continue from OUT/checkpoint.pt",
    "max_minutes": "stop after this many minutes (0 = no limit)",
    "cache_latents": "generator: encode the dataset once with the frozen tokenizer",
    "cache_dir": "where encoded latents are cached ('' = the run folder); share it between runs",
    "progress": "show a progress bar",
    "rec_loss": "tokenizer: l1 | l2 reconstruction loss", "entropy_weight": "tokenizer: group-wise entropy loss weight",
    "commit_weight": "tokenizer: commitment loss weight", "perceptual": "tokenizer: none | inception perceptual loss",
    "perceptual_weight": "tokenizer: perceptual loss weight",
    "gan_weight": "tokenizer: PatchGAN loss weight (0 = no discriminator)",
    "disc_start": "tokenizer: step at which the discriminator starts", "disc_lr": "tokenizer: discriminator lr",
    "llm": "t2i: pretrained Hugging Face Qwen3 folder (or a BitDance T2I folder to continue training)",
    "llm_config": "t2i from scratch: JSON Qwen3Config fields, e.g. '{\"hidden_size\": 256, \"num_hidden_layers\": 4}'",
    "text_tokenizer": "t2i from scratch: Hugging Face tokenizer folder ('' = the --llm folder's)",
    "distill_from": "t2i: a T2I folder (P=16) to inherit from at parallel_num (default 64)",
    "resolutions": "t2i: HxW[:weight],... in pixels, e.g. 32x32:3,16x16:1 ('' = the dataset's size)",
    "text_dropout": "t2i: probability of the unconditional prompt", "text_weight": "t2i: text loss weight",
    "perturb_rate": "t2i: bit-flip rate p on fed image tokens", "sample_prompts": "t2i: '|'-separated prompts",
}


def add_train_args(p: argparse.ArgumentParser, task: str | None = None) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name == "task" and task is not None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        flag = "--" + f.name.replace("_", "-")
        helptext = _HELP[f.name]
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif isinstance(default, dict):
            p.add_argument(flag, type=json.loads, default=default, help=helptext)
        elif f.name == "split":
            p.add_argument(flag, default=default, help=helptext)
        else:
            p.add_argument(flag, type=type(default), default=default, help=helptext)


def config_from_args(args: argparse.Namespace, task: str | None = None) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if task is not None:
        kw["task"] = task
    if kw.get("split") in ("none", "None", ""):
        kw["split"] = None
    return TrainConfig(**kw)
