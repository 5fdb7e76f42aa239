"""``fcnify.predict``: run a fully convolutional net over a slide or scene into a Zarr store, tile by tile.

Tiles follow the exact plan of :mod:`fcnify.tiled` (a tile starts on a multiple of the stride,
and keeps the cells whose window lies inside it or runs past the image's edge), with one more
constraint: every tile provides exactly one chunk of the output, so tiles are written
independently (by a writer thread, or by Dask workers on other machines) and a killed run resumes
from the chunks already written. Memory holds a few tiles, never the whole map.

The store (a Zarr v3 directory) holds:

``scores``
    float32 (or float16) array ``(K, h, w)``: ``scores[k, i, j]`` is ``fcn(image)[0, k, i, j]``
    on the level that was read. Chunks are ``(K, cy, cx)``: one chunk per tile. Cells of
    skipped (masked) tiles are NaN (the array's fill value).
``done``
    uint8 array ``(rows, cols)``, one element per tile and chunk ``(1, 1)``: 0 not yet
    written, 1 computed, 2 skipped by the mask. A tile's flag is written after its scores.

and the group attribute ``"fcnify"``, a dict (this schema is what readers of the store code
against; coordinates and lengths are in LEVEL-0 pixels, pixel ``(y, x)`` centred on ``(y, x)``)::

    {
      "version": "0.1.0",                 # fcnify.__version__ that wrote the store
      "model": "ResNet",                  # model name (class name, or the name/path given)
      "classes": ["tench", ...] | [0, 1, ...],   # one entry per channel of `scores`: names or indices
      "stride": [sy, sx],                 # level-0 pixels between neighbouring cells
      "offset": [oy, ox],                 # level-0 coordinates of the centre of cell (0, 0)
      "receptive_field": [ry, rx],        # level-0 pixels one cell sees
      "level": 0,                         # pyramid level read
      "downsample": 1.0,                  # level-0 pixels per pixel of that level
      "mpp": 0.25 | null,                 # microns per pixel of the level read
      "image": {"path": "...", "shape": [H, W, C]},   # shape of the level read
      "crs": "PROJCS[...]" | null,        # WKT, for rasters read through rasterio
      "transform": [x0, dx, rx, y0, ry, dy] | null,   # level-0 affine, GDAL order
      "fill": "nan",                      # value of cells not computed (masked tiles)
      "args": {...},                      # what identifies the run (compared on resume)
      "tiles": {"total": T, "skipped": S, "done": D}  # done counts computed and skipped tiles
    }

Cell ``(i, j)`` is centred on level-0 pixel ``(oy + i * sy, ox + j * sx)``; with a GDAL
transform ``(x0, dx, rx, y0, ry, dy)`` its map coordinates are ``x0 + (ox + j * sx + 0.5) * dx``
and ``y0 + (oy + i * sy + 0.5) * dy`` (pixel corners at integer coordinates in GDAL).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .._errors import FcnifyError
from ..analysis import Geometry, geometry
from ..graph import eval_mode as _eval
from ..io import LazyImage, load_mask, open_image
from ._tiled import Tile, _check_translation_invariant, _groups

__all__ = ["PredictPlan", "parse_memory", "plan_predict", "predict"]

log = logging.getLogger("fcnify")

Pair = tuple[int, int]
_GLOB = re.compile(r"[*?\[]")
DEFAULT_MEMORY = 2 * 2**30


# -- sizes and memory -------------------------------------------------------------------------


def parse_memory(value: str | float) -> int:
    """``"2GB"``, ``"500 MB"``, ``"1.5GiB"`` or a number of bytes, as bytes.

    Example:
        >>> parse_memory("2GB"), parse_memory("512MiB"), parse_memory(10**6)
        (2147483648, 536870912, 1000000)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise FcnifyError(f"memory must be positive, got {value}. Hint: memory='2GB'.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not match or float(match.group(1)) <= 0:
        raise FcnifyError(f"'{value}' is not an amount of memory. Hint: use e.g. 2GB, 500MB or a number of bytes.")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _peak_activation_bytes(fcn: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Peak bytes of the values alive at once during ``fcn(x)`` (fx frees a value after its last
    use), and the output. Falls back to the sum of all module outputs for untraceable models."""
    gm = fcn if isinstance(fcn, fx.GraphModule) else None
    if gm is None:
        with contextlib.suppress(Exception):
            from ..graph import trace_model

            gm = trace_model(fcn)
    if gm is None:
        sizes: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(_nbytes(o))) for m in fcn.modules()]
        try:
            with torch.no_grad():
                out = fcn(x)
        finally:
            for hook in hooks:
                hook.remove()
        return sum(sizes), out
    sizes_by_node: dict[fx.Node, int] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            sizes_by_node[n] = _nbytes(result)
            return result

    with torch.no_grad():
        out = Recorder(gm).run(x)
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    ends: dict[int, int] = collections.defaultdict(int)
    starts: dict[int, int] = collections.defaultdict(int)
    for n, size in sizes_by_node.items():
        last = max((order[u] for u in n.users), default=order[n])
        starts[order[n]] += size
        ends[last] += size
    live = peak = 0
    for k in range(len(order)):
        live += starts[k]
        peak = max(peak, live)
        live -= ends[k]
    return peak, out


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


# -- the plan ---------------------------------------------------------------------------------


@dataclasses.dataclass
class PredictPlan:
    """Tiles and chunks of one run.

    Attributes:
        geometry: the network's geometry (in pixels of the level read).
        image_size: ``(H, W)`` of the level read.
        map_size: ``(h, w)`` of the output.
        cells: ``(cy, cx)``, cells per tile and per chunk (edge tiles have fewer).
        tile: ``(ty, tx)``, the largest input tile, overlap included.
        tiles: every tile; ``tiles[r * cols + c]`` provides chunk ``(r, c)``.
        grid: ``(rows, cols)`` of tiles.
    """

    geometry: Geometry
    image_size: Pair
    map_size: Pair
    cells: Pair
    tile: Pair
    tiles: list[Tile]
    grid: Pair

    @property
    def overlap(self) -> float:
        """Input pixels computed more than once, as a fraction of the image."""
        computed = sum((t.y1 - t.y0) * (t.x1 - t.x0) for t in self.tiles)
        return computed / (self.image_size[0] * self.image_size[1]) - 1.0


def _axis_segments(
    n: int, cells: int, geo: Geometry, dim: int, n_out: int, minimum: int
) -> list[tuple[int, int, int, int]]:
    """``(start, stop, first cell, last cell + 1)`` of the tiles along one axis, ``cells`` cells each.

    A tile starts on a multiple of the stride (or at 0) at or before its first cell's window and
    ends at its last cell's window (or at the image's edge), as in :func:`fcnify.tiled.plan_tiles`;
    it is widened to the left to at least ``minimum`` pixels (the network's smallest input).
    """
    s, o, r = geo.stride[dim], geo.offset[dim], geo.receptive_field[dim]
    segments = []
    for i0 in range(0, n_out, cells):
        i1 = min(n_out, i0 + cells)
        a = 0 if i0 == 0 else max(0, ((o + i0 * s) // s) * s)
        b = n if i1 == n_out else min(n, o + (i1 - 1) * s + r)
        while b - a < minimum and a > 0:
            a = max(0, a - s)
        b = max(b, min(n, a + minimum))
        segments.append((a, b, i0, i1))
    return segments


def plan_predict(geo: Geometry, image_size: Pair, cells: Pair, minimum: Pair) -> PredictPlan:
    """The tiles that give chunks of ``cells`` output cells over an ``image_size`` input.

    Example:
        >>> import torch, fcnify
        >>> from fcnify.inference import plan_predict
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 5), torch.nn.MaxPool2d(2))
        >>> plan = plan_predict(fcnify.geometry(net, input_size=(32, 32)), (100, 40), (20, 20), (6, 6))
        >>> plan.map_size, plan.grid, [(t.y0, t.y1, t.i0, t.i1) for t in plan.tiles]
        ((48, 18), (3, 1), [(0, 44, 0, 20), (40, 84, 20, 40), (80, 100, 40, 48)])
    """
    h_out, w_out = geo.output_size(*image_size)
    rows = _axis_segments(image_size[0], cells[0], geo, 0, h_out, minimum[0])
    cols = _axis_segments(image_size[1], cells[1], geo, 1, w_out, minimum[1])
    tiles = [Tile(y0, y1, x0, x1, i0, i1, j0, j1) for y0, y1, i0, i1 in rows for x0, x1, j0, j1 in cols]
    tile = (max(b - a for a, b, _, _ in rows), max(b - a for a, b, _, _ in cols))
    return PredictPlan(geo, image_size, (h_out, w_out), cells, tile, tiles, (len(rows), len(cols)))


def _cells_for_tile(tile: int, geo: Geometry, dim: int, n_out: int) -> int:
    """Cells per chunk such that no tile is larger than ``tile`` pixels (a stride less one of slack),
    spread evenly over the tiles that takes."""
    s, r = geo.stride[dim], geo.receptive_field[dim]
    cells = (tile - r + 1) // s
    if cells < 1:
        raise FcnifyError(
            f"a tile of {tile} pixels along {'yx'[dim]} holds no cell of this network: a tile needs a receptive "
            f"field ({r}) plus a stride ({s}) less one pixel. Hint: use tile={r + s - 1} or more, or a larger memory=."
        )
    cells = min(cells, n_out)
    return -(-n_out // -(-n_out // cells))  # as many tiles, evened out: smaller tiles, same overlap


# -- the model --------------------------------------------------------------------------------


def _load_fcn(fcn: Any, input_size: Sequence[int] | None = None) -> nn.Module:
    """A converted model, or one loaded from a path: ``.pt2`` (torch.export) or a CLI model name."""
    if isinstance(fcn, nn.Module):
        return fcn
    if not isinstance(fcn, (str, os.PathLike)):
        raise FcnifyError(f"cannot use a {type(fcn).__name__} as a model. Hint: pass fcnify.convert(model) or a path.")
    name = os.fspath(fcn)
    if name.endswith(".pt2"):
        raise FcnifyError(
            f"{name} is a torch.export program: its ATen graph carries no layer geometry that fcnify can read "
            "back, so its tiles cannot be planned. Hint: pass the model name (fcnify predict resnet50 ...) or "
            "fcnify.convert(model) in Python."
        )
    from ..conversion import convert
    from ..models import load_model

    model, size = load_model(name)
    size = tuple(input_size) if input_size else size
    if size is None:
        raise FcnifyError(f"{name} records no training size. Hint: pass input_size=(H, W), or --input-size.")
    converted = convert(model, input_size=size)
    converted.fcnify_name = name  # type: ignore[assignment]
    return converted


def _model_input_size(fcn: nn.Module) -> tuple[int, int, int]:
    report = getattr(fcn, "conversion_report", None)
    if report is not None:
        return tuple(report.input_size)  # type: ignore[return-value]
    size = getattr(fcn, "fcnify_input_size", None)
    if size is not None and len(size) == 3:
        return tuple(size)  # type: ignore[return-value]
    conv = next((m for m in fcn.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    if size is not None:
        return (channels, *size)  # type: ignore[return-value]
    return (channels, 224, 224)


def _fingerprint(fcn: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(fcn.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(fcn, fx.GraphModule):
        digest.update(fcn.code.encode())
    return digest.hexdigest()[:16]


# -- the store --------------------------------------------------------------------------------


def _open_store(
    output: str, attrs: dict[str, Any], plan: PredictPlan, channels: int, dtype: str, resume: bool, force: bool
) -> tuple[Any, Any, Any]:
    import zarr

    if os.path.exists(output) and not resume:
        if not force:
            raise FcnifyError(
                f"{output} already exists. Hint: pass force=True (--force) to overwrite it, "
                "or resume=True (--resume) to finish it."
            )
        if not os.path.isdir(output) or not _is_fcnify_store(output):
            raise FcnifyError(
                f"{output} exists and is not a store written by fcnify predict; not overwriting it. "
                "Hint: choose another output path."
            )
        shutil.rmtree(output)
    if resume and os.path.exists(output):
        if not _is_fcnify_store(output):
            raise FcnifyError(
                f"cannot resume {output}: it is not a store written by fcnify predict. "
                "Hint: choose another output path."
            )
        group = zarr.open_group(output, mode="r+")
        previous = dict(group.attrs).get("fcnify", {}).get("args", {})
        if previous != attrs["args"]:
            changed = sorted(k for k in set(previous) | set(attrs["args"]) if previous.get(k) != attrs["args"].get(k))
            raise FcnifyError(
                f"cannot resume {output}: it was written with other arguments ({', '.join(changed)} differ: "
                f"{', '.join(f'{k}={previous.get(k)!r}' for k in changed[:3])}). Hint: run with the same model and "
                "arguments, or pass force=True (--force) without resume to start again."
            )
        return group, group["scores"], group["done"]
    group = zarr.open_group(output, mode="w")
    cy, cx = plan.cells
    scores = group.create_array(
        "scores",
        shape=(channels, *plan.map_size),
        chunks=(channels, cy, cx),
        dtype=dtype,
        fill_value=float("nan"),
        dimension_names=("class", "y", "x"),
    )
    done = group.create_array(
        "done", shape=plan.grid, chunks=(1, 1), dtype="uint8", fill_value=0, dimension_names=("tile_row", "tile_col")
    )
    group.attrs["fcnify"] = attrs
    return group, scores, done


def _is_fcnify_store(path: str) -> bool:
    meta = os.path.join(path, "zarr.json")
    if not os.path.isfile(meta):
        return False
    try:
        with open(meta) as handle:
            return "fcnify" in json.load(handle).get("attributes", {})
    except (OSError, ValueError):
        return False


# -- running tiles ----------------------------------------------------------------------------


class _Progress:
    """A tqdm bar of tiles whose postfix shows megapixels per second and the recomputed overlap."""

    def __init__(self, total: int, overlap: float, stride: Pair, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="tile", desc="fcnify predict", disable=not enabled, dynamic_ncols=True)
        self.overlap, self.area = overlap, stride[0] * stride[1]
        self.start = time.perf_counter()
        self.megapixels = 0.0
        self.bar.set_postfix_str(f"overlap {100 * overlap:.0f}%")

    def update(self, tiles: Sequence[Tile]) -> None:
        self.megapixels += sum((t.i1 - t.i0) * (t.j1 - t.j0) for t in tiles) * self.area / 1e6
        self.bar.set_postfix_str(f"{self.rate:.2f} MP/s, overlap {100 * self.overlap:.0f}%", refresh=False)
        self.bar.update(len(tiles))

    @property
    def rate(self) -> float:
        return self.megapixels / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()


@dataclasses.dataclass
class _Job:
    """What a process needs to compute tiles: everything is plain data (sent to Dask workers)."""

    image: str | None
    level: int
    reader: str | None
    output: str
    channels: list[int] | None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
    dtype: str
    stride: Pair


def _prepare(window: np.ndarray, job: _Job, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.from_numpy(window).permute(2, 0, 1).unsqueeze(0)
    if job.normalize is not None:
        mean = torch.tensor(job.normalize[0], dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(job.normalize[1], dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.to(device=device, dtype=dtype)


def _cells(result: torch.Tensor, tiles: Sequence[Tile], job: _Job) -> Iterator[tuple[Tile, np.ndarray]]:
    """The cells each tile provides, cut from the model's output on a batch of tiles."""
    if not isinstance(result, torch.Tensor) or result.dim() != 4:
        raise FcnifyError(
            f"predict needs a model with one (N, K, h, w) output, got {type(result).__name__}. "
            "Hint: convert in window or dense mode."
        )
    sy, sx = job.stride
    for k, t in enumerate(tiles):
        ti, tj = t.i0 - t.y0 // sy, t.j0 - t.x0 // sx
        rows, cols = t.i1 - t.i0, t.j1 - t.j0
        part = result[k]
        if part.shape[1] < ti + rows or part.shape[2] < tj + cols:
            raise FcnifyError(
                f"a {t.y1 - t.y0}x{t.x1 - t.x0} tile gives a {part.shape[1]}x{part.shape[2]} map, smaller than "
                "fcnify.geometry predicts. Hint: report this model; run the whole image meanwhile."
            )
        part = part[:, ti : ti + rows, tj : tj + cols]
        if job.channels is not None:
            part = part[job.channels]
        yield t, part.float().cpu().numpy().astype(job.dtype, copy=False)


