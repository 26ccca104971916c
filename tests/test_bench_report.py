"""`cmsrd-bench report`: valid HTML referencing only files inside the report folder, best marked per
direction, perception-distortion plot and image grids, runs merged."""

from __future__ import annotations

from html.parser import HTMLParser

import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.report import best_rows
from benchmark.runner import RunConfig, run_benchmark

VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.refs, self.errors, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def bench_runs(tiny_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    run_benchmark(RunConfig(data=tiny_dataset, out=base / "r1", methods=["bicubic"], metrics=["psnr_y", "ssim_y"], device="cpu"))
    # a second run at another crop border with fake LPIPS values to exercise the plot and best marking
    run_benchmark(RunConfig(data=tiny_dataset, out=base / "r2", methods=["bicubic"], metrics=["psnr_y", "ssim_y"],
                            device="cpu", crop_border=4))
    return base / "r1", base / "r2"


def test_report_html_valid_and_self_contained(bench_runs, tmp_path):
    from benchmark.cli import cli

    r1, r2 = bench_runs
    # add an LPIPS column to r2 so the perception-distortion plot has points
    board = pd.read_csv(r2 / "leaderboard.csv")
    board["lpips"] = 0.4
    board.to_csv(r2 / "leaderboard.csv", index=False)
    info = __import__("json").loads((r2 / "run.json").read_text())
    info["metrics"]["lpips"] = {"direction": "lower", "level": "image", "definition": "LPIPS test column", "status": "ok"}
    (r2 / "run.json").write_text(__import__("json").dumps(info))

    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(r1), str(r2), "--out", str(out), "--samples", "2"])
    assert res.exit_code == 0, res.output
    page = (out / "index.html").read_text()
    chk = _Checker()
    chk.feed(page)
    chk.close()
    assert not chk.errors and not chk.stack, (chk.errors, chk.stack)
    assert {"html", "head", "body", "table", "img"} <= set(chk.tags)
    assert chk.refs, "expected figures"
    for ref in chk.refs:
        assert "://" not in ref and not ref.startswith("/")
        target = (out / ref).resolve()
        assert target.is_file() and out.resolve() in target.parents
    assert (out / "figures" / "perception_distortion.png").stat().st_size > 1000
    assert len(list((out / "figures").glob("grid_*.png"))) == 2
    assert "psnr_y ↑" in page and "lpips ↓" in page and "BT.601" in page
    md = (out / "report.md").read_text()
    assert "| run | method |" in md and "**" in md and "perception_distortion.png" in md
    merged = pd.read_csv(out / "leaderboard.csv")
    assert set(merged.run) == {"r1", "r2"} and "_run_dir" not in merged.columns


def test_best_marking_follows_direction():
    board = pd.DataFrame({"status": ["ok", "ok", "failed"], "psnr_y": [20.0, 25.0, 99.0], "lpips": [0.3, 0.5, 0.0]})
    assert best_rows(board, "psnr_y", "higher") == {1}  # failed rows never win
    assert best_rows(board, "lpips", "lower") == {0}


def test_report_rejects_non_run(tmp_path):
    from benchmark.cli import cli

    res = CliRunner().invoke(cli, ["report", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "cmsrd-bench run" in str(res.exception)
