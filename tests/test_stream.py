"""Row streaming (fcnify.inference._stream): band-by-band inference equals whole-image inference, computed once."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcnify
from fcnify.inference._stream import RowStreamer, band_rows_for, stream_bands, stream_predict

pytestmark = pytest.mark.usefixtures("one_thread")


def whole(fcn, x):
    with torch.no_grad():
        return fcn(x)


def assert_exact(got, ref):
    assert got.shape == ref.shape
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


# -- small hand-built networks, each with one thing streaming must get right ------------------------


def vgg_like():
    """VGG11's pattern at small width: 3x3 convolutions and 2x2 pools, a Linear head."""
    layers, c = [], 3
    for width, pool in ((8, True), (16, True), (16, False), (16, True), (16, True)):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if pool else []
        c = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 4 * 4, 5))


class AddCat(nn.Module):
    """A residual add, a channel concatenation of branches with different windows, batch norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 5, padding=2)
        self.c = nn.Conv2d(8, 4, 1)
        self.down = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.short = nn.Conv2d(16, 8, 1, stride=2)  # kernel 1, stride 2: rows no window needs
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        x = torch.cat([torch.relu(self.a(x)) + x, self.b(x), self.c(x)], dim=1)
        return self.head(F.gelu(self.down(x)) * torch.sigmoid(self.short(x)))


class Borders(nn.Module):
    """Everything that happens at the first and last rows: ceil-mode pools, pools that do not count
    padding, reflect padding (F.pad and a convolution's padding_mode), asymmetric F.pad."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True)
        self.b = nn.Conv2d(6, 6, (5, 3), stride=(3, 1), dilation=(2, 1), padding=(3, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

    def forward(self, x):
        x = self.pool(torch.relu(self.a(x)))
        x = F.pad(x, (1, 2, 2, 1), mode="reflect")
        x = self.avg(x)
        x = F.pad(x, (0, 0, 1, 3))
        return self.head(torch.tanh(self.b(x)))


@pytest.fixture(scope="module")
def small_nets():
    torch.manual_seed(1)
    nets = {"vgg_like": (vgg_like(), (64, 64)), "add_cat": (AddCat(), (40, 40)), "borders": (Borders(), (36, 36))}
    out = {}
    for name, (net, size) in nets.items():
        net.eval()
        if name == "add_cat":
            net.bn.running_mean.uniform_(-1, 1)
            net.bn.running_var.uniform_(0.5, 2)
        out[name] = fcnify.convert(net, input_size=size)
    return out


@pytest.mark.parametrize("name", ["vgg_like", "add_cat", "borders"])
@pytest.mark.parametrize("size,band", [((131, 97), 17), ((131, 97), 40), ((200, 73), 7), ((131, 97), 1000)])
def test_small_nets_equal_whole_image(small_nets, name, size, band):
    fcn = small_nets[name]
    x = torch.randn(2, 3, *size)
    assert_exact(stream_predict(fcn, x, band_rows=band), whole(fcn, x))


@pytest.mark.parametrize("name", ["vgg_like", "add_cat", "borders"])
def test_bands_of_any_height_one_row_at_a_time(small_nets, name):
    fcn = small_nets[name]
    x = torch.randn(1, 3, 101, 66)
    streamer = RowStreamer(fcn, (101, 66))
    rows = [streamer.push(x[:, :, y : y + 1]) for y in range(101)]
    assert streamer.done
    assert_exact(torch.cat([r for r in rows if r is not None], dim=2), whole(fcn, x))


@pytest.mark.parametrize("name", ["vgg_like", "add_cat", "borders"])
def test_tiny_image_in_one_band(small_nets, name):
    fcn = small_nets[name]
    size = fcn.conversion_report.input_size[1:]
    x = torch.randn(1, 3, *size)
    assert_exact(stream_predict(fcn, x), whole(fcn, x))


def test_dilation_from_output_stride():
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    fcn = fcnify.convert(net, input_size=(32, 32), output_stride=2)
    assert any(getattr(m, "dilation", (1, 1)) != (1, 1) for m in fcn.modules())
    x = torch.randn(1, 3, 119, 90)
    assert_exact(stream_predict(fcn, x, band_rows=13), whole(fcn, x))


@pytest.fixture(scope="module")
def resnet18():
    import torchvision

    from fcnify.models import calibrate_batchnorm

    torch.manual_seed(0)
    return fcnify.convert(calibrate_batchnorm(torchvision.models.resnet18(), (224, 224)), input_size=(224, 224))


@pytest.mark.slow
@pytest.mark.parametrize("size,band", [((291, 260), 64), ((291, 260), 37), ((224, 224), None)])
def test_resnet18_equals_whole_image(resnet18, size, band):
    x = torch.randn(1, 3, *size)
    assert_exact(stream_predict(resnet18, x, band_rows=band), whole(resnet18, x))


@pytest.mark.slow
def test_resnet18_dilated():
    import torchvision

    from fcnify.models import calibrate_batchnorm

    torch.manual_seed(0)
    net = calibrate_batchnorm(torchvision.models.resnet18(), (224, 224))
    fcn = fcnify.convert(net, input_size=(224, 224), output_stride=8)
    x = torch.randn(1, 3, 250, 230)
    assert_exact(stream_predict(fcn, x, band_rows=48), whole(fcn, x))


# -- inputs: numpy, a lazy reader, a Zarr array as the output ----------------------------------------


def test_numpy_uint8_and_reader_match_the_tensor(small_nets):
    fcn = small_nets["add_cat"]
    image = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ref = whole(fcn, x)
    assert_exact(stream_predict(fcn, image, band_rows=21), ref)
    reads = []

    def read(y0, x0, h, w):
        reads.append((y0, x0, h, w))
        return image[y0 : y0 + h, x0 : x0 + w].astype(np.float32) / 255

    assert_exact(stream_predict(fcn, read, band_rows=21, size=(90, 70)), ref)
    assert reads[0] == (0, 0, 21, 70) and len(reads) == 5  # full-width bands, each row read once
    assert sum(r[2] for r in reads) == 90


def test_bands_written_to_zarr_equal_the_whole_map(small_nets, tmp_path):
    zarr = pytest.importorskip("zarr")
    fcn = small_nets["vgg_like"]
    x = torch.randn(1, 3, 150, 120)
    ref = whole(fcn, x)[0]
    store = zarr.create_array(
        str(tmp_path / "scores.zarr"), shape=tuple(ref.shape), chunks=(5, 4, ref.shape[2]), dtype="f4"
    )
    firsts = []
    for i0, band in stream_bands(fcn, x, band_rows=32):
        firsts.append(i0)
        store[:, i0 : i0 + band.shape[2]] = band[0].numpy()
    assert len(firsts) > 2 and firsts == sorted(firsts)
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "scores.zarr"))[:], ref.numpy(), rtol=1e-5, atol=1e-5)


