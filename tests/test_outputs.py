"""Class map outputs (fcnify.io._outputs): TIFF, GeoTIFF, GeoJSON from a Zarr store, read back with real readers.

The stores are written here with zarr, in the layout ``fcnify.predict`` writes: an array ``scores``
(K, h, w) and the group attribute ``"fcnify"`` (stride, offset of cell (0, 0)'s centre, classes, ...).
"""

import hashlib
import json
import os
import warnings

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
tifffile = pytest.importorskip("tifffile")
rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402  (rasterio's dependency)

from fcnify import FcnifyError  # noqa: E402
from fcnify.io._outputs import OutputError, write_geojson, write_geotiff, write_output, write_tiff  # noqa: E402


def make_store(
    path,
    scores,
    *,
    stride=(32, 32),
    offset=(111.5, 111.5),
    classes=None,
    mpp=0.5,
    crs=None,
    transform=None,
    affine=None,
    chunks=(64, 64),
):
    """A store as fcnify.predict writes it, with zarr."""
    group = zarr.open_group(str(path), mode="w")
    array = group.create_array(
        "scores", shape=scores.shape, chunks=(scores.shape[0], *chunks), dtype=scores.dtype, fill_value=np.nan
    )
    array[:] = scores
    attrs = {
        "version": "0.1.0",
        "model": "tiny",
        "classes": classes or [f"c{k}" for k in range(scores.shape[0])],
        "stride": list(stride),
        "offset": list(offset),
        "receptive_field": [224, 224],
        "level": 0,
        "downsample": 1.0,
        "mpp": mpp,
        "image": {"path": "slide.tif", "shape": [0, 0, 3]},
        "crs": crs,
        "fill": "nan",
    }
    if transform is not None:
        attrs["transform"] = list(transform)
    if affine is not None:
        attrs["affine"] = list(affine)
    group.attrs["fcnify"] = attrs
    return str(path)


def random_scores(k, h, w, seed=0, holes=True):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(k, h, w)).astype(np.float32)
    if holes:
        scores[:, 10:40, 20:90] = np.nan  # skipped cells (background)
    return scores


