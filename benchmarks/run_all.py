"""Run every benchmark in sequence and rewrite docs/benchmarks.md.

Each benchmark runs in its own subprocess (a fresh process: no memory or thread state carried
over) and rewrites its own section of docs/benchmarks.md; this script then rewrites the intro
(what each section measures, the command, the machine, which sections this run refreshed).
Each script also runs alone: ``python benchmarks/NAME.py --help``.

    python -m benchmarks                       # everything, 1 thread, CPU (~30 min on a busy 2-core machine)
    python benchmarks/run_all.py --only overhead testtimepool
    python -m benchmarks --quick               # a smoke test at small sizes; prints, writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

# (section, script, what it measures, extra arguments for --quick)
BENCHMARKS = [
    (
        "dense_vs_crops",
        "dense_vs_crops.py",
        "a dense class map (one pass of the converted model) against crop-by-crop classification with "
        "the original model (every 224 window cropped and batched), stride 32 and 8: speedup next to the "
        "FLOP ratio, and crop logits vs map cells",
        ["--models", "resnet18", "--sizes", "320", "--crop-batch", "8", "--crop-batches", "2"],
    ),
    (
        "stride_vs_shift_stitch",
        "stride_vs_shift_stitch.py",
        "`output_stride=s` maps against shift-and-stitch of the stride-32 model, s = 16, 8, 4: speedup and the "
        "difference in the interior of the map",
        ["--models", "resnet18", "--strides", "16", "--size", "320"],
    ),
    (
        "overhead",
        "overhead.py",
        "the converted model against the original at the training size, PyTorch eager and ONNX Runtime: "
        "what the conversion costs where both compute the same logits",
        ["--models", "efficientnet_b0", "--blocks", "2", "--block-seconds", "0.2"],
    ),
    (
        "tiled",
        "tiled_memory.py",
        "`fcnify.predict_tiled` against whole-image inference at 4096 and 8192 pixels square: peak memory "
        "and throughput",
        ["--model", "small", "--sizes", "1024", "--tile", "512"],
    ),
    (
        "streaming",
        "streaming.py",
        "row streaming against whole-image inference and `predict_tiled` on resnet18 at 2048 to 8192 pixels "
        "square: throughput and peak memory",
        ["--sizes", "1024", "--bands", "128", "--tiles", "--memory", ""],
    ),
    (
        "conversion_time",
        "conversion_time.py",
        "how long `fcnify.convert` takes (trace, rewrite, verify)",
        ["--models", "resnet18", "--repeat", "1", "--no-stride"],
    ),
    (
        "onnx_vs_eager",
        "onnx_vs_eager.py",
        "the converted model in ONNX Runtime against PyTorch eager, at 224 and 1024 pixels square",
        ["--model", "resnet18", "--sizes", "224", "--repeat", "2", "--warmup", "1"],
    ),
    (
        "testtimepool",
        "testtimepool.py",
        "timm's TestTimePoolHead against fcnify on timm models: speed, error, crashes",
        ["--models", "resnet18", "convnext_atto", "--blocks", "2", "--block-seconds", "0.2"],
    ),
    (
        "vs_patches",
        "vs_patches.py",
        "fcnify's stride-32 map (`fcn(x)` and `predict_tiled`) against MONAI's PatchInferer running the original "
        "classifier patch by patch at strides 32, 112 and 224 on a 4096x4096 slide: speedup next to the FLOP ratio",
        ["--size", "768", "--sample", "480", "--tile", "700", "--blocks", "1"],
    ),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [b[0] for b in BENCHMARKS]
    parser.add_argument("--only", nargs="+", choices=names, help="run these sections only")
    parser.add_argument("--skip", nargs="+", choices=names, default=[], help="leave these sections out")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test; implies --no-write")
    common.add_common_arguments(parser, threads_default=1)
    args = parser.parse_args(argv)
    common.setup(args)  # exits cleanly when --device cuda has no GPU
    write = not (args.no_write or args.quick)

    chosen = [b for b in BENCHMARKS if (not args.only or b[0] in args.only) and b[0] not in args.skip]
    here = os.path.dirname(os.path.abspath(__file__))
    status = {}
    load_before, start = common.load_average(), time.perf_counter()
    for name, script, _, quick in chosen:
        cmd = [sys.executable, os.path.join(here, script), "--device", args.device, "--threads", str(args.threads)]
        cmd += quick if args.quick else []
        cmd += [] if write else ["--no-write"]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(cmd)
        status[name] = (code, time.perf_counter() - t0, common.load_average())
        print(
            f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {status[name][1] / 60:.1f} min",
            flush=True,
        )
    total = time.perf_counter() - start
    print(
        "\n"
        + "\n".join(
            f"{n}: {'ok' if c == 0 else f'exit {c}'}, {s / 60:.1f} min, load {load:.1f} after"
            for n, (c, s, load) in status.items()
        )
    )
    if write:
        write_intro(args, status, load_before, total)
    return 0 if all(c == 0 for c, _, _ in status.values()) else 1


def write_intro(args, status, load_before, total):
    what = [f"- [{TITLES[name][0]}](#{TITLES[name][1]}): {text}." for name, _, text, _ in BENCHMARKS]
    ran = ", ".join(
        f"{n} ({s / 60:.1f} min{'' if c == 0 else f', FAILED: exit {c}'}; load {load:.1f} after)"
        for n, (c, s, load) in status.items()
    )
    common.write_section(
        "intro",
        [
            "Measured with the scripts in `benchmarks/`. Each section below says what it compares, the",
            "command that produced it, and the machine and load at the time. Rules for every number here:",
            "timings come from benchmarks, never from tests; the variants compared run side by side in",
            "one process, in alternating blocks (A B, B A, A B, ...) so that a change in the machine's load",
            "hits both alike and neither always runs first; each time is a median of several runs, and the",
            "tables give ratios, which survive a busy machine better than absolute times (on a shared",
            "machine, read a ratio within the run-to-run spread as equal). Random weights throughout (no",
            "downloads), with batch-norm statistics calibrated on random data where outputs are compared,",
            "so that logits are of order one.",
            "",
            *what,
            "",
            "Regenerate everything (each section is rewritten in place; each script also runs alone,",
            "`--help` for its options; every script takes `--threads N` and `--device cuda`):",
            "",
            "```",
            "python -m benchmarks            # or: python benchmarks/run_all.py [--only SECTION ...] [--threads N]",
            "```",
            "",
            f"- machine: {common.machine()}",
            f"- versions: {common.versions('torchvision', 'timm', 'onnxruntime', 'onnx')}",
            f"- last `run_all`: {datetime.date.today().isoformat()}, device {args.device}, {args.threads} thread(s), "
            f"{total / 60:.0f} min; 1-minute load average {load_before:.1f} at the start (other jobs shared the CPU "
            f"when it is above the thread count){common.niceness()}; sections refreshed: {ran}",
        ],
    )


# section -> (heading title for the intro's list, GitHub anchor of the section's heading)
TITLES = {
    "dense_vs_crops": (
        "Dense map vs crop-by-crop",
        "dense-map-vs-crop-by-crop-classification-benchmarksdense_vs_cropspy",
    ),
    "stride_vs_shift_stitch": (
        "Finer maps vs shift-and-stitch",
        "finer-maps-output_stride-vs-shift-and-stitch-benchmarksstride_vs_shift_stitchpy",
    ),
    "overhead": ("Overhead at the training size", "overhead-at-the-training-size-benchmarksoverheadpy"),
    "tiled": ("Tiled inference", "tiled-inference-on-huge-images-benchmarkstiled_memorypy"),
    "streaming": ("Row streaming", "row-streaming-vs-whole-image-benchmarksstreamingpy"),
    "conversion_time": ("Conversion time", "conversion-time-benchmarksconversion_timepy"),
    "onnx_vs_eager": ("ONNX Runtime vs eager", "onnx-runtime-vs-pytorch-eager-benchmarksonnx_vs_eagerpy"),
    "testtimepool": ("timm's TestTimePoolHead", "timms-testtimepoolhead-vs-fcnify-benchmarkstesttimepoolpy"),
    "vs_patches": ("fcnify vs MONAI patch by patch", "fcnify-vs-a-patch-by-patch-peer-monai-benchmarksvs_patchespy"),
}


if __name__ == "__main__":
    sys.exit(main())
