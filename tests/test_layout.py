"""The built-dataset contract: paths, manifest schema, dataset.json."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cmsrd.errors import InputError
from cmsrd.layout import (
    MANIFEST_COLUMNS,
    DatasetLayout,
    conform_manifest,
    parse_tile_id,
    read_dataset_json,
    read_manifest,
    tile_id,
    validate_manifest_schema,
    write_dataset_json,
    write_manifest,
)


def test_folder_names_follow_the_official_sgdm_convention(tmp_path):
    real = DatasetLayout(tmp_path, 256, 16)
    assert real.scale == 16
    assert real.image_path("train", "hr", "18_1_2") == tmp_path / "train/hr_256/18_1_2.png"
    assert real.image_dir("test", "sr").name == "sr_16_256"
    assert real.image_dir("test", "map").name == "ref_256"
    assert real.image_dir("test", "lr").name == "lr_16"
    assert DatasetLayout(tmp_path, 256, 8).image_dir("train", "sr").name == "sr_8_256"
    with pytest.raises(InputError, match="not a multiple"):
        DatasetLayout(tmp_path, 256, 15)


def test_tile_ids_round_trip_and_reject_garbage():
    assert tile_id(18, 41518, 92090) == "18_41518_92090"
    assert parse_tile_id("18_41518_92090") == (18, 41518, 92090)
    for bad in ("18-1-2", "x_1_2", "2_4_0"):
        with pytest.raises(InputError):
            parse_tile_id(bad)


def test_manifest_round_trip_keeps_schema_and_extra_columns(tmp_path):
    rows = [
        {"id": "18_1_2", "split": "train", "z": 18, "x": 1, "y": 2, "qa_status": "ok", "note": "kept"},
        {
            "id": "18_1_3",
            "split": "test",
            "z": 18,
            "x": 1,
            "y": 3,
            "qa_status": "rejected",
            "qa_reason": "hr_placeholder",
        },
    ]
    write_manifest(tmp_path, rows)
    df = read_manifest(tmp_path)
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert df.loc[1, "qa_reason"] == "hr_placeholder"
    assert df.loc[0, "note"] == "kept"
    assert validate_manifest_schema(df) == []
    csv = pd.read_csv(tmp_path / "manifest.csv")
    assert len(csv) == 2 and "sha256_hr" in csv.columns
    assert not list(tmp_path.glob(".*part"))  # atomic writes leave no temp files


def test_schema_validation_names_problems():
    df = conform_manifest([{"id": "a", "qa_status": "weird"}, {"id": "a", "qa_status": "ok"}])
    problems = validate_manifest_schema(df.drop(columns=["lat"]))
    assert "missing column lat" in problems
    assert any("qa_status" in p for p in problems)
    assert "duplicate sample ids" in problems


def test_dataset_json_requires_the_contract_keys(tmp_path):
    with pytest.raises(ValueError, match="missing required keys"):
        write_dataset_json(tmp_path, {"name": "x"})
    meta = {
        "name": "x",
        "version": "1",
        "scale": 32,
        "hr_px": 256,
        "lr_px": 8,
        "crs": "EPSG:3857",
        "sources": {},
        "counts": {},
        "config": {},
    }
    write_dataset_json(tmp_path, meta)
    assert read_dataset_json(tmp_path)["layout_version"]
    assert DatasetLayout.open(tmp_path).scale == 32
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="missing keys"):
        read_dataset_json(tmp_path)
    with pytest.raises(InputError, match="has no dataset.json"):
        read_dataset_json(tmp_path / "nowhere")


def test_manifest_and_plan_are_geoparquet_with_footprints_and_crs(tiny_dataset, tmp_path):
    import geopandas as gpd

    from cmsrd.grid import tile_bounds_3857
    from cmsrd.layout import read_manifest
    from cmsrd.plan import plan_from_tiles, read_plan, write_plan

    gdf = gpd.read_parquet(tiny_dataset / "manifest.parquet")
    assert gdf.crs.to_epsg() == 3857
    row = gdf.iloc[0]
    assert row.geometry.bounds == tile_bounds_3857(int(row.z), int(row.x), int(row.y))
    plain = pd.read_parquet(tiny_dataset / "manifest.parquet")  # pandas still reads it
    assert "geometry" in plain and list(read_manifest(tiny_dataset)) == [c for c in plain if c != "geometry"]
    plan = plan_from_tiles(18, [139586, 139587], [90683, 90683], ["train", "test"], ["a", "a"], 4, 256)
    write_plan(plan, tmp_path / "plan.parquet")
    gplan = gpd.read_parquet(tmp_path / "plan.parquet")
    assert gplan.crs.to_epsg() == 3857 and gplan.geometry.bounds.iloc[1]["minx"] == plan["minx"].iloc[1]
    assert "geometry" not in read_plan(tmp_path / "plan.parquet")
