"""Numerical verification: does the converted model reproduce the original?

At the training size every mode has an exact check, except ``dense`` after a
non-linear head, where none exists and the report says so:

* ``window`` -- the ``(N, K, 1, 1)`` map equals the logits;
* ``global`` -- the ``(N, K)`` output equals the logits;
* ``dense``  -- the mean of the ``(N, K, h, w)`` map equals the logits when the head
  after an average pool is affine (class activation maps); a head with a flatten has
  a 1x1 map equal to the logits.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ._errors import FcnifyError, VerificationError
from ._trace import eval_mode

__all__ = [
    "verify",
    "VerificationReport",
    "OutputCheck",
    "DEFAULT_RTOL",
    "default_rtol",
    "output_scale",
    "example_input",
]

#: Tolerance relative to the output's own scale (its largest magnitude) for float32: sums over
#: a few thousand terms in another order differ by ~1e-6; 1e-4 leaves room for depth.
DEFAULT_RTOL = 1e-4

#: The same for other floating-point types, by their precision (float16 keeps 11 bits, bfloat16 8).
_RTOL_BY_DTYPE = {torch.float64: 1e-8, torch.float32: DEFAULT_RTOL, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: Below this the scale of an output is taken as this: an all-zero output must be matched to it.
_TINY = 1e-30


def default_rtol(model: nn.Module) -> float:
    """The verification tolerance for ``model``'s floating-point type (float32: :data:`DEFAULT_RTOL`)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return _RTOL_BY_DTYPE.get(param.dtype if param is not None else torch.float32, DEFAULT_RTOL)


def output_scale(reference: torch.Tensor) -> float:
    """The scale errors are measured against: the reference's largest magnitude.

    Relative to the output's own scale, not floored at 1: logits of order 1e-3 are checked to
    1e-7, so that a kernel 1% wrong fails however small the logits are.
    """
    if not reference.numel():
        return _TINY
    return max(_TINY, reference.detach().abs().max().item())


_CHECKS = ("equal", "mean", "none")


@dataclasses.dataclass
class OutputCheck:
    """The comparison of one output of the converted model with the original's."""

    index: int
    check: str
    shape: Tuple[int, ...]
    reference_shape: Tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    #: for ``cells``: the probe size and how many cells were compared
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.check == "none" or self.max_abs_error <= self.tolerance

    def __str__(self) -> str:
        what = {
            "equal": "map == logits",
            "mean": "mean of map == logits",
            "none": "no exact check applies (non-affine head after pooling); shape checked",
            "cells": "",
        }[self.check]
        if self.check == "cells":
            found, expected = "x".join(map(str, self.shape)), "x".join(map(str, self.reference_shape))
            line = f"cells {self.detail}: {found} map (the body gives {expected}), each == original head on its window"
            if self.shape != self.reference_shape:
                return line + "  FAILED (wrong map size)"
            line += f": max abs error {self.max_abs_error:.2e} (rel {self.max_rel_error:.2e}, tol {self.tolerance:.1e})"
            return line + ("" if self.passed else "  FAILED")
        line = f"output {self.index}: {tuple(self.shape)} vs {tuple(self.reference_shape)}, {what}"
        if self.check != "none":
            line += f": max abs error {self.max_abs_error:.2e} (rel {self.max_rel_error:.2e}, tol {self.tolerance:.1e})"
        return line + ("" if self.passed else "  FAILED")


@dataclasses.dataclass
class VerificationReport:
    """Result of :func:`verify`; ``passed`` is True when every exact check holds."""

    mode: str
    input_size: Tuple[int, ...]
    outputs: List[OutputCheck]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs if o.check != "none"), default=0.0)

    @property
    def exact_checks(self) -> int:
        return sum(o.check != "none" for o in self.outputs)

    def __str__(self) -> str:
        head = f"verification ({self.mode} mode, input {'x'.join(map(str, self.input_size))}): "
        head += "passed" if self.passed else "FAILED"
        return "\n".join([head] + [f"  {o}" for o in self.outputs])


