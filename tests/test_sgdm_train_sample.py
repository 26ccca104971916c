"""SGDM end to end at a tiny geometry: stage-1 training steps (loss falls on a fixed batch), sampling at
x16 (16 -> 256) and x32 (8 -> 256), conditions (steps, start=lr@t, map=none, style=gt/sample), and
stage 2 (style statistics + flows) on a built dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import map_batch, train_context, two_step_train

from baselines.conditions import Conditions
from baselines.method_config import train_config
from baselines.sgdm import build
from baselines.sgdm.flows import FlowTrainConfig, StyleFlows, train_style_flows
from cmsrd.errors import InputError

TINY = {"network": {"backbone": {"pretrained": None, "geometry": "tiny"}, "cond_channels": 64}, "sampler": {"steps": 3}}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plus():
    torch.manual_seed(0)
    return build("sgdm+", 16, TINY)


@pytest.fixture(scope="module")
def syn():
    torch.manual_seed(0)
    return build("sgdm", 32, TINY)


@pytest.mark.parametrize("name,scale", [("sgdm+", 16), ("sgdm", 32)])
def test_training_steps_reduce_loss_on_a_fixed_batch(name, scale):
    torch.manual_seed(0)
    m = build(name, scale, TINY).train()
    opts = m.configure_optimizers(train_config(m.settings.train, lr=5e-3))
    assert isinstance(opts["main"], torch.optim.AdamW)
    assert opts["main"].defaults["weight_decay"] == 0.01
    frozen_before = m.vae.encoder.conv_in.weight.clone()
    batch = map_batch(1, 64, 4)
    ctx = train_context(opts)
    losses = []
    for _ in range(5):
        torch.manual_seed(123)  # same t, noise and posterior sample every step: a fixed objective
        losses.append(m.training_step(batch, ctx)["l_eps"])
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.85 * losses[0], losses
    assert torch.equal(m.vae.encoder.conv_in.weight, frozen_before)  # VAE stays frozen


def test_default_lr_is_official():
    m = build("sgdm-nomap", 32, TINY)
    assert m.configure_optimizers(train_config(m.settings.train))["main"].defaults["lr"] == 5e-5


def test_gradient_checkpointing_gives_the_same_loss():
    batch = map_batch(1, 64, 4)
    losses = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = build("sgdm-nomap", 32, {**TINY, "train": {"gradient_checkpointing": ckpt}}).train()
        assert m.unet.is_gradient_checkpointing == ckpt
        torch.manual_seed(1)
        ctx = train_context(m.configure_optimizers(train_config(m.settings.train, lr=1e-4)))
        losses.append(m.training_step(batch, ctx)["l_eps"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _count_unet_calls(m):
    calls = []
    return calls, m.unet.register_forward_hook(lambda *a: calls.append(1))


def test_sample_x16_with_style_image_and_lr_start(plus):
    plus.eval()
    b = map_batch(1, 256, 16)
    b["style"] = b.pop("hr")
    calls, h = _count_unet_calls(plus)
    try:
        out = plus.super_resolve(b, Conditions(style="gt"), torch.Generator().manual_seed(0))
        assert out.shape == (1, 3, 256, 256) and 0 <= out.min() and out.max() <= 1
        assert len(calls) == plus.nfe(Conditions()) == 3
        calls.clear()
        cond = Conditions(steps=10, start_t=400, style="gt")
        out2 = plus.super_resolve(b, cond, torch.Generator().manual_seed(0))
        assert out2.shape == (1, 3, 256, 256)
        assert len(calls) == plus.nfe(cond) == 4 < 10  # timesteps 333, 222, 111, 0 of the 10-step grid
    finally:
        h.remove()


def test_sample_x32_and_map_none(syn):
    syn.eval()
    b = map_batch(1, 256, 8)
    b.pop("hr")
    g = torch.Generator().manual_seed(0)
    out = syn.super_resolve(b, Conditions(steps=2), g)
    assert out.shape == (1, 3, 256, 256)
    b.pop("map")  # map=none: the runner removes the map
    out_none = syn.super_resolve(b, Conditions(map="none", steps=2), torch.Generator().manual_seed(0))
    assert out_none.shape == (1, 3, 256, 256) and not torch.allclose(out_none, out)


def test_sgdm_plus_without_style_image_or_trained_flows_is_an_input_error(plus):
    """No silent LR-as-style: style=sample and the default condition both need trained flows (or a style image)."""
    b = map_batch(1, 64, 4)
    b.pop("hr")
    assert not bool(plus.flows.trained)
    for cond in (Conditions(style="sample"), Conditions(steps=1)):
        with pytest.raises(InputError, match="style=gt.*stage 2"):
            plus.super_resolve(b, cond, torch.Generator().manual_seed(0))
    b["style"] = map_batch(1, 64, 4, seed=1)["hr"]
    assert plus.super_resolve(b, Conditions(steps=1), torch.Generator().manual_seed(0)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("map", torch.rand(1, 3, 32, 32), r"map of shape \(1, 3, 32, 32\).*\(1, 3, 64, 64\)"),
        ("style", torch.rand(2, 3, 64, 64), r"style of shape \(2, 3, 64, 64\).*N = 1"),
        ("style", torch.rand(1, 3, 8, 64), r"style of shape \(1, 3, 8, 64\).*H, W >= 16"),
        ("style", torch.rand(1, 3, 64, 64) * 255, r"style values.*expected \[0, 1\]"),
        ("map", torch.rand(1, 1, 64, 64), r"map of shape \(1, 1, 64, 64\)"),
        ("map", torch.rand(1, 3, 64, 64) * 255, r"map values.*expected \[0, 1\].*255"),
        ("sr", torch.rand(1, 3, 64, 64) * 255, r"sr values.*expected \[0, 1\]"),
    ],
)
def test_wrong_input_size_or_range_is_one_input_error(plus, key, value, match):
    b = map_batch(1, 64, 4)
    b["style"] = b.pop("hr")
    b[key] = value
    with pytest.raises(InputError, match=match):
        plus.super_resolve(b, Conditions(steps=1), torch.Generator().manual_seed(0))


def test_style_image_of_another_size_is_accepted(plus):
    """Regression: the style encoder keeps only global channel mean/std, so a reference image of any size
    works (a paper use case); only the map must match sr's size."""
    b = map_batch(1, 64, 4)
    del b["hr"]
    b["style"] = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(1))
    assert plus.super_resolve(b, Conditions(steps=1), torch.Generator().manual_seed(0)).shape == (1, 3, 64, 64)


