"""The ``fcnify`` command line: one module per command, one shared definition of the model arguments.

    fcnify convert resnet50
    fcnify convert timm/convnext_tiny --mode dense --input-size 288 -o convnext.pt2

Building the parser imports no torch, timm or onnx: each command imports what it needs when it
runs, so ``fcnify --help`` and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .._errors import FcnifyError
from . import convert, demo, export, heatmap, predict, zoo

__all__ = ["main"]

#: The commands, in the order ``fcnify --help`` lists them.
COMMANDS = {"convert": convert, "export": export, "predict": predict, "heatmap": heatmap, "zoo": zoo, "demo": demo}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcnify", description="Turn image classifiers into exact fully convolutional networks."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except FcnifyError as err:
        print(f"fcnify: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a folder made read-only meanwhile: the system's words, one line
        where = f": {err.filename}" if err.filename else ""
        print(
            f"fcnify: error: {err.strerror or err}{where}. Hint: check the path, its permissions and free space.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("fcnify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
