"""End-to-end benchmark runs on the tiny x16 dataset: bicubic plus test methods that fail, need weights,
or consume the map; resume; unsupported conditions; missing metric weights."""

from __future__ import annotations

import json
import os
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
from cmsrd.io import read_png, sha256_file


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


class _OOMAbove1(SRMethod):
    """Runs out of (pretend) GPU memory for any batch of more than one image; records the batch sizes it got."""

    calls: list[int] = []

    def super_resolve(self, batch, cond, generator=None):
        n = batch["lr"].shape[0]
        type(self).calls.append(n)
        if n > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return torch.nn.functional.interpolate(batch["lr"], scale_factor=self.scale, mode="nearest")


class _StyleCopy(SRMethod):
    """Returns the style image: under style=gt that is the HR itself (PSNR = inf)."""

    def super_resolve(self, batch, cond, generator=None):
        return batch["style"]


class _Noisy(SRMethod):
    """Bicubic-like output plus noise drawn the way stochastic methods must draw it (`baselines.seeding.randn`)."""

    def super_resolve(self, batch, cond, generator=None):
        from baselines.seeding import randn

        up = torch.nn.functional.interpolate(batch["lr"], scale_factor=self.scale, mode="nearest")
        return (up + 0.2 * randn(up.shape, generator, up.device, up.dtype)).clamp(0, 1)


def _spec(name: str, cls: str, kind: str = "interp", extra: tuple[str, ...] = ()) -> MethodSpec:
    """A x16 test method taking the LR plus the `extra` inputs, each also a runner condition it honours."""
    return MethodSpec(
        name=name,
        target=f"{__name__}:{cls}",
        kind=kind,
        inputs=("lr", *extra),
        conditions=extra,
        license="test",
        citation="test",
        scales=(16,),
        nfe=1,
    )


TEST_METHODS = [
    _spec("test_failing", "_Failing"),
    _spec("test_mapcopy", "_MapCopy", kind="regression", extra=("map",)),
    _spec("test_noisy", "_Noisy"),  # no weights
    _spec("test_oom", "_OOMAbove1"),
    _spec("test_stylecopy", "_StyleCopy", extra=("style",)),
]


@pytest.fixture(autouse=True, scope="module")
def _test_methods():
    """This module's test methods are in the registry while its tests run, and only then."""
    with registry.registered(*TEST_METHODS):
        yield


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
    assert (
        "BT.601" in run["metrics"]["psnr_y"]["definition"] and "crop_border=0" in run["metrics"]["psnr_y"]["definition"]
    )
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
    monkeypatch.setattr(
        bicubic.Bicubic,
        "super_resolve",
        lambda self, b, c, generator=None: calls.append(b["lr"].shape[0]) or orig(self, b, c, generator),
    )
    info = run_benchmark(_cfg(tiny_dataset, out, warmup=False))
    assert calls == [1]  # only the missing image was super-resolved
    assert pngs[0].exists()
    assert {p.name: p.stat().st_mtime_ns for p in pngs[1:]} == keep_mtime
    # the timing is that of the one image redone, and says so
    assert info["methods"]["bicubic|default"]["timing"]["n_timed"] == 1
    assert info["methods"]["bicubic|default"]["resumed_images"] == 3
    assert pd.read_csv(out / "leaderboard.csv").iloc[0].n_timed == 1
    # a complete pair is not rebuilt at all
    calls.clear()
    info = run_benchmark(_cfg(tiny_dataset, out, warmup=False))
    assert calls == [] and info["methods"]["bicubic|default"]["resumed"] is True
    assert pd.read_csv(out / "leaderboard.csv").iloc[0].status == "ok"


