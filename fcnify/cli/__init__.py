"""The ``fcnify`` command: ``convert``, ``export``, ``heatmap``, ``zoo`` and ``demo``, one module each."""

from ._main import main

__all__ = ["main"]
