import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*weight initialization of GoogleNet.*")
warnings.filterwarnings("ignore", message=".*weight initialization of inception.*")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run much faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """``zoo`` and ``onnx`` tests are slow by nature: mark them ``slow`` too, so ``-m "not slow"`` is quick."""
    for item in items:
        if item.get_closest_marker("zoo") or item.get_closest_marker("onnx"):
            item.add_marker(pytest.mark.slow)
