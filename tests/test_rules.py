"""Each rewrite rule on tiny hand-built classifiers: where it applies, and where it must not.

Padding-free bodies make window mode exact at every size, so converted maps are compared
with the original classifier run crop by crop at the body's total stride.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcnify
from fcnify import TraceError, UnsupportedModelError
from fcnify.conversion._runtime import ChannelLayerNorm

C, H, W = 3, 14, 14  # training size
STRIDE = 2  # total stride of body()
FEAT = 6  # channels of body()
MAP = 4  # body() turns 14x14 into 4x4: 14 -conv3-> 12 -pool2-> 6 -conv3-> 4


def body(width: int = FEAT) -> nn.Sequential:
    """Padding-free body: 3x14x14 -> width x 4x4, total stride 2."""
    return nn.Sequential(nn.Conv2d(C, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, width, 3))


class Net(nn.Module):
    """``head(neck(body(x)))``; ``neck`` may be a module or any traceable function."""

    def __init__(self, neck, head, body_: nn.Module = None):
        super().__init__()
        self.body = body_ if body_ is not None else body()
        self.neck = neck
        self.head = head

    def forward(self, x):
        return self.head(self.neck(self.body(x)))


class Lambda(nn.Module):
    """A function as a module, traced through by fx."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def prepare(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


def big_input(steps=(3, 5), seed=1) -> torch.Tensor:
    """An input ``steps`` window positions larger than the training size (and not square)."""
    torch.manual_seed(seed)
    return torch.randn(2, C, H + STRIDE * steps[0], W + STRIDE * steps[1])


def crops(model: nn.Module, x: torch.Tensor, stride: int = STRIDE, size=(H, W)):
    """The classifier applied to every training-size window of ``x``: ``(N, K, rows, cols)``."""
    h, w = size
    rows, cols = (x.shape[2] - h) // stride + 1, (x.shape[3] - w) // stride + 1
    with torch.no_grad():
        out = [
            [model(x[:, :, i * stride : i * stride + h, j * stride : j * stride + w]) for j in range(cols)]
            for i in range(rows)
        ]
    return torch.stack([torch.stack(row, -1) for row in out], -2)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5):
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=rtol * scale, rtol=0)


def assert_window_exact(model: nn.Module, fcn: nn.Module, x: torch.Tensor = None, stride: int = STRIDE):
    """The converted map at a larger size equals crop-by-crop classification."""
    x = big_input() if x is None else x
    with torch.no_grad():
        out = fcn(x)
    assert_close(out, crops(model, x, stride))


pytestmark = pytest.mark.usefixtures("one_thread")


def rules_applied(fcn) -> list:
    return [r.rule for r in fcn.conversion_report.rewrites]


def modules_of(fcn, kind) -> list:
    return [m for m in fcn.modules() if isinstance(m, kind)]


# -- LinearToConv ------------------------------------------------------------------------


def test_linear_after_flatten_becomes_conv_with_kernel_of_the_map():
    model = prepare(Net(nn.Flatten(), nn.Sequential(nn.Linear(FEAT * MAP * MAP, 10), nn.ReLU(), nn.Linear(10, 5))))
    fcn = fcnify.convert(model, (H, W))
    report = fcn.conversion_report
    assert report.verification.passed
    flatten = [r for r in report.rewrites if r.rule == "FlattenToIdentity"]
    linears = [r for r in report.rewrites if r.rule == "LinearToConv"]
    assert [r.node for r in flatten] == ["neck"]
    assert flatten[0].before == f"flatten({FEAT}x{MAP}x{MAP})"
    assert [(r.node, r.before) for r in linears] == [("head_0", "Linear(96 -> 10)"), ("head_2", "Linear(10 -> 5)")]
    assert linears[0].after == f"Conv2d({FEAT}, 10, kernel_size=({MAP}, {MAP}))"
    convs = modules_of(fcn.head, nn.Conv2d)
    assert [c.kernel_size for c in convs] == [(MAP, MAP), (1, 1)]
    assert torch.equal(convs[0].weight, model.head[0].weight.view(10, FEAT, MAP, MAP))
    assert not modules_of(fcn, nn.Linear)
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        assert fcn(x).shape == (2, 5, 1, 1)
        assert_close(fcn(x)[..., 0, 0], model(x))
    assert_window_exact(model, fcn)


