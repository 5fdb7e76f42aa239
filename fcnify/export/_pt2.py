"""Saving a converted model so that it runs at any size without fcnify installed.

``.pt2``: a ``torch.export`` program with dynamic batch, height and width (minimum: the
training size). Load it with ``torch.export.load(path).module()``.

``.onnx``: :func:`fcnify.export_onnx`, validated in ONNX Runtime at three sizes.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim

from .._errors import FcnifyError, first_line
from .._files import check_output, staged
from ..graph import InputSize, example_input, resolve_input_size, second_size

__all__ = ["save", "export_program"]


def export_program(fcn: nn.Module, input_size: Optional[InputSize] = None) -> torch.export.ExportedProgram:
    """``torch.export`` the converted model with symbolic batch, height and width (at least ``input_size``)."""
    c, h, w = resolve_input_size(fcn, input_size)
    example = example_input(fcn, (c, *second_size((h, w))))
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=h), 3: Dim("width", min=w)}
    was_training = fcn.training
    fcn.eval()
    try:
        # Without this, export specialises on the 1x1 map produced at the training size.
        with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
            return torch.export.export(fcn, (example,), dynamic_shapes=(dims,))
    except Exception as err:
        raise FcnifyError(
            f"torch.export could not export the converted model with dynamic sizes: {first_line(err)}. "
            "Hint: save the module with torch.save instead (needs fcnify to load)."
        ) from err
    finally:
        fcn.train(was_training)


def save(fcn: nn.Module, path: str, input_size: Optional[InputSize] = None) -> str:
    """Save a converted model to ``path``; the format follows the extension (``.pt2`` or ``.onnx``).

    Args:
        fcn: the result of :func:`fcnify.convert`.
        path: a ``.pt2`` file (a ``torch.export`` program: ``torch.export.load(path).module()``
            runs it without fcnify) or a ``.onnx`` file (:func:`fcnify.export_onnx`).
        input_size: the training size; default: the conversion's.

    Returns:
        ``path``.

    Example:
        >>> import os, tempfile, torch, fcnify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3))
        >>> path = fcnify.save(fcnify.convert(net, input_size=(8, 8)), os.path.join(tempfile.mkdtemp(), "net.pt2"))
        >>> torch.export.load(path).module()(torch.randn(1, 1, 10, 12)).shape
        torch.Size([1, 3, 3, 5])
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        from ._onnx import export_onnx  # noqa: PLC0415 (ONNX is imported only for .onnx files)

        export_onnx(fcn, path, input_size)
        return path
    if ext != ".pt2":
        raise FcnifyError(f"cannot save to {path}: unknown format '{ext}'. Hint: use a .pt2 or .onnx file name.")
    check_output(path, suffixes=(".pt2",))
    program = export_program(fcn, input_size)
    with staged(path) as work:  # an older file at path survives a failed save
        torch.export.save(program, work)
    return path
