"""BatchNorm1dToBatchNorm2d: a BatchNorm1d on feature vectors becomes a BatchNorm2d on the map.

Identity: ``BatchNorm1d(F)`` on ``(N, F)`` and ``BatchNorm2d(F)`` on ``(N, F, H, W)`` apply the
same per-feature statistics at every position; the state is copied as is.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ...graph import first_input
from .._rewrite import Context
from ._base import Found, Match, Rule
from ._norms import on_vector, per_feature_only

__all__ = ["BatchNorm1dToBatchNorm2d"]


class BatchNorm1dToBatchNorm2d(Rule):
    def check(self, node: fx.Node, ctx: Context) -> Found:
        if not (node.op == "call_module" and isinstance(ctx.module(node), nn.BatchNorm1d)):
            return self.skip(node)
        return on_vector(self, node, ctx)

    def rewrite(self, node: fx.Node, ctx: Context, match: Match) -> fx.Node:
        per_feature_only(node, ctx)
        bn1 = ctx.module(node)
        bn2 = nn.BatchNorm2d(bn1.num_features, bn1.eps, bn1.momentum, bn1.affine, bn1.track_running_stats)
        bn2.load_state_dict(bn1.state_dict())
        bn2 = bn2.to(next(iter(bn1.state_dict().values())).device) if bn1.state_dict() else bn2
        bn2.train(bn1.training)
        self.record(ctx, node, f"BatchNorm1d({bn1.num_features})", f"BatchNorm2d({bn1.num_features})")
        info = ctx.lifted(first_input(node))
        ctx.info[node] = info.derive(affine=info.affine and bn1.track_running_stats)
        return ctx.replace_module(node, bn2)
