"""Dense class map (fcnify window mode) vs crop-by-crop classification with the original model.

The baseline is how a patch predictor (TIAToolbox's, for instance) classifies a large image:
every training-size window at a given stride is cropped, and the crops are batched through the
ORIGINAL classifier. fcnify computes all those windows in one pass of the converted network
(``fcnify.convert``, window mode; ``output_stride=8`` for windows every 8 pixels).

Both run side by side for each (model, image size, stride) in alternating blocks. Crop-by-crop
inference over every window would take hours at 2048 x 2048, stride 8 (52 441 crops), so a
fixed sample of crop batches (default 4 batches of 32, spread over the image) is timed and the
median time per crop is multiplied by the number of windows: a linear extrapolation, shown in
the table as "crops timed". Where the sample covers every window, nothing is extrapolated.

On the sampled crops the crop logits are compared with the corresponding cells of the dense
map (cell (i, j) of a stride-s map is the window at pixel (s*i, s*j)); batch-norm statistics are
calibrated on random data so that the logits are of order one.

    python benchmarks/dense_vs_crops.py                                  # the full table (~15 min, 1 thread)
    python benchmarks/dense_vs_crops.py --models resnet18 --sizes 512 --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torchvision

import fcnify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

MODELS = ["resnet18", "resnet50", "efficientnet_b0"]
SIZES = [512, 1024, 2048]
STRIDES = [32, 8]
SKIP = [
    "resnet50/8/2048"
]  # ~50 s a run on one busy core and ~3 GB: left out by default to keep the script under 15 min
WINDOW = 224


def sample_positions(rows: int, cols: int, count: int, seed: int = 0):
    """``count`` distinct window positions spread over the grid (all of them if there are fewer)."""
    total = rows * cols
    if total <= count:
        return [(i, j) for i in range(rows) for j in range(cols)]
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return [(int(k) // cols, int(k) % cols) for k in order]


def measure(model, fcn, size: int, stride: int, args, device):
    """One table row: timings, FLOPs and the comparison on the sampled crops."""
    torch.manual_seed(size)
    x = torch.randn(1, 3, size, size, device=device)
    start = time.perf_counter()
    flops_dense, dense = common.count_flops(lambda: fcn(x), with_output=True)  # also the warm-up and check run
    common.synchronize(device)
    dense_once = time.perf_counter() - start
    # windows that lie inside the image; a finer map also has cells past the last one, whose
    # windows run into the zero padding (not counted: crop-by-crop cannot compute them)
    rows = cols = (size - WINDOW) // stride + 1
    if min(dense.shape[2:]) < rows:
        raise RuntimeError(
            f"{args.model_name}: a {size}x{size} map at stride {stride} is "
            f"{tuple(dense.shape[2:])}, smaller than the {rows}x{cols} windows"
        )
    windows = rows * cols
    positions = sample_positions(rows, cols, args.crop_batch * args.crop_batches)
    batches = []
    for k in range(0, len(positions), args.crop_batch):
        chunk = positions[k : k + args.crop_batch]
        crops = torch.cat(
            [x[:, :, stride * i : stride * i + WINDOW, stride * j : stride * j + WINDOW] for i, j in chunk]
        )
        batches.append((chunk, crops.contiguous()))
    with torch.inference_mode():
        flops_crop = common.count_flops(lambda: model(batches[0][1][:1]))
        model(batches[0][1][:2])  # warm-up
    logits = {}
    per_crop = []
    queue = list(range(len(batches)))

    def dense_run():
        with torch.inference_mode():
            fcn(x)

    def crop_run():
        k = queue.pop(0)
        chunk, crops = batches[k]
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(crops)
        common.synchronize(device)
        per_crop.append((time.perf_counter() - start) / len(chunk))
        for (i, j), row in zip(chunk, out):
            logits[(i, j)] = row

    blocks = min(args.blocks, len(batches))
    per_block = -(-len(batches) // blocks)
    dense_runs = common.runs_for(dense_once, budget=args.block_seconds, most=args.most)
    times = common.time_alternating(
        {"dense": dense_run, "crops": lambda: queue and crop_run()},
        runs={"dense": dense_runs, "crops": per_block},
        blocks=blocks,
        warmup=0,
        device=device,
    )
    t_dense = common.median(times["dense"])
    t_crops = common.median(per_crop) * windows
    diff = max(float((logits[p] - dense[0, :, p[0], p[1]]).abs().max()) for p in logits)
    scale = max(float(logits[p].abs().max()) for p in logits)
    ideal = windows * WINDOW**2 / size**2
    counted = windows * flops_crop / flops_dense
    return dict(
        size=size,
        stride=stride,
        windows=windows,
        cells=tuple(dense.shape[2:]),
        timed=len(logits),
        t_dense=t_dense,
        dense_runs=len(times["dense"]),
        t_crops=t_crops,
        speedup=t_crops / t_dense,
        ideal=ideal,
        counted=counted,
        diff=diff,
        scale=scale,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"torchvision models (default {' '.join(MODELS)})")
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=SIZES, help="square image sizes (default 512 1024 2048)"
    )
    parser.add_argument(
        "--strides",
        nargs="+",
        type=int,
        default=STRIDES,
        help="window strides: 32 is the native map, others use convert(output_stride=s) (default 32 8)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=SKIP,
        help=f"configurations to leave out, as MODEL/STRIDE/SIZE (default {' '.join(SKIP)}; "
        "--skip with nothing after it runs everything)",
    )
    parser.add_argument("--crop-batch", type=int, default=32, help="crops per batch (default 32)")
    parser.add_argument("--crop-batches", type=int, default=4, help="crop batches timed per configuration (default 4)")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks (dense, crops) per configuration")
    parser.add_argument(
        "--block-seconds",
        type=float,
        default=2.0,
        help="dense runs per block: as many as fit in this many seconds (1 to --most)",
    )
    parser.add_argument("--most", type=int, default=3, help="at most this many dense runs per block")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = common.setup(args)

    results, controls = [], []
    load_before = common.load_average()
    for name in args.models:
        args.model_name = name
        torch.manual_seed(0)
        model = common.calibrated(torchvision.models.get_model(name), (WINDOW, WINDOW))
        controls.append(f"{name} {common.one_window_error(model, (WINDOW, WINDOW))}")
        for stride in args.strides:
            configs = [s for s in args.sizes if f"{name}/{stride}/{s}" not in args.skip]
            if not configs:
                continue
            fcn = fcnify.convert(model, input_size=(WINDOW, WINDOW), output_stride=None if stride == 32 else stride)
            fcn, model_dev = fcn.to(device), model.to(device)
            for size in configs:
                row = measure(model_dev, fcn, size, stride, args, device)
                row["model"] = name
                results.append(row)
                print(
                    f"{name} {size}x{size} stride {stride}: {row['windows']} windows, dense {row['t_dense']:.2f} s, "
                    f"crops {row['t_crops']:.1f} s ({row['timed']} timed), speedup {row['speedup']:.1f} "
                    f"(ideal {row['ideal']:.1f}, counted FLOPs {row['counted']:.1f}), max abs diff {row['diff']:.2g} "
                    f"of max |logit| {row['scale']:.2g}",
                    flush=True,
                )
            del fcn
        model.cpu()
    load_after = common.load_average()

    header = (
        "| model | image | stride | windows | crops timed | dense (s) | crops (s, extrapolated) | speedup "
        "| FLOP ratio (ideal) | speedup / ideal | FLOP ratio (counted) | speedup / counted "
        "| max abs diff crop vs cell (max abs logit) |"
    )
    table = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        timed = f"all {r['timed']}" if r["timed"] == r["windows"] else f"{r['timed']}"
        table.append(
            f"| {r['model']} | {r['size']}x{r['size']} | {r['stride']} | {r['windows']} | {timed} | {common.fmt_s(r['t_dense'])} "
            f"| {common.fmt_s(r['t_crops'])} | {r['speedup']:.1f} | {r['ideal']:.1f} | {r['speedup'] / r['ideal']:.2f} "
            f"| {r['counted']:.1f} | {r['speedup'] / r['counted']:.2f} | {r['diff']:.2g} ({r['scale']:.2g}) |"
        )
    env = common.environment(
        device,
        args.threads,
        load_before,
        load_after,
        extra=[
            f"models: torchvision {', '.join(args.models)}, random weights, batch-norm statistics calibrated on "
            f"random data at {WINDOW}x{WINDOW}; batch 1 for the dense map, {args.crop_batch} crops per batch; "
            f"{args.blocks} alternating blocks per row; dense: median of {min(r['dense_runs'] for r in results)} "
            f"to {max(r['dense_runs'] for r in results)} runs; crops: median time per crop over the timed batches"
            if results
            else "no results",
            "control: at the training size (one window) the map equals the original logits: max abs diff "
            + "; ".join(controls),
        ],
    )
    print("\n".join(env + [""] + table))
    if not args.no_write and results:
        write_section(env, table, common.command("dense_vs_crops.py", argv), args)
    return 0


def write_section(env, table, command, args):
    skipped = (
        f" Left out: {', '.join(args.skip)} (by default resnet50 at stride 8 on 2048x2048: about a minute a"
        " run and 3 GB on one busy core; `--skip` with nothing after it runs everything)."
        if args.skip
        else ""
    )
    common.write_section(
        "dense_vs_crops",
        [
            "## Dense map vs crop-by-crop classification (`benchmarks/dense_vs_crops.py`)",
            "",
            f"From one run of `{command}`.{skipped} The dense map is `fcnify.convert(model)` (window",
            "mode; stride 8: `output_stride=8`) applied once to the whole image. The baseline crops every",
            f"{WINDOW}x{WINDOW} window at the same stride and batches the crops through the original model (how a",
            "patch predictor such as TIAToolbox's works; cropping itself is not timed). **Crop-by-crop",
            'times are extrapolated**: a fixed sample of windows spread over the image (the "crops timed"',
            "column) is run, and the median time per crop is multiplied by the number of windows; rows",
            'marked "all" ran every window.',
            "",
            "- *FLOP ratio (ideal)* = windows x window area / image area: the work crop-by-crop does per",
            "  unit of work of one pass over the image, the speedup a dense map could reach if it cost one",
            "  pass of the original network per image area. At stride 8 the dense map cannot reach it: the",
            "  layers after the removed strides run at 4x and 16x the resolution (dilated), which is more",
            "  work than one pass.",
            "- *FLOP ratio (counted)* = windows x FLOPs of one crop / FLOPs of the dense pass, both counted",
            "  by `torch.utils.flop_counter` (convolutions and matrix products): the speedup the dense map",
            "  can reach given the work it really does. *speedup / counted* near 1 means the dense pass runs",
            "  at the same FLOP rate as the crop batches (goal >= 0.8); above 1, at a higher one.",
            "- *windows* counts the windows inside the image. A stride-8 map has 3 more rows and columns",
            "  of cells at these sizes (40x40 cells at 512 for 37x37 windows): windows that run past the",
            "  bottom and right edges into the zero padding. The dense pass computes them (its time includes",
            "  them); crop-by-crop cannot, so they are neither counted nor compared.",
            "- *max abs diff*: the largest difference between a sampled crop's logits and its cell of the",
            "  dense map, next to the largest logit. It is not zero, and is not meant to be: these networks",
            "  pad their convolutions with zeros, so a crop sees zeros beyond its edges where the dense map",
            '  sees the neighbouring image (README, "Modes"). EfficientNet\'s squeeze-and-excitation blocks',
            "  also pool over the whole image in the dense map but over the crop alone. With random",
            "  weights the differences are as large as the differences between windows; the control line",
            "  below shows the map is exact where it should be (one window, the training size).",
            "",
            *common.bullets(env),
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
