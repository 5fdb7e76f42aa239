"""Exporting a converted model to ONNX with symbolic batch, height and width, proven in ONNX Runtime.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) traces with an example input
larger than the training size, where every spatial dimension is greater than 1, so that no
pooled size, reshape or matmul is frozen to the training size. The file is then checked
with ``onnx.checker`` and run in ONNX Runtime at the training size and two other sizes (one
non-square, one with odd dimensions); every output must match PyTorch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx.experimental._config as fx_config
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

from ._errors import ExportError, FcnifyError, first_line
from ._files import staged
from ._exportable import exportable
from ._onnx_pad import guard_zero_pad_before_max_pool
from ._trace import eval_mode, second_size
from .verify import example_input, output_scale

__all__ = ["export_onnx", "validate_onnx", "OnnxExportReport", "SizeCheck"]

#: Above this many bytes of weights the file keeps them in ``PATH.data`` (protobuf's limit is 2 GiB).
_EXTERNAL_DATA_BYTES = 2**31 - 2**26

_INPUT_NAME = "image"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


#: ONNX Runtime vs PyTorch tolerance, relative to the largest output magnitude. Looser than the
#: 1e-4 of :func:`fcnify.verify` (PyTorch against itself): ONNX Runtime's kernels (MLAS)
#: accumulate in another order than PyTorch's (oneDNN), and in deep residual networks the
#: difference grows with the residual stream, not with the logits (resnet152, random weights:
#: 3e-4 of the largest logit). 1e-3 is also the default of PyTorch's own ONNX verification.
#: A size frozen at export or a wrong branch gives errors of the order of the output.
ONNX_RTOL = 1e-3


@dataclasses.dataclass
class SizeCheck:
    """ONNX Runtime against PyTorch at one input size."""

    size: Tuple[int, int]
    batch: int
    output_shapes: List[Tuple[int, ...]]
    max_abs_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.tolerance

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.output_shapes)
        return (
            f"{self.batch}x{self.size[0]}x{self.size[1]} -> {shapes}: max abs error "
            f"{self.max_abs_error:.2e} (tol {self.tolerance:.1e})"
        )


@dataclasses.dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote and how it was validated.

    Attributes:
        path: the ``.onnx`` file.
        external_data: the weights file next to it (``PATH.data``) for models over 2 GB, else None.
        opset: the ONNX opset of the default domain.
        input_shape: the input's dimensions as written in the file (names are symbolic).
        output_shapes: each output's dimensions as written in the file.
        checks: ONNX Runtime against PyTorch, one per validated size.
        skipped: sizes the PyTorch model itself cannot run, with the reason.
        simplified: whether onnxslim rewrote the file (it was validated again afterwards).
        traced_size: the ``(H, W)`` the graph was traced at when the first trace (at a larger
            size than the training size) failed validation at that size, else None.
        file_bytes: size of the file, external data included.
        export_seconds: time spent exporting (and simplifying), a first trace that failed included.
        validate_seconds: time spent checking and running ONNX Runtime.
    """

    path: str
    external_data: Optional[str]
    opset: int
    input_shape: List[Any]
    output_shapes: List[List[Any]]
    checks: List[SizeCheck]
    skipped: List[str] = dataclasses.field(default_factory=list)
    simplified: bool = False
    traced_size: Optional[Tuple[int, int]] = None
    file_bytes: int = 0
    export_seconds: float = 0.0
    validate_seconds: float = 0.0

    @property
    def sizes(self) -> List[Tuple[int, int]]:
        """The ``(H, W)`` sizes validated in ONNX Runtime."""
        return [c.size for c in self.checks]

    @property
    def max_abs_error(self) -> float:
        """The largest ONNX Runtime vs PyTorch difference over all validated sizes."""
        return max((c.max_abs_error for c in self.checks), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def __str__(self) -> str:
        dims = lambda shape: "(" + ", ".join(str(d) for d in shape) + ")"  # noqa: E731
        lines = [
            f"ONNX opset {self.opset}: {_INPUT_NAME} {dims(self.input_shape)} -> "
            + ", ".join(dims(s) for s in self.output_shapes),
            f"validated in ONNX Runtime against PyTorch at {len(self.checks)} sizes"
            + (" (after onnxslim)" if self.simplified else "")
            + ":",
        ]
        lines += [f"  {c}" for c in self.checks]
        lines += [f"  skipped {s}" for s in self.skipped]
        if self.traced_size:
            lines.append(
                f"traced at {self.traced_size[0]}x{self.traced_size[1]}: the first trace failed there "
                "(the model takes a size-dependent path)"
            )
        where = self.path + (f" + {self.external_data}" if self.external_data else "")
        lines.append(
            f"saved {where} ({self.file_bytes / 2**20:.1f} MB) in {self.export_seconds:.1f} s, "
            f"validated in {self.validate_seconds:.1f} s"
        )
        return "\n".join(lines)


def export_onnx(
    fcn: nn.Module,
    path: str,
    input_size: Optional[Sequence[int]] = None,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    validate_sizes: Optional[Sequence[Sequence[int]]] = None,
    simplify: bool = False,
    rtol: float = ONNX_RTOL,
) -> OnnxExportReport:
    """Export a converted model to ONNX with symbolic batch, height and width, and prove it runs.

    The file is checked with ``onnx.checker`` and run in ONNX Runtime at ``validate_sizes``
    (by default the training size, a larger non-square size and one with odd dimensions),
    each compared with PyTorch.

    Args:
        fcn: the result of :func:`fcnify.convert`.
        path: where to write the ``.onnx`` file; models over 2 GB keep their weights in
            ``PATH.data`` next to it.
        input_size: training size ``(H, W)`` or ``(C, H, W)``; by default
            ``fcn.conversion_report.input_size``.
        opset: ONNX opset version; the exporter's default when None.
        dynamic_batch: make the batch dimension symbolic too (else it is 1).
        validate_sizes: ``(H, W)`` sizes to run in ONNX Runtime; ``[]`` skips running
            (the checker and the symbolic-dims check still apply).
        simplify: rewrite the file with onnxslim (``pip install onnxslim``) and validate again.
        rtol: tolerance on the max absolute error, relative to the largest output magnitude.

    Returns:
        An :class:`OnnxExportReport`: ``max_abs_error``, ``sizes``, the symbolic dims, timings.

    Raises:
        ExportError: the model is not an fcnify conversion, the export fails, a dimension is
            frozen to one size, or ONNX Runtime fails or disagrees with PyTorch at a size.

    Example:
        >>> import os, tempfile, torch, fcnify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5), torch.nn.Flatten(), torch.nn.Linear(4 * 12 * 12, 3))
        >>> fcn = fcnify.convert(net, input_size=(16, 16))
        >>> report = fcnify.export_onnx(fcn, os.path.join(tempfile.mkdtemp(), "net.onnx"))
        >>> report.sizes, report.output_shapes
        ([(16, 16), (80, 144), (49, 81)], [['batch', 3, 'height - 15', 'width - 15']])
    """
    size = _input_size(fcn, input_size)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ExportError(f"cannot export to {path}: folder {directory} does not exist. Hint: create it first.")
    if not path.lower().endswith(".onnx") or os.path.isdir(path):
        raise ExportError(f"cannot export to {path}: the file name must end in .onnx. Hint: use model.onnx.")
    _check_opset(opset)
    work = path
    try:
        with staged(path, companions=(".data",)) as work:  # an older model.onnx survives a failed export
            report = _export_onnx(fcn, work, size, opset, dynamic_batch, validate_sizes, rtol, simplify)
    except FcnifyError as err:  # name the file the user asked for, not the staged one
        err.args = tuple(a.replace(work, path) if isinstance(a, str) else a for a in err.args)
        raise
    data_path = path + ".data"
    report.path = path
    report.external_data = data_path if os.path.exists(data_path) else None
    report.file_bytes = os.path.getsize(path) + (os.path.getsize(data_path) if report.external_data else 0)
    return report


#: torch.onnx's exporter writes opset 18 and up; it converts to an older opset only partly, and
#: silently keeps 18 where the conversion fails.
_MIN_OPSET = 18


def _check_opset(opset: Optional[int]) -> None:
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not _MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset {opset!r} cannot be exported: torch.onnx writes opsets {_MIN_OPSET} to {newest} "
            f"(the installed onnx's newest). Hint: leave opset out for the exporter's default, or pick one "
            f"from {_MIN_OPSET} to {newest}."
        )


