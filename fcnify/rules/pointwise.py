"""PointwiseOnMaps: element-wise ops act the same at every position.

Identity: ``f(v)[c] == f(x)[c, i, j]`` for an element-wise ``f`` and ``v = x[:, i, j]``.
Unary activations and dropout stay as they are. A binary op whose other operand is a
per-feature tensor ``b`` of shape ``(F,)`` or ``(1, F)`` broadcast over the last axis of
``(N, F)`` gets ``b`` reshaped to ``(F, 1, 1)`` so it broadcasts over channels instead.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._rewrite import Context
from ._common import arg, op_name

_UNARY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.LeakyReLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.PReLU,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Threshold,
)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Dropout1d, nn.Dropout2d)
_UNARY_FUNCTIONS = (
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.mish,
    F.softplus,
    F.hardtanh,
    F.prelu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.clamp,
    torch.clip,
    torch.erf,
    torch.square,
    F.batch_norm,
    torch.nn.functional.logsigmoid,
)
_IDENTITY_FUNCTIONS = (F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d)
_BINARY_FUNCTIONS = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
)
_AFFINE_BINARY = (operator.add, operator.sub, torch.add, torch.sub)
_SCALING_BINARY = (operator.mul, operator.truediv, torch.mul, torch.div)
_UNARY_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "clamp",
    "clamp_",
    "clip",
    "square",
    "erf",
)
_IDENTITY_METHODS = ("float", "half", "double", "to", "type", "type_as", "clone", "detach", "contiguous")
_BINARY_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum")
_NEG = (operator.neg, torch.neg)


def _kind(node: fx.Node, ctx: Context) -> str:
    """identity | unary | binary | '' for ops that are not element-wise."""
    if node.op == "call_module":
        module = ctx.module(node)
        if isinstance(module, _IDENTITY_MODULES):
            return "identity"
        return "unary" if isinstance(module, _UNARY_MODULES) else ""
    if node.op == "call_function":
        if node.target in _IDENTITY_FUNCTIONS:
            return "identity"
        if node.target in _NEG:
            return "neg"
        if node.target in _UNARY_FUNCTIONS:
            return "unary"
        return "binary" if node.target in _BINARY_FUNCTIONS else ""
    if node.op == "call_method":
        if node.target in _IDENTITY_METHODS:
            return "identity"
        if node.target == "neg":
            return "neg"
        if node.target in _UNARY_METHODS:
            return "unary"
        return "binary" if node.target in _BINARY_METHODS else ""
    return ""


class PointwiseOnMaps:
    name = "PointwiseOnMaps"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return bool(_kind(node, ctx)) and any(ctx.lifted(a) is not None for a in node.all_input_nodes)

    def apply(self, node: fx.Node, ctx: Context) -> fx.Node:
        kind = _kind(node, ctx)
        lifted = [ctx.lifted(a) for a in node.all_input_nodes if ctx.lifted(a) is not None]
        first = lifted[0]
        if any(i.kind != first.kind for i in lifted):
            raise ctx.unsupported(node, "it combines feature vectors with feature maps", "report this model")
        if any(i.fold is not None for i in lifted) and kind != "identity":
            raise ctx.unsupported(
                node,
                "it acts on the output of an adaptive pool that resamples the map, which can only be folded "
                "into a Linear that follows it directly",
                "convert at an input size where the adaptive pool is the identity",
            )
        pools = tuple(sorted({p for i in lifted for p in i.pools}))
        affine = all(i.affine for i in lifted) and self._keeps_affine(node, kind, ctx)
        if kind == "binary":
            value = self._binary(node, first, ctx)
        else:
            value = ctx.copy(node)
        ctx.info[node] = first.derive(pools=pools, affine=affine)
        return value

    def _keeps_affine(self, node: fx.Node, kind: str, ctx: Context) -> bool:
        if kind in ("identity", "neg"):
            return True
        if node.target is F.batch_norm:
            return not arg(node, 5, "training", False)
        lifted_args = [a for a in node.args if isinstance(a, fx.Node) and ctx.lifted(a) is not None]
        target = node.target
        if node.op == "call_method":
            target = {
                "add": operator.add,
                "add_": operator.add,
                "sub": operator.sub,
                "sub_": operator.sub,
                "mul": operator.mul,
                "mul_": operator.mul,
                "div": operator.truediv,
                "div_": operator.truediv,
            }.get(node.target)
        if target in _AFFINE_BINARY:
            return True
        return (
            target in _SCALING_BINARY
            and len(lifted_args) == 1
            and (target not in (operator.truediv, torch.div) or ctx.lifted(node.args[0]) is not None)
        )

    def _binary(self, node: fx.Node, first, ctx: Context) -> fx.Node:
        """Reshape per-feature operands so that they broadcast over the channel axis."""

        def fix(a):
            if not isinstance(a, fx.Node) or ctx.lifted(a) is not None:
                return ctx.new(a)
            shape = ctx.shape(a)
            if shape is None or len(shape) == 0 or shape == (1,) or first.kind == "map":
                return ctx.new(a)
            if (
                first.kind == "vec"
                and first.kernel == (1, 1)
                and len(shape) <= 2
                and (len(shape) == 1 or shape[0] == 1)
            ):
                return ctx.method("reshape", ctx.env[a], *shape, 1, 1)
            raise ctx.unsupported(
                node,
                f"its operand '{a.name}' of shape {tuple(shape)} is not a per-feature tensor",
                f"only scalars and per-feature tensors of shape (F,) can be broadcast at every position ({op_name(node)})",
            )

        args = tuple(fix(a) for a in node.args)
        kwargs = {k: fix(v) for k, v in node.kwargs.items()}
        return self._emit(node, args, kwargs, ctx)

    @staticmethod
    def _emit(node: fx.Node, args, kwargs, ctx: Context) -> fx.Node:
        if node.op == "call_method":
            return ctx.graph.call_method(node.target, args, kwargs)
        return ctx.graph.call_function(node.target, args, kwargs)
