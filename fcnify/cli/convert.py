"""``fcnify convert MODEL``: convert a classifier, verify it and save it (.pt2 or .onnx)."""

from __future__ import annotations

import argparse
import os
from typing import Any

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
        "convert",
        help="convert a classifier, verify it and save it",
        description="Convert a classifier into a fully convolutional network, verify it against the original "
        "at its training size, and save it as a torch.export program (.pt2) that accepts any input size. "
        "Load the result without fcnify: torch.export.load(PATH).module().",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where to save: .pt2 (torch.export) or .onnx (validated in ONNX Runtime); default: ./MODEL-fcn.pt2",
    )
    parser.add_argument("--no-save", action="store_true", help="convert and verify only")
    add_force_argument(parser)


def run(args: argparse.Namespace) -> int:
    from ..conversion import convert
    from ..export import save

    if not args.no_save:
        check_output_path(args.output or default_output(args.model), args, (".pt2", ".onnx"), "converted model")
    note_random_weights(args)
    model, input_size = load_from_args(args)
    fcn = convert(model, input_size=input_size, mode=args.mode)
    report = fcn.conversion_report
    print(report)
    if not args.no_save:
        path = args.output or default_output(args.model)
        if path.lower().endswith(".onnx"):
            write_onnx(fcn, path, report.input_size)
            print(f"done in {report.seconds:.1f} s (conversion and verification)")
            return 0
        save(fcn, path, report.input_size)
        size_mb = os.path.getsize(path) / 2**20
        print(
            f"saved {path} ({size_mb:.1f} MB): load with torch.export.load({path!r}).module(); "
            f"inputs of at least {report.input_size[1]}x{report.input_size[2]}"
        )
    print(f"done in {report.seconds:.1f} s (conversion and verification)")
    return 0
