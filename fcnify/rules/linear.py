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

from .._rewrite import Context
from ._common import arg, first_input, is_call


def _conv_weight(weight: torch.Tensor, info, kernel) -> torch.Tensor:
    k = weight.shape[0]
    if info.fold is not None:
        weight = weight.reshape(k, info.channels, -1) @ info.fold.to(weight)
    return weight.reshape(k, info.channels, *kernel)


class LinearToConv:
    name = "LinearToConv"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        src = first_input(node)
        info = ctx.lifted(src)
        if info is None or info.kind != "vec":
            return False
        if node.op == "call_module":
            return isinstance(ctx.module(node), nn.Linear)
        return is_call(node, (F.linear, torch._C._nn.linear))

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        src = first_input(node)
        info = ctx.lifted(src)
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
        ctx.record(self.name, node, f"Linear({features} -> {out})", after)
        ctx.info[node] = info.derive(kind="vec", channels=out, kernel=(1, 1), fold=None)
        return value
