"""Class maps from a ``fcnify.predict`` Zarr store to the files viewers and GIS open.

The store holds an array ``scores`` ``(K, h, w)`` (NaN where a cell was skipped) and, under the
group attribute ``"fcnify"``, where the cells sit on the level-0 image: cell ``(i, j)`` is centred
on level-0 pixel ``(oy + i * sy, ox + j * sx)`` (pixel centres at integer coordinates, as in
:class:`fcnify.Geometry`), and optionally the level-0 pixel -> CRS affine and the CRS.

Every writer reads the store window by window (never the whole array), writes to a temporary file
next to the output and renames it on success, refuses to overwrite an existing file unless
``force=True``, and never writes to the store.

- :func:`write_tiff`: a tiled, pyramidal TIFF (OME-TIFF with SubIFDs by default: QuPath, napari,
  tifffile, Bio-Formats; or ``layout="generic"``: levels as top-level pages, what OpenSlide reads).
- :func:`write_geotiff`: a GeoTIFF through rasterio, georeferenced cell for cell.
- :func:`write_geojson`: polygons of the cells above a threshold, per class, as QuPath imports them.
- :func:`write_output`: picks one of the above from the file name.

Coordinates written by the TIFF resolution tags, the GeoTIFF and the GeoJSON use the corner
convention of GDAL and QuPath (level-0 pixel ``(y, x)`` covers ``[x, x + 1] x [y, y + 1]``), so
cell ``(i, j)`` covers ``x`` in ``ox + 0.5 + (j -+ 1/2) * sx`` and likewise in ``y``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .._errors import FcnifyError

__all__ = ["OutputError", "write_output", "write_tiff", "write_geotiff", "write_geojson", "FORMATS"]

PathLike = Union[str, "os.PathLike[str]"]
Window = Tuple[int, int, int, int]  # y0, y1, x0, x1 in cells

TILE = 256  # TIFF / GeoTIFF tile edge, and the window read from the store at a time
FORMATS = ("zarr", "tiff", "geotiff", "geojson")
_ALIASES = {
    "zarr": "zarr",
    "tiff": "tiff",
    "tif": "tiff",
    "ome-tiff": "tiff",
    "ome.tiff": "tiff",
    "geotiff": "geotiff",
    "gtiff": "geotiff",
    "geojson": "geojson",
    "json": "geojson",
}
_EXTENSIONS = {".zarr": "zarr", ".tif": "tiff", ".tiff": "tiff", ".geojson": "geojson", ".json": "geojson"}


class OutputError(FcnifyError):
    """A class map store cannot be read, or an output file cannot be written as asked."""


def _require(module: str, extra: Optional[str]) -> Any:
    """Import an optional dependency, or say which extra (or package) installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = f"'fcnify[{extra}]'" if extra else module
        raise OutputError(
            f"this output needs {module}, which is not installed ({err}). Hint: pip install {package}."
        ) from err


# -- the store ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ScoreMap:
    """The ``scores`` array of a store and what its ``"fcnify"`` attributes say about it."""

    scores: Any  # zarr.Array (K, h, w)
    where: str
    classes: List[str]
    stride: Tuple[float, float]
    offset: Tuple[float, float]
    mpp: Optional[float]
    crs: Optional[str]
    level0: Optional[Tuple[float, ...]]  # level-0 pixel -> CRS, rasterio order (a, b, c, d, e, f)
    attrs: Dict[str, Any]

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.scores.shape[1]), int(self.scores.shape[2])

    def cell_affine(self):
        """``affine.Affine``: cell-grid corner coordinates -> level-0 pixel corner coordinates."""
        from affine import Affine

        (sy, sx), (oy, ox) = self.stride, self.offset
        return Affine(sx, 0.0, ox + 0.5 - sx / 2, 0.0, sy, oy + 0.5 - sy / 2)

    def world_affine(self):
        """Cell-grid corners -> CRS coordinates (level-0 pixel corners when the store has no transform)."""
        from affine import Affine

        cell = self.cell_affine()
        return cell if self.level0 is None else Affine(*self.level0) @ cell


