"""HR sources: XYZ tiles through the offline world's Esri-shaped server (faults included) and local rasters
(the real aerial GeoTIFFs in EPSG:28992 and EPSG:32617)."""

from __future__ import annotations

import json
import pickle
import time

import mercantile
import numpy as np
import pytest

from cmsrd.errors import InputError, SampleError
from cmsrd.sources.base import HRSource, tile_bounds_3857
from cmsrd.sources.http import RetryPolicy
from cmsrd.sources.worldimagery import (
    ESRI_ATTRIBUTION,
    WorldImageryHR,
    decode_tile,
    is_placeholder,
    parse_src_date,
    validate_template,
)

pytestmark = pytest.mark.timeout(120)

FAST = RetryPolicy(retries=6, backoff=0.01, max_backoff=0.05, jitter=0.1)


@pytest.fixture(scope="module")
def world(small_world):
    meta = json.loads((small_world / "world.json").read_text())
    w, s, e, n = meta["bounds_lonlat"]
    t16 = mercantile.tile((w + e) / 2, (s + n) / 2, 16)
    return small_world, meta, t16


@pytest.fixture()
def server(world):
    from cmsrd.world.servers import serve_world

    with serve_world(world[0]) as srv:
        yield srv


def disk_tile(root, z, x, y) -> np.ndarray:
    return decode_tile((root / "tiles" / str(z) / str(x) / f"{y}.jpg").read_bytes())


def source(srv, tmp_path=None, **kw) -> WorldImageryHR:
    kw.setdefault("rate", None)
    kw.setdefault("retry", FAST)
    return WorldImageryHR(srv.tile_template, cache_dir=tmp_path, identify_url=srv.identify_url, **kw)


def child_inside(world, z):
    """A tile at zoom z whose tiles at z and z+1 exist in the world."""
    root, meta, t16 = world
    t = t16
    while t.z < z:
        t = mercantile.children(t)[0]
    return t


def test_single_tile_footprint_date_and_attribution(world, server, tmp_path):
    root, meta, _ = world
    t = child_inside(world, 17)
    hr = source(server, tmp_path).fetch(t.z, t.x, t.y, size=256)
    assert isinstance(source(server), HRSource)
    assert hr.image.shape == (256, 256, 3) and hr.image.dtype == np.uint8
    np.testing.assert_array_equal(hr.image, disk_tile(root, t.z, t.x, t.y))
    assert hr.bounds_3857 == pytest.approx(tile_bounds_3857(t.z, t.x, t.y))
    assert hr.date == meta["hr_capture_date"]
    assert hr.attribution == ESRI_ATTRIBUTION  # the world server speaks Esri's URL shape
    assert hr.info["tile_zoom"] == 17 and hr.info["tiles"] == 1


def test_512px_footprint_is_mosaic_of_four_children(world, server):
    root, _, t16 = world
    hr = source(server).fetch(t16.z, t16.x, t16.y, size=512)
    assert hr.image.shape == (512, 512, 3) and hr.info["tile_zoom"] == 17
    for c in mercantile.children(t16):
        r, col = (c.y - 2 * t16.y) * 256, (c.x - 2 * t16.x) * 256
        np.testing.assert_array_equal(hr.image[r : r + 256, col : col + 256], disk_tile(root, c.z, c.x, c.y))


@pytest.mark.parametrize("size", [64, 384])
def test_other_sizes_are_resampled_from_the_next_finer_mosaic(world, server, size):
    root, _, t16 = world
    t = mercantile.children(t16)[0]
    hr = source(server).fetch(t.z, t.x, t.y, size=size)
    assert hr.image.shape == (size, size, 3) and hr.info["resampled"]
    ref = disk_tile(root, t.z, t.x, t.y).astype(float).mean(axis=(0, 1))
    assert np.abs(hr.image.astype(float).mean(axis=(0, 1)) - ref).max() < 4


