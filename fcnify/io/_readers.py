"""``fcnify.open_image``: one function that opens slides, scenes, arrays and photos lazily.

Which library reads a file is decided by its content (magic bytes, a Zarr folder) and then its
extension:

=================  ==========================================  =====================
reader             files                                        extra
=================  ==========================================  =====================
``tifffile``       tiled / pyramidal TIFF, OME-TIFF, Aperio SVS  ``fcnify[wsi]``
``openslide``      NDPI, MRXS, SCN, VMS, BIF (and SVS, TIFF)     ``fcnify[wsi]``
``rasterio``       GeoTIFF (a TIFF with GeoKeys), JP2, VRT, ...  ``fcnify[geo]``
``zarr``           Zarr arrays and OME-Zarr multiscales          ``fcnify[wsi]``
``numpy``          ``.npy`` (memory-mapped), arrays, tensors     -
``pillow``         PNG, JPEG, BMP, GIF, WebP                     ``fcnify[viz]``
=================  ==========================================  =====================

Arrays: numpy arrays are taken as ``(H, W, C)`` and torch tensors as ``(C, H, W)``, unless
that reading gives more than 4 channels and the other one does not; ``.layout`` says which.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from .._errors import FcnifyError, first_line
from ._image import LazyImage, Level

__all__ = ["READERS", "open_image"]

log = logging.getLogger("fcnify")

READERS = ("tifffile", "openslide", "rasterio", "zarr", "numpy", "pillow")
_SLIDE_EXTENSIONS = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
_RASTER_EXTENSIONS = (".jp2", ".vrt", ".img", ".nc", ".hdf", ".ecw", ".dem", ".asc")
_PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm")
_GEO_TAGS = (33550, 33922, 34264, 34735)  # ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory


def open_image(source: Any, level: int = 0, mpp: float | None = None, reader: str | None = None) -> LazyImage:
    """Open an image lazily: only the windows asked for are read.

    Args:
        source: a file path (slide, TIFF, GeoTIFF, ``.npy``, PNG, ...), a Zarr folder or array,
            a numpy array or memmap (``(H, W, C)``), or a torch tensor (``(C, H, W)``).
        level: the pyramid level (0: full resolution).
        mpp: instead of ``level``, the microns per pixel wanted: the level closest to it is read
            (and a log line says which).
        reader: force a reader (one of ``tifffile``, ``openslide``, ``rasterio``, ``zarr``,
            ``numpy``, ``pillow``); default: chosen from the content and the extension.

    Returns:
        A :class:`~fcnify.io.LazyImage` with ``shape`` (H, W, C), ``read(y0, x0, h, w)``,
        ``level``, ``downsample``, ``mpp``, ``levels``, ``crs``, ``transform`` and ``close()``.

    Raises:
        FcnifyError: missing or unreadable file, no reader for it (or its extra is not
            installed), or a level the file does not have.

    Example:
        >>> import numpy as np, fcnify
        >>> image = fcnify.open_image(np.zeros((300, 400, 3), np.uint8))
        >>> image.shape, image.read(10, 20, 2, 3).shape, image.layout
        ((300, 400, 3), (2, 3, 3), 'HWC')
    """
    if isinstance(source, LazyImage):
        if level != source.level or mpp is not None:
            raise FcnifyError(
                f"{source!r} is already open at level {source.level}. Hint: pass the path to open another level."
            )
        return source
    if reader is not None and reader not in READERS:
        raise FcnifyError(f"unknown reader '{reader}'. Hint: one of {', '.join(READERS)}.")
    if not isinstance(source, (str, os.PathLike)):
        return _open_object(source, level, mpp)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FcnifyError(f"image file not found: {path}. Hint: check the path.")
    reader = reader or _choose(path)
    opener = {
        "tifffile": _open_tifffile,
        "openslide": _open_openslide,
        "rasterio": _open_rasterio,
        "zarr": _open_zarr,
        "numpy": _open_npy,
        "pillow": _open_pillow,
    }[reader]
    try:
        return opener(path, level, mpp)
    except FcnifyError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:
        raise FcnifyError(
            f"cannot read {path} with {reader}: {type(err).__name__}: {first_line(err)}. "
            "Hint: check that the file is complete; force another reader with reader=... (--reader)."
        ) from err


def _choose(path: str) -> str:
    """The reader for a file, from its first bytes and then its extension."""
    lower = path.lower()
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in ("zarr.json", ".zarray", ".zgroup")):
            return "zarr"
        if lower.endswith(".mrxs"):
            return "openslide"
        raise FcnifyError(
            f"{path} is a folder, not a Zarr store (no zarr.json, .zarray or .zgroup). "
            "Hint: pass an image file, or a Zarr array or OME-Zarr folder."
        )
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if lower.endswith(_SLIDE_EXTENSIONS):
        return "openslide"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        if _is_geotiff(path) and _has("rasterio"):
            return "rasterio"
        if _has("tifffile"):
            return "tifffile"
        if _has("openslide"):
            return "openslide"
        raise _missing("tifffile", "wsi", path)
    if head.startswith((b"\x89PNG", b"\xff\xd8", b"BM", b"GIF8", b"P5", b"P6")) or (
        head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    ):
        return "pillow"
    if lower.endswith(_RASTER_EXTENSIONS) or head.startswith(b"\x00\x00\x00\x0cjP"):
        return "rasterio"
    if lower.endswith(_PILLOW_EXTENSIONS):
        return "pillow"
    if _has("openslide"):
        return "openslide"
    raise FcnifyError(
        f"no reader for {path}: not a TIFF, slide, raster, Zarr store, .npy or image file fcnify knows. "
        "Hint: convert it to a tiled TIFF or .npy, or install fcnify[wsi] / fcnify[geo] and force reader=..."
    )


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _missing(module: str, extra: str, path: str) -> FcnifyError:
    return FcnifyError(f"reading {path} needs {module}, which is not installed. Hint: pip install 'fcnify[{extra}]'.")


def _import(module: str, extra: str, path: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise _missing(module, extra, path) from err


def _is_geotiff(path: str) -> bool:
    if not _has("tifffile"):
        return True  # cannot look inside: a TIFF with rasterio installed goes to rasterio
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            return any(code in tags for code in _GEO_TAGS)
    except Exception:
        return False


# -- arrays -----------------------------------------------------------------------------------


def _as_hwc(array: Any, prefer: str) -> tuple[Any, str]:
    """``(H, W, C)`` view of a 2-D or 3-D array: ``prefer`` (``HWC`` or ``CHW``) unless that gives
    more than 4 channels and the other reading does not."""
    if array.ndim == 2:
        return array[:, :, None], "HW"
    if array.ndim != 3:
        raise FcnifyError(
            f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {tuple(array.shape)}. "
            "Hint: pass one image (drop the batch axis)."
        )
    layout = prefer
    if prefer == "HWC" and array.shape[2] > 4 and array.shape[0] <= 4:
        layout = "CHW"
    elif prefer == "CHW" and array.shape[0] > 4 and array.shape[2] <= 4:
        layout = "HWC"
    if layout == "CHW":
        return _Transposed(array), layout
    return array, layout


class _Transposed:
    """A (C, H, W) array seen as (H, W, C) without copying it."""

    def __init__(self, array: Any):
        self.array = array
        self.shape = (array.shape[1], array.shape[2], array.shape[0])
        self.dtype = array.dtype
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.moveaxis(np.asarray(self.array[:, key[0], key[1]]), 0, -1)


def _array_level(array: Any, downsample: float = 1.0) -> Level:
    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        window = np.array(array[y0 : y0 + h, x0 : x0 + w], copy=True)
        base = array.array if isinstance(array, _Transposed) else array
        _release(base)
        return window

    return Level(
        shape=tuple(int(s) for s in array.shape), dtype=np.dtype(array.dtype), read=read, downsample=downsample
    )


def _release(array: Any) -> None:
    """Let the kernel drop the pages of a memory-mapped image already read (they are re-read if
    needed), so that resident memory does not grow with the image."""
    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            handle.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - best effort
            pass


def _open_object(source: Any, level: int, mpp: float | None) -> LazyImage:
    try:
        import torch

        if isinstance(source, torch.Tensor):
            tensor = source.detach().cpu()
            if tensor.dim() == 4 and tensor.shape[0] == 1:
                tensor = tensor[0]
            array, layout = _as_hwc(tensor.numpy(), "CHW")
            return LazyImage([_array_level(array)], reader="numpy", level=level, mpp=mpp, layout=layout)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(source, np.ndarray):
        array, layout = _as_hwc(source, "HWC")
        return LazyImage([_array_level(array)], reader="numpy", level=level, mpp=mpp, layout=layout)
    if type(source).__module__.startswith("zarr"):
        return _zarr_image(source, None, level, mpp)
    raise FcnifyError(
        f"cannot read an image from a {type(source).__name__}. Hint: pass a file path, a numpy array (H, W, C), "
        "a torch tensor (C, H, W) or a Zarr array."
    )


def _open_npy(path: str, level: int, mpp: float | None) -> LazyImage:
    array, layout = _as_hwc(np.load(path, mmap_mode="r"), "HWC")
    return LazyImage([_array_level(array)], reader="numpy", path=path, level=level, mpp=mpp, layout=layout)


# -- tifffile ---------------------------------------------------------------------------------


def _open_tifffile(path: str, level: int, mpp: float | None) -> LazyImage:
    tifffile = _import("tifffile", "wsi", path)
    zarr = _import("zarr", "wsi", path)
    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        levels = []
        base_h = None
        for k, lv in enumerate(series.levels):
            array = zarr.open(series.aszarr(level=k), mode="r")
            hwc = _axes_to_hwc(array, lv.axes, path)
            h = hwc.shape[0]
            base_h = base_h or h
            levels.append(_array_level(hwc, downsample=base_h / h))
        base_mpp = _tiff_mpp(tif)
    except BaseException:
        tif.close()
        raise
    return LazyImage(levels, reader="tifffile", path=path, level=level, mpp=mpp, base_mpp=base_mpp, close=tif.close)


class _Indexed:
    """An N-D array seen as (H, W, C): other axes at their first plane, channels last."""

    def __init__(self, array: Any, axes: str, channel: str | None):
        self.array, self.axes, self.channel = array, axes, channel
        kept = [a for a in axes if a in "YX" or a == channel]
        self.order = [kept.index("Y"), kept.index("X")] + ([kept.index(channel)] if channel else [])
        c = array.shape[axes.index(channel)] if channel else 1
        self.shape = (array.shape[axes.index("Y")], array.shape[axes.index("X")], c)
        self.dtype = array.dtype
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        index = tuple(
            key[0] if a == "Y" else key[1] if a == "X" else slice(None) if a == self.channel else 0 for a in self.axes
        )
        window = np.transpose(np.asarray(self.array[index]), self.order)
        return window if self.channel else window[:, :, None]


def _axes_to_hwc(array: Any, axes: str, where: str) -> Any:
    """An array with named axes (tifffile ``YXS`` / ``CYX``, OME-Zarr ``tczyx``) as (H, W, C)."""
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes or len(axes) != array.ndim:
        raise FcnifyError(
            f"{where}: cannot find the image plane in axes '{axes}' of shape {tuple(array.shape)}. "
            "Hint: pass a 2-D image with optional channels."
        )
    if axes in ("YXS", "YXC"):
        return array
    channel = "S" if "S" in axes else "C" if "C" in axes else None
    return _Indexed(array, axes, channel)


def _tiff_mpp(tif: Any) -> float | None:
    """Microns per pixel of level 0: OME PhysicalSizeX, Aperio ``MPP =``, or the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(e for e in root.iter() if e.tag.endswith("Pixels"))
            size = pixels.get("PhysicalSizeX")
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if size:
                scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit, 1.0)
                return float(size) * scale
        except (ET.ParseError, StopIteration, ValueError):
            pass
    page = tif.pages.first
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den and unit in (2, 3):
            per_unit = num / den  # pixels per inch (2) or per centimetre (3)
            microns = 25400.0 if unit == 2 else 10000.0
            value = microns / per_unit
            if unit == 2 and abs(per_unit - 72) < 1e-6:
                return None  # 72 dpi is a default, not a measurement
            return value
    return None


