"""Reading large images lazily (slides, scenes, arrays, photos) and foreground masks for them."""

from ._image import LazyImage
from ._mask import Mask, load_mask, tissue_mask
from ._readers import READERS, open_image

__all__ = ["READERS", "LazyImage", "Mask", "load_mask", "open_image", "tissue_mask"]