def test_cache_keyed_zxy_avoids_refetch_across_instances(world, server, tmp_path):
    t = child_inside(world, 17)
    first = source(server, tmp_path).fetch(t.z, t.x, t.y)
    assert (tmp_path / "17" / str(t.x) / f"{t.y}.jpg").is_file()
    before = server.stats.requests
    again = source(server, tmp_path).fetch(t.z, t.x, t.y)
    after = server.stats.requests
    assert after["tile"] == before["tile"] and after["identify"] == before["identify"]
    assert again.info["cache_hits"] == 1 and again.date == first.date
    np.testing.assert_array_equal(first.image, again.image)


def test_tiles_outside_imagery_are_placeholders(world, server):
    _, _, t16 = world
    far = mercantile.Tile(t16.x + 5, t16.y + 5, 16)  # the world has no imagery there
    with pytest.raises(SampleError) as ei:
        source(server).fetch(far.z, far.x, far.y)
    assert ei.value.reason == "hr_placeholder" and "404" in ei.value.detail
    # Without blankTile=false Esri sends its grey image with HTTP 200: it is still detected.
    with pytest.raises(SampleError) as ei:
        source(server, blank_tile_false=False).fetch(far.z, far.x, far.y)
    assert ei.value.reason == "hr_placeholder" and "grey" in ei.value.detail


def test_placeholder_detector_spares_real_imagery(world):
    root, _, t16 = world
    c = mercantile.children(t16)[0]
    assert not is_placeholder(disk_tile(root, c.z, c.x, c.y))
    grey = np.full((256, 256, 3), 204, np.uint8)
    grey[120:136, 40:200] = 90  # the "Map data not yet available" text
    assert is_placeholder(grey)
    assert not is_placeholder(np.full((256, 256, 3), (40, 90, 160), np.uint8))  # water is not grey


def test_faulty_server_retries_429_503_corrupt_truncated(world, tmp_path):
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, _, t16 = world
    faults = FaultConfig(
        error_rate=0.3,
        error_codes=(429, 503),
        retry_after_s=0,
        corrupt_rate=0.15,
        truncate_rate=0.15,
        seed=3,
        paths=("/arcgis/",),
    )
    with serve_world(root, faults=faults) as srv:
        hr = source(srv, tmp_path).fetch(t16.z, t16.x, t16.y, size=512)
        f = srv.stats.faults
    assert f["error"] + f["corrupt"] + f["truncate"] > 0
    for c in mercantile.children(t16):
        r, col = (c.y - 2 * t16.y) * 256, (c.x - 2 * t16.x) * 256
        np.testing.assert_array_equal(hr.image[r : r + 256, col : col + 256], disk_tile(root, c.z, c.x, c.y))


def test_persistent_failure_is_recorded_not_raised_as_crash(world):
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, _, t16 = world
    with serve_world(
        root,
        faults=FaultConfig(
            error_rate=1.0, error_codes=(500,), paths=("/arcgis/rest/services/World_Imagery/MapServer/tile",)
        ),
    ) as srv:
        src = source(srv, retry=RetryPolicy(retries=2, backoff=0.0, jitter=0.0))
        with pytest.raises(SampleError) as ei:
            src.fetch(t16.z, t16.x, t16.y)
        many = src.fetch_many([(t16.z, t16.x, t16.y)] * 3, progress=False)
    assert ei.value.reason == "hr_fetch_failed" and "HTTP 500" in ei.value.detail
    assert [e.reason for e in many] == ["hr_fetch_failed"] * 3


def test_timeouts_are_retried(world):
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, _, t16 = world
    t = child_inside(world, 17)
    with serve_world(root, faults=FaultConfig(timeout_rate=0.5, timeout_s=2.0, seed=1, paths=("/arcgis/",))) as srv:
        hr = source(srv, timeout=(1.0, 0.3)).fetch(t.z, t.x, t.y)
        assert srv.stats.faults["timeout"] >= 1
    np.testing.assert_array_equal(hr.image, disk_tile(root, t.z, t.x, t.y))