def test_conditions_shuffle_none_and_unsupported(tiny_dataset, tmp_path, mapcopy_weights):
    out = tmp_path / "run"
    run_benchmark(
        _cfg(
            tiny_dataset,
            out,
            methods=["test_mapcopy", "bicubic"],
            conditions=["default", "map=shuffle", "map=none"],
            weights={"test_mapcopy": mapcopy_weights},
        )
    )
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
    assert (
        board.loc["test_mapcopy", "status"] == "failed"
        and "--weights test_mapcopy=PATH" in board.loc["test_mapcopy", "reason"]
    )
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
    res = CliRunner().invoke(
        cli,
        [
            "run",
            "--data",
            str(tiny_dataset),
            "--methods",
            " bicubic,,bicubic ",
            "--out",
            str(out),
            "--metrics",
            "psnr_y,ssim_y",
            "--crop-border",
            "16",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(out / "leaderboard.csv").method) == ["bicubic"]  # split, stripped, deduped once
    res = CliRunner().invoke(
        cli,
        [
            "run",
            "--data",
            str(tiny_dataset),
            "--methods",
            "all-available,bicubic",
            "--out",
            str(out),
            "--metrics",
            "psnr_y",
        ],
    )
    assert isinstance(res.exception, InputError) and "mixes all-available" in str(res.exception)
    run = json.loads((out / "run.json").read_text())
    assert run["crop_border"] == 16 and "crop_border=16" in run["metrics"]["ssim_y"]["definition"]
    res = CliRunner().invoke(cli, ["run", "--data", str(tiny_dataset), "--out", str(out), "--weights", "oops"])
    assert res.exit_code != 0 and "NAME=PATH" in str(res.exception)
    # another seed into the same --out is refused (naming the fix); --overwrite redoes the pair
    again = [
        "run",
        "--data",
        str(tiny_dataset),
        "--methods",
        "bicubic",
        "--out",
        str(out),
        "--metrics",
        "psnr_y",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]
    res = CliRunner().invoke(cli, again)
    assert res.exit_code != 0 and "seed 0 -> 3" in str(res.exception) and "--overwrite" in str(res.exception)
    res = CliRunner().invoke(cli, again + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "sr" / "bicubic" / "default" / "inference.json").read_text())["fingerprint"]["seed"] == 3


def test_config_precedence_rules():
    """default < checkpoint-recorded network < --config; recorded geometry may not be changed, locations may."""
    from benchmark.runner import build_config

    recorded = {
        "backbone": {"pretrained": "stabilityai/stable-diffusion-2-1-base", "geometry": "tiny", "tokenizer": None},
        "cond_channels": 64,
    }
    user = {
        "network": {"backbone": {"pretrained": "/w/v2-1_512-ema-pruned.ckpt", "tokenizer": "/w/tokenizer"}},
        "sampler": {"steps": 5},
    }
    merged = build_config("sgdm+", user, recorded)
    assert merged["network"] == {
        "backbone": {"pretrained": "/w/v2-1_512-ema-pruned.ckpt", "geometry": "tiny", "tokenizer": "/w/tokenizer"},
        "cond_channels": 64,
    }
    assert merged["sampler"] == {"steps": 5}
    assert (
        build_config("sgdm+", {"network": {"cond_channels": 64}}, recorded)["network"]["cond_channels"] == 64
    )  # same value: fine
    with pytest.raises(InputError, match=r"network.cond_channels: 32 \(config\) vs 64 \(checkpoint\)"):
        build_config("sgdm+", {"network": {"cond_channels": 32}}, recorded)
    assert build_config("sgdm+", user, None) == user  # no recorded geometry: the config alone


