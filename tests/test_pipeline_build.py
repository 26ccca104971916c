"""End-to-end builds from the offline world through its loopback servers and real Dask clusters.

Checked against the world's ground truth: sizes, building IoU of the rendered maps vs truth/classes.tif,
the measured LR shift vs the injected one, spatial disjointness of the split; resume after kill -9 equals
an uninterrupted build; a build under injected server faults completes with every failure recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cmsrd.classes import BY_NAME
from cmsrd.config import load_config
from cmsrd.io import read_png
from cmsrd.layout import read_dataset_json, read_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 8


@pytest.fixture(scope="module")
def world(small_world) -> Path:
    """The session's small offline world (8 x 8 zoom-18 tiles, two Sentinel-2 dates)."""
    return small_world


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two worker processes started by the tests (used through `--scheduler`)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
    ) as c:
        yield c


@pytest.fixture(scope="module")
def synthetic_build(world, tmp_path_factory) -> Path:
    """An uninterrupted demo-synthetic build on the default path: its own LocalCluster, 2 worker processes."""
    from cmsrd.driver import run_build

    tmp = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(_preset(world, tmp, "synthetic"))
    rep = run_build(cfg, tmp / "ds", workers=2, threads=1, progress=False)
    assert rep.processed == N_SAMPLES
    return tmp / "ds"


def _preset(world: Path, tmp: Path, variant: str, faults: dict | None = None, **extra) -> Path:
    base = load_config(f"demo-{variant}").to_dict()
    base.update(
        samples=N_SAMPLES,
        world={"path": str(world), "faults": faults or {}},
        split={"test_fraction": 0.25, "block_tiles": 2},
        build={"partition_size": 4, "rate_per_worker": 0},
        output={**base.get("output", {}), "geotiff": True},  # the optional GeoTIFFs are checked too
    )
    base.update(extra)
    path = tmp / f"demo-{variant}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _truth_classes(world: Path, row) -> np.ndarray:
    import rasterio
    from rasterio.windows import from_bounds

    with rasterio.open(world / "truth" / "classes.tif") as ds:
        win = from_bounds(row.minx, row.miny, row.maxx, row.maxy, ds.transform)
        return ds.read(1, window=win.round_offsets().round_lengths())


def _check_dataset(root: Path, world: Path, hr_px: int, lr_px: int) -> pd.DataFrame:
    from cmsrd.data import CMSRDDataset
    from cmsrd.validate import validate_dataset

    problems, summary = validate_dataset(root)
    assert problems == [], problems[:5]
    df = read_manifest(root)
    assert len(df) == N_SAMPLES and df["id"].is_unique
    ok = df[df["qa_status"] == "ok"]
    assert len(ok) >= N_SAMPLES // 2, df[["id", "qa_status", "qa_reason", "qa_detail"]]
    # Sizes in the official folder convention.
    for r in ok.itertuples():
        assert read_png(root / r.split / f"hr_{hr_px}" / f"{r.id}.png").shape == (hr_px, hr_px, 3)
        assert read_png(root / r.split / f"lr_{lr_px}" / f"{r.id}.png").shape == (lr_px, lr_px, 3)
        assert read_png(root / r.split / f"sr_{lr_px}_{hr_px}" / f"{r.id}.png").shape == (hr_px, hr_px, 3)
        assert read_png(root / r.split / f"ref_{hr_px}" / f"{r.id}.png").shape == (hr_px, hr_px, 3)
    # Maps agree with the world's truth where buildings are.
    inter = union = 0
    for r in ok.itertuples():
        mask = read_png(root / r.split / f"mask_{hr_px}" / f"{r.id}.png", indices=True)
        truth = _truth_classes(world, r)
        assert truth.shape == mask.shape
        b = BY_NAME["building"].id
        inter += int(((mask == b) & (truth == b)).sum())
        union += int(((mask == b) | (truth == b)).sum())
    assert union > 0 and inter / union > 0.8, inter / union
    # Spatially disjoint split: no test tile shares an edge or corner with a train tile.
    train = set(zip(ok[ok.split == "train"].x, ok[ok.split == "train"].y))
    for x, y in zip(ok[ok.split == "test"].x, ok[ok.split == "test"].y):
        assert not any((x + dx, y + dy) in train for dx in (-1, 0, 1) for dy in (-1, 0, 1))
    # Loads with the torch dataset (both splits that have samples).
    for split in sorted(set(ok["split"])):
        ds = CMSRDDataset(root, split=split, inputs=("lr", "sr", "map", "mask", "hr"))
        item = ds[0]
        assert item["hr"].shape == (3, hr_px, hr_px) and item["lr"].shape == (3, lr_px, lr_px)
    # The optional GeoTIFFs carry the footprint's georeference (EPSG:3857 bounds of the tile).
    import rasterio

    for r in ok.head(3).itertuples():
        with rasterio.open(root / r.path_geo_hr) as g, rasterio.open(root / r.path_geo_lr) as gl:
            assert g.crs.to_epsg() == 3857 and (g.width, g.count, gl.width) == (hr_px, 3, lr_px)
            np.testing.assert_allclose(tuple(g.bounds), (r.minx, r.miny, r.maxx, r.maxy), atol=1e-6)
            np.testing.assert_allclose(tuple(gl.bounds), (r.minx, r.miny, r.maxx, r.maxy), atol=1e-6)
            assert np.array_equal(np.moveaxis(g.read(), 0, -1), read_png(root / r.path_hr))
    meta = read_dataset_json(root)
    assert meta["counts"]["total"] == N_SAMPLES
    assert meta["sources"]["map"]["attribution"]
    return df


