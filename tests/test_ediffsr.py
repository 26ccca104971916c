"""EDiffSR: registry entry and parameter count, the IR-SDE schedule against an independent computation, both
reverse samplers with a perfect noise predictor, HR shapes at x16/x32, per-image seeding, training, checkpoints
(ours and the official key layout) and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from baselines import registry
from baselines.checkpoint import save_weights
from baselines.conditions import Conditions, UnsupportedCondition
from baselines.diffusion.irsde import IRSDE, sample_irsde
from baselines.ediffsr import convert_official, upsample_lr
from baselines.inference import super_resolve_batch
from baselines.method_config import train_config
from baselines.seeding import seeded_generators
from benchmark.train import train
from cmsrd.data import CMSRDDataset
from cmsrd.errors import InputError

TINY = str(Path(registry.CONFIG_DIR) / "ediffsr-tiny.yaml")
OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys" / "ediffsr.json"


def tiny(scale: int = 16, **override):
    torch.manual_seed(0)
    cfg = registry.merge_config(registry.load_yaml(TINY), override)
    return registry.build("ediffsr", scale, cfg)


def official_state(prefix: str = "") -> dict[str, torch.Tensor]:
    shapes = json.loads(OFFICIAL_KEYS.read_text())["tensors"]
    g = torch.Generator().manual_seed(0)
    return {prefix + k: torch.randn(v, generator=g) * 0.02 for k, v in shapes.items()}


# ---- registry ---------------------------------------------------------------------------------------------


def test_spec_and_list_json_parameter_count(monkeypatch):
    import baselines.cli as cli

    spec = registry.get("ediffsr")
    assert spec.kind == "diffusion" and spec.nfe == 100 and spec.inputs == ("lr",)
    assert {16, 32} <= set(spec.scales) and spec.conditions == ("steps",)
    assert "no LICENSE file" in spec.license
    monkeypatch.setattr(registry, "names", lambda: ["ediffsr"])
    out = CliRunner().invoke(cli.list_command, ["--json"], catch_exceptions=False).output
    row = json.loads(out)["methods"][0]
    assert row["params"] == {"scale": 16, "total": 20_403_719, "trainable": 20_403_719} and row["nfe"] == 100
    assert cli.parameter_counts("ediffsr", 32) == (20_403_719, 20_403_719)  # no scale-dependent part
    assert json.loads(OFFICIAL_KEYS.read_text())["parameters"] == 20_403_719
    assert row["weights"] == {"16": "train", "32": "train"}


def test_weights_manifest_entries():
    from baselines import weights as w

    m = w.load_manifest(w.MANIFEST_PATH)
    assert w.method_weights_key("ediffsr", 16, m) == "ediffsr_x16" and not m["ediffsr_x16"].published
    assert w.method_weights_key("ediffsr", 32, m) == "ediffsr_x32" and not m["ediffsr_x32"].published
    official = m[w.method_weights_key("ediffsr", 4, m)]
    assert official.url.endswith("experiments/sisr/ediffsr/180000_G.pth") and "no LICENSE file" in official.licence


# ---- the IR-SDE -------------------------------------------------------------------------------------------


def test_schedule_equals_an_independent_computation():
    """theta_t = 1 - f(t + 1) / f(0), f(u) = cos^2((u / (T + 2) + s) / (1 + s) * pi / 2), s = 0.008, t = 0..T;
    Theta_t = theta_1 + ... + theta_t; dt = -ln(eps) / Theta_T; sigma_t = sqrt(2 theta_t) sigma_max;
    sigma_bar_t = sigma_max sqrt(1 - exp(-2 Theta_t dt)), with sigma_max 50/255, T 100, eps 0.005."""
    T, s, eps, smax = 100, 0.008, 0.005, 50 / 255

    def f(u):
        return math.cos((u / (T + 2) + s) / (1 + s) * math.pi / 2) ** 2

    theta = [1 - f(t + 1) / f(0) for t in range(T + 1)]
    big = [sum(theta[1 : t + 1]) for t in range(T + 1)]
    dt = -math.log(eps) / big[T]
    sde = IRSDE(max_sigma=50, T=100, schedule="cosine", eps=0.005)
    assert sde.max_sigma == pytest.approx(smax) and sde.dt == pytest.approx(dt, rel=1e-12)
    for t in range(T + 1):
        assert float(sde.thetas[t]) == pytest.approx(theta[t], rel=1e-12, abs=1e-15)
        assert float(sde.thetas_cumsum[t]) == pytest.approx(big[t], rel=1e-12, abs=1e-15)
        assert float(sde.sigmas[t]) == pytest.approx(math.sqrt(2 * theta[t]) * smax, rel=1e-12)
        assert float(sde.sigma_bars[t]) == pytest.approx(smax * math.sqrt(1 - math.exp(-2 * big[t] * dt)), abs=1e-14)
    # what the choices mean: at t = T only eps of (x0 - mu) is left and the std is ~sigma_max
    assert float(sde.decay[T]) == pytest.approx(eps, rel=1e-12)
    assert float(sde.sigma_bars[T]) == pytest.approx(smax * math.sqrt(1 - eps**2), rel=1e-12)
    assert dt == pytest.approx(0.10409, abs=1e-5) and theta[1] == pytest.approx(0.0016, abs=1e-4)


def _perfect(sde: IRSDE, x0: torch.Tensor, mu: torch.Tensor):
    calls = []

    def eps(x, t):
        calls.append(int(t[0]))
        return sde.true_noise(x, x0, mu, t)

    return eps, calls


@pytest.mark.parametrize("sampler,steps", [("sde", None), ("posterior", 100), ("posterior", 7), ("posterior", 1)])
def test_reverse_chain_with_a_perfect_noise_predictor_returns_x0(sampler, steps):
    sde = IRSDE()
    g = torch.Generator().manual_seed(0)
    x0, mu = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    eps, calls = _perfect(sde, x0, mu)
    out, nfe = sample_irsde(eps, mu, sde, sampler=sampler, steps=steps, generator=seeded_generators(0, [0, 1]))
    assert nfe == len(calls) == (steps or 100) and calls[0] == 100 and calls[-1] >= 1
    assert (mu - x0).abs().mean() > 0.3  # the start is far from x0 ...
    if sampler == "sde":
        # ... EM ends one noisy step from x0: the official last step adds sigma_1 sqrt(dt) z (std 0.0037)
        last = float(sde.sigmas[1]) * math.sqrt(sde.dt)
        assert (out - x0).abs().max() < 6 * last and (out - x0).std() < 1.3 * last
    else:  # ... the posterior sampler's last step is deterministic: x0 exactly
        assert torch.allclose(out, x0, atol=1e-4)


def test_training_target_is_the_exact_posterior_mean():
    """optimum_step(x_t, x0) = E[x_{t-1} | x_t, x0], checked against the Gaussian product of
    q(x_{t-1} | x0) and q(x_t | x_{t-1}) computed from the schedule tables."""
    sde = IRSDE()
    g = torch.Generator().manual_seed(1)
    x0, mu, xt = (torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 40, 100])
    m_prev = mu + (x0 - mu) * sde.decay[t - 1].view(-1, 1, 1, 1)  # q(x_{t-1} | x0) = N(m_prev, v_prev)
    v_prev = (sde.sigma_bars[t - 1] ** 2).view(-1, 1, 1, 1)
    a = torch.exp(-sde.thetas[t] * sde.dt).view(-1, 1, 1, 1)  # q(x_t | x_{t-1}) = N(mu + a (x_{t-1} - mu), v)
    v = sde.max_sigma**2 * (1 - a**2)
    precision = 1 / v_prev[1:] + a[1:] ** 2 / v[1:]
    mean = (m_prev[1:] / v_prev[1:] + a[1:] * (xt[1:] - mu[1:] * (1 - a[1:])) / v[1:]) / precision
    mean = torch.cat([x0[:1], mean])  # t = 1: x_0 itself (v_prev = 0)
    assert torch.allclose(sde.optimum_step(xt, x0, mu, t), mean, atol=1e-9)


# ---- the method -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale,lr_px", [(16, 16), (32, 8)])
def test_hr_shapes_at_x16_and_x32(scale, lr_px):
    method = tiny(scale)
    batch = {"lr": torch.rand(2, 3, lr_px, lr_px)}
    out = super_resolve_batch(method, batch, Conditions.parse("steps=2"), generator=seeded_generators(0, [0, 1]))
    assert out.shape == (2, 3, 256, 256) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert method.nfe(Conditions()) == 100 and method.nfe(Conditions.parse("steps=2")) == 2
    assert upsample_lr(batch["lr"], scale).shape == (2, 3, 256, 256)


def test_batch_of_one_equals_batch_of_three_and_uses_100_evaluations():
    method = tiny(16)
    with torch.no_grad():  # an untrained predictor's feedback drives the chain to |x| ~ 200, where batched-conv
        method.net_g.ending.weight.mul_(0.01)  # rounding shows; a small output keeps it in range, as trained ones do
    calls = []
    method.net_g.register_forward_hook(lambda *_: calls.append(1))
    lr = torch.rand(3, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    together = super_resolve_batch(method, {"lr": lr}, generator=seeded_generators(7, [0, 1, 2]))
    assert len(calls) == 100 and together.shape == (3, 3, 32, 32)
    alone = [super_resolve_batch(method, {"lr": lr[i : i + 1]}, generator=seeded_generators(7, [i])) for i in (2, 0)]
    # mixed-up streams would differ by ~0.1; float rounding of batched convs stays far below 1e-4
    assert torch.allclose(alone[0][0], together[2], atol=1e-4) and torch.allclose(alone[1][0], together[0], atol=1e-4)
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # different images, different streams
    assert 0.05 < float(together.mean()) < 0.95


class _Ctx:
    """The trainer's TrainContext for a plain loop: backward + step of the named optimizer (none: evaluate only)."""

    def __init__(self, optimizers=None):
        self.optimizers, self.step = optimizers, 0

    def backward(self, loss, name):
        if self.optimizers is None:
            return
        loss.backward()
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def test_training_lowers_the_loss_on_a_fixed_batch(tiny_dataset):
    ds = CMSRDDataset(tiny_dataset, "train", inputs=("lr", "hr"))
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("lr", "hr")}
    method = tiny(16)
    optimizers = method.configure_optimizers(
        train_config(method.settings.train, optim_g={"type": "AdamW", "lr": 2e-3, "weight_decay": 0})
    )

    def loss_at_fixed_draws():  # the same t and noise every time: the loss moves only with the weights
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(123)
            return method.training_step(batch, _Ctx())["l_mean"]

    before = loss_at_fixed_draws()
    ctx = _Ctx(optimizers)
    for _ in range(25):
        method.training_step(batch, ctx)
    after = loss_at_fixed_draws()
    assert after < 0.75 * before  # measured: 0.0177 -> 0.0104


