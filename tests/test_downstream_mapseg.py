"""Map segmenter training/loading, RVSA input policies, and the downstream CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from baselines.checkpoint import save_weights
from baselines.weights import file_sha256
from benchmark.cli import cli
from benchmark.downstream.inference import classifier_input, classify, segment
from benchmark.downstream.mapseg import MapSegNet, load_map_segmenter, map_group_lut, predict
from benchmark.downstream.rvsa import RVSAClassifier
from benchmark.downstream.uperhead import RVSASegmenter
from cmsrd.classes import CLASSES
from cmsrd.errors import InputError


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("mapseg")
    res = CliRunner().invoke(
        cli,
        ["train-downstream", "--data", str(tiny_dataset), "--out", str(out), "--max-steps", "3", "--batch-size", "2"],
    )
    assert res.exit_code == 0, res.output
    return out


def test_training_writes_weights_with_their_record(trained, tiny_dataset):
    summary = json.loads((trained / "mapseg.json").read_text())
    path = trained / "mapseg.safetensors"
    assert summary["sha256"] == file_sha256(path)
    model, meta = load_map_segmenter(path)
    assert meta["train"]["steps"] == 3 and meta["train"]["images"] == 6
    assert meta["classes"] == [c.name for c in CLASSES]
    assert meta["arch"] == model.config and meta["parameters"] == sum(p.numel() for p in model.parameters())
    score = meta["hr_test_score"]
    assert score["images"] == 4 and 0 <= score["map_miou"] <= 1 and 0 <= score["map_pixel_acc"] <= 1
    rows = (trained / "train_log.csv").read_text().splitlines()
    assert rows[0] == "step,elapsed_s,loss" and rows[-1].startswith("3,")


def test_training_is_deterministic_for_a_seed(trained, tiny_dataset, tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "train-downstream",
            "--data",
            str(tiny_dataset),
            "--out",
            str(tmp_path),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    a = load_map_segmenter(trained / "mapseg.safetensors")[0].state_dict()
    b = load_map_segmenter(tmp_path / "mapseg.safetensors")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prediction_is_a_class_map_at_the_tile_size(trained):
    model, _ = load_map_segmenter(trained / "mapseg.safetensors")
    tiles = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    preds = predict(model, tiles, batch_size=2)
    assert [p.shape for p in preds] == [(64, 64)] * 3 and all(p.dtype == np.uint8 for p in preds)
    assert max(int(p.max()) for p in preds) < len(CLASSES)
    assert sorted(set(map_group_lut().tolist())) == list(range(6))


def test_bad_segmenter_files_are_clear_errors(tmp_path, trained):
    with pytest.raises(InputError, match=r"absent\.safetensors.*file not found.*train-downstream"):
        load_map_segmenter(tmp_path / "absent.safetensors")
    other = save_weights(tmp_path / "esrgan.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(InputError, match=r"esrgan\.safetensors.*not a map-segmenter file"):
        load_map_segmenter(other)
    model, meta = load_map_segmenter(trained / "mapseg.safetensors")
    old = save_weights(tmp_path / "old.safetensors", model.state_dict(), {**meta, "classes": ["land", "building"]})
    with pytest.raises(InputError, match=r"old\.safetensors.*trained on the classes.*retrain"):
        load_map_segmenter(old)


def test_train_downstream_refuses_a_bad_dataset(tmp_path):
    res = CliRunner().invoke(cli, ["train-downstream", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0


def test_classifier_input_is_the_official_eval_transform():
    tile = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = classifier_input([tile])
    assert x.shape == (1, 3, 224, 224)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = (tile[16:240, 16:240] / 255.0 - mean) / std  # 256 px: no resize, centre crop 224
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), want, atol=1e-5)
    assert classifier_input([tile[:128, :128]]).shape == (1, 3, 224, 224)  # other sizes: resized to 256 first


def test_rvsa_inference_shapes():
    torch.manual_seed(0)
    cls = RVSAClassifier(num_classes=21, img_size=224, dim=16, heads=2).eval()
    tiles = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    assert classify(cls, tiles, batch_size=2).shape == (3, 21)
    seg = RVSASegmenter(num_classes=7, img_size=112, dim=16, heads=2, channels=8).eval()
    preds = segment(seg, tiles, batch_size=2)
    assert [p.shape for p in preds] == [(64, 64)] * 3 and max(int(p.max()) for p in preds) < 7


def test_downstream_list_shows_exact_rvsa_sizes():
    res = CliRunner().invoke(cli, ["downstream", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["rvsa_classifier"]["parameters"] == 86_198_869
    assert rows["rvsa_segmenter"]["backbone_parameters"] == 93_945_664
    assert rows["rvsa_segmenter"]["decode_head_parameters"] == 32_259_591
    assert rows["map_segmenter"]["parameters"] == sum(p.numel() for p in MapSegNet().parameters())
