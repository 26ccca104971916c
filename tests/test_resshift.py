"""ResShift: the residual-shifting chain, UNetModelSwin, the shared VQ-f4 autoencoder and the method
(tiny geometry on CPU; the official geometry only on the meta device and against the official key lists)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hr_lr_batch, official_keys, train_context

from baselines.archs.swin_unet import UNetModelSwin, shifted_window_mask, strip_derived_buffers
from baselines.archs.vqf4 import build_vq_f4, convert_ldm_vq, load_vq_f4
from baselines.checkpoint import save_weights
from baselines.conditions import Conditions
from baselines.diffusion.resshift import PRESETS, ResShiftChain, ResShiftSchedule
from baselines.method_config import train_config
from baselines.registry import build, get, load_yaml, merge_config
from baselines.resshift.model import strip_prefixes
from baselines.seeding import seeded_generators
from cmsrd.errors import InputError

TINY = load_yaml(Path(__file__).parents[1] / "baselines" / "configs" / "resshift-tiny.yaml")
UNET_PARAMS, VQ_PARAMS = 118_593_583, 55_322_782
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x16():
    torch.manual_seed(0)
    return build("resshift", 16, TINY).eval()


# ---- the chain ---------------------------------------------------------------------------------------


def test_eta_schedule_equals_the_published_values():
    v1 = PRESETS["v1"].sqrt_etas().numpy()
    assert len(v1) == 15 and np.all(np.diff(v1) > 0)
    np.testing.assert_allclose(v1[:3], [0.020, 0.117, 0.176], atol=1e-3)
    np.testing.assert_allclose(v1[-2:], [0.909, 0.990], atol=1e-3)
    # v3 is published to two decimals (the official formula gives 0.7614 for the third): equal at that precision
    np.testing.assert_array_equal(np.round(PRESETS["v3"].sqrt_etas().numpy(), 2), [0.10, 0.52, 0.76, 0.99])
    np.testing.assert_allclose(PRESETS["v3"].sqrt_etas().numpy()[[0, 1, 3]], [0.10, 0.52, 0.99], atol=1e-3)
    assert ResShiftSchedule.from_config({"steps": 4, "min_noise": 0.2}) == PRESETS["v3"]
    with pytest.raises(InputError, match="chain.kapa"):
        ResShiftSchedule.from_config({"kapa": 2})


def test_chain_forward_process_and_input_scaling():
    chain = ResShiftChain(PRESETS["v1"])
    x0, y, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 7, 14])
    eta = chain.etas[t].float().view(-1, 1, 1, 1)
    want = x0 + eta * (y - x0) + 2.0 * eta.sqrt() * eps
    torch.testing.assert_close(chain.q_sample(x0, y, t, eps), want)
    torch.testing.assert_close(chain.scale_input(want, t), want / torch.sqrt(4.0 * eta + 1))
    torch.testing.assert_close(chain.prior_sample(y, eps), y + 2.0 * 0.99 * eps)


@pytest.mark.parametrize("preset", ["v1", "v3"])
def test_a_perfect_x0_predictor_brings_the_chain_back_to_x0(preset):
    chain = ResShiftChain(PRESETS[preset])
    x0, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    seen = []

    def oracle(x_scaled, t):
        seen.append(int(t[0]))
        return x0

    out, nfe = chain.sample(oracle, y, seeded_generators(0, [0, 1]))
    assert nfe == chain.steps and seen == list(range(chain.steps))[::-1]
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    wrong, _ = chain.sample(lambda x, t: y, y, seeded_generators(0, [0, 1]))
    assert not torch.allclose(wrong, x0, atol=1e-2)


# ---- networks at the official geometry (meta) and the official key lists -------------------------------


def test_official_geometry_parameter_counts_are_exact():
    """As `cmsrd-bench list --json` counts them: the default config built on the meta device."""
    from baselines.cli import method_rows, parameter_counts

    assert parameter_counts("resshift", 16) == (UNET_PARAMS + VQ_PARAMS, UNET_PARAMS)  # the VQ-f4 is frozen
    with torch.device("meta"):
        assert sum(p.numel() for p in build_vq_f4("vq-f4").parameters()) == VQ_PARAMS
    row = next(r for r in method_rows(with_params=False) if r["name"] == "resshift")
    assert row["scales"] == [16, 32] and row["nfe"] == 15 and "non-commercial" in row["license"]


def test_official_unet_keys_all_map_with_prefixes_and_derived_buffers():
    official = official_keys("resshift_unet_realsr_x4")
    cfg = get("resshift").default_config()["network"]
    with torch.device("meta"):
        ours = UNetModelSwin(**{k: v for k, v in cfg.items() if k != "type"}).state_dict()
    for prefix in ("", "module.", "_orig_mod.", "module._orig_mod."):
        state = {prefix + k: torch.empty(s, device="meta") for k, s in official.items()}
        mapped = strip_derived_buffers(strip_prefixes(state))
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    dropped = set(official) - set(ours)
    assert dropped and all(k.endswith(("attn_mask", "relative_position_index")) for k in dropped)


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_official_vq_f4_keys_all_map_to_the_diffusers_model(prefix):
    official = official_keys("vq_f4")
    with torch.device("meta"):
        ours = build_vq_f4("vq-f4").state_dict()
    state = {prefix + k: torch.empty(s, device="meta") for k, s in official.items()}
    if prefix:  # an LDM Lightning file also holds the UNet: keys outside the prefix are not the autoencoder's
        state["model.diffusion_model.out.2.bias"] = torch.empty(3, device="meta")
    mapped = convert_ldm_vq(state, prefix)
    assert len(mapped) == len(official) == len(ours)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def _tiny_ldm_state(vq) -> dict[str, torch.Tensor]:
    """The tiny model's tensors under the official (CompVis) names: same structure, narrower shapes."""
    names = list(official_keys("vq_f4"))
    rename = dict(zip(names, convert_ldm_vq({k: torch.zeros(1) for k in names})))
    ours = vq.state_dict()
    out = {}
    for old, new in rename.items():
        v = ours[new]
        out[old] = v[:, :, None, None] if old.split(".")[-2] in ("q", "k", "v", "proj_out") and v.ndim == 2 else v
    return out


