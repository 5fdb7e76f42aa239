"""Finding a classifier by name or path, and loading its weights.

Names: a bare name is looked up in torchvision first, then in timm; ``timm/NAME`` or
``torchvision/NAME`` picks the library. A library name wins over a file of the same name in the
current folder unless the argument is clearly a path (``./resnet18``, ``models/x.pt``, a known
extension).

Files: a ``.pt2`` program (``torch.export``, what ``fcnify convert`` writes) loads safely. A whole
model saved with ``torch.save(model)`` is a pickle: unpickling runs code stored in the file, so it
loads only with ``trust=True`` (``--trust-pickle``), and with a warning that says why. Weights alone
(a state dict, ``.safetensors``) go with an architecture name: ``load_model("resnet50", weights=F)``.
"""

from __future__ import annotations

import difflib
import os
import pickle
import warnings
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


#: Endings that make an argument a path rather than a model name.
_FILE_ENDINGS = (".pt", ".pth", ".pt2", ".bin", ".ckpt", ".pkl", ".safetensors")


def load_model(
    name: str, pretrained: bool = False, weights: Optional[str] = None, trust: bool = False
) -> Tuple[nn.Module, Optional[Tuple[int, int]]]:
    """Build a classifier from a torchvision or timm name, or load a saved model file.

    Args:
        name: ``resnet50`` (torchvision first, then timm), ``timm/resnet50``,
            ``torchvision/resnet50``, a path to a ``.pt2`` program or a ``torch.save``-d model, or
            ``efficientnet_lite0_imagenet``: real ImageNet weights from the ``demo`` extra.
        pretrained: load the library's own pretrained weights (needs internet or a
            filled cache: torchvision's hub cache, Hugging Face's for timm).
        weights: a local state-dict file (``.pth``, ``.pt``, ``.safetensors``), read without
            unpickling code.
        trust: allow a whole-model pickle (``torch.save(model)``) to load: unpickling runs code
            from the file, so pass True only for files from a source you trust.

    Returns:
        ``(model, (H, W))``: the model in eval mode, and its training size when the
        library records one (torchvision weight transforms, timm ``pretrained_cfg``).

    Raises:
        ModelLoadError: unknown name (with close matches), unreadable file, weights that
            do not fit the architecture, or pretrained weights that cannot be fetched.
    """
    if not isinstance(name, str) or not name:
        raise ModelLoadError(
            f"expected a model name or path, got {name!r}. Hint: load_model('resnet50') or load_model('model.pt2')."
        )
    size: Optional[Tuple[int, ...]] = None
    if _is_path(name) or (name != LITE0_NAME and not _is_library_name(name) and os.path.exists(name)):
        model = _load_model_file(name, trust)
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
    return model.eval(), size  # type: ignore[return-value]


def _is_path(name: str) -> bool:
    """Clearly a path: a folder part that is not a library prefix, a leading dot, or a file ending."""
    if any(name.startswith(prefix) for prefix in _PREFIXES):
        return False
    return os.sep in name or "/" in name or name.startswith(".") or name.lower().endswith(_FILE_ENDINGS)


def _is_library_name(name: str) -> bool:
    return name in _torchvision_names() or name in _timm_names()


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


def _load_model_file(path: str, trust: bool = False) -> nn.Module:
    """A model from a file: a ``.pt2`` program, or a whole-model pickle when ``trust`` allows it."""
    if not os.path.isfile(path):
        what = "is a folder, not a model file" if os.path.isdir(path) else "does not exist"
        raise ModelLoadError(f"model file {path} {what}. Hint: check the path, or pass a model name such as resnet50.")
    if path.lower().endswith(".safetensors"):
        raise ModelLoadError(
            f"{path} holds weights only, not an architecture. Hint: name the architecture and pass the file "
            f"as weights: fcnify convert resnet50 --weights {path}"
        )
    if path.lower().endswith(".pt2"):
        try:
            return torch.export.load(path).module()
        except Exception as err:
            raise ModelLoadError(
                f"cannot read the torch.export program {path}: {first_line(err)}. "
                "Hint: write it with torch.export.save (fcnify convert does)."
            ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust:
            raise ModelLoadError(
                f"{path} is a pickled whole model: loading it runs code stored in the file, which could do "
                "anything. Hint: pass --trust-pickle (trust=True) only for a file from a source you trust; "
                "safer, save the model as a .pt2 program (fcnify convert writes one) or save its state dict "
                "and pass it with the architecture name: fcnify convert resnet50 --weights FILE."
            ) from err
        warnings.warn(
            f"loading {path} with pickle (trust=True): this runs code stored in the file; prefer a .pt2 "
            "program or a state dict.",
            stacklevel=3,
        )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise ModelLoadError(
                f"cannot read model file {path}: {first_line(err2)}. Hint: save models with torch.save(model, path)."
            ) from err2
    except Exception as err:
        raise ModelLoadError(
            f"cannot read model file {path}: {type(err).__name__}: {first_line(err)}. "
            "Hint: pass a .pt2 program, a torch.save-d model, or a model name such as resnet50."
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
