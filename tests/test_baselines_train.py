"""The shared trainer on the tiny x16 dataset: loss goes down, bit-exact resume, logs, exported
weights load and run, ESRGAN's GAN stage with a cached VGG19, mixed precision + accumulation, errors."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import dataset_batch
from helpers import train_cfg as cfg
from safetensors.torch import load_file

from baselines import registry
from baselines.inference import super_resolve_batch
from benchmark.train import train
from benchmark.train_cli import train_command
from cmsrd.errors import InputError, MissingWeightsError

ESR = {"network": {"num_feat": 16, "num_block": 1, "num_grow_ch": 8}}
SWIN = {"network": {"embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4}}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def l1_on(method, batch):
    return torch.nn.functional.l1_loss(super_resolve_batch(method, batch), batch["hr"]).item()


@pytest.mark.parametrize("name,net", [("esrgan", ESR), ("swinir", SWIN)])
def test_training_reduces_loss_and_exports_loadable_weights(tiny_dataset, tmp_path, name, net):
    config = cfg(net, ema_decay=0.0)
    torch.manual_seed(0)
    before = registry.build(name, 16, config)
    batch = dataset_batch(tiny_dataset)
    l_before = l1_on(before, batch)
    res = train(name, tiny_dataset, tmp_path / "run", config=config, max_steps=12, progress=False)
    assert res["step"] == 12
    after = registry.build(name, 16, config)
    after.load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert l1_on(after, batch) < 0.8 * l_before
    sr = super_resolve_batch(after, {"lr": batch["lr"][:1]}, device="cpu")
    assert sr.shape == (1, 3, 64, 64) and 0 <= sr.min() and sr.max() <= 1
    val = rows(tmp_path / "run" / "val_log.csv")
    assert [int(r["step"]) for r in val] == [4, 8, 12]
    assert all(5 < float(r["psnr_y"]) < 60 and int(r["n_images"]) == 4 for r in val)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == name and saved["scale"] == 16


def test_resume_continues_at_the_same_step_bit_exactly(tiny_dataset, tmp_path):
    config = cfg(ESR, ema_decay=0.9, scheduler={"type": "MultiStepLR", "milestones": [3, 5], "gamma": 0.5})
    train("esrgan", tiny_dataset, tmp_path / "a", config=config, max_steps=4, progress=False)  # "killed" after step 4
    res = train("esrgan", tiny_dataset, tmp_path / "a", config=config, max_steps=6, resume=True, progress=False)
    assert res["step"] == 6
    train("esrgan", tiny_dataset, tmp_path / "b", config=config, max_steps=6, progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = rows(tmp_path / "a" / "train_log.csv"), rows(tmp_path / "b" / "train_log.csv")
    assert [r["step"] for r in log_a] == ["2", "4", "6"]
    assert [r["l_pix"] for r in log_a] == [r["l_pix"] for r in log_b]
    assert float(log_a[-1]["lr_g"]) == pytest.approx(1e-3 * 0.25)  # scheduler state survived the restart
    # a finished output folder is not silently overwritten
    with pytest.raises(InputError, match="--resume"):
        train("esrgan", tiny_dataset, tmp_path / "a", config=config, max_steps=2, progress=False)


def write_random_vgg19(tmp_path, monkeypatch):
    """A random VGG19 `features` file in the temp torch cache, described by a test weights manifest."""
    from torchvision.models import vgg19

    torch.manual_seed(0)
    feats = {f"features.{k}": v.half() for k, v in vgg19(weights=None).features[:35].state_dict().items()}
    hub = torch.hub.get_dir()
    path = f"{hub}/checkpoints/vgg19-dcbb9e9d.pth"
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(feats, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    manifest = tmp_path / "weights.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "weights": {
                    "tv_vgg19": {
                        "file": "vgg19-dcbb9e9d.pth",
                        "subdir": "checkpoints",
                        "sha256": digest,
                        "url": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
                    }
                }
            }
        )
    )
    monkeypatch.setenv("CMSRD_WEIGHTS_MANIFEST", str(manifest))


def test_esrgan_gan_stage_from_psnr_generator(tiny_dataset, tmp_path, monkeypatch):
    psnr = train("esrgan", tiny_dataset, tmp_path / "psnr", config=cfg(ESR), max_steps=2, progress=False)
    gan_cfg = registry.merge_config(registry.load_yaml(registry.CONFIG_DIR / "esrgan_gan.yaml"), cfg(ESR))
    gan_cfg["train"].update(pretrain_network_g=psnr["weights"], network_d={"num_feat": 8}, total_steps=100)
    monkeypatch.setenv("CMSRD_WEIGHTS_MANIFEST", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text(
        yaml.safe_dump({"weights": {"tv_vgg19": {"file": "vgg19-dcbb9e9d.pth", "subdir": "checkpoints"}}})
    )
    with pytest.raises(MissingWeightsError, match="vgg19-dcbb9e9d.pth"):
        train("esrgan", tiny_dataset, tmp_path / "gan0", config=gan_cfg, max_steps=2, progress=False)
    write_random_vgg19(tmp_path, monkeypatch)
    res = train("esrgan", tiny_dataset, tmp_path / "gan", config=gan_cfg, max_steps=2, progress=False)
    log = rows(tmp_path / "gan" / "train_log.csv")
    assert {"l_pix", "l_percep", "l_gan", "l_d", "lr_g", "lr_d"} <= set(log[0])
    state = load_file(tmp_path / "gan" / "checkpoints" / "step_00000002" / "method.safetensors")
    assert any(k.startswith("net_d.conv3_1") for k in state)  # D (64 px HR -> 4 stages) is resumable
    assert not any("vgg" in k for k in state)  # frozen VGG is never copied into checkpoints
    m = registry.build("esrgan", 16, ESR)
    m.load_checkpoint(res["weights"])  # generator-only export
    # the run moved without its PSNR-stage file: a resume restores G from its own checkpoint
    (tmp_path / "psnr" / "model.safetensors").unlink()
    assert (
        train("esrgan", tiny_dataset, tmp_path / "gan", config=gan_cfg, max_steps=3, resume=True, progress=False)[
            "step"
        ]
        == 3
    )


def test_mixed_precision_and_accumulation_run(tiny_dataset, tmp_path):
    res = train(
        "swinir",
        tiny_dataset,
        tmp_path / "bf16",
        config=cfg(SWIN, precision="bf16", accumulate=2, grad_clip=1.0),
        max_steps=2,
        progress=False,
    )
    assert res["step"] == 2 and res["val"]["psnr_y"] > 0


def test_bad_inputs_are_clear_errors(tiny_dataset, tmp_path):
    with pytest.raises(InputError, match="scale x16"):
        train("esrgan", tiny_dataset, tmp_path / "x", scale=32, config=cfg(ESR), max_steps=1, progress=False)
    with pytest.raises(InputError, match="train.stage: gan"):
        train("esrgan", tiny_dataset, tmp_path / "x", config=cfg(ESR), stage=2, progress=False)
    with pytest.raises(InputError, match="no trainable parameters"):
        train("bicubic", tiny_dataset, tmp_path / "x", max_steps=1, progress=False)
    with pytest.raises(InputError, match="pretrain_network_g"):
        train("esrgan", tiny_dataset, tmp_path / "x", config=cfg(ESR, stage="gan"), max_steps=1, progress=False)


@pytest.mark.parametrize(
    "scheduler, match",
    [
        (
            {"type": "MultiStepLR", "milestone": [10], "gamma": 0.5},
            "train.scheduler.milestone",
        ),  # typo: would be a constant lr
        ({"type": "MultiStepLR", "milestones": [], "gamma": 0.5}, "train.scheduler.milestones"),
        (
            {"type": "CosineAnnealingLR", "T_max": 10, "gamma": 0.5},
            "train.scheduler.gamma",
        ),  # not MultiStepLR's milestones
        ({"type": "StepLR"}, "train.scheduler.type"),
    ],
)
def test_scheduler_config_mistakes_are_refused(tiny_dataset, tmp_path, scheduler, match):
    with pytest.raises(InputError, match=match):
        train(
            "esrgan",
            tiny_dataset,
            tmp_path / "x",
            config=cfg(ESR, scheduler=scheduler),
            max_steps=1,
            progress=False,
        )


def test_cli_train(tiny_dataset, tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg(ESR)))
    out = tmp_path / "cli"
    args = [
        "--method",
        "esrgan",
        "--data",
        str(tiny_dataset),
        "--config",
        str(tmp_path / "c.yaml"),
        "--set",
        "train.log_every=1",
        "--max-steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in rows(out / "train_log.csv")] == ["1", "2"]
    r = CliRunner().invoke(
        train_command, args[:-6] + ["--max-steps", "3", "--out", str(out), "--resume"], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in rows(out / "train_log.csv")] == ["1", "2", "3"]
    r = CliRunner().invoke(
        train_command, args[:-6] + ["--max-minutes", "0.000001", "--out", str(out), "--resume"], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output  # the run's training time already exceeds the budget: nothing more is done
    assert [x["step"] for x in rows(out / "train_log.csv")] == ["1", "2", "3"]


def test_time_budget_stops_validates_saves_and_resumes(tiny_dataset, tmp_path):
    """--max-minutes ends a run once its training time is spent (the last step logged, validated and
    saved); the time is kept in the checkpoint, so a resumed run adds to it."""
    import json

    out = tmp_path / "timed"
    res = train("esrgan", tiny_dataset, out, config=cfg(ESR), max_minutes=1e-6, progress=False)
    assert res["step"] == 1 and res["elapsed_s"] > 0  # far below total_steps: the clock ended it
    assert [r["step"] for r in rows(out / "val_log.csv")] == ["1"]
    assert [r["step"] for r in rows(out / "train_log.csv")] == ["1"]
    first = float(rows(out / "train_log.csv")[0]["elapsed_s"])
    state = json.loads(next((out / "checkpoints").glob("step_*/train_state.json")).read_text())
    assert state["step"] == 1 and state["train_seconds"] == pytest.approx(first, abs=1e-3)
    res = train("esrgan", tiny_dataset, out, config=cfg(ESR, max_minutes=60), max_steps=3, resume=True, progress=False)
    assert res["step"] == 3  # budget left: max_steps ends it
    log = rows(out / "train_log.csv")
    assert [r["step"] for r in log] == ["1", "2", "3"]  # log_every 2, plus the last step
    assert first < float(log[1]["elapsed_s"]) < float(log[2]["elapsed_s"])  # cumulative over the resume
    with pytest.raises(InputError, match="max_minutes"):
        train("esrgan", tiny_dataset, tmp_path / "bad", config=cfg(ESR), max_minutes=0, progress=False)


def test_validation_at_fixed_training_times(tiny_dataset, tmp_path, monkeypatch):
    """train.val_every_minutes validates when training time crosses each multiple (clock faked: 1 s per
    perf_counter read), once per crossing, besides the step cadence."""
    import itertools

    import benchmark.train as tr

    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr(tr.time, "perf_counter", lambda: next(clock))
    config = cfg(ESR, val_every=1000, log_every=1000, val_every_minutes=0.05)  # every 3 s of training
    train("esrgan", tiny_dataset, tmp_path / "v", config=config, max_steps=8, progress=False)
    val = rows(tmp_path / "v" / "val_log.csv")
    times = [float(r["elapsed_s"]) for r in val]
    assert [int(r["step"]) for r in val][-1] == 8 and 3 <= len(val) <= 8
    assert all(b > a for a, b in zip(times, times[1:]))  # one validation per crossing, never repeated
    slots = [int(t // 3) for t in times[:-1]]
    assert slots == sorted(set(slots))
    with pytest.raises(InputError, match="val_every_minutes"):
        train(
            "esrgan",
            tiny_dataset,
            tmp_path / "bad",
            config=cfg(ESR, val_every_minutes=-1),
            max_steps=1,
            progress=False,
        )


def test_validation_conditions_are_applied_recorded_and_checked(tiny_dataset, tmp_path):
    """train.val_conditions goes through the runner's evaluation path: unsupported ones are a clear error
    before training, the applied condition is recorded per validation row, and the last validation's
    PSNR-Y is the benchmark's PSNR-Y of the exported weights on the same images."""
    from benchmark.runner import RunConfig, run_benchmark

    res = train("esrgan", tiny_dataset, tmp_path / "run", config=cfg(ESR), max_steps=4, progress=False)
    assert res["val"]["condition"] == "default"
    assert [r["condition"] for r in rows(tmp_path / "run" / "val_log.csv")] == ["default"]
    bench = RunConfig(
        data=tiny_dataset,
        out=tmp_path / "bench",
        methods=["esrgan"],
        weights={"esrgan": tmp_path / "run"},
        metrics=["psnr_y"],
        device="cpu",
        warmup=False,
    )
    info = run_benchmark(bench)
    assert info["n_images"] == res["val"]["n_images"]
    board = list(csv.DictReader(open(tmp_path / "bench" / "leaderboard.csv")))
    assert float(board[0]["psnr_y"]) == pytest.approx(res["val"]["psnr_y"], abs=1e-9)
    for conditions, match in (("style=gt", "val_conditions.*does not support"), ("map=sideways", "val_conditions")):
        with pytest.raises(InputError, match=match):
            config = cfg(ESR, val_conditions=conditions)
            train("esrgan", tiny_dataset, tmp_path / "bad", config=config, max_steps=1, progress=False)
    assert not (tmp_path / "bad").exists()  # rejected before anything was written


