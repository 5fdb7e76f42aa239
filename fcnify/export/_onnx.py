"""Exporting a converted model to ONNX with symbolic batch, height and width, proven in ONNX Runtime.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) traces with an example input
larger than the training size, where every spatial dimension is greater than 1, so that no
pooled size, reshape or matmul is frozen to the training size. The file is then checked
(:mod:`._onnx_validate`) with ``onnx.checker`` and run in ONNX Runtime at the training size and
two other sizes (one non-square, one with odd dimensions); every output must match PyTorch's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Optional, Sequence, Tuple

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim

from .._errors import ExportError, FcnifyError, first_line
from .._files import staged
from ..conversion import FullyConvolutionalNet
from ..graph import InputSize, eval_mode, example_input, second_size
from ..verification import ONNX_RTOL
from ._exportable import exportable
from ._onnx_pad import guard_zero_pad_before_max_pool
from ._onnx_validate import _INPUT_NAME, OnnxExportReport, _input_size, _validate

__all__ = ["export_onnx"]


#: Above this many bytes of weights the file keeps them in ``PATH.data`` (protobuf's limit is 2 GiB).
_EXTERNAL_DATA_BYTES = 2**31 - 2**26


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(
    fcn: nn.Module,
    path: str,
    input_size: Optional[InputSize] = None,
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
        rtol: tolerance on the max absolute error, relative to ``max(1, max |output|)``.

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
    size = _conversion_size(fcn, input_size)
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
        traced = err.failed_size
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


def _conversion_size(fcn: nn.Module, input_size: Optional[InputSize]) -> Tuple[int, int, int]:
    if not isinstance(fcn, FullyConvolutionalNet):
        raise ExportError(
            f"{type(fcn).__name__} is not an fcnify conversion (not a FullyConvolutionalNet): a classifier's "
            "pooling to a fixed size and its flatten + Linear head get frozen to the example size in ONNX, and "
            "the file fails or silently misbehaves at other sizes. Hint: fcn = fcnify.convert(model, "
            "input_size=(224, 224)), then fcnify.export_onnx(fcn, path)."
        )
    return _input_size(fcn, input_size)


def _export(
    fcn: nn.Module,
    size: Tuple[int, int, int],
    opset: Optional[int],
    dynamic_batch: bool,
    traced_size: Optional[Tuple[int, int]] = None,
):
    c, h, w = size
    traced_size = traced_size or second_size((h, w))
    example = example_input(fcn, (c, *traced_size), batch_size=2 if dynamic_batch else 1)
    # Dim.DYNAMIC rather than named Dims: a named Dim turns any guard torch.export cannot express
    # as a range (ceil-mode pools in GoogLeNet) into an error; the names are set by _name_dims.
    dims = {2: Dim.DYNAMIC(min=h), 3: Dim.DYNAMIC(min=w)}
    if dynamic_batch:
        dims[0] = Dim.DYNAMIC(min=1)
    count = len(fcn.conversion_report.probe_output_shapes)
    names = ["scores"] if count == 1 else [f"scores_{i}" for i in range(count)]
    module = exportable(fcn)  # the user's model is left as it is
    with eval_mode(fcn), torch.no_grad():
        try:
            # Without this, export specialises on the 1x1 map produced at the training size.
            with fx_config.patch(backed_size_oblivious=True), _quiet_shape_solver(), _rnn_decompositions():  # type: ignore[attr-defined]
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
                "save a .pt2 with fcnify.save instead."
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