def test_identify_failure_leaves_date_unknown_but_sample_ok(world, server):
    t = child_inside(world, 17)
    src = WorldImageryHR(server.tile_template, identify_url=server.base_url + "/nope/identify", rate=None, retry=FAST)
    hr = src.fetch(t.z, t.x, t.y)
    assert hr.date is None and "identify failed" in hr.info["date_error"]


@pytest.mark.parametrize(
    "template", ["https://tiles.example.com/{z}/{x}.png", "https://a/{z}/{x}/{y}/{s}.png", "tiles/{z}/{x}/{y}.png", ""]
)
def test_bad_templates_are_input_errors(template):
    with pytest.raises(InputError, match="tile template"):
        validate_template(template)


def test_any_xyz_template_and_no_esri_specifics(world, server):
    root, _, t16 = world
    t = child_inside(world, 17)
    # a plain {z}/{x}/{y} server: the world's files route lays tiles out as tiles/{z}/{x}/{y}.jpg
    src = WorldImageryHR(server.files_url + "/tiles/{z}/{x}/{y}.jpg", rate=None, retry=FAST)
    assert src.identify_url is None and src.attribution == "" and not src.blank_tile_false
    hr = src.fetch(t.z, t.x, t.y)
    np.testing.assert_array_equal(hr.image, disk_tile(root, t.z, t.x, t.y))
    assert hr.date is None


def test_source_pickles_for_dask_workers(world, server, tmp_path):
    t = child_inside(world, 17)
    src = source(server, tmp_path)
    src.fetch(t.z, t.x, t.y)
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.fetch(t.z, t.x, t.y).image, src.fetch(t.z, t.x, t.y).image)


def test_src_date_formats():
    assert parse_src_date("20190412") == "2019-04-12"
    assert parse_src_date(20190412) == "2019-04-12"
    assert parse_src_date(1555027200000) == "2019-04-12"
    assert parse_src_date("20191345") is None and parse_src_date(None) is None


def test_tiles_per_second_with_latency_uses_concurrency(world):
    """Bounded concurrency turns 100 ms of latency per tile into ~max_workers tiles per 100 ms."""
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, _, t16 = world
    tiles = [(c.z, c.x, c.y) for c in mercantile.children(t16)] * 3  # 12 requests, no cache
    with serve_world(root, faults=FaultConfig(latency_s=0.1, paths=("/arcgis/",))) as srv:
        src = WorldImageryHR(srv.tile_template, identify_url=None, rate=None, max_workers=4)
        t0 = time.perf_counter()
        out = src.client.map(lambda c: src.get_tile(*c), tiles)
        dt = time.perf_counter() - t0
    assert all(isinstance(o, tuple) for o in out)
    assert dt < 12 * 0.1 / 2  # serial would take >= 1.2 s


# ----------------------------------------------------------------------------------------------------
# Local rasters (real aerial GeoTIFFs)


def _inside_tile(path, z):
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(path) as s:
        w, so, e, n = transform_bounds(s.crs, "EPSG:4326", *s.bounds)
    return mercantile.tile((w + e) / 2, (so + n) / 2, z)


