"""``fcnify zoo``: convert every torchvision classifier and one timm model per family; write a coverage table.

    fcnify zoo --torchvision --timm -o docs/coverage.md
    python -m fcnify.cli.zoo --filter 'resnet*'

The options are declared here without importing torch; the sweep itself is ``_zoo``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from .._errors import FcnifyError
from .._mode import MODES

__all__ = ["add_parser", "add_arguments", "run", "main"]


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "zoo",
        help="convert every torchvision classifier and one timm model per family; write a coverage table",
        description="Sweep the model zoos with random weights: convert each model in every mode, verify it at "
        "its training size, and write a Markdown table (status, max error, output map size, time).",
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``zoo`` options, shared by ``fcnify zoo`` and ``python -m fcnify.cli.zoo``."""
    parser.add_argument("--torchvision", action="store_true", help="sweep torchvision (default: both libraries)")
    parser.add_argument("--timm", action="store_true", help="sweep one model per timm family")
    parser.add_argument(
        "--filter",
        metavar="PATTERN",
        help="glob on model name, library/name or family, e.g. 'resnet*'; several, comma-separated: 'swin*,dla*'",
    )
    parser.add_argument("--kind", metavar="KINDS", help="comma-separated kinds to sweep: cnn, transformer, hybrid, mlp")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: all three)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="write the Markdown table here (e.g. docs/coverage.md); "
        "a sweep of one library (--torchvision or --timm) replaces that library's section of an "
        "existing file and keeps the other; a sweep of some models (--filter, --kind) replaces "
        "their rows and keeps the others",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="check N models at a time, each in "
        "its own process (default 1); combine with --threads so that N x threads <= cores",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (1 is much faster on a "
        "machine shared with other jobs: busy cores make multi-threaded kernels stall)",
    )
    parser.add_argument(
        "--onnx",
        nargs="?",
        const="all",
        choices=("all", "cnn"),
        help="also export each "
        "window-mode conversion to ONNX and validate it in ONNX Runtime at three sizes (an ONNX "
        "column in the table); '--onnx cnn' exports the CNNs only (attention models can take tens "
        "of CPU-minutes each in the exporter)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the sweep the arguments describe; print the summary; exit status 1 if a model failed."""
    from ._zoo import run as sweep

    return sweep(args)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fcnify.cli.zoo [--torchvision] [--timm] [--filter PATTERN] [-o docs/coverage.md]``."""
    parser = argparse.ArgumentParser(prog="python -m fcnify.cli.zoo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FcnifyError as err:
        print(f"fcnify zoo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
