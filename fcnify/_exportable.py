"""Export-time replacements for code the dynamo exporter gets wrong at sizes other than the example's.

The exporter follows one side of every ``if`` on a symbolic size, the side the example input
takes: torchvision's Swin takes the other side at its training size, and the file is wrong
there and right elsewhere. It lowers an adaptive pool with the example's bins, and it
translates attention for 4D tensors only. :func:`exportable` swaps such functions, in a copy
of the converted graph that shares the weights, for equivalents that compute the same numbers
from the symbolic size without branching, and modules with such branches (timm's MobileNetV5
MSFA) for stand-ins holding the same submodules. docs/onnx.md shows each problem without fcnify.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "exportable",
    "shifted_window_attention",
    "adaptive_avg_pool2d",
    "scaled_dot_product_attention",
    "MultiScaleFusion",
]


def shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: List[int],
    num_heads: int,
    shift_size: List[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Optional[Tensor] = None,
    proj_bias: Optional[Tensor] = None,
    logit_scale: Optional[Tensor] = None,
    training: bool = True,
) -> Tensor:
    """torchvision's ``shifted_window_attention`` (Swin and Swin V2) without a branch on the size.

    torchvision skips the window shift along an axis when one window covers the padded map
    (``if window_size[0] >= pad_H: shift_size[0] = 0``): at 224 the last stage's 7x7 map is one
    window. Here the shift is ``min(shift, (pad_H - window) * shift)``, which is 0 exactly then,
    the roll is an index gather by that amount and the mask is computed from positions rather
    than by slice assignment, so one exported graph is right at every size. With a shift of 0
    the mask is all zeros and the gather the identity, as torchvision's skipped branch.
    """
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shifted = sum(shift_size) > 0  # the block's configuration, the same at every size
    if shifted:
        shift = [torch.sym_min(s, (n - w) * s) for s, n, w in zip(shift_size, (pad_H, pad_W), window_size)]
        x = _roll(x, shift, (pad_H, pad_W), sign=1)

    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)

    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    if shifted:
        # region of each position: 0 before the last window, 1 in it but not shifted in, 2 shifted in
        regions = [
            (pos >= n - w).to(x.dtype) + (pos >= n - s).to(x.dtype)
            for pos, n, w, s in (
                (torch.arange(pad_H, device=x.device), pad_H, window_size[0], shift[0]),
                (torch.arange(pad_W, device=x.device), pad_W, window_size[1], shift[1]),
            )
        ]
        attn_mask = regions[0][:, None] * 3 + regions[1][None, :]
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if shifted:
        x = _roll(x, shift, (pad_H, pad_W), sign=-1)
    return x[:, :H, :W, :].contiguous()


def _roll(x: Tensor, shift, sizes, sign: int) -> Tensor:
    """``torch.roll(x, (-sign * shift[0], -sign * shift[1]), (1, 2))`` as gathers, for a symbolic shift.

    The index is two ranges joined (``s .. n-1, 0 .. s-1``) rather than ``(i + s) % n``: the
    ONNX translation of a remainder needs a constant divisor.
    """
    for dim, (s, n) in enumerate(zip(shift, sizes), start=1):
        start = s if sign > 0 else n - s
        index = torch.cat([torch.arange(start, n, device=x.device), torch.arange(0, start, device=x.device)])
        x = x.index_select(dim, index)
    return x


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """``F.adaptive_avg_pool2d`` as two averaging matrices built from the symbolic input size.

    The exporter lowers an adaptive pool to a fixed-kernel pool or to gathers with the bins of
    the example size (timm's CSATv2 pools every block's map to 7x7 for its spatial attention),
    and the file fails or is wrong at other sizes. Bin ``i`` of ``n`` inputs into ``out`` spans
    ``[floor(i n / out), ceil((i + 1) n / out))``, as in PyTorch; ``None`` keeps that axis.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    x = input
    if out_h is not None:
        x = _bins(x.shape[-2], out_h, x) @ x
    if out_w is not None:
        x = x @ _bins(x.shape[-1], out_w, x).transpose(0, 1)
    return x


