"""Conversion: trace once, find the head, rewrite it with the rules, change the output stride, verify.

* :func:`trace` / :class:`Traced` -- one trace and two shape runs, convertible in every mode;
* :func:`convert` -- ``trace(...).convert(mode)`` in one call;
* ``_rewrite`` -- the head finder and the rewriter that applies :mod:`.rules` node by node;
* ``_stride`` -- finer output maps (``output_stride``);
* ``_runtime`` -- the modules and functions converted graphs call;
* :class:`FullyConvolutionalNet` -- the result, carrying its :class:`ConversionReport`.
"""

from ._convert import Traced, convert, trace
from ._result import ConversionReport, FullyConvolutionalNet
from ._rewrite import Rewrite
from ._verify import verify

__all__ = ["trace", "Traced", "convert", "verify", "ConversionReport", "FullyConvolutionalNet", "Rewrite"]
