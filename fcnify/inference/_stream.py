"""Row streaming: a fully convolutional net run on horizontal bands of the image, exactly and once.

Tiling recomputes the overlap of neighbouring tiles (about one receptive field). Streaming does
not: the image enters the network as bands of full-width rows, and every node of the traced
graph keeps only the trailing input rows its next output rows still need. Along the rows, a
convolution or pool with kernel ``k``, stride ``s``, dilation ``d`` and top padding ``p`` makes
output row ``o`` from input rows ``o*s - p`` to ``o*s - p + d*(k-1)``; it emits every row whose
window has arrived, and keeps the rows from the next window's start. Pointwise nodes (batch
norm, activations, residual adds, channel concatenations) emit the rows that have arrived on
all their inputs. Padding along the rows is applied only where the whole image has it: at the
first rows and the last. So each output cell is computed once, from the same numbers as
``fcn(image)``, while memory holds one band of activations and a few rows per layer (the idea
of StreamingCNN, Pinckaers et al. 2019, applied to the forward pass of any traced graph).

A node whose output row depends on all rows (a global pool inside the body, as in
squeeze-and-excitation; attention; resizing to a fixed size) cannot be streamed: it is refused,
by name. Every plan is checked once on a small probe image against the whole-image run, node by
node, so a layer that is not row-local is named rather than silently wrong.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._errors import FcnifyError, UnsupportedModelError
from ..analysis import geometry
from ..analysis._geometry import (
    Global,
    Merge,
    Pad,
    Step,
    TooSmall,
    Window,
    _is_permute,
    _permutation,
    plan_steps,
    propagate_axis,
)
from ..graph import describe_node, resolve_input_size
from ..graph import eval_mode as _eval
from ._tiled import _Source

__all__ = ["RowStreamer", "band_rows_for", "stream_bands", "stream_predict"]

Pair = Tuple[int, int]


# -- the plan: one small program per node ---------------------------------------------------------


@dataclasses.dataclass
class _Rows:
    """A window along the rows: ``k``, ``s``, ``d`` and padding ``(top, bottom)``."""

    k: int
    s: int
    d: int
    top: int
    bottom: int

    @property
    def extent(self) -> int:
        return self.d * (self.k - 1) + 1


@dataclasses.dataclass
class _Node:
    """How one node of the graph runs on bands."""

    node: fx.Node
    kind: str  # "input", "constant", "window", "pointwise"
    spatial: List[int]  # indices of the inputs that are row streams
    rows_out: int = 0  # total output rows at the image size
    rows_in: int = 0  # total input rows (windows)
    hdim: int = 2  # the axis of the rows in this node's output
    window: Optional[_Rows] = None
    interior: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the op without padding along the rows
    last_use: int = -1  # index of the last node that reads this one's band


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _with_arg(node: fx.Node, index: int, name: str, value: Any) -> Tuple[tuple, dict]:
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > index:
        args[index] = value
    else:
        kwargs[name] = value
    return tuple(args), kwargs


def _interior(gm: fx.GraphModule, node: fx.Node, op: Union[Window, Pad]) -> Optional[Callable]:
    """The node's op with its padding along the rows removed (columns padded as before).

    ``None`` when the op is not one fcnify knows how to rewrite: then the op runs with its own
    padding on a slightly longer slab and the rows that saw that padding are dropped.
    """
    (top, bottom), (left, right) = op.padding
    if top == 0 and bottom == 0:
        return lambda x, call: call(x)  # nothing to remove
    if isinstance(op, Pad):
        pad = list(_arg(node, 1, "pad"))
        args, kwargs = _with_arg(node, 1, "pad", [pad[0], pad[1], 0, 0])
        return lambda x, call: _call_with(gm, node, x, args, kwargs)
    if op.same:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module).forward is nn.Conv2d.forward:
            mode = module.padding_mode
            weights: Dict[torch.memory_format, torch.Tensor] = {}  # the weight in the bands' memory format

            def conv(x: torch.Tensor, call: Callable) -> torch.Tensor:
                if mode != "zeros" or left != right:
                    x = F.pad(x, (left, right, 0, 0), mode="constant" if mode == "zeros" else mode)
                    pad: Pair = (0, 0)
                else:
                    pad = (0, left)
                layout = (
                    torch.channels_last
                    if x.is_contiguous(memory_format=torch.channels_last)
                    else torch.contiguous_format
                )
                if layout not in weights:
                    weights[layout] = module.weight.detach().contiguous(memory_format=layout)
                return F.conv2d(x, weights[layout], module.bias, module.stride, pad, module.dilation, module.groups)

            return conv
        if type(module).forward is nn.MaxPool2d.forward and not module.return_indices:
            return lambda x, call: F.max_pool2d(
                x, module.kernel_size, module.stride, (0, left), module.dilation, module.ceil_mode
            )
        if type(module).forward is nn.AvgPool2d.forward:
            return lambda x, call: F.avg_pool2d(
                x,
                module.kernel_size,
                module.stride,
                (0, left),
                module.ceil_mode,
                module.count_include_pad,
                module.divisor_override,
            )
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if getattr(target, "__name__", "") == "dilated_avg_pool2d":  # fcnify._stride's pool: no ceil rows either
        padding, extra = _arg(node, 3, "padding"), _arg(node, 5, "ceil_extra", (0, 0))
        padding = padding if isinstance(padding, (tuple, list)) else (padding, padding)
        extra = extra if isinstance(extra, (tuple, list)) else (extra, extra)
        args, kwargs = _with_arg(node, 3, "padding", (0, padding[-1]))
        node_args, node_kwargs = list(args), dict(kwargs)
        if len(node_args) > 5:
            node_args[5] = (0, extra[-1])
        else:
            node_kwargs["ceil_extra"] = (0, extra[-1])
        args, kwargs = tuple(node_args), node_kwargs
        return lambda x, call: _call_with(gm, node, x, args, kwargs)
    index = {
        F.conv2d: 4,
        torch.conv2d: 4,
        F.max_pool2d: 3,
        torch.max_pool2d: 3,
        F.avg_pool2d: 3,
        torch._C._nn.avg_pool2d: 3,
    }.get(target)
    if index is None or left != right:
        return None
    args, kwargs = _with_arg(node, index, "padding", (0, left))
    return lambda x, call: _call_with(gm, node, x, args, kwargs)


def _call_with(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Call ``node``'s function with ``x`` as its first argument and the rest from ``args``."""
    args = (x, *[_constant(gm, a) for a in args[1:]])
    kwargs = {k: _constant(gm, v) for k, v in kwargs.items()}
    return node.target(*args, **kwargs)


