"""ONNX export with symbolic batch, height and width, proven in ONNX Runtime.

Every export is validated by fcnify itself; the tests also read the file's dims with
``onnx`` and run ONNX Runtime at a size fcnify did not validate, so that a broken
validator cannot pass silently.
"""

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm.layers
import torch
import torchvision
from torch import nn

import fcnify
from fcnify.cli import main
from fcnify.models import calibrate_batchnorm

pytestmark = pytest.mark.onnx


class LeNet(nn.Module):
    """LeNet-5 with the hard-coded ``view(-1, 16 * 5 * 5)`` of the PyTorch tutorial."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@pytest.fixture(scope="module")
def lenet_fcn():
    return fcnify.convert(LeNet().eval(), input_size=(32, 32))


def onnx_dims(path):
    """``(input dims, [output dims])`` read from the file, symbolic dims as their names."""
    model = onnx.load(path, load_external_data=False)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return dims(model.graph.input[0]), [dims(o) for o in model.graph.output]


def assert_symbolic(path, batch=True):
    inputs, outputs = onnx_dims(path)
    axes = [0, 2, 3] if batch else [2, 3]
    assert all(isinstance(inputs[a], str) and inputs[a] for a in axes), inputs
    for out in outputs:
        assert len(out) == 4 and all(isinstance(out[a], str) and out[a] for a in axes), out


def run_ort(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_matches_at(fcn, path, size, channels=3):
    """ONNX Runtime equals PyTorch at a size fcnify's validation did not use."""
    x = torch.randn(1, channels, *size)
    with torch.no_grad():
        ref = fcn(x).numpy()
    out = run_ort(path, x)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    return np.abs(ref).max()


def test_lenet_with_hard_coded_view_exports_with_symbolic_dims(lenet_fcn, tmp_path):
    path = str(tmp_path / "lenet.onnx")
    report = fcnify.export_onnx(lenet_fcn, path)
    assert report.passed and report.sizes == [(32, 32), (96, 160), (65, 97)]
    assert [c.batch for c in report.checks] == [2, 1, 1]
    assert report.max_abs_error < 1e-5 and report.external_data is None
    assert report.input_shape == ["batch", 1, "height", "width"]
    assert_symbolic(path)
    assert_matches_at(lenet_fcn, path, (47, 120), channels=1)
    x = torch.randn(3, 1, 40, 36)  # a batch of 3 was never validated
    assert run_ort(path, x).shape == (3, 10, 3, 2)
    assert "validated in ONNX Runtime against PyTorch at 3 sizes" in str(report)


def test_static_batch_and_opset(lenet_fcn, tmp_path):
    path = str(tmp_path / "lenet.onnx")
    report = fcnify.export_onnx(lenet_fcn, path, opset=18, dynamic_batch=False, validate_sizes=[(32, 32), (41, 77)])
    assert report.opset == 18 and report.sizes == [(32, 32), (41, 77)]
    inputs, outputs = onnx_dims(path)
    assert inputs[0] == 1 and outputs[0][0] == 1
    assert_symbolic(path, batch=False)


def test_weights_go_to_external_data_for_large_models(lenet_fcn, tmp_path, monkeypatch):
    import fcnify.export._onnx

    monkeypatch.setattr(fcnify.export._onnx, "_EXTERNAL_DATA_BYTES", 0)  # pretend LeNet is over 2 GB
    path = str(tmp_path / "lenet.onnx")
    report = fcnify.export_onnx(lenet_fcn, path)
    assert report.external_data == path + ".data" and os.path.getsize(report.external_data) > 200_000
    assert os.path.getsize(path) < 100_000 and report.passed
    assert_matches_at(lenet_fcn, path, (50, 33), channels=1)


def test_simplify_with_onnxslim_is_validated_again(lenet_fcn, tmp_path):
    pytest.importorskip("onnxslim")
    path = str(tmp_path / "lenet.onnx")
    report = fcnify.export_onnx(lenet_fcn, path, simplify=True)
    assert report.simplified and report.passed and len(report.sizes) == 3
    assert_symbolic(path)
    assert_matches_at(lenet_fcn, path, (44, 59), channels=1)


