"""Writing files without ever losing one: outputs are staged beside their place and moved in on success.

A conversion or an export that fails half way leaves the file that was there before untouched,
never a truncated one; an output that would replace one of the inputs is refused before any work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterable, Iterator, Sequence, Union

from ._errors import FcnifyError

__all__ = ["check_output", "staged"]

PathLike = Union[str, "os.PathLike[str]"]


def check_output(
    path: PathLike,
    *,
    inputs: Iterable[PathLike] = (),
    force: bool = True,
    suffixes: Sequence[str] = (),
    what: str = "output",
) -> str:
    """Refuse, before any work, an output that cannot be written or would destroy a file.

    Args:
        path: where the output goes.
        inputs: files the command reads; the output may never be one of them.
        force: whether an existing file may be replaced (the command line asks for ``--force``).
        suffixes: the endings the output may have (``.pt2``, ``.onnx``); empty: any.
        what: what the output is, for the message.

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    if not path:
        raise FcnifyError(f"the {what} path is empty. Hint: pass a file name, e.g. -o out{(suffixes or ('',))[0]}.")
    if os.path.isdir(path):
        raise FcnifyError(
            f"cannot write the {what} to {path}: it is a folder. Hint: name a file inside it, e.g. "
            f"{os.path.join(path, 'out' + (suffixes[0] if suffixes else ''))}."
        )
    if suffixes and not path.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise FcnifyError(
            f"cannot write the {what} to {path}: the name must end in {' or '.join(suffixes)}. "
            f"Hint: use {os.path.splitext(path)[0]}{suffixes[0]}."
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FcnifyError(f"cannot write {path}: folder {folder} does not exist. Hint: create it first.")
    if not os.access(folder, os.W_OK):
        raise FcnifyError(f"cannot write {path}: folder {folder} is not writable. Hint: choose another -o.")
    for source in inputs:
        source = os.fspath(source)
        if os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise FcnifyError(f"refusing to write the {what} over the input {source}. Hint: choose another -o.")
    if os.path.exists(path) and not force:
        raise FcnifyError(f"{path} exists. Hint: pass --force to replace it, or choose another -o.")
    return path


@contextlib.contextmanager
def staged(path: PathLike, companions: Sequence[str] = ()) -> Iterator[str]:
    """Write ``path`` (and ``path + suffix`` for each companion) in a private folder, then move it in.

    Yields the path to write to: the same file name inside a new folder beside ``path``, so that
    files referring to each other by name (an ONNX model and its ``.data`` weights) keep working.
    On success every file written is moved into place (``os.replace``, atomic on one file system)
    and an old companion that the new output does not have is removed; on failure nothing at
    ``path`` changes.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    work = tempfile.mkdtemp(prefix=".fcnify-", dir=folder)
    try:
        target = os.path.join(work, os.path.basename(path))
        yield target
        if not os.path.exists(target):
            raise FcnifyError(f"nothing was written to {path}. Hint: this is a bug in fcnify; please report it.")
        for suffix in companions:
            if os.path.exists(target + suffix):
                os.replace(target + suffix, path + suffix)
            elif os.path.exists(path + suffix):
                os.remove(path + suffix)  # belongs to the file being replaced
        os.replace(target, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