def test_trainer_run_exports_weights_that_round_trip(tiny_dataset, tmp_path):
    """`cmsrd-bench train`'s loop end to end (EMA of net_g, validation through the sampler, export), then the
    exported file loads into a fresh build and gives the same images for the same seeds."""
    config = registry.merge_config(
        registry.load_yaml(TINY),
        {"sampler": {"name": "posterior", "steps": 3}, "train": {"ema_decay": 0.9, "val_every": 3, "save_every": 3}},
    )
    res = train("ediffsr", tiny_dataset, tmp_path / "run", config=config, max_steps=3, progress=False)
    assert res["step"] == 3 and 5 < res["val"]["psnr_y"] < 60
    weights = tmp_path / "run" / "model.safetensors"
    a, b = registry.build("ediffsr", 16, config), registry.build("ediffsr", 16, config)
    a.load_checkpoint(weights)
    b.load_checkpoint(weights)
    assert a.loaded_from == weights
    lr = torch.rand(2, 3, 4, 4)
    out_a = super_resolve_batch(a, {"lr": lr}, generator=seeded_generators(1, [0, 1]))
    out_b = super_resolve_batch(b, {"lr": lr}, generator=seeded_generators(1, [0, 1]))
    assert torch.equal(out_a, out_b)
    with pytest.raises(InputError, match="trained for x16 but the method was built for x32"):
        registry.build("ediffsr", 32, config).load_checkpoint(weights)


