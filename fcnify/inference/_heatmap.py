"""``fcnify.heatmap``: where on an image the classifier fires, as per-class maps aligned to pixels.

The image is normalised with the model's preprocessing, run through the fully convolutional
net (tile by tile when it is large), turned into probabilities per cell, and placed on the
image with the geometry: cell ``(i, j)``'s value sits at the centre of its window,
``geometry.center(i, j)``, and pixels in between are interpolated bilinearly (clamped at the
border). :func:`render_heatmap` draws the readable picture the ``fcnify heatmap`` command writes.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import FcnifyError
from .._files import check_output, staged
from ..analysis import Geometry, geometry
from ..conversion import FullyConvolutionalNet
from ..graph import device_and_dtype, eval_mode
from ._tiled import open_image, predict_tiled

__all__ = ["heatmap", "HeatmapResult", "render_heatmap", "resolve_normalization", "class_names"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TILED_ABOVE = 2048 * 2048  # pixels; larger images run tile by tile


@dataclasses.dataclass
class HeatmapResult:
    """Per-class maps of one image, with what is needed to place them on its pixels.

    Attributes:
        cells: ``(len(classes), h, w)`` probabilities (or logits) per output cell.
        classes: the class indices of ``cells``, in order.
        names: their names.
        geometry: where each cell sits on the image.
        image_size: ``(H, W)`` of the image.
        image: the image as uint8 ``(h, w, 3)`` for display (subsampled to at most 2048 pixels a side).
        softmax: whether ``cells`` are probabilities.
    """

    cells: torch.Tensor
    classes: List[int]
    names: List[str]
    geometry: Geometry
    image_size: Tuple[int, int]
    image: np.ndarray
    softmax: bool = True

    @property
    def maps(self) -> torch.Tensor:
        """``(len(classes), H, W)``: the cells placed on the image's pixels (mind huge images)."""
        return self.upsample()

    def upsample(self, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The maps at ``size`` (default: the image size), each cell at its window's centre.

        A display pixel's centre is mapped to image coordinates, then to fractional cell
        coordinates ``(y - center(0, 0)) / stride``, and interpolated bilinearly.
        """
        height, width = self.image_size
        out_h, out_w = (height, width) if size is None else (int(size[0]), int(size[1]))
        coords = []
        for n_in, n_out, n_cells, dim in (
            (height, out_h, self.cells.shape[1], 0),
            (width, out_w, self.cells.shape[2], 1),
        ):
            pixel = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
            cell = (pixel - self.geometry.center(0, 0)[dim]) / self.geometry.stride[dim]
            coords.append(cell * 2 / (n_cells - 1) - 1 if n_cells > 1 else torch.zeros_like(cell))
        grid = torch.stack(torch.meshgrid(coords[1], coords[0], indexing="xy"), dim=-1)  # (H, W, [x, y])
        maps = self.cells[None].double()
        out = F.grid_sample(maps, grid[None], mode="bilinear", padding_mode="border", align_corners=True)
        return out[0].to(self.cells.dtype)

    def peak(self, k: int = 0) -> Tuple[float, Tuple[float, float]]:
        """The largest value of class ``classes[k]`` and the image position ``(y, x)`` of its cell."""
        flat = int(self.cells[k].argmax())
        i, j = divmod(flat, self.cells.shape[2])
        return float(self.cells[k, i, j]), self.geometry.center(i, j)


def class_names(num_classes: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """Names for ``num_classes`` classes: ``names`` when given, ImageNet's for 1000, else ``class i``."""
    if names is not None:
        if len(names) != num_classes:
            raise FcnifyError(
                f"{len(names)} class names for a model with {num_classes} classes. Hint: pass one name per class."
            )
        return list(names)
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return [info.index_to_description(i).split(",")[0] for i in range(1000)]
        except Exception:  # pragma: no cover - timm is a dependency; fall back to numbers
            pass
    return [f"class {i}" for i in range(num_classes)]


Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]


