"""The head rewriter: copies a traced classifier into a graph whose head works on maps.

The body (every node that still leads to a spatial feature map) is copied as it is.
The head (the nodes after the last spatial feature map) is rewritten node by node:
each head value that was a feature vector ``(N, F)`` is carried as a map
``(N, F, H', W')``, one vector per window position, and each op is replaced by the
op that does the same thing at every position. The rules in :mod:`fcnify.conversion.rules`
say how, one identity each.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._errors import UnsupportedModelError
from .._mode import MODES
from ..graph import ShapeRun, describe_node, fetch_attr, is_adaptive_pool

__all__ = ["Lifted", "Context", "Rewrite", "rewrite_head", "find_head", "MODES"]


@dataclasses.dataclass
class Lifted:
    """How a head value of the original graph is carried in the converted graph.

    Attributes:
        kind: ``"vec"`` for an original ``(N, F)`` vector, carried as ``(N, F, H', W')``
            (or ``(N, C, H', W')`` when ``kernel`` folds a ``C x h x w`` map into F);
            ``"flat"`` for a partly flattened map such as ``(N, C, h*w)`` or
            ``(N, C, 1)``, carried as the 4-d map it came from; ``"map"`` for a 4-d
            head value (e.g. a pooled ``(N, C, 1, 1)`` map), carried as is.
        channels: channels of the carried map.
        kernel: spatial extent ``(h, w)`` that a flatten folded into the features.
        fold: for an adaptive pool folded into the next Linear, its matrix
            ``(h_out * w_out, h * w)`` at the training size.
        axes: spatial axes of a carried map (``(2, 3)`` for NCHW).
        pool: the global pool this value descends from ("avg", "max", "sum") and
            whether the value is still an affine function of it (for ``dense``).
        stacked: for the output of an adaptive pool to ``P = oh * ow`` positions applied at
            every window, ``P``: the map is carried as ``(N, C, P * H', W')``, the pooled
            positions stacked along the height, so that per-position layers (1x1 conv,
            norm, activation) apply unchanged; a flatten unstacks them into channels.
    """

    kind: str
    channels: int = 0
    kernel: Tuple[int, int] = (1, 1)
    fold: Optional[torch.Tensor] = None
    axes: Tuple[int, int] = (2, 3)
    pools: Tuple[str, ...] = ()
    affine: bool = True
    stacked: int = 1

    def derive(self, **changes: Any) -> "Lifted":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Rewrite:
    """One applied rule: which node, what it was, what it became."""

    rule: str
    node: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.node}: {self.before} -> {self.after}"


class Context:
    """What a rule sees: shapes, the graph being built, and what each head value is."""

    def __init__(self, gm: fx.GraphModule, run: ShapeRun, run2: ShapeRun, mode: str, head: set):
        self.gm = gm
        self.run = run
        self.run2 = run2
        self.mode = mode
        self.head = head
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, fx.Node] = {}
        self.info: Dict[fx.Node, Lifted] = {}
        self.rewrites: List[Rewrite] = []
        self.modules = dict(gm.named_modules())
        #: modules and buffers the rewrite adds, by target; ``gm`` itself is never changed,
        #: so that one trace can be rewritten in several modes.
        self.added: Dict[str, Any] = {}
        self._module_uses: Dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self._module_uses[n.target] = self._module_uses.get(n.target, 0) + 1

    # -- reading the original graph -------------------------------------------------
    def shape(self, node: Any) -> Optional[Tuple[int, ...]]:
        return self.run.shape(node) if isinstance(node, fx.Node) else None

    def lifted(self, node: Any) -> Optional[Lifted]:
        return self.info.get(node) if isinstance(node, fx.Node) else None

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def describe(self, node: fx.Node) -> str:
        return describe_node(self.gm, node)

    def spatial_axes(self, node: fx.Node) -> Tuple[int, int]:
        """Spatial axes of a 4-d value: known for head maps, else those that grow with the input."""
        info = self.lifted(node)
        if info is not None and info.kind == "map":
            return info.axes
        s1, s2 = self.run.shape(node), self.run2.shape(node)
        if s1 and s2 and len(s1) == len(s2) == 4 and s1[0] == s2[0]:
            grown = tuple(i for i in range(1, 4) if s1[i] != s2[i])
            if len(grown) == 2:
                return grown  # type: ignore[return-value]
        return (2, 3)

    # -- building the new graph -----------------------------------------------------
    def new(self, arg: Any) -> Any:
        """The converted graph's value for an original argument (nodes, lists, dicts)."""
        return fx.node.map_arg(arg, lambda n: self.env[n])

    def copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, lambda n: self.env[n])

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_method(name, args, kwargs)

    def to_nchw(self, node: fx.Node, axes: Tuple[int, int]) -> fx.Node:
        """The new graph's value of ``node`` as an NCHW map, given its spatial axes."""
        value = self.env[node]
        if tuple(axes) == (2, 3):
            return value
        channel = ({1, 2, 3} - set(axes)).pop()
        return self.method("permute", value, 0, channel, axes[0], axes[1])

    def replace_module(self, node: fx.Node, module: nn.Module) -> fx.Node:
        """Call ``module`` in place of the module ``node`` calls; keeps its path when unshared."""
        target = node.target
        if self._module_uses.get(target, 0) > 1:
            target = f"{target}_fcn_{node.name}".replace(".", "_")
        self.added[target] = module
        self.modules[target] = module
        return self.graph.call_module(target, (self.env[node.args[0]],))

    def constant(self, name: str, value: torch.Tensor) -> fx.Node:
        """Register ``value`` as a buffer of the converted module and read it in the graph."""
        target = f"fcnify_{name}"
        self.added[target] = value
        return self.graph.get_attr(target)

    def attributes(self) -> Dict[str, Any]:
        """Every module and tensor the new graph reads, by target: a root for ``fx.GraphModule``."""
        found: Dict[str, Any] = {}
        for node in self.graph.nodes:
            if node.op in ("call_module", "get_attr") and node.target not in found:
                found[node.target] = (
                    self.added[node.target] if node.target in self.added else fetch_attr(self.gm, node.target)
                )
        return found

    def record(self, rule: str, node: fx.Node, before: str, after: str) -> None:
        self.rewrites.append(Rewrite(rule, node.name, before, after))

    def unsupported(self, node: fx.Node, reason: str, hint: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"cannot convert {self.describe(node)}: {reason}. Hint: {hint}")


