"""Finer output maps: remove strides and dilate what follows ("à trous", filter rarefaction).

Identity, per axis: a layer of stride ``t`` followed by a layer ``g`` with kernel ``k`` equals,
at every ``t``-th position, the same layer at stride 1 followed by ``g`` dilated by ``t``:
``g(x[::t]) == dilate(g, t)(x)[::t]``, with ``g``'s padding scaled by ``t`` too. Applying it
to the last strided layers until the total stride is ``s`` gives a map whose every
``(S / s)``-th cell is the native map's cell; for a network without padding every cell is the
classifier on the training-size crop at ``(i * s, j * s)`` (shift-and-stitch).

Average pools have no dilation argument: a dilated average pool is a depthwise convolution
with a constant kernel divided by the count of pixels it covers. Whole-map reductions in the
body (squeeze-and-excitation) read the native cells only (``x[..., ::f, ::f]``), so every
native cell is reproduced exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._errors import FcnifyError, UnsupportedModelError, VerificationError
from ..analysis import Global, Merge, Pad, Window, plan_steps, propagate
from ..graph import arg, describe_node, eliminate_dead_code, eval_mode, set_arg
from ..verification import compare
from ._result import FullyConvolutionalNet
from ._runtime import dilated_avg_pool2d

__all__ = ["with_output_stride", "apply_output_stride", "check_output_stride"]

Pair = Tuple[int, int]


def _mul(pair: Pair, factor: Pair) -> Pair:
    return (pair[0] * factor[0], pair[1] * factor[1])


def with_output_stride(
    fcn: FullyConvolutionalNet, output_stride: int, x: torch.Tensor, verify: bool, rtol: float
) -> FullyConvolutionalNet:
    """:func:`apply_output_stride` to a converted model, checked against it on ``x`` (for ``convert``).

    Raises:
        VerificationError: a native cell of the finer map differs from the native map.
    """
    report = fcn.conversion_report
    if report.mode == "global":
        raise FcnifyError(
            f"output_stride={output_stride} needs a map output, but global mode returns (N, K). "
            "Hint: use mode='window' or mode='dense'."
        )
    new, changes, factor = apply_output_stride(fcn, output_stride, report.input_size)
    if verify:
        passed, error, tol = check_output_stride(fcn, new, x, factor, rtol)
        if not passed:
            raise VerificationError(
                f"at output_stride={output_stride}, every {factor[0]}x{factor[1]}-th cell of the map of "
                f"{report.model} should equal the native map; max abs error {error:.2e} > {tol:.1e}. "
                "Hint: report this model with the layers changed:\n" + "\n".join(f"  {c}" for c in changes)
            )
    assert isinstance(new, FullyConvolutionalNet)  # a deep copy of fcn
    new.conversion_report = dataclasses.replace(report, output_stride=output_stride, stride_changes=changes)
    return new


def apply_output_stride(
    fcn: fx.GraphModule, output_stride: int, input_size: Sequence[int]
) -> Tuple[fx.GraphModule, List[str], Pair]:
    """A copy of ``fcn`` whose output map has stride ``output_stride``, what was changed, and ``native / new``.

    Args:
        fcn: a converted model (window or dense mode).
        output_stride: the wanted stride; it must divide the native stride.
        input_size: ``(C, H, W)``, a size ``fcn`` runs at.

    Raises:
        FcnifyError: ``output_stride`` does not divide the native stride.
        UnsupportedModelError: a layer cannot be dilated exactly (TF-"same" padding that must
            change, a module used at several places).
    """
    new = copy.deepcopy(fcn)
    steps, output = plan_steps(new, tuple(input_size))
    native = _native_stride(steps, output, input_size)
    if not isinstance(output_stride, int) or output_stride < 1 or any(n % output_stride for n in native):
        divisors = [d for d in range(1, native[0] + 1) if native[0] % d == 0 and native[1] % d == 0]
        raise FcnifyError(
            f"output_stride={output_stride} does not divide the network's stride {native[0]}x{native[1]}. "
            f"Hint: use one of {', '.join(map(str, divisors))}."
        )
    modules = dict(new.named_modules())
    uses: Dict[str, int] = {}
    for node in new.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    stride: Dict[fx.Node, Pair] = {}  # native stride of each spatial value
    factor: Dict[fx.Node, Pair] = {}  # native stride / new stride
    changes: List[str] = []
    current: Dict[fx.Node, fx.Node] = {}  # nodes replaced by a new call
    for step in steps:
        node, op = step.node, step.op
        parents = [steps[i].node for i in step.inputs if i >= 0 and steps[i].node in stride]
        if node.op == "placeholder" and not stride:
            stride[node], factor[node] = (1, 1), (1, 1)
            continue
        if isinstance(op, Global):
            for parent in parents:
                if factor[parent] != (1, 1) and node.op != "get_attr":
                    _read_native_cells(new, node, current.get(parent, parent), factor[parent])
            continue
        if not parents:
            continue
        d_in = factor[parents[0]]
        s_in = stride[parents[0]]
        if isinstance(op, Merge):
            if any(factor[p] != d_in for p in parents):
                raise UnsupportedModelError(
                    f"branches of different output strides meet at {describe_node(new, node)}. "
                    "Hint: use the native output stride for this model."
                )
            stride[node], factor[node] = s_in, d_in
            continue
        if isinstance(op, Pad):
            if d_in != (1, 1):
                pad = list(arg(node, 1, "pad"))
                pad = [p * d_in[1] if i < 2 else p * d_in[0] for i, p in enumerate(pad)]
                set_arg(node, 1, "pad", pad)
                changes.append(f"{node.name}: padding x{d_in[0]}")
            stride[node], factor[node] = s_in, d_in
            continue
        # a convolution or pool
        t_old = op.stride
        s_out = _mul(s_in, t_old)
        t_new, d_out = [], []
        for dim in (0, 1):
            new_out = min(s_out[dim], output_stride)
            new_in = s_in[dim] // d_in[dim]
            if new_out % new_in or t_old[dim] % (new_out // new_in):
                raise UnsupportedModelError(
                    f"output_stride={output_stride} falls inside the stride {t_old[dim]} of "
                    f"{describe_node(new, node)}. Hint: use a stride that is a product of the layers' strides."
                )
            t_new.append(new_out // new_in)
            d_out.append(s_out[dim] // new_out)
        t_new_p: Pair = (t_new[0], t_new[1])
        stride[node], factor[node] = s_out, (d_out[0], d_out[1])
        if t_new_p == t_old and (d_in == (1, 1) or (op.kernel == (1, 1) and not any(sum(op.padding, ())))):
            continue  # unchanged, or a 1x1 kernel, which dilation does not change
        if op.same:
            raise UnsupportedModelError(
                f"{describe_node(new, node)} pads TF-'same' (depending on the input size) and would need its "
                f"stride or dilation changed for output_stride={output_stride}. Hint: use a larger output_stride "
                "or the model's native one."
            )
        if node.op == "call_module" and uses[node.target] > 1:
            raise UnsupportedModelError(
                f"{describe_node(new, node)} is used at several places and would need different dilations. "
                "Hint: use the native output stride for this model."
            )
        change, replacement = _rewrite_window(new, modules, node, op, t_new_p, d_in)
        changes.append(change)
        if replacement is not None:
            current[node] = replacement
    eliminate_dead_code(new)
    new.graph.lint()
    new.recompile()
    return new, changes, (native[0] // output_stride, native[1] // output_stride)


def _native_stride(steps, output: int, input_size: Sequence[int]) -> Pair:
    ys, xs = propagate(steps, tuple(input_size)[1:])[output]
    if ys is None or xs is None:
        raise FcnifyError("output_stride needs a map output. Hint: convert in window or dense mode.")
    return (ys.stride, xs.stride)


def _read_native_cells(gm: fx.GraphModule, node: fx.Node, parent: fx.Node, factor: Pair) -> None:
    """Make a whole-map reduction read every ``factor``-th cell: the cells of the native map."""
    with gm.graph.inserting_before(node):
        index = (slice(None), slice(None), slice(None, None, factor[0]), slice(None, None, factor[1]))
        sliced = gm.graph.call_function(operator.getitem, (parent, index))
    node.replace_input_with(parent, sliced)


def _rewrite_window(
    gm: fx.GraphModule, modules: Dict[str, nn.Module], node: fx.Node, op: Window, t: Pair, d: Pair
) -> Tuple[str, Optional[fx.Node]]:
    """Give one convolution or pool stride ``t`` and dilate it (and its padding) by ``d``.

    Returns what changed, and the node that replaces ``node`` when it is replaced.
    """
    dilation = _mul(op.dilation, d)
    pad_before = (op.padding[0][0] * d[0], op.padding[1][0] * d[1])
    pad_after = (op.padding[0][1] * d[0], op.padding[1][1] * d[1])
    module = modules.get(node.target) if node.op == "call_module" else None
    before = f"stride {op.stride[0]}x{op.stride[1]}, dilation {op.dilation[0]}x{op.dilation[1]}"
    after = f"stride {t[0]}x{t[1]}, dilation {dilation[0]}x{dilation[1]}"
    where = f"{node.name}: "
    symmetric = pad_before == pad_after
    if isinstance(module, nn.Conv2d) or (module is None and node.target in (F.conv2d, torch.conv2d)):
        if not symmetric:  # PyTorch "same" with an even kernel: pad explicitly
            x = node.args[0]
            with gm.graph.inserting_before(node):
                padded = gm.graph.call_function(F.pad, (x, [pad_before[1], pad_after[1], pad_before[0], pad_after[0]]))
            node.replace_input_with(x, padded)
            pad_before = (0, 0)
        if module is not None:
            if module.padding_mode != "zeros" and pad_before != (0, 0):
                raise UnsupportedModelError(
                    f"{describe_node(gm, node)} pads with {module.padding_mode!r}, which does not dilate exactly. "
                    "Hint: use the native output stride for this model."
                )
            module.stride, module.dilation, module.padding = t, dilation, pad_before
        else:
            set_arg(node, 3, "stride", t)
            set_arg(node, 4, "padding", pad_before)
            set_arg(node, 5, "dilation", dilation)
        return where + f"conv {before} -> {after}", None
    is_max = isinstance(module, nn.MaxPool2d) or node.target in (F.max_pool2d, torch.max_pool2d)
    kernel = op.kernel
    extra = tuple((op.stride[i] - 1) * d[i] if op.ceil_mode else 0 for i in (0, 1))
    x = node.args[0]
    if is_max:
        pad = [pad_before[1], pad_after[1] + extra[1], pad_before[0], pad_after[0] + extra[0]]
        with gm.graph.inserting_before(node):
            if any(pad):
                x = gm.graph.call_function(F.pad, (x, pad), {"value": float("-inf")})
            new = gm.graph.call_function(F.max_pool2d, (x, kernel, t, 0, dilation))
        kind = "max pool"
    else:
        if module is not None:
            include, divisor = module.count_include_pad, module.divisor_override
        else:
            include, divisor = bool(arg(node, 5, "count_include_pad", True)), arg(node, 6, "divisor_override", None)
        if not symmetric:
            raise UnsupportedModelError(
                f"{describe_node(gm, node)}: asymmetric padding in an average pool. Hint: report this model."
            )
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                dilated_avg_pool2d, (x, kernel, t, pad_before, dilation, extra, include, divisor)
            )
        kind = "avg pool"
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return where + f"{kind} {before} -> {after}", new


def check_output_stride(
    native: nn.Module, strided: nn.Module, image: torch.Tensor, factor: Pair, rtol: float
) -> Tuple[bool, float, float]:
    """Every ``factor``-th cell of the strided map equals the native map: ``(passed, error, tolerance)``."""
    with torch.no_grad(), eval_mode(native), eval_mode(strided):
        ref = native(image)
        out = strided(image)
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    outs = out if isinstance(out, (list, tuple)) else [out]
    pairs = []
    for r, o in zip(refs, outs):
        if not isinstance(r, torch.Tensor) or r.dim() != 4:
            continue
        h, w = r.shape[2:]
        sub = o[:, :, :: factor[0], :: factor[1]]
        if sub.shape[2] < h or sub.shape[3] < w:
            return False, float("inf"), 0.0
        pairs.append((r, sub[:, :, :h, :w]))
    result = compare(pairs, rtol)
    return result.passed, result.max_abs_error, result.tolerance