def test_demo_synthetic_build(synthetic_build, world, tmp_path):
    from cmsrd.driver import run_build

    root = synthetic_build
    df = _check_dataset(root, world, 256, 8)
    assert set(df["lr_source"]) == {"bicubic"}
    # Resuming a finished build does nothing and changes nothing.
    before = (root / "manifest.parquet").read_bytes()
    cfg = load_config(root.parent / "demo-synthetic.yaml")
    rep2 = run_build(cfg, root, workers=0, progress=False)
    assert rep2.processed == 0 and rep2.skipped == N_SAMPLES
    pd.testing.assert_frame_equal(read_manifest(root), df)
    assert (root / "manifest.parquet").read_bytes() == before


def test_threads_only_cluster_builds_the_same_dataset(synthetic_build, tmp_path):
    """`processes=False` (one process, a cluster of threads) writes the same files and manifest."""
    from cmsrd.driver import run_build

    cfg = load_config(synthetic_build.parent / "demo-synthetic.yaml")
    rep = run_build(cfg, tmp_path / "ds", workers=2, threads=1, processes=False, progress=False)
    assert rep.processed == N_SAMPLES
    assert (tmp_path / "ds" / "manifest.parquet").read_bytes() == (synthetic_build / "manifest.parquet").read_bytes()


def test_in_process_thread_pool_builds_the_same_dataset(synthetic_build, tmp_path):
    """The default on small machines (stages on a thread pool in this process) writes the same files and
    manifest as the 2-process cluster, whatever order the threads finish in."""
    from cmsrd.driver import run_build

    cfg = load_config(synthetic_build.parent / "demo-synthetic.yaml")
    rep = run_build(cfg, tmp_path / "ds", workers=0, threads=3, progress=False)
    assert rep.processed == N_SAMPLES
    assert (tmp_path / "ds" / "manifest.parquet").read_bytes() == (synthetic_build / "manifest.parquet").read_bytes()


