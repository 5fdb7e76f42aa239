"""``fcnify.convert``: trace -> find the head -> rewrite -> check other sizes -> verify."""

from __future__ import annotations

import copy
import dataclasses
import operator
import time
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ._errors import FcnifyError, UnsupportedModelError, VerificationError, first_line
from ._rewrite import MODES, Context, Rewrite, rewrite_head
from ._cells import cell_check, head_module
from ._trace import (
    ShapeRun,
    check_memory,
    describe_node,
    eliminate_dead_code,
    eval_mode,
    record_shapes,
    safe_deepcopy,
    second_size,
    trace,
)
from .rules import DEFAULT_RULES
from .verify import OutputCheck, VerificationReport, default_rtol, example_input
from .verify import verify as _verify

__all__ = ["convert", "ConversionReport", "resolve_input_size", "prepare", "build", "Traced"]


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did; attached to the result as ``fcn.conversion_report``.

    Attributes:
        model: class name of the original model.
        mode: ``window``, ``dense`` or ``global``.
        input_size: ``(C, H, W)`` training size.
        rewrites: each rule applied, node by node (before -> after).
        checks: per output, the verification that applies (``equal``, ``mean``, ``none``).
        probe_size: the larger ``(H, W)`` the converted model was run at.
        probe_output_shapes: its output shapes at ``probe_size``.
        verification: the :class:`~fcnify.VerificationReport`, when verified.
        seconds: wall time of the conversion, verification included.
        output_stride: the stride asked for with ``output_stride`` (None: the native one).
        stride_changes: the layers whose stride or dilation changed for it.
    """

    model: str
    mode: str
    input_size: Tuple[int, int, int]
    rewrites: List[Rewrite]
    checks: List[str]
    probe_size: Tuple[int, int]
    probe_output_shapes: List[Tuple[int, ...]]
    verification: Optional[VerificationReport] = None
    seconds: float = 0.0
    output_stride: Optional[int] = None
    stride_changes: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        c, h, w = self.input_size
        lines = [f"{self.model} -> fully convolutional ({self.mode} mode, trained at {c}x{h}x{w})", "head rewrites:"]
        lines += [f"  {r}" for r in self.rewrites]
        shapes = ", ".join("x".join(map(str, s)) for s in self.probe_output_shapes)
        lines.append(f"at {self.probe_size[0]}x{self.probe_size[1]} input: output {shapes}")
        if self.verification is not None:
            lines.append(str(self.verification))
        if self.output_stride is not None:
            lines.append(f"output stride {self.output_stride}: {len(self.stride_changes)} layers changed")
            lines += [f"  {c}" for c in self.stride_changes]
        return "\n".join(lines)


#: No tensor side can exceed this (PyTorch indexes with 32-bit ints in many kernels).
_MAX_SIDE = 2**31 - 1


def resolve_input_size(model: nn.Module, input_size: Optional[Sequence[int]], gm: Optional[fx.GraphModule] = None):
    """``(C, H, W)`` from ``input_size`` (``(H, W)``, ``(C, H, W)`` or an int) and the model.

    Channels come from timm's ``pretrained_cfg`` or the first convolution; the size, when
    omitted, from timm's ``pretrained_cfg`` or ``model.fcnify_input_size`` (set by
    :func:`fcnify.load_model` from torchvision's weight metadata).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg_size = tuple(cfg.get("input_size", ())) or None
    if input_size is None:
        input_size = getattr(model, "fcnify_input_size", None) or cfg_size
        if input_size is None:
            raise FcnifyError(
                f"input_size is required for {type(model).__name__}: the model carries no pretrained config "
                "that names its training size. Hint: fcnify.convert(model, input_size=(224, 224))."
            )
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    try:
        if isinstance(input_size, (str, bytes)):
            raise TypeError
        input_size = tuple(operator.index(s) for s in input_size)
    except TypeError:
        raise FcnifyError(
            f"input_size must be (H, W) or (C, H, W) of integers, got {input_size!r}. Hint: input_size=(224, 224)."
        ) from None
    if len(input_size) not in (2, 3) or min(input_size) < 1:
        raise FcnifyError(
            f"input_size must be (H, W) or (C, H, W) with positive sizes, got {input_size}. "
            "Hint: input_size=(224, 224)."
        )
    if max(input_size) > _MAX_SIDE:
        raise FcnifyError(
            f"input_size {input_size} is larger than any image a tensor can hold ({_MAX_SIDE} pixels a side). "
            "Hint: input_size is the training size, e.g. (224, 224)."
        )
    if len(input_size) == 3:
        return input_size
    channels = cfg_size[0] if cfg_size else _first_conv_channels(model, gm)
    return (channels, *input_size)


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


