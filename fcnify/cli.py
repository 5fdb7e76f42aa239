"""The ``fcnify`` command line.

    fcnify convert resnet50
    fcnify convert timm/convnext_tiny --mode dense --input-size 288 -o convnext.pt2
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, Tuple

from ._errors import FcnifyError

__all__ = ["main"]


def _size(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size; use 224 or 224x320 (height x width)")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"'{text}': sizes must be positive")
    return h, w


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcnify", description="Turn image classifiers into exact fully convolutional networks."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    convert = sub.add_parser(
        "convert",
        help="convert a classifier, verify it and save it",
        description="Convert a classifier into a fully convolutional network, verify it against the original "
        "at its training size, and save it as a torch.export program (.pt2) that accepts any input size. "
        "Load the result without fcnify: torch.export.load(PATH).module().",
    )
    convert.add_argument(
        "model",
        metavar="MODEL",
        help="torchvision or timm model name (a bare name is looked up in torchvision first; "
        "prefix timm/ or torchvision/ to choose), or a file saved with torch.save(model)",
    )
    source = convert.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="FILE", help="local state dict (.pth, .pt, .safetensors) to load")
    source.add_argument("--pretrained", action="store_true", help="the library's pretrained weights (needs internet or a cache)")
    convert.add_argument("--input-size", type=_size, metavar="HxW", help="training size, e.g. 224 or 224x320 "
                         "(default: from the weights' metadata)")
    convert.add_argument("--mode", choices=("window", "dense", "global"), default="window",
                         help="window: slide the classifier (default); dense: one prediction per feature cell; "
                         "global: keep (N, K) logits at any size")
    convert.add_argument("-o", "--output", metavar="PATH", help="where to save (.pt2); default: ./MODEL-fcn.pt2")
    convert.add_argument("--no-save", action="store_true", help="convert and verify only")
    return parser


def _default_output(model: str) -> str:
    stem = os.path.splitext(os.path.basename(model))[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + "-fcn.pt2"


def _convert(args: argparse.Namespace) -> int:
    from ._convert import convert
    from ._models import load_model
    from ._save import save

    model, size = load_model(args.model, pretrained=args.pretrained, weights=args.weights)
    input_size = args.input_size or size
    if input_size is None:
        raise FcnifyError(f"{args.model} records no training size. Hint: pass --input-size, e.g. --input-size 224.")
    fcn = convert(model, input_size=input_size, mode=args.mode)
    report = fcn.conversion_report
    print(report)
    if not args.no_save:
        path = args.output or _default_output(args.model)
        save(fcn, path, report.input_size)
        size_mb = os.path.getsize(path) / 2**20
        print(f"saved {path} ({size_mb:.1f} MB): load with torch.export.load({path!r}).module(); "
              f"inputs of at least {report.input_size[1]}x{report.input_size[2]}")
    print(f"done in {report.seconds:.1f} s (conversion and verification)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _convert(args)
    except FcnifyError as err:
        print(f"fcnify: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fcnify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
