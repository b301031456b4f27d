import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models in these tests are tiny: one intra-op thread is fastest, especially on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
