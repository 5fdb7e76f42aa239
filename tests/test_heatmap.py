"""fcnify.heatmap and ``fcnify heatmap``: class maps aligned to image pixels, and the picture."""

import numpy as np
import pytest
import torch
from torch import nn

import fcnify
from fcnify.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(classes=4):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, classes),
    ).eval()


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(4)
    return fcnify.convert(small_net(), input_size=(32, 32))


def test_maps_are_probabilities_placed_at_cell_centres(fcn):
    image = torch.rand(3, 75, 90)
    result = fcnify.heatmap(fcn, image, classes=None, top=4, normalize=False)
    geo = result.geometry
    assert geo.stride == (4, 4) and geo.receptive_field == (38, 38)  # 3x3 padded convs, 8x8 head
    assert geo.center(0, 0) == (15.5, 15.5) and geo.center(1, 2) == (19.5, 23.5)
    with torch.no_grad():
        probs = fcn(image[None])[0].softmax(0)
    assert result.cells.shape == probs.shape  # all 4 classes
    torch.testing.assert_close(result.cells.sum(0), torch.ones(probs.shape[1:]))
    maps = result.maps
    assert maps.shape == (4, 75, 90)
    torch.testing.assert_close(maps.sum(0), torch.ones(75, 90))  # bilinear weights sum to one
    k = result.classes.index(2)
    p = probs[2]
    # pixel (17, 21) lies 3/8 of the way from centre (15.5, 19.5) of cell (0, 1) to (19.5, 23.5) of cell (1, 2)
    expected = (5 / 8) * ((5 / 8) * p[0, 1] + (3 / 8) * p[0, 2]) + (3 / 8) * ((5 / 8) * p[1, 1] + (3 / 8) * p[1, 2])
    torch.testing.assert_close(maps[k, 17, 21], expected)
    torch.testing.assert_close(maps[k, 0, 0], p[0, 0])  # before the first centre: clamped
    torch.testing.assert_close(maps[k, -1, -1], p[-1, -1])
    # the top classes come first, ranked by their peak
    peaks = [float(result.cells[k].max()) for k in range(4)]
    assert peaks == sorted(peaks, reverse=True)


def test_alignment_follows_the_geometry():
    """A network that fires exactly on a bright square: the map peaks over the square."""
    conv = nn.Conv2d(1, 2, 9, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1] = 1.0
    net = nn.Sequential(conv, nn.MaxPool2d(4), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).eval()
    with torch.no_grad():
        net[3].weight.zero_()
        net[3].weight.view(2, 2, 4, 4)[1, 1, 1:3, 1:3] = 1.0  # class 1 looks at the window's centre
        net[3].bias.zero_()
    fcn = fcnify.convert(net, input_size=(24, 24))
    image = torch.zeros(1, 100, 120)
    image[0, 60:66, 30:36] = 1.0
    result = fcnify.heatmap(fcn, image, classes=[1], softmax=False, normalize=False)
    y, x = np.unravel_index(int(result.maps[0].argmax()), (100, 120))
    assert abs(y - 62.5) <= 4 and abs(x - 32.5) <= 4


def test_normalization_sources():
    import timm
    import torchvision

    from fcnify.inference import resolve_normalization

    assert resolve_normalization(((0.5,), (0.25,))) == ((0.5,), (0.25,))
    assert resolve_normalization(False) is None
    cfg = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    assert resolve_normalization(cfg) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    assert resolve_normalization(weights) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(fcnify.FcnifyError, match="Hint"):
        resolve_normalization("imagenet")


def test_converted_timm_model_carries_its_normalization():
    import timm

    from fcnify.inference import resolve_normalization

    model = timm.create_model("lcnet_050", pretrained=False).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    fcn = fcnify.convert(model, verify=False)
    assert resolve_normalization(None, fcn) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    fcn.pretrained_cfg["mean"] = (0.0, 0.0, 0.0)  # a copy: the user's model is left as it was
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_normalize_and_uint8_inputs_agree(fcn):
    from PIL import Image

    rgb = (np.random.default_rng(1).random((64, 70, 3)) * 255).astype(np.uint8)
    a = fcnify.heatmap(fcn, rgb, classes=[0, 1])
    b = fcnify.heatmap(fcn, Image.fromarray(rgb), classes=["class 0", "1"])
    c = fcnify.heatmap(fcn, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, classes=[0, 1])
    torch.testing.assert_close(a.cells, b.cells)
    torch.testing.assert_close(a.cells, c.cells)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(a.cells, fcn(x[None])[0].softmax(0)[[0, 1]])


def test_tiled_path_gives_the_same_maps(fcn):
    image = torch.rand(3, 120, 130)
    whole = fcnify.heatmap(fcn, image, classes=[3])
    tiled = fcnify.heatmap(fcn, image, classes=[3], tile=(48, 56))
    torch.testing.assert_close(tiled.cells, whole.cells, rtol=1e-5, atol=1e-6)


def test_errors(fcn):
    with pytest.raises(fcnify.FcnifyError, match="at least 32x32"):
        fcnify.heatmap(fcn, torch.rand(3, 20, 40))
    with pytest.raises(fcnify.FcnifyError, match="class 9 does not exist"):
        fcnify.heatmap(fcn, torch.rand(3, 40, 40), classes=[9])
    with pytest.raises(fcnify.FcnifyError, match="unknown class name"):
        fcnify.heatmap(fcn, torch.rand(3, 40, 40), classes=["zebra"])


def test_render_writes_a_picture(fcn, tmp_path):
    from PIL import Image

    result = fcnify.heatmap(fcn, torch.rand(3, 60, 80), classes=[0, 2])
    path = fcnify.render_heatmap(result, str(tmp_path / "out.png"))
    with Image.open(path) as img:
        assert img.width > img.height > 200  # two panels side by side


@pytest.mark.slow
def test_cli_imagenet_names_and_picture(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(2).random((256, 320, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "overlay.png"
    code = main(["heatmap", "resnet18", str(image), "--class", "tabby", "--class", "3", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "281 tabby" in printed and "3 tiger shark" in printed and f"wrote {out}" in printed
    with Image.open(out) as img:
        assert img.width > img.height


def test_cli_model_file_and_errors(tmp_path, capsys):
    from PIL import Image

    torch.save(small_net(3), tmp_path / "net.pt")
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(3).random((50, 60, 3)) * 255).astype(np.uint8)).save(image)
    code = main(
        [
            "heatmap",
            str(tmp_path / "net.pt"),
            "--trust-pickle",
            str(image),
            "--input-size",
            "32",
            "--top",
            "2",
            "-o",
            str(tmp_path / "o.png"),
        ]
    )
    assert code == 0 and (tmp_path / "o.png").exists()
    assert "5x8 cells of stride 4 over a 50x60 image" in capsys.readouterr().out
    code = main(
        ["heatmap", str(tmp_path / "net.pt"), "--trust-pickle", str(image), "--input-size", "32", "--class", "7"]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert main(["heatmap", str(tmp_path / "net.pt"), "--trust-pickle", str(tmp_path / "missing.png")]) == 1
    assert "image file not found" in capsys.readouterr().err
