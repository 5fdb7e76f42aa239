"""Files in and out: large images read lazily (slides, scenes, arrays, photos), foreground masks, and
class maps written as pyramidal TIFF, GeoTIFF or GeoJSON from a prediction store."""

from ._image import LazyImage
from ._mask import Mask, load_mask, tissue_mask
from ._outputs import FORMATS, OutputError, write_geojson, write_geotiff, write_output, write_tiff
from ._readers import READERS, open_image

__all__ = [
    "READERS",
    "LazyImage",
    "Mask",
    "load_mask",
    "open_image",
    "tissue_mask",
    "FORMATS",
    "OutputError",
    "write_output",
    "write_tiff",
    "write_geotiff",
    "write_geojson",
]
