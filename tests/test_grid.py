"""Tile math, deterministic sampling inside AOIs, and the spatially blocked split."""

from __future__ import annotations

import math

import mercantile
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point, Polygon, box

from cmsrd.errors import InputError
from cmsrd.grid import (
    AOI,
    assign_split,
    candidate_tiles,
    ground_gsd_m,
    lonlat_to_tile_xy,
    sample_tiles,
    tile_bounds_3857,
    tile_bounds_3857_arrays,
    tile_center_lonlat,
    tile_xy_to_lonlat,
    tiles_in_polygon,
    tiles_touch,
    zoom_for_gsd,
)

PARIS = box(2.29, 48.83, 2.41, 48.90)
# An L-shaped AOI (a polygon, not a box) so "inside" is really tested.
L_SHAPE = Polygon([(11.60, 48.38), (11.64, 48.38), (11.64, 48.39), (11.61, 48.39), (11.61, 48.41), (11.60, 48.41)])


def test_tile_bounds_match_mercantile_and_vectorised_form():
    tiles = [(18, 132740, 90137), (18, 0, 0), (18, 2**18 - 1, 2**18 - 1), (16, 34900, 22600)]
    for z, x, y in tiles:
        b = mercantile.xy_bounds(x, y, z)
        assert tile_bounds_3857(z, x, y) == pytest.approx((b.left, b.bottom, b.right, b.top), abs=1e-6)
    arr = tile_bounds_3857_arrays(18, np.array([132740, 0]), np.array([90137, 0]))
    assert arr[0] == pytest.approx(tile_bounds_3857(18, 132740, 90137), abs=1e-6)
    assert arr[1] == pytest.approx(tile_bounds_3857(18, 0, 0), abs=1e-6)


def test_lonlat_tile_round_trip_and_centres():
    lon = np.array([2.35, -111.9, 139.7, 18.45])
    lat = np.array([48.86, 33.3, 35.68, -33.92])
    fx, fy = lonlat_to_tile_xy(lon, lat, 18)
    back_lon, back_lat = tile_xy_to_lonlat(fx, fy, 18)
    assert back_lon == pytest.approx(lon, abs=1e-9) and back_lat == pytest.approx(lat, abs=1e-9)
    for lo, la, x, y in zip(lon, lat, fx.astype(int), fy.astype(int)):
        assert mercantile.tile(lo, la, 18) == mercantile.Tile(int(x), int(y), 18)
    c = tile_center_lonlat(18, 132740, 90137)
    b = mercantile.bounds(132740, 90137, 18)
    assert b.west < c[0] < b.east and b.south < c[1] < b.north


def test_ground_gsd_and_zoom_for_gsd():
    # z18, 256 px: 0.597 m at the equator, half of it at 60 degrees.
    assert ground_gsd_m(18, 0.0) == pytest.approx(0.5972, abs=1e-4)
    assert ground_gsd_m(18, 60.0) == pytest.approx(0.5972 / 2, abs=1e-4)
    assert zoom_for_gsd(0.6, 0.0) == 18
    assert zoom_for_gsd(1.2, 0.0) == 17
    with pytest.raises(InputError):
        zoom_for_gsd(0.0, 10.0)


def test_tiles_in_polygon_keeps_only_centres_inside():
    xy = tiles_in_polygon(L_SHAPE, 18)
    assert len(xy) > 50
    lon, lat = tile_xy_to_lonlat(xy[:, 0] + 0.5, xy[:, 1] + 0.5, 18)
    assert all(L_SHAPE.contains(Point(a, b)) for a, b in zip(lon, lat))
    # Area check: the number of tiles matches the polygon's area in tile units to within the boundary ring.
    fx, fy = lonlat_to_tile_xy(np.array(L_SHAPE.exterior.xy[0]), np.array(L_SHAPE.exterior.xy[1]), 18)
    area_tiles = Polygon(zip(fx, fy)).area
    assert abs(len(xy) - area_tiles) < 0.1 * area_tiles
    # The notch of the L holds no tile.
    notch = box(11.612, 48.3905, 11.64, 48.41)
    assert not any(notch.contains(Point(a, b)) for a, b in zip(lon, lat))


