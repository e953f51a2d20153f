"""Class-conditional next-patch BitDance: the autoregressive transformer and its binary diffusion head.

One AR step predicts a p x p patch of P = p^2 binary tokens:

    sequence  = [cls_token_num class tokens][P-1 query tokens][tokens 0 .. N-P-1]
    attention = causal over the first cls_token_num-1 positions, then blocks of P positions that see
                each other and everything before (block-causal)
    outputs   = the last N positions; output k conditions the head that samples token k

Tokens are generated in patch-wise raster order (patches in raster order, raster inside a patch).
P = 1 is the plain next-token model with the MLP head; P > 1 uses the transformer head that models
the P tokens of a patch jointly. Parameter names follow the official checkpoints.

Ablations (config fields): ``block_attention="causal"`` replaces the block-causal mask by a plain causal
mask (a position of a block sees the earlier positions of its block, not the later ones), in training
and generation alike; ``head_type="bitwise" | "token"`` replaces the diffusion head by a classification
head (see :mod:`bitdance.models.head`); ``order="raster"`` generates tokens in plain raster order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bitdance import rng
from bitdance.compiling import FrozenCompiled, kv_attention_fits, kv_attention_kernel
from bitdance.models.config import BitDanceConfig
from bitdance.models.head import attention, build_head
from bitdance.models.quantized import linear_dtype
from bitdance.sampling import KnownTokens, block_causal_mask, generate_blocks
from bitdance.sampling.flow import FlowSampler

__all__ = ["BitDance", "KVCache", "generation_order", "block_causal_mask", "rope_2d", "flip_bits"]


# --------------------------------------------------------------------------------------------
# Token order, mask, rotary embedding
# --------------------------------------------------------------------------------------------
def generation_order(h: int, w: int, p: int, order: str = "patch") -> torch.Tensor:
    """perm[n] = raster index (row * w + col) of the n-th generated token."""
    idx = torch.arange(h * w).view(h, w)
    if order == "raster" or p == 1:
        return idx.flatten()
    if order != "patch":
        raise ValueError(f"unknown token order {order!r}")
    return idx.view(h // p, p, w // p, p).permute(0, 2, 1, 3).flatten()


def rope_2d(coords: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, head_dim/2) for 2D coordinates (L, 2) = (x, y).

    head_dim/4 frequencies f_j = base^(-2j / (head_dim/2)); angles [x*f | y*f]; pair (2m, 2m+1) of a
    head is rotated by angle m.
    """
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half)
    ang = (coords.float()[:, :, None] * freqs).flatten(1)  # (L, 2*k) = [x*f..., y*f...]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D); cos/sin (L, D/2)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # not unflatten: dynamo can't trace it under PaddedProducts
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2).type_as(x)


