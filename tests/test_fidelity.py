"""Fidelity options of the CMSRD recipe: the official LR rendering (TCI), the official `sr` upsampling (what
the authors' cv2 call does), and the DN plausibility check that catches a double BOA offset."""

from __future__ import annotations

import copy

import mercantile
import numpy as np
import pytest

from cmsrd.config import LRConfig, load_config
from cmsrd.degrade import upsample
from cmsrd.errors import InputError, SampleError
from cmsrd.sources.sentinel2 import Recipe, Sentinel2STAC, implausible_radiometry


def test_official_upsample_is_the_authors_cv2_call_and_differs_from_bicubic():
    cv2 = pytest.importorskip("cv2")
    lr = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    official = upsample(lr, 256, "official")
    # prepare_lr.py, verbatim: the flag lands in `dst`, so OpenCV's default INTER_LINEAR runs
    assert np.array_equal(official, cv2.resize(lr, (256, 256), cv2.INTER_CUBIC))
    assert np.array_equal(official, cv2.resize(lr, (256, 256), interpolation=cv2.INTER_LINEAR))
    bicubic = upsample(lr, 256, "bicubic")
    assert official.shape == bicubic.shape == (256, 256, 3) and not np.array_equal(official, bicubic)
    with pytest.raises(InputError, match="official"):
        upsample(lr, 256, "lanczos")


def test_sr_and_radiometry_options_are_checked_recorded_and_official_in_the_cmsrd_preset():
    real = load_config("cmsrd-real")
    assert (real.lr.radiometry, real.sr.upsample) == ("tci", "official")  # the authors' recipe by default
    assert real.lr.collection == "sentinel-2-c1-l2a"  # consistent DN offsets, also the config's default
    assert real.content_dict()["sr"]["upsample"] == "official"  # -> dataset.json's config
    assert LRConfig().collection == "sentinel-2-c1-l2a"
    d = load_config("demo-synthetic").to_dict()
    d["sr"] = {"upsample": "nearest"}
    with pytest.raises(InputError, match="sr.upsample"):
        load_config(d)
    d["sr"] = {"upsample": "official"}
    assert load_config(d).fingerprint() != load_config("demo-synthetic").fingerprint()
    d["lr"]["radiometry"] = "tci"  # bicubic LR has no TCI
    with pytest.raises(InputError, match="tci"):
        load_config(d)


def test_plausibility_flags_a_double_offset_only():
    rng = np.random.default_rng(1)
    refl = rng.uniform(0.02, 0.25, (40, 40))  # land in a visible band
    with_offset = np.round(refl * 10000 + 1000).astype(np.uint16)
    offset = Recipe(1e-4, -0.1, "baseline 05.09 >= 04.00: BOA_ADD_OFFSET -1000")
    assert implausible_radiometry(with_offset, offset) == ""
    doubled = np.round(refl * 10000).astype(np.uint16)  # the offset already removed, flag says not
    why = implausible_radiometry(doubled, offset)
    assert "negative" in why and "already removed" in why
    assert implausible_radiometry(doubled, Recipe(1e-4, 0.0, "offset applied at ingest")) == ""
    water = with_offset.copy()
    water[:2] = 950  # a few slightly negative dark pixels (5%) are normal sen2cor output
    assert implausible_radiometry(water, offset) == ""


def _clear_tile(meta, truth):
    w, s, e, n = meta["bounds_lonlat"]
    return mercantile.tile((w + e) / 2, (s + n) / 2, 17)


def test_item_with_a_wrong_offset_flag_is_rejected_by_the_dn_check(s2_world):
    from cmsrd.world.servers import serve_world

    root, meta, truth = s2_world
    t = _clear_tile(meta, truth)
    with serve_world(root) as srv:
        s2 = Sentinel2STAC(srv.stac_url, window_days=400, rate=None)
        items = s2.search_area(meta["bounds_lonlat"], "2023-01-01", "2023-12-31")
        ok = s2.fetch(t.z, t.x, t.y, lr_px=16, hr_date=meta["hr_capture_date"], items=items)
        lying = copy.deepcopy(items)  # the world's DNs had the offset removed; now the flag says it was not
        for it in lying:
            it["properties"]["earthsearch:boa_offset_applied"] = False
        with pytest.raises(SampleError) as ei:
            s2.fetch(t.z, t.x, t.y, lr_px=16, hr_date=meta["hr_capture_date"], items=lying)
    assert ok.image.std() > 1
    assert ei.value.reason == "lr_radiometry_implausible" and "negative" in ei.value.detail


def test_tci_radiometry_reads_the_visual_asset(s2_world):
    from cmsrd.world.servers import serve_world

    root, meta, truth = s2_world
    t = _clear_tile(meta, truth)
    with serve_world(root) as srv:
        boa = Sentinel2STAC(srv.stac_url, window_days=400, rate=None)
        tci = Sentinel2STAC(srv.stac_url, window_days=400, rate=None, radiometry="tci")
        a = boa.fetch(t.z, t.x, t.y, lr_px=16, hr_date=meta["hr_capture_date"])
        b = tci.fetch(t.z, t.x, t.y, lr_px=16, hr_date=meta["hr_capture_date"])
    assert b.scene_id == a.scene_id and b.image.shape == (16, 16, 3) and b.image.dtype == np.uint8
    assert b.radiometry.startswith("tci") and "visual" in b.info["assets"]
    assert not np.array_equal(a.image, b.image)  # another rendering of the same scene ...
    corr = np.corrcoef(a.image.reshape(-1).astype(float), b.image.reshape(-1).astype(float))[0, 1]
    assert corr > 0.9, corr  # ... of the same pixels
    with pytest.raises(InputError, match="radiometry"):
        Sentinel2STAC(srv.stac_url, radiometry="rgb")