def test_cli_config_builds_sgdm_plus_from_a_checkpoint_without_geometry(tiny_dataset, tmp_path):
    """A checkpoint that records no network geometry (like the authors' SGDM-real.ckpt) runs once the user
    passes the geometry with --config NAME=YAML; the config is recorded in run.json, bad uses are clear errors."""
    from baselines.checkpoint import save_weights
    from benchmark.cli import cli

    torch.manual_seed(0)
    tiny_yaml = registry.CONFIG_DIR / "sgdm-tiny.yaml"
    m = registry.build("sgdm+", 16, tiny_yaml)
    ckpt = save_weights(tmp_path / "foreign.safetensors", m.trainable_state_dict(), {"method": "sgdm+"})  # no `network`
    out = tmp_path / "run"
    base = [
        "run",
        "--data",
        str(tiny_dataset),
        "--methods",
        "sgdm+",
        "--weights",
        f"sgdm+={ckpt}",
        "--conditions",
        "style=gt",
        "--metrics",
        "psnr_y",
        "--device",
        "cpu",
        "--limit",
        "2",
        "--batch-size",
        "2",
    ]
    res = CliRunner().invoke(cli, base + ["--out", str(out), "--config", f"sgdm+={tiny_yaml}"])
    assert res.exit_code == 0, res.output
    board = pd.read_csv(out / "leaderboard.csv")
    row = board.iloc[0]
    assert row.status == "ok" and row.n_images == 2 and np.isfinite(row.psnr_y)
    assert row.nfe == 10  # sampler.steps from sgdm-tiny.yaml, not the default 50
    run = json.loads((out / "run.json").read_text())
    rec = run["methods"]["sgdm+|style=gt"]["config"]
    assert rec["file"] == str(tiny_yaml) and len(rec["sha256"]) == 64
    assert rec["override"]["network"]["backbone"]["geometry"] == "tiny" and rec["network_from_checkpoint"] is None
    assert run["configs"] == {"sgdm+": str(tiny_yaml)}
    # a checkpoint that records its geometry wins over a config that contradicts it: that pair fails, named
    ours = save_weights(
        tmp_path / "ours.safetensors", m.trainable_state_dict(), {"method": "sgdm+", "network": m.config["network"]}
    )
    (tmp_path / "wide.yaml").write_text("network:\n  cond_channels: 32\n")
    res = CliRunner().invoke(
        cli,
        base[:6]
        + [f"sgdm+={ours}"]
        + base[7:]
        + ["--out", str(tmp_path / "r2"), "--config", f"sgdm+={tmp_path / 'wide.yaml'}"],
    )
    assert res.exit_code == 1, res.output  # a failed method x condition: the run did not fully succeed
    bad = pd.read_csv(tmp_path / "r2" / "leaderboard.csv").iloc[0]
    assert bad.status == "failed" and "cond_channels: 32 (config) vs 64 (checkpoint)" in bad.reason
    # a config for a method not in the run, a missing file, a malformed pair: one clear error each, nothing run
    for cfg_arg, msg in [
        (f"esrgan={tiny_yaml}", "names no method of this run"),
        ("sgdm+=/nope.yaml", "file not found"),
        ("sgdm+", "NAME=PATH"),
    ]:
        res = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "r3"), "--config", cfg_arg])
        assert res.exit_code != 0 and msg in str(res.exception), (cfg_arg, res.output, res.exception)
    assert not (tmp_path / "r3" / "leaderboard.csv").exists()


def _mapcopy_weights(path: Path, gain: float) -> Path:
    from safetensors.torch import save_file

    save_file({"gain": torch.full((1,), gain)}, str(path))
    return path


def test_weights_rewritten_mid_run_are_recorded_per_condition(tiny_dataset, tmp_path, monkeypatch):
    """A training run in the same folder rewrites the weights between two conditions: each condition records
    the hash of the file it was built from, not the one seen at run start."""
    from benchmark import runner

    w = _mapcopy_weights(tmp_path / "w.safetensors", 1.0)
    first = sha256_file(w)
    real_infer, calls = runner.infer, []

    def infer_then_retrain(*a, **k):
        result = real_infer(*a, **k)
        if not calls:
            _mapcopy_weights(w, 0.5)
            os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))  # a coarse clock still sees it
        calls.append(1)
        return result

    monkeypatch.setattr(runner, "infer", infer_then_retrain)
    out = tmp_path / "run"
    info = run_benchmark(
        _cfg(
            tiny_dataset,
            out,
            methods=["test_mapcopy"],
            conditions=["default", "map=shuffle"],
            weights={"test_mapcopy": w},
        )
    )
    hashes = [info["methods"][f"test_mapcopy|{c}"]["weights_sha256"] for c in ("default", "map=shuffle")]
    assert hashes == [first, sha256_file(w)] and hashes[0] != hashes[1]
    record = json.loads((lb.sr_dir(out, "test_mapcopy", "map=shuffle") / "inference.json").read_text())
    assert record["fingerprint"]["weights_sha256"] == record["info"]["weights_sha256"] == hashes[1]


