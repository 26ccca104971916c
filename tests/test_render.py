"""Map rendering: exact palette colours, mask/colour agreement, geometry fidelity, ground-metre widths, CLI."""

from __future__ import annotations

import json

import geopandas as gpd
import mercantile
import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from shapely.geometry import LineString, box

from cmsrd.classes import BY_NAME, CLASSES, PROMPT_RULE
from cmsrd.errors import InputError
from cmsrd.io import read_png
from cmsrd.render import class_fractions, line_width_m, render_map
from cmsrd.sources.base import tile_bounds_3857

TILE = (17, 74617, 37940)  # central Helsinki (Kamppi / Mannerheimintie)
PALETTE = {c.rgb: c.id for c in CLASSES}


@pytest.fixture(scope="module")
def feats(shared_data):
    from cmsrd.sources.osm import OSMFeatures

    return OSMFeatures.from_pbf(shared_data / "osm" / "Helsinki.osm.pbf")


@pytest.fixture(scope="module")
def rendered(feats):
    return render_map(feats, tile_bounds_3857(*TILE), size=256)


def test_colours_are_exactly_the_palette_and_match_the_mask(rendered):
    rgb, mask = rendered
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8 and mask.shape == (256, 256)
    colours = {tuple(int(v) for v in c) for c in np.unique(rgb.reshape(-1, 3), axis=0)}
    assert colours <= set(PALETTE)
    for c in CLASSES:
        sel = mask == c.id
        assert (rgb[sel] == c.rgb).all()
    # the tile has buildings, minor and major roads: SGDM's prompt rule finds them on our map
    words = [w for w, cols in PROMPT_RULE if any((rgb == c).all(-1).any() for c in cols)]
    assert words[:2] == ["building of regular shape, ", "road, "]
    fr = class_fractions(mask)
    assert fr["building"] > 0.2 and fr["road"] > 0.02 and fr["major_road"] > 0.02
    assert sum(fr.values()) == pytest.approx(1.0)


def test_buildings_where_osm_has_buildings(feats, rendered):
    _, mask = rendered
    left, bottom, right, top = tile_bounds_3857(*TILE)
    b = feats.gdf[feats.gdf["class"] == "building"]
    union = shapely.union_all(b.geometry.intersection(box(left, bottom, right, top)).to_numpy())
    px = (right - left) / 256
    cols = left + (np.arange(256) + 0.5) * px
    rows = top - (np.arange(256) + 0.5) * px
    xx, yy = np.meshgrid(cols, rows)
    truth = shapely.contains_xy(union, xx, yy)
    got = mask == BY_NAME["building"].id  # buildings are drawn last: nothing paints over them
    iou = (truth & got).sum() / (truth | got).sum()
    assert truth.sum() > 5000 and iou > 0.98


def _road_px(lat: float, z: int = 18) -> tuple[float, float]:
    """Render one E-W residential road through a tile at `lat`; return (pixels across, ground m per px)."""
    t = mercantile.tile(10.0, lat, z)
    bounds = tile_bounds_3857(z, t.x, t.y)
    ymid = (bounds[1] + bounds[3]) / 2
    road = gpd.GeoDataFrame(
        {"class": ["road"], "kind": ["residential"]},
        geometry=[LineString([(bounds[0] - 50, ymid), (bounds[2] + 50, ymid)])],
        crs=3857,
    )
    _, mask = render_map(road, bounds, size=256)
    across = (mask[:, 128] == BY_NAME["road"].id).sum()
    lat_c = np.degrees(np.arctan(np.sinh(ymid / 6378137.0)))
    gsd = (bounds[2] - bounds[0]) / 256 * np.cos(np.radians(lat_c))
    return across, gsd


def test_line_widths_are_ground_metres_at_any_latitude():
    w = line_width_m("road", "residential")
    for lat in (0.0, 45.0, 60.17, 70.0):
        across, gsd = _road_px(lat)
        assert abs(across * gsd - w) <= gsd + 1e-9, (lat, across, gsd)
    # the same road covers ~2x more pixels at 60 N than at the equator (1/cos 60 = 2)
    assert _road_px(60.0)[0] / _road_px(0.0)[0] == pytest.approx(2.0, rel=0.1)
    assert line_width_m("major_road", "motorway") > line_width_m("road", "service") > line_width_m("road", "footway")


def test_draw_order_and_bad_input():
    bounds = (0.0, 0.0, 256.0, 256.0)
    gdf = gpd.GeoDataFrame(
        {"class": ["building", "park"], "kind": ["yes", "park"]},
        geometry=[box(64, 64, 192, 192), box(0, 0, 256, 256)],
        crs=3857,
    )
    _, mask = render_map(gdf, bounds, size=16)  # park listed last but drawn first
    assert (mask[4:12, 4:12] == BY_NAME["building"].id).all()
    assert (mask[0] == BY_NAME["park"].id).all()
    empty = gdf.iloc[:0]
    rgb, mask = render_map(empty, bounds, size=8)
    assert (mask == 0).all() and (rgb == BY_NAME["land"].rgb).all()
    with pytest.raises(InputError, match="unknown classes"):
        render_map(gdf.assign(**{"class": ["house", "park"]}), bounds, size=8)
    with pytest.raises(InputError, match="bounds"):
        render_map(gdf, (10, 0, 0, 10), size=8)


def test_map_cli_writes_map_mask_legend(shared_data, tmp_path, rendered):
    from cmsrd.cli import cli

    out = tmp_path / "out"
    tile = "_".join(map(str, TILE))
    res = CliRunner().invoke(
        cli, ["map", str(shared_data / "osm" / "Helsinki.osm.pbf"), "--tile", tile, "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    rgb = read_png(out / f"{tile}_map.png")
    mask = read_png(out / f"{tile}_mask.png", indices=True)
    np.testing.assert_array_equal(rgb, rendered[0])
    np.testing.assert_array_equal(mask, rendered[1])
    leg = json.loads((out / "legend.json").read_text())
    assert leg["building"] == {"id": 1, "rgb": [226, 224, 210], "description": BY_NAME["building"].description}
    assert {k: v["id"] for k, v in leg.items()} == {c.name: c.id for c in CLASSES}
    assert not list(out.glob(".*part"))  # atomic writes leave no temp files

    bad = CliRunner().invoke(
        cli, ["map", str(shared_data / "osm" / "Helsinki.osm.pbf"), "--tile", "17_1_1", "--out", str(out)]
    )
    assert isinstance(bad.exception, InputError) and "not the AOI" in str(bad.exception)  # run_cli prints it


def test_map_cli_reads_geoparquet(feats, tmp_path, rendered):
    from cmsrd.cli import cli

    pq = feats.to_parquet(tmp_path / "helsinki.parquet")
    tile = "_".join(map(str, TILE))
    res = CliRunner().invoke(cli, ["map", str(pq), "--tile", tile, "--size", "128", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    mask = read_png(tmp_path / "o" / f"{tile}_mask.png", indices=True)
    assert mask.shape == (128, 128)
    # half resolution of the same map: class fractions agree within a few percent
    full, half = class_fractions(rendered[1]), class_fractions(mask)
    assert all(abs(full[k] - half[k]) < 0.03 for k in full)