def _open(store: Any) -> _ScoreMap:
    """Read-only view of a store written by ``fcnify.predict`` (a path or a ``zarr.Group``)."""
    zarr = _require("zarr", None)

    where = os.fspath(store) if isinstance(store, (str, os.PathLike)) else repr(store)
    if isinstance(store, (str, os.PathLike)) and not os.path.isdir(store):
        raise OutputError(f"no Zarr store at {where}. Hint: pass the directory fcnify.predict wrote (OUT.zarr).")
    try:
        group = store if isinstance(store, zarr.Group) else zarr.open_group(store, mode="r")
        scores = group["scores"]
    except (KeyError, FileNotFoundError, ValueError, TypeError) as err:  # zarr's errors for a store of another kind
        raise OutputError(
            f"{where} is not a class map store ({type(err).__name__}: {err}). "
            "Hint: pass a store written by fcnify.predict (a Zarr group with an array 'scores')."
        ) from err
    attrs = dict(group.attrs.get("fcnify") or {})
    if scores.ndim != 3 or not attrs:
        raise OutputError(
            f"{where}: 'scores' has shape {tuple(scores.shape)} and the attributes "
            f"{'have no' if not attrs else 'have a'} 'fcnify' entry; fcnify writes (K, h, w) with one. "
            "Hint: pass a store written by fcnify.predict."
        )
    try:
        stride = tuple(float(v) for v in attrs["stride"])
        offset = tuple(float(v) for v in attrs["offset"])
    except (KeyError, TypeError, ValueError) as err:
        raise OutputError(
            f"{where}: the 'fcnify' attributes have no valid stride and offset ({err!r}). "
            "Hint: pass a store written by fcnify.predict."
        ) from err
    k = int(scores.shape[0])
    classes = [str(c) for c in (attrs.get("classes") or range(k))]
    if len(classes) != k:
        raise OutputError(
            f"{where}: {len(classes)} class names for {k} score planes. "
            "Hint: the store's 'classes' attribute must name every plane of 'scores'."
        )
    level0 = None
    if attrs.get("affine") is not None:
        level0 = tuple(float(v) for v in attrs["affine"])[:6]
    elif attrs.get("transform") is not None:  # GDAL order c, a, b, f, d, e
        c, a, b, f, d, e = (float(v) for v in attrs["transform"])
        level0 = (a, b, c, d, e, f)
    mpp = attrs.get("mpp")
    return _ScoreMap(
        scores=scores,
        where=where,
        classes=classes,
        stride=stride,
        offset=offset,  # type: ignore[arg-type]
        mpp=float(mpp) if mpp else None,
        crs=attrs.get("crs") or None,
        level0=level0,
        attrs=attrs,
    )


def _select(smap: _ScoreMap, classes: Any) -> List[int]:
    """Indices into the score planes of ``classes`` (names or indices; one or a list; None: all)."""
    if classes is None:
        return list(range(len(smap.classes)))
    chosen = [classes] if isinstance(classes, (str, int, np.integer)) else list(classes)
    if not chosen:
        raise OutputError("classes=[] selects nothing. Hint: pass None for every class, or names or indices.")
    indices = []
    for c in chosen:
        if isinstance(c, str) and c in smap.classes:
            indices.append(smap.classes.index(c))
        elif isinstance(c, (int, np.integer)) and -len(smap.classes) <= int(c) < len(smap.classes):
            indices.append(int(c) % len(smap.classes))
        else:
            shown = ", ".join(smap.classes[:10]) + (", ..." if len(smap.classes) > 10 else "")
            raise OutputError(
                f"class {c!r} is not in {smap.where} ({len(smap.classes)} classes: {shown}). "
                "Hint: pass class names or indices from the store's 'classes'."
            )
    return indices


def _windows(shape: Tuple[int, int], tile: int = TILE) -> Iterator[Window]:
    h, w = shape
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            yield y0, min(y0 + tile, h), x0, min(x0 + tile, w)


