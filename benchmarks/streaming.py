"""Row streaming (fcnify.inference._stream) against whole-image inference and fcnify.predict_tiled, side by side.

Every configuration runs in a fresh subprocess and reports its inference time and its peak
resident memory (``ru_maxrss``: torch, the model, the image and the output included), so the
numbers do not leak into each other. The image is a random uint8 ``.npy`` memmap on disk; the
model is torchvision's resnet18, random weights with batch-norm statistics calibrated on random
data, converted in window mode (receptive field 627, stride 32). Per image size the
configurations run in this order: whole image, streaming at each band height, streaming with
``memory=`` (the band height it picks), tiled at each tile size; whole-image inference only up
to ``--whole-up-to``. Outputs are compared with the whole-image output where it exists.

    python benchmarks/streaming.py                       # 2048 and 4096: everything; 8192: streaming only
    python benchmarks/streaming.py --sizes 1024 --bands 64 --tiles --no-write   # a smoke test
    python benchmarks/streaming.py --render              # re-render the docs from docs/streaming.json

The numbers go to docs/streaming.json; the table in docs/streaming.md and the section of
docs/benchmarks.md are rendered from it.
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

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.normpath(os.path.join(HERE, "..", "docs", "streaming.md"))
DATA = os.path.normpath(os.path.join(HERE, "..", "docs", "streaming.json"))  # the numbers the tables are rendered from

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch, torchvision
import fcnify
from fcnify.models import calibrate_batchnorm
from fcnify.inference._stream import stream_predict, band_rows_for

image_path, how, param, out_path, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
net = calibrate_batchnorm(torchvision.models.resnet18(), (224, 224))
fcn = fcnify.convert(net, input_size=(224, 224))
image = np.load(image_path, mmap_mode="r")
extra = {}
if how.startswith("stream"):  # the probe (once per network) and a warm-up on a small crop, not timed
    stream_predict(fcn, np.ascontiguousarray(image[:256, :256]), band_rows=64)
    if how == "stream_memory":
        extra["band_rows"] = band_rows_for(fcn, image.shape[:2], param, whole_output=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if how in ("whole", "whole_cl"):
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(255)
    if how == "whole_cl":  # the layout streaming runs in
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = fcn(x)
elif how == "stream":
    out = stream_predict(fcn, image, band_rows=int(param))
elif how == "stream_memory":
    out = stream_predict(fcn, image, memory=param)
else:
    out = fcnify.predict_tiled(fcn, image_path, tile=(int(param), int(param)), progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if out_path != "-":
    np.save(out_path, out.numpy())
print(json.dumps({"peak_mb": peak / 1024, "base_mb": base / 1024, "seconds": seconds, "shape": list(out.shape),
                  **extra}))
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


def run(image: str, how: str, param: str, out: str, threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, image, how, param, out, str(threads)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(HERE),
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="square image sizes")
    parser.add_argument("--bands", type=int, nargs="+", default=[64, 128, 256], help="streaming band heights")
    parser.add_argument("--memory", default="1GB", help="also stream with this memory= budget ('' to skip)")
    parser.add_argument("--tiles", type=int, nargs="*", default=[1024, 2048], help="predict_tiled tile sizes")
    parser.add_argument("--whole-up-to", type=int, default=4096, help="largest size to also run whole (memory!)")
    parser.add_argument(
        "--large-bands",
        type=int,
        nargs="+",
        default=[128],
        help="band heights above --whole-up-to (default 128: each 8192 run takes minutes)",
    )
    parser.add_argument(
        "--whole-channels-last",
        action="store_true",
        help="also run the whole image in channels-last memory, the layout streaming uses",
    )
    parser.add_argument("--render", action="store_true", help="only re-render the docs from docs/streaming.json")
    common.add_common_arguments(parser, threads_default=1)
    args = parser.parse_args(argv)
    if args.render:
        with open(DATA) as f:
            data = json.load(f)
        write(data["env"], render(data["rows"]), data["command"])
        return 0
    common.setup(args)
    if args.device != "cpu":
        sys.exit("streaming.py measures the CPU only")

    rows = []
    load_before = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = os.path.join(tmp, f"image{size}.npy")
            make_image(path, size)
            small = size <= args.whole_up_to
            configs = [("whole", "-")] if small else []
            configs += [("whole_cl", "-")] if small and args.whole_channels_last else []
            configs += [("stream", str(b)) for b in (args.bands if small else args.large_bands)]
            configs += [("stream_memory", args.memory)] if args.memory else []
            configs += [("tiled", str(t)) for t in args.tiles if t < size] if small else []
            whole_out = os.path.join(tmp, "whole.npy")
            for how, param in configs:
                out = whole_out if how == "whole" else (os.path.join(tmp, "other.npy") if small else "-")
                result = run(path, how, param, out, args.threads)
                row = {"size": size, "how": how, "param": param, **result}
                if small and "error" not in result and how != "whole" and os.path.exists(whole_out):
                    a, b = np.load(out), np.load(whole_out)
                    row["diff"] = float(np.abs(a - b).max() / np.abs(b).max()) if a.shape == b.shape else None
                rows.append(row)
                print(json.dumps(row), flush=True)
            os.remove(path)
    load_after = common.load_average()
    table = render(rows)
    env = common.environment(
        args.device,
        args.threads,
        load_before,
        load_after,
        extra=[
            "model: torchvision resnet18, window mode (`fcnify.convert`), random weights with batch-norm statistics "
            "calibrated on random data; image: random uint8 (H, W, 3) `.npy` memmap, scaled to [0, 1]; batch 1; "
            "one run "
            "per configuration, each in a fresh process"
        ],
    )
    print("\n".join(env + [""] + table))
    if not args.no_write:
        command = common.command("streaming.py", argv)
        with open(DATA, "w") as f:
            json.dump({"command": command, "env": env, "rows": rows}, f, indent=1)
        write(env, table, command)
    return 0


def render(rows):
    whole = {r["size"]: r for r in rows if r["how"] == "whole" and "error" not in r}
    header = (
        "| image | run | peak RSS MB | of which before the run | s | Mpixel/s | throughput vs whole "
        "| peak RSS vs whole | max rel. diff vs whole |"
    )
    table = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = r["size"]
        label = {
            "whole": "whole image",
            "whole_cl": "whole image, channels-last",
            "stream": f"stream, band {r['param']}",
            "stream_memory": f"stream, memory={r['param']} (band {r.get('band_rows', '?')})",
            "tiled": f"predict_tiled, tile {r['param']}",
        }[r["how"]]
        if "error" in r:
            table.append(f"| {size}² | {label} | failed: {r['error'][:80]} | | | | | | |")
            continue
        w = whole.get(size)
        thr = f"{w['seconds'] / r['seconds']:.2f}" if w else ""
        mem = f"{r['peak_mb'] / w['peak_mb']:.2f}" if w else ""
        diff = f"{r['diff']:.1e}" if r.get("diff") is not None else ""
        table.append(
            f"| {size}² | {label} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | {r['seconds']:.1f} | "
            f"{size * size / 1e6 / r['seconds']:.2f} "
            f"| {thr} | {mem} | {diff} |"
        )
    return table


def write(env, table, command):
    lines = [f"From one run of `{command}`:", "", *common.bullets(env), "", *table]
    common.write_section("streaming_table", lines, doc=DOC)
    common.write_section(
        "streaming",
        [
            "## Row streaming vs whole image (`benchmarks/streaming.py`)",
            "",
            "`fcnify.inference._stream.stream_predict` runs the network on bands of full-width rows, each layer "
            "keeping",
            "only the rows its next windows need, so nothing is computed twice; `predict_tiled` recomputes",
            "the overlap of its tiles. What the columns mean, and the projection to larger images:",
            "[docs/streaming.md](streaming.md).",
            "",
            *lines,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
