"""Binary diffusion head.

Instead of a softmax over 2^d codes, a small network models the d bits of a token (or the P tokens of
a patch, jointly) with rectified flow: x-prediction trained with the velocity loss, sampled by
:class:`~bitdance.sampling.flow.FlowSampler`, then projected onto the hypercube with ``sign``.

Two networks share one interface ``net(x_t, t, cond) -> x_pred``:
- :class:`MLPHeadNet`, one token at a time (the 1x models);
- :class:`TransformerHeadNet`, attention over the P tokens of a patch (next-patch models).
Parameter names follow the official checkpoints (``head.net.*``).

For the paper's head ablation, :func:`build_head` also builds two classification heads with the same
interface (``loss(target, cond)``, ``sample(cond, ...)``) and the same trunk, conditioned on the AR
condition only (no time, no noisy input): :class:`BitwiseHead` (d independent Bernoulli logits per
token, Infinity-style) and :class:`TokenHead` (a softmax over all 2^d codes of a token).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bitdance import rng
from bitdance.compiling import FrozenCompiled, rows_of, wide_min_rows
from bitdance.models.config import HeadConfig
from bitdance.models.quantized import linear_dtype
from bitdance.models.quantizer import bits_to_indices, indices_to_bits
from bitdance.sampling.flow import FlowSampler, flow_update, guided_velocity, integrate, time_shift

__all__ = ["attention", "DiffusionHead", "BitwiseHead", "TokenHead", "MLPHeadNet", "TransformerHeadNet", "ClassifierHeadNet",
           "timestep_embedding", "build_head_net", "build_head"]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of 1000*t laid out [cos | sin]; t has any shape, output (*t.shape, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(linear_dtype(self.mlp[0])))


class _SwiGLU(nn.Module):
    """Base for blocks with a SwiGLU MLP stored flat as ``w1`` / ``w2`` (official key layout);
    hidden size int(1.5 * width)."""

    def _init_mlp(self, width: int):
        hidden = int(width * 1.5)
        self.w1 = nn.Linear(width, 2 * hidden)
        self.w2 = nn.Linear(hidden, width)

    def mlp(self, x):
        a, b = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


def _modulate(x, scale, shift):
    return x * (1 + scale) + shift


class MLPBlock(_SwiGLU):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self._init_mlp(width)

    def forward(self, x, scale, shift, gate):
        return x + gate * self.mlp(_modulate(self.norm(x), scale, shift))


# Keys up to which fp32 attention on a CPU is written as broadcasts and sums (see attention): in eager code,
# and in the graph of few rows that torch.compile traces
FEW_KEYS = 4
FEW_KEYS_COMPILED = 16


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (boolean ``mask``: True = attend), except on CPUs with short keys:

    - bf16/fp16, up to 128 keys: torch's fused CPU kernel is about 2x slower than two matmuls (measured on
      the head's P-token attention and the KV-cached steps of small models), so the scores are computed
      explicitly, with the softmax in fp32;
    - fp32, no mask, up to :data:`FEW_KEYS` keys (a 4x head's attention over its patch), or up to
      :data:`FEW_KEYS_COMPILED` (a 16x head's) where ``torch.compile`` traces a call of fewer than
      :func:`~bitdance.compiling.wide_min_rows` rows (batch x queries; the graph of few rows): the products
      are written as broadcasts and sums, which inductor fuses with the layout changes around them into a few
      loops. Compiled, that took 34 us a call against 83 for the fused kernel at 4 keys, and a 16x image of
      one unguided sequence 1.8% less time than with the fused kernel (AVX2 forced, 2 cores). In the graph
      of many rows (B-16x at batch 2 with guidance: 64 rows) the fused kernel took 1.2% less time, and in
      eager code, where nothing fuses, the broadcasts are 3x slower than the fused kernel at 16 keys."""
    if q.device.type == "cpu" and q.dtype == torch.float32 and mask is None:
        few = FEW_KEYS
        if torch.compiler.is_compiling() and q.shape[0] * q.shape[-2] < wide_min_rows():
            few = FEW_KEYS_COMPILED
        if k.shape[-2] <= few:
            scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * (q.shape[-1] ** -0.5)
            return (scores.softmax(-1).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
    if q.device.type != "cpu" or q.dtype == torch.float32 or k.shape[-2] > 128:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class HeadAttention(nn.Module):
    """Full (unmasked) attention over the P tokens of one patch, with biases."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.n_head = width // head_dim
        self.wqkv = nn.Linear(width, 3 * width)
        self.wo = nn.Linear(width, width)

    def forward(self, x):
        B, P, W = x.shape
        q, k, v = self.wqkv(x).view(B, P, 3, self.n_head, W // self.n_head).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(B, P, W))


class TransformerBlock(_SwiGLU):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = HeadAttention(width, head_dim)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self._init_mlp(width)

    def forward(self, x, scale1, shift1, gate1, scale2, shift2, gate2):
        x = x + gate1 * self.attn(_modulate(self.norm1(x), scale1, shift1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), scale2, shift2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_ln_modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out)

    def forward(self, x, mod):
        """``mod``: this layer's adaLN output ``ada_ln_modulation(y)`` (computed by the trunk, which may hoist it)."""
        scale, shift = mod.chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), scale, shift))


