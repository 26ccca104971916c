"""Quality vs NFE: `--sweep` expansion per method and start mode, its errors, the run and the report figure."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from baselines import registry
from baselines.diffusion import lr_start_nfe
from benchmark.report import render_report
from benchmark.runner import RunConfig, run_benchmark
from benchmark.runner_cli import run_command
from benchmark.sweep import parse_sweep, plan_pairs
from benchmark.train import train
from cmsrd.errors import InputError

TINY = "baselines/configs/csdiff-tiny.yaml"


def test_parse_sweep():
    assert parse_sweep("nfe=5,10,5").nfe == (5, 10)
    assert parse_sweep("nfe=2;start=lr@300").start_t == 300
    for bad in ("nfe=", "nfe=0", "nfe=a", "steps=5", "nfe=5;start=400"):
        with pytest.raises(InputError, match="--sweep"):
            parse_sweep(bad)


def test_csdiff_sweeps_noise_and_lr_start_and_bicubic_stays_a_reference():
    pairs = plan_pairs(["csdiff", "bicubic"], ["default"], "nfe=2,5")
    assert pairs == [
        ("csdiff", "steps=2,start=noise"),
        ("csdiff", "steps=5,start=noise"),
        ("csdiff", "steps=2,start=lr@400"),
        ("csdiff", "steps=5,start=lr@400"),
        ("bicubic", "default"),
    ]
    assert plan_pairs(["csdiff"], ["default"], "nfe=3;start=lr@100")[-1] == ("csdiff", "steps=3,start=lr@100")
    # --conditions combine with every point (SGDM+ needs style=gt); non-diffusion methods keep them as given
    pairs = plan_pairs(["sgdm+", "bicubic"], ["style=gt"], "nfe=4")
    assert pairs[0] == ("sgdm+", "style=gt,steps=4,start=noise") and pairs[1][1].startswith("style=gt,steps=")
    assert pairs[-1] == ("bicubic", "style=gt")


@pytest.mark.parametrize("name", ["sgdm", "sgdm+"])
def test_sgdm_lr_points_get_the_step_count_that_runs_exactly_n(name):
    """SGDM truncates its grid at t: the sweep picks the grid whose kept part has exactly n steps."""
    pairs = plan_pairs([name], ["default"], "nfe=5,10,20")
    noise = [c for _, c in pairs if "noise" in c]
    lr = [c for _, c in pairs if "lr@" in c]
    assert noise == ["steps=5,start=noise", "steps=10,start=noise", "steps=20,start=noise"]
    for n, cond in zip((5, 10, 20), lr):
        steps = int(cond.split(",")[0][len("steps=") :])
        assert cond.endswith("start=lr@400") and lr_start_nfe("ddpm", steps, 400, "truncate") == n
        assert lr_start_nfe("ddpm", steps - 1, 400, "truncate") < n  # the smallest such grid


def test_sweep_errors_name_the_condition_and_the_valid_range():
    with pytest.raises(InputError, match=r"--sweep nfe=5.*diffusion.*bicubic \(interp\)"):
        plan_pairs(["bicubic"], ["default"], "nfe=5")
    with pytest.raises(InputError, match=r"steps=500 with start=lr@400.*steps=1\.\.400"):
        plan_pairs(["csdiff"], ["default"], "nfe=5,500")
    with pytest.raises(InputError, match=r"start=lr@1000.*1\.\.999"):
        plan_pairs(["csdiff"], ["default"], "nfe=5;start=lr@1000")
    with pytest.raises(InputError, match=r"nfe=2000.*1\.\.1000"):
        plan_pairs(["csdiff"], ["default"], "nfe=2000")
    with pytest.raises(InputError, match=r"sgdm.*no steps=1\.\.1000 keeps exactly 900"):
        plan_pairs(["sgdm"], ["default"], "nfe=900;start=lr@400")
    # plain --conditions are checked before inference too
    with pytest.raises(InputError, match=r"csdiff \[steps=50,start=lr@20\].*steps=1\.\.20"):
        plan_pairs(["csdiff"], ["steps=50,start=lr@20"], None)


def test_sweep_run_and_report_figure(tiny_dataset, tmp_path):
    config = registry.merge_config(registry.load_yaml(TINY), {"train": {"batch_size": 2, "crop_px": 32}})
    train("csdiff", tiny_dataset, tmp_path / "train", config=config, max_steps=2, progress=False)
    out = tmp_path / "run"
    info = run_benchmark(
        RunConfig(
            data=tiny_dataset,
            out=out,
            methods=["csdiff", "bicubic"],
            weights={"csdiff": tmp_path / "train"},
            configs={"csdiff": config},
            metrics=["psnr_y"],
            device="cpu",
            limit=2,
            sweep="nfe=1,3",
        )
    )
    assert info["sweep"] == "nfe=1,3"
    board = pd.read_csv(out / "leaderboard.csv")
    assert (board.status == "ok").all(), board[["method", "condition", "reason"]]
    nfe = dict(zip(board.method + "|" + board.condition, board.nfe))
    assert nfe == {
        "csdiff|steps=1,start=noise": 1,
        "csdiff|steps=3,start=noise": 3,
        "csdiff|steps=1,start=lr@400": 1,
        "csdiff|steps=3,start=lr@400": 3,
        "bicubic|default": 0,
    }
    page = render_report([out], tmp_path / "report")
    points = pd.read_csv(tmp_path / "report" / "figures" / "quality_vs_nfe.csv")
    assert (tmp_path / "report" / "figures" / "quality_vs_nfe.png").stat().st_size > 1000
    assert sorted(points.start.unique()) == ["lr@400", "noise", "reference"]
    assert points[points.start == "noise"].nfe.tolist() == [1, 3]
    ref = points[points.start == "reference"].iloc[0]
    assert ref.method == "bicubic" and ref.psnr_y == pytest.approx(board[board.method == "bicubic"].psnr_y.iloc[0])
    html = page.read_text()
    assert "Quality vs NFE" in html and "data:image/png;base64" in html
    assert "quality_vs_nfe.png" in (tmp_path / "report" / "report.md").read_text()


def test_cli_sweep_error_exits_nonzero(tiny_dataset, tmp_path):
    res = CliRunner().invoke(
        run_command,
        [
            "--data",
            str(tiny_dataset),
            "--methods",
            "bicubic",
            "--sweep",
            "nfe=5",
            "--metrics",
            "psnr_y",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code != 0 and "diffusion" in str(res.exception or res.output)


def test_sgdm_tiny_runs_the_planned_nfe():
    """SGDM's own NFE count under each planned condition is the sweep's n (built on meta: no weights needed)."""
    from baselines.conditions import Conditions

    m = registry.build("sgdm", 32, "baselines/configs/sgdm-tiny.yaml", device="meta")
    pairs = plan_pairs(["sgdm"], ["default"], "nfe=2,5,10,20")
    assert [m.nfe(Conditions.parse(c)) for _, c in pairs] == [2, 5, 10, 20] * 2
