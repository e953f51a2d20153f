"""The size table (DiT-style): the paper's generators B / L / H with P = 1, 4, 16, 64 tokens per step, small
sizes for CPUs, and the released tokenizers."""

from __future__ import annotations

from typing import Any

from bitdance.models.config import BitDanceConfig, ConfigError, TokenizerConfig

__all__ = ["TOKENIZER_PRESETS", "GENERATOR_SIZES", "PARALLEL_VARIANTS", "QWEN3_14B", "T2I_SHAPES", "tokenizer_preset", "bitdance_preset",
           "list_presets", "match_preset"]

# Released tokenizers (BitDance-Tokenizer). Loading a file always takes the architecture from
# the file itself; these presets are for building/training new tokenizers of the same shape.
TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    "d16c32": TokenizerConfig(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=32, groups=4),
    "d32c128": TokenizerConfig(ch=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=4, z_channels=128,
                               groups=16, gan_decoder=True),
    "d32c256": TokenizerConfig(ch=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=4, z_channels=256,
                               groups=32, gan_decoder=True),
    # Small tokenizers for laptops, tests and the demo.
    "tiny-d4c16": TokenizerConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, groups=2),
    "tiny-d16c16": TokenizerConfig(ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=1, z_channels=16, groups=2),
}


def tokenizer_preset(name: str, **overrides) -> TokenizerConfig:
    key = name.lower().removeprefix("ae_")
    if key not in TOKENIZER_PRESETS:
        raise ConfigError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    cfg = TOKENIZER_PRESETS[key]
    return cfg.replace(**overrides) if overrides else cfg


# (dim, n_layer, n_head, head_depth, head_width, head_adaln_blocks) -- the paper's B / L / H.
GENERATOR_SIZES: dict[str, dict[str, int]] = {
    "B": dict(dim=768, n_layer=24, n_head=12, head_depth=6, head_width=768, head_adaln_blocks=2),
    "L": dict(dim=1024, n_layer=32, n_head=16, head_depth=8, head_width=1024, head_adaln_blocks=2),
    "H": dict(dim=1280, n_layer=40, n_head=20, head_depth=12, head_width=1280, head_adaln_blocks=3),
    # Small sizes for CPUs, tests and the demo (not from the paper).
    "S": dict(dim=384, n_layer=12, n_head=6, head_depth=4, head_width=384, head_adaln_blocks=2),
    "T": dict(dim=128, n_layer=2, n_head=2, head_depth=2, head_width=128, head_adaln_blocks=2),
}
PARALLEL_VARIANTS = {"1x": 1, "4x": 4, "16x": 16, "64x": 64}


def match_preset(cfg: BitDanceConfig) -> str | None:
    """The preset name whose sizes ``cfg`` has (``BitDance-B-16x``), or None for a custom size."""
    for size, dims in GENERATOR_SIZES.items():
        if all(getattr(cfg, k) == v for k, v in dims.items()):
            for name, P in PARALLEL_VARIANTS.items():
                if P == cfg.parallel_num:
                    return f"BitDance-{size}-{name}"
    return None


def list_presets() -> list[str]:
    return [f"BitDance-{s}-{v}" for s in GENERATOR_SIZES for v in PARALLEL_VARIANTS]


def bitdance_preset(name: str, **overrides) -> BitDanceConfig:
    """``BitDance-{B,L,H,S,T}-{1x,4x,16x,64x}`` (ImageNet 256 defaults), with optional overrides."""
    parts = name.replace("_", "-").split("-")
    if len(parts) != 3 or parts[0].lower() != "bitdance" or parts[1].upper() not in GENERATOR_SIZES \
            or parts[2].lower() not in PARALLEL_VARIANTS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {list_presets()}")
    size = dict(GENERATOR_SIZES[parts[1].upper()])
    kwargs: dict[str, Any] = dict(size, parallel_num=PARALLEL_VARIANTS[parts[2].lower()])
    if isinstance(overrides.get("tokenizer"), str):
        overrides["tokenizer"] = tokenizer_preset(overrides["tokenizer"])
    kwargs.update(overrides)
    try:
        return BitDanceConfig(**kwargs)
    except TypeError as e:  # unknown override name
        raise ConfigError(f"preset {name!r}: {e}") from None




# The released text-to-image models' shapes (BitDance-14B-16x / -64x: Qwen3-14B, a 6-block 5120-wide head, the
# d16c32-shaped 32-bit tokenizer), for building stand-ins with random weights (memory and speed planning,
# ``bitdance bench --memory``) without the 34 GB download.
QWEN3_14B: dict[str, Any] = dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=17408, num_attention_heads=40,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151988, max_position_embeddings=40960,
                                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)
T2I_SHAPES: dict[str, dict[str, Any]] = {
    "BitDance-14B-16x": {"llm": QWEN3_14B, "parallel_num": 16, "tokenizer": "d16c32"},
    "BitDance-14B-64x": {"llm": QWEN3_14B, "parallel_num": 64, "tokenizer": "d16c32"},
}
