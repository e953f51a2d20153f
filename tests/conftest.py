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
