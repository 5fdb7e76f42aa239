"""The converted model is a FullyConvolutionalNet: a GraphModule that carries its report everywhere it goes."""

import copy
import io

import pytest
import torch
import torch.fx as fx
from torch import nn

import fcnify


@pytest.fixture(scope="module")
def fcn():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    net.pretrained_cfg = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    return fcnify.convert(net)


def test_it_is_a_graph_module_with_a_real_report(fcn):
    assert isinstance(fcn, fx.GraphModule) and isinstance(fcn, fcnify.FullyConvolutionalNet)
    assert type(fcn).__name__ == "SequentialFCN"
    assert isinstance(fcn.conversion_report, fcnify.ConversionReport)
    assert fcn.fcnify_input_size == (3, 8, 8) and fcn.pretrained_cfg["mean"] == (0.5,) * 3


def test_deepcopy_keeps_the_report_and_the_class(fcn):
    twin = copy.deepcopy(fcn)
    assert isinstance(twin, fcnify.FullyConvolutionalNet) and type(twin).__name__ == "SequentialFCN"
    assert twin.conversion_report == fcn.conversion_report and twin.conversion_report is not fcn.conversion_report
    assert twin.pretrained_cfg == fcn.pretrained_cfg
    x = torch.randn(1, 3, 12, 15)
    torch.testing.assert_close(twin(x), fcn(x))


def test_state_dict_round_trip(fcn):
    buffer = io.BytesIO()
    torch.save(fcn.state_dict(), buffer)
    twin = copy.deepcopy(fcn)
    for p in twin.parameters():
        nn.init.zeros_(p)
    twin.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert set(twin.state_dict()) == set(fcn.state_dict())
    x = torch.randn(2, 3, 9, 20)
    torch.testing.assert_close(twin(x), fcn(x))


def test_torch_export_and_save(fcn, tmp_path):
    path = fcnify.save(fcn, str(tmp_path / "net.pt2"))
    program = torch.export.load(path).module()
    x = torch.randn(2, 3, 11, 13)
    torch.testing.assert_close(program(x), fcn(x))


@pytest.mark.onnx
def test_onnx_export(fcn, tmp_path):
    report = fcnify.export_onnx(fcn, str(tmp_path / "net.onnx"))
    assert report.passed and report.output_shapes[0][1] == 5
