"""The result of a conversion: a ``torch.fx.GraphModule`` that carries its report.

torchvision's ``DualGraphModule`` is the precedent: what the module needs is a real attribute
of a ``GraphModule`` subclass, kept through ``copy.deepcopy``, rather than something stuck onto
a plain ``GraphModule`` and read back with ``getattr``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Union

import torch.fx as fx
from torch import nn

from ..verification import VerificationReport
from ._rewrite import Rewrite

__all__ = ["ConversionReport", "FullyConvolutionalNet"]


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did; the :class:`FullyConvolutionalNet` carries it as ``fcn.conversion_report``.

    Attributes:
        model: class name of the original model.
        mode: ``window``, ``dense`` or ``global``.
        input_size: ``(C, H, W)`` training size.
        rewrites: each rule applied, node by node (before -> after).
        checks: per output, the verification that applies (``equal``, ``mean``, ``none``).
        probe_size: the larger ``(H, W)`` the converted model was run at.
        probe_output_shapes: its output shapes at ``probe_size``.
        verification: the :class:`~fcnify.VerificationReport`, when verified.
        seconds: wall time of the conversion, verification included.
        output_stride: the stride asked for with ``output_stride`` (None: the native one).
        stride_changes: the layers whose stride or dilation changed for it.
    """

    model: str
    mode: str
    input_size: Tuple[int, int, int]
    rewrites: List[Rewrite]
    checks: List[str]
    probe_size: Tuple[int, int]
    probe_output_shapes: List[Tuple[int, ...]]
    verification: Optional[VerificationReport] = None
    seconds: float = 0.0
    output_stride: Optional[int] = None
    stride_changes: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        c, h, w = self.input_size
        lines = [f"{self.model} -> fully convolutional ({self.mode} mode, trained at {c}x{h}x{w})", "head rewrites:"]
        lines += [f"  {r}" for r in self.rewrites]
        shapes = ", ".join("x".join(map(str, s)) for s in self.probe_output_shapes)
        lines.append(f"at {self.probe_size[0]}x{self.probe_size[1]} input: output {shapes}")
        if self.verification is not None:
            lines.append(str(self.verification))
        if self.output_stride is not None:
            lines.append(f"output stride {self.output_stride}: {len(self.stride_changes)} layers changed")
            lines += [f"  {c}" for c in self.stride_changes]
        return "\n".join(lines)


class FullyConvolutionalNet(fx.GraphModule):
    """A classifier converted by :func:`fcnify.convert`: ``(N, C, H, W) -> (N, K, h, w)`` for any ``H, W``.

    A ``torch.fx.GraphModule`` (print ``.code`` to read it) whose attributes say what it is:

    Attributes:
        conversion_report: the :class:`ConversionReport` (mode, training size, rewrites, checks,
            verification).
        fcnify_input_size: the training size ``(C, H, W)`` (what :func:`fcnify.geometry`,
            :func:`fcnify.export_onnx` and the tiling use by default).
        pretrained_cfg: the original model's timm config, when it had one (normalisation).

    The report survives ``copy.deepcopy``; ``state_dict()`` holds the same tensors as a plain
    ``GraphModule`` of the same graph would.
    """

    conversion_report: ConversionReport

    def __init__(
        self,
        root: Union[nn.Module, Dict[str, Any]],
        graph: fx.Graph,
        class_name: str = "FullyConvolutionalNet",
        conversion_report: Optional[ConversionReport] = None,
    ):
        super().__init__(root, graph, class_name)
        self.conversion_report = conversion_report  # type: ignore[assignment]

    @property
    def fcnify_input_size(self) -> Tuple[int, int, int]:
        return tuple(self.conversion_report.input_size)  # type: ignore[return-value]

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FullyConvolutionalNet":
        # GraphModule rebuilds the copy from its graph, which keeps the modules and tensors the
        # graph reads and drops every other attribute, the class name included
        res = super().__deepcopy__(memo)
        res.__class__.__name__ = type(self).__name__
        for key, value in self.__dict__.items():
            if key not in res.__dict__:
                res.__dict__[key] = copy.deepcopy(value, memo)
        return res  # type: ignore[return-value]
