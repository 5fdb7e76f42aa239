"""AdaptivePoolFold: an adaptive pool to a fixed size is the identity at that size, or a linear map folded on.

Identity: an adaptive pool to ``(oh, ow)`` of a map that already has that size is the identity;
otherwise it is a linear map ``P`` over positions, folded into the next Linear:
``W[k, c, o] -> sum_o W[k, c, o] P[o, p]``. When no Linear follows directly, every window is
pooled at once by a depthwise convolution whose kernels are the rows of ``P``.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...graph import first_input, is_adaptive_pool, is_flatten
from .._rewrite import Context, Lifted, is_map_shape
from ._base import Found, Match, Rule
from ._pools import pool_kind

__all__ = ["AdaptivePoolFold"]


@dataclasses.dataclass
class AdaptivePool(Match):
    """An adaptive pool of the map ``src`` from ``size`` to ``out_size``."""

    src: fx.Node
    size: Tuple[int, int]
    out_size: Tuple[int, int]


class AdaptivePoolFold(Rule):
    def check(self, node: fx.Node, ctx: Context) -> Found:
        if not is_adaptive_pool(node, ctx.gm):
            return self.skip(node)
        src = first_input(node)
        shape, out = ctx.shape(src), ctx.shape(node)
        if not is_map_shape(shape) or out is None:
            return self.decline(node, f"its input {shape} is not a 4-d feature map")
        info = ctx.lifted(src)
        if info is not None and (info.kind != "map" or info.fold is not None):
            return self.decline(node, "its input was already pooled or flattened in the head")
        return AdaptivePool(src, (shape[2], shape[3]), (out[2], out[3]))

    def rewrite(self, node: fx.Node, ctx: Context, match: Match) -> fx.Node:
        assert isinstance(match, AdaptivePool)
        src, size, out_size = match.src, match.size, match.out_size
        channels = ctx.shape(src)[1]
        if size == out_size:
            self.record(
                ctx, node, f"adaptive pool to {out_size[0]}x{out_size[1]}", "removed (identity at training size)"
            )
            ctx.info[node] = Lifted(kind="map", channels=channels, axes=(2, 3))
            return ctx.env[src]
        if pool_kind(node, ctx) != "avg":
            raise ctx.unsupported(
                node,
                f"an adaptive max pool from {size[0]}x{size[1]} to {out_size[0]}x{out_size[1]} is not linear "
                "and cannot be folded into the next layer",
                f"convert at an input size where the map is already {out_size[0]}x{out_size[1]}",
            )
        positions = size[0] * size[1]
        basis = torch.eye(positions).view(positions, 1, *size)
        fold = F.adaptive_avg_pool2d(basis, out_size).reshape(positions, -1).t().contiguous()
        if not all(is_flatten(user, ctx.gm) for user in node.users):
            return self._stack(node, src, fold, size, out_size, ctx)
        self.record(
            ctx,
            node,
            f"adaptive avg pool {size[0]}x{size[1]} -> {out_size[0]}x{out_size[1]}",
            "folded into the next layer's kernel",
        )
        ctx.info[node] = Lifted(kind="map", channels=channels, kernel=size, fold=fold, axes=(2, 3))
        return ctx.env[src]

    def _stack(self, node: fx.Node, src: fx.Node, fold: torch.Tensor, size, out_size, ctx: Context) -> fx.Node:
        """Pool every window at once: a depthwise conv whose kernels are the rows of ``P``.

        ``y[c, o, i, j] = sum_p P[o, p] x[c, i + p_h, j + p_w]``, carried as
        ``(N, C, O * H', W')`` so that the per-position layers that follow apply unchanged.
        """
        channels = ctx.shape(src)[1]
        outputs = fold.shape[0]
        weight = fold.reshape(1, outputs, 1, *size).expand(channels, -1, -1, -1, -1)
        weight = ctx.constant(f"pool_{node.name}", weight.reshape(channels * outputs, 1, *size).contiguous())
        value = ctx.env[src]
        weight = ctx.method("to", weight, value)
        value = ctx.call(F.conv2d, value, weight, None, 1, 0, 1, channels)
        shape = ctx.call(getattr, value, "shape")
        n, h, w = (ctx.call(operator.getitem, shape, i) for i in (0, 2, 3))
        value = ctx.method("reshape", value, n, channels, ctx.call(operator.mul, h, outputs), w)
        self.record(
            ctx,
            node,
            f"adaptive avg pool {size[0]}x{size[1]} -> {out_size[0]}x{out_size[1]}",
            f"depthwise conv2d({size[0]}x{size[1]}) giving the {outputs} pooled positions of every window",
        )
        ctx.info[node] = Lifted(kind="map", channels=channels, kernel=tuple(out_size), axes=(2, 3), stacked=outputs)
        return value
