"""fcnify: turn image classifiers into exact fully convolutional networks.

The package is layered; each layer imports only the ones below it (``lint-imports`` checks):

* ``fcnify.graph`` -- tracing with torch.fx, shapes from runs, fx helpers, the input size;
* ``fcnify.analysis`` -- geometry (stride, receptive field, valid sizes);
  ``fcnify.verification`` -- the one comparison rule and its tolerances;
* ``fcnify.conversion`` -- trace, find the head, rewrite it with the rules, output stride;
* ``fcnify.export`` -- ONNX and ``.pt2``; ``fcnify.inference`` -- tiling, padding, heatmaps,
  segmentation, head resizing, gigapixel prediction; ``fcnify.models`` -- loading classifiers by name;
* ``fcnify.io`` -- slides, scenes and images read lazily; class maps written as TIFF, GeoTIFF, GeoJSON;
* ``fcnify.cli`` -- the ``fcnify`` command.

Users import from ``fcnify`` only. The names are loaded on first use, so that ``fcnify --help``
does not import torch.

>>> import torch, fcnify
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
>>> fcnify.convert(net, input_size=(8, 8))(torch.randn(1, 3, 16, 20)).shape
torch.Size([1, 5, 9, 13])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from ._errors import (
    ExportError,
    FcnifyError,
    ModelLoadError,
    TraceError,
    UnsupportedModelError,
    VerificationError,
)
from ._mode import MODES, Mode

__version__ = "0.1.0"

#: Public name -> the subpackage that defines it (imported on first use).
_LAZY = {
    "trace": "conversion",
    "Traced": "conversion",
    "convert": "conversion",
    "verify": "conversion",
    "ConversionReport": "conversion",
    "FullyConvolutionalNet": "conversion",
    "VerificationReport": "verification",
    "OutputCheck": "verification",
    "geometry": "analysis",
    "Geometry": "analysis",
    "valid_sizes": "analysis",
    "ValidSizes": "analysis",
    "export_onnx": "export",
    "validate_onnx": "export",
    "OnnxExportReport": "export",
    "save": "export",
    "segmenter": "inference",
    "Segmenter": "inference",
    "resize_head": "inference",
    "predict_tiled": "inference",
    "predict_padded": "inference",
    "heatmap": "inference",
    "HeatmapResult": "inference",
    "render_heatmap": "inference",
    "class_names": "inference",
    "predict": "inference",
    "stream_predict": "inference",
    "open_image": "io",
    "write_output": "io",
    "load_model": "models",
    "load_lite0": "models",
}

__all__ = [
    "trace",
    "Traced",
    "convert",
    "verify",
    "Mode",
    "MODES",
    "export_onnx",
    "validate_onnx",
    "save",
    "ConversionReport",
    "FullyConvolutionalNet",
    "VerificationReport",
    "OutputCheck",
    "FcnifyError",
    "UnsupportedModelError",
    "TraceError",
    "VerificationError",
    "ModelLoadError",
    "ExportError",
    "OnnxExportReport",
    "segmenter",
    "Segmenter",
    "resize_head",
    "geometry",
    "Geometry",
    "valid_sizes",
    "ValidSizes",
    "predict_tiled",
    "predict_padded",
    "heatmap",
    "HeatmapResult",
    "render_heatmap",
    "class_names",
    "load_model",
    "load_lite0",
    "open_image",
    "predict",
    "stream_predict",
    "write_output",
]


def __getattr__(name: str) -> Any:
    package = _LAZY.get(name)
    if package is None:
        raise AttributeError(f"module 'fcnify' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{package}", __name__), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .analysis import Geometry, ValidSizes, geometry, valid_sizes
    from .conversion import ConversionReport, FullyConvolutionalNet, Traced, convert, trace, verify
    from .export import OnnxExportReport, export_onnx, save, validate_onnx
    from .inference import (
        HeatmapResult,
        Segmenter,
        class_names,
        heatmap,
        predict_padded,
        predict_tiled,
        render_heatmap,
        resize_head,
        segmenter,
    )
    from .models import load_lite0, load_model
    from .verification import OutputCheck, VerificationReport
