"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run faster and steadier on one thread on a shared 2-core box (two OpenMP threads
    per process contend with the loader's and other tests' threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
