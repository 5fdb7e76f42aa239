"""Helpers shared by the benchmark scripts: machine description, timing, and docs/benchmarks.md.

Every script prints a table and rewrites its own section of docs/benchmarks.md, between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->``. Sections missing from the file are inserted
in the order of :data:`SECTIONS`, so the document reads the same whichever script ran first.

Timing rules, applied by :func:`time_alternating`: the variants being compared run side by
side in one process, in alternating blocks (A B, B A, A B, ...), so that a change in the
machine's load hits both alike and neither always runs first; the median of the runs is
reported, and tables show ratios.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.normpath(os.path.join(HERE, "..", "docs", "benchmarks.md"))

# the order of the sections in docs/benchmarks.md (the name is the marker's)
SECTIONS = [
    "intro",
    "dense_vs_crops",
    "stride_vs_shift_stitch",
    "overhead",
    "tiled",
    "tiled_small",
    "conversion_time",
    "onnx_vs_eager",
    "testtimepool",
]


# -- command line -------------------------------------------------------------------------------


def parse_size(text: str):
    """``"512"`` -> (512, 512); ``"512x768"`` -> (512, 768)."""
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def add_common_arguments(parser: argparse.ArgumentParser, threads_default=1, several_threads: bool = False) -> None:
    """``--device``, ``--threads`` and ``--no-write``, the same for every script."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where PyTorch runs (cuda: exits with a message when no GPU is available)",
    )
    if several_threads:
        parser.add_argument(
            "--threads",
            type=int,
            nargs="+",
            default=threads_default,
            help=f"intra-op CPU thread counts, one table row each (default {threads_default})",
        )
    else:
        parser.add_argument(
            "--threads",
            type=int,
            default=threads_default,
            help=f"intra-op CPU threads for PyTorch (and ONNX Runtime) (default {threads_default})",
        )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")


def setup(args: argparse.Namespace):
    """Apply ``--threads`` and check ``--device``; returns the ``torch.device``."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        script = os.path.basename(sys.argv[0])
        script = "python -m benchmarks" if script == "__main__.py" else script
        sys.exit(
            f"{script}: --device cuda: CUDA is not available "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)"
        )
    threads = args.threads if isinstance(args.threads, list) else [args.threads]
    if min(threads) < 1:
        sys.exit(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(threads[0])
    return torch.device(args.device)


def command(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command line that produced a section, for the doc."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a != "--no-write"]
    return " ".join([f"python benchmarks/{script}", *args]).strip()


# -- machine ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def load_average() -> float:
    """1-minute load average (other jobs on the machine), NaN where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def versions(*libraries: str) -> str:
    """``Python 3.11.7, torch 2.x, ...`` for the libraries a script uses (imported ones only)."""
    import torch

    import fcnify

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in libraries:
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        parts.append(f"{name} {getattr(module, '__version__', '?')}")
    parts.append(f"fcnify {fcnify.__version__}")
    return ", ".join(parts)


def niceness() -> str:
    """``"; process niceness N"`` when the process runs at a lower priority than normal."""
    try:
        nice = os.nice(0)
    except (AttributeError, OSError):
        return ""
    return f"; process niceness {nice} (lower CPU priority than the other jobs)" if nice > 0 else ""


def device_name(device) -> str:
    import torch

    if getattr(device, "type", device) == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def machine() -> str:
    """One line: CPU model, logical cores and memory."""
    return f"{cpu_model()}, {os.cpu_count()} logical cores, {memory_gb():.0f} GB RAM"


def environment(
    device,
    threads: int,
    load_before: float,
    load_after: float,
    libraries: Sequence[str] = ("torchvision",),
    extra: Sequence[str] = (),
) -> List[str]:
    """The machine-description bullet lines of a section."""
    return [
        f"machine: {machine()}; 1-minute load average {load_before:.1f} before timing, {load_after:.1f} after "
        "(a load above the thread count means other jobs shared the CPU)",
        f"device: {device_name(device)}; {threads} intra-op thread{'s' if threads != 1 else ''}{niceness()}",
        f"versions: {versions(*libraries)}",
        *extra,
        f"date: {datetime.date.today().isoformat()}",
    ]


