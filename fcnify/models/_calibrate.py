"""Realistic batch-norm statistics for models with random weights (the zoo, the tests, the benchmarks)."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["calibrate_batchnorm"]


def calibrate_batchnorm(model: nn.Module, size: Tuple[int, int], batch_size: int = 2, seed: int = 0) -> nn.Module:
    """Set batch-norm running statistics from one random batch at ``size``; returns ``model`` in eval mode.

    With random weights and fresh statistics the logits of deep networks can be tiny
    (torchvision's EfficientNets give ~1e-14), so any comparison with them passes. Statistics
    taken from the data the model then sees keep every layer, and the logits, of order one,
    which makes the verification errors in the table mean something.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one batch sets the statistics
    x = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.train()(x)
    return model.eval()
