"""LinearToConv: a Linear on feature vectors becomes a convolution over the map.

Identity ("kernel-size matching"): ``Linear(flatten(x[C, h, w])) == Conv2d(C, K, (h, w))(x)``
with ``W_conv = W.view(K, C, h, w)``; on pooled vectors ``h = w = 1`` and the Linear becomes
a 1x1 convolution. With an adaptive pool ``P`` folded in, ``W_conv = (W.view(K, C, o) @ P)
.view(K, C, h, w)``. Both ``nn.Linear`` and functional ``F.linear`` (as in timm's
``Linear``) are matched; the functional form keeps the model's own parameters.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...graph import arg, first_input, is_call
from .._rewrite import Context, Lifted
from ._base import Found, Match, Rule

__all__ = ["LinearToConv"]


def _conv_weight(weight: torch.Tensor, info, kernel) -> torch.Tensor:
    k = weight.shape[0]
    if info.fold is not None:
        weight = weight.reshape(k, info.channels, -1) @ info.fold.to(weight)
    return weight.reshape(k, info.channels, *kernel)


class OnVector(Match):
    """A Linear on the feature vector ``src``, carried as described by ``info``."""

    def __init__(self, src: fx.Node, info: Lifted):
        self.src, self.info = src, info


class LinearToConv(Rule):
    def check(self, node: fx.Node, ctx: Context) -> Found:
        if node.op == "call_module":
            linear = isinstance(ctx.module(node), nn.Linear)
        else:
            linear = is_call(node, (F.linear, torch._C._nn.linear))
        if not linear:
            return self.skip(node)
        src = first_input(node)
        info = ctx.lifted(src)
        if src is None or info is None or info.kind != "vec":
            what = "a value of the body" if info is None else f"a head value carried as {info.kind!r}"
            return self.decline(node, f"its input is {what}, not a feature vector")
        return OnVector(src, info)

    def rewrite(self, node: fx.Node, ctx: Context, match: Match) -> fx.Node:
        assert isinstance(match, OnVector)
        src, info = match.src, match.info
        kernel = info.kernel
        features = ctx.shape(src)[1]
        out = ctx.shape(node)[1]
        # a folded adaptive pool hands the Linear its output positions, not the map's
        positions = kernel[0] * kernel[1] if info.fold is None else info.fold.shape[0]
        if features != info.channels * positions:
            raise ctx.unsupported(
                node,
                f"it reads {features} features, not the {info.channels}x{positions} of the map",
                "report this model to fcnify's issue tracker",
            )
        if node.op == "call_module":
            linear = ctx.module(node)
            # skip_init: the weights are overwritten below; a random init of a large kernel costs seconds
            conv = nn.utils.skip_init(
                nn.Conv2d,
                info.channels,
                out,
                kernel,
                bias=linear.bias is not None,
                device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            with torch.no_grad():
                conv.weight.copy_(_conv_weight(linear.weight.detach(), info, kernel))
                if linear.bias is not None:
                    conv.bias.copy_(linear.bias.detach())
            conv.train(linear.training)
            value = ctx.replace_module(node, conv)
            after = f"Conv2d({info.channels}, {out}, kernel_size={kernel})"
        else:
            weight = ctx.new(arg(node, 1, "weight"))
            bias = ctx.new(arg(node, 2, "bias"))
            if info.fold is not None:
                fold = ctx.constant(f"fold_{node.name}", info.fold)
                weight = ctx.call(torch.matmul, ctx.method("reshape", weight, out, info.channels, -1), fold)
            weight = ctx.method("reshape", weight, out, info.channels, kernel[0], kernel[1])
            value = ctx.call(F.conv2d, ctx.env[src], weight, bias)
            after = f"conv2d(weight viewed as {out}x{info.channels}x{kernel[0]}x{kernel[1]})"
        self.record(ctx, node, f"Linear({features} -> {out})", after)
        ctx.info[node] = info.derive(kind="vec", channels=out, kernel=(1, 1), fold=None)
        return value
