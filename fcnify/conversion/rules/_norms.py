"""What the two normalisation rules share: they apply to feature vectors, one feature at a time."""

from __future__ import annotations

import torch.fx as fx

from ...graph import first_input
from .._rewrite import Context
from ._base import Found, Match, Rule

__all__ = ["on_vector", "per_feature_only"]


def on_vector(rule: Rule, node: fx.Node, ctx: Context) -> Found:
    """A match when the normalisation reads a feature vector of the head, else a decline."""
    info = ctx.lifted(first_input(node))
    if info is None or info.kind != "vec":
        return rule.decline(node, "its input is not a feature vector of the head")
    return Match()


def per_feature_only(node: fx.Node, ctx: Context) -> None:
    info = ctx.lifted(first_input(node))
    if info.kernel != (1, 1):
        raise ctx.unsupported(
            node,
            f"it normalises the flattened {info.channels}x{info.kernel[0]}x{info.kernel[1]} map as one "
            "vector, which has no per-position equivalent",
            "pool the map before this layer, or normalise the map with BatchNorm2d/LayerNorm over channels",
        )
