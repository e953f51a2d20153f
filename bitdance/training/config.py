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


# The sections of TrainConfig, in --help order: the options every run has, then those of each task.
SECTIONS: dict[str, tuple[str, ...]] = {
    "what to train": ("task", "out", "data", "split", "image_size", "model", "model_overrides", "tokenizer"),
    "optimisation": ("steps", "batch_size", "micro_batch_size", "lr", "warmup_steps", "min_lr_ratio",
                     "weight_decay", "beta1", "beta2", "grad_clip", "ema_decay", "ema_warmup", "precision",
                     "seed"),
    "running": ("device", "fsdp", "log_every", "ckpt_every", "sample_every", "final_samples",
                "max_minutes", "resume", "progress"),
    "latent cache (generator and t2i tasks)": ("cache_latents", "cache_dir"),
    "tokenizer task": ("rec_loss", "entropy_weight", "commit_weight", "perceptual", "perceptual_weight",
                       "gan_weight", "disc_start", "disc_lr"),
    "text-to-image task": ("llm", "llm_config", "text_tokenizer", "distill_from", "resolutions",
                           "text_dropout", "text_weight", "perturb_rate", "sample_prompts"),
}


def _opt(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A TrainConfig field with its command-line help next to it."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """Options of a training run, in sections: what to train, optimisation, running, then one section per
    task (the CLI groups ``--help`` the same way; an option of another task is ignored)."""

    # what to train, on what
    task: str = _opt("generator", "tokenizer | generator | t2i")
    out: str = _opt("runs/bitdance", "output folder: checkpoint.pt, metrics.jsonl, samples, exported model")
    data: str = _opt("mnist",
        "mnist | fashion-mnist | twemoji | path to an image folder (one sub-folder per class)")
    split: str | None = _opt("train", "dataset split (train/test/none)")
    image_size: int = _opt(0, "image size in pixels (0 = the dataset's own)")
    model: str = _opt("", "generator preset (BitDance-T-4x) or tokenizer preset (tiny-d4c16)")
    model_overrides: dict = _opt(help='JSON dict of config overrides, e.g. \'{"dim": 256}\'', factory=dict)
    tokenizer: str = _opt("", "trained image tokenizer, folder or file (generator and t2i tasks)")
    # optimisation
    steps: int = _opt(1000, "optimizer steps")
    batch_size: int = _opt(64, "global batch size")
    micro_batch_size: int = _opt(0,
        "per-process micro-batch; smaller than batch / world size = gradient accumulation (0 = batch / world size)")
    lr: float = _opt(3e-4, "peak AdamW learning rate")
    warmup_steps: int = _opt(100, "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = _opt(0.0, "the cosine decays to lr x this")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on norms, biases, embeddings, query tokens)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "gradient-norm clip (0 = off)")
    ema_decay: float = _opt(0.9999, "EMA decay of the exported weights")
    ema_warmup: bool = _opt(True,
        "EMA decay min(ema_decay, (1 + step) / (10 + step)), so short runs get a useful EMA")
    precision: str = _opt("auto", "auto (bf16 autocast where the hardware has bf16 units) | bf16 | fp32")
    seed: int = _opt(0, "seed of the weights, the data order and every random draw")
    # running: device, logging, checkpoints, stopping
    device: str = _opt("", "cpu, cuda, ... ('' = cuda if available, else cpu)")
    fsdp: bool = _opt(False, "shard parameters with FSDP instead of replicating them (DDP) under torchrun")
    log_every: int = _opt(10, "steps between metric lines")
    ckpt_every: int = _opt(200, "steps between checkpoints")
    sample_every: int = _opt(0, "steps between sample grids (0 = only at the end)")
    final_samples: bool = _opt(True, "write a sample grid (or reconstructions) when the run ends")
    max_minutes: float = _opt(0.0, "stop after this many minutes (0 = no limit)")
    resume: bool = _opt(False, "continue from OUT/checkpoint.pt")
    progress: bool = _opt(True, "show a progress bar")
    # latent cache (generator and t2i tasks)
    cache_latents: bool = _opt(True, "encode the dataset once with the frozen tokenizer")
    cache_dir: str = _opt("", "where encoded latents are cached ('' = the run folder); share it between runs")
    # tokenizer task: losses
    rec_loss: str = _opt("l1", "l1 | l2 reconstruction loss")
    entropy_weight: float = _opt(0.1, "group-wise entropy loss weight")
    commit_weight: float = _opt(0.25, "commitment loss weight")
    perceptual: str = _opt("none", "none | inception perceptual loss")
    perceptual_weight: float = _opt(1.0, "perceptual loss weight")
    gan_weight: float = _opt(0.0, "PatchGAN loss weight (0 = no discriminator)")
    disc_start: int = _opt(2000, "step at which the discriminator starts")
    disc_lr: float = _opt(1e-4, "discriminator lr")
    # text-to-image task (model_overrides sets T2IConfig fields: parallel_num, head_width, ...)
    llm: str = _opt("",
        "pretrained Hugging Face Qwen3 folder (or a BitDance T2I folder to continue training)")
    llm_config: dict = _opt(
        help='from scratch: JSON Qwen3Config fields, e.g. \'{"hidden_size": 256, "num_hidden_layers": 4}\'',
        factory=dict)
    text_tokenizer: str = _opt("", "from scratch: Hugging Face tokenizer folder ('' = the --llm folder's)")
    distill_from: str = _opt("", "a T2I folder (P=16) to inherit from at parallel_num (default 64)")
    resolutions: str = _opt("", "HxW[:weight],... in pixels, e.g. 32x32:3,16x16:1 ('' = the dataset's size)")
    text_dropout: float = _opt(0.1, "probability of the unconditional prompt")
    text_weight: float = _opt(0.01, "text loss weight")
    perturb_rate: float = _opt(0.1, "bit-flip rate p on fed image tokens")
    sample_prompts: str = _opt("", "'|'-separated prompts")

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


def add_train_args(p: argparse.ArgumentParser, task: str | None = None) -> None:
    """One option per TrainConfig field, grouped by :data:`SECTIONS` in ``--help``."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in SECTIONS.items():
        group = p.add_argument_group(title)
        for name in names:
            if name == "task" and task is not None:
                continue
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
            flag, helptext = "--" + name.replace("_", "-"), f.metadata["help"]
            if isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
            elif isinstance(default, dict):
                group.add_argument(flag, type=json.loads, default=default, help=helptext)
            elif name == "split":
                group.add_argument(flag, default=default, help=helptext)
            else:
                group.add_argument(flag, type=type(default), default=default, help=helptext)


def config_from_args(args: argparse.Namespace, task: str | None = None) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if task is not None:
        kw["task"] = task
    if kw.get("split") in ("none", "None", ""):
        kw["split"] = None
    return TrainConfig(**kw)
