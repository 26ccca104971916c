"""Fidelity to the official CMSRD recipe: the `sr` upsampling the authors' script runs, TCI radiometry, the
Collection 1 default and the DN plausibility check that catches a BOA offset applied twice (or never)."""

from __future__ import annotations

import copy
import json

import mercantile
import numpy as np
import pytest
import yaml

from cmsrd.config import load_config
from cmsrd.degrade import upsample
from cmsrd.errors import InputError
from cmsrd.qa import REASONS, QARejected, check_lr_radiometry
from cmsrd.sources.sentinel2 import Sentinel2STAC

pytestmark = pytest.mark.timeout(180)

C1 = "sentinel-2-c1-l2a"


# ---- sr.upsample ---------------------------------------------------------------------------------------


def test_official_upsample_is_half_pixel_bilinear_by_hand():
    img = np.array([[0, 100]], np.uint8)
    out = upsample(img, (1, 4), "official")
    # centres map to (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped at the borders, no antialias
    np.testing.assert_array_equal(out, [[0, 25, 75, 100]])
    assert not np.array_equal(upsample(img, (1, 4), "bicubic"), out)


def test_official_upsample_matches_the_authors_cv2_call():
    cv2 = pytest.importorskip("cv2")
    lr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ours = upsample(lr, 256, "official").astype(int)
    theirs = cv2.resize(lr, (256, 256), cv2.INTER_CUBIC)  # prepare_lr.py: the flag lands in `dst`
    assert np.array_equal(theirs, cv2.resize(lr, (256, 256), interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(ours, theirs)  # OpenCV itself runs, so its 11-bit fixed-point rounding is the same
    bicubic = np.abs(upsample(lr, 256, "bicubic").astype(int) - theirs.astype(int))
    assert bicubic.max() > 10


def _sample_with(tmp_path, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """One sample through `process_sample` (sources stubbed) with `sr.upsample: mode`: (lr, sr as written)."""
    from cmsrd import stages
    from cmsrd.io import read_png
    from cmsrd.sources.base import HRResult, LRResult

    d = load_config("demo-synthetic").to_dict()
    d["sr"] = {"upsample": mode}
    cfg = load_config(d)
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    lr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    lr_res = LRResult(lr, lr.astype(np.float32), "", "", 0.0, None, None, None, "bicubic", "", synthetic=True)
    mask = np.zeros((256, 256), np.uint8)
    mask[:10] = 1
    task = stages.SampleTask("18_1_1", 18, 1, 1, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.6, "b", "train", "world")
    spec = stages.BuildSpec(cfg, str(tmp_path / mode))
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(stages, "fetch_hr", lambda spec, task: HRResult(hr, (0, 0, 1, 1), "stub", "2022-01-01"))
        mp.setattr(stages, "make_lr", lambda spec, task, h, s: (lr, lr_res))
        mp.setattr(stages, "render_footprint", lambda spec, task: (np.zeros((256, 256, 3), np.uint8), mask))
        row = stages.process_sample(spec, task)
    finally:
        mp.undo()
    assert row["qa_status"] == "ok", row
    return lr, read_png(tmp_path / mode / row["path_sr"])


def test_build_writes_sr_with_the_configured_upsampling(tmp_path):
    lr, official = _sample_with(tmp_path, "official")
    _, bicubic = _sample_with(tmp_path, "bicubic")
    np.testing.assert_array_equal(official, upsample(lr, 256, "official"))
    np.testing.assert_array_equal(bicubic, upsample(lr, 256, "bicubic"))
    assert not np.array_equal(official, bicubic)


# ---- config and presets --------------------------------------------------------------------------------


def test_options_are_checked_and_presets_follow_the_official_code():
    real = load_config("cmsrd-real")
    assert (real.lr.collection, real.lr.radiometry, real.sr.upsample) == (C1, "tci", "official")
    assert load_config("cmsrd-synthetic").sr.upsample == "bicubic"
    assert load_config("demo-real").lr.collection == C1
    d = real.to_dict()
    for key, value in (("lr", {"radiometry": "rgb"}), ("sr", {"upsample": "bilinear"})):
        bad = copy.deepcopy(d)
        bad[key].update(value)
        with pytest.raises(InputError, match="radiometry|upsample"):
            load_config(bad)
    sh = copy.deepcopy(d)
    sh["lr"]["backend"] = "sentinelhub"
    with pytest.raises(InputError, match="lr.radiometry"):
        load_config(sh)
    sh["lr"]["radiometry"] = "boa"
    assert load_config(sh).lr.backend == "sentinelhub"


def test_dataset_meta_records_the_choices():
    from cmsrd.manifest import dataset_meta

    cfg = load_config("cmsrd-real")
    meta = dataset_meta(cfg, cfg, {})
    assert meta["config"]["lr"]["radiometry"] == "tci" and meta["config"]["sr"]["upsample"] == "official"
    assert meta["sources"]["lr"]["radiometry"] == "tci" and meta["sources"]["lr"]["collection"] == C1


# ---- the offline world: Collection 1 and TCI -----------------------------------------------------------


@pytest.fixture(scope="module")
def world(small_world):
    meta = json.loads((small_world / "world.json").read_text())
    w, s, e, n = meta["bounds_lonlat"]
    return small_world, meta, mercantile.tile((w + e) / 2, (s + n) / 2, 17)


def test_world_serves_collection_1_with_the_same_reflectance(world):
    from cmsrd.world.servers import serve_world

    root, meta, t = world
    with serve_world(root) as srv:
        old = Sentinel2STAC(srv.stac_url, "sentinel-2-l2a", window_days=400, rate=None)
        c1 = Sentinel2STAC(srv.stac_url, C1, window_days=400, rate=None)
        lr_old = old.fetch(t.z, t.x, t.y, 16, meta["hr_capture_date"])
        lr_c1 = c1.fetch(t.z, t.x, t.y, 16, meta["hr_capture_date"])
    assert lr_c1.collection == C1 and lr_c1.scene_id in meta["s2_items_c1"]
    assert "- 0.1" in lr_c1.radiometry and "already applied" in lr_old.radiometry
    np.testing.assert_allclose(lr_c1.native, lr_old.native, atol=1e-4)  # other DNs, same reflectance
    np.testing.assert_array_equal(lr_c1.image, lr_old.image)
    assert lr_c1.info["dn_check"]["dn_below_offset_fraction"] == 0.0


def test_tci_radiometry_reads_the_visual_asset(world):
    from cmsrd.world.servers import serve_world

    root, meta, t = world
    with serve_world(root) as srv:
        boa = Sentinel2STAC(srv.stac_url, C1, window_days=400, rate=None)
        tci = Sentinel2STAC(srv.stac_url, C1, window_days=400, rate=None, radiometry="tci")
        lr_boa = boa.fetch(t.z, t.x, t.y, 16, meta["hr_capture_date"])
        lr_tci = tci.fetch(t.z, t.x, t.y, 16, meta["hr_capture_date"])
        assert srv.stats.requests["files"] > 0
    assert lr_tci.radiometry.startswith("TCI") and lr_tci.info["assets"].keys() == {"visual"}
    # ESA's L2A TCI is 255 at reflectance 0.2, the boa rendering at 0.4: twice as bright where unsaturated
    ok = (lr_tci.image < 250) & (lr_boa.image > 5)
    assert ok.mean() > 0.5
    ratio = lr_tci.image[ok].astype(float).mean() / lr_boa.image[ok].astype(float).mean()
    assert ratio == pytest.approx(2.0, rel=0.05)
    with pytest.raises(InputError, match="radiometry"):
        Sentinel2STAC(radiometry="rgb")


# ---- lr_radiometry_implausible -------------------------------------------------------------------------


def test_dn_check_thresholds():
    from cmsrd.config import QAConfig

    qa = QAConfig()
    assert "lr_radiometry_implausible" in REASONS
    veg = np.array([[400, 700, 350]] * 90 + [[0, 0, 0]] * 10)  # BOA 0.04/0.07/0.035 without the offset
    check_lr_radiometry(veg + 1000 * (veg > 0), True, qa)  # offset in the DNs, as declared
    check_lr_radiometry(veg, False, qa)  # offset removed, as declared
    with pytest.raises(QARejected) as ei:
        check_lr_radiometry(veg, True, qa)  # declared in the DNs, already removed: applied twice
    assert ei.value.reason == "lr_radiometry_implausible" and "twice" in ei.value.detail
    with pytest.raises(QARejected, match="still in"):
        check_lr_radiometry(veg + 1000 * (veg > 0), False, qa)  # declared removed, still there
    check_lr_radiometry(veg + 1000 * (veg > 0), False, QAConfig(min_lr_dark_fraction=0.0))  # check off


def test_world_item_whose_flag_lies_is_rejected_and_the_build_records_it(tmp_path, world):
    """A world whose sentinel-2-l2a items say the offset is still in the DNs although the files hold
    reflectance x 10000 (the public Earth Search reports): the offset would be applied twice."""
    from cmsrd.driver import run_build
    from cmsrd.layout import read_manifest
    from cmsrd.world.config import WorldConfig
    from cmsrd.world.generate import generate_world
    from cmsrd.world.servers import serve_world

    liar = generate_world(WorldConfig.small(s2_boa_offset_flag=False), tmp_path / "world", progress=False)
    truth = json.loads((liar / "truth" / "truth.json").read_text())
    assert all(r["dn_offset_added"] == 0 and r["boa_offset_flag"] is False for r in truth["s2_items"].values())
    _, meta, t = world
    with serve_world(liar) as srv:
        s2 = Sentinel2STAC(srv.stac_url, "sentinel-2-l2a", window_days=400, rate=None)
        with pytest.raises(QARejected) as ei:
            s2.fetch(t.z, t.x, t.y, 16, meta["hr_capture_date"])
        assert ei.value.reason == "lr_radiometry_implausible"
        # the same acquisitions in Collection 1 (no flag, ESA's DNs) pass
        ok = Sentinel2STAC(srv.stac_url, C1, window_days=400, rate=None).fetch(t.z, t.x, t.y, 16, "2023-06-20")
        assert ok.image.std() > 1
        # the opposite lie: Collection 1's DNs (offset kept) in an item that says it was removed
        items = Sentinel2STAC(srv.stac_url, C1, window_days=400, rate=None).search_area(
            meta["bounds_lonlat"], "2023-01-01", "2023-12-31"
        )
        bright = copy.deepcopy(items)
        for it in bright:
            it["collection"] = "sentinel-2-l2a"
            it["properties"]["earthsearch:boa_offset_applied"] = True
        with pytest.raises(QARejected, match="still in"):
            s2.fetch(t.z, t.x, t.y, 16, meta["hr_capture_date"], items=bright)
    d = load_config("demo-real").to_dict()
    d.update(samples=3, world={"path": str(liar)}, split={"test_fraction": 0.0, "block_tiles": 2})
    d["lr"]["collection"] = "sentinel-2-l2a"
    d["build"].update(partition_size=4, rate_per_worker=0)
    preset = tmp_path / "liar.yaml"
    preset.write_text(yaml.safe_dump(d))
    run_build(load_config(preset), tmp_path / "ds", workers=0, progress=False)
    df = read_manifest(tmp_path / "ds")
    assert len(df) == 3 and set(df["qa_reason"]) == {"lr_radiometry_implausible"}, df[["qa_reason", "qa_detail"]]
    assert set(df["qa_status"]) == {"rejected"}
