"""The offline world generator: determinism, OSM PBF, HR GeoTIFF + XYZ tiles, Sentinel-2 COGs, STAC, truth."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mercantile
import numpy as np
import osmium
import pystac
import pytest
import rasterio
import shapely.wkb
from PIL import Image
from rasterio.warp import Resampling, reproject, transform_bounds

from cmsrd.errors import InputError
from cmsrd.world.config import WorldConfig, pixel_size_3857
from cmsrd.world.generate import generate_world

BANDS = ("B02", "B03", "B04", "B08")


def _tiny(seed: int) -> WorldConfig:
    """One z16 tile (~430 m): the cheapest complete world, for the tests that generate their own."""
    return WorldConfig.small(seed=seed, extent_m=400.0, s2_margin_m=200.0)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _json(p: Path) -> dict:
    return json.loads(p.read_text())


@pytest.fixture(scope="module")
def meta(small_world) -> dict:
    return _json(small_world / "world.json")


@pytest.fixture(scope="module")
def truth(small_world) -> dict:
    return _json(small_world / "truth" / "truth.json")


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = generate_world(_tiny(3), tmp_path / "a", progress=False)
    b = generate_world(_tiny(3), tmp_path / "b", progress=False)
    c = generate_world(_tiny(4), tmp_path / "c", progress=False)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len(da) > 30 and da == db
    for key in ("osm/world.osm.pbf", "hr/hr.tif", "truth/classes.tif"):
        assert da[key] != dc[key], key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


# ----------------------------------------------------------------------------- OSM
def _osm_class(tags) -> str | None:
    if "building" in tags:
        return "building"
    hw = tags.get("highway")
    if hw:
        return "major_road" if hw in {"motorway", "trunk", "primary", "secondary", "tertiary"} else "road"
    if tags.get("railway") == "rail":
        return "railway"
    if tags.get("natural") == "water" or tags.get("waterway") in ("riverbank", "river"):
        return "water"
    if tags.get("landuse") == "forest":
        return "forest"
    if tags.get("natural") == "wood":
        return "wood"
    if tags.get("leisure") == "park" or tags.get("landuse") in ("grass", "meadow"):
        return "park"
    if tags.get("landuse") in ("farmland", "farmyard"):
        return "farmland"
    if tags.get("natural") == "tree":
        return "tree"
    return None


def test_pbf_reads_back_with_expected_counts_and_a_lake_with_an_island(small_world, truth):
    counts: dict[str, int] = {}
    ids = {"n": set(), "w": set(), "r": set()}
    lakes = []
    wkb = osmium.geom.WKBFactory()

    class Handler(osmium.SimpleHandler):
        def _count(self, o, kind):
            assert o.id > 0 and o.version >= 1 and o.timestamp.year >= 2023
            ids[kind].add(o.id)
            c = _osm_class(o.tags)
            if c:
                counts[c] = counts.get(c, 0) + 1

        def node(self, n):
            self._count(n, "n")

        def way(self, w):
            assert len(w.nodes) >= 2
            self._count(w, "w")

        def relation(self, r):
            assert r.tags.get("type") == "multipolygon"
            roles = {m.role for m in r.members}
            assert roles <= {"outer", "inner"} and "outer" in roles
            self._count(r, "r")

        def area(self, a):
            if a.tags.get("water") == "lake":
                lakes.append((a.from_way(), shapely.wkb.loads(bytes.fromhex(wkb.create_multipolygon(a)))))

    Handler().apply_file(str(small_world / "osm" / "world.osm.pbf"), locations=True)
    expected = {k: v for k, v in truth["feature_counts"].items() if v}
    assert counts == expected
    assert expected["building"] >= 50 and expected["road"] >= 10 and expected["major_road"] >= 3
    assert truth["osm_objects"] == {"nodes": len(ids["n"]), "ways": len(ids["w"]), "relations": len(ids["r"])}
    # the lake is assembled by osmium's area handler from a relation, with exactly one inner ring
    assert len(lakes) == 1
    from_way, geom = lakes[0]
    assert not from_way and geom.is_valid
    (poly,) = geom.geoms
    assert len(poly.interiors) == 1
    island = shapely.geometry.Polygon(poly.interiors[0])
    assert poly.exterior.convex_hull.contains(island) and not poly.contains(island.representative_point())


# ----------------------------------------------------------------------------- HR
def test_hr_geotiff_and_class_truth_are_georeferenced_on_the_z18_grid(small_world, meta, truth):
    g = pixel_size_3857(18)
    with rasterio.open(small_world / "hr" / "hr.tif") as hr, rasterio.open(small_world / "truth" / "classes.tif") as cl:
        assert hr.crs.to_epsg() == 3857 and hr.count == 3 and hr.dtypes == ("uint8",) * 3
        assert hr.res == pytest.approx((g, g), rel=1e-9) and g < 0.6
        assert list(hr.bounds) == pytest.approx(meta["bounds_3857"], abs=1e-6)
        assert hr.profile["tiled"] and hr.block_shapes[0] == (256, 256) and hr.overviews(1)
        assert hr.tags()["CAPTURE_DATE"] == meta["hr_capture_date"]
        assert cl.transform == hr.transform and cl.shape == hr.shape
        classes = cl.read(1)
        rgb = hr.read()
    frac = np.bincount(classes.ravel(), minlength=10) / classes.size
    assert set(np.unique(classes)) == set(range(10))  # every legend class is present
    assert frac == pytest.approx(
        [
            truth["class_pixel_fractions"][n]
            for n in (
                "land",
                "building",
                "road",
                "major_road",
                "railway",
                "water",
                "forest",
                "wood",
                "park",
                "farmland",
            )
        ],
        abs=1e-5,
    )
    # aerial look, not a flat map: texture inside classes and distinct class colours
    farmland = rgb[:, classes == 9].astype(float)
    assert farmland.std(axis=1).min() > 8
    water, forest = rgb[:, classes == 5].mean(axis=1), rgb[:, classes == 6].mean(axis=1)
    assert water[2] > water[0] and forest[1] > forest[0] and forest.mean() < 90
    roofs = rgb[:, classes == 1].astype(float)
    assert roofs.std(axis=1).mean() > 20  # varied roof colours and lit/shaded roof faces


def test_xyz_tiles_exist_for_every_zoom_and_line_up_with_hr(small_world, meta):
    tiles = {(int(p.parts[-3]), int(p.parts[-2]), int(p.stem)) for p in (small_world / "tiles").rglob("*.jpg")}
    z0 = meta["tile_range"]["z"]
    x0, y0, x1, y1 = meta["tile_range"]["x0_y0_x1_y1"]
    expected = set()
    for z in meta["zooms"]:
        f = 2 ** (z - z0)
        expected |= {(z, x, y) for x in range(x0 * f, (x1 + 1) * f) for y in range(y0 * f, (y1 + 1) * f)}
    assert tiles == expected and meta["zooms"] == [16, 17, 18]
    with rasterio.open(small_world / "hr" / "hr.tif") as hr:
        for z, x, y in sorted(expected)[:: max(1, len(expected) // 7)]:
            b = mercantile.xy_bounds(x, y, z)
            win = hr.window(b.left, b.bottom, b.right, b.top)
            assert win.col_off == pytest.approx(round(win.col_off), abs=1e-6)
            ref = hr.read(window=win, out_shape=(3, 256, 256), resampling=Resampling.average)
            tile = np.asarray(Image.open(small_world / "tiles" / str(z) / str(x) / f"{y}.jpg").convert("RGB"))
            assert tile.shape == (256, 256, 3)
            assert np.abs(tile.astype(float) - np.moveaxis(ref, 0, 2)).mean() < 6, (z, x, y)


# ----------------------------------------------------------------------------- Sentinel-2
def test_s2_cogs_are_georeferenced_in_utm_and_cover_the_world(small_world, meta, truth):
    wb = transform_bounds("EPSG:4326", f"EPSG:{meta['utm_epsg']}", *meta["bounds_lonlat"])
    assert len(meta["s2_items"]) == 2
    for item_id in meta["s2_items"]:
        d = small_world / "sentinel2" / item_id
        for b in BANDS:
            with rasterio.open(d / f"{b}.tif") as ds:
                assert ds.crs.to_epsg() == meta["utm_epsg"] and ds.res == (10.0, 10.0)
                assert ds.dtypes == ("uint16",) and ds.nodata == 0
                assert ds.profile["tiled"] and ds.overviews(1)
                assert ds.transform.c % 60 == 0 and ds.transform.f % 60 == 0
                assert ds.bounds.left < wb[0] - 100 and ds.bounds.right > wb[2] + 100
                assert ds.bounds.bottom < wb[1] - 100 and ds.bounds.top > wb[3] + 100
        with rasterio.open(d / "SCL.tif") as ds:
            assert ds.res == (20.0, 20.0) and ds.dtypes == ("uint8",) and ds.nodata == 0
            assert set(np.unique(ds.read(1))) <= set(range(12))
        with rasterio.open(d / "TCI.tif") as ds:
            assert ds.count == 3 and ds.dtypes == ("uint8",) * 3 and ds.res == (10.0, 10.0)
        rec = truth["s2_items"][item_id]
        if rec["nodata_corner"]:  # swath edge: no data in the NW corner of the crop, none inside the world
            with rasterio.open(d / "B04.tif") as ds:
                a = ds.read(1)
                assert a[0, 0] == 0 and (a == 0).any()
                inner = ds.read(1, window=ds.window(*wb))
                assert (inner > 0).all()


def _hr_on_s2_grid(small_world, ds) -> tuple[np.ndarray, np.ndarray]:
    """HR RGB and class truth resampled to an S2 raster's grid (average / mode)."""
    with rasterio.open(small_world / "hr" / "hr.tif") as hr, rasterio.open(small_world / "truth" / "classes.tif") as cl:
        rgb = np.zeros((3,) + ds.shape, np.float32)
        reproject(
            hr.read().astype(np.float32),
            rgb,
            src_transform=hr.transform,
            src_crs=hr.crs,
            dst_transform=ds.transform,
            dst_crs=ds.crs,
            resampling=Resampling.average,
            dst_nodata=np.nan,
        )
        cls = np.full(ds.shape, 255, np.uint8)
        reproject(
            cl.read(1),
            cls,
            src_transform=cl.transform,
            src_crs=cl.crs,
            dst_transform=ds.transform,
            dst_crs=ds.crs,
            resampling=Resampling.mode,
            dst_nodata=255,
        )
    return rgb, cls


