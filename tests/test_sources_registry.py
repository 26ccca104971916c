"""The source registry: preset names resolve to source classes, and a new source needs no stage change."""

from __future__ import annotations

import numpy as np
import pytest

from cmsrd.config import load_config
from cmsrd.errors import InputError, SampleError
from cmsrd.sources import registry
from cmsrd.sources.base import HRResult, LRResult, LRSource


class ConstantLR:
    """A registered-at-test-time LR source: grey LR, and it records what the stages hand it."""

    calls: list[tuple] = []

    @classmethod
    def from_config(cls, cfg, cache_dir=None):
        return cls()

    @staticmethod
    def provenance(cfg):
        return {"attribution": "test", "terms": ""}

    def search(self, bbox_lonlat, start, end):
        return [{"id": "scene-a"}]

    def fetch_footprint(self, z, x, y, lr_px, hr, found=None):
        ConstantLR.calls.append((z, x, y, lr_px, hr.date, found))
        return LRResult(
            image=np.full((lr_px, lr_px, 3), 128, np.uint8),
            native=np.zeros((4, 4, 3), np.float32),
            scene_id="scene-a",
            datetime="2023-06-27T00:00:00Z",
            cloud_fraction=0.0,
            scene_cloud_cover=1.0,
            days_from_hr=3.0,
            baseline=None,
            radiometry="constant grey",
            collection="test",
        )


@pytest.fixture
def constant_lr(monkeypatch):
    """Register ConstantLR as `lr.source: constant` for one test (the registry is left as it was)."""
    spec = registry.SourceSpec("lr", "constant", f"{__name__}:ConstantLR", backend="stac", block_search=True)
    monkeypatch.setitem(registry._SPECS, ("lr", "constant", "stac"), spec)
    ConstantLR.calls = []
    return spec


def _cfg(**lr):
    d = load_config("demo-synthetic").to_dict()
    d["lr"] = {**d["lr"], **lr}
    return load_config(d)


def test_preset_names_resolve_to_the_registered_classes():
    assert registry.names("hr") == ["raster", "worldimagery"]
    assert registry.names("lr") == ["bicubic", "sentinel-2"] and registry.backends("lr") == ["sentinelhub", "stac"]
    assert registry.hr_spec("worldimagery").load().__name__ == "WorldImageryHR"
    assert registry.hr_spec("raster").load().__name__ == "RasterHR"
    stac, sh = registry.lr_spec("sentinel-2", "stac"), registry.lr_spec("sentinel-2", "sentinelhub")
    assert stac.load().__name__ == "Sentinel2STAC" and stac.block_search
    assert sh.load().__name__ == "SentinelHubLR" and not sh.block_search
    bicubic = registry.lr_spec("bicubic", "stac")  # a single-backend source ignores lr.backend
    assert bicubic.load().__name__ == "BicubicLR" and not bicubic.block_search
    for spec in (stac, sh, bicubic):
        cls = spec.load()
        assert all(callable(getattr(cls, m, None)) for m in ("from_config", "provenance", "search", "fetch_footprint"))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("hr", {"source": "worldimagry"}, r"hr\.source.*unknown value 'worldimagry'.*did you mean `worldimagery`"),
        ("lr", {"source": "sentinel2"}, r"lr\.source.*did you mean `sentinel-2`"),
        ("lr", {"source": "sentinel-2", "backend": "sentinel-hub"}, r"lr\.backend.*did you mean `sentinelhub`"),
    ],
)
def test_unknown_source_name_is_refused_with_the_close_match(key, value, match):
    d = load_config("demo-synthetic").to_dict()
    d[key] = {**(d.get(key) or {}), **value}
    with pytest.raises(InputError, match=match):
        load_config(d)


def test_bicubic_lr_is_the_synthetic_degradation_of_the_hr():
    from cmsrd.degrade import synthetic_lr

    cfg = _cfg()
    src = registry.lr_spec(cfg.lr.source, cfg.lr.backend).build(cfg)
    assert isinstance(src, LRSource) and src.search((0, 0, 1, 1), cfg.lr.start, cfg.lr.end) is None
    hr = np.random.default_rng(0).integers(0, 256, (cfg.hr_px, cfg.hr_px, 3), dtype=np.uint8)
    res = src.fetch_footprint(18, 1, 2, cfg.lr_px, HRResult(hr, (0, 0, 1, 1), "test"))
    assert res.synthetic and np.array_equal(res.image, synthetic_lr(hr, cfg.scale))
    assert res.radiometry == f"MATLAB bicubic x{cfg.scale} (antialiased) of the HR"


def test_a_registered_source_runs_through_the_stages_unchanged(constant_lr, tmp_path):
    """search once per block, then fetch each footprint with what the search found: no stage names a source."""
    from cmsrd.manifest import dataset_meta
    from cmsrd.plan import plan_from_tiles
    from cmsrd.stages import BuildSpec, make_lr, plan_tasks, search_block

    cfg = _cfg(source="constant")
    spec = BuildSpec(cfg, str(tmp_path))
    (task,) = plan_tasks(
        plan_from_tiles(18, np.array([5]), np.array([7]), np.array(["train"]), np.array(["a"]), 4, 256)
    )
    search = search_block(spec, (2.0, 48.0, 2.1, 48.1))
    assert search == {"found": [{"id": "scene-a"}], "reason": None, "detail": "", "bbox": (2.0, 48.0, 2.1, 48.1)}
    hr = HRResult(np.zeros((cfg.hr_px, cfg.hr_px, 3), np.uint8), task.bounds, "test", date="2023-06-24")
    lr, res = make_lr(spec, task, hr, search)
    assert lr.shape == (cfg.lr_px, cfg.lr_px, 3) and res.radiometry == "constant grey"
    assert ConstantLR.calls == [(18, 5, 7, cfg.lr_px, "2023-06-24", [{"id": "scene-a"}])]
    assert dataset_meta(cfg, cfg, {})["sources"]["lr"] == {"source": "constant", "attribution": "test", "terms": ""}
    # A failed block search: the sample repeats the same search (bbox, dates) and fetches with what it found.
    failed = {"found": None, "reason": "lr_search_failed", "detail": "HTTP 503", "bbox": (2.0, 48.0, 2.1, 48.1)}
    make_lr(spec, task, hr, failed)
    assert ConstantLR.calls[-1][-1] == [{"id": "scene-a"}] and len(ConstantLR.calls) == 2
    # Without the area to repeat it, the block's failure is the sample's, with the catalogue's reason.
    with pytest.raises(SampleError, match="lr_search_failed"):
        make_lr(spec, task, hr, {"found": None, "reason": "lr_search_failed", "detail": "HTTP 503"})
    assert len(ConstantLR.calls) == 2


def test_what_a_real_build_needs_comes_from_its_sources():
    from cmsrd.pipeline_cli import needs

    assert needs(load_config("cmsrd-real")) == (
        "cmsrd-real: needs network access to services.arcgisonline.com, earth-search.aws.element84.com (STAC) "
        "+ the scenes' COG hosts, download.geofabrik.de"
    )
    assert needs(load_config("cmsrd-synthetic")).endswith("access to services.arcgisonline.com, download.geofabrik.de")
    d = load_config("cmsrd-real").to_dict()
    d.update(lr={**d["lr"], "backend": "sentinelhub", "radiometry": "boa"}, hr={"source": "raster", "raster": "x.tif"})
    assert needs(load_config(d)).endswith(
        "access to raster x.tif, Sentinel Hub (SH_CLIENT_ID / SH_CLIENT_SECRET must be set), download.geofabrik.de"
    )
