"""``fcnify.verify``: does a converted model reproduce the original at the training size?

The checks per output and the comparison rule live in :mod:`fcnify.verification`; this is the
entry point that knows conversions: it takes the checks from a
:class:`~fcnify.FullyConvolutionalNet`'s report.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn

from .._mode import Mode, as_mode
from ..graph import InputSize, example_input, resolve_input_size
from ..verification import VerificationReport, check_outputs, default_rtol
from ._result import FullyConvolutionalNet

__all__ = ["verify"]


def verify(
    original: nn.Module,
    converted: nn.Module,
    input_size: InputSize,
    mode: Union[Mode, str] = Mode.WINDOW,
    checks: Optional[Sequence[str]] = None,
    rtol: Optional[float] = None,
    batch_size: int = 2,
    seed: int = 0,
) -> VerificationReport:
    """Run both models on the same seeded input at the training size and compare.

    Args:
        original: the classifier.
        converted: the result of :func:`fcnify.convert`.
        input_size: training size ``(H, W)`` or ``(C, H, W)``, as for :func:`fcnify.convert`.
        mode: the conversion mode.
        checks: per output, ``"equal"``, ``"mean"`` or ``"none"``; by default taken from
            ``converted.conversion_report``, else ``"equal"`` (``"none"`` in dense mode).
        rtol: tolerance on the max absolute error, relative to the largest logit; by default
            1e-4 for float32 models and by precision for others (float16 1e-2, bfloat16 5e-2).
        batch_size: the batch of the seeded input.
        seed: the seed of the input.

    Returns:
        A :class:`VerificationReport`; neither model is changed.

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        >>> fcn = fcnify.convert(net, input_size=(8, 8), verify=False)
        >>> fcnify.verify(net, fcn, (8, 8)).passed
        True
    """
    mode = as_mode(mode)
    size = resolve_input_size(original, input_size)
    image = example_input(original, size, batch_size, seed)
    if checks is None:
        if isinstance(converted, FullyConvolutionalNet) and converted.conversion_report is not None:
            checks = converted.conversion_report.checks
    rtol = default_rtol(converted) if rtol is None else rtol
    return check_outputs(original, converted, image, checks, mode.value, rtol)