# -- OpenSlide --------------------------------------------------------------------------------


def _open_openslide(path: str, level: int, mpp: float | None) -> LazyImage:
    openslide = _import("openslide", "wsi", path)
    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideError as err:
        raise FcnifyError(
            f"OpenSlide cannot read {path}: {first_line(err)}. Hint: check the file; for a TIFF try reader='tifffile'."
        ) from err
    levels = []
    for k, ((w, h), down) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):

        def read(y0: int, x0: int, hh: int, ww: int, k: int = k, down: float = down) -> np.ndarray:
            region = slide.read_region((int(round(x0 * down)), int(round(y0 * down))), k, (ww, hh))
            return np.asarray(region.convert("RGB"))

        levels.append(Level(shape=(h, w, 3), dtype=np.dtype(np.uint8), read=read, downsample=float(down)))
    value = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
    base_mpp = float(value) if value else None
    return LazyImage(levels, reader="openslide", path=path, level=level, mpp=mpp, base_mpp=base_mpp, close=slide.close)


# -- rasterio ---------------------------------------------------------------------------------


def _open_rasterio(path: str, level: int, mpp: float | None) -> LazyImage:
    rasterio = _import("rasterio", "geo", path)
    from rasterio.windows import Window

    base = rasterio.open(path)
    datasets = [base]
    try:
        for k in range(len(base.overviews(1))):
            datasets.append(rasterio.open(path, overview_level=k))
    except Exception:
        for ds in datasets:
            ds.close()
        raise
    levels = []
    for ds in datasets:

        def read(y0: int, x0: int, h: int, w: int, ds: Any = ds) -> np.ndarray:
            return np.moveaxis(ds.read(window=Window(x0, y0, w, h)), 0, -1)

        levels.append(
            Level(
                shape=(ds.height, ds.width, ds.count),
                dtype=np.dtype(ds.dtypes[0]),
                read=read,
                downsample=base.height / ds.height,
            )
        )
    crs = base.crs.to_wkt() if base.crs else None
    transform = tuple(base.transform.to_gdal()) if base.crs or not base.transform.is_identity else None

    def close() -> None:
        for ds in datasets:
            ds.close()

    return LazyImage(
        levels, reader="rasterio", path=path, level=level, mpp=mpp, crs=crs, transform=transform, close=close
    )


