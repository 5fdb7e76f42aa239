"""GlobalPoolToWindowPool: a pool over the whole training-size map becomes the same pool slid with stride 1.

Identity: for a map ``x`` of ``h x w`` positions at the training size,
``mean(x[:, :, i:i+h, j:j+w]) == avg_pool2d(x, (h, w), stride=1)[:, :, i, j]`` (likewise max
and sum). Per mode: ``window`` slides it, ``dense`` drops it (one prediction per cell),
``global`` keeps it global with an adaptive pool (which also strips a fixed-size ``AvgPool2d(7)``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...graph import arg, first_input, normalize_dims
from .._rewrite import Context, Lifted, is_map_shape
from ._base import Found, Match, Rule
from ._pools import FIXED_POOL_FUNCTIONS, as_pair, pool_kind

__all__ = ["GlobalPoolToWindowPool"]

_REDUCTIONS = {"mean": "avg", "sum": "sum", "amax": "max"}


@dataclasses.dataclass
class GlobalPool(Match):
    """A reduction of every position of a map: ``kind`` avg, max or sum, and whether it keeps dims."""

    kind: str
    keepdim: bool


def _global_reduction(node: fx.Node, ctx: Context) -> Union[GlobalPool, str, None]:
    """The global pool ``node`` is; a reason when it pools or reduces but not globally; None otherwise."""
    src = first_input(node)
    shape = ctx.shape(src)
    out = ctx.shape(node)
    kind = pool_kind(node, ctx)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    reduction = (
        node.op in ("call_method", "call_function")
        and name in _REDUCTIONS
        and (node.op == "call_method" or getattr(torch, str(name), None) is node.target)
    )
    if kind is None and not reduction:
        return None
    if shape is None or out is None:
        return "its input or output has no recorded shape"
    info = ctx.lifted(src)
    if kind is not None:
        if not is_map_shape(shape) or (info is not None and info.kind != "map"):
            return f"its input {shape} is not a 4-d feature map"
        if ctx.spatial_axes(src) != (2, 3) or tuple(out[2:]) != (1, 1):
            return f"it pools the {shape} map to {tuple(out[2:])}, not to one value per channel"
        if _padding_changes_result(node, ctx):
            return f"its window (or padding) does not cover the {shape[2]}x{shape[3]} map exactly"
        return GlobalPool(kind, True)
    dims = normalize_dims(arg(node, 1, "dim"), len(shape))
    keepdim = bool(arg(node, 2, "keepdim", False))
    if info is not None and info.kind == "flat":
        spatial: tuple = (len(shape) - 1,)
    elif is_map_shape(shape) and (info is None or info.kind == "map"):
        spatial = tuple(sorted(ctx.spatial_axes(src)))
    else:
        return f"it reduces a {len(shape)}-d value that is not a feature map"
    if dims != spatial:
        return f"it reduces axes {dims} of {shape}, not the spatial axes {spatial}"
    return GlobalPool(_REDUCTIONS[str(name)], keepdim)


def _padding_changes_result(node: fx.Node, ctx: Context) -> bool:
    """A fixed-kernel pool is global only if its single window covers the map exactly."""
    if node.op == "call_module":
        m = ctx.module(node)
        if not isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            return False
        kernel, padding = as_pair(m.kernel_size), as_pair(m.padding)
    elif node.target in FIXED_POOL_FUNCTIONS:
        kernel, padding = as_pair(arg(node, 1, "kernel_size")), as_pair(arg(node, 3, "padding", 0))
    else:
        return False
    size = tuple(ctx.shape(first_input(node))[2:])
    return tuple(kernel) != size or any(padding)


class GlobalPoolToWindowPool(Rule):
    def check(self, node: fx.Node, ctx: Context) -> Found:
        found = _global_reduction(node, ctx)
        if found is None:
            return self.skip(node)
        if isinstance(found, str):
            return self.decline(node, found)
        return found

    def rewrite(self, node: fx.Node, ctx: Context, match: Match) -> fx.Node:
        assert isinstance(match, GlobalPool)
        kind, keepdim = match.kind, match.keepdim
        src = first_input(node)
        info: Optional[Lifted] = ctx.lifted(src)
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
        self.record(ctx, node, described, after)
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