def _export_onnx(fcn, path, size, opset, dynamic_batch, validate_sizes, rtol, simplify) -> OnnxExportReport:
    """Export and validate at ``path`` (a staged file name): the body of :func:`export_onnx`."""
    if simplify:
        _require_onnxslim()
    start = time.perf_counter()
    weight_bytes = sum(t.numel() * t.element_size() for t in list(fcn.parameters()) + list(fcn.buffers()))
    external = weight_bytes > _EXTERNAL_DATA_BYTES
    data_path = path + ".data"
    try:
        report = _export_and_validate(fcn, path, size, opset, dynamic_batch, validate_sizes, rtol, external)
    except ExportError as err:
        # The graph follows the Python branches taken at the example size. A model that pads an
        # odd map only when it is odd (timm's cpubone: `if pad_h or pad_w: x = F.pad(...)`) gives
        # a file without the pad, which fails at odd sizes; traced at a size where the branch is
        # taken, the pad is exported with its symbolic amount, zero at even sizes. So trace once
        # more at the size that failed, and keep the file only if it passes at every size again.
        traced = getattr(err, "failed_size", None)
        first_trace = second_size(size[1:])
        if traced is None or traced in (size[1:], first_trace) or traced[0] < size[1] or traced[1] < size[2]:
            raise
        try:
            report = _export_and_validate(fcn, path, size, opset, dynamic_batch, validate_sizes, rtol, external, traced)
        except ExportError as again:
            raise ExportError(
                f"{err} (Traced again at {traced[0]}x{traced[1]}, the size that failed: {first_line(again)})"
            ) from again
        report.traced_size = traced
    export_seconds = time.perf_counter() - start - report.validate_seconds
    try:
        report.external_data = data_path if os.path.exists(data_path) else None
        if simplify and not external:
            start_slim = time.perf_counter()
            _simplify(path)
            export_seconds += time.perf_counter() - start_slim
            traced = report.traced_size
            report = _validate(fcn, path, size, dynamic_batch, validate_sizes, rtol)
            report.simplified, report.traced_size = True, traced
        elif simplify:
            report.skipped.append("onnxslim: the model is over 2 GB, left as exported")
    except BaseException:
        _remove(path, data_path)
        raise
    report.export_seconds = export_seconds
    return report


