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
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import fcnify

START, END = "<!-- onnx_vs_eager:start -->", "<!-- onnx_vs_eager:end -->"
DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")


def parse_size(text):
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_pair(eager, onnx_run, repeat, warmup, blocks=2):
    """Median seconds of each over ``repeat`` runs, in ``2 * blocks`` alternating blocks."""
    times = {eager: [], onnx_run: []}
    per_block = max(1, -(-repeat // blocks))
    for _ in range(blocks):
        for fn in (eager, onnx_run):
            time.sleep(0.5)  # let the other library's threads go idle
            for _ in range(warmup):
                fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[fn].append(time.perf_counter() - start)
    return statistics.median(times[eager]), statistics.median(times[onnx_run])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--input-size", type=int, default=224, help="training size (default 224)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(224, 224), (1024, 1024)],
                        help="input sizes HxW to time (default 224 1024x1024)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per size (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                        help="intra-op thread counts for both, one table row each (default: 1 and torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: PyTorch on the GPU and ONNX Runtime's CUDAExecutionProvider")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)

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
        load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
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

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # others' jobs share the CPU
    env = [
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores; 1-minute load average {load_start:.1f} before "
        f"timing, {load:.1f} after: other jobs shared the CPU)",
        f"device: {args.device}; threads: the same intra-op thread count for PyTorch and ONNX Runtime",
        f"versions: Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"onnx {onnx.__version__}, torchvision {torchvision.__version__}, fcnify {fcnify.__version__}",
        f"model: {args.model} converted by fcnify (window mode, trained at {args.input_size}, random weights), "
        f"ONNX opset {export.opset}; median of {args.repeat} runs in alternating blocks, {args.warmup} warm-up per block; "
        f"{datetime.date.today().isoformat()}",
    ]
    header = "| threads | input | output | PyTorch eager (ms) | ONNX Runtime (ms) | ORT / eager | max abs diff |"
    table = [header, "|---:|---|---|---:|---:|---:|---:|"]
    for threads, size, out, t_eager, t_onnx, error in rows:
        table.append(f"| {threads} | {size} | {out} | {t_eager * 1e3:.1f} | {t_onnx * 1e3:.1f} | {t_onnx / t_eager:.2f} | {error:.1e} |")
    print("\n".join(env + [""] + table))
    if not args.no_write:
        command = "python benchmarks/onnx_vs_eager.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(env, table, command.strip())
    return 0


def write_section(env, table, command):
    body = [
        START,
        "## ONNX Runtime vs PyTorch eager",
        "",
        "Latency of the same converted model in PyTorch eager mode and in ONNX Runtime, from one run of",
        f"`{command}`. A ratio below 1 means ONNX Runtime is faster. On a shared CPU, read the",
        "1-thread rows first: when other jobs hold the cores, PyTorch's OpenMP threads wait on each other",
        "at every barrier and its multi-thread timings degrade much more than ONNX Runtime's.",
        "",
        *[f"- {line}" for line in env],
        "",
        *table,
        END,
    ]
    doc = os.path.normpath(DOC)
    text = open(doc).read() if os.path.exists(doc) else "# Benchmarks\n\nMeasured with the scripts in `benchmarks/`.\n"
    section = "\n".join(body)
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    with open(doc, "w") as f:
        f.write(text)
    print(f"wrote {doc}")


if __name__ == "__main__":
    sys.exit(main())