def convert(
    model: nn.Module,
    input_size: Optional[Sequence[int]] = None,
    mode: str = "window",
    output_stride: Optional[int] = None,
    verify: bool = True,
    rtol: Optional[float] = None,
) -> fx.GraphModule:
    """Turn a classifier into a fully convolutional network.

    Args:
        model: any ``nn.Module`` classifier torch.fx can trace; it is not modified.
        input_size: training size ``(H, W)`` (or ``(C, H, W)``); from the model's
            pretrained config when omitted.
        mode: ``"window"`` slides the classifier over the image (at the training size the
            output is ``(N, K, 1, 1)``); ``"dense"`` predicts at every feature-map cell;
            ``"global"`` keeps ``(N, K)`` outputs but accepts any input size.
        output_stride: a finer stride for the output map (window and dense modes): any
            divisor of the native stride (32 -> 16, 8, 4, 2, 1). Strides of the last layers are
            removed and later layers dilated; every native cell is unchanged (verified), and
            without padding the map equals the classifier on every crop at this stride.
        verify: compare with the original at the training size and raise
            :class:`VerificationError` past tolerance.
        rtol: verification tolerance relative to the largest logit; by default by the model's
            precision (float32 1e-4, float16 1e-2, bfloat16 5e-2).

    Returns:
        A ``torch.fx.GraphModule`` taking ``(N, C, H, W)`` for any ``H, W`` at least the
        training size; ``.conversion_report`` tells what was rewritten and verified.

    Raises:
        UnsupportedModelError: a part of the model cannot be made convolutional exactly.
        TraceError: torch.fx cannot trace the model.
        VerificationError: the result does not match the original.

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(1, 8, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ...     torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 10))
        >>> fcn = fcnify.convert(net, input_size=(28, 28))
        >>> fcn(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 10, 1, 1])
        >>> fcn(torch.randn(1, 1, 64, 80)).shape
        torch.Size([1, 10, 19, 26])
    """
    start = time.perf_counter()
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0):
        raise FcnifyError(f"rtol must be a positive number, got {rtol!r}. Hint: rtol=1e-4 (the float32 default).")
    traced = prepare(model, input_size, modes=(mode,), output_stride=output_stride)
    if rtol is None:
        rtol = default_rtol(model)
    fcn = build(traced.model, traced, mode, verify=verify, rtol=rtol)
    if output_stride is not None:
        from ._stride import with_output_stride

        fcn = with_output_stride(fcn, output_stride, traced.x2, verify, rtol)
    fcn.conversion_report.seconds = time.perf_counter() - start
    return fcn


@dataclasses.dataclass
class Traced:
    """A traced classifier with its shapes at the training size and at a larger probe size.

    One ``Traced`` can be rewritten in every mode: :func:`build` never changes it.
    """

    gm: fx.GraphModule
    size: Tuple[int, int, int]
    run: Any
    run2: Any
    probe: Tuple[int, int]
    x2: torch.Tensor
    #: the model traced: the user's, or a materialised copy of it when it has lazy modules
    model: Optional[nn.Module] = None


def prepare(
    model: nn.Module,
    input_size: Optional[Sequence[int]] = None,
    modes: Sequence[str] = MODES,
    output_stride: Optional[int] = None,
    batch: int = 2,
) -> Traced:
    """Trace ``model`` and run it at the training size and at the probe size (first half of convert).

    ``batch`` is the batch of the example inputs (2 by default; 1 makes a sweep cheaper).
    """
    for mode in modes:
        if mode not in MODES:
            raise FcnifyError(f"unknown mode {mode!r}. Hint: use one of {', '.join(MODES)}.")
    if output_stride is not None and (
        isinstance(output_stride, bool) or not isinstance(output_stride, int) or output_stride < 1
    ):
        raise FcnifyError(
            f"output_stride must be a positive integer, got {output_stride!r}. Hint: output_stride=16, 8, 4, 2 or 1."
        )
    model = _materialized(model, input_size)
    gm = trace(model)
    size = resolve_input_size(model, input_size, gm)
    probe = second_size(size[1:])
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    check_memory(
        gm,
        (batch, size[0], *probe),
        dtype,
        f"converting {type(model).__name__} at input_size {size[1]}x{size[2]} (its probe run)",
        "input_size is the training size (e.g. 224x224), not the size of the images to run on; convert at "
        "the training size, then run large images with fcnify.predict_tiled.",
    )
    x = example_input(gm, size, batch)
    run = record_shapes(gm, x)
    if run.failed_at is not None:
        raise FcnifyError(
            f"{type(model).__name__} fails on a {'x'.join(map(str, size))} input at "
            f"{describe_node(gm, run.failed_at)}: {first_line(run.error)}. Hint: check input_size (C, H, W); "
            "an input too small for the network's downsampling fails this way."
        ) from run.error
    x2 = example_input(gm, (size[0], *probe), batch)
    run2 = record_shapes(gm, x2)
    return Traced(gm, size, run, run2, probe, x2, model)


def _materialized(model: nn.Module, input_size: Optional[Sequence[int]]) -> nn.Module:
    """``model``, or a copy whose lazy modules (``nn.LazyLinear``) have their weights.

    The user's model is never run: a first call would change its lazy modules' classes. Tracing
    and verification use the same copy, so they see the same weights.
    """
    if not isinstance(model, nn.Module) or not any(isinstance(m, LazyModuleMixin) for m in model.modules()):
        return model
    copy_ = safe_deepcopy(model).eval()
    size = resolve_input_size(copy_, input_size)
    with torch.no_grad():
        copy_(example_input(copy_, size, 1))
    return copy_.train(model.training)


def build(
    model: nn.Module, traced: Traced, mode: str, verify: bool = True, rtol: Optional[float] = None
) -> fx.GraphModule:
    """Rewrite ``traced`` in ``mode``, probe it at the larger size and verify it (second half of convert)."""
    start = time.perf_counter()
    gm, size = traced.gm, traced.size
    if rtol is None:
        rtol = default_rtol(model)
    ctx = rewrite_head(gm, traced.run, traced.run2, mode, DEFAULT_RULES)
    if not ctx.rewrites:
        tokens = next((n for n in gm.graph.nodes if n in ctx.head and _is_token_sequence(traced.run.shape(n))), None)
        if tokens is not None:
            raise UnsupportedModelError(
                f"cannot convert {type(model).__name__}: its logits come from a sequence of tokens "
                f"{traced.run.shape(tokens)} at {describe_node(gm, tokens)}, not from a pooled or flattened "
                "spatial feature map (a class-token or attention-pooling head of a transformer). Hint: there is "
                "no per-position classifier to extract; run the model on crops, or use a CNN classifier."
            )
        if traced.run2.failed_at is not None:  # the head is not found because the probe run stopped early
            raise UnsupportedModelError(
                f"{type(model).__name__} does not run at a {traced.probe[0]}x{traced.probe[1]} input: "
                f"{describe_node(gm, traced.run2.failed_at)} fails with: {first_line(traced.run2.error)}. "
                "Hint: the model is built for one input size (a fixed patch grid, position embedding or "
                "attention window); build it for dynamic sizes if the library allows it (timm: "
                "dynamic_img_size=True or strict_img_size=False), then convert."
            ) from traced.run2.error
        raise UnsupportedModelError(
            f"no classifier head found in {type(model).__name__}: no pooling or flatten turns a feature "
            "map into feature vectors. Hint: the model may already be fully convolutional."
        )
    fcn = fx.GraphModule(ctx.attributes(), ctx.graph, f"{type(model).__name__}FCN")
    fcn.train(False)
    eliminate_dead_code(fcn)
    fcn.graph.lint()
    fcn.recompile()
    fcn.delete_all_unused_submodules()
    checks = _checks(gm, ctx)
    head_inputs = head_module(gm, ctx.head)[1]
    probe_shapes, probe_run = _probe(fcn, traced.x2, mode, size[1:], keep=[ctx.env[n] for n in head_inputs])
    report = ConversionReport(type(model).__name__, mode, size, ctx.rewrites, checks, traced.probe, probe_shapes)
    fcn.conversion_report = report
    for attribute in ("pretrained_cfg", "fcnify_input_size"):  # normalisation and size travel with the model
        if getattr(model, attribute, None) is not None:
            setattr(fcn, attribute, copy.deepcopy(getattr(model, attribute)))
    if verify:
        report.verification = _verify(model, fcn, size, mode, checks=checks, rtol=rtol, batch=traced.x2.shape[0])
        cells = _probe_cells(gm, ctx, fcn, probe_run, head_inputs, checks, rtol, traced.probe)
        if cells is not None:
            report.verification.outputs.append(cells)
        if not report.verification.passed:
            raise VerificationError(
                f"the converted {type(model).__name__} does not reproduce the original:\n{report.verification}\n"
                "Hint: a layer in the head is not applied per position; report it with the rewrites above:\n"
                + "\n".join(f"  {r}" for r in ctx.rewrites)
            )
    _restore_training(fcn, model)
    report.seconds = time.perf_counter() - start
    return fcn