def _write(scores: Any, done: Any, t: Tile, index: Pair, block: np.ndarray) -> None:
    scores[:, t.i0 : t.i1, t.j0 : t.j1] = block
    done[index[0], index[1]] = 1  # after the scores: a flag means the chunk is complete


def _run_local(
    fcn: nn.Module,
    image: LazyImage,
    plan: PredictPlan,
    pending: list[int],
    scores: Any,
    done: Any,
    job: _Job,
    batch_size: int,
    device: torch.device,
    workers: int,
    bar: _Progress,
) -> None:
    """Read (``workers`` threads, ahead of the model), compute (this thread) and write (one thread)."""
    param = next(iter(fcn.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cols = plan.grid[1]
    tiles = [plan.tiles[k] for k in pending]
    index_of = {id(plan.tiles[k]): (k // cols, k % cols) for k in pending}
    batches = list(_groups(tiles, batch_size))
    lock = threading.Lock()  # rasterio datasets are not thread-safe

    def read(batch: list[Tile]) -> torch.Tensor:
        with lock if image.reader in ("rasterio", "openslide") else contextlib.nullcontext():
            windows = [image.read(t.y0, t.x0, t.y1 - t.y0, t.x1 - t.x0) for t in batch]
        return torch.cat([_prepare(w, job, device, dtype) for w in windows])

    ahead = max(2, workers + 1)
    with (
        cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="fcnify-read") as readers,
        cf.ThreadPoolExecutor(1, thread_name_prefix="fcnify-write") as writer,
        torch.no_grad(),
        _eval(fcn),
    ):
        reads: collections.deque = collections.deque()
        writes: collections.deque = collections.deque()
        queued = 0
        for batch in batches:
            while queued < len(batches) and len(reads) < ahead:
                reads.append(readers.submit(read, batches[queued]))
                queued += 1
            x = reads.popleft().result()
            result = fcn(x)
            for t, block in _cells(result, batch, job):
                writes.append((t, writer.submit(_write, scores, done, t, index_of[id(t)], block)))
            while len(writes) > 2 * batch_size or (writes and writes[0][1].done()):
                t, future = writes.popleft()
                future.result()
                bar.update([t])
        while writes:
            t, future = writes.popleft()
            future.result()
            bar.update([t])


# -- Dask ---------------------------------------------------------------------------------------

_WORKER_CACHE: dict[tuple[str, ...], Any] = {}


def _worker_tiles(program: str, job: _Job, tiles: list[tuple[int, int, Tile]]) -> int:
    """On a Dask worker: load the exported model and the image once, compute ``tiles`` and write them."""
    import zarr

    key = ("model", program, str(os.path.getmtime(program)))
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = torch.export.load(program).module()
    fcn = _WORKER_CACHE[key]
    image_key = ("image", str(job.image), str(job.level), str(job.reader))
    if image_key not in _WORKER_CACHE:
        _WORKER_CACHE[image_key] = open_image(job.image, level=job.level, reader=job.reader)
    image = _WORKER_CACHE[image_key]
    group = zarr.open_group(job.output, mode="r+")
    scores, done = group["scores"], group["done"]
    with torch.no_grad():
        for r, c, t in tiles:
            x = _prepare(image.read(t.y0, t.x0, t.y1 - t.y0, t.x1 - t.x0), job, torch.device("cpu"), torch.float32)
            for _, block in _cells(fcn(x), [t], job):
                _write(scores, done, t, (r, c), block)
    return len(tiles)


@contextlib.contextmanager
def _dask_client(client: Any) -> Iterator[Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise FcnifyError("client= needs Dask. Hint: pip install 'fcnify[dask]'.") from err
    if not isinstance(client, str):
        yield client
        return
    match = re.fullmatch(r"local:(\d+)", client)
    if match:
        n = int(match.group(1))
        if n < 1:
            raise FcnifyError(f"{client}: a local cluster needs at least one worker. Hint: local:2.")
        with (
            LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as local,
        ):
            yield local
        return
    if not client.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise FcnifyError(f"'{client}' is not a Dask scheduler. Hint: local:N or tcp://HOST:PORT.")
    try:
        remote = Client(client, timeout="20s")
    except OSError as err:
        raise FcnifyError(f"cannot reach the Dask scheduler at {client}: {err}. Hint: check the address.") from err
    with remote:
        yield remote


def _run_dask(
    client: Any, fcn: nn.Module, plan: PredictPlan, pending: list[int], job: _Job, output: str, bar: _Progress
) -> None:
    from distributed import as_completed

    from ..export import export_program

    if job.image is None:
        raise FcnifyError(
            "Dask workers read the image from its file, but it was given as an array. "
            "Hint: save it (np.save('image.npy', array)) and pass the path."
        )
    input_size = _model_input_size(fcn)
    program_path = os.path.join(output, ".fcnify-model.pt2")  # next to the scores: workers see both
    started = time.perf_counter()
    torch.export.save(export_program(fcn, input_size), program_path)
    log.info("exported the model for the Dask workers in %.1f s: %s", time.perf_counter() - started, program_path)
    cols = plan.grid[1]
    items = [(k // cols, k % cols, plan.tiles[k]) for k in pending]
    with _dask_client(client) as dask:
        n_workers = max(1, len(dask.scheduler_info(n_workers=-1).get("workers", {})))
        size = max(1, math.ceil(len(items) / (4 * n_workers)))
        groups = [items[k : k + size] for k in range(0, len(items), size)]
        futures = {dask.submit(_worker_tiles, program_path, job, group, pure=False): group for group in groups}
        for future in as_completed(futures):
            future.result()
            bar.update([t for _, _, t in futures[future]])
    with contextlib.suppress(OSError):
        os.remove(program_path)


# -- predict ----------------------------------------------------------------------------------


def predict(
    fcn: Any,
    image: Any,
    output: str | os.PathLike,
    *,
    level: int = 0,
    mpp: float | None = None,
    mask: Any = None,
    tile: int | Sequence[int] | None = None,
    memory: str | int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    workers: int = 1,
    client: Any = None,
    progress: bool = True,
    classes: Sequence[int | str] | None = None,
    dtype: str = "float32",
    resume: bool = False,
    force: bool = False,
    normalize: Any = False,
    reader: str | None = None,
) -> Any:
    """Run ``fcn`` over a large image and write its class map to a Zarr store, tile by tile.

    Args:
        fcn: a model from :func:`fcnify.convert`, a ``.pt2`` saved by ``fcnify convert``, or a
            model name or file that ``fcnify convert`` takes (converted in window mode).
        image: a file path (slide, TIFF, GeoTIFF, Zarr, ``.npy``, PNG, ...), anything
            :func:`fcnify.open_image` takes, or a glob (``"slides/*.svs"``): then ``output`` is a
            folder and each image gets ``output/NAME.zarr``.
        output: the Zarr store (a folder) to write.
        level: pyramid level to read (0: full resolution).
        mpp: instead of ``level``, microns per pixel wanted: the closest level is read.
        mask: ``"otsu"`` (foreground by Otsu's threshold on a low-resolution level), a mask file
            or a 2-D array at any resolution (non-zero: foreground). Tiles whose cells all see
            background are skipped and left NaN.
        tile: input tile size in pixels (int or ``(ty, tx)``), overlap included.
        memory: instead of ``tile``, a memory budget (``"2GB"`` or bytes): the largest tile that fits
            is used (default: 2 GB).
        batch_size: tiles run together.
        device: where to run the model (``"cuda"``); default: the model's device.
        workers: threads that read tiles ahead of the model.
        client: a ``dask.distributed.Client``, ``"local:N"`` (a LocalCluster of N processes) or
            ``"tcp://HOST:PORT"``: tiles go to the cluster's workers, which load the model once from
            an exported ``.pt2`` and write into the store (which must be on a shared file system).
        progress: show a progress bar (tiles, megapixels per second, time left, overlap).
        classes: the channels to keep, by index or (for ImageNet models) name; default: all.
        dtype: ``"float32"`` or ``"float16"``.
        resume: finish a store that a killed run left; refuses a store written with other
            arguments or another model.
        force: overwrite an existing store.
        normalize: ``(mean, std)`` applied to the [0, 1] pixels before the model, a timm model or
            ``pretrained_cfg``; default ``False``: the pixels as read (scaled to [0, 1]).
        reader: force the image reader (see :func:`fcnify.open_image`).

    Returns:
        The ``scores`` array ``(K, h, w)`` of the store (``zarr.Array``); a list of them for a glob.
        The store's attributes (module docstring of ``fcnify.inference._predict``) place every cell on the
        level-0 image.

    Raises:
        FcnifyError: unreadable image or mask, bad level, tile or memory, an existing store
            without ``force``, a store from other arguments on ``resume``.
        UnsupportedModelError: the model cannot be tiled exactly (TF-"same" padding, global pooling).

    Example:
        >>> import numpy as np, torch, fcnify, zarr
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5), torch.nn.MaxPool2d(2))
        >>> image = np.random.default_rng(0).random((300, 200, 3), dtype=np.float32)
        >>> scores = fcnify.predict(net, image, "map.zarr", tile=64, progress=False)  # doctest: +SKIP
        >>> np.allclose(scores[:], net(torch.from_numpy(image).permute(2, 0, 1)[None])[0].detach())  # doctest: +SKIP
        True
    """
    if isinstance(image, (str, os.PathLike)) and _GLOB.search(os.fspath(image)) and not os.path.exists(image):
        return _predict_many(
            fcn,
            os.fspath(image),
            os.fspath(output),
            level=level,
            mpp=mpp,
            mask=mask,
            tile=tile,
            memory=memory,
            batch_size=batch_size,
            device=device,
            workers=workers,
            client=client,
            progress=progress,
            classes=classes,
            dtype=dtype,
            resume=resume,
            force=force,
            normalize=normalize,
            reader=reader,
        )
    output = os.fspath(output)
    if dtype not in ("float32", "float16"):
        raise FcnifyError(
            f"dtype must be 'float32' or 'float16', got {dtype!r}. Hint: dtype='float16' halves the store."
        )
    if tile is not None and memory is not None:
        raise FcnifyError("pass tile= or memory=, not both. Hint: memory='2GB' picks the tile for you.")
    if batch_size < 1 or workers < 1:
        raise FcnifyError(f"batch_size and workers must be at least 1, got {batch_size} and {workers}. Hint: 1.")
    if isinstance(image, (str, os.PathLike)) and os.path.abspath(os.fspath(image)) == os.path.abspath(output):
        raise FcnifyError(f"the output {output} is the image itself. Hint: write to another path.")
    if os.path.exists(output) and not resume and not force:  # fail before the slow parts
        raise FcnifyError(
            f"{output} already exists. Hint: pass force=True (--force) to overwrite it, "
            "or resume=True (--resume) to finish it."
        )
    fcn = _load_fcn(fcn)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        opened = open_image(image, level=level, mpp=mpp, reader=reader)
        if not isinstance(image, LazyImage):
            stack.callback(opened.close)
        return _predict_one(
            fcn,
            opened,
            output,
            mask=mask,
            tile=tile,
            memory=memory,
            batch_size=batch_size,
            device=device,
            workers=workers,
            client=client,
            progress=progress,
            classes=classes,
            dtype=dtype,
            resume=resume,
            force=force,
            normalize=normalize,
            start=start,
        )


def _predict_many(fcn: Any, pattern: str, output: str, **kwargs: Any) -> list[Any]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FcnifyError(f"no file matches {pattern}. Hint: check the pattern (quote it in a shell).")
    if os.path.exists(output) and not os.path.isdir(output):
        raise FcnifyError(f"{output} is a file; with many images the output is a folder. Hint: -o out/.")
    os.makedirs(output, exist_ok=True)
    fcn = _load_fcn(fcn)
    stems = [os.path.splitext(os.path.basename(p.rstrip(os.sep)))[0] for p in paths]
    if len(set(stems)) != len(stems):
        raise FcnifyError(
            f"{pattern} matches files with the same name in different folders. Hint: one folder at a time."
        )
    if isinstance(kwargs.get("client"), str):  # one cluster for all the images
        with _dask_client(kwargs["client"]) as client:
            return _predict_many(fcn, pattern, output, **{**kwargs, "client": client})
    results = []
    for k, (path, stem) in enumerate(zip(paths, stems)):
        store = os.path.join(output, stem + ".zarr")
        log.info("image %d of %d: %s -> %s", k + 1, len(paths), path, store)
        if kwargs.get("resume") and _complete(store):
            import zarr

            log.info("%s is complete; skipping", store)
            results.append(zarr.open_group(store, mode="r")["scores"])
            continue
        results.append(predict(fcn, path, store, **kwargs))
    return results


def _complete(store: str) -> bool:
    if not _is_fcnify_store(store):
        return False
    with open(os.path.join(store, "zarr.json")) as handle:
        tiles = json.load(handle)["attributes"]["fcnify"]["tiles"]
    return tiles["done"] == tiles["total"]


def _choose_cells(
    fcn: nn.Module,
    geo: Geometry,
    plan_size: Pair,
    map_size: Pair,
    channels: int,
    tile: int | Sequence[int] | None,
    memory: str | int | None,
    batch_size: int,
    minimum: Pair,
) -> tuple[Pair, str]:
    """Cells per tile from ``tile=`` or from a memory budget, and a sentence saying which and why."""
    if tile is not None:
        ty, tx = (int(tile), int(tile)) if isinstance(tile, (int, np.integer)) else (int(tile[0]), int(tile[1]))
        cells = (_cells_for_tile(ty, geo, 0, map_size[0]), _cells_for_tile(tx, geo, 1, map_size[1]))
        return cells, f"tile {ty}x{tx} (asked)"
    budget = parse_memory(memory) if memory is not None else DEFAULT_MEMORY
    side = [
        max(m, min(p, max(geo.receptive_field[d] + 4 * geo.stride[d], 256), 768))
        for d, (m, p) in enumerate(zip(minimum, plan_size))
    ]
    x = torch.rand(1, channels, *side)
    with torch.no_grad(), _eval(fcn):
        peak, _ = _peak_activation_bytes(fcn, x)
    per_pixel = peak / (side[0] * side[1]) * 1.25  # kernel workspaces and the allocator's slack
    per_pixel += 4 * channels * (2 + 2)  # the tile read, normalised, and two tiles read ahead
    fixed = sum(p.numel() * p.element_size() for p in fcn.parameters()) + 256 * 2**20  # weights, Python, torch
    room = budget - fixed
    if room <= 0:
        raise FcnifyError(
            f"memory={memory} is less than the model and runtime need ({fixed / 2**30:.2f} GB). "
            "Hint: give more memory, e.g. memory='2GB'."
        )
    side_px = int(math.sqrt(room / (batch_size * per_pixel)))
    cells = (_cells_for_tile(side_px, geo, 0, map_size[0]), _cells_for_tile(side_px, geo, 1, map_size[1]))
    estimate = fixed + batch_size * per_pixel * min(side_px, plan_size[0]) * min(side_px, plan_size[1])
    return cells, (
        f"memory {budget / 2**30:.2g} GB -> tiles up to {side_px}x{side_px} pixels "
        f"(estimated peak {estimate / 2**30:.2f} GB)"
    )


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _predict_one(
    fcn: nn.Module,
    image: LazyImage,
    output: str,
    *,
    mask: Any,
    tile: Any,
    memory: Any,
    batch_size: int,
    device: Any,
    workers: int,
    client: Any,
    progress: bool,
    classes: Any,
    dtype: str,
    resume: bool,
    force: bool,
    normalize: Any,
    start: float,
) -> Any:
    from .. import __version__
    from ._heatmap import _class_index, class_names, resolve_normalization

    input_size = _model_input_size(fcn)
    H, W, C = image.shape
    if C != input_size[0]:
        raise FcnifyError(
            f"the image has {C} channel(s) but the model takes {input_size[0]}. "
            "Hint: pass an image with as many channels as the model was trained on."
        )
    geo = geometry(fcn, input_size=input_size[1:])
    minimum = tuple(max(a, b) for a, b in zip(geo.min_input_size, input_size[1:]))
    map_size = geo.output_size(H, W)
    param = next(iter(fcn.parameters()), None)
    run_device = (
        torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    )
    if run_device != (param.device if param is not None else run_device):
        fcn = fcn.to(run_device)
    with torch.no_grad(), _eval(fcn):
        probe = fcn(torch.zeros(1, C, *minimum, device=run_device))
    if not isinstance(probe, torch.Tensor) or probe.dim() != 4:
        raise FcnifyError(
            f"predict needs a model with one (N, K, h, w) output; {type(fcn).__name__} returns "
            f"{type(probe).__name__}. Hint: convert in window or dense mode."
        )
    n_classes = probe.shape[1]
    names = class_names(n_classes) if n_classes == 1000 else None
    chosen = (
        None if classes is None else [_class_index(c, names or [str(i) for i in range(n_classes)]) for c in classes]
    )
    kept = chosen if chosen is not None else list(range(n_classes))
    labels: list[Any] = [names[k] for k in kept] if names else kept
    cells, why = _choose_cells(fcn, geo, (H, W), map_size, C, tile, memory, batch_size, minimum)
    plan = plan_predict(geo, (H, W), cells, minimum)
    _check_translation_invariant(geo, plan.tile)
    stats = resolve_normalization(normalize, fcn) if normalize is not False else None
    mask_obj = load_mask(mask, image) if mask is not None else None
    d = image.downsample
    args = {
        "model": _fingerprint(fcn),
        "input_size": list(input_size),
        "level": image.level,
        "image_shape": list(image.shape),
        "cells": list(cells),
        "classes": kept,
        "dtype": dtype,
        "normalize": [list(stats[0]), list(stats[1])] if stats else None,
        "mask": None
        if mask_obj is None
        else hashlib.sha256(np.packbits(mask_obj.array).tobytes() + str(mask_obj.array.shape).encode()).hexdigest()[
            :16
        ],
    }
    attrs = {
        "version": __version__,
        "model": getattr(fcn, "fcnify_name", None)
        or (fcn.conversion_report.model if hasattr(fcn, "conversion_report") else type(fcn).__name__),
        "classes": labels,
        "stride": [_number(s * d) for s in geo.stride],
        "offset": [_number((c + 0.5) * d - 0.5) for c in geo.center(0, 0)],
        "receptive_field": [_number(r * d) for r in geo.receptive_field],
        "level": image.level,
        "downsample": d,
        "mpp": image.mpp,
        "image": {"path": os.path.abspath(image.path) if image.path else None, "shape": list(image.shape)},
        "crs": image.crs,
        "transform": list(image.transform) if image.transform else None,
        "fill": "nan",
        "args": args,
        "tiles": {"total": len(plan.tiles), "skipped": 0, "done": 0},
    }
    group, scores, done = _open_store(output, attrs, plan, len(kept), dtype, resume, force)
    flags = done[:]
    cols = plan.grid[1]
    skipped = 0
    if mask_obj is not None:
        s, o, r = geo.stride, geo.offset, geo.receptive_field
        for k, t in enumerate(plan.tiles):
            y0, x0 = (o[0] + t.i0 * s[0]) * d, (o[1] + t.j0 * s[1]) * d
            y1, x1 = (o[0] + (t.i1 - 1) * s[0] + r[0]) * d, (o[1] + (t.j1 - 1) * s[1] + r[1]) * d
            if not mask_obj.any(y0, x0, y1, x1):
                skipped += 1
                if flags[k // cols, k % cols] == 0:
                    flags[k // cols, k % cols] = 2
                    done[k // cols, k % cols] = 2
    pending = [k for k in range(len(plan.tiles)) if flags[k // cols, k % cols] == 0]
    resumed = len(plan.tiles) - skipped - len(pending)
    log.info(
        "%s: %dx%d image (level %d) -> %dx%d cells of stride %d; %s; %d tiles of %dx%d cells, overlap %.0f%%%s%s",
        output,
        H,
        W,
        image.level,
        *map_size,
        geo.stride[0],
        why,
        len(plan.tiles),
        *cells,
        100 * plan.overlap,
        f", {skipped} skipped by the mask" if skipped else "",
        f", {resumed} already done" if resumed else "",
    )
    job = _Job(
        image=image.path,
        level=image.level,
        reader=image.reader if image.path else None,
        output=output,
        channels=chosen,
        normalize=stats,
        dtype=dtype,
        stride=geo.stride,
    )
    bar = _Progress(len(pending), plan.overlap, geo.stride, progress)
    try:
        if client is not None:
            _run_dask(client, fcn, plan, pending, job, output, bar)
        else:
            _run_local(fcn, image, plan, pending, scores, done, job, batch_size, run_device, workers, bar)
    finally:
        bar.close()
    attrs["tiles"] = {"total": len(plan.tiles), "skipped": skipped, "done": int(np.count_nonzero(done[:]))}
    group.attrs["fcnify"] = attrs
    log.info(
        "wrote %s: scores %s %s, %d tiles computed, %d skipped, %.1f s (%.1f MP/s)",
        output,
        tuple(scores.shape),
        dtype,
        len(pending),
        skipped,
        time.perf_counter() - start,
        bar.rate,
    )
    return scores
