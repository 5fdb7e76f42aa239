"""Validating an ONNX file against PyTorch: checker, symbolic dimensions, ONNX Runtime at several sizes.

:func:`validate_onnx` checks any file against the model it came from; :func:`fcnify.export_onnx`
runs the same validation on the file it writes. ONNX Runtime and PyTorch are compared with the
one rule of :mod:`fcnify.verification` at :data:`~fcnify.verification.ONNX_RTOL`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from .._errors import ExportError, FcnifyError, first_line
from ..graph import InputSize, eval_mode, example_input, resolve_input_size
from ..verification import ONNX_RTOL, compare

__all__ = ["validate_onnx", "OnnxExportReport", "SizeCheck"]


_INPUT_NAME = "image"


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


def validate_onnx(
    model: nn.Module,
    path: str,
    input_size: InputSize,
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
        rtol: tolerance on the max absolute error, relative to ``max(1, max |output|)``.

    Returns:
        An :class:`OnnxExportReport` with the errors per size.

    Raises:
        ExportError: a frozen dimension, or ONNX Runtime fails or disagrees at a size.

    Example:
        >>> import torch, torchvision, fcnify
        >>> vgg = torchvision.models.vgg11().eval()  # doctest: +SKIP
        >>> torch.onnx.export(vgg, (torch.randn(1, 3, 224, 224),), "vgg.onnx", dynamo=True,
        ...     dynamic_shapes=({2: torch.export.Dim("h"), 3: torch.export.Dim("w")},))  # doctest: +SKIP
        >>> fcnify.validate_onnx(vgg, "vgg.onnx", (224, 224))  # doctest: +SKIP
        Traceback (most recent call last):
        fcnify._errors.ExportError: ONNX Runtime fails on vgg.onnx at input 1x3x288x352: ... GEMM: Dimension ...
    """
    if not os.path.isfile(path):
        raise ExportError(f"no such ONNX file: {path}. Hint: check the path.")
    import onnx

    try:
        onnx.load(path, load_external_data=False)
    except Exception as err:
        raise ExportError(
            f"{path} is not a readable ONNX model: {type(err).__name__}: {first_line(err)}. "
            "Hint: export it again (fcnify export MODEL -o FILE.onnx); the file may be truncated or not ONNX."
        ) from err
    size = _input_size(model, input_size)
    return _validate(model, path, size, dynamic_batch, validate_sizes, rtol)


def _input_size(model: nn.Module, input_size: Optional[InputSize]) -> Tuple[int, int, int]:
    try:
        return resolve_input_size(model, input_size)
    except FcnifyError as err:
        raise ExportError(str(err)) from err


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
        x = example_input(fcn, (c, sh, sw), batch_size=batch, seed=i)
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
    pairs = []
    for out, ref in zip(outs, refs):
        result = torch.from_numpy(out)
        if tuple(result.shape) != tuple(ref.shape):
            raise _at_size(
                ExportError(
                    f"ONNX Runtime gives shape {tuple(result.shape)} where PyTorch gives {tuple(ref.shape)} at input "
                    f"{where} ({path}). Hint: a size was frozen at export time; export an fcnify conversion."
                ),
                size,
            )
        pairs.append((ref, result))
    c = compare(pairs, rtol)
    return SizeCheck(size, x.shape[0], [tuple(r.shape) for r in refs], c.max_abs_error, c.tolerance)


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
