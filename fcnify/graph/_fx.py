"""Small torch.fx helpers, one copy each: reading and writing call arguments, naming ops and targets.

Every layer that reads a graph (geometry, the rules, output stride, head resizing, export)
asks these rather than writing its own.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "arg",
    "set_arg",
    "is_call",
    "first_input",
    "normalize_dims",
    "op_name",
    "parent_name",
    "fetch_attr",
    "is_flatten",
    "is_adaptive_pool",
    "ADAPTIVE_POOL_FUNCTIONS",
]

#: The functional adaptive pools (the modules are ``nn.AdaptiveAvgPool2d`` / ``nn.AdaptiveMaxPool2d``).
ADAPTIVE_POOL_FUNCTIONS = {F.adaptive_avg_pool2d: "avg", F.adaptive_max_pool2d: "max"}


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Set argument ``name`` of a call where it was given: by position ``index``, else by keyword."""
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def is_call(node: fx.Node, functions: Sequence[Any] = (), methods: Sequence[str] = ()) -> bool:
    """True when ``node`` calls one of ``functions`` or one of the Tensor ``methods``."""
    if node.op == "call_function":
        return any(node.target is f for f in functions)
    if node.op == "call_method":
        return node.target in methods
    return False


def first_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a call works on: ``self`` of a method, first argument of a function or module."""
    if not node.args:
        return None
    first = node.args[0]
    return first if isinstance(first, fx.Node) else None


def normalize_dims(dims: Any, ndim: int) -> Optional[tuple]:
    """``dim`` argument as a sorted tuple of non-negative axes (None when absent)."""
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = (dims,)
    try:
        return tuple(sorted(d % ndim for d in dims))
    except TypeError:
        return None


def op_name(node: fx.Node) -> str:
    """``.view()`` for a method, the function's name otherwise."""
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def parent_name(target: str) -> Tuple[str, str]:
    """``"layer4.1.conv"`` -> ``("layer4.1", "conv")`` (torch.fx's ``_parent_name``).

    >>> parent_name("fc"), parent_name("head.fc")
    (('', 'fc'), ('head', 'fc'))
    """
    parent, _, name = target.rpartition(".")
    return parent, name


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The submodule, parameter or buffer at the dotted path ``target`` of ``root``."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def is_flatten(node: fx.Node, root: nn.Module) -> bool:
    """``nn.Flatten``, ``torch.flatten``/``torch.reshape`` or ``.view``/``.reshape``/``.flatten``."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), nn.Flatten)
    return is_call(node, (torch.flatten, torch.reshape), ("view", "reshape", "flatten"))


def is_adaptive_pool(node: fx.Node, root: nn.Module) -> bool:
    """An adaptive average or max pool, as a module of ``root`` or as a function."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    return node.op == "call_function" and node.target in ADAPTIVE_POOL_FUNCTIONS
