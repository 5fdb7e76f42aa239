"""Peak memory of fcnify.predict_tiled against whole-image inference, measured side by side.

Each measurement runs in a fresh subprocess and reports its peak resident memory
(``ru_maxrss``), so the numbers do not leak into each other. The image is a uint8 ``.npy``
memmap on disk (read lazily, one tile at a time). Whole-image inference is measured at the
sizes that fit in memory; tiled inference at every size, including 8192 x 8192 (or larger with
``--sizes``). The tiled output is compared with the whole-image output where both exist.

    python benchmarks/tiled_memory.py                      # 2048, 4096, 8192
    python benchmarks/tiled_memory.py --sizes 2048 20000   # the 20000 x 20000 case (slow on CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from torch import nn
import fcnify

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[4]))
net = nn.Sequential(  # a small padded CNN of total stride 16 with a Linear head (window mode)
    nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
    nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 4)).eval()
fcn = fcnify.convert(net, input_size=(64, 64))
image = np.load(sys.argv[1], mmap_mode="r")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if sys.argv[2] == "tiled":
    out = fcnify.predict_tiled(fcn, sys.argv[1], tile=(1024, 1024), progress=False)
else:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        out = fcn(x)
seconds = time.perf_counter() - start
np.save(sys.argv[3], out.numpy())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak / 1024, "base_mb": base / 1024, "seconds": seconds, "shape": list(out.shape)}))
"""


def make_image(path: str, size: int) -> None:
    """A random uint8 (size, size, 3) memmap, written in strips so that it never sits in memory."""
    import numpy as np

    image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    rng = np.random.default_rng(size)
    for y in range(0, size, 512):
        image[y:y + 512] = rng.integers(0, 256, (min(512, size - y), size, 3), dtype=np.uint8)
    image.flush()
    del image


def run(image: str, how: str, out: str, threads: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, image, how, out, str(threads)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--whole-up-to", type=int, default=4096, help="largest size to also run whole (memory!)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{'image':>13} | {'whole: peak MB':>14} {'s':>6} | {'tiled: peak MB':>14} {'s':>6} | "
          f"{'tiled/whole mem':>15} | max |tiled - whole|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = os.path.join(tmp, f"image{size}.npy")
            make_image(path, size)
            tiled = run(path, "tiled", os.path.join(tmp, "tiled.npy"), args.threads)
            whole = run(path, "whole", os.path.join(tmp, "whole.npy"), args.threads) if size <= args.whole_up_to else None
            diff = ratio = "-"
            if whole and "error" not in whole and "error" not in tiled:
                a, b = np.load(os.path.join(tmp, "tiled.npy")), np.load(os.path.join(tmp, "whole.npy"))
                diff = f"{np.abs(a - b).max():.1e}" if a.shape == b.shape else f"shapes {a.shape} != {b.shape}"
                ratio = f"{tiled['peak_mb'] / whole['peak_mb']:.2f}"
            w = f"{whole['peak_mb']:14.0f} {whole['seconds']:6.1f}" if whole and "error" not in whole else f"{'not run':>14} {'':>6}"
            t = f"{tiled['peak_mb']:14.0f} {tiled['seconds']:6.1f}" if "error" not in tiled else f"{tiled['error'][:21]:>21}"
            print(f"{size:>6}x{size:<6} | {w} | {t} | {ratio:>15} | {diff}")
            os.remove(path)
    print(f"(peak = resident memory of the whole process, torch included; tile 1024x1024; {time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