def test_default_workers_fit_the_machine(monkeypatch):
    from cmsrd import driver

    monkeypatch.setattr(driver.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert driver.default_workers() == 0  # small machine: in-process
    monkeypatch.setattr(driver.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert driver.default_workers() == 4


def test_demo_real_build_on_an_external_scheduler(world, cluster, tmp_path):
    """`--scheduler`: a scheduler and two worker processes the tests started themselves."""
    from cmsrd.driver import run_build

    truth = json.loads((world / "truth" / "truth.json").read_text())
    cfg = load_config(_preset(world, tmp_path, "real"))
    rep = run_build(cfg, tmp_path / "ds", scheduler=cluster.scheduler_address, progress=False)
    assert rep.processed == N_SAMPLES
    df = _check_dataset(tmp_path / "ds", world, 256, 16)
    ok = df[df["qa_status"] == "ok"]
    assert set(ok["lr_source"]) == {"sentinel-2"} and ok["lr_scene_id"].str.len().gt(0).all()
    assert (ok["lr_cloud_fraction"] <= cfg.qa.max_cloud_fraction).all()
    # The measured shift matches the injected one (truth: metres, +x east, +y north, per scene; manifest:
    # LR pixels, +x east, +y south). Measured per 4x4-footprint window of one scene (see stages.coregister)
    # with the fitted sensor colour mix (cmsrd.align): ~0.1 LR px median on this world, worst ~0.3.
    assert ok["shift_x_lrpx"].notna().all() and (ok["shift_correlation"] > 0.6).all()
    lr_px_m = ok["hr_gsd_m"] * 256 / 16  # ground size of one LR pixel
    want_x = ok["lr_scene_id"].map(lambda sid: truth["s2_items"][sid]["shift_m"][0]) / lr_px_m
    want_y = -ok["lr_scene_id"].map(lambda sid: truth["s2_items"][sid]["shift_m"][1]) / lr_px_m
    err = pd.concat([ok["shift_x_lrpx"] - want_x, ok["shift_y_lrpx"] - want_y]).abs()
    assert err.median() < 0.2 and err.max() < 0.45, (
        ok[["shift_x_lrpx", "shift_y_lrpx"]].values.tolist(),
        want_x.tolist(),
        want_y.tolist(),
    )


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cmsrd.cli import main; main()", *args]


def test_killed_build_resumes_to_the_same_dataset(world, cluster, synthetic_build, tmp_path):
    """kill -9 of `cmsrd build` mid-way, then the same command again: equals the uninterrupted build."""
    preset = _preset(world, tmp_path, "synthetic", faults={"latency_s": 0.2})  # slow enough to stop mid-way
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "killed"
    args = ("build", str(preset), "--out", str(out), "--scheduler", cluster.scheduler_address)
    proc = subprocess.Popen(
        _cli(*args, "--quiet"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    journal = out / ".cmsrd" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = journal.read_text().count("\n")
    assert 2 <= done_before < N_SAMPLES
    assert not (out / "manifest.parquet").exists()
    res = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"({done_before} already done)" in res.stdout
    pd.testing.assert_frame_equal(read_manifest(synthetic_build), read_manifest(out))
    assert not list(out.rglob(".*.part"))
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(lines) == N_SAMPLES and len({r["id"] for r in lines}) == N_SAMPLES  # nothing redone
    # Same files, byte for byte, in the same places.
    ref = {p.relative_to(synthetic_build) for p in synthetic_build.glob("*/*/*.png")}
    assert ref == {p.relative_to(out) for p in out.glob("*/*/*.png")}


def test_real_preset_on_faulty_services_records_every_failure(world, cluster, tmp_path, monkeypatch):
    """A non-demo preset pointed at the services' URLs (here the world's loopback servers, with injected
    5xx/429 and corrupt bodies on tiles, STAC and COG reads); OSM comes through the Geofabrik index."""
    from cmsrd.driver import run_build
    from cmsrd.validate import validate_dataset
    from cmsrd.world.faults import FaultConfig
    from cmsrd.world.servers import serve_world

    monkeypatch.setenv("CMSRD_CACHE", str(tmp_path / "cache"))
    w, s, e, n = json.loads((world / "world.json").read_text())["bounds_lonlat"]
    aoi = tmp_path / "world.geojson"
    aoi.write_text(
        json.dumps(
            {
                "type": "Feature",
                "properties": {"name": "freising"},
                "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
            }
        )
    )
    faults = FaultConfig(
        error_rate=0.3,
        error_codes=(429, 500, 503),
        corrupt_rate=0.1,
        retry_after_s=0,
        seed=3,
        paths=("/arcgis/", "/stac/", "/files/"),
    )
    with serve_world(world, faults=faults) as srv:
        d = load_config("cmsrd-real").to_dict()
        d.update(
            samples=N_SAMPLES,
            aois=[str(aoi)],
            split={"test_fraction": 0.25, "block_tiles": 2},
            build={"partition_size": 4, "http_retries": 1, "http_backoff_s": 0.05},
            hr={"url": srv.tile_template, "identify_url": srv.identify_url},
            lr={"source": "sentinel-2", "stac_url": srv.stac_url, "start": "2023-01-01", "end": "2023-12-31"},
            map={"geofabrik_index": srv.geofabrik_index_url},
        )
        cfg = load_config(d)
        rep = run_build(cfg, tmp_path / "ds", scheduler=cluster.scheduler_address, progress=False)
        stats = srv.stats.snapshot()
    df = read_manifest(tmp_path / "ds")
    assert rep.processed == N_SAMPLES and len(df) == N_SAMPLES and df["id"].is_unique
    assert sum(stats.get("faults", {}).values()) > 0, stats
    bad = df[df["qa_status"] != "ok"]
    assert (df["qa_status"] == "failed").any(), df[["id", "qa_status", "qa_reason"]]
    assert bad["qa_reason"].str.len().gt(0).all() and bad["qa_detail"].str.len().gt(0).all()
    assert not bad["qa_detail"].str.contains("Traceback").any()
    assert validate_dataset(tmp_path / "ds")[0] == []
    counts = read_dataset_json(tmp_path / "ds")["counts"]
    assert sum(counts["by_reason"].values()) == len(bad)


def test_writer_manifest_and_validate_catch_corruption(tmp_path):
    """Writer + streamed manifest (small chunks, mixed statuses) + validate, without any source."""
    from cmsrd.journal import BuildState, Journal
    from cmsrd.manifest import finalize
    from cmsrd.plan import plan_from_tiles
    from cmsrd.stages import BuildSpec, base_row, plan_tasks, write_sample
    from cmsrd.validate import validate_dataset

    d = load_config("demo-synthetic").to_dict()
    d.update(samples=4, aois=[str(REPO / "manifests" / "aois" / "paris-center.geojson")], world=None)
    cfg = load_config(d)
    xs, ys = np.array([132740, 132741, 132750, 132760]), np.array([90137, 90137, 90140, 90150])
    plan = plan_from_tiles(18, xs, ys, np.array(["train", "train", "test", "test"]), np.array(["p"] * 4), 4, 256)
    root = tmp_path / "ds"
    spec = BuildSpec(cfg, str(root))
    state = BuildState(root)
    rng = np.random.default_rng(0)
    with Journal(state.journal_path) as j:
        for i, task in enumerate(plan_tasks(plan)):
            row = base_row(spec, task)
            if i == 2:  # a rejected sample: no files
                row.update(qa_status="rejected", qa_reason="cloud", qa_detail="42%")
            else:
                mask = rng.integers(0, 3, (256, 256)).astype(np.uint8)
                imgs = {
                    "hr": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
                    "lr": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                    "sr": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
                    "map": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
                    "mask": mask,
                }
                row.update(write_sample(spec, task, imgs, geo=(i == 0)), qa_status="ok", qa_reason="", qa_detail="")
            j.append(row)
    # A stray file left by an earlier attempt of the rejected sample is pruned by finalize.
    stray = root / "test" / "hr_256" / f"{plan.id[2]}.png"
    stray.write_bytes((root / "train" / "hr_256" / f"{plan.id[0]}.png").read_bytes())
    counts = finalize(spec, cfg, plan, state, chunk=2)
    assert not stray.exists()
    assert counts["by_status"] == {"ok": 3, "rejected": 1} and counts["by_reason"] == {"cloud": 1}
    df = read_manifest(root)
    assert list(df["id"]) == list(plan["id"]) and df["path_geo_hr"].notna().sum() == 1
    assert pd.read_csv(root / "manifest.csv")["id"].tolist() == list(plan["id"])
    assert validate_dataset(root)[0] == []
    victim = root / "test" / "lr_8" / f"{plan.id[3]}.png"
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    problems = validate_dataset(root)[0]
    assert any("checksum mismatch" in p and plan.id[3] in p for p in problems)


def test_cli_plan_sample_validate_info(world, synthetic_build, tmp_path):
    from click.testing import CliRunner

    from cmsrd.cli import cli

    run = CliRunner().invoke
    preset = synthetic_build.parent / "demo-synthetic.yaml"
    res = run(cli, ["plan", str(preset), "--out", str(tmp_path / "plan.parquet")])
    assert res.exit_code == 0, res.output
    assert f"planned {N_SAMPLES} samples" in res.output
    plan = pd.read_parquet(tmp_path / "plan.parquet")
    assert sorted(plan["id"]) == sorted(read_manifest(synthetic_build)["id"])
    res = run(cli, ["validate", str(synthetic_build)])
    assert res.exit_code == 0 and "valid" in res.output, res.output
    res = run(cli, ["info", str(synthetic_build)])
    assert res.exit_code == 0 and "x32 (8 -> 256 px)" in res.output, res.output
    assert "lr: bicubic  (MATLAB bicubic x32, antialiased)" in res.output and "()" not in res.output
    # One triplet through the same stages; byte-identical to the built one.
    sid = plan["id"].iloc[0]
    res = run(cli, ["sample", sid, "--config", str(preset), "--out", str(tmp_path / "one")])
    assert res.exit_code == 0 and f"{sid}: ok" in res.output, res.output
    one = read_manifest(tmp_path / "one").iloc[0]
    ref = read_manifest(synthetic_build).set_index("id").loc[sid]
    assert one["sha256_hr"] == ref["sha256_hr"] and one["sha256_mask"] == ref["sha256_mask"]
    other = plan["id"].iloc[1]
    res = run(cli, ["sample", other, "--config", str(preset), "--out", str(tmp_path / "one")])
    assert res.exit_code != 0 and f"holds {sid}, not tile {other}" in str(res.exception), res.output
    # Corruption is reported with a non-zero exit.
    victim = next((synthetic_build / "train" / "ref_256").glob("*.png"))
    data = victim.read_bytes()
    try:
        victim.write_bytes(data[:-4] + b"\0\0\0\0")
        res = run(cli, ["validate", str(synthetic_build)])
        assert res.exit_code == 1 and "checksum mismatch" in res.output
    finally:
        victim.write_bytes(data)


def test_a_worker_killed_mid_build_loses_no_sample(world, cluster, synthetic_build, tmp_path):
    """kill -9 of one worker process: Dask reruns its tasks elsewhere and the dataset equals the reference."""
    import threading

    from distributed import Client

    from cmsrd.driver import run_build
    from cmsrd.validate import validate_dataset

    cfg = load_config(_preset(world, tmp_path, "synthetic", faults={"latency_s": 0.2}))
    with Client(cluster.scheduler_address) as c:
        pids = list(c.run(os.getpid).values())
    journal = tmp_path / "ds" / ".cmsrd" / "journal.jsonl"
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 1:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.01)

    t = threading.Thread(target=kill_one)
    t.start()
    rep = run_build(cfg, tmp_path / "ds", scheduler=cluster.scheduler_address, progress=False)
    t.join()
    assert killed and rep.processed == N_SAMPLES
    assert validate_dataset(tmp_path / "ds")[0] == []
    pd.testing.assert_frame_equal(read_manifest(synthetic_build), read_manifest(tmp_path / "ds"))


def test_a_systematic_failure_stops_the_build_early(world, tmp_path, monkeypatch):
    """The HR service answers only 503: the build stops after `abort_after_failures` failed samples with one
    error naming the reason, instead of failing every sample after its retries; the failures stay in the
    journal (a rerun retries them)."""
    from cmsrd.driver import run_build
    from cmsrd.errors import InputError

    monkeypatch.setenv("CMSRD_CACHE", str(tmp_path / "cache"))
    faults = {"error_rate": 1.0, "error_codes": [503], "retry_after_s": 0, "paths": ["/arcgis/"]}
    preset = _preset(
        world,
        tmp_path,
        "synthetic",
        faults=faults,
        build={"abort_after_failures": 3, "http_retries": 0, "rate_per_worker": 0, "partition_size": 4},
    )
    with pytest.raises(InputError, match=r"first 3 samples all failed \(hr_fetch_failed x3\)"):
        run_build(load_config(preset), tmp_path / "ds", workers=0, progress=False)
    rows = [
        json.loads(line) for f in (tmp_path / "ds" / ".cmsrd").glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    rows = [r for r in rows if "qa_status" in r]
    assert len(rows) == 3 and {r["qa_status"] for r in rows} == {"failed"}
