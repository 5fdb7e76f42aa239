"""The conversion modes; the command line takes its ``--mode`` choices from here (no torch needed)."""

from __future__ import annotations

import enum
from typing import Union

from ._errors import FcnifyError

__all__ = ["Mode", "MODES", "as_mode"]


class Mode(str, enum.Enum):
    """How a converted classifier reads a larger image.

    Attributes:
        WINDOW: slide the classifier over the image, one prediction per training-size window
            (``(N, K, 1, 1)`` at the training size).
        DENSE: one prediction per feature-map cell (the global pool is removed).
        GLOBAL: keep ``(N, K)`` logits, pooled over the whole image, at any size.

    A ``Mode`` is a ``str``: ``Mode.WINDOW == "window"``, and every function that takes a mode
    takes the plain string too.

    >>> Mode("dense"), str(Mode.GLOBAL), [m.value for m in Mode]
    (<Mode.DENSE: 'dense'>, 'global', ['window', 'dense', 'global'])
    """

    WINDOW = "window"
    DENSE = "dense"
    GLOBAL = "global"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


#: The mode names, in the order the command line and the docs list them.
MODES = tuple(m.value for m in Mode)


def as_mode(mode: Union[Mode, str]) -> Mode:
    """``mode`` as a :class:`Mode`.

    Raises:
        FcnifyError: ``mode`` is not one of ``window``, ``dense``, ``global``.
    """
    try:
        return Mode(mode)
    except ValueError:
        raise FcnifyError(f"unknown mode {mode!r}. Hint: use one of {', '.join(MODES)}.") from None
