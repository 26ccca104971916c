"""The sentinelhub-py backend against a loopback OAuth + Process API server over the offline world."""

from __future__ import annotations

import json
import logging

import mercantile
import numpy as np
import pytest

from cmsrd.errors import CredentialsError, InputError, SampleError

pytestmark = pytest.mark.timeout(120)

SECRET = "s3cr3t-value-never-logged"


@pytest.fixture(autouse=True)
def _loopback_oauth(monkeypatch):
    # oauthlib refuses plain http; the loopback server has no TLS. Real endpoints are https.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    monkeypatch.delenv("SH_CLIENT_ID", raising=False)
    monkeypatch.delenv("SH_CLIENT_SECRET", raising=False)


@pytest.fixture(scope="module")
def world(small_world):
    meta = json.loads((small_world / "world.json").read_text())
    truth = json.loads((small_world / "truth" / "truth.json").read_text())
    return small_world, meta, truth


@pytest.fixture()
def server(world):
    from cmsrd.world.sentinelhub_server import SentinelHubServer

    with SentinelHubServer(world[0], client_id="cid-123", client_secret=SECRET) as srv:
        yield srv


def config(srv, secret=SECRET, token_path=None):
    from sentinelhub import SHConfig

    cfg = SHConfig()
    cfg.sh_client_id, cfg.sh_client_secret = "cid-123", secret
    cfg.sh_base_url = srv.base_url
    cfg.sh_token_url = srv.base_url + token_path if token_path else srv.token_url
    return cfg


def tile(meta, z=17):
    w, s, e, n = meta["bounds_lonlat"]
    return mercantile.tile((w + e) / 2, (s + n) / 2, z)


def test_process_api_gives_the_same_lr_as_stac(world, server):
    from cmsrd.sources.base import LRSource
    from cmsrd.sources.sentinel2 import Sentinel2STAC
    from cmsrd.sources.sentinelhub_backend import SentinelHubLR
    from cmsrd.world.servers import serve_world

    root, meta, truth = world
    t = tile(meta)
    sh = SentinelHubLR(config(server), window_days=400, retry_sleep_s=0.05)
    assert isinstance(sh, LRSource)
    lr = sh.fetch(t.z, t.x, t.y, lr_px=16, hr_date=meta["hr_capture_date"])
    spec = server.requests_log[-1]
    assert spec["input"]["data"][0]["dataFilter"]["mosaickingOrder"] == "leastCC"
    assert spec["input"]["bounds"]["properties"]["crs"].endswith("/3857")
    assert spec["output"]["width"] == lr.native.shape[1] == 20  # ~10 m across a z17 tile at 48.4 N
    clear = next(k for k, v in truth["s2_items"].items() if not v["cloudy"])
    assert lr.scene_id == clear and lr.collection == "SENTINEL2_L2A" and "harmonizeValues" in lr.radiometry
    assert lr.image.shape == (16, 16, 3) and lr.cloud_fraction <= 0.05
    with serve_world(root) as ws:
        ref = Sentinel2STAC(ws.stac_url, window_days=400, rate=None).fetch(t.z, t.x, t.y, 16, meta["hr_capture_date"])
    np.testing.assert_allclose(lr.native, ref.native, atol=1e-4)
    assert np.abs(lr.image.astype(int) - ref.image.astype(int)).max() <= 1


def test_missing_credentials_name_the_variables():
    from sentinelhub import SHConfig

    from cmsrd.sources.sentinelhub_backend import SentinelHubLR

    cfg = SHConfig()
    cfg.sh_client_id = cfg.sh_client_secret = ""
    with pytest.raises(InputError, match="SH_CLIENT_ID and SH_CLIENT_SECRET not set"):
        SentinelHubLR(cfg)


