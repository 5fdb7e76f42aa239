"""fcnify.segmenter: FCN-32s/16s/8s heads on converted classifiers, at odd input sizes."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import fcnify
from fcnify.segment import bilinear_kernel

ODD_SIZES = [(65, 97), (97, 71)]


def _tiny(classes=5):
    """Three stride-2 convolutions (stride 8, cell i centred on pixel 8 i), pool, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    ).eval()


def _interpolate(score_map, size, stride, centre=0.0):
    """Reference: output pixel y reads the map at (y - centre) / stride, linearly, clamped at the ends."""

    def matrix(n, cells):
        u = ((torch.arange(n, dtype=torch.float64) - centre) / stride).clamp(0, cells - 1)
        j0 = u.floor().long()
        j1 = (j0 + 1).clamp(max=cells - 1)
        a = torch.zeros(n, cells, dtype=torch.float64)
        a[torch.arange(n), j0] += 1 - (u - j0)
        a[torch.arange(n), j1] += u - j0
        return a

    ay, ax = matrix(size[0], score_map.shape[2]), matrix(size[1], score_map.shape[3])
    return torch.einsum("hi,nkij,wj->nkhw", ay, score_map.double(), ax).float()


def test_bilinear_kernel_is_a_partition_of_unity():
    for s in (1, 2, 3, 8, 32):
        k = bilinear_kernel(s)
        assert k.shape == (2 * s - 1, 2 * s - 1) and k.max() == 1
        row = k[s - 1]
        padded = torch.cat([row, torch.zeros(1)])  # overlapping copies s apart sum to one
        assert torch.allclose(padded[:s] + padded[s:], torch.ones(s))


@pytest.mark.parametrize(
    "skips, variant, strides", [((), "FCN-8s", [8]), ((4,), "FCN-4s", [8, 4]), ("auto", "FCN-2s", [8, 4, 2])]
)
@pytest.mark.parametrize("upsample", ["bilinear", "transposed"])
def test_tiny_shapes(one_thread, skips, variant, strides, upsample):
    seg = fcnify.segmenter(_tiny(), num_classes=3, input_size=(32, 32), skips=skips, upsample=upsample)
    assert (seg.variant, seg.strides) == (variant, strides)
    for size in [(32, 32), (33, 35), (47, 61), (8, 9)]:
        assert seg(torch.randn(2, 3, *size)).shape == (2, 3, *size)
    learnable = sum(p.numel() for u in seg.upsamplers for p in u.parameters())
    assert (learnable > 0) == (upsample == "transposed")


@pytest.mark.parametrize("upsample", ["bilinear", "transposed"])
def test_keep_classifier_32s_is_the_upsampled_class_map(one_thread, upsample):
    model = _tiny()
    dense = fcnify.convert(model, input_size=(32, 32), mode="dense")
    for skips in [(), "auto"]:  # zero-initialised skips add nothing at first
        seg = fcnify.segmenter(model, input_size=(32, 32), skips=skips, keep_classifier=True, upsample=upsample)
        for size in [(32, 32), (41, 53), (9, 70)]:
            x = torch.randn(2, 3, *size)
            with torch.no_grad():
                expected = _interpolate(dense(x), size, stride=8)
                torch.testing.assert_close(seg(x), expected, atol=1e-5, rtol=1e-5)


def test_fresh_score_layers_are_zero_and_trainable(one_thread):
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg = fcnify.segmenter(model, num_classes=4, input_size=(32, 32), upsample="transposed").train()
    x = torch.randn(2, 3, 40, 40)
    out = seg(x)
    assert out.abs().max() == 0  # every score layer starts at zero, as in the FCN paper
    nn.functional.cross_entropy(out, torch.randint(0, 4, (2, 40, 40))).backward()
    assert all(score.weight.grad.abs().sum() > 0 for score in seg.scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched


def test_named_skips(one_thread):
    model = _tiny()
    auto = fcnify.segmenter(model, num_classes=3, input_size=(32, 32))
    named = fcnify.segmenter(model, num_classes=3, input_size=(32, 32), skips=list(auto.skips))
    assert named.skips == auto.skips and named.strides == auto.strides == [8, 4, 2]


def test_errors(one_thread):
    model = _tiny()
    with pytest.raises(fcnify.FcnifyError, match="num_classes.*Hint"):
        fcnify.segmenter(model, input_size=(32, 32))
    with pytest.raises(fcnify.FcnifyError, match="upsample.*Hint"):
        fcnify.segmenter(model, 3, (32, 32), upsample="nearest")
    with pytest.raises(fcnify.FcnifyError, match="keeps the classifier's 5 classes.*Hint"):
        fcnify.segmenter(model, 3, (32, 32), keep_classifier=True)
    with pytest.raises(fcnify.FcnifyError, match="'nope' is not in the converted graph.*Hint.*stride 4"):
        fcnify.segmenter(model, 3, (32, 32), skips=["nope"])
    with pytest.raises(fcnify.UnsupportedModelError, match="no feature map.*stride 3.*Hint"):
        fcnify.segmenter(model, 3, (32, 32), skips=(3,))


REAL = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "timm/convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_models(one_thread, name):
    model = REAL[name]().eval()
    seg = fcnify.segmenter(model, num_classes=4, input_size=(64, 64), upsample="transposed").eval()
    assert seg.variant == "FCN-8s" and seg.strides == [32, 16, 8]
    with torch.no_grad():
        for size in ODD_SIZES:
            assert seg(torch.randn(1, 3, *size)).shape == (1, 4, *size)


@pytest.mark.slow
def test_resnet18_keep_classifier_reproduces_class_map(one_thread):
    model = torchvision.models.resnet18(num_classes=10).eval()
    seg = fcnify.segmenter(model, input_size=(64, 64), skips=(), keep_classifier=True)
    dense = fcnify.convert(model, input_size=(64, 64), mode="dense")
    x = torch.randn(1, 3, 97, 71)
    with torch.no_grad():
        # torchvision ResNet: odd kernels with half-kernel padding, so cell i is centred on pixel 32 i
        torch.testing.assert_close(seg(x), _interpolate(dense(x), (97, 71), stride=32), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_digits_segmentation_example_runs(one_thread, capsys):
    pytest.importorskip("sklearn")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_segmentation.py"
    spec = importlib.util.spec_from_file_location("digits_segmentation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--size", "63"])
    assert set(results) == {"FCN-32s", "FCN-8s"}
    assert all(0 <= v <= 1 for pair in results.values() for v in pair)
    assert "mean IoU" in capsys.readouterr().out


def test_without_geometry_cells_are_taken_as_centred(one_thread, monkeypatch):
    import importlib

    geometry_module = importlib.import_module("fcnify.geometry")  # fcnify.geometry is the function

    def fail(*args, **kwargs):
        raise fcnify.UnsupportedModelError("geometry does not follow this graph")

    monkeypatch.setattr(geometry_module, "geometry", fail)
    seg = fcnify.segmenter(_tiny(), num_classes=3, input_size=(32, 32))
    assert [u.centre for u in seg.upsamplers] == [(3.0, 3.0), (1.0, 1.0), (0.0, 0.0)]  # (s - 1) / 2, rounded
    assert seg(torch.randn(1, 3, 37, 29)).shape == (1, 3, 37, 29)
