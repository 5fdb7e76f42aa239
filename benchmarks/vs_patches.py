"""fcnify's dense class map against a real patch-by-patch peer, MONAI's PatchInferer, on one slide.

The peer is what pathology pipelines run today: MONAI's ``monai.inferers.PatchInferer`` with its
``SlidingWindowSplitter`` as the patch iterator, feeding 224x224 patches in batches to the
ORIGINAL classifier (torchvision resnet18, random weights, batch-norm statistics calibrated,
eval). A small ``Merger`` subclass keeps each patch's logits at its grid position (MONAI's
``AvgMerger`` averages overlapping outputs instead, which is not what a patch classifier wants).
It runs at stride 32 (the grid fcnify's map gives), 112 and 224 (the strides patch pipelines use:
half-overlapping and non-overlapping patches).

fcnify runs ``fcnify.convert(model)`` (window mode, stride 32) two ways: ``fcn(x)`` on the whole
image, and ``fcnify.predict_tiled`` (exact tiles of ``--tile`` pixels, bounded memory). The
image is a synthetic slide of ``--size`` pixels square, a mosaic of scikit-image photos.

At stride 32 the peer classifies 14 884 patches of a 4096 image (an hour on one busy core), so
it runs on a ``--sample`` pixel square corner of the slide and its time per patch is multiplied
by the number of patches: a linear extrapolation, marked in the table. Strides 112 and 224 run
on the whole slide. All variants run side by side in alternating blocks.

Where a peer window coincides with a cell of fcnify's map (same top-left pixel), the peer's
logits are compared with the cell. They differ because resnet18 pads its convolutions with
zeros: a patch sees zeros beyond its edges where the map sees the neighbouring pixels. A
control with a padding-free CNN (same pipeline, same comparison) shows the cells equal the
patch logits to float precision when padding does not intervene.

    python benchmarks/vs_patches.py                         # 4096x4096, ~15 min on one busy core
    python benchmarks/vs_patches.py --size 1024 --sample 480 --no-write
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import torch
import torchvision
from torch import nn

import fcnify
from fcnify.inference import plan_tiles

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

WINDOW = 224
PEER_STRIDES = [32, 112, 224]
SECTION = "vs_patches"
TIA_NOTE = (
    "TIAToolbox's PatchPredictor was the other candidate; `pip download --no-deps tiatoolbox` gives "
    "tiatoolbox 2.1.3, whose requirements pin torch<2.13.0, openslide-python<1.4.6, tifffile<2026.3.3 and "
    "imagecodecs<2026.3.6, below the pinned torch 2.14.1 and the installed readers, so it does not install "
    "here; MONAI 1.6 does, with torch 2.14"
)


# -- the slide ----------------------------------------------------------------------------------


def synthetic_slide(size: int, seed: int = 0) -> torch.Tensor:
    """``(1, 3, size, size)``: 512-pixel tiles of scikit-image photos, flipped at random, normalised."""
    import skimage.data
    from skimage.transform import resize

    photos = [
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.chelsea(),
        skimage.data.rocket(),
        skimage.data.immunohistochemistry(),
    ]
    tiles = [resize(p[..., :3], (512, 512), anti_aliasing=True, preserve_range=True).astype(np.uint8) for p in photos]
    rng = np.random.default_rng(seed)
    n = -(-size // 512)
    rows = []
    for _ in range(n):
        row = []
        for _ in range(n):
            tile = tiles[rng.integers(len(tiles))]
            row.append(tile[:: rng.choice([1, -1]), :: rng.choice([1, -1])])
        rows.append(np.concatenate(row, axis=1))
    image = np.concatenate(rows, axis=0)[:size, :size]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


# -- the peer: MONAI ------------------------------------------------------------------------------


def monai_patch_logits(model: nn.Module, x: torch.Tensor, stride: int, batch: int) -> torch.Tensor:
    """``(1, K, n, m)``: the model's logits on every 224 patch at ``stride``, via MONAI's PatchInferer.

    Cell ``(a, b)`` is the patch whose top-left pixel is ``(stride * a, stride * b)``; NaN where no
    patch fits (PatchInferer sizes the output from the padded image).
    """
    from monai.inferers import PatchInferer, SlidingWindowSplitter
    from monai.inferers.merger import Merger

    class CellMerger(Merger):
        """Each patch's logits at its grid position (MONAI scales the location by output/patch size)."""

        def __init__(self, merged_shape, cropped_shape=None, device=None):
            super().__init__(merged_shape, cropped_shape, device)
            self.values = torch.full(self.merged_shape, float("nan"))

        def aggregate(self, values, location):
            self.values[:, :, location[0], location[1]] = values[:, :, 0, 0]

        def finalize(self):
            self.is_finalized = True
            return self.values

    if WINDOW % stride:
        raise SystemExit(f"--peer-strides: {stride} does not divide {WINDOW}")
    cells = WINDOW // stride  # an output patch of cells x cells makes MONAI's location scale 1 / stride
    inferer = PatchInferer(
        splitter=SlidingWindowSplitter(
            patch_size=(WINDOW, WINDOW), overlap=(WINDOW - stride, WINDOW - stride), pad_mode=None
        ),
        merger_cls=CellMerger,
        batch_size=batch,
        match_spatial_shape=False,
        postprocessing=lambda logits: logits[:, :, None, None].expand(-1, -1, cells, cells),
    )
    with torch.inference_mode():
        return inferer(x, model)