def test_functional_linear_on_own_parameters():
    class FunctionalHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, FEAT * MAP * MAP) * 0.1)
            self.bias = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return F.linear(x.flatten(1), self.weight, self.bias)

    model = prepare(Net(nn.Identity(), FunctionalHead()))
    fcn = fcnify.convert(model, (H, W))
    linear = [r for r in fcn.conversion_report.rewrites if r.rule == "LinearToConv"]
    assert len(linear) == 1 and "conv2d" in linear[0].after
    assert any(n.target is F.conv2d for n in fcn.graph.nodes)
    # the functional form keeps the Linear's own parameter and reshapes it in the graph
    assert torch.equal(fcn.head.weight, model.head.weight)
    assert_window_exact(model, fcn)


def test_linear_over_the_width_of_a_map_is_refused():
    """A Linear in the body, over the width axis of a map, is not a head Linear: it pins the size."""

    class WidthMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(MAP, MAP)  # acts on the last (width) axis, fixed size

        def forward(self, x):
            return self.mix(x)

    model = prepare(Net(nn.Sequential(WidthMixer(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(FEAT, 5)))
    with pytest.raises(UnsupportedModelError, match="mix"):
        fcnify.convert(model, (H, W))


# -- FlattenToIdentity -------------------------------------------------------------------

FLATTEN_SPELLINGS = {
    "torch.flatten": lambda x: torch.flatten(x, 1),
    "nn.Flatten": nn.Flatten(),
    ".flatten(1)": lambda x: x.flatten(1),
    ".view(x.size(0), -1)": lambda x: x.view(x.size(0), -1),
    ".view(-1, C*h*w)": lambda x: x.view(-1, FEAT * MAP * MAP),
    ".reshape(x.shape[0], -1)": lambda x: x.reshape(x.shape[0], -1),
    "torch.reshape": lambda x: torch.reshape(x, (x.shape[0], -1)),
}


@pytest.mark.parametrize("spelling", FLATTEN_SPELLINGS)
def test_flatten_spellings_of_the_map(spelling):
    model = prepare(Net(FLATTEN_SPELLINGS[spelling], nn.Linear(FEAT * MAP * MAP, 5)))
    fcn = fcnify.convert(model, (H, W))
    assert rules_applied(fcn) == ["FlattenToIdentity", "LinearToConv"]
    assert fcn.conversion_report.rewrites[0].before == f"flatten({FEAT}x{MAP}x{MAP})"
    assert_window_exact(model, fcn)


POOLED_SPELLINGS = dict(FLATTEN_SPELLINGS)
POOLED_SPELLINGS[".view(-1, C*h*w)"] = lambda x: x.view(-1, FEAT)
POOLED_SPELLINGS[".squeeze(-1).squeeze(-1)"] = lambda x: x.squeeze(-1).squeeze(-1)
POOLED_SPELLINGS[".view(N, F, 1, 1) round trip"] = lambda x: x.flatten(1).view(x.size(0), FEAT, 1, 1).flatten(1)


@pytest.mark.parametrize("spelling", POOLED_SPELLINGS)
def test_flatten_spellings_after_pool(spelling):
    flatten = POOLED_SPELLINGS[spelling]
    if not isinstance(flatten, nn.Module):
        flatten = Lambda(flatten)
    model = prepare(Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), flatten), nn.Linear(FEAT, 5)))
    fcn = fcnify.convert(model, (H, W))
    assert rules_applied(fcn)[0] == "GlobalPoolToWindowPool"
    assert rules_applied(fcn)[-1] == "LinearToConv"
    assert_window_exact(model, fcn)


def test_shape_queries_on_a_pooled_vector():
    """``x.shape[0]`` and ``x.size(0)`` of a feature vector read the batch axis of the map."""
    model = prepare(Net(lambda x: x.mean((2, 3)), nn.Linear(FEAT, 5)))
    model.head = nn.Sequential(Lambda(lambda v: v.reshape(v.shape[0], -1).view(v.size(0), -1)), nn.Linear(FEAT, 5))
    fcn = fcnify.convert(model, (H, W))
    assert_window_exact(model, fcn)


