"""`cmsrd-bench report`: valid, self-contained HTML (figures inlined), best marked per direction and only
within a comparability group (dataset manifest, split, scale, images, metric definitions), perception-distortion
plot and image grids per group, merged leaderboard with its column sidecar."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark import leaderboard as lb
from benchmark.report import best_rows, load_runs
from benchmark.runner import RunConfig, run_benchmark
from cmsrd.errors import InputError

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
    run_benchmark(
        RunConfig(data=tiny_dataset, out=base / "r1", methods=["bicubic"], metrics=["psnr_y", "ssim_y"], device="cpu")
    )
    # a second run at another crop border with fake LPIPS values to exercise the plot and best marking
    run_benchmark(
        RunConfig(
            data=tiny_dataset,
            out=base / "r2",
            methods=["bicubic"],
            metrics=["psnr_y", "ssim_y"],
            device="cpu",
            crop_border=4,
        )
    )
    return base / "r1", base / "r2"


def _sections(md: str) -> dict[str, str]:
    """report.md split at its `## ` headings."""
    parts = md.split("\n## ")[1:]
    return {p.split("\n", 1)[0]: p for p in parts}


def _cell(section: str, run: str, column: str) -> str:
    """A cell of a section's Markdown table, by run and column name."""
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    head = [h.split(" ")[0] for h in lines[0].strip("| ").split(" | ")]
    row = next(line for line in lines if line.startswith(f"| {run} |"))
    return row.strip("| ").split(" | ")[head.index(column)]