def test_resume_refuses_a_folder_made_by_other_weights_or_settings(tiny_dataset, tmp_path):
    """Resume keys on what made the images: other weights (or seed, precision, ...) into the same --out are
    refused up front, also after a partial run, instead of publishing old or mixed images; --overwrite redoes."""
    out = tmp_path / "run"
    w1, w2 = _mapcopy_weights(tmp_path / "w1.safetensors", 1.0), _mapcopy_weights(tmp_path / "w2.safetensors", 0.5)

    def cfg(w, **kw):
        return _cfg(tiny_dataset, out, methods=["test_mapcopy", "bicubic"], weights={"test_mapcopy": w}, **kw)

    run_benchmark(cfg(w1))
    d = out / "sr" / "test_mapcopy" / "default"
    record = json.loads((d / "inference.json").read_text())
    assert record["status"] == "done" and record["fingerprint"]["weights_sha256"] == sha256_file(w1)
    before = {p.name: p.read_bytes() for p in d.glob("*.png")}

    with pytest.raises(InputError) as e:
        run_benchmark(cfg(w2))
    msg = str(e.value)
    assert "test_mapcopy [default]" in msg and "weights_sha256" in msg and "--overwrite" in msg
    assert "bicubic" not in msg  # bicubic's folder matches and would resume
    sorted(d.glob("*.png"))[0].unlink()  # a killed run: the partial resume must not mix two models either
    with pytest.raises(InputError, match="weights_sha256"):
        run_benchmark(cfg(w2))
    with pytest.raises(InputError, match=r"seed 0 -> 7"):
        run_benchmark(cfg(w1, seed=7))
    assert {p.name: p.read_bytes() for p in d.glob("*.png")}.items() <= before.items()  # nothing rewritten

    info = run_benchmark(cfg(w2, overwrite=True))
    assert info["methods"]["test_mapcopy|default"]["weights_sha256"] == sha256_file(w2)
    assert info["methods"]["test_mapcopy|default"]["resumed_images"] == 0
    for sid in info["ids"]:
        own = read_png(tiny_dataset / "test" / "ref_64" / f"{sid}.png").astype(float)
        assert np.abs(read_png(d / f"{sid}.png") - np.round(own * 0.5)).max() <= 1  # every image from w2


def test_fingerprint_written_before_inference_and_legacy_folders_refused(tiny_dataset, tmp_path, monkeypatch):
    from baselines import bicubic

    out = tmp_path / "run"
    orig, calls = bicubic.Bicubic.super_resolve, []

    def dies_on_second_batch(self, b, c, generator=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed mid-way
        return orig(self, b, c, generator)

    monkeypatch.setattr(bicubic.Bicubic, "super_resolve", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(_cfg(tiny_dataset, out, batch_size=2, warmup=False))
    d = out / "sr" / "bicubic" / "default"
    record = json.loads((d / "inference.json").read_text())
    assert record["status"] == "started" and record["fingerprint"]["seed"] == 0 and len(list(d.glob("*.png"))) == 2
    monkeypatch.setattr(bicubic.Bicubic, "super_resolve", orig)
    info = run_benchmark(_cfg(tiny_dataset, out, batch_size=2, warmup=False))
    assert info["methods"]["bicubic|default"]["timing"]["n_timed"] == 2
    assert json.loads((d / "inference.json").read_text())["status"] == "done"
    # SR images of unknown origin (no inference.json, e.g. an older version's folder) are not adopted
    (d / "inference.json").unlink()
    with pytest.raises(InputError, match="no inference.json"):
        run_benchmark(_cfg(tiny_dataset, out))


def test_set_metric_failure_is_recorded_as_failed(tiny_dataset, tmp_path, monkeypatch):
    from benchmark import runner

    monkeypatch.setattr(runner, "check_metric_weights", lambda names, skip: (list(names), {}))

    def boom(*a, **k):
        raise RuntimeError("inception exploded")

    monkeypatch.setattr(runner.M, "compute_set_metrics", boom)
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "run", metrics=["psnr_y", "fid", "kid"]))
    for n in ("fid", "kid"):
        assert info["metrics"][n]["status"] == "failed" and "inception exploded" in info["metrics"][n]["reason"]
        assert "bicubic|default" in info["metrics_failed"][n]
    assert info["metrics"]["psnr_y"]["status"] == "ok"
    row = pd.read_csv(tmp_path / "run" / "leaderboard.csv").iloc[0]
    assert row.status == "ok" and np.isnan(row.fid) and "inception exploded" in row.metric_errors
    from benchmark.report import render_report  # the published page says why the FID cell is empty

    render_report([tmp_path / "run"], tmp_path / "report")
    assert (
        "Failed: bicubic|default: RuntimeError: inception exploded" in (tmp_path / "report" / "report.md").read_text()
    )