def test_reshape_that_mixes_batch_and_features_is_refused():
    model = prepare(Net(lambda x: x.reshape(-1, MAP * MAP), nn.Linear(MAP * MAP, 5)))
    with pytest.raises(UnsupportedModelError, match="batch"):
        fcnify.convert(model, (H, W))


def test_flatten_inside_the_body_is_not_rewritten():
    """A flatten/unflatten pair that leads back to a spatial map belongs to the body."""

    class FlattenRoundTrip(nn.Module):
        def forward(self, x):
            n, c, h, w = x.shape
            return x.flatten(2).view(n, c, h, w)

    model = prepare(Net(nn.Sequential(FlattenRoundTrip(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(FEAT, 5)))
    fcn = fcnify.convert(model, (H, W))
    assert [r.node for r in fcn.conversion_report.rewrites if r.rule == "FlattenToIdentity"] == ["neck_2"]
    assert_window_exact(model, fcn)


# -- GlobalPoolToWindowPool --------------------------------------------------------------


def _pool_necks():
    from timm.layers import SelectAdaptivePool2d

    return {
        "nn.AdaptiveAvgPool2d(1)": (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 1, ["avg"]),
        "F.adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1), 1, ["avg"]),
        ".mean((2, 3))": (lambda x: x.mean((2, 3)), 1, ["avg"]),
        ".mean((2, 3), keepdim=True)": (lambda x: x.mean((2, 3), keepdim=True).flatten(1), 1, ["avg"]),
        ".mean((-2, -1))": (lambda x: x.mean(dim=(-2, -1)), 1, ["avg"]),
        "torch.amax": (lambda x: torch.amax(x, (2, 3)), 1, ["max"]),
        ".sum((2, 3))": (lambda x: x.sum((2, 3)), 1, ["sum"]),
        "nn.AdaptiveMaxPool2d(1)": (nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()), 1, ["max"]),
        "nn.AvgPool2d(whole map)": (nn.Sequential(nn.AvgPool2d(MAP), nn.Flatten()), 1, ["avg"]),
        "F.max_pool2d(whole map)": (lambda x: F.max_pool2d(x, MAP).flatten(1), 1, ["max"]),
        "timm avg": (SelectAdaptivePool2d(pool_type="avg", flatten=True), 1, ["avg"]),
        "timm max": (SelectAdaptivePool2d(pool_type="max", flatten=True), 1, ["max"]),
        "timm avgmax": (SelectAdaptivePool2d(pool_type="avgmax", flatten=True), 1, ["avg", "max"]),
        "timm catavgmax": (SelectAdaptivePool2d(pool_type="catavgmax", flatten=True), 2, ["avg", "max"]),
        "timm fast": (SelectAdaptivePool2d(pool_type="fast", flatten=True), 1, ["avg"]),
    }


POOL_NECKS = list(_pool_necks())


@pytest.mark.parametrize("spelling", POOL_NECKS)
def test_global_pool_spellings(spelling):
    neck, mult, kinds = _pool_necks()[spelling]
    model = prepare(Net(neck, nn.Sequential(nn.Linear(FEAT * mult, 8), nn.ReLU(), nn.Linear(8, 5))))
    fcn = fcnify.convert(model, (H, W))
    pools = [r for r in fcn.conversion_report.rewrites if r.rule == "GlobalPoolToWindowPool"]
    assert [r.before for r in pools] == [f"global {k} pool over {FEAT}x{MAP}x{MAP}" for k in kinds]
    assert all(f"kernel=({MAP}, {MAP}), stride=1" in r.after for r in pools)
    assert_window_exact(model, fcn)

    # global mode: any size, and equal to the original, which pools globally too
    fcn_global = fcnify.convert(model, (H, W), mode="global")
    x = big_input()
    with torch.no_grad():
        if "AvgPool2d(whole map)" not in spelling and "F.max_pool2d" not in spelling:
            assert_close(fcn_global(x), model(x))
        else:  # the fixed-kernel pool is made global, unlike the original
            assert fcn_global(x).shape == (2, 5)


@pytest.mark.parametrize(
    "pool", [nn.AvgPool2d(2), nn.AvgPool2d(MAP, padding=1), nn.MaxPool2d(MAP, stride=1, padding=1)]
)
def test_pool_that_is_not_global_stays_in_the_body(pool):
    """A fixed pool that does not cover exactly the whole map is not a global pool."""
    model = prepare(Net(nn.Sequential(pool, nn.Flatten()), nn.Linear(1, 5)))
    with torch.no_grad():
        features = model.neck(model.body(torch.randn(1, C, H, W))).shape[1]
    model.head = nn.Linear(features, 5)
    prepare(model)
    fcn = fcnify.convert(model, (H, W))
    assert "GlobalPoolToWindowPool" not in rules_applied(fcn)
    assert rules_applied(fcn) == ["FlattenToIdentity", "LinearToConv"]
    assert fcn.conversion_report.verification.passed


def test_mean_over_channels_is_not_a_global_pool():
    """A mean over channels keeps a map: it is body, and the flatten after it is the head."""
    model = prepare(Net(lambda x: x.mean(1, keepdim=True).flatten(1), nn.Linear(MAP * MAP, 5)))
    fcn = fcnify.convert(model, (H, W))
    assert rules_applied(fcn) == ["FlattenToIdentity", "LinearToConv"]
    assert fcn.conversion_report.rewrites[1].after == f"Conv2d(1, 5, kernel_size=({MAP}, {MAP}))"
    assert_window_exact(model, fcn)


# -- AdaptivePoolFold --------------------------------------------------------------------


def _vgg(map_size: int, out=(2, 2), pool=nn.AdaptiveAvgPool2d, functional=False):
    """A VGG-like net whose body ends in a ``map_size`` map, pooled adaptively to ``out``."""
    b = nn.Sequential(nn.Conv2d(C, FEAT, 3), nn.ReLU())  # stride 1: H - 2 = map_size

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(FEAT * out[0] * out[1], 5)

        def forward(self, x):
            x = x.flatten(1)
            return F.linear(x, self.fc.weight, self.fc.bias) if functional else self.fc(x)

    return prepare(Net(pool(out), Head(), b)), map_size + 2


@pytest.mark.parametrize("map_size", [4, 7])
def test_adaptive_pool_identity_at_training_size_is_dropped(map_size):
    model, size = _vgg(map_size=map_size, out=(map_size, map_size))
    fcn = fcnify.convert(model, (size, size))
    fold = [r for r in fcn.conversion_report.rewrites if r.rule == "AdaptivePoolFold"]
    assert len(fold) == 1 and fold[0].after == "removed (identity at training size)"
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in fcn.modules())
    x = torch.randn(2, C, size + 5, size + 7)
    with torch.no_grad():
        assert_close(fcn(x), crops(model, x, 1, (size, size)))


