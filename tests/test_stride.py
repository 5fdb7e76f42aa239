"""convert(..., output_stride=s): finer maps by removing strides and dilating what follows.

Without padding the result must equal shift-and-stitch: the original classifier applied to
every training-size crop at stride s. With padding (torchvision models) every native cell is
unchanged and the interior equals the native FCN on shifted crops.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcnify
from fcnify._stride import dilated_avg_pool2d


pytestmark = pytest.mark.usefixtures("one_thread")


def padding_free(head: str = "flatten"):
    """Stride 8: max pool, average pool (no dilation argument) and a strided convolution."""
    layers = [
        nn.Conv2d(3, 6, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.Tanh(),
    ]
    if head == "flatten":  # 30 -> 28 -> 14 -> 12 -> 6 -> 2: Linear over 8x2x2
        layers += [nn.Flatten(), nn.Linear(8 * 2 * 2, 5)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)]
    return nn.Sequential(*layers).eval()


def shift_and_stitch(model, x, size, s):
    """The classifier on every ``size`` crop at stride ``s``: (K, rows, cols)."""
    rows = (x.shape[2] - size) // s + 1
    cols = (x.shape[3] - size) // s + 1
    crops = [x[:, :, i * s : i * s + size, j * s : j * s + size] for i in range(rows) for j in range(cols)]
    with torch.no_grad():
        logits = model(torch.cat(crops))
    return logits.t().reshape(-1, rows, cols)


@pytest.mark.parametrize("head", ["flatten", "pool"])
@pytest.mark.parametrize("s", [1, 2])
def test_padding_free_equals_shift_and_stitch(head, s):
    model = padding_free(head)
    fcn = fcnify.convert(model, input_size=(30, 30), output_stride=s)
    x = torch.randn(1, 3, 30 + 11, 30 + 14)
    with torch.no_grad():
        out = fcn(x)[0]
    ref = shift_and_stitch(model, x, 30, s)
    assert out.shape[1:] >= ref.shape[1:]
    torch.testing.assert_close(out[:, : ref.shape[1], : ref.shape[2]], ref, rtol=1e-5, atol=1e-5)
    assert fcn.conversion_report.output_stride == s
    geo = fcnify.geometry(fcn)
    assert geo.stride == (s, s) and geo.receptive_field == (26, 26) and geo.center(1, 1) == (12.5 + s, 12.5 + s)
    assert any("avg pool" in c for c in fcn.conversion_report.stride_changes)


def test_every_native_cell_is_kept_and_report_lists_changes():
    model = padding_free()
    native = fcnify.convert(model, input_size=(30, 30))
    fine = fcnify.convert(model, input_size=(30, 30), output_stride=2)
    x = torch.randn(2, 3, 61, 47)
    with torch.no_grad():
        torch.testing.assert_close(fine(x)[:, :, ::4, ::4][:, :, : native(x).shape[2], : native(x).shape[3]], native(x))
    text = str(fine.conversion_report)
    assert "output stride 2" in text and "dilation" in text


class Pools(nn.Module):
    """Pools with padding, ceil_mode, count_include_pad=False, divisor_override, and an SE gate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.max = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Sigmoid())
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.avg(self.max(torch.relu(self.conv(x))))
        x = x * self.gate(x)
        x = F.avg_pool2d(self.conv2(x), 2, divisor_override=3)
        return self.head(x)


@pytest.mark.parametrize("s", [1, 2, 4])
def test_native_cells_with_awkward_pools(s):
    model = Pools().eval()
    native = fcnify.convert(model, input_size=(33, 33), mode="dense")
    fine = fcnify.convert(model, input_size=(33, 33), mode="dense", output_stride=s)
    f = 8 // s
    for size in [(33, 33), (45, 52), (50, 41)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref, out = native(x), fine(x)
        torch.testing.assert_close(out[:, :, ::f, ::f][:, :, : ref.shape[2], : ref.shape[3]], ref, rtol=1e-5, atol=1e-5)
        assert fcnify.geometry(fine, input_size=size).output_size(*size) == tuple(out.shape[2:])


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_dilated_avg_pool_matches_avg_pool2d(ceil_mode, include):
    x = torch.randn(2, 3, 11, 14)
    for divisor in (None, 5):
        ref = F.avg_pool2d(x, 3, 2, 1, ceil_mode, include, divisor)
        extra = (1, 1) if ceil_mode else (0, 0)
        out = dilated_avg_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1), extra, include, divisor)
        torch.testing.assert_close(out[:, :, : ref.shape[2], : ref.shape[3]], ref)
    # dilation 2 == the average of every other pixel
    out = dilated_avg_pool2d(x, (2, 2), (1, 1), (0, 0), (2, 2))
    torch.testing.assert_close(out, (x[:, :, :-2, :-2] + x[:, :, 2:, :-2] + x[:, :, :-2, 2:] + x[:, :, 2:, 2:]) / 4)


@pytest.mark.slow
def test_resnet18_interior_equals_shift_and_stitch():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    native = fcnify.convert(model, input_size=(224, 224), mode="dense")
    fine = fcnify.convert(model, input_size=(224, 224), mode="dense", output_stride=16)
    geo = fcnify.geometry(native, input_size=(480, 480))
    x = torch.randn(1, 3, 480, 480)
    with torch.no_grad():
        out = fine(x)
        assert out.shape[2:] == (30, 30)
        torch.testing.assert_close(out[:, :, ::2, ::2], native(x), rtol=1e-4, atol=1e-4)
        checked = 0
        for a, b in [(1, 1), (0, 1)]:
            if True:
                shifted = native(x[:, :, a * 16 :, b * 16 :])  # the classifier's windows moved by (a, b) * 16
                for i in range(shifted.shape[2]):
                    for j in range(shifted.shape[3]):
                        top, left, bottom, right = geo.box(i, j)
                        if top >= 0 and left >= 0 and bottom <= 480 - a * 16 and right <= 480 - b * 16:
                            torch.testing.assert_close(
                                out[0, :, a + 2 * i, b + 2 * j], shifted[0, :, i, j], rtol=1e-4, atol=1e-4
                            )
                            checked += 1
    assert checked == 3  # the cells whose window lies inside both images


def test_errors():
    model = padding_free()
    with pytest.raises(
        fcnify.FcnifyError, match=r"does not divide the network's stride 8x8.*Hint: use one of 1, 2, 4, 8"
    ):
        fcnify.convert(model, input_size=(30, 30), output_stride=3)
    with pytest.raises(fcnify.FcnifyError, match="global mode"):
        fcnify.convert(model, input_size=(30, 30), mode="global", output_stride=2)
    with pytest.raises(fcnify.FcnifyError, match="positive integer"):
        fcnify.convert(model, input_size=(30, 30), output_stride=0)
