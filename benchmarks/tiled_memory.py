"""Peak memory and throughput of fcnify.predict_tiled against whole-image inference, side by side.

Each measurement runs in a fresh subprocess and reports its peak resident memory
(``ru_maxrss``, torch included), so the numbers do not leak into each other; whole-image and
tiled runs alternate (whole, tiled, whole, tiled, ... with ``--repeat``). The image is a random
uint8 ``.npy`` memmap on disk (read lazily, one tile at a time). Whole-image inference is run
at the sizes that fit in memory (``--whole-up-to``); tiled inference at every size. The tiled
output is compared with the whole-image output where both exist.

Models: ``resnet18`` (default; torchvision, window mode, calibrated batch norm, random weights;
receptive field 627, so tiles overlap by about 600 pixels) or ``small`` (a padded 4-layer CNN of
stride 16, whose cost is dominated by reading the image: the memory-only case).

    python benchmarks/tiled_memory.py                                    # resnet18 at 4096 and 8192, tile 2048
    python benchmarks/tiled_memory.py --model small --sizes 2048 4096 8192 --tile 1024
    python benchmarks/tiled_memory.py --model small --sizes 20000 --whole-up-to 0   # slow on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from torch import nn
import fcnify

image_path, how, out_path, threads, model_name, tile, device = sys.argv[1:8]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
if model_name == "small":
    net = nn.Sequential(  # a small padded CNN of total stride 16 with a Linear head (window mode)
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 4)).eval()
    size = (64, 64)
else:
    import torchvision
    from fcnify.zoo import calibrate_batchnorm
    net = torchvision.models.get_model(model_name)
    size = (224, 224)
    calibrate_batchnorm(net, size)
fcn = fcnify.convert(net, input_size=size).to(device)
image = np.load(image_path, mmap_mode="r")
plan = {}
if how == "tiled":  # the tiles predict_tiled will run, and the pixels they cover (overlaps counted twice)
    from fcnify.tiled import plan_tiles
    tiles, _ = plan_tiles(fcnify.geometry(fcn, input_size=fcn.conversion_report.input_size), image.shape[:2],
                          (int(tile), int(tile)))
    plan = {"tiles": len(tiles),
            "pixels": sum((t.y1 - t.y0) * (t.x1 - t.x0) for t in tiles) / (image.shape[0] * image.shape[1])}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if how == "tiled":
    out = fcnify.predict_tiled(fcn, image_path, tile=(int(tile), int(tile)), progress=False, device=device)
else:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255)
    with torch.inference_mode():
        out = fcn(x.to(device)).cpu()
seconds = time.perf_counter() - start
np.save(out_path, out.numpy())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
print(json.dumps({"peak_mb": peak / 1024, "base_mb": base / 1024, "seconds": seconds, "shape": list(out.shape),
                  "gpu_mb": gpu, **plan}))
"""


def make_image(path: str, size: int) -> None:
    """A random uint8 (size, size, 3) memmap, written in strips so that it never sits in memory."""
    import numpy as np

    image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    rng = np.random.default_rng(size)
    for y in range(0, size, 512):
        image[y : y + 512] = rng.integers(0, 256, (min(512, size - y), size, 3), dtype=np.uint8)
    image.flush()
    del image


