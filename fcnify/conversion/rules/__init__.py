"""The rewrite rules, one identity each, tried in this order on every head node."""

from .feature_dim import FeatureDimToChannel
from .flatten import FlattenToIdentity
from .linear import LinearToConv
from .norm import BatchNorm1dToBatchNorm2d, ChannelLayerNorm, LayerNormToChannelLayerNorm, layer_norm_channels
from .pointwise import PointwiseOnMaps
from .pool import AdaptivePoolFold, GlobalPoolToWindowPool

__all__ = [
    "DEFAULT_RULES",
    "GlobalPoolToWindowPool",
    "AdaptivePoolFold",
    "FlattenToIdentity",
    "LinearToConv",
    "BatchNorm1dToBatchNorm2d",
    "LayerNormToChannelLayerNorm",
    "FeatureDimToChannel",
    "PointwiseOnMaps",
    "ChannelLayerNorm",
    "layer_norm_channels",
]

DEFAULT_RULES = (
    GlobalPoolToWindowPool(),
    AdaptivePoolFold(),
    FlattenToIdentity(),
    LinearToConv(),
    BatchNorm1dToBatchNorm2d(),
    LayerNormToChannelLayerNorm(),
    FeatureDimToChannel(),
    PointwiseOnMaps(),
)