def compare(peer: torch.Tensor, stride: int, fmap: torch.Tensor, geo) -> tuple:
    """Max abs difference between peer patches and the fcnify cells with the same window; cells compared.

    In window mode, cell ``(i, j)`` is the classifier's window whose top-left pixel is ``(sy * i, sx * j)``.
    """
    rows, cols = (torch.arange(n) * stride for n in peer.shape[2:])
    sy, sx = geo.stride
    oy = ox = 0
    ii = [
        (a, (y - oy) // sy)
        for a, y in enumerate(rows.tolist())
        if (y - oy) % sy == 0 and 0 <= (y - oy) // sy < fmap.shape[2]
    ]
    jj = [
        (b, (x - ox) // sx)
        for b, x in enumerate(cols.tolist())
        if (x - ox) % sx == 0 and 0 <= (x - ox) // sx < fmap.shape[3]
    ]
    a, i = zip(*ii)
    b, j = zip(*jj)
    p = peer[:, :, list(a)][:, :, :, list(b)]
    f = fmap[:, :, list(i)][:, :, :, list(j)]
    found = ~torch.isnan(p[0, 0])
    diff = (p - f).abs()[:, :, found]
    return diff.max().item(), f.abs().max().item(), int(found.sum())


# -- the control: no padding -------------------------------------------------------------------------


def unpadded_cnn() -> nn.Module:
    """A CNN of stride 32 without zero padding: patch logits and map cells must agree exactly."""
    torch.manual_seed(0)
    layers, channels = [], 3
    for out, k in [(16, 5), (32, 3), (32, 3), (64, 3), (64, 3)]:
        layers += [nn.Conv2d(channels, out, k, stride=2), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def control(x: torch.Tensor, batch: int) -> str:
    model = unpadded_cnn()
    fcn = fcnify.convert(model, input_size=(WINDOW, WINDOW))
    geo = fcnify.geometry(fcn, input_size=(WINDOW, WINDOW))
    part = x[:, :, :480, :480]
    with torch.inference_mode():
        fmap = fcn(part)
    err, top, n = compare(monai_patch_logits(model, part, 32, batch), 32, fmap, geo)
    return f"{err:.1e} over {n} windows (max abs logit {top:.2g})"


# -- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="slide side in pixels (default 4096)")
    parser.add_argument("--tile", type=int, default=2048, help="predict_tiled tile side (default 2048)")
    parser.add_argument(
        "--sample",
        type=int,
        default=736,
        help="side of the corner the stride-32 peer runs on, extrapolated (default 736: 289 patches)",
    )
    parser.add_argument(
        "--peer-strides", type=int, nargs="+", default=PEER_STRIDES, help="peer strides (divisors of 224)"
    )
    parser.add_argument("--batch", type=int, default=32, help="patches per batch for the peer (default 32)")
    parser.add_argument("--blocks", type=int, default=2, help="alternating timing blocks (default 2)")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = common.setup(args)
    if device.type != "cpu":
        sys.exit("vs_patches.py runs on the CPU only for now (the peer and fcnify both run where the tensors are)")

    x = synthetic_slide(args.size)
    torch.manual_seed(0)  # the same random weights every run
    model = common.calibrated(torchvision.models.resnet18(), (WINDOW, WINDOW))
    fcn = fcnify.convert(model, input_size=(WINDOW, WINDOW))
    geo = fcnify.geometry(fcn, input_size=(WINDOW, WINDOW))

    # FLOPs from shapes alone (a copy of the model on the meta device): no extra run of the big passes
    meta = copy.deepcopy(fcn).to("meta")
    on_meta = lambda h, w: common.count_flops(lambda: meta(torch.empty(1, 3, h, w, device="meta")))  # noqa: E731
    flops_whole = on_meta(args.size, args.size)
    tiles, _ = plan_tiles(geo, (args.size, args.size), (args.tile, args.tile))
    shapes = [(t.y1 - t.y0, t.x1 - t.x0) for t in tiles]
    flops_tiled = sum(on_meta(*shape) * shapes.count(shape) for shape in set(shapes))
    flops_patch = common.count_flops(lambda: model(x[:, :, :WINDOW, :WINDOW]))
    sample = x[:, :, : args.sample, : args.sample]
    counts = {}
    for s in args.peer_strides:
        n = ((sample if s == 32 else x).shape[2] - WINDOW) // s + 1
        counts[s] = (n * n, ((args.size - WINDOW) // s + 1) ** 2)  # (patches run, patches on the slide)

    # the timed runs keep their last output for the comparison; warm-up on the sample corner
    out = {}
    fns = {
        "fcn(x)": lambda: out.__setitem__("fcn(x)", fcn(x)),
        "predict_tiled": lambda: out.__setitem__(
            "predict_tiled", fcnify.predict_tiled(fcn, x, tile=args.tile, progress=False)
        ),
    }
    for s in args.peer_strides:
        part = sample if s == 32 else x
        fns[f"peer {s}"] = lambda part=part, s=s: out.__setitem__(s, monai_patch_logits(model, part, s, args.batch))
    with torch.inference_mode():
        fcn(sample)
        fcnify.predict_tiled(fcn, x[:, :, : args.tile, : args.tile], tile=args.tile, progress=False)
        monai_patch_logits(model, sample, 224, args.batch)
        load_before = common.load_average()
        times = common.time_alternating(fns, runs=1, blocks=args.blocks, warmup=0, device=device)
    load_after = common.load_average()
    t = {name: common.median(v) for name, v in times.items()}
    fmap, tiled, peers = out["fcn(x)"], out["predict_tiled"], {s: out[s] for s in args.peer_strides}

    tiled_err = (tiled - fmap).abs().max().item()
    rows = []
    for s in args.peer_strides:
        ran, total = counts[s]
        peer_s = t[f"peer {s}"] / ran * total
        flops_peer = flops_patch * total
        err, top, n = compare(peers[s], s, fmap, geo)
        rows.append(
            f"| {s} | {total} | {'all' if ran == total else f'{ran} (extrapolated)'} | {common.fmt_s(peer_s)} | "
            f"{common.fmt_s(t['fcn(x)'])} | {common.fmt_s(t['predict_tiled'])} | "
            f"{peer_s / t['fcn(x)']:.1f} | {flops_peer / flops_whole:.1f} | "
            f"{peer_s / t['predict_tiled']:.1f} | {flops_peer / flops_tiled:.1f} | "
            f"{err:.2g} (max abs logit {top:.2g}; {n} windows) |"
        )
    ctrl = control(x, args.batch)
    header = [
        "| peer stride | patches | peer ran | peer (s) | fcn(x) (s) | predict_tiled (s) | speedup vs fcn(x) | "
        "FLOP ratio vs fcn(x) | speedup vs predict_tiled | FLOP ratio vs predict_tiled | "
        "max abs diff, peer patch vs fcnify cell |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(header + rows))
    print(f"predict_tiled vs fcn(x): max abs diff {tiled_err:.1e}; control (no padding): {ctrl}")

    cells = fmap.shape[2] * fmap.shape[3]
    others = [s for s in args.peer_strides if s != 32]
    fewer = " and ".join(f"{cells / counts[s][1]:.0f}x" for s in others) or "no"
    reading = []
    if 32 in counts:
        ratio32 = flops_patch * counts[32][1] / flops_whole
        speed32 = t["peer 32"] / counts[32][0] * counts[32][1] / t["fcn(x)"]
        reading.append(
            f"at stride 32, for the same {cells} windows, `fcn(x)` is {speed32:.0f}x faster than the peer at a "
            f"FLOP ratio of {ratio32:.0f}: the one pass runs at {speed32 / ratio32:.0%} of the FLOP rate of "
            "the peer's batches of 224 patches (not profiled; a likely cause below 100% is the whole slide's "
            "activations, far larger than the "
            "CPU's caches; the tiles of `predict_tiled` also recompute their overlap)"
        )
    for s in others:
        peer_s = t[f"peer {s}"] / counts[s][0] * counts[s][1]
        reading.append(
            f"at the peer's stride {s}, the peer does {flops_patch * counts[s][1] / flops_whole:.1f}x the "
            f"work of `fcn(x)` and takes {peer_s / t['fcn(x)']:.1f}x its time, for {cells / counts[s][1]:.0f}x "
            "fewer cells"
        )
    body = [
        "## fcnify vs a patch-by-patch peer, MONAI (`benchmarks/vs_patches.py`)",
        "",
        f"From one run of `{common.command('vs_patches.py', argv)}`. The same classifier (torchvision resnet18,",
        "random weights, batch-norm statistics calibrated on random data, eval) on the same synthetic",
        f"{args.size}x{args.size} slide (512-pixel tiles of scikit-image photos, ImageNet-normalised), in memory:",
        "",
        f"- **fcnify**: `fcnify.convert(model)` (window mode), a map of {fmap.shape[2]}x{fmap.shape[3]} = {cells} "
        "cells at "
        f"stride 32: `fcn(x)` on the whole slide, and `fcnify.predict_tiled(fcn, x, tile={args.tile})` (exact tiles,",
        f"  bounded memory; max abs diff to `fcn(x)` {tiled_err:.1e}).",
        "- **peer**: MONAI's `monai.inferers.PatchInferer` with `SlidingWindowSplitter(patch_size=224, "
        "overlap=224 - stride, pad_mode=None)` as the patch iterator, batches of "
        f"{args.batch} patches through the ORIGINAL classifier, and a 10-line `Merger` subclass that keeps each",
        "  patch's logits at its grid position (MONAI's own mergers average overlapping outputs). Stride 32 gives",
        "  the grid fcnify's map gives; 112 (half-overlapping) and 224 (non-overlapping) are what patch",
        f"  pipelines typically run, with {fewer} fewer patches: fcnify's map still has every stride-32 cell.",
        f"- why MONAI: {TIA_NOTE}.",
        f"- **the stride-32 peer is extrapolated**: it ran on the top-left {args.sample}x{args.sample} corner and "
        "its time per",
        "  patch is multiplied by the number of patches on the slide; strides 112 and 224 ran on the whole slide.",
        "- *speedup* = peer time / fcnify time; *FLOP ratio* = peer FLOPs (patches x FLOPs of one 224 patch) / "
        "fcnify's",
        "  FLOPs (the whole pass, or every tile with its overlap), counted by `torch.utils.flop_counter` (convolutions",
        f"  and matrix products; fcn(x) {flops_whole / 1e12:.2f} TFLOP, predict_tiled {flops_tiled / 1e12:.2f}, one "
        "patch "
        f"{flops_patch / 1e9:.2f} GFLOP). A speedup",
        "  near the FLOP ratio means both run at the same FLOP rate: the gain is the work not done twice.",
        "- *max abs diff*: peer logits vs fcnify's cell for the same window (same top-left pixel), over the",
        "  windows both have. Not zero, and not meant to be: resnet18 pads its convolutions with zeros, so a",
        '  patch sees zeros beyond its edges where the map sees the neighbouring pixels (README, "Modes").',
        f"  Control with a padding-free CNN of stride 32, same pipeline and comparison: {ctrl}.",
        "",
        *common.bullets(
            common.environment(
                device,
                args.threads,
                load_before,
                load_after,
                libraries=("torchvision", "monai"),
                extra=[
                    f"timing: {args.blocks} alternating blocks of one run of each variant, "
                    "after an untimed warm-up on the sample corner; medians. FLOPs counted "
                    "from shapes (the models on the meta device)"
                ],
            )
        ),
        "",
        *header,
        *rows,
        "",
        "Reading: " + "; ".join(reading) + ".",
    ]
    print("Reading: " + "; ".join(reading) + ".")
    if not args.no_write:
        common.write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