def test_overlapping_aois_yield_each_tile_once_first_aoi_wins():
    a = AOI("a", box(2.30, 48.84, 2.32, 48.86))
    b = AOI("b", box(2.31, 48.85, 2.33, 48.87))
    xy, idx = candidate_tiles([a, b], 18)
    keys = set(map(tuple, xy.tolist()))
    assert len(keys) == len(xy)
    only_a = set(map(tuple, tiles_in_polygon(a.geometry, 18).tolist()))
    assert {tuple(t) for t, i in zip(xy.tolist(), idx) if i == 0} == only_a


def test_sampling_is_deterministic_distinct_and_inside():
    aois = [AOI("paris", PARIS), AOI("l", L_SHAPE)]
    s1 = sample_tiles(aois, 18, 500, seed=7, block_tiles=8, test_fraction=0.1)
    s2 = sample_tiles(aois, 18, 500, seed=7, block_tiles=8, test_fraction=0.1)
    s3 = sample_tiles(aois, 18, 500, seed=8, block_tiles=8, test_fraction=0.1)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert set(zip(s1["x"], s1["y"])) != set(zip(s3["x"], s3["y"]))
    assert len(set(zip(s1["x"].tolist(), s1["y"].tolist()))) == 500
    assert (s1["split"] == "test").sum() == 50 and (s1["split"] == "train").sum() == 450
    lon, lat = tile_xy_to_lonlat(s1["x"] + 0.5, s1["y"] + 0.5, 18)
    geoms = [PARIS, L_SHAPE]
    assert all(geoms[i].contains(Point(a, b)) for i, a, b in zip(s1["aoi"], lon, lat))


@pytest.mark.parametrize("block_tiles", [1, 2, 5, 16])
def test_blocked_split_test_never_touches_train(block_tiles):
    xy = tiles_in_polygon(PARIS, 18)
    bx, by, split = assign_split(xy[:, 0], xy[:, 1], block_tiles, 0.2, seed=3)
    train = xy[split == "train"]
    test = xy[split == "test"]
    assert len(test) and len(train)
    assert not tiles_touch(map(tuple, test.tolist()), map(tuple, train.tolist()))
    # Whole blocks: every block is entirely test or entirely non-test.
    df = pd.DataFrame({"bx": bx, "by": by, "test": split == "test"})
    assert (df.groupby(["bx", "by"])["test"].nunique() == 1).all()
    # Roughly the asked share of blocks is test.
    blocks = df.groupby(["bx", "by"])["test"].first()
    assert 0.1 < blocks.mean() < 0.3


def test_split_of_a_tile_does_not_depend_on_the_other_tiles():
    xy = tiles_in_polygon(PARIS, 18)
    _, _, full = assign_split(xy[:, 0], xy[:, 1], 8, 0.2, seed=1)
    _, _, part = assign_split(xy[::7, 0], xy[::7, 1], 8, 0.2, seed=1)
    assert np.array_equal(full[::7], part)


def test_sample_count_larger_than_aois_hold_is_one_clear_error():
    tiny = AOI("tiny", box(2.350, 48.850, 2.352, 48.851))  # a handful of z18 tiles
    with pytest.raises(InputError, match="samples.*hold only"):
        sample_tiles([tiny], 18, 1000, seed=0)


def test_tiles_touch_detects_corners():
    assert tiles_touch([(5, 5)], [(6, 6)])
    assert tiles_touch([(5, 5)], [(5, 4)])
    assert not tiles_touch([(5, 5)], [(7, 5)])
    assert math.isclose(ground_gsd_m(17, 0.0), 2 * ground_gsd_m(18, 0.0))
