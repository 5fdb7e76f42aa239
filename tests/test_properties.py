"""Property tests: random small padding-free classifiers, converted and compared with eager PyTorch.

For a padding-free body of total stride S, window mode at a larger input is exactly the
original classifier applied to every training-size crop at offsets ``(i*S, j*S)``.
"""

import copy
import dataclasses
from typing import List, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fcnify

CHANNELS = 3
POOLS = ("none", "avg", "max", "mean")
FLATTENS = ("torch.flatten", "nn.Flatten", ".flatten(1)", ".view(N, -1)", ".reshape(N, -1)", ".view(-1, F)")


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass
class Spec:
    seed: int
    convs: List[Tuple[int, int, Optional[str]]]  # (kernel, width, 2x2 pool after it)
    size: Tuple[int, int]
    pool: str
    flatten: str
    hidden: List[Tuple[int, bool, bool, bool]]  # (width, batchnorm, relu, dropout) per hidden layer
    classes: int
    grow: Tuple[int, int]  # window positions added to the training size for the larger input

    @property
    def final_pool_is_global(self) -> bool:
        """The last 2x2 pool covers the whole 2x2 map at the training size: fcnify makes it global."""
        return self.convs[-1][2] is not None and all(
            self.feature_size(n, before_last_pool=True) == 2 for n in self.size
        )

    @property
    def stride(self) -> int:
        """Output stride of window mode: the body's, without a final pool that became global."""
        return 2 ** (sum(p is not None for _, _, p in self.convs) - self.final_pool_is_global)

    def feature_size(self, n: int, before_last_pool: bool = False) -> int:
        for i, (kernel, _, pool) in enumerate(self.convs):
            n = n - kernel + 1
            if n < 1:
                return 0
            if pool and not (before_last_pool and i == len(self.convs) - 1):
                n //= 2
        return n

    @property
    def large_size(self) -> Tuple[int, int]:
        return tuple(s + self.stride * g for s, g in zip(self.size, self.grow))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, pool: nn.Module, flatten: nn.Module, mlp: nn.Module):
        super().__init__()
        self.body = body
        self.pool = pool
        self.flatten = flatten
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(self.flatten(self.pool(self.body(x))))


def build(spec: Spec) -> nn.Module:
    torch.manual_seed(spec.seed)
    layers, channels = [], CHANNELS
    for i, (kernel, width, pool) in enumerate(spec.convs):
        layers += [nn.Conv2d(channels, width, kernel), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
        channels = width
    h, w = spec.feature_size(spec.size[0]), spec.feature_size(spec.size[1])
    features = channels * (h * w if spec.pool == "none" else 1)
    pool = {
        "none": nn.Identity(),
        "avg": nn.AdaptiveAvgPool2d(1),
        "max": nn.AdaptiveMaxPool2d(1),
        "mean": Lambda(lambda x: x.mean((2, 3))),
    }[spec.pool]
    flatten = {
        "torch.flatten": Lambda(lambda x: torch.flatten(x, 1)),
        "nn.Flatten": nn.Flatten(),
        ".flatten(1)": Lambda(lambda x: x.flatten(1)),
        ".view(N, -1)": Lambda(lambda x: x.view(x.size(0), -1)),
        ".reshape(N, -1)": Lambda(lambda x: x.reshape(x.shape[0], -1)),
        ".view(-1, F)": Lambda(lambda x, f=features: x.view(-1, f)),
    }[spec.flatten]
    mlp: list = []
    for width, batchnorm, relu, dropout in spec.hidden:
        mlp.append(nn.Linear(features, width))
        if batchnorm:
            bn = nn.BatchNorm1d(width)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)
            mlp.append(bn)
        if relu:
            mlp.append(nn.ReLU())
        if dropout:
            mlp.append(nn.Dropout(0.5))
        features = width
    mlp.append(nn.Linear(features, spec.classes))
    return Classifier(nn.Sequential(*layers), pool, flatten, nn.Sequential(*mlp)).eval()


