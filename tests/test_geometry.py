"""fcnify.geometry: analytic stride / receptive field / cell boxes, checked against measurements.

Empirical checks: the gradient of one output cell with respect to the input (its support is
the window, for smooth padding-free nets), and perturbation (changing every pixel outside a
cell's box leaves the cell unchanged; changing the box's outermost rows and columns changes it).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcnify


pytestmark = pytest.mark.usefixtures("one_thread")


def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    ).eval()


class Residual(nn.Module):
    """Padding, stride, dilation and a strided 1x1 shortcut that merges with a 3x3 branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.a = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.short = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.tanh(self.b(torch.tanh(self.a(x)))) + self.short(x)
        return self.head(x)


def tf_same_net():
    from timm.layers import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    return nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2),
        nn.Tanh(),
        MaxPool2dSame(3, stride=2),
        Conv2dSame(8, 8, 5, stride=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


@pytest.fixture(scope="module")
def lenet_fcn():
    return fcnify.convert(lenet(), input_size=(32, 32))


@pytest.fixture(scope="module")
def residual_fcn():
    torch.manual_seed(1)
    return fcnify.convert(Residual().eval(), input_size=(64, 64), mode="dense")


@pytest.fixture(scope="module")
def tf_same_fcn():
    torch.manual_seed(2)
    return fcnify.convert(tf_same_net(), input_size=(64, 64), mode="dense")


def clipped(box, size):
    top, left, bottom, right = box
    return max(top, 0), max(left, 0), min(bottom, size[0]), min(right, size[1])


def gradient_support(fcn, x, i, j):
    x = x.clone().requires_grad_(True)
    fcn(x)[0, :, i, j].sum().backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero()
    cols = x.grad.abs().sum(dim=(0, 1, 2)).nonzero()
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


def assert_box_is_exact(fcn, geo, x, i, j):
    """Outside the box nothing matters; each outermost row and column inside the image does."""
    top, left, bottom, right = clipped(geo.box(i, j), x.shape[2:])
    with torch.no_grad():
        ref = fcn(x)[0, :, i, j]
        outside = torch.randn_like(x) * 10
        outside[:, :, top:bottom, left:right] = x[:, :, top:bottom, left:right]
        torch.testing.assert_close(fcn(outside)[0, :, i, j], ref, rtol=1e-5, atol=1e-5)
        for edge in (
            (slice(top, top + 1), slice(left, right)),
            (slice(bottom - 1, bottom), slice(left, right)),
            (slice(top, bottom), slice(left, left + 1)),
            (slice(top, bottom), slice(right - 1, right)),
        ):
            changed = x.clone()
            changed[:, :, edge[0], edge[1]] += 100.0
            assert (fcn(changed)[0, :, i, j] - ref).abs().max() > 1e-4, f"cell ({i}, {j}) ignores {edge}"


def test_lenet_numbers_from_the_issue(lenet_fcn):
    fcn = lenet_fcn
    geo = fcnify.geometry(fcn)
    assert geo.stride == (4, 4)
    assert geo.receptive_field == (32, 32)
    assert geo.center(0, 0) == (15.5, 15.5)
    assert geo.center(2, 3) == (15.5 + 8, 15.5 + 12)
    assert geo.box(1, 2) == (4, 8, 36, 40)
    assert geo.min_input_size == (32, 32)
    assert geo.padding == (0, 0)


def test_lenet_gradient_support_is_the_box(lenet_fcn):
    fcn = lenet_fcn
    geo = fcnify.geometry(fcn)
    x = torch.randn(1, 1, 52, 60)
    assert tuple(fcn(x).shape[2:]) == geo.output_size(52, 60) == (6, 8)
    for i, j in [(0, 0), (3, 5), (5, 7)]:
        assert gradient_support(fcn, x, i, j) == geo.box(i, j)


@pytest.mark.parametrize("size", [(64, 64), (75, 90), (96, 81)])
def test_padding_stride_dilation_and_branches(size, residual_fcn):
    fcn = residual_fcn
    geo = fcnify.geometry(fcn, input_size=size)
    # stem 7/2 -> pool 3/2 -> (3/2, then 3 dilated 2) | 1x1/2
    assert geo.stride == (8, 8)
    assert geo.receptive_field == (7 + 2 * 2 + 2 * 4 + 4 * 8,) * 2
    assert geo.center(0, 0) == (0.0, 0.0)  # symmetric padding centres cell 0 on pixel 0
    x = torch.randn(1, 3, *size)
    assert tuple(fcn(x).shape[2:]) == geo.output_size(*size) == geo.map_size
    h, w = geo.map_size
    for i, j in [(h // 2, w // 2), (h - 1, 0)]:
        assert_box_is_exact(fcn, geo, x, i, j)


@pytest.mark.parametrize("size", [(64, 64), (67, 70), (71, 66)])
def test_tf_same_padding_depends_on_the_input_size(size, tf_same_fcn):
    fcn = tf_same_fcn
    geo = fcnify.geometry(fcn, input_size=size)
    x = torch.randn(1, 3, *size)
    assert tuple(fcn(x).shape[2:]) == geo.map_size
    for n in range(20, 90, 7):
        assert geo.output_size(n, n + 3) == tuple(fcn(torch.randn(1, 3, n, n + 3)).shape[2:])
    h, w = geo.map_size
    assert_box_is_exact(fcn, geo, x, h // 2, w // 2)
    assert_box_is_exact(fcn, geo, x, h - 1, w - 1)


def test_tf_same_offset_changes_with_parity(tf_same_fcn):
    fcn = tf_same_fcn
    assert fcnify.geometry(fcn, input_size=(64, 64)).offset != fcnify.geometry(fcn, input_size=(65, 65)).offset


@pytest.mark.slow
def test_resnet18_boxes_match_perturbation():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    fcn = fcnify.convert(model, input_size=(224, 224), mode="dense")
    geo = fcnify.geometry(fcn, input_size=(480, 512))
    assert geo.stride == (32, 32)
    assert geo.receptive_field == (435, 435)
    assert geo.center(0, 0) == (0.0, 0.0)
    x = torch.randn(1, 3, 480, 512)
    assert tuple(fcn(x).shape[2:]) == geo.map_size == (15, 16)
    assert_box_is_exact(fcn, geo, x, 14, 15)
    window = fcnify.geometry(fcnify.convert(model, input_size=(224, 224)))
    assert window.receptive_field == (435 + 6 * 32,) * 2


def test_valid_sizes_of_four_stride_2_kernel_5_layers():
    net = nn.Sequential(*[nn.Conv2d(1, 1, 5, stride=2) for _ in range(4)])
    valid = fcnify.valid_sizes(net, input_size=(64, 64))
    assert valid.minimum == (61, 61) and valid.step == (16, 16)
    assert valid.next(62, 61) == (77, 61)
    assert (93, 77) in valid and (94, 77) not in valid
    # empirically: at a valid size the last row matters, one more row is dropped
    for n, used in [(77, True), (78, False)]:
        x = torch.randn(1, 1, n, 61)
        y = x.clone()
        y[:, :, -1] += 1.0
        with torch.no_grad():
            assert bool((net(x) != net(y)).any()) is used


def test_too_small_input_names_the_minimum(lenet_fcn):
    geo = fcnify.geometry(lenet_fcn)
    assert geo.output_size(32, 33) == (1, 1)
    with pytest.raises(fcnify.FcnifyError, match="at least 32x32"):
        geo.output_size(31, 40)


def test_resizing_layers_are_refused_with_the_node():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.interpolate(self.conv(x), scale_factor=2.0)

    with pytest.raises(fcnify.UnsupportedModelError, match="interpolate"):
        fcnify.geometry(Up(), input_size=(16, 16))


def test_predict_padded_lets_every_pixel_count():
    torch.manual_seed(5)
    net = nn.Sequential(*[nn.Conv2d(1, 1, 5, stride=2) for _ in range(4)]).eval()
    x = torch.randn(1, 1, 70, 64)
    y = x.clone()
    y[:, :, -1] += 1.0
    with torch.no_grad():
        assert torch.equal(net(x), net(y))  # plain: the last rows are dropped
    a = fcnify.predict_padded(net, x, input_size=(61, 61))
    b = fcnify.predict_padded(net, y, input_size=(61, 61))
    assert a.shape == (1, 1, 2, 2) and not torch.equal(a, b)
    with torch.no_grad():  # cells are the network's on the zero-padded 77x77 input
        torch.testing.assert_close(a, net(F.pad(x, (0, 13, 0, 7)))[:, :, :2, :2])
    with pytest.raises(fcnify.FcnifyError, match="minimum 61x61"):
        fcnify.predict_padded(net, torch.randn(1, 1, 60, 80), input_size=(61, 61))


def test_valid_sizes_of_an_unconverted_classifier():
    import torchvision

    model = torchvision.models.resnet18(num_classes=2).eval()
    valid = fcnify.valid_sizes(model, input_size=(224, 224))
    assert valid == fcnify.ValidSizes((1, 1), (1, 1))  # its padding reaches every border pixel
    padding_free = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, stride=2))
    assert fcnify.valid_sizes(padding_free, input_size=(32, 32)) == fcnify.ValidSizes((8, 8), (4, 4))
    geo = fcnify.geometry(model, input_size=(224, 224))  # its last feature map
    assert geo.stride == (32, 32) and geo.receptive_field == (435, 435) and geo.map_size == (7, 7)
