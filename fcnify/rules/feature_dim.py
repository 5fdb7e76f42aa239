"""FeatureDimToChannel: ops that name the feature axis of ``(N, F)`` name the channel axis.

Identity: for ``v = x[:, :, i, j]``, ``softmax(v, dim=-1) == softmax(x, dim=1)[:, :, i, j]``;
likewise ``log_softmax``, ``cat``, ``normalize``, reductions over features with
``keepdim=True`` and slices ``v[:, a:b]``. Axis 1 or -1 of a vector becomes axis 1.
Shape queries (``x.size(0)``, ``x.shape[0]``) read the same axes of the map.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._rewrite import Context
from ._common import arg, is_call

_DIM_FUNCTIONS = {  # function -> (position of dim, default dim)
    F.softmax: (1, None),
    F.log_softmax: (1, None),
    torch.softmax: (1, None),
    torch.log_softmax: (1, None),
    F.normalize: (2, 1),
    torch.logsumexp: (1, None),
}
_DIM_METHODS = {"softmax": 1, "log_softmax": 1, "logsumexp": 1}
_REDUCE = ("sum", "mean", "amax", "amin", "norm")
_CAT = (torch.cat, torch.concat, torch.concatenate)


def _vector(node, ctx: Context):
    info = ctx.lifted(node)
    return info if info is not None and info.kind == "vec" else None


def _channel_dim(dim, node: fx.Node, ctx: Context) -> int:
    if dim in (1, -1):
        return 1
    raise ctx.unsupported(
        node,
        f"it works along axis {dim} of a feature vector, not along the features",
        "only operations along the feature axis (1 or -1) have a per-position equivalent",
    )


class FeatureDimToChannel:
    name = "FeatureDimToChannel"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_module":
            return isinstance(ctx.module(node), (nn.Softmax, nn.LogSoftmax)) and _vector(node.args[0], ctx) is not None
        if is_call(node, tuple(_CAT)):
            tensors = arg(node, 0, "tensors")
            return isinstance(tensors, (list, tuple)) and any(_vector(t, ctx) is not None for t in tensors)
        if not node.args or _vector(node.args[0], ctx) is None:
            return False
        if node.op == "call_function":
            if node.target is getattr:
                return node.args[1] == "shape"
            return node.target in _DIM_FUNCTIONS or node.target is operator.getitem
        return node.op == "call_method" and (
            node.target in _DIM_METHODS or node.target in _REDUCE or node.target == "size"
        )

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        if node.op == "call_module":
            module = ctx.module(node)
            dim = _channel_dim(module.dim, node, ctx)
            replacement = type(module)(dim=dim)
            ctx.info[node] = ctx.lifted(node.args[0]).derive(affine=False)
            return ctx.replace_module(node, replacement)
        if is_call(node, tuple(_CAT)):
            return self._cat(node, ctx)
        info = _vector(node.args[0], ctx)
        if node.target is operator.getitem:
            return self._getitem(node, info, ctx)
        if node.target is getattr:  # x.shape of (N, F) is the first two axes of the map
            return ctx.call(operator.getitem, ctx.call(getattr, ctx.env[node.args[0]], "shape"), slice(None, 2))
        if node.op == "call_method" and node.target == "size":
            dim = arg(node, 1, "dim")
            new_dim = dim if dim is None or dim in (0, 1) else {-1: 1, -2: 0}.get(dim, dim)
            return ctx.method("size", ctx.env[node.args[0]], *(() if new_dim is None else (new_dim,)))
        if node.op == "call_method" and node.target in _REDUCE:
            return self._reduce(node, info, ctx)
        position, default = _DIM_FUNCTIONS.get(node.target, (_DIM_METHODS.get(node.target), None))
        dim = _channel_dim(arg(node, position, "dim", default), node, ctx)
        args = list(ctx.new(node.args))
        kwargs = dict(ctx.new(node.kwargs))
        if len(args) > position:
            args[position] = dim
        else:
            kwargs["dim"] = dim
        ctx.info[node] = info.derive(affine=False)
        if node.op == "call_method":
            return ctx.graph.call_method(node.target, tuple(args), kwargs)
        return ctx.graph.call_function(node.target, tuple(args), kwargs)

    def _cat(self, node: fx.Node, ctx: Context) -> fx.Node:
        tensors = arg(node, 0, "tensors")
        infos = [_vector(t, ctx) for t in tensors]
        if any(i is None or i.kernel != (1, 1) for i in infos):
            raise ctx.unsupported(node, "it concatenates feature vectors with other tensors", "report this model")
        dim = _channel_dim(arg(node, 1, "dim", 0), node, ctx)
        ctx.info[node] = infos[0].derive(
            channels=ctx.shape(node)[1],
            pools=tuple(sorted({p for i in infos for p in i.pools})),
            affine=all(i.affine for i in infos),
        )
        return ctx.call(node.target, [ctx.env[t] for t in tensors], dim)

    def _getitem(self, node: fx.Node, info, ctx: Context) -> fx.Node:
        index = node.args[1]
        if not isinstance(index, tuple):
            index = (index,)
        if index and index[0] is Ellipsis and len(index) == 2:
            index = (slice(None), index[1])
        if len(index) != 2 or index[0] != slice(None) or not isinstance(index[1], slice):
            raise ctx.unsupported(
                node,
                f"it indexes the feature vector with {node.args[1]!r}",
                "only slices of the features, x[:, a:b], have a per-position equivalent",
            )
        ctx.info[node] = info.derive(channels=ctx.shape(node)[1])
        return ctx.call(operator.getitem, ctx.env[node.args[0]], index)

    def _reduce(self, node: fx.Node, info, ctx: Context) -> fx.Node:
        dim = arg(node, 1, "dim") if node.target != "norm" else arg(node, 2, "dim")
        keepdim = arg(node, 2 if node.target != "norm" else 3, "keepdim", False)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        dim = _channel_dim(dim, node, ctx)
        if not keepdim:
            raise ctx.unsupported(
                node,
                "it reduces the features without keepdim, leaving no feature axis to place positions on",
                "use keepdim=True",
            )
        kwargs = dict(ctx.new(node.kwargs))
        kwargs.update(dim=dim, keepdim=True)
        args = [ctx.env[node.args[0]]]
        if node.target == "norm":
            kwargs["p"] = arg(node, 1, "p", "fro")
        ctx.info[node] = info.derive(channels=1, affine=info.affine and node.target in ("sum", "mean"))
        return ctx.graph.call_method(node.target, tuple(args), kwargs)
