"""Text-to-image BitDance: a Qwen3 LLM that writes binary image tokens patch by patch.

Model (facts about the released BitDance-14B-16x / -64x folders):

- the LLM is a Hugging Face ``Qwen3ForCausalLM``; the prompt is chat-formatted text;
- image tokens (d = 32 bits in {-1,+1}) enter the LLM through a projector
  (``fc1`` d -> hidden, GELU tanh, ``fc2`` hidden -> hidden) plus a fixed 2D sin-cos embedding of the
  token's own grid position;
- P = parallel_num tokens (one p x p patch, p = sqrt(P)) are generated per step by a transformer diffusion
  head (output 2*sigmoid(x)-1) conditioned on the LLM's P outputs plus the 2D sin-cos embedding of the
  positions being predicted; ``sign`` turns the head's samples into bits;
- the sequence is ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>``
  ``<|res_{H/16}|>`` then the first bidirectional block ``[<|res_{W/16}|>, <|query_1|> .. <|query_{P-1}|>]``
  (its P outputs predict image block 0) then image blocks of P tokens (each block's outputs predict the
  next one). Attention is causal over the text and block-causal over the image part; RoPE positions are
  plain 1D positions continuing after the text. The guidance (unconditional) sequence is
  ``<|im_start|>assistant\\n`` followed by the same image part.

Folder layout read by :meth:`BitDanceT2I.from_folder` and written by :meth:`BitDanceT2I.save_folder`:
Hugging Face Qwen3 files (``config.json``, ``model*.safetensors`` [+ index], tokenizer files),
``ae_config.json`` + ``ae.safetensors`` (binary tokenizer), ``vision_head_config.json`` +
``vision_head.safetensors`` (keys ``net.*``) and ``projector.safetensors`` (``fc1.*``, ``fc2.*``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    CheckpointError,
    atomic_write,
    infer_head_config,
    load_file,
    load_into,
    safetensors_shapes,
    save_official_tokenizer,
    split_prefix,
)
from .config import ConfigError, HeadConfig
from .head import DiffusionHead
from .sampler import FlowSampler
from .sampling import block_causal_mask, block_mask, generate_blocks
from .transformer import flip_bits, generation_order

__all__ = [
    "IGNORE_INDEX",
    "RESOLUTIONS_512",
    "RESOLUTIONS_1024",
    "BitDanceT2I",
    "PackedBatch",
    "Projector",
    "T2IConfig",
    "add_special_tokens",
    "distill_from",
    "pack_batch",
    "packed_embeddings",
    "packed_head_condition",
    "sincos_1d",
    "sincos_2d",
    "special_tokens",
    "t2i_attention_mask",
    "training_loss",
]

# Released resolutions [H, W]; the transposes are added below.
_BASE_1024 = [(2048, 512), (1920, 512), (1536, 640), (1280, 768), (1152, 896), (1024, 1024)]
_BASE_512 = [(1024, 256), (896, 256), (640, 384), (512, 512)]


def _with_transposes(base):
    out = []
    for h, w in base:
        for r in ((h, w), (w, h)):
            if r not in out:
                out.append(r)
    return tuple(out)


RESOLUTIONS_1024: tuple[tuple[int, int], ...] = _with_transposes(_BASE_1024)
RESOLUTIONS_512: tuple[tuple[int, int], ...] = _with_transposes(_BASE_512)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# Files of the released folder layout (besides the Hugging Face LLM and tokenizer files).
AE_CONFIG, AE_WEIGHTS = "ae_config.json", "ae.safetensors"
HEAD_CONFIG, HEAD_WEIGHTS = "vision_head_config.json", "vision_head.safetensors"
PROJECTOR_WEIGHTS = "projector.safetensors"


def res_token(n: int) -> str:
    return f"<|res_{n}|>"


def query_token(i: int) -> str:
    return f"<|query_{i}|>"


def special_tokens(parallel_num: int, max_res_tokens: int = 256) -> list[str]:
    """The tokens a BitDance T2I vocabulary needs: the reused Qwen chat / vision tokens, then the added
    ``<|res_1|>`` .. ``<|res_{max_res_tokens}|>`` and ``<|query_1|>`` .. ``<|query_{P-1}|>``."""
    return ([IM_START, IM_END, VISION_START, VISION_END]
            + [res_token(i) for i in range(1, max_res_tokens + 1)]
            + [query_token(i) for i in range(1, parallel_num)])


def add_special_tokens(tokenizer, parallel_num: int, max_res_tokens: int = 256) -> int:
    """Add the missing T2I special tokens to a Hugging Face tokenizer; returns how many were added
    (resize the LLM's embeddings afterwards, e.g. when starting from a plain Qwen3 checkpoint)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in special_tokens(parallel_num, max_res_tokens) if t not in vocab]
    if not missing:
        return 0
    return tokenizer.add_tokens(missing, special_tokens=True)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class T2IConfig:
    """Everything of a T2I model besides the LLM (whose hidden size is the condition width).

    ``resolutions`` lists the accepted [H, W] in pixels (default: the released 1024-area and 512-area
    lists with their transposes). ``allow_any_resolution=True`` accepts any H, W that are multiples of
    ``down_factor * sqrt(parallel_num)`` (for custom models), up to ``max_res_tokens * down_factor``.
    """

    parallel_num: int = 64  # P tokens per step (a square: 16 -> 4x4 patches, 64 -> 8x8)
    latent_dim: int = 32  # bits per token
    down_factor: int = 16  # pixels per token side
    # Vision head (vision_head_config.json: ch_latent, depth_latent, depth_adanln, ...).
    head_width: int = 5120
    head_depth: int = 6
    head_adaln: int = 2
    head_dim: int = 128
    time_shift: float = 1.0
    time_schedule: str = "logit_normal"
    P_mean: float = 0.0
    P_std: float = 1.0
    use_swiglu: bool = True
    max_res_tokens: int = 256
    resolutions: tuple[tuple[int, int], ...] = field(default_factory=lambda: RESOLUTIONS_1024 + RESOLUTIONS_512)
    allow_any_resolution: bool = False

    def __post_init__(self):
        p = math.isqrt(self.parallel_num) if self.parallel_num >= 1 else 0
        if p < 1 or p * p != self.parallel_num:
            raise ConfigError(f"T2IConfig: parallel_num={self.parallel_num} must be a square (16, 64, ...)")
        if not self.use_swiglu:
            raise ConfigError("T2IConfig: only use_swiglu=true vision heads are supported")
        if self.latent_dim < 1 or self.down_factor < 1 or self.max_res_tokens < 1:
            raise ConfigError("T2IConfig: latent_dim, down_factor and max_res_tokens must be >= 1")
        self.resolutions = tuple((int(h), int(w)) for h, w in self.resolutions)

    @property
    def patch_size(self) -> int:
        return math.isqrt(self.parallel_num)

    def head_config(self, hidden: int) -> HeadConfig:
        return HeadConfig(variant="transformer", in_channels=self.latent_dim, cond_channels=hidden,
                          width=self.head_width, depth=self.head_depth, adaln_blocks=self.head_adaln,
                          head_dim=self.head_dim, parallel_num=self.parallel_num, output_activation="tanh",
                          time_schedule=self.time_schedule, time_shift=self.time_shift, P_mean=self.P_mean,
                          P_std=self.P_std)

    def check_resolution(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) token grid for an image of height x width pixels; ValueError if not accepted."""
        height, width = int(height), int(width)
        unit = self.down_factor * self.patch_size
        if self.allow_any_resolution:
            ok = (height > 0 and width > 0 and height % unit == 0 and width % unit == 0
                  and max(height, width) <= self.max_res_tokens * self.down_factor)
            if not ok:
                raise ValueError(f"resolution {height}x{width} (HxW) is not allowed: height and width must be "
                                 f"positive multiples of {unit} px (down factor {self.down_factor} x patch "
                                 f"{self.patch_size}) and at most {self.max_res_tokens * self.down_factor} px")
        elif (height, width) not in self.resolutions:
            allowed = ", ".join(f"{h}x{w}" for h, w in self.resolutions)
            raise ValueError(f"resolution {height}x{width} (HxW) is not allowed; allowed resolutions: {allowed}")
        h, w = height // self.down_factor, width // self.down_factor
        if h % self.patch_size or w % self.patch_size or h * self.down_factor != height \
                or w * self.down_factor != width or max(h, w) > self.max_res_tokens:
            raise ValueError(f"resolution {height}x{width} does not give a token grid divisible into "
                             f"{self.patch_size}x{self.patch_size} patches of {self.down_factor} px tokens")
        return h, w

    # ---- vision_head_config.json ----
    def vision_head_json(self, hidden: int) -> dict[str, Any]:
        d = {"ch_target": self.latent_dim, "ch_cond": hidden, "ch_latent": self.head_width,
             "depth_latent": self.head_depth, "depth_adanln": self.head_adaln, "parallel_num": self.parallel_num,
             "time_shift": self.time_shift, "time_schedule": self.time_schedule, "P_mean": self.P_mean,
             "P_std": self.P_std, "use_swiglu": self.use_swiglu}
        if self.head_dim != 128:  # not in the released files (they all use 128); kept for custom heads
            d["head_dim"] = self.head_dim
        if self.down_factor != 16:  # released folders are all 16x; custom (e.g. small-image) models store it
            d["down_factor"] = self.down_factor
        return d

    @classmethod
    def from_vision_head_json(cls, d: dict[str, Any], **overrides) -> T2IConfig:
        kw: dict[str, Any] = {}
        names = {"ch_target": "latent_dim", "ch_latent": "head_width", "depth_latent": "head_depth",
                 "depth_adanln": "head_adaln", "parallel_num": "parallel_num", "time_shift": "time_shift",
                 "time_schedule": "time_schedule", "P_mean": "P_mean", "P_std": "P_std",
                 "use_swiglu": "use_swiglu", "head_dim": "head_dim", "down_factor": "down_factor"}
        if not isinstance(d, dict):
            raise ConfigError(f"expected an object of fields, got {type(d).__name__}")
        for k, v in d.items():
            if k in names:
                want = bool if k == "use_swiglu" else str if k == "time_schedule" else \
                    float if k in ("time_shift", "P_mean", "P_std") else int
                ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool))
                if want is float:
                    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                if not ok:
                    raise ConfigError(f"{k} must be {want.__name__ if want is not float else 'a finite number'}, "
                                      f"got {v!r:.40}")
                if want is int and v < 1:
                    raise ConfigError(f"{k} must be a positive integer, got {v}")
                kw[names[k]] = v
        valid = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if k not in valid:
                raise TypeError(f"T2IConfig has no field {k!r}")
            if v is not None:
                kw[k] = v
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# Position embeddings and attention mask
# --------------------------------------------------------------------------------------------
def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) = [sin(pos * omega) | cos(pos * omega)], omega_i = 1/10000^(i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    arg = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (h*w, dim) of a token grid in raster order:
    concat(1D embedding of the column, 1D embedding of the row), each of size dim/2 (float32)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=1).float()


def t2i_attention_mask(valid: torch.Tensor, num_causal: int, block: int) -> torch.Tensor:
    """Boolean (R, T, T) mask, True = query may attend to key.

    ``valid`` (R, T) marks real (non-padding) tokens. Positions < ``num_causal`` (the left-padded text,
    ``<|vision_start|>`` and ``<|res_H|>``) are causal; the rest is split into blocks of ``block`` tokens
    that see themselves and everything before. Padding keys are never seen; every query sees itself
    (so padding rows stay finite).
    """
    T = valid.shape[1]
    allowed = block_causal_mask(T, num_causal, block, device=valid.device)[None] & valid[:, None, :]
    return allowed | torch.eye(T, dtype=torch.bool, device=valid.device)[None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (R, q, k) -> additive float (R, 1, q, k) for the eager and sdpa attention paths."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)[:, None]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class Projector(nn.Module):
    """Binary tokens -> LLM width: ``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x.to(self.fc1.weight.dtype)), approximate="tanh"))