def example_input(model: nn.Module, input_size: Sequence[int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded normal input ``(batch, C, H, W)`` on the model's device and dtype."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=generator).to(device=device, dtype=dtype)


def verify(
    original: nn.Module,
    converted: nn.Module,
    input_size: Sequence[int],
    mode: str = "window",
    checks: Optional[Sequence[str]] = None,
    rtol: Optional[float] = None,
    batch: int = 2,
    seed: int = 0,
) -> VerificationReport:
    """Run both models on the same seeded input at the training size and compare.

    Each model gets its own copy of the input (a model that modifies its input in place cannot
    hide a difference), and the original runs on a copy of itself when it has lazy modules, which
    a first call would materialise.

    Args:
        original: the classifier.
        converted: the result of :func:`fcnify.convert`.
        input_size: training size ``(H, W)`` or ``(C, H, W)``, as for :func:`fcnify.convert`.
        mode: the conversion mode.
        checks: per output, ``"equal"``, ``"mean"`` or ``"none"``; by default taken from
            ``converted.conversion_report``, else ``"equal"`` (``"none"`` in dense mode).
        rtol: tolerance on the max absolute error, relative to the largest logit; by default
            1e-4 for float32 models and by precision for others (float16 1e-2, bfloat16 5e-2).

    Returns:
        A :class:`VerificationReport`; neither model is changed.

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
        >>> fcn = fcnify.convert(net, input_size=(8, 8), verify=False)
        >>> fcnify.verify(net, fcn, (8, 8)).passed
        True
    """
    from ._convert import resolve_input_size  # (H, W) as for convert; channels from the model

    input_size = resolve_input_size(original, input_size)
    if rtol is None:
        rtol = default_rtol(converted)
    x = example_input(original, input_size, batch, seed)
    if any(isinstance(m, LazyModuleMixin) for m in original.modules()):
        original = copy.deepcopy(original)
    with torch.no_grad(), eval_mode(original), eval_mode(converted):
        reference = original(x.clone())
        result = converted(x.clone())
    refs, ref_spec = pytree.tree_flatten(reference)
    outs, out_spec = pytree.tree_flatten(result)
    if any(isinstance(r, torch.Tensor) and r.is_floating_point() and not torch.isfinite(r).all() for r in refs):
        bad = [name for name, p in original.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        where = (
            f"its parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or inf"
            if bad
            else ("its weights or buffers overflow on a standard normal input")
        )
        raise VerificationError(
            f"the original {type(original).__name__} itself returns NaN or inf at {'x'.join(map(str, input_size))}: "
            f"{where}. Hint: check the weights (torch.isfinite(p).all() for each parameter); nothing can be verified "
            "against non-finite logits."
        )
    if len(refs) != len(outs):
        raise FcnifyError(f"the converted model returns {len(outs)} outputs where the original returns {len(refs)}")
    if checks is None:
        report = getattr(converted, "conversion_report", None)
        checks = report.checks if report is not None else ["none" if mode == "dense" else "equal"] * len(refs)
    results = []
    for i, (ref, out, check) in enumerate(zip(refs, outs, checks)):
        results.append(_compare(i, ref, out, check, rtol))
    return VerificationReport(mode, input_size, results)


def _compare(index: int, ref: Any, out: Any, check: str, rtol: float) -> OutputCheck:
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
        same = ref == out
        return OutputCheck(index, "equal", (), (), 0.0 if same else float("inf"), 0.0, 0.0)
    ref_f = ref.detach().double()
    out_f = out.detach().double()
    if check == "mean":
        out_f = out_f.mean(dim=(2, 3))
    elif check == "equal" and out_f.dim() == ref_f.dim() + 2:
        if tuple(out_f.shape[2:]) != (1, 1):
            return OutputCheck(index, check, tuple(out.shape), tuple(ref.shape), float("inf"), float("inf"), 0.0)
        out_f = out_f[..., 0, 0]
    if check == "none" or out_f.shape != ref_f.shape:
        error = 0.0 if check == "none" and out.dim() == ref.dim() + 2 else float("inf")
        return OutputCheck(
            index, check if error == 0.0 else "equal", tuple(out.shape), tuple(ref.shape), error, error, 0.0
        )
    scale = output_scale(ref_f)
    error = (out_f - ref_f).abs().max().item() if ref_f.numel() else 0.0
    return OutputCheck(index, check, tuple(out.shape), tuple(ref.shape), error, error / scale, rtol * scale)
