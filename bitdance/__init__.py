"""BitDance: autoregressive image generation with binary tokens (arXiv 2602.14041)."""

__version__ = "0.1.0"

from .config import (BitDanceConfig, HeadConfig, TokenizerConfig, bitdance_preset, list_presets,  # noqa: E402
                     tokenizer_preset)
from .head import DiffusionHead  # noqa: E402
from .quantizer import BinaryQuantizer  # noqa: E402
from .sampler import FlowSampler  # noqa: E402
from .tokenizer import BinaryTokenizer  # noqa: E402
from .transformer import BitDance  # noqa: E402
from .checkpoint import CheckpointError, load_head, load_official_generator, load_tokenizer  # noqa: E402
from .pipeline import BitDancePipeline  # noqa: E402

__all__ = [
    "BitDance", "BitDanceConfig", "BitDancePipeline", "BinaryQuantizer", "BinaryTokenizer", "CheckpointError",
    "DiffusionHead", "FlowSampler", "HeadConfig", "TokenizerConfig", "bitdance_preset", "list_presets",
    "load_head", "load_official_generator", "load_tokenizer", "tokenizer_preset",
]
