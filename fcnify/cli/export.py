"""``fcnify export MODEL``: convert a classifier and export it to ONNX, validated in ONNX Runtime."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._errors import FcnifyError
from ._args import (
    add_force_argument,
    add_model_arguments,
    check_output_path,
    default_output,
    load_from_args,
    note_random_weights,
    write_onnx,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "export",
        help="convert a classifier and export it to ONNX with dynamic height and width",
        description="Convert a classifier, verify it, export it to ONNX with symbolic batch, height and width, "
        "and validate the file in ONNX Runtime against PyTorch at the training size, a larger non-square "
        "size and an odd size.",
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", metavar="PATH", help="the .onnx file; default: ./MODEL-fcn.onnx")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 (default: symbolic)")
    parser.add_argument(
        "--simplify", action="store_true", help="simplify with onnxslim (installed separately), then validate again"
    )
    add_force_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..conversion import convert

    path = args.output or os.path.splitext(default_output(args.model))[0] + ".onnx"
    if not path.lower().endswith(".onnx"):
        raise FcnifyError(
            f"fcnify export writes ONNX, but {path} does not end in .onnx. "
            "Hint: use -o model.onnx, or fcnify convert -o model.pt2 for a torch.export program."
        )
    check_output_path(path, args, (".onnx",), "ONNX file")
    note_random_weights(args)
    model, input_size = load_from_args(args)
    fcn = convert(model, input_size=input_size, mode=args.mode)
    report = fcn.conversion_report
    print(report)
    write_onnx(fcn, path, report.input_size, args.opset, not args.static_batch, args.simplify)
    print(f"done in {report.seconds:.1f} s (conversion and verification)")
    return 0