class PaddedStem(nn.Module):
    """BiT's stem (timm ``resnetv2_*_bit``): conv, zero ``ConstantPad2d``, then ``MaxPool2d``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pad = nn.ConstantPad2d(1, 0.0)
        self.pool = nn.MaxPool2d(3, 2)
        self.head = nn.Sequential(
            nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)
        )
        with torch.no_grad():
            self.conv.bias.fill_(-2.0)  # mostly negative maps: border windows pool the padding's 0

    def forward(self, x):
        return self.head(self.pool(self.pad(self.conv(x))))


@pytest.mark.parametrize("simplify", [False, True])
def test_a_zero_pad_before_max_pool_is_not_fused_into_the_pool_by_onnx_runtime(simplify, tmp_path):
    """ONNX Runtime's Pad_Fusion moves a zero Pad into MaxPool's pads, which pad with -inf."""
    torch.manual_seed(0)
    model = PaddedStem().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fcn = fcnify.convert(model, input_size=(32, 32))
    path = str(tmp_path / "stem.onnx")
    report = fcnify.export_onnx(fcn, path, simplify=simplify)  # unguarded: error 0.05 at every size
    assert report.passed and report.max_abs_error < 1e-5
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.index("Pad") < ops.index("Max") < ops.index("MaxPool")
    assert_matches_at(fcn, path, (45, 70))  # ONNX Runtime with its default optimisations
    assert [type(m) for m in model.modules()] == [type(m) for m in PaddedStem().modules()]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is untouched


def test_a_mismatch_with_pytorch_is_an_error(tmp_path):
    model = LeNet().eval()
    fcn = fcnify.convert(model, input_size=(32, 32))
    path = str(tmp_path / "lenet.onnx")
    fcnify.export_onnx(fcn, path, validate_sizes=[])
    with torch.no_grad():
        fcn.fc3.bias.add_(1.0)  # the PyTorch model no longer matches the file
    with pytest.raises(fcnify.ExportError, match=r"disagrees with PyTorch \(.*\) at 32x32 max abs error"):
        fcnify.validate_onnx(fcn, path, (32, 32))


def test_a_mismatch_at_some_sizes_only_is_explained():
    """torchvision's Swin skips its shift when the window covers the map: one path per size."""
    from fcnify.export._onnx_validate import SizeCheck, _raise_on_mismatch

    checks = [
        SizeCheck((224, 224), 2, [(2, 10, 1, 1)], 9e-3, 1e-4),
        SizeCheck((288, 352), 1, [(1, 10, 3, 5)], 1e-6, 1e-4),
    ]
    with pytest.raises(fcnify.ExportError, match=r"at 224x224 max abs error 0.009 .* but agrees at 288x352: .*Hint"):
        _raise_on_mismatch("swin.onnx", checks)
    _raise_on_mismatch("swin.onnx", checks[1:])  # every size agrees: no error
    rounding = [SizeCheck((224, 224), 2, [(2, 10)], 2.6e-4, 2e-4), SizeCheck((288, 352), 1, [(1, 10)], 1.9e-4, 2e-4)]
    with pytest.raises(fcnify.ExportError) as info:  # just over the tolerance: not called a different path
        _raise_on_mismatch("deep.onnx", rounding)
    assert "different path" not in str(info.value)