# -- what is written: score planes or label planes ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Planes:
    """What a raster output holds: ``read(window) -> (P, hh, ww)``, its dtype, names and fill."""

    read: Callable[[Window], np.ndarray]
    count: int
    shape: Tuple[int, int]
    dtype: np.dtype
    names: List[str]
    fill: Union[float, int]  # NaN for scores, the dtype's maximum for labels

    @property
    def labels(self) -> bool:
        return self.dtype.kind == "u"


def _planes(smap: _ScoreMap, classes: Any, top: Optional[int]) -> _Planes:
    """The chosen classes' scores (float32), or with ``top=k`` the indices of the ``k`` best classes."""
    chosen = _select(smap, classes)
    everything = chosen == list(range(len(smap.classes)))

    def scores(window: Window) -> np.ndarray:
        y0, y1, x0, x1 = window
        if everything:
            block = smap.scores[:, y0:y1, x0:x1]
        else:
            block = smap.scores.get_orthogonal_selection((chosen, slice(y0, y1), slice(x0, x1)))
        return np.asarray(block, dtype=np.float32)

    if top is None:
        return _Planes(scores, len(chosen), smap.shape, np.dtype(np.float32), [smap.classes[k] for k in chosen], np.nan)
    if not 1 <= int(top) <= len(chosen):
        raise OutputError(
            f"top={top} with {len(chosen)} classes. Hint: top counts the best classes per cell, "
            f"1 (the argmax label map) to {len(chosen)}."
        )
    top = int(top)
    dtype: np.dtype = np.dtype(np.uint8 if len(smap.classes) < 255 else np.uint16)
    fill = 255 if dtype == np.uint8 else 65535
    lookup = np.asarray(chosen, dtype=dtype)

    def labels(window: Window) -> np.ndarray:
        block = scores(window)
        empty = np.isnan(block).all(axis=0)
        ranked = np.nan_to_num(block, nan=-np.inf)
        if top == 1:
            order = ranked.argmax(axis=0)[None]
        else:
            order = np.argsort(-ranked, axis=0, kind="stable")[:top]
        out = lookup[order]
        out[:, empty] = fill
        return out

    names = ["label"] if top == 1 else [f"top{r + 1}" for r in range(top)]
    return _Planes(labels, top, smap.shape, dtype, names, fill)


