"""Cells at the probe size: each cell of the converted map is the original head on that cell's window.

At the training size the converted model's ``1 x 1`` map equals the logits, which says nothing about
the other cells of a larger map: a pool taken for the global pool too early, a window pool of the
wrong stride or a flipped map all pass there. At the probe size the body's maps are larger, and

* ``window`` mode: output cell ``(i, j)`` equals the original head applied to the window
  ``[i : i + h, j : j + w]`` of every map the head reads (``h x w`` its extent at the training size);
* ``dense`` mode after a pool: output cell ``(i, j)`` equals the original head applied to the single
  position ``[i, j]`` (a pool over one position is that position).

The number of cells along each axis follows from the body's maps, so a map of the wrong size fails
as well. The head is the original graph's own nodes, cut out of it: no rule of fcnify is involved.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..graph import ShapeRun
from ..verification import output_scale

__all__ = ["head_module", "cell_check"]

#: How many cells are compared: the four corners, the centre, and two seeded draws.
_RANDOM_CELLS = 2


def head_module(gm: fx.GraphModule, head: set) -> Tuple[fx.GraphModule, List[fx.Node]]:
    """The head of ``gm`` as a module of its own, and the body nodes it reads (its inputs, in order)."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    inputs: List[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
        elif node in head:
            env[node] = graph.node_copy(node, lambda n: env[n])
        elif any(u in head or u.op == "output" for u in node.users):
            if node.op == "get_attr":
                env[node] = graph.node_copy(node)
            else:
                env[node] = graph.placeholder(f"body_{node.name}")
                inputs.append(node)
    return fx.GraphModule(gm, graph), inputs


def cell_check(
    gm: fx.GraphModule,
    head: set,
    run: ShapeRun,
    body_values: Sequence[Any],
    outputs: Sequence[Any],
    window: bool,
) -> Optional[Tuple[float, float, Tuple[int, ...], Tuple[int, ...], int]]:
    """Compare cells of the converted map with the original head on their windows.

    Args:
        gm: the traced original; ``head`` its head nodes; ``run`` its shapes at the training size.
        body_values: the values at the probe size of the body nodes the head reads, in the order of
            :func:`head_module`'s inputs (taken from a run of the converted model, whose body is
            the original's, copied node for node).
        outputs: the converted model's outputs at the probe size, flattened.
        window: cells see a window of the training-size extent (``window`` mode, or ``dense``
            without a pool); otherwise a single position.

    Returns:
        ``(max abs error, reference scale, output cells, expected cells, cells compared)``, or None
        when the head's inputs cannot be cut into windows (no map that grows, maps that disagree on
        the number of cells, a head that does not run on a window).
    """
    module, inputs = head_module(gm, head)
    windows: List[Tuple[torch.Tensor, Tuple[int, ...], Tuple[int, ...]]] = []
    cells: Optional[Tuple[int, ...]] = None
    for node, value in zip(inputs, body_values):
        if not isinstance(value, torch.Tensor):
            return None
        small, large = run.shape(node), tuple(value.shape)
        if small is None or len(small) != len(large):
            return None
        axes = tuple(d for d in range(1, len(large)) if small[d] != large[d])
        if not axes:
            windows.append((value, (), ()))
            continue
        extent = tuple(small[d] if window else 1 for d in axes)
        count = tuple(large[d] - e + 1 for d, e in zip(axes, extent))
        if cells is not None and count != cells:
            return None
        cells = count
        windows.append((value, axes, extent))
    if cells is None or len(cells) != 2:
        return None
    maps = [(i, o) for i, o in enumerate(outputs) if isinstance(o, torch.Tensor) and o.dim() >= 3]
    if not maps:
        return None
    found = tuple(maps[0][1].shape[-2:])
    if any(tuple(o.shape[-2:]) != found for _, o in maps):
        return None
    if found != cells:
        return float("inf"), 1.0, found, cells, 0
    error, scale = 0.0, output_scale(torch.zeros(0))
    for i, j in _cells(cells):
        args = []
        for value, axes, extent in windows:
            for axis, start, length in zip(axes, (i, j), extent):
                value = value.narrow(int(axis), start, int(length))
            args.append(value)
        try:
            with torch.no_grad():
                reference = pytree.tree_flatten(module(*args))[0]
        except Exception:  # the head does not run on a window (a fixed-size pool in dense mode)
            return None
        for index, out in maps:
            ref = reference[index] if index < len(reference) else None
            if not isinstance(ref, torch.Tensor) or ref.dim() + 2 != out.dim():
                return None
            ref_f, out_f = ref.detach().double(), out[..., i, j].detach().double()
            if ref_f.shape != out_f.shape:
                return float("inf"), 1.0, found, cells, 0
            scale = max(scale, output_scale(ref_f))
            error = max(error, (out_f - ref_f).abs().max().item() if ref_f.numel() else 0.0)
    return error, scale, found, cells, len(_cells(cells))


def _cells(cells: Tuple[int, ...]) -> List[Tuple[int, int]]:
    h, w = cells
    chosen = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(_RANDOM_CELLS):
        chosen.append(
            (int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator)))
        )
    return list(dict.fromkeys(chosen))