@pytest.mark.parametrize("name,z", [("test_tiled.tif", 19), ("OSBS_029.tif", 21)])
def test_raster_hr_reprojects_real_aerial_onto_the_tile(shared_data, name, z):
    import rasterio
    from pyproj import Transformer

    from cmsrd.sources.hr_raster import RasterHR

    path = shared_data / "aerial" / name
    t = _inside_tile(path, z)
    src = RasterHR(path)
    assert isinstance(src, HRSource)
    hr = src.fetch(t.z, t.x, t.y, size=256)
    assert hr.image.shape == (256, 256, 3) and hr.image.dtype == np.uint8
    assert hr.info["coverage"] > 0.99 and hr.info["src_crs"] in ("EPSG:28992", "EPSG:32617")
    assert hr.image.std() > 5  # real texture, not a blank fill
    # Georeferencing: the pixel at a few output positions matches the source pixel at the same place.
    left, bottom, right, top = hr.bounds_3857
    with rasterio.open(path) as s:
        to_src = Transformer.from_crs("EPSG:3857", s.crs, always_xy=True)
        arr = s.read()
        errs = []
        for fr, fc in [(0.3, 0.3), (0.5, 0.5), (0.7, 0.2), (0.25, 0.75)]:
            mx, my = left + (right - left) * fc, top - (top - bottom) * fr
            row, col = s.index(*to_src.transform(mx, my))
            win = arr[:, max(row - 2, 0) : row + 3, max(col - 2, 0) : col + 3].reshape(3, -1).mean(1)
            r, c = int(fr * 256), int(fc * 256)
            out = hr.image[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].reshape(-1, 3).mean(0)
            errs.append(np.abs(out - win).mean())
    assert np.median(errs) < 20


def test_raster_hr_child_tile_agrees_with_parent(shared_data):
    from cmsrd.sources.hr_raster import RasterHR

    path = shared_data / "aerial" / "test_tiled.tif"
    t = _inside_tile(path, 18)
    src = RasterHR(path, resampling="average")
    parent = src.fetch(t.z, t.x, t.y, 256).image.astype(float)
    kid = mercantile.children(t)[0]  # top-left quadrant
    child = src.fetch(kid.z, kid.x, kid.y, 256).image.astype(float)
    small = child.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    corr = np.corrcoef(small.ravel(), parent[:128, :128].ravel())[0, 1]
    assert corr > 0.9


def test_raster_hr_outside_and_partial_are_sample_failures(shared_data):
    from cmsrd.sources.hr_raster import RasterHR

    path = shared_data / "aerial" / "OSBS_029.tif"
    src = RasterHR(path)
    t = _inside_tile(path, 18)  # a z18 tile is larger than the 40 m raster
    with pytest.raises(SampleError) as ei:
        src.fetch(t.z, t.x, t.y)
    assert ei.value.reason == "hr_partial_coverage"
    with pytest.raises(SampleError) as ei:
        src.fetch(t.z, t.x + 3, t.y)
    assert ei.value.reason == "hr_outside_raster"


def test_raster_hr_bad_inputs(tmp_path):
    import rasterio

    from cmsrd.sources.hr_raster import RasterHR

    with pytest.raises(InputError, match="file not found"):
        RasterHR(tmp_path / "missing.tif")
    p = tmp_path / "nocrs.tif"
    with rasterio.open(p, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as d:
        d.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(InputError, match="no CRS"):
        RasterHR(p)


def test_raster_hr_uint16_uses_fixed_recorded_gain(tmp_path):
    import rasterio
    from rasterio.transform import from_bounds

    from cmsrd.sources.hr_raster import RasterHR

    t = mercantile.tile(11.70, 48.40, 17)
    b = tile_bounds_3857(t.z, t.x, t.y)
    pad = 50.0
    p = tmp_path / "gf2.tif"
    data = np.linspace(0, 1023, 64 * 64, dtype=np.float32).reshape(64, 64).astype(np.uint16)
    with rasterio.open(
        p,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint16",
        crs="EPSG:3857",
        transform=from_bounds(b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad, 64, 64),
    ) as d:
        d.write(np.stack([data] * 3))
    hr = RasterHR(p, value_range=(0, 1023)).fetch(t.z, t.x, t.y, 128)
    assert hr.info["value_range"] == [0, 1023]
    rows = hr.image[..., 0].astype(float).mean(axis=1)
    assert np.all(np.diff(rows) >= 0)  # the ramp survives the warp and the fixed gain
    assert 20 < rows[0] < 45 and 210 < rows[-1] < 235  # 12 % padding each side of 0..1023 -> 0..255