def run(image: str, how: str, out: str, args) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, image, how, out, str(args.threads), args.model, str(args.tile), args.device],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="resnet18 (default), another torchvision name, or small")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="square image sizes (default 4096 8192; small: 2048 4096 8192)",
    )
    parser.add_argument("--tile", type=int, default=None, help="tile size (default 2048; small: 1024)")
    parser.add_argument("--whole-up-to", type=int, default=4096, help="largest size to also run whole (memory!)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="whole/tiled pairs per size, alternating (default 1: a resnet18 run takes minutes)",
    )
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    common.setup(args)
    small = args.model == "small"
    args.sizes = args.sizes or ([2048, 4096, 8192] if small else [4096, 8192])
    args.tile = args.tile or (1024 if small else 2048)

    rows = []
    load_before = common.load_average()
    print(f"{args.model}, tile {args.tile}, {args.threads} thread(s), device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = os.path.join(tmp, f"image{size}.npy")
            make_image(path, size)
            runs = {"whole": [], "tiled": []}
            kinds = ["whole", "tiled"] if size <= args.whole_up_to else ["tiled"]
            for _ in range(args.repeat):
                for how in kinds:
                    runs[how].append(run(path, how, os.path.join(tmp, f"{how}.npy"), args))
            row = {"size": size}
            for how in ("whole", "tiled"):
                ok = [r for r in runs[how] if "error" not in r]
                if runs[how] and not ok:
                    row[how] = {"error": runs[how][0]["error"]}
                elif ok:
                    row[how] = {
                        "peak_mb": max(r["peak_mb"] for r in ok),
                        "base_mb": min(r["base_mb"] for r in ok),
                        "seconds": common.median([r["seconds"] for r in ok]),
                        "shape": ok[0]["shape"],
                        "gpu_mb": ok[0]["gpu_mb"],
                        "runs": len(ok),
                        "tiles": ok[0].get("tiles"),
                        "pixels": ok[0].get("pixels"),
                    }
            whole, tiled = row.get("whole"), row.get("tiled")
            if whole and tiled and "error" not in whole and "error" not in tiled:
                a, b = np.load(os.path.join(tmp, "tiled.npy")), np.load(os.path.join(tmp, "whole.npy"))
                row["diff"] = f"{np.abs(a - b).max():.1e}" if a.shape == b.shape else f"shapes {a.shape} != {b.shape}"
            rows.append(row)
            print(f"{size}x{size}: {row}", flush=True)
            os.remove(path)
    load_after = common.load_average()

    def cells(r):
        if r is None:
            return ["not run", "", ""]
        if "error" in r:
            return [f"failed: {r['error'][:60]}", "", ""]
        return [f"{r['peak_mb']:.0f}", f"{r['seconds']:.1f}", ""]

    header = (
        "| image | whole: peak MB | whole: s | whole: Mpixel/s | tiles (pixels run / image) | tiled: peak MB "
        "| tiled: s | tiled: Mpixel/s | tiled / whole memory | tiled / whole throughput | max abs(tiled - whole) |"
    )
    table = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        size, whole, tiled = row["size"], row.get("whole"), row.get("tiled")
        w, t = cells(whole), cells(tiled)
        mpx = size * size / 1e6
        if whole and "error" not in whole:
            w[2] = f"{mpx / whole['seconds']:.2f}"
        if tiled and "error" not in tiled:
            t[2] = f"{mpx / tiled['seconds']:.2f}"
        both = whole and tiled and "error" not in whole and "error" not in tiled
        mem = f"{tiled['peak_mb'] / whole['peak_mb']:.2f}" if both else ""
        thr = f"{whole['seconds'] / tiled['seconds']:.2f}" if both else ""
        plan = f"{tiled['tiles']} ({tiled['pixels']:.2f}x)" if tiled and tiled.get("tiles") else ""
        table.append(
            f"| {size} x {size} | {' | '.join(w)} | {plan} | {' | '.join(t)} | {mem} | {thr} | {row.get('diff', '')} |"
        )
    base = [r[k]["base_mb"] for r in rows for k in ("whole", "tiled") if k in r and "error" not in r[k]]
    model = (
        "a small padded CNN of total stride 16 (four stride-2 3x3 convolutions, 16-32 channels, a Linear head "
        "made a 4x4 convolution), window mode"
        if small
        else f"torchvision {args.model}, window mode (`fcnify.convert`), random weights with batch-norm statistics "
        "calibrated on random data"
    )
    env = common.environment(
        args.device,
        args.threads,
        load_before,
        load_after,
        extra=[
            f"model: {model}; image: random uint8 (H, W, 3) `.npy` memmap on disk, scaled to [0, 1]; tile {args.tile} x "
            f"{args.tile}, batch 1; {args.repeat} run(s) per size and kind, alternating whole and tiled (median time, "
            f"largest peak); peak memory before inference (imports, model): {min(base) if base else 0:.0f} MB or more"
        ],
    )
    print("\n".join(env + [""] + table))
    if not args.no_write and rows:
        write_section(env, table, common.command("tiled_memory.py", argv), args, small)
    return 0


def write_section(env, table, command, args, small):
    if small:
        note = [
            "The small CNN costs little per pixel, so this measures memory: tiled memory stays flat",
            "while whole-image memory grows with the image.",
        ]
    else:
        note = [
            f"Whole-image inference is not run above {args.whole_up_to} x {args.whole_up_to}: at 8192 x 8192 the first",
            "convolution's output alone is 64 x 4096 x 4096 floats (4.3 GB), and its batch norm makes a second",
            "one, about 9 GB of activations on a machine other jobs share. Tiles overlap by about one receptive",
            "field (627 pixels for resnet18 in window mode, since every cell a tile keeps must see its whole",
            "receptive field), so tiling runs the network on more pixels than the image has (the *tiles*",
            "column: a 2048 tile keeps 45 of its 58 rows of cells, 52 at the image's edge). That is the price",
            "of bounded memory; a larger tile costs less time and more memory.",
        ]
    common.write_section(
        "tiled_small" if small else "tiled",
        [
            "### Small CNN: memory only"
            if small
            else "## Tiled inference on huge images (`benchmarks/tiled_memory.py`)",
            "",
            f"From one run of `{command}`. `fcnify.predict_tiled` against whole-image inference of the",
            "same converted model, each run in a fresh subprocess: peak resident memory of the whole",
            "process (`ru_maxrss`, torch and fcnify imports included), inference time, and throughput",
            "(*tiled / whole throughput* = whole time / tiled time; below 1 means tiling is slower).",
            *note,
            *(
                []
                if small
                else [
                    "The memory-only case, a small CNN up to 20000 x 20000, is the next table",
                    "(`python benchmarks/tiled_memory.py --model small --sizes 2048 4096 8192 --tile 1024`).",
                ]
            ),
            "",
            *common.bullets(env),
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