def is_spatial_map(shape: Any) -> bool:
    """A 4-d tensor with more than one position: ``(N, C, h, w)`` with ``h * w > 1``."""
    return isinstance(shape, tuple) and len(shape) == 4 and sum(d == 1 for d in shape[1:]) <= 1


def find_head(gm: fx.GraphModule, run: ShapeRun, run2: Optional[ShapeRun] = None) -> set:
    """The head: nodes that lead to no spatial feature map (the rest is the body).

    A squeeze-and-excitation pool feeds back into a map, so it belongs to the body and
    stays global; the classifier's pool leads only to logits, so it is in the head.
    """
    body: set = set()
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "output":
            continue
        if is_spatial_map(run.shape(node)) or any(user in body for user in node.users):
            body.add(node)
    head = {n for n in gm.graph.nodes if n not in body and n.op not in ("placeholder", "output", "get_attr")}
    # An adaptive pool that only feeds the head (VGG's AdaptiveAvgPool2d((7, 7))) pins the
    # last map to one size; it belongs to the head, where it is dropped or folded. So do the
    # per-position layers between such a pool and the flatten (GoogLeNet's auxiliary heads:
    # adaptive pool to 4x4, 1x1 conv, flatten): their maps do not grow with the input either.
    for node in reversed(list(gm.graph.nodes)):
        if node in body and node.users and all(u in head for u in node.users):
            if is_adaptive_pool(node, gm) or (_is_frozen(node, run, run2) and _follows_adaptive_pool(gm, node)):
                head.add(node)
    return head - _spatial_tail(gm, head, run, run2)


def _spatial_tail(gm: fx.GraphModule, head: set, run: ShapeRun, run2: Optional[ShapeRun]) -> set:
    """Head candidates that belong to the body: the maps that a later layer still mixes across positions.

    At the training size a downsampling pool can reduce the map to 1x1 while convolutions still
    follow it (a DenseNet's last transition at 32x32): its maps have one position, so they look like
    the head, yet at a larger size the pool keeps its stride and the layers after it combine
    neighbouring cells. The head starts after the last layer that mixes positions other than a pool
    over the whole map: such a layer (a 3x3 convolution on the 1x1 map, a pool that covers the map
    only with its padding) moves to the body, with everything it is computed from. Pools over the
    whole map followed only by such pools stay: they slide with stride 1, which is exact (the
    pool of a pool over a window is the pool over that window).
    """
    nodes = [n for n in gm.graph.nodes if n in head]
    tail = {n for n in nodes if _mixes_positions(gm, n, run, run2) and not _is_pool(gm, n, run)}
    for node in reversed(nodes):  # with everything they are computed from
        if any(u in tail for u in node.users):
            tail.add(node)
    return tail