def test_checkpoint_round_trip_keeps_every_tensor(tmp_path):
    method = tiny(16)
    path = save_weights(tmp_path / "w.safetensors", method.trainable_state_dict(), method.export_metadata())
    other = tiny(16)
    with torch.no_grad():
        for p in other.net_g.parameters():
            p.add_(1.0)
    other.load_checkpoint(path)
    for k, v in method.net_g.state_dict().items():
        assert torch.equal(other.net_g.state_dict()[k], v), k


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_state_dict_loads_strictly_and_every_key_maps(tmp_path, prefix):
    state = official_state(prefix)
    converted = convert_official(state)
    method = registry.build("ediffsr", 16)  # the released geometry: width 64, [14, 1, 1, 1]
    own = method.net_g.state_dict()
    assert set(converted) == set(own) and all(tuple(own[k].shape) == tuple(v.shape) for k, v in converted.items())
    path = tmp_path / "180000_G.pth"
    torch.save(state, path)
    method.load_checkpoint(path)
    assert method.loaded_from == path
    assert torch.equal(method.net_g.state_dict()["intro.weight"], state[prefix + "intro.weight"])


# ---- bad input --------------------------------------------------------------------------------------------


def test_wrong_layout_checkpoints_are_one_clear_error(tmp_path):
    method = tiny(16)
    esrgan = registry.build("esrgan", 16, {"network": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}})
    foreign = tmp_path / "esrgan.pth"
    torch.save(esrgan.net_g.state_dict(), foreign)
    with pytest.raises(InputError, match="another architecture.*official plain ConditionalNAFNet"):
        method.load_checkpoint(foreign)
    official = tmp_path / "full.pth"  # the released width on the tiny config: a size mismatch, named as such
    torch.save(official_state(), official)
    with pytest.raises(InputError, match="does not match the model.*shape mismatches.*same network size"):
        method.load_checkpoint(official)
    ours = save_weights(tmp_path / "esrgan.safetensors", esrgan.net_g.state_dict(), esrgan.export_metadata())
    with pytest.raises(InputError, match="saved by method 'esrgan'"):
        method.load_checkpoint(ours)
    assert method.loaded_from is None


