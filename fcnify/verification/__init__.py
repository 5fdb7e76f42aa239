"""Verification: one comparison rule with its tolerances, and the per-output checks of a conversion."""

from ._compare import DEFAULT_RTOL, ONNX_RTOL, Comparison, compare, default_rtol, output_scale
from ._verify import CHECKS, OutputCheck, VerificationReport, check_outputs

__all__ = [
    "compare",
    "Comparison",
    "default_rtol",
    "output_scale",
    "DEFAULT_RTOL",
    "ONNX_RTOL",
    "check_outputs",
    "OutputCheck",
    "VerificationReport",
    "CHECKS",
]