_MIXING_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.modules.pooling._MaxUnpoolNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.Fold,
    nn.Unfold,
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
)
_POOL_MODULES = (
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_POOL_FUNCTIONS = (
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.lp_pool1d,
    F.lp_pool2d,
)
_OTHER_MIXING_FUNCTIONS = (F.interpolate, F.upsample, F.pad, F.pixel_shuffle, F.pixel_unshuffle, F.unfold, F.fold)
_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "logsumexp", "std", "var", "nansum", "nanmean")


def _is_pool(gm: fx.GraphModule, node: fx.Node, run: ShapeRun) -> bool:
    """A pool over every position: a reduction (``x.mean((2, 3))``), an adaptive pool, or a fixed pool
    whose one window covers its input exactly at the training size (no padding, kernel = map).

    A fixed pool that covers the map only with its padding (``AvgPool2d(4, padding=1)`` on a 4x4
    map) has no sliding equivalent: it stays in the body with its stride.
    """
    if _reduction_name(node) is not None:
        return True
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, _POOL_MODULES):
            return False
        if isinstance(module, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
            return True
        kernel, padding = module.kernel_size, getattr(module, "padding", 0)
    elif node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        if "adaptive" in node.target.__name__:
            return True
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
    else:
        return False
    shape = run.shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if shape is None:
        return False
    spatial = tuple(shape[2:])
    kernel = _as_tuple(kernel) * (len(spatial) if not isinstance(kernel, (tuple, list)) else 1)
    padding = _as_tuple(padding)
    return tuple(kernel) == spatial and not any(padding)


def _reduction_name(node: fx.Node) -> Optional[str]:
    if node.op == "call_method" and node.target in _REDUCTIONS:
        return node.target
    if node.op == "call_function" and any(node.target is getattr(torch, r, None) for r in _REDUCTIONS):
        return node.target.__name__
    return None


def _mixes_positions(gm: fx.GraphModule, node: fx.Node, run: ShapeRun, run2: Optional[ShapeRun]) -> bool:
    """Whether an output position of ``node`` depends on more than one position of its input map."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = run.shape(src) if src is not None else None
    if shape is None or len(shape) < 3 or _is_frozen(src, run, run2):
        return False  # a map that keeps its size at every input (after an adaptive pool) is the head's
    if node.op == "call_module":
        return any(_module_mixes(m) for m in gm.get_submodule(node.target).modules())
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        kernel = run.shape(weight) if isinstance(weight, fx.Node) else None
        stride = node.args[3] if len(node.args) > 3 else node.kwargs.get("stride", 1)
        return kernel is None or any(k > 1 for k in kernel[2:]) or any(s > 1 for s in _as_tuple(stride))
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS + _OTHER_MIXING_FUNCTIONS:
        return True
    if _reduction_name(node) is not None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return True
        dims = {d % len(shape) for d in _as_tuple(dims) if isinstance(d, int)}
        shape2 = run2.shape(src) if run2 is not None else None
        if shape2 is not None and len(shape2) == len(shape):
            return any(shape[d] != shape2[d] for d in dims)
        return any(d >= 2 for d in dims)
    return False


def _module_mixes(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.conv._ConvNd):
        return any(k > 1 for k in m.kernel_size) or any(s > 1 for s in m.stride)
    return isinstance(m, _MIXING_MODULES)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_frozen(node: fx.Node, run: ShapeRun, run2: Optional[ShapeRun]) -> bool:
    """A 4-d map with the same shape at both input sizes."""
    s1 = run.shape(node)
    s2 = run2.shape(node) if run2 is not None else None
    return s1 is not None and len(s1) == 4 and s1 == s2


def _follows_adaptive_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` descends from an adaptive pool through single-input layers."""
    while True:
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
        if is_adaptive_pool(node, gm):
            return True


def rewrite_head(gm: fx.GraphModule, run: ShapeRun, run2: ShapeRun, mode: str, rules: Sequence[Any]) -> Context:
    """Copy ``gm`` into a new graph, rewriting the head with ``rules``; return the context."""
    head = find_head(gm, run, run2)
    ctx = Context(gm, run, run2, mode, head)
    for node in gm.graph.nodes:
        if node.op == "output":
            ctx.env[node] = ctx.graph.output(_outputs(node, ctx))
            continue
        if node not in head:
            ctx.env[node] = ctx.copy(node)
            continue
        declines = []
        for rule in rules:
            found = rule.check(node, ctx)
            if found:
                ctx.env[node] = rule.rewrite(node, ctx, found)
                break
            if found.quoted:
                declines.append(found)
        else:
            ctx.env[node] = _default(node, ctx, declines)
    return ctx


def _default(node: fx.Node, ctx: Context, declines: Sequence[Any] = ()) -> fx.Node:
    """No rule matched: fine for values that carry no lifted input; otherwise refuse, quoting the declines."""
    lifted_inputs = [a for a in node.all_input_nodes if ctx.lifted(a) is not None and ctx.lifted(a).kind != "map"]
    if lifted_inputs:
        shape = ctx.shape(lifted_inputs[0])
        out = ctx.shape(node) or ()
        info = ctx.lifted(lifted_inputs[0])
        if (
            info.kind == "flat"
            and len(out) == 3
            and tuple(out[:2]) == tuple(shape[:2])
            and _is_linear(node, ctx)
            and _flattens_positions(lifted_inputs[0])
        ):
            raise ctx.unsupported(
                node,
                f"it applies a Linear across the {shape[2]} positions of each of the {shape[1]} channels "
                f"({shape} -> {out}): its weights are tied to one position each, so the layer only exists "
                "at the training size",
                "flatten the whole map (x.flatten(1)) before the Linear, which fcnify turns into a convolution "
                "with the map's kernel size, or pool the map first",
            )
        if ctx.lifted(lifted_inputs[0]).kind == "flat" and len(out) == 3:
            raise ctx.unsupported(
                node,
                f"it turns the flattened feature map {shape} into a sequence of tokens "
                f"{ctx.shape(node)}: this is a transformer head (class token or attention), whose logits "
                "do not come from a spatial map",
                "a transformer has no per-position classifier; run it on crops, or use a CNN classifier",
            )
        declined = "".join(f"; {d}" for d in declines)
        raise ctx.unsupported(
            node,
            f"no rule knows how to apply it at every position of the feature vector {shape} "
            f"from node '{lifted_inputs[0].name}'{declined}",
            "fcnify converts Linear, pooling, flatten/reshape, normalisation, activation, "
            "dropout, softmax and concatenation in the head; write the head with these, or "
            "convert the body with mode='global' and apply the head yourself",
        )
    maps = [ctx.lifted(a) for a in node.all_input_nodes if ctx.lifted(a) is not None]
    if any(m.stacked > 1 for m in maps) and not _per_position(node, ctx):
        raise ctx.unsupported(
            node,
            "it mixes positions of the output of an adaptive pool to a fixed size; only per-position "
            "layers (1x1 convolutions, normalisations, activations) can follow it at every window",
            "convert at an input size where the adaptive pool is the identity, or pool to 1x1",
        )
    new = ctx.copy(node)
    if maps and is_map_shape(ctx.shape(node)):
        ctx.info[node] = maps[0].derive(affine=False)
    return new


def _flattens_positions(node: fx.Node) -> bool:
    """``x.flatten(2)`` / ``torch.flatten(x, 2)``: a map's positions made the last axis."""
    if (
        node.op == "call_method"
        and node.target == "flatten"
        or node.op == "call_function"
        and node.target is torch.flatten
    ):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 2  # type: ignore[return-value]
    return False


def _is_linear(node: fx.Node, ctx: Context) -> bool:
    if node.op == "call_module":
        return isinstance(ctx.module(node), nn.Linear)
    return node.op == "call_function" and node.target in (F.linear, torch.matmul)


def _per_position(node: fx.Node, ctx: Context) -> bool:
    """A module that acts on each position of a map on its own: a 1x1 convolution or a norm."""
    if node.op != "call_module":
        return False
    m = ctx.module(node)
    if isinstance(m, nn.Conv2d):
        return m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), "valid")
    return isinstance(m, (nn.BatchNorm2d, nn.Identity))


def is_map_shape(shape: Any) -> bool:
    return isinstance(shape, tuple) and len(shape) == 4


def _outputs(node: fx.Node, ctx: Context) -> Any:
    """Map the original outputs; in ``global`` mode, average lifted vectors back to ``(N, K)``."""

    def convert(n: fx.Node) -> fx.Node:
        info = ctx.lifted(n)
        value = ctx.env[n]
        if info is None or info.kind != "vec":
            return value
        if ctx.mode == "global":
            if not info.pools:
                ctx.record("WindowLogitsToGlobal", n, "logits of one window", "mean of the window logits")
            return ctx.method("mean", value, (2, 3))
        return value

    return fx.node.map_arg(node.args[0], convert)
