"""Where each output cell looks: stride, receptive field and cell centres of a fully convolutional net.

Computed analytically through the traced graph, one axis at a time. A value of the graph is
described per axis by ``(size, stride, start, rf)``: cell ``i`` of the map depends on input
pixels ``start + i * stride`` to ``start + i * stride + rf - 1`` (pixels outside the image are
padding). A convolution or pool with kernel ``k``, stride ``t``, dilation ``d`` and padding
``p`` before turns ``(s, o, r)`` into ``(s * t, o - p * s, r + d * (k - 1) * s)``; branches
that merge (add, cat, mul) take the union of their windows. Padding that depends on the input
size (timm's TF-"same" ``Conv2dSame``, ``MaxPool2dSame``) is computed at the size asked for.
A value reduced over the whole map (a squeeze-and-excitation gate) is global context and does
not count towards the receptive field.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._errors import FcnifyError, UnsupportedModelError, first_line
from ..graph import (
    InputSize,
    arg,
    describe_node,
    device_and_dtype,
    eval_mode,
    record_shapes,
    resolve_input_size,
    trace_model,
)

__all__ = [
    "Geometry",
    "geometry",
    "valid_sizes",
    "ValidSizes",
    "window_function",
    # the plan, for the output-stride rewrite: one op per node, evaluated for any input size
    "plan_steps",
    "propagate",
    "propagate_axis",
    "Step",
    "Axis",
    "Window",
    "Pad",
    "Merge",
    "Global",
    "TooSmall",
]

Pair = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis of one value: its length and which input pixels cell 0 and its neighbours see."""

    size: int
    stride: int
    start: int
    rf: int


class TooSmall(Exception):
    """An input too small for some layer (a map would have no cell)."""


# -- per-node operations, evaluated for any input size ------------------------------------------


@dataclasses.dataclass
class Window:
    """A convolution or pool along one axis; ``same`` computes TF-"same" padding from the size."""

    kernel: Pair
    stride: Pair
    dilation: Pair
    padding: Tuple[Pair, Pair]  # per axis (before, after)
    same: bool = False
    ceil_mode: bool = False

    def apply(self, inputs: List[Optional[Axis]], dim: int) -> Optional[Axis]:
        a = inputs[0]
        if a is None:  # a 1x1 convolution on global context (squeeze-and-excitation)
            return None
        k, t, d = self.kernel[dim], self.stride[dim], self.dilation[dim]
        extent = d * (k - 1) + 1
        if self.same:
            out = -(-a.size // t)
            total = max((out - 1) * t + extent - a.size, 0)
            p0, p1 = total // 2, total - total // 2
        else:
            p0, p1 = self.padding[dim]
        span = a.size + p0 + p1 - extent
        if span < 0:
            raise TooSmall()
        if self.ceil_mode:
            out = -(-span // t) + 1
            if (out - 1) * t >= a.size + p0:
                out -= 1
        else:
            out = span // t + 1
        return Axis(out, a.stride * t, a.start - p0 * a.stride, a.rf + (extent - 1) * a.stride)


@dataclasses.dataclass
class Pad:
    """``F.pad`` of the last two axes."""

    padding: Tuple[Pair, Pair]

    def apply(self, inputs: List[Optional[Axis]], dim: int) -> Optional[Axis]:
        a = inputs[0]
        if a is None:
            return None
        p0, p1 = self.padding[dim]
        size = a.size + p0 + p1
        if size < 1:
            raise TooSmall()
        return Axis(size, a.stride, a.start - p0 * a.stride, a.rf)


class Merge:
    """Pointwise ops and branches that meet: the union of the input windows."""

    def __init__(self, where: str):
        self.where = where

    def apply(self, inputs: List[Optional[Axis]], dim: int) -> Optional[Axis]:
        spatial = [a for a in inputs if a is not None]
        if not spatial:
            return None
        if len({a.stride for a in spatial}) > 1:
            raise UnsupportedModelError(
                f"branches with different strides {sorted({a.stride for a in spatial})} meet at {self.where}. "
                "Hint: fcnify.geometry follows convolutions, pools and pointwise merges only."
            )
        if len({a.size for a in spatial}) > 1:
            raise TooSmall()
        end = max(a.start + a.rf for a in spatial)
        start = min(a.start for a in spatial)
        return Axis(spatial[0].size, spatial[0].stride, start, end - start)


class Global:
    """A reduction over the whole map, or a constant: no spatial extent."""

    def apply(self, inputs: List[Optional[Axis]], dim: int) -> None:
        return None


Op = Union[Window, Pad, Merge, Global]


def _pair(value: Any) -> Pair:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1])) if value else (1, 1)
    return (int(value), int(value))


