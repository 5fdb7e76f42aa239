"""Models: classifiers by name (torchvision, timm, a saved file), real offline weights, calibration."""

from ._calibrate import calibrate_batchnorm
from ._lite0 import LITE0_NAME, load_lite0, map_by_order
from ._load import load_model, load_weights

__all__ = ["load_model", "load_weights", "load_lite0", "LITE0_NAME", "map_by_order", "calibrate_batchnorm"]
