"""``fcnify.resize_head``: move a classifier whose head flattens a feature map to another input size.

A Linear over a flattened ``C x h x w`` map is the convolution with kernel ``W.view(K, C, h, w)``
(see the rule ``LinearToConv``). At a new input size the map is ``C x h' x w'``, so the
kernel is resampled to ``h' x w'`` and divided by the area ratio. Identity: for a map ``x``
upsampled by nearest neighbour by integer factors ``(f, g)``,
``<repeat(W, f, g) / (f g), repeat(x, f, g)> == <W, x>``, so the new head gives the original
logits exactly; for a bilinearly upsampled map it gives them closely.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._errors import FcnifyError, UnsupportedModelError, first_line
from ..graph import (
    InputSize,
    available_memory,
    check_memory,
    describe_node,
    example_input,
    format_bytes,
    parent_name,
    record_shapes,
    resolve_input_size,
    safe_deepcopy,
    trace_model,
)

__all__ = ["resize_head", "RESIZE_METHODS"]

#: ``nearest`` repeats kernel cells (exact for nearest-upsampled maps by integer factors);
#: ``interpolate`` interpolates them bilinearly (smooth, any ratio; antialiased when shrinking).
RESIZE_METHODS = ("interpolate", "nearest")

# ops a flattened map may pass through on its way to the Linear without changing its layout
_PASS_MODULES = (nn.Flatten, nn.Identity, nn.Dropout)
_PASS_FUNCTIONS = (torch.flatten, F.dropout)
_PASS_METHODS = ("flatten", "view", "reshape", "contiguous")


def resize_head(
    model: nn.Module,
    input_size: InputSize,
    new_input_size: InputSize,
    method: str = "interpolate",
) -> nn.Module:
    """A copy of ``model`` for inputs of ``new_input_size``, its flatten-Linear head resampled.

    The Linear that reads the flattened ``C x h x w`` feature map is viewed as a ``(h, w)``
    kernel, resampled to the map size ``(h', w')`` at ``new_input_size`` and rescaled by
    ``(h w) / (h' w')``, so that the new head on an upsampled map gives the old logits
    (exactly for nearest-neighbour upsampling by integer factors with ``method="nearest"``).
    The result warm-starts training at the new size. A model whose head does not depend on the
    input size (global pooling, or an adaptive pool before the Linear) is returned as a copy.

    Args:
        model: a classifier torch.fx can trace, whose head flattens a map into an ``nn.Linear``;
            it is not modified.
        input_size: the size ``(H, W)`` it was trained at (or an int for square inputs).
        new_input_size: the new input size.
        method: ``"interpolate"`` (bilinear kernel resampling) or ``"nearest"``.

    Returns:
        A deep copy of ``model`` (same class, same training flag) whose Linear has
        ``C * h' * w'`` inputs; ``fcnify_input_size`` is set to ``new_input_size``.

    Raises:
        FcnifyError: bad arguments, or the model does not run at ``input_size``.
        UnsupportedModelError: no Linear reads a flattened feature map, or the map reaches it
            through ops other than flatten, reshape and dropout.

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ...     torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
        >>> big = fcnify.resize_head(net, (16, 16), (32, 32))
        >>> big[4]
        Linear(in_features=1024, out_features=10, bias=True)
        >>> big(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    if method not in RESIZE_METHODS:
        raise FcnifyError(f"unknown method={method!r}. Hint: use one of {', '.join(RESIZE_METHODS)}.")
    gm = trace_model(model)
    size = resolve_input_size(model, input_size, gm)
    new_size = resolve_input_size(model, new_input_size, gm)
    if new_size[0] != size[0]:
        raise FcnifyError(
            f"input_size {size} and new_input_size {new_size} have different channels. Hint: give (H, W) sizes."
        )
    run = record_shapes(gm, example_input(gm, size, batch_size=1))
    if run.failed_at is not None:
        raise FcnifyError(
            f"{type(model).__name__} fails on a {'x'.join(map(str, size))} input at "
            f"{describe_node(gm, run.failed_at)}: {first_line(run.error)}. "
            "Hint: input_size must be the size it was trained at."
        ) from run.error
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    hint = "resize to a size closer to the training size, or convert the model (fcnify.convert) to run it at any size"
    check_memory(gm, (1, *new_size), dtype, f"resizing the head of {type(model).__name__}", hint)
    run2 = record_shapes(gm, example_input(gm, new_size, batch_size=1))  # stops at the Linear, past the map
    linear, fmap = _flatten_linear(gm, run, model)
    (c, h, w), (c2, h2, w2) = run.shape(fmap)[1:], (run2.shape(fmap) or (0, 0, 0, 0))[1:]
    if (h, w) == (h2, w2):
        return safe_deepcopy(model)  # the map reaching the Linear does not depend on the input size
    if c2 != c or min(h2, w2) < 1:
        raise UnsupportedModelError(
            f"the map {describe_node(gm, fmap)} flattened into {describe_node(gm, linear)} is "
            f"{run.shape(fmap)} at {size[1:]} but {run2.shape(fmap)} at {new_size[1:]}. "
            "Hint: new_input_size must be large enough for the network's downsampling."
        )
    old = gm.get_submodule(linear.target)
    need = old.out_features * c * h2 * w2 * old.weight.element_size()
    if need > available_memory():
        raise FcnifyError(
            f"the resized {describe_node(gm, linear)} would have {old.out_features}x{c * h2 * w2} weights "
            f"({format_bytes(need)}); {format_bytes(available_memory())} of memory is available. Hint: {hint}."
        )
    weight = old.weight.detach().reshape(old.out_features, c, h, w)
    resampled = _resample(weight, (h2, w2), method) * (h * w) / (h2 * w2)
    new = nn.Linear(c * h2 * w2, old.out_features, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(resampled.reshape(old.out_features, -1))
        if old.bias is not None:
            new.bias.copy_(old.bias.detach())
    new.train(old.training)
    resized = safe_deepcopy(model)
    parent, name = parent_name(linear.target)
    setattr(resized.get_submodule(parent) if parent else resized, name, new)
    resized.fcnify_input_size = new_size[1:]  # type: ignore[assignment]
    return resized


def _resample(weight: torch.Tensor, size: Tuple[int, int], method: str) -> torch.Tensor:
    if method == "nearest":
        return F.interpolate(weight, size=size, mode="nearest-exact")
    shrink = size[0] < weight.shape[2] or size[1] < weight.shape[3]
    return F.interpolate(weight, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _flatten_linear(gm: fx.GraphModule, run, model: nn.Module) -> Tuple[fx.Node, fx.Node]:
    """The ``nn.Linear`` node that reads a flattened NCHW map, and that map's node."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Linear):
            continue
        src: Optional[fx.Node] = node.args[0]
        while isinstance(src, fx.Node) and _passes(gm, src) and len(run.shape(src) or ()) != 4:
            src = src.args[0]  # type: ignore[assignment]
        shape = run.shape(src) if isinstance(src, fx.Node) else None
        if shape and len(shape) == 4 and shape[2] * shape[3] > 1:
            if shape[1] * shape[2] * shape[3] != gm.get_submodule(node.target).in_features:
                continue
            return node, src  # type: ignore[return-value]
    raise UnsupportedModelError(
        f"no nn.Linear in {type(model).__name__} reads a flattened feature map (C x h x w with h * w > 1) "
        "through flatten, reshape or dropout only. Hint: resize_head is for heads like "
        "Sequential(..., Flatten(), Linear(C * h * w, K)); a head that pools globally already takes any size."
    )


def _passes(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS
