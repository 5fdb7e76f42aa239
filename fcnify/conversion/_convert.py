"""``fcnify.trace`` and ``fcnify.convert``: trace once -> find the head -> rewrite -> check other sizes -> verify."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .._errors import FcnifyError, UnsupportedModelError, VerificationError, first_line
from .._mode import Mode, as_mode
from ..graph import (
    InputSize,
    ShapeRun,
    check_memory,
    describe_node,
    device_and_dtype,
    eliminate_dead_code,
    eval_mode,
    example_input,
    record_shapes,
    resolve_input_size,
    safe_deepcopy,
    second_size,
    trace_model,
)
from ..verification import OutputCheck, default_rtol
from ._cells import cell_check, head_module
from ._result import ConversionReport, FullyConvolutionalNet
from ._rewrite import Context, rewrite_head
from ._stride import with_output_stride
from ._verify import verify as _verify
from .rules import RULES

__all__ = ["convert", "trace", "Traced"]


def convert(
    model: nn.Module,
    input_size: Optional[InputSize] = None,
    mode: Union[Mode, str] = Mode.WINDOW,
    output_stride: Optional[int] = None,
    verify: bool = True,
    rtol: Optional[float] = None,
) -> FullyConvolutionalNet:
    """Turn a classifier into a fully convolutional network.

    Args:
        model: any ``nn.Module`` classifier torch.fx can trace; it is not modified.
        input_size: training size ``(H, W)`` (or ``(C, H, W)``); from the model's
            pretrained config when omitted.
        mode: a :class:`~fcnify.Mode` or its name. ``"window"`` slides the classifier over the
            image (at the training size the output is ``(N, K, 1, 1)``); ``"dense"`` predicts at
            every feature-map cell; ``"global"`` keeps ``(N, K)`` outputs but accepts any input size.
        output_stride: a finer stride for the output map (window and dense modes): any
            divisor of the native stride (32 -> 16, 8, 4, 2, 1). Strides of the last layers are
            removed and later layers dilated; every native cell is unchanged (verified), and
            without padding the map equals the classifier on every crop at this stride.
        verify: compare with the original at the training size and raise
            :class:`VerificationError` past tolerance.
        rtol: verification tolerance relative to the largest logit; by default by the model's
            precision (float32 1e-4, float16 1e-2, bfloat16 5e-2).

    Returns:
        A :class:`~fcnify.FullyConvolutionalNet` (a ``torch.fx.GraphModule``) taking
        ``(N, C, H, W)`` for any ``H, W`` at least the training size; ``.conversion_report``
        tells what was rewritten and verified.

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
        torch.Size([1, 10, 19, 27])
    """
    start = time.perf_counter()
    mode = as_mode(mode)
    _check_output_stride(output_stride)
    _check_rtol(rtol)
    fcn = trace(model, input_size).convert(mode, output_stride=output_stride, verify=verify, rtol=rtol)
    fcn.conversion_report.seconds = time.perf_counter() - start
    return fcn


def _check_rtol(rtol: Any) -> None:
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0):
        raise FcnifyError(f"rtol must be a positive number, got {rtol!r}. Hint: rtol=1e-4 (the float32 default).")


def _check_output_stride(output_stride: Any) -> None:
    if output_stride is not None and (
        isinstance(output_stride, bool) or not isinstance(output_stride, int) or output_stride < 1
    ):
        raise FcnifyError(
            f"output_stride must be a positive integer, got {output_stride!r}. Hint: output_stride=16, 8, 4, 2 or 1."
        )


@dataclasses.dataclass
class Traced:
    """A classifier traced once, with its shapes at the training size and at a larger probe size.

    Made by :func:`fcnify.trace`. :meth:`convert` rewrites it in any mode, as often as needed:
    it never changes the trace, so a sweep over modes traces and runs the model only once.

    Attributes:
        model: the original classifier (not modified), or a copy of it whose lazy modules
            (``nn.LazyLinear``) have their weights, which tracing and verification share.
        gm: the traced eval-mode copy.
        input_size: the training size ``(C, H, W)``.
        run: every node's shape at the training size.
        probe_run: every node's shape at ``probe_size``.
        probe_size: a larger, non-square ``(H, W)``: nodes tied to the training size show here.
        probe_input: the ``(batch_size, C, *probe_size)`` input of ``probe_run``.
    """

    model: nn.Module
    gm: fx.GraphModule
    input_size: Tuple[int, int, int]
    run: ShapeRun
    probe_run: ShapeRun
    probe_size: Tuple[int, int]
    probe_input: torch.Tensor

    def convert(
        self,
        mode: Union[Mode, str] = Mode.WINDOW,
        output_stride: Optional[int] = None,
        verify: bool = True,
        rtol: Optional[float] = None,
    ) -> FullyConvolutionalNet:
        """Rewrite the head in ``mode``, probe the result at the larger size and verify it.

        The arguments are those of :func:`fcnify.convert`.

        Example:
            >>> import torch, fcnify
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
            ...                           torch.nn.Flatten(), torch.nn.Linear(4, 2))
            >>> traced = fcnify.trace(net, input_size=(16, 16))
            >>> [tuple(traced.convert(m)(torch.randn(1, 3, 32, 32)).shape) for m in fcnify.MODES]
            [(1, 2, 17, 17), (1, 2, 30, 30), (1, 2)]
        """
        mode = as_mode(mode)
        _check_output_stride(output_stride)
        _check_rtol(rtol)
        rtol = default_rtol(self.model) if rtol is None else rtol
        start = time.perf_counter()
        fcn = self._build(mode, verify, rtol)
        if output_stride is not None:
            fcn = with_output_stride(fcn, output_stride, self.probe_input, verify, rtol)
        fcn.conversion_report.seconds = time.perf_counter() - start
        return fcn

    def _build(self, mode: Mode, verify: bool, rtol: float) -> FullyConvolutionalNet:
        model, traced = self.model, self
        gm, size = traced.gm, traced.input_size
        ctx = rewrite_head(gm, traced.run, traced.probe_run, mode.value, RULES)
        if not ctx.rewrites:
            tokens = next(
                (n for n in gm.graph.nodes if n in ctx.head and _is_token_sequence(traced.run.shape(n))), None
            )
            if tokens is not None:
                raise UnsupportedModelError(
                    f"cannot convert {type(model).__name__}: its logits come from a sequence of tokens "
                    f"{traced.run.shape(tokens)} at {describe_node(gm, tokens)}, not from a pooled or flattened "
                    "spatial feature map (a class-token or attention-pooling head of a transformer). Hint: there is "
                    "no per-position classifier to extract; run the model on crops, or use a CNN classifier."
                )
            if traced.probe_run.failed_at is not None:  # the head is not found because the probe run stopped early
                raise UnsupportedModelError(
                    f"{type(model).__name__} does not run at a {traced.probe_size[0]}x{traced.probe_size[1]} input: "
                    f"{describe_node(gm, traced.probe_run.failed_at)} "
                    f"fails with: {first_line(traced.probe_run.error)}. "
                    "Hint: the model is built for one input size (a fixed patch grid, position embedding or "
                    "attention window); build it for dynamic sizes if the library allows it (timm: "
                    "dynamic_img_size=True or strict_img_size=False), then convert."
                ) from traced.probe_run.error
            raise UnsupportedModelError(
                f"no classifier head found in {type(model).__name__}: no pooling or flatten turns a feature "
                "map into feature vectors. Hint: the model may already be fully convolutional."
            )
        fcn = FullyConvolutionalNet(ctx.attributes(), ctx.graph, f"{type(model).__name__}FCN")
        fcn.train(False)
        eliminate_dead_code(fcn)
        fcn.graph.lint()
        fcn.recompile()
        fcn.delete_all_unused_submodules()
        checks = _checks(gm, ctx)
        head_inputs = head_module(gm, ctx.head)[1]
        probe_shapes, probe_run = _probe(
            fcn, traced.probe_input, mode.value, (size[1], size[2]), keep=[ctx.env[n] for n in head_inputs]
        )
        report = ConversionReport(
            type(model).__name__, mode.value, size, ctx.rewrites, checks, traced.probe_size, probe_shapes
        )
        fcn.conversion_report = report
        if getattr(model, "pretrained_cfg", None) is not None:  # normalisation travels with the model
            fcn.pretrained_cfg = copy.deepcopy(model.pretrained_cfg)
        if verify:
            report.verification = _verify(
                model, fcn, size, mode, checks=checks, rtol=rtol, batch_size=traced.probe_input.shape[0]
            )
            cells = _probe_cells(gm, ctx, probe_run, head_inputs, checks, rtol, traced.probe_size)
            if cells is not None:
                report.verification.outputs.append(cells)
            if not report.verification.passed:
                raise VerificationError(
                    f"the converted {type(model).__name__} does not reproduce the original:\n{report.verification}\n"
                    "Hint: a layer in the head is not applied per position; report it with the rewrites above:\n"
                    + "\n".join(f"  {r}" for r in ctx.rewrites)
                )
        _restore_training(fcn, model)
        return fcn


def _is_token_sequence(shape: Any) -> bool:
    return isinstance(shape, tuple) and len(shape) == 3 and shape[1] > 1


def _restore_training(fcn: nn.Module, model: nn.Module) -> None:
    """Give each module of ``fcn`` the training flag of the module at its path in ``model``."""
    flags = {name: m.training for name, m in model.named_modules()}
    for name, m in fcn.named_modules():
        m.training = flags.get(name, model.training)


def trace(model: nn.Module, input_size: Optional[InputSize] = None, batch_size: int = 2) -> Traced:
    """Trace ``model`` once and run it at the training size and at a larger probe size.

    The first half of :func:`fcnify.convert`; ``trace(model, size).convert(mode)`` is
    ``convert(model, size, mode)``. Converting one trace in several modes saves the tracing
    and the two shape runs for each further mode.

    Args:
        model: the classifier; it is not modified.
        input_size: training size ``(H, W)`` or ``(C, H, W)``; from the model when omitted.
        batch_size: the batch of the example inputs (1 makes a sweep cheaper).

    Returns:
        A :class:`Traced`; call ``.convert(mode)`` on it.

    Raises:
        TraceError: torch.fx cannot trace the model.
        FcnifyError: the model fails at ``input_size``.

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        >>> traced = fcnify.trace(net, input_size=(8, 8))
        >>> traced.input_size, traced.convert("window").conversion_report.mode
        ((3, 8, 8), 'window')
    """
    model = _materialized(model, input_size)
    gm = trace_model(model)
    size = resolve_input_size(model, input_size, gm)
    probe = second_size((size[1], size[2]))
    _, dtype = device_and_dtype(gm)
    check_memory(
        gm,
        (batch_size, size[0], *probe),
        dtype,
        f"converting {type(model).__name__} at input_size {size[1]}x{size[2]} (its probe run)",
        "input_size is the training size (e.g. 224x224), not the size of the images to run on; convert at "
        "the training size, then run large images with fcnify.predict_tiled or fcnify.predict.",
    )
    x = example_input(gm, size, batch_size)
    run = record_shapes(gm, x)
    if run.failed_at is not None:
        raise FcnifyError(
            f"{type(model).__name__} fails on a {'x'.join(map(str, size))} input at "
            f"{describe_node(gm, run.failed_at)}: {first_line(run.error)}. Hint: check input_size (C, H, W); "
            "an input too small for the network's downsampling fails this way."
        ) from run.error
    x2 = example_input(gm, (size[0], *probe), batch_size)
    return Traced(model, gm, size, run, record_shapes(gm, x2), probe, x2)


def _materialized(model: nn.Module, input_size: Optional[InputSize]) -> nn.Module:
    """``model``, or a copy whose lazy modules (``nn.LazyLinear``) have their weights.

    The user's model is never run: a first call would change its lazy modules' classes. Tracing
    and verification use the same copy, so they see the same weights.
    """
    if not isinstance(model, nn.Module) or not any(isinstance(m, LazyModuleMixin) for m in model.modules()):
        return model
    work = safe_deepcopy(model).eval()
    size = resolve_input_size(work, input_size)
    with torch.no_grad():
        work(example_input(work, size, 1))
    return work.train(model.training)


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
    output = next(n for n in ctx.graph.nodes if n.op == "output")
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
    return shapes, run2  # type: ignore[return-value]


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
