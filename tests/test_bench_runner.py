"""End-to-end benchmark runs on the tiny x16 dataset: bicubic plus test methods that fail, need weights,
or consume the map; resume; unsupported conditions; missing metric weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from baselines import registry
from baselines.base import SRMethod
from baselines.registry import MethodSpec
from benchmark import leaderboard as lb
from benchmark.runner import RunConfig, run_benchmark
from cmsrd.errors import InputError
from cmsrd.io import read_png


class _Failing(SRMethod):
    def super_resolve(self, batch, cond, generator=None):
        raise RuntimeError("deliberate failure in the test method")


class _MapCopy(SRMethod):
    """Returns the (possibly shuffled) map it receives, so the test can see which map it was given."""

    def __init__(self, spec, scale, config, device="cpu"):
        super().__init__(spec, scale, config, device)
        self.gain = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def super_resolve(self, batch, cond, generator=None):
        return (batch["map"] * self.gain).clamp(0, 1)

    def load_checkpoint(self, path):
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))


_COMMON = dict(license="test", citation="test", scales=(16,), nfe=1)
registry.register(MethodSpec(name="test_failing", target=f"{__name__}:_Failing", kind="interp", inputs=("lr",), **_COMMON))
registry.register(MethodSpec(name="test_mapcopy", target=f"{__name__}:_MapCopy", kind="regression", inputs=("lr", "map"),
                             conditions=("map",), **_COMMON))

FAST_METRICS = ["psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"]


@pytest.fixture()
def mapcopy_weights(tmp_path) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "mapcopy.safetensors"
    save_file({"gain": torch.ones(1)}, str(path))
    return path


def _cfg(data: Path, out: Path, **kw: Any) -> RunConfig:
    base = dict(data=data, out=out, methods=["bicubic"], metrics=FAST_METRICS, device="cpu", batch_size=3)
    base.update(kw)
    return RunConfig(**base)


def test_bicubic_end_to_end_outputs(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    info = run_benchmark(_cfg(tiny_dataset, out, methods=["bicubic", "test_failing"]))
    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board.columns[:7]) == lb.HEAD_COLUMNS
    for col in FAST_METRICS + lb.TAIL_COLUMNS:
        assert col in board.columns
    bic = board[board.method == "bicubic"].iloc[0]
    assert bic.status == "ok" and bic.n_images == 4 and bic.scale == 16 and bic.condition == "default"
    # the tiny dataset's `sr` folder is MATLAB-bicubic of the LR: the bicubic method must reproduce it closely
    ids = info["ids"]
    for sid in ids:
        sr = read_png(out / "sr" / "bicubic" / "default" / f"{sid}.png").astype(int)
        ref = read_png(tiny_dataset / "test" / "sr_4_64" / f"{sid}.png").astype(int)
        assert np.abs(sr - ref).max() <= 1
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == 4 and set(per_image.id) == set(ids)
    assert bic.psnr_y == pytest.approx(per_image.psnr_y.mean())
    assert 10 < bic.psnr_y < 40 and 0 < bic.ssim_y < 1
    assert bic.nfe == 0 and bic.images_per_s > 0 and bic.sec_per_image > 0
    # the failing method is recorded with its reason; the bicubic row is unaffected
    bad = board[board.method == "test_failing"].iloc[0]
    assert bad.status == "failed" and "deliberate failure" in bad.reason
    run = json.loads((out / "run.json").read_text())
    assert run["dataset"]["manifest_sha256"] and run["dataset"]["name"] == "tiny-test"
    assert run["metrics"]["psnr_y"]["direction"] == "higher"
    assert "BT.601" in run["metrics"]["psnr_y"]["definition"] and "crop_border=0" in run["metrics"]["psnr_y"]["definition"]
    assert run["seeds"]["seed"] == 0 and run["versions"]["torch"]
    assert "git" in run and "device" in run


def test_resume_skips_done_images(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_benchmark(_cfg(tiny_dataset, out))
    d = out / "sr" / "bicubic" / "default"
    pngs = sorted(d.glob("*.png"))
    keep_mtime = {p.name: p.stat().st_mtime_ns for p in pngs[1:]}
    pngs[0].unlink()  # as if the run was killed before writing this image

    from baselines import bicubic

    calls = []
    orig = bicubic.Bicubic.super_resolve
    monkeypatch.setattr(bicubic.Bicubic, "super_resolve", lambda self, b, c, generator=None: calls.append(b["lr"].shape[0]) or orig(self, b, c, generator))
    run_benchmark(_cfg(tiny_dataset, out, warmup=False))
    assert calls == [1]  # only the missing image was super-resolved
    assert pngs[0].exists()
    assert {p.name: p.stat().st_mtime_ns for p in pngs[1:]} == keep_mtime
    # a complete pair is not rebuilt at all
    calls.clear()
    info = run_benchmark(_cfg(tiny_dataset, out, warmup=False))
    assert calls == [] and info["methods"]["bicubic|default"]["resumed"] is True
    assert pd.read_csv(out / "leaderboard.csv").iloc[0].status == "ok"


def test_conditions_shuffle_none_and_unsupported(tiny_dataset, tmp_path, mapcopy_weights):
    out = tmp_path / "run"
    run_benchmark(_cfg(tiny_dataset, out, methods=["test_mapcopy", "bicubic"], conditions=["default", "map=shuffle", "map=none"],
                       weights={"test_mapcopy": mapcopy_weights}))
    board = pd.read_csv(out / "leaderboard.csv").set_index(["method", "condition"])
    assert board.loc[("test_mapcopy", "default"), "status"] == "ok"
    assert board.loc[("test_mapcopy", "map=shuffle"), "status"] == "ok"
    # bicubic does not declare the map condition: reported as unsupported, not silently run
    assert board.loc[("bicubic", "map=shuffle"), "status"] == "unsupported"
    assert "map" in board.loc[("bicubic", "map=shuffle"), "reason"]
    assert board.loc[("bicubic", "default"), "status"] == "ok"
    # map=none removes the map, which this method needs: a recorded failure
    assert board.loc[("test_mapcopy", "map=none"), "status"] == "failed"
    ids = sorted(p.stem for p in (out / "sr" / "test_mapcopy" / "default").glob("*.png"))
    own = {i: read_png(tiny_dataset / "test" / "ref_64" / f"{i}.png") for i in ids}
    for i in ids:
        assert np.array_equal(read_png(out / "sr" / "test_mapcopy" / "default" / f"{i}.png"), own[i])
        shuffled = read_png(out / "sr" / "test_mapcopy" / "map-shuffle" / f"{i}.png")
        assert not np.array_equal(shuffled, own[i])  # a derangement: never the sample's own map
        assert any(np.array_equal(shuffled, own[j]) for j in ids if j != i)
    run = json.loads((out / "run.json").read_text())
    assert run["methods"]["test_mapcopy|default"]["weights_sha256"]
    assert board.loc[("test_mapcopy", "default"), "params_m"] == pytest.approx(1e-6)


def test_method_without_weights_recorded_and_all_available(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run_benchmark(_cfg(tiny_dataset, out, methods=["test_mapcopy", "bicubic"]))
    board = pd.read_csv(out / "leaderboard.csv").set_index("method")
    assert board.loc["test_mapcopy", "status"] == "failed" and "--weights test_mapcopy=PATH" in board.loc["test_mapcopy", "reason"]
    assert board.loc["bicubic", "status"] == "ok"
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "avail", methods="all-available"))
    assert "bicubic" in {k.split("|")[0] for k in info["methods"]}
    assert "test_mapcopy" in info["methods_skipped"]  # no weights at hand: skipped with the reason


def test_missing_metric_weights_one_error_or_skipped(tiny_dataset, tmp_path):
    with pytest.raises(InputError) as e:
        run_benchmark(_cfg(tiny_dataset, tmp_path / "a", metrics=["psnr_y", "lpips", "fid"]))
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and "weights-inception-2015-12-05-6726825d.pth" in msg
    assert "--skip-missing" in msg
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "b", metrics=["psnr_y", "lpips", "fid"], skip_missing=True))
    assert set(info["metrics_skipped"]) == {"lpips", "fid"}
    assert info["metrics"]["lpips"]["status"] == "skipped"
    board = pd.read_csv(tmp_path / "b" / "leaderboard.csv")
    assert board.lpips.isna().all() and board.psnr_y.notna().all()


def test_lpips_metric_path_with_stand_in_weights(tiny_dataset, tmp_path, monkeypatch):
    """Wiring test: random stand-in AlexNet in a temp TORCH_HOME (values are not quality numbers)."""
    from benchmark.testing import write_fake_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    manifest = write_fake_weights(["tv_alexnet"], tmp_path / "weights.yaml")
    monkeypatch.setenv("CMSRD_WEIGHTS_MANIFEST", str(manifest))
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "run", metrics=["psnr_y", "lpips"]))
    board = pd.read_csv(tmp_path / "run" / "leaderboard.csv")
    assert np.isfinite(board.lpips.iloc[0]) and board.lpips.iloc[0] >= 0
    assert info["weights"]["tv_alexnet"]["verified"] is True


def test_cli_run(tiny_dataset, tmp_path):
    from benchmark.cli import cli

    out = tmp_path / "cli"
    res = CliRunner().invoke(cli, ["run", "--data", str(tiny_dataset), "--methods", "bicubic", "--out", str(out),
                                   "--metrics", "psnr_y,ssim_y", "--crop-border", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["crop_border"] == 16 and "crop_border=16" in run["metrics"]["ssim_y"]["definition"]
    res = CliRunner().invoke(cli, ["run", "--data", str(tiny_dataset), "--out", str(out), "--weights", "oops"])
    assert res.exit_code != 0 and "NAME=PATH" in str(res.exception)
