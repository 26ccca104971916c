"""A benchmark that did not fully succeed says so: non-finite SR output is a recorded failure (never scored),
and `cmsrd-bench run` exits non-zero on any failed method or metric unless told --allow-failures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from baselines import registry
from baselines.base import SRMethod
from baselines.inference import NONFINITE, nonfinite_images
from baselines.registry import MethodSpec
from benchmark.runner import RunConfig, run_benchmark
from cmsrd.testing import one_error_line as one_clear_error
from cmsrd.testing import run_console_script as run_script


class _NaNOnSecond(SRMethod):
    """Nearest upsampling, but NaN for the image whose LR sums to `bad_sum` (a diverged model's output)."""

    bad_sum = -1.0

    def super_resolve(self, batch, cond, generator=None):
        up = torch.nn.functional.interpolate(batch["lr"], scale_factor=self.scale, mode="nearest")
        for i in range(up.shape[0]):
            if abs(float(batch["lr"][i].sum()) - type(self).bad_sum) < 1e-3:
                up[i, 0, 0, 0] = float("nan")
        return up


registry.register(
    MethodSpec(
        name="test_nan_second",
        target=f"{__name__}:_NaNOnSecond",
        kind="interp",
        inputs=("lr",),
        license="test",
        citation="test",
        scales=(16,),
        nfe=1,
    )
)


def test_nonfinite_images_flags_each_image():
    x = torch.zeros(3, 3, 4, 4)
    x[1, 2, 3, 3] = float("inf")
    x[2, 0, 0, 0] = float("nan")
    assert nonfinite_images(x) == [False, True, True]


def test_nonfinite_output_is_a_recorded_failure_never_scored(tiny_dataset, tmp_path):
    from cmsrd.data import CMSRDDataset

    ds = CMSRDDataset(tiny_dataset, "test", inputs=("lr",))
    ids = ds.ids
    _NaNOnSecond.bad_sum = float(ds[1]["lr"].sum())
    cfg = RunConfig(
        data=tiny_dataset, out=tmp_path / "run", methods=["test_nan_second"], metrics=["psnr_y"], device="cpu"
    )
    info = run_benchmark(cfg)
    rec = info["methods"]["test_nan_second|default"]
    assert rec["status"] == "failed" and rec["reason"].startswith(NONFINITE)
    assert rec["failed_images"] == {ids[1]: NONFINITE}
    sr = tmp_path / "run" / "sr" / "test_nan_second" / "default"
    assert not (sr / f"{ids[1]}.png").exists() and (sr / f"{ids[0]}.png").exists()
    board = pd.read_csv(tmp_path / "run" / "leaderboard.csv")
    assert board.loc[0, "status"] == "failed" and pd.isna(board.loc[0].get("psnr_y"))
    assert not (tmp_path / "run" / "per_image.csv").exists() or pd.read_csv(tmp_path / "run" / "per_image.csv").empty


def test_bench_run_exit_codes(tiny_dataset, tmp_path):
    base = ["run", "--data", str(tiny_dataset), "--metrics", "psnr_y", "--device", "cpu"]
    text = tmp_path / "weights.safetensors"
    text.write_text("this is not a checkpoint\n")
    bad = base + ["--methods", "bicubic,esrgan", "--weights", f"esrgan={text}"]
    res = run_script("cmsrd-bench", *bad, "--out", str(tmp_path / "bad"))
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "method esrgan|default failed" in res.stderr
    run = json.loads((tmp_path / "bad" / "run.json").read_text())
    assert run["methods"]["esrgan|default"]["status"] == "failed"
    assert run["methods"]["bicubic|default"]["status"] == "ok"
    res = run_script("cmsrd-bench", *bad, "--out", str(tmp_path / "bad"), "--allow-failures")
    assert res.returncode == 0, res.stderr  # bicubic resumes, esrgan fails again: told to accept that
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = run_script("cmsrd-bench", *base, "--methods", "bicubic", "--out", str(afile))
    assert res.returncode == 2 and "is an existing file" in one_clear_error(res)
    assert afile.read_text() == "x"


def test_bench_run_input_errors_before_any_work(tiny_dataset, tmp_path):
    from click.testing import CliRunner

    from benchmark.cli import cli
    from cmsrd.errors import InputError

    base = ["run", "--data", str(tiny_dataset), "--metrics", "psnr_y", "--device", "cpu", "--methods", "bicubic"]
    (tmp_path / "afile").write_text("x")
    for extra, msg in [
        (["--out", str(tmp_path / "afile" / "under")], "which is a file"),
        (["--out", str(tmp_path / "z"), "--limit", "0"], "--limit 0"),
    ]:
        res = CliRunner().invoke(cli, base + extra)
        assert isinstance(res.exception, InputError) and msg in str(res.exception), res.output
    assert not (tmp_path / "z").exists()


def test_subprocess_helper_runs_this_checkout():
    res = run_script("cmsrd", "--help")
    assert res.returncode == 0 and "validate" in res.stdout
    assert Path(__file__).resolve().parents[1].is_dir()
