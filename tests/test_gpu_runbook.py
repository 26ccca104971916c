"""The GPU runbook's own code (perf/gpu): the pruned datasets it carries still load for training and
benchmarking, every carried wheel is pinned, and the collector turns a real training run into its
summary. The device calls themselves need a GPU session (perf/gpu/README.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from cmsrd.data import CMSRDDataset

GPU_DIR = Path(__file__).resolve().parents[1] / "perf" / "gpu"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_pruned_dataset_keeps_what_training_reads(tiny_dataset, tmp_path):
    prepare = load("prepare")
    dst = tmp_path / "real"
    prepare.prune_dataset(tiny_dataset, dst)
    full = CMSRDDataset(tiny_dataset, "train", inputs=("lr", "sr", "map", "hr"))
    pruned = CMSRDDataset(dst, "train", inputs=("lr", "sr", "map", "hr"))
    assert pruned.ids == full.ids and len(CMSRDDataset(dst, "test", inputs=("lr", "hr"))) > 0
    a, b = full[0], pruned[0]
    assert all((a[k] == b[k]).all() for k in ("lr", "sr", "map", "hr"))
    assert not any(p.name.startswith("mask") for p in dst.rglob("*") if p.is_dir())  # masks are left behind


def test_every_carried_wheel_is_pinned_in_the_lock():
    prepare = load("prepare")
    pins = prepare.lock_versions()
    assert all(n in pins for n in prepare.PURE + prepare.ABI3)
    assert pins["diffusers"] and pins["torch"] == "2.14.1"


def test_collect_summarises_a_training_run(tiny_dataset, tmp_path):
    from benchmark.train import train

    config = {
        "network": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4},
        "train": {
            "batch_size": 2,
            "num_workers": 0,
            "log_every": 1,
            "val_every": 2,
            "lpips": "off",
            "optim_g": {"type": "Adam", "lr": 1e-3},
        },
    }
    run = tmp_path / "esrgan"
    train("esrgan", tiny_dataset, run, config=config, max_steps=3, progress=False)
    collect = load("collect")
    out = tmp_path / "out"
    collect.main(["--name", "ff", "--runs", str(run), str(tmp_path / "never-ran"), "--out", str(out)])
    report = json.loads((out / "ff.json").read_text())
    ok, failed = report["runs"]
    assert ok["steps"] == 3 and ok["losses"] == ["l_pix"] and ok["train_images_per_s"] > 0
    assert [v["step"] for v in ok["val_curve"]] == [2, 3] and ok["val_curve"][0]["lpips"] is None  # NaN -> null
    assert "error" in failed
    md = (out / "ff.md").read_text()
    assert "| esrgan | 3 |" in md and "n/a (no LPIPS weights)" in md and "never-ran" in md
    assert (out / "ff.png").stat().st_size > 0


def test_session_script_rejects_unknown_parts(tmp_path):
    import subprocess

    res = subprocess.run(
        ["bash", str(GPU_DIR / "session.sh"), "bogus"],
        capture_output=True,
        text=True,
        env={"OUT": str(tmp_path / "o"), "RUNS": str(tmp_path / "r"), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 2 and "unknown part" in res.stderr
