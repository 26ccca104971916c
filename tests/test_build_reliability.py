"""Builds that meet faults: a failed block search costs only the samples whose own search fails too, a
co-registration window that could not be fetched fails its sample (retried on resume) instead of passing
it unmeasured, refused credentials stop the build at once, and a build without one ok sample exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cmsrd.config import load_config
from cmsrd.errors import CredentialsError
from cmsrd.layout import read_manifest
from cmsrd.testing import run_console_script

pytestmark = pytest.mark.slow
N = 6


def _preset(world: Path, tmp: Path, variant: str = "real", faults: dict | None = None, **build) -> Path:
    d = load_config(f"demo-{variant}").to_dict()
    d.update(
        samples=N,
        world={"path": str(world), "faults": faults or {}},
        split={"test_fraction": 0.25, "block_tiles": 2},
        build={"partition_size": 6, "rate_per_worker": 0, "http_backoff_s": 0.01, **build},
    )
    p = tmp / f"{variant}-{len(list(tmp.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*.png"))}


@pytest.fixture(scope="module")
def clean_real(small_world, tmp_path_factory) -> Path:
    from cmsrd.driver import run_build

    tmp = tmp_path_factory.mktemp("clean_real")
    run_build(load_config(_preset(small_world, tmp)), tmp / "ds", workers=0, progress=False)
    return tmp / "ds"


def _first_request_fails_seed() -> int:
    from cmsrd.world.faults import FaultConfig, schedule

    for seed in range(500):
        sc = schedule(FaultConfig(error_rate=0.2, error_codes=(500,), seed=seed), 8)
        if sc[0] is not None and not any(sc[1:]):
            return seed
    raise AssertionError("no seed")


def test_a_failed_block_search_costs_only_its_own_samples(small_world, clean_real, tmp_path):
    from cmsrd.driver import run_build

    faults = {
        "error_rate": 0.2,
        "error_codes": [500],
        "retry_after_s": 0,
        "seed": _first_request_fails_seed(),
        "paths": ["/stac/v1/search"],
    }
    cfg = load_config(_preset(small_world, tmp_path, faults=faults, http_retries=0))
    run_build(cfg, tmp_path / "ds", workers=0, progress=False)
    got, want = read_manifest(tmp_path / "ds"), read_manifest(clean_real)
    assert (want["qa_status"] == "ok").sum() >= N // 2
    pd.testing.assert_series_equal(got["qa_status"], want["qa_status"])
    assert _files(tmp_path / "ds") == _files(clean_real)


def test_an_unfetched_coregistration_window_fails_the_sample_and_resumes(small_world, clean_real, tmp_path):
    from cmsrd.driver import run_build
    from cmsrd.errors import SampleError
    from cmsrd.sources.worldimagery import WorldImageryHR

    real_fetch = WorldImageryHR.fetch
    calls = {"n": 0}

    def flaky(self, z, x, y, *a, **k):
        if z < 18 and calls["n"] == 0:  # the first context window read fails for good
            calls["n"] += 1
            raise SampleError("hr_fetch_failed", "503 after every retry")
        return real_fetch(self, z, x, y, *a, **k)

    preset = load_config(_preset(small_world, tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WorldImageryHR, "fetch", flaky)
        run_build(preset, tmp_path / "ds", workers=0, progress=False)
    df = read_manifest(tmp_path / "ds")
    bad = df[df["qa_status"] != read_manifest(clean_real)["qa_status"]]
    assert len(bad) >= 1 and set(bad["qa_reason"]) == {"hr_fetch_failed"}
    assert bad["qa_detail"].str.contains("co-registration window").all()
    assert not df["qa_reason"].eq("shift_unmeasured").any()
    run_build(preset, tmp_path / "ds", workers=0, progress=False)  # resume: the window is fetched now
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "ds"), read_manifest(clean_real))


@pytest.mark.parametrize("where", ["fetch", "search_area"])
def test_refused_credentials_stop_the_build_at_once(small_world, tmp_path, where):
    from cmsrd.driver import run_build
    from cmsrd.sources.sentinel2 import Sentinel2STAC

    def refused(*a, **k):
        raise CredentialsError("credentials (SH_CLIENT_ID / SH_CLIENT_SECRET)", "rejected (HTTP 401)", "set them")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Sentinel2STAC, where, refused)
        with pytest.raises(CredentialsError, match="SH_CLIENT_ID"):
            run_build(load_config(_preset(small_world, tmp_path)), tmp_path / "ds", workers=0, progress=False)
    journal = tmp_path / "ds" / ".cmsrd" / "journal.jsonl"
    assert not journal.exists() or not [json.loads(x) for x in journal.read_text().splitlines()]


def test_a_build_without_one_ok_sample_exits_1(small_world, tmp_path):
    faults = {"error_rate": 1.0, "error_codes": [503], "retry_after_s": 0, "paths": ["/arcgis/"]}
    preset = _preset(small_world, tmp_path, "synthetic", faults=faults, http_retries=0)
    res = run_console_script("cmsrd", "build", str(preset), "--out", str(tmp_path / "ds"), "--workers", "0", "--quiet")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "no sample is ok" in res.stderr and "Traceback" not in res.stderr
    assert "hr_fetch_failed" in res.stdout
    sid = str(read_manifest(tmp_path / "ds")["id"].iloc[0])
    res = run_console_script("cmsrd", "sample", sid, "--config", str(preset), "--out", str(tmp_path / "one"))
    assert res.returncode == 1 and f"{sid}: failed (hr_fetch_failed" in res.stdout, (res.stdout, res.stderr)


def test_a_full_disk_stops_the_build_with_one_error(small_world, tmp_path):
    import errno

    from cmsrd import stages
    from cmsrd.driver import run_build
    from cmsrd.errors import InputError

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "write_png", full)
        with pytest.raises(InputError, match="the disk is full") as ei:
            run_build(
                load_config(_preset(small_world, tmp_path, "synthetic")), tmp_path / "ds", workers=0, progress=False
            )
    assert "resumes" in str(ei.value)
    journal = tmp_path / "ds" / ".cmsrd" / "journal.jsonl"
    assert not journal.exists() or not journal.read_text().strip()
