"""Typed configurations: every model is built from one (the size table is :mod:`bitdance.models.presets`).

Every model is built from one of these frozen dataclasses. They round-trip through plain dicts
(``to_dict`` / ``from_dict``) so that our ``config.json`` files stay readable and stable.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

__all__ = [
    "TokenizerConfig",
    "HeadConfig",
    "BitDanceConfig",
    "ConfigError",
    "HEAD_TYPES",
    "BLOCK_ATTENTIONS",
    "TOKEN_HEAD_MAX_BITS",
    "TOKEN_HEAD_MAX_BYTES",
    "T2IConfig",
    "RESOLUTIONS_512",
    "RESOLUTIONS_1024",
]

# Heads that turn the AR condition into tokens (the paper's head ablation): the binary diffusion head,
# bit-wise classification (independent Bernoulli per bit, Infinity-style) and token classification
# (a softmax over all 2^d codes of a token).
HEAD_TYPES = ("diffusion", "bitwise", "token")
# Attention among the P positions of one AR step (Tab. 14): "bidirectional" = the official block-causal
# mask, "causal" = a plain causal mask everywhere.
BLOCK_ATTENTIONS = ("bidirectional", "causal")
# The token head is refused beyond 2^20 codes per token, or when its output layer alone
# (2^d x (width + 1) float32 parameters) would exceed 4 GiB.
TOKEN_HEAD_MAX_BITS = 20
TOKEN_HEAD_MAX_BYTES = 4 * 2**30


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               f"{type(cfg).__name__}: {name} must be a positive integer, got {v!r}")


def _bytes(n: int) -> str:
    """``17,179,869,184 bytes (16.0 GiB)``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    v, i = float(n), 0
    while v >= 1024 and i < len(units) - 1:
        v, i = v / 1024, i + 1
    return f"{n:,} bytes ({v:.1f} {units[i]})"


def _typed(owner: str, name: str, hint: Any, v: Any) -> Any:
    """``v`` as the annotated type of field ``name``, or a ConfigError naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(want: str) -> ConfigError:
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
        return ConfigError(f"{owner}.{name} must be {want}, got {shown} ({type(v).__name__})")

    if hint is bool:
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if hint is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
        return v
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad("a finite number")
        return float(v)
    if origin is Literal:
        if v not in args or isinstance(v, bool):
            raise bad(f"one of {list(args)}")
        return v
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise bad("a list of integers")
        return tuple(v)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(v, hint):
            raise bad("an object of fields")
        return v
    return v


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """A config from plain data (a parsed config.json): every value is checked against the field's
        type first, so a string, a bool or a float where a size belongs is refused by name."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected an object of fields, got {type(d).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown config field(s) {unknown}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            if k == "tokenizer" and isinstance(v, dict):
                v = TokenizerConfig.from_dict(v)
            elif k == "head" and isinstance(v, dict):
                v = HeadConfig.from_dict(v)
            else:
                v = _typed(cls.__name__, k, hints[k], v)
            kwargs[k] = v
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerConfig(_DictMixin):
    """Binary CNN autoencoder. Field names follow the official ``ddconfig``."""

    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32  # bits per token (d)
    in_channels: int = 3
    out_ch: int = 3
    gan_decoder: bool = False  # noise-injecting decoder of the d32 tokenizers
    # Quantizer / entropy loss: channels split into `groups` groups of z_channels/groups bits.
    groups: int = 4
    entropy_temperature: float = 0.01
    sample_minimization_weight: float = 1.0
    batch_maximization_weight: float = 1.0

    def __post_init__(self):
        _positive(self, "ch", "num_res_blocks", "z_channels", "in_channels", "out_ch", "groups")
        _check(len(self.ch_mult) >= 1, "TokenizerConfig: ch_mult must have at least one level")
        _check(all(m >= 1 for m in self.ch_mult), f"TokenizerConfig: ch_mult entries must be >= 1, got {self.ch_mult}")
        for m in self.ch_mult:
            _check((self.ch * m) % 32 == 0, f"TokenizerConfig: ch*ch_mult={self.ch * m} must be divisible "
                   "by 32 (GroupNorm uses 32 groups)")
        _check(self.num_res_blocks >= 1, "TokenizerConfig: num_res_blocks must be >= 1")
        _check(self.z_channels >= 1, "TokenizerConfig: z_channels must be >= 1")
        _check(self.groups >= 1 and self.z_channels % self.groups == 0,
               f"TokenizerConfig: z_channels={self.z_channels} is not divisible by groups={self.groups}")
        _check(self.bits_per_group <= 16,
               f"TokenizerConfig: {self.bits_per_group} bits per entropy group would need "
               f"2^{self.bits_per_group} codes per group; use more groups (at most 16 bits per group)")

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def bits_per_group(self) -> int:
        return self.z_channels // self.groups

    @property
    def ddconfig(self) -> dict[str, Any]:
        """The official ``ddconfig`` dict (for writing official-format files)."""
        return {
            "double_z": False,
            "z_channels": self.z_channels,
            "in_channels": self.in_channels,
            "out_ch": self.out_ch,
            "ch": self.ch,
            "ch_mult": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
        }

    @classmethod
    def from_ddconfig(cls, ddconfig: dict[str, Any], **extra) -> "TokenizerConfig":
        keep = {k: ddconfig[k] for k in ("ch", "num_res_blocks", "z_channels", "in_channels", "out_ch")
                if k in ddconfig}
        if "ch_mult" in ddconfig:
            keep["ch_mult"] = tuple(ddconfig["ch_mult"])
        if ddconfig.get("double_z"):
            raise ConfigError("TokenizerConfig: double_z=True (a KL-VAE) is not a binary tokenizer")
        keep.update(extra)
        return cls(**keep)