def _constant(gm: fx.GraphModule, value: Any) -> Any:
    """A get_attr argument (a weight) read from the module; other arguments as they are."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        obj: Any = gm
        for part in str(value.target).split("."):
            obj = getattr(obj, part)
        return obj
    return value


def _run_size(fcn: nn.Module, image_size: Sequence[int]) -> Tuple[int, int, int]:
    """A ``(C, H, W)`` the network runs at: its training size, or for a model fcnify did not convert, a
    crop of the image of at most 128 pixels a side."""
    if getattr(fcn, "conversion_report", None) is not None:
        return resolve_input_size(fcn, None)
    return resolve_input_size(fcn, (min(int(image_size[0]), 128), min(int(image_size[1]), 128)))


class _Plan:
    """The per-node programs of one network for images of one size."""

    def __init__(self, fcn: fx.GraphModule, height: int, width: int):
        self.fcn = fcn
        self.size = _run_size(fcn, (height, width))
        steps, self.output = plan_steps(fcn, self.size)
        self.steps: List[Step] = steps
        try:
            ys = propagate_axis(steps, height, 0)
            xs = propagate_axis(steps, width, 1)
        except TooSmall:
            ys = xs = []
        if (
            not ys
            or ys[self.output] is None
            or xs[self.output] is None
            or ys[self.output].size < 1
            or xs[self.output].size < 1
        ):
            raise FcnifyError(
                f"a {height}x{width} image is too small for {type(fcn).__name__}: it makes no output cell. "
                f"Hint: fcnify.geometry(model).min_input_size is the smallest image it takes."
            )
        self.height, self.width = height, width
        self.out_size = (ys[self.output].size, xs[self.output].size)
        self.nodes: List[_Node] = []
        for i, step in enumerate(steps):
            self.nodes.append(self._program(i, step, ys))
        for i, item in enumerate(self.nodes):
            for j in item.spatial:
                self.nodes[j].last_use = i
        out = self.nodes[self.output]
        if out.kind not in ("window", "pointwise", "input") or out.hdim != 2:
            raise UnsupportedModelError(
                f"the output of {type(fcn).__name__} is not an (N, K, h, w) map. Hint: convert in window or dense mode."
            )

    def _program(self, i: int, step: Step, ys: List[Any]) -> _Node:
        node, op = step.node, step.op
        spatial = [j for j in step.inputs if j >= 0 and ys[j] is not None]
        if i == 0 and node.op == "placeholder":
            return _Node(node, "input", [], rows_out=ys[i].size)
        if not spatial:
            return _Node(node, "constant", [])
        hdim = self.nodes[spatial[0]].hdim
        if isinstance(op, Global) or ys[i] is None:
            raise UnsupportedModelError(
                f"{describe_node(self.fcn, node)} reduces a whole feature map (a global pool, as in squeeze-and-"
                "excitation, attention or a resize), so every output row depends on every image row and the "
                "network cannot be streamed row by row. Hint: run the whole image (fcn(image)) when it fits in "
                "memory; fcnify.predict_tiled cannot reproduce it either, so tiles of your own give only "
                "tile-local context."
            )
        if isinstance(op, (Window, Pad)):
            if isinstance(op, Window) and op.same:
                raise UnsupportedModelError(
                    f"{describe_node(self.fcn, node)} pads by TF-'same' rules, which depend on the image size. "
                    "Hint: run the whole image (fcn(image)) when it fits in memory."
                )
            if hdim != 2 or len(spatial) != 1:
                raise UnsupportedModelError(
                    f"{describe_node(self.fcn, node)}: a window op on a channels-last map cannot be streamed. "
                    "Hint: run the whole image, or report this model."
                )
            if isinstance(op, Window):
                top, bottom = op.padding[0]
                rows = _Rows(op.kernel[0], op.stride[0], op.dilation[0], top, bottom)
            else:
                top, bottom = op.padding[0]
                rows = _Rows(1, 1, 1, top, bottom)
            return _Node(
                node,
                "window",
                spatial,
                rows_out=ys[i].size,
                rows_in=ys[spatial[0]].size,
                hdim=2,
                window=rows,
                interior=_interior(self.fcn, node, op),
            )
        if isinstance(op, Merge):
            if _is_permute(node):
                hdim = _permutation(node).index(hdim)
            sizes = {ys[j].size for j in spatial}
            if len(sizes) != 1 or ys[i].size not in sizes:
                raise UnsupportedModelError(
                    f"{describe_node(self.fcn, node)} combines maps of {sorted(sizes)} rows into {ys[i].size}. "
                    "Hint: run the whole image."
                )
            return _Node(node, "pointwise", spatial, rows_out=ys[i].size, hdim=hdim)
        raise UnsupportedModelError(f"{describe_node(self.fcn, node)} cannot be streamed. Hint: run the whole image.")


# -- running ---------------------------------------------------------------------------------------


class RowStreamer:
    """Feed an image's rows in order, band by band; get the output map's rows as they are final.

    Memory holds the band being pushed, its activations, and for each layer the few rows its
    next output rows still need: never the whole image, its activations or the whole map.

    Args:
        fcn: a fully convolutional network (:func:`fcnify.convert`, window or dense mode) whose
            layers are row-local (no global pool inside the body).
        image_size: ``(H, W)`` of the whole image.
        check: verify the plan once on a small probe image against the whole-image run, node by
            node (names the first node that is not row-local).

    Raises:
        UnsupportedModelError: a node's output row depends on all rows (named in the message).
        FcnifyError: the image is smaller than the network's minimum input.

    Example:
        >>> import torch
        >>> from fcnify.inference import RowStreamer
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2))
        >>> x = torch.randn(1, 3, 50, 40)
        >>> streamer = RowStreamer(torch.fx.symbolic_trace(net), (50, 40))
        >>> bands = [streamer.push(x[:, :, y:y + 16]) for y in range(0, 50, 16)]
        >>> out = torch.cat([b for b in bands if b is not None], dim=2)
        >>> torch.allclose(out, net(x), atol=1e-6), streamer.done
        (True, True)
    """

    def __init__(self, fcn: fx.GraphModule, image_size: Sequence[int], check: bool = True):
        if not isinstance(fcn, fx.GraphModule):
            raise FcnifyError(
                f"streaming needs a traced model (torch.fx.GraphModule), got {type(fcn).__name__}. "
                "Hint: fcn = fcnify.convert(model, input_size=...)."
            )
        height, width = int(image_size[0]), int(image_size[1])
        if check:
            _probe(fcn, (height, width))
        self.plan = _Plan(fcn, height, width)
        self.modules = dict(fcn.named_modules())
        self._reset()

    def _reset(self) -> None:
        self.rows_in = 0
        self.rows_out = 0
        n = len(self.plan.nodes)
        self._buffers: List[Optional[torch.Tensor]] = [None] * n  # windows: retained input rows
        self._buffer_start = [0] * n  # windows: input row of the buffer's first row
        self._seen = [0] * n  # windows: input rows received
        self._need = [0] * n  # windows: the first input row a later window needs
        self._done = [0] * n  # output rows emitted so far
        self._pending: List[Dict[int, torch.Tensor]] = [dict() for _ in range(n)]  # pointwise: rows not yet matched
        self._constants: Dict[fx.Node, Any] = {}
        self._record: Optional[Dict[int, List[torch.Tensor]]] = None  # the probe's record of every band

    @property
    def output_size(self) -> Pair:
        """``(h, w)`` of the whole output map."""
        return self.plan.out_size

    @property
    def done(self) -> bool:
        """Every output row has been emitted."""
        return self.rows_out >= self.plan.out_size[0]

    def push(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """The next input rows ``(N, C, r, W)``; returns the output rows they complete ``(N, K, r', w)``, or None.

        Raises:
            FcnifyError: the rows are not full width, or run past the image's height.
        """
        plan = self.plan
        if rows.dim() != 4 or rows.shape[3] != plan.width:
            raise FcnifyError(
                f"push expects (N, C, rows, {plan.width}) bands of the {plan.height}x{plan.width} image, got shape "
                f"{tuple(rows.shape)}. Hint: pass full-width rows, top to bottom."
            )
        if self.rows_in + rows.shape[2] > plan.height:
            raise FcnifyError(
                f"rows {self.rows_in}..{self.rows_in + rows.shape[2]} run past the image's {plan.height} rows. "
                "Hint: push each row once, top to bottom; make a new RowStreamer for the next image."
            )
        self.rows_in += rows.shape[2]
        with torch.no_grad():
            out = self._push(rows)
        if out is not None:
            self.rows_out += out.shape[2]
        return out

    def _push(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        plan = self.plan
        values: Dict[int, Optional[torch.Tensor]] = {}
        env: Dict[fx.Node, Any] = self._constants
        for i, item in enumerate(plan.nodes):
            if item.kind == "input":
                values[i] = rows.contiguous(memory_format=torch.channels_last) if rows.shape[2] > 0 else None
            elif item.kind == "constant":
                if item.node not in env:
                    env[item.node] = self._run(item.node, env)
                continue
            elif item.kind == "window":
                values[i] = self._window(i, item, values[item.spatial[0]])
            else:
                values[i] = self._pointwise(i, item, values, env)
            if self._record is not None and values[i] is not None:
                self._record.setdefault(i, []).append(values[i])
            for j in item.spatial:  # free bands no later node reads
                if plan.nodes[j].last_use == i:
                    values.pop(j, None)
        return values.get(plan.output)

    # a window along the rows: keep the input rows the next output rows need
    def _window(self, i: int, item: _Node, band: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        w = item.window
        buf, b0 = self._buffers[i], self._buffer_start[i]
        if band is not None:
            if buf is None:  # the band starts at the first row not yet seen
                buf, b0 = band, self._seen[i]
            else:
                buf = torch.cat([buf, band], dim=2)
            self._seen[i] += band.shape[2]
            if b0 < self._need[i]:  # rows no window needs (a stride larger than the kernel)
                buf, b0 = buf[:, :, self._need[i] - b0 :], self._need[i]
        self._buffers[i], self._buffer_start[i] = buf, b0
        if buf is None or buf.shape[2] == 0 or self._done[i] >= item.rows_out:
            if buf is not None and buf is band:
                self._buffers[i] = buf.clone()
            return None
        b1 = b0 + buf.shape[2]
        o0 = self._done[i]
        complete = b1 >= item.rows_in
        if complete:
            o1 = item.rows_out
        else:
            o1 = min(item.rows_out, (b1 + w.top - w.extent) // w.s + 1)
        if o1 <= o0:
            return None
        first = o0 * w.s - w.top  # input row of the first window
        last = (o1 - 1) * w.s - w.top + w.extent  # input row after the last window
        margin = w.extent + abs(w.top) + abs(w.bottom)  # rows the op's own padding may read (reflect)
        if first >= 0 and last <= item.rows_in and item.interior is not None:
            out = item.interior(buf[:, :, first - b0 : last - b0], lambda x: self._call(item, x))  # type: ignore[call-arg]
        else:  # the op with its own padding on a slab aligned to its stride; drop rows that saw fake padding
            if first < 0 and not complete and b1 < margin:
                return None  # the first rows: wait for enough of them to pad as the whole image does
            lead = -(-max(w.top, 0) // w.s)
            a = 0 if first < 0 else max(0, (o0 - lead) * w.s)
            if complete:
                a = max(b0, min(a, (item.rows_in - margin) // w.s * w.s))
            out = self._call(item, buf[:, :, a - b0 :])
            skip = o0 - a // w.s
            out = out[:, :, skip : skip + (o1 - o0)]
        if out.shape[2] != o1 - o0:
            raise UnsupportedModelError(
                f"streaming {describe_node(self.plan.fcn, item.node)} made {out.shape[2]} rows where {o1 - o0} were "
                "expected. Hint: report this model; run the whole image meanwhile."
            )
        self._done[i] = o1
        # keep the rows from the next window's start (aligned to the stride for the last band)
        lead = -(-max(w.top, 0) // w.s)
        keep = max(0, min(o1 * w.s - w.top, (o1 - lead) * w.s, (b1 - margin) // w.s * w.s))
        self._need[i] = keep
        if o1 >= item.rows_out or keep >= b1:
            self._buffers[i] = None
        elif keep > b0 or buf is band:  # a copy: the band it came from is freed, and in-place ops cannot touch it
            self._buffers[i] = buf[:, :, keep - b0 :].clone()
            self._buffer_start[i] = keep
        return out

    def _pointwise(
        self, i: int, item: _Node, values: Dict[int, Optional[torch.Tensor]], env: Dict
    ) -> Optional[torch.Tensor]:
        node, hdim = item.node, None
        pending = self._pending[i]
        bands: Dict[int, torch.Tensor] = {}
        if len(item.spatial) == 1 and not pending:
            band = values[item.spatial[0]]
            if band is None:
                return None
            bands[item.spatial[0]] = band
        else:
            for j in item.spatial:
                band = values.get(j)
                hdim = self.plan.nodes[j].hdim
                if band is not None:
                    pending[j] = band if j not in pending else torch.cat([pending[j], band], dim=hdim)
            n = min((pending[j].shape[self.plan.nodes[j].hdim] if j in pending else 0) for j in item.spatial)
            if n == 0:
                return None
            for j in item.spatial:
                d = self.plan.nodes[j].hdim
                bands[j], rest = pending[j].narrow(d, 0, n), pending[j].narrow(d, n, pending[j].shape[d] - n)
                if rest.shape[d] == 0:
                    del pending[j]
                else:
                    pending[j] = rest
        local = dict(env)
        for j, band in bands.items():
            local[self.plan.nodes[j].node] = band
        out = self._run(node, local)
        self._done[i] += out.shape[item.hdim]
        return out

    def _call(self, item: _Node, x: torch.Tensor) -> torch.Tensor:
        """The node's own op on ``x`` (its one row-stream input), padding and all."""
        env = dict(self._constants)
        env[self.plan.nodes[item.spatial[0]].node] = x
        return self._run(item.node, env)

    def _run(self, node: fx.Node, env: Dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n] if n in env else _constant(self.plan.fcn, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n] if n in env else _constant(self.plan.fcn, n))
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return _constant(self.plan.fcn, node)
        if node.op == "placeholder":  # an optional input traced as None
            return None
        raise UnsupportedModelError(
            f"{describe_node(self.plan.fcn, node)} cannot be streamed. Hint: run the whole image."
        )


