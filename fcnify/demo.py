"""``fcnify demo``: a real ImageNet classifier, converted, finds three photos pasted on a large canvas.

EfficientNet-Lite0 with real ImageNet weights (the ``demo`` extra) is converted in window mode,
and run once over a 720x960 canvas on which scikit-image's cat, espresso and rocket photos are
pasted at known 224x224 boxes. For each photo, the map of its class peaks somewhere; the summary
says where, and whether that is inside the photo's box (computed, not assumed).
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Tuple

import numpy as np
import torch

from ._errors import ModelLoadError

__all__ = ["run_demo", "DemoRow", "compose_canvas"]

CANVAS = (720, 960)
PHOTO = 224
#: (name, skimage.data function, ImageNet class or None for "what the model says on the photo alone", top, left)
PHOTOS = (
    ("cat", "chelsea", 285, 72, 80),  # Egyptian cat
    ("espresso", "coffee", 967, 56, 640),  # espresso
    ("rocket", "rocket", None, 424, 360),
)


@dataclasses.dataclass
class DemoRow:
    """One line of the summary: a pasted photo, its class, and where that class's map peaks."""

    photo: str
    class_index: int
    class_name: str
    peak: float
    peak_yx: Tuple[float, float]
    box: Tuple[int, int, int, int]  # top, left, bottom, right (exclusive)
    inside: bool
    picture: str

    def __str__(self) -> str:
        y, x = self.peak_yx
        top, left, bottom, right = self.box
        return (
            f"{self.photo:<9} {self.class_index:>4} {self.class_name:<18} {self.peak:>6.3f}  "
            f"(y={y:>3.0f}, x={x:>3.0f})  [{top}:{bottom}, {left}:{right}]  {'yes' if self.inside else 'NO'}"
        )


def _require_demo_extra():
    try:
        from PIL import Image
        from skimage import data
    except ImportError as err:
        raise ModelLoadError(
            f"fcnify demo needs {err.name}, which is not installed. Hint: pip install 'fcnify[demo]'."
        ) from err
    return Image, data


