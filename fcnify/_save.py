"""Saving a converted model so that it runs at any size without fcnify installed.

``.pt2``: a ``torch.export`` program with dynamic batch, height and width (minimum: the
training size). Load it with ``torch.export.load(path).module()``.

``.onnx``: :func:`fcnify.export_onnx`, validated in ONNX Runtime at three sizes.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim

from ._files import check_output, staged
from ._errors import FcnifyError, first_line
from ._trace import second_size
from .verify import example_input

__all__ = ["save", "export_program"]


def export_program(fcn: nn.Module, input_size: Sequence[int]) -> torch.export.ExportedProgram:
    """``torch.export`` the converted model with symbolic batch, height and width."""
    c, h, w = input_size
    example = example_input(fcn, (c, *second_size((h, w))))
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=h), 3: Dim("width", min=w)}
    was_training = fcn.training
    fcn.eval()
    try:
        # Without this, export specialises on the 1x1 map produced at the training size.
        with fx_config.patch(backed_size_oblivious=True):
            return torch.export.export(fcn, (example,), dynamic_shapes=(dims,))
    except Exception as err:
        raise FcnifyError(
            f"torch.export could not export the converted model with dynamic sizes: {first_line(err)}. "
            "Hint: save the module with torch.save instead (needs fcnify to load)."
        ) from err
    finally:
        fcn.train(was_training)


def save(fcn: nn.Module, path: str, input_size: Sequence[int]) -> str:
    """Save ``fcn`` to ``path``; the format follows the extension (``.pt2`` or ``.onnx``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        from .onnx import export_onnx

        export_onnx(fcn, path, input_size)
        return path
    if ext != ".pt2":
        raise FcnifyError(f"cannot save to {path}: unknown format '{ext}'. Hint: use a .pt2 or .onnx file name.")
    check_output(path, suffixes=(".pt2",))
    program = export_program(fcn, input_size)
    with staged(path) as work:  # an older file at path survives a failed save
        torch.export.save(program, work)
    return path
