"""BitDance: autoregressive image generation with binary tokens (arXiv 2602.14041).

The packages, bottom to top (``docs/architecture.md`` has the picture): foundations (``validation``,
``rng``, ``precision``, ``compiling``, ``images``, ``files``, ``data``), :mod:`bitdance.sampling`,
:mod:`bitdance.models`, :mod:`bitdance.formats`, :mod:`bitdance.pipelines`, :mod:`bitdance.evaluation`,
:mod:`bitdance.training` and :mod:`bitdance.apps` (CLI, bench, demo, studio).
"""

from bitdance import moved
from bitdance.version import __version__

moved.install()

from bitdance.formats.official import load_head, load_official_generator, load_tokenizer  # noqa: E402
from bitdance.formats.weights import CheckpointError  # noqa: E402
from bitdance.models.config import BitDanceConfig, HeadConfig, TokenizerConfig  # noqa: E402
from bitdance.models.head import DiffusionHead  # noqa: E402
from bitdance.models.presets import bitdance_preset, list_presets, tokenizer_preset  # noqa: E402
from bitdance.models.quantizer import BinaryQuantizer  # noqa: E402
from bitdance.models.tokenizer import BinaryTokenizer  # noqa: E402
from bitdance.models.transformer import BitDance  # noqa: E402
from bitdance.pipelines.class_conditional import BitDancePipeline  # noqa: E402
from bitdance.pipelines.text_to_image import BitDanceT2IPipeline  # noqa: E402
from bitdance.sampling.flow import FlowSampler  # noqa: E402

__all__ = [
    "BitDance", "BitDanceConfig", "BitDancePipeline", "BitDanceT2IPipeline", "BinaryQuantizer", "BinaryTokenizer",
    "CheckpointError", "DiffusionHead", "FlowSampler", "HeadConfig", "TokenizerConfig", "bitdance_preset",
    "list_presets", "load_head", "load_official_generator", "load_tokenizer", "tokenizer_preset", "__version__",
]


def __getattr__(name: str):
    # `import bitdance; bitdance.checkpoint` worked while the old modules were imported by the package itself
    return moved.old_module(name)