@pytest.mark.parametrize("map_size,out", [(8, (4, 4)), (9, (4, 4)), (14, (7, 7)), (9, (7, 7)), (7, (2, 3))])
@pytest.mark.parametrize("functional", [False, True], ids=["nn.Linear", "F.linear"])
def test_adaptive_avg_pool_that_resamples_is_folded_exactly(map_size, out, functional):
    model, size = _vgg(map_size, out, functional=functional)
    fcn = fcnify.convert(model, (size, size))
    fold = [r for r in fcn.conversion_report.rewrites if r.rule == "AdaptivePoolFold"]
    assert len(fold) == 1 and fold[0].after == "folded into the next layer's kernel"
    assert fold[0].before == f"adaptive avg pool {map_size}x{map_size} -> {out[0]}x{out[1]}"
    if not functional:
        (conv,) = modules_of(fcn.head, nn.Conv2d)
        assert conv.kernel_size == (map_size, map_size)
    x = torch.randn(2, C, size + 3, size + 4)
    with torch.no_grad():
        assert_close(fcn(x), crops(model, x, 1, (size, size)))


def test_adaptive_max_pool_that_resamples_is_refused():
    model, size = _vgg(map_size=8, out=(3, 3), pool=nn.AdaptiveMaxPool2d)
    with pytest.raises(UnsupportedModelError, match=r"adaptive max pool from 8x8 to 3x3.*Hint:"):
        fcnify.convert(model, (size, size))


