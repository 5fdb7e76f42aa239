"""Time of ``fcnify.convert`` itself: trace, rewrite, verify.

For each model, median of ``--repeat`` conversions, split into the phases ``convert`` runs:
``prepare`` (torch.fx trace, and the traced model run at the training size and at a larger
probe size to record every node's shape), ``build`` without verification (head rewrite,
recompile, probe run of the result) and ``verify`` (original vs converted at the training size,
batch 2). The whole ``convert`` call is timed as well, and once more with ``output_stride=8``
(which adds a second verification of every native cell). The full sweep over every torchvision
and timm classifier is in docs/coverage.md (its table has a time column).

    python benchmarks/conversion_time.py
    python benchmarks/conversion_time.py --models resnet18 --repeat 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torchvision

import fcnify
from fcnify._convert import build, prepare

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

MODELS = ["resnet50", "convnext_tiny", "efficientnet_b0"]
SIZE = (224, 224)


def timed(fn):
    """``((wall seconds, CPU seconds of this process), result)`` of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - start, time.process_time() - cpu), out


def cell(times) -> str:
    """``wall (CPU)`` seconds."""
    return f"{times[0]:.2f} ({times[1]:.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"torchvision models (default {' '.join(MODELS)})")
    parser.add_argument("--repeat", type=int, default=3, help="conversions per model (median reported; default 3)")
    parser.add_argument("--no-stride", action="store_true", help="leave out the output_stride=8 column")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = common.setup(args)
    if device.type == "cuda":
        print("note: fcnify.convert traces and verifies on the model's device; the models are moved to cuda")

    results, cold = [], (float("nan"), float("nan"))
    load_before = common.load_average()
    for name in args.models:
        torch.manual_seed(0)
        model = common.calibrated(torchvision.models.get_model(name), SIZE).to(device)
        phases = {"prepare": [], "build": [], "verify": [], "convert": [], "stride8": []}
        if not results:  # the process's first conversion pays one-time costs (lazy imports, first kernels)
            cold, _ = timed(lambda: fcnify.convert(model, input_size=SIZE))
        for _ in range(args.repeat):  # the phases one after the other, then the whole call
            t, traced = timed(lambda: prepare(model, SIZE, modes=("window",)))
            phases["prepare"].append(t)
            t, fcn = timed(lambda: build(model, traced, "window", verify=False))
            phases["build"].append(t)
            t, report = timed(lambda: fcnify.verify(model, fcn, traced.size, "window", batch=traced.x2.shape[0]))
            phases["verify"].append(t)
            assert report.passed, report
            t, _ = timed(lambda: fcnify.convert(model, input_size=SIZE))
            phases["convert"].append(t)
            if not args.no_stride:
                t, _ = timed(lambda: fcnify.convert(model, input_size=SIZE, output_stride=8))
                phases["stride8"].append(t)
        r = {
            "model": name,
            "nodes": len(traced.gm.graph.nodes),
            **{k: (common.median([w for w, _ in v]), common.median([c for _, c in v])) for k, v in phases.items()},
        }
        results.append(r)
        print(
            f"{name}: convert {cell(r['convert'])} s (prepare {cell(r['prepare'])}, build {cell(r['build'])}, "
            f"verify {cell(r['verify'])}); output_stride=8: {cell(r['stride8'])} s  (wall (CPU))",
            flush=True,
        )
    load_after = common.load_average()

    header = "| model | graph nodes | convert | trace + shapes | rewrite + probe | verify |"
    header += "" if args.no_stride else " convert, output_stride=8 |"
    table = [header, "|---|---:|---:|---:|---:|---:|" + ("" if args.no_stride else "---:|")]
    for r in results:
        row = (
            f"| {r['model']} | {r['nodes']} | {cell(r['convert'])} | {cell(r['prepare'])} | {cell(r['build'])} "
            f"| {cell(r['verify'])} |"
        )
        table.append(row + ("" if args.no_stride else f" {cell(r['stride8'])} |"))
    env = common.environment(
        device,
        args.threads,
        load_before,
        load_after,
        extra=[
            f"models: torchvision, random weights, batch-norm statistics calibrated on random data; window mode, "
            f"training size {SIZE[0]}x{SIZE[1]}, example batch 2; median of {args.repeat} conversions, after a first "
            f"conversion of {args.models[0]} in the fresh process that took {cell(cold)} s (one-time costs included)"
        ],
    )
    print("\n".join(env + [""] + table))
    if not args.no_write and results:
        write_section(env, table, common.command("conversion_time.py", argv))
    return 0


def write_section(env, table, command):
    common.write_section(
        "conversion_time",
        [
            "## Conversion time (`benchmarks/conversion_time.py`)",
            "",
            f"From one run of `{command}`. Seconds of `fcnify.convert(model, input_size=(224, 224))`,",
            "and of its phases run one after the other: *trace + shapes* (torch.fx trace, then the traced",
            "model run at the training size and at a larger probe size to record every node's shape),",
            "*rewrite + probe* (head rewrite, recompile, one run of the result at the probe size) and",
            "*verify* (original vs converted at the training size, batch 2). The phases add up to about the",
            "whole call. Saving is not included (`.pt2` export: a few seconds more). Each cell is *wall",
            "(CPU)* seconds: the CPU time of the process is what the conversion costs; wall time is longer",
            "when other jobs hold the cores (this is an absolute time, with nothing to compare side by side).",
            "",
            "Every torchvision and timm classifier, converted in three modes, with the time of each:",
            "[docs/coverage.md](coverage.md) (`fcnify zoo`; not re-run by this script).",
            "",
            *common.bullets(env),
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