def flip_bits(x: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bit-flip perturbation of input tokens: flip where r1 < rate * r2 (expected flip rate rate/2)."""
    if rate <= 0:
        return x
    r1 = rng.rand(x.shape, generator=generator, device=x.device)
    r2 = rng.rand(x.shape, generator=generator, device=x.device)
    return torch.where(r1 < rate * r2, -x, x)


# --------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------
class KVCache:
    """Static, preallocated key/value cache for all layers: (layers, B, heads, max_len, head_dim).

    ``dense``: a decoded block's queries see every position up to the block's end (their attention-mask rows
    are all True there: block-wise attention, or one token per block), so the cached step may attend
    without the mask."""

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, *, device=None, dtype=torch.float32,
                 dense: bool = False):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.dense = dense
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new keys/values of ``layer`` at positions start.., returning the filled part."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                      cache_v: torch.Tensor, layer: int, positions: torch.Tensor, mask: torch.Tensor,
                      dense: bool) -> torch.Tensor:
    """Write the block's keys/values of ``layer`` into the whole-model cache at ``positions`` (consecutive:
    one block) and attend over the cache under ``mask`` (the mask rows of those positions). ``dense``: those
    rows are True everywhere up to the block's end (block-wise attention, or P = 1; :class:`KVCache`).

    One opaque operation for the compiled decode step: written as tensor code inside a graph, the write
    into the cache (a graph input) made inductor copy each layer's whole cache out and back at every step
    (functionalisation: on B-1x 130 of the 210 ms a step took), and the attention over it ran as
    repacked small products. Here the write stays in place and the attention is torch's fused kernel. (Where
    :func:`~bitdance.compiling.kv_attention_fits`, the compiled step calls ``bitdance::kv_attention`` of
    :mod:`bitdance.kernels` instead: the same write and attention in C++, without this function's Python.)

    On CPUs, where a host sync costs nothing, only the filled part of the cache is attended over (half of it
    on average: the reads are the cost), without the mask where ``dense`` (the kernel's masked path is slower:
    B-16x's step, 450 against 480 us per layer; AVX2 forced, cache in L3), and the write is a copy into the
    block's slice. This function runs 24 times per B-1x step around a 180-390 us kernel, so it does as little
    as it can: with an ``index_copy_`` per cache and a check of the mask rows, a B-1x image took 3-5% more time
    (median of 4 alternating rounds, one process, two such comparisons; AVX2 forced, 2 cores; B-16x, with 16
    times fewer steps, measured the same either way)."""
    if q.device.type != "cpu":
        ck, cv = cache_k[layer], cache_v[layer]
        ck.index_copy_(2, positions, k)
        cv.index_copy_(2, positions, v)
    else:
        n = k.shape[2]
        end = positions.tolist()[0] + n
        ck, cv = cache_k.select(0, layer).narrow(2, 0, end), cache_v.select(0, layer).narrow(2, 0, end)
        ck.narrow(2, end - n, n).copy_(k)
        cv.narrow(2, end - n, n).copy_(v)
        mask = None if dense else mask[:, :end]
    out = attention(q, ck, cv, mask)
    # in the layout of q, which the fake implementation promises the compiled graph: the fused kernel returns
    # it, attention's other paths (bf16 over up to 128 keys, fp32 over a few) a contiguous tensor, and the
    # compiled step then failed its layout check at its first call in bf16 on every CPU. Where the two agree
    # (fp32 over more keys: every step of B-16x) nothing is copied.
    return out if out.stride() == q.stride() else torch.empty_like(q).copy_(out)


# Registered with torch.library's low-level API: a call then costs a few microseconds over the function,
# against 50 us through ``torch.library.custom_op``'s wrapper (hot, 2 cores), which a B-1x image pays on each
# of its 24 layers x 256 steps. The schema marks the two caches as written in place.
_LIBRARY = torch.library.Library("bitdance", "DEF")
_LIBRARY.define("cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, "
                "int layer, Tensor positions, Tensor mask, bool dense) -> Tensor")
_LIBRARY.impl("cached_attention", _cached_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("bitdance::cached_attention")
def _cached_attention_shape(q, k, v, cache_k, cache_v, layer, positions, mask, dense):
    return torch.empty_like(q)


cached_attention = torch.ops.bitdance.cached_attention.default


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        B, L, D = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if isinstance(start, torch.Tensor):  # the compiled step: positions as a tensor, one graph for all steps
            if kv_attention_fits(q, cache.dense) and kv_attention_kernel():
                o = torch.ops.bitdance.kv_attention(q, k, v, cache.k, cache.v, layer, start)
            else:
                o = cached_attention(q, k, v, cache.k, cache.v, layer, start, mask, cache.dense)
        else:
            if cache is not None:
                k, v = cache.update(layer, start, k, v)
            o = attention(q, k, v, mask)
        return self.wo(o.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = int(2 * 4 * dim / 3)
        hidden = -(-hidden // 256) * 256  # round up to a multiple of 256
        self.w1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, dim: int, n_head: int, drop: float = 0.0):
        super().__init__()
        self.attention = Attention(dim, n_head)
        self.feed_forward = FeedForward(dim)
        self.attention_norm = nn.RMSNorm(dim, eps=1e-6)
        self.ffn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(drop)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0, start=0):
        x = x + self.drop(self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start))
        return x + self.drop(self.feed_forward(self.ffn_norm(x)))


class MLPConnector(nn.Module):
    """Embeds binary tokens: SwiGLU MLP (with biases) from d bits to the model width."""

    def __init__(self, cin: int, dim: int, drop: float = 0.0):
        super().__init__()
        hidden = int(1.5 * dim)
        self.w1 = nn.Linear(cin, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.drop(self.w2(F.silu(a) * b))


class Conditioning(NamedTuple):
    cond: torch.Tensor  # (B, N, dim): head condition of every token, generation order
    target: torch.Tensor  # (B, N, C): clean tokens, generation order


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class BitDance(nn.Module):
    """Class-conditional BitDance generator (the tokenizer is a separate module)."""

    def __init__(self, config: BitDanceConfig):
        super().__init__()
        self.config = cfg = config
        P, dim = cfg.parallel_num, cfg.dim
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.cls_token_num * dim)  # last row: null
        self.query_token = nn.Parameter(torch.randn(1, P - 1, dim) * 0.02) if P > 1 else None
        self.proj_in = MLPConnector(cfg.latent_dim, dim, cfg.drop_rate)
        self.emb_norm = nn.RMSNorm(dim, eps=1e-6)
        self.layers = nn.ModuleList([Block(dim, cfg.n_head, cfg.drop_rate) for _ in range(cfg.n_layer)])
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.pos_for_diff = nn.Embedding(cfg.num_tokens, dim)  # one row per generation position
        self.head = build_head(cfg.head)  # DiffusionHead unless an ablation head is configured

        g = cfg.grid_size
        order = generation_order(g, g, cfg.patch_size, cfg.order)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse_order", torch.argsort(order), persistent=False)
        # Image token (row, col) sits at (x, y) = (col + 1.5, row + 1.5); class/query tokens at 0.
        rc = torch.stack([order % g, order // g], dim=1).float() + 1.5
        coords = torch.cat([torch.zeros(cfg.cls_token_num + P - 1, 2), rc])[:-P]
        cos, sin = rope_2d(coords, dim // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # plain causal everywhere, or (official) the P positions of a block see each other
        num_causal, block = (self.seq_len, 1) if cfg.block_attention == "causal" else (cfg.cls_token_num - 1, P)
        self.register_buffer("attn_mask", block_causal_mask(self.seq_len, num_causal, block), persistent=False)
        # Whether each decoded block's queries see every position up to the block's end (then the cached step
        # attends without the mask): read off the mask once (on the CPU, whatever device the model is built
        # on), so the step never checks it.
        mask = block_causal_mask(self.seq_len, num_causal, block, device="cpu")
        rows = torch.arange(self.prefix_len, self.seq_len, device="cpu")
        ends = self.prefix_len + ((rows - self.prefix_len) // P + 1) * P
        self._dense_blocks = bool((mask[rows] | (torch.arange(self.seq_len, device="cpu") >= ends[:, None])).all())
        self._compiled_decode: FrozenCompiled | None = None
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Positions fed to the transformer in training: cls_token_num + N - 1."""
        return self.config.cls_token_num + self.config.num_tokens - 1

    def _kv_cache(self, rows: int, device=None) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layer, rows, cfg.n_head, self.seq_len, cfg.dim // cfg.n_head, device=device,
                       dtype=linear_dtype(self.proj_in.w1), dense=self._dense_blocks)

    def kv_cache_bytes(self, rows: int) -> int:
        """Size of the KV cache :meth:`generate` allocates for ``rows`` sequences (2 per image with guidance)."""
        return self._kv_cache(rows, device="meta").nbytes

    @property
    def prefix_len(self) -> int:
        return self.config.cls_token_num + self.config.parallel_num - 1

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        self.head.net.initialize_weights()

    def no_weight_decay_names(self) -> set[str]:
        """Parameters trained without weight decay: norms, biases, embeddings, query tokens."""
        out = set()
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.startswith(("cls_embedding", "proj_in", "query_token", "pos_for_diff")):
                out.add(name)
        return out

    # ----------------------------------------------------------------------------------------
    def to_sequence(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, N, C) tokens in generation order."""
        cfg = self.config
        B, C, h, w = latents.shape
        if C != cfg.latent_dim or h != cfg.grid_size or w != cfg.grid_size:
            raise ValueError(f"expected latents (B, {cfg.latent_dim}, {cfg.grid_size}, {cfg.grid_size}), "
                             f"got {tuple(latents.shape)}")
        return latents.flatten(2).transpose(1, 2)[:, self.order]

    def from_sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens in generation order -> (B, C, h, w) latents."""
        g = self.config.grid_size
        return tokens[:, self.inverse_order].transpose(1, 2).reshape(tokens.shape[0], -1, g, g)

    def _class_prefix(self, class_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if class_ids.dim() != 1:
            raise ValueError(f"class ids must be a 1-D tensor, got shape {tuple(class_ids.shape)}")
        if class_ids.numel() and (int(class_ids.min()) < 0 or int(class_ids.max()) > cfg.num_classes):
            raise ValueError(f"class ids must be in [0, {cfg.num_classes - 1}] "
                             f"({cfg.num_classes} = the null class), got {class_ids.tolist()}")
        x = self.cls_embedding(class_ids).view(len(class_ids), cfg.cls_token_num, cfg.dim)
        if self.query_token is not None:
            x = torch.cat([x, self.query_token.expand(len(class_ids), -1, -1).to(x.dtype)], dim=1)
        return x

    def _transformer(self, x, start: int, mask, cache: KVCache | None = None) -> torch.Tensor:
        end = start + x.shape[1]
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.emb_norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        return x

    def _decode_block(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Head condition of the next block from the previous block's tokens (R, P, C) at sequence
        ``positions`` (P,), with the KV cache; every shape is the same at every AR step (the cache write and the
        attention under the training mask's rows are one opaque op, :func:`cached_attention`), so that one
        compiled graph serves them all."""
        P = self.config.parallel_num
        x = self.emb_norm(self.proj_in(tokens.to(linear_dtype(self.proj_in.w1))))
        cos, sin, mask = self.rope_cos[positions], self.rope_sin[positions], self.attn_mask[positions]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, positions)
        return self.norm(x) + self.pos_for_diff.weight[positions - (self.prefix_len - P)]

    def compile_sampling(self, *, mode: str | None = None, dynamic: bool = False,
                         transformer: bool | None = None, whole_flow: bool = False) -> None:
        """``torch.compile`` what :meth:`generate` repeats: the diffusion head's sampler update
        (:meth:`~bitdance.models.head.DiffusionHead.compile_sampling`; on CPUs with the weights frozen into the
        graph, inductor's C++ GEMM templates for few-row products and oneDNN's for fp32 calls of 32 rows or more,
        see :mod:`bitdance.compiling`) and the transformer's KV-cached step as one graph (``transformer``; by
        default on CPUs, where it measured 1.5-4x faster than eager for B-16x..B-1x, and not on GPUs, where it
        is not measured yet). Compiled once per batch size (once for all fp32 batches of 32 rows or more), at
        the first ``generate``; the tokens stay those of the eager code up to float rounding.
        ``whole_flow``: the head's whole flow loop of an AR step as one graph (faster sampling, much longer
        first compilation; see :meth:`~bitdance.models.head.DiffusionHead.compile_sampling`).
        ``mode="off"`` undoes it."""
        if hasattr(self.head, "compile_sampling"):
            self.head.compile_sampling(mode=mode, dynamic=dynamic, whole_flow=whole_flow)
        if transformer is None:
            transformer = self.norm.weight.device.type == "cpu"
        self._compiled_decode = None if mode == "off" or not transformer else \
            FrozenCompiled(BitDance._decode_block, self, mode=mode, dynamic=dynamic)

    @contextlib.contextmanager
    def eager_sampling(self) -> Iterator[None]:
        """Within the block, :meth:`generate` runs the eager code even where it is compiled (e.g. so that
        ``FlopCounterMode`` sees every operation)."""
        decode = self._compiled_decode
        head = self.head.eager_sampling() if hasattr(self.head, "eager_sampling") else contextlib.nullcontext()
        try:
            self._compiled_decode = None
            with head:
                yield
        finally:
            self._compiled_decode = decode

    def condition(self, latents: torch.Tensor, class_ids: torch.Tensor, *,
                  generator: torch.Generator | None = None) -> Conditioning:
        """Teacher-forced pass: the head condition for every token. In training mode, input tokens get
        the bit-flip perturbation and class labels are dropped to the null class (for guidance)."""
        cfg = self.config
        target = self.to_sequence(latents).float()
        x = target[:, : cfg.num_tokens - cfg.parallel_num]
        if self.training:
            x = flip_bits(x, cfg.perturb_rate, generator)
            if cfg.class_dropout_prob > 0:
                drop = rng.rand(class_ids.shape, generator=generator, device=class_ids.device)
                class_ids = torch.where(drop < cfg.class_dropout_prob, cfg.num_classes, class_ids)
        dtype = linear_dtype(self.proj_in.w1)
        x = torch.cat([self._class_prefix(class_ids), self.proj_in(x.to(dtype))], dim=1)
        h = self._transformer(x, 0, self.attn_mask)
        h = self.norm(h[:, -cfg.num_tokens:]) + self.pos_for_diff.weight
        return Conditioning(h, target)

    def forward(self, latents: torch.Tensor, class_ids: torch.Tensor, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Training loss for binary latents (B, C, h, w) in {-1,+1} and class ids (B,)."""
        cfg = self.config
        cond, target = self.condition(latents, class_ids, generator=generator)
        P = cfg.parallel_num
        cond = cond.reshape(-1, P, cond.shape[-1])
        target = target.reshape(-1, P, target.shape[-1])
        if cfg.head_type == "diffusion":  # several noise draws per condition; a classification loss is
            # deterministic, so repeating its rows would only repeat the same terms
            cond = cond.repeat(cfg.diff_batch_mul, 1, 1)
            target = target.repeat(cfg.diff_batch_mul, 1, 1)
        return self.head.loss(target, cond, generator=generator)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        class_ids: torch.Tensor,
        *,
        sampler: FlowSampler | None = None,
        guidance_scale: float = 1.0,
        guidance_schedule: str = "linear",
        generator: torch.Generator | None = None,
        use_kv_cache: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        known: KnownTokens | None = None,
    ) -> torch.Tensor:
        """Sample binary latents (B, C, h, w) for class ids (B,), P tokens per AR step.

        Guidance runs the conditional and null-class sequences as one batch; at AR steps where the
        (scheduled) scale is 1, both halves are sampled independently, as in the reference sampler.
        ``callback(step, num_steps, latents_so_far)`` gets the partial grid (ungenerated tokens 0).
        ``temperature`` / ``top_k`` apply to the classification heads (``head_type`` "bitwise": temperature;
        "token": both); the diffusion head uses ``sampler`` instead and refuses them. ``known``: the tokens
        an edit keeps (:class:`~bitdance.sampling.autoregressive.KnownTokens`).
        """
        cfg = self.config
        if cfg.head_type == "diffusion":
            if temperature != 1.0 or top_k is not None:
                raise ValueError("temperature and top_k apply to the classification heads "
                                 "(head_type='bitwise' or 'token'); the diffusion head is sampled by `sampler`")
            head_kw = {}
        else:
            head_kw = {"temperature": temperature, "top_k": top_k}
        ids = class_ids.to(self.cls_embedding.weight.device).long()
        if guidance_scale > 1.0:  # the null-class sequences, in the same batch
            ids = torch.cat([ids, torch.full_like(ids, cfg.num_classes)])
        source = _ClassConditionalSource(self, ids, use_kv_cache)
        return generate_blocks(source, self.head, batch=len(class_ids), grid=(cfg.grid_size, cfg.grid_size),
                               order=self.order, parallel_num=cfg.parallel_num, latent_dim=cfg.latent_dim,
                               sampler=sampler or FlowSampler(), guidance_scale=guidance_scale,
                               guidance_schedule=guidance_schedule, generator=generator, callback=callback,
                               head_kwargs=head_kw, device=ids.device, known=known)


