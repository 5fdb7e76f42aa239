"""Analysis: where each output cell looks (stride, receptive field, centres) and the sizes a network takes."""

from ._geometry import (
    Axis,
    Geometry,
    Global,
    Merge,
    Pad,
    Step,
    TooSmall,
    ValidSizes,
    Window,
    geometry,
    plan_steps,
    propagate,
    propagate_axis,
    valid_sizes,
    window_function,
)

__all__ = [
    "geometry",
    "Geometry",
    "valid_sizes",
    "ValidSizes",
    "window_function",
    "plan_steps",
    "propagate",
    "propagate_axis",
    "Step",
    "Axis",
    "Window",
    "Pad",
    "Merge",
    "Global",
    "TooSmall",
]
