"""Checking what users pass to the inference functions: one clear error instead of PyTorch's.

A batch must be ``(N, C, H, W)`` floats with the model's channel count; it is moved to the model's
device and dtype (the user's tensor is never changed). Integer images are refused: their scale
(0..255, 0..65535) is the caller's to remove, and guessing it wrong silently changes every cell.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .._errors import FcnifyError
from ..graph import device_and_dtype

__all__ = ["input_channels", "as_batch", "as_device"]


def input_channels(model: nn.Module) -> Optional[int]:
    """The channels ``model``'s first convolution reads, or None when it has none."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
            return m.in_channels
    return None


def as_device(device: Any, where: str) -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (None stays None), or one clear error."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise FcnifyError(f"{where}: unknown device {device!r}. Hint: device='cpu' or 'cuda'.") from err


_GREY = "convert to grey, e.g. x.mean(1, keepdim=True)"


def as_batch(model: nn.Module, x: Any, where: str, device: Union[None, str, torch.device] = None) -> torch.Tensor:
    """``x`` checked as ``(N, C, H, W)`` floats for ``model``, on its device and in its dtype."""
    if not isinstance(x, torch.Tensor):
        raise FcnifyError(f"{where} takes a tensor (N, C, H, W), got {type(x).__name__}. Hint: torch.from_numpy(...).")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise FcnifyError(
            f"{where} takes (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}. Hint: add the batch axis."
        )
    if not x.is_floating_point():
        raise FcnifyError(
            f"{where} takes floating-point images, got {x.dtype}. Hint: scale to [0, 1] first, e.g. x.float() / 255 "
            "for 8-bit images, then normalise as the model was trained."
        )
    channels = input_channels(model)
    if channels is not None and x.shape[1] != channels:
        raise FcnifyError(
            f"{where}: the model reads {channels}-channel images, got {x.shape[1]} channels (shape {tuple(x.shape)}). "
            f"Hint: {_GREY if channels == 1 else 'repeat or convert the channels'}."
        )
    own_device, dtype = device_and_dtype(model)
    return x.to(device=as_device(device, where) or own_device, dtype=dtype)