def _is_token_sequence(shape: Any) -> bool:
    return isinstance(shape, tuple) and len(shape) == 3 and shape[1] > 1


def _restore_training(fcn: nn.Module, model: nn.Module) -> None:
    """Give each module of ``fcn`` the training flag of the module at its path in ``model``."""
    flags = {name: m.training for name, m in model.named_modules()}
    for name, m in fcn.named_modules():
        m.training = flags.get(name, model.training)


def _checks(gm: fx.GraphModule, ctx: Context) -> List[str]:
    """Per output leaf: which exact check applies at the training size."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, _ = pytree.tree_flatten(output.args[0])
    checks = []
    for leaf in leaves:
        info = ctx.lifted(leaf) if isinstance(leaf, fx.Node) else None
        if ctx.mode != "dense" or info is None or not info.pools:
            checks.append("equal")
        elif info.pools == ("avg",) and info.affine:
            checks.append("mean")
        else:
            checks.append("none")
    return checks


def _probe_cells(
    gm: fx.GraphModule,
    ctx: Context,
    fcn: fx.GraphModule,
    run2: ShapeRun,
    head_inputs: List[fx.Node],
    checks: List[str],
    rtol: float,
    probe: Tuple[int, int],
) -> Optional[OutputCheck]:
    """At the probe size, cells of the map against the original head on their windows (see ``_cells``)."""
    if ctx.mode == "global":
        return None
    new_inputs = [ctx.env[n] for n in head_inputs]
    if any(n not in run2.values for n in new_inputs):
        return None
    output = next(n for n in fcn.graph.nodes if n.op == "output")
    leaves = [run2.values.get(leaf) for leaf in pytree.tree_flatten(output.args[0])[0]]
    window = ctx.mode == "window" or all(c == "equal" for c in checks)
    with eval_mode(gm):
        found = cell_check(gm, ctx.head, ctx.run, [run2.values[n] for n in new_inputs], leaves, window)
    if found is None:
        return None
    error, scale, cells, expected, compared = found
    detail = f"at {probe[0]}x{probe[1]} ({compared} compared)"
    return OutputCheck(-1, "cells", cells, expected, error, error / scale, rtol * scale, detail)


def _probe(
    fcn: fx.GraphModule, x2: torch.Tensor, mode: str, size: Tuple[int, int], keep: Sequence[fx.Node] = ()
) -> Tuple[List[Tuple[int, ...]], ShapeRun]:
    """Run the converted model at a larger size; a node tied to the training size fails here.

    Returns the output shapes and the run, which keeps the values of ``keep`` and of the outputs.
    """
    output = next(n for n in fcn.graph.nodes if n.op == "output")
    leaves, _ = pytree.tree_flatten(output.args[0])
    run2 = record_shapes(fcn, x2, keep=[*keep, *(leaf for leaf in leaves if isinstance(leaf, fx.Node))])
    if run2.failed_at is not None:
        raise UnsupportedModelError(
            f"the converted model fails at a {x2.shape[2]}x{x2.shape[3]} input at "
            f"{describe_node(fcn, run2.failed_at)}: {first_line(run2.error)}. Hint: this part depends on the "
            "training size (a position embedding, an interpolation to a fixed size, a Linear over "
            "positions); fcnify cannot make it size-independent."
        ) from run2.error
    shapes = [run2.shape(leaf) for leaf in leaves if isinstance(leaf, fx.Node)]
    if mode != "global":
        run1 = record_shapes(fcn, x2[:, :, : size[0], : size[1]])
        for leaf in leaves:
            if isinstance(leaf, fx.Node) and run1.shape(leaf) == run2.shape(leaf):
                frozen = _first_frozen(fcn, run1, run2)
                where = describe_node(fcn, frozen) if frozen is not None else "an unknown node"
                raise UnsupportedModelError(
                    f"the output map does not grow with the input: {where} gives the same shape at every "
                    "input size. Hint: the model resizes its features to a fixed size (an interpolate or "
                    "adaptive pool to a constant size); remove it before converting."
                )
    return shapes, run2


def _first_frozen(fcn: fx.GraphModule, run1, run2) -> Optional[fx.Node]:
    """The first node whose inputs grow with the input size but whose output does not."""
    grows = set()
    for node in fcn.graph.nodes:
        s1, s2 = run1.shape(node), run2.shape(node)
        if s1 is not None and s1 != s2:
            grows.add(node)
        elif any(a in grows for a in node.all_input_nodes) and node.op != "output" and s1 is not None and len(s1) >= 3:
            return node
    return None
