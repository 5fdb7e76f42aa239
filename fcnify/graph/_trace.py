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
import logging
import math
import os
import threading
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .._errors import FcnifyError, TraceError

__all__ = [
    "trace_model",
    "record_shapes",
    "ShapeRun",
    "eval_mode",
    "describe_node",
    "second_size",
    "has_side_effects",
    "eliminate_dead_code",
    "safe_deepcopy",
    "estimate_peak_bytes",
    "check_memory",
    "available_memory",
    "format_bytes",
]


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


#: torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process while it traces;
#: two traces at once unpatch out of order and can leave the patch in place. One trace at a time.
_TRACE_LOCK = threading.RLock()


class _Tracer(fx.Tracer):
    """fx's tracer with timm's and torchvision's leaves, which leaves other threads' modules alone.

    While fx traces, every ``nn.Module`` call in the process goes through the tracer; a call from a
    thread other than the tracing one (inference running beside a conversion) runs the module as
    if nothing were patched.
    """

    def __init__(self) -> None:
        options = _tracer_options()
        self._leaves = options["leaf_modules"]
        self._thread = threading.get_ident()
        super().__init__(
            autowrap_modules=options["autowrap_modules"],
            autowrap_functions=options["autowrap_functions"],
        )

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaves and isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


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
    work = safe_deepcopy(model).eval()
    try:
        with _TRACE_LOCK:
            tracer = _Tracer()
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


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for modules that hold computed tensors as plain attributes.

    ``torch.nn.utils.prune`` stores ``weight = weight_orig * weight_mask`` as an attribute: a tensor
    that is not a leaf of autograd, which ``deepcopy`` refuses. Such tensors are copied detached
    (the pruning hook computes them again on every call, so nothing is lost).
    """
    memo: Dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


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

    def __init__(
        self,
        shapes: Dict[fx.Node, Any],
        failed_at: Optional[fx.Node],
        error: Optional[BaseException],
        values: Optional[Dict[fx.Node, Any]] = None,
    ):
        self.shapes = shapes
        self.failed_at = failed_at
        self.error = error
        self.values = values or {}

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
        self.keep: set = set()

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.shapes[n] = _shape_of(result)
        if n in self.keep:
            self.values[n] = result
        return result


def record_shapes(gm: fx.GraphModule, image: torch.Tensor, keep: Iterable[fx.Node] = ()) -> ShapeRun:
    """Run ``gm`` on ``image`` and record each node's output shape (ShapeProp-style).

    A run that fails keeps the shapes up to the failing node and names it, so a
    second run at another size can point at the node tied to the first size.
    The values of the nodes in ``keep`` are kept too, in ``ShapeRun.values``.
    """
    recorder = _Recorder(gm)
    recorder.current = None  # type: ignore[assignment]
    recorder.keep = set(keep)
    with torch.no_grad():
        try:
            recorder.run(image)
        except Exception as err:
            return ShapeRun(recorder.shapes, recorder.current, err, recorder.values)
    return ShapeRun(recorder.shapes, None, None, recorder.values)


def second_size(size: Tuple[int, int]) -> Tuple[int, int]:
    """A larger, non-square probe size: it tells spatial axes from the rest.

    Sizes grow by multiples of 32, the usual total stride, so that networks whose
    branches must agree on odd sizes (DLA, HRNet) accept the probe.
    """
    h, w = size
    return h + 32 * max(1, round(h / 64)), w + 32 * max(2, round(3 * w / 128))


def has_side_effects(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> bool:
    """Whether removing ``node`` could change the result although nothing reads its value.

    torch.fx's own test, plus in-place ops (``x.sub_(0.5)``, ``torch.relu_``, ``inplace=True``)
    whose value is unused while the tensor they change is read later.
    """
    if node.op in ("placeholder", "output") or node.is_impure():
        return True
    if not _in_place(node, gm):
        return False
    changed = _alias_root(node, gm)
    if changed is node:
        return False
    aliases, later = {changed}, False
    for other in node.graph.nodes:  # is the changed tensor (or an in-place result aliasing it) read later?
        if other is node:
            later = True
        elif later and any(a in aliases for a in other.all_input_nodes):
            return True
        if _alias_root(other, gm) is changed:
            aliases.add(other)
    return False


def _alias_root(node: fx.Node, gm: Optional[fx.GraphModule]) -> fx.Node:
    """The tensor an in-place op writes to: ``x`` for ``x.sub_(a).div_(b)``."""
    while _in_place(node, gm) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _in_place(node: fx.Node, gm: Optional[fx.GraphModule]) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op in ("call_method", "call_function"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return isinstance(name, str) and name.endswith("_") and not name.startswith("_")
    if node.op == "call_module" and gm is not None:
        return any(getattr(m, "inplace", False) is True for m in gm.get_submodule(node.target).modules())
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove the nodes whose values nothing reads, keeping every op with a side effect."""
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not has_side_effects(node, gm):
            gm.graph.erase_node(node)


def estimate_peak_bytes(
    gm: fx.GraphModule, shape: Tuple[int, ...], dtype: torch.dtype = torch.float32
) -> Optional[int]:
    """Peak activation memory of one run of ``gm`` on an input of ``shape``, without allocating it.

    The graph runs on fake tensors (shapes only); each value is counted from the node that makes it
    to its last reader, as the interpreter frees it, up to the node where the run stops if it does.
    None when the graph does not run on fake tensors.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a traceback where the graph stops
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            run = record_shapes(gm, torch.empty(shape, dtype=dtype))
    except Exception:  # noqa: BLE001 - an estimate only; the real run reports real errors
        return None
    finally:
        quiet.setLevel(level)
    nodes = [n for n in gm.graph.nodes if n in run.shapes]  # up to where a run stops (a head at another size)
    if not nodes:
        return None
    last_use = {n: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            if arg in last_use:
                last_use[arg] = max(last_use[arg], i)
    itemsize = torch.empty((), dtype=dtype).element_size()
    live, peak = {}, 0
    for i, node in enumerate(nodes):
        live[node] = _numel(run.shapes.get(node)) * itemsize if node.op != "get_attr" else 0
        peak = max(peak, sum(live.values()))
        for done in [n for n in live if last_use[n] <= i]:
            del live[done]
    return peak


def _numel(shape: Any) -> int:
    if isinstance(shape, tuple):
        return math.prod(shape)
    if isinstance(shape, list):
        return sum(_numel(s) for s in shape)
    return 0


def available_memory() -> int:
    """Bytes of memory this process can still use (physical memory available)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(gm: fx.GraphModule, shape: Tuple[int, ...], dtype: torch.dtype, what: str, hint: str) -> None:
    """Refuse, with the estimate, a run of ``gm`` at ``shape`` that cannot fit in memory.

    Only inputs above 64 MB are estimated: below that no classifier's activations fill a machine.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize < 64 * 2**20:
        return
    need = estimate_peak_bytes(gm, shape, dtype)
    have = available_memory()
    if need is not None and need > have:
        raise FcnifyError(
            f"{what} at input {'x'.join(map(str, shape))} needs about {format_bytes(need)} of memory for its "
            f"activations; {format_bytes(have)} is available. Hint: {hint}"
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
