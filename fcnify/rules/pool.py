"""Pools over the feature map: global pools become window pools, adaptive pools are folded.

``GlobalPoolToWindowPool``: a pool over the whole ``h x w`` training-size map is, at a
larger size, the same pool slid with stride 1: ``mean(x[:, :, i:i+h, j:j+w]) ==
avg_pool2d(x, (h, w), stride=1)[:, :, i, j]`` (likewise max and sum). Per mode:
``window`` slides it, ``dense`` drops it (one prediction per cell), ``global`` keeps it
global with an adaptive pool (which also strips a fixed-size ``AvgPool2d(7)``).

``AdaptivePoolFold``: an adaptive pool to ``(oh, ow) != (1, 1)`` is the identity when the
map already has that size, and otherwise a linear map ``P`` over positions, folded into
the next Linear: ``W[k, c, o] -> sum_o W[k, c, o] P[o, p]``.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._rewrite import Context, Lifted, is_map_shape
from ._common import arg, first_input, is_call, normalize_dims

_REDUCTIONS = {"mean": "avg", "sum": "sum", "amax": "max"}
_ADAPTIVE = {F.adaptive_avg_pool2d: "avg", F.adaptive_max_pool2d: "max"}
_FIXED = {F.avg_pool2d: "avg", F.max_pool2d: "max"}


def _as_pair(value) -> Tuple[Optional[int], Optional[int]]:
    if isinstance(value, (tuple, list)):
        return tuple(value)  # type: ignore[return-value]
    return (value, value)


def _pool_kind(node: fx.Node, ctx: Context) -> Optional[str]:
    """avg/max for any 2-d pool module or function, else None."""
    if node.op == "call_module":
        m = ctx.module(node)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            return "avg"
        if isinstance(m, (nn.AdaptiveMaxPool2d, nn.MaxPool2d)):
            return "max"
        return None
    if node.op == "call_function":
        return _ADAPTIVE.get(node.target) or _FIXED.get(node.target)
    return None


def _global_reduction(node: fx.Node, ctx: Context) -> Optional[Tuple[str, bool]]:
    """(kind, keepdim) when ``node`` reduces every position of a map (or flattened map)."""
    src = first_input(node)
    shape = ctx.shape(src)
    out = ctx.shape(node)
    if shape is None or out is None:
        return None
    info = ctx.lifted(src)
    kind = _pool_kind(node, ctx)
    if kind is not None:
        if not is_map_shape(shape) or (info is not None and info.kind != "map"):
            return None
        axes = ctx.spatial_axes(src)
        if axes != (2, 3) or tuple(out[2:]) != (1, 1):
            return None
        if _padding_changes_result(node, ctx, kind):
            return None
        return kind, True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in _REDUCTIONS:
        return None
    if node.op == "call_function" and getattr(torch, name, None) is not node.target:
        return None
    dims = normalize_dims(arg(node, 1, "dim"), len(shape))
    keepdim = bool(arg(node, 2, "keepdim", False))
    if info is not None and info.kind == "flat":
        spatial = (len(shape) - 1,)
    elif is_map_shape(shape) and (info is None or info.kind == "map"):
        spatial = tuple(sorted(ctx.spatial_axes(src)))
    else:
        return None
    return (_REDUCTIONS[name], keepdim) if dims == spatial else None


def _padding_changes_result(node: fx.Node, ctx: Context, kind: str) -> bool:
    """A fixed-kernel pool is global only if its single window covers the map exactly."""
    if node.op == "call_module":
        m = ctx.module(node)
        if not isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            return False
        kernel, padding = _as_pair(m.kernel_size), _as_pair(m.padding)
    elif node.target in _FIXED:
        kernel, padding = _as_pair(arg(node, 1, "kernel_size")), _as_pair(arg(node, 3, "padding", 0))
    else:
        return False
    size = tuple(ctx.shape(first_input(node))[2:])
    return tuple(kernel) != size or any(padding)


class GlobalPoolToWindowPool:
    name = "GlobalPoolToWindowPool"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return _global_reduction(node, ctx) is not None

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        kind, keepdim = _global_reduction(node, ctx)
        src = first_input(node)
        info = ctx.lifted(src)
        if info is not None and info.kind == "flat":
            value, axes, kernel, channels = ctx.env[src], (2, 3), info.kernel, info.channels
        else:
            axes = ctx.spatial_axes(src)
            shape = ctx.shape(src)
            value = ctx.to_nchw(src, axes)
            kernel, channels = (shape[axes[0]], shape[axes[1]]), shape[({1, 2, 3} - set(axes)).pop()]
        described = f"global {kind} pool over {channels}x{kernel[0]}x{kernel[1]}"
        if ctx.mode == "window":
            if kernel == (1, 1):
                after = "identity (1x1 map)"
            elif kind == "max":
                value, after = ctx.call(F.max_pool2d, value, kernel, 1), f"max_pool2d(kernel={kernel}, stride=1)"
            else:
                divisor = 1 if kind == "sum" else None
                value = ctx.call(F.avg_pool2d, value, kernel, 1, divisor_override=divisor)
                after = f"avg_pool2d(kernel={kernel}, stride=1{', sum' if divisor else ''})"
        elif ctx.mode == "dense":
            after = "removed (one prediction per feature-map cell)"
        else:
            if kind == "max":
                value = ctx.call(F.adaptive_max_pool2d, value, 1)
            elif kind == "avg":
                value = ctx.call(F.adaptive_avg_pool2d, value, 1)
            else:
                value = ctx.method("sum", value, (2, 3), keepdim=True)
            after = f"adaptive {kind} pool to 1x1 (any input size)"
        ctx.record(self.name, node, described, after)
        pools = tuple(sorted({*(info.pools if info is not None else ()), kind}))
        if keepdim and not (info is not None and info.kind == "flat"):
            if tuple(axes) != (2, 3):  # back to the layout the head expects
                order = [0, 0, 0, 0]
                channel = ({1, 2, 3} - set(axes)).pop()
                for new_axis, old_axis in enumerate((0, channel, axes[0], axes[1])):
                    order[old_axis] = new_axis
                value = ctx.method("permute", value, *order)
            ctx.info[node] = Lifted(kind="map", channels=channels, axes=tuple(axes), pools=pools)
        else:
            kind_out = "flat" if keepdim else "vec"
            ctx.info[node] = Lifted(kind=kind_out, channels=channels, pools=pools)
        return value


def _is_flatten(node: fx.Node, ctx: Context) -> bool:
    if node.op == "call_module":
        return isinstance(ctx.module(node), nn.Flatten)
    return is_call(node, (torch.flatten, torch.reshape), ("view", "reshape", "flatten"))


class AdaptivePoolFold:
    name = "AdaptivePoolFold"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_module":
            if not isinstance(ctx.module(node), (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                return False
        elif not is_call(node, tuple(_ADAPTIVE)):
            return False
        src = first_input(node)
        info = ctx.lifted(src)
        if not is_map_shape(ctx.shape(src)):
            return False
        return info is None or (info.kind == "map" and info.fold is None)

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        src = first_input(node)
        shape, out = ctx.shape(src), ctx.shape(node)
        size, out_size = tuple(shape[2:]), tuple(out[2:])
        if size == out_size:
            ctx.record(
                self.name, node, f"adaptive pool to {out_size[0]}x{out_size[1]}", "removed (identity at training size)"
            )
            ctx.info[node] = Lifted(kind="map", channels=shape[1], axes=(2, 3))
            return ctx.env[src]
        if _pool_kind(node, ctx) != "avg":
            raise ctx.unsupported(
                node,
                f"an adaptive max pool from {size[0]}x{size[1]} to {out_size[0]}x{out_size[1]} is not linear "
                "and cannot be folded into the next layer",
                f"convert at an input size where the map is already {out_size[0]}x{out_size[1]}",
            )
        positions = size[0] * size[1]
        basis = torch.eye(positions).view(positions, 1, *size)
        fold = F.adaptive_avg_pool2d(basis, out_size).reshape(positions, -1).t().contiguous()
        if not all(_is_flatten(user, ctx) for user in node.users):
            return self._stack(node, src, fold, size, out_size, ctx)
        ctx.record(
            self.name,
            node,
            f"adaptive avg pool {size[0]}x{size[1]} -> {out_size[0]}x{out_size[1]}",
            "folded into the next layer's kernel",
        )
        ctx.info[node] = Lifted(kind="map", channels=shape[1], kernel=size, fold=fold, axes=(2, 3))
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
        ctx.record(
            self.name,
            node,
            f"adaptive avg pool {size[0]}x{size[1]} -> {out_size[0]}x{out_size[1]}",
            f"depthwise conv2d({size[0]}x{size[1]}) giving the {outputs} pooled positions of every window",
        )
        ctx.info[node] = Lifted(kind="map", channels=channels, kernel=tuple(out_size), axes=(2, 3), stacked=outputs)
        return value