def test_adaptive_max_pool_identity_at_training_size_is_dropped():
    model, size = _vgg(map_size=3, out=(3, 3), pool=nn.AdaptiveMaxPool2d)
    fcn = fcnify.convert(model, (size, size))
    assert "removed" in fcn.conversion_report.rewrites[0].after
    x = torch.randn(2, C, size + 4, size + 2)
    with torch.no_grad():
        assert_close(fcn(x), crops(model, x, 1, (size, size)))


def test_folded_pool_followed_by_a_non_linear_op_is_refused():
    model, size = _vgg(map_size=8, out=(4, 4))
    model.neck = nn.Sequential(nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match=r"node 'neck_2'.*adaptive pool that resamples.*Hint:"):
        fcnify.convert(model, (size, size))


def test_adaptive_pool_followed_by_per_position_layers_is_stacked():
    """Pool, 1x1 conv, ReLU, flatten, Linear (GoogLeNet's aux head): every window's pooled cells."""
    model, size = _vgg(map_size=8, out=(4, 4))
    model.neck = prepare(nn.Sequential(nn.AdaptiveAvgPool2d((4, 4)), nn.Conv2d(FEAT, FEAT, 1), nn.ReLU()))
    fcn = fcnify.convert(model, (size, size))
    assert any("depthwise" in r.after for r in fcn.conversion_report.rewrites)
    x = torch.randn(2, C, size + 3, size + 4)
    with torch.no_grad():
        assert_close(fcn(x), crops(model, x, 1, (size, size)))


def test_adaptive_pool_followed_by_a_map_op_is_refused():
    """Followed by an op that mixes positions, the pooled map has no per-window equivalent."""
    model, size = _vgg(map_size=8, out=(4, 4))
    model.neck = prepare(nn.Sequential(nn.AdaptiveAvgPool2d((4, 4)), nn.Conv2d(FEAT, FEAT, 3, padding=1)))
    with pytest.raises(UnsupportedModelError, match=r"node 'neck_1'.*mixes positions.*Hint:"):
        fcnify.convert(model, (size, size))


# -- BatchNorm1dToBatchNorm2d, LayerNormToChannelLayerNorm ---------------------------------


def test_batchnorm1d_becomes_batchnorm2d_with_the_same_state():
    model = prepare(
        Net(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.Sequential(nn.Linear(FEAT, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)),
        )
    )
    fcn = fcnify.convert(model, (H, W))
    assert "BatchNorm1dToBatchNorm2d" in rules_applied(fcn)
    (bn,) = modules_of(fcn.head, nn.BatchNorm2d)
    assert not modules_of(fcn, nn.BatchNorm1d)
    for key, value in model.head[1].state_dict().items():
        assert torch.equal(bn.state_dict()[key], value), key
    assert fcn.conversion_report.verification.max_abs_error < 1e-5
    assert_window_exact(model, fcn)


def test_batchnorm1d_over_a_flattened_map_is_refused():
    model = prepare(Net(nn.Flatten(), nn.Sequential(nn.BatchNorm1d(FEAT * MAP * MAP), nn.Linear(FEAT * MAP * MAP, 5))))
    with pytest.raises(UnsupportedModelError, match=r"node 'head_0'.*normalises the flattened 6x4x4 map"):
        fcnify.convert(model, (H, W))


def test_batchnorm2d_in_the_body_is_left_alone():
    b = nn.Sequential(*body(), nn.BatchNorm2d(FEAT))
    model = prepare(Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(FEAT, 5), b))
    fcn = fcnify.convert(model, (H, W))
    assert "BatchNorm1dToBatchNorm2d" not in rules_applied(fcn)
    assert_window_exact(model, fcn)


@pytest.mark.parametrize("functional", [False, True], ids=["nn.LayerNorm", "F.layer_norm"])
def test_layernorm_over_features_becomes_channel_layernorm(functional):
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(FEAT)
            nn.init.uniform_(self.norm.weight, 0.5, 1.5)
            nn.init.uniform_(self.norm.bias, -0.5, 0.5)
            self.fc = nn.Linear(FEAT, 5)

        def forward(self, x):
            if functional:
                x = F.layer_norm(x, (FEAT,), self.norm.weight, self.norm.bias, 1e-6)
            else:
                x = self.norm(x)
            return self.fc(x)

    model = prepare(Net(lambda x: x.mean((2, 3)), Head()))
    fcn = fcnify.convert(model, (H, W))
    assert "LayerNormToChannelLayerNorm" in rules_applied(fcn)
    if not functional:
        assert isinstance(fcn.head.norm, ChannelLayerNorm)
        assert torch.equal(fcn.head.norm.weight, model.head.norm.weight)
    assert_window_exact(model, fcn)


