"""Finer maps: ``convert(..., output_stride=s)`` vs shift-and-stitch of the stride-32 network.

Shift-and-stitch computes a stride-s map from the native (stride 32) converted network by
running it (32/s)^2 times, on the image cropped by (a*s, b*s) for every a, b < 32/s, and
interleaving the maps: pass (a, b) gives the cells (a + f*i, b + f*j), f = 32/s (the logic of
``tests/test_stride.py``). fcnify computes the same map in one pass of a network whose last
strides are removed and whose later layers are dilated. Both run side by side, in alternating
blocks, for each model and stride.

The two agree exactly (to float rounding) on the cells whose receptive field does not reach the
top or left edge of the cropped image their pass saw: there, the shifted pass pads with zeros
where fcnify sees the image (the bottom and right edges are the image's own in both). Those are
the "interior" cells of the table; the difference over all cells is given too.

    python benchmarks/stride_vs_shift_stitch.py                          # resnet18 (16, 8, 4), resnet50 (16, 8) at 512
    python benchmarks/stride_vs_shift_stitch.py --models resnet18 --strides 16 --size 384 --no-write
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

MODELS = ["resnet18", "resnet50"]
STRIDES = [16, 8, 4]
SKIP = ["resnet50/4"]  # 64 passes against a network whose last stage runs at 64x the cells: minutes per run
WINDOW = 224


def shift_and_stitch(native, x, s: int, native_stride: int = 32):
    """The stride-``s`` map from ``(native_stride / s)^2`` shifted passes of ``native``; unfilled cells are NaN."""
    f = native_stride // s
    maps = {}
    for a in range(f):
        for b in range(f):
            maps[a, b] = native(x[:, :, a * s :, b * s :])
    n, k = maps[0, 0].shape[:2]
    rows = max(a + f * m.shape[2] for (a, _), m in maps.items())
    cols = max(b + f * m.shape[3] for (_, b), m in maps.items())
    out = maps[0, 0].new_full((n, k, rows, cols), float("nan"))
    for (a, b), m in maps.items():
        out[:, :, a::f, b::f][:, :, : m.shape[2], : m.shape[3]] = m
    return out


def interior_mask(geo, rows: int, cols: int, s: int, native_stride: int = 32):
    """Cells whose receptive field, in the cropped image of their pass, does not reach its top or left edge."""
    f = native_stride // s
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for c in range(cols):
            a, i = r % f, r // f
            b, j = c % f, c // f
            top, left, _, _ = geo.box(i, j)
            mask[r, c] = (a == 0 or top >= 0) and (b == 0 or left >= 0)
    return mask


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"torchvision models (default {' '.join(MODELS)})")
    parser.add_argument("--size", type=common.parse_size, default=(512, 512), help="image size HxW (default 512)")
    parser.add_argument("--strides", nargs="+", type=int, default=STRIDES, help="output strides (default 16 8 4)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=SKIP,
        help=f"MODEL/STRIDE pairs to leave out (default {' '.join(SKIP)}; --skip alone runs all)",
    )
    parser.add_argument("--mode", choices=("window", "dense"), default="window")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks per row (default 2)")
    parser.add_argument("--block-seconds", type=float, default=3.0, help="runs per block: as many as fit (1 to 3)")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = common.setup(args)

    h, w = args.size
    results = []
    load_before = common.load_average()
    for name in args.models:
        torch.manual_seed(0)
        model = common.calibrated(torchvision.models.get_model(name), (WINDOW, WINDOW))
        native = fcnify.convert(model, input_size=(WINDOW, WINDOW), mode=args.mode).to(device)
        geo = fcnify.geometry(native, input_size=(WINDOW, WINDOW))
        torch.manual_seed(1)
        x = torch.randn(1, 3, h, w, device=device)
        for s in args.strides:
            if f"{name}/{s}" in args.skip:
                continue
            fine = fcnify.convert(model, input_size=(WINDOW, WINDOW), mode=args.mode, output_stride=s).to(device)
            with torch.inference_mode():
                start = time.perf_counter()
                flops_fine, out = common.count_flops(lambda: fine(x), with_output=True)
                common.synchronize(device)
                once_fine = time.perf_counter() - start
                start = time.perf_counter()
                flops_stitch, ref = common.count_flops(lambda: shift_and_stitch(native, x, s), with_output=True)
                common.synchronize(device)
                once_stitch = time.perf_counter() - start

                def run_fine():
                    with torch.inference_mode():
                        fine(x)

                def run_stitch():
                    with torch.inference_mode():
                        shift_and_stitch(native, x, s)

                times = common.time_alternating(
                    {"fine": run_fine, "stitch": run_stitch},
                    runs={
                        "fine": common.runs_for(once_fine, args.block_seconds, 3),
                        "stitch": common.runs_for(once_stitch, args.block_seconds, 3),
                    },
                    blocks=args.blocks,
                    warmup=0,
                    device=device,
                )
            rows, cols = min(out.shape[2], ref.shape[2]), min(out.shape[3], ref.shape[3])
            a, b = out[0, :, :rows, :cols].cpu(), ref[0, :, :rows, :cols].cpu()
            filled = ~torch.isnan(b).any(0)
            diff = (a - b).abs().amax(0)
            inner = interior_mask(geo, rows, cols, s) & filled
            r = dict(
                model=name,
                s=s,
                passes=(32 // s) ** 2,
                shape=tuple(out.shape[2:]),
                stitched=tuple(ref.shape[2:]),
                unfilled=int((~filled).sum()),
                t_fine=common.median(times["fine"]),
                t_stitch=common.median(times["stitch"]),
                runs=(len(times["fine"]), len(times["stitch"])),
                flops=flops_stitch / flops_fine,
                diff_all=float(diff[filled].max()),
                scale=float(b[:, filled].abs().max()),
                interior=int(inner.sum()),
                cells=rows * cols,
                diff_inner=float(diff[inner].max()) if inner.any() else float("nan"),
                native_cells=float(diff[:: 32 // s, :: 32 // s].max()),
            )
            results.append(r)
            print(
                f"{name} stride {s}: fcnify {r['t_fine']:.2f} s, shift-and-stitch ({r['passes']} passes) "
                f"{r['t_stitch']:.2f} s, speedup {r['t_stitch'] / r['t_fine']:.2f} (FLOPs {r['flops']:.2f}); "
                f"max abs diff all {r['diff_all']:.2g}, interior ({r['interior']}/{r['cells']} cells) "
                f"{r['diff_inner']:.2g}, native cells {r['native_cells']:.2g}",
                flush=True,
            )
            del fine
    load_after = common.load_average()

    header = (
        "| model | output stride | passes | map | fcnify (s) | shift-and-stitch (s) | speedup | FLOP ratio "
        "| max abs diff, all cells (max abs logit) | interior cells | max abs diff, interior |"
    )
    table = [header, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        table.append(
            f"| {r['model']} | {r['s']} | {r['passes']} | {r['shape'][0]}x{r['shape'][1]} | {common.fmt_s(r['t_fine'])} "
            f"| {common.fmt_s(r['t_stitch'])} | {r['t_stitch'] / r['t_fine']:.2f} | {r['flops']:.2f} "
            f"| {r['diff_all']:.2g} ({r['scale']:.2g}) | {r['interior']} of {r['cells']} | {r['diff_inner']:.1e} |"
        )
    runs = [n for r in results for n in r["runs"]] or [0]
    extra = [
        f"models: torchvision {', '.join(args.models)} ({args.mode} mode, random weights, batch-norm statistics "
        f"calibrated on random data); image 1x3x{h}x{w}; {args.blocks} alternating blocks, median of "
        f"{min(runs)} to {max(runs)} runs per variant"
    ]
    unfilled = [r for r in results if r["unfilled"]]
    if unfilled:
        extra.append(
            "cells no shifted pass reaches (past the last window; left out of the comparison): "
            + ", ".join(f"{r['model']}/{r['s']}: {r['unfilled']}" for r in unfilled)
        )
    env = common.environment(device, args.threads, load_before, load_after, extra=extra)
    print("\n".join(env + [""] + table))
    if not args.no_write and results:
        write_section(env, table, common.command("stride_vs_shift_stitch.py", argv), args)
    return 0


def write_section(env, table, command, args):
    skipped = f" Left out: {', '.join(args.skip)}." if args.skip else ""
    common.write_section(
        "stride_vs_shift_stitch",
        [
            "## Finer maps: `output_stride` vs shift-and-stitch (`benchmarks/stride_vs_shift_stitch.py`)",
            "",
            f"From one run of `{command}`.{skipped} A stride-s map two ways: fcnify's",
            "`convert(model, output_stride=s)` (one pass; strides removed, later layers dilated), and",
            "shift-and-stitch: (32/s)^2 passes of the stride-32 converted model over the image cropped by",
            "(a\\*s, b\\*s), interleaved. *speedup* = shift-and-stitch time / fcnify time; *FLOP ratio* is",
            "the same ratio for counted FLOPs (`torch.utils.flop_counter`, convolutions and matrix products).",
            "",
            "The maps are not equal everywhere, and should not be: a shifted pass sees its cropped image's",
            "top and left edge as a border and pads it with zeros, where fcnify's single pass sees the",
            "image. Every cell whose receptive field (from `fcnify.geometry`) reaches that edge differs,",
            "by up to the value in the *all cells* column, decaying with the distance to the edge. The",
            "*interior* cells are the others: those whose receptive field lies inside the cropped image of",
            "their pass (all cells of pass (0, 0), which are the native map, and the cells far enough",
            "from the top-left edge in the other passes; the bottom and right edges are the image's own in",
            "both). There the two agree to float rounding.",
            "",
            *common.bullets(env),
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
