"""fcnify.resize_head: a flatten-Linear head moved to another input size."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcnify


def _pointwise_net():
    """A body that commutes with nearest upsampling (1x1 conv, ReLU), then flatten + Linear."""
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 5, 6)).eval()


def _lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 10),
    ).eval()


@pytest.mark.parametrize("factor", [(2, 2), (2, 3), (3, 1)])
def test_nearest_is_exact_on_nearest_upsampled_maps(factor):
    net = _pointwise_net()
    big = fcnify.resize_head(net, (4, 5), (4 * factor[0], 5 * factor[1]), method="nearest")
    x = torch.randn(3, 3, 4, 5)
    with torch.no_grad():
        out = big(F.interpolate(x, scale_factor=factor, mode="nearest"))
        torch.testing.assert_close(out, net(x), atol=1e-6, rtol=1e-6)
    # independently: the new kernel is the old one repeated and divided by the area ratio
    w_old = net[4].weight.view(6, 8, 4, 5)
    w_new = big[4].weight.view(6, 8, 4 * factor[0], 5 * factor[1])
    expected = w_old.repeat_interleave(factor[0], 2).repeat_interleave(factor[1], 3) / (factor[0] * factor[1])
    torch.testing.assert_close(w_new, expected, atol=1e-8, rtol=1e-6)


def test_interpolate_is_close_on_bilinear_upsampled_smooth_maps():
    net = _pointwise_net()
    big = fcnify.resize_head(net, (4, 5), (8, 10))  # method="interpolate"
    x = F.interpolate(torch.randn(64, 3, 2, 2), size=(4, 5), mode="bilinear")  # smooth maps
    with torch.no_grad():
        ref = net(x)
        out = big(F.interpolate(x, size=(8, 10), mode="bilinear"))
        fresh = nn.Linear(8 * 8 * 10, 6)(net[1](net[0](F.interpolate(x, size=(8, 10), mode="bilinear"))).flatten(1))
    err = (out - ref).abs().mean() / ref.abs().mean()
    assert err < 0.25, err
    assert (fresh - ref).abs().mean() / ref.abs().mean() > 2 * err


def test_real_body_and_model_untouched():
    net = _lenet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    big = fcnify.resize_head(net, 16, 32)
    assert type(big) is type(net) and big.training and big[7].in_features == 8 * 8 * 8
    assert big(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert big.fcnify_input_size == (32, 32)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net[7].in_features == 8 * 4 * 4
    torch.testing.assert_close(big[9].weight, net[9].weight)  # later Linears are kept
    small = fcnify.resize_head(big, 32, 16, method="nearest")  # shrinking back works too
    assert small(torch.randn(1, 1, 16, 16)).shape == (1, 10)


def test_size_independent_head_is_copied():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    same = fcnify.resize_head(net, 16, 40)
    assert same is not net and same[3].in_features == 16
    torch.testing.assert_close(same[3].weight, net[3].weight)


def test_errors():
    with pytest.raises(fcnify.FcnifyError, match="method.*Hint"):
        fcnify.resize_head(_lenet(), 16, 32, method="cubic")
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(fcnify.UnsupportedModelError, match="no nn.Linear.*Hint"):
        fcnify.resize_head(pooled, 16, 32)
    with pytest.raises(fcnify.FcnifyError, match="fails on a 1x20x20 input.*Hint"):
        fcnify.resize_head(_lenet(), 20, 32)
    with pytest.raises(fcnify.UnsupportedModelError, match="to_size must be large enough"):
        fcnify.resize_head(_lenet(), 16, 2)


def _example(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_progressive_resizing_example_runs(one_thread, capsys):
    pytest.importorskip("sklearn")
    result = _example("progressive_resizing").main(["--quick"])
    assert set(result["curves"]) == {"warm (resize_head)", "fresh head"}
    assert "steps to 95%" in capsys.readouterr().out
