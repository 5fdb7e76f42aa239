"""fcnify.predict: exact tiles into a Zarr store, masks, resume after SIGKILL, Dask workers, many images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import fcnify

zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread beats two busy cores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_net(seed: int = 0) -> torch.nn.Module:
    """A LeNet-like classifier for 32x32 inputs, converted: stride 4, receptive field 32."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 7 * 7, 5),
    )
    return fcnify.convert(net, input_size=(32, 32))


def whole(fcn: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return fcn.eval()(x)[0].numpy()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.tile(skimage_data.astronaut(), (1, 2, 1))[:480, :700]


def _pyramid(path, pixels):
    with tifffile.TiffWriter(path) as tw:
        for k in range(3):
            res = 1e4 / (0.5 * 2**k)
            tw.write(
                pixels[:: 2**k, :: 2**k],
                tile=(128, 128),
                photometric="rgb",
                compression="deflate",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
                subfiletype=int(k > 0),
            )
    return str(path)


def test_tiles_equal_whole_image_inference(tmp_path, photo):
    fcn = small_net()
    path = _pyramid(tmp_path / "slide.tif", photo)
    scores = fcnify.predict(fcn, path, tmp_path / "out.zarr", tile=160, progress=False)
    ref = whole(fcn, photo)
    assert scores.shape == ref.shape and scores.dtype == np.float32
    np.testing.assert_allclose(scores[:], ref, rtol=1e-4, atol=1e-5)
    assert scores.chunks == (5, 29, 28)  # one chunk per tile: at most (160 - 36 + 1) // 4 = 31 cells, evened out
    attrs = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["fcnify"]
    assert attrs["stride"] == [4, 4] and attrs["receptive_field"] == [36, 36] and attrs["offset"] == [15.5, 15.5]
    assert attrs["mpp"] == pytest.approx(0.5) and attrs["level"] == 0 and attrs["fill"] == "nan"
    assert attrs["tiles"] == {"total": 4 * 6, "skipped": 0, "done": 4 * 6}
    assert attrs["image"] == {"path": path, "shape": [480, 700, 3]}


def test_level_attributes_are_in_level0_pixels(tmp_path, photo):
    fcn = small_net()
    path = _pyramid(tmp_path / "slide.tif", photo)
    scores = fcnify.predict(fcn, path, tmp_path / "out.zarr", mpp=1.0, memory="300MB", progress=False)
    ref = whole(fcn, photo[::2, ::2])
    np.testing.assert_allclose(scores[:], ref, rtol=1e-4, atol=1e-5)
    attrs = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["fcnify"]
    assert (attrs["level"], attrs["downsample"], attrs["mpp"]) == (1, 2.0, pytest.approx(1.0))
    # cell (0, 0) is centred on level-1 pixel 15.5, which is level-0 coordinate (15.5 + 0.5) * 2 - 0.5
    assert attrs["stride"] == [8, 8] and attrs["receptive_field"] == [72, 72] and attrs["offset"] == [31.5, 31.5]


@pytest.mark.slow
def test_resnet18_tiles_equal_whole_image(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    fcn = fcnify.convert(torchvision.models.resnet18().eval(), input_size=(224, 224))
    pixels = np.tile(skimage_data.astronaut(), (2, 2, 1))[:700, :740]
    np.save(tmp_path / "image.npy", pixels)
    scores = fcnify.predict(
        fcn, tmp_path / "image.npy", tmp_path / "out.zarr", tile=900, classes=[1, "goldfish", 7], progress=False
    )
    ref = whole(fcn, pixels)[[1, 1, 7]]
    assert scores.shape == ref.shape == (3, 16, 18) and scores.chunks == (
        3,
        8,
        6,
    )  # at most (900 - 627 + 1) // 32, evened out
    np.testing.assert_allclose(scores[:], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["fcnify"]["classes"] == ["goldfish"] * 2 + ["cock"]


def test_mask_skips_background_tiles(tmp_path, photo):
    fcn = small_net()
    slide = np.full((480, 700, 3), 238, np.uint8)
    slide[40:200, 60:300] = photo[:160, :240] // 2 + np.array([100, 10, 60], np.uint8)
    scores = fcnify.predict(fcn, slide, tmp_path / "out.zarr", tile=120, mask="otsu", progress=False)
    attrs = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["fcnify"]
    assert 0 < attrs["tiles"]["skipped"] < attrs["tiles"]["total"] == attrs["tiles"]["done"]
    values, ref = scores[:], whole(fcn, slide)
    computed = ~np.isnan(values[0])
    assert computed[20, 30] and not computed[-1, -1]  # inside the tissue / far on the glass
    np.testing.assert_allclose(values[:, computed], ref[:, computed], rtol=1e-4, atol=1e-5)
    assert np.isnan(values[:, ~computed]).all()
    np.testing.assert_array_equal(np.isin(zarr.open_group(tmp_path / "out.zarr")["done"][:], [1, 2]), True)


def test_store_rules_and_float16(tmp_path, photo):
    fcn = small_net()
    out = tmp_path / "out.zarr"
    fcnify.predict(fcn, photo, out, tile=200, progress=False)
    with pytest.raises(fcnify.FcnifyError, match="already exists.*Hint: pass force=True"):
        fcnify.predict(fcn, photo, out, tile=200, progress=False)
    with pytest.raises(fcnify.FcnifyError, match="other arguments \\(cells.*Hint"):
        fcnify.predict(fcn, photo, out, tile=160, progress=False, resume=True)
    with pytest.raises(fcnify.FcnifyError, match="other arguments \\(model"):
        fcnify.predict(small_net(seed=1), photo, out, tile=200, progress=False, resume=True)
    half = fcnify.predict(fcn, photo, out, tile=200, dtype="float16", progress=False, force=True)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half[:].astype(np.float32), whole(fcn, photo), rtol=2e-3, atol=2e-3)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(fcnify.FcnifyError, match="not a store written by fcnify"):
        fcnify.predict(fcn, photo, tmp_path / "notes.txt", tile=200, progress=False, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    for bad, message in (
        (dict(memory="lots"), "not an amount of memory"),
        (dict(tile=20), "holds no cell"),
        (dict(level=2), "no level 2"),
        (dict(memory="1MB"), "less than the model"),
    ):
        with pytest.raises(fcnify.FcnifyError, match=message):
            fcnify.predict(fcn, photo, tmp_path / "bad.zarr", progress=False, **bad)


def test_memory_budget_picks_the_tile(tmp_path, photo, caplog):
    fcn = small_net()
    with caplog.at_level("INFO", logger="fcnify"):
        small = fcnify.predict(fcn, photo, tmp_path / "a.zarr", memory="300MB", progress=False)
        large = fcnify.predict(fcn, photo, tmp_path / "b.zarr", memory="2GB", progress=False)
    assert small.chunks[2] < large.chunks[2] == 168
    assert "memory 0.29 GB -> tiles up to" in caplog.text
    np.testing.assert_allclose(small[:], large[:], rtol=1e-5, atol=1e-6)


def test_geotiff_keeps_crs_and_transform(tmp_path, photo):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    path = tmp_path / "scene.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=700,
        height=480,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5400000.0),
    ) as ds:
        ds.write(np.moveaxis(photo, -1, 0))
    fcnify.predict(small_net(), path, tmp_path / "out.zarr", tile=200, progress=False)
    attrs = zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["fcnify"]
    assert "32633" in attrs["crs"] and attrs["transform"] == [500000.0, 10.0, 0.0, 5400000.0, 0.0, -10.0]


def test_many_images_one_store_each(tmp_path, photo):
    for k in range(2):
        np.save(tmp_path / f"slide{k}.npy", photo[:, k * 100 : k * 100 + 400])
    results = fcnify.predict(small_net(), str(tmp_path / "slide*.npy"), tmp_path / "maps", tile=200, progress=False)
    assert len(results) == 2 and sorted(os.listdir(tmp_path / "maps")) == ["slide0.zarr", "slide1.zarr"]
    np.testing.assert_allclose(results[1][:], whole(small_net(), photo[:, 100:500]), rtol=1e-4, atol=1e-5)
    with pytest.raises(fcnify.FcnifyError, match="no file matches"):
        fcnify.predict(small_net(), str(tmp_path / "none*.npy"), tmp_path / "maps", progress=False)


_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch, fcnify
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_predict import small_net
    fcnify.predict(small_net(), sys.argv[1], sys.argv[2], tile=120, progress=False, resume=sys.argv[3] == "resume")
""")


def _done_files(store) -> int:
    count = 0
    for _, _, files in os.walk(os.path.join(store, "done", "c")):
        count += len(files)
    return count


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_for_bit(tmp_path, photo):
    image = tmp_path / "image.npy"
    np.save(image, photo)  # 480 x 700: 6 x 8 tiles of 21 x 21 cells
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    full, killed = str(tmp_path / "full.zarr"), str(tmp_path / "killed.zarr")
    fcnify.predict(small_net(), str(image), full, tile=120, progress=False)  # the uninterrupted run, here
    process = subprocess.Popen([sys.executable, str(script), str(image), killed, "new"])
    deadline = time.time() + 240
    while _done_files(killed) < 5 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = _done_files(killed)
    total = 6 * 8
    assert 5 <= written < total, "the run should be killed part way"
    subprocess.run([sys.executable, str(script), str(image), killed, "resume"], check=True, timeout=300)
    a, b = zarr.open_group(full, mode="r"), zarr.open_group(killed, mode="r")
    np.testing.assert_array_equal(a["scores"][:], b["scores"][:])  # NaN-free, so equal means bit for bit
    assert a["scores"][:].tobytes() == b["scores"][:].tobytes()
    np.testing.assert_array_equal(a["done"][:], b["done"][:])
    assert dict(a.attrs) == dict(b.attrs)


@pytest.mark.slow
def test_dask_local_cluster_is_bit_for_bit(tmp_path, photo):
    distributed = pytest.importorskip("distributed")
    fcn = small_net()
    np.save(tmp_path / "image.npy", photo)
    alone = fcnify.predict(fcn, tmp_path / "image.npy", tmp_path / "alone.zarr", tile=120, progress=False)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        shared = fcnify.predict(
            fcn, tmp_path / "image.npy", tmp_path / "dask.zarr", tile=120, client=client, progress=False
        )
        assert shared[:].tobytes() == alone[:].tobytes()
        with pytest.raises(fcnify.FcnifyError, match="given as an array"):
            fcnify.predict(fcn, photo, tmp_path / "array.zarr", tile=120, client=client, progress=False)
    assert not os.path.exists(tmp_path / "dask.zarr" / ".fcnify-model.pt2")
