"""Each sample records its true ground resolutions: a z18 Web Mercator tile is 152.87 cos(lat) m wide, so 16 LR px
of a 256 px tile are 9.55 cos(lat) m, and a 10 m Sentinel-2 LR is ~25x coarser than the HR at Paris, not 16x.
The manifest carries the figures, `cmsrd info` summarises them, and the manifest stays GeoParquet."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from cmsrd.config import load_config
from cmsrd.layout import read_manifest
from cmsrd.sources.base import footprint_resolution
from cmsrd.testing import run_console_script

PARIS_LAT = 48.85


def _paris_tile_y(z: int) -> int:
    import mercantile

    return mercantile.tile(2.35, PARIS_LAT, z).y


def test_z18_sentinel2_at_paris_is_about_25x_not_16x():
    z, y = 18, _paris_tile_y(18)
    import mercantile

    b = mercantile.bounds(0, y, z)
    lat = (b.north + b.south) / 2  # the tile centre's latitude, ~48.85
    tile_m = 40075016.686 * math.cos(math.radians(lat)) / 2**18  # by hand: 152.87 m * cos(lat)
    assert tile_m == pytest.approx(100.6, abs=0.1)
    r = footprint_resolution(z, y, 256, 16, 10.0)
    assert r["hr_gsd_m"] == pytest.approx(tile_m / 256, rel=1e-9)  # 0.393 m
    assert r["hr_gsd_m"] == pytest.approx(0.393, abs=1e-3)
    assert tile_m / 16 == pytest.approx(9.554 * math.cos(math.radians(lat)), rel=1e-3)  # the nominal LR pixel
    assert r["lr_native_gsd_m"] == 10.0
    assert r["lr_native_px"] == pytest.approx(tile_m / 10.0, rel=1e-9)  # ~10.06 native pixels, not 16
    assert r["effective_scale"] == pytest.approx(10.0 / (tile_m / 256), rel=1e-9)
    assert r["effective_scale"] == pytest.approx(25.4, abs=0.1)


def test_a_synthetic_lr_has_the_nominal_scale():
    y = _paris_tile_y(18)
    r = footprint_resolution(18, y, 256, 8, None)
    assert r["lr_native_px"] == pytest.approx(8.0)
    assert r["effective_scale"] == pytest.approx(32.0)
    assert r["lr_native_gsd_m"] == pytest.approx(r["hr_gsd_m"] * 32)


def test_sentinel2_specs_declare_the_sources_native_gsd():
    from cmsrd.sources.registry import lr_spec
    from cmsrd.sources.sentinel2 import NATIVE_GSD_M

    for backend in ("stac", "sentinelhub"):
        assert lr_spec("sentinel-2", backend).native_gsd_m == NATIVE_GSD_M
    assert lr_spec("bicubic", "stac").native_gsd_m is None


@pytest.mark.slow
def test_manifest_and_info_report_the_true_resolutions(small_world, tmp_path):
    import geopandas as gpd

    from cmsrd.driver import run_build

    d = load_config("demo-real").to_dict()
    d.update(
        samples=4,
        world={"path": str(small_world), "faults": {}},
        split={"test_fraction": 0.25, "block_tiles": 2},
        build={"partition_size": 4, "rate_per_worker": 0},
    )
    preset = tmp_path / "real.yaml"
    preset.write_text(yaml.safe_dump(d))
    cfg = load_config(preset)
    run_build(cfg, tmp_path / "ds", workers=0, progress=False)
    df = read_manifest(tmp_path / "ds")
    ok = df[df["qa_status"] == "ok"]
    assert len(ok) >= 2
    for _, r in df.iterrows():  # every row, ok or not: the figures come from the tile and the preset
        tile_m = 40075016.686 * math.cos(math.radians(r["lat"])) / 2 ** int(r["z"])
        assert r["hr_gsd_m"] == pytest.approx(tile_m / cfg.hr_px, rel=1e-6)
        assert r["lr_native_gsd_m"] == 10.0
        assert r["lr_native_px"] == pytest.approx(tile_m / 10.0, rel=1e-6)
        assert r["effective_scale"] == pytest.approx(10.0 * cfg.hr_px / tile_m, rel=1e-6)
    gdf = gpd.read_parquet(tmp_path / "ds" / "manifest.parquet")
    assert gdf.crs.to_epsg() == 3857 and {"lr_native_px", "effective_scale"} <= set(gdf.columns)
    assert gdf.geometry.iloc[0].bounds == tuple(gdf[["minx", "miny", "maxx", "maxy"]].iloc[0])  # the footprint

    res = run_console_script("cmsrd", "info", str(tmp_path / "ds"))
    assert res.returncode == 0, res.stderr
    lines = {ln.strip().split("  ")[0]: ln for ln in res.stdout.splitlines()}
    e = ok["effective_scale"]
    assert f"x{e.median():.1f} [x{e.min():.1f} - x{e.max():.1f}] (nominal x16)" in lines["effective scale"]
    assert "10.00 [10.00 - 10.00] m/px" in lines["LR native resolution"]
    h = ok["hr_gsd_m"]
    assert f"{h.median():.3f} [{h.min():.3f} - {h.max():.3f}] m/px" in lines["HR ground resolution"]
    n = ok["lr_native_px"]
    assert f"{n.median():.1f} [{n.min():.1f} - {n.max():.1f}] px" in lines["native LR pixels across"]
    assert f"over {len(ok)} ok samples" in res.stdout


def test_info_skips_resolutions_a_dataset_lacks(tiny_dataset: Path):
    """A hand-made dataset (plain source names, no resolution columns) is summarised without them."""
    res = run_console_script("cmsrd", "info", str(tiny_dataset))
    assert res.returncode == 0, res.stderr
    assert "lr: bicubic" in res.stdout and "ground resolution" not in res.stdout and "nan" not in res.stdout