def _halve(block: np.ndarray, labels: bool) -> np.ndarray:
    """2x2 downsampling of ``(P, hh, ww)``: the NaN-ignoring mean of scores, the top-left label."""
    if labels:
        return block[:, ::2, ::2]
    p, hh, ww = block.shape
    padded = np.full((p, hh + hh % 2, ww + ww % 2), np.nan, dtype=block.dtype)
    padded[:, :hh, :ww] = block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN 2x2 blocks stay NaN
        return np.nanmean(padded.reshape(p, (hh + 1) // 2, 2, (ww + 1) // 2, 2), axis=(2, 4)).astype(block.dtype)


def _pyramid(planes: _Planes, scratch: str, smallest: int = TILE) -> List[_Planes]:
    """``planes`` and its 2x reductions until one tile holds a level, each level built tile by tile
    from the one before into a scratch Zarr array (the store itself is never written)."""
    import zarr

    levels = [planes]
    while max(levels[-1].shape) > smallest:
        prev = levels[-1]
        shape = ((prev.shape[0] + 1) // 2, (prev.shape[1] + 1) // 2)
        array = zarr.create_array(
            os.path.join(scratch, f"level{len(levels)}.zarr"),
            shape=(prev.count, *shape),
            chunks=(prev.count, TILE, TILE),
            dtype=prev.dtype,
            fill_value=prev.fill,
        )
        for y0, y1, x0, x1 in _windows(shape):
            array[:, y0:y1, x0:x1] = _halve(prev.read((2 * y0, 2 * y1, 2 * x0, 2 * x1)), prev.labels)

        def read(window: Window, array: Any = array) -> np.ndarray:
            y0, y1, x0, x1 = window
            return np.asarray(array[:, y0 : min(y1, array.shape[1]), x0 : min(x1, array.shape[2])])

        levels.append(dataclasses.replace(prev, read=read, shape=shape))
    return levels


# -- safe output files --------------------------------------------------------------------------


def _same_or_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def _replacing(path: PathLike, force: bool, smap: _ScoreMap) -> Iterator[str]:
    """A temporary file name next to ``path``; renamed to ``path`` only when the block succeeds."""
    path = os.fspath(path)
    if os.path.isdir(smap.where) and _same_or_inside(path, smap.where):
        raise OutputError(f"{path} is the store or inside it. Hint: write the output next to the store, not into it.")
    if os.path.isdir(path):
        raise OutputError(f"{path} is a directory. Hint: give a file name, such as {os.path.join(path, 'map.tif')}.")
    if os.path.exists(path) and not force:
        raise OutputError(f"{path} exists. Hint: pass force=True (--force) to replace it, or choose another name.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"the folder of {path} does not exist. Hint: create {folder} first.")
    base, ext = os.path.basename(path), os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- TIFF ---------------------------------------------------------------------------------------


def write_tiff(
    store: Any,
    path: PathLike,
    *,
    classes: Any = None,
    top: Optional[int] = None,
    pyramid: bool = True,
    layout: str = "ome",
    compression: str = "zlib",
    force: bool = False,
) -> str:
    """Write a store's class map as a tiled, pyramidal TIFF, tile by tile.

    Args:
        store: the Zarr store ``fcnify.predict`` wrote (a path or an open ``zarr.Group``).
        path: the TIFF to write (``.ome.tif`` is customary for the default layout).
        classes: class names or indices to write (default: every class), one plane each.
        top: instead of scores, the indices of the ``top`` best classes per cell (of ``classes``),
            as ``uint8`` (``uint16`` beyond 254 classes); ``top=1`` is the argmax label map. Cells
            the store skipped (NaN) get the dtype's maximum (255 or 65535).
        pyramid: add 2x reductions down to one 256-cell tile: the mean of the scores (NaN ignored),
            the top-left cell of labels.
        layout: ``"ome"``: OME-TIFF, reductions as SubIFDs (QuPath and Bio-Formats, napari,
            tifffile; OpenSlide opens its full-resolution level only). ``"generic"``: reductions as
            top-level pages, the generic tiled TIFF OpenSlide reads as a pyramid (one plane only;
            OpenSlide reads 8-bit samples, so a label map or one class of ``top``).
        compression: a tifffile compression name (``"zlib"``, ``"zstd"``, ``"lzw"``, ``None``).
        force: replace ``path`` if it exists.

    Returns:
        ``path``. The resolution tags give the cell size, stride x mpp, when the store knows the mpp.

    Raises:
        OutputError: the store is not a class map, a class is unknown, ``path`` exists (without
            ``force``), or the layout cannot hold the planes.

    Example:
        >>> fcnify.write_tiff("slide.zarr", "slide.ome.tif", top=1)  # doctest: +SKIP
    """
    tifffile = _require("tifffile", "tiff")
    if layout not in ("ome", "generic"):
        raise OutputError(f"layout={layout!r}. Hint: 'ome' (SubIFDs; QuPath) or 'generic' (pages; OpenSlide).")
    smap = _open(store)
    planes = _planes(smap, classes, top)
    if layout == "generic" and planes.count > 1:
        raise OutputError(
            f"layout='generic' holds one plane; {planes.count} asked ({', '.join(planes.names[:5])}). "
            "Hint: choose one class (classes='name'), top=1, or layout='ome'."
        )
    with (
        _replacing(path, force, smap) as tmp,
        tempfile.TemporaryDirectory(prefix=".fcnify-pyramid-", dir=os.path.dirname(tmp)) as scratch,
    ):
        levels = _pyramid(planes, scratch) if pyramid else [planes]
        size = None if smap.mpp is None else (smap.stride[0] * smap.mpp, smap.stride[1] * smap.mpp)  # um per cell
        ome = layout == "ome"
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=ome) as tif:
            for n, level in enumerate(levels):
                options: Dict[str, Any] = dict(
                    shape=(level.count, *level.shape) if level.count > 1 else level.shape,
                    dtype=level.dtype,
                    tile=(TILE, TILE),
                    photometric="minisblack",
                    compression=compression,
                    subfiletype=1 if n else 0,
                    software="fcnify",
                )
                if size is not None:  # pixels per centimetre, X then Y
                    options.update(
                        resolution=(1e4 / (size[1] * 2**n), 1e4 / (size[0] * 2**n)), resolutionunit="CENTIMETER"
                    )
                if n == 0:
                    options["metadata"] = _tiff_metadata(smap, level, size) if ome else None
                    if ome and len(levels) > 1:
                        options["subifds"] = len(levels) - 1
                    if not ome:
                        options["description"] = json.dumps({"fcnify": {**_summary(smap), "planes": level.names}})
                tif.write(_tiles(level), **options)
    return os.fspath(path)


def _tiles(level: _Planes) -> Iterator[np.ndarray]:
    """Tiles in the order TIFF stores them: plane by plane, rows of tiles, left to right."""
    for p in range(level.count):
        for window in _windows(level.shape):
            yield np.ascontiguousarray(level.read(window)[p])


def _summary(smap: _ScoreMap) -> Dict[str, Any]:
    keys = ("version", "model", "stride", "offset", "receptive_field", "level", "downsample", "mpp", "image")
    return {k: smap.attrs[k] for k in keys if k in smap.attrs}


def _tiff_metadata(smap: _ScoreMap, level: _Planes, size: Optional[Tuple[float, float]]) -> Dict[str, Any]:
    meta: Dict[str, Any] = {
        "axes": "CYX" if level.count > 1 else "YX",
        "Channel": {"Name": level.names},
        "Description": json.dumps({"fcnify": _summary(smap)}),
    }
    if size is not None:
        meta.update(PhysicalSizeY=size[0], PhysicalSizeYUnit="µm", PhysicalSizeX=size[1], PhysicalSizeXUnit="µm")
    return meta


# -- GeoTIFF ------------------------------------------------------------------------------------


def write_geotiff(
    store: Any,
    path: PathLike,
    *,
    classes: Any = None,
    top: Optional[int] = None,
    overviews: bool = True,
    force: bool = False,
) -> str:
    """Write a store's class map as a GeoTIFF that lies on the scene it was computed from.

    The GeoTIFF's pixel is the map's cell: its pixel -> CRS affine is the scene's level-0 affine
    composed with the cell grid (scale by the stride, cell centres on the level-0 pixels the
    geometry gives, corners half a stride away), and the store's CRS is kept. A store with no
    transform gets level-0 pixel coordinates and no CRS (a CRS without a transform is dropped).

    Args:
        store: the Zarr store ``fcnify.predict`` wrote (a path or an open ``zarr.Group``).
        path: the GeoTIFF to write.
        classes: class names or indices to write (default: every class), one band each, named.
        top: instead of scores, the indices of the ``top`` best classes per cell (see
            :func:`write_tiff`); ``top=1`` is the argmax label map.
        overviews: add internal 2x, 4x, ... overviews (average of scores, nearest label).
        force: replace ``path`` if it exists.

    Returns:
        ``path``.

    Raises:
        OutputError: the store is not a class map, a class is unknown or ``path`` exists.

    Example:
        >>> fcnify.write_geotiff("scene.zarr", "scene_map.tif", classes=["water"])  # doctest: +SKIP
    """
    rasterio = _require("rasterio", "geo")
    from rasterio.enums import Resampling
    from rasterio.windows import Window as RioWindow

    smap = _open(store)
    planes = _planes(smap, classes, top)
    h, w = planes.shape
    profile = dict(
        driver="GTiff",
        width=w,
        height=h,
        count=planes.count,
        dtype=planes.dtype.name,
        transform=smap.world_affine(),
        crs=smap.crs if smap.level0 is not None else None,
        nodata=planes.fill,
        tiled=True,
        blockxsize=TILE,
        blockysize=TILE,
        compress="deflate",
        BIGTIFF="IF_SAFER",
    )
    if h < TILE or w < TILE:  # GDAL wants whole tiles inside the raster... or a strip layout
        profile.update(tiled=False, blockxsize=None, blockysize=None)
        profile = {k: v for k, v in profile.items() if v is not None}
    with _replacing(path, force, smap) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                for y0, y1, x0, x1 in _windows(planes.shape):
                    dst.write(planes.read((y0, y1, x0, x1)), window=RioWindow(x0, y0, x1 - x0, y1 - y0))
                for band, name in enumerate(planes.names, start=1):
                    dst.set_band_description(band, name)
                dst.update_tags(fcnify=json.dumps(_summary(smap)))
                factors = [2**n for n in range(1, 32) if max(h, w) / 2**n >= TILE / 2]
                if overviews and factors:
                    dst.build_overviews(factors, Resampling.nearest if planes.labels else Resampling.average)
    return os.fspath(path)


# -- GeoJSON ------------------------------------------------------------------------------------

# QuPath-style colours for classes 0, 1, 2, ... (cycled)
_COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
]


def write_geojson(
    store: Any,
    path: PathLike,
    *,
    classes: Any = None,
    threshold: float = 0.5,
    probabilities: bool = True,
    connectivity: int = 4,
    force: bool = False,
) -> str:
    """Write polygons of the cells above a threshold, per class, as a GeoJSON QuPath imports.

    Each connected region of cells whose score is above ``threshold`` becomes one Feature (a
    Polygon, with holes where cells below it are enclosed), with ``properties.objectType
    "annotation"`` and ``properties.classification.name`` the class name. Coordinates are level-0
    pixels in QuPath's convention (pixel ``(y, x)`` covers ``[x, x + 1] x [y, y + 1]``; a cell
    covers its stride around its centre), or CRS coordinates when the store has a transform
    (then the collection carries the CRS as a legacy ``"crs"`` member GDAL reads).

    Args:
        store: the Zarr store ``fcnify.predict`` wrote (a path or an open ``zarr.Group``).
        path: the GeoJSON file to write.
        classes: class names or indices to outline (default: every class).
        threshold: a cell is inside where its value is strictly above this.
        probabilities: threshold the softmax over all the store's classes (not only ``classes``);
            ``False`` thresholds the raw scores.
        connectivity: 4 (cells touching by an edge form one region) or 8 (corners too).
        force: replace ``path`` if it exists.

    Returns:
        ``path``.

    Raises:
        OutputError: the store is not a class map, a class is unknown or ``path`` exists.

    Example:
        >>> fcnify.write_geojson("slide.zarr", "tumour.geojson", classes=["tumour"], threshold=0.8)  # doctest: +SKIP
    """
    _require("rasterio", "geo")
    from rasterio.features import shapes

    if connectivity not in (4, 8):
        raise OutputError(f"connectivity={connectivity}. Hint: 4 (edges) or 8 (edges and corners).")
    smap = _open(store)
    chosen = _select(smap, classes)
    transform = smap.world_affine()
    with (
        _replacing(path, force, smap) as tmp,
        tempfile.TemporaryDirectory(prefix=".fcnify-masks-", dir=os.path.dirname(tmp)) as scratch,
    ):
        # masks of every chosen class, one byte a cell, on disk: the scores are read once, window by window
        masks = np.lib.format.open_memmap(
            os.path.join(scratch, "masks.npy"), mode="w+", dtype=np.uint8, shape=(len(chosen), *smap.shape)
        )
        for y0, y1, x0, x1 in _windows(smap.shape, 4 * TILE):
            block = np.asarray(smap.scores[:, y0:y1, x0:x1], dtype=np.float32)
            values = _softmax(block) if probabilities else block
            with np.errstate(invalid="ignore"):
                masks[:, y0:y1, x0:x1] = values[chosen] > threshold  # NaN compares False
        features = []
        for n, k in enumerate(chosen):
            name = smap.classes[k]
            colour = list(_COLOURS[k % len(_COLOURS)])
            for geometry, _ in shapes(
                masks[n], mask=masks[n].astype(bool), connectivity=connectivity, transform=transform
            ):
                features.append(
                    {
                        "type": "Feature",
                        "geometry": geometry,
                        "properties": {
                            "objectType": "annotation",
                            "classification": {"name": name, "color": colour},
                            "class_index": k,
                        },
                    }
                )
        del masks
        collection: Dict[str, Any] = {"type": "FeatureCollection", "features": features}
        crs = _crs_member(smap.crs) if smap.level0 is not None else None
        if crs is not None:
            collection["crs"] = crs
        with open(tmp, "w") as f:
            json.dump(collection, f)
    return os.fspath(path)


def _softmax(block: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 of ``(K, hh, ww)``; all-NaN cells stay NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        top = np.nanmax(block, axis=0, keepdims=True)
    e = np.exp(block - top)
    return e / e.sum(axis=0, keepdims=True)


def _crs_member(wkt: Optional[str]) -> Optional[Dict[str, Any]]:
    """The legacy GeoJSON ``crs`` member (``EPSG:n`` when the CRS has a code, else its WKT)."""
    if not wkt:
        return None
    from rasterio.crs import CRS

    crs = CRS.from_user_input(wkt)
    epsg = crs.to_epsg()
    return {"type": "name", "properties": {"name": f"EPSG:{epsg}" if epsg else crs.to_wkt()}}


# -- one entry ----------------------------------------------------------------------------------


def _format(path: PathLike, format: Optional[str]) -> str:
    if format is not None:
        name = _ALIASES.get(str(format).lower())
        if name is None:
            raise OutputError(f"unknown output format {format!r}. Hint: one of {', '.join(FORMATS)}.")
        return name
    text = os.fspath(path).rstrip("/\\").lower()
    for ext, name in _EXTENSIONS.items():
        if text.endswith(ext):
            return name
    raise OutputError(
        f"cannot tell the output format of {os.fspath(path)} from its extension. Hint: end it with "
        f"{', '.join(_EXTENSIONS)}, or pass format= one of {', '.join(FORMATS)} (geotiff is chosen by name)."
    )


def write_output(
    store: Any, path: PathLike, format: Optional[str] = None, *, force: bool = False, **options: Any
) -> str:
    """Write a store's class map in the format its name says: Zarr, TIFF, GeoTIFF or GeoJSON.

    Args:
        store: the Zarr store ``fcnify.predict`` wrote (a path or an open ``zarr.Group``).
        path: the output file. ``.tif``/``.tiff``: :func:`write_tiff`; ``.geojson``/``.json``:
            :func:`write_geojson`; ``.zarr``: the store is the output, nothing is written.
        format: ``"zarr"``, ``"tiff"``, ``"geotiff"`` (:func:`write_geotiff`) or ``"geojson"``,
            overriding the extension.
        force: replace ``path`` if it exists.
        **options: passed on to the writer (``classes``, ``top``, ``threshold``, ...).

    Returns:
        the path of the output (the store's own path for Zarr).

    Raises:
        OutputError: an unknown format, an existing ``path`` without ``force``, or the writer's errors.

    Example:
        >>> fcnify.write_output("slide.zarr", "slide.geojson", threshold=0.9)  # doctest: +SKIP
    """
    kind = _format(path, format)
    if kind == "zarr":
        where = os.fspath(store) if isinstance(store, (str, os.PathLike)) else None
        if where is None or os.path.realpath(where) != os.path.realpath(os.fspath(path)):
            raise OutputError(
                f"format zarr: the store {where or store!r} is already the Zarr output; "
                f"{os.fspath(path)} would be a copy. Hint: copy the directory, or ask for tiff, "
                "geotiff or geojson."
            )
        _open(store)
        return where
    writers: Dict[str, Callable[..., str]] = {"tiff": write_tiff, "geotiff": write_geotiff, "geojson": write_geojson}
    writer = writers[kind]
    try:
        return writer(store, path, force=force, **options)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise OutputError(f"format {kind}: {err}. Hint: see help(fcnify.write_{kind}) for its options.") from err
