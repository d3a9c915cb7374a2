"""Test session setup.

On a machine without CUDA the Triton backend runs under Triton's interpreter:
TRITON_INTERPRET must be set before triton is first imported, so it is set here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tests use tiny tensors: intra-op threads gain nothing there, and on a
    loaded 2-core machine every OpenMP barrier can wait milliseconds for a
    descheduled thread."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
