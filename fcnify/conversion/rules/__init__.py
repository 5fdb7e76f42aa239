"""The rewrite rules, one identity each, tried in this order on every head node."""

from .feature_dim import FeatureDimToChannel
from .flatten import FlattenToIdentity
from .linear import LinearToConv
from .norm import BatchNorm1dToBatchNorm2d, LayerNormToChannelLayerNorm
from .pointwise import PointwiseOnMaps
from .pool import AdaptivePoolFold, GlobalPoolToWindowPool

__all__ = [
    "RULES",
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