def _padding(padding: Any, kernel: Pair, dilation: Pair) -> Tuple[Tuple[Pair, Pair], bool]:
    if padding == "valid":
        return ((0, 0), (0, 0)), False
    if padding == "same":  # PyTorch's stride-1 "same": the extra pixel goes after
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals), False  # type: ignore[return-value]
    p = _pair(padding)
    return ((p[0], p[0]), (p[1], p[1])), False


#: Functions converted graphs call that slide a window like ``avg_pool2d(x, kernel_size, stride,
#: padding, dilation, ceil_extra)``: registered by :func:`window_function`.
_WINDOW_FUNCTIONS: set = set()


def window_function(fn: Callable) -> Callable:
    """Declare ``fn(x, kernel_size, stride, padding, dilation, ceil_extra=0, ...)`` a pool geometry follows.

    Its output cell ``i`` reads inputs ``i * stride - padding`` to ``... + dilation * (kernel - 1)``,
    and ``ceil_extra`` pads the bottom and right past the input (``ceil_mode``). The layers that
    write such functions into graphs (the output-stride rewrite) register them; geometry, a layer
    below, recognises them without importing them.
    """
    _WINDOW_FUNCTIONS.add(fn)
    return fn


def _module_op(module: nn.Module) -> Optional[Op]:
    same = type(module).__name__.endswith("Same")
    if isinstance(module, nn.Conv2d):
        kernel, dilation = _pair(module.kernel_size), _pair(module.dilation)
        padding, _ = _padding(module.padding, kernel, dilation)
        return Window(kernel, _pair(module.stride), dilation, padding, same=same)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kernel = _pair(module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        stride = _pair(module.stride if module.stride not in (None, ()) else module.kernel_size)
        padding, _ = _padding(module.padding, kernel, dilation)
        return Window(kernel, stride, dilation, padding, same=same, ceil_mode=bool(module.ceil_mode))
    return None


def _function_op(node: fx.Node, shapes: Callable[[Any], Any]) -> Optional[Op]:
    target = node.target
    if target is F.conv2d or target is torch.conv2d:
        weight = shapes(arg(node, 1, "weight"))
        kernel = (weight[2], weight[3])
        dilation = _pair(arg(node, 5, "dilation", 1))
        padding, _ = _padding(arg(node, 4, "padding", 0), kernel, dilation)
        return Window(kernel, _pair(arg(node, 3, "stride", 1)), dilation, padding)
    if target in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d, torch._C._nn.avg_pool2d):
        kernel = _pair(arg(node, 1, "kernel_size"))
        stride = arg(node, 2, "stride", None)
        stride = kernel if stride in (None, (), []) else _pair(stride)
        is_max = target in (F.max_pool2d, torch.max_pool2d)
        dilation = _pair(arg(node, 4, "dilation", 1)) if is_max else (1, 1)
        ceil_mode = bool(arg(node, 5 if is_max else 4, "ceil_mode", False))
        padding, _ = _padding(arg(node, 3, "padding", 0), kernel, dilation)
        return Window(kernel, stride, dilation, padding, ceil_mode=ceil_mode)
    if target in _WINDOW_FUNCTIONS:
        kernel, stride, padding, dilation = (
            _pair(arg(node, i, n)) for i, n in ((1, "kernel_size"), (2, "stride"), (3, "padding"), (4, "dilation"))
        )
        extra = _pair(arg(node, 5, "ceil_extra", 0))
        return Window(kernel, stride, dilation, tuple((p, p + e) for p, e in zip(padding, extra)))  # type: ignore[arg-type]
    if target is operator.getitem and isinstance(node.args[1], tuple) and len(node.args[1]) == 4:
        index = node.args[1]
        plain = all(isinstance(i, slice) and i == slice(None) for i in index[:2])
        steps = [i for i in index[2:] if isinstance(i, slice) and i.start in (None, 0) and i.stop is None]
        if plain and len(steps) == 2:  # x[:, :, ::a, ::b], as output_stride writes
            stride = (steps[0].step or 1, steps[1].step or 1)
            return Window((1, 1), stride, (1, 1), ((0, 0), (0, 0)))
    if target is F.pad:
        pad = list(arg(node, 1, "pad"))
        pad += [0] * (4 - len(pad))
        return Pad(((pad[2], pad[3]), (pad[0], pad[1])))
    return None


