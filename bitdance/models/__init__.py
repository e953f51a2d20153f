"""The networks and their configurations: the binary tokenizer (:mod:`.quantizer`, :mod:`.tokenizer`), the
heads (:mod:`.head`), the class-conditional generator (:mod:`.transformer`), the text-to-image model
(:mod:`.t2i`), their typed configs (:mod:`.config`) and the size table (:mod:`.presets`)."""

from bitdance.models.config import BitDanceConfig, ConfigError, HeadConfig, T2IConfig, TokenizerConfig
from bitdance.models.head import DiffusionHead
from bitdance.models.presets import bitdance_preset, list_presets, match_preset, tokenizer_preset
from bitdance.models.quantizer import BinaryQuantizer
from bitdance.models.t2i import BitDanceT2I
from bitdance.models.tokenizer import BinaryTokenizer
from bitdance.models.transformer import BitDance

__all__ = ["BitDance", "BitDanceConfig", "BitDanceT2I", "BinaryQuantizer", "BinaryTokenizer", "ConfigError",
           "DiffusionHead", "HeadConfig", "T2IConfig", "TokenizerConfig", "bitdance_preset", "list_presets",
           "match_preset", "tokenizer_preset"]
