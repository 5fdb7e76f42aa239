"""``fcnify heatmap MODEL IMAGE``: convert, run on the image, and draw where each class fires."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._errors import FcnifyError
from .._mode import Mode
from ._args import (
    add_force_argument,
    add_model_arguments,
    check_output_path,
    load_from_args,
    note_random_weights,
    parse_size,
)

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    heat = sub.add_parser(
        "heatmap",
        help="draw where a classifier fires on an image (one panel per class)",
        description="Convert a classifier, run it over an image (tile by tile when the image is large), and "
        "write a picture: the image with a semi-transparent probability map per class, a colour bar and the "
        "class name. Maps are placed on the pixels with the network's geometry.",
    )
    add_model_arguments(heat, modes=(Mode.WINDOW.value, Mode.DENSE.value))  # a heatmap needs a map
    heat.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, ...) or an (H, W, 3) .npy array")
    heat.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME_OR_ID",
        help="a class to draw, by index or name (repeat for more); default: the --top classes",
    )
    heat.add_argument(
        "--top", type=int, default=3, metavar="K", help="how many classes when --class is not given (default 3)"
    )
    heat.add_argument("-o", "--output", metavar="PNG", help="where to write the picture; default: IMAGE-heatmap.png")
    add_force_argument(heat)
    heat.add_argument("--output-stride", type=int, metavar="S", help="a finer map, e.g. 16 or 8 (default: native)")
    heat.add_argument(
        "--tile",
        type=parse_size,
        metavar="HxW",
        help="run tile by tile with this tile size (default: automatic for images above 2048x2048)",
    )


def _normalization(model: Any, name: str) -> Any:
    """timm's pretrained_cfg, else torchvision's weight transforms, else ImageNet's mean and std."""
    if getattr(model, "pretrained_cfg", None):
        return model
    try:
        import torchvision

        bare = name.split("/", 1)[-1]
        return torchvision.models.get_model_weights(bare).DEFAULT
    except Exception:
        return None


def run(args: argparse.Namespace) -> int:
    from ..conversion import convert
    from ..inference import heatmap, render_heatmap
    from ..inference._heatmap import MAX_PANELS, PICTURE_ENDINGS

    if not 1 <= args.top <= MAX_PANELS:
        raise FcnifyError(f"--top must be from 1 to {MAX_PANELS} (one panel per class), got {args.top}. Hint: --top 3.")
    if not os.path.isfile(args.image):
        raise FcnifyError(f"image file not found: {args.image}. Hint: check the path.")
    path = args.output or os.path.splitext(os.path.basename(args.image))[0] + "-heatmap.png"
    check_output_path(path, args, PICTURE_ENDINGS, "picture")
    note_random_weights(args)
    model, input_size = load_from_args(args)
    fcn = convert(model, input_size=input_size, mode=args.mode, output_stride=args.output_stride)
    result = heatmap(
        fcn,
        args.image,
        classes=args.classes,
        top=args.top,
        normalize=_normalization(model, args.model),
        tile=args.tile,
        progress=True,
    )
    render_heatmap(result, path)
    geo = result.geometry
    h, w = result.cells.shape[1:]
    print(
        f"{args.model}: {h}x{w} cells of stride {geo.stride[0]} over a {result.image_size[0]}x"
        f"{result.image_size[1]} image (each cell sees {geo.receptive_field[0]}x{geo.receptive_field[1]} pixels)"
    )
    for k, (index, name) in enumerate(zip(result.classes, result.names)):
        peak, (y, x) = result.peak(k)
        print(f"  {index:>4} {name}: peak probability {peak:.3f} at (y={y:.0f}, x={x:.0f})")
    print(f"wrote {path}")
    return 0
