import pytest
import torch


@pytest.fixture(autouse=True)
def two_threads():
    """Benchmarks run with 2 intra-op threads (the project's CPU reference machine; see RESULTS.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
