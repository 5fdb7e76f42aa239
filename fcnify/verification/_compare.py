"""The one comparison rule: the largest absolute difference, against a tolerance relative to the reference.

``max |result - reference| <= rtol * max(1, max |reference|)``: relative to the largest value of
the reference (floored at 1 so that near-zero outputs are not held to a near-zero tolerance),
in float64. :func:`fcnify.verify`, the ONNX Runtime validation and the output-stride check
all compare this way; only their ``rtol`` differs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Tuple

import torch

__all__ = ["Comparison", "compare", "DEFAULT_RTOL", "ONNX_RTOL"]

#: PyTorch against PyTorch: float32 sums over a few thousand terms in another order differ by
#: ~1e-6 of the largest logit; 1e-4 leaves room for depth.
DEFAULT_RTOL = 1e-4

#: ONNX Runtime against PyTorch. Looser than :data:`DEFAULT_RTOL`: ONNX Runtime's kernels (MLAS)
#: accumulate in another order than PyTorch's (oneDNN), and in deep residual networks the
#: difference grows with the residual stream, not with the logits (resnet152, random weights:
#: 3e-4 of the largest logit). 1e-3 is also the default of PyTorch's own ONNX verification.
#: A size frozen at export or a wrong branch gives errors of the order of the output.
ONNX_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        max_abs_error: ``max |result - reference|`` over every pair.
        scale: ``max(1, max |reference|)``.
        tolerance: ``rtol * scale``.
    """

    max_abs_error: float
    scale: float
    tolerance: float

    @property
    def max_rel_error(self) -> float:
        return self.max_abs_error / self.scale

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.tolerance


def compare(pairs: Iterable[Tuple[torch.Tensor, torch.Tensor]], rtol: float = DEFAULT_RTOL) -> Comparison:
    """Compare ``(reference, result)`` pairs of tensors of the same shape, in float64.

    Example:
        >>> import torch
        >>> c = compare([(torch.tensor([10.0, -2.0]), torch.tensor([10.0005, -2.0]))], rtol=1e-4)
        >>> round(c.max_abs_error, 6), c.tolerance, c.passed
        (0.0005, 0.001, True)
    """
    error, scale = 0.0, 1.0
    for reference, result in pairs:
        ref = reference.detach().cpu().double()
        out = result.detach().cpu().double()
        if ref.numel():
            scale = max(scale, ref.abs().max().item())
            error = max(error, (out - ref).abs().max().item())
    return Comparison(error, scale, rtol * scale)