def test_layernorm_in_the_body_over_width_is_refused():
    b = nn.Sequential(*body(), nn.LayerNorm(MAP))  # over the last axis of the map: body, fixed size
    model = prepare(Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(FEAT, 5), b))
    with pytest.raises(UnsupportedModelError, match=r"(?s)node 'body_4'.*Hint:"):
        fcnify.convert(model, (H, W))


# -- FeatureDimToChannel, PointwiseOnMaps ----------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self, combine):
        super().__init__()
        self.body = body()
        self.a = nn.Linear(FEAT, 3)
        self.b = nn.Linear(FEAT, 4)
        self.combine = combine

    def forward(self, x):
        v = self.body(x).mean((2, 3))
        return self.combine(self.a(v), self.b(v))


TWO_HEAD_COMBINES = {
    "cat+softmax(-1)": lambda a, b: torch.cat([a, b], dim=1).softmax(dim=-1),
    "torch.cat+F.log_softmax": lambda a, b: F.log_softmax(torch.cat((a, b), 1), dim=1),
    "F.softmax(cat(dim=-1))": lambda a, b: F.softmax(torch.cat([a, b], -1), -1),
    "tuple": lambda a, b: (a, b.log_softmax(-1)),
    "dict": lambda a, b: {"a": a, "b": F.softmax(b, dim=1)},
    "slice": lambda a, b: torch.cat([a[:, 1:], b[:, :2]], 1),
}


@pytest.mark.parametrize("combine", TWO_HEAD_COMBINES)
def test_feature_axis_ops_and_multiple_outputs(combine):
    model = prepare(TwoHeads(TWO_HEAD_COMBINES[combine]))
    fcn = fcnify.convert(model, (H, W))
    assert fcn.conversion_report.verification.passed
    x = big_input()
    with torch.no_grad():
        out, ref = fcn(x), model(x[:, :, :H, :W])
    assert type(out) is type(ref)
    if isinstance(ref, dict):
        assert out.keys() == ref.keys()
    outs = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, tuple) else [out]
    for i, o in enumerate(outs):
        expected = crops(lambda t, i=i: _nth(model(t), i), x)
        assert_close(o, expected)


def _nth(value, i):
    if isinstance(value, dict):
        return list(value.values())[i]
    return value[i] if isinstance(value, tuple) else value


def test_softmax_module_over_features():
    model = prepare(Net(lambda x: x.mean((2, 3)), nn.Sequential(nn.Linear(FEAT, 5), nn.LogSoftmax(dim=-1))))
    fcn = fcnify.convert(model, (H, W))
    assert fcn.get_submodule("head.1").dim == 1
    assert_window_exact(model, fcn)


def test_softmax_over_the_batch_is_refused():
    model = prepare(Net(lambda x: x.mean((2, 3)), nn.Sequential(nn.Linear(FEAT, 5), nn.Softmax(dim=0))))
    with pytest.raises(UnsupportedModelError, match=r"node 'head_1'.*axis 0"):
        fcnify.convert(model, (H, W))


def test_per_feature_parameters_broadcast_over_channels():
    class ScaledHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.rand(FEAT) + 0.5)
            self.shift = nn.Parameter(torch.randn(1, FEAT))
            self.fc = nn.Linear(FEAT, 5)
            self.temperature = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            x = x * self.scale + self.shift
            x = torch.relu(x) - 0.5 * x
            return self.fc(x) / self.temperature

    model = prepare(Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), ScaledHead()))
    fcn = fcnify.convert(model, (H, W))
    assert_window_exact(model, fcn)
    dense = fcnify.convert(model, (H, W), mode="dense")
    assert dense.conversion_report.checks == ["none"]  # relu after the pool: not affine