# -- memory ------------------------------------------------------------------------------------------


def test_band_rows_grow_with_the_budget(small_nets):
    fcn = small_nets["add_cat"]
    rows = [band_rows_for(fcn, (100000, 4000), m) for m in ("4MB", "32MB", "256MB", 2**31)]
    assert rows == sorted(rows) and rows[0] < rows[-1]
    stride = fcnify.geometry(fcn).stride[0]
    assert all(r % stride == 0 for r in rows)
    assert band_rows_for(fcn, (100, 100), "1GB") <= 100 + stride  # never more than the image
    with pytest.raises(fcnify.FcnifyError, match="memory"):
        band_rows_for(fcn, (100, 100), "lots")


def test_streamer_keeps_only_a_few_rows(small_nets):
    fcn = small_nets["vgg_like"]
    streamer = RowStreamer(fcn, (4032, 64))
    x = torch.randn(1, 3, 64, 64)
    for _ in range(4032 // 64):
        streamer.push(x)
    kept = [b.shape[2] for b in streamer._buffers if b is not None]
    assert streamer.done and max(kept, default=0) <= 6  # a few rows per layer


# -- refusals ----------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        x = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(x * gate)


def test_squeeze_excitation_is_refused_by_name():
    fcn = fcnify.convert(SqueezeExcite().eval(), input_size=(32, 32))
    with pytest.raises(fcnify.UnsupportedModelError, match=r"node .mean.*whole feature map.*Hint: run the whole image"):
        stream_predict(fcn, torch.randn(1, 3, 64, 64))


@pytest.mark.slow
def test_timm_efficientnet_is_refused():
    timm = pytest.importorskip("timm")
    fcn = fcnify.convert(timm.create_model("efficientnet_b0").eval(), input_size=(224, 224))
    with pytest.raises(fcnify.UnsupportedModelError, match=r"node '.*se.*whole feature map.*Hint:"):
        RowStreamer(fcn, (512, 512))


def test_group_norm_is_caught_by_the_probe():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    ).eval()
    fcn = fcnify.convert(net, input_size=(32, 32))
    with pytest.raises(fcnify.UnsupportedModelError, match=r"GroupNorm.*not row-local.*Hint:"):
        stream_predict(fcn, torch.randn(1, 3, 64, 64))


def test_bad_bands_are_refused(small_nets):
    fcn = small_nets["vgg_like"]
    streamer = RowStreamer(fcn, (100, 64))
    with pytest.raises(fcnify.FcnifyError, match="full-width"):
        streamer.push(torch.randn(1, 3, 10, 63))
    streamer.push(torch.randn(1, 3, 90, 64))
    with pytest.raises(fcnify.FcnifyError, match="past the image"):
        streamer.push(torch.randn(1, 3, 11, 64))
    with pytest.raises(fcnify.FcnifyError, match="too small"):
        RowStreamer(fcn, (20, 64))
    with pytest.raises(fcnify.FcnifyError, match="size="):
        stream_predict(fcn, lambda y0, x0, h, w: np.zeros((h, w, 3), np.float32))


def test_the_model_keeps_its_training_flag(small_nets):
    fcn = small_nets["add_cat"]
    fcn.train()
    try:
        x = torch.randn(1, 3, 80, 80)
        out = stream_predict(fcn, x, band_rows=24)
        assert fcn.training
        fcn.eval()
        assert_exact(out, whole(fcn, x))
    finally:
        fcn.eval()
