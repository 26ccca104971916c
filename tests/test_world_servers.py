"""Loopback servers of the offline world: protocol shapes real clients rely on, and every injected
fault as a client sees it.

The tests build their own tiny world that follows the `cmsrd.world` directory contract (a few JPEG
tiles, one real COG, three STAC items, a small PBF), so they do not depend on the generator.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mercantile
import numpy as np
import pytest
import requests
from PIL import Image

from cmsrd.errors import InputError
from cmsrd.world.faults import FaultConfig, decide_index, schedule
from cmsrd.world.loopback import LoopbackServer, json_response
from cmsrd.world.servers import PLACEHOLDER_RGB, serve_world

BOUNDS = (11.690, 48.395, 11.705, 48.405)  # w, s, e, n (lon/lat)
HR_DATE = "2022-06-15"
ITEMS = [  # id, datetime, cloud cover
    ("S2B_32UPU_20230612_0_L2A", "2023-06-12T10:26:01.123000Z", 31.5),
    ("S2A_32UPU_20230627_0_L2A", "2023-06-27T10:25:59.024000Z", 0.4),
    ("S2A_32UPU_20230707_0_L2A", "2023-07-07T10:26:03.500000Z", 12.0),
]
COG_ITEM = ITEMS[1][0]


def _write_world(root: Path) -> dict:
    """A small contract-conforming world; returns facts the tests check against."""
    import osmium
    import rasterio
    from rasterio.transform import from_origin

    w, s, e, n = BOUNDS
    wm = [mercantile.xy(w, s), mercantile.xy(e, n)]
    (root / "world.json").write_text(
        json.dumps(
            {
                "name": "Test World",
                "seed": 0,
                "bounds_lonlat": list(BOUNDS),
                "bounds_3857": [wm[0][0], wm[0][1], wm[1][0], wm[1][1]],
                "hr_gsd_m": 0.597,
                "zooms": [16, 17, 18],
                "utm_epsg": 32632,
                "hr_capture_date": HR_DATE,
                "s2_items": [i[0] for i in ITEMS],
                "attribution": "cmsrd offline world (synthetic)",
            }
        )
    )

    rng = np.random.default_rng(0)
    tiles = list(mercantile.tiles(w, s, e, n, zooms=[17]))
    for t in tiles:
        p = root / "tiles" / str(t.z) / str(t.x) / f"{t.y}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(p, quality=85)

    cog = root / "sentinel2" / COG_ITEM / "B04.tif"
    cog.parent.mkdir(parents=True)
    data = rng.integers(1, 10000, (1024, 1024), dtype=np.uint16)
    with rasterio.open(
        cog,
        "w",
        driver="COG",
        width=1024,
        height=1024,
        count=1,
        dtype="uint16",
        nodata=0,
        crs="EPSG:32632",
        transform=from_origin(690000, 5370000, 10, 10),
        blocksize=256,
        compress="deflate",
    ) as dst:
        dst.write(data, 1)

    (root / "stac" / "items").mkdir(parents=True)
    poly = [[[w, s], [e, s], [e, n], [w, n], [w, s]]]
    for iid, when, cc in ITEMS:
        item = {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": iid,
            "collection": "sentinel-2-l2a",
            "bbox": list(BOUNDS),
            "geometry": {"type": "Polygon", "coordinates": poly},
            "properties": {
                "datetime": when,
                "eo:cloud_cover": cc,
                "proj:epsg": 32632,
                "s2:processing_baseline": "05.09",
                "earthsearch:boa_offset_applied": True,
            },
            "links": [],
            "assets": {
                "red": {
                    "href": f"sentinel2/{iid}/B04.tif",
                    "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                    "roles": ["data"],
                }
            },
        }
        (root / "stac" / "items" / f"{iid}.json").write_text(json.dumps(item))

    pbf = root / "osm" / "world.osm.pbf"
    pbf.parent.mkdir()
    with osmium.SimpleWriter(str(pbf)) as wr:
        for i in range(1, 5):
            wr.add_node(osmium.osm.mutable.Node(id=i, version=1, location=(w + i * 1e-3, s + i * 1e-3), tags={}))
        wr.add_way(osmium.osm.mutable.Way(id=1, version=1, nodes=[1, 2, 3, 4], tags={"highway": "residential"}))
    return {"tiles": tiles, "cog": cog, "data": data, "pbf": pbf}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    facts = _write_world(root)
    return root, facts


@pytest.fixture(scope="module")
def srv(world):
    with serve_world(world[0]) as s:
        yield s


@pytest.fixture(autouse=True)
def _no_faults_after(request):
    yield
    if "srv" in request.fixturenames:
        request.getfixturevalue("srv").set_faults(None)


# ---------------------------------------------------------------------------------------------------
# Tiles and identify


def test_tile_url_is_row_before_column_with_caching_headers(srv, world):
    t = next(t for t in world[1]["tiles"] if t.x != t.y)
    url = srv.tile_template.format(z=t.z, y=t.y, x=t.x)
    assert url.endswith(f"/arcgis/rest/services/World_Imagery/MapServer/tile/{t.z}/{t.y}/{t.x}")
    r = requests.get(url, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert "max-age" in r.headers["Cache-Control"] and r.headers["ETag"]
    assert r.content == (world[0] / "tiles" / str(t.z) / str(t.x) / f"{t.y}.jpg").read_bytes()
    assert requests.get(url, headers={"If-None-Match": r.headers["ETag"]}, timeout=5).status_code == 304
    # column and row swapped is another (absent) tile: the placeholder, not this tile
    swapped = requests.get(srv.tile_template.format(z=t.z, y=t.x, x=t.y), timeout=5)
    assert swapped.status_code == 200 and swapped.content != r.content


def test_missing_tile_is_grey_placeholder_or_404_with_blanktile_false(srv, world):
    url = srv.tile_template.format(z=17, y=1, x=1)  # far outside the world
    r = requests.get(url, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert img.shape == (256, 256, 3)
    assert np.abs(img.astype(int) - PLACEHOLDER_RGB).max() <= 2  # uniform grey
    assert requests.get(url + "?blankTile=false", timeout=5).status_code == 404
    t = world[1]["tiles"][0]
    inside = srv.tile_template.format(z=t.z, y=t.y, x=t.x) + "?blankTile=false"
    assert requests.get(inside, timeout=5).status_code == 200
    assert requests.get(srv.tile_template.format(z=3, y=9, x=1), timeout=5).status_code == 400


def test_identify_returns_capture_date_inside_and_nothing_outside(srv):
    lon, lat = (BOUNDS[0] + BOUNDS[2]) / 2, (BOUNDS[1] + BOUNDS[3]) / 2
    base = {
        "geometryType": "esriGeometryPoint",
        "layers": "all",
        "tolerance": 2,
        "returnGeometry": "false",
        "mapExtent": f"{lon - 0.01},{lat - 0.01},{lon + 0.01},{lat + 0.01}",
        "imageDisplay": "400,400,96",
        "f": "json",
    }
    r = requests.get(srv.identify_url, params={**base, "geometry": f"{lon},{lat}", "sr": 4326}, timeout=5)
    res = r.json()["results"]
    assert r.status_code == 200 and len(res) == 1
    attrs = res[0]["attributes"]
    assert attrs["SRC_DATE"] == HR_DATE.replace("-", "") and len(attrs["SRC_DATE"]) == 8
    assert {"SRC_RES", "SRC_ACC", "SRC_DESC", "NICE_NAME", "NICE_DESC"} <= set(attrs)
    x, y = mercantile.xy(lon, lat)  # a JSON point in Web Mercator, as ArcGIS clients send it
    geom = json.dumps({"x": x, "y": y, "spatialReference": {"wkid": 102100}})
    r = requests.get(srv.identify_url, params={**base, "geometry": geom, "sr": 3857}, timeout=5)
    assert r.json()["results"][0]["attributes"]["SRC_DATE"] == "20220615"
    form = requests.post(srv.identify_url, data={**base, "geometry": f"{lon},{lat}", "sr": 4326}, timeout=5)
    assert form.json()["results"][0]["attributes"]["SRC_DATE"] == "20220615"  # ArcGIS clients also POST forms
    out = requests.get(srv.identify_url, params={**base, "geometry": "0,0", "sr": 4326}, timeout=5)
    assert out.status_code == 200 and out.json() == {"results": []}
    bad = requests.get(srv.identify_url, params={"geometry": "nowhere", "f": "json"}, timeout=5)
    assert bad.status_code == 400 and "geometry" in bad.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------------
# STAC


def test_pystac_client_search_filters_sorts_and_pages(srv):
    from pystac_client import Client

    client = Client.open(srv.stac_url)
    assert client.conforms_to("ITEM_SEARCH") and client.conforms_to("QUERY") and client.conforms_to("SORT")
    for method in ("POST", "GET"):
        search = client.search(
            collections=["sentinel-2-l2a"],
            bbox=list(BOUNDS),
            method=method,
            datetime="2023-06-01/2023-07-31",
            query={"eo:cloud_cover": {"lt": 20}},
            sortby="-properties.datetime",
            limit=1,
        )
        pages = list(search.pages())
        assert len(pages) == 2  # limit 1, two matches -> paged through the next link
        assert [it.id for it in search.items()] == [ITEMS[2][0], ITEMS[1][0]]
    by_cloud = client.search(bbox=list(BOUNDS), sortby="properties.eo:cloud_cover", limit=2)
    assert [it.properties["eo:cloud_cover"] for it in by_cloud.items()] == [0.4, 12.0, 31.5]
    assert by_cloud.matched() == 3
    item = next(client.search(ids=[COG_ITEM]).items())
    assert item.assets["red"].href == f"{srv.files_url}/sentinel2/{COG_ITEM}/B04.tif"
    point = {"type": "Point", "coordinates": [BOUNDS[0] + 0.001, BOUNDS[1] + 0.001]}
    assert client.search(intersects=point).matched() == 3
    assert client.search(intersects={"type": "Point", "coordinates": [0, 0]}).matched() == 0
    coll = client.get_collection("sentinel-2-l2a")
    assert sorted(it.id for it in coll.get_items()) == sorted(i[0] for i in ITEMS)


@pytest.mark.parametrize(
    "dt, expected",
    [
        ("2023-06-27T10:25:59.024Z", [ITEMS[1][0]]),  # instant
        ("2023-06-13T00:00:00Z/..", [ITEMS[2][0], ITEMS[1][0]]),  # open end
        ("../2023-06-27T00:00:00Z", [ITEMS[0][0]]),  # open start
        ("2023-06-12T00:00:00Z/2023-06-30T00:00:00Z", [ITEMS[1][0], ITEMS[0][0]]),
    ],
)
def test_search_datetime_instants_and_intervals(srv, dt, expected):
    r = requests.post(srv.stac_url + "/search", json={"datetime": dt}, timeout=5)
    assert [f["id"] for f in r.json()["features"]] == expected


def test_search_rejects_bad_parameters_with_a_clear_400(srv):
    url = srv.stac_url + "/search"
    cases = [
        {"bbox": [1, 2, 3]},
        {"datetime": "yesterday"},
        {"datetime": "../.."},
        {"query": {"eo:cloud_cover": {"approx": 3}}},
        {"limit": 0},
        {"filter": {"op": "<", "args": [{"property": "eo:cloud_cover"}, 5]}},
    ]
    for body in cases:
        r = requests.post(url, json=body, timeout=5)
        assert r.status_code == 400 and r.json()["description"], body
    first = requests.post(url, json={"limit": 1}, timeout=5).json()
    token = next(lk for lk in first["links"] if lk["rel"] == "next")["body"]["next"]
    other = requests.post(url, json={"limit": 1, "ids": [COG_ITEM], "next": token}, timeout=5)
    assert other.status_code == 400 and "different search" in other.json()["description"]
    assert requests.get(srv.stac_url + "/collections/nope", timeout=5).status_code == 404


# ---------------------------------------------------------------------------------------------------
# Files, COG range reads, Geofabrik


def test_rasterio_vsicurl_reads_a_window_with_range_requests(srv, world):
    import rasterio
    from rasterio.windows import Window

    srv.stats.reset()
    href = f"{srv.files_url}/sentinel2/{COG_ITEM}/B04.tif"
    env = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "VSI_CACHE": "FALSE", "CPL_VSIL_CURL_CACHE_SIZE": "0"}
    with rasterio.Env(**env), rasterio.open("/vsicurl/" + href) as ds:
        assert ds.crs.to_epsg() == 32632 and ds.nodata == 0
        win = ds.read(1, window=Window(300, 500, 64, 64))
    np.testing.assert_array_equal(win, world[1]["data"][500:564, 300:364])
    stats = srv.stats
    assert stats.ranges["files"] >= 1
    assert stats.full_downloads["files"] == 0
    assert stats.bytes_sent["files"] < world[1]["cog"].stat().st_size / 2


def test_files_support_range_head_etag_416_and_refuse_traversal(srv, world):
    url = f"{srv.files_url}/osm/world.osm.pbf"
    full = world[1]["pbf"].read_bytes()
    r = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert r.status_code == 206 and r.content == full[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(full)}"
    assert requests.get(url, headers={"Range": "bytes=-5"}, timeout=5).content == full[-5:]
    r416 = requests.get(url, headers={"Range": f"bytes={len(full)}-"}, timeout=5)
    assert r416.status_code == 416 and r416.headers["Content-Range"] == f"bytes */{len(full)}"
    multi = requests.get(url, headers={"Range": "bytes=0-1,5-6"}, timeout=5)
    assert multi.status_code == 200 and multi.content == full
    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(full)
    assert head.headers["Accept-Ranges"] == "bytes" and head.content == b""
    assert requests.get(url, headers={"If-None-Match": head.headers["ETag"]}, timeout=5).status_code == 304
    for raw in ("/files/../../etc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd", "/files//etc/passwd"):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
        conn.request("GET", raw)
        assert conn.getresponse().status in (403, 404), raw
        conn.close()


def test_geofabrik_index_lists_parent_and_world_region_with_downloadable_pbf(srv, world):
    import osmium

    index = requests.get(srv.geofabrik_index_url, timeout=5).json()
    assert index["type"] == "FeatureCollection"
    feats = {f["properties"]["id"]: f for f in index["features"]}
    child = next(f for f in feats.values() if "parent" in f["properties"])
    parent = feats[child["properties"]["parent"]]
    assert child["geometry"]["type"] == parent["geometry"]["type"] == "MultiPolygon"
    ring = np.array(child["geometry"]["coordinates"][0][0])
    assert tuple(ring.min(0)) + tuple(ring.max(0)) == pytest.approx(BOUNDS)
    pring = np.array(parent["geometry"]["coordinates"][0][0])
    assert (pring.min(0) < ring.min(0)).all() and (pring.max(0) > ring.max(0)).all()
    full = world[1]["pbf"].read_bytes()
    for f in (child, parent):
        pbf_url = f["properties"]["urls"]["pbf"]
        body = requests.get(pbf_url, timeout=5).content
        assert body == full
        md5_line = requests.get(pbf_url + ".md5", timeout=5).text
        assert md5_line.split()[0] == hashlib.md5(body).hexdigest()
        assert md5_line.split()[1] == pbf_url.rsplit("/", 1)[1]
    fc = osmium.FileProcessor(str(world[1]["pbf"]))
    assert sum(1 for _ in fc) == 5


# ---------------------------------------------------------------------------------------------------
# Faults, each observed by a client


def _tile_url(srv, world):
    t = world[1]["tiles"][0]
    return srv.tile_template.format(z=t.z, y=t.y, x=t.x)


def test_latency_is_added(srv, world):
    url = _tile_url(srv, world)
    t0 = time.perf_counter()
    requests.get(url, timeout=5)
    base = time.perf_counter() - t0
    srv.set_faults(FaultConfig(latency_s=0.3))
    t0 = time.perf_counter()
    assert requests.get(url, timeout=5).status_code == 200
    assert time.perf_counter() - t0 >= 0.3 > base
    assert srv.stats.faults["latency"] >= 1


@pytest.mark.parametrize("code", [429, 500, 503])
def test_error_statuses_and_retry_after(srv, world, code):
    srv.set_faults(FaultConfig(error_rate=1.0, error_codes=(code,), retry_after_s=7))
    r = requests.get(_tile_url(srv, world), timeout=5)
    assert r.status_code == code and r.json()["error"]["code"] == code
    if code == 429:
        assert r.headers["Retry-After"] == "7"


def test_timeout_holds_the_connection_until_the_client_gives_up(srv, world):
    srv.set_faults(FaultConfig(timeout_rate=1.0, timeout_s=3.0))
    t0 = time.perf_counter()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(_tile_url(srv, world), timeout=0.4)
    assert time.perf_counter() - t0 < 2.5
    assert srv.stats.faults["timeout"] >= 1


def test_corrupt_body_keeps_length_but_fails_to_parse(srv, world):
    url = _tile_url(srv, world)
    good = requests.get(url, timeout=5).content
    srv.set_faults(FaultConfig(corrupt_rate=1.0))
    bad = requests.get(url, timeout=5)
    assert bad.status_code == 200 and len(bad.content) == len(good) == int(bad.headers["Content-Length"])
    assert hashlib.sha256(bad.content).digest() != hashlib.sha256(good).digest()
    with pytest.raises((OSError, SyntaxError, ValueError)):  # PIL's errors for a corrupt PNG
        Image.open(io.BytesIO(bad.content)).load()
    with pytest.raises(ValueError):
        requests.get(srv.stac_url, timeout=5).json()


def test_truncated_body_is_an_incomplete_read(srv, world):
    srv.set_faults(FaultConfig(truncate_rate=1.0))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(_tile_url(srv, world), timeout=5)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(srv.stac_url + "/search", timeout=5)
    assert srv.stats.faults["truncate"] == 2


def test_faults_limited_to_path_prefixes(srv, world):
    srv.set_faults(FaultConfig(error_rate=1.0, error_codes=(503,), paths=("/arcgis/",)))
    assert requests.get(_tile_url(srv, world), timeout=5).status_code == 503
    assert requests.get(srv.stac_url, timeout=5).status_code == 200


def _outcomes(url: str, n: int) -> list[str]:
    out = []
    with requests.Session() as s:
        for _ in range(n):
            try:
                r = s.get(url, timeout=5)
                out.append(str(r.status_code) if r.status_code != 200 else hashlib.md5(r.content).hexdigest()[:8])
            except requests.RequestException as e:
                out.append(type(e).__name__)
    return out


def test_fault_sequence_is_deterministic_from_the_seed(world):
    cfg = FaultConfig(error_rate=0.25, corrupt_rate=0.2, truncate_rate=0.15, seed=42)
    runs = []
    for _ in range(2):
        with serve_world(world[0], faults=cfg) as s:
            runs.append(_outcomes(_tile_url(s, world), 24))
    assert runs[0] == runs[1]
    kinds = schedule(cfg, 24)
    assert len({k for k in kinds}) >= 4  # the sequence mixes clean replies and several faults
    t = world[1]["tiles"][0]
    clean = hashlib.md5((world[0] / "tiles" / str(t.z) / str(t.x) / f"{t.y}.jpg").read_bytes()).hexdigest()[:8]
    for outcome, kind in zip(runs[0], kinds):
        if kind and kind.startswith("error:"):
            assert outcome == kind.split(":")[1]
        elif kind == "truncate":
            assert outcome == "ChunkedEncodingError"
        elif kind == "corrupt":
            assert len(outcome) == 8 and outcome != clean
        else:
            assert outcome == clean
    assert schedule(FaultConfig(error_rate=0.25, corrupt_rate=0.2, truncate_rate=0.15, seed=43), 24) != kinds
    assert decide_index(cfg, 5) == decide_index(cfg, 5)


def test_stats_count_concurrent_requests(srv, world):
    srv.stats.reset()
    url = _tile_url(srv, world)
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: requests.get(url, timeout=5).status_code, range(40)))
    assert codes == [200] * 40 and srv.stats.requests["tile"] == 40 and srv.stats.statuses[200] == 40


# ---------------------------------------------------------------------------------------------------
# Bad input and the reusable base


def test_port_in_use_is_an_input_error_naming_the_port(world):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port}"):
            with serve_world(world[0], port=port):
                pass


def test_bad_world_dir_and_bad_fault_config_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="world.json"):
        with serve_world(tmp_path):
            pass
    with pytest.raises(InputError, match="error_rate"):
        FaultConfig(error_rate=1.5)
    with pytest.raises(InputError, match="sum"):
        FaultConfig(error_rate=0.6, corrupt_rate=0.6)
    with pytest.raises(InputError, match="error_codes"):
        FaultConfig(error_rate=0.1, error_codes=(200,))


def test_loopback_base_routes_custom_endpoints_with_faults():
    class Echo(LoopbackServer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.add_route("echo", "POST", r"/api/v1/echo", lambda req: json_response(req.json()))

    with Echo(faults=FaultConfig(error_rate=1.0, error_codes=(429,))) as s:
        assert requests.post(s.base_url + "/api/v1/echo", json={"a": 1}, timeout=5).status_code == 429
        s.set_faults(None)
        assert requests.post(s.base_url + "/api/v1/echo", json={"a": 1}, timeout=5).json() == {"a": 1}
        assert requests.get(s.base_url + "/api/v1/echo", timeout=5).status_code == 405
        assert requests.post(s.base_url + "/api/v1/echo", data=b"{not json", timeout=5).status_code == 400
        assert s.stats.requests["echo"] == 3 and s.stats.requests["-"] == 1 and s.stats.faults["error:429"] == 1


def test_serve_command_prints_urls_serves_and_stops_on_ctrl_c(world):
    import signal
    import subprocess
    import sys

    code = "from cmsrd.world.cli import serve_command; serve_command()"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            str(world[0]),
            "--error-rate",
            "1",
            "--error-codes",
            "503",
            "--fault-path",
            "/stac/",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("serving ") and " at http://127.0.0.1:" in first
        urls = dict(proc.stdout.readline().split() for _ in range(5))
        assert urls["stac"].endswith("/stac/v1") and "{z}/{y}/{x}" in urls["tiles"]
        assert requests.get(urls["stac"], timeout=5).status_code == 503
        assert requests.get(urls["geofabrik"], timeout=5).json()["type"] == "FeatureCollection"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------------
# Integration with the generated world (`small_world` from cmsrd.world.generate, served by `world_server`)


def test_generated_world_stac_items_and_assets_resolve(world_server, small_world):
    from pystac_client import Client

    meta = json.loads((small_world / "world.json").read_text())
    items = list(
        Client.open(world_server.stac_url)
        .search(collections=["sentinel-2-l2a"], bbox=meta["bounds_lonlat"], sortby="properties.eo:cloud_cover")
        .items()
    )
    assert sorted(it.id for it in items) == sorted(meta["s2_items"])
    covers = [it.properties["eo:cloud_cover"] for it in items]
    assert covers == sorted(covers)
    for it in items:
        assert {"red", "green", "blue", "nir", "scl", "visual"} <= set(it.assets)
        for asset in it.assets.values():
            assert asset.href.startswith(world_server.files_url + "/")
            head = requests.head(asset.href, timeout=5)
            assert head.status_code == 200 and head.headers["Accept-Ranges"] == "bytes", asset.href


def test_generated_world_cog_window_through_vsicurl_matches_local(world_server, small_world):
    import rasterio
    from rasterio.windows import Window

    meta = json.loads((small_world / "world.json").read_text())
    iid = meta["s2_items"][-1]
    href = f"{world_server.files_url}/sentinel2/{iid}/B04.tif"
    before = world_server.stats.snapshot()  # the fixture is shared: compare, do not reset
    win = Window(8, 8, 48, 48)
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open("/vsicurl/" + href) as ds:
        remote = ds.read(1, window=win)
    with rasterio.open(small_world / "sentinel2" / iid / "B04.tif") as ds:
        local = ds.read(1, window=win)
    np.testing.assert_array_equal(remote, local)
    after = world_server.stats.snapshot()
    assert after["ranges"].get("files", 0) > before["ranges"].get("files", 0)
    assert after["full_downloads"].get("files", 0) == before["full_downloads"].get("files", 0)


def test_generated_world_tiles_identify_and_geofabrik(world_server, small_world, tmp_path):
    import osmium

    meta = json.loads((small_world / "world.json").read_text())
    x0, y0, x1, y1 = meta["tile_range"]["x0_y0_x1_y1"]
    z = meta["tile_range"]["z"]
    for x in range(x0, x1 + 1):
        for y in range(y0, y1 + 1):
            r = requests.get(world_server.tile_template.format(z=z, y=y, x=x) + "?blankTile=false", timeout=5)
            assert r.status_code == 200
            assert r.content == (small_world / "tiles" / str(z) / str(x) / f"{y}.jpg").read_bytes()
    outside = world_server.tile_template.format(z=z, y=y1 + 1, x=x0)
    assert requests.get(outside + "?blankTile=false", timeout=5).status_code == 404
    assert requests.get(outside, timeout=5).status_code == 200
    w, s, e, n = meta["bounds_lonlat"]
    r = requests.get(
        world_server.identify_url,
        timeout=5,
        params={
            "geometry": f"{(w + e) / 2},{(s + n) / 2}",
            "geometryType": "esriGeometryPoint",
            "sr": 4326,
            "f": "json",
        },
    )
    assert r.json()["results"][0]["attributes"]["SRC_DATE"] == meta["hr_capture_date"].replace("-", "")
    index = requests.get(world_server.geofabrik_index_url, timeout=5).json()
    child = next(f for f in index["features"] if "parent" in f["properties"])
    ring = np.array(child["geometry"]["coordinates"][0][0])
    assert tuple(ring.min(0)) + tuple(ring.max(0)) == pytest.approx(tuple(meta["bounds_lonlat"]))
    body = requests.get(child["properties"]["urls"]["pbf"], timeout=10).content
    assert body == (small_world / "osm" / "world.osm.pbf").read_bytes()
    dl = tmp_path / "download.osm.pbf"
    dl.write_bytes(body)
    assert any(o.is_way() and "highway" in o.tags for o in osmium.FileProcessor(str(dl)))
