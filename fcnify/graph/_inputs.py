"""The input size of a model, and example inputs for it: one owner for both.

``input_size`` is ``(C, H, W)`` everywhere fcnify reports it. A user may give ``(H, W)``,
``(C, H, W)`` or an int; :func:`resolve_input_size` turns any of them into ``(C, H, W)``,
taking what is missing from the model, always in the same order:

* the size: the argument, else the model's ``fcnify_input_size`` (set by
  :func:`fcnify.load_model` from torchvision's weight metadata, and carried by every
  converted model), else timm's ``pretrained_cfg["input_size"]``;
* the channels: the argument, else ``fcnify_input_size`` when it is ``(C, H, W)``, else
  ``pretrained_cfg``, else the first convolution of the (traced) model.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .._errors import FcnifyError

__all__ = ["resolve_input_size", "example_input", "device_and_dtype", "InputSize"]

#: What users may pass as an input size: ``224``, ``(224, 224)`` or ``(3, 224, 224)``.
InputSize = Union[int, Sequence[int]]


#: No tensor side can exceed this (PyTorch indexes with 32-bit ints in many kernels).
_MAX_SIDE = 2**31 - 1


def _as_tuple(input_size: InputSize) -> Tuple[int, ...]:
    """The sizes as ints; a string, a bool, a float or anything else not an integer is refused."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        return (input_size, input_size)
    try:
        if isinstance(input_size, (str, bytes, bool)):
            raise TypeError
        return tuple(operator.index(s) for s in input_size)  # type: ignore[union-attr]
    except TypeError:
        raise FcnifyError(
            f"input_size must be (H, W) or (C, H, W) of integers, got {input_size!r}. Hint: input_size=(224, 224)."
        ) from None


def resolve_input_size(
    model: nn.Module, input_size: Optional[InputSize] = None, gm: Optional[fx.GraphModule] = None
) -> Tuple[int, int, int]:
    """``(C, H, W)`` from ``input_size`` (``(H, W)``, ``(C, H, W)`` or an int) and the model.

    Args:
        model: the model the size is for.
        input_size: the size asked for; None takes the model's own (see the module docstring).
        gm: a traced copy of ``model``, searched for the first convolution when no other
            source names the channels.

    Raises:
        FcnifyError: no size given and none recorded, a malformed size, or no way to tell
            the channels.

    Example:
        >>> import torch
        >>> resolve_input_size(torch.nn.Conv2d(1, 4, 3), (28, 28))
        (1, 28, 28)
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg_size = tuple(cfg.get("input_size", ())) or None
    recorded = getattr(model, "fcnify_input_size", None)
    recorded = _as_tuple(recorded) if recorded is not None else None
    if input_size is None:
        input_size = recorded or cfg_size
        if input_size is None:
            raise FcnifyError(
                f"input_size is required for {type(model).__name__}: the model carries no pretrained config "
                "that names its training size. Hint: fcnify.convert(model, input_size=(224, 224))."
            )
    size = _as_tuple(input_size)
    if len(size) not in (2, 3) or min(size) < 1:
        raise FcnifyError(
            f"input_size must be (H, W) or (C, H, W) with positive sizes, got {input_size}. "
            "Hint: input_size=(224, 224)."
        )
    if max(size) > _MAX_SIDE:
        raise FcnifyError(
            f"input_size {input_size} is larger than any image a tensor can hold ({_MAX_SIDE} pixels a side). "
            "Hint: input_size is the training size, e.g. (224, 224)."
        )
    if len(size) == 3:
        return (size[0], size[1], size[2])
    if recorded is not None and len(recorded) == 3:
        channels = recorded[0]
    elif cfg_size:
        channels = cfg_size[0]
    else:
        channels = _first_conv_channels(model, gm)
    return (channels, size[0], size[1])


def _first_conv_channels(model: nn.Module, gm: Optional[fx.GraphModule]) -> int:
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                for m in gm.get_submodule(node.target).modules():
                    if isinstance(m, nn.Conv2d):
                        return m.in_channels
            if node.op == "call_function" and node.target is torch.nn.functional.conv2d:
                weight = node.args[1]
                if isinstance(weight, fx.Node) and weight.op == "get_attr":
                    w = gm.get_parameter(weight.target)
                    return w.shape[1] * (node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise FcnifyError(
        f"cannot infer the input channels of {type(model).__name__}: it has no Conv2d. Hint: pass input_size=(C, H, W)."
    )


def device_and_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where a model runs and in what precision: its first parameter's (CPU, float32 without one).

    >>> device_and_dtype(torch.nn.Linear(2, 2).double())
    (device(type='cpu'), torch.float64)
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return device, dtype


def example_input(model: nn.Module, input_size: Sequence[int], batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded normal input ``(batch_size, C, H, W)`` on the model's device and dtype."""
    device, dtype = device_and_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *input_size, generator=generator).to(device=device, dtype=dtype)
