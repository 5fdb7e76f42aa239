"""Cost of conversion at the training size: the converted model vs the original, eager and ONNX Runtime.

At the training size the converted model computes the same logits as the original, with its
head rewritten (a global pool slid as a window pool, Linear layers as convolutions). This
measures what that costs: batch 1 at the training size, PyTorch eager (original vs converted,
alternating blocks) and ONNX Runtime (the original exported with ``torch.onnx.export(...,
dynamo=True)`` at a static shape, the converted one with ``fcnify.export_onnx``: dynamic batch,
height and width). The goal is a ratio converted / original within 3%. A copy of the original
runs in the same rotation (original vs itself, "A/A"): its ratio is the noise floor of the run.

    python benchmarks/overhead.py
    python benchmarks/overhead.py --models resnet50 --no-onnx --no-write
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
import torchvision

import fcnify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

MODELS = ["resnet50", "convnext_tiny", "efficientnet_b0", "mobilenet_v3_large", "vgg16"]
SIZE = (224, 224)


def export_original(model, path: str) -> None:
    """The original classifier in ONNX at one static shape, torch's dynamo exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, *SIZE),), path, dynamo=True, external_data=False, verbose=False)


def session(path: str, threads: int, device):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"torchvision models (default {' '.join(MODELS)})")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per pair (default 6)")
    parser.add_argument("--block-seconds", type=float, default=1.0, help="runs per block: as many as fit (1 to 10)")
    parser.add_argument("--no-onnx", action="store_true", help="eager only")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = common.setup(args)
    if not args.no_onnx and device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit("--device cuda with ONNX Runtime needs onnxruntime-gpu (CUDAExecutionProvider); or pass --no-onnx")

    results = []
    load_before = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            model = common.calibrated(torchvision.models.get_model(name), SIZE)
            fcn = fcnify.convert(model, input_size=SIZE)
            x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))
            r = {"model": name}
            with torch.inference_mode():
                ref = model(x)
                r["scale"] = float(ref.abs().max())
                r["diff_eager"] = float((fcn(x).flatten(1) - ref).abs().max())
            model_d, fcn_d, x_d = model.to(device), fcn.to(device), x.to(device)
            twin_d = copy.deepcopy(model_d)

            def original():
                with torch.inference_mode():
                    model_d(x_d)

            def twin():
                with torch.inference_mode():
                    twin_d(x_d)

            def converted():
                with torch.inference_mode():
                    fcn_d(x_d)

            original(), converted()
            once = common.time_alternating({"o": original}, runs=3, blocks=1, warmup=0, device=device)["o"]
            once = max(common.median(once), 1e-4)
            runs = common.runs_for(once, args.block_seconds, 10)
            times = common.time_alternating(
                {"original": original, "converted": converted, "twin": twin},
                runs=runs,
                blocks=args.blocks,
                warmup=1,
                device=device,
            )
            r["eager"] = (common.median(times["original"]), common.median(times["converted"]), len(times["original"]))
            r["eager_aa"] = common.median(times["twin"]) / common.median(times["original"])
            r["spread"] = common.spread(times["original"])
            del twin_d
            if not args.no_onnx:
                fcn.cpu(), model.cpu()
                p_orig, p_conv = os.path.join(tmp, f"{name}.onnx"), os.path.join(tmp, f"{name}-fcn.onnx")
                export_original(model, p_orig)
                fcnify.export_onnx(fcn, p_conv)
                s_orig, s_conv = session(p_orig, args.threads, device), session(p_conv, args.threads, device)
                s_twin = session(p_orig, args.threads, device)
                x_np = x.numpy()
                in_orig, in_conv = s_orig.get_inputs()[0].name, s_conv.get_inputs()[0].name
                out_orig = s_orig.run(None, {in_orig: x_np})[0]
                out_conv = s_conv.run(None, {in_conv: x_np})[0]
                r["diff_onnx"] = float(np.abs(out_conv.reshape(out_orig.shape) - out_orig).max())
                r["diff_onnx_ref"] = float(np.abs(out_orig - ref.numpy()).max())
                times = common.time_alternating(
                    {
                        "original": lambda: s_orig.run(None, {in_orig: x_np}),
                        "converted": lambda: s_conv.run(None, {in_conv: x_np}),
                        "twin": lambda: s_twin.run(None, {in_orig: x_np}),
                    },
                    runs=runs,
                    blocks=args.blocks,
                    warmup=1,
                    pause=0.2 if args.threads > 1 else 0.0,
                )
                r["onnx"] = (
                    common.median(times["original"]),
                    common.median(times["converted"]),
                    len(times["original"]),
                )
                r["onnx_aa"] = common.median(times["twin"]) / common.median(times["original"])
                del s_orig, s_conv, s_twin
                os.remove(p_orig), os.remove(p_conv)
            results.append(r)
            line = (
                f"{name}: eager {r['eager'][0] * 1e3:.1f} -> {r['eager'][1] * 1e3:.1f} ms "
                f"({r['eager'][1] / r['eager'][0]:.3f}; A/A {r['eager_aa']:.3f})"
            )
            if "onnx" in r:
                line += (
                    f", ONNX Runtime {r['onnx'][0] * 1e3:.1f} -> {r['onnx'][1] * 1e3:.1f} ms "
                    f"({r['onnx'][1] / r['onnx'][0]:.3f}; A/A {r['onnx_aa']:.3f})"
                )
            print(line, flush=True)
            del model, fcn, model_d, fcn_d
    load_after = common.load_average()

    header = (
        "| model | eager original (ms) | eager converted (ms) | eager converted / original | eager A/A "
        "| ORT original (ms) | ORT converted (ms) | ORT converted / original | ORT A/A "
        "| run-to-run spread (eager original) | max abs diff eager (ORT) | max abs logit |"
    )
    table = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        e = r["eager"]
        o = r.get("onnx")
        ort_cells = (
            f"{common.fmt_ms(o[0])} | {common.fmt_ms(o[1])} | **{o[1] / o[0]:.3f}** | {r['onnx_aa']:.3f}"
            if o
            else "- | - | - | -"
        )
        diffs = f"{r['diff_eager']:.1e}" + (f" ({r['diff_onnx']:.1e})" if o else "")
        table.append(
            f"| {r['model']} | {common.fmt_ms(e[0])} | {common.fmt_ms(e[1])} | **{e[1] / e[0]:.3f}** "
            f"| {r['eager_aa']:.3f} | {ort_cells} "
            f"| {r['spread']:.0%} | {diffs} | {r['scale']:.2g} |"
        )
    runs = sorted({r["eager"][2] for r in results} | {r["onnx"][2] for r in results if "onnx" in r})
    env = common.environment(
        device,
        args.threads,
        load_before,
        load_after,
        libraries=("torchvision", "onnxruntime", "onnx"),
        extra=[
            f"models: torchvision, random weights, batch-norm statistics calibrated on random data; "
            f"input 1x3x{SIZE[0]}x{SIZE[1]}; {args.blocks} alternating blocks per pair, median of "
            f"{runs[0] if runs else 0} to {runs[-1] if runs else 0} runs per variant"
        ],
    )
    print("\n".join(env + [""] + table))
    if not args.no_write and results:
        write_section(env, table, common.command("overhead.py", argv))
    return 0


def write_section(env, table, command):
    common.write_section(
        "overhead",
        [
            "## Overhead at the training size (`benchmarks/overhead.py`)",
            "",
            f"From one run of `{command}`. Latency of the converted model (window mode) against the",
            "original at the training size, where both compute the same logits: PyTorch eager, and ONNX",
            "Runtime with the original exported by `torch.onnx.export(..., dynamo=True)` at a static",
            "1x3x224x224 shape and the converted model by `fcnify.export_onnx` (symbolic batch, height",
            "and width). Goal: converted / original within 3% (0.97 to 1.03). The *max abs diff* column is",
            "converted vs original logits, in eager mode and (in brackets) in ONNX Runtime. *A/A* is a copy",
            "of the original timed in the same rotation, divided by the original: the noise floor of this",
            "run (a converted / original ratio no further from 1 than A/A is no measurable overhead). The",
            "*run-to-run spread* is the interquartile range of the original's eager runs over their median.",
            "",
            *common.bullets(env),
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
