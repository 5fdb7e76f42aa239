"""Helpers the rules share: reading fx arguments and naming ops."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.fx as fx


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))
