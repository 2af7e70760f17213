"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Runs a test with one torch thread, restoring the count after.

    On the shared 2-core development machine a second torch thread waiting for a busy core made small-model
    tests 4-15x slower (a 100-sample digits test: 106 s with 2 threads, 23 s with 1); on an idle machine one
    thread costs little for matrices this small.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
