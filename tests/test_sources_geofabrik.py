"""Geofabrik: smallest covering extract from index-v1.json, cached md5-checked download (loopback server)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import osmium
import pytest

from cmsrd.errors import InputError
from cmsrd.sources.geofabrik import download_extract, extract_for_aoi, find_extract, load_index, parse_index
from cmsrd.sources.http import HttpClient, RetryPolicy
from cmsrd.world.faults import FaultConfig
from cmsrd.world.servers import serve_world

BOUNDS = (11.50, 48.10, 11.56, 48.14)  # the world's own region; its parent is 2 degrees larger


def _write_world(root: Path) -> Path:
    """The part of the world-directory contract the Geofabrik endpoints use: world.json + osm/world.osm.pbf."""
    w, s, e, n = BOUNDS
    (root / "world.json").write_text(
        json.dumps({"name": "Geo Test", "bounds_lonlat": list(BOUNDS), "hr_capture_date": "2023-06-01"})
    )
    pbf = root / "osm" / "world.osm.pbf"
    pbf.parent.mkdir(parents=True)
    with osmium.SimpleWriter(str(pbf)) as wr:
        corners = [(w + 0.01, s + 0.01), (w + 0.02, s + 0.01), (w + 0.02, s + 0.02), (w + 0.01, s + 0.02)]
        for i, loc in enumerate(corners, 1):
            wr.add_node(osmium.osm.mutable.Node(id=i, version=1, location=loc, tags={}))
        wr.add_way(osmium.osm.mutable.Way(id=1, version=1, nodes=[1, 2, 3, 4, 1], tags={"building": "yes"}))
    return pbf


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("geo_world")
    pbf = _write_world(root)
    with serve_world(root) as s:
        s.pbf = pbf
        yield s


@pytest.fixture()
def client():
    with HttpClient(rate=None, retry=RetryPolicy(retries=6, backoff=0.0), sleep=lambda s: None) as c:
        yield c


def test_smallest_covering_extract_from_the_index(srv, client, tmp_path):
    extracts = load_index(srv.geofabrik_index_url, client=client, cache_dir=tmp_path)
    assert {x.id for x in extracts} == {"geo-test", "geo-test-region"}
    assert find_extract((11.52, 48.11, 11.53, 48.12), extracts).id == "geo-test"  # city AOI -> small extract
    assert find_extract((11.0, 47.5, 11.6, 48.2), extracts).id == "geo-test-region"  # spills over -> parent
    with pytest.raises(InputError, match="not covered"):
        find_extract((20.0, 50.0, 20.1, 50.1), extracts)
    with pytest.raises(InputError, match="west, south, east, north"):
        find_extract((11.6, 48.1, 11.5, 48.2), extracts)
    # the index is cached per URL: a second load does not ask the server again
    before = srv.stats.requests["geofabrik_index"]
    load_index(srv.geofabrik_index_url, client=client, cache_dir=tmp_path)
    assert srv.stats.requests["geofabrik_index"] == before


def test_covering_uses_the_real_boundary_not_the_bbox():
    # An L-shaped region: its bbox covers the AOI but its boundary does not -> the larger parent is chosen.
    l_shape = [[[0, 0], [4, 0], [4, 1], [1, 1], [1, 4], [0, 4], [0, 0]]]
    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"id": "l", "urls": {"pbf": "http://x/l.osm.pbf"}, "parent": "big"},
                "geometry": {"type": "Polygon", "coordinates": l_shape},
            },
            {
                "type": "Feature",
                "properties": {"id": "big", "urls": {"pbf": "http://x/big.osm.pbf"}},
                "geometry": {"type": "Polygon", "coordinates": [[[-1, -1], [9, -1], [9, 9], [-1, 9], [-1, -1]]]},
            },
            {
                "type": "Feature",
                "properties": {"id": "no-pbf", "urls": {}},
                "geometry": {"type": "Polygon", "coordinates": l_shape},
            },
        ],
    }
    ex = parse_index(doc)
    assert [x.id for x in ex] == ["l", "big"]
    assert find_extract((2, 2, 3, 3), ex).id == "big"
    assert find_extract((0.2, 2, 0.8, 3), ex).id == "l"
    with pytest.raises(InputError, match="FeatureCollection"):
        parse_index({"type": "Feature"})


def test_download_is_md5_checked_cached_and_repaired(srv, client, tmp_path):
    ext, path = extract_for_aoi(
        (11.52, 48.11, 11.53, 48.12), tmp_path, index_url=srv.geofabrik_index_url, client=client
    )
    assert path.read_bytes() == srv.pbf.read_bytes()
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["md5"] == hashlib.md5(srv.pbf.read_bytes()).hexdigest() and meta["md5_verified"] is True
    n = srv.stats.requests["geofabrik_pbf"]
    assert download_extract(ext, tmp_path, client=client) == path
    assert srv.stats.requests["geofabrik_pbf"] == n  # served from the cache
    path.write_bytes(b"broken")  # a damaged cached copy is detected and replaced
    download_extract(ext, tmp_path, client=client)
    assert path.read_bytes() == srv.pbf.read_bytes() and srv.stats.requests["geofabrik_pbf"] == n + 1
    assert not list(tmp_path.glob(".*part"))


def test_corrupt_and_failing_downloads_are_retried(srv, client, tmp_path):
    srv.set_faults(
        FaultConfig(
            corrupt_rate=0.4, error_rate=0.2, error_codes=(503,), seed=3, paths=("/geofabrik/geo-test-latest.osm.pbf",)
        )
    )  # PBF and its .md5
    try:
        extracts = load_index(srv.geofabrik_index_url, client=client)
        ext = find_extract((11.52, 48.11, 11.53, 48.12), extracts)
        for i in range(3):
            path = download_extract(ext, tmp_path / str(i), client=client)
            assert path.read_bytes() == srv.pbf.read_bytes()  # never a corrupt file under the final name
        assert srv.stats.faults["corrupt"] + srv.stats.faults["error"] > 0
    finally:
        srv.set_faults(None)


def test_unreachable_index_is_one_clear_error(tmp_path):
    with HttpClient(rate=None, retry=RetryPolicy(retries=0), timeout=1.0) as c:
        with pytest.raises(InputError, match="Geofabrik index"):
            load_index("http://127.0.0.1:9/index-v1.json", client=c)
