"""ONNX Runtime vs PyTorch eager latency for a converted classifier, at several input sizes.

Converts MODEL (random weights, window mode), exports it with ``fcnify.export_onnx``
(validated in ONNX Runtime), then times both at each size in alternating blocks of runs
(eager, ORT, eager, ORT) so that a change in machine load hits both alike. Runs are not
interleaved one by one: ONNX Runtime's threads spin for a while after each run and would
slow the PyTorch run that follows. Prints one table and rewrites its own section of
docs/benchmarks.md (between ``<!-- onnx_vs_eager:start -->`` and ``<!-- onnx_vs_eager:end -->``).

    python benchmarks/onnx_vs_eager.py                     # resnet50 at 224 and 1024x1024 on CPU
    python benchmarks/onnx_vs_eager.py --sizes 224 512x768 --repeat 20 --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx  # noqa: F401  (its version goes into the doc)
import onnxruntime as ort
import torch
import torchvision

import fcnify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402


def time_pair(eager, onnx_run, repeat, warmup, blocks=2):
    """Median seconds of each over ``repeat`` runs, in ``2 * blocks`` alternating blocks."""
    per_block = max(1, -(-repeat // blocks))
    times = common.time_alternating(
        {"eager": eager, "onnx": onnx_run}, runs=per_block, blocks=blocks, warmup=warmup, pause=0.5
    )  # pause: let the other library's threads go idle
    return common.median(times["eager"]), common.median(times["onnx"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--input-size", type=int, default=224, help="training size (default 224)")
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=common.parse_size,
        default=[(224, 224), (1024, 1024)],
        help="input sizes HxW to time (default 224 1024x1024)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per size (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    common.add_common_arguments(parser, threads_default=sorted({1, torch.get_num_threads()}), several_threads=True)
    args = parser.parse_args(argv)
    common.setup(args)

    if args.device == "cuda":
        if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit("--device cuda needs a GPU for PyTorch and onnxruntime-gpu (CUDAExecutionProvider)")
        providers = ["CUDAExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    model = torchvision.models.get_model(args.model).eval()
    fcn = fcnify.convert(model, input_size=(args.input_size, args.input_size))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{args.model}.onnx")
        export = fcnify.export_onnx(fcn, path)
        device = torch.device(args.device)
        fcn = fcn.to(device)
        rows = []
        load_start = common.load_average()
        for threads, (h, w) in [(t, s) for t in args.threads for s in args.sizes]:
            torch.set_num_threads(threads)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=providers)
            x = torch.randn(args.batch, 3, h, w)
            x_dev, x_np = x.to(device), x.numpy()

            def eager():
                with torch.inference_mode():
                    out = fcn(x_dev)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out

            def onnx_run():
                return session.run(None, {"image": x_np})[0]

            ref, got = eager().cpu().numpy(), onnx_run()
            error = float(np.abs(ref - got).max())
            t_eager, t_onnx = time_pair(eager, onnx_run, args.repeat, args.warmup)
            rows.append((threads, f"{args.batch}x3x{h}x{w}", "x".join(map(str, got.shape)), t_eager, t_onnx, error))

    load = common.load_average()  # others' jobs share the CPU
    env = common.environment(
        device,
        args.threads,
        load_start,
        load,
        libraries=("torchvision", "onnxruntime", "onnx"),
        extra=[
            f"model: {args.model} converted by fcnify (window mode, trained at {args.input_size}, random weights), "
            f"ONNX opset {export.opset}; median of {args.repeat} runs in alternating blocks, {args.warmup} "
            "warm-up per block; the same intra-op thread count for PyTorch and ONNX Runtime"
        ],
    )
    threads = ", ".join(map(str, args.threads))
    env[1] = f"device: {common.device_name(device)}; threads: {threads} (one row each){common.niceness()}"
    header = "| threads | input | output | PyTorch eager (ms) | ONNX Runtime (ms) | ORT / eager | max abs diff |"
    table = [header, "|---:|---|---|---:|---:|---:|---:|"]
    for threads, size, out, t_eager, t_onnx, error in rows:
        table.append(
            f"| {threads} | {size} | {out} | {t_eager * 1e3:.1f} | {t_onnx * 1e3:.1f} | {t_onnx / t_eager:.2f} | {error:.1e} |"
        )
    print("\n".join(env + [""] + table))
    if not args.no_write:
        write_section(env, table, common.command("onnx_vs_eager.py", argv))
    return 0


def write_section(env, table, command):
    common.write_section(
        "onnx_vs_eager",
        [
            "## ONNX Runtime vs PyTorch eager (`benchmarks/onnx_vs_eager.py`)",
            "",
            "Latency of the same converted model in PyTorch eager mode and in ONNX Runtime, from one run of",
            f"`{command}`. A ratio below 1 means ONNX Runtime is faster. On a shared CPU, read the",
            "1-thread rows first: when other jobs hold the cores, PyTorch's OpenMP threads wait on each other",
            "at every barrier and its multi-thread timings degrade much more than ONNX Runtime's.",
            "",
            *common.bullets(env),
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