def test_too_few_images_for_set_metrics_or_shuffle_and_unknown_methods_fail_before_inference(
    tiny_dataset, tmp_path, monkeypatch
):
    from benchmark import runner

    monkeypatch.setattr(runner, "check_metric_weights", lambda names, skip: (list(names), {}))
    out = tmp_path / "run"
    with pytest.raises(InputError, match="FID/KID need at least 2 images.*has 1"):
        run_benchmark(_cfg(tiny_dataset, out, metrics=["psnr_y", "fid"], limit=1))
    with pytest.raises(InputError, match="map=shuffle"):
        run_benchmark(_cfg(tiny_dataset, out, methods=["test_mapcopy"], conditions=["default", "map=shuffle"], limit=1))
    with pytest.raises(InputError, match="esrgn.*not in the registry"):
        run_benchmark(_cfg(tiny_dataset, out, methods=["bicubic", "esrgn"]))
    assert not out.exists()  # nothing was inferred or written


def test_oom_halves_the_batch_rewarms_and_records_it(tiny_dataset, tmp_path):
    """An out-of-memory error (any device) halves the batch down to 1; the new size is warmed up untimed
    again; the halvings and final batch size are recorded; the next method runs normally."""
    _OOMAbove1.calls = []
    out = tmp_path / "run"
    info = run_benchmark(_cfg(tiny_dataset, out, methods=["test_oom", "bicubic"], batch_size=4))
    assert len(list((out / "sr" / "test_oom" / "default").glob("*.png"))) == 4
    assert _OOMAbove1.calls == [4, 2, 1, 1, 1, 1, 1]  # warm-up at 4 and 2 fail; warm-up at 1, then 4 timed
    t = info["methods"]["test_oom|default"]["timing"]
    assert t["final_batch_size"] == 1 and t["oom_halvings"] == 2 and t["n_timed"] == 4
    board = pd.read_csv(out / "leaderboard.csv").set_index("method")
    assert board.loc["test_oom", "status"] == "ok" and board.loc["test_oom", "final_batch_size"] == 1
    assert board.loc["test_oom", "oom_halvings"] == 2
    assert board.loc["bicubic", "status"] == "ok" and board.loc["bicubic", "oom_halvings"] == 0


def test_timer_covers_only_the_super_resolve(tiny_dataset, tmp_path, monkeypatch):
    """Condition application (partner PNG reads under shuffle) happens before the timer starts."""
    import time

    from benchmark import evaluate

    orig = evaluate.apply_conditions

    def slow(*a, **k):
        time.sleep(0.25)
        return orig(*a, **k)

    monkeypatch.setattr(evaluate, "apply_conditions", slow)
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "run", batch_size=2, warmup=False))
    t = info["methods"]["bicubic|default"]["timing"]
    assert t["wall_seconds"] >= 0.5 and t["model_seconds"] < 0.25
    assert "host-to-device" in info["definitions"]["timing"]


def test_non_finite_values_are_counted_and_the_rule_stated(tiny_dataset, tmp_path, monkeypatch):
    """SR == HR gives PSNR = inf: excluded from the mean, and run.json says how many values were averaged."""
    from benchmark import runner

    monkeypatch.setattr(runner, "SCORE_CHUNK", 3)  # 4 images: two chunks
    info = run_benchmark(
        _cfg(tiny_dataset, tmp_path / "run", methods=["test_stylecopy", "bicubic"], conditions=["style=gt", "default"])
    )
    assert info["methods"]["test_stylecopy|style=gt"]["n_finite"] == {
        "psnr_y": 0,
        "ssim_y": 4,
        "psnr_rgb": 0,
        "ssim_rgb": 4,
    }
    assert info["methods"]["bicubic|default"]["n_finite"]["psnr_y"] == 4
    assert "finite" in info["definitions"]["image_metric_mean"]
    board = pd.read_csv(tmp_path / "run" / "leaderboard.csv").set_index(["method", "condition"])
    assert board.loc[("test_stylecopy", "style=gt"), "psnr_y"] == np.inf
    assert board.loc[("test_stylecopy", "style=gt"), "ssim_y"] == pytest.approx(1.0)
    per_image = pd.read_csv(tmp_path / "run" / "per_image.csv").set_index(["method", "id"])
    from benchmark.metrics.psnr_ssim import psnr

    for sid in info["ids"]:  # chunked scoring gives each image its own value
        sr = read_png(tmp_path / "run" / "sr" / "bicubic" / "default" / f"{sid}.png")
        hr = read_png(tiny_dataset / "test" / "hr_64" / f"{sid}.png")
        assert per_image.loc[("bicubic", sid), "psnr_y"] == pytest.approx(psnr(sr, hr, crop_border=0, y_channel=True))