# -- Zarr -------------------------------------------------------------------------------------


def _open_zarr(path: str, level: int, mpp: float | None) -> LazyImage:
    zarr = _import("zarr", "wsi", path)
    return _zarr_image(zarr.open(path, mode="r"), path, level, mpp)


def _zarr_image(node: Any, path: str | None, level: int, mpp: float | None) -> LazyImage:
    where = path or "this Zarr array"
    if hasattr(node, "shape"):  # a plain array
        array, layout = _as_hwc(node, "HWC")
        return LazyImage([_array_level(array)], reader="zarr", path=path, level=level, mpp=mpp, layout=layout)
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        names = [name for name, _ in node.arrays()]
        raise FcnifyError(
            f"{where} is a Zarr group without OME multiscales metadata. Hint: pass one of its arrays "
            f"({', '.join(names[:5]) or 'none found'}) as PATH/NAME."
        )
    scale = multiscales[0]
    axes = "".join((a["name"] if isinstance(a, dict) else a) for a in scale.get("axes", [])) or "yx"
    levels = []
    base_h = None
    base_mpp = None
    for k, dataset in enumerate(scale["datasets"]):
        array = node[dataset["path"]]
        hwc = _axes_to_hwc(array, axes[-array.ndim :], where)
        base_h = base_h or hwc.shape[0]
        levels.append(_array_level(hwc, downsample=base_h / hwc.shape[0]))
        if k == 0:
            base_mpp = _ome_zarr_mpp(scale, dataset, axes)
    return LazyImage(levels, reader="zarr", path=path, level=level, mpp=mpp, base_mpp=base_mpp)