def _bins(n, out: int, like: Tensor) -> Tensor:
    """The ``(out, n)`` matrix that averages each adaptive-pooling bin."""
    i = torch.arange(out, device=like.device)
    start = (i * n) // out
    end = ((i + 1) * n + out - 1) // out
    r = torch.arange(n, device=like.device)
    inside = (r[None, :] >= start[:, None]) & (r[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` computed on 4D tensors, whatever the rank of its inputs.

    The exporter translates SDPA for 4D ``(batch, heads, L, E)`` inputs only ("only 4D query,
    key, and value are supported"), while PyTorch takes any rank: timm's SAM ViT folds the
    heads into the batch, ``(B * heads, N, d)`` with a ``(B * heads, N, N)`` relative-position
    bias. Lower ranks get leading dims of 1 (as broadcasting does) and lose them afterwards;
    higher ranks have the dims before the heads (``-3``, which grouped-query attention splits)
    broadcast and flattened into one. Only views and reshapes around PyTorch's own SDPA: 4D
    calls pass through as they are, and SAM's 3D ones give the same numbers bit for bit (on
    CPU, PyTorch 2.14); ranks 2 and 5+, which PyTorch sends to its math kernel rather than the
    4D one, agree to rounding (below 1e-6).
    """
    tensors = [query, key, value] + ([attn_mask] if attn_mask is not None else [])
    rank = max(t.dim() for t in tensors)
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:  # not passed otherwise: PyTorch 2.4 has no such argument
        kwargs["enable_gqa"] = True
    if all(t.dim() == 4 for t in tensors[:3]) and rank == 4:
        return F.scaled_dot_product_attention(query, key, value, **kwargs)
    padded = [t[(None,) * (max(rank, 4) - t.dim())] for t in tensors]
    lead = None
    if rank > 4:
        lead = torch.broadcast_shapes(*(t.shape[:-3] for t in padded))
        padded = [t.expand(*lead, *t.shape[-3:]).reshape(-1, *t.shape[-3:]) for t in padded]
    if attn_mask is not None:
        kwargs["attn_mask"] = padded[3]
    out = F.scaled_dot_product_attention(*padded[:3], **kwargs)
    if lead is not None:
        return out.reshape(*lead, *out.shape[-3:])
    return out.flatten(0, 4 - rank)


class MultiScaleFusion(nn.Module):
    """timm's ``MobileNetV5MultiScaleFusionAdapter`` (MobileNetV5's MSFA) without branches on the size.

    The adapter upsamples the lower-resolution maps to the first one's size, concatenates them,
    runs its ``ffn`` and brings the result to ``output_resolution``: unchanged if the map is that
    size already, average-pooled with kernel = stride = H / out if it is a multiple, else
    resized bilinearly. Exported at a size where the map is not a multiple (mobilenetv5_300m
    at 832x896), the file resizes at 768x768 too, where timm pools. When H is a multiple of
    out, that pool has the bins of an adaptive pool to ``out``, and an adaptive pool to the
    same size is the identity: so the result is the adaptive pool where H and W are multiples
    of out, else the bilinear resize. Both are computed, the adaptive pool with averaging
    matrices built from the symbolic size, and ``torch.where`` picks one by a condition
    computed from the size as a tensor. Holds the adapter's ``ffn`` and ``norm`` (shared).

    The maps are resized to the first one's size unless their size is known to be the same
    (resizing to the same size is the identity): where timm would not resize a map of another
    size, its concatenation fails.
    """

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.ffn, self.norm = adapter.ffn, adapter.norm
        self.output_resolution = tuple(adapter.output_resolution)
        self.interpolation_mode = adapter.interpolation_mode
        self.training = adapter.training

    def forward(self, inputs: List[Tensor]) -> Tensor:
        high = inputs[0].shape[-2:]
        resized = [inputs[0]]
        for img in inputs[1:]:
            if not all(statically_known_true(n == m) for n, m in zip(img.shape[-2:], high)):
                img = F.interpolate(img, size=high, mode=self.interpolation_mode)
            resized.append(img)
        img = self.ffn(torch.cat(resized, dim=1))
        out = self.output_resolution
        pooled = adaptive_avg_pool2d(img, out)
        bilinear = F.interpolate(img, size=out, mode="bilinear")
        zero = torch.zeros((), dtype=torch.int64, device=img.device)
        divisible = ((zero + high[0]) % out[0] == 0) & ((zero + high[1]) % out[1] == 0)  # a tensor, not a guard
        return self.norm(torch.where(divisible, pooled, bilinear))


def _fusion_adapter_class() -> Optional[type]:
    """timm's MSFA class if timm's MobileNetV5 module is loaded (it is when a model holds one)."""
    return getattr(sys.modules.get("timm.models.mobilenetv5"), "MobileNetV5MultiScaleFusionAdapter", None)


def _replacements() -> Dict[Callable, Callable]:
    table: Dict[Callable, Callable] = {
        F.adaptive_avg_pool2d: adaptive_avg_pool2d,
        torch._C._nn.adaptive_avg_pool2d: adaptive_avg_pool2d,
        F.scaled_dot_product_attention: scaled_dot_product_attention,  # torch._C._nn's, as fx records it
    }
    try:
        from torchvision.models import swin_transformer
    except ImportError:  # torchvision is optional for exporting other models
        return table
    table[swin_transformer.shifted_window_attention] = shifted_window_attention
    return table


def _is_global(output_size) -> bool:
    """An adaptive pool to 1x1: a mean, which exports well as it is."""
    return output_size in (1, (1, 1), [1, 1])


def _swap(node: fx.Node, table: Dict[Callable, Callable], modules: Dict[str, nn.Module]) -> Optional[tuple]:
    """What replaces ``node`` in the copy: ``("function", f)`` for its target, ``("pool", size)`` for
    an ``nn.AdaptiveAvgPool2d`` call, ``("module", stand_in)`` for its submodule; None to keep it."""
    if node.op == "call_function" and node.target in table:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if table[node.target] is adaptive_avg_pool2d and _is_global(size):
            return None
        return "function", table[node.target]
    if node.op != "call_module":
        return None
    module = modules.get(node.target)
    if type(module) is nn.AdaptiveAvgPool2d and not _is_global(module.output_size):
        return "pool", module.output_size
    adapter = _fusion_adapter_class()
    if adapter is not None and type(module) is adapter:
        return "module", MultiScaleFusion(module)
    return None


def exportable(fcn: nn.Module) -> nn.Module:
    """``fcn`` itself, or a copy of its graph (sharing every weight) with the replacements made.

    The user's model is never changed: the copy has its own graph and code, the same
    submodules and parameters, and stand-ins (:class:`MultiScaleFusion`) in containers of its
    own. A global average pool (output 1x1) exports well as it is.
    """
    if not isinstance(fcn, fx.GraphModule):
        return fcn
    table, modules = _replacements(), dict(fcn.named_modules())
    swaps = {node.name: swap for node in fcn.graph.nodes if (swap := _swap(node, table, modules))}
    if not swaps:
        return fcn
    graph = copy.deepcopy(fcn.graph)
    stand_ins = {}
    for node in graph.nodes:
        kind, value = swaps.get(node.name, (None, None))
        if kind == "function":
            node.target = value
        elif kind == "pool":
            node.op, node.target, node.args = "call_function", adaptive_avg_pool2d, (*node.args, value)
        elif kind == "module":
            stand_ins[node.target] = value
    module = fx.GraphModule(fcn, graph, type(fcn).__name__)
    for target, stand_in in stand_ins.items():
        parent, _, name = target.rpartition(".")
        holder = module.get_submodule(parent)
        if holder is not fcn.get_submodule(parent):  # the copy's own container, never the user's module
            setattr(holder, name, stand_in)
    module.training = fcn.training  # not .train(): that would set every shared submodule's mode
    return module