def _square(image: np.ndarray, size: int) -> np.ndarray:
    """The central square of ``image``, resized to ``size`` x ``size`` (uint8 RGB)."""
    Image, _ = _require_demo_extra()
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top : top + side, left : left + side])).convert("RGB")
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def _background(size: Tuple[int, int]) -> np.ndarray:
    """A neutral, low-contrast grey texture: scikit-image's gravel, tiled and blurred."""
    Image, data = _require_demo_extra()
    from PIL import ImageFilter

    gravel = data.gravel()
    reps = (-(-size[0] // gravel.shape[0]), -(-size[1] // gravel.shape[1]))
    tiled = np.tile(gravel, reps)[: size[0], : size[1]]
    blurred = np.asarray(Image.fromarray(tiled).filter(ImageFilter.GaussianBlur(3)), dtype=np.float32)
    grey = 128 + 0.35 * (blurred - blurred.mean())
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def compose_canvas() -> Tuple[np.ndarray, List[Tuple[str, np.ndarray, Tuple[int, int, int, int]]]]:
    """The demo canvas and, per photo, its name, its 224x224 pixels and its box (top, left, bottom, right)."""
    _, data = _require_demo_extra()
    canvas = _background(CANVAS)
    pasted = []
    for name, source, _, top, left in PHOTOS:
        photo = _square(getattr(data, source)(), PHOTO)
        canvas[top : top + PHOTO, left : left + PHOTO] = photo
        pasted.append((name, photo, (top, left, top + PHOTO, left + PHOTO)))
    return canvas, pasted


def _draw_boxes(canvas: np.ndarray, boxes, labels, path: str) -> None:
    Image, _ = _require_demo_extra()
    from PIL import ImageDraw

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for (top, left, bottom, right), label in zip(boxes, labels):
        draw.rectangle([left - 2, top - 2, right + 1, bottom + 1], outline=(255, 210, 0), width=3)
        draw.text((left, bottom + 6), label, fill=(255, 255, 255))
    picture.save(path)


def run_demo(output_dir: str = "fcnify-demo", verbose: bool = True, figure: Optional[str] = None) -> List[DemoRow]:
    """Convert the pretrained EfficientNet-Lite0 and map the cat, espresso and rocket on one canvas.

    Args:
        output_dir: where to write ``canvas.png`` and one ``heatmap-PHOTO.png`` per photo.
        verbose: print what happens and the summary table.
        figure: also write all class maps side by side, small, to this PNG.

    Returns:
        One :class:`DemoRow` per photo.

    Raises:
        ModelLoadError: the ``demo`` extra is not installed.

    Example:
        >>> rows = run_demo("fcnify-demo")  # doctest: +SKIP
        >>> [row.inside for row in rows]  # doctest: +SKIP
        [True, True, True]
    """
    from ._convert import convert
    from ._models import load_model
    from .heatmap import class_names, heatmap, render_heatmap

    _require_demo_extra()
    say = print if verbose else (lambda *a, **k: None)
    model, size = load_model("efficientnet_lite0_imagenet")
    # TF-'same' padding fixes the stride: output_stride=16 or 8 is refused, so the native 32 is used.
    fcn = convert(model, input_size=size)
    say(fcn.conversion_report)
    canvas, pasted = compose_canvas()
    names = class_names(1000)
    classes = []
    for (name, _, wanted, _, _), (_, photo, _) in zip(PHOTOS, pasted):
        if wanted is None:  # the class the model gives this photo on its own, measured
            result = heatmap(fcn, photo, top=1)
            wanted = result.classes[0]
        classes.append(wanted)
    os.makedirs(output_dir, exist_ok=True)
    boxes = [box for _, _, box in pasted]
    canvas_path = os.path.join(output_dir, "canvas.png")
    _draw_boxes(canvas, boxes, [f"{n}: {names[c]}" for (n, _, _), c in zip(pasted, classes)], canvas_path)
    # the converted model carries timm's pretrained_cfg, so heatmap normalises as in training (mean = std = 0.5)
    result = heatmap(fcn, canvas, classes=classes)
    rows = []
    for k, ((name, _, box), index) in enumerate(zip(pasted, classes)):
        single = dataclasses.replace(result, cells=result.cells[k : k + 1], classes=[index], names=[result.names[k]])
        path = render_heatmap(single, os.path.join(output_dir, f"heatmap-{name}.png"))
        peak, (y, x) = result.peak(k)
        top, left, bottom, right = box
        inside = top <= y < bottom and left <= x < right
        rows.append(DemoRow(name, index, result.names[k], peak, (y, x), box, inside, path))
    if figure is not None:
        _small_figure(result, figure)
    h, w = result.cells.shape[1:]
    geo = result.geometry
    say(
        f"\n{CANVAS[0]}x{CANVAS[1]} canvas -> {h}x{w} cells, stride {geo.stride[0]}, "
        f"each cell sees {geo.receptive_field[0]}x{geo.receptive_field[1]} pixels"
    )
    say(f"{'photo':<9} {'id':>4} {'class':<18} {'peak':>6}  {'at':<16}  {'pasted box':<20} inside")
    for row in rows:
        say(row)
    say(f"wrote {canvas_path} and " + ", ".join(os.path.basename(r.picture) for r in rows) + f" in {output_dir}")
    return rows


def _small_figure(result, path: str) -> str:
    """All maps of ``result`` side by side, at a size fit to commit (a few hundred KB at most)."""
    from .heatmap import render_heatmap

    from PIL import Image

    render_heatmap(result, path, max_side=480)
    with Image.open(path) as picture:
        small = picture.convert("RGB")
    small = small.resize((small.width * 3 // 4, small.height * 3 // 4), Image.LANCZOS)
    small.quantize(colors=128).save(path, optimize=True)  # a palette PNG: small enough to commit
    return path
