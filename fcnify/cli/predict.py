"""``fcnify predict MODEL IMAGE -o OUT.zarr``: a class map of a slide or scene, on disk, exact and resumable.

fcnify predict resnet50 --weights tissue.pth slide.svs -o slide.zarr --mpp 0.5 --mask otsu
fcnify predict resnet50 --weights tissue.pth 'slides/*.svs' -o maps/ --resume
fcnify predict resnet50 scene.tif -o scene.zarr --memory 4GB --scheduler tcp://head:8786
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from .._errors import FcnifyError
from ._args import add_model_arguments, load_from_args, parse_size

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="run a classifier over a slide, scene or large image into a Zarr store, tile by tile, exactly",
        description="Convert a classifier and run it over a large image (pyramidal TIFF, SVS, NDPI, OME-TIFF, "
        "GeoTIFF, Zarr, .npy, PNG, ...) tile by tile: each cell equals the whole-image result. The scores are "
        "written to a Zarr store as tiles finish (read it back with zarr.open(OUT)['scores'] or "
        "dask.array.from_zarr(OUT, component='scores')); --resume finishes a killed run.",
    )
    add_model_arguments(p, modes=("window", "dense"))
    p.add_argument(
        "image",
        metavar="IMAGE",
        help="image file, Zarr folder or .npy; or a quoted glob ('slides/*.svs') with -o a folder: one store per image",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        required=True,
        help="the Zarr store to write (a folder, e.g. slide.zarr); a folder of stores for a glob",
    )
    p.add_argument("--output-stride", type=int, metavar="S", help="a finer map, e.g. 16 or 8 (default: native)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--level", type=int, default=0, metavar="N", help="pyramid level to read (default 0: full resolution)"
    )
    where.add_argument("--mpp", type=float, metavar="M", help="microns per pixel wanted: the closest level is read")
    p.add_argument(
        "--mask",
        metavar="otsu|FILE",
        help="skip background tiles: 'otsu' (tissue by Otsu's threshold) "
        "or a mask image/.npy at any resolution (non-zero: foreground)",
    )
    p.add_argument("--classes", metavar="A,B", help="classes to keep, by index or name, comma-separated (default: all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tile", type=parse_size, metavar="N", help="input tile size in pixels, overlap included")
    size.add_argument("--memory", metavar="2GB", help="memory budget: the largest tile that fits (default 2GB)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="tiles per model call (default 1)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="threads reading tiles ahead (default 1)")
    p.add_argument(
        "--scheduler",
        metavar="local:N|tcp://HOST:PORT",
        help="run on Dask: a local cluster of N processes, or an existing scheduler",
    )
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="scores dtype (default float32)")
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="feed pixels in [0, 1] as they are (default: the model's mean/std, else ImageNet's)",
    )
    p.add_argument(
        "--reader",
        choices=("tifffile", "openslide", "rasterio", "zarr", "numpy", "pillow"),
        help="force the image reader (default: from the file's content and extension)",
    )
    p.add_argument("--resume", action="store_true", help="finish a store a killed run left (same arguments)")
    p.add_argument("--force", action="store_true", help="overwrite an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--format",
        action="append",
        choices=("zarr", "tiff", "geotiff", "geojson"),
        help="also write the class map beside the store, in this format (repeat for several): tiff (a pyramidal "
        "OME-TIFF viewers open), geotiff (georeferenced on a scene read through rasterio), geojson (polygons of "
        "cells above 0.5 probability per class, as QuPath imports them); the store is always written",
    )
    return p


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    logger = logging.getLogger("fcnify")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fcnify: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _check(args: argparse.Namespace) -> None:
    """User mistakes that can be seen before the (slow) model conversion."""
    from ..inference import parse_memory

    is_glob = bool(re.search(r"[*?\[]", args.image)) and not os.path.exists(args.image)
    if is_glob and not glob.glob(args.image):
        raise FcnifyError(f"no file matches {args.image}. Hint: check the pattern.")
    if not is_glob and not os.path.exists(args.image):
        raise FcnifyError(f"image file not found: {args.image}. Hint: check the path.")
    if args.level < 0:
        raise FcnifyError(f"--level must be 0 or more, got {args.level}. Hint: --level 0 is full resolution.")
    if args.mpp is not None and args.mpp <= 0:
        raise FcnifyError(f"--mpp must be positive, got {args.mpp}. Hint: --mpp 0.5.")
    if args.memory is not None:
        parse_memory(args.memory)
    if args.batch_size < 1 or args.workers < 1:
        raise FcnifyError("--batch-size and --workers must be at least 1. Hint: leave them out.")
    if args.mask not in (None, "otsu") and not os.path.exists(args.mask):
        raise FcnifyError(f"mask file not found: {args.mask}. Hint: --mask otsu, or an existing mask file.")
    if not is_glob and os.path.exists(args.output) and not (args.force or args.resume):
        raise FcnifyError(f"{args.output} already exists. Hint: --force to overwrite it, --resume to finish it.")
    if not is_glob:  # readable, and the level or mpp exists: say so before the slow conversion
        from ..io import open_image

        logger = logging.getLogger("fcnify")
        level, logger.level = logger.level, logging.WARNING  # predict says which level it reads
        try:
            with open_image(args.image, level=args.level, mpp=args.mpp, reader=args.reader):
                pass
        finally:
            logger.setLevel(level)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise FcnifyError(f"cannot write {args.output}: folder {folder} does not exist. Hint: create it first.")


def run(args: argparse.Namespace) -> int:
    """Run ``fcnify predict``; a user mistake prints one line with a hint and returns 2."""
    try:
        with _log_to_stderr():
            return _run(args)
    except FcnifyError as err:
        print(f"fcnify: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "fcnify: interrupted; the tiles written are kept: run the same command with --resume to finish",
            file=sys.stderr,
        )
        return 130


def _run(args: argparse.Namespace) -> int:
    from ..conversion import convert
    from ..inference import predict
    from .heatmap import _normalization

    _check(args)
    model, input_size = load_from_args(args)
    fcn = convert(model, input_size=input_size, mode=args.mode, output_stride=args.output_stride)
    fcn.fcnify_name = args.model
    classes: list[str] | None = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    result = predict(
        fcn,
        args.image,
        args.output,
        level=args.level,
        mpp=args.mpp,
        mask=args.mask,
        tile=args.tile,
        memory=args.memory,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        client=args.scheduler,
        progress=not args.quiet,
        classes=classes,
        dtype=args.dtype,
        resume=args.resume,
        force=args.force,
        normalize=False if args.no_normalize else (_normalization(model, args.model) or None),
        reader=args.reader,
    )
    stores = result if isinstance(result, list) else [result]
    formats = [f for f in args.format or () if f != "zarr"]
    if formats:
        from ..io import write_output

        if isinstance(result, list):  # one store per image, named after it (see fcnify.predict)
            paths = sorted(glob.glob(args.image))
            roots = [
                os.path.join(args.output, os.path.splitext(os.path.basename(p.rstrip(os.sep)))[0] + ".zarr")
                for p in paths
            ]
        else:
            roots = [args.output]
        for root in roots:
            for fmt in formats:
                print(f"wrote {write_output(root, _beside(root, fmt), format=fmt, force=args.force)}")
    print(
        f"wrote {len(stores)} store(s): {args.output}; read with zarr.open({args.output!r})['scores']"
        if len(stores) > 1
        else f"wrote {args.output}: scores {tuple(stores[0].shape)}; read with zarr.open({args.output!r})['scores']"
    )
    return 0


def _beside(store: str, fmt: str) -> str:
    """The file a format is written to, beside the store: slide.zarr -> slide.tif, slide.geojson."""
    stem = os.path.splitext(os.path.normpath(store))[0]
    return stem + {"tiff": ".tif", "geotiff": ".geo.tif", "geojson": ".geojson"}[fmt]