def test_style_flows_train_and_sample():
    rng = np.random.default_rng(0)
    means = rng.normal(0.3, 0.05, (128, 32)).astype(np.float32)
    stds = rng.normal(0.1, 0.02, (128, 32)).astype(np.float32)
    torch.manual_seed(0)
    flows = StyleFlows()
    flows.requires_grad_(True)
    assert sum(p.numel() for p in flows.mean.parameters()) == 117_312
    hist = train_style_flows(flows, means, stds, FlowTrainConfig(epochs=8, batch_size=64))
    assert hist["mean"][-1] < hist["mean"][0] and hist["std"][-1] < hist["std"][0]
    m1, s1 = flows.sample(500, torch.Generator().manual_seed(0))
    m2, _ = flows.sample(500, torch.Generator().manual_seed(0))
    assert m1.shape == s1.shape == (500, 32) and torch.equal(m1, m2)
    assert torch.isfinite(m1).all() and torch.isfinite(s1).all()
    from baselines.seeding import seeded_generators  # per-image streams: a sampled style does not depend on the batch

    mb, sb = flows.sample(3, seeded_generators(0, [0, 1, 2]))
    alone = [flows.sample(1, seeded_generators(0, [i])) for i in range(3)]
    # same noise per sample; the flow's matmuls may round differently at another batch size
    assert torch.allclose(mb, torch.cat([m for m, _ in alone]), atol=1e-5) and torch.allclose(
        sb, torch.cat([s for _, s in alone]), atol=1e-5
    )
    assert not torch.allclose(alone[0][0], alone[1][0])


