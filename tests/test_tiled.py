"""fcnify.predict_tiled: tile-by-tile inference equals whole-image inference."""

import numpy as np
import pytest
import torch
from torch import nn

import fcnify
from fcnify.tiled import plan_tiles


pytestmark = pytest.mark.usefixtures("one_thread")


class Padded(nn.Module):
    """Zero padding at every layer, a strided residual merge, dilation and a window head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.short = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.tanh(self.b(torch.relu(self.a(x)))) + self.short(x)
        return self.head(x)


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(3)
    return fcnify.convert(Padded().eval(), input_size=(32, 32))


def whole(fcn, x):
    with torch.no_grad():
        return fcn(x)


@pytest.mark.parametrize(
    "size,tile,batch", [((150, 173), (80, 96), 1), ((201, 130), (77, 130), 3), ((64, 64), (200, 200), 1)]
)
def test_equals_whole_image(fcn, size, tile, batch):
    x = torch.randn(1, 3, *size)
    tiled = fcnify.predict_tiled(fcn, x, tile=tile, batch_size=batch, progress=False)
    ref = whole(fcn, x)
    assert tiled.shape == ref.shape
    torch.testing.assert_close(tiled, ref, rtol=1e-5, atol=1e-5)


def test_tiles_overlap_and_cover_every_cell_once(fcn):
    geo = fcnify.geometry(fcn)
    tiles, (h, w) = plan_tiles(geo, (150, 173), (80, 96))
    assert len(tiles) > 4
    seen = np.zeros((h, w), int)
    for t in tiles:
        assert t.y0 % geo.stride[0] == 0 and t.x0 % geo.stride[1] == 0  # aligned to the stride
        assert t.y1 - t.y0 <= 80 and t.x1 - t.x0 <= 96
        seen[t.i0 : t.i1, t.j0 : t.j1] += 1
    assert (seen == 1).all()


def test_naive_tiling_would_show_seams(fcn):
    """Control: stitching non-overlapping tiles differs, so the equality above means something."""
    x = torch.randn(1, 3, 128, 128)
    ref = whole(fcn, x)
    left = whole(fcn, x[:, :, :, :64])
    assert (left - ref[:, :, :, : left.shape[3]]).abs().max() > 1e-3


def test_numpy_memmap_png_and_preprocess(fcn, tmp_path):
    from PIL import Image

    rgb = (np.random.default_rng(0).random((97, 113, 3)) * 255).astype(np.uint8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
    ref = whole(fcn, x[None])
    norm = lambda t: (t - mean) / std  # noqa: E731
    np.save(tmp_path / "img.npy", rgb)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    for image in (rgb, np.load(tmp_path / "img.npy", mmap_mode="r"), str(tmp_path / "img.npy"), tmp_path / "img.png"):
        out = fcnify.predict_tiled(fcn, image, tile=(80, 88), preprocess=norm, progress=False)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_progress_bar_counts_tiles(fcn, capsys):
    fcnify.predict_tiled(fcn, torch.randn(3, 130, 100), tile=(80, 100), progress=True)
    assert "tile" in capsys.readouterr().err


def test_global_context_is_refused():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            x = x * torch.sigmoid(x.mean((2, 3), keepdim=True))
            return self.fc(x.mean((2, 3)))

    fcn = fcnify.convert(SE().eval(), input_size=(16, 16))
    assert fcnify.geometry(fcn).global_context
    with pytest.raises(fcnify.UnsupportedModelError, match="squeeze-and-excitation"):
        fcnify.predict_tiled(fcn, torch.randn(1, 3, 64, 64), tile=(32, 32), progress=False)


def test_errors(fcn, tmp_path):
    geo = fcnify.geometry(fcn)
    need = geo.receptive_field[0] + geo.stride[0] - 1
    with pytest.raises(fcnify.FcnifyError, match=f"at least {need}"):
        fcnify.predict_tiled(fcn, torch.randn(1, 3, 200, 200), tile=(40, 200), progress=False)
    with pytest.raises(fcnify.FcnifyError, match="too small"):
        fcnify.predict_tiled(fcn, torch.randn(1, 3, 10, 10), tile=(100, 100), progress=False)
    with pytest.raises(fcnify.FcnifyError, match="not found"):
        fcnify.predict_tiled(fcn, str(tmp_path / "missing.png"), progress=False)
    with pytest.raises(fcnify.FcnifyError, match="Hint"):
        fcnify.predict_tiled(fcn, [1, 2, 3], progress=False)


@pytest.mark.slow
def test_resnet18_tiled_equals_whole():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    fcn = fcnify.convert(model, input_size=(224, 224), mode="dense")  # receptive field 435
    x = torch.randn(1, 3, 600, 480)
    tiled = fcnify.predict_tiled(fcn, x, tile=(480, 480), progress=False)  # 2 x 1 tiles
    ref = whole(fcn, x)
    assert tiled.shape == ref.shape == (1, 10, 19, 15)
    torch.testing.assert_close(tiled, ref, rtol=1e-4, atol=1e-4)


def test_finer_output_stride_tiles_exactly():
    torch.manual_seed(6)
    fine = fcnify.convert(Padded().eval(), input_size=(32, 32), output_stride=2)
    geo = fcnify.geometry(fine)
    assert geo.stride == (2, 2)
    x = torch.randn(1, 3, 150, 140)
    tiled = fcnify.predict_tiled(fine, x, tile=(96, 100), progress=False)
    torch.testing.assert_close(tiled, whole(fine, x), rtol=1e-5, atol=1e-5)
