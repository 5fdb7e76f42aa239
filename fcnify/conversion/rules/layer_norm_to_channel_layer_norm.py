"""LayerNormToChannelLayerNorm: a LayerNorm over features becomes a layer norm over channels.

Identity: ``LayerNorm(F)`` over the last axis of ``(N, F)`` equals a layer norm over the
channel axis at each position of ``(N, F, H, W)`` (``ChannelLayerNorm``, same parameters).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...graph import arg, first_input, is_call
from .._rewrite import Context
from .._runtime import ChannelLayerNorm, layer_norm_channels
from ._base import Found, Match, Rule
from ._norms import on_vector, per_feature_only

__all__ = ["LayerNormToChannelLayerNorm"]


class LayerNormToChannelLayerNorm(Rule):
    def check(self, node: fx.Node, ctx: Context) -> Found:
        if node.op == "call_module":
            norm = isinstance(ctx.module(node), nn.LayerNorm)
        else:
            norm = is_call(node, (F.layer_norm,))
        if not norm:
            return self.skip(node)
        return on_vector(self, node, ctx)

    def rewrite(self, node: fx.Node, ctx: Context, match: Match) -> fx.Node:
        per_feature_only(node, ctx)
        info = ctx.lifted(first_input(node))
        ctx.info[node] = info.derive(affine=False)
        if node.op == "call_module":
            ln = ctx.module(node)
            channel_ln = ChannelLayerNorm(ln.normalized_shape, ln.eps, ln.elementwise_affine)
            channel_ln.load_state_dict(ln.state_dict())
            channel_ln = channel_ln.to(ln.weight.device) if ln.weight is not None else channel_ln
            self.record(ctx, node, f"LayerNorm({list(ln.normalized_shape)})", "ChannelLayerNorm (over channels)")
            return ctx.replace_module(node, channel_ln)
        args = [
            ctx.new(arg(node, i, name, default))
            for i, (name, default) in enumerate(
                [("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5)]
            )
        ]
        self.record(ctx, node, "layer_norm over features", "layer_norm_channels (over channels)")
        return ctx.call(layer_norm_channels, *args)
