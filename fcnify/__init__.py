"""fcnify: turn image classifiers into exact fully convolutional networks.

>>> import torchvision, fcnify
>>> fcn = fcnify.convert(torchvision.models.resnet18(), input_size=(224, 224))  # doctest: +SKIP
"""

from ._convert import ConversionReport, convert
from ._errors import (
    ExportError,
    FcnifyError,
    ModelLoadError,
    TraceError,
    UnsupportedModelError,
    VerificationError,
)
from .onnx import OnnxExportReport, export_onnx, validate_onnx
from .resize import resize_head
from .segment import Segmenter, segmenter
from .verify import OutputCheck, VerificationReport, verify
from .geometry import Geometry, ValidSizes, geometry, valid_sizes
from .tiled import predict_tiled
from .padded import predict_padded
from .heatmap import HeatmapResult, class_names, heatmap, render_heatmap
from ._models import load_model
from ._lite0 import load_lite0
from .io import open_image
from ._predict import predict

__version__ = "0.1.0"

__all__ = [
    "convert",
    "verify",
    "export_onnx",
    "validate_onnx",
    "ConversionReport",
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
]