# --------------------------------------------------------------------------------------------
# Heads: binary diffusion head (and the classification heads of the ablations)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadConfig(_DictMixin):
    """Binary diffusion head: samples the d bits of P tokens jointly with rectified flow.

    ``head_type`` selects the ablation heads instead ("bitwise": d independent Bernoulli logits per
    token; "token": a softmax over the 2^d codes of a token). They share the trunk (``variant``, width,
    depth, adaln_blocks, head_dim) but have no time input; the flow-time fields are then unused.
    """

    variant: Literal["mlp", "transformer"] = "mlp"
    in_channels: int = 32  # bits per token
    cond_channels: int = 768  # width of the AR transformer's condition
    width: int = 768  # model_channels
    depth: int = 6  # residual / transformer blocks
    adaln_blocks: int = 2  # adaLN linears shared by consecutive blocks
    head_dim: int = 64  # attention head size of the transformer variant
    parallel_num: int = 1  # tokens modelled jointly (P)
    output_activation: Literal["none", "tanh"] = "none"  # "tanh": 2*sigmoid(x)-1 (text-to-image head)
    # Training-time distribution of the flow time t in [0, 1] (0 = noise, 1 = data).
    time_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    time_shift: float = 1.0
    P_mean: float = -0.8
    P_std: float = 0.8
    head_type: Literal["diffusion", "bitwise", "token"] = "diffusion"

    def __post_init__(self):
        _check(self.head_type in HEAD_TYPES,
               f"HeadConfig: unknown head_type {self.head_type!r}; choose one of {list(HEAD_TYPES)}")
        _check(self.variant in ("mlp", "transformer"), f"HeadConfig: unknown variant {self.variant!r}")
        _check(self.depth >= 1 and self.adaln_blocks >= 1, "HeadConfig: depth and adaln_blocks must be >= 1")
        switch = max(1, self.depth // self.adaln_blocks)
        _check(self.depth % switch == 0 and self.depth // switch <= self.adaln_blocks,
               f"HeadConfig: depth={self.depth} must be divisible by adaln_blocks={self.adaln_blocks}")
        if self.variant == "transformer":
            _check(self.width % self.head_dim == 0,
                   f"HeadConfig: width={self.width} is not divisible by head_dim={self.head_dim}")
        _check(self.time_schedule in ("logit_normal", "uniform"),
               f"HeadConfig: unknown time_schedule {self.time_schedule!r}")
        _check(self.time_shift > 0, "HeadConfig: time_shift must be > 0")
        _check(self.in_channels >= 1 and self.width >= 1, "HeadConfig: in_channels and width must be >= 1")
        if self.head_type != "diffusion":
            _check(self.output_activation == "none",
                   f"HeadConfig: output_activation={self.output_activation!r} only applies to the diffusion "
                   f"head (the {self.head_type} head outputs logits)")
        if self.head_type == "token":
            self._check_token_head_size()

    def _check_token_head_size(self) -> None:
        d = self.in_channels
        ok = d <= TOKEN_HEAD_MAX_BITS and 2**d * (self.width + 1) * 4 <= TOKEN_HEAD_MAX_BYTES
        if ok:
            return
        codes = 2**d
        params = codes * (self.width + 1)
        raise ConfigError(
            f"HeadConfig: head_type='token' with d={d} bits per token needs a softmax over 2^{d} = {codes:,} "
            f"codes: its output layer alone has 2^{d} x (width {self.width} + 1) = {params:,} parameters, "
            f"i.e. {_bytes(params * 4)} in float32, and the logits of a single token take "
            f"{_bytes(codes * 4)}. The token head is limited to d <= {TOKEN_HEAD_MAX_BITS} bits and "
            f"{_bytes(TOKEN_HEAD_MAX_BYTES)} of output weights; use head_type='bitwise' or 'diffusion', "
            f"or a tokenizer with fewer bits per token")

    @property
    def num_codes(self) -> int:
        """2^d codes per token (what the token head's softmax ranges over)."""
        return 2**self.in_channels


# --------------------------------------------------------------------------------------------
# Class-conditional BitDance generator
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitDanceConfig(_DictMixin):
    """Class-conditional next-patch BitDance model (AR transformer + binary diffusion head).

    Ablations (defaults = the official model): ``order`` (patch-wise or plain raster token order),
    ``block_attention`` ("bidirectional": the P positions of an AR step see each other; "causal": a
    plain causal mask) and ``head_type`` ("diffusion", "bitwise" or "token" classification head).
    """

    dim: int = 768
    n_layer: int = 24
    n_head: int = 12
    head_depth: int = 6  # official: diff_layers
    head_width: int = 768  # official: diff_dim
    head_adaln_blocks: int = 2  # official: diff_adanln_layers
    parallel_num: int = 1  # P tokens per AR step: 1, 4, 16, 64 (a p x p patch, p = sqrt(P))
    image_size: int = 256
    num_classes: int = 1000
    cls_token_num: int = 64
    # Training recipe that lives with the model.
    diff_batch_mul: int = 4
    class_dropout_prob: float = 0.1
    perturb_rate: float = 0.0  # bit-flip perturbation of input tokens (expected flip rate = rate / 2)
    drop_rate: float = 0.0
    time_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    time_shift: float = 1.0
    P_mean: float = -0.8
    P_std: float = 0.8
    # Ablations of the paper (Tab. 14): token order and attention inside a block; the head type.
    order: Literal["patch", "raster"] = "patch"
    block_attention: Literal["bidirectional", "causal"] = "bidirectional"
    head_type: Literal["diffusion", "bitwise", "token"] = "diffusion"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # = the released d16c32

    def __post_init__(self):
        _positive(self, "dim", "n_layer", "n_head", "head_depth", "head_width", "head_adaln_blocks", "parallel_num",
                  "image_size", "num_classes", "cls_token_num", "diff_batch_mul")
        _check(self.dim % self.n_head == 0, f"BitDanceConfig: dim={self.dim} not divisible by n_head={self.n_head}")
        _check((self.dim // self.n_head) % 4 == 0,
               f"BitDanceConfig: head size {self.dim // self.n_head} must be divisible by 4 (2D RoPE)")
        p = math.isqrt(self.parallel_num)
        _check(self.parallel_num >= 1 and p * p == self.parallel_num,
               f"BitDanceConfig: parallel_num={self.parallel_num} must be a square (1, 4, 16, 64)")
        f = self.tokenizer.down_factor
        _check(self.image_size % f == 0,
               f"BitDanceConfig: image_size={self.image_size} is not divisible by the tokenizer's "
               f"down factor {f}")
        g = self.image_size // f
        _check(g % p == 0, f"BitDanceConfig: the {g}x{g} token grid cannot be cut into {p}x{p} patches "
               f"(parallel_num={self.parallel_num})")
        _check(self.order in ("patch", "raster"), f"BitDanceConfig: unknown order {self.order!r}")
        _check(self.block_attention in BLOCK_ATTENTIONS,
               f"BitDanceConfig: unknown block_attention {self.block_attention!r}; "
               f"choose one of {list(BLOCK_ATTENTIONS)}")
        _check(self.head_type in HEAD_TYPES,
               f"BitDanceConfig: unknown head_type {self.head_type!r}; choose one of {list(HEAD_TYPES)}")
        _check(self.cls_token_num >= 1 and self.num_classes >= 1,
               "BitDanceConfig: cls_token_num and num_classes must be >= 1")
        _check(0.0 <= self.perturb_rate <= 1.0, "BitDanceConfig: perturb_rate must be in [0, 1]")
        self.head  # validates the head as well

    # derived quantities ------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.tokenizer.z_channels

    @property
    def down_size(self) -> int:
        return self.tokenizer.down_factor

    @property
    def grid_size(self) -> int:
        return self.image_size // self.down_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def patch_size(self) -> int:
        return math.isqrt(self.parallel_num)

    @property
    def num_steps(self) -> int:
        """Autoregressive steps to generate one image."""
        return self.num_tokens // self.parallel_num

    @property
    def head(self) -> HeadConfig:
        return HeadConfig(
            variant="mlp" if self.parallel_num == 1 else "transformer",
            in_channels=self.latent_dim,
            cond_channels=self.dim,
            width=self.head_width,
            depth=self.head_depth,
            adaln_blocks=self.head_adaln_blocks,
            parallel_num=self.parallel_num,
            time_schedule=self.time_schedule,
            time_shift=self.time_shift,
            P_mean=self.P_mean,
            P_std=self.P_std,
            head_type=self.head_type,
        )


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


# --------------------------------------------------------------------------------------------
# Text-to-image: everything of a T2I model besides its LLM
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
