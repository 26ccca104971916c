"""ldm-sr (CompVis LDM-SR, bsr_sr): the UNet converter, the checkpoint layouts and the method (tiny geometry on
CPU; the official geometry only on the meta device and against the official key lists)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hr_lr_batch, official_keys, train_context
from torch.nn import functional as F

from baselines.archs.vqf4 import build_vq_f4, convert_ldm_vq
from baselines.checkpoint import save_weights
from baselines.conditions import Conditions
from baselines.ldm_sr.loading import ema_names
from baselines.ldm_sr.unet import build_unet, convert_ldm_unet, official_shapes, to_ldm_unet
from baselines.method_config import AdamW
from baselines.registry import build, get, load_yaml
from baselines.seeding import seeded_generators
from cmsrd.errors import InputError

TINY = load_yaml(Path(__file__).parents[1] / "baselines" / "configs" / "ldm-sr-tiny.yaml")
UNET_PARAMS, VQ_PARAMS = 113_622_563, 55_322_782
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def x16():
    torch.manual_seed(0)
    return build("ldm-sr", 16, TINY).eval()


def _lr(n: int, px: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(seed))


# ---- official geometry and key layouts --------------------------------------------------------------


@pytest.mark.parametrize("scale", [16, 32])
def test_official_geometry_parameter_counts_are_exact(scale):
    """As `cmsrd-bench list --json` counts them: the default config built on the meta device."""
    m = build("ldm-sr", scale, device="meta")
    assert m.parameter_counts() == (UNET_PARAMS + VQ_PARAMS, UNET_PARAMS)  # the VQ-f4 is frozen
    assert sum(p.numel() for p in m.net_g.parameters()) == UNET_PARAMS
    spec = get("ldm-sr")
    assert spec.scales == (16, 32) and spec.nfe == 100 and "MIT" in spec.license


def test_official_unet_keys_all_map_and_the_converter_names_foreign_ones():
    official = official_keys("ldm_sr_bsr_unet")
    with torch.device("meta"):
        unet = build_unet("bsr-sr")
    assert official_shapes(unet) == official
    converted = convert_ldm_unet({k: torch.empty(s, device="meta") for k, s in official.items()}, unet)
    ours = unet.state_dict()
    assert converted.keys() == ours.keys()
    assert all(converted[k].shape == ours[k].shape for k in ours)
    resshift = official_keys("resshift_unet_realsr_x4")
    with pytest.raises(ValueError, match="does not have") as err:
        convert_ldm_unet({k: torch.empty(s, device="meta") for k, s in resshift.items()}, unet)
    assert any(k in str(err.value) for k in set(resshift) - set(official))


def test_official_vq_f4_keys_map_under_the_lightning_prefix():
    official = official_keys("vq_f4")
    with torch.device("meta"):
        vq = build_vq_f4("vq-f4")
    state = {f"first_stage_model.{k}": torch.empty(s, device="meta") for k, s in official.items()}
    converted = convert_ldm_vq(state, "first_stage_model.")
    ours = vq.state_dict()
    assert converted.keys() == ours.keys() and all(converted[k].shape == ours[k].shape for k in ours)


def test_fused_qkv_split_per_head_reproduces_the_legacy_attention():
    """CompVis QKVAttentionLegacy on the fused weights == diffusers' attention on the converted ones."""
    torch.manual_seed(0)
    unet = build_unet("tiny").eval()
    attn = unet.mid_block.attentions[0]
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    official = to_ldm_unet(unet.state_dict(), unet)
    assert {k: tuple(v.shape) for k, v in official.items()} == official_shapes(unet)
    back = convert_ldm_unet(official, unet)
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
    x = torch.randn(2, 64, 4, 4)
    c, heads, ch = 64, 2, 32
    h = F.group_norm(x, 32, official["middle_block.1.norm.weight"], official["middle_block.1.norm.bias"], 1e-5)
    qkv = F.conv1d(h.reshape(2, c, -1), official["middle_block.1.qkv.weight"], official["middle_block.1.qkv.bias"])
    q, k, v = qkv.reshape(2 * heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / ch**0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(2, c, -1)
    out = F.conv1d(a, official["middle_block.1.proj_out.weight"], official["middle_block.1.proj_out.bias"])
    expected = x + out.reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)


