"""Preset loading and validation, the plan file, the journal and the output-dir identity check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cmsrd.config import PRESETS_DIR, load_aois, load_config
from cmsrd.errors import InputError
from cmsrd.journal import BuildState, Journal
from cmsrd.plan import make_plan, read_plan, write_plan


def _aoi_file(tmp_path: Path, geometry: dict, name: str = "area") -> Path:
    p = tmp_path / f"{name}.geojson"
    p.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [{"type": "Feature", "properties": {"name": name}, "geometry": geometry}],
            }
        )
    )
    return p


def _box(w, s, e, n) -> dict:
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _preset(tmp_path: Path, **kw) -> dict:
    aoi = _aoi_file(tmp_path, _box(2.30, 48.84, 2.33, 48.86))
    d = {"name": "t", "samples": 40, "aois": [str(aoi)], "lr_px": 8, "split": {"block_tiles": 4, "test_fraction": 0.2}}
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "name,scale,lr",
    [
        ("cmsrd-real", 16, "sentinel-2"),
        ("cmsrd-synthetic", 32, "bicubic"),
        ("demo-real", 16, "sentinel-2"),
        ("demo-synthetic", 32, "bicubic"),
    ],
)
def test_shipped_presets_load(name, scale, lr):
    cfg = load_config(name)
    assert cfg.scale == scale and cfg.lr.source == lr and cfg.hr_px == 256
    assert load_config(PRESETS_DIR / f"{name}.yaml").fingerprint() == cfg.fingerprint()


def test_real_presets_plan_their_full_sample_count_with_disjoint_split():
    cfg = load_config("cmsrd-real")
    assert len(load_aois(cfg)) == 13
    df = make_plan(cfg)
    assert len(df) == cfg.samples and df["id"].is_unique
    assert set(df["split"]) == {"train", "test"}
    assert df["aoi"].nunique() == 13


def test_unknown_key_suggests_the_close_match(tmp_path):
    with pytest.raises(InputError, match=r"sampels.*unknown key.*did you mean `samples`"):
        load_config({**_preset(tmp_path), "sampels": 3})
    with pytest.raises(InputError, match=r"qa\.max_clod_fraction.*did you mean `max_cloud_fraction`"):
        load_config({**_preset(tmp_path), "qa": {"max_clod_fraction": 0.1}})
    with pytest.raises(InputError, match=r"lr\.source.*did you mean `sentinel-2`"):
        load_config({**_preset(tmp_path), "lr": {"source": "sentinel2"}})


def test_yaml_file_errors_name_the_input(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsamples: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(InputError, match="not found.*demo-real"):
        load_config("no-such-preset")
    p.write_text(yaml.safe_dump({"name": "x", "samples": "many", "aois": ["a.geojson"]}))
    with pytest.raises(InputError, match="samples: must be an integer"):
        load_config(p)


def test_geometry_and_sizes_are_checked(tmp_path):
    with pytest.raises(InputError, match="not a multiple"):
        load_config(_preset(tmp_path, hr_px=256, lr_px=24))
    with pytest.raises(InputError, match="test_fraction"):
        load_config(_preset(tmp_path, split={"test_fraction": 1.5}))
    with pytest.raises(InputError, match="missing required"):
        load_config({"name": "x"})


def test_aois_must_be_valid_lonlat_polygons(tmp_path):
    line = _aoi_file(tmp_path, {"type": "LineString", "coordinates": [[2.3, 48.8], [2.4, 48.9]]}, "line")
    with pytest.raises(InputError, match="LineString, not a Polygon"):
        load_aois(load_config(_preset(tmp_path, aois=[str(line)])))
    # Drawn across the antimeridian with longitudes 179 and -179: shapely sees a 358-degree-wide box.
    wrap = _aoi_file(tmp_path, _box(-179.5, -17.0, 179.5, -16.5), "fiji")
    with pytest.raises(InputError, match="antimeridian.*split it at"):
        load_aois(load_config(_preset(tmp_path, aois=[str(wrap)])))
    swapped = _aoi_file(tmp_path, _box(48.84, 2.30, 48.86, 200.0), "swapped")
    with pytest.raises(InputError, match="outside lon/lat range"):
        load_aois(load_config(_preset(tmp_path, aois=[str(swapped)])))
    bowtie = _aoi_file(
        tmp_path, {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}, "bowtie"
    )
    with pytest.raises(InputError, match="not a valid polygon"):
        load_aois(load_config(_preset(tmp_path, aois=[str(bowtie)])))
    with pytest.raises(InputError, match="file not found"):
        load_aois(load_config(_preset(tmp_path, aois=["nowhere.geojson"])))
    # A correct antimeridian area: two parts, one each side.
    ok = _aoi_file(
        tmp_path,
        {
            "type": "MultiPolygon",
            "coordinates": [
                _box(179.5, -17.0, 180.0, -16.5)["coordinates"],
                _box(-180.0, -17.0, -179.5, -16.5)["coordinates"],
            ],
        },
        "fiji2",
    )
    assert load_aois(load_config(_preset(tmp_path, aois=[str(ok)])))[0].name == "fiji2"


def test_sample_count_over_capacity_fails_at_planning(tmp_path):
    cfg = load_config(_preset(tmp_path, samples=100_000))
    with pytest.raises(InputError, match="hold only"):
        make_plan(cfg)


def test_plan_is_deterministic_and_round_trips_through_parquet(tmp_path):
    cfg = load_config(_preset(tmp_path))
    a, b = make_plan(cfg), make_plan(cfg)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == [
        "id",
        "z",
        "x",
        "y",
        "lon",
        "lat",
        "minx",
        "miny",
        "maxx",
        "maxy",
        "hr_gsd_m",
        "block",
        "split",
        "aoi",
    ]
    assert (a["id"] == a["z"].astype(str) + "_" + a["x"].astype(str) + "_" + a["y"].astype(str)).all()
    path = write_plan(a, tmp_path / "plan.parquet")
    pd.testing.assert_frame_equal(read_plan(path), a)
    # Consecutive rows stay within a block (partitions cover compact areas).
    blocks = a["block"].astype(str).tolist()
    assert sum(1 for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]) == len(set(blocks))


def test_edited_plan_is_rechecked(tmp_path):
    cfg = load_config(_preset(tmp_path))
    df = make_plan(cfg)
    dup = pd.concat([df, df.iloc[:1]])
    dup.to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="duplicate tiles"):
        read_plan(tmp_path / "dup.parquet")
    bad = df.copy()
    bad.loc[0, "split"] = "val"
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="unknown split"):
        read_plan(tmp_path / "bad.parquet")
    # Dropping rows and moving geometry columns away is fine: geometry is re-derived from z/x/y.
    edited = df.iloc[::2][["z", "x", "y", "split", "aoi"]]
    edited.to_parquet(tmp_path / "edited.parquet")
    back = read_plan(tmp_path / "edited.parquet")
    np.testing.assert_allclose(back["minx"].to_numpy(), df.iloc[::2]["minx"].to_numpy())


def test_journal_drops_torn_line_and_last_record_wins(tmp_path):
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        j.append({"id": "18_1_1", "qa_status": "failed"})
        j.append({"id": "18_1_2", "qa_status": "ok"})
        j.append({"id": "18_1_1", "qa_status": "ok", "v": np.float32(0.5)})
    with open(path, "a") as f:
        f.write('{"id": "18_1_3", "qa_st')  # a crash mid-append
    j = Journal(path)
    idx = j.index()
    assert set(idx) == {"18_1_1", "18_1_2"}
    assert idx["18_1_1"][1] == "ok"
    rec = next(j.read_at([idx["18_1_1"][0]]))
    assert rec["v"] == 0.5
    j.append({"id": "18_1_3", "qa_status": "ok"})
    j.close()
    assert path.read_text().count("\n") == 4 and 'qa_st"' not in path.read_text()


def test_output_dir_of_another_dataset_is_refused_before_any_work(tmp_path):
    from cmsrd.driver import run_build

    cfg = load_config(_preset(tmp_path))
    out = tmp_path / "out"
    st = BuildState(out)
    st.write_identity("other", "0000-1111", {}, {})
    with pytest.raises(InputError, match="different config.*--force"):
        run_build(cfg, out, workers=0, progress=False)
    assert not (out / ".cmsrd" / "journal.jsonl").exists()
    # A dataset built by something else (dataset.json without build state) is refused too.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match="not built by this cmsrd"):
        run_build(cfg, foreign, workers=0, progress=False)


def test_one_build_per_output_dir(tmp_path):
    a, b = BuildState(tmp_path), BuildState(tmp_path)
    a.lock()
    try:
        with pytest.raises(InputError, match="another `cmsrd build`"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


@pytest.mark.parametrize(
    "change, what",
    [
        ({"samples": 10**12}, "samples"),
        ({"build": {"timeout_s": -1}}, "build.timeout_s"),
        ({"build": {"http_retries": -3}}, "build.http_retries"),
        ({"build": {"http_backoff_s": float("nan")}}, "build.http_backoff_s"),
        ({"aois": ["world"], "world": {"faults": {"eror_rate": 0.1}}}, "eror_rate"),
        ({"aois": ["world"], "world": {"faults": {"error_rate": 3}}}, "world.faults"),
    ],
)
def test_wrong_values_are_refused_when_loading(tmp_path, change, what):
    with pytest.raises(InputError) as ei:
        load_config(_preset(tmp_path, **change))
    assert what in str(ei.value)


def test_fault_config_typo_is_an_input_error():
    from cmsrd.world.faults import FaultConfig

    with pytest.raises(InputError, match="did you mean `error_rate`"):
        FaultConfig(eror_rate=0.1)


def test_preset_folder_and_odd_aoi_files_are_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        load_config(str(tmp_path))
    cases = {
        "list.geojson": [1, 2],
        "features.geojson": {"type": "FeatureCollection", "features": {"a": 1}},
        "evil.geojson": {
            "type": "Feature",
            "properties": {"name": "../../../tmp/evil"},
            "geometry": _box(2.30, 48.84, 2.33, 48.86),
        },
    }
    for name, doc in cases.items():
        (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(InputError) as ei:
            load_aois(load_config(_preset(tmp_path, aois=[str(tmp_path / name)])))
        assert name in str(ei.value)


def test_plan_with_a_bad_block_or_aoi_name_is_refused(tmp_path):
    from cmsrd.plan import check_plan

    df = make_plan(load_config(_preset(tmp_path, samples=4)))
    with pytest.raises(InputError, match="ZOOM/BLOCK_TILES"):
        check_plan(df.assign(block="a/b/c"))
    with pytest.raises(InputError, match="not a plain name"):
        check_plan(df.assign(aoi="../../../tmp/evil"))


def test_sample_task_carries_exactly_the_plan_columns():
    """A task is one plan row with plain Python values: every plan column reaches the stages and the row."""
    from dataclasses import fields

    from cmsrd.layout import BUILD_COLUMNS
    from cmsrd.plan import PLAN_COLUMNS, plan_from_tiles
    from cmsrd.stages import SampleTask, plan_tasks

    assert [f.name for f in fields(SampleTask)] == list(PLAN_COLUMNS)
    assert set(PLAN_COLUMNS) <= set(BUILD_COLUMNS)
    plan = plan_from_tiles(
        18,
        np.array([132740, 132741]),
        np.array([90137, 90138]),
        np.array(["train", "test"]),
        np.array(["a", "b"]),
        4,
        256,
    )
    tasks = plan_tasks(plan)
    assert [t.id for t in tasks] == ["18_132740_90137", "18_132741_90138"] and tasks[1].split == "test"
    assert type(tasks[0].z) is int and type(tasks[0].block) is str and type(tasks[0].lon) is float
    assert tasks[0].columns() == {c: plan.iloc[0][c] for c in PLAN_COLUMNS}
    assert tasks[1].bounds == tuple(plan.iloc[1][["minx", "miny", "maxx", "maxy"]])