@pytest.mark.parametrize("version", [1, 2])
def test_swin_exports_right_at_its_training_size_too(version, tmp_path):
    """torchvision's Swin skips its window shift when one window covers the map (the last stage
    at the training size) and shifts at larger sizes: one exported graph must do both."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if version == 2 else {}
    torch.manual_seed(0)
    swin = SwinTransformer([4, 4], 16, [2, 2], [2, 2], [7, 7], num_classes=10, **extra).eval()
    with torch.no_grad():
        swin.head.weight.mul_(100.0)  # logits of order one, so that a shift too many shows
    fcn = fcnify.convert(swin, input_size=(56, 56))  # last map 7x7: one window, no shift
    path = str(tmp_path / "swin.onnx")
    report = fcnify.export_onnx(fcn, path, validate_sizes=[(56, 56), (112, 84), (75, 101)])
    assert report.passed and report.max_abs_error < 1e-4
    assert assert_matches_at(fcn, path, (56, 112)) > 1.0  # one axis shifted, the other not
    assert type(fcn.graph) is torch.fx.Graph and "shifted_window_attention" in fcn.code  # the user's model is untouched
    assert "fcnify" not in str([n.target for n in fcn.graph.nodes if n.op == "call_function"])


class SpatialGate(nn.Module):
    """timm's CSATv2 attention: the map pooled adaptively to a few cells gates every position."""

    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        gate = nn.functional.interpolate(self.conv(self.pool(x)), size=x.shape[2:], mode="bilinear", align_corners=True)
        return x * gate.sigmoid()


def test_an_adaptive_pool_inside_the_network_exports_for_every_size(tmp_path, one_thread):
    """The exporter lowers AdaptiveAvgPool2d((3, 3)) with the example's bins: wrong or failing elsewhere."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        SpatialGate(8),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    fcn = fcnify.convert(net, input_size=(32, 32), mode="global")
    path = str(tmp_path / "gate.onnx")
    report = fcnify.export_onnx(fcn, path)
    assert report.passed and report.max_abs_error < 1e-5 and report.traced_size is None
    assert assert_matches_at(fcn, path, (50, 37)) > 0.1
    assert type(fcn.get_submodule("1.pool")) is nn.AdaptiveAvgPool2d  # the user's model is untouched


def test_an_adaptive_pool_frozen_at_export_is_caught(tmp_path):
    """The exporter turns AdaptiveAvgPool2d((2, 2)) into an AveragePool with the example's kernel."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((2, 2))).eval()
    traced = torch.fx.symbolic_trace(net)
    report = types.SimpleNamespace(input_size=(3, 16, 16), probe_output_shapes=[(2, 4, 2, 2)])
    fake = fcnify.FullyConvolutionalNet(traced, traced.graph, conversion_report=report)  # passes for a conversion
    frozen = (
        r"(output 0 has fixed dimensions|ONNX Runtime gives shape \(2, 4, 1, 1\) where PyTorch gives \(2, 4, 2, 2\))"
    )
    with pytest.raises(fcnify.ExportError, match=frozen):
        fcnify.export_onnx(fake, str(tmp_path / "frozen.onnx"))
    assert not os.path.exists(tmp_path / "frozen.onnx")  # a failed export leaves no file behind


