import pytest
import torch


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
