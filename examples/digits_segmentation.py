"""Classifier -> segmenter on real data: FCN-32s vs FCN-8s on scikit-learn's digits.

1. A small stride-32 CNN classifier (global average pool + Linear) is trained on the 8x8
   handwritten digits of scikit-learn, enlarged to 32x32 and pasted at random places on a
   48x48 canvas.
2. Segmentation task: 96x96 canvases with three such digits from held-apart images; each
   pixel is labelled with its digit (1-10) where the digit's ink is, else background (0).
   The background, ~87% of the pixels, weighs 0.2 in the loss.
3. ``fcnify.segmenter`` turns the same trained classifier into FCN-32s (``skips=()``) and
   FCN-8s (``skips="auto"``: stage outputs at strides 16 and 8 with zero-initialised score
   layers). Both are trained with the same seed, batches, optimizer and steps, and scored on
   canvases built from held-out digits: pixel accuracy and mean IoU over the 11 classes.

Runs on CPU in a few minutes:

    python examples/digits_segmentation.py [--steps 400] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fcnify

NUM_CLASSES = 11  # background + ten digits
PRETRAIN_SIZE = 48  # the classifier sees one digit on a canvas this size
DIGIT = 32  # pixels of a pasted digit (the 8x8 originals enlarged 4x)


def load_digits(seed: int = 0):
    """scikit-learn's 1797 digits at DIGIT x DIGIT in [0, 1], shuffled, split 1300 / 497."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return (x[order[:1300]], y[order[:1300]]), (x[order[1300:]], y[order[1300:]])


def canvases(digits, labels, count, size, per_canvas, generator):
    """``count`` canvases of ``size`` pixels with ``per_canvas`` digits each, and pixel labels."""
    images = torch.zeros(count, 1, size, size)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    for n in range(count):
        for _ in range(per_canvas):
            k = torch.randint(0, len(labels), (1,), generator=generator).item()
            i, j = torch.randint(0, size - DIGIT + 1, (2,), generator=generator).tolist()
            ink = digits[k, 0]
            region = images[n, 0, i : i + DIGIT, j : j + DIGIT]
            images[n, 0, i : i + DIGIT, j : j + DIGIT] = torch.maximum(region, ink)
            masks[n, i : i + DIGIT, j : j + DIGIT][ink > 0.3] = labels[k] + 1
    return images, masks


def classifier() -> nn.Module:
    """Five stages of (3x3 stride-2 conv, 3x3 conv), BN and ReLU: stride 32; pool + Linear head."""
    layers, channels = [], 1
    for width in (16, 32, 48, 64, 64):
        layers += [
            nn.Conv2d(channels, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def pretrain(model, digits, labels, steps, generator, batch=32, size=PRETRAIN_SIZE):
    """Classify one digit pasted at a random place on a ``size`` x ``size`` canvas."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=generator)
        x = torch.zeros(batch, 1, size, size)
        for b, k in enumerate(idx.tolist()):
            i, j = torch.randint(0, size - DIGIT + 1, (2,), generator=generator).tolist()
            x[b, 0, i : i + DIGIT, j : j + DIGIT] = digits[k, 0]
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def scores(model, images, masks, batch=50):
    """Pixel accuracy and mean IoU over the classes present in the labels or predictions."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(images), batch):
            pred = model(images[start : start + batch]).argmax(1)
            truth = masks[start : start + batch]
            confusion += torch.bincount(truth.flatten() * NUM_CLASSES + pred.flatten(), minlength=NUM_CLASSES**2).view(
                NUM_CLASSES, NUM_CLASSES
            )
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    iou = tp[union > 0] / union[union > 0]
    return (tp.sum() / confusion.sum()).item(), iou.mean().item()


def train_segmenter(model, images, masks, steps, seed, background_weight, batch=16, lr=3e-3):
    """Adam on pixel-wise cross-entropy; the background, most of the pixels, weighs less."""
    weight = torch.ones(NUM_CLASSES)
    weight[0] = background_weight
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        loss = F.cross_entropy(model(images[idx]), masks[idx], weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=400, help="segmentation training steps per network")
    parser.add_argument("--size", type=int, default=96, help="canvas size (any size works; try 95 or 101)")
    parser.add_argument("--background-weight", type=float, default=0.2, help="loss weight of the background")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small convolutions: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (for the tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_count, test_count = 2000, 300
    if args.quick:
        args.pretrain_steps, args.steps, train_count, test_count = 5, 3, 40, 20
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    (x, y), (xt, yt) = load_digits(args.seed)

    net = pretrain(classifier(), x, y, args.pretrain_steps, generator)
    test_x = torch.zeros(len(yt), 1, PRETRAIN_SIZE, PRETRAIN_SIZE)
    test_x[:, :, 8 : 8 + DIGIT, 8 : 8 + DIGIT] = xt
    with torch.no_grad():
        acc = (net(test_x).argmax(1) == yt).float().mean().item()
    print(
        f"classifier: {args.pretrain_steps} steps, held-out digit accuracy {acc:.3f} "
        f"({time.perf_counter() - start:.0f} s)"
    )

    train_set = canvases(x, y, train_count, args.size, 3, generator)
    test_set = canvases(xt, yt, test_count, args.size, 3, generator)
    background = (test_set[1] == 0).float().mean().item()
    print(
        f"segmentation: {train_count} training and {test_count} test canvases of {args.size}x{args.size}, "
        f"3 digits each; background is {background:.1%} of the test pixels"
    )

    results = {}
    for skips in [(), "auto"]:
        t = time.perf_counter()
        torch.manual_seed(args.seed)
        seg = fcnify.segmenter(
            net, num_classes=NUM_CLASSES, input_size=(PRETRAIN_SIZE, PRETRAIN_SIZE), skips=skips, upsample="transposed"
        )
        train_segmenter(seg, *train_set, args.steps, args.seed, args.background_weight)
        pixel_acc, miou = scores(seg, *test_set)
        results[seg.variant] = (pixel_acc, miou)
        print(
            f"{seg.variant:<8} skips={seg.skips!s:<28} pixel accuracy {pixel_acc:.3f}  mean IoU {miou:.3f}  "
            f"({args.steps} steps, {time.perf_counter() - t:.0f} s)"
        )
    print(f"total {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