class HeadsInBatchAttention(nn.Module):
    """timm's SAM ViT attention: q, k, v as (B * heads, N, d) and a (B * heads, N, N) position bias."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        qkv = self.qkv(x.flatten(2).transpose(1, 2)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.heads, N, -1).unbind(0)
        bias = q[..., :1] * k[..., :1].transpose(-2, -1)  # depends on the size, as the relative positions
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = y.view(B, self.heads, N, -1).transpose(1, 2).reshape(B, N, -1)
        return x + self.proj(y).transpose(1, 2).reshape(B, C, H, W)


def test_attention_on_3d_query_key_and_value_exports(tmp_path, one_thread):
    """The exporter translates scaled_dot_product_attention for 4D inputs only; timm's samvit gives 3D."""
    from fcnify.export._exportable import exportable

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=4),
        HeadsInBatchAttention(8, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    fcn = fcnify.convert(net, input_size=(32, 32))
    path = str(tmp_path / "sam.onnx")
    report = fcnify.export_onnx(fcn, path)
    assert report.passed and report.max_abs_error < 1e-5
    assert_symbolic(path)
    assert assert_matches_at(fcn, path, (44, 76)) > 0.1
    sdpa = nn.functional.scaled_dot_product_attention
    assert any(n.target is sdpa for n in fcn.graph.nodes)  # the user's model is untouched
    assert not any(n.target is sdpa for n in exportable(fcn).graph.nodes)


@pytest.mark.parametrize(
    "q, k, mask",
    [
        ((6, 33, 16), (6, 35, 16), (6, 33, 35)),  # timm's samvit
        ((6, 33, 16), (6, 35, 16), None),
        ((33, 16), (35, 16), (33, 35)),
        ((2, 3, 4, 33, 16), (1, 3, 4, 35, 16), (4, 33, 35)),  # broadcast batch dims
        ((2, 4, 33, 16), (2, 4, 35, 16), (33, 35)),
    ],
)
def test_attention_on_any_rank_computes_what_pytorch_does(q, k, mask):
    from fcnify.export._exportable import scaled_dot_product_attention as exportable_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(q), torch.randn(k), torch.randn(k)
    mask = None if mask is None else torch.randn(mask)
    ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = exportable_attention(q, k, v, attn_mask=mask)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # 3D: bit for bit with PyTorch 2.14 on CPU


class TwoScales(nn.Module):
    """mobilenetv5_300m's end: timm's MSFA fuses the stride-2 and stride-4 maps and brings them to 6x6."""

    def __init__(self):
        super().__init__()
        from timm.models.mobilenetv5 import MobileNetV5MultiScaleFusionAdapter

        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.msfa = MobileNetV5MultiScaleFusionAdapter(in_chs=[8, 16], out_chs=16, output_resolution=6)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        a = self.a(x)
        return self.head(self.msfa([a, self.b(a)]).mean((2, 3)))


def test_mobilenetv5_msfa_exports_right_at_its_training_size_too(tmp_path, one_thread):
    """The MSFA average-pools a map that is a multiple of its output size (24x24 at the training size
    48x48), else resizes it bilinearly (40x56 at the 80x112 example): one graph must do both."""
    torch.manual_seed(0)
    fcn = fcnify.convert(TwoScales().eval(), input_size=(48, 48), mode="global")
    assert "msfa" in [n.target for n in fcn.graph.nodes if n.op == "call_module"]
    path = str(tmp_path / "msfa.onnx")
    report = fcnify.export_onnx(fcn, path)
    assert report.passed and report.max_abs_error < 1e-5 and report.traced_size is None
    assert assert_matches_at(fcn, path, (96, 72)) > 0.1  # 48x36: pooled by 8 and 6
    assert (
        type(fcn.get_submodule("msfa")).__name__ == "MobileNetV5MultiScaleFusionAdapter"
    )  # the user's model is untouched
    from fcnify.export._exportable import MultiScaleFusion, exportable

    assert type(exportable(fcn).get_submodule("msfa")) is MultiScaleFusion


@pytest.mark.parametrize("size", [(24, 24), (6, 6), (18, 30), (6, 18), (25, 31), (20, 6), (4, 5)])
def test_the_exportable_msfa_equals_timms(size):
    """Equal maps: the identity; multiples: the pool; else (odd, smaller): the bilinear resize."""
    from timm.models.mobilenetv5 import MobileNetV5MultiScaleFusionAdapter

    from fcnify.export._exportable import MultiScaleFusion

    torch.manual_seed(0)
    msfa = MobileNetV5MultiScaleFusionAdapter(in_chs=[4, 8], out_chs=8, output_resolution=6).eval()
    high, low = torch.randn(2, 4, *size), torch.randn(2, 8, (size[0] + 1) // 2, (size[1] + 1) // 2)
    with torch.no_grad():
        ref = msfa([high, low])
        out = MultiScaleFusion(msfa)([high, low])
    assert out.shape == ref.shape == (2, 8, 6, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class EvenDown(nn.Module):
    """A DLA tree's downsampling: a stride-2 conv plus a 2x2 max-pooled shortcut, which needs even maps."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)  # ceil(H / 2)
        self.pool = nn.MaxPool2d(2, 2)  # floor(H / 2)

    def forward(self, x):
        return self.conv(x) + self.pool(x)


@timm.layers.register_notrace_module  # fx cannot follow the `if`; a leaf, as timm declares cpubone's attention
class PadOddMaps(nn.Module):
    """timm's cpubone attention: pad an odd map by one, stride-2 conv, upsample, crop back."""

    def __init__(self, channels):
        super().__init__()
        self.down = nn.Conv2d(channels, channels, 2, stride=2)
        self.up = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 2, (-w) % 2
        y = nn.functional.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        return x + self.up(self.down(y))[..., :h, :w]


def two_blocks(block):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), block(4), block(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def test_a_shape_guard_the_export_solver_cannot_solve_does_not_stop_the_export(tmp_path, one_thread):
    """timm's dla34: torch.onnx's solver fails on Eq(x/4 - ((x/2)//2), 0), "the two branches agree"."""
    fcn = fcnify.convert(two_blocks(EvenDown), input_size=(32, 32))
    path = str(tmp_path / "dla.onnx")
    report = fcnify.export_onnx(fcn, path)
    assert report.passed and report.sizes == [(32, 32), (96, 160), (128, 64)] and report.traced_size is None
    assert report.skipped[0].startswith("65x97: the PyTorch model itself fails")  # as DLA does at odd sizes
    assert_symbolic(path)
    assert_matches_at(fcn, path, (40, 72))


def test_a_branch_on_an_odd_size_is_traced_again_at_the_size_that_failed(tmp_path, one_thread):
    """timm's cpubone_nano: traced at an even size, the pad is left out and the file fails at odd sizes."""
    fcn = fcnify.convert(two_blocks(PadOddMaps), input_size=(32, 32))
    path = str(tmp_path / "pad.onnx")
    report = fcnify.export_onnx(fcn, path)
    assert report.passed and report.sizes == [(32, 32), (96, 160), (65, 97)]
    assert report.traced_size == (65, 97) and "traced at 65x97" in str(report)
    assert_symbolic(path)
    assert_matches_at(fcn, path, (47, 120))  # one odd side
    assert_matches_at(fcn, path, (40, 72))  # even sides: the exported pad is zero there


class RowsAndColumnsLSTM(nn.Module):
    """timm's Sequencer: bidirectional LSTMs along every column and every row, ``reshape(B, W, H, -1)`` after."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)
        self.rnn_v = nn.LSTM(8, 4, batch_first=True, bidirectional=True)
        self.rnn_h = nn.GRU(8, 4, batch_first=True, bidirectional=True)  # GRUs have the same decomposition
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        v, _ = self.rnn_v(x.permute(0, 2, 1, 3).reshape(-1, H, C))
        h, _ = self.rnn_h(x.reshape(-1, W, C))
        x = x + v.reshape(B, W, H, -1).permute(0, 2, 1, 3) + h.reshape(B, H, W, -1)
        return self.head(x.mean((1, 2)))


def test_an_lstm_along_rows_and_columns_exports_for_every_length(tmp_path, one_thread):
    """timm's sequencer2d_s: the exporter decomposes the LSTM with the example's sequence length."""
    torch.manual_seed(0)
    fcn = fcnify.convert(RowsAndColumnsLSTM().eval(), input_size=(16, 16))
    path = str(tmp_path / "lstm.onnx")
    report = fcnify.export_onnx(fcn, path)
    assert report.passed and report.max_abs_error < 1e-5 and report.traced_size is None
    assert_symbolic(path)
    assert [n.op_type for n in onnx.load(path).graph.node].count("LSTM") == 1  # one node, any length
    assert assert_matches_at(fcn, path, (44, 28)) > 0.1


def test_an_unconverted_vgg_is_refused_with_a_hint(tmp_path):
    vgg = torchvision.models.vgg11().eval()
    with pytest.raises(fcnify.ExportError, match=r"VGG is not an fcnify conversion.*Hint: fcn = fcnify.convert"):
        fcnify.export_onnx(vgg, str(tmp_path / "vgg.onnx"), input_size=(224, 224))
    assert not os.path.exists(tmp_path / "vgg.onnx")


@pytest.mark.slow
def test_a_naive_export_of_vgg_freezes_its_gemm_and_validation_says_so(tmp_path):
    """The tracker bug: exported at 224, the adaptive pool is frozen and the Gemm fails elsewhere."""
    vgg = torchvision.models.vgg11().eval()
    path = str(tmp_path / "vgg.onnx")
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=224), 3: torch.export.Dim("width", min=224)}
    torch.onnx.export(vgg, (torch.randn(2, 3, 224, 224),), path, dynamo=True, dynamic_shapes=(dims,), verbose=False)
    assert onnx_dims(path)[0][2:] == ["height", "width"]  # looks dynamic ...
    run_ort(path, torch.randn(1, 3, 224, 224))  # ... and runs at 224 ...
    with pytest.raises(fcnify.ExportError, match=r"ONNX Runtime fails on .* at input 1x3x288x352: .*Gemm"):
        fcnify.validate_onnx(vgg, path, (224, 224))  # ... but not at any other size


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, mode",
    [("vgg11", "window"), ("resnet18", "dense"), ("efficientnet_b0", "window"), ("convnext_tiny", "window")],
)
def test_torchvision_models_export_and_validate_at_three_sizes(name, mode, tmp_path):
    fcn = fcnify.convert(
        calibrate_batchnorm(torchvision.models.get_model(name), (224, 224)), input_size=(224, 224), mode=mode
    )
    path = str(tmp_path / f"{name}.onnx")
    report = fcnify.export_onnx(fcn, path)
    assert report.passed and report.sizes == [(224, 224), (288, 352), (257, 289)]
    assert report.max_abs_error < 1e-3
    assert_symbolic(path)
    assert assert_matches_at(fcn, path, (240, 300)) > 0.1  # outputs large enough for the check to mean something


def test_convert_to_onnx_picks_the_format_from_the_extension(tmp_path, capsys):
    torch.save(LeNet().eval(), tmp_path / "lenet.pt")
    out = str(tmp_path / "lenet.onnx")
    assert main(["convert", str(tmp_path / "lenet.pt"), "--trust-pickle", "--input-size", "32", "-o", out]) == 0
    printed = capsys.readouterr().out
    assert "validated in ONNX Runtime against PyTorch at 3 sizes" in printed
    assert "1x65x97 -> 1x10x9x17" in printed
    assert_symbolic(out)


def test_cli_export_gives_a_file_that_runs_at_any_size_without_fcnify_or_torch(tmp_path, capsys):
    torch.save(LeNet().eval(), tmp_path / "lenet.pt")
    out = str(tmp_path / "lenet.onnx")
    assert (
        main(
            ["export", str(tmp_path / "lenet.pt"), "--trust-pickle", "--input-size", "32", "--mode", "dense", "-o", out]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "LeNet -> fully convolutional (dense mode" in printed and "max abs error" in printed
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["fcnify"] = sys.modules["torch"] = None
        import numpy as np, onnxruntime as ort
        session = ort.InferenceSession({out!r}, providers=["CPUExecutionProvider"])
        for shape in [(1, 1, 32, 32), (2, 1, 101, 67), (1, 1, 512, 384)]:
            print(session.run(None, {{"image": np.zeros(shape, np.float32)}})[0].shape)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == "(1, 10, 1, 1) (2, 10, 18, 9) (1, 10, 121, 89)".split()


def test_cli_export_mistakes_are_one_line(tmp_path, capsys):
    torch.save(LeNet().eval(), tmp_path / "lenet.pt")
    assert main(["export", str(tmp_path / "lenet.pt"), "--trust-pickle", "--input-size", "32", "-o", "lenet.pt2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fcnify: error: fcnify export writes ONNX") and "Hint:" in err and len(err.splitlines()) == 1
    assert (
        main(
            [
                "export",
                str(tmp_path / "lenet.pt"),
                "--trust-pickle",
                "--input-size",
                "32",
                "-o",
                str(tmp_path / "no" / "x.onnx"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "does not exist. Hint: create it first" in err and len(err.splitlines()) == 1
