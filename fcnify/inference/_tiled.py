"""``fcnify.predict_tiled``: run a fully convolutional net on a huge image, tile by tile, exactly.

A cell of the output depends on the input pixels in its window (:func:`fcnify.geometry`), and
on the network's zero padding only where that window leaves the image. A tile whose origin is
a multiple of the stride computes the same cells as the whole image; the cells kept from a
tile are those whose window lies inside the tile (or runs past a tile edge that is the image's
edge). Tiles overlap by about one receptive field, so the seams are invisible: the result is
``fcn(image)`` to float precision, while memory holds one tile, its activations and the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .._errors import FcnifyError, UnsupportedModelError
from ..analysis import Geometry, geometry
from ..conversion import FullyConvolutionalNet
from ..graph import device_and_dtype, eval_mode
from ..io._readers import _release as release_pages
from ._batch import as_device, input_channels

__all__ = ["predict_tiled", "plan_tiles", "Tile", "open_image"]

Pair = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile: input rows/columns ``[y0, y1) x [x0, x1)`` and the output cells it provides.

    Output cells ``[i0, i1) x [j0, j1)`` of the whole map are the tile's own cells
    ``[i0 - y0 / sy, ...)``.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    i0: int
    i1: int
    j0: int
    j1: int


def _segments(n: int, tile: int, geo: Geometry, dim: int, n_out: int) -> List[Tuple[int, int, int, int]]:
    """Along one axis: ``(start, stop, first cell, last cell + 1)`` per tile."""
    s, o, r = geo.stride[dim], geo.offset[dim], geo.receptive_field[dim]
    segments = []
    i = 0
    while i < n_out:
        a = 0 if i == 0 else max(0, ((o + i * s) // s) * s)
        b = min(a + tile, n)
        last = n_out - 1 if b == n else min(n_out - 1, (b - r - o) // s)
        if last < i:
            need = r + s - 1
            raise FcnifyError(
                f"tile size {tile} along {'yx'[dim]} is too small for this network: a tile must hold a receptive "
                f"field ({r}) plus a stride ({s}) less one pixel. Hint: use tile of at least {need} along {'yx'[dim]}."
            )
        segments.append((a, b, i, last + 1))
        i = last + 1
    return segments


def plan_tiles(geo: Geometry, image_size: Pair, tile: Pair) -> Tuple[List[Tile], Pair]:
    """The tiles that cover an ``image_size`` input, and the whole output's ``(h, w)``.

    Example:
        >>> import torch, fcnify
        >>> from fcnify.inference import plan_tiles
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 5), torch.nn.MaxPool2d(2))
        >>> tiles, size = plan_tiles(fcnify.geometry(net, input_size=(32, 32)), (100, 40), (40, 40))
        >>> size, [(t.y0, t.y1, t.i0, t.i1) for t in tiles]
        ((48, 18), [(0, 40, 0, 18), (36, 76, 18, 36), (72, 100, 36, 48)])
    """
    h_out, w_out = geo.output_size(*image_size)
    rows = _segments(image_size[0], tile[0], geo, 0, h_out)
    cols = _segments(image_size[1], tile[1], geo, 1, w_out)
    tiles = [Tile(y0, y1, x0, x1, i0, i1, j0, j1) for y0, y1, i0, i1 in rows for x0, x1, j0, j1 in cols]
    return tiles, (h_out, w_out)


# -- reading images lazily ----------------------------------------------------------------------


class _Source:
    """An image as ``(N, C, H, W)`` that hands out float tensors for a window."""

    def __init__(self, image: Any):
        self.layout = "nchw"
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image)
        if isinstance(image, torch.Tensor):
            if image.dim() == 3:
                image = image.unsqueeze(0)
            if image.dim() != 4:
                raise FcnifyError(
                    f"an image tensor must be (C, H, W) or (N, C, H, W), got shape {tuple(image.shape)}. "
                    "Hint: add the channel axis."
                )
            self.data = image
            self.shape = tuple(image.shape)
        elif isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = image[:, :, None]
            if image.ndim != 3:
                raise FcnifyError(
                    "a numpy image must be (H, W, C) or (H, W), got shape "
                    f"{image.shape}. Hint: pass one image in HWC order."
                )
            self.layout = "hwc"
            self.data = image  # type: ignore[assignment]
            self.shape = (1, image.shape[2], image.shape[0], image.shape[1])
        else:
            raise FcnifyError(
                f"cannot read an image from a {type(image).__name__}. Hint: pass a tensor (C, H, W), a numpy array "
                "or memmap (H, W, C), or an image file path."
            )

    @property
    def size(self) -> Pair:
        return (self.shape[2], self.shape[3])

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        if self.layout == "nchw":
            return self.data[:, :, y0:y1, x0:x1]
        window = np.array(self.data[y0:y1, x0:x1], copy=True)
        release_pages(self.data)
        tensor = torch.from_numpy(window).permute(2, 0, 1).unsqueeze(0)
        if window.dtype == np.uint8:
            tensor = tensor.float() / 255.0
        return tensor


def open_image(path: Union[str, os.PathLike]) -> Union[np.ndarray, torch.Tensor]:
    """An image file as an ``(H, W, C)`` array: ``.npy`` files are memory-mapped (read lazily),
    other formats are decoded by Pillow (the whole image is decoded into memory).

    Raises:
        FcnifyError: the file is missing or not an image.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FcnifyError(f"image file not found: {path}. Hint: check the path.")
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is an optional dependency
        raise FcnifyError("reading image files needs Pillow. Hint: pip install 'fcnify[viz]'.") from err
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the user asked for this file; huge images are the point
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as err:
        raise FcnifyError(
            f"cannot read image {path}: {err}. Hint: use PNG, JPEG, TIFF or a .npy (H, W, C) array."
        ) from err
    finally:
        Image.MAX_IMAGE_PIXELS = limit