# -- timing -------------------------------------------------------------------------------------


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def time_alternating(
    fns: Mapping[str, Callable[[], object]],
    runs: Mapping[str, int] | int = 3,
    blocks: int = 2,
    warmup: Mapping[str, int] | int = 1,
    pause: float = 0.0,
    device=None,
) -> Dict[str, List[float]]:
    """Seconds of every timed run of each function, measured in alternating blocks.

    ``blocks`` times over: for each function in turn, ``warmup`` untimed runs (first block only
    unless ``pause``), then ``runs`` timed ones. The order is reversed every other block
    (A B, B A, A B, ...), so that neither variant always follows the other. ``pause`` seconds of sleep before each block lets
    the threads of the previous library go idle (ONNX Runtime spins after each run).
    """
    runs = {name: runs for name in fns} if isinstance(runs, int) else dict(runs)
    warmup = {name: warmup for name in fns} if isinstance(warmup, int) else dict(warmup)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for block in range(blocks):
        order = list(fns.items())
        for name, fn in order if block % 2 == 0 else order[::-1]:  # A B, B A, ...: no variant always runs first
            if pause:
                time.sleep(pause)
            if block == 0 or pause:
                for _ in range(warmup.get(name, 0)):
                    fn()
                synchronize(device)
            for _ in range(runs.get(name, 1)):
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> float:
    """Interquartile range over the median: the run-to-run noise of a timing."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def runs_for(seconds: float, budget: float = 2.0, most: int = 5) -> int:
    """How many timed runs of ``seconds`` fit in ``budget`` seconds per block (1 to ``most``)."""
    return max(1, min(most, int(budget / max(seconds, 1e-6))))


def calibrated(model, size=(224, 224)):
    """``model`` with batch-norm statistics from random data at ``size`` (logits of order one), in eval mode."""
    import torch

    from fcnify.zoo import calibrate_batchnorm

    torch.manual_seed(0)
    return calibrate_batchnorm(model, tuple(size))


def count_flops(fn: Callable[[], object], with_output: bool = False):
    """FLOPs of one call of ``fn`` (convolutions and matrix products, torch's flop counter).

    With ``with_output``, ``(flops, output)``: the counted run doubles as a warm-up.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        out = fn()
    return (counter.get_total_flops(), out) if with_output else counter.get_total_flops()


def one_window_error(model, size=(224, 224)) -> str:
    """Max abs difference between ``fcnify.convert(model)`` and ``model`` on one training-size input."""
    import torch

    import fcnify

    fcn = fcnify.convert(model, input_size=tuple(size))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref, out = model(x), fcn(x)
    return f"{(out.flatten(1) - ref).abs().max().item():.1e} (max abs logit {ref.abs().max().item():.2g})"


# -- docs/benchmarks.md -------------------------------------------------------------------------


def markers(name: str):
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, body: Sequence[str], doc: str = DOC) -> None:
    """Replace (or insert, in :data:`SECTIONS` order) the section ``name`` of ``doc``."""
    start, end = markers(name)
    section = "\n".join([start, *body, end])
    text = open(doc).read() if os.path.exists(doc) else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        later = SECTIONS[SECTIONS.index(name) + 1 :] if name in SECTIONS else []
        positions = [text.find(markers(other)[0]) for other in later]
        positions = [p for p in positions if p >= 0]
        if positions:
            at = min(positions)
            text = text[:at] + section + "\n\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    with open(doc, "w") as f:
        f.write(text)
    print(f"wrote section {name!r} of {doc}")


def bullets(lines: Sequence[str]) -> List[str]:
    return [f"- {line}" for line in lines]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds < 100 else f"{seconds:.0f}"