def _ome_zarr_mpp(scale: dict, dataset: dict, axes: str) -> float | None:
    units = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
    axis = next((a for a in scale.get("axes", []) if isinstance(a, dict) and a.get("name") == "x"), None)
    unit = units.get((axis or {}).get("unit", ""), None)
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale" and unit is not None:
            return float(transform["scale"][axes.index("x")]) * unit
    return None


# -- Pillow -----------------------------------------------------------------------------------


def _open_pillow(path: str, level: int, mpp: float | None) -> LazyImage:
    PIL = _import("PIL", "viz", path)
    from PIL import Image, ImageOps

    del PIL
    try:
        with Image.open(path) as img:  # Image.MAX_IMAGE_PIXELS stays on: it guards against decompression bombs
            img = ImageOps.exif_transpose(img)
            array = _pillow_array(img)
    except Image.DecompressionBombError as err:
        raise FcnifyError(
            f"{path} is larger than Pillow's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS} pixels), and Pillow "
            "would decode it whole. Hint: convert it to a tiled TIFF (e.g. vips tiffsave --tile --pyramid) or a "
            ".npy, which fcnify reads window by window."
        ) from err
    array, layout = _as_hwc(array, "HWC")
    return LazyImage([_array_level(array)], reader="pillow", path=path, level=level, mpp=mpp, layout=layout)


def _pillow_array(img: Any) -> np.ndarray:
    """Pixels in their own depth: 16-bit greyscale stays uint16, palettes and alpha become RGB / L."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        array = np.asarray(img)
        if array.min() >= 0 and array.max() <= 65535:
            return array.astype(np.uint16)
        return array.astype(np.float32) / float(max(1, array.max()))
    if mode == "F":
        return np.asarray(img, dtype=np.float32)
    if mode in ("L", "RGB"):
        return np.asarray(img)
    if mode in ("1", "LA"):
        return np.asarray(img.convert("L"))
    return np.asarray(img.convert("RGB"))