def test_s2_radiometry_is_plausible_and_differs_from_the_hr(small_world, meta, truth):
    clear = [i for i in meta["s2_items"] if not truth["s2_items"][i]["cloudy"]][0]
    d = small_world / "sentinel2" / clear
    bands = {}
    for b in BANDS:
        with rasterio.open(d / f"{b}.tif") as ds:
            bands[b] = ds.read(1).astype(np.float32) / 10000.0  # boa offset applied: DN = reflectance x 10000
    with rasterio.open(d / "TCI.tif") as ds:
        tci = ds.read().astype(np.float32)
        hr_rgb, cls = _hr_on_s2_grid(small_world, ds)
    ndvi = (bands["B08"] - bands["B04"]) / (bands["B08"] + bands["B04"] + 1e-6)
    assert np.median(ndvi[cls == 6]) > 0.6  # forest: dark red, bright NIR
    assert np.median(ndvi[cls == 1]) < 0.4  # buildings
    assert np.median(bands["B08"][cls == 6]) > 3 * np.median(bands["B04"][cls == 6])
    inside = np.isfinite(hr_rgb).all(axis=0) & (cls != 255) & (tci > 0).all(axis=0)
    h, s = hr_rgb[:, inside], tci[:, inside]
    corr = np.corrcoef(h.mean(axis=0), s.mean(axis=0))[0, 1]
    assert corr > 0.4  # the same place ...
    assert np.abs(h - s).mean() > 12  # ... seen by a different sensor (radiometry, haze, blur)
    assert truth["s2_items"][clear]["haze_reflectance"]["B02"] > truth["s2_items"][clear]["haze_reflectance"]["B08"]
    shift = truth["s2_shift"]
    assert 0 < abs(shift["east_px"]) < 1 and 0 < abs(shift["north_px"]) < 1
    assert shift["east_m"] == pytest.approx(10 * shift["east_px"])