def digest(folder):
    """A hash of every file under ``folder``: the store must come out of every writer unchanged."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def halve_mean(a):
    """2x2 NaN-mean of (P, h, w), odd edges padded with NaN."""
    p, h, w = a.shape
    padded = np.full((p, h + h % 2, w + w % 2), np.nan, np.float32)
    padded[:, :h, :w] = a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(padded.reshape(p, (h + 1) // 2, 2, (w + 1) // 2, 2), axis=(2, 4))


# -- TIFF ----------------------------------------------------------------------------------------


def test_tiff_ome_pyramid_holds_the_scores_and_the_cell_size(tmp_path):
    scores = random_scores(3, 300, 700)
    store = make_store(tmp_path / "map.zarr", scores, stride=(32, 16), mpp=0.25)
    before = digest(store)
    out = write_tiff(store, tmp_path / "map.ome.tif")
    assert digest(store) == before
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [lvl.shape for lvl in series.levels] == [(3, 300, 700), (3, 150, 350), (3, 75, 175)]
        np.testing.assert_array_equal(series.levels[0].asarray(), scores)  # NaN where NaN
        np.testing.assert_allclose(series.levels[1].asarray(), halve_mean(scores), rtol=1e-6)
        page = series.levels[0].keyframe
        assert page.is_tiled and page.tilewidth == 256
        x_res, y_res = page.tags["XResolution"].value, page.tags["YResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / (16 * 0.25))  # pixels per cm: one cell is 4 um wide
        assert y_res[0] / y_res[1] == pytest.approx(1e4 / (32 * 0.25))
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert ome["PhysicalSizeX"] == pytest.approx(4.0) and ome["PhysicalSizeY"] == pytest.approx(8.0)
        assert [c["Name"] for c in ome["Channel"]] == ["c0", "c1", "c2"]


def test_tiff_label_map_in_the_generic_layout_opens_in_openslide(tmp_path):
    openslide = pytest.importorskip("openslide")
    scores = random_scores(4, 600, 520, seed=1)
    store = make_store(tmp_path / "map.zarr", scores, stride=(32, 32), mpp=0.5)
    out = write_tiff(store, tmp_path / "labels.tif", top=1, layout="generic")
    expected = np.nan_to_num(scores, nan=-np.inf).argmax(axis=0).astype(np.uint8)
    expected[np.isnan(scores).all(axis=0)] = 255
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].dtype == np.uint8
        np.testing.assert_array_equal(tif.pages[0].asarray(), expected)
        assert tif.pages[1].shape == (300, 260)
        np.testing.assert_array_equal(tif.pages[1].asarray(), expected[::2, ::2])
    with openslide.OpenSlide(out) as slide:
        assert slide.level_count == 3
        assert slide.level_dimensions[:2] == ((520, 600), (260, 300))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(16.0)  # 32 px x 0.5 um
        region = np.asarray(slide.read_region((0, 0), 0, (120, 50)))[..., 0]
        np.testing.assert_array_equal(region, expected[:50, :120])


def test_tiff_chosen_classes_and_top_k(tmp_path):
    scores = random_scores(5, 70, 90, seed=2, holes=False)
    store = make_store(tmp_path / "map.zarr", scores, classes=list("abcde"))
    one = write_tiff(store, tmp_path / "d.tif", classes="d", pyramid=False)
    np.testing.assert_array_equal(tifffile.imread(one), scores[3])
    two = write_tiff(store, tmp_path / "eb.tif", classes=["e", 1])
    np.testing.assert_array_equal(tifffile.imread(two), scores[[4, 1]])
    top = write_tiff(store, tmp_path / "top.tif", classes=["b", "c", "e"], top=2)
    best = np.argsort(-scores[[1, 2, 4]], axis=0)[:2]
    np.testing.assert_array_equal(tifffile.imread(top), np.array([1, 2, 4])[best])


def test_tiff_refuses_what_it_cannot_write(tmp_path):
    store = make_store(tmp_path / "map.zarr", random_scores(3, 40, 40, holes=False), classes=["x", "y", "z"])
    with pytest.raises(OutputError, match=r"class 'w' is not in .*x, y, z.*Hint"):
        write_tiff(store, tmp_path / "a.tif", classes=["x", "w"])
    with pytest.raises(OutputError, match="top=4 with 3 classes"):
        write_tiff(store, tmp_path / "a.tif", top=4)
    with pytest.raises(OutputError, match="one plane.*Hint"):
        write_tiff(store, tmp_path / "a.tif", layout="generic")
    assert sorted(os.listdir(tmp_path)) == ["map.zarr"]  # nothing written, no temporary left


def test_tiff_large_map_many_tiles(tmp_path):
    """Edges that are not multiples of the tile, several pyramid levels, chunks unlike the tiles."""
    scores = random_scores(2, 1100, 600, seed=3)
    store = make_store(tmp_path / "map.zarr", scores, chunks=(100, 300))
    with tifffile.TiffFile(write_tiff(store, tmp_path / "m.ome.tif", compression="zstd")) as tif:
        levels = tif.series[0].levels
        assert [lvl.shape[1:] for lvl in levels] == [(1100, 600), (550, 300), (275, 150), (138, 75)]
        np.testing.assert_array_equal(levels[0].asarray(), scores)
        np.testing.assert_allclose(levels[2].asarray(), halve_mean(halve_mean(scores)), rtol=1e-5)


# -- GeoTIFF -------------------------------------------------------------------------------------


@pytest.fixture
def scene(tmp_path):
    """A 3-band UTM 33N scene written by rasterio: 0.5 m pixels, north up."""
    transform = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5200000.0)
    path = tmp_path / "scene.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=1200,
        height=1000,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=transform,
    ) as dst:
        dst.write(np.zeros((3, 1000, 1200), np.uint8))
    return str(path)


@pytest.mark.parametrize("key", ["transform", "affine"])
def test_geotiff_cells_lie_on_the_scene_pixels_they_are_centred_on(tmp_path, scene, key):
    with rasterio.open(scene) as src:
        crs, t0 = src.crs, src.transform
    stride, offset = (32, 16), (112, 104)  # integer centres: each cell centre is one scene pixel
    scores = random_scores(2, 28, 70, seed=4, holes=False)
    georef = {"transform": t0.to_gdal()} if key == "transform" else {"affine": tuple(t0)[:6]}
    store = make_store(
        tmp_path / "map.zarr",
        scores,
        stride=stride,
        offset=offset,
        crs=crs.to_wkt(),
        classes=["land", "water"],
        **georef,
    )
    out = write_geotiff(store, tmp_path / "map.tif")
    with rasterio.open(out) as dst, rasterio.open(scene) as src:
        assert dst.crs == src.crs
        assert (dst.height, dst.width, dst.count) == (28, 70, 2)
        assert dst.descriptions == ("land", "water")
        np.testing.assert_array_equal(dst.read(), scores)
        for i, j in [(0, 0), (5, 7), (27, 69)]:
            y, x = offset[0] + i * stride[0], offset[1] + j * stride[1]
            assert dst.xy(i, j) == pytest.approx(src.xy(y, x))  # centres of cell (i, j) and pixel (y, x)
        assert dst.res == (16 * 0.5, 32 * 0.5)


def test_geotiff_half_pixel_offsets_and_labels(tmp_path, scene):
    """The centre of a 224 window (offset 111.5) lies between scene pixels: the affine says so exactly."""
    with rasterio.open(scene) as src:
        t0, crs = src.transform, src.crs
    scores = random_scores(3, 300, 280, seed=5)
    store = make_store(
        tmp_path / "map.zarr", scores, stride=(32, 32), offset=(111.5, 111.5), crs=crs.to_wkt(), transform=t0.to_gdal()
    )
    out = write_geotiff(store, tmp_path / "labels.tif", top=1)
    with rasterio.open(out) as dst:
        centre = dst.transform @ (2 + 0.5, 1 + 0.5)  # cell (1, 2)
        assert centre == pytest.approx(t0 @ (111.5 + 2 * 32 + 0.5, 111.5 + 32 + 0.5))
        labels = dst.read(1)
        assert dst.nodata == 255 and labels[20, 30] == 255  # a skipped cell
        np.testing.assert_array_equal(labels[50:], np.argmax(scores[:, 50:], axis=0))
        assert dst.overviews(1) == [2]


def test_geotiff_without_a_transform_uses_level0_pixels(tmp_path):
    store = make_store(
        tmp_path / "map.zarr",
        random_scores(1, 20, 30, holes=False),
        stride=(32, 32),
        offset=(111.5, 111.5),
        crs="EPSG:32633",
    )  # a CRS without a transform: not applied to pixels
    with rasterio.open(write_geotiff(store, tmp_path / "px.tif")) as dst:
        assert dst.crs is None
        assert dst.transform @ (0, 0) == pytest.approx((96.0, 96.0))  # 111.5 + 0.5 - 16


# -- GeoJSON -------------------------------------------------------------------------------------


def blob_scores(h=20, w=30):
    """Class 'tumour' wins a 3x5 block of cells with a one-cell hole, 'stroma' wins everywhere else."""
    scores = np.zeros((2, h, w), np.float32)
    scores[1] = 4.0
    scores[0, 3:6, 4:9], scores[1, 3:6, 4:9] = 8.0, 0.0
    scores[0, 4, 6], scores[1, 4, 6] = 0.0, 4.0  # hole
    scores[:, 15:, :] = np.nan  # skipped
    return scores


def test_geojson_blob_comes_back_at_its_level0_coordinates(tmp_path):
    store = make_store(
        tmp_path / "map.zarr", blob_scores(), stride=(32, 16), offset=(111.5, 103.5), classes=["tumour", "stroma"]
    )
    out = write_geojson(store, tmp_path / "map.geojson", classes="tumour")
    collection = json.load(open(out))
    assert collection["type"] == "FeatureCollection" and "crs" not in collection
    (feature,) = collection["features"]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == "tumour"
    shell, hole = (np.array(ring) for ring in feature["geometry"]["coordinates"])
    # cells 3..5 x 4..8: x from 103.5 + 0.5 + (4 - 0.5) * 16 = 160 to 104 + 8.5 * 16 = 240,
    # y from 112 + 2.5 * 32 = 192 to 288
    assert (shell[:, 0].min(), shell[:, 0].max(), shell[:, 1].min(), shell[:, 1].max()) == (160, 240, 192, 288)
    # the hole is cell (4, 6): centre (240, 200) in level-0 pixels (centre convention), +- half a stride
    assert (hole[:, 0].min(), hole[:, 0].max(), hole[:, 1].min(), hole[:, 1].max()) == (192, 208, 224, 256)


def test_geojson_every_class_raw_scores_and_crs(tmp_path, scene):
    with rasterio.open(scene) as src:
        t0, crs = src.transform, src.crs
    store = make_store(
        tmp_path / "map.zarr",
        blob_scores(),
        stride=(32, 32),
        offset=(16, 16),
        classes=["tumour", "stroma"],
        crs=crs.to_wkt(),
        transform=t0.to_gdal(),
    )
    out = write_geojson(store, tmp_path / "all.geojson", probabilities=False, threshold=3.0)
    collection = json.load(open(out))
    assert collection["crs"]["properties"]["name"] == "EPSG:32633"
    names = sorted(f["properties"]["classification"]["name"] for f in collection["features"])
    assert names == ["stroma", "stroma", "tumour"]  # stroma: the block around the tumour, and the hole
    tumour = next(f for f in collection["features"] if f["properties"]["classification"]["name"] == "tumour")
    xs = [p[0] for p in tumour["geometry"]["coordinates"][0]]
    ys = [p[1] for p in tumour["geometry"]["coordinates"][0]]
    west, north = t0 @ (16 + 0.5 + 3.5 * 32, 16 + 0.5 + 2.5 * 32)  # corner of cell (3, 4) in the scene
    assert min(xs) == pytest.approx(west) and max(ys) == pytest.approx(north)


def test_geojson_probabilities_threshold(tmp_path):
    scores = np.zeros((3, 6, 6), np.float32)
    scores[0, 1, 1] = np.log(8.0)  # softmax 0.8 for class 0 at (1, 1)
    scores[0, 4, 4] = np.log(1.0)  # 1/3 everywhere else
    store = make_store(tmp_path / "map.zarr", scores)
    kept = json.load(open(write_geojson(store, tmp_path / "p.geojson", threshold=0.5)))["features"]
    assert len(kept) == 1 and kept[0]["properties"]["class_index"] == 0
    assert json.load(open(write_geojson(store, tmp_path / "q.geojson", threshold=0.9)))["features"] == []


# -- write_output --------------------------------------------------------------------------------


def test_write_output_picks_the_format_and_writes_safely(tmp_path):
    store = make_store(tmp_path / "map.zarr", random_scores(2, 40, 50, holes=False))
    before = digest(store)
    assert write_output(store, tmp_path / "a.ome.tiff") == str(tmp_path / "a.ome.tiff")
    assert tifffile.TiffFile(tmp_path / "a.ome.tiff").is_ome
    write_output(store, tmp_path / "b.tif", format="geotiff")
    assert rasterio.open(tmp_path / "b.tif").count == 2
    write_output(store, tmp_path / "c.json", threshold=1.0)
    assert json.load(open(tmp_path / "c.json"))["type"] == "FeatureCollection"
    assert write_output(store, store) == store  # the store is the Zarr output: nothing to write
    with pytest.raises(OutputError, match="exists.*force=True"):
        write_output(store, tmp_path / "b.tif", format="geotiff")
    write_output(store, tmp_path / "b.tif", format="tiff", force=True)
    assert tifffile.TiffFile(tmp_path / "b.tif").is_ome
    assert digest(store) == before
    assert sorted(os.listdir(tmp_path)) == ["a.ome.tiff", "b.tif", "c.json", "map.zarr"]


def test_write_output_refusals(tmp_path):
    store = make_store(tmp_path / "map.zarr", random_scores(1, 8, 8, holes=False))
    with pytest.raises(OutputError, match=r"extension\. Hint: end it with .zarr, .tif"):
        write_output(store, tmp_path / "map.png")
    with pytest.raises(OutputError, match="unknown output format 'png'. Hint: one of zarr, tiff, geotiff, geojson"):
        write_output(store, tmp_path / "map.tif", format="png")
    with pytest.raises(OutputError, match="already the Zarr output"):
        write_output(store, tmp_path / "copy.zarr")
    with pytest.raises(OutputError, match="inside it"):
        write_output(store, os.path.join(store, "map.tif"))
    with pytest.raises(OutputError, match="format geojson: .*unexpected keyword.*top"):
        write_output(store, tmp_path / "m.geojson", top=1)
    with pytest.raises(OutputError, match="no Zarr store"):
        write_output(tmp_path / "missing.zarr", tmp_path / "m.tif")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(OutputError, match="not a class map store"):
        write_output(tmp_path / "other.zarr", tmp_path / "m.tif")
    assert issubclass(OutputError, FcnifyError)
    assert sorted(os.listdir(tmp_path)) == ["map.zarr", "other.zarr"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    store = make_store(tmp_path / "map.zarr", random_scores(1, 8, 8, holes=False))
    (tmp_path / "old.tif").write_bytes(b"the user's file")
    import fcnify.io._outputs as outputs

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(outputs, "_tiles", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_tiff(store, tmp_path / "old.tif", force=True)
    assert (tmp_path / "old.tif").read_bytes() == b"the user's file"
    assert sorted(os.listdir(tmp_path)) == ["map.zarr", "old.tif"]


def test_writers_read_the_store_window_by_window(tmp_path, monkeypatch):
    """No writer reads the whole score array at once: every read is at most one 1024-cell window."""
    import fcnify.io._outputs as outputs

    y, x = np.mgrid[:1100, :1300]
    smooth = (np.sin(x / 60) * np.cos(y / 80)).astype(np.float32)  # blobs, not cell-sized noise
    store = make_store(tmp_path / "map.zarr", np.stack([smooth, -smooth]), chunks=(256, 256))
    reads = []

    class Recording:
        def __init__(self, array):
            self.array, self.shape, self.ndim, self.dtype = array, array.shape, array.ndim, array.dtype

        def __getitem__(self, key):
            out = self.array[key]
            reads.append(out.shape[-2] * out.shape[-1])
            return out

        def get_orthogonal_selection(self, key):
            out = self.array.get_orthogonal_selection(key)
            reads.append(out.shape[-2] * out.shape[-1])
            return out

    real_open = outputs._open
    monkeypatch.setattr(
        outputs, "_open", lambda s: outputs.dataclasses.replace(real_open(s), scores=Recording(real_open(s).scores))
    )
    write_tiff(store, tmp_path / "a.tif", classes="c1")
    write_geotiff(store, tmp_path / "b.tif", top=1)
    write_geojson(store, tmp_path / "c.geojson")
    assert reads and max(reads) <= 1024 * 1024 < 1100 * 1300
