"""fcnify.graph: the one input-size resolution and the shared fx helpers."""

import pytest
import torch
import torch.fx as fx
from torch import nn

import fcnify
from fcnify.graph import device_and_dtype, example_input, is_adaptive_pool, is_flatten, parent_name, resolve_input_size


def test_input_size_is_always_c_h_w():
    conv = nn.Conv2d(1, 4, 3)
    assert resolve_input_size(conv, 28) == (1, 28, 28)
    assert resolve_input_size(conv, (28, 30)) == (1, 28, 30)
    assert resolve_input_size(conv, (2, 28, 30)) == (2, 28, 30)


def test_the_size_and_channels_come_from_the_model_in_one_order():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    net.pretrained_cfg = {"input_size": (3, 240, 240)}
    assert resolve_input_size(net) == (3, 240, 240)
    net.fcnify_input_size = (256, 256)  # fcnify.load_model's size comes first, channels from the config
    assert resolve_input_size(net) == (3, 256, 256)
    fcn = fcnify.convert(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), (8, 8))
    assert resolve_input_size(fcn) == (2, 8, 8) == fcn.conversion_report.input_size
    assert resolve_input_size(fcn, (16, 20)) == (2, 16, 20)  # channels of the conversion


def test_input_size_errors_say_what_to_pass():
    with pytest.raises(fcnify.FcnifyError, match=r"input_size is required .*Hint: fcnify.convert"):
        resolve_input_size(nn.Conv2d(3, 4, 3))
    with pytest.raises(fcnify.FcnifyError, match=r"\(H, W\) or \(C, H, W\) with positive sizes"):
        resolve_input_size(nn.Conv2d(3, 4, 3), (0, 5))
    with pytest.raises(fcnify.FcnifyError, match="has no Conv2d"):
        resolve_input_size(nn.Linear(3, 4), (5, 5))


def test_device_dtype_and_example_inputs_follow_the_first_parameter():
    net = nn.Conv2d(3, 4, 3).double()
    assert device_and_dtype(net) == (torch.device("cpu"), torch.float64)
    assert device_and_dtype(nn.ReLU()) == (torch.device("cpu"), torch.float32)
    x = example_input(net, (3, 5, 6), batch_size=4)
    assert x.shape == (4, 3, 5, 6) and x.dtype == torch.float64
    torch.testing.assert_close(x, example_input(net, (3, 5, 6), batch_size=4))  # seeded


def test_fx_helpers():
    net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    gm = fx.symbolic_trace(net)
    pool, flat = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert is_adaptive_pool(pool, gm) and not is_adaptive_pool(flat, gm)
    assert is_flatten(flat, gm) and not is_flatten(pool, gm)
    assert parent_name("layer4.1.conv1") == ("layer4.1", "conv1")