def test_non_per_feature_operand_is_refused():
    class MatrixHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(2, FEAT))  # per sample of a batch of 2, not per feature

        def forward(self, x):
            return x + self.bias

    model = prepare(Net(lambda x: x.mean((2, 3)), MatrixHead()))
    with pytest.raises(UnsupportedModelError, match=r"operand 'head_bias'.*\(2, 6\)"):
        fcnify.convert(model, (H, W))


def test_affine_head_gives_class_activation_maps_in_dense_mode():
    model = prepare(
        Net(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.Sequential(nn.Linear(FEAT, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 5)),
        )
    )
    fcn = fcnify.convert(model, (H, W), mode="dense")
    assert fcn.conversion_report.checks == ["mean"]
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        cam = fcn(x)
        assert cam.shape == (2, 5, MAP, MAP)
        assert_close(cam.mean((2, 3)), model(x))
        # each cell is the head applied to that feature vector
        features = model.body(x)
        assert_close(cam[:, :, 1, 2], model.head(features[:, :, 1, 2]))


def test_stacked_average_pools_keep_the_exact_dense_check():
    """A final AvgPool2d(2) over a 2x2 map is a global pool too; the map's mean is still the logits."""
    b = nn.Sequential(*body(), nn.AvgPool2d(2), nn.AvgPool2d(2))  # 4x4 -> 2x2 -> 1x1
    model = prepare(Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(FEAT, 5), b))
    fcn = fcnify.convert(model, (H, W), mode="dense")
    assert [r.node for r in fcn.conversion_report.rewrites if r.rule == "GlobalPoolToWindowPool"] == [
        "body_5",
        "neck_0",
    ]
    assert fcn.conversion_report.checks == ["mean"]
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        assert_close(fcn(x).mean((2, 3)), model(x))


# -- bodies with their own global pools ----------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.reduce = nn.Conv2d(channels, 2, 1)
        self.expand = nn.Conv2d(2, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


def test_squeeze_excitation_in_the_body_stays_global():
    b = nn.Sequential(nn.Conv2d(C, 4, 3), nn.ReLU(), SqueezeExcite(4), nn.MaxPool2d(2), nn.Conv2d(4, FEAT, 3))
    model = prepare(Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(FEAT, 5), b))
    fcn = fcnify.convert(model, (H, W))
    assert fcn.conversion_report.verification.passed
    pools = [r.node for r in fcn.conversion_report.rewrites if r.rule == "GlobalPoolToWindowPool"]
    assert pools == ["neck_0"]
    x = big_input()
    with torch.no_grad():
        features = model.body(x)  # the SE pools over the whole (larger) map
        pooled = F.avg_pool2d(features, MAP, stride=1)
        expected = model.head(pooled.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert_close(fcn(x), expected)
        # global mode equals the original, which runs at any size
        assert_close(fcnify.convert(model, (H, W), mode="global")(x), model(x))


# -- models fcnify refuses ---------------------------------------------------------------------


def test_data_dependent_control_flow_is_a_trace_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, 4, 3)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            x = self.conv(x)
            if x.sum() > 0:
                x = -x
            return self.fc(x.mean((2, 3)))

    with pytest.raises(TraceError, match=r"Branchy.*Hint:") as err:
        fcnify.convert(Branchy().eval(), (H, W))
    assert err.value.__cause__ is not None


def test_position_embedding_on_tokens_is_refused():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, MAP * MAP, FEAT))
            self.fc = nn.Linear(FEAT, 5)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2) + self.pos
            return self.fc(tokens.mean(1))

    model = prepare(Net(nn.Identity(), Tokens()))
    with pytest.raises(UnsupportedModelError, match=r"node 'transpose'.*Hint:"):
        fcnify.convert(model, (H, W))


def test_linear_over_positions_is_refused_as_such():
    """``x.flatten(2)`` then a Linear over the h*w positions: not a transformer, a fixed-size layer."""

    class OverPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(MAP * MAP, 3)
            self.fc = nn.Linear(FEAT * 3, 5)

        def forward(self, x):
            return self.fc(self.mix(x.flatten(2)).flatten(1))

    model = prepare(Net(nn.Identity(), OverPositions()))
    with pytest.raises(
        UnsupportedModelError, match=rf"node 'head_mix'.*across the {MAP * MAP} positions.*Hint: flatten"
    ) as info:
        fcnify.convert(model, (H, W))
    assert "transformer" not in str(info.value)


