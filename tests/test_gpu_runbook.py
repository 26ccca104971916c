"""The GPU runbook's own code (perf/gpu): the pruned datasets it carries still load for training and
benchmarking, every carried wheel is pinned, and the collector turns a real training run into its
summary. The device calls themselves need a GPU session (perf/gpu/README.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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


def _runbook_env(tmp_path, carry, args: str) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "RUNS": str(tmp_path / "runs"),
        "GPU_CARRY": str(carry),
        "DEVICE": "cpu",
        "PY": sys.executable,
        "OMP_NUM_THREADS": "1",
        "RUNBOOK_ARGS": args,
    }


@pytest.mark.slow
def test_one_call_runbook_runs_on_cpu_and_reports_every_step(tmp_path):
    """`session.sh one` end to end on the tiny geometry: throughput (fp32-eager vs fast), the metric suite,
    sgdm vs sgdm-nomap training and the collected curves, in the JSON + Markdown it brings back
    (~100 s wall on the loaded 2-core development machine, ~30 s of CPU)."""
    import subprocess

    from cmsrd.testing import make_tiny_dataset

    make_tiny_dataset(tmp_path / "carry" / "synthetic", lr_px=2)  # x32, as .gpu/synthetic
    args = (
        "--methods ldm no-such-method --throughput-args '--geometry tiny --size 64 --steps 2 --batch-fp32 2 "
        "--batch-bf16 2 --repeats 1 --modes fp32-eager fast' --pairs 2 --metrics psnr_y "
        "--train-config baselines/configs/sgdm-tiny.yaml --train-args '--max-steps 2 --set train.batch_size=2 "
        "--set train.val_max_images=2 --set train.num_workers=0 --set train.precision=fp32 --set sampler.steps=2 "
        "--set train.lpips=off' --min-train-s 20 --train-overhead-s 20"
    )
    env = _runbook_env(tmp_path, tmp_path / "carry", args)
    res = subprocess.run(["bash", str(GPU_DIR / "session.sh"), "one", "300"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["runbook.json", "runbook.log", "runbook.md", "sgdm.png"]
    report = json.loads((out / "runbook.json").read_text())
    steps = {s["step"].split(" ")[0] + " " + s["step"].split(" ")[1]: s for s in report["steps"]}
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    (tp,) = steps["throughput ldm"]["result"]["results"]
    assert [m["mode"] for m in tp["modes"]] == ["fp32-eager", "fast"] and tp["gflop_per_image"] > 0
    assert tp["modes"][1]["fast_options"]["cuda_graph"] is False and tp["modes"][1]["images_per_s"] > 0
    assert steps["metric suite"]["result"]["rows"][0]["status"] == "ran"
    runs = steps["collect sgdm"]["result"]["runs"]
    assert [r["method"] for r in runs] == ["sgdm", "sgdm-nomap"] and all(r["steps"] == 2 for r in runs)
    assert report["elapsed_s"] < 300 and "no-such-method" not in json.dumps(steps)
    md = (out / "runbook.md").read_text()
    assert "| ldm | fast | 2 |" in md and "## sgdm vs sgdm-nomap, equal minutes" in md


def test_runbook_skips_what_no_longer_fits_before_its_deadline(tmp_path):
    import time

    runbook = load("runbook")
    out = tmp_path / "out"
    t0 = time.time()
    rc = runbook.main(
        ["--deadline", str(time.time() + 12), "--reserve-s", "10", "--out", str(out)]
        + ["--runs", str(tmp_path / "runs"), "--device", "cpu", "--methods", "ldm", "--train-data", "x"]
    )
    report = json.loads((out / "runbook.json").read_text())
    assert rc == 0 and time.time() - t0 < 10
    assert [s["status"] for s in report["steps"]] == ["skipped"] * 3 and "left" in report["steps"][-1]["why"]
