"""What converted graphs call at run time: the modules and functions the rewrites put into them.

Kept apart from the rewrites, so that a saved or exported model needs only this module, and so
that every op a converted graph may contain is listed in one place.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis import window_function

__all__ = ["ChannelLayerNorm", "layer_norm_channels", "dilated_avg_pool2d"]

Pair = Tuple[int, int]


def layer_norm_channels(
    x: torch.Tensor,
    normalized_shape: List[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` over the channel axis of an NCHW map, at every position."""
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, normalized_shape, weight, bias, eps)
    return x.permute(0, 3, 1, 2)


class ChannelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the channels of an NCHW map (same parameters and state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_channels(x, self.normalized_shape, self.weight, self.bias, self.eps)


@window_function
def dilated_avg_pool2d(
    x: torch.Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    ceil_extra: Pair = (0, 0),
    count_include_pad: bool = True,
    divisor_override: Optional[int] = None,
) -> torch.Tensor:
    """``avg_pool2d`` with dilated windows, as a depthwise convolution (exact up to float rounding).

    ``ceil_extra`` pads the bottom/right with pixels that are never counted, which reproduces
    ``ceil_mode=True`` windows that run past the input.

    Example:
        >>> import torch
        >>> x = torch.randn(1, 2, 6, 6)
        >>> y = dilated_avg_pool2d(x, (2, 2), (1, 1), (0, 0), (1, 1))
        >>> torch.allclose(y, torch.nn.functional.avg_pool2d(x, 2, 1))
        True
    """
    channels = x.shape[1]
    ones = torch.ones(channels, 1, kernel_size[0], kernel_size[1], dtype=x.dtype, device=x.device)
    pad = (padding[1], padding[1] + ceil_extra[1], padding[0], padding[0] + ceil_extra[0])
    total = F.conv2d(F.pad(x, pad), ones, None, stride, 0, dilation, channels)
    if divisor_override:
        return total / divisor_override
    if count_include_pad:
        mask = torch.ones(
            1, 1, x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1], dtype=x.dtype, device=x.device
        )
        mask = F.pad(mask, (0, ceil_extra[1], 0, ceil_extra[0]))
    else:
        mask = F.pad(torch.ones(1, 1, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device), pad)
    count = F.conv2d(mask, ones[:1], None, stride, 0, dilation)
    return total / count
