"""fcnify.predict (tiles into a Zarr store) against whole-image inference, side by side, in fresh processes.

Each run is a subprocess that reports its wall time, the time spent inside the model, and its
peak resident memory (``ru_maxrss``, torch included). The image is a pyramidal tiled TIFF
written with tifffile from scikit-image's astronaut (tiled up to the size asked), read
through ``fcnify.open_image``. Runs alternate (whole, predict, whole, predict, ...).

Variants: ``whole`` (the whole level-0 image in one ``fcn(x)`` call, read with tifffile),
``predict`` (``fcnify.predict`` with ``--memory``), ``dask`` (the same on a LocalCluster of
``--dask`` worker processes, one thread each; cluster start-up not counted).

    python benchmarks/predict_store.py --size 2048 --memory 2GB
    python benchmarks/predict_store.py --size 2048 --variants predict dask --dask 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch, torchvision, fcnify
from fcnify.models import calibrate_batchnorm

root, path, variant, memory, threads, n_dask, out = sys.argv[1:8]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
net = torchvision.models.resnet18()
calibrate_batchnorm(net, (224, 224))
fcn = fcnify.convert(net, input_size=(224, 224))
model_seconds = [0.0]
forward = fcn.forward
def timed(x):
    start = time.perf_counter()
    y = forward(x)
    model_seconds[0] += time.perf_counter() - start
    return y
fcn.forward = timed
start = time.perf_counter()
if variant == "whole":
    with fcnify.open_image(path) as image:
        x = torch.from_numpy(image.read(0, 0, *image.shape[:2])).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = fcn.eval()(x)
elif variant == "predict":
    fcnify.predict(fcn, path, out, memory=memory, progress=False, force=True)
else:
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=int(n_dask), threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster as c, Client(c) as client:
        client.run(lambda: None)
        start = time.perf_counter()
        fcnify.predict(fcn, path, out, memory=memory, progress=False, force=True, client=client)
        seconds = time.perf_counter() - start
seconds = seconds if variant == "dask" else time.perf_counter() - start
print(json.dumps({"seconds": seconds, "model_seconds": model_seconds[0],
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _slide(path: str, size: int) -> None:
    import numpy as np
    import skimage.data
    import tifffile

    photo = skimage.data.astronaut()
    pixels = np.tile(photo, (-(-size // 512), -(-size // 512), 1))[:size, :size]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k in range(3):
            tw.write(
                pixels[:: 2**k, :: 2**k],
                tile=(256, 256),
                photometric="rgb",
                compression="deflate",
                resolution=(1e4 / 0.5 / 2**k,) * 2,
                resolutionunit="CENTIMETER",
                metadata=None,
                subfiletype=int(k > 0),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--memory", default="2GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dask", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["whole", "predict"])
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "slide.tif")
        _slide(path, args.size)
        results = {v: [] for v in args.variants}
        for _ in range(args.repeat):
            for variant in args.variants:
                out = os.path.join(tmp, f"{variant}.zarr")
                done = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        root,
                        path,
                        variant,
                        args.memory,
                        str(args.threads),
                        str(args.dask),
                        out,
                    ],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    print(done.stderr[-2000:])
                    raise SystemExit(done.returncode)
                results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = min(r["seconds"] for r in results[args.variants[0]])
    print(f"resnet18 (window mode), {args.size}x{args.size} tiled TIFF, {args.threads} threads, memory={args.memory}")
    print(f"{'variant':<10}{'wall s':>9}{'model s':>9}{'peak GB':>9}{'vs first':>10}")
    for variant, runs in results.items():
        best = min(runs, key=lambda r: r["seconds"])
        print(
            f"{variant:<10}{best['seconds']:>9.1f}{best['model_seconds']:>9.1f}{best['peak_gb']:>9.2f}"
            f"{base / best['seconds']:>10.2f}"
        )


if __name__ == "__main__":
    main()
