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

The released folder layout is read and written by :mod:`bitdance.formats.t2i_folder` (``load_folder`` /
``save_folder``); training (packed batches, the loss, distillation) is :mod:`bitdance.training.t2i_packing`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitdance.models.config import ConfigError, T2IConfig
from bitdance.models.head import DiffusionHead
from bitdance.models.quantized import linear_dtype
from bitdance.models.transformer import generation_order
from bitdance.sampling import KnownTokens, block_causal_mask, generate_blocks
from bitdance.sampling.flow import FlowSampler

__all__ = [
    "BitDanceT2I",
    "Projector",
    "add_special_tokens",
    "additive_mask",
    "query_token",
    "res_token",
    "sincos_1d",
    "sincos_2d",
    "special_tokens",
    "t2i_attention_mask",
]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"



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


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
        return self.fc2(F.gelu(self.fc1(x.to(linear_dtype(self.fc1))), approximate="tanh"))


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
                              f"{missing[:3]}; see bitdance.models.t2i.add_special_tokens")
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

    def text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added, as the authors' code encodes)."""
        return list(self.text_tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_id(self, token: str) -> int:
        """Id of one of the special tokens of :func:`special_tokens`."""
        return self._token_ids[token]

    def prefix_ids(self, prompt: str | None, h: int) -> list[int]:
        """Causal part of one sequence: text, ``<|vision_start|>``, ``<|res_h|>``."""
        t = self._token_ids
        return self.text_ids(self.prompt_text(prompt)) + [t[VISION_START], t[res_token(h)]]

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
        return self.projector(bits) + pos_embed.to(linear_dtype(self.projector.fc2))

    # ---- generation ----
    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, height: int, width: int,
                 sampler: FlowSampler | None = None, guidance_scale: float = 7.5,
                 generator: torch.Generator | None = None, use_kv_cache: bool = True,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 known: KnownTokens | None = None) -> torch.Tensor:
        """Binary latents (B, d, H/16, W/16) in {-1,+1} for the prompts (raster grid layout).

        Guidance: with ``guidance_scale > 1`` the unconditional sequences run in the same batch (rows
        B..2B-1); the head's velocity is guided with a constant scale.
        ``callback(step, num_steps, latents_so_far)`` runs after each AR step with a fresh (B, d, h, w)
        grid whose not-yet-generated tokens are 0 (same contract as :meth:`BitDance.generate`). ``known``:
        the tokens an edit keeps (:class:`~bitdance.sampling.autoregressive.KnownTokens`).
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
                               callback=callback, device=self.device, known=known)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, **kw) -> torch.Tensor:
        """Latents -> images in about [-1, 1] with the folder's binary tokenizer (``ae``)."""
        if self.ae is None:
            raise RuntimeError("this model has no image tokenizer (ae); load a folder with ae.safetensors")
        p = next(self.ae.parameters())  # the ae may be offloaded to the CPU (load_folder(offload=...))
        # ... or visit the device for each decode (sequential offload, bitdance.offload)
        device = getattr(self.ae, "execution_device", None) or p.device
        return self.ae.decode(latents.to(device=device, dtype=p.dtype), **kw)

    # ---- folder I/O: deprecated forwards to bitdance.formats.t2i_folder (removed in 0.3) ----
    # The model does not import the formats package (it sits below it); these look it up when called.
    @classmethod
    def from_folder(cls, path: str | os.PathLike, **kwargs) -> BitDanceT2I:
        """Deprecated: :func:`bitdance.formats.t2i_folder.load_folder` (same options)."""
        warnings.warn("BitDanceT2I.from_folder is deprecated; use bitdance.formats.t2i_folder.load_folder",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module("bitdance.formats.t2i_folder").load_folder(path, **kwargs)

    def save_folder(self, path: str | os.PathLike, **kwargs) -> None:
        """Deprecated: :func:`bitdance.formats.t2i_folder.save_folder` (same options)."""
        warnings.warn("BitDanceT2I.save_folder is deprecated; use bitdance.formats.t2i_folder.save_folder",
                      DeprecationWarning, stacklevel=2)
        importlib.import_module("bitdance.formats.t2i_folder").save_folder(self, path, **kwargs)


@functools.lru_cache(maxsize=1)
def _cache_argument() -> str:
    """transformers 5.x names the KV cache argument ``cache`` (``past_key_values`` warns from 5.2x, and goes)."""
    from transformers import Qwen3Model

    return "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"


class _TextToImageSource:
    """:class:`~bitdance.sampling.BlockSource` of :class:`BitDanceT2I`: the left-padded text (+ vision start,
    resolution and query tokens) as the prefix, then the fed-back blocks (projector + 2D sin-cos) through the
    LLM with its KV cache (or a full recompute without it); plain 1D positions per row."""

    def __init__(self, model: BitDanceT2I, rows: list[str | None], h: int, w: int, use_kv_cache: bool):
        from transformers import DynamicCache

        self.model, self.P = model, model.config.parallel_num
        dev, self.ldt = model.device, model.llm_dtype
        inp = model.build_inputs(rows, h, w)
        self.Lp = inp.num_causal
        T = self.Lp + self.P * ((h * w) // self.P)  # the last image block is never fed back
        valid = torch.cat([inp.valid, torch.ones(len(rows), T - inp.valid.shape[1], dtype=torch.bool)], 1).to(dev)
        self.positions = model.position_ids(valid)
        self.mask = additive_mask(t2i_attention_mask(valid, self.Lp, self.P), self.ldt)
        self.pos_embed = model.image_pos_embed(h, w).to(dev)
        self.embeds = model.llm.get_input_embeddings()(inp.input_ids.to(dev))  # (R, Lp + P, hidden)
        self.cache = DynamicCache(config=model.llm.config) if use_kv_cache else None
        self.head_dtype = linear_dtype(model.vision_head.net.cond_embed)

    def _condition(self, block: int) -> torch.Tensor:
        """LLM outputs of the P positions that predict ``block``, plus that block's 2D position embedding."""
        end = self.Lp + self.P * (block + 1)
        start = (0 if block == 0 else end - self.P) if self.cache is not None else 0
        x = self.embeds if self.cache is None or block == 0 else self.embeds[:, -self.P:]
        hid = self.model.llm.model(inputs_embeds=x.to(self.ldt), attention_mask=self.mask[:, :, start:end, :end],
                                   position_ids=self.positions[:, start:end], **{_cache_argument(): self.cache},
                                   use_cache=self.cache is not None).last_hidden_state[:, -self.P:]
        blk_pos = self.pos_embed[block * self.P:(block + 1) * self.P]
        return (hid.float() + blk_pos).to(self.head_dtype)

    def first(self) -> torch.Tensor:
        return self._condition(0)

    def next(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        fed = self.model.embed_image_tokens(tokens, self.pos_embed[block * self.P:(block + 1) * self.P])
        self.embeds = fed if self.cache is not None else torch.cat([self.embeds, fed.to(self.embeds.dtype)], 1)
        return self._condition(block + 1)