def test_report_html_valid_and_self_contained(bench_runs, tmp_path):
    from benchmark.cli import cli

    r1, r2 = bench_runs
    # add an LPIPS column to r2 so the perception-distortion plot has points
    board = pd.read_csv(r2 / "leaderboard.csv")
    board["lpips"] = 0.4
    board.to_csv(r2 / "leaderboard.csv", index=False)
    info = json.loads((r2 / "run.json").read_text())
    info["metrics"]["lpips"] = {
        "direction": "lower",
        "level": "image",
        "definition": "LPIPS test column",
        "status": "ok",
    }
    (r2 / "run.json").write_text(json.dumps(info))

    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["report", str(r1), str(r2), "--out", str(out), "--samples", "1"])
    assert res.exit_code == 0, res.output
    page = (out / "index.html").read_text()
    chk = _Checker()
    chk.feed(page)
    chk.close()
    assert not chk.errors and not chk.stack, (chk.errors, chk.stack)
    assert {"html", "head", "body", "table", "img"} <= set(chk.tags)
    # self-contained: every figure is inlined, nothing points outside the single file
    assert len(chk.refs) == 1 + 2, chk.refs  # r2's plot, one grid per group
    for ref in chk.refs:
        assert ref.startswith("data:image/png;base64,"), ref[:60]
        assert base64.b64decode(ref.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figures/" not in page
    # the PNG files stay beside it (report.md links them)
    assert (out / "figures" / "perception_distortion_group2.png").stat().st_size > 1000
    assert not (out / "figures" / "perception_distortion_group1.png").exists()  # r1 has no LPIPS
    assert len(list((out / "figures").glob("grid_group*_*.png"))) == 2
    assert "psnr_y ↑" in page and "lpips ↓" in page and "BT.601" in page
    md = (out / "report.md").read_text()
    assert "| run | method |" in md and "**" in md and "figures/perception_distortion_group2.png" in md
    merged = pd.read_csv(out / "leaderboard.csv")
    assert set(merged.run) == {"r1", "r2"} and "_run_dir" not in merged.columns
    assert list(merged.columns[:2]) == ["run", "group"] and dict(zip(merged.run, merged.group)) == {"r1": 1, "r2": 2}


def test_different_crop_borders_are_not_ranked_together(bench_runs, tmp_path):
    """crop 0 and crop 4 give PSNR/SSIM different definitions: separate tables, best marked within each."""
    r1, r2 = bench_runs
    r3 = tmp_path / "r3"  # another crop-0 run, better than r1 and than the crop-4 run
    shutil.copytree(r1, r3)
    board = pd.read_csv(r3 / "leaderboard.csv")
    board["psnr_y"] += 5.0
    board.to_csv(r3 / "leaderboard.csv", index=False)
    _, groups = load_runs([r1, r2, r3])
    assert [g.runs for g in groups] == [["r1", "r3"], ["r2"]]

    from benchmark.report import render_report

    render_report([r1, r2, r3], tmp_path / "rep", samples=0)
    sec = _sections((tmp_path / "rep" / "report.md").read_text())
    g1, g2 = sec["Group 1"], sec["Group 2"]
    assert "crop_border=0 px" in g1 and "crop_border=4" not in g1
    assert "crop_border=4 px" in g2 and "crop_border=0" not in g2
    assert "runs: r1, r3" in g1 and "runs: r2" in g2
    assert "Not ranked with group 1: different metric definitions (psnr_y, ssim_y)" in g2
    assert not _cell(g1, "r1", "psnr_y").startswith("**") and _cell(g1, "r3", "psnr_y").startswith("**")
    assert _cell(g2, "r2", "psnr_y").startswith("**")  # best of its own group, although r3's number is higher
    # the merged CSV's sidecar says which group a differing definition belongs to
    cols = pd.read_csv(tmp_path / "rep" / lb.COLUMNS_CSV).set_index("column")
    assert "group 1: " in cols.loc["psnr_y", "definition"] and "crop_border=4 px" in cols.loc["psnr_y", "definition"]
    assert cols.loc["psnr_y", "direction"] == "higher" and "comparability" in cols.loc["group", "definition"].lower()


def test_runs_on_different_datasets_are_separate_groups(bench_runs, tmp_path):
    """Same dataset name, ids, split and N but other images (another manifest): never ranked together."""
    from cmsrd.testing import make_tiny_dataset

    r1, _ = bench_runs
    other = tmp_path / "other_dataset"
    make_tiny_dataset(other, seed=1)
    run_benchmark(
        RunConfig(data=other, out=tmp_path / "r_other", methods=["bicubic"], metrics=["psnr_y", "ssim_y"], device="cpu")
    )
    board, groups = load_runs([r1, tmp_path / "r_other"])
    assert len(groups) == 2 and groups[0].info["ids"] == groups[1].info["ids"]
    assert groups[0].key[0] != groups[1].key[0]  # the dataset manifest sha256
    assert set(best_rows(board[board["group"] == 1], "psnr_y", "higher")) == {0}
    assert set(best_rows(board[board["group"] == 2], "psnr_y", "higher")) == {1}
    from benchmark.report import render_report

    render_report([r1, tmp_path / "r_other"], tmp_path / "rep", samples=1)
    sec = _sections((tmp_path / "rep" / "report.md").read_text())
    assert sec["Group 1"].count("**") >= 2 and sec["Group 2"].count("**") >= 2
    sha = [g.info["dataset"]["manifest_sha256"][:12] for g in groups]
    assert sha[0] in sec["Group 1"] and sha[1] in sec["Group 2"]
    assert "Not ranked with group 1: different dataset manifest" in sec["Group 2"]
    assert (tmp_path / "rep" / "figures" / f"grid_group2_{groups[1].info['ids'][0]}.png").exists()


def test_run_leaderboard_has_a_column_sidecar(bench_runs):
    """Every leaderboard.csv column gets a direction and definition; the CSV header itself is unchanged."""
    r1, _ = bench_runs
    header = list(pd.read_csv(r1 / lb.LEADERBOARD_CSV, nrows=0).columns)
    expected = lb.leaderboard_columns(["psnr_y", "ssim_y"])
    assert header[: len(expected)] == expected
    cols = pd.read_csv(r1 / lb.COLUMNS_CSV, keep_default_na=False)
    assert list(cols.column) == header
    by = cols.set_index("column")
    assert by.loc["psnr_y", "direction"] == "higher" and "crop_border=0 px" in by.loc["psnr_y", "definition"]
    assert by.loc["sec_per_image", "direction"] == "lower" and by.loc["method", "direction"] == ""
    assert all(by.definition.str.len() > 0)
    # the timing columns have one definition: the sidecar's text is the one run.json carries
    timing = json.loads((r1 / lb.RUN_JSON).read_text())["definitions"]["timing"]
    for c in lb.TIMING_COLUMNS:
        assert by.loc[c, "definition"] in timing
    assert "host-to-device" in by.loc["images_per_s", "definition"] and "resumed" in by.loc["n_timed", "definition"]


def test_best_marking_follows_direction():
    board = pd.DataFrame({"status": ["ok", "ok", "failed"], "psnr_y": [20.0, 25.0, 99.0], "lpips": [0.3, 0.5, 0.0]})
    assert best_rows(board, "psnr_y", "higher") == {1}  # failed rows never win
    assert best_rows(board, "lpips", "lower") == {0}


def test_report_rejects_non_run(tmp_path):
    from benchmark.cli import cli

    res = CliRunner().invoke(cli, ["report", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "cmsrd-bench run" in str(res.exception)


def _copy_run(src, dst, **run_json):
    """A copy of a finished run with run.json fields replaced (e.g. another device)."""
    shutil.copytree(src, dst)
    info = json.loads((dst / lb.RUN_JSON).read_text())
    info.update(run_json)
    (dst / lb.RUN_JSON).write_text(json.dumps(info))
    return dst


def test_timing_is_marked_only_among_rows_of_one_device_and_precision(bench_runs, tmp_path):
    """A CPU fp32 run and an H100 bf16 run of one group: PSNR is ranked across them, images_per_s and
    sec_per_image only per (device, precision), so each run's timing is the best of its own kind."""
    from benchmark.report import render_report

    r1, _ = bench_runs
    cpu = _copy_run(r1, tmp_path / "cpu")
    gpu = _copy_run(r1, tmp_path / "gpu", device={"device": "cuda", "gpu": "NVIDIA H100"}, precision="bf16")
    cpu2 = _copy_run(r1, tmp_path / "cpu2")
    board = pd.read_csv(cpu2 / lb.LEADERBOARD_CSV)
    board["images_per_s"] *= 2  # the faster CPU run
    board["sec_per_image"] /= 2
    board.to_csv(cpu2 / lb.LEADERBOARD_CSV, index=False)
    render_report([cpu, gpu, cpu2], tmp_path / "rep", samples=0)
    md = (tmp_path / "rep" / "report.md").read_text()
    sec = _sections(md)["Leaderboard"]
    for col in ("images_per_s", "sec_per_image"):
        assert _cell(sec, "gpu", col).startswith("**")  # alone on its device: best of its kind
        assert _cell(sec, "cpu2", col).startswith("**") and not _cell(sec, "cpu", col).startswith("**")
    assert (
        sum(_cell(sec, r, "psnr_y").startswith("**") for r in ("cpu", "gpu", "cpu2")) == 3
    )  # ranked across: all equal
    assert "same device (GPU name, or CPU) and precision" in md


def test_runs_sharing_a_folder_name_keep_their_own_label_and_timing_rank(bench_runs, tmp_path):
    """`cpu/bench` and `h100/bench` (the Makefile always writes `.../bench`): each row is labelled by the
    shortest distinguishing path and ranked on its own device, in report.md and in index.html alike."""
    from benchmark.report import render_report

    r1, _ = bench_runs
    cpu = _copy_run(r1, tmp_path / "cpu" / "bench")
    gpu = _copy_run(r1, tmp_path / "h100" / "bench", device={"device": "cuda", "gpu": "NVIDIA H100"}, precision="bf16")
    board = pd.read_csv(gpu / lb.LEADERBOARD_CSV)
    board["images_per_s"] *= 10
    board["sec_per_image"] /= 10
    board.to_csv(gpu / lb.LEADERBOARD_CSV, index=False)
    render_report([cpu, gpu], tmp_path / "rep", samples=0)
    sec = _sections((tmp_path / "rep" / "report.md").read_text())["Leaderboard"]
    for col in ("images_per_s", "sec_per_image"):
        assert _cell(sec, "cpu/bench", col).startswith("**") and _cell(sec, "h100/bench", col).startswith("**")
    page = (tmp_path / "rep" / "index.html").read_text()
    head = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    col = next(i for i, h in enumerate(head) if h.startswith("images_per_s"))
    for run in ("cpu/bench", "h100/bench"):
        row = next(r for r in re.findall(r"<tr class=\"ok\">(.*?)</tr>", page, re.S) if f">{run}<" in r)
        assert re.findall(r'<td class="([^"]*)"', row)[col] == "best"
    assert set(pd.read_csv(tmp_path / "rep" / lb.LEADERBOARD_CSV)["run"]) == {"cpu/bench", "h100/bench"}


def test_the_same_run_twice_is_refused(bench_runs):
    r1, _ = bench_runs
    with pytest.raises(InputError, match="given twice"):
        load_runs([r1, Path(str(r1) + "/")])


def test_merged_report_keeps_each_runs_metric_failure(tiny_dataset, tmp_path, monkeypatch):
    """FID fails in run A and works in run B of the same group: the page and both sidecars still say why A's
    FID cell is empty."""
    from benchmark import runner
    from benchmark.report import render_report

    monkeypatch.setattr(runner, "check_metric_weights", lambda names, skip: (list(names), {}))

    def boom(*a, **k):
        raise RuntimeError("inception exploded")

    for run, fn in (("A", boom), ("B", lambda names, sr, hr, **k: {"fid": 12.5})):
        monkeypatch.setattr(runner.M, "compute_set_metrics", fn)
        run_benchmark(
            RunConfig(
                data=tiny_dataset, out=tmp_path / run, methods=["bicubic"], metrics=["psnr_y", "fid"], device="cpu"
            )
        )
    own = pd.read_csv(tmp_path / "A" / lb.COLUMNS_CSV).set_index("column")
    assert "Failed: bicubic|default: RuntimeError: inception exploded" in own.loc["fid", "definition"]
    render_report([tmp_path / "A", tmp_path / "B"], tmp_path / "rep", samples=0)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert len(_sections(md)) == 2  # one group (Leaderboard) + Provenance
    assert "A: Failed: bicubic|default: RuntimeError: inception exploded" in md
    assert "inception exploded" in (tmp_path / "rep" / "index.html").read_text()
    merged = pd.read_csv(tmp_path / "rep" / lb.COLUMNS_CSV).set_index("column")
    assert "A: Failed: bicubic|default" in merged.loc["fid", "definition"]


def test_report_print_gives_the_report_table_as_text(bench_runs, tmp_path):
    from click.testing import CliRunner

    from benchmark.report import report_command

    r = CliRunner().invoke(report_command, [str(bench_runs[0]), "--out", str(tmp_path / "rep"), "--print"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    head = lines[0].split()
    assert head[:4] == ["method", "condition", "n_images", "status"] and "psnr_y" in head and "↑" in head
    row = next(line for line in lines if line.startswith("bicubic"))
    assert "*" in row  # the only row is the best of its group
    psnr = float(pd.read_csv(bench_runs[0] / "leaderboard.csv")["psnr_y"][0])
    assert f"{psnr:.4g}*" in row and max(map(len, lines)) < 200  # the report's number format, not raw floats
