"""Graph basics: tracing a model with torch.fx, reading shapes off runs, fx helpers, input sizes.

The bottom layer of fcnify: everything above (analysis, verification, conversion, export,
inference) asks this package rather than writing its own copy.
"""

from ._fx import (
    ADAPTIVE_POOL_FUNCTIONS,
    arg,
    fetch_attr,
    first_input,
    is_adaptive_pool,
    is_call,
    is_flatten,
    normalize_dims,
    op_name,
    parent_name,
    set_arg,
)
from ._inputs import InputSize, device_and_dtype, example_input, resolve_input_size
from ._trace import (
    ShapeRun,
    available_memory,
    check_memory,
    describe_node,
    eliminate_dead_code,
    estimate_peak_bytes,
    eval_mode,
    format_bytes,
    has_side_effects,
    record_shapes,
    safe_deepcopy,
    second_size,
    trace_model,
)

__all__ = [
    "trace_model",
    "record_shapes",
    "ShapeRun",
    "eval_mode",
    "describe_node",
    "second_size",
    "resolve_input_size",
    "example_input",
    "device_and_dtype",
    "InputSize",
    "arg",
    "set_arg",
    "is_call",
    "first_input",
    "normalize_dims",
    "op_name",
    "parent_name",
    "fetch_attr",
    "is_flatten",
    "is_adaptive_pool",
    "ADAPTIVE_POOL_FUNCTIONS",
    "has_side_effects",
    "eliminate_dead_code",
    "safe_deepcopy",
    "estimate_peak_bytes",
    "check_memory",
    "available_memory",
    "format_bytes",
]
