"""csdiff (seeds/000): tiny geometry at x16/x32, the prior module's gradient, the LR-start chain with an exact
denoiser, counted NFE, loss on a fixed batch, batch independence, bad conditions, trainer round trip, listing."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from baselines import registry
from baselines.cli import list_command
from baselines.conditions import Conditions
from baselines.csdiff import DOI
from baselines.diffusion import respaced_lr_timesteps, training_scheduler
from baselines.seeding import seeded_generators
from benchmark.train import train
from cmsrd.errors import InputError

TINY = "baselines/configs/csdiff-tiny.yaml"


def tiny(scale: int = 16, **override):
    torch.manual_seed(0)
    cfg = registry.merge_config(registry.load_yaml(TINY), override)
    return registry.build("csdiff", scale, cfg)


def batch(n: int, hr_px: int = 32, scale: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, hr_px, hr_px, generator=g)
    sr = (hr + 0.1 * torch.randn(n, 3, hr_px, hr_px, generator=g)).clamp(0, 1)
    return {"hr": hr, "sr": sr, "lr": torch.rand(n, 3, max(1, hr_px // scale), max(1, hr_px // scale), generator=g)}


@pytest.mark.parametrize("scale,lr_px", [(16, 16), (32, 8)])
def test_tiny_shapes_x16_x32(scale, lr_px):
    m = tiny(scale).eval()
    b = {"lr": torch.rand(1, 3, lr_px, lr_px), "sr": torch.rand(1, 3, 256, 256)}
    out = m.super_resolve(b, Conditions.parse("steps=1,start=lr@200"), torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 256, 256) and 0 <= out.min() and out.max() <= 1


def test_gradient_reaches_the_prior_module():
    m = tiny()
    m.configure_optimizers(m.settings.train)
    m.diffusion_loss(batch(2)).backward()
    prior = dict(m.net_g.prior_encoder.named_parameters())
    assert prior and all(p.grad is not None and p.grad.abs().sum() > 0 for p in prior.values())
    # and the prior changes the prediction (its features are injected, not merely computed)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([300])
    a = m.net_g(x, t, torch.zeros(1, 3, 32, 32))
    b = m.net_g(x, t, torch.ones(1, 3, 32, 32))
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_perfect_denoiser_lr_start_returns_the_target(sampler, monkeypatch):
    m = tiny(sampler={"name": sampler}).eval()
    b = batch(2, hr_px=16)
    x0 = b["hr"] * 2 - 1
    ac = training_scheduler().alphas_cumprod

    def oracle(z, t, feats):
        a = ac[t.long()].view(-1, 1, 1, 1).to(z)
        return (z - a.sqrt() * x0) / (1 - a).sqrt()

    monkeypatch.setattr(m.net_g, "denoise", oracle)
    out = m.super_resolve({"sr": b["sr"], "lr": b["lr"]}, Conditions(), seeded_generators(0, [0, 1]))
    assert torch.allclose(out, b["hr"], atol=2e-3), float((out - b["hr"]).abs().max())


@pytest.mark.parametrize(
    "text,expected", [("default", 20), ("steps=7,start=lr@300", 7), ("start=noise,steps=4", 4), ("steps=3", 3)]
)
def test_start_lr_runs_exactly_the_expected_evaluations(text, expected):
    m = tiny().eval()
    cond = Conditions.parse(text)
    unet, prior = [], []
    h1 = m.net_g.conv_in.register_forward_hook(lambda mod, i, o: unet.append(1))
    h2 = m.net_g.prior_encoder.register_forward_hook(lambda mod, i, o: prior.append(1))
    seen = []
    orig = m.net_g.denoise

    def spy(z, t, feats):
        seen.append(int(t[0]))
        return orig(z, t, feats)

    m.net_g.denoise = spy
    try:
        m.super_resolve(batch(1, hr_px=16), cond, torch.Generator().manual_seed(0))
    finally:
        h1.remove(), h2.remove()
    assert len(unet) == len(seen) == m.nfe(cond) == expected and len(prior) == 1
    if cond.start_t is not None:
        assert seen == respaced_lr_timesteps(cond.start_t, expected).tolist()
    if cond.noise_start:
        assert seen[0] == 999


def test_loss_decreases_on_a_fixed_batch():
    m = tiny()
    opt = m.configure_optimizers(m.settings.train)["g"]
    b = batch(4)
    t = torch.tensor([50, 300, 600, 900])

    def loss():
        torch.manual_seed(1)
        return m.diffusion_loss(b, t)

    with torch.no_grad():
        before = float(loss())
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        assert float(loss()) < 0.7 * before


def test_batch_of_one_equals_batch_of_three():
    m = tiny().eval()
    b = batch(3, hr_px=16)
    cond = Conditions.parse("steps=3,start=lr@300")
    whole = m.super_resolve(b, cond, seeded_generators(5, [0, 1, 2]))
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in b.items()}
        assert torch.allclose(m.super_resolve(one, cond, seeded_generators(5, [i])), whole[i : i + 1], atol=1e-5)


@pytest.mark.parametrize(
    "text,match",
    [
        ("steps=50,start=lr@20", r"steps=50 with start=lr@20.*steps=1\.\.20"),
        ("start=lr@1000", r"start=lr@1000.*1\.\.999"),
        ("start=lr@0", r"start=lr@0.*1\.\.999"),
        ("steps=1001,start=noise", r"steps=1001.*1\.\.1000"),
    ],
)
def test_out_of_range_conditions_name_the_condition_and_range(text, match):
    m = tiny()
    with pytest.raises(InputError, match=match):
        m.nfe(Conditions.parse(text))


def test_bad_sampler_config_is_refused_at_build():
    with pytest.raises(InputError, match="steps=500 with start=lr@400"):
        tiny(sampler={"steps": 500})


def test_trains_on_the_shared_trainer_and_checkpoint_round_trips(tiny_dataset, tmp_path):
    config = {"train": {"batch_size": 2, "val_every": 3, "save_every": 3, "crop_px": 32, "val_max_images": 2}}
    config = registry.merge_config(registry.load_yaml(TINY), config)
    res = train("csdiff", tiny_dataset, tmp_path / "run", config=config, max_steps=3, progress=False)
    assert res["step"] == 3
    a = registry.build("csdiff", 16, {**config, "checkpoint": str(tmp_path / "run" / "model.safetensors")})
    assert a.loaded_from is not None
    trained = a.trainable_state_dict()
    fresh = tiny()
    assert any(not torch.equal(trained[k], v) for k, v in fresh.trainable_state_dict().items())
    with pytest.raises(InputError, match="x16"):
        registry.build("csdiff", 32, {**config, "checkpoint": str(tmp_path / "run" / "model.safetensors")})


def test_list_json_shows_csdiff_with_doi_scales_and_nfe():
    res = CliRunner().invoke(list_command, ["--json"])
    assert res.exit_code == 0, res.output
    row = next(r for r in json.loads(res.output)["methods"] if r["name"] == "csdiff")
    assert DOI in row["citation"] and row["scales"] == [16, 32] and row["nfe"] == 20 and row["kind"] == "diffusion"
    assert row["params"]["total"] == 34_703_235  # the default geometry