def test_ctrl_c_stops_after_the_whole_step_and_resumes_bit_exactly(tiny_dataset, tmp_path, monkeypatch):
    """SIGINT arriving after the optimizer stepped but before the step ended (the GAN's D half, the EMA
    update) must not save a half-done step: the run finishes that step, saves it, stops; the resumed
    run equals an uninterrupted one. The SIGINT handler is only active inside the loop."""
    import os
    import signal

    from baselines.feedforward import FeedForwardMethod

    config = cfg(ESR, ema_decay=0.9, log_every=100, val_every=100, save_every=100)
    original = FeedForwardMethod.training_step
    calls = {"n": 0}

    def interrupted_step(self, batch, ctx):
        out = original(self, batch, ctx)  # G has stepped
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C now, mid-step
        return out

    monkeypatch.setattr(FeedForwardMethod, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train("esrgan", tiny_dataset, tmp_path / "a", config=config, max_steps=5, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert (tmp_path / "a" / "checkpoints" / "latest.txt").read_text().strip() == "step_00000003"  # the whole step 3
    monkeypatch.setattr(FeedForwardMethod, "training_step", original)
    assert (
        train("esrgan", tiny_dataset, tmp_path / "a", config=config, max_steps=5, resume=True, progress=False)["step"]
        == 5
    )
    train("esrgan", tiny_dataset, tmp_path / "b", config=config, max_steps=5, progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_ctrl_c_aborts_without_saving(tiny_dataset, tmp_path, monkeypatch):
    import os
    import signal

    from baselines.feedforward import FeedForwardMethod

    original = FeedForwardMethod.training_step

    def twice(self, batch, ctx):
        out = original(self, batch, ctx)
        if ctx.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(FeedForwardMethod, "training_step", twice)
    with pytest.raises(KeyboardInterrupt):
        train("esrgan", tiny_dataset, tmp_path / "a", config=cfg(ESR, save_every=100), max_steps=5, progress=False)
    assert not (tmp_path / "a" / "checkpoints" / "latest.txt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_refuses_a_changed_config_and_records_run_control_changes(tiny_dataset, tmp_path, monkeypatch):
    """Optimizer/batch/schedule changes on --resume would be silently overridden by the restored state:
    refused with every differing key listed; run-control keys may change and are recorded in resumes.jsonl;
    config.yaml keeps the run's original config. The method learns that it is resuming."""
    import json

    from baselines.feedforward import FeedForwardMethod

    seen = []
    configure = FeedForwardMethod.configure_optimizers
    monkeypatch.setattr(
        FeedForwardMethod, "configure_optimizers", lambda self, c: (seen.append(c.resuming), configure(self, c))[1]
    )
    out = tmp_path / "run"
    train("esrgan", tiny_dataset, out, config=cfg(ESR), max_steps=2, progress=False)
    original_yaml = (out / "config.yaml").read_text()
    changed = cfg(ESR, batch_size=3, optim_g={"type": "AdamW", "lr": 5e-2, "betas": [0.9, 0.99]})
    with pytest.raises(InputError) as e:
        train("esrgan", tiny_dataset, out, config=changed, max_steps=4, resume=True, progress=False)
    msg = str(e.value)
    assert (
        "train.batch_size: 2 -> 3" in msg
        and "train.optim_g.type: 'Adam' -> 'AdamW'" in msg
        and "train.optim_g.lr" in msg
    )
    assert "--config" in msg and "config.yaml" in msg
    assert (out / "config.yaml").read_text() == original_yaml and not (out / "resumes.jsonl").exists()
    assert seen == [False]  # refused before the method was configured

    run_control = cfg(
        ESR, log_every=1, num_workers=1, val_every=1000, val_batch_size=1
    )  # val_batch_size: e.g. after an OOM
    assert train("esrgan", tiny_dataset, out, config=run_control, max_steps=3, resume=True, progress=False)["step"] == 3
    assert seen == [False, True]
    assert (out / "config.yaml").read_text() == original_yaml
    (record,) = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["max_steps"] == 3
    assert record["changed"] == {
        "train.log_every": [2, 1],
        "train.num_workers": [0, 1],
        "train.val_batch_size": [4, 1],
        "train.val_every": [4, 1000],
    }


def test_images_per_s_counts_optimisation_time_only(tiny_dataset, tmp_path, monkeypatch):
    """Slow validation must not lower the training throughput: images_per_s = images in the window /
    the window's training time (elapsed_s delta)."""
    import time

    import benchmark.train as tr

    validate = tr.Trainer.validate

    def slow_validate(self, *a, **k):
        time.sleep(0.3)
        return validate(self, *a, **k)

    monkeypatch.setattr(tr.Trainer, "validate", slow_validate)
    train(
        "esrgan",
        tiny_dataset,
        tmp_path / "run",
        config=cfg(ESR, log_every=2, val_every=2, save_every=100),
        max_steps=4,
        progress=False,
    )
    log = rows(tmp_path / "run" / "train_log.csv")
    elapsed = [0.0] + [float(r["elapsed_s"]) for r in log]
    for r, t0, t1 in zip(log, elapsed, elapsed[1:]):
        assert float(r["images_per_s"]) == pytest.approx(4 / (t1 - t0), rel=0.05)  # 2 steps x batch 2


def test_validation_definitions_sidecar(tiny_dataset, tmp_path, monkeypatch):
    import json

    import benchmark.train as tr
    from benchmark.metrics import get

    writes, built = [], []
    write, make_doc = tr.atomic_write_text, tr.Trainer._write_val_metrics
    monkeypatch.setattr(tr, "atomic_write_text", lambda path, text: (writes.append(path.name), write(path, text))[1])
    monkeypatch.setattr(
        tr.Trainer, "_write_val_metrics", lambda self, *a: (built.append(self.step), make_doc(self, *a))[1]
    )
    train(
        "esrgan",
        tiny_dataset,
        tmp_path / "run",
        config=cfg(ESR, ema_decay=0.9, val_crop_border=16, val_every=1),
        max_steps=4,
        progress=False,
    )
    assert writes.count("val_metrics.json") == 1 and built == [
        1
    ]  # 4 validations: the doc is built and written once, at the first
    doc = json.loads((tmp_path / "run" / "val_metrics.json").read_text())
    assert (
        doc["psnr_y"] == get("psnr_y").describe(16) and "BT.601" in doc["psnr_y"] and "crop_border=16" in doc["psnr_y"]
    )
    assert doc["lpips"].startswith("not computed")  # lpips off in these tests
    assert (
        doc["weights"].startswith("EMA")
        and doc["condition"] == "default"
        and doc["n_images"] == 4
        and doc["crop_border"] == 16
    )
    assert "LPIPS excluded" in doc["images_per_s"]  # the timer stops before LPIPS
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = readme.split("\nval_log.csv", 1)[1].split("\nval_metrics.json", 1)[0]
    assert all(col in documented for col in rows(tmp_path / "run" / "val_log.csv")[0])  # every column is described


@pytest.mark.parametrize(
    "metric,scores,best_step", [("psnr_y", [20.0, 25.0, 22.0, 24.0], 2), ("lpips", [0.5, 0.3, 0.4, 0.2], 4)]
)
def test_keep_best_exports_the_best_validation_and_survives_resume(
    tiny_dataset, tmp_path, monkeypatch, metric, scores, best_step
):
    """train.keep_best writes model-best.safetensors + best.json when the metric improves (higher PSNR,
    lower LPIPS); the best value is part of the resumable state. Scores are scripted per validation."""
    import json

    import benchmark.train as tr

    script = iter(scores)
    monkeypatch.setattr(
        tr.Trainer,
        "_validate",
        lambda self, ds, ema: {
            "condition": "default",
            "psnr_y": float("nan"),
            "lpips": float("nan"),
            metric: next(script),
            "n_images": 4,
        },
    )
    monkeypatch.setattr(tr.Trainer, "_lpips_metric", lambda self: None)
    config = cfg(ESR, keep_best=metric, lpips="auto", keep_checkpoints=0, val_every=1, save_every=1, ema_decay=0.9)
    out = tmp_path / "run"
    train("esrgan", tiny_dataset, out, config=config, max_steps=3, progress=False)  # validations at 1, 2, 3
    res = train("esrgan", tiny_dataset, out, config=config, max_steps=4, resume=True, progress=False)  # and 4
    best = json.loads((out / "best.json").read_text())
    assert (best["metric"], best["step"], best["value"]) == (metric, best_step, scores[best_step - 1])
    assert res["best"]["step"] == best_step
    exported = load_file(out / "model-best.safetensors")  # the EMA weights of that step
    ema_at_best = load_file(out / "checkpoints" / f"step_{best_step:08d}" / "ema.safetensors")
    assert exported and all(torch.equal(v, ema_at_best[f"module.{k}"]) for k, v in exported.items())


def test_keep_best_input_errors(tiny_dataset, tmp_path):
    with pytest.raises(InputError, match="keep_best"):
        train("esrgan", tiny_dataset, tmp_path / "x", config=cfg(ESR, keep_best="ssim"), max_steps=1, progress=False)
    with pytest.raises(InputError, match="keep_best lpips.*train.lpips is off"):
        train(
            "esrgan",
            tiny_dataset,
            tmp_path / "x",
            config=cfg(ESR, keep_best="lpips"),
            max_steps=1,
            progress=False,
        )


def test_resume_does_not_read_the_start_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    """`checkpoint:` initialises a new run; a resume takes the weights from the run's own checkpoint, so the
    start file may have moved (as for ESRGAN's train.pretrain_network_g). config.yaml still records the key."""
    from baselines.checkpoint import save_weights
    from baselines.feedforward import FeedForwardMethod

    src = registry.build("esrgan", 16, ESR)
    init = save_weights(tmp_path / "init" / "model.safetensors", src.trainable_state_dict(), src.export_metadata())
    loads = []
    load = FeedForwardMethod.load_checkpoint
    monkeypatch.setattr(
        FeedForwardMethod, "load_checkpoint", lambda self, path, *a: (loads.append(path), load(self, path, *a))[1]
    )
    config = {**cfg(ESR), "checkpoint": str(init)}
    train("esrgan", tiny_dataset, tmp_path / "run", config=config, max_steps=2, progress=False)
    assert loads == [str(init)]
    (tmp_path / "init" / "model.safetensors").unlink()
    import benchmark.train as tr

    found, rule = [], tr.resume_checkpoint  # the build (skip the start file) and fit (restore) ask the one rule
    monkeypatch.setattr(tr, "resume_checkpoint", lambda out, resume: (found.append(rule(out, resume)), found[-1])[1])
    assert (
        train("esrgan", tiny_dataset, tmp_path / "run", config=config, max_steps=3, resume=True, progress=False)["step"]
        == 3
    )
    assert loads == [str(init)]
    assert len(found) == 2 and found[0] == found[1] and found[0].parent == tmp_path / "run" / "checkpoints"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["checkpoint"] == str(init)


def test_esrgan_refuses_two_start_files(tiny_dataset, tmp_path):
    """`checkpoint:` and train.pretrain_network_g both name the generator's start weights: one must go."""
    from baselines.checkpoint import save_weights

    src = registry.build("esrgan", 16, ESR)
    init = save_weights(tmp_path / "init.safetensors", src.trainable_state_dict(), src.export_metadata())
    with pytest.raises(InputError, match="train.pretrain_network_g and checkpoint: are both set"):
        train(
            "esrgan",
            tiny_dataset,
            tmp_path / "x",
            config={**cfg(ESR, pretrain_network_g=str(init)), "checkpoint": str(init)},
            max_steps=1,
            progress=False,
        )
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.parametrize(
    "name,net,key,match",
    [
        ("esrgan", ESR, "btach_size", r"train\.btach_size: .*did you mean `batch_size`"),
        ("esrgan", ESR, "ema_decya", r"train\.ema_decya: .*did you mean `ema_decay`"),
        ("swinir", SWIN, "gan_weight", r"train\.gan_weight: is not a key of the trainer or of swinir"),  # an ESRGAN key
    ],
)
def test_unknown_train_keys_are_refused(tiny_dataset, tmp_path, name, net, key, match):
    with pytest.raises(InputError, match=match):
        train(name, tiny_dataset, tmp_path / "x", config=cfg(net, **{key: 1}), max_steps=1, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "name,stage,key,match",
    [
        ("esrgan", 1, "btach_size", r"train\.btach_size: .*did you mean `batch_size`"),
        ("sgdm+", 2, "flow", r"train\.flow: .*did you mean `flows`"),  # stage 2 goes to run_stage, not the Trainer
    ],
)
def test_train_keys_are_checked_before_the_build_at_every_stage(
    tiny_dataset, tmp_path, monkeypatch, name, stage, key, match
):
    """The check runs on the merged config before `registry.build`: an SGDM build reads GBs of weights first."""
    monkeypatch.setattr(registry, "build", lambda *a, **k: pytest.fail("built before the train keys were checked"))
    with pytest.raises(InputError, match=match):
        train(name, tiny_dataset, tmp_path / "x", config={"train": {key: {"epochs": 1}}}, stage=stage, progress=False)
    assert not (tmp_path / "x").exists()


def test_train_keys_come_from_the_method_config_type(tiny_dataset, tmp_path):
    import dataclasses

    from baselines.base import SRMethod
    from baselines.esrgan import ESRGAN, ESRGANConfig
    from baselines.method_config import TRAINER_KEYS
    from baselines.swinir import SwinIRMethod
    from benchmark.train import Trainer, check_train_keys

    Trainer(
        registry.build("esrgan", 16, cfg(ESR, gan_weight=1e-3, perceptual_layer="conv5_4")),
        tiny_dataset,
        tmp_path / "e",
    )
    assert SwinIRMethod.train_keys == {"optim_g", "pixel_weight"}
    esrgan_train = {f.name for f in dataclasses.fields(ESRGANConfig().train)} - {"hr_px", "resuming"}
    assert ESRGAN.train_keys == esrgan_train - TRAINER_KEYS and "gan_weight" in ESRGAN.train_keys
    with pytest.raises(TypeError, match="train_keys are derived from config_type"):  # one source of truth

        class Listed(ESRGAN):
            train_keys = frozenset({"gan_weight"})

    # a method without a config type that forgets to list its keys gets only the trainer's: no silent opt-out
    class Untyped(SRMethod):
        pass

    with pytest.raises(InputError, match=r"train\.optim_g: is not a key of the trainer or of untyped"):
        check_train_keys({"optim_g": {"lr": 1e-3}}, Untyped, "untyped")


def test_unknown_keys_at_any_level_are_refused_before_the_build(tiny_dataset, tmp_path, monkeypatch):
    """`--set network_g.num_feat=16` used to start a default run silently; every level is checked now."""
    monkeypatch.setattr(registry, "build", lambda *a, **k: pytest.fail("built before the config was checked"))
    args = ["--method", "esrgan", "--data", str(tiny_dataset), "--out", str(tmp_path / "x")]
    res = CliRunner().invoke(train_command, [*args, "--set", "network_g.num_feat=16"])
    assert isinstance(res.exception, InputError) and res.exit_code != 0
    assert str(res.exception).startswith("network_g: is not a key of the esrgan config (did you mean `network`?)")
    for key, close in (("train.optim_g.lrr=1e-3", "lr"), ("train.network_d.num_feats=8", "num_feat")):
        res = CliRunner().invoke(train_command, [*args, "--set", key])
        assert f"did you mean `{close}`" in str(res.exception), res.output
    with pytest.raises(InputError, match=r"train\.optim_g\.type: unknown type 'Adamm' \(did you mean `Adam`"):
        train("esrgan", tiny_dataset, tmp_path / "x", config={"train": {"optim_g": {"type": "Adamm"}}})
    assert not (tmp_path / "x").exists()
