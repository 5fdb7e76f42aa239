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

from .._errors import FcnifyError, VerificationError
from ..graph import eval_mode
from ._compare import DEFAULT_RTOL, compare

__all__ = ["check_outputs", "VerificationReport", "OutputCheck", "CHECKS"]

#: The checks an output can get, from exact to none.
CHECKS = ("equal", "mean", "none")


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


def check_outputs(
    original: nn.Module,
    converted: nn.Module,
    image: torch.Tensor,
    checks: Optional[Sequence[str]],
    mode: str,
    rtol: float = DEFAULT_RTOL,
) -> VerificationReport:
    """Run both models on ``image`` (each in eval mode, restored after) and compare output by output.

    Each model gets its own copy of the input (a model that modifies its input in place cannot
    hide a difference), and the original runs on a copy of itself when it has lazy modules, which
    a first call would materialise.

    Args:
        original: the classifier.
        converted: the converted model.
        image: the ``(N, C, H, W)`` input, at the training size.
        checks: per output, ``"equal"``, ``"mean"`` or ``"none"`` (see the module docstring);
            None: ``"equal"`` for every output (``"none"`` in dense mode).
        mode: the conversion mode, for the report.
        rtol: the tolerance of :func:`~fcnify.verification.compare`.

    Raises:
        FcnifyError: the two models return different numbers of outputs.
    """
    if any(isinstance(m, LazyModuleMixin) for m in original.modules()):
        original = copy.deepcopy(original)  # a first call would materialise the user's lazy modules
    with torch.no_grad(), eval_mode(original), eval_mode(converted):
        reference = original(image.clone())  # each its own copy: a model may change its input in place
        result = converted(image.clone())
    refs, _ = pytree.tree_flatten(reference)
    outs, _ = pytree.tree_flatten(result)
    if any(isinstance(r, torch.Tensor) and r.is_floating_point() and not torch.isfinite(r).all() for r in refs):
        bad = [name for name, p in original.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        where = (
            f"its parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or inf"
            if bad
            else "its weights or buffers overflow on a standard normal input"
        )
        raise VerificationError(
            f"the original {type(original).__name__} itself returns NaN or inf at "
            f"{'x'.join(map(str, image.shape[1:]))}: {where}. Hint: check the weights (torch.isfinite(p).all() for "
            "each parameter); nothing can be verified against non-finite logits."
        )
    if len(refs) != len(outs):
        raise FcnifyError(f"the converted model returns {len(outs)} outputs where the original returns {len(refs)}")
    if checks is None:
        checks = ["none" if mode == "dense" else "equal"] * len(refs)
    results = [_compare(i, ref, out, check, rtol) for i, (ref, out, check) in enumerate(zip(refs, outs, checks))]
    return VerificationReport(str(mode), tuple(image.shape[1:]), results)


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
    c = compare([(ref_f, out_f)], rtol)
    return OutputCheck(index, check, tuple(out.shape), tuple(ref.shape), c.max_abs_error, c.max_rel_error, c.tolerance)
