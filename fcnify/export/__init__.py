"""Export: a converted model as ONNX (validated in ONNX Runtime at several sizes) or as a ``.pt2`` program.

* ``_onnx`` -- :func:`export_onnx`: the dynamo exporter with symbolic sizes, then validation;
* ``_onnx_validate`` -- :func:`validate_onnx`: checker, symbolic dims, ONNX Runtime against PyTorch;
* ``_exportable`` -- stand-ins for code the exporter gets wrong at other sizes;
* ``_onnx_pad`` -- keeps ONNX Runtime from fusing a zero pad into a max pool;
* ``_pt2`` -- :func:`save` (``.pt2`` or ``.onnx`` by extension).
"""

from ._onnx import export_onnx
from ._onnx_validate import OnnxExportReport, SizeCheck, validate_onnx
from ._pt2 import export_program, save

__all__ = ["export_onnx", "validate_onnx", "OnnxExportReport", "SizeCheck", "save", "export_program"]