def test_env_credentials_are_used(world, server, monkeypatch):
    from sentinelhub import SHConfig

    from cmsrd.sources.sentinelhub_backend import SentinelHubLR

    monkeypatch.setenv("SH_CLIENT_ID", "cid-123")
    monkeypatch.setenv("SH_CLIENT_SECRET", SECRET)
    cfg = SHConfig()
    cfg.sh_client_id = cfg.sh_client_secret = ""
    cfg.sh_base_url, cfg.sh_token_url = server.base_url, server.token_url
    t = tile(world[1])
    assert SentinelHubLR(cfg, window_days=400).fetch(
        t.z, t.x, t.y, hr_date=world[1]["hr_capture_date"]
    ).image.shape == (16, 16, 3)


def test_invalid_credentials_one_clear_error_without_the_secret(world, server, caplog):
    from cmsrd.sources.sentinelhub_backend import SentinelHubLR

    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-abcdef"
    src = SentinelHubLR(config(server, secret=wrong), window_days=400, max_attempts=1, retry_sleep_s=0.0)
    t = tile(world[1])
    with pytest.raises(InputError) as ei:
        src.fetch(t.z, t.x, t.y, hr_date=world[1]["hr_capture_date"])
    msg = str(ei.value)
    assert isinstance(ei.value, CredentialsError)  # the build stops on it instead of failing every sample
    assert "SH_CLIENT_ID" in msg and "SH_CLIENT_SECRET" in msg and wrong not in msg
    assert wrong not in repr(src)
    client_side = [r for r in caplog.records if not r.name.startswith("cmsrd.world")]
    assert all(wrong not in r.getMessage() for r in client_side)


def test_cdse_endpoints(world, server):
    from sentinelhub import SHConfig

    from cmsrd.sources.sentinelhub_backend import CDSE_BASE_URL, CDSE_TOKEN_URL, SentinelHubLR

    cfg = SHConfig()
    cfg.sh_client_id, cfg.sh_client_secret = "cid-123", SECRET
    cdse = SentinelHubLR(cfg, cdse=True)
    assert (cdse.config.sh_base_url, cdse.config.sh_token_url) == (CDSE_BASE_URL, CDSE_TOKEN_URL)
    # the CDSE token path (Keycloak realm) served on loopback
    src = SentinelHubLR(config(server, token_path="/auth/realms/CDSE/protocol/openid-connect/token"), window_days=400)
    t = tile(world[1])
    assert src.fetch(t.z, t.x, t.y, hr_date=world[1]["hr_capture_date"]).scene_id
    assert server.stats.requests["token1"] >= 1


def test_no_scene_and_cloudy_are_recorded_failures(world, server):
    from cmsrd.sources.sentinelhub_backend import SentinelHubLR

    root, meta, truth = world
    t = tile(meta)
    with pytest.raises(SampleError) as ei:
        SentinelHubLR(config(server), window_days=5).fetch(t.z, t.x, t.y, hr_date="2019-01-01")
    assert ei.value.reason == "lr_no_scene"
    cloudy_id, cloudy = next((k, v) for k, v in truth["s2_items"].items() if v["cloudy"])
    cb = cloudy["cloud"]["bbox_lonlat"]
    under = mercantile.tile((cb[0] + cb[2]) / 2, (cb[1] + cb[3]) / 2, 18)
    with pytest.raises(SampleError) as ei:  # a window holding only the cloudy date
        SentinelHubLR(config(server), window_days=3).fetch(under.z, under.x, under.y, hr_date=cloudy["date"])
    assert ei.value.reason == "lr_cloudy"


def test_process_api_503_is_retried(world):
    from cmsrd.sources.sentinelhub_backend import SentinelHubLR
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.sentinelhub_server import SentinelHubServer

    root, meta, _ = world
    t = tile(meta)
    faults = FaultConfig(error_rate=0.5, error_codes=(503,), retry_after_s=0, seed=4, paths=("/api/v1/process",))
    with SentinelHubServer(root, client_id="cid-123", client_secret=SECRET, faults=faults) as srv:
        lr = SentinelHubLR(config(srv), window_days=400, max_attempts=6, retry_sleep_s=0.01).fetch(
            t.z, t.x, t.y, hr_date=meta["hr_capture_date"]
        )
        assert srv.stats.faults["error:503"] >= 1
    assert lr.image.shape == (16, 16, 3)
