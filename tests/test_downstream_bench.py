"""Downstream agreement through `cmsrd-bench run`: the hr reference row, recorded models, missing inputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from baselines.weights import file_sha256
from benchmark.downstream import bench as DS
from benchmark.downstream.rvsa import RVSAClassifier
from benchmark.downstream.train_mapseg import train_map_segmenter
from benchmark.downstream.uperhead import RVSASegmenter
from benchmark.runner import RunConfig, run_benchmark
from cmsrd.errors import InputError

ALL = ",".join(DS.METRICS)


def _tiny_rvsa(seed: int):
    torch.manual_seed(seed)
    cls = RVSAClassifier(num_classes=21, img_size=224, dim=16, heads=2).eval()
    return cls, RVSASegmenter(num_classes=7, img_size=112, dim=16, heads=2, channels=8).eval()


@pytest.fixture(scope="module")
def segmenter(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("mapseg")
    train_map_segmenter(tiny_dataset, out, max_minutes=None, max_steps=2, batch_size=2, echo=lambda s: None)
    return out / "mapseg.safetensors"


@pytest.fixture(scope="module")
def run(tiny_dataset, segmenter, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(DS, "build_random_rvsa", _tiny_rvsa)  # the full-size random RVSA is minutes per tile on CPU
    out = tmp_path_factory.mktemp("bench")
    cfg = RunConfig(
        data=tiny_dataset,
        out=out,
        methods="hr,bicubic",
        metrics=ALL,
        rvsa_init="random",
        map_segmenter=segmenter,
        device="cpu",
    )
    try:
        info = run_benchmark(cfg)
    finally:
        mp.undo()
    return out, info


def test_hr_row_is_a_reference_with_agreement_one(run, segmenter):
    out, _ = run
    board = pd.read_csv(out / "leaderboard.csv").set_index("method")
    assert board.loc["hr", "status"] == "reference" and board.loc["bicubic", "status"] == "ok"
    for n in DS.CLS_METRICS + DS.SEG_METRICS:
        assert board.loc["hr", n] == 1.0, n
        assert 0.0 <= board.loc["bicubic", n] <= 1.0 or n == "cls_kappa"
    # the hr row's map agreement is the segmenter's own HR ceiling on the same test split
    meta = json.loads((segmenter.parent / "mapseg.json").read_text())
    assert board.loc["hr", "map_miou"] == pytest.approx(meta["hr_test_score"]["map_miou"])
    assert board.loc["hr", "map_pixel_acc"] == pytest.approx(meta["hr_test_score"]["map_pixel_acc"])
    assert 0.0 <= board.loc["bicubic", "map_miou"] <= 1.0


def test_run_json_records_definitions_and_models(run, segmenter):
    _, info = run
    for n in DS.METRICS:
        assert info["metrics"][n]["status"] == "ok" and info["metrics"][n]["definition"]
    assert "centre crop 224" in info["metrics"]["cls_top1_agree"]["definition"]
    assert "upsampled to 512" in info["metrics"]["seg_miou_vs_hr"]["definition"]
    rec = info["downstream"]
    assert rec["map_segmenter"]["sha256"] == file_sha256(segmenter)
    assert rec["map_segmenter"]["arch"]["arch"] == "unet"
    assert "RANDOM INIT" in rec["rvsa_classifier"]["weights"] and "RANDOM INIT" in rec["rvsa_segmenter"]["weights"]
    assert info["methods"]["hr|default"]["reference"] is True
    hr_iou = info["methods"]["hr|default"]["downstream_iou"]
    assert all(v in (1.0, None) for v in hr_iou["seg_vs_hr"].values())  # HR vs itself: 1 where present
    assert list(hr_iou["map"]) == ["land", "building", "transport", "water", "vegetation", "farmland"]


def test_map_metrics_need_a_segmenter(tiny_dataset, tmp_path):
    cfg = RunConfig(data=tiny_dataset, out=tmp_path, methods="bicubic", metrics="map_miou", device="cpu")
    with pytest.raises(InputError, match="map_miou.*map segmenter.*train-downstream"):
        run_benchmark(cfg)
    cfg.skip_missing = True
    info = run_benchmark(cfg)
    assert info["metrics"]["map_miou"]["status"] == "skipped"


def test_official_rvsa_weights_missing_is_one_clear_error(tiny_dataset, tmp_path):
    cfg = RunConfig(data=tiny_dataset, out=tmp_path, methods="bicubic", metrics="cls_top1_agree", device="cpu")
    with pytest.raises(InputError, match=r"rvsa_vit_b_ucm55\.pth missing"):
        run_benchmark(cfg)


def test_report_has_a_downstream_section_and_never_ranks_the_hr_row(run, segmenter, tmp_path):
    from benchmark.report import render_report

    out, _ = run
    render_report([out], tmp_path / "report", samples=0)
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("### Downstream agreement", 1)[1]
    assert file_sha256(segmenter) in section and "RANDOM INIT" in section and "not ranked" in section
    assert "Not run" not in md
    hr_line = next(line for line in md.splitlines() if line.startswith("| ") and "| hr |" in line)
    assert "**" not in hr_line and "| reference |" in hr_line
    assert 'class="reference"' in (tmp_path / "report" / "index.html").read_text()
    for fig in ("map_iou.png", "seg_vs_hr_iou.png"):  # per-class IoU bars
        assert (tmp_path / "report" / "figures" / fig).stat().st_size > 0 and f"figures/{fig}" in section


def test_metrics_option_adds_downstream_columns_to_the_default_set():
    from benchmark import metrics as M

    assert M.parse_names("default,map_miou,map_pixel_acc") == [*M.DEFAULT_METRICS, "map_miou", "map_pixel_acc"]
    assert not set(DS.METRICS) & set(M.DEFAULT_METRICS)  # heavy downstream models only when asked for


def test_segmentations_are_kept_and_shown_side_by_side(run, tmp_path):
    from benchmark import leaderboard as lb
    from benchmark.report import render_report

    out, info = run
    first = info["ids"][0]
    for method in ("hr", "bicubic"):
        kept = lb.sr_dir(out, method, "default") / DS.SEG_DIR
        assert sorted(p.name for p in kept.iterdir()) == sorted(
            f"{i}_{k}.png" for i in info["ids"][: DS.SAVE_N] for k in ("map", "seg")
        )
    render_report([out], tmp_path / "report", samples=1)
    md = (tmp_path / "report" / "report.md").read_text()
    for fig in (f"map_seg_{first}.png", f"seg_seg_{first}.png"):
        assert (tmp_path / "report" / "figures" / fig).is_file() and f"figures/{fig}" in md