def _export_and_validate(
    fcn, path, size, opset, dynamic_batch, validate_sizes, rtol, external, traced_size=None
) -> OnnxExportReport:
    """Export with the example input at ``traced_size`` (by default :func:`second_size`), save, validate."""
    program = _export(fcn, size, opset, dynamic_batch, traced_size)
    data_path = path + ".data"
    if os.path.exists(data_path):
        os.remove(data_path)  # a stale weights file from an earlier export would be read instead
    program.save(path, external_data=external)
    try:
        _name_dims(path)
        guard_zero_pad_before_max_pool(path)  # else ONNX Runtime pads the MaxPool with -inf, not 0
        return _validate(fcn, path, size, dynamic_batch, validate_sizes, rtol)
    except BaseException:
        _remove(path, data_path)
        raise


def _remove(*paths: str) -> None:
    """Never leave a file that looks like a success."""
    for written in paths:
        if os.path.exists(written):
            os.remove(written)


def validate_onnx(
    model: nn.Module,
    path: str,
    input_size: Sequence[int],
    validate_sizes: Optional[Sequence[Sequence[int]]] = None,
    dynamic_batch: bool = True,
    rtol: float = ONNX_RTOL,
) -> OnnxExportReport:
    """Check an ONNX file against a PyTorch model at several sizes, however it was exported.

    The same checks as :func:`export_onnx` runs after exporting: ``onnx.checker``, symbolic
    batch/height/width, and ONNX Runtime against PyTorch at ``validate_sizes`` (by default
    the training size, a larger non-square size and an odd size).

    Args:
        model: the PyTorch model the file was exported from.
        path: the ``.onnx`` file.
        input_size: training size ``(H, W)`` or ``(C, H, W)``.
        validate_sizes: ``(H, W)`` sizes to run; the three defaults when None.
        dynamic_batch: require a symbolic batch dimension and run batches of 2 and 1.
        rtol: tolerance on the max absolute error, relative to the largest output magnitude.

    Returns:
        An :class:`OnnxExportReport` with the errors per size.

    Raises:
        ExportError: a frozen dimension, or ONNX Runtime fails or disagrees at a size.

    Example:
        >>> import torch, torchvision, fcnify
        >>> vgg = torchvision.models.vgg11().eval()
        >>> torch.onnx.export(vgg, (torch.randn(1, 3, 224, 224),), "vgg.onnx", dynamo=True,
        ...     dynamic_shapes=({2: torch.export.Dim("h"), 3: torch.export.Dim("w")},))  # doctest: +SKIP
        >>> fcnify.validate_onnx(vgg, "vgg.onnx", (224, 224))  # doctest: +SKIP
        Traceback (most recent call last):
        fcnify._errors.ExportError: ONNX Runtime fails on vgg.onnx at input 1x3x288x352: ... GEMM: Dimension mismatch ...
    """
    import onnx

    if not os.path.isfile(path):
        raise ExportError(f"no such ONNX file: {path}. Hint: check the path.")
    try:
        onnx.load(path, load_external_data=False)
    except Exception as err:
        raise ExportError(
            f"{path} is not a readable ONNX model: {type(err).__name__}: {first_line(err)}. "
            "Hint: export it again (fcnify export MODEL -o FILE.onnx); the file may be truncated or not ONNX."
        ) from err
    size = tuple(int(s) for s in ((input_size, input_size) if isinstance(input_size, int) else input_size))
    if len(size) == 2:
        channels = _dims(onnx.load(path, load_external_data=False).graph.input[0])[1:2]
        if not channels or not isinstance(channels[0], int):
            raise ExportError(f"{path} does not fix the number of input channels. Hint: pass input_size=(C, H, W).")
        size = (channels[0], *size)
    if len(size) != 3 or min(size) < 1:
        raise ExportError(f"input_size must be (H, W) or (C, H, W) with positive sizes, got {input_size}.")
    return _validate(model, path, size, dynamic_batch, validate_sizes, rtol)