class _ClassConditionalSource:
    """:class:`~bitdance.sampling.BlockSource` of :class:`BitDance`: class tokens (+ P-1 query tokens) as
    the prefix, then the fed-back blocks; the KV cache (or a full recompute without it, for checks) and,
    when compiled, the cached step as one graph."""

    def __init__(self, model: BitDance, ids: torch.Tensor, use_kv_cache: bool):
        cfg = model.config
        self.model, self.P = model, cfg.parallel_num
        self.prefix = model._class_prefix(ids)
        self.cache = model._kv_cache(len(ids), device=self.prefix.device) if use_kv_cache else None
        self.compiled = model._compiled_decode if self.cache is not None else None
        if self.compiled is not None:
            self.compiled.refresh()
        # every fed block, kept only for the recompute path (without a cache nothing else remembers them)
        self.fed = None if use_kv_cache else torch.zeros(len(ids), cfg.num_tokens, cfg.latent_dim,
                                                         device=self.prefix.device)
        self.causal = cfg.block_attention == "causal"

    def _condition(self, x: torch.Tensor, start: int, mask, done: int) -> torch.Tensor:
        m = self.model
        h = m._transformer(x, start, mask, self.cache)
        return m.norm(h[:, -self.P:]) + m.pos_for_diff.weight[done: done + self.P]

    def first(self) -> torch.Tensor:
        m = self.model
        return self._condition(self.prefix, 0, m.attn_mask[: m.prefix_len, : m.prefix_len], 0)

    def next(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        m, P = self.model, self.P
        done = (block + 1) * P
        start = m.prefix_len + done - P
        if self.compiled is not None:
            positions = torch.arange(start, start + P, device=tokens.device)
            return self.compiled(tokens, positions, self.cache)
        dtype = linear_dtype(m.proj_in.w1)
        if self.cache is not None:  # feed only the new block; it sees the whole cache (causal: not its later positions)
            mask = m.attn_mask[start: start + P, : start + P] if self.causal else None
            return self._condition(m.proj_in(tokens.to(dtype)), start, mask, done)
        self.fed[:, done - P: done] = tokens
        x = torch.cat([self.prefix, m.proj_in(self.fed[:, :done].to(dtype))], dim=1)
        return self._condition(x, 0, m.attn_mask[: x.shape[1], : x.shape[1]], done)