def test_scl_marks_the_cloud_patch_and_the_bands_show_it(small_world, meta, truth):
    cloudy = [i for i in meta["s2_items"] if truth["s2_items"][i]["cloudy"]]
    clear = [i for i in meta["s2_items"] if not truth["s2_items"][i]["cloudy"]]
    assert len(cloudy) == 1 and len(clear) == 1
    rec = truth["s2_items"][cloudy[0]]
    bbox = rec["cloud"]["bbox_utm"]
    with rasterio.open(small_world / "sentinel2" / cloudy[0] / "SCL.tif") as ds:
        scl = ds.read(1)
        win = ds.window(*bbox)
        patch = ds.read(1, window=win)
    assert (np.isin(patch, [8, 9]).mean()) > 0.3 and (scl == 9).any() and (scl == 3).any()
    with rasterio.open(small_world / "sentinel2" / clear[0] / "SCL.tif") as ds:
        assert not np.isin(ds.read(1), [3, 8, 9, 10]).any()
    with (
        rasterio.open(small_world / "sentinel2" / cloudy[0] / "B02.tif") as a,
        rasterio.open(small_world / "sentinel2" / clear[0] / "B02.tif") as b,
    ):
        sl = a.window(*bbox)
        core = np.repeat(np.repeat(patch == 9, 2, axis=0), 2, axis=1)
        ca, cb = a.read(1, window=sl), b.read(1, window=sl)
        n = min(core.shape[0], ca.shape[0]), min(core.shape[1], ca.shape[1])
        m = core[: n[0], : n[1]]
        assert ca[: n[0], : n[1]][m].mean() > 3 * cb[: n[0], : n[1]][m].mean()  # bright cloud in the bands
    items = {i: _json(small_world / "stac" / "items" / f"{i}.json") for i in meta["s2_items"]}
    assert items[cloudy[0]]["properties"]["eo:cloud_cover"] > 1.0
    assert items[clear[0]]["properties"]["eo:cloud_cover"] == 0.0


