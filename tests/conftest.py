import pytest
import torch

from bitdance.precision import separate_compile_cache

# The suite runs both as it is and with torch forced down to AVX2 kernels on the same machine: compiled
# kernels of the two must not meet in one cache (see separate_compile_cache).
separate_compile_cache()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and a shared 2-core machine: intra-op threads only add overhead (and spin badly under
    load). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
