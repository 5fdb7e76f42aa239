"""fcnify.open_image on real files written by the real libraries (tifffile, OpenSlide, rasterio, zarr, Pillow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fcnify
from fcnify.io import load_mask, tissue_mask

skimage_data = pytest.importorskip("skimage.data")
tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 1024x1536 RGB photo: astronaut tiled 2x3."""
    return np.tile(skimage_data.astronaut(), (2, 3, 1))


def _pyramid(path, photo, subifds: bool, compression="deflate", **options):
    levels = [photo, photo[::2, ::2], photo[::4, ::4]]
    with tifffile.TiffWriter(path) as tw:
        for k, level in enumerate(levels):
            extra = dict(subifds=len(levels) - 1) if subifds and k == 0 else {}
            if k and not subifds:
                extra["subfiletype"] = 1
            if k and subifds:
                extra["subfiletype"] = 1
            res = 1e4 / (0.25 * 2**k)
            tw.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression=compression,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
                **extra,
                **options,
            )
    return path


def test_tiled_tiff_with_subifd_levels(tmp_path, photo):
    path = _pyramid(tmp_path / "slide.tif", photo, subifds=True)
    with fcnify.open_image(path) as image:
        assert image.reader == "tifffile"
        assert image.levels == [(1024, 1536), (512, 768), (256, 384)]
        assert image.mpp == pytest.approx(0.25) and image.shape == (1024, 1536, 3)
        window = image.read(300, 700, 40, 50)
        assert window.dtype == np.float32
        np.testing.assert_array_equal(window, photo[300:340, 700:750] / np.float32(255))
    with fcnify.open_image(path, mpp=1.1) as image:  # closest: level 2 at 1.0 mpp
        assert (image.level, image.downsample, image.mpp) == (2, 4.0, pytest.approx(1.0))
        np.testing.assert_array_equal(image.read(10, 20, 5, 5), photo[::4, ::4][10:15, 20:25] / np.float32(255))


def test_ome_tiff_physical_size(tmp_path, photo):
    path = tmp_path / "image.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            photo,
            tile=(256, 256),
            photometric="rgb",
            subifds=1,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
        )
        tw.write(photo[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    with fcnify.open_image(path, level=1) as image:
        assert image.levels == [(1024, 1536), (512, 768)]
        assert image.mpp == pytest.approx(1.0) and image.downsample == 2.0


def test_aperio_description_mpp(tmp_path, photo):
    path = tmp_path / "slide.svs"
    tifffile.imwrite(
        path,
        photo,
        tile=(256, 256),
        photometric="rgb",
        description="Aperio Image Library v12.0.15\n1536x1024 -> 1536x1024 |AppMag = 40|MPP = 0.2520",
    )
    with fcnify.open_image(path) as image:
        assert image.reader == "tifffile" and image.mpp == pytest.approx(0.252)


def test_openslide_reads_the_same_pyramid_as_tifffile(tmp_path, photo):
    pytest.importorskip("openslide")
    # OpenSlide's generic-TIFF driver wants the levels as consecutive tiled IFDs (not SubIFDs).
    path = _pyramid(tmp_path / "slide.tif", photo, subifds=False, compression="jpeg")
    with fcnify.open_image(path, reader="openslide", level=1) as slide, fcnify.open_image(path, level=1) as tif:
        assert slide.reader == "openslide" and tif.reader == "tifffile"
        assert slide.levels == tif.levels == [(1024, 1536), (512, 768), (256, 384)]
        assert slide.mpp == pytest.approx(0.5) and tif.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read(100, 200, 64, 80), tif.read(100, 200, 64, 80))


def test_geotiff_keeps_crs_and_transform(tmp_path, photo):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    path = tmp_path / "scene.tif"
    transform = from_origin(500000.0, 5400000.0, 10.0, 10.0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=1536,
        height=1024,
        count=3,
        dtype="uint16",
        crs="EPSG:32633",
        transform=transform,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    ) as ds:
        ds.write(np.moveaxis(photo.astype(np.uint16) * 257, -1, 0))
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.nearest)
    with fcnify.open_image(path) as image:
        assert image.reader == "rasterio"
        assert "32633" in image.crs and image.transform == (500000.0, 10.0, 0.0, 5400000.0, 0.0, -10.0)
        assert image.levels == [(1024, 1536), (512, 768), (256, 384)]
        np.testing.assert_allclose(image.read(5, 6, 7, 8), photo[5:12, 6:14] / 255.0, atol=1e-6)
    with fcnify.open_image(path, level=2) as image:
        assert image.downsample == 4.0 and image.shape == (256, 384, 3)
        assert image.transform == (500000.0, 10.0, 0.0, 5400000.0, 0.0, -10.0)  # always level 0's


