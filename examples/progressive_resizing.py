"""Train small, run large: warm-start a 32x32 classifier from one trained at 16x16.

A LeNet-style classifier whose head flattens a 32x4x4 map is trained on scikit-learn's
handwritten digits at 16x16. At 32x32 the map is 32x8x8, so the Linear no longer fits.
Two ways to go on, fine-tuned identically (same seed, batches, optimizer and steps):

* warm: ``fcnify.resize_head(model, 16, 32)``, the head kernel resampled to 8x8;
* fresh: the same trained body with a freshly initialised Linear(32*8*8, 10).

The script prints the test accuracy along the way and the steps each needs to reach the
target accuracies. Runs on CPU in well under a minute:

    python examples/progressive_resizing.py [--steps 150] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import fcnify


def load_digits(seed: int = 0):
    """scikit-learn's 1797 8x8 digits, scaled to [0, 1], shuffled, split 1300 / 497."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


def at_size(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def lenet() -> nn.Module:
    """Trained at 16x16: two conv-pool stages leave a 32x4x4 map, flattened into a Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(model, x, y, steps, seed, test=None, every=5, batch=64, lr=1e-3):
    """Adam on shuffled batches (the order fixed by ``seed``); test accuracy every ``every`` steps."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    curve = [(0, accuracy(model, *test))] if test else []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (batch,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if test and step % every == 0:
            curve.append((step, accuracy(model, *test)))
    return curve


def steps_to(curve, target):
    return next((step for step, acc in curve if acc >= target), None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=400, help="training steps at 16x16")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps at 32x32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small convolutions: 1 is fastest)")
    parser.add_argument("--quick", action="store_true", help="a few steps only (for the tests)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.pretrain_steps, args.steps = 5, 5
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    (x, y), (xt, yt) = load_digits(args.seed)
    small = lenet()
    train(small, at_size(x, 16), y, args.pretrain_steps, args.seed)
    acc16 = accuracy(small, at_size(xt, 16), yt)
    print(f"trained at 16x16 for {args.pretrain_steps} steps: test accuracy {acc16:.3f}")

    x32, test32 = at_size(x, 32), (at_size(xt, 32), yt)
    warm = fcnify.resize_head(small, 16, 32)
    fresh = copy.deepcopy(warm)
    torch.manual_seed(args.seed + 1)
    fresh[7] = nn.Linear(32 * 8 * 8, 10)  # same body, default-initialised head
    curves = {}
    for name, model in [("warm (resize_head)", warm), ("fresh head", fresh)]:
        curves[name] = train(model, x32, y, args.steps, args.seed + 2, test=test32)
    targets = (0.90, 0.95, 0.97)
    print(f"\nfine-tuning at 32x32, {args.steps} steps, same seed, batches and Adam(lr=1e-3):")
    print(
        f"{'head':<20} {'acc@0':>6} {'acc@10':>7} {'acc@50':>7} {'final':>6}  "
        + "  ".join(f"steps to {t:.0%}" for t in targets)
    )
    at = lambda curve, s: next((a for st, a in curve if st >= s), curve[-1][1])  # noqa: E731
    for name, curve in curves.items():
        reached = "  ".join(f"{str(steps_to(curve, t)):>12}" for t in targets)
        accs = f"{curve[0][1]:>6.3f} {at(curve, 10):>7.3f} {at(curve, 50):>7.3f} {curve[-1][1]:>6.3f}"
        print(f"{name:<20} {accs}  {reached}")
    print(f"(accuracy on {len(yt)} held-out digits, checked every 5 steps; {time.perf_counter() - start:.0f} s)")
    return {"acc16": acc16, "curves": curves}


if __name__ == "__main__":
    main()
