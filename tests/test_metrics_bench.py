"""perf/metrics_bench.py: rows, statuses and JSON of a tiny CPU run with stand-in weights; missing
weights recorded as skipped; pairs from a built dataset (dihedral fill-up); no geo-stack imports."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "perf" / "metrics_bench.py"


@pytest.fixture(scope="module")
def mb():
    spec = importlib.util.spec_from_file_location("metrics_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stand_in_run_rows_and_json(mb, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CMSRD_WEIGHTS_MANIFEST", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))  # stand-ins must not land here
    out = tmp_path / "bench.json"
    rc = mb.main(
        [
            "--n",
            "8",
            "--size",
            "64",
            "--scale",
            "16",
            "--device",
            "cpu",
            "--stand-in-weights",
            "--metrics",
            "psnr_y,ssim_y,lpips,fid",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    lines = [json.loads(line) for line in printed if line.startswith("{")]
    assert [r["metric"] for r in lines] == ["psnr_y", "ssim_y", "lpips", "fid"]
    assert "| metric | status | pairs | build s | run s | ms/image | images/s | mean value |" in printed
    assert any(line.startswith("| lpips ↓ | ran | 8 |") for line in printed)

    report = json.loads(out.read_text())
    env, rows = report["environment"], {r["metric"]: r for r in report["rows"]}
    assert env["n_pairs"] == 8 and env["image_size"] == [64, 64] and env["device"] == "cpu"
    assert env["versions"]["torch"] and env["stand_in_weights"] is True
    assert set(env["stand_in_keys"]) == {"tv_alexnet", "fidelity_inception"}
    for r in rows.values():
        assert r["status"] == "ran", r
        assert r["values"] == "stand-in weights, timing only" and r["n_pairs"] == 8 and r["device"] == "cpu"
        assert r["run_s"] > 0 and r["ms_per_image"] == pytest.approx(1000 * r["run_s"] / 8)
        assert r["images_per_s"] == pytest.approx(8 / r["run_s"]) and np.isfinite(r["mean"])
    assert 10 < rows["psnr_y"]["mean"] < 60 and 0 < rows["ssim_y"]["mean"] < 1  # bicubic x16: blurred, not identical
    assert rows["lpips"]["batch_size"] == 4 and rows["lpips"]["build_s"] > 0 and rows["lpips"]["mean"] > 0
    assert rows["fid"]["level"] == "set" and rows["fid"]["settings"]["n_images"] == 8
    # the temporary TORCH_HOME and manifest are gone and the caller's environment is back
    import os

    assert os.environ["TORCH_HOME"] == str(tmp_path / "empty_home") and "CMSRD_WEIGHTS_MANIFEST" not in os.environ
    assert not (tmp_path / "empty_home").exists()


def test_missing_weights_are_skipped_and_failures_recorded(mb, tmp_path, monkeypatch):
    monkeypatch.delenv("CMSRD_WEIGHTS_MANIFEST", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    report = mb.run(
        mb.build_parser().parse_args(
            ["--n", "3", "--size", "32", "--scale", "8", "--device", "cpu", "--metrics", "psnr_rgb,lpips,musiq"]
        )
    )
    rows = {r["metric"]: r for r in report["rows"]}
    assert rows["psnr_rgb"]["status"] == "ran" and rows["psnr_rgb"]["values"] == "real weights where needed"
    for name, file in (("lpips", "alexnet-owt-7be5be79.pth"), ("musiq", "musiq_koniq_ckpt-e95806b9.pth")):
        assert rows[name]["status"] == "skipped" and file in rows[name]["reason"], rows[name]
        assert str(tmp_path / "empty") in rows[name]["reason"] and rows[name]["run_s"] is None
    table = mb.markdown_table(report["rows"])
    assert "| lpips ↓ | skipped: weights 'alexnet-owt-7be5be79.pth': file not found" in table

    # any other exception is a failed row with its type, and the next metric still runs
    def boom(values):
        raise RuntimeError("boom")

    monkeypatch.setattr(mb, "_mean", boom)
    row = mb.bench_metric(
        "psnr_y", [np.zeros((16, 16, 3), np.uint8)], [np.ones((16, 16, 3), np.uint8)], "cpu", None, 0, False
    )
    assert row["status"] == "failed" and row["reason"] == "RuntimeError: boom"


def test_dataset_pairs_fill_up_with_dihedral_variants(mb, tiny_dataset):
    from cmsrd.degrade import synthetic_lr, upsample
    from cmsrd.io import read_png
    from cmsrd.layout import DatasetLayout

    layout = DatasetLayout.open(tiny_dataset)
    hr_paths = sorted(layout.image_dir("test", "hr").glob("*.png"))
    n = 2 * len(hr_paths) + 1
    sr, hr, info = mb.dataset_pairs(tiny_dataset, n, split="test")
    assert len(sr) == len(hr) == n and info["scale"] == layout.scale and info["unique_pairs"] == n
    first = read_png(hr_paths[0])
    assert np.array_equal(hr[0], first)
    assert np.array_equal(hr[len(hr_paths)], np.rot90(first, 1))  # second round: rotated by 90 degrees
    assert np.array_equal(sr[0], upsample(synthetic_lr(first, layout.scale), first.shape[:2]))
    assert {mb.dihedral(first, k).tobytes() for k in range(8)} == {
        a.tobytes() for k in range(4) for a in (np.rot90(first, k), np.rot90(first, k)[:, ::-1])
    }
    # more pairs than 8 x the images: the list repeats and says so
    _, _, info = mb.dataset_pairs(tiny_dataset, 8 * len(hr_paths) + 3, split="test")
    assert info["unique_pairs"] == 8 * len(hr_paths)


def test_runs_without_the_geo_stack(tmp_path):
    """The script must run where rasterio/geopandas/osmium/dask are not installed (the GPU machine)."""
    code = textwrap.dedent(f"""
        import importlib.abc, runpy, sys
        BLOCKED = {{"rasterio", "geopandas", "osmium", "dask", "distributed", "pystac", "pystac_client",
                   "sentinelhub", "shapely", "pyproj", "morecantile", "mercantile"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        sys.argv = ["metrics_bench.py", "--n", "2", "--size", "32", "--scale", "8", "--device", "cpu",
                    "--metrics", "psnr_y,ssim_rgb,lpips", "--stand-in-weights", "--out", {str(tmp_path / "o.json")!r}]
        try:
            runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ran", "ran", "ran"], rows
