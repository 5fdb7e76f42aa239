"""Inference: running converted models on real images.

* ``_tiled`` -- :func:`predict_tiled`, any image size tile by tile, exactly;
* ``_padded`` -- :func:`predict_padded`, any size by padding to the next valid one;
* ``_heatmap`` -- :func:`heatmap` and :func:`render_heatmap`, class maps on the image's pixels;
* ``_segment`` -- :func:`segmenter`, FCN-32s/16s/8s segmentation networks;
* ``_resize`` -- :func:`resize_head`, a flatten-Linear head moved to another input size;
* ``_stream`` -- :func:`stream_predict`, bands of rows through the network, no overlap computed twice;
* ``_predict`` -- :func:`predict`, a slide or scene into a Zarr store, tiled, resumable, on Dask.
"""

from ._heatmap import HeatmapResult, class_names, heatmap, render_heatmap, resolve_normalization
from ._padded import predict_padded
from ._predict import PredictPlan, parse_memory, plan_predict, predict
from ._resize import RESIZE_METHODS, resize_head
from ._segment import Segmenter, bilinear_kernel, segmenter
from ._stream import RowStreamer, band_rows_for, stream_bands, stream_predict
from ._tiled import Tile, plan_tiles, predict_tiled

__all__ = [
    "predict",
    "plan_predict",
    "PredictPlan",
    "parse_memory",
    "predict_tiled",
    "stream_predict",
    "stream_bands",
    "RowStreamer",
    "band_rows_for",
    "plan_tiles",
    "Tile",
    "predict_padded",
    "heatmap",
    "HeatmapResult",
    "render_heatmap",
    "resolve_normalization",
    "class_names",
    "segmenter",
    "Segmenter",
    "bilinear_kernel",
    "resize_head",
    "RESIZE_METHODS",
]
