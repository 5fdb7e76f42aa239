"""What the two pool rules share: which kind of pool a node is."""

from __future__ import annotations

from typing import Optional, Tuple

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...graph import ADAPTIVE_POOL_FUNCTIONS
from .._rewrite import Context

__all__ = ["pool_kind", "as_pair", "FIXED_POOL_FUNCTIONS"]

#: The functional fixed-kernel pools.
FIXED_POOL_FUNCTIONS = {F.avg_pool2d: "avg", F.max_pool2d: "max"}


def as_pair(value) -> Tuple[Optional[int], Optional[int]]:
    if isinstance(value, (tuple, list)):
        return tuple(value)  # type: ignore[return-value]
    return (value, value)


def pool_kind(node: fx.Node, ctx: Context) -> Optional[str]:
    """avg/max for any 2-d pool module or function, else None."""
    if node.op == "call_module":
        m = ctx.module(node)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            return "avg"
        if isinstance(m, (nn.AdaptiveMaxPool2d, nn.MaxPool2d)):
            return "max"
        return None
    if node.op == "call_function":
        return ADAPTIVE_POOL_FUNCTIONS.get(node.target) or FIXED_POOL_FUNCTIONS.get(node.target)
    return None