def _input_size(fcn: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    report = getattr(fcn, "conversion_report", None)
    if report is None:
        raise ExportError(
            f"{type(fcn).__name__} is not an fcnify conversion (it has no conversion_report): a classifier's "
            "pooling to a fixed size and its flatten + Linear head get frozen to the example size in ONNX, and "
            "the file fails or silently misbehaves at other sizes. Hint: fcn = fcnify.convert(model, "
            "input_size=(224, 224)), then fcnify.export_onnx(fcn, path)."
        )
    if input_size is None:
        return tuple(report.input_size)
    input_size = tuple(int(s) for s in ((input_size, input_size) if isinstance(input_size, int) else input_size))
    if len(input_size) == 2:
        input_size = (report.input_size[0], *input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ExportError(
            f"input_size must be (H, W) or (C, H, W) with positive sizes, got {input_size}. "
            "Hint: leave it out to use the conversion's training size."
        )
    return input_size


def _export(
    fcn: nn.Module,
    size: Tuple[int, int, int],
    opset: Optional[int],
    dynamic_batch: bool,
    traced_size: Optional[Tuple[int, int]] = None,
):
    c, h, w = size
    traced_size = traced_size or second_size((h, w))
    example = example_input(fcn, (c, *traced_size), batch=2 if dynamic_batch else 1)
    # Dim.DYNAMIC rather than named Dims: a named Dim turns any guard torch.export cannot express
    # as a range (ceil-mode pools in GoogLeNet) into an error; the names are set by _name_dims.
    dims = {2: Dim.DYNAMIC(min=h), 3: Dim.DYNAMIC(min=w)}
    if dynamic_batch:
        dims[0] = Dim.DYNAMIC(min=1)
    count = len(getattr(fcn.conversion_report, "probe_output_shapes", [()]))
    names = ["scores"] if count == 1 else [f"scores_{i}" for i in range(count)]
    module = exportable(fcn)  # the user's model is left as it is
    with eval_mode(fcn), torch.no_grad():
        try:
            # Without this, export specialises on the 1x1 map produced at the training size.
            with fx_config.patch(backed_size_oblivious=True), _quiet_shape_solver(), _rnn_decompositions():
                try:
                    return torch.onnx.export(
                        module,
                        (example,),
                        dynamo=True,
                        dynamic_shapes=(dims,),
                        opset_version=opset,
                        input_names=[_INPUT_NAME],
                        output_names=names,
                        verbose=False,
                    )
                except Exception as err:
                    if not _unsolved_shape_guard(err):
                        raise
                # torch.onnx traces with prefer_deferred_runtime_asserts_over_guards=True, which sends
                # equalities such as "a stride-2 conv and a 2x2 max-pool give the same size" (H even,
                # in DLA's trees: ceil(H/2) == floor(H/2)) to export's sympy solver, and sympy cannot
                # solve floor divisions (Eq(x/32 - ((x/16)//2), 0)). Kept as ordinary guards, they
                # only check the inputs of the ExportedProgram; ONNX has no such checks, and ONNX
                # Runtime fails at the sizes where PyTorch fails too. Validation proves the rest.
                program = torch.export.export(
                    module,
                    (example,),
                    dynamic_shapes=(dims,),
                    strict=False,
                    prefer_deferred_runtime_asserts_over_guards=False,
                )
                return torch.onnx.export(
                    program,
                    dynamo=True,
                    opset_version=opset,
                    input_names=[_INPUT_NAME],
                    output_names=names,
                    verbose=False,
                )
        except Exception as err:
            raise ExportError(
                f"torch.onnx.export could not export {type(fcn).__name__} (example input "
                f"{'x'.join(map(str, example.shape))}, dynamic batch, height and width): {_root_cause(err)}. "
                "Hint: check that the converted model runs at larger sizes; try another opset= or "
                "save a .pt2 with fcnify._save.save instead."
            ) from err


@contextlib.contextmanager
def _rnn_decompositions():
    """Give ``aten.lstm`` and ``aten.gru`` a symbolic sequence length for the whole export.

    Their C++ kernel loops over the time steps, so on fake tensors it specialises the sequence
    length (timm's Sequencer runs an LSTM along every row and every column: the length is the
    map's width or height). ``torch.onnx.export`` swaps in while_loop decompositions (PyTorch's
    ``register_lstm_while_loop_decomposition``) while it captures the graph, but not while it
    decomposes the captured program for ONNX: the LSTM output there has the example's length,
    and a following ``reshape(B, H, W, -1)`` gets ``-1`` computed as a constant divided by the
    width (ONNX Runtime then fails at every other size). Kept for the whole export, the output
    length stays symbolic and the ONNX ``LSTM`` node takes any length; the decompositions only
    give shapes, the exported graph still calls ``LSTM``, which computes the same numbers.
    """
    try:
        from torch.export._patches import (
            register_gru_while_loop_decomposition,
            register_lstm_while_loop_decomposition,
        )
    except ImportError:  # older PyTorch: the exporter does not have them either
        yield
        return
    with register_lstm_while_loop_decomposition(), register_gru_while_loop_decomposition():
        yield


def _unsolved_shape_guard(err: BaseException) -> bool:
    """Whether export failed in torch.export's solver for shape guards (``DimConstraints.solve``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name == "solve" and code.co_filename.endswith("symbolic_shapes.py"):
                return True
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return False


def _name_dims(path: str) -> None:
    """Rename the input's symbolic dims to batch, height and width, in every shape of the file."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    mapping = {
        dims[a].dim_param: name
        for a, name in ((0, "batch"), (2, "height"), (3, "width"))
        if a < len(dims) and dims[a].dim_param and dims[a].dim_param != name
    }
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)
    onnx.save(model, path)  # external weights, if any, stay where they are