@dataclass
class T2IInputs:
    """A left-padded batch of sequence prefixes (text + ``<|vision_start|>`` + ``<|res_H|>`` + first block)."""

    input_ids: torch.Tensor  # (R, Lp + P): padded prefix then [<|res_W|>, queries]
    valid: torch.Tensor  # (R, Lp + P) bool, False on left padding
    num_causal: int  # Lp: the causal (text) part, padding included
    text_lengths: torch.Tensor  # (R,) real tokens in the causal part


class BitDanceT2I(nn.Module):
    """Qwen3 LLM + projector + vision head (+ optionally the binary image tokenizer ``ae``)."""

    def __init__(self, llm: nn.Module, text_tokenizer, config: T2IConfig, *, ae: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.llm = llm
        self.text_tokenizer = text_tokenizer
        hidden = llm.config.hidden_size
        if hidden % 4:
            raise ConfigError(f"LLM hidden size {hidden} must be divisible by 4 (2D sin-cos embedding)")
        self.projector = Projector(config.latent_dim, hidden)
        self.vision_head = DiffusionHead(config.head_config(hidden))
        self.ae = ae
        if ae is not None and (ae.bits != config.latent_dim or ae.down_factor != config.down_factor):
            raise ConfigError(f"image tokenizer has {ae.bits} bits / down factor {ae.down_factor}, the model "
                              f"expects {config.latent_dim} / {config.down_factor}")
        self._token_ids = self._lookup_special_tokens()

    # ---- properties ----
    @property
    def hidden_size(self) -> int:
        return self.llm.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    def _lookup_special_tokens(self) -> dict[str, int]:
        vocab = self.text_tokenizer.get_vocab()
        need = special_tokens(self.config.parallel_num, self.config.max_res_tokens)
        missing = [t for t in need if t not in vocab]
        if missing:
            raise ConfigError(f"the text tokenizer lacks {len(missing)} BitDance special tokens, e.g. "
                              f"{missing[:3]}; see bitdance.t2i.add_special_tokens")
        ids = {t: vocab[t] for t in need}
        n_emb = self.llm.get_input_embeddings().num_embeddings
        too_big = [t for t, i in ids.items() if i >= n_emb]
        if too_big:
            raise ConfigError(f"special token {too_big[0]} has id {ids[too_big[0]]} >= the LLM's "
                              f"{n_emb} embeddings (resize the embeddings)")
        return ids

    # ---- sequence building ----
    def prompt_text(self, prompt: str | None) -> str:
        """Chat-formatted text part (None = the unconditional sequence)."""
        if prompt is None:
            return f"{IM_START}assistant\n"
        return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"

    def _text_ids(self, text: str) -> list[int]:
        return list(self.text_tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefix_ids(self, prompt: str | None, h: int) -> list[int]:
        """Causal part of one sequence: text, ``<|vision_start|>``, ``<|res_h|>``."""
        t = self._token_ids
        return self._text_ids(self.prompt_text(prompt)) + [t[VISION_START], t[res_token(h)]]

    def first_block_ids(self, w: int) -> list[int]:
        """The first bidirectional block: ``<|res_w|>`` and the P-1 query tokens."""
        t = self._token_ids
        return [t[res_token(w)]] + [t[query_token(i)] for i in range(1, self.config.parallel_num)]

    def build_inputs(self, prompts: Sequence[str | None], h: int, w: int) -> T2IInputs:
        """Left-padded prefixes (one row per prompt, None = unconditional) + the first block."""
        rows = [self.prefix_ids(p, h) for p in prompts]
        Lp = max(len(r) for r in rows)
        pad = self.text_tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        first = self.first_block_ids(w)
        ids = torch.tensor([[pad] * (Lp - len(r)) + r + first for r in rows], dtype=torch.long)
        valid = torch.tensor([[False] * (Lp - len(r)) + [True] * (len(r) + len(first)) for r in rows])
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return T2IInputs(ids, valid, Lp, lengths)

    @staticmethod
    def position_ids(valid: torch.Tensor) -> torch.Tensor:
        """1D RoPE positions: 0, 1, ... over the real tokens of each row (padding gets 0)."""
        return (valid.long().cumsum(1) - 1).clamp_min(0)

    def image_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """2D sin-cos embedding of the grid in generation (patch-wise) order, (h*w, hidden)."""
        order = generation_order(h, w, self.config.patch_size)
        return sincos_2d(h, w, self.hidden_size)[order]

    def embed_image_tokens(self, bits: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """(R, n, d) tokens in {-1,+1} + their own position embeddings (n, hidden) -> LLM inputs."""
        return self.projector(bits) + pos_embed.to(self.projector.fc2.weight.dtype)

    # ---- generation ----
    def _llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, height: int, width: int,
                 sampler: FlowSampler | None = None, guidance_scale: float = 7.5,
                 generator: torch.Generator | None = None, use_kv_cache: bool = True,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Binary latents (B, d, H/16, W/16) in {-1,+1} for the prompts (raster grid layout).

        Guidance: with ``guidance_scale > 1`` the unconditional sequences run in the same batch (rows
        B..2B-1); the head's velocity is guided with a constant scale.
        ``callback(step, num_steps, latents_so_far)`` runs after each AR step with a fresh (B, d, h, w)
        grid whose not-yet-generated tokens are 0 (same contract as :meth:`BitDance.generate`).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        h, w = self.config.check_resolution(height, width)
        rows: list[str | None] = prompts + ([None] * len(prompts) if guidance_scale > 1.0 else [])
        source = _TextToImageSource(self, rows, h, w, use_kv_cache)
        return generate_blocks(source, self.vision_head, batch=len(prompts), grid=(h, w),
                               order=generation_order(h, w, self.config.patch_size),
                               parallel_num=self.config.parallel_num, latent_dim=self.config.latent_dim,
                               sampler=sampler if sampler is not None else FlowSampler(num_steps=50),
                               guidance_scale=guidance_scale, guidance_schedule="constant", generator=generator,
                               callback=callback, device=self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, **kw) -> torch.Tensor:
        """Latents -> images in about [-1, 1] with the folder's binary tokenizer (``ae``)."""
        if self.ae is None:
            raise RuntimeError("this model has no image tokenizer (ae); load a folder with ae.safetensors")
        p = next(self.ae.parameters())  # the ae may be offloaded to the CPU (from_folder(offload=...))
        return self.ae.decode(latents.to(device=p.device, dtype=p.dtype), **kw)

    # ---- folder I/O ----
    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                    low_cpu_mem_usage: bool = True, load_ae: bool = True, offload: Sequence[str] = (),
                    **config_overrides) -> BitDanceT2I:
        """Load a released folder as-is (see the module docstring). ``config_overrides`` set T2IConfig
        fields the folder does not store (e.g. ``resolutions``, ``allow_any_resolution``, ``head_dim``).
        ``dtype=None`` keeps the dtype of the stored LLM weights for the whole model.

        ``offload`` names parts that stay on the CPU when ``device`` is a GPU: ``"ae"`` (the image
        tokenizer, used once per image; images are then decoded on the CPU) and ``"lm_head"`` (the LLM's
        text output layer, 0.78B parameters for Qwen3-14B, which image generation never calls)."""
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        from .checkpoint import load_tokenizer

        offload = check_offload(offload)
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such folder")
        _check_folder(path, load_ae)
        try:
            head_json = json.loads((path / HEAD_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / HEAD_CONFIG}: invalid JSON ({e})") from None
        try:
            config = T2IConfig.from_vision_head_json(head_json, **config_overrides)
        except ConfigError as e:
            raise CheckpointError(f"{path / HEAD_CONFIG}: {e}") from None

        _check_head_header(path, head_json, config)
        llm = Qwen3ForCausalLM.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto",
                                               low_cpu_mem_usage=low_cpu_mem_usage)
        if head_json.get("ch_cond", llm.config.hidden_size) != llm.config.hidden_size:
            raise CheckpointError(f"{path / HEAD_CONFIG}: ch_cond={head_json['ch_cond']} does not match the "
                                  f"LLM hidden size {llm.config.hidden_size}")
        text_tok = AutoTokenizer.from_pretrained(str(path))
        ae = load_tokenizer(path / AE_WEIGHTS) if load_ae else None
        model = cls(llm, text_tok, config, ae=ae)
        head_sd = load_file(path / HEAD_WEIGHTS)
        net_sd = split_prefix(head_sd, "net.")
        if not net_sd or len(net_sd) != len(head_sd):
            raise CheckpointError(f"{path / HEAD_WEIGHTS}: expected only net.* keys, got e.g. {list(head_sd)[:3]}")
        load_into(model.vision_head.net, net_sd, what=f"vision head {path / HEAD_WEIGHTS}")
        load_into(model.projector, load_file(path / PROJECTOR_WEIGHTS), what=f"projector {path / PROJECTOR_WEIGHTS}")
        target = dtype if dtype is not None else llm.get_input_embeddings().weight.dtype
        model.to(dtype=target)
        if "lm_head" in offload and llm.get_output_embeddings().weight is llm.get_input_embeddings().weight:
            raise ValueError("offload='lm_head': this LLM ties its output layer to the input embeddings "
                             "(tie_word_embeddings), which generation needs on the device")
        keep = {id(model.ae)} if "ae" in offload and model.ae is not None else set()
        if "lm_head" in offload:
            keep.add(id(llm.get_output_embeddings()))
        _to_device_except(model, device, keep)
        return model.eval()

    def save_folder(self, path: str | os.PathLike, *, max_shard_size: str | int | None = None) -> None:
        """Write the released layout (LLM + tokenizer files, ae_*, vision_head_*, projector).
        ``max_shard_size`` shards the LLM weights (``model-*.safetensors`` + index) as the release does."""
        from .checkpoint import save_safetensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(str(path), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        self.text_tokenizer.save_pretrained(str(path))
        if self.ae is not None:
            save_official_tokenizer(path / AE_WEIGHTS, self.ae)
        head_json = self.config.vision_head_json(self.hidden_size)
        atomic_write(path / HEAD_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(head_json, indent=2)))
        save_safetensors({f"net.{k}": v for k, v in self.vision_head.net.state_dict().items()}, path / HEAD_WEIGHTS)
        save_safetensors(dict(self.projector.state_dict()), path / PROJECTOR_WEIGHTS)


class _TextToImageSource:
    """:class:`~bitdance.sampling.BlockSource` of :class:`BitDanceT2I`: the left-padded text (+ vision start,
    resolution and query tokens) as the prefix, then the fed-back blocks (projector + 2D sin-cos) through the
    LLM with its KV cache (or a full recompute without it); plain 1D positions per row."""

    def __init__(self, model: BitDanceT2I, rows: list[str | None], h: int, w: int, use_kv_cache: bool):
        from transformers import DynamicCache

        self.model, self.P = model, model.config.parallel_num
        dev, self.ldt = model.device, model._llm_dtype()
        inp = model.build_inputs(rows, h, w)
        self.Lp = inp.num_causal
        T = self.Lp + self.P * ((h * w) // self.P)  # the last image block is never fed back
        valid = torch.cat([inp.valid, torch.ones(len(rows), T - inp.valid.shape[1], dtype=torch.bool)], 1).to(dev)
        self.positions = model.position_ids(valid)
        self.mask = _additive(t2i_attention_mask(valid, self.Lp, self.P), self.ldt)
        self.pos_embed = model.image_pos_embed(h, w).to(dev)
        self.embeds = model.llm.get_input_embeddings()(inp.input_ids.to(dev))  # (R, Lp + P, hidden)
        self.cache = DynamicCache(config=model.llm.config) if use_kv_cache else None
        self.head_dtype = model.vision_head.net.cond_embed.weight.dtype

    def _condition(self, block: int) -> torch.Tensor:
        """LLM outputs of the P positions that predict ``block``, plus that block's 2D position embedding."""
        end = self.Lp + self.P * (block + 1)
        start = (0 if block == 0 else end - self.P) if self.cache is not None else 0
        x = self.embeds if self.cache is None or block == 0 else self.embeds[:, -self.P:]
        hid = self.model.llm.model(inputs_embeds=x.to(self.ldt), attention_mask=self.mask[:, :, start:end, :end],
                                   position_ids=self.positions[:, start:end], past_key_values=self.cache,
                                   use_cache=self.cache is not None).last_hidden_state[:, -self.P:]
        blk_pos = self.pos_embed[block * self.P:(block + 1) * self.P]
        return (hid.float() + blk_pos).to(self.head_dtype)

    def first(self) -> torch.Tensor:
        return self._condition(0)

    def next(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        fed = self.model.embed_image_tokens(tokens, self.pos_embed[block * self.P:(block + 1) * self.P])
        self.embeds = fed if self.cache is not None else torch.cat([self.embeds, fed.to(self.embeds.dtype)], 1)
        return self._condition(block + 1)


OFFLOADABLE = ("ae", "lm_head")


def _check_head_header(path: Path, head_json: dict[str, Any], config: T2IConfig) -> None:
    """vision_head_config.json against the head's safetensors header, before anything is built."""
    shapes = safetensors_shapes(path / HEAD_WEIGHTS)
    net = {k[len("net."):]: torch.empty(v, device="meta") for k, v in shapes.items() if k.startswith("net.")}
    try:
        found = infer_head_config(net, head_dim=config.head_dim)
    except CheckpointError:
        return  # not the layout sizes can be read from; load_into's full check still runs
    pairs = [("ch_latent", config.head_width, found.width), ("depth_latent", config.head_depth, found.depth),
             ("depth_adanln", config.head_adaln, found.adaln_blocks), ("ch_target", config.latent_dim, found.in_channels)]
    if "ch_cond" in head_json:
        pairs.append(("ch_cond", head_json["ch_cond"], found.cond_channels))
    for key, stated, in_file in pairs:
        if stated != in_file:
            raise CheckpointError(f"{path / HEAD_CONFIG}: {key} = {stated!r} but {HEAD_WEIGHTS} has {key} = {in_file}")


def check_offload(offload: Sequence[str]) -> tuple[str, ...]:
    """``offload`` as a tuple of OFFLOADABLE names, or a ValueError (a bare string is a mistake: it would
    split into characters)."""
    if isinstance(offload, str) or any(o not in OFFLOADABLE for o in offload):
        raise ValueError(f"offload takes a list of {' and/or '.join(map(repr, OFFLOADABLE))}, got {offload!r}")
    return tuple(offload)


def _to_device_except(module: nn.Module, device, keep: set[int]) -> None:
    """Move ``module`` to ``device`` leaving the submodules whose id() is in ``keep`` where they are, without
    ever moving those (so they never take device memory, not even briefly)."""
    if device is None:
        return
    if id(module) in keep:
        return
    if not any(id(m) in keep for m in module.modules()):
        module.to(device)
        return
    for child in module.children():
        _to_device_except(child, device, keep)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        module._buffers[name] = b.to(device)


def _check_folder(path: Path, need_ae: bool) -> None:
    """CheckpointError naming the first missing file of the released layout."""
    required = ["config.json", HEAD_CONFIG, HEAD_WEIGHTS, PROJECTOR_WEIGHTS] + ([AE_CONFIG, AE_WEIGHTS] if need_ae else [])
    for name in required:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name} (not a BitDance text-to-image folder)")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        for s in shards:
            if not (path / s).is_file():
                raise CheckpointError(f"{path}: missing {s} (listed in model.safetensors.index.json)")
    elif not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: missing model.safetensors (or model.safetensors.index.json + shards)")
    if not any((path / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        raise CheckpointError(f"{path}: missing tokenizer.json (the Qwen text tokenizer files)")


# --------------------------------------------------------------------------------------------
# Training: packed variable-length sequences, loss, 16x -> 64x distillation
# --------------------------------------------------------------------------------------------
IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """Several (prompt, latents) samples packed into one row (batch dim 1) of length T.

    Image inputs are kept as tokens (not embeddings) so that :func:`training_loss` can perturb them
    before :func:`packed_embeddings` projects them. ``cond_index`` / ``targets`` / ``target_pos_embed``
    are ordered sample by sample, block by block, so they reshape to (num_blocks, P, ...).
    """

    input_ids: torch.Tensor  # (1, T) text / special ids; image positions hold the pad id (unused)
    image_index: torch.Tensor  # (N_in,) sequence positions of the fed image tokens
    image_tokens: torch.Tensor  # (N_in, d) clean fed tokens in {-1,+1}
    image_pos_embed: torch.Tensor  # (N_in, hidden) 2D sin-cos of the fed tokens' own positions
    mask: torch.Tensor  # (1, T, T) bool, True = may attend
    position_ids: torch.Tensor  # (1, T) RoPE positions restarting at 0 for each sample
    labels: torch.Tensor  # (1, T) next-token text targets, IGNORE_INDEX elsewhere
    cond_index: torch.Tensor  # (M,) positions whose hidden states condition the head
    targets: torch.Tensor  # (M, d) clean tokens to predict
    target_pos_embed: torch.Tensor  # (M, hidden) 2D sin-cos of the predicted positions
    sample_ids: torch.Tensor  # (T,) sample index of each position
    dropped: list[bool]  # per sample: True if the prompt was replaced by the unconditional form
    grids: list[tuple[int, int]]  # per sample (h, w) token grid


def pack_batch(model: BitDanceT2I, samples: Sequence[tuple[str, torch.Tensor]], *, text_dropout: float = 0.1,
               generator: torch.Generator | None = None) -> PackedBatch:
    """Pack (prompt, latents (d, h, w) in {-1,+1}) samples of possibly different resolutions into one row.

    Each sample contributes its text (with probability ``text_dropout`` the unconditional form, drawn with
    ``generator``), ``<|vision_start|>``, ``<|res_h|>``, the first block ``[<|res_w|>, queries]`` and its
    image tokens in patch-wise order except the last block (which is only predicted). The mask is
    (causal OR same image block) AND same sample; RoPE positions restart at 0 for each sample. Text
    labels: next-token targets inside the chat-formatted conditional text (``<|im_start|>user`` ...
    ``assistant\\n``); dropped (unconditional) samples have no text targets.
    """
    cfg = model.config
    P, d = cfg.parallel_num, cfg.latent_dim
    pad = model.text_tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    ids, labels, pos_ids, sids, blk_ids = [], [], [], [], []
    img_idx, img_tok, img_pe, cond_idx, tgt, tgt_pe = [], [], [], [], [], []
    dropped, grids = [], []
    offset = 0
    next_blk = 0  # global block counter (text positions get a block of their own)
    for s, (prompt, lat) in enumerate(samples):
        if lat.dim() != 3 or lat.shape[0] != d:
            raise ValueError(f"sample {s}: latents must be (d={d}, h, w), got {tuple(lat.shape)}")
        h, w = int(lat.shape[1]), int(lat.shape[2])
        cfg.check_resolution(h * cfg.down_factor, w * cfg.down_factor)
        drop = text_dropout > 0 and float(torch.rand((), generator=generator)) < text_dropout
        text = model._text_ids(model.prompt_text(None if drop else prompt))
        prefix = text + [model._token_ids[VISION_START], model._token_ids[res_token(h)]]
        Lp = len(prefix)
        n_blocks = (h * w) // P
        L = Lp + P * n_blocks
        seq = prefix + model.first_block_ids(w) + [pad] * (P * (n_blocks - 1))
        lab = [IGNORE_INDEX] * L
        if not drop:
            for j in range(len(text) - 1):
                lab[j] = text[j + 1]
        ids += seq
        labels += lab
        pos_ids += list(range(L))
        sids += [s] * L
        blk_ids += list(range(next_blk, next_blk + Lp))
        blk_ids += [next_blk + Lp + i // P for i in range(P * n_blocks)]
        next_blk += Lp + n_blocks

        order = generation_order(h, w, cfg.patch_size)
        tokens = lat.reshape(d, h * w).t()[order]  # (h*w, d) generation order
        pe = model.image_pos_embed(h, w)
        start_img = offset + Lp + P
        img_idx.append(torch.arange(start_img, offset + L))
        img_tok.append(tokens[:-P])
        img_pe.append(pe[:-P])
        cond_idx.append(torch.arange(offset + Lp, offset + L))
        tgt.append(tokens)
        tgt_pe.append(pe)
        dropped.append(drop)
        grids.append((h, w))
        offset += L
    if not grids:
        raise ValueError("no samples")
    sid = torch.tensor(sids)
    blk = torch.tensor(blk_ids)
    mask = block_mask(blk) & (sid[None, :] == sid[:, None])  # packed samples never see each other
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long), image_index=torch.cat(img_idx),
        image_tokens=torch.cat(img_tok).float(), image_pos_embed=torch.cat(img_pe), mask=mask[None],
        position_ids=torch.tensor([pos_ids], dtype=torch.long), labels=torch.tensor([labels], dtype=torch.long),
        cond_index=torch.cat(cond_idx), targets=torch.cat(tgt).float(), target_pos_embed=torch.cat(tgt_pe),
        sample_ids=sid, dropped=dropped, grids=grids)


def packed_embeddings(model: BitDanceT2I, packed: PackedBatch, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(1, T, hidden) LLM inputs: text embeddings, with the image positions replaced by
    projector(tokens) + their 2D sin-cos (``image_tokens`` overrides ``packed.image_tokens``, e.g. flipped)."""
    dev = model.device
    emb = model.llm.get_input_embeddings()(packed.input_ids.to(dev))
    toks = packed.image_tokens if image_tokens is None else image_tokens
    if toks.shape[0] == 0:
        return emb
    img = model.embed_image_tokens(toks.to(dev), packed.image_pos_embed.to(dev)).to(emb.dtype)
    idx = packed.image_index.to(dev)
    return emb.index_copy(1, idx, img[None])


def packed_head_condition(model: BitDanceT2I, packed: PackedBatch,
                          image_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM forward over the packed row -> (head condition (M, hidden) = hidden state + 2D sin-cos of the
    predicted position, the full last hidden state (1, T, hidden))."""
    dev, ldt = model.device, model._llm_dtype()
    embeds = packed_embeddings(model, packed, image_tokens)
    hid = model.llm.model(inputs_embeds=embeds.to(ldt), attention_mask=_additive(packed.mask.to(dev), ldt),
                          position_ids=packed.position_ids.to(dev), use_cache=False).last_hidden_state
    cond = hid[0, packed.cond_index.to(dev)].float() + packed.target_pos_embed.to(dev)
    return cond, hid


def training_loss(model: BitDanceT2I, packed: PackedBatch, *, text_weight: float = 0.01, perturb_rate: float = 0.1,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Vision loss (head velocity MSE, per block of P) + ``text_weight`` x text cross-entropy.

    Bit flips (r1 < perturb_rate * r2) apply to the fed image tokens only; the head targets stay clean.
    The head's time distribution comes from the config (``P_mean`` / ``P_std``; -0.8 / 0.8 in training).
    """
    P, d = model.config.parallel_num, model.config.latent_dim
    dev = model.device
    toks = flip_bits(packed.image_tokens.to(dev), perturb_rate, generator=generator) if perturb_rate > 0 \
        else packed.image_tokens.to(dev)
    cond, hid = packed_head_condition(model, packed, toks)
    head_dtype = model.vision_head.net.cond_embed.weight.dtype
    cond = cond.to(head_dtype).view(-1, P, cond.shape[-1])
    targets = packed.targets.to(dev).view(-1, P, d)
    vision = model.vision_head.loss(targets, cond, generator=generator)
    labels = packed.labels.to(dev)
    # Next-token targets live at the position *before* the target token: labels[j] = ids[j + 1].
    sel = labels[0] != IGNORE_INDEX
    if bool(sel.any()):
        logits = model.llm.lm_head(hid[0, sel]).float()
        text = F.cross_entropy(logits, labels[0, sel])
    else:
        text = vision.new_zeros(())
    loss = vision + text_weight * text
    logs = {"loss": float(loss.detach()), "vision": float(vision.detach()), "text": float(text.detach()),
            "num_image_tokens": int(targets.shape[0] * P), "num_text_targets": int(sel.sum())}
    return loss, logs


def distill_from(model16: BitDanceT2I, *, parallel_num: int = 64, **config_overrides) -> BitDanceT2I:
    """A model with ``parallel_num`` tokens per step inheriting every weight of ``model16`` (LLM, projector,
    vision head, image tokenizer; all copied, ``model16`` is left unchanged).

    The head's weights do not depend on P. Missing ``<|query_i|>`` tokens are added to (a copy of) the
    tokenizer and the embeddings are resized; each new query embedding (and, for an untied LM head, its
    output row) is initialised to the **mean of the existing query embeddings** ``<|query_1|>`` ..
    ``<|query_{P_old-1}|>`` (the new tokens start as an "average query"; RoPE positions tell them apart).
    ``config_overrides`` set other T2IConfig fields (e.g. ``resolutions``). Fine-tune with more
    :func:`training_loss` steps.
    """
    import copy
    from dataclasses import replace

    old_cfg = model16.config
    cfg = replace(old_cfg, parallel_num=parallel_num, **config_overrides)
    tok = copy.deepcopy(model16.text_tokenizer)
    llm = copy.deepcopy(model16.llm)
    add_special_tokens(tok, parallel_num, cfg.max_res_tokens)
    old_ids = [model16._token_ids[query_token(i)] for i in range(1, old_cfg.parallel_num)]
    emb = llm.get_input_embeddings()
    if len(tok) > emb.num_embeddings:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
    vocab = tok.get_vocab()
    new_ids = [vocab[query_token(i)] for i in range(old_cfg.parallel_num, parallel_num)]
    with torch.no_grad():
        tables = [llm.get_input_embeddings().weight]
        out = llm.get_output_embeddings()
        if out is not None and out.weight is not tables[0]:
            tables.append(out.weight)
        for W in tables:
            if old_ids:
                init = W[old_ids].float().mean(0).to(W.dtype)
            else:  # P_old = 1: no query tokens to copy from
                init = W.float().mean(0).to(W.dtype)
            W[new_ids] = init
    ae = copy.deepcopy(model16.ae) if model16.ae is not None else None
    new = BitDanceT2I(llm, tok, cfg, ae=ae)
    new.projector.load_state_dict(model16.projector.state_dict())
    new.vision_head.load_state_dict(model16.vision_head.state_dict())
    p = next(model16.projector.parameters())
    new.projector.to(device=p.device, dtype=p.dtype)
    hp = next(model16.vision_head.parameters())
    new.vision_head.to(device=hp.device, dtype=hp.dtype)
    return new.train(model16.training)