def test_shared_trainer_stage1_then_stage2_then_style_sampling(tiny_dataset, tmp_path):
    """`cmsrd-bench train --method sgdm+` then `--stage 2` through benchmark.train, then load and sample."""
    from benchmark.train import train

    cfg = {
        **TINY,
        "train": two_step_train(),
        "flows": {"epochs": 3, "batch_size": 4},
    }
    with pytest.raises(InputError, match="stage-1"):
        train("sgdm+", tiny_dataset, tmp_path / "empty", config=cfg, stage=2, progress=False)
    run = tmp_path / "run"
    res = train("sgdm+", tiny_dataset, run, config=cfg, progress=False)
    assert res["step"] == 2 and np.isfinite(res["val"]["psnr_y"])
    train("sgdm+", tiny_dataset, run, config=cfg, stage=2, progress=False)
    means, stds = np.load(run / "style_mean.npy"), np.load(run / "style_std.npy")
    assert means.shape == stds.shape == (6, 32) and (stds > 0).all() and np.abs(means).max() < 1
    hist = json.loads((run / "flows_history.json").read_text())
    assert hist["n"] == 6 and len(hist["mean"]) == 3
    # a model built from the stage-1 checkpoint picks up the flows next to it and samples styles
    m = build("sgdm+", 16, {**TINY, "checkpoint": str(run / "model.safetensors")}).eval()
    assert bool(m.flows.trained)
    assert m.parameter_counts()[1] == build("sgdm+", 16, TINY).parameter_counts()[1]  # flows not stage-1 trainables
    b = map_batch(2, 64, 4)
    b.pop("hr")
    o1 = m.super_resolve(b, Conditions(style="sample", steps=2), torch.Generator().manual_seed(5))
    o2 = m.super_resolve(b, Conditions(style="sample", steps=2), torch.Generator().manual_seed(5))
    o3 = m.super_resolve(b, Conditions(style="sample", steps=2), torch.Generator().manual_seed(6))
    assert o1.shape == (2, 3, 64, 64) and torch.equal(o1, o2) and not torch.equal(o1, o3)


def test_stage2_reads_the_lpips_best_stage1_weights(plus, tiny_dataset, tmp_path, caplog):
    """The sgdm configs keep the best val LPIPS (official ModelCheckpoint); stage 2 takes model-best.safetensors."""
    import shutil

    import yaml
    from safetensors.torch import save_file

    from baselines.registry import CONFIG_DIR

    for name in ("sgdm.yaml", "sgdm+.yaml", "sgdm-nomap.yaml"):
        assert yaml.safe_load((CONFIG_DIR / name).read_text())["train"]["keep_best"] == "lpips"
    last = {k: v.contiguous() for k, v in plus.trainable_state_dict().items()}
    best = {k: v + 0.01 if v.is_floating_point() else v for k, v in last.items()}
    save_file(last, str(tmp_path / "model.safetensors"))
    save_file(best, str(tmp_path / "model-best.safetensors"))
    torch.manual_seed(0)
    m = build("sgdm+", 16, TINY)
    m.run_stage(2, tiny_dataset, train_config(m.settings.train, flows={"epochs": 1, "batch_size": 4}), tmp_path)
    assert m.loaded_from == tmp_path / "model-best.safetensors"
    k = "adapter.conv_in.weight"
    assert torch.equal(m.trainable_state_dict()[k], best[k]) and (tmp_path / "flows.safetensors").is_file()
    # the flows record which stage-1 file they model; loading another one beside them warns (regression)
    from cmsrd.io import sha256_file

    fitted = json.loads((tmp_path / "flows_history.json").read_text())["stage1_weights"]
    assert fitted == {"name": "model-best.safetensors", "sha256": sha256_file(tmp_path / "model-best.safetensors")}
    with caplog.at_level("WARNING"):
        build("sgdm+", 16, {**TINY, "checkpoint": str(tmp_path / "model-best.safetensors")})
        assert "were fitted to" not in caplog.text
        shutil.copy(tmp_path / "model-best.safetensors", tmp_path / "sgdm+-final.safetensors")  # same bytes, new name
        build("sgdm+", 16, {**TINY, "checkpoint": str(tmp_path / "sgdm+-final.safetensors")})
        assert "were fitted to" not in caplog.text
        m = build("sgdm+", 16, {**TINY, "checkpoint": str(tmp_path / "model.safetensors")})
    assert bool(m.flows.trained) and "fitted to the style encoder of model-best.safetensors" in caplog.text


