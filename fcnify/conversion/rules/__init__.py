"""The rewrite rules: one identity each, one file each (the file's docstring states it).

:data:`RULES` is the order in which the rewriter tries them on every head node; the first
whose ``check`` matches rewrites the node. See :mod:`._base` for the contract.
"""

from ._base import Decline, Found, Match, Rule
from .adaptive_pool_fold import AdaptivePoolFold
from .batch_norm1d_to_batch_norm2d import BatchNorm1dToBatchNorm2d
from .feature_dim_to_channel import FeatureDimToChannel
from .flatten_to_identity import FlattenToIdentity
from .global_pool_to_window_pool import GlobalPoolToWindowPool
from .layer_norm_to_channel_layer_norm import LayerNormToChannelLayerNorm
from .linear_to_conv import LinearToConv
from .pointwise_on_maps import PointwiseOnMaps

__all__ = [
    "RULES",
    "Rule",
    "Match",
    "Decline",
    "Found",
    "GlobalPoolToWindowPool",
    "AdaptivePoolFold",
    "FlattenToIdentity",
    "LinearToConv",
    "BatchNorm1dToBatchNorm2d",
    "LayerNormToChannelLayerNorm",
    "FeatureDimToChannel",
    "PointwiseOnMaps",
]

#: The rules, in the order they are tried on every head node (the first that matches rewrites it).
RULES = (
    GlobalPoolToWindowPool(),
    AdaptivePoolFold(),
    FlattenToIdentity(),
    LinearToConv(),
    BatchNorm1dToBatchNorm2d(),
    LayerNormToChannelLayerNorm(),
    FeatureDimToChannel(),
    PointwiseOnMaps(),
)
