"""``fcnify.predict_padded``: any input size, by padding to the next valid size and cropping back.

A strided network silently ignores the last rows and columns of an input that is not one of
its valid sizes (:func:`fcnify.valid_sizes`). Padding the bottom and right up to the next valid
size lets every pixel reach the output; the output is then cropped to the cells whose window
centre lies on the original image.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import FcnifyError
from ..analysis import geometry, valid_sizes
from ..conversion import FullyConvolutionalNet
from ..graph import InputSize, eval_mode
from ._batch import as_batch

__all__ = ["predict_padded"]


def predict_padded(
    fcn: nn.Module, image: torch.Tensor, value: float = 0.0, input_size: Optional[InputSize] = None
) -> torch.Tensor:
    """Run ``fcn`` on ``image`` padded to the next valid size; keep the cells centred on the image.

    Args:
        fcn: a fully convolutional model (from :func:`fcnify.convert`).
        image: ``(N, C, H, W)`` input of any size at least the network's minimum.
        value: the padding value (0 is the mean after normalisation).
        input_size: a size ``fcn`` runs at, for the geometry; default its training size.

    Returns:
        ``(N, K, h, w)``: one cell per window whose centre lies inside the ``H x W`` image.

    Raises:
        FcnifyError: ``x`` is smaller than the minimum input (the message gives it).

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 5, stride=2) for _ in range(4)])
        >>> fcnify.predict_padded(net, torch.randn(1, 1, 70, 64), input_size=(61, 61)).shape
        torch.Size([1, 1, 2, 2])
    """
    image = as_batch(fcn, image, "predict_padded")
    height, width = image.shape[2:]
    if input_size is None and not isinstance(fcn, FullyConvolutionalNet):
        input_size = (height, width)
    geo = geometry(fcn, input_size)
    low = geo.min_input_size
    if height < low[0] or width < low[1]:
        raise FcnifyError(
            f"a {height}x{width} input is smaller than this network's minimum {low[0]}x{low[1]}. "
            "Hint: resize or pad the image to at least that size."
        )
    valid = valid_sizes(fcn, input_size if input_size is not None else None)
    target = valid.next(height, width)
    padded = F.pad(image, (0, target[1] - width, 0, target[0] - height), value=value)
    with torch.no_grad(), eval_mode(fcn):
        out = fcn(padded)
    keep = []
    for dim, n in enumerate((height, width)):
        o, s, r = geo.offset[dim], geo.stride[dim], geo.receptive_field[dim]
        keep.append(max(1, min(out.shape[2 + dim], int((n - 1 - o - (r - 1) / 2) // s) + 1)))
    return out[:, :, : keep[0], : keep[1]]
