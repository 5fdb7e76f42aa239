"""A lazy image: one pyramid level of a file or array, read window by window as float32 HWC in [0, 1].

Every reader hands :class:`LazyImage` a list of levels, each an object with ``shape`` (H, W, C),
``dtype`` and ``read(y0, x0, h, w)`` returning the window in the file's own dtype. The image
scales by the dtype's range (uint8 / 255, uint16 / 65535, floats as they are) and keeps the
metadata every caller needs: level, downsample, microns per pixel, CRS and transform.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .._errors import FcnifyError

__all__ = ["LazyImage", "Level", "pick_level", "to_float"]

log = logging.getLogger("fcnify")


@dataclasses.dataclass
class Level:
    """One pyramid level as the reader sees it: its size and a function that reads a window."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    read: Callable[[int, int, int, int], np.ndarray]
    downsample: float = 1.0


def to_float(window: np.ndarray) -> np.ndarray:
    """``window`` as float32, scaled to [0, 1] by its integer dtype's range (floats as they are)."""
    dtype = window.dtype
    if dtype == np.bool_:
        return window.astype(np.float32)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if info.min < 0:
            return (window.astype(np.float32) - info.min) / float(info.max - info.min)
        return window.astype(np.float32) / float(info.max)
    return window.astype(np.float32, copy=False)


def pick_level(levels_mpp: Sequence[float | None], mpp: float, where: str) -> int:
    """The index of the level whose microns per pixel is closest to ``mpp`` (on a log scale)."""
    if mpp <= 0:
        raise FcnifyError(f"mpp must be positive, got {mpp}. Hint: pass microns per pixel, e.g. mpp=0.5.")
    if not levels_mpp or levels_mpp[0] is None:
        raise FcnifyError(
            f"{where} records no microns per pixel, so mpp={mpp} cannot pick a level. "
            "Hint: pass level=N instead (0 is full resolution)."
        )
    errors = [abs(np.log(m / mpp)) if m else np.inf for m in levels_mpp]
    return int(np.argmin(errors))


class LazyImage:
    """One level of an image, read window by window.

    Attributes:
        shape: ``(H, W, C)`` of this level.
        dtype: the stored dtype (windows are returned as float32).
        level: the pyramid level read (0 is full resolution).
        downsample: level-0 pixels per pixel of this level.
        mpp: microns per pixel of this level, or None when the file does not say.
        levels: ``(H, W)`` of every level, full resolution first.
        crs: the coordinate reference system as WKT (rasterio only), else None.
        transform: the level-0 affine transform in GDAL order
            ``(x0, dx, rx, y0, ry, dy)`` (rasterio only), else None.
        path: the file, or None for an array.
        reader: which library reads it (``tifffile``, ``openslide``, ``rasterio``, ``zarr``,
            ``numpy``, ``pillow``).
        layout: how an array's axes were read (``"HWC"`` or ``"CHW"``), for arrays and tensors.
    """

    def __init__(
        self,
        levels: list[Level],
        *,
        reader: str,
        path: str | None = None,
        level: int = 0,
        mpp: float | None = None,
        base_mpp: float | None = None,
        crs: str | None = None,
        transform: tuple[float, ...] | None = None,
        close: Callable[[], None] | None = None,
        layout: str = "HWC",
    ):
        self.path = path
        self.reader = reader
        self.crs = crs
        self.transform = transform
        self.layout = layout
        self._levels = levels
        self._close = close
        self.levels = [(lv.shape[0], lv.shape[1]) for lv in levels]
        self._base_mpp = base_mpp
        where = path or f"this {reader} array"
        level_mpps = [base_mpp * lv.downsample if base_mpp else None for lv in levels]
        if mpp is not None:
            level = pick_level(level_mpps, float(mpp), where)
            log.info(
                "mpp=%s: reading level %d of %s (%.4g microns per pixel, %dx%d)",
                mpp,
                level,
                where,
                level_mpps[level],
                *self.levels[level],
            )
        if not isinstance(level, (int, np.integer)) or not 0 <= level < len(levels):
            self.close()
            raise FcnifyError(
                f"{where} has {len(levels)} level(s) (0 to {len(levels) - 1}), no level {level}. "
                f"Hint: pass level between 0 and {len(levels) - 1}; their sizes are {self.levels}."
            )
        self.level = int(level)
        chosen = levels[self.level]
        self.shape = chosen.shape
        self.dtype = np.dtype(chosen.dtype)
        self.downsample = float(chosen.downsample)
        self.mpp = level_mpps[self.level]
        self._read = chosen.read
        self._check_values()

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The window ``[y0, y0 + h) x [x0, x0 + w)`` of this level as float32 ``(h, w, C)`` in [0, 1].

        Raises:
            FcnifyError: the window leaves the image.
        """
        H, W = self.shape[:2]
        if h < 0 or w < 0 or y0 < 0 or x0 < 0 or y0 + h > H or x0 + w > W:
            raise FcnifyError(
                f"window y={y0}, x={x0}, {h}x{w} is outside the {H}x{W} image {self.path or ''}. "
                "Hint: read inside the image."
            )
        window = np.asarray(self._read(int(y0), int(x0), int(h), int(w)))
        if window.ndim == 2:
            window = window[:, :, None]
        return to_float(window)

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The whole image from the smallest level that is still at least ``max_side`` wide
        (or the largest one if none is), subsampled to at most ``max_side``; and its downsample
        relative to level 0 (float32 HWC in [0, 1])."""
        index = 0
        for k, (h, w) in enumerate(self.levels):
            if max(h, w) >= max_side:
                index = k
        chosen = self._levels[index]
        h, w = chosen.shape[:2]
        step = max(1, -(-max(h, w) // max_side))
        if step == 1:
            data = np.asarray(chosen.read(0, 0, h, w))
        else:  # read in bands so that a big level never sits whole in memory
            rows = []
            band = max(step, (2**24 // max(1, w * chosen.shape[2])) // step * step)
            for y in range(0, h, band):
                rows.append(np.asarray(chosen.read(y, 0, min(band, h - y), w))[::step, ::step])
            data = np.concatenate(rows)
        if data.ndim == 2:
            data = data[:, :, None]
        return to_float(data), chosen.downsample * step

    def _check_values(self) -> None:
        """Float images must hold values in [0, 1]; look at a small level (cheap) to say so early."""
        if not np.issubdtype(self.dtype, np.floating):
            return
        sample, _ = self.thumbnail(512)
        where = self.path or f"this {self.reader} array"
        if np.isnan(sample).all():
            self.close()
            raise FcnifyError(f"{where} holds only NaN. Hint: check the file; masked regions belong in mask=.")
        lo, hi = np.nanmin(sample), np.nanmax(sample)
        if lo < -1e-3 or hi > 1 + 1e-3:
            warnings.warn(
                f"{where} is a float image with values in [{lo:.3g}, {hi:.3g}], not [0, 1]; fcnify passes floats "
                "on as they are. Hint: scale it to [0, 1] first if the model expects that.",
                stacklevel=3,
            )

    def close(self) -> None:
        """Release the file (safe to call twice)."""
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f", mpp={self.mpp:.4g}" if self.mpp else ""
        return (
            f"LazyImage({self.path or 'array'!s}, reader={self.reader}, level={self.level}, "
            f"shape={self.shape}, dtype={self.dtype}{mpp})"
        )