# ---- the method at tiny geometry ------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "lr_px"), [(16, 16), (32, 8)])
def test_exact_output_shapes(scale, lr_px):
    torch.manual_seed(0)
    m = build("ldm-sr", scale, TINY).eval()
    out = m.super_resolve({"lr": _lr(1, lr_px)}, Conditions(steps=1), seeded_generators(0, [0]))
    assert out.shape == (1, 3, 256, 256) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert m.nfe(Conditions()) == 2 and m.nfe(Conditions(steps=7)) == 7


def test_per_image_seeding_batch_1_equals_batch_3(x16):
    lr = _lr(3, 4)
    batch = x16.super_resolve({"lr": lr}, Conditions(), seeded_generators(7, [0, 1, 2]))
    alone = torch.cat(
        [x16.super_resolve({"lr": lr[i : i + 1]}, Conditions(), seeded_generators(7, [i])) for i in range(3)]
    )
    assert batch.shape == (3, 3, 64, 64)
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=0)  # float rounding of batched convolutions only
    other = x16.super_resolve({"lr": lr}, Conditions(), seeded_generators(8, [0, 1, 2]))
    assert (other - batch).abs().max() > 1e-3  # eta 1: the seed matters


def test_lr_start_runs_only_the_remaining_steps(x16):
    cond = Conditions(steps=10, start_t=400)
    assert x16.nfe(cond) == 4  # trailing DDIM grid 999, 899, ..., 99: 399, 299, 199, 99 remain
    out = x16.super_resolve({"lr": _lr(1, 4)}, cond, seeded_generators(0, [0]))
    assert out.shape == (1, 3, 64, 64)


def test_lr_off_the_latent_grid_is_one_input_error(x16):
    with pytest.raises(InputError, match="multiples of 2 px"):
        x16.super_resolve({"lr": torch.rand(1, 3, 5, 5)}, Conditions())


def test_training_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = build("ldm-sr", 16, TINY).train()
    opts = m.configure_optimizers(m.settings.train.__class__(optimizer=AdamW(lr=2e-3, weight_decay=0.0)))
    frozen = m.autoencoder.encoder.conv_in.weight.clone()
    batch, ctx, losses = hr_lr_batch(2), train_context(opts), []
    for _ in range(8):
        torch.manual_seed(123)  # same timesteps and noise every time: a fixed objective
        losses.append(m.training_step(batch, ctx)["l_eps"])
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert torch.equal(m.autoencoder.encoder.conv_in.weight, frozen) and not m.autoencoder.training