# -- running ------------------------------------------------------------------------------------


def _check_translation_invariant(geo: Geometry, tile: Pair) -> None:
    """Tiles agree with the whole image only if padding does not depend on the input size."""
    if geo.global_context:
        raise UnsupportedModelError(
            "the network pools whole feature maps inside its body (squeeze-and-excitation), so every cell "
            "depends on the whole image and no tiling reproduces it. Hint: run the whole image, or accept "
            "tile-local context by calling the model on tiles yourself."
        )
    probe = tuple(min(t, 4 * r) for t, r in zip(tile, geo.receptive_field))
    for dim in (0, 1):
        s = geo.stride[dim]
        base = geo._axis(probe[dim], dim)
        for extra in (1, s, 2 * s + 1):
            other = geo._axis(probe[dim] + extra, dim)
            if base is None or other is None:
                continue
            if other.start != base.start:
                raise UnsupportedModelError(
                    "the network's padding depends on the input size (TF-'same' padding), so tiles would not "
                    "line up with the whole image. Hint: run the whole image, or pad it to a fixed size first."
                )


def predict_tiled(
    fcn: nn.Module,
    image: Any,
    tile: Sequence[int] = (1024, 1024),
    batch_size: int = 1,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    preprocess: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """``fcn(image)``, computed tile by tile with overlaps from the geometry: the same numbers.

    Args:
        fcn: a fully convolutional model (from :func:`fcnify.convert`) with one map output.
        image: a tensor ``(C, H, W)`` or ``(N, C, H, W)``, a numpy array or memmap ``(H, W, C)``
            (``uint8`` is scaled to ``[0, 1]``), or an image file path (``.npy`` is memory-mapped).
        tile: input tile size ``(th, tw)``, overlap included; at least a receptive field plus a
            stride. Memory grows with the tile, not with the image.
        batch_size: tiles of equal size run together.
        device: where to run (``"cuda"``); default: the model's device. The output is on the CPU.
        progress: show a tqdm progress bar of tiles done (the ``fcnify`` commands do).
        preprocess: a per-pixel function applied to each tile (e.g. mean/std normalisation).

    Returns:
        ``(N, K, h, w)``: what ``fcn(image)`` returns, cell for cell.

    Raises:
        FcnifyError: the tile is smaller than a receptive field plus a stride, or the image is
            smaller than the network's minimum input.
        UnsupportedModelError: the padding depends on the input size (TF-"same").

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2))
        >>> x = torch.randn(1, 3, 200, 150)
        >>> y = fcnify.predict_tiled(net, x, tile=(64, 64), progress=False)
        >>> torch.allclose(y, net(x), atol=1e-6)
        True
    """
    tile = (int(tile[0]), int(tile[1])) if isinstance(tile, (tuple, list)) else (int(tile), int(tile))
    source = _Source(image)
    channels = input_channels(fcn)
    if channels is not None and source.shape[1] != channels:
        raise FcnifyError(
            f"predict_tiled: the model reads {channels}-channel images, the image has {source.shape[1]} channels "
            f"(shape {source.shape}). Hint: convert the image's channels, or check the layout (tensors are "
            "(C, H, W), numpy arrays (H, W, C))."
        )
    own_device, dtype = device_and_dtype(fcn)
    device = as_device(device, "predict_tiled") or own_device
    size = source.size
    if isinstance(fcn, FullyConvolutionalNet):
        at = fcn.fcnify_input_size
    else:
        at = (source.shape[1], min(tile[0], size[0]), min(tile[1], size[1]))
    geo = geometry(fcn, input_size=at)
    _check_translation_invariant(geo, tile)
    tiles, (h_out, w_out) = plan_tiles(geo, size, tile)
    out: Optional[torch.Tensor] = None
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tiles), unit="tile", desc="fcnify tiles", disable=not progress)
    with torch.no_grad(), eval_mode(fcn), contextlib.closing(bar):
        for group in _groups(tiles, batch_size):
            inputs = []
            for t in group:
                x = source.read(t.y0, t.y1, t.x0, t.x1).to(device=device, dtype=dtype)
                if preprocess is not None:
                    x = preprocess(x)
                inputs.append(x)
            result = fcn(torch.cat(inputs) if len(inputs) > 1 else inputs[0])
            if not isinstance(result, torch.Tensor) or result.dim() != 4:
                raise FcnifyError(
                    f"predict_tiled needs a model with one (N, K, h, w) output; {type(fcn).__name__} returns "
                    f"{type(result).__name__}. Hint: convert in window or dense mode."
                )
            n = source.shape[0]
            for k, t in enumerate(group):
                part = result[k * n : (k + 1) * n]
                ti, tj = t.i0 - t.y0 // geo.stride[0], t.j0 - t.x0 // geo.stride[1]
                rows, cols = t.i1 - t.i0, t.j1 - t.j0
                if part.shape[2] < ti + rows or part.shape[3] < tj + cols:
                    raise UnsupportedModelError(
                        f"a {t.y1 - t.y0}x{t.x1 - t.x0} tile gives a {part.shape[2]}x{part.shape[3]} map, smaller than "
                        "fcnify.geometry predicts. Hint: report this model; use the whole image meanwhile."
                    )
                if out is None:
                    out = torch.empty(n, part.shape[1], h_out, w_out, dtype=part.dtype)
                out[:, :, t.i0 : t.i1, t.j0 : t.j1] = part[:, :, ti : ti + rows, tj : tj + cols].cpu()
            bar.update(len(group))
    return out  # type: ignore[return-value]


def _groups(tiles: List[Tile], batch_size: int) -> Iterator[List[Tile]]:
    group: List[Tile] = []
    for t in tiles:
        shape = (t.y1 - t.y0, t.x1 - t.x0)
        if group and (len(group) >= batch_size or (group[0].y1 - group[0].y0, group[0].x1 - group[0].x0) != shape):
            yield group
            group = []
        group.append(t)
    if group:
        yield group