def test_row_mean_rule_excludes_non_finite_values():
    from benchmark.evaluate import mean_finite

    assert mean_finite([np.inf, 20.0, 30.0]) == (25.0, 2)
    assert mean_finite([np.inf, np.inf]) == (np.inf, 0)
    mean, k = mean_finite([np.nan])
    assert np.isnan(mean) and k == 0


def test_stochastic_outputs_do_not_depend_on_batch_size_or_resume(tiny_dataset, tmp_path):
    """Same seed -> the same SR bytes at batch size 1 or 3, and after a resume that redoes only some images
    (one generator per image, seeded by its index in the split)."""

    def pngs(out):
        folder = out / "sr" / "test_noisy" / "default"
        return {p.name: read_png(p) for p in sorted(folder.glob("*.png"))}

    run_benchmark(_cfg(tiny_dataset, tmp_path / "b1", methods=["test_noisy"], batch_size=1, seed=4))
    run_benchmark(_cfg(tiny_dataset, tmp_path / "b3", methods=["test_noisy"], batch_size=3, seed=4))
    a, b = pngs(tmp_path / "b1"), pngs(tmp_path / "b3")
    assert a.keys() == b.keys() and len(a) == 4
    assert all(np.array_equal(a[k], b[k]) for k in a)
    first, second = sorted(a)[:2]
    assert not np.array_equal(a[first], a[second])  # each image has its own stream
    for name in sorted(a)[1:3]:  # a killed run: two images missing, redone in a batch of their own
        (tmp_path / "b3" / "sr" / "test_noisy" / "default" / name).unlink()
    run_benchmark(_cfg(tiny_dataset, tmp_path / "b3", methods=["test_noisy"], batch_size=3, seed=4))
    c = pngs(tmp_path / "b3")
    assert all(np.array_equal(a[k], c[k]) for k in a)
    run_benchmark(_cfg(tiny_dataset, tmp_path / "s5", methods=["test_noisy"], batch_size=3, seed=5))
    assert not np.array_equal(a[first], pngs(tmp_path / "s5")[first])


def test_complete_resume_over_other_images_reports_no_old_timing(tiny_dataset, tmp_path):
    """A full run, then --limit 2 into the same --out: every PNG is there, but the first session's timing
    (4 images) does not describe the 2-image row; a rerun of the same images keeps its timing."""
    out = tmp_path / "run"
    first = run_benchmark(_cfg(tiny_dataset, out))["methods"]["bicubic|default"]["timing"]
    info = run_benchmark(_cfg(tiny_dataset, out, limit=2))
    row = info["methods"]["bicubic|default"]
    assert row["resumed"] and row["resumed_images"] == 2 and row["timing"]["n_timed"] == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.n_images[0] == 2 and board.n_timed[0] == 0 and pd.isna(board.images_per_s[0])
    again = run_benchmark(_cfg(tiny_dataset, out))["methods"]["bicubic|default"]
    assert again["resumed_images"] == 4 and again["timing"] == first  # same 4 images: that session's timing stands