@st.composite
def specs(draw, pools=POOLS, affine=False) -> Spec:
    convs = [
        (draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.sampled_from([None, "max", "avg"])))
        for _ in range(draw(st.integers(1, 3)))
    ]
    spec = Spec(
        seed=draw(st.integers(0, 2**16)),
        convs=convs,
        size=(0, 0),
        pool=draw(st.sampled_from(pools)),
        flatten=draw(st.sampled_from(FLATTENS)),
        hidden=[
            (draw(st.integers(2, 8)), draw(st.booleans()), not affine and draw(st.booleans()), draw(st.booleans()))
            for _ in range(draw(st.integers(0, 2)))
        ],
        classes=draw(st.integers(1, 6)),
        grow=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
    )
    smallest = next(n for n in range(1, 200) if spec.feature_size(n) >= 1)
    low = max(8, smallest)
    spec.size = (draw(st.integers(low, low + 12)), draw(st.integers(low, low + 12)))
    return spec


def assert_close(actual: torch.Tensor, expected: torch.Tensor):
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=0)


def inputs(spec: Spec, size: Tuple[int, int]) -> torch.Tensor:
    torch.manual_seed(spec.seed + 1)
    return torch.randn(2, CHANNELS, *size)


def crops(model: nn.Module, x: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The classifier on every training-size crop at the body's stride: ``(N, K, rows, cols)``."""
    (h, w), s = spec.size, spec.stride
    rows, cols = (x.shape[2] - h) // s + 1, (x.shape[3] - w) // s + 1
    out = [[model(x[:, :, i * s : i * s + h, j * s : j * s + w]) for j in range(cols)] for i in range(rows)]
    return torch.stack([torch.stack(row, -1) for row in out], -2)


@settings(max_examples=25, deadline=None)
@given(specs())
def test_window_mode_is_the_classifier_slid_over_the_image(spec):
    model = build(spec)
    fcn = fcnify.convert(model, spec.size, mode="window")
    assert fcn.conversion_report.verification.passed
    x = inputs(spec, spec.size)
    large = inputs(spec, spec.large_size)
    with torch.no_grad():
        out = fcn(x)
        assert out.shape == (2, spec.classes, 1, 1)
        assert_close(out[..., 0, 0], model(x))
        out = fcn(large)
        assert out.shape == (2, spec.classes, spec.grow[0] + 1, spec.grow[1] + 1)
        assert_close(out, crops(model, large, spec))


@settings(max_examples=25, deadline=None)
@given(specs(pools=("avg", "mean"), affine=True))
def test_dense_mode_mean_is_the_logits_for_an_affine_head(spec):
    model = build(spec)
    fcn = fcnify.convert(model, spec.size, mode="dense")
    x = inputs(spec, spec.size)
    with torch.no_grad():
        out = fcn(x)
        # a final pool that covers the map is removed like the head's pool
        features = model.body[:-1](x) if spec.final_pool_is_global else model.body(x)
        assert out.shape == (2, spec.classes, *features.shape[2:])
        if spec.final_pool_is_global and spec.convs[-1][2] == "max":
            assert fcn.conversion_report.checks == ["none"]  # the mean of a max has no exact check
            return
        assert fcn.conversion_report.checks == ["mean"]
        assert_close(out.mean((2, 3)), model(x))
        # each cell is the head applied to that cell's feature vector
        cell = features[:, :, -1, 0]
        assert_close(out[:, :, -1, 0], model.mlp(cell))


@settings(max_examples=25, deadline=None)
@given(specs())
def test_global_mode_keeps_logits_at_any_size(spec):
    model = build(spec)
    fcn = fcnify.convert(model, spec.size, mode="global")
    x = inputs(spec, spec.size)
    large = inputs(spec, spec.large_size)
    with torch.no_grad():
        assert_close(fcn(x), model(x))
        out = fcn(large)
        assert out.shape == (2, spec.classes)
        if spec.final_pool_is_global:  # fcnify makes the final 2x2 pool global
            reference = copy.deepcopy(model)
            reference.body[-1] = nn.AdaptiveMaxPool2d(1) if spec.convs[-1][2] == "max" else nn.AdaptiveAvgPool2d(1)
            assert_close(out, reference(large))
        elif spec.pool != "none":  # the original pools globally and runs at any size itself
            assert_close(out, model(large))
        else:  # a flatten head: the mean of the windows' logits
            assert_close(out, crops(model, large, spec).mean((2, 3)))
