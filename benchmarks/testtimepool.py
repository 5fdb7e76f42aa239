"""timm's TestTimePoolHead vs fcnify on the same timm models: speed and error, crashes included.

timm's test-time pooling (``timm.layers.TestTimePoolHead``, applied by
``timm.layers.apply_test_time_pool`` when the input is larger than the training size) runs the
model's ``forward_features``, slides the training-size average pool with stride 1, applies the
classifier as a 1x1 convolution and takes ``0.5 * (mean + max)`` over the windows. The fcnify
counterpart is the window-mode conversion followed by the same ``adaptive_avgmax_pool2d``; it
also converts everything between the pool and the classifier (ConvNeXt's head norm, MobileNetV3's
hidden conv head, VGG's ConvMlp), which TestTimePoolHead skips or cannot load.

For each model: latency at the training size and at twice it (alternating blocks), the max abs
error against the original at the training size, and at twice the size against crop-by-crop
averaging (the original model on every training-size window at stride 32, pooled the same way).
Exceptions are caught and reported as measured.

    python benchmarks/testtimepool.py
    python benchmarks/testtimepool.py --models resnet18 convnext_atto --no-write
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

import fcnify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

MODELS = ["resnet50", "convnext_atto", "mobilenetv3_small_100", "vgg11"]


def avgmax(logits_map):
    from timm.layers import adaptive_avgmax_pool2d

    return adaptive_avgmax_pool2d(logits_map, 1).flatten(1)


def crops_avgmax(model, x, size, stride=32):
    """The original model on every ``size`` window at ``stride``, pooled as TestTimePoolHead pools."""
    h, w = size
    rows, cols = (x.shape[2] - h) // stride + 1, (x.shape[3] - w) // stride + 1
    crops = torch.cat(
        [x[:, :, i * stride : i * stride + h, j * stride : j * stride + w] for i in range(rows) for j in range(cols)]
    )
    logits = model(crops)  # (rows * cols * N, K), crop-major
    maps = logits.view(rows, cols, x.shape[0], -1).permute(2, 3, 0, 1)
    return avgmax(maps)


def short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:160]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"timm models (default {' '.join(MODELS)})")
    parser.add_argument(
        "--scale", type=int, default=2, help="the larger size is this multiple of the training size (default 2)"
    )
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks per pair (default 4)")
    parser.add_argument("--block-seconds", type=float, default=1.0, help="runs per block: as many as fit (1 to 10)")
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    device = common.setup(args)
    import timm
    from timm.layers import TestTimePoolHead, apply_test_time_pool

    results = []
    load_before = common.load_average()
    for name in args.models:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name)
        size = tuple(model.pretrained_cfg["input_size"][1:])
        big = (size[0] * args.scale, size[1] * args.scale)
        model = common.calibrated(model, size)
        fcn = fcnify.convert(model)  # window mode; the training size from pretrained_cfg
        r = {"model": name, "size": size, "big": big, "ttp": None}
        try:  # what timm's validate.py does with --test-pool at a larger size
            _, applied = apply_test_time_pool(copy.deepcopy(model), {"input_size": (3, *big)})
            ttp = TestTimePoolHead(copy.deepcopy(model), original_pool=model.pretrained_cfg["pool_size"]).eval()
            r["applied"] = applied
        except Exception as err:  # noqa: BLE001  (reported as measured)
            ttp = None
            r["ttp_error"] = short(err)
        model, fcn = model.to(device), fcn.to(device)
        ttp = ttp.to(device) if ttp is not None else None

        def fcnify_pooled(x):
            return avgmax(fcn(x))

        for label, shape in (("train", size), ("big", big)):
            x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(1)).to(device)
            with torch.inference_mode():
                ref = model(x) if label == "train" else crops_avgmax(model, x, size)
                out_f = fcnify_pooled(x)
                r[f"{label}_scale"] = float(ref.abs().max())
                r[f"{label}_fcnify"] = float((out_f - ref).abs().max())
                if ttp is not None:
                    try:
                        out_t = ttp(x)
                        r[f"{label}_ttp"] = float((out_t - ref).abs().max())
                        r[f"{label}_ttp_vs_fcnify"] = float((out_t - out_f).abs().max())
                    except Exception as err:  # noqa: BLE001
                        r.setdefault("ttp_error", f"at {shape[0]}x{shape[1]}: {short(err)}")
            fns = {"fcnify": lambda: fcnify_pooled(x)}
            if ttp is not None and f"{label}_ttp" in r:
                fns["ttp"] = lambda: ttp(x)
            with torch.inference_mode():
                once = common.median(
                    common.time_alternating({"f": fns["fcnify"]}, runs=2, blocks=1, warmup=1, device=device)["f"]
                )
                times = common.time_alternating(
                    fns, runs=common.runs_for(once, args.block_seconds, 10), blocks=args.blocks, warmup=1, device=device
                )
            r[f"{label}_t"] = {k: common.median(v) for k, v in times.items()}
        results.append(r)
        print(f"{name}: {r}", flush=True)
        del model, fcn, ttp
    load_after = common.load_average()

    def err(value):
        return "-" if value is None else f"{value:.1e}"

    header = (
        "| model | input | fcnify (ms) | TestTimePoolHead (ms) | TTP / fcnify | reference | max abs error fcnify "
        "| max abs error TestTimePoolHead | max abs logit |"
    )
    table = [header, "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        for label, shape, ref in (("train", r["size"], "original"), ("big", r["big"], "crop-by-crop, avgmax")):
            t = r[f"{label}_t"]
            ttp_ms = common.fmt_ms(t["ttp"]) if "ttp" in t else "-"
            ratio = f"{t['ttp'] / t['fcnify']:.2f}" if "ttp" in t else "-"
            ttp_err = err(r.get(f"{label}_ttp")) if f"{label}_ttp" in r else f"crash ({r.get('ttp_error', '?')})"
            table.append(
                f"| {r['model']} | {shape[0]}x{shape[1]} | {common.fmt_ms(t['fcnify'])} | {ttp_ms} | {ratio} | {ref} "
                f"| {err(r[f'{label}_fcnify'])} | {ttp_err} | {r[f'{label}_scale']:.2g} |"
            )
    same = [f"{r['model']} {r['big_ttp_vs_fcnify']:.1e}" for r in results if "big_ttp_vs_fcnify" in r]
    env = common.environment(
        device,
        args.threads,
        load_before,
        load_after,
        libraries=("timm",),
        extra=[
            f"models: timm {', '.join(args.models)}, random weights, batch-norm statistics calibrated on random data; "
            f"batch 1; {args.blocks} alternating blocks, median of the runs",
            "TestTimePoolHead vs fcnify + avgmax at the larger size (the same windows, the same pooling): max abs "
            "difference " + ("; ".join(same) if same else "-"),
        ],
    )
    print("\n".join(env + [""] + table))
    if not args.no_write and results:
        write_section(env, table, common.command("testtimepool.py", argv))
    return 0


def write_section(env, table, command):
    common.write_section(
        "testtimepool",
        [
            "## timm's TestTimePoolHead vs fcnify (`benchmarks/testtimepool.py`)",
            "",
            f"From one run of `{command}`. timm's test-time pooling (`timm.layers.TestTimePoolHead`, which",
            "`timm.layers.apply_test_time_pool` wraps around a model above its training size) against",
            "fcnify's window-mode conversion followed by the same `adaptive_avgmax_pool2d` (0.5 x (mean +",
            "max) over the windows). At the training size the reference is the original model's logits; at",
            "twice the size it is crop-by-crop: the original model on every training-size window at stride",
            "32, pooled the same way. Against that reference neither is exact on these padded networks (a",
            "window inside the image sees its neighbours where a crop sees zero padding; see the dense vs",
            "crops section), so the larger-size rows compare the two with each other too (last bullet).",
            "ConvNeXt is the exception: timm initialises its layer scales to 1e-6, so with random weights",
            "every block is nearly the identity and what remains (the stem and downsampling convolutions)",
            "has no padding; its windows equal its crops here, but would not with trained weights.",
            "TestTimePoolHead's failures are caught and shown as measured: it applies the classifier",
            "straight after the pool, so it skips ConvNeXt's head norm (silently wrong logits, also at the",
            "training size) and cannot even be built for MobileNetV3's hidden conv head or VGG's ConvMlp",
            "(the classifier weights do not fit a 1x1 convolution on the features).",
            "",
            *common.bullets(env),
            "",
            *table,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