@contextlib.contextmanager
def _quiet_shape_solver():
    """Hide the solver's tracebacks on floor-division inequalities; it recovers, export goes on."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _validate(fcn, path, size, dynamic_batch, validate_sizes, rtol) -> OnnxExportReport:
    import onnx

    start = time.perf_counter()
    try:
        onnx.checker.check_model(path)
    except Exception as err:
        raise ExportError(f"{path} fails onnx.checker: {first_line(err)}. Hint: try another opset=.") from err
    model = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    input_shape = _dims(model.graph.input[0])
    output_shapes = [_dims(o) for o in model.graph.output]
    _check_symbolic(path, input_shape, output_shapes, dynamic_batch, fcn)
    report = OnnxExportReport(path, None, opset, input_shape, output_shapes, [])
    if validate_sizes is not None and len(validate_sizes) == 0:
        report.validate_seconds = time.perf_counter() - start
        return report
    session = _session(path)
    c, h, w = size
    explicit = validate_sizes is not None
    candidates = [tuple(s) for s in validate_sizes] if explicit else _default_sizes(h, w)
    wanted = len(candidates) if explicit else 3
    for i, (sh, sw) in enumerate(candidates):
        if len(report.checks) == wanted:
            break
        batch = 2 if dynamic_batch and i == 0 else 1
        x = example_input(fcn, (c, sh, sw), batch=batch, seed=i)
        try:
            with eval_mode(fcn), torch.no_grad():
                # nn.Module.__call__, not fcn(x): a GraphModule that fails prints its traceback to
                # stderr before raising, and a size the model cannot take is expected here
                refs, _ = pytree.tree_flatten(nn.Module.__call__(fcn, x))
        except Exception as err:
            if explicit:
                raise ExportError(
                    f"the PyTorch model itself fails at {sh}x{sw}: {first_line(err)}. "
                    "Hint: pick validate_sizes the network accepts."
                ) from err
            report.skipped.append(f"{sh}x{sw}: the PyTorch model itself fails ({first_line(err)})")
            continue
        report.checks.append(_compare(session, path, x, refs, rtol))
    _raise_on_mismatch(path, report.checks)
    if len(report.checks) < wanted:
        raise ExportError(
            f"{path} was validated at {len(report.checks)} sizes only: {'; '.join(report.skipped)}. "
            "Hint: pass validate_sizes the network accepts."
        )
    report.validate_seconds = time.perf_counter() - start
    return report


def _default_sizes(h: int, w: int) -> List[Tuple[int, int]]:
    """Training size, larger non-square, odd; then fallbacks for networks that need multiples of 32."""
    return [(h, w), (h + 64, w + 128), (h + 33, w + 65), (h + 96, w + 32), (h + 32, w + 160)]


def _compare(session, path: str, x: torch.Tensor, refs: List[Any], rtol: float) -> SizeCheck:
    size = (x.shape[2], x.shape[3])
    where = f"{x.shape[0]}x{x.shape[1]}x{size[0]}x{size[1]}"
    try:
        outs = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    except Exception as err:
        raise _at_size(
            ExportError(
                f"ONNX Runtime fails on {path} at input {where}: {first_line(err)}. Hint: a size was frozen at "
                "export time; export an fcnify conversion (fcnify.convert) rather than the original classifier."
            ),
            size,
        ) from err
    refs = [r for r in refs if isinstance(r, torch.Tensor)]
    if len(outs) != len(refs):
        raise ExportError(
            f"{path} returns {len(outs)} outputs where PyTorch returns {len(refs)} (input {where}). "
            "Hint: return tensors only from the model."
        )
    error, scale = 0.0, output_scale(torch.zeros(0))
    for out, ref in zip(outs, refs):
        ref = ref.detach().cpu().double()
        out = torch.from_numpy(out).double()
        if tuple(out.shape) != tuple(ref.shape):
            raise _at_size(
                ExportError(
                    f"ONNX Runtime gives shape {tuple(out.shape)} where PyTorch gives {tuple(ref.shape)} at input "
                    f"{where} ({path}). Hint: a size was frozen at export time; export an fcnify conversion."
                ),
                size,
            )
        if ref.numel():
            scale = max(scale, output_scale(ref))
            error = max(error, (out - ref).abs().max().item())
    return SizeCheck(size, x.shape[0], [tuple(r.shape) for r in refs], error, rtol * scale)


def _at_size(err: ExportError, size: Tuple[int, int]) -> ExportError:
    """Mark an error as ONNX Runtime failing at one input size (where PyTorch runs): traced there, it may pass."""
    err.failed_size = (int(size[0]), int(size[1]))
    return err


def _raise_on_mismatch(path: str, checks: List[SizeCheck]) -> None:
    """One error for every size where ONNX Runtime disagrees, saying where it agrees."""
    bad = [c for c in checks if not c.passed]
    if not bad:
        return
    size = lambda c: f"{c.size[0]}x{c.size[1]}"  # noqa: E731
    text = "; ".join(f"at {size(c)} max abs error {c.max_abs_error:.3g} > tolerance {c.tolerance:.3g}" for c in bad)
    good = [c for c in checks if c.passed]
    # far off at some sizes, close at others: a size-dependent path, not rounding
    floor = min(c.tolerance for c in checks) / 100
    if good and min(c.max_abs_error for c in bad) > 100 * max(floor, *(c.max_abs_error for c in good)):
        raise _at_size(
            ExportError(
                f"ONNX Runtime disagrees with PyTorch ({path}) {text}, but agrees at {', '.join(map(size, good))}: "
                "the model takes a different path at different sizes (a Python `if` on a size, e.g. torchvision's "
                "Swin skips its window shift when the window covers the map), and the exported graph follows one "
                "path at every size. Hint: run those sizes in PyTorch or from the .pt2 export; to keep the file for "
                "the sizes where it agrees, pass validate_sizes= with the sizes you will run."
            ),
            bad[-1].size,
        )
    raise ExportError(
        f"ONNX Runtime disagrees with PyTorch ({path}) {text}. Hint: try another opset=, or simplify=False."
    )


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors are raised as exceptions (and a first trace may fail); keep ORT quiet
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch is told to use
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(err)}. Hint: try another opset=.") from err


def _dims(value_info) -> List[Any]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?") for d in dims]


def _check_symbolic(path, input_shape, output_shapes, dynamic_batch, fcn) -> None:
    """The input's height and width (and batch) must be symbolic, and so must each map's."""
    axes = [2, 3] + ([0] if dynamic_batch else [])
    frozen = [a for a in axes if len(input_shape) != 4 or not isinstance(input_shape[a], str)]
    if frozen:
        raise ExportError(
            f"{path}: the input {input_shape} has fixed dimensions {frozen}. Hint: the exporter "
            "specialised on the example size; report this with the model name."
        )
    for i, shape in enumerate(output_shapes):
        spatial = [2, 3] if len(shape) == 4 else []
        frozen = [a for a in spatial + ([0] if dynamic_batch else []) if not isinstance(shape[a], str)]
        if frozen:
            raise ExportError(
                f"{path}: output {i} has fixed dimensions {frozen} ({shape}) while the input's are symbolic. "
                f"Hint: a part of {type(fcn).__name__} ties the output to one size; convert with fcnify.convert."
            )


def _require_onnxslim() -> None:
    try:
        import onnxslim  # noqa: F401
    except ImportError as err:
        raise ExportError(
            "simplify=True needs onnxslim, which is not installed. "
            "Hint: pip install 'fcnify[simplify]', or export without simplifying."
        ) from err


def _simplify(path: str) -> None:
    import onnxslim

    try:
        onnxslim.slim(path, path)
    except Exception as err:
        raise ExportError(
            f"onnxslim could not simplify {path}: {first_line(err)}. Hint: export without simplify."
        ) from err


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost chained exception (the exporter wraps the real one twice)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {_ANSI.sub('', first_line(err))}"
