"""The exceptions fcnify raises.

Every error says what failed, where (node name, module path, shape) and, after
``Hint:``, what the user can do about it.
"""

from __future__ import annotations

from typing import Optional, Tuple

__all__ = [
    "FcnifyError",
    "UnsupportedModelError",
    "TraceError",
    "VerificationError",
    "ModelLoadError",
    "ExportError",
]


class FcnifyError(Exception):
    """Base class of every error fcnify raises on purpose."""


class UnsupportedModelError(FcnifyError):
    """The model has a part that cannot be made fully convolutional exactly."""


class TraceError(FcnifyError):
    """torch.fx could not trace the model."""


class VerificationError(FcnifyError):
    """The converted model does not reproduce the original within tolerance."""


class ModelLoadError(FcnifyError):
    """A model name, model file or weights file could not be loaded."""


class ExportError(FcnifyError):
    """Exporting to ONNX failed, or the exported file does not reproduce the model at some size.

    Attributes:
        failed_size: the ``(H, W)`` at which ONNX Runtime fails or disagrees while PyTorch runs
            (a size-dependent path: the exporter traces again there), else None.
    """

    failed_size: Optional[Tuple[int, int]] = None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (fx and torch append long traces), or its type."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