def test_zarr_array_and_ome_zarr(tmp_path, photo):
    array = zarr.create_array(tmp_path / "plain.zarr", shape=photo.shape, chunks=(256, 256, 3), dtype="uint8")
    array[:] = photo
    with fcnify.open_image(tmp_path / "plain.zarr") as image:
        assert image.reader == "zarr" and image.shape == photo.shape
        np.testing.assert_array_equal(image.read(1, 2, 3, 4), photo[1:4, 2:6] / np.float32(255))
    group = zarr.open_group(tmp_path / "ome.zarr", mode="w")
    datasets = []
    for k in range(2):
        chw = np.moveaxis(photo[:: 2**k, :: 2**k], -1, 0)
        group.create_array(str(k), shape=chw.shape, chunks=(3, 256, 256), dtype="uint8")[:] = chw
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5 * 2**k, 0.5 * 2**k]}]}
        )
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": datasets,
        }
    ]
    with fcnify.open_image(tmp_path / "ome.zarr", mpp=1.0) as image:
        assert (image.level, image.mpp, image.shape) == (1, 1.0, (512, 768, 3))
        np.testing.assert_array_equal(image.read(3, 4, 5, 6), photo[::2, ::2][3:8, 4:10] / np.float32(255))


def test_npy_memmap_arrays_and_tensors(tmp_path, photo):
    np.save(tmp_path / "image.npy", photo)
    with fcnify.open_image(tmp_path / "image.npy") as image:
        assert image.reader == "numpy" and image.layout == "HWC"
        np.testing.assert_array_equal(image.read(0, 0, 2, 2), photo[:2, :2] / np.float32(255))
    chw = torch.from_numpy(np.moveaxis(photo, -1, 0).copy()).float() / 255
    image = fcnify.open_image(chw)
    assert image.layout == "CHW" and image.shape == (1024, 1536, 3)
    np.testing.assert_allclose(image.read(7, 8, 3, 3), photo[7:10, 8:11] / 255.0, atol=1e-6)
    # numpy arrays are HWC unless that would give more than 4 channels and CHW does not
    assert fcnify.open_image(np.zeros((3, 40, 50), np.uint8)).layout == "CHW"
    assert fcnify.open_image(np.zeros((3, 4, 3), np.uint8)).layout == "HWC"


def test_float_images_are_checked(recwarn):
    with pytest.raises(fcnify.FcnifyError, match="only NaN"):
        fcnify.open_image(np.full((20, 20, 3), np.nan, np.float32))
    with pytest.warns(UserWarning, match="not \\[0, 1\\]"):
        fcnify.open_image(np.full((20, 20, 3), 255.0, np.float32))


def test_png_exif_rotation_and_16_bit(tmp_path):
    from PIL import Image

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:5, :5] = 255  # a white corner, top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    with fcnify.open_image(tmp_path / "rotated.png") as image:
        assert image.reader == "pillow" and image.shape == (30, 20, 3)
        assert image.read(0, 15, 5, 5).min() == 1.0  # the corner moved to the top right
    deep = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 32).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with fcnify.open_image(tmp_path / "deep.png") as image:
        assert image.dtype == np.uint16 and image.shape == (40, 50, 1)
        np.testing.assert_allclose(image.read(0, 0, 40, 50)[:, :, 0], deep / 65535.0, rtol=1e-6)
        assert image.read(39, 49, 1, 1).max() > 0.97  # not clipped to 8 bits


def test_pillow_keeps_its_decompression_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image

    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(fcnify.FcnifyError, match="decompression-bomb.*Hint: convert it to a tiled TIFF"):
        fcnify.open_image(tmp_path / "big.png")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_errors_say_what_and_hint(tmp_path, photo):
    with pytest.raises(fcnify.FcnifyError, match="not found.*Hint"):
        fcnify.open_image(tmp_path / "missing.tif")
    (tmp_path / "junk.bin").write_bytes(b"not an image at all")
    with pytest.raises(fcnify.FcnifyError, match="Hint"):
        fcnify.open_image(tmp_path / "junk.bin")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(fcnify.FcnifyError, match="cannot read .*broken.tif.*Hint"):
        fcnify.open_image(tmp_path / "broken.tif")
    with pytest.raises(fcnify.FcnifyError, match="no level 3.*Hint"):
        fcnify.open_image(photo, level=3)
    with pytest.raises(fcnify.FcnifyError, match="records no microns per pixel"):
        fcnify.open_image(photo, mpp=0.5)
    with pytest.raises(fcnify.FcnifyError, match="outside"):
        fcnify.open_image(photo).read(1000, 0, 100, 10)


def test_otsu_mask_finds_the_tissue(tmp_path):
    slide = np.full((512, 768, 3), 235, np.uint8)  # glass
    slide[100:300, 200:500] = skimage_data.astronaut()[:200, :300] // 2 + (90, 20, 60)  # coloured "tissue"
    image = fcnify.open_image(slide)
    mask = tissue_mask(image)
    assert mask.any(150, 250, 160, 260) and not mask.any(400, 0, 512, 100) and not mask.any(0, 600, 90, 768)
    assert 0.1 < mask.fraction < 0.3
    small = np.zeros((64, 96), np.uint8)
    small[10:40, 20:70] = 255
    from PIL import Image

    Image.fromarray(small).save(tmp_path / "mask.png")
    from_file = load_mask(str(tmp_path / "mask.png"), image)  # 8x smaller than the image
    assert from_file.any(100, 200, 110, 210) and not from_file.any(400, 600, 512, 768)
