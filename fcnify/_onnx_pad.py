"""Keep a zero ``Pad`` before ``MaxPool`` from being fused into the pool by ONNX Runtime.

``F.pad(x, p)`` (or ``nn.ConstantPad2d(p, 0.)``, ``nn.ZeroPad2d``) followed by a max pool
exports, correctly, as ``Pad(value 0) -> MaxPool``. ONNX Runtime's ``Pad_Fusion`` rewrite
(on by default, level "basic") moves that padding into the ``MaxPool``'s ``pads``, but
``MaxPool`` pads with -inf: wherever a window at the border holds only negative values, the
fused graph returns their maximum where PyTorch returns 0. (The same bug in onnx-optimizer:
onnxsim/onnxsim#290.) BiT's stem (timm ``resnetv2_*_bit``: conv, ``ConstantPad2d(1, 0)``,
``MaxPool2d(3, 2)``) loses its stem border that way: 15% of the pooled map's max on the
border, 2e-3 of the logits, while the same file agrees to 6e-6 with optimisations off.

The file stays exact for every runtime with a ``Max(pad, pad)`` (the identity, bit for bit)
between the two: the ``Pad`` then no longer feeds the pool, so the rewrite does not apply.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

__all__ = ["guard_zero_pad_before_max_pool"]

#: Prefix of the names given to the inserted nodes and values.
GUARD = "fcnify_keep_pad"


def guard_zero_pad_before_max_pool(path: str) -> int:
    """Insert ``Max(p, p)`` after each constant ``Pad`` that feeds a ``MaxPool``; rewrite ``path``.

    A ``Cast`` between the two counts as feeding (ONNX Runtime fuses through it). A pad
    value known to be nonzero (-inf, as timm's ``MaxPool2dSame`` pads) is left alone.
    External weights, if any, stay where they are. Returns how many pads were guarded.
    """
    import onnx

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def feeds_max_pool(value: str) -> bool:
        for node in consumers.get(value, []):
            if node.op_type == "MaxPool" or (
                node.op_type == "Cast" and any(feeds_max_pool(out) for out in node.output)
            ):
                return True
        return False

    constants = _constants(graph)
    pads = [
        n
        for n in graph.node
        if n.op_type == "Pad"
        and n.domain in ("", "ai.onnx")
        and _is_zero_constant_pad(n, constants)
        and feeds_max_pool(n.output[0])
    ]
    for i, pad in enumerate(pads):
        value = pad.output[0]
        guarded = f"{GUARD}_{i}"
        for node in consumers[value]:
            node.input[:] = [guarded if name == value else name for name in node.input]
        guard = onnx.helper.make_node("Max", [value, value], [guarded], name=f"{GUARD}_{i}_max")
        graph.node.insert(list(graph.node).index(pad) + 1, guard)
    if pads:
        onnx.save(model, path)
    return len(pads)


def _constants(graph) -> Dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = attr.t
    out = {}
    for name, tensor in values.items():
        if tensor.data_location != tensor.EXTERNAL and np.prod(tensor.dims, dtype=np.int64) <= 1:
            out[name] = numpy_helper.to_array(tensor)
    return out


def _is_zero_constant_pad(node, constants: Dict[str, np.ndarray]) -> bool:
    """Mode ``constant`` (the default) with value 0, absent (0) or unknown."""
    attrs = {a.name: a for a in node.attribute}
    if "mode" in attrs and attrs["mode"].s not in (b"constant", b""):
        return False
    if "value" in attrs:  # opset < 11
        return attrs["value"].f == 0.0
    if len(node.input) < 3 or not node.input[2]:
        return True
    value = constants.get(node.input[2])
    return value is None or not np.any(value)