def test_truncated_files_are_one_clear_error(tmp_path):
    method = tiny(16)
    state = method.trainable_state_dict()
    pth, st = tmp_path / "cut.pth", tmp_path / "cut.safetensors"
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    for path in (pth, st):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError, match="truncated|corrupt"):
            method.load_checkpoint(path)
    with pytest.raises(InputError, match="not found"):
        method.load_checkpoint(tmp_path / "missing.pth")


def test_bad_lr_and_settings_are_one_clear_error():
    method = tiny(16)
    with pytest.raises(InputError, match=r"lr of shape \(2, 1, 4, 4\).*N x 3 x h x w"):
        super_resolve_batch(method, {"lr": torch.rand(2, 1, 4, 4)})
    with pytest.raises(InputError, match=r"lr values.*expected \[0, 1\]"):
        super_resolve_batch(method, {"lr": torch.rand(1, 3, 4, 4) * 255})
    ctx = _Ctx()
    with pytest.raises(InputError, match="HR is not the LR size x16"):
        method.training_step({"lr": torch.rand(1, 3, 8, 8), "hr": torch.rand(1, 3, 64, 64)}, ctx)
    for steps in (0, 101):
        with pytest.raises(InputError, match="steps"):
            super_resolve_batch(method, {"lr": torch.rand(1, 3, 2, 2)}, Conditions(steps=steps))
    with pytest.raises(UnsupportedCondition):
        super_resolve_batch(method, {"lr": torch.rand(1, 3, 2, 2)}, Conditions.parse("start=lr@50"))
    with pytest.raises(InputError, match="width must be an even integer >= 16"):
        tiny(16, network={"width": 8})
    with pytest.raises(InputError, match="as many decoder as encoder levels"):
        tiny(16, network={"dec_blk_nums": [1, 1]})
    with pytest.raises(InputError, match=r"sde.max_sgima: unknown key \(did you mean `max_sigma`\?\)"):
        tiny(16, sde={"max_sgima": 50})
    with pytest.raises(InputError, match=r"is not an IR-SDE schedule \(did you mean `cosine`\?\)"):
        tiny(16, sde={"schedule": "cosin"})
    with pytest.raises(InputError, match="always runs all 100 steps"):
        tiny(16, sampler={"name": "sde", "steps": 20})


def test_misspelt_config_keys_are_refused_with_the_close_match():
    """The typed config (`EDiffSRConfig`) refuses an unknown key at any level, naming the closest valid one."""
    for override, message in (
        ({"sampler": {"stpes": 20}}, r"^sampler.stpes: unknown key \(did you mean `steps`\?\)"),
        ({"smapler": {"name": "sde"}}, r"^smapler: is not a key of the ediffsr config \(did you mean `sampler`\?\)"),
        ({"train": {"loss_wieght": 2.0}}, r"^train.loss_wieght: .*\(did you mean `loss_weight`\?\)"),
    ):
        with pytest.raises(InputError, match=message):
            tiny(16, **override)
    with pytest.raises(InputError, match=r"sampler.name: unknown value 'posteror' \(did you mean `posterior`\?\)"):
        tiny(16, sampler={"name": "posteror"})
    m = tiny(16, sampler={"name": "posterior", "steps": 20}, train={"loss_weight": 2.0})
    assert (m.sampler_name, m.default_steps, m.settings.train.loss_weight) == ("posterior", 20, 2.0)
    assert m.settings.train.optim_g.lr == 1e-3 and m.settings.sde.max_sigma == 50  # the tiny YAML over ediffsr.yaml
