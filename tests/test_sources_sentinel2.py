"""Sentinel-2 LR through STAC: radiometry recipes, real decimated COGs + Earth Search item, recorded Earth
Search responses replayed from loopback, the offline world's STAC API (ranking, cloud, faults) and
Planetary Computer-style signing."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import mercantile
import numpy as np
import pytest

from cmsrd.errors import InputError, SampleError
from cmsrd.sources.base import LRSource
from cmsrd.sources.http import RetryPolicy
from cmsrd.sources.sentinel2 import (
    GAIN,
    Sentinel2STAC,
    reflectance_recipe,
    to_uint8,
)

pytestmark = pytest.mark.timeout(120)

S2_DIR = "sentinel2/S2A_29RKH_20200219_0_L2A"


# ----------------------------------------------------------------------------------------------------
# Radiometry


@pytest.mark.parametrize(
    "props,collection,catalog,offset",
    [
        (
            {"s2:processing_baseline": "02.14", "earthsearch:boa_offset_applied": False},
            "sentinel-2-l2a",
            "earth-search",
            0.0,
        ),
        (
            {"s2:processing_baseline": "05.09", "earthsearch:boa_offset_applied": True},
            "sentinel-2-l2a",
            "earth-search",
            0.0,
        ),
        (
            {"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False},
            "sentinel-2-l2a",
            "earth-search",
            -0.1,
        ),
        ({"s2:processing_baseline": "05.11"}, "sentinel-2-c1-l2a", "earth-search", -0.1),
        ({"s2:processing_baseline": "03.01"}, "sentinel-2-c1-l2a", "earth-search", 0.0),
        ({"s2:processing_baseline": "05.09"}, "sentinel-2-l2a", "planetary-computer", -0.1),
    ],
)
def test_reflectance_recipe(props, collection, catalog, offset):
    asset = {"raster:bands": [{"scale": 0.0001, "offset": -0.1}]}  # what every asset says, applied or not
    r = reflectance_recipe(props, collection, catalog, asset)
    assert r.scale == 1e-4 and r.offset == offset
    refl = r.apply(np.array([0, 1000, 3000], np.uint16))
    assert np.isnan(refl[0]) and refl[2] == pytest.approx(0.3 + offset)
    assert "DN * 0.0001" in r.text() and f"{GAIN:g}" in r.text()


def test_recipe_without_baseline_is_a_recorded_failure():
    with pytest.raises(SampleError) as ei:
        reflectance_recipe({}, "sentinel-2-l2a")
    assert ei.value.reason == "lr_unknown_baseline"


def test_to_uint8_fixed_gain():
    np.testing.assert_array_equal(to_uint8(np.array([np.nan, 0.0, 0.2, 0.4, 0.9], np.float32)), [0, 0, 128, 255, 255])


# ----------------------------------------------------------------------------------------------------
# Real decimated COGs with their Earth Search item (EPSG:32629, baseline 02.14)


@pytest.fixture(scope="module")
def real_item(shared_data):
    """The real item with each asset's proj:shape/proj:transform set to the sample COGs' grid: the files are
    the real ones decimated 10x, so the original item's grid (which the reader checks headers against) no
    longer describes them."""
    import rasterio

    d = shared_data / S2_DIR
    item = json.loads((d / "item.json").read_text())
    for asset in item["assets"].values():
        path = d / Path(asset.get("href", "")).name
        if path.suffix == ".tif" and path.is_file():
            with rasterio.open(path) as ds:
                asset["proj:shape"] = [ds.height, ds.width]
                asset["proj:transform"] = list(ds.transform)[:6]
    return d, item


def _real_source(d: Path, **kw) -> Sentinel2STAC:
    return Sentinel2STAC(href_map=lambda h: str(d / Path(h).name), rate=None, **kw)


def test_real_cogs_through_the_same_code(real_item):
    import rasterio
    from rasterio.warp import transform_bounds

    d, item = real_item
    w, s, e, n = item["bbox"]
    t = mercantile.tile((w + e) / 2, (s + n) / 2, 13)  # ~4.4 km: 44 decimated pixels across
    src = _real_source(d, gain=1.5)  # bright desert: the default gain (2.5) saturates above 0.4
    assert isinstance(src, LRSource)
    lr = src.fetch(t.z, t.x, t.y, lr_px=16, hr_date="2020-02-25", items=[item])
    assert lr.scene_id == "S2A_29RKH_20200219_0_L2A" and lr.baseline == "02.14"
    assert lr.days_from_hr == 6 and lr.scene_cloud_cover == pytest.approx(4.051854)
    assert "DN * 0.0001 (" in lr.radiometry and "no BOA offset" in lr.radiometry
    assert lr.image.shape == (16, 16, 3) and lr.image.dtype == np.uint8
    assert lr.native.dtype == np.float32 and lr.native.shape[2] == 3 and lr.native.shape[0] > 16
    assert lr.cloud_fraction <= 0.05
    # Reflectance is DN * 1e-4 of the footprint window (desert: ~0.2-0.4), checked independently.
    with rasterio.open(d / "B04.tif") as b04:
        win = rasterio.windows.from_bounds(
            *transform_bounds("EPSG:4326", b04.crs, *mercantile.bounds(t)), transform=b04.transform
        )
        dn = b04.read(1, window=win).astype(float)
    assert np.nanmean(lr.native[..., 0]) == pytest.approx(dn[dn > 0].mean() * 1e-4, rel=0.03)
    # The LR agrees with ESA's own true-colour product (TCI) over the same footprint (blue: TCI's red
    # and green saturate over this desert).
    with rasterio.open(d / "TCI.tif") as tci:
        win = rasterio.windows.from_bounds(
            *transform_bounds("EPSG:4326", tci.crs, *mercantile.bounds(t)), transform=tci.transform
        )
        ref = tci.read(3, window=win, out_shape=(16, 16)).astype(float)
    assert (lr.image == 255).mean() < 0.05 and lr.image.std() > 2
    assert ref.std() > 2 and np.corrcoef(ref.ravel(), lr.image[..., 2].astype(float).ravel())[0, 1] > 0.8


def test_real_item_c1_variant_applies_offset(real_item):
    d, item = real_item
    w, s, e, n = item["bbox"]
    t = mercantile.tile((w + e) / 2, (s + n) / 2, 13)
    c1 = copy.deepcopy(item)
    c1["collection"] = "sentinel-2-c1-l2a"
    c1["properties"]["s2:processing_baseline"] = "05.11"
    c1["properties"].pop("earthsearch:boa_offset_applied")
    src = Sentinel2STAC(collection="sentinel-2-c1-l2a", href_map=lambda h: str(d / Path(h).name), rate=None)
    lr_c1 = src.fetch(t.z, t.x, t.y, items=[c1])
    lr = _real_source(d).fetch(t.z, t.x, t.y, items=[item])
    np.testing.assert_allclose(lr_c1.native, lr.native - 0.1, atol=1e-5)
    assert "- 0.1" in lr_c1.radiometry


def test_real_item_errors(real_item):
    d, item = real_item
    src = _real_source(d)
    with pytest.raises(SampleError) as ei:  # far away from the scene
        src.fetch(13, 100, 100, items=[item])
    assert ei.value.reason == "lr_no_scene"
    w, s, e, n = item["bbox"]
    t = mercantile.tile((w + e) / 2, (s + n) / 2, 13)
    with pytest.raises(SampleError) as ei:  # outside the date window
        src.fetch(t.z, t.x, t.y, hr_date="2021-06-01", items=[item])
    assert ei.value.reason == "lr_no_scene"
    with pytest.raises(InputError, match="hr_date"):
        src.fetch(t.z, t.x, t.y)
    with pytest.raises(InputError, match="STAC URL"):
        Sentinel2STAC("earth-search.example")


# ----------------------------------------------------------------------------------------------------
# Recorded Earth Search responses, replayed from loopback


def _replay_server(cassettes: list[Path]):
    """A loopback STAC API answering with recorded Earth Search bodies (next pages by their token)."""
    import yaml

    from cmsrd.world.loopback import HTTPError, LoopbackServer, Response

    landing, pages = None, []
    for c in cassettes:
        for it in yaml.safe_load(c.read_text())["interactions"]:
            body = it["response"]["body"]["string"]
            req = it["request"]
            if req["method"] == "GET" and req["uri"].rstrip("/").endswith("/v1"):
                landing = body
            elif req["uri"].endswith("/search"):
                pages.append((json.loads(req["body"] or "{}").get("next"), body))
    srv = LoopbackServer()
    real = "https://earth-search.aws.element84.com"

    def rewrite(text: str) -> bytes:
        return text.replace(real, srv.base_url).encode()

    def landing_h(req):
        return Response(body=rewrite(landing), content_type="application/json")

    def search_h(req):
        token = (req.json() or {}).get("next") if req.method == "POST" else req.query.get("next")
        for tok, body in pages:
            if tok == token:
                return Response(body=rewrite(body), content_type="application/geo+json")
        raise HTTPError(400, f"no recorded page for {token!r}")

    srv.add_route("landing", "GET", r"/v1/?", landing_h)
    srv.add_route("search", ("GET", "POST"), r"/v1/search", search_h)
    return srv


def test_recorded_earth_search_2025_pages_and_recipes(shared_data):
    rec = shared_data / "stac-recordings"
    with _replay_server([rec / "earth-search-v1-search-2025.yaml"]) as srv:
        s2 = Sentinel2STAC(srv.base_url + "/v1", collection="sentinel-2-c1-l2a", max_cloud=100, max_items=20)
        items = s2.search_area((-180, -85, 180, 85), "2025-07-31", "2025-07-31")
        again = s2.search_area((-180, -85, 180, 85), "2025-07-31", "2025-07-31")
        searches = srv.stats.requests["search"]
    assert again is items and searches == 2  # two recorded pages, then served from memory
    ids = [i["id"] for i in items]
    assert "S2B_T20EPT_20250731T131905_L2A" in ids and "S2B_20EPT_20250731_0_L2A" in ids  # next page followed
    by_id = {i["id"]: i for i in items}
    c1 = by_id["S2B_T20EPT_20250731T131905_L2A"]
    l2a = by_id["S2B_20EPT_20250731_0_L2A"]
    r_c1 = reflectance_recipe(c1["properties"], c1["collection"], asset=c1["assets"]["red"])
    r_l2a = reflectance_recipe(l2a["properties"], l2a["collection"], asset=l2a["assets"]["red"])
    assert (r_c1.offset, r_l2a.offset) == (-0.1, 0.0)  # both assets say -0.1; only c1 needs it
    # Only the configured collection is a candidate for a footprint inside these scenes.
    lon, lat = np.mean(np.array(c1["geometry"]["coordinates"][0])[:-1], axis=0)
    t = mercantile.tile(lon, lat, 14)
    cands = s2.candidates(t.z, t.x, t.y, items, "2025-08-02")
    assert cands and {c["collection"] for c in cands} == {"sentinel-2-c1-l2a"}


def test_recorded_earth_search_2023_item(shared_data):
    rec = shared_data / "stac-recordings"
    with _replay_server([rec / "earth-search-v1-search-2025.yaml", rec / "earth-search-v1-search-2023.yaml"]):
        import yaml

        raw = yaml.safe_load((rec / "earth-search-v1-search-2023.yaml").read_text())["interactions"][0]
        feats = json.loads(raw["response"]["body"]["string"])["features"]
    item = next(f for f in feats if f["collection"] == "sentinel-2-l2a")
    assert item["properties"]["earthsearch:boa_offset_applied"] is True
    r = reflectance_recipe(item["properties"], item["collection"], asset=item["assets"]["red"])
    assert r.offset == 0.0 and "already applied" in r.why
    t = mercantile.tile(-105.1019, 40.1672, 15)
    s2 = Sentinel2STAC(window_days=3)
    assert [c["id"] for c in s2.candidates(t.z, t.x, t.y, feats, "2023-10-09")] == ["S2A_13TDE_20231008_0_L2A"]


# ----------------------------------------------------------------------------------------------------
# The offline world's STAC API + COGs over loopback


def _world_tile(meta, z):
    w, s, e, n = meta["bounds_lonlat"]
    return mercantile.tile((w + e) / 2, (s + n) / 2, z)


def test_world_fetch_picks_clear_scene_and_reuses_search(s2_world, tmp_path):
    from cmsrd.world.servers import serve_world

    root, meta, truth = s2_world
    t = _world_tile(meta, 17)
    with serve_world(root) as srv:
        s2 = Sentinel2STAC(srv.stac_url, window_days=400, cache_dir=tmp_path, rate=None)
        lr = s2.fetch(t.z, t.x, t.y, lr_px=16, hr_date=meta["hr_capture_date"])
        for kid in mercantile.children(t):
            s2.fetch(kid.z, kid.x, kid.y, lr_px=8, hr_date=meta["hr_capture_date"])
        assert srv.stats.requests["stac_search"] >= 1
        n_search = srv.stats.requests["stac_search"]
        assert srv.stats.ranges["files"] > 0  # windowed COG reads, not whole files
        assert srv.stats.full_downloads["files"] == 0
    clear = next(k for k, v in truth["s2_items"].items() if not v["cloudy"])
    assert lr.scene_id == clear and lr.cloud_fraction <= 0.05
    assert lr.datetime.startswith(truth["s2_items"][clear]["date"])
    assert lr.image.shape == (16, 16, 3) and lr.image.std() > 1
    assert "already applied" in lr.radiometry  # world items: earthsearch:boa_offset_applied true
    assert n_search <= 2  # one search (plus paging at most) for the whole area
    assert list((tmp_path / "stac").glob("*.json"))


def test_world_scl_ranking_and_cloudy(s2_world):
    from cmsrd.world.servers import serve_world

    root, meta, truth = s2_world
    cloudy_id = next(k for k, v in truth["s2_items"].items() if v["cloudy"])
    cb = truth["s2_items"][cloudy_id]["cloud"]["bbox_lonlat"]
    t = mercantile.tile((cb[0] + cb[2]) / 2, (cb[1] + cb[3]) / 2, 18)  # a tile under the cloud
    with serve_world(root) as srv:
        s2 = Sentinel2STAC(srv.stac_url, window_days=400, rate=None)
        items = s2.search_area(meta["bounds_lonlat"], "2023-01-01", "2023-12-31")
        assert len(items) == 2
        # Make the cloudy scene look best by scene cloud cover: the SCL inside the footprint overrules it.
        doctored = copy.deepcopy(items)
        for it in doctored:
            it["properties"]["eo:cloud_cover"] = 0.0 if it["id"] == cloudy_id else 5.0
        lr = s2.fetch(t.z, t.x, t.y, hr_date="2023-06-12", items=doctored)
        assert lr.scene_id != cloudy_id
        assert lr.info["candidates"][0]["id"] == cloudy_id and lr.info["candidates"][0]["bad_fraction"] > 0.5
        with pytest.raises(SampleError) as ei:
            s2.fetch(t.z, t.x, t.y, hr_date="2023-06-12", items=[i for i in items if i["id"] == cloudy_id])
    assert ei.value.reason == "lr_cloudy"


def test_world_search_retries_429_and_503(s2_world):
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, meta, _ = s2_world
    t = _world_tile(meta, 17)
    faults = FaultConfig(error_rate=0.5, error_codes=(429, 503), retry_after_s=0, seed=2, paths=("/stac/",))
    with serve_world(root, faults=faults) as srv:
        lr = Sentinel2STAC(srv.stac_url, window_days=400, rate=None).fetch(
            t.z, t.x, t.y, hr_date=meta["hr_capture_date"]
        )
        assert srv.stats.faults["error"] >= 1
    assert lr.image.shape == (16, 16, 3)


def test_world_search_down_is_a_recorded_failure(s2_world):
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, meta, _ = s2_world
    t = _world_tile(meta, 17)
    with serve_world(root, faults=FaultConfig(error_rate=1.0, error_codes=(500,), paths=("/stac/v1/search",))) as srv:
        s2 = Sentinel2STAC(srv.stac_url, window_days=400, rate=None, retry=RetryPolicy(retries=1, backoff=0.0))
        with pytest.raises(SampleError) as ei:
            s2.fetch(t.z, t.x, t.y, hr_date=meta["hr_capture_date"])
    assert ei.value.reason == "lr_search_failed"


def test_planetary_computer_signing_and_uppercase_keys(s2_world, caplog):
    from cmsrd.world.loopback import HTTPError, json_response
    from cmsrd.world.servers import serve_world

    root, meta, _ = s2_world
    t = _world_tile(meta, 17)
    secret = "sv=2021-06-08&se=2099-01-01T00%3A00%3A00Z&sp=rl&sig=TOPSECRETSIG123"
    with serve_world(root) as srv:
        calls = []

        def sas(req):
            calls.append(req.params["cid"])
            return json_response({"msft:expiry": "2099-01-01T00:00:00Z", "token": secret})

        def signed(req):
            if req.query.get("sig") != "TOPSECRETSIG123":
                raise HTTPError(403, "AuthenticationFailed: missing or bad signature")
            return srv.file_response(req, root / req.params["rel"])

        srv.add_route("sas", "GET", r"/api/sas/v1/token/(?P<cid>[^/]+)", sas)
        srv.add_route("signed", "GET", r"/blob/(?P<rel>.+)", signed)
        es = Sentinel2STAC(srv.stac_url, window_days=400, rate=None)
        items = es.search_area(meta["bounds_lonlat"], "2023-01-01", "2023-12-31")
        pc_items = []
        for it in copy.deepcopy(items):  # Planetary Computer shape: band-name keys, blob URLs
            it["assets"] = {
                new: it["assets"][old]
                for old, new in (("red", "B04"), ("green", "B03"), ("blue", "B02"), ("scl", "SCL"))
            }
            for a in it["assets"].values():
                a["href"] = a["href"].replace("/files/", "/blob/")
            it["properties"]["s2:processing_baseline"] = "03.00"
            pc_items.append(it)
        caplog.set_level(logging.DEBUG)
        pc = Sentinel2STAC(
            srv.stac_url,
            catalog="planetary-computer",
            sas_url=srv.base_url + "/api/sas/v1/token",
            window_days=400,
            rate=None,
        )
        lr = pc.fetch(t.z, t.x, t.y, hr_date=meta["hr_capture_date"], items=pc_items)
        kid = mercantile.children(t)[0]
        pc.fetch(kid.z, kid.x, kid.y, hr_date=meta["hr_capture_date"], items=pc_items)
        assert srv.stats.requests["signed"] > 0 and srv.stats.statuses[403] == 0
    assert calls == ["sentinel-2-l2a"]  # one token, cached for every asset and footprint
    assert lr.image.shape == (16, 16, 3)
    blob = json.dumps(lr.info) + lr.radiometry
    assert "TOPSECRETSIG123" not in blob
    client_side = [r for r in caplog.records if not r.name.startswith("cmsrd.world")]  # not the test server
    assert client_side and all("TOPSECRETSIG123" not in r.getMessage() for r in client_side)


def _first_faulted_seed(kind: str, rate: float = 0.3) -> int:
    """A fault seed whose first faultable request meets `kind` and the next five none."""
    from cmsrd.world.faults import FaultConfig, schedule

    for seed in range(500):
        sc = schedule(FaultConfig(**{f"{kind}_rate": rate}, seed=seed), 6)
        if sc[0] is not None and not any(sc[1:]):
            return seed
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["corrupt", "truncate", "timeout"])
def test_world_cog_read_survives_a_damaged_response(s2_world, kind, monkeypatch):
    """GDAL's /vsicurl/ would keep a damaged header or block for the life of the process; the source
    drops it after a failed attempt, so the retry asks again and reads the same bytes as a clean read.
    Without the cache invalidation (forget_remote a no-op) the read fails on every retry."""
    from cmsrd.sources import sentinel2 as s2m
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, meta, _ = s2_world
    t = _world_tile(meta, 17)
    pol = RetryPolicy(retries=3, backoff=0.01)

    def fetch(srv):
        s2 = Sentinel2STAC(srv.stac_url, window_days=400, rate=None, retry=pol, timeout=(5.0, 2.0))
        items = s2.search_area(meta["bounds_lonlat"], "2023-01-01", "2023-12-31")
        return s2.fetch(t.z, t.x, t.y, hr_date=meta["hr_capture_date"], items=items)

    with serve_world(root) as srv:
        clean = fetch(srv)
    faults = FaultConfig(
        **{f"{kind}_rate": 0.3}, seed=_first_faulted_seed(kind), timeout_s=1, retry_after_s=0, paths=("/files/",)
    )
    with serve_world(root, faults=faults) as srv:
        got = fetch(srv)
        assert sum(srv.stats.faults.values()) >= 1
    np.testing.assert_array_equal(got.image, clean.image)
    if kind == "timeout":  # GDAL retries a dropped connection itself (GDAL_HTTP_MAX_RETRY); nothing is kept
        return
    monkeypatch.setattr(s2m, "forget_remote", lambda path: True)  # GDAL keeps the failure
    with serve_world(root, faults=faults) as srv, pytest.raises(SampleError) as ei:
        fetch(srv)
    assert ei.value.reason == "lr_read_failed" and "attempts" in ei.value.detail


def test_transient_gdal_errors():
    from cmsrd.sources.sentinel2 import transient_gdal_error

    assert transient_gdal_error("not recognized as being in a supported file format")
    assert transient_gdal_error("HTTP response code: 503")
    assert transient_gdal_error("HTTP response code: 429")
    assert not transient_gdal_error("HTTP response code: 404")
    assert not transient_gdal_error("HTTP response code: 403")


@pytest.mark.parametrize("kind", ["corrupt", "truncate"])
def test_world_search_retries_a_damaged_body(s2_world, kind):
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    root, meta, _ = s2_world
    faults = FaultConfig(**{f"{kind}_rate": 0.3}, seed=_first_faulted_seed(kind), paths=("/stac/v1/search",))
    with serve_world(root, faults=faults) as srv:
        s2 = Sentinel2STAC(srv.stac_url, window_days=400, rate=None, retry=RetryPolicy(retries=2, backoff=0.01))
        items = s2.search_area(meta["bounds_lonlat"], "2023-01-01", "2023-12-31")
        assert srv.stats.faults[kind] == 1
    assert len(items) == 2


def test_world_cog_whose_header_disagrees_with_the_item_is_not_read_silently(s2_world):
    """A damaged header can still parse with another georeference (pixels in the wrong place, no error):
    the asset's STAC proj:transform is checked, a mismatch retried and finally a recorded read failure."""
    from cmsrd.world.servers import serve_world

    root, meta, _ = s2_world
    t = _world_tile(meta, 17)
    with serve_world(root) as srv:
        s2 = Sentinel2STAC(srv.stac_url, window_days=400, rate=None, retry=RetryPolicy(retries=1, backoff=0.0))
        items = s2.search_area(meta["bounds_lonlat"], "2023-01-01", "2023-12-31")
        doctored = copy.deepcopy(items)
        for it in doctored:
            for a in it["assets"].values():
                if "proj:transform" in a:
                    a["proj:transform"][2] += 30.0  # three pixels east
        with pytest.raises(SampleError) as ei:
            s2.fetch(t.z, t.x, t.y, hr_date=meta["hr_capture_date"], items=doctored)
        assert s2.fetch(t.z, t.x, t.y, hr_date=meta["hr_capture_date"], items=items).image.shape == (16, 16, 3)
    assert ei.value.reason == "lr_read_failed" and "header differs from the STAC item" in ei.value.detail