def test_position_embedding_on_the_map_is_refused():
    class PosEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, FEAT, MAP, MAP))

        def forward(self, x):
            return x + self.pos

    model = prepare(Net(nn.Sequential(PosEmbed(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(FEAT, 5)))
    with pytest.raises(UnsupportedModelError, match=r"(?s)node 'add'.*training size"):
        fcnify.convert(model, (H, W))


def test_linear_over_positions_is_refused():
    class PositionMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(MAP * MAP, 1)  # over the h*w positions
            self.fc = nn.Linear(FEAT, 5)

        def forward(self, x):
            return self.fc(self.mix(x.flatten(2)).flatten(1))

    model = prepare(Net(nn.Identity(), PositionMixer()))
    with pytest.raises(UnsupportedModelError, match=r"node 'head_mix'.*Hint:"):
        fcnify.convert(model, (H, W))


def test_model_without_head_is_refused():
    model = prepare(nn.Sequential(nn.Conv2d(C, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1)))
    with pytest.raises(UnsupportedModelError, match=r"no classifier head found in Sequential.*Hint:"):
        fcnify.convert(model, (H, W))


# -- the user's model is never changed ----------------------------------------------------------


def _state(model):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        [(name, m.training) for name, m in model.named_modules()],
    )


@pytest.mark.parametrize("mode", ["window", "dense", "global"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_is_not_modified(mode, training):
    model = prepare(
        Net(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.Sequential(nn.Linear(FEAT, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 5)),
            nn.Sequential(*body(), nn.BatchNorm2d(FEAT)),
        )
    )
    model.train(training)
    params, flags = _state(model)
    before = copy.deepcopy(model)
    fcn = fcnify.convert(model, (H, W), mode=mode)
    after_params, after_flags = _state(model)
    assert after_flags == flags
    assert after_params.keys() == params.keys()
    for key in params:
        assert torch.equal(after_params[key], params[key]), key
    assert fcn.training == training
    # the converted model shares no storage with the user's
    fcn_tensors = {t.data_ptr() for t in list(fcn.parameters()) + list(fcn.buffers())}
    assert not fcn_tensors & {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    # and verification ran both models in eval mode (the running stats did not move)
    assert torch.equal(model.body[-1].running_mean, before.body[-1].running_mean)
    assert model.body[-1].num_batches_tracked == before.body[-1].num_batches_tracked


def test_training_flags_are_kept_per_module():
    """A model fine-tuned with frozen batch norms keeps them frozen after conversion."""
    model = prepare(
        Net(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.Sequential(nn.Linear(FEAT, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)),
            nn.Sequential(*body(), nn.BatchNorm2d(FEAT)),
        )
    )
    model.train()
    model.body[-1].eval()
    model.head[1].eval()
    fcn = fcnify.convert(model, (H, W))
    assert fcn.training
    assert not fcn.get_submodule("body.4").training
    assert not fcn.get_submodule("head.1").training  # the BatchNorm2d that replaced BatchNorm1d
    assert fcn.get_submodule("head.0").training


def test_verification_catches_a_broken_conversion():
    """fcnify.verify is checked independently: a tampered result fails it."""
    model = prepare(Net(nn.Flatten(), nn.Linear(FEAT * MAP * MAP, 5)))
    fcn = fcnify.convert(model, (H, W))
    assert fcnify.verify(model, fcn, (C, H, W)).passed
    assert fcnify.verify(model, fcn, (H, W)).passed  # (H, W) as for convert: channels from the model
    with torch.no_grad():
        fcn.head.weight[0, 0, 0, 0] += 1.0
    report = fcnify.verify(model, fcn, (C, H, W))
    assert not report.passed
    assert "FAILED" in str(report)


def test_verification_error_is_raised(monkeypatch):
    """A conversion that does not reproduce the model raises VerificationError."""
    model = prepare(Net(nn.Flatten(), nn.Linear(FEAT * MAP * MAP, 5)))
    from fcnify.conversion.rules import linear_to_conv as linear

    original = linear._conv_weight
    monkeypatch.setattr(linear, "_conv_weight", lambda *a: original(*a).flip(-1))
    with pytest.raises(fcnify.VerificationError, match="does not reproduce"):
        fcnify.convert(model, (H, W))
