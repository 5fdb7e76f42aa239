"""``fcnify predict`` on the command line: a store on disk, and one line with a hint for every user mistake."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fcnify
from fcnify.cli import main

zarr = pytest.importorskip("zarr")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A torch.save-d LeNet-like classifier (32x32 inputs) and two .npy images."""
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 5 * 5, 4),
    ).eval()
    torch.save(net, folder / "net.pt")
    pixels = skimage_data.astronaut()[:300, :400]
    np.save(folder / "a.npy", pixels)
    np.save(folder / "b.npy", pixels[:, ::-1])
    return folder, net, pixels


def test_predict_writes_the_store(files, tmp_path, capsys):
    folder, net, pixels = files
    out = tmp_path / "a.zarr"
    code = main(
        [
            "predict",
            str(folder / "net.pt"),
            "--trust-pickle",
            str(folder / "a.npy"),
            "-o",
            str(out),
            "--input-size",
            "32",
            "--tile",
            "120",
            "--no-normalize",
            "--classes",
            "0,3",
            "--quiet",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "tiles of" in captured.err
    fcn = fcnify.convert(net, input_size=(32, 32))
    with torch.no_grad():
        ref = fcn(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)[0, [0, 3]].numpy()
    np.testing.assert_allclose(zarr.open_group(out, mode="r")["scores"][:], ref, rtol=1e-4, atol=1e-5)
    # finishing a complete store computes nothing and changes nothing
    before = zarr.open_group(out, mode="r")["scores"][:].tobytes()
    assert (
        main(
            [
                "predict",
                str(folder / "net.pt"),
                "--trust-pickle",
                "--trust-pickle",
                str(folder / "a.npy"),
                "-o",
                str(out),
                "--input-size",
                "32",
                "--tile",
                "120",
                "--no-normalize",
                "--classes",
                "0,3",
                "--quiet",
                "--resume",
            ]
        )
        == 0
    )
    assert "0 tiles computed" in capsys.readouterr().err
    assert zarr.open_group(out, mode="r")["scores"][:].tobytes() == before


def test_glob_writes_one_store_per_image(files, tmp_path, capsys):
    folder, _, _ = files
    code = main(
        [
            "predict",
            str(folder / "net.pt"),
            "--trust-pickle",
            str(folder / "*.npy"),
            "-o",
            str(tmp_path / "maps"),
            "--input-size",
            "32",
            "--memory",
            "1GB",
            "--quiet",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a.zarr", "b.zarr"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["IMAGE=missing.tif"], "image file not found"),
        (["IMAGE=broken.tif"], "cannot read"),
        (["IMAGE=*.nothing"], "no file matches"),
        (["--level", "4"], "no level 4"),
        (["--memory", "two gigs"], "not an amount of memory"),
        (["--mask", "nomask.png"], "mask file not found"),
        (["--mpp", "0.5"], "records no microns per pixel"),
        (["OUT=exists"], "already exists"),
        (["--tile", "16"], "holds no cell"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(files, tmp_path, capsys, extra, message):
    folder, _, _ = files
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 32)
    (tmp_path / "exists").mkdir()
    image, out, flags = str(folder / "a.npy"), str(tmp_path / "out.zarr"), []
    for item in extra:
        if item.startswith("IMAGE="):
            image = str(tmp_path / item[6:])
        elif item.startswith("OUT="):
            out = str(tmp_path / item[4:])
        else:
            flags.append(item)
    code = main(
        ["predict", str(folder / "net.pt"), "--trust-pickle", image, "-o", out, "--input-size", "32", "--quiet", *flags]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Hint:" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("fcnify: error")]) == 1
