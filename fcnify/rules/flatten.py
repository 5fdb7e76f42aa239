"""FlattenToIdentity: a flatten of the feature map is dropped; the map is carried instead.

Identity: ``flatten(x[C, h, w])[c*h*w + i*w + j] == x[c, i, j]``, so a head that reads the
flattened vector can read the map itself, as long as the next Linear is turned into a
``(h, w)`` convolution (see :mod:`fcnify.rules.linear`). Every spelling of a flatten
is recognised by its shapes at the training size: ``torch.flatten``, ``nn.Flatten``,
``.flatten(1)``, ``.view(N, -1)``, ``.view(-1, C*h*w)``, ``.reshape(...)``,
``.squeeze(-1).squeeze(-1)``; and the way back, ``.view(N, F, 1, 1)``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch import nn

from .._rewrite import Context, Lifted, is_map_shape
from ._common import first_input, is_call

_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous")
_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)


def is_reshape(node: fx.Node, ctx: Context) -> bool:
    if node.op == "call_module":
        return isinstance(ctx.module(node), (nn.Flatten, nn.Unflatten))
    return is_call(node, _FUNCTIONS, _METHODS)


class FlattenToIdentity:
    name = "FlattenToIdentity"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return is_reshape(node, ctx) and first_input(node) is not None and ctx.shape(first_input(node)) is not None

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        src = first_input(node)
        before, after = ctx.shape(src), ctx.shape(node)
        info = ctx.lifted(src)
        if after is None or after[0] != before[0] or math.prod(after) != math.prod(before):
            raise ctx.unsupported(
                node,
                f"it reshapes {before} to {after}, mixing the batch axis with features",
                "write the flatten as x.flatten(1) (or nn.Flatten()) so that the batch stays the first axis",
            )
        if info is None or info.kind == "map":
            return self._from_map(node, src, info, ctx)
        if info.kind == "flat":
            if len(after) == 2:
                ctx.info[node] = info.derive(kind="vec")
            elif len(after) == 3 and after[1] == info.channels:
                ctx.info[node] = info
            else:
                raise ctx.unsupported(
                    node,
                    f"it reshapes the flattened feature map {before} to {after}: the features no longer "
                    "stay on their own axis (this is how a map becomes a sequence of tokens)",
                    "only CNN heads that pool or flatten the map and then apply per-vector layers convert",
                )
            return ctx.env[src]
        # A vector: the same vector again, or back to a (N, F, 1, 1) map.
        if len(after) == 2:
            ctx.info[node] = info
        elif info.kernel == (1, 1) and after[1] == before[1] and all(d == 1 for d in after[2:]):
            ctx.info[node] = info.derive(kind="map" if len(after) == 4 else "flat", axes=(2, 3))
        else:
            raise ctx.unsupported(
                node,
                f"it reshapes the feature vector {before} to {after}",
                "only reshapes that keep the features on one axis can be applied at every position",
            )
        return ctx.env[src]

    def _from_map(self, node: fx.Node, src: fx.Node, info, ctx: Context) -> fx.Node:
        before, after = ctx.shape(src), ctx.shape(node)
        if not is_map_shape(before):
            return ctx.copy(node)  # not a feature map (e.g. a size tensor)
        if len(after) == 4:
            ctx.info[node] = info
            return ctx.env[src]
        if info is not None and info.stacked > 1:
            return self._unstack(node, src, info, ctx)
        axes = ctx.spatial_axes(src)
        channel = ({1, 2, 3} - set(axes)).pop()
        if info is not None and info.fold is not None:
            kernel, channels = info.kernel, info.channels
        else:
            kernel, channels = (before[axes[0]], before[axes[1]]), before[channel]
        if len(after) == 3 and after[1] != channels:
            raise ctx.unsupported(
                node,
                f"it turns the feature map {before} into {after}, a sequence of tokens rather than "
                "features per position; the logits then do not come from a spatial map",
                "fcnify converts CNN heads; a transformer head (class token, attention pooling) has no "
                "per-position equivalent: use the model's own support for other sizes, or convert "
                "with mode='global' if the head pools the map",
            )
        if kernel != (1, 1) and tuple(axes) != (2, 3):
            raise ctx.unsupported(
                node,
                f"it flattens a channels-last map {before} of {kernel[0]}x{kernel[1]} positions",
                "put the map in NCHW order (permute(0, 3, 1, 2)) before flattening",
            )
        value = ctx.to_nchw(src, axes) if info is None or info.fold is None else ctx.env[src]
        lifted = Lifted(
            kind="vec" if len(after) == 2 else "flat",
            channels=channels,
            kernel=kernel,
            fold=None if info is None else info.fold,
            pools=() if info is None else info.pools,
            affine=True if info is None else info.affine,
        )
        ctx.info[node] = lifted
        if len(after) == 2:
            ctx.record(self.name, node, f"flatten({channels}x{kernel[0]}x{kernel[1]})", "identity (the map is kept)")
        return value

    def _unstack(self, node: fx.Node, src: fx.Node, info, ctx: Context) -> fx.Node:
        """``(N, C, P * H', W')`` -> ``(N, C * P, H', W')``: the order of ``flatten(x[C, oh, ow])``."""
        before, after = ctx.shape(src), ctx.shape(node)
        if len(after) != 2:
            raise ctx.unsupported(
                node, f"it reshapes the pooled map {before} to {after}", "flatten the pooled map with x.flatten(1)"
            )
        value = ctx.env[src]
        shape = ctx.call(getattr, value, "shape")
        n, h, w = (ctx.call(operator.getitem, shape, i) for i in (0, 2, 3))
        height = ctx.call(operator.floordiv, h, info.stacked)
        value = ctx.method("reshape", value, n, before[1] * info.stacked, height, w)
        ctx.info[node] = Lifted(kind="vec", channels=before[1] * info.stacked, pools=info.pools, affine=info.affine)
        ctx.record(
            self.name,
            node,
            f"flatten({before[1]}x{info.kernel[0]}x{info.kernel[1]})",
            "pooled positions moved into channels",
        )
        return value
