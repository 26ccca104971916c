"""The shared trainer on the tiny x16 dataset: loss goes down, bit-exact resume, logs, exported
weights load and run, ESRGAN's GAN stage with a cached VGG19, mixed precision + accumulation, errors."""

from __future__ import annotations

import csv
import hashlib

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from baselines import registry
from baselines.cli import train_command
from baselines.inference import super_resolve_batch
from baselines.train import train
from cmsrd.data import CMSRDDataset
from cmsrd.errors import InputError, MissingWeightsError

ESR = {"network": {"num_feat": 16, "num_block": 1, "num_grow_ch": 8}}
SWIN = {"network": {"embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4}}
TRAIN = {"batch_size": 2, "num_workers": 0, "total_steps": 100, "log_every": 2, "val_every": 4, "save_every": 4,
         "optim_g": {"type": "Adam", "lr": 1e-3, "betas": [0.9, 0.99]}, "lpips": "off"}


def cfg(net, **train_kw):
    return {**net, "train": {**TRAIN, **train_kw}}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fixed_batch(root):
    ds = CMSRDDataset(root, "train", inputs=("lr", "hr"))
    items = [ds[i] for i in range(4)]
    return {k: torch.stack([it[k] for it in items]) for k in ("lr", "hr")}


def l1_on(method, batch):
    return torch.nn.functional.l1_loss(super_resolve_batch(method, batch), batch["hr"]).item()


@pytest.mark.parametrize("name,net", [("esrgan", ESR), ("swinir", SWIN)])
def test_training_reduces_loss_and_exports_loadable_weights(tiny_dataset, tmp_path, name, net):
    config = cfg(net, ema_decay=0.0)
    torch.manual_seed(0)
    before = registry.build(name, 16, config)
    batch = fixed_batch(tiny_dataset)
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
    manifest.write_text(yaml.safe_dump({"weights": {"tv_vgg19": {"file": "vgg19-dcbb9e9d.pth", "subdir": "checkpoints", "sha256": digest,
                                                                 "url": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"}}}))
    monkeypatch.setenv("CMSRD_WEIGHTS_MANIFEST", str(manifest))


def test_esrgan_gan_stage_from_psnr_generator(tiny_dataset, tmp_path, monkeypatch):
    psnr = train("esrgan", tiny_dataset, tmp_path / "psnr", config=cfg(ESR), max_steps=2, progress=False)
    gan_cfg = registry.merge_config(registry.load_yaml(registry.CONFIG_DIR / "esrgan_gan.yaml"), cfg(ESR))
    gan_cfg["train"].update(pretrain_network_g=psnr["weights"], network_d={"num_feat": 8}, total_steps=100)
    monkeypatch.setenv("CMSRD_WEIGHTS_MANIFEST", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"weights": {"tv_vgg19": {"file": "vgg19-dcbb9e9d.pth", "subdir": "checkpoints"}}}))
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


def test_mixed_precision_and_accumulation_run(tiny_dataset, tmp_path):
    res = train("swinir", tiny_dataset, tmp_path / "bf16", config=cfg(SWIN, precision="bf16", accumulate=2, grad_clip=1.0),
                max_steps=2, progress=False)
    assert res["step"] == 2 and res["val"]["psnr_y"] > 0


def test_bad_inputs_are_clear_errors(tiny_dataset, tmp_path):
    with pytest.raises(InputError, match="scale x16"):
        train("esrgan", tiny_dataset, tmp_path / "x", scale=32, config=cfg(ESR), max_steps=1, progress=False)
    with pytest.raises(InputError, match="only one training stage"):
        train("esrgan", tiny_dataset, tmp_path / "x", config=cfg(ESR), stage=2, progress=False)
    with pytest.raises(InputError, match="no trainable parameters"):
        train("bicubic", tiny_dataset, tmp_path / "x", max_steps=1, progress=False)
    with pytest.raises(InputError, match="pretrain_network_g"):
        train("esrgan", tiny_dataset, tmp_path / "x", config=cfg(ESR, stage="gan"), max_steps=1, progress=False)


def test_cli_train(tiny_dataset, tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg(ESR)))
    out = tmp_path / "cli"
    args = ["--method", "esrgan", "--data", str(tiny_dataset), "--config", str(tmp_path / "c.yaml"), "--set", "train.log_every=1",
            "--max-steps", "2", "--out", str(out), "--device", "cpu"]
    r = CliRunner().invoke(train_command, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in rows(out / "train_log.csv")] == ["1", "2"]
    r = CliRunner().invoke(train_command, args[:-6] + ["--max-steps", "3", "--out", str(out), "--resume"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in rows(out / "train_log.csv")] == ["1", "2", "3"]
    r = CliRunner().invoke(train_command, args[:-6] + ["--max-minutes", "0.000001", "--out", str(out), "--resume"],
                           catch_exceptions=False)
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

    import baselines.train as tr

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
        train("esrgan", tiny_dataset, tmp_path / "bad", config=cfg(ESR, val_every_minutes=-1), max_steps=1, progress=False)


def test_validation_conditions_are_applied_recorded_and_checked(tiny_dataset, tmp_path):
    """train.val_conditions goes through the runner's condition code: unsupported ones are a clear error
    before training, the applied condition is recorded per validation row."""
    res = train("esrgan", tiny_dataset, tmp_path / "run", config=cfg(ESR), max_steps=4, progress=False)
    assert res["val"]["condition"] == "default"
    assert [r["condition"] for r in rows(tmp_path / "run" / "val_log.csv")] == ["default"]
    with pytest.raises(InputError, match="val_conditions.*does not support"):
        train("esrgan", tiny_dataset, tmp_path / "bad", config=cfg(ESR, val_conditions="style=gt"), max_steps=1, progress=False)
    with pytest.raises(InputError, match="val_conditions"):
        train("esrgan", tiny_dataset, tmp_path / "bad", config=cfg(ESR, val_conditions="map=sideways"), max_steps=1, progress=False)
    assert not (tmp_path / "bad").exists()  # rejected before anything was written

