import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*weight initialization of GoogleNet.*")
warnings.filterwarnings("ignore", message=".*weight initialization of inception.*")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
