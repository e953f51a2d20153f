import os

import pytest
import torch

# Under pytest-xdist the workers share the cores: each gets its share of torch's threads instead of all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and a shared 2-core machine: intra-op threads only add overhead (and spin badly under
    load). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_pipeline(preset: str = "BitDance-T-4x", *, seed: int = 0, num_classes: int = 10):
    """A random 32 px class-conditional pipeline small enough to sample in a fraction of a second."""
    from bitdance import BinaryTokenizer, BitDance, BitDancePipeline, bitdance_preset

    torch.manual_seed(seed)
    cfg = bitdance_preset(preset, image_size=32, num_classes=num_classes, cls_token_num=4, tokenizer="tiny-d4c16")
    return BitDancePipeline(BitDance(cfg), BinaryTokenizer(cfg.tokenizer))
