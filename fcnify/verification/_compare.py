"""The one comparison rule: the largest absolute difference, against a tolerance relative to the reference.

``max |result - reference| <= rtol * max |reference|``: relative to the reference's own scale,
its largest magnitude, in float64. Not floored at 1: logits of order 1e-3 are checked to 1e-7, so
that a kernel 1% wrong fails however small the logits are. The default ``rtol`` follows the
model's precision (:func:`default_rtol`). :func:`fcnify.verify`, the ONNX Runtime validation and the output-stride check
all compare this way; only their ``rtol`` differs.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Tuple

import torch

__all__ = ["Comparison", "compare", "output_scale", "default_rtol", "DEFAULT_RTOL", "ONNX_RTOL"]

#: PyTorch against PyTorch: float32 sums over a few thousand terms in another order differ by
#: ~1e-6 of the largest logit; 1e-4 leaves room for depth.
DEFAULT_RTOL = 1e-4

#: ONNX Runtime against PyTorch. Looser than :data:`DEFAULT_RTOL`: ONNX Runtime's kernels (MLAS)
#: accumulate in another order than PyTorch's (oneDNN), and in deep residual networks the
#: difference grows with the residual stream, not with the logits (resnet152, random weights:
#: 3e-4 of the largest logit). 1e-3 is also the default of PyTorch's own ONNX verification.
#: A size frozen at export or a wrong branch gives errors of the order of the output.
ONNX_RTOL = 1e-3

#: :data:`DEFAULT_RTOL` for other floating-point types, by their precision (float16 keeps 11 bits,
#: bfloat16 8).
_RTOL_BY_DTYPE = {torch.float64: 1e-8, torch.float32: DEFAULT_RTOL, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: The smallest scale: an all-zero reference must be matched to it.
_TINY = 1e-30


def default_rtol(model: torch.nn.Module) -> float:
    """The verification tolerance for ``model``'s floating-point type (float32: :data:`DEFAULT_RTOL`)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return _RTOL_BY_DTYPE.get(param.dtype if param is not None else torch.float32, DEFAULT_RTOL)


def output_scale(reference: torch.Tensor) -> float:
    """The scale errors are measured against: the reference's largest magnitude (at least 1e-30)."""
    if not reference.numel():
        return _TINY
    return max(_TINY, reference.detach().abs().max().item())


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        max_abs_error: ``max |result - reference|`` over every pair.
        scale: ``max |reference|`` over every pair.
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
        >>> compare([(torch.tensor([1e-3]), torch.tensor([1.01e-3]))], rtol=1e-4).passed  # 1% off, tiny logits
        False
    """
    error, scale = 0.0, _TINY
    for reference, result in pairs:
        ref = reference.detach().cpu().double()
        out = result.detach().cpu().double()
        if ref.numel():
            scale = max(scale, output_scale(ref))
            error = max(error, (out - ref).abs().max().item())
    return Comparison(error, scale, rtol * scale)