def test_default_optimizer_is_the_official_adamw():
    m = build("ldm-sr", 16, TINY)
    opt = m.configure_optimizers(m.settings.train)["main"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 6.4e-5
    assert all(not p.requires_grad for p in m.autoencoder.parameters())


# ---- checkpoints --------------------------------------------------------------------------------------


def _sr(m, seed: int = 0) -> torch.Tensor:
    return m.super_resolve({"lr": _lr(1, 4)}, Conditions(), seeded_generators(seed, [0]))


def test_our_checkpoint_round_trips_and_refuses_another_scale(x16, tmp_path):
    path = save_weights(tmp_path / "model.safetensors", x16.trainable_state_dict(), x16.export_metadata())
    torch.manual_seed(1)
    m = build("ldm-sr", 16, {**TINY, "checkpoint": str(path)}).eval()
    m.autoencoder.load_state_dict(x16.autoencoder.state_dict())
    assert m.loaded_from == path
    torch.testing.assert_close(_sr(m), _sr(x16), atol=0, rtol=0)
    with pytest.raises(InputError, match=rf"{path.name}.*trained at x16.*--scale 16"):
        build("ldm-sr", 32, {**TINY, "checkpoint": str(path)})


def test_compvis_lightning_checkpoint_loads_ema_unet_and_first_stage(x16, tmp_path):
    torch.manual_seed(2)
    other = build("ldm-sr", 16, TINY)
    raw = {f"model.diffusion_model.{k}": v for k, v in to_ldm_unet(other.net_g.state_dict(), other.net_g).items()}
    ema_by_name = {v: k for k, v in ema_names(x16).items()}
    ema = {ema_by_name[k]: v for k, v in to_ldm_unet(x16.net_g.state_dict(), x16.net_g).items()}
    vq = {f"first_stage_model.{k}": v for k, v in _official_layout_vq(x16.autoencoder).items()}
    extra = {
        "betas": torch.zeros(1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1),
    }
    torch.save({"state_dict": {**raw, **ema, **vq, **extra}, "global_step": 5}, tmp_path / "model.ckpt")
    m = build("ldm-sr", 16, {**TINY, "checkpoint": str(tmp_path / "model.ckpt")}).eval()
    torch.testing.assert_close(_sr(m), _sr(x16), atol=0, rtol=0)  # the EMA UNet and the file's VQ-f4
    raw_only = build("ldm-sr", 16, {**TINY, "checkpoint": str(tmp_path / "model.ckpt"), "ema_weights": False})
    assert all(
        torch.equal(a, b) for a, b in zip(raw_only.net_g.state_dict().values(), other.net_g.state_dict().values())
    )


def _official_layout_vq(vq) -> dict[str, torch.Tensor]:
    """The tiny VQ's tensors under the CompVis names (the converter's inverse, from the official key list)."""
    names = list(official_keys("vq_f4"))
    rename = dict(zip(names, convert_ldm_vq({k: torch.zeros(1) for k in names})))
    ours = vq.state_dict()
    conv = ("q", "k", "v", "proj_out")
    return {
        old: ours[new][:, :, None, None] if old.split(".")[-2] in conv and ours[new].ndim == 2 else ours[new]
        for old, new in rename.items()
    }


def test_diffusers_pipeline_folder_loads_unet_and_vqvae(x16, tmp_path):
    x16.net_g.save_pretrained(tmp_path / "pipe" / "unet")
    x16.autoencoder.save_pretrained(tmp_path / "pipe" / "vqvae")
    torch.manual_seed(5)
    m = build("ldm-sr", 16, {**TINY, "checkpoint": str(tmp_path / "pipe")}).eval()
    torch.testing.assert_close(_sr(m), _sr(x16), atol=0, rtol=0)
    assert m.autoencoder_source.endswith("diffusion_pytorch_model.safetensors")


def test_bad_checkpoints_are_one_clear_error(x16, tmp_path):
    m = build("ldm-sr", 16, TINY)
    # another layout: a ResShift UNet under the Lightning prefix, named by its foreign tensors
    foreign = {f"model.diffusion_model.{k}": torch.zeros(1) for k in official_keys("resshift_unet_realsr_x4")}
    torch.save({"state_dict": foreign}, tmp_path / "resshift.ckpt")
    with pytest.raises(InputError, match=r"resshift\.ckpt.*not the CompVis LDM-SR.*does not have"):
        m.load_checkpoint(tmp_path / "resshift.ckpt")
    torch.save({"conv_first.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "esrgan.pth")
    with pytest.raises(InputError, match=r"esrgan\.pth.*another architecture"):
        m.load_checkpoint(tmp_path / "esrgan.pth")
    torch.save(_official_layout_vq(m.autoencoder), tmp_path / "vq.pth")
    with pytest.raises(InputError, match="VQ autoencoder.*autoencoder.weights"):
        m.load_checkpoint(tmp_path / "vq.pth")
    good = save_weights(tmp_path / "ok.safetensors", x16.trainable_state_dict(), x16.export_metadata())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.safetensors.*(truncated|not a readable)"):
        m.load_checkpoint(cut)
    torch.save({"state_dict": {}, "hook": print}, tmp_path / "code.ckpt")
    with pytest.raises(InputError, match=r"code\.ckpt.*not weights-only"):
        m.load_checkpoint(tmp_path / "code.ckpt")
    other = build("ldm-sr", 16, {**TINY, "schedule": {"beta_start": 0.00085, "beta_end": 0.012}})
    with pytest.raises(InputError, match="schedule"):
        other.load_checkpoint(good)
    with pytest.raises(InputError, match="holds no UNet weights"):
        m.load_checkpoint(tmp_path)


def test_shared_trainer_trains_exports_and_reloads(tiny_dataset, tmp_path):
    from benchmark.train import train

    cfg = {**TINY, "train": {**TINY["train"], "val_every": 2, "save_every": 2, "ema_decay": 0.9}}
    res = train("ldm-sr", tiny_dataset, tmp_path / "run", config=cfg, progress=False)
    assert res["step"] == 2 and np.isfinite(res["val"]["psnr_y"])
    m = build("ldm-sr", 16, {**TINY, "checkpoint": str(tmp_path / "run" / "model.safetensors")})
    assert m.loaded_from is not None


@pytest.mark.parametrize("extra", [None, "ldm-sr-tiny.yaml"])
def test_shipped_configs_parse_and_pass_the_train_key_check(extra):
    from baselines.ldm_sr.model import LDMSR
    from baselines.registry import CONFIG_DIR, merge_config
    from benchmark.train import check_train_keys

    cfg = get("ldm-sr").default_config()
    if extra:
        cfg = merge_config(cfg, load_yaml(CONFIG_DIR / extra))
    check_train_keys(cfg["train"], LDMSR, "ldm-sr")
    assert LDMSR.train_keys == frozenset({"optimizer"})
    with pytest.raises(InputError, match="sampler.etta"):
        build("ldm-sr", 16, {**TINY, "sampler": {"etta": 0.5}})


def test_ddim_at_eta_1_keeps_an_exact_eps_on_x0_and_draws_per_image_noise():
    from baselines.diffusion import make_scheduler, sample_latents

    schedule = {"beta_start": 0.0015, "beta_end": 0.0155}
    ac = make_scheduler("ddim", 10, schedule).alphas_cumprod
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def exact(z, t):
        a = ac[t].view(-1, 1, 1, 1)
        return (z - a.sqrt() * x0[: z.shape[0]]) / (1 - a).sqrt()

    z, nfe = sample_latents(
        exact, x0.shape, sampler="ddim", steps=10, schedule=schedule, eta=1.0, generator=seeded_generators(0, [0, 1])
    )
    assert nfe == 10
    torch.testing.assert_close(z, x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="ddim only"):
        sample_latents(exact, x0.shape, sampler="ddpm", steps=2, eta=1.0)


def test_ddim_ldm_is_the_compvis_ddim_sampler_at_eta_1():
    """The CompVis DDIMSampler loop (uniform grid + 1, alphas_prev from the grid, alpha-bar_0 last, sigma from
    eta), written out here with the same noise stream, against the shared sampler's `ddim-ldm`."""
    from baselines.diffusion import make_scheduler, sample_latents
    from baselines.seeding import randn

    schedule = {"beta_start": 0.0015, "beta_end": 0.0155}
    sched = make_scheduler("ddim-ldm", 10, schedule)
    assert sched.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ac = sched.alphas_cumprod.double()
    betas = torch.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(ac, torch.cumprod(1 - betas, 0), atol=1e-6, rtol=0)  # official make_beta_schedule

    def eps_fn(z, t):
        return 0.3 * z + t.view(-1, 1, 1, 1).float() / 1000

    shape = (1, 3, 4, 4)
    z, _ = sample_latents(
        eps_fn, shape, sampler="ddim-ldm", steps=10, schedule=schedule, eta=1.0, generator=seeded_generators(5, [0])
    )
    gen = seeded_generators(5, [0])
    grid = list(range(0, 1000, 100))
    steps = [g + 1 for g in grid]
    a = ac[steps]
    a_prev = torch.cat([ac[:1], ac[steps[:-1]]])
    x = randn(shape, gen, "cpu").double()
    for i in reversed(range(len(steps))):
        e = eps_fn(x.float(), torch.tensor([steps[i]])).double()
        sigma = ((1 - a_prev[i]) / (1 - a[i]) * (1 - a[i] / a_prev[i])).sqrt()
        x0 = (x - (1 - a[i]).sqrt() * e) / a[i].sqrt()
        x = a_prev[i].sqrt() * x0 + (1 - a_prev[i] - sigma**2).sqrt() * e + sigma * randn(shape, gen, "cpu").double()
    torch.testing.assert_close(z.double(), x, atol=1e-4, rtol=1e-4)


def test_a_failing_second_part_leaves_the_method_as_it_was(x16, tmp_path):
    x16.net_g.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "vqvae").mkdir()
    torch.save(
        {"conv_first.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "pipe" / "vqvae" / "diffusion_pytorch_model.bin"
    )
    torch.manual_seed(9)
    m = build("ldm-sr", 16, TINY)
    before = {k: v.clone() for k, v in m.net_g.state_dict().items()}
    with pytest.raises(InputError, match="vqvae"):
        m.load_checkpoint(tmp_path / "pipe")
    assert all(torch.equal(before[k], v) for k, v in m.net_g.state_dict().items()) and m.loaded_from is None