# -- the probe: row-locality checked once per network, and the memory one input row costs ----------


@dataclasses.dataclass
class _Probe:
    """What one probe run tells about a network: bytes per input row, per batch item, per image column."""

    band_bytes: float  # the largest band of activations alive at once, per input row and column
    buffer_bytes: float  # rows the windows keep between bands, per column
    channels: int
    stride: int
    out_channels: int


_PROBES: "weakref.WeakKeyDictionary[fx.GraphModule, _Probe]" = weakref.WeakKeyDictionary()


def _probe(fcn: fx.GraphModule, image_size: Sequence[int]) -> _Probe:
    """Stream a small random image and compare every node with the whole-image run (once per network).

    Raises:
        UnsupportedModelError: the first node whose streamed rows differ from the whole run.
    """
    known = _PROBES.get(fcn)
    if known is not None:
        return known
    channels, h, w = _run_size(fcn, image_size)
    stride = geometry(fcn, (h, w)).stride[0]
    height = h + 3 * stride + 1  # several output rows, and a height that is not a multiple of the stride
    streamer = RowStreamer(fcn, (height, w), check=False)
    param = next(iter(fcn.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, channels, height, w, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    whole: Dict[fx.Node, Any] = {}

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            whole[n] = result
            return result

    streamed: Dict[int, List[torch.Tensor]] = {}
    with torch.no_grad(), _eval(fcn):
        _Record(fcn).run(x)
        band = max(1, stride // 2 + 1)
        streamer._record = streamed
        for y in range(0, height, band):
            streamer.push(x[:, :, y : y + band])
    plan = streamer.plan
    for i, item in enumerate(plan.nodes):
        if item.kind in ("input", "constant"):
            continue
        expected = whole[item.node]
        got = torch.cat(streamed[i], dim=item.hdim) if i in streamed else None
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if (
            got is None
            or got.shape != expected.shape
            or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
        ):
            diff = (
                "a different shape"
                if got is None or got.shape != expected.shape
                else f"max abs difference {float((got - expected).abs().max()):.2g}"
            )
            raise UnsupportedModelError(
                f"{describe_node(fcn, item.node)} is not row-local: streamed row by row it gives {diff} from the "
                "whole-image run, so its output rows depend on rows far away (a normalisation over the whole map?). "
                "Hint: run the whole image (fcn(image)) when it fits in memory; tiles (fcnify.predict_tiled) "
                "would differ from it as well."
            )
    # memory per input row and column: the two largest bands alive next to each other, and the kept rows
    per_row = {
        i: whole[item.node].nbytes / (height * w)
        for i, item in enumerate(plan.nodes)
        if item.kind != "constant" and isinstance(whole[item.node], torch.Tensor)
    }
    largest = sorted(per_row.values(), reverse=True)
    buffers = 0.0
    for item in plan.nodes:
        if item.kind == "window":
            j = item.spatial[0]
            rows = whole[plan.nodes[j].node].shape[2]
            buffers += (item.window.extent + item.window.s) * whole[plan.nodes[j].node].nbytes / max(rows, 1) / w
    out_channels = whole[plan.nodes[plan.output].node].shape[1]
    result = _Probe(
        band_bytes=sum(largest[:3]), buffer_bytes=buffers, channels=channels, stride=stride, out_channels=out_channels
    )
    _PROBES[fcn] = result
    return result


def _parse_memory(memory: Union[int, float, str]) -> int:
    if isinstance(memory, (int, float)):
        return int(memory)
    text = str(memory).strip().upper().replace(" ", "").rstrip("B").replace("I", "")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise FcnifyError(
            f"cannot read memory={memory!r}. Hint: bytes, or a string such as '2GB' or '512MB'."
        ) from None


def band_rows_for(
    fcn: fx.GraphModule,
    image_size: Sequence[int],
    memory: Union[int, float, str],
    batch: int = 1,
    whole_output: bool = False,
) -> int:
    """The tallest band of input rows whose activations fit in ``memory`` (a multiple of the network's stride).

    The estimate comes from one probe run: the bytes the largest activations take per input row
    and column, and the rows each window keeps between bands; ``whole_output`` adds the whole
    output map (what :func:`stream_predict` returns). The process's own memory (Python, torch,
    the model's weights) is not counted.

    Args:
        fcn: the network.
        image_size: ``(H, W)`` of the image.
        memory: bytes, or ``"2GB"``, ``"512MB"``.
        batch: images streamed together.
        whole_output: count the whole output map as well.

    Returns:
        Input rows per band (at least one stride, at most the image's height).
    """
    height, width = int(image_size[0]), int(image_size[1])
    probe = _probe(fcn, (height, width))
    budget = _parse_memory(memory)
    fixed = probe.buffer_bytes * width * batch
    if whole_output:
        cells = geometry(fcn, _run_size(fcn, image_size)[1:]).output_size(height, width)
        fixed += cells[0] * cells[1] * probe.out_channels * 4 * batch
    per_row = 2.0 * probe.band_bytes * width * batch  # 2: the allocator's slack and the convolutions' workspace
    rows = int((budget - fixed) // max(per_row, 1.0))
    rows = rows // probe.stride * probe.stride
    return max(probe.stride, min(rows, -(-height // probe.stride) * probe.stride))


# -- the public verbs ------------------------------------------------------------------------------


def _reader(
    image: Any, size: Optional[Sequence[int]]
) -> Tuple[Callable[[int, int], torch.Tensor], Tuple[int, int, int]]:
    """``read(y0, y1)`` of full-width rows as ``(N, C, rows, W)``, and ``(N, H, W)``."""
    if callable(image) and not isinstance(image, (torch.Tensor, np.ndarray)):
        if size is None:
            raise FcnifyError("a reader callable needs size=(H, W). Hint: stream_bands(fcn, read, size=(H, W)).")
        height, width = int(size[0]), int(size[1])

        def read(y0: int, y1: int) -> torch.Tensor:
            window = image(y0, 0, y1 - y0, width)
            if isinstance(window, np.ndarray):
                if window.ndim == 2:
                    window = window[:, :, None]
                tensor = torch.from_numpy(np.ascontiguousarray(window)).permute(2, 0, 1).unsqueeze(0)
                return tensor.float() / 255.0 if window.dtype == np.uint8 else tensor
            window = torch.as_tensor(window)
            return window.unsqueeze(0) if window.dim() == 3 else window

        return read, (1, height, width)
    source = _Source(image)
    width = source.size[1]
    return (lambda y0, y1: source.read(y0, y1, 0, width)), (source.shape[0], *source.size)


def stream_bands(
    fcn: fx.GraphModule,
    image: Any,
    band_rows: Optional[int] = None,
    memory: Union[int, float, str, None] = None,
    size: Optional[Sequence[int]] = None,
    device: Optional[Union[str, torch.device]] = None,
    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """``fcn(image)``, band by band: yields ``(first row, rows)`` of the output map as they are final.

    Reads the image one band of full-width rows at a time and never holds the whole output,
    so a caller can write each band to disk (a Zarr array) as it comes.

    Args:
        fcn: a fully convolutional network (:func:`fcnify.convert`), on ``device``.
        image: a tensor ``(C, H, W)`` / ``(N, C, H, W)``, a numpy array or memmap ``(H, W, C)``
            (``uint8`` scaled to ``[0, 1]``), a ``.npy`` or image path, or a callable
            ``read(y0, x0, h, w)`` returning ``(h, w, C)`` numpy or a ``(C, h, w)`` tensor (then
            ``size=(H, W)`` is required).
        band_rows: input rows per band; default from ``memory``.
        memory: working-memory budget for the band's activations (bytes or ``"2GB"``); default
            ``"1GB"``. Ignored when ``band_rows`` is given.
        size: ``(H, W)`` of the image, for a reader callable.
        device: where the bands run (the model must be there already); default the model's.
        preprocess: a per-pixel function applied to each band (e.g. mean/std normalisation).

    Returns:
        An iterator of ``(i0, band)``: output rows ``i0 .. i0 + band.shape[2]`` as an
        ``(N, K, rows, w)`` CPU tensor, top to bottom. The arguments are checked (and the network
        probed) before it is returned.

    Raises:
        UnsupportedModelError: the network has a node that is not row-local (named).

    Example:
        >>> import numpy as np, torch, zarr
        >>> from fcnify.inference import stream_bands
        >>> net = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, 2, 1), torch.nn.ReLU()))
        >>> read = lambda y0, x0, h, w: np.ones((h, w, 3), np.float32)  # a lazy reader
        >>> z = zarr.create_array(store={}, shape=(2, 50, 40), chunks=(2, 8, 40), dtype="f4")
        >>> for i0, band in stream_bands(net, read, band_rows=16, size=(100, 80)):
        ...     z[:, i0:i0 + band.shape[2]] = band[0].numpy()
        >>> bool(np.allclose(z[:], net(torch.ones(1, 3, 100, 80))[0].detach().numpy(), atol=1e-6))
        True
    """
    return _bands(fcn, image, band_rows, memory, size, device, preprocess, whole_output=False)[1]


def _bands(
    fcn: fx.GraphModule,
    image: Any,
    band_rows: Optional[int],
    memory: Union[int, float, str, None],
    size: Optional[Sequence[int]],
    device: Any,
    preprocess: Optional[Callable],
    whole_output: bool,
) -> Tuple[RowStreamer, Iterator[Tuple[int, torch.Tensor]]]:
    read, (batch, height, width) = _reader(image, size)
    param = next(iter(fcn.parameters()), None)
    device = (
        torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    )
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    streamer = RowStreamer(fcn, (height, width))
    if band_rows is None:
        band_rows = band_rows_for(
            fcn, (height, width), memory if memory is not None else "1GB", batch=batch, whole_output=whole_output
        )
    band_rows = int(band_rows)
    if band_rows < 1:
        raise FcnifyError(f"band_rows must be at least 1, got {band_rows}. Hint: band_rows=128.")

    def run() -> Iterator[Tuple[int, torch.Tensor]]:
        row = 0
        with torch.no_grad(), _eval(fcn):
            for y0 in range(0, height, band_rows):
                x = read(y0, min(height, y0 + band_rows)).to(device=device, dtype=dtype)
                if preprocess is not None:
                    x = preprocess(x)
                out = streamer.push(x)
                if out is not None:
                    yield row, out.cpu()
                    row += out.shape[2]
        if not streamer.done:  # pragma: no cover - the plan guarantees it
            raise UnsupportedModelError(
                f"streaming {type(fcn).__name__} ended after {row} of {streamer.output_size[0]} output rows. "
                "Hint: report this model; run the whole image meanwhile."
            )

    return streamer, run()


def stream_predict(
    fcn: fx.GraphModule,
    image: Any,
    band_rows: Optional[int] = None,
    memory: Union[int, float, str, None] = None,
    device: Optional[Union[str, torch.device]] = None,
    size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """``fcn(image)`` computed by streaming rows: the same numbers, each computed once, in bounded memory.

    Memory holds one band of activations, a few rows per layer and the output map (which
    :func:`stream_bands` does not hold).

    Args:
        fcn: a fully convolutional network from :func:`fcnify.convert`, on ``device``.
        image: as for :func:`stream_bands`.
        band_rows: input rows per band; default from ``memory``.
        memory: working-memory budget (bytes or ``"2GB"``) for the bands' activations, the rows the
            layers keep and the output map; default ``"1GB"``. The process's own memory (Python,
            torch, the weights) is not counted.
        device: where the bands run; default the model's. The result is on the CPU.
        size: ``(H, W)`` for a reader callable.

    Returns:
        ``(N, K, h, w)``, equal to ``fcn(image)`` to float precision.

    Example:
        >>> import torch
        >>> from fcnify.inference import stream_predict
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, padding=2), torch.nn.MaxPool2d(3, 2, 1),
        ...                           torch.nn.Conv2d(4, 2, 3))
        >>> x = torch.randn(1, 3, 101, 64)
        >>> y = stream_predict(torch.fx.symbolic_trace(net), x, band_rows=20)
        >>> torch.allclose(y, net(x), atol=1e-5)
        True
    """
    streamer, bands = _bands(fcn, image, band_rows, memory, size, device, None, whole_output=True)
    out: Optional[torch.Tensor] = None
    for i0, band in bands:
        if out is None:
            h, w = streamer.output_size
            out = torch.empty(band.shape[0], band.shape[1], h, w, dtype=band.dtype)
        out[:, :, i0 : i0 + band.shape[2]] = band
    if out is None:  # pragma: no cover - a plan always has rows
        raise FcnifyError("streaming made no output rows. Hint: report this model.")
    return out