@dataclasses.dataclass
class Step:
    node: fx.Node
    op: Op
    inputs: List[int]  # indices of earlier steps (-1: constant)


def plan_steps(fcn: fx.GraphModule, size: Tuple[int, ...]) -> Tuple[List[Step], int]:
    """One op per node, chosen from the modules and from the shapes of one run at ``size``."""
    device, dtype = device_and_dtype(fcn)
    x = torch.zeros(1, *size, dtype=dtype, device=device)
    with eval_mode(fcn):  # analysis runs the model as inference does, never in train mode
        run = record_shapes(fcn, x)
    if run.failed_at is not None:
        raise FcnifyError(
            f"{type(fcn).__name__} fails on a {'x'.join(map(str, size))} input at "
            f"{describe_node(fcn, run.failed_at)}: {first_line(run.error)}. "
            "Hint: pass an input_size the model accepts, e.g. its training size."
        ) from run.error
    modules = dict(fcn.named_modules())
    index: Dict[fx.Node, int] = {}
    axes: Dict[fx.Node, Pair] = {}  # which dims of a 4-d value are (H, W): NCHW or NHWC
    steps: List[Step] = []
    output = -1

    def spatial(node: fx.Node, value: Any) -> Optional[Tuple[int, int]]:
        s = run.shape(value) if isinstance(value, fx.Node) else None
        if s is None or len(s) != 4:
            return None
        a = axes.get(value, (2, 3)) if value is not node else axes[node]
        return (s[a[0]], s[a[1]])

    for node in fcn.graph.nodes:
        if node.op == "output":
            leaves = [a for a in _leaves(node.args[0]) if isinstance(a, fx.Node) and a in index]
            if not leaves:
                raise UnsupportedModelError(f"{type(fcn).__name__} has no tensor output. Hint: pass a converted model.")
            output = index[leaves[0]]
            break
        inputs = [index.get(a, -1) for a in node.all_input_nodes]
        shape = run.shape(node)
        parents = [a for a in node.all_input_nodes if spatial(node, a) is not None]
        axes[node] = axes.get(parents[0], (2, 3)) if parents else (2, 3)
        if node.op == "placeholder":
            op: Op = Merge("the input") if not steps else Global()
        elif node.op == "get_attr" or shape is None or len(shape) != 4:
            op = Global()
        elif _is_permute(node) and parents:
            dims = _permutation(node)
            before = axes[node]
            axes[node] = (dims.index(before[0]), dims.index(before[1]))
            op = Merge(describe_node(fcn, node))
        else:
            op = None  # type: ignore[assignment]
            if node.op == "call_module":
                op = _module_op(modules[node.target])  # type: ignore[assignment]
            elif node.op == "call_function":
                op = _function_op(node, run.shape)  # type: ignore[assignment]
            if op is not None and axes[node] != (2, 3):
                raise UnsupportedModelError(
                    f"fcnify.geometry cannot follow {describe_node(fcn, node)}: a convolution or pool on a "
                    "channels-last map. Hint: report this model."
                )
            if op is None:
                mine = spatial(node, node)
                sizes = [spatial(node, a) for a in parents]
                if any(s == mine for s in sizes):
                    op = Merge(describe_node(fcn, node))
                elif mine == (1, 1) or not sizes:
                    op = Global()
                else:
                    raise UnsupportedModelError(
                        f"fcnify.geometry cannot follow {describe_node(fcn, node)}: it changes the map size from "
                        f"{sizes[0][0]}x{sizes[0][1]} to {mine[0]}x{mine[1]}. "
                        "Hint: geometry knows convolutions, pools, F.pad and pointwise ops (no resizing)."
                    )
        index[node] = len(steps)
        steps.append(Step(node, op, inputs))
    # the plan must reproduce the run's shapes
    values = propagate(steps, size[1:])
    for step, value in zip(steps, values):
        made = spatial(step.node, step.node) if step.node in axes else None
        if value[0] is not None and made is not None:
            got = (value[0].size, value[1].size)
            if got != made:
                raise UnsupportedModelError(
                    f"fcnify.geometry predicts a {got[0]}x{got[1]} map at {describe_node(fcn, step.node)} "
                    f"but the model makes {made[0]}x{made[1]}. Hint: report this model; geometry does not "
                    "understand one of its layers."
                )
    return steps, output


