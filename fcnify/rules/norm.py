"""Normalisations over features become the same normalisation over channels, per position.

``BatchNorm1dToBatchNorm2d``: ``BatchNorm1d(F)`` on ``(N, F)`` and ``BatchNorm2d(F)`` on
``(N, F, H, W)`` apply the same per-feature statistics; the state is copied as is.

``LayerNormToChannelLayerNorm``: ``LayerNorm(F)`` over the last axis of ``(N, F)`` equals a
layer norm over the channel axis at each position of ``(N, F, H, W)``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._rewrite import Context
from ._common import arg, first_input, is_call


def layer_norm_channels(
    x: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` over the channel axis of an NCHW map, at every position."""
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, normalized_shape, weight, bias, eps)
    return x.permute(0, 3, 1, 2)


class ChannelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the channels of an NCHW map (same parameters and state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_channels(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _on_vector(node: fx.Node, ctx: Context) -> bool:
    info = ctx.lifted(first_input(node))
    return info is not None and info.kind == "vec"


def _per_feature_only(node: fx.Node, ctx: Context) -> None:
    info = ctx.lifted(first_input(node))
    if info.kernel != (1, 1):
        raise ctx.unsupported(
            node,
            f"it normalises the flattened {info.channels}x{info.kernel[0]}x{info.kernel[1]} map as one "
            "vector, which has no per-position equivalent",
            "pool the map before this layer, or normalise the map with BatchNorm2d/LayerNorm over channels",
        )


class BatchNorm1dToBatchNorm2d:
    name = "BatchNorm1dToBatchNorm2d"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return node.op == "call_module" and isinstance(ctx.module(node), nn.BatchNorm1d) and _on_vector(node, ctx)

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        _per_feature_only(node, ctx)
        bn1 = ctx.module(node)
        bn2 = nn.BatchNorm2d(bn1.num_features, bn1.eps, bn1.momentum, bn1.affine, bn1.track_running_stats)
        bn2.load_state_dict(bn1.state_dict())
        bn2 = bn2.to(next(iter(bn1.state_dict().values())).device) if bn1.state_dict() else bn2
        bn2.train(bn1.training)
        ctx.record(self.name, node, f"BatchNorm1d({bn1.num_features})", f"BatchNorm2d({bn1.num_features})")
        info = ctx.lifted(first_input(node))
        ctx.info[node] = info.derive(affine=info.affine and bn1.track_running_stats)
        return ctx.replace_module(node, bn2)


class LayerNormToChannelLayerNorm:
    name = "LayerNormToChannelLayerNorm"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_module":
            return isinstance(ctx.module(node), nn.LayerNorm) and _on_vector(node, ctx)
        return is_call(node, (F.layer_norm,)) and _on_vector(node, ctx)

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        _per_feature_only(node, ctx)
        info = ctx.lifted(first_input(node))
        ctx.info[node] = info.derive(affine=False)
        if node.op == "call_module":
            ln = ctx.module(node)
            channel_ln = ChannelLayerNorm(ln.normalized_shape, ln.eps, ln.elementwise_affine)
            channel_ln.load_state_dict(ln.state_dict())
            channel_ln = channel_ln.to(ln.weight.device) if ln.weight is not None else channel_ln
            ctx.record(self.name, node, f"LayerNorm({list(ln.normalized_shape)})", "ChannelLayerNorm (over channels)")
            return ctx.replace_module(node, channel_ln)
        args = [
            ctx.new(arg(node, i, name, default))
            for i, (name, default) in enumerate(
                [("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5)]
            )
        ]
        ctx.record(self.name, node, "layer_norm over features", "layer_norm_channels (over channels)")
        return ctx.call(layer_norm_channels, *args)