@pytest.mark.parametrize("where", ["flows", "train.flows"])
def test_misspelt_stage2_setting_is_refused(where):
    """Regression: `flows.epoch` / `train.flows.epoch` were dropped silently and stage 2 ran with defaults;
    now the config is refused when it is parsed, before anything is built."""
    flows = {"flows": {"epoch": 1}}
    config = {**TINY, **flows} if where == "flows" else {**TINY, "train": flows}
    with pytest.raises(InputError, match=rf"^{where}\.epoch: unknown key \(did you mean `epochs`"):
        build("sgdm+", 16, config)


def test_trainer_validates_sgdm_plus_with_the_gt_as_style(tiny_dataset, tmp_path, monkeypatch):
    """Official setup: validation uses the HR as the style image (train.val_conditions: style=gt from
    sgdm+.yaml), through the runner's condition code; the condition is recorded in val_log.csv."""
    import csv

    from baselines.sgdm.model import SGDMPlus
    from benchmark.train import train
    from cmsrd.io import read_png

    seen = []
    orig = SGDMPlus.super_resolve

    def spy(self, batch, cond, generator=None):
        if not self.training:
            seen.append((cond, {k: v.clone() for k, v in batch.items()}))
        return orig(self, batch, cond, generator)

    monkeypatch.setattr(SGDMPlus, "super_resolve", spy)
    cfg = {
        **TINY,
        "train": {
            "batch_size": 2,
            "total_steps": 1,
            "val_every": 1,
            "save_every": 1,
            "val_max_images": 2,
            "val_batch_size": 2,
            "lpips": "off",
            "keep_best": None,
            "log_every": 1,
        },
    }
    train("sgdm+", tiny_dataset, tmp_path / "run", config=cfg, progress=False)
    assert len(seen) == 1
    cond, batch = seen[0]
    assert cond.style == "gt" and "hr" not in batch  # the method never sees the HR except as the style
    ids = sorted(p.stem for p in (tiny_dataset / "test" / "hr_64").glob("*.png"))[:2]
    for i, sid in enumerate(ids):
        want = (
            torch.from_numpy(np.array(read_png(tiny_dataset / "test" / "hr_64" / f"{sid}.png")))
            .permute(2, 0, 1)
            .float()
            / 255
        )
        assert torch.allclose(batch["style"][i], want)
    with open(tmp_path / "run" / "val_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["condition"] for r in rows] == ["style=gt"]
    # an explicit override is honoured and recorded
    seen.clear()
    cfg["train"]["val_conditions"] = "style=shuffle"
    train("sgdm+", tiny_dataset, tmp_path / "run2", config=cfg, progress=False)
    assert seen[0][0].style == "shuffle" and "style" in seen[0][1]
    with open(tmp_path / "run2" / "val_log.csv", newline="") as f:
        assert [r["condition"] for r in csv.DictReader(f)] == ["style=shuffle"]
    # one without a style (before stage 2 there are no flows to sample) fails at the start, not at validation
    cfg["train"]["val_conditions"] = "default"
    with pytest.raises(InputError, match="val_conditions 'default'.*style=gt"):
        train("sgdm+", tiny_dataset, tmp_path / "run3", config=cfg, progress=False)
    assert not (tmp_path / "run3" / "train_log.csv").exists()


@pytest.mark.parametrize("name,scale", [("sgdm", 32), ("sgdm+", 16), ("sgdm-nomap", 32)])
def test_shipped_configs_pass_the_train_key_check(name, scale):
    """SGDM declares the `train.*` keys it reads, so the trainer refuses a misspelt one; every shipped
    config (defaults and the small/tiny overlays) must pass."""
    from baselines import registry
    from benchmark.train import check_train_keys

    method = build(name, scale, TINY, device="meta")
    for overlay in ("sgdm-small.yaml", "sgdm-tiny.yaml", None):
        cfg = registry.get(name).default_config()
        if overlay:
            cfg = registry.merge_config(cfg, registry.load_yaml(registry.CONFIG_DIR / overlay))
        check_train_keys(cfg["train"], method)
    with pytest.raises(InputError, match="train.gradient_checkpoint.*did you mean `?gradient_checkpointing"):
        check_train_keys({"gradient_checkpoint": True}, method)
    if name != "sgdm+":  # only SGDM+ has stage-2 flows
        with pytest.raises(InputError, match="train.flows"):
            check_train_keys({"flows": {"epochs": 1}}, method)
