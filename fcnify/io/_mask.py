"""Foreground masks: which parts of an image hold tissue (or anything worth predicting on).

A :class:`Mask` is a boolean array that covers the whole image at any resolution; mask pixel
``(a, b)`` stands for the level-0 box ``[a * H0 / mh, (a + 1) * H0 / mh) x [b * W0 / mw, ...)``.
``mask.any(y0, x0, y1, x1)`` answers, conservatively, whether a level-0 box touches foreground:
a tile is skipped only when no cell of it sees any foreground pixel.

``"otsu"`` thresholds a low-resolution level: on colour images the saturation (tissue is more
saturated than glass), on grey images the darkness (tissue is darker), with Otsu's threshold
(:func:`skimage.filters.threshold_otsu`), then grows the mask by one pixel to stay on the safe side.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from .._errors import FcnifyError
from ._image import LazyImage

__all__ = ["Mask", "load_mask", "tissue_mask"]


@dataclasses.dataclass
class Mask:
    """A boolean foreground mask over a whole image.

    Attributes:
        array: ``(mh, mw)`` booleans, True where there is foreground.
        size: ``(H0, W0)``, the level-0 size of the image the mask covers.
        source: how it was made (``"otsu"``, a file path, ``"array"``), recorded in the output.
    """

    array: np.ndarray
    size: tuple[int, int]
    source: str

    def any(self, y0: float, x0: float, y1: float, x1: float) -> bool:
        """Whether the level-0 box ``[y0, y1) x [x0, x1)`` touches a foreground mask pixel."""
        mh, mw = self.array.shape
        sy, sx = mh / self.size[0], mw / self.size[1]
        a0, a1 = max(0, int(np.floor(y0 * sy))), min(mh, int(np.ceil(y1 * sy)))
        b0, b1 = max(0, int(np.floor(x0 * sx))), min(mw, int(np.ceil(x1 * sx)))
        if a1 <= a0 or b1 <= b0:
            return False
        return bool(self.array[a0:a1, b0:b1].any())

    @property
    def fraction(self) -> float:
        """The share of the image that is foreground."""
        return float(self.array.mean())


def _level0_size(image: LazyImage) -> tuple[int, int]:
    return image.levels[0]


def tissue_mask(image: LazyImage, max_side: int = 2048) -> Mask:
    """Otsu's foreground mask of ``image``, computed on a level of at most ``max_side`` pixels.

    Example:
        >>> import numpy as np, fcnify
        >>> from fcnify.io import tissue_mask
        >>> pixels = np.full((64, 64, 3), 240, np.uint8); pixels[16:32, 16:48] = (180, 60, 120)
        >>> mask = tissue_mask(fcnify.open_image(pixels))
        >>> mask.any(20, 20, 24, 24), mask.any(50, 0, 64, 10)
        (True, False)
    """
    from scipy.ndimage import binary_dilation
    from skimage.filters import threshold_otsu

    pixels, _ = image.thumbnail(max_side)
    pixels = np.nan_to_num(pixels[:, :, :3])
    if pixels.shape[2] >= 3:
        top, bottom = pixels.max(axis=2), pixels.min(axis=2)
        channel = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0)  # HSV saturation
    else:
        channel = 1.0 - pixels[:, :, 0]  # darkness
    if float(channel.max() - channel.min()) < 1e-6:
        foreground = np.ones(channel.shape, bool)  # nothing to separate: keep everything
    else:
        foreground = channel > threshold_otsu(channel)
        foreground = binary_dilation(foreground, structure=np.ones((3, 3), bool))
    return Mask(foreground, _level0_size(image), "otsu")


def load_mask(mask: Any, image: LazyImage) -> Mask:
    """A :class:`Mask` from ``"otsu"``, a mask file (PNG, .npy, TIFF, ... at any resolution;
    non-zero is foreground), a 2-D array or tensor, or a :class:`Mask`.

    Raises:
        FcnifyError: an unknown mask name, a missing file, or an array that is not 2-D.
    """
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, str) and mask == "otsu":
        return tissue_mask(image)
    if isinstance(mask, (str, os.PathLike)):
        from ._readers import open_image

        path = os.fspath(mask)
        if not os.path.exists(path):
            raise FcnifyError(f"mask file not found: {path}. Hint: pass mask='otsu' or an existing file.")
        with open_image(path) as opened:
            pixels, _ = opened.thumbnail(max(opened.levels[0]))
        return Mask(_foreground(pixels, path), _level0_size(image), path)
    try:
        import torch

        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(mask, np.ndarray):
        return Mask(_foreground(mask, "the mask array"), _level0_size(image), "array")
    raise FcnifyError(f"cannot use a {type(mask).__name__} as a mask. Hint: mask='otsu', a mask file, or a 2-D array.")


def _foreground(pixels: np.ndarray, where: str) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    elif pixels.ndim == 3:
        pixels = pixels[:, :, :3].max(axis=2)
    if pixels.ndim != 2:
        raise FcnifyError(
            f"{where} has shape {pixels.shape}; a mask is 2-D. Hint: pass a (H, W) array or a grey image."
        )
    return np.nan_to_num(np.asarray(pixels)) > 0