def _is_permute(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target is torch.permute
    )


def _permutation(node: fx.Node) -> List[int]:
    """The dims of ``x.permute(0, 2, 3, 1)``, ``x.permute((0, 2, 3, 1))`` or ``torch.permute(x, dims)``."""
    dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return [int(d) % 4 for d in dims]


def _leaves(value: Any) -> List[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def propagate_axis(steps: List[Step], n: int, dim: int) -> List[Optional[Axis]]:
    values: List[Optional[Axis]] = []
    for i, step in enumerate(steps):
        if step.node.op == "placeholder" and i == 0:
            values.append(Axis(n, 1, 0, 1))
            continue
        inputs = [values[j] if j >= 0 else None for j in step.inputs]
        values.append(step.op.apply(inputs, dim))
    return values


def propagate(steps: List[Step], size: Sequence[int]) -> List[Tuple[Optional[Axis], Optional[Axis]]]:
    ys = propagate_axis(steps, size[0], 0)
    xs = propagate_axis(steps, size[1], 1)
    return list(zip(ys, xs))


# -- the public result ---------------------------------------------------------------------------


@dataclasses.dataclass
class Geometry:
    """How the cells of a fully convolutional network's output map sit on the input image.

    Coordinates are input pixel indices (row ``y``, column ``x``); pixel ``(y, x)`` covers
    ``[y - 0.5, y + 0.5]``, so its centre is ``(y, x)``.

    Attributes:
        input_size: the ``(C, H, W)`` the geometry was computed at.
        stride: ``(sy, sx)``, input pixels between neighbouring output cells.
        receptive_field: ``(ry, rx)``, size of the input window one output cell depends on.
        offset: ``(oy, ox)``, top-left pixel of cell ``(0, 0)``'s window (negative when padding
            extends it past the image).
        padding: ``(py, px)``, how far cell ``(0, 0)``'s window extends above / left of the image.
        map_size: ``(h, w)`` of the output at ``input_size``.
        global_context: the network reduces a whole map somewhere (squeeze-and-excitation), so
            every cell also depends, weakly, on the whole image.
    """

    input_size: Tuple[int, int, int]
    stride: Pair
    receptive_field: Pair
    offset: Pair
    map_size: Pair
    global_context: bool = False
    _steps: List[Step] = dataclasses.field(repr=False, default_factory=list)
    _output: int = dataclasses.field(repr=False, default=-1)
    _min: Optional[Pair] = dataclasses.field(repr=False, default=None)

    @property
    def padding(self) -> Pair:
        return (max(0, -self.offset[0]), max(0, -self.offset[1]))

    def center(self, i: float, j: float) -> Tuple[float, float]:
        """Input coordinates ``(y, x)`` of the centre of cell ``(i, j)``'s window (pixel centres)."""
        return tuple(  # type: ignore[return-value]
            o + c * s + (r - 1) / 2 for o, c, s, r in zip(self.offset, (i, j), self.stride, self.receptive_field)
        )

    def box(self, i: int, j: int) -> Tuple[int, int, int, int]:
        """Cell ``(i, j)``'s window ``(top, left, bottom, right)``, bottom and right exclusive.

        It may extend past the image where the network pads.
        """
        top = self.offset[0] + i * self.stride[0]
        left = self.offset[1] + j * self.stride[1]
        return (top, left, top + self.receptive_field[0], left + self.receptive_field[1])

    def output_size(self, height: int, width: int) -> Pair:
        """``(h, w)`` of the output map for an ``height x width`` input.

        Raises:
            FcnifyError: the input is smaller than :attr:`min_input_size`.
        """
        out = []
        for dim, n in enumerate((height, width)):
            value = self._axis(n, dim)
            if value is None:
                raise FcnifyError(
                    f"a {height}x{width} input is too small for this network (axis {'yx'[dim]}); it needs at "
                    f"least {self.min_input_size[0]}x{self.min_input_size[1]}. Hint: pad the image or use a "
                    "larger one."
                )
            out.append(value.size)
        return (out[0], out[1])

    @property
    def min_input_size(self) -> Pair:
        """The smallest ``(H, W)`` that gives an output map of at least one cell."""
        if self._min is None:
            self._min = (self._smallest(0), self._smallest(1))
        return self._min

    def _smallest(self, dim: int) -> int:
        lo, hi = 1, self.input_size[1 + dim]
        while self._axis(hi, dim) is None:
            hi *= 2
        while lo < hi:  # bisect, then confirm: branches that must agree can break monotony
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._axis(mid, dim) is not None else (mid + 1, hi)
        for n in range(max(1, lo - 2 * self.stride[dim]), lo):
            if self._axis(n, dim) is not None:
                return n
        return lo

    def _axis(self, n: int, dim: int) -> Optional[Axis]:
        try:
            value = propagate_axis(self._steps, n, dim)[self._output]
        except TooSmall:
            return None
        return value if value is not None and value.size >= 1 else None

    def _values(self, size: Sequence[int]) -> List[Tuple[Optional[Axis], Optional[Axis]]]:
        return propagate(self._steps, size)

    def __str__(self) -> str:
        return (
            f"stride {self.stride[0]}x{self.stride[1]}, receptive field {self.receptive_field[0]}x"
            f"{self.receptive_field[1]}, cell (0, 0) centred at {self.center(0, 0)} "
            f"(input {self.input_size[1]}x{self.input_size[2]} -> map {self.map_size[0]}x{self.map_size[1]})"
        )


def geometry(fcn: nn.Module, input_size: Optional[InputSize] = None) -> Geometry:
    """Stride, receptive field and cell positions of a fully convolutional network.

    Args:
        fcn: a model from :func:`fcnify.convert`, or any traceable model (for a classifier that
            was not converted: the geometry of its last feature map).
        input_size: ``(H, W)`` at which to compute it (TF-"same" padding depends on it);
            default: the training size in ``fcn.conversion_report``.

    Returns:
        A :class:`Geometry`: ``stride``, ``receptive_field``, ``center(i, j)``, ``box(i, j)``,
        ``min_input_size`` and ``output_size(H, W)``.

    Raises:
        UnsupportedModelError: a layer changes the map size in a way geometry does not follow
            (an interpolation), or branches of different strides meet.

    Example:
        >>> import torch, fcnify
        >>> lenet = torch.nn.Sequential(
        ...     torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ...     torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ...     torch.nn.Flatten(), torch.nn.Linear(16 * 5 * 5, 10))
        >>> g = fcnify.geometry(fcnify.convert(lenet, input_size=(32, 32)))
        >>> g.stride, g.receptive_field, g.center(0, 0)
        ((4, 4), (32, 32), (15.5, 15.5))
        >>> g.output_size(64, 48), g.min_input_size
        ((9, 5), (32, 32))
    """
    gm = fcn if isinstance(fcn, fx.GraphModule) else trace_model(fcn)
    size = resolve_input_size(fcn, input_size, gm)
    steps, output = plan_steps(gm, size)
    values = propagate(steps, size[1:])
    ys, xs = values[output]
    if (ys is None or xs is None) and gm is not fcn:
        # a classifier that was not converted: the geometry of its last feature map
        last = max((k for k, v in enumerate(values) if v[0] is not None and v[1] is not None), default=None)
        if last is not None:
            output = last
            ys, xs = values[output]
    if ys is None or xs is None:
        raise UnsupportedModelError(
            f"the output of {type(fcn).__name__} is not a spatial map. Hint: convert in window or dense mode."
        )
    return Geometry(
        input_size=size,
        stride=(ys.stride, xs.stride),
        receptive_field=(ys.rf, xs.rf),
        offset=(ys.start, xs.start),
        map_size=(ys.size, xs.size),
        global_context=any(
            isinstance(step.op, Global)
            and step.node.op not in ("placeholder", "get_attr")
            and any(j >= 0 and values[j][0] is not None for j in step.inputs)
            for step in steps
        ),
        _steps=steps,
        _output=output,
    )


@dataclasses.dataclass(frozen=True)
class ValidSizes:
    """Input sizes a network takes without dropping pixels: ``minimum + k * step`` per axis."""

    minimum: Pair
    step: Pair

    def next(self, height: int, width: int) -> Pair:
        """The smallest valid ``(H, W)`` at least ``height x width``."""
        return tuple(  # type: ignore[return-value]
            m if n <= m else m + -(-(n - m) // s) * s for n, m, s in zip((height, width), self.minimum, self.step)
        )

    def __contains__(self, size: Sequence[int]) -> bool:
        return all(n >= m and (n - m) % s == 0 for n, m, s in zip(size, self.minimum, self.step))


def _exact(steps: List[Step], output: int, n: int, dim: int) -> bool:
    """The last cell's window reaches the last pixel: no row or column is ignored at the border."""
    try:
        value = propagate_axis(steps, n, dim)[output]
    except TooSmall:
        return False
    return value is not None and value.size >= 1 and value.start + (value.size - 1) * value.stride + value.rf >= n


def valid_sizes(fcn: nn.Module, input_size: Optional[InputSize] = None) -> ValidSizes:
    """The input sizes at which every pixel up to the bottom and right border reaches the output.

    A strided layer whose windows do not reach its input's end ignores the rest (a stack of
    four stride-2, kernel-5 convolutions takes ``61 + 16 n``); padding inside the network can
    make every size valid (ResNets). Pad other sizes up to :meth:`ValidSizes.next`, or use
    :func:`fcnify.predict_padded`.

    Args:
        fcn: a converted model (or any traceable fully convolutional model).
        input_size: a size the model runs at; default the training size.

    Returns:
        :class:`ValidSizes` with ``minimum`` and ``step`` per axis.

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 5, stride=2) for _ in range(4)])
        >>> fcnify.valid_sizes(net, input_size=(64, 64))
        ValidSizes(minimum=(61, 61), step=(16, 16))
    """
    geo = geometry(fcn, input_size)
    minimum, step = [], []
    for dim in (0, 1):
        s = geo.stride[dim]
        start = geo.min_input_size[dim]
        limit = start + 3 * s  # valid sizes repeat with the network's stride
        found = [n for n in range(start, limit) if _exact(geo._steps, geo._output, n, dim)][:2]
        if not found:
            raise UnsupportedModelError(
                f"no input size from {start} to {limit} fits {type(fcn).__name__} exactly along {'yx'[dim]}. "
                "Hint: the network may mix strides that never align; pad inputs to a multiple of the stride."
            )
        minimum.append(found[0])
        step.append(found[1] - found[0] if len(found) > 1 else s)
    return ValidSizes((minimum[0], minimum[1]), (step[0], step[1]))