def resolve_normalization(normalize: Any, fcn: Optional[nn.Module] = None) -> Optional[Stats]:
    """``(mean, std)`` from an explicit pair, a timm model or ``pretrained_cfg``, torchvision weights, or ``fcn``.

    ``normalize=False`` means no normalisation; ``None`` looks at ``fcn`` (``pretrained_cfg``)
    and otherwise uses ImageNet's mean and std.
    """
    if normalize is False:
        return None
    if normalize is None:
        normalize = getattr(fcn, "pretrained_cfg", None) or (IMAGENET_MEAN, IMAGENET_STD)
    cfg = getattr(normalize, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        normalize = cfg
    if isinstance(normalize, dict) and "mean" in normalize and "std" in normalize:
        return tuple(normalize["mean"]), tuple(normalize["std"])
    transforms = getattr(normalize, "transforms", None)  # a torchvision Weights enum
    if callable(transforms):
        t = transforms()
        return tuple(t.mean), tuple(t.std)
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        return tuple(float(v) for v in normalize[0]), tuple(float(v) for v in normalize[1])
    raise FcnifyError(
        f"cannot read a normalisation from {type(normalize).__name__}. Hint: pass normalize=(mean, std), a timm "
        "model, torchvision weights (ResNet50_Weights.DEFAULT) or normalize=False."
    )


def _as_image(image: Any) -> np.ndarray:
    """Any supported image as an ``(H, W, 3)`` array (uint8, or float in [0, 1]); memmaps stay lazy."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, torch.Tensor):
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3:
            raise FcnifyError(
                f"an image tensor must be (C, H, W) with values in [0, 1], got {tuple(image.shape)}. "
                "Hint: one image at a time."
            )
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray):
        raise FcnifyError(
            f"cannot read an image from a {type(image).__name__}. "
            "Hint: pass a PIL image, an (H, W, C) array, a (C, H, W) "
            "tensor in [0, 1], or a file path."
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image


def _display(image: np.ndarray, max_side: int = 2048) -> np.ndarray:
    """A uint8 copy for drawing, subsampled so that its longer side is at most ``max_side``."""
    step = max(1, -(-max(image.shape[:2]) // max_side))
    view = np.asarray(image[::step, ::step])
    if view.dtype != np.uint8:
        view = (np.clip(view, 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(view[:, :, :3])


#: The picture formats :func:`render_heatmap` writes (matplotlib's, by the file name's ending).
PICTURE_ENDINGS = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".tif", ".tiff", ".webp")

#: The most class panels one heatmap draws.
MAX_PANELS = 32


def heatmap(
    fcn: nn.Module,
    image: Any,
    classes: Optional[Sequence[Union[int, str]]] = None,
    softmax: bool = True,
    top: int = 3,
    normalize: Any = None,
    names: Optional[Sequence[str]] = None,
    tile: Optional[Sequence[int]] = None,
    progress: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> HeatmapResult:
    """Per-class probability maps of ``image``, placed on its pixels.

    Args:
        fcn: a converted model in window or dense mode.
        image: a PIL image, an ``(H, W, C)`` array (uint8 or float in [0, 1]), a ``(C, H, W)``
            tensor in [0, 1], or a file path.
        classes: class indices or names to map; default: the ``top`` classes by peak value.
        softmax: probabilities over all classes per cell (else raw logits).
        top: how many classes when ``classes`` is None.
        normalize: ``(mean, std)``, a timm model or its ``pretrained_cfg``, torchvision
            weights, or ``False``; default: ``fcn.pretrained_cfg`` or ImageNet's.
        names: class names; default ImageNet's for 1000 classes.
        tile: run tile by tile with this tile size; default: automatic above 2048 x 2048.
        progress: show a progress bar when tiling.
        device: where to run (``"cuda"``); default: the model's device.

    Returns:
        A :class:`HeatmapResult`; ``.maps`` is ``(len(classes), H, W)``.

    Raises:
        FcnifyError: an unknown class, an unreadable image, or an image smaller than the
            network's minimum input.

    Example:
        >>> import torch, fcnify
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5), torch.nn.MaxPool2d(2),
        ...                           torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 5))
        >>> fcn = fcnify.convert(net, input_size=(32, 32))
        >>> result = fcnify.heatmap(fcn, torch.rand(3, 64, 80), classes=[1, 3])
        >>> result.maps.shape, result.names
        (torch.Size([2, 64, 80]), ['class 1', 'class 3'])
    """
    wanted = len(classes) if classes is not None else top
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 1 <= wanted <= MAX_PANELS:
        raise FcnifyError(
            f"a heatmap draws one panel per class, from 1 to {MAX_PANELS}; {wanted!r} were asked for "
            f"({'classes' if classes is not None else 'top'}). Hint: top=3, or name the classes you need."
        )
    array = _as_image(image)
    height, width = array.shape[:2]
    stats = resolve_normalization(normalize, fcn)
    scale = 255.0 if array.dtype == np.uint8 else 1.0

    def preprocess(x: torch.Tensor) -> torch.Tensor:  # x in [0, 1]
        if stats is None:
            return x
        mean = torch.tensor(stats[0], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(stats[1], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    at = fcn.fcnify_input_size if isinstance(fcn, FullyConvolutionalNet) else (height, width)
    geo = geometry(fcn, input_size=at)
    geo.output_size(height, width)  # a clear error for images that are too small
    big = height * width > TILED_ABOVE or tile is not None
    if big and geo.global_context:
        warnings.warn(
            f"{type(fcn).__name__} pools whole maps (squeeze-and-excitation), so it cannot run tile by tile "
            f"exactly; running the {height}x{width} image at once.",
            stacklevel=2,
        )
    if big and not geo.global_context:
        size = tile or tuple(max(1024, r + 2 * s) for r, s in zip(geo.receptive_field, geo.stride))
        logits = predict_tiled(fcn, array, tile=size, device=device, progress=progress, preprocess=preprocess)
    else:
        x = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)[None].float() / scale
        own_device, dtype = device_and_dtype(fcn)
        x = x.to(device=torch.device(device) if device is not None else own_device, dtype=dtype)
        with torch.no_grad(), eval_mode(fcn):
            logits = fcn(preprocess(x)).cpu()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise FcnifyError("heatmap needs a map output (N, K, h, w). Hint: convert in window or dense mode.")
    logits = logits[0].float()
    values = logits.softmax(0) if softmax else logits
    all_names = class_names(values.shape[0], names)
    if classes is None:
        chosen = values.flatten(1).amax(1).argsort(descending=True)[:top].tolist()
    else:
        chosen = [_class_index(c, all_names) for c in classes]
    geo_at = dataclasses.replace(geo, input_size=(geo.input_size[0], height, width), map_size=tuple(values.shape[1:]))
    return HeatmapResult(
        values[chosen], chosen, [all_names[c] for c in chosen], geo_at, (height, width), _display(array), softmax
    )


def _class_index(value: Union[int, str], names: List[str]) -> int:
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(names):
            raise FcnifyError(
                f"class {index} does not exist: the model has {len(names)} classes. Hint: use 0 to {len(names) - 1}."
            )
        return index
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    partial = [i for i, n in enumerate(lowered) if text.lower() in n]
    if len(partial) == 1:
        return partial[0]
    import difflib

    close = difflib.get_close_matches(text.lower(), lowered, n=3, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(repr(names[lowered.index(c)]) for c in close)}?" if close else "pass a class index."
    )
    if len(partial) > 1:
        hint = (
            f"it matches {len(partial)} names, e.g. {', '.join(repr(names[i]) for i in partial[:3])}; be more precise."
        )
    raise FcnifyError(f"unknown class name {text!r}. Hint: {hint}")


def render_heatmap(result: HeatmapResult, path: str, alpha: float = 0.5, max_side: int = 1024) -> str:
    """Draw the image with each class map on top (one panel per class, colour bar, names) to ``path``.

    Returns:
        ``path``.

    Raises:
        FcnifyError: ``path`` is a folder, has no picture ending, or its folder does not exist; checked
            before drawing. An existing file at ``path`` is replaced only once the picture is complete.
    """
    path = check_output(path, suffixes=PICTURE_ENDINGS, what="picture")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise FcnifyError(f"max_side must be an integer of at least 16 pixels, got {max_side!r}. Hint: max_side=1024.")
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - optional dependency
        raise FcnifyError("drawing heatmaps needs matplotlib. Hint: pip install 'fcnify[viz]'.") from err
    image = _display(result.image, max_side)
    maps = result.upsample(image.shape[:2]).numpy()
    panels = len(result.classes)
    aspect = image.shape[1] / image.shape[0]
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * aspect * panels + 0.6 * panels, 4.6), squeeze=False)
    label = "probability" if result.softmax else "logit"
    for k, ax in enumerate(axes[0]):
        ax.imshow(image)
        vmin, vmax = (0.0, 1.0) if result.softmax else (float(maps[k].min()), float(maps[k].max()))
        shown = ax.imshow(maps[k], cmap="inferno", alpha=alpha, vmin=vmin, vmax=vmax)
        peak, (y, x) = result.peak(k)
        ax.set_title(f"{result.names[k]} ({result.classes[k]})\npeak {label} {peak:.2f}", fontsize=10)
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label=label)
    fig.tight_layout()
    try:
        with staged(path) as work:
            fig.savefig(work, dpi=100)
    finally:
        plt.close(fig)
    return path