def test_vq_f4_loads_the_official_layout_and_refuses_another(tmp_path):
    torch.manual_seed(1)
    src = build_vq_f4("tiny")
    torch.save(
        {"state_dict": {f"first_stage_model.{k}": v for k, v in _tiny_ldm_state(src).items()}}, tmp_path / "a.ckpt"
    )
    torch.save(_tiny_ldm_state(src), tmp_path / "plain.pth")
    for name in ("a.ckpt", "plain.pth"):
        dst = build_vq_f4("tiny")
        load_vq_f4(dst, tmp_path / name)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k
    torch.save({"encoder.down.0.attn.0.q.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="no counterpart"):
        load_vq_f4(build_vq_f4("tiny"), tmp_path / "bad.pth")
    with pytest.raises(InputError, match="does not match"):  # the official geometry's file into the tiny model
        load_vq_f4(build_vq_f4("tiny"), _shrunk_official_vq(tmp_path))


def _shrunk_official_vq(tmp_path: Path) -> Path:
    """An official-layout file of another geometry (every tensor one element too short in dim 0)."""
    state = {k: torch.zeros(max(s[0] - 1, 1), *s[1:]) for k, s in official_keys("vq_f4").items()}
    torch.save(state, tmp_path / "other.pth")
    return tmp_path / "other.pth"


def test_shifted_window_mask_is_the_official_one():
    """Official calculate_mask (measured at 16x16, window 8, shift 4): labels vary along rows only, so only
    the two windows of the last row band are masked, each in 2048 of its 4096 query/key pairs."""
    mask = shifted_window_mask(16, 16, 8, 4)
    assert mask.shape == (4, 64, 64)
    assert [int((m != 0).sum()) for m in mask] == [0, 0, 2048, 2048]
    assert set(mask.unique().tolist()) == {0.0, -100.0}


# ---- the method (tiny geometry) ------------------------------------------------------------------------


def test_registry_spec():
    spec = get("resshift")
    assert spec.scales == (16, 32) and spec.nfe == 15 and spec.kind == "diffusion"
    assert "S-Lab License 1.0" in spec.license and "non-commercial" in spec.license.split(" (")[0]


@pytest.mark.parametrize("scale,lr_px", [(16, 16), (32, 8)])
def test_exact_output_shapes(scale, lr_px):
    torch.manual_seed(0)
    m = build("resshift", scale, TINY).eval()
    out = m.super_resolve({"lr": torch.rand(2, 3, lr_px, lr_px)}, Conditions(), seeded_generators(0, [0, 1]))
    assert out.shape == (2, 3, 256, 256) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert m.nfe(Conditions()) == 4


def test_per_image_seeding_batch_1_equals_batch_3(x16):
    lr = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    batch = x16.super_resolve({"lr": lr}, Conditions(), seeded_generators(7, [0, 1, 2]))
    alone = torch.cat(
        [x16.super_resolve({"lr": lr[i : i + 1]}, Conditions(), seeded_generators(7, [i])) for i in range(3)]
    )
    assert batch.shape == (3, 3, 64, 64)
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=0)  # float rounding of batched convolutions only
    other = x16.super_resolve({"lr": lr}, Conditions(), seeded_generators(8, [0, 1, 2]))
    assert (other - batch).abs().max() > 1e-3


def test_lr_smaller_than_the_chain_supports_is_one_input_error(x16):
    with pytest.raises(InputError, match=r"LR 2x2 at x16.*at least 4 px"):
        x16.super_resolve({"lr": torch.rand(1, 3, 2, 2)}, Conditions())
    with pytest.raises(InputError, match="multiples of"):
        x16.super_resolve({"lr": torch.rand(1, 3, 5, 5)}, Conditions())


def test_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = build("resshift", 16, TINY).train()
    opts = m.configure_optimizers(train_config(m.settings.train, lr=2e-3))
    assert isinstance(opts["main"], torch.optim.AdamW) and opts["main"].defaults["weight_decay"] == 0.0
    frozen = m.autoencoder.encoder.conv_in.weight.clone()
    batch, ctx, losses = hr_lr_batch(2), train_context(opts), []
    for _ in range(6):
        torch.manual_seed(123)  # same step indices and noise every time: a fixed objective
        losses.append(m.training_step(batch, ctx)["l_x0"])
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(m.autoencoder.encoder.conv_in.weight, frozen) and not m.autoencoder.training


def test_warmup_scales_the_step_and_leaves_the_schedule_alone():
    m = build("resshift", 16, TINY).train()
    opts = m.configure_optimizers(train_config(m.settings.train, lr=1e-3, warmup_steps=10))
    seen: list[float] = []
    m.training_step(hr_lr_batch(1), train_context(opts, step=4, seen_lr=seen))
    m.training_step(hr_lr_batch(1), train_context(opts, step=10, seen_lr=seen))
    assert seen == pytest.approx([5e-4, 1e-3]) and opts["main"].param_groups[0]["lr"] == 1e-3


def test_checkpoint_round_trip_and_official_prefixes(x16, tmp_path):
    lr = torch.rand(1, 3, 4, 4)
    want = x16.super_resolve({"lr": lr}, Conditions(), seeded_generators(0, [0]))
    path = save_weights(tmp_path / "model.safetensors", x16.trainable_state_dict(), x16.export_metadata())
    again = build("resshift", 16, {**TINY, "checkpoint": str(path)}).eval()
    again.autoencoder.load_state_dict(x16.autoencoder.state_dict())  # random VQ in tests: same frozen part
    assert again.loaded_from == path
    torch.testing.assert_close(again.super_resolve({"lr": lr}, Conditions(), seeded_generators(0, [0])), want)
    # official .pth: `state_dict` wrapper, DDP + torch.compile prefixes, derived buffers included
    official = {f"module._orig_mod.{k}": v for k, v in x16.net_g.state_dict().items()}
    official["module._orig_mod.middle_block.1.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    official["module._orig_mod.middle_block.1.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16)
    torch.save({"state_dict": official}, tmp_path / "resshift_x4.pth")
    fresh = build("resshift", 16, TINY)
    fresh.load_checkpoint(tmp_path / "resshift_x4.pth")
    for k, v in x16.net_g.state_dict().items():
        assert torch.equal(fresh.net_g.state_dict()[k], v), k


def test_bad_checkpoints_are_one_clear_error(x16, tmp_path):
    m = build("resshift", 16, TINY)
    torch.save({"conv_first.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "esrgan.pth")
    with pytest.raises(InputError, match="another architecture"):
        m.load_checkpoint(tmp_path / "esrgan.pth")
    torch.save(_tiny_ldm_state(m.autoencoder), tmp_path / "vq.pth")
    with pytest.raises(InputError, match="VQ autoencoder"):
        m.load_checkpoint(tmp_path / "vq.pth")
    bigger = build("resshift", 16, {**TINY, "network": {**TINY["network"], "model_channels": 64}})
    save_weights(tmp_path / "big.safetensors", bigger.trainable_state_dict(), {"method": "resshift", "scale": 16})
    with pytest.raises(InputError, match="does not match"):
        m.load_checkpoint(tmp_path / "big.safetensors")
    good = save_weights(tmp_path / "ok.safetensors", x16.trainable_state_dict(), x16.export_metadata())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated|not a readable safetensors"):
        m.load_checkpoint(cut)
    torch.save(x16.net_g.state_dict(), tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:5000])
    with pytest.raises(InputError, match="truncated|corrupt"):
        m.load_checkpoint(tmp_path / "cut.pth")
    v1 = build("resshift", 16, {**TINY, "chain": {"steps": 15}})
    with pytest.raises(InputError, match="chain"):
        v1.load_checkpoint(good)
    with pytest.raises(InputError, match="autoencoder.weights"):
        build("resshift", 16, {**TINY, "autoencoder": {"geometry": "tiny", "weights": str(tmp_path / "none.pth")}})


def test_default_autoencoder_is_the_manifest_file_and_missing_is_named():
    from cmsrd.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="autoencoder_vq_f4.pth"):
        build("resshift", 16, {**TINY, "autoencoder": {"geometry": "tiny", "weights": "resshift_vq_f4"}})


def test_shared_trainer_trains_exports_and_reloads(tiny_dataset, tmp_path):
    from benchmark.train import train

    cfg = {
        **TINY,
        "train": {
            "batch_size": 2,
            "total_steps": 2,
            "val_every": 2,
            "save_every": 2,
            "val_max_images": 2,
            "lpips": "off",
            "log_every": 1,
            "ema_decay": 0.9,
        },
    }
    res = train("resshift", tiny_dataset, tmp_path / "run", config=cfg, progress=False)
    assert res["step"] == 2 and np.isfinite(res["val"]["psnr_y"])
    m = build("resshift", 16, {**TINY, "checkpoint": str(tmp_path / "run" / "model.safetensors")})
    assert m.loaded_from is not None


@pytest.mark.parametrize("extra", [None, "resshift-v3.yaml", "resshift-tiny.yaml"])
def test_shipped_configs_pass_the_train_key_check(extra):
    from baselines.method_config import Scheduler, build_scheduler, parse_config
    from baselines.registry import CONFIG_DIR, merge_config
    from baselines.resshift.model import ResShift, ResShiftConfig
    from benchmark.train import check_train_keys
    from cmsrd.typed import coerce

    cfg = get("resshift").default_config()
    if extra:
        cfg = merge_config(cfg, load_yaml(CONFIG_DIR / extra))
    check_train_keys(cfg["train"], ResShift, "resshift")
    assert parse_config(ResShiftConfig, cfg, "resshift").chain == ResShiftSchedule.from_config(cfg["chain"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = coerce(cfg["train"].get("scheduler") or {}, Scheduler, "train.scheduler")
    build_scheduler(sched, opt, int(cfg["train"]["total_steps"]))


def test_misspelt_config_keys_are_refused_with_the_close_match():
    """The typed config (`ResShiftConfig`) refuses an unknown key at any level, naming the closest valid one,
    and checks the chain's values when the config is parsed."""
    for override, message in (
        ({"chain": {"kapa": 2.0}}, r"^chain.kapa: unknown key \(did you mean `kappa`\?\)"),
        ({"autoencoder": {"weight": None}}, r"^autoencoder.weight: unknown key \(did you mean `weights`\?\)"),
        ({"chian": {"steps": 4}}, r"^chian: is not a key of the resshift config \(did you mean `chain`\?\)"),
        ({"train": {"warmup_step": 10}}, r"^train.warmup_step: .*\(did you mean `warmup_steps`\?\)"),
    ):
        with pytest.raises(InputError, match=message):
            build("resshift", 16, merge_config(TINY, override), device="meta")
    with pytest.raises(InputError, match=r"^chain .*needs steps >= 2"):
        build("resshift", 16, merge_config(TINY, {"chain": {"steps": 1}}), device="meta")
    m = build("resshift", 16, merge_config(TINY, {"train": {"warmup_steps": 7}}), device="meta")
    assert m.chain.schedule == ResShiftSchedule(steps=4) and m.settings.train.warmup_steps == 7
    assert m.settings.train.lr == 5e-5 and m.settings.autoencoder == type(m.settings.autoencoder)("tiny", None)
