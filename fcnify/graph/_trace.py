"""Tracing a classifier with torch.fx and reading tensor shapes off the graph.

Shapes always come from running the graph (never from guessing): once at the
training size, and once at a second, larger size. Comparing the two runs tells
which axes of a feature map are spatial and which nodes are tied to one input
size.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .._errors import FcnifyError, TraceError

__all__ = ["trace_model", "record_shapes", "ShapeRun", "eval_mode", "describe_node", "second_size"]


def _tracer_options() -> Dict[str, Any]:
    """Leaf modules and wrapped functions that torchvision and timm declare for fx."""
    leaf_modules: list = []
    autowrap_functions: list = []
    autowrap_modules: list = [math]
    try:
        import torchvision.ops

        # torchvision's functional ops are wrapped; its modules (Conv2dNormActivation,
        # MLP, Permute, ...) are traced through, so that a head built from them is seen.
        autowrap_modules.append(torchvision.ops)
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    try:
        import timm.models  # noqa: F401  (registers every model's fx leaves)
        from timm.layers import get_notrace_functions, get_notrace_modules

        leaf_modules += get_notrace_modules()
        autowrap_functions += get_notrace_functions()
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return dict(
        leaf_modules=tuple(leaf_modules),
        autowrap_functions=tuple(autowrap_functions),
        autowrap_modules=tuple(autowrap_modules),
    )


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        options = _tracer_options()
        self._leaves = options["leaf_modules"]
        super().__init__(
            autowrap_modules=options["autowrap_modules"],
            autowrap_functions=options["autowrap_functions"],
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaves and isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def trace_model(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a private eval-mode copy of ``model``.

    The user's model is never touched: the copy is made first, and tracing in
    eval mode drops training-only branches (auxiliary heads, drop-path).

    Raises:
        TraceError: torch.fx cannot trace the model.
    """
    if not isinstance(model, nn.Module):
        raise FcnifyError(
            f"expected a torch.nn.Module, got {type(model).__name__}. "
            "Hint: pass the classifier itself, e.g. torchvision.models.resnet50()."
        )
    work = copy.deepcopy(model).eval()
    tracer = _Tracer()
    try:
        graph = tracer.trace(work, concrete_args=_optional_inputs(work))
    except Exception as err:  # fx raises many kinds of errors while tracing
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}. "
            "Hint: fx cannot follow Python control flow that depends on tensor values or shapes; "
            "move such code into a submodule and register it as a leaf "
            "(timm.layers.register_notrace_module), or wrap the function with torch.fx.wrap."
        ) from err
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _optional_inputs(model: nn.Module) -> Optional[Dict[str, Any]]:
    """Forward arguments after the image that default to None (Hiera's ``mask``): traced as None.

    Left symbolic, ``if mask is not None`` would be taken with a placeholder standing for None.
    """
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    optional = {
        p.name: None
        for p in parameters[1:]
        if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return optional or None


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """``node 'fc' (Linear at module 'fc')`` -- for error messages."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return f"node '{node.name}' ({type(module).__name__} at module '{node.target}')"
    if node.op == "call_function":
        fn = getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' (call to {fn}{_module_hint(node)})"
    if node.op == "call_method":
        return f"node '{node.name}' (Tensor.{node.target}{_module_hint(node)})"
    return f"node '{node.name}'"


def _module_hint(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return f" in module '{path}'"
    return ""


class ShapeRun:
    """Shapes of every node of one run of a graph, and where it stopped, if it did."""

    def __init__(self, shapes: Dict[fx.Node, Any], failed_at: Optional[fx.Node], error: Optional[BaseException]):
        self.shapes = shapes
        self.failed_at = failed_at
        self.error = error

    def shape(self, node: fx.Node) -> Optional[Tuple[int, ...]]:
        value = self.shapes.get(node)
        return value if isinstance(value, tuple) else None


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape_of(v) for v in value]
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: Dict[fx.Node, Any] = {}
        self.values: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.shapes[n] = _shape_of(result)
        return result


def record_shapes(gm: fx.GraphModule, image: torch.Tensor) -> ShapeRun:
    """Run ``gm`` on ``image`` and record each node's output shape (ShapeProp-style).

    A run that fails keeps the shapes up to the failing node and names it, so a
    second run at another size can point at the node tied to the first size.
    """
    recorder = _Recorder(gm)
    recorder.current = None  # type: ignore[assignment]
    with torch.no_grad():
        try:
            recorder.run(image)
        except Exception as err:
            return ShapeRun(recorder.shapes, recorder.current, err)
    return ShapeRun(recorder.shapes, None, None)


def second_size(size: Tuple[int, int]) -> Tuple[int, int]:
    """A larger, non-square probe size: it tells spatial axes from the rest.

    Sizes grow by multiples of 32, the usual total stride, so that networks whose
    branches must agree on odd sizes (DLA, HRNet) accept the probe.
    """
    h, w = size
    return h + 32 * max(1, round(h / 64)), w + 32 * max(2, round(3 * w / 128))