def _make_blocks(cfg: HeadConfig) -> tuple[list[nn.Module], int]:
    """The head's blocks and the number of modulation vectors per adaLN linear."""
    if cfg.variant == "mlp":
        return [MLPBlock(cfg.width) for _ in range(cfg.depth)], 3
    return [TransformerBlock(cfg.width, cfg.head_dim) for _ in range(cfg.depth)], 6


class _AdaLNTrunk(nn.Module):
    """Blocks modulated by adaLN linears shared by consecutive blocks, then the final layer.
    Shared by the diffusion head networks and the classification heads (same key layout)."""

    def __init__(self, cfg: HeadConfig, out_channels: int):
        super().__init__()
        self.config = cfg
        W = cfg.width
        blocks, self.n_mod = _make_blocks(cfg)
        self.cond_embed = nn.Linear(cfg.cond_channels, W)
        self.res_blocks = nn.ModuleList(blocks)
        self.ada_ln_blocks = nn.ModuleList([nn.Linear(W, self.n_mod * W) for _ in range(cfg.adaln_blocks)])
        self.switch = max(1, cfg.depth // cfg.adaln_blocks)
        self.adaln_used = -(-cfg.depth // self.switch)  # adaLN linears the blocks use (the config may hold more)
        self.final_layer = FinalLayer(W, out_channels)

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero adaLN and output: every block starts as the identity and the output is 0.
        for lin in [*self.ada_ln_blocks, self.final_layer.ada_ln_modulation, self.final_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def modulation_width(self) -> int:
        """Values per row of :meth:`modulation`'s outputs together."""
        return (self.adaln_used * self.n_mod + 2) * self.config.width

    def modulation(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every adaLN output for the adaLN input ``y``: one per shared adaLN linear the blocks use, then the
        final layer's. They depend on the flow time and the condition only, not on the noisy input, so a
        sampler that knows its flow times in advance can compute them for all steps in one batch."""
        used = self.ada_ln_blocks[: self.adaln_used]
        return (*(lin(y) for lin in used), self.final_layer.ada_ln_modulation(y))

    def trunk(self, h: torch.Tensor, y: torch.Tensor | None = None,
              mods: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Blocks and final layer on ``h``, modulated by adaLN input ``y`` or by its :meth:`modulation`."""
        if mods is None:
            mods = self.modulation(y)
        for i, block in enumerate(self.res_blocks):
            h = block(h, *mods[i // self.switch].chunk(self.n_mod, dim=-1))
        return self.final_layer(h, mods[-1])


class _HeadNet(_AdaLNTrunk):
    """Diffusion head network: time + condition embedding, noisy-input projection, adaLN trunk."""

    variant: str  # set by the subclasses; the blocks follow cfg.variant, which must agree

    def __init__(self, cfg: HeadConfig):
        assert cfg.variant == self.variant, f"{type(self).__name__} needs variant={self.variant!r}, got {cfg.variant!r}"
        super().__init__(cfg, cfg.in_channels)
        self.time_embed = TimestepEmbedder(cfg.width)
        self.input_proj = nn.Linear(cfg.in_channels, cfg.width)
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)

    def embed_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition embedding; constant across the flow steps of one AR step, so samplers hoist it."""
        return self.cond_embed(cond)

    def adaln_input(self, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """silu(time embedding + c) for times ``t`` and an embedded condition c (N, [P,] W): t 0-d gives
        c's shape, t (N,) one time per row, t (T,) with ``c`` given a leading axis of 1 (1, N, [P,] W) one
        slice per time (T, N, [P,] W)."""
        te = self.time_embed(t)
        if t.dim() == 1:  # per-row (or per-slice) times broadcast over the remaining axes
            te = te.view(te.shape[0], *([1] * (c.dim() - 2)), te.shape[-1])
        return F.silu(te + c)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                mods: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """x_pred for x_t (N, [P,] C), t (N,) or 0-d, and an embedded condition c from :meth:`embed_cond`;
        ``mods``, if given, are the adaLN outputs for (t, c) (:meth:`modulation` of :meth:`adaln_input`)."""
        squeeze = self.config.variant == "transformer" and x.dim() == 2
        if squeeze:
            x, c = x.unsqueeze(1), c.unsqueeze(1)
            if mods is not None:
                mods = tuple(m.unsqueeze(1) for m in mods)
        h = self.input_proj(x.to(linear_dtype(self.input_proj)))
        if mods is None:
            mods = self.modulation(self.adaln_input(t, c))
        out = self.trunk(h, mods=mods)
        if self.config.output_activation == "tanh":
            out = 2 * torch.sigmoid(out) - 1
        return out.squeeze(1) if squeeze else out

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t, self.embed_cond(cond))


class MLPHeadNet(_HeadNet):
    """One token at a time (the 1x models)."""

    variant = "mlp"


class TransformerHeadNet(_HeadNet):
    """Attention over the P tokens of a patch (next-patch models)."""

    variant = "transformer"


def build_head_net(cfg: HeadConfig) -> _HeadNet:
    return (MLPHeadNet if cfg.variant == "mlp" else TransformerHeadNet)(cfg)


class DiffusionHead(nn.Module):
    """Training loss and sampling around a head network (``self.net``)."""

    # The adaLN outputs of all flow steps are computed up front while they take at most this many elements
    # (256 MiB in fp32; B-16x at batch 2 with guidance needs 18M); larger batches give the products
    # enough rows anyway.
    HOIST_ELEMENTS = 1 << 26

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.net = build_head_net(config)
        self._compiled_step: FrozenCompiled | None = None
        self._compiled_prepare: FrozenCompiled | None = None
        self._compiled_flow: FrozenCompiled | None = None

    def compile_sampling(self, *, mode: str | None = None, dynamic: bool = False, whole_flow: bool = False) -> None:
        """Compile one sampler update (guidance batch, network, guided velocity, Euler(-Maruyama) step) as a
        whole with ``torch.compile`` (inductor); only the noise draw stays outside, so a seed keeps its stream.

        The update runs (steps + 1) times per AR step on tensors of one fixed shape, so a static graph
        (``dynamic=False``) is compiled once per batch size (and for guided / unguided steps; the last,
        deterministic update of an AR step runs in the graph of the stochastic ones). On CPUs the weights are
        frozen into the graph and inductor's C++ GEMM templates replace BLAS for the head's few-row products,
        oneDNN's packed kernels for fp32 calls of 32 rows or more (see :mod:`bitdance.compiling`; compiled
        again by itself when the weights change).
        On GPUs ``mode="reduce-overhead"`` captures the update in a CUDA graph, removing the kernel-launch
        overhead that dominates small batches. Training (``loss``)
        keeps the eager network. ``mode="off"`` undoes it.

        ``whole_flow=True`` compiles the whole flow loop of an AR step (all steps + 1 updates, unrolled, on noise
        drawn up front in the same order) as one graph instead: one call per AR step instead of steps + 1, and
        inductor fuses across the updates. The head's time per AR step fell 13% for B-1x and 7% for B-4x, a
        whole image's 8.5% and 5.9% (25 steps, 2 images, AVX2 forced, 2-core Xeon), but the graph is steps + 1
        times larger and compiles about as much longer the first time: 4 and 11 minutes for the whole model
        there, against 40 seconds (inductor's disk cache keeps most of it for later processes). Worth it for
        long sampling runs.
        """
        if mode == "off":
            self._compiled_step = self._compiled_prepare = self._compiled_flow = None
            return
        self._compiled_flow = FrozenCompiled(_flow_loop, self.net, mode=mode, dynamic=dynamic) if whole_flow else None
        self._compiled_step = FrozenCompiled(_flow_step, self.net, mode=mode, dynamic=dynamic)
        # the condition embedding and the hoisted adaLN outputs of an AR step: eager, their products (up to
        # 104 rows on B-1x) cost a quarter of the compiled head's time there. Its rows are those of the adaLN
        # product, (steps + 1) x the condition's, which picks oneDNN's kernels for it in fp32 (B-4x: 35 ms
        # per AR step against 48 with the templates; B-1x: 6.4 against 7.8; AVX2 forced)
        self._compiled_prepare = FrozenCompiled(_prepare, self.net, mode=mode, dynamic=dynamic, rows=_prepare_rows)

    @contextlib.contextmanager
    def eager_sampling(self) -> Iterator[None]:
        """Within the block, :meth:`sample` runs the eager code even where it is compiled."""
        saved = self._compiled_step, self._compiled_prepare, self._compiled_flow
        self._compiled_step = self._compiled_prepare = self._compiled_flow = None
        try:
            yield
        finally:
            self._compiled_step, self._compiled_prepare, self._compiled_flow = saved

    def sample_time(self, n: int, *, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        if cfg.time_schedule == "logit_normal":
            z = rng.randn((n,), generator=generator, device=device)
            t = (z * cfg.P_std + cfg.P_mean).sigmoid()
        else:
            t = rng.rand((n,), generator=generator, device=device)
        return time_shift(t, cfg.time_shift) if cfg.time_shift != 1.0 else t

    def loss(self, target: torch.Tensor, cond: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Velocity-matching loss for clean tokens ``target`` (N, [P,] C) under ``cond`` (N, [P,] D)."""
        n = target.shape[0]
        target = target.float()
        t = self.sample_time(n, device=target.device, generator=generator)
        noise = rng.randn(target.shape, generator=generator, device=target.device)
        ti = t.view(n, *([1] * (target.dim() - 1)))
        x_t = (1 - ti) * noise + ti * target
        denom = (1 - ti).clamp_min(0.05)
        v = (target - x_t) / denom
        x_pred = self.net(x_t, t, cond)
        v_pred = (x_pred.float() - x_t) / denom
        return ((v - v_pred) ** 2).mean()

    forward = loss

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, sampler: FlowSampler, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Continuous samples (before ``sign``). With guidance, ``cond`` holds conditional rows then
        unconditional rows and the result has half as many rows."""
        net = self.net
        guided = guidance_scale > 1.0
        rows = cond.shape[0] // 2 if guided else cond.shape[0]
        shape = (rows, *cond.shape[1:-1], self.config.in_channels)
        times = sampler.flow_times(cond.device)
        per_step = None
        # the adaLN outputs of every flow step in one batch: (steps + 1) x more rows per weight read, which is
        # what small batches lack (on a CPU these products run several times faster then)
        hoist = _prepare_rows(cond, times) * net.modulation_width <= self.HOIST_ELEMENTS
        if self._compiled_prepare is not None:
            self._compiled_prepare.refresh()
            c, all_mods = self._compiled_prepare(cond, times if hoist else None)
        else:
            c, all_mods = _prepare(net, cond, times if hoist else None)
        if self._compiled_flow is not None:
            return self._sample_whole_flow(c, all_mods, shape, sampler, times, guidance_scale, generator)
        if all_mods is not None:
            per_step = iter([tuple(m[k] for m in all_mods) for k in range(times.numel())])

        def mods_now():  # FlowSampler.sample evaluates the network once per flow time, in order
            return next(per_step) if per_step is not None else None

        step = None
        if self._compiled_step is not None:
            # the scale as a tensor: a Python float would be baked into the graph (a recompile per AR step
            # under the linear guidance schedule)
            fn, scale = self._compiled_step, torch.full((), float(guidance_scale), device=cond.device)
            fn.refresh()

            stochastic, last = (torch.full((), flag, device=cond.device) for flag in (False, True))

            # the last, deterministic update takes the graph of the stochastic ones, with zero noise and a flag
            # that selects its result: a graph of its own held its own frozen copy of the weights, which the
            # update read cold from memory (B-1x, AVX2 forced: 2.6 against 1.45 ms for the other updates)
            def step(x, t, dt, noise):
                deterministic = noise is None
                return fn(c, mods_now(), scale, guided, x, t, dt, torch.zeros_like(x) if deterministic else noise,
                          last if deterministic else stochastic)

        with self._compiled_step.active() if step is not None else contextlib.nullcontext():
            return sampler.sample(lambda x, t: net.denoise(x, t, c, mods_now()), shape,
                                  guidance_scale=guidance_scale, generator=generator, device=cond.device, step=step)

    def _sample_whole_flow(self, c, all_mods, shape, sampler, times, guidance_scale, generator) -> torch.Tensor:
        fn = self._compiled_flow
        fn.refresh()
        x, noises = sampler.draws(shape, generator=generator, device=c.device)
        scale = torch.full((), float(guidance_scale), device=c.device)  # a tensor, as in the per-update graph
        with fn.active():
            return fn(c, all_mods, scale, guidance_scale > 1.0, x, noises, times, sampler.step_sizes(c.device))


def _prepare(net: nn.Module, cond: torch.Tensor, times: torch.Tensor | None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """What an AR step computes before its flow loop: the embedded condition and, for ``times`` (the
    sampler's flow times), the adaLN outputs of every flow step (each with a leading axis over the times)."""
    c = net.embed_cond(cond)
    return c, None if times is None else net.modulation(net.adaln_input(times, c.unsqueeze(0)))


def _prepare_rows(cond: torch.Tensor, times: torch.Tensor | None) -> int:
    """Rows of :func:`_prepare`'s largest product: the adaLN outputs of all flow times (or the condition's)."""
    return rows_of(cond) * (1 if times is None else times.numel())


def _flow_step(net: nn.Module, c: torch.Tensor, mods: tuple[torch.Tensor, ...] | None, scale: torch.Tensor,
               guided: bool, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
               noise: torch.Tensor, deterministic: torch.Tensor) -> torch.Tensor:
    """One sampler update with the head network: what :meth:`DiffusionHead.compile_sampling` compiles. Where
    the 0-d bool ``deterministic`` is True it is the plain Euler update (``noise`` is then ignored), else
    Euler-Maruyama's with ``noise``: one graph for both."""
    v = guided_velocity(lambda xi, ti: net.denoise(xi, ti, c, mods), x, t, scale, guided)
    return torch.where(deterministic, flow_update(x, v, t, dt), flow_update(x, v, t, dt, noise))


def _flow_loop(net: nn.Module, c: torch.Tensor, mods: tuple[torch.Tensor, ...] | None, scale: torch.Tensor,
               guided: bool, x: torch.Tensor, noises: torch.Tensor | None, times: torch.Tensor,
               dts: torch.Tensor) -> torch.Tensor:
    """A whole flow loop with the head network (``compile_sampling(whole_flow=True)``): the sampler's
    :func:`~bitdance.sampling.flow.integrate` on its draws, ``mods`` the adaLN outputs of every flow time (a
    leading axis over the times) or None to compute them at each update."""

    def velocity(z: torch.Tensor, i: int) -> torch.Tensor:
        now = None if mods is None else tuple(m[i] for m in mods)
        return guided_velocity(lambda zi, ti: net.denoise(zi, ti, c, now), z, times[i], scale, guided)

    return integrate(velocity, x, noises, times, dts)


# --------------------------------------------------------------------------------------------
# Classification heads (ablations)
# --------------------------------------------------------------------------------------------
class ClassifierHeadNet(_AdaLNTrunk):
    """Trunk of the classification heads: the diffusion head's blocks without time or noisy input.

    The embedded condition c = cond_embed(cond) is both the residual stream and, through silu, the adaLN
    input. The "mlp" variant treats every token on its own, the "transformer" variant attends over the
    P tokens of a patch. ``forward(cond (N, [P,] D)) -> logits (N, [P,] out_channels)``.
    """

    def __init__(self, cfg: HeadConfig, out_channels: int):
        super().__init__(cfg, out_channels)
        self.initialize_weights()  # every logit starts at 0 (uniform bits / codes)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        squeeze = self.config.variant == "transformer" and cond.dim() == 2
        if squeeze:
            cond = cond.unsqueeze(1)
        h = self.cond_embed(cond.to(linear_dtype(self.cond_embed)))
        out = self.trunk(h, F.silu(h))
        return out.squeeze(1) if squeeze else out


def _check_temperature(temperature: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


class _ClassifierHead(nn.Module):
    """Shared part of the classification heads: guided logits in the diffusion head's row layout."""

    def __init__(self, config: HeadConfig, out_channels: int):
        super().__init__()
        self.config = config
        self.net = ClassifierHeadNet(config, out_channels)

    def logits(self, cond: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
        """float32 logits; with ``guidance_scale > 1`` ``cond`` holds conditional rows then unconditional
        rows and the result, ``u + s * (c - u)``, has half as many rows."""
        out = self.net(cond).float()
        if guidance_scale > 1.0:
            c, u = out.chunk(2)
            out = u + guidance_scale * (c - u)
        return out


class BitwiseHead(_ClassifierHead):
    """Bit-wise classification: d logits per token, binary cross-entropy on the bits, independent
    Bernoulli sampling of every bit (the P tokens of a patch and the d bits of a token are sampled
    independently given the condition)."""

    def __init__(self, config: HeadConfig):
        super().__init__(config, config.in_channels)

    def loss(self, target: torch.Tensor, cond: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary cross-entropy for tokens ``target`` (N, [P,] C) in {-1,+1} under ``cond`` (N, [P,] D).
        ``generator`` is accepted for interface compatibility (the loss is deterministic)."""
        return F.binary_cross_entropy_with_logits(self.net(cond).float(), (1 + target.float()) / 2)

    forward = loss

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, sampler: FlowSampler | None = None, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, temperature: float = 1.0,
               top_k: int | None = None) -> torch.Tensor:
        """Tokens (rows, [P,] C) with exact values in {-1,+1}: bit = +1 with probability
        sigmoid(logit / temperature) (temperature 0: the most likely bit). ``sampler`` is ignored."""
        _check_temperature(temperature)
        if top_k is not None:
            raise ValueError("top_k applies to the token head only (the bitwise head samples single bits)")
        logits = self.logits(cond, guidance_scale)
        one = torch.ones((), device=logits.device)
        if temperature == 0:
            return torch.where(logits > 0, one, -one)
        p = torch.sigmoid(logits / temperature)
        u = rng.rand(p.shape, generator=generator, device=p.device)
        return torch.where(u < p, one, -one)


class TokenHead(_ClassifierHead):
    """Token classification: a softmax over all 2^d codes of a token (code index: bit k has weight 2^k,
    as :func:`~bitdance.models.quantizer.bits_to_indices`); the P tokens of a patch are sampled independently
    given the condition. Only feasible for small d (see :class:`~bitdance.models.config.HeadConfig`)."""

    def __init__(self, config: HeadConfig):
        config._check_token_head_size()  # also for configs built around __post_init__
        super().__init__(config, config.num_codes)

    def loss(self, target: torch.Tensor, cond: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Cross-entropy on the code index of tokens ``target`` (N, [P,] C) in {-1,+1}."""
        logits = self.net(cond).float()
        idx = bits_to_indices(target).squeeze(-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx.reshape(-1))

    forward = loss

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, sampler: FlowSampler | None = None, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, temperature: float = 1.0,
               top_k: int | None = None) -> torch.Tensor:
        """Tokens (rows, [P,] C) with exact values in {-1,+1}, a code drawn from softmax(logits /
        temperature) restricted to the ``top_k`` most likely codes (temperature 0: the most likely code).
        ``sampler`` is ignored."""
        _check_temperature(temperature)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        logits = self.logits(cond, guidance_scale)
        K = logits.shape[-1]
        if temperature == 0:
            idx = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < K:
                kth = logits.topk(top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1).reshape(-1, K)
            idx = rng.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
        return indices_to_bits(idx.unsqueeze(-1), bits_per_group=self.config.in_channels)


def build_head(cfg: HeadConfig) -> nn.Module:
    """The head selected by ``cfg.head_type``: DiffusionHead, BitwiseHead or TokenHead."""
    heads = {"diffusion": DiffusionHead, "bitwise": BitwiseHead, "token": TokenHead}
    return heads[cfg.head_type](cfg)