def test_fingerprint_keys_device_type_and_files_the_config_names(tiny_dataset, tmp_path, mapcopy_weights):
    """CPU and CUDA noise streams differ, so the device type is keyed; a file named in --config (SGDM's
    flows.mean/std) is keyed by its bytes, so replacing it in place is refused instead of resumed."""
    flow = tmp_path / "flow_mean.pt"
    flow.write_bytes(b"flow v1")
    out = tmp_path / "run"

    def cfg(**kw):
        return _cfg(
            tiny_dataset,
            out,
            methods=["test_mapcopy"],
            weights={"test_mapcopy": mapcopy_weights},
            configs={"test_mapcopy": {"flows": {"mean": str(flow)}}},
            **kw,
        )

    run_benchmark(cfg())
    record_file = out / "sr" / "test_mapcopy" / "default" / "inference.json"
    fp = json.loads(record_file.read_text())["fingerprint"]
    assert fp["device"] == "cpu" and fp["config_files_sha256"] == {"flows.mean": sha256_file(flow)}
    run_benchmark(cfg())  # unchanged: resumes
    flow.write_bytes(b"flow v2")
    with pytest.raises(InputError, match="config_files_sha256"):
        run_benchmark(cfg())
    flow.write_bytes(b"flow v1")
    record = json.loads(record_file.read_text())
    record["fingerprint"]["device"] = "cuda"  # as if the folder had been made by a GPU run
    record_file.write_text(json.dumps(record))
    with pytest.raises(InputError, match="device 'cuda' -> 'cpu'"):
        run_benchmark(cfg())


def test_string_methods_are_comma_separated(tiny_dataset, tmp_path):
    """RunConfig(methods='bicubic') is one method (not b, i, c, ...); all-available cannot be mixed with names."""
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "run", methods="bicubic", metrics=["psnr_y"]))
    assert list(info["methods"]) == ["bicubic|default"]
    with pytest.raises(InputError, match="mixes all-available with method names"):
        run_benchmark(_cfg(tiny_dataset, tmp_path / "run2", methods="all-available,bicubic"))
    with pytest.raises(InputError, match=r"--methods nope: not in the registry"):
        run_benchmark(_cfg(tiny_dataset, tmp_path / "run3", methods="bicubic, nope"))


def test_unknown_method_is_reported_before_missing_metric_weights(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))  # every metric weights file is missing
    with pytest.raises(InputError, match=r"--methods foo: not in the registry"):
        run_benchmark(_cfg(tiny_dataset, tmp_path / "run", methods="foo", metrics=["lpips", "psnr_y"]))


def test_method_setup_is_resolved_once_per_run(tiny_dataset, tmp_path, mapcopy_weights, monkeypatch):
    """The folder check and every condition of a method share one setup (config read, checkpoint metadata)."""
    from benchmark import runner

    out = tmp_path / "run"

    def cfg():
        return _cfg(
            tiny_dataset,
            out,
            methods=["test_mapcopy"],
            weights={"test_mapcopy": mapcopy_weights},
            conditions=["default", "map=shuffle"],
            metrics=["psnr_y"],
        )

    run_benchmark(cfg())
    calls = []
    orig = runner.read_metadata
    monkeypatch.setattr(runner, "read_metadata", lambda p: calls.append(p) or orig(p))
    info = run_benchmark(cfg())  # both folders exist: checked up front, then resumed
    assert all(v["resumed"] for v in info["methods"].values()) and calls == [mapcopy_weights]


def test_weights_may_name_a_training_run_folder(tiny_dataset, tmp_path):
    """`--weights NAME=RUN` takes the run's best-validated export when it kept one, else its last one."""
    run = tmp_path / "train-run"
    run.mkdir()
    last = _mapcopy_weights(run / "model.safetensors", 1.0)
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "a", methods=["test_mapcopy"], weights={"test_mapcopy": run}))
    assert info["methods"]["test_mapcopy|default"]["weights_sha256"] == sha256_file(last)
    best = _mapcopy_weights(run / "model-best.safetensors", 0.5)
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "b", methods=["test_mapcopy"], weights={"test_mapcopy": run}))
    assert info["methods"]["test_mapcopy|default"]["weights_sha256"] == sha256_file(best)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    info = run_benchmark(_cfg(tiny_dataset, tmp_path / "c", methods=["test_mapcopy"], weights={"test_mapcopy": empty}))
    m = info["methods"]["test_mapcopy|default"]
    assert m["status"] == "failed" and "model-best.safetensors or model.safetensors" in m["reason"]
