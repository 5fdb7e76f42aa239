"""fcnify: turn image classifiers into exact fully convolutional networks.

>>> import torchvision, fcnify
>>> fcn = fcnify.convert(torchvision.models.resnet18(), input_size=(224, 224))  # doctest: +SKIP
"""

from ._convert import ConversionReport, convert
from ._errors import FcnifyError, ModelLoadError, TraceError, UnsupportedModelError, VerificationError
from .verify import OutputCheck, VerificationReport, verify

__version__ = "0.1.0"

__all__ = [
    "convert",
    "verify",
    "ConversionReport",
    "VerificationReport",
    "OutputCheck",
    "FcnifyError",
    "UnsupportedModelError",
    "TraceError",
    "VerificationError",
    "ModelLoadError",
]
