"""Sampling: the one autoregressive loop every BitDance model runs (:mod:`.autoregressive`), and the
masks that make P tokens one step (:mod:`.masks`). The flow sampler of the diffusion head is
:class:`bitdance.sampling.flow.FlowSampler`."""

from bitdance.sampling.autoregressive import BlockSource, KnownTokens, binarize_sample, generate_blocks
from bitdance.sampling.masks import block_causal_mask, block_mask

__all__ = ["BlockSource", "KnownTokens", "binarize_sample", "generate_blocks", "block_causal_mask", "block_mask"]
