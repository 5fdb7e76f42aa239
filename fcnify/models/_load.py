"""Finding a classifier by name or path, and loading its weights.

Names: a bare name is looked up in torchvision first, then in timm; ``timm/NAME`` or
``torchvision/NAME`` picks the library. A path to a file saved with ``torch.save(model)``
loads that model.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .._errors import ModelLoadError, first_line
from ._lite0 import LITE0_NAME, load_lite0

__all__ = ["load_model", "load_weights"]

_PREFIXES = {
    "timm/": "timm",
    "timm:": "timm",
    "torchvision/": "torchvision",
    "torchvision:": "torchvision",
    "tv/": "torchvision",
}


def _torchvision_names():
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm_names():
    import timm

    return timm.list_models()


def load_model(
    name: str, pretrained: bool = False, weights: Optional[str] = None
) -> Tuple[nn.Module, Optional[Tuple[int, int]]]:
    """Build a classifier from a torchvision or timm name, or load a saved model file.

    Args:
        name: ``resnet50`` (torchvision first, then timm), ``timm/resnet50``,
            ``torchvision/resnet50``, a path to a ``torch.save``-d model, or
            ``efficientnet_lite0_imagenet``: real ImageNet weights from the ``demo`` extra.
        pretrained: load the library's own pretrained weights (needs internet or a
            filled cache: torchvision's hub cache, Hugging Face's for timm).
        weights: a local state-dict file (``.pth``, ``.pt``, ``.safetensors``).

    Returns:
        ``(model, (H, W))``: the model in eval mode, and its training size when the
        library records one (torchvision weight transforms, timm ``pretrained_cfg``).

    Raises:
        ModelLoadError: unknown name (with close matches), unreadable file, weights that
            do not fit the architecture, or pretrained weights that cannot be fetched.
    """
    if os.path.exists(name):
        model = _load_model_file(name)
        size = None
    elif name == LITE0_NAME:
        model, size = load_lite0(), (224, 224)
    else:
        library, bare = _resolve(name)
        model, size = (_torchvision if library == "torchvision" else _timm)(bare, pretrained)
    if weights is not None:
        load_weights(model, weights)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if size is None and cfg.get("input_size"):
        size = tuple(cfg["input_size"][1:])
    if size is not None:
        model.fcnify_input_size = tuple(size)
    return model.eval(), size


def _resolve(name: str) -> Tuple[str, str]:
    for prefix, library in _PREFIXES.items():
        if name.startswith(prefix):
            bare = name[len(prefix) :]
            known = _torchvision_names() if library == "torchvision" else _timm_names()
            if bare not in known:
                raise _unknown(name, [prefix + n for n in known])
            return library, bare
    if name in _torchvision_names():
        return "torchvision", name
    if name in _timm_names():
        return "timm", name
    if os.sep in name or name.endswith((".pt", ".pth", ".pt2")):
        raise ModelLoadError(f"no such file: {name}. Hint: check the path.")
    torchvision_names = set(_torchvision_names())
    timm_names = [n if n not in torchvision_names else f"timm/{n}" for n in _timm_names()]
    raise _unknown(name, sorted(torchvision_names) + timm_names)


def _unknown(name: str, known) -> ModelLoadError:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "list names with `python -c 'import timm; print(timm.list_models())'`."
    )
    return ModelLoadError(f"unknown model '{name}' (not in torchvision or timm). Hint: {hint}")


def _torchvision(name: str, pretrained: bool):
    import torchvision

    size = None
    try:
        weights_enum = torchvision.models.get_model_weights(name)
        default = weights_enum.DEFAULT
        crop = getattr(default.transforms(), "crop_size", None)
        if crop:
            size = (crop[0], crop[-1])
    except (ValueError, AttributeError, KeyError):
        default = None
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # pretrained or not, skip scipy's slow truncated-normal init
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except Exception as err:
        if not pretrained:
            raise
        raise ModelLoadError(
            f"could not load torchvision's pretrained weights for {name} ({default}): {err}. "
            "Hint: without internet, download the file elsewhere and pass it with --weights FILE, "
            "or place it in $TORCH_HOME/hub/checkpoints."
        ) from err
    return model, size


def _timm(name: str, pretrained: bool):
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as err:
        if not pretrained:
            raise
        raise ModelLoadError(
            f"could not load timm's pretrained weights for {name}: {err}. Hint: without internet, "
            "fill the Hugging Face cache (HF_HUB_OFFLINE=1 uses it) or pass a local file with --weights FILE."
        ) from err
    return model, tuple(model.pretrained_cfg["input_size"][1:])


def _load_model_file(path: str) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ModelLoadError(
            f"cannot read model file {path}: {err}. Hint: save models with torch.save(model, path)."
        ) from err
    if isinstance(obj, nn.Module):
        return obj
    raise ModelLoadError(
        f"{path} holds a {type(obj).__name__}, not a model. Hint: for a state dict, name the architecture "
        f"and pass the file as weights: fcnify convert resnet50 --weights {path}"
    )


def _read_state_dict(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights file not found: {path}. Hint: check the path.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(
            f"cannot read weights file {path}: {type(err).__name__}: {first_line(err)}. "
            "Hint: pass a state dict saved with torch.save(model.state_dict(), path) or a .safetensors file."
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict of tensors. Hint: save model.state_dict().")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a local state-dict file into ``model`` (strict: every tensor must fit)."""
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise ModelLoadError(
            f"weights in {path} do not fit {type(model).__name__}: {'; '.join(parts)}. "
            "Hint: check that the file was saved from the same architecture."
        )
    model.load_state_dict(state)
    return model
