"""``fcnify.segmenter``: a classifier becomes an FCN-32s, -16s or -8s segmentation network.

The classifier, converted in ``dense`` mode, is the backbone; its class map (stride ``S``) is
the FCN-32s prediction. Skip branches read shallower feature maps at strides ``S/2`` and ``S/4``
through zero-initialised 1x1 score layers, as in Long, Shelhamer and Darrell (2015). Every score
map is upsampled to the input resolution, aligned by its cells' centres, and the results are
summed. Identity the upsampling relies on: a transposed convolution of stride ``s`` with the
kernel ``k[i] = 1 - |i - (s - 1)| / s`` (size ``2s - 1``) is linear interpolation between cell
centres, so with zero-initialised skips FCN-8s starts as FCN-32s, the upsampled class map.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from .._errors import FcnifyError, UnsupportedModelError
from ..analysis import geometry
from ..conversion import ConversionReport, FullyConvolutionalNet, convert
from ..graph import InputSize, describe_node, device_and_dtype, eliminate_dead_code, example_input, record_shapes

__all__ = ["segmenter", "Segmenter", "bilinear_kernel"]

UPSAMPLE_MODES = ("bilinear", "transposed")
#: Both probe runs differ by this many pixels per axis, so strides dividing it are read exactly.
_PROBE_DELTA = 64


def bilinear_kernel(stride: int) -> torch.Tensor:
    """The ``(2s - 1, 2s - 1)`` transposed-convolution kernel that interpolates linearly.

    Args:
        stride: the upsampling factor ``s``.

    Returns:
        ``outer(k, k)`` with ``k[i] = 1 - |i - (s - 1)| / s``: cell ``j`` lands at output
        ``s * j + s - 1`` with weight 1 and fades to 0 at its neighbours' centres.

    Example:
        >>> from fcnify.inference import bilinear_kernel
        >>> bilinear_kernel(2)
        tensor([[0.2500, 0.5000, 0.2500],
                [0.5000, 1.0000, 0.5000],
                [0.2500, 0.5000, 0.2500]])
    """
    k = 1 - (torch.arange(2 * stride - 1, dtype=torch.float64) - (stride - 1)).abs() / stride
    return torch.outer(k, k).float()


class _Upsample(nn.Module):
    """Upsample a ``(N, K, h, w)`` score map of stride ``s`` to exactly ``(N, K, H, W)``.

    Cell ``(i, j)`` is centred on input pixel ``centre + s * (i, j)``. The map is padded by
    replicating border cells as far as the image needs (a size the strided layers do not fit
    exactly leaves the last pixels beyond the last cell), interpolated by a depthwise transposed
    convolution with :func:`bilinear_kernel`, and cropped so that output pixel ``y`` reads map
    coordinate ``(y - centre) / s``.
    """

    def __init__(self, channels: int, stride: int, centre: Tuple[float, float], learnable: bool):
        super().__init__()
        self.stride = stride
        # the transposed convolution puts cells on whole pixels: round the centre to one
        # (half pixels round towards the top left, the same way at every stride)
        self.centre = tuple(float(stride - 1 - math.floor(stride - 1 - c + 0.5)) for c in centre)
        weight = bilinear_kernel(stride).expand(channels, 1, -1, -1).clone()
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight, persistent=False)
        self.learnable = learnable

    def extra_repr(self) -> str:
        kind = "learnable transposed conv" if self.learnable else "fixed bilinear"
        return f"stride={self.stride}, centre={self.centre}, {kind}"

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        s = self.stride
        pads, offsets = [], []
        for length, cells, centre in zip(size, x.shape[-2:], self.centre):
            before = max(0, math.ceil(centre / s))
            after = max(0, math.ceil((length - 1 - centre - s * (cells - 1)) / s))
            pads.append((before, after))
            offsets.append(int(s - 1 + s * before - centre))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), mode="replicate")
        y = F.conv_transpose2d(x, self.weight.to(x.dtype), stride=s, groups=x.shape[1])
        return y[..., offsets[0] : offsets[0] + size[0], offsets[1] : offsets[1] + size[1]]


class Segmenter(nn.Module):
    """An FCN built by :func:`segmenter`: ``(N, C, H, W) -> (N, num_classes, H, W)``.

    Attributes:
        backbone: the dense-mode converted classifier, returning the main map and the skips.
        scores: per stream, the 1x1 score layer (``nn.Identity`` for a kept classifier).
        upsamplers: per stream, the upsampling to the input resolution.
        skips: names of the backbone nodes the skip streams read.
        strides: per stream (main first), its stride relative to the input.
        variant: ``"FCN-32s"``, ``"FCN-16s"``, ``"FCN-8s"`` (named by the finest stride).
        num_classes: number of output channels.
        conversion_report: the report of the dense conversion.
    """

    def __init__(
        self,
        backbone: fx.GraphModule,
        scores: Sequence[nn.Module],
        upsamplers: Sequence[_Upsample],
        skips: Sequence[str],
        strides: Sequence[int],
        num_classes: int,
        conversion_report: Optional[ConversionReport] = None,
    ):
        super().__init__()
        self.conversion_report = conversion_report
        self.backbone = backbone
        self.scores = nn.ModuleList(scores)
        self.upsamplers = nn.ModuleList(upsamplers)
        self.skips = list(skips)
        self.strides = list(strides)
        self.num_classes = num_classes
        self.variant = f"FCN-{min(strides)}s"

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, num_classes={self.num_classes}, skips={self.skips}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        maps = self.backbone(x)
        out = None
        for feature, score, upsample in zip(maps, self.scores, self.upsamplers):
            y = upsample(score(feature), size)
            out = y if out is None else out + y
        return out  # type: ignore[return-value]


def segmenter(
    model: nn.Module,
    num_classes: Optional[int] = None,
    input_size: Optional[InputSize] = None,
    skips: Union[str, Sequence[Union[int, str]]] = "auto",
    upsample: str = "bilinear",
    keep_classifier: bool = False,
    verify: bool = True,
) -> Segmenter:
    """Build an FCN-32s, -16s or -8s segmentation network from a classifier.

    The classifier is converted with ``fcnify.convert(mode="dense")`` and becomes the backbone.
    Its last Linear (now a 1x1 convolution) is replaced by a zero-initialised 1x1 score layer
    with ``num_classes`` outputs, or kept (``keep_classifier=True``) so that the network starts
    from the classifier's own class scores. Each skip gets a zero-initialised 1x1 score layer;
    each score map is upsampled to the input size and the results are summed. The output is
    ``(N, num_classes, H, W)`` for every input the backbone accepts, odd sizes included.

    Args:
        model: a classifier :func:`fcnify.convert` accepts; it is not modified.
        num_classes: output classes; with ``keep_classifier=True`` it may be omitted (it must
            then equal the classifier's).
        input_size: the classifier's training size ``(H, W)``, as for :func:`fcnify.convert`.
        skips: ``"auto"`` for FCN-8s (the last feature maps at strides ``S/2`` and ``S/4`` of the
            backbone's stride ``S``, found from the traced graph); a sequence of strides, e.g.
            ``(16,)`` for FCN-16s or ``()`` for FCN-32s; or node names of the converted graph
            (``fcnify.convert(model, mode="dense").graph``), which may be mixed with strides.
        upsample: ``"bilinear"`` (fixed interpolation) or ``"transposed"`` (learnable transposed
            convolutions initialised to bilinear interpolation, as in the paper).
        keep_classifier: keep the classifier's last layer as the score layer.
        verify: verify the dense conversion (see :func:`fcnify.convert`).

    Returns:
        A :class:`Segmenter` with the training flag of ``model``.

    Raises:
        FcnifyError: bad arguments, or a skip that is not a feature map of the backbone.
        UnsupportedModelError: the model cannot be converted, or no feature map has the stride
            a skip asks for.

    Example:
        >>> import torch, fcnify
        >>> stage = lambda c_in: [torch.nn.Conv2d(c_in, 8, 3, stride=2, padding=1), torch.nn.ReLU()]
        >>> net = torch.nn.Sequential(*stage(3), *stage(8), *stage(8), *stage(8), *stage(8),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        >>> seg = fcnify.segmenter(net, num_classes=3, input_size=(64, 64))
        >>> seg.variant, seg.strides
        ('FCN-8s', [32, 16, 8])
        >>> seg(torch.randn(1, 3, 71, 97)).shape
        torch.Size([1, 3, 71, 97])
    """
    if upsample not in UPSAMPLE_MODES:
        raise FcnifyError(f"unknown upsample={upsample!r}. Hint: use one of {', '.join(UPSAMPLE_MODES)}.")
    if not keep_classifier and (num_classes is None or int(num_classes) < 1):
        raise FcnifyError(
            f"num_classes must be a positive integer, got {num_classes!r}. "
            "Hint: segmenter(model, num_classes=21), or keep_classifier=True to keep the classifier's classes."
        )
    fcn = convert(model, input_size, mode="dense", verify=verify)
    size = fcn.conversion_report.input_size
    main = _single_output(fcn)
    x = example_input(fcn, size, batch_size=1)
    x2 = example_input(fcn, (size[0], size[1] + _PROBE_DELTA, size[2] + _PROBE_DELTA), batch_size=1)
    run, run2 = record_shapes(fcn, x), record_shapes(fcn, x2)
    stride = _stride(run, run2, main)
    if stride is None:
        raise UnsupportedModelError(
            f"the class map of {type(model).__name__} ({describe_node(fcn, main)}) has no whole stride "
            f"(shapes {run.shape(main)} and {run2.shape(main)} at inputs {size[1:]} and "
            f"{tuple(x2.shape[2:])}). Hint: segmenter needs a network whose map shrinks by a whole factor."
        )
    classes = run.shape(main)[1]
    if keep_classifier:
        if num_classes is not None and int(num_classes) != classes:
            raise FcnifyError(
                f"keep_classifier=True keeps the classifier's {classes} classes, but num_classes={num_classes}. "
                "Hint: omit num_classes, or use keep_classifier=False for a fresh score layer."
            )
        num_classes = classes
    else:
        main = _classifier_input(fcn, main, model)
    skip_nodes = _find_skips(fcn, run, run2, stride, skips)

    nodes = [main] + skip_nodes
    backbone = _with_outputs(fcn, nodes)
    strides = [_stride(run, run2, n) for n in nodes]
    scores: List[nn.Module] = [nn.Identity()] if keep_classifier else []
    for node in nodes[len(scores) :]:
        score = nn.Conv2d(run.shape(node)[1], num_classes, 1)
        nn.init.zeros_(score.weight)
        nn.init.zeros_(score.bias)
        scores.append(score)
    upsamplers = [
        _Upsample(num_classes, s, _centre(fcn, node, size, s), learnable=upsample == "transposed")
        for node, s in zip(nodes, strides)
    ]
    seg = Segmenter(
        backbone, scores, upsamplers, [n.name for n in skip_nodes], strides, num_classes, fcn.conversion_report
    )
    device, dtype = device_and_dtype(fcn)
    seg.to(device=device, dtype=dtype)
    seg.train(model.training)
    return seg


def _single_output(fcn: FullyConvolutionalNet) -> fx.Node:
    output = next(n for n in fcn.graph.nodes if n.op == "output")
    leaves = [leaf for leaf in pytree.tree_flatten(output.args[0])[0] if isinstance(leaf, fx.Node)]
    if len(leaves) != 1:
        raise UnsupportedModelError(
            f"the converted {fcn.conversion_report.model} has {len(leaves)} outputs. "
            "Hint: segmenter needs a classifier with one output (drop auxiliary heads)."
        )
    return leaves[0]


def _stride(run, run2, node: fx.Node) -> Optional[int]:
    """Whole stride of an NCHW map from two runs ``_PROBE_DELTA`` pixels apart, else None."""
    s1, s2 = run.shape(node), run2.shape(node)
    if not (s1 and s2 and len(s1) == len(s2) == 4 and s1[:2] == s2[:2]):
        return None
    grown = (s2[2] - s1[2], s2[3] - s1[3])
    if grown[0] != grown[1] or grown[0] <= 0 or _PROBE_DELTA % grown[0]:
        return None
    return _PROBE_DELTA // grown[0]


def _classifier_input(fcn: fx.GraphModule, main: fx.Node, model: nn.Module) -> fx.Node:
    """The features the classifier's last convolution (its last Linear, converted) reads."""
    node = main
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(fcn.get_submodule(node.target), nn.Conv2d):
            return node.args[0]  # type: ignore[return-value]
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            return node.args[0]  # type: ignore[return-value]
        node = node.args[0] if node.args else None
    raise UnsupportedModelError(
        f"cannot find the last classifier layer of {type(model).__name__}: no convolution leads to its output. "
        "Hint: use keep_classifier=True to keep the classifier's scores."
    )


def _cut_nodes(fcn: fx.GraphModule, run) -> set:
    """Nodes every path from the input to the output goes through (a stage's output).

    No edge may jump over such a node; parameters, the input and values that are not maps
    (size queries) do not count as edges.
    """
    nodes = list(fcn.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    reach = -1  # the furthest node an edge from before the current one reaches
    cuts = set()
    for i, node in enumerate(nodes):
        if reach <= i and node.op not in ("placeholder", "output", "get_attr"):
            cuts.add(node)
        shape = run.shape(node)
        if node.op in ("placeholder", "get_attr") or not (shape and len(shape) == 4):
            continue
        reach = max([reach] + [order[u] for u in node.users])
    return cuts


def _find_skips(fcn: fx.GraphModule, run, run2, stride: int, skips) -> List[fx.Node]:
    if isinstance(skips, str):
        if skips != "auto":
            skips = [skips]
        else:
            skips = [s for s in (stride // 2, stride // 4) if s >= 1 and s * 4 >= stride]
    by_name = {n.name: n for n in fcn.graph.nodes}
    cuts = _cut_nodes(fcn, run)
    maps = [n for n in fcn.graph.nodes if n.op != "output" and _stride(run, run2, n) is not None]
    found = []
    for skip in skips:
        if isinstance(skip, str):
            node = by_name.get(skip)
            if node is None or _stride(run, run2, node) is None:
                what = (
                    "is not in the converted graph"
                    if node is None
                    else (f"is not an NCHW feature map ({run.shape(node)})")
                )
                raise FcnifyError(
                    f"skip node '{skip}' {what}. Hint: stage outputs of this backbone: "
                    f"{_candidates(cuts, maps, run, run2)}."
                )
            found.append(node)
            continue
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 1:
            raise FcnifyError(f"skips must be 'auto', strides or node names, got {skip!r}. Hint: skips=(16, 8).")
        at = [n for n in maps if _stride(run, run2, n) == skip and n in cuts] or [
            n for n in maps if _stride(run, run2, n) == skip
        ]
        if not at:
            raise UnsupportedModelError(
                f"no feature map of the backbone has stride {skip} (its class map has stride {stride}). "
                f"Hint: stage outputs of this backbone: {_candidates(cuts, maps, run, run2)}."
            )
        found.append(at[-1])
    return found


def _candidates(cuts: set, maps: List[fx.Node], run, run2) -> str:
    """The last stage output at each stride, for hints."""
    last = {}
    for n in maps:
        if n in cuts:
            last[_stride(run, run2, n)] = n
    return ", ".join(f"'{n.name}' (stride {s})" for s, n in sorted(last.items())) or "none found"


def _with_outputs(fcn: fx.GraphModule, nodes: Sequence[fx.Node], share: bool = False) -> fx.GraphModule:
    """A copy of ``fcn`` returning ``nodes`` (main map first) as a tuple, or the one node's map.

    ``share=True`` shares ``fcn``'s modules instead of copying them (for a look, not for use).
    """
    graph = fx.Graph()
    env: dict = {}
    graph.graph_copy(fcn.graph, env)
    graph.output(tuple(env[n] for n in nodes) if not share else env[nodes[0]])
    root = fcn if share else copy.deepcopy(fcn)
    backbone = fx.GraphModule(root, graph, f"{type(fcn).__name__}Backbone")
    eliminate_dead_code(backbone)
    backbone.graph.lint()
    backbone.recompile()
    if not share:  # deleting would reach into fcn's own modules
        backbone.delete_all_unused_submodules()
    return backbone


def _centre(fcn: fx.GraphModule, node: fx.Node, size: Tuple[int, int, int], stride: int) -> Tuple[float, float]:
    """Input coordinates of the centre of cell (0, 0) of ``node``'s map, from fcnify's geometry.

    Without geometry support for this graph, cells are taken as centred in their stride
    (``(s - 1) / 2``, what ``F.interpolate(align_corners=False)`` assumes).
    """
    sub = _with_outputs(fcn, [node], share=True)
    try:
        geo = geometry(sub, input_size=size)
    except Exception:  # geometry does not follow every layer; fall back to centred cells
        return ((stride - 1) / 2,) * 2
    if tuple(geo.stride) != (stride, stride):
        return ((stride - 1) / 2,) * 2
    return tuple(float(c) for c in geo.center(0, 0))  # type: ignore[return-value]
