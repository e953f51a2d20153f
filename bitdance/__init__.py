"""BitDance: autoregressive image generation with binary tokens (arXiv 2602.14041)."""

from .version import __version__
from .config import (BitDanceConfig, HeadConfig, TokenizerConfig, bitdance_preset, list_presets,
                     tokenizer_preset)
from .head import DiffusionHead
from .quantizer import BinaryQuantizer
from .sampler import FlowSampler
from .tokenizer import BinaryTokenizer
from .transformer import BitDance
from .checkpoint import CheckpointError, load_head, load_official_generator, load_tokenizer
from .pipeline import BitDancePipeline

__all__ = [
    "BitDance", "BitDanceConfig", "BitDancePipeline", "BinaryQuantizer", "BinaryTokenizer", "CheckpointError",
    "DiffusionHead", "FlowSampler", "HeadConfig", "TokenizerConfig", "bitdance_preset", "list_presets",
    "load_head", "load_official_generator", "load_tokenizer", "tokenizer_preset", "__version__",
]