def test_stac_items_have_the_earth_search_v1_shape(small_world, meta):
    coll = pystac.Collection.from_file(str(small_world / "stac" / "collections" / "sentinel-2-l2a.json"))
    assert coll.id == "sentinel-2-l2a"
    for item_id in meta["s2_items"]:
        assert re.fullmatch(r"S2[AB]_\d{2}[C-X][A-Z]{2}_\d{8}_0_L2A", item_id)
        d = _json(small_world / "stac" / "items" / f"{item_id}.json")
        item = pystac.Item.from_dict(d)
        p = d["properties"]  # raw: pystac migrates proj:epsg to proj:code on read
        assert item.collection_id == "sentinel-2-l2a"
        assert p["proj:epsg"] == meta["utm_epsg"] and p["s2:processing_baseline"] >= "04.00"
        assert p["earthsearch:boa_offset_applied"] is True and 0 <= p["eo:cloud_cover"] <= 100
        assert p["grid:code"] == f"MGRS-{item_id.split('_')[1]}" and item_id.split("_")[1] == "32UPU"
        assert {"red", "green", "blue", "nir", "scl", "visual"} <= set(item.assets)
        for key in ("red", "green", "blue", "nir"):
            a = d["assets"][key]
            assert a["raster:bands"][0]["scale"] == 0.0001 and a["raster:bands"][0]["offset"] == -0.1
            assert a["proj:shape"] and len(a["proj:transform"]) == 6 and a["gsd"] == 10
        for a in d["assets"].values():
            assert not a["href"].startswith(("/", "http")) and (small_world / a["href"]).is_file()
            with rasterio.open(small_world / a["href"]) as ds:
                assert list(ds.shape) == a["proj:shape"] and list(ds.transform)[:6] == a["proj:transform"]
        w, s, e, n = meta["bounds_lonlat"]
        assert item.bbox[0] < w and item.bbox[1] < s and item.bbox[2] > e and item.bbox[3] > n


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"center_lat": 86.0}, "latitude"),
        ({"center_lon": 200.0}, "longitude"),
        ({"extent_m": 10.0}, "extent"),
        ({"extent_m": 1e6}, "extent"),
        ({"zooms": (16, 18)}, "zooms"),
        ({"zooms": (15, 16, 17), "hr_zoom": 17}, "HR zoom"),
        ({"hr_capture_date": "June 2022"}, "hr_capture_date"),
        ({"cloudy_dates": ("2020-01-01",)}, "cloudy_dates"),
        ({"s2_dates": ("2023-06-27", "2023-06-12")}, "s2_dates"),
        ({"s2_shift_px": (1.5, 0.0)}, "s2_shift_px"),
        ({"seed": -1}, "seed"),
    ],
)
def test_impossible_configs_raise_one_input_error(kw, needle):
    with pytest.raises(InputError, match=needle) as e:
        WorldConfig(**kw)
    assert e.value.fix


def test_foreign_or_different_out_dir_is_refused_and_same_world_is_reused(small_world, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        generate_world(_tiny(1), foreign, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        generate_world(_tiny(1), afile, progress=False)
    with pytest.raises(InputError, match="different world"):
        generate_world(WorldConfig.small(seed=99), small_world, progress=False)
    before = (small_world / "hr" / "hr.tif").stat().st_mtime_ns
    assert generate_world(WorldConfig.small(), small_world, progress=False) == small_world
    assert (small_world / "hr" / "hr.tif").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_generate_writes_a_world_and_rejects_a_bad_center(tmp_path):
    from click.testing import CliRunner

    from cmsrd.world.cli import world

    r = CliRunner().invoke(
        world, ["generate", "--out", str(tmp_path / "w"), "--small", "--extent-m", "400", "--seed", "5", "--quiet"]
    )
    assert r.exit_code == 0, r.output
    assert "S2" in r.output and (tmp_path / "w" / "world.json").is_file()
    assert _json(tmp_path / "w" / "world.json")["seed"] == 5
    r = CliRunner().invoke(world, ["generate", "--out", str(tmp_path / "v"), "--center", "11.7;48.4"])
    assert isinstance(r.exception, InputError) and "--center" in str(r.exception)
    assert not (tmp_path / "v").exists()
