"""`ldm` (SGDM's SRLDM) at tiny geometries: parameter count at SD2.1-base, conv_in widening, shapes at x16 and
x32, training, per-image seeding, checkpoint round trip through the shared trainer, and the SRLDM checkpoint
converter against the official key layout shipped in tests/data/official_keys/srldm.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import map_batch, train_context, two_step_train
from safetensors.torch import save_file
from test_sgdm_convert import text_to_open_clip, unet_to_ldm, vae_to_ldm

from baselines import registry
from baselines.conditions import Conditions
from baselines.ldm.loading import convert_official_unet
from baselines.ldm.model import widen_conv_in
from baselines.method_config import train_config
from baselines.seeding import seeded_generators
from cmsrd.errors import InputError

KEYS = Path(__file__).parent / "data" / "official_keys" / "srldm.json"
TINY = {"network": {"backbone": {"pretrained": None, "geometry": "tiny"}}, "sampler": {"steps": 3}}
SD = {"network": {"backbone": {"pretrained": None, "geometry": "sd21-base"}}}
# two resnets per level and SD2.1's width changes: SD2.1's ldm key names at tiny widths (as in test_sgdm_convert)
LPB2_NET = {
    "backbone": {
        "pretrained": None,
        "geometry": "tiny",
        "overrides": {"unet": {"layers_per_block": 2, "block_out_channels": [32, 64, 128, 128]}},
    }
}
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*non-meta parameter.*:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def srldm_keys() -> dict[str, list[int]]:
    return json.loads(KEYS.read_text())["srldm_unet"]


def build(scale: int, config: dict, device: str = "cpu"):
    return registry.build("ldm", scale, config, device=device)


def _fake_state(shapes: dict) -> dict[str, torch.Tensor]:
    """Zero views of one shared scalar: an SD2.1-size checkpoint of a few bytes."""
    zero = torch.zeros(())
    return {k: zero.expand(s) for k, s in shapes.items()}


def test_list_json_shows_the_whole_8_channel_unet_as_trainable_at_sd21_base():
    """`cmsrd-bench list --json` (its default-config count, meta device) with the spec's NFE, scales and licence."""
    from baselines.cli import method_rows, parameter_counts

    total, trainable = parameter_counts("ldm", 16)
    assert trainable == 865_922_244 == 865_910_724 + 320 * 4 * 3 * 3  # SD2.1-base UNet + 4 conv_in channels
    assert total - trainable == 83_653_863 + 340_387_840  # the frozen VAE and 23-layer text tower
    row = next(r for r in method_rows(with_params=False) if r["name"] == "ldm")
    assert row["nfe"] == 50 and row["scales"] == [16, 32] and row["inputs"] == ["sr", "map"]
    assert "no LICENSE" in row["license"] and "Open RAIL++-M" in row["license"]


def test_widening_keeps_the_sd_weights_and_zeroes_the_lr_channels():
    from diffusers import UNet2DConditionModel

    from baselines.sgdm.backbone import TINY_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    z, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([10, 500])
    before = unet(z, t, encoder_hidden_states=ctx).sample
    old = unet.conv_in.weight.detach().clone()
    widen_conv_in(unet)
    w = unet.conv_in.weight
    assert w.shape[1] == 8 and torch.equal(w[:, :4], old) and not w[:, 4:].any() and w.requires_grad
    after = unet(torch.cat([z, torch.randn(2, 4, 8, 8)], 1), t, encoder_hidden_states=ctx).sample
    assert torch.allclose(before, after, atol=1e-6)  # the LR latent enters only once training moves its weights


def test_backbone_from_an_sd21_diffusers_folder_is_widened(tmp_path):
    """`pretrained` = an SD2.1 diffusers folder (4-channel conv_in): loaded as is, then widened with zeros."""
    from baselines.sgdm.backbone import random_backbone

    torch.manual_seed(1)
    bb = random_backbone("tiny")
    for name, part in (
        ("unet", bb.unet),
        ("vae", bb.vae),
        ("text_encoder", bb.text_encoder),
        ("tokenizer", bb.tokenizer),
    ):
        part.save_pretrained(str(tmp_path / name))
    m = build(16, {**TINY, "network": {"backbone": {"pretrained": str(tmp_path), "geometry": "tiny"}}})
    w = m.unet.conv_in.weight
    assert torch.equal(w[:, :4], bb.unet.conv_in.weight) and not w[:, 4:].any()
    assert torch.equal(m.unet.conv_out.weight, bb.unet.conv_out.weight)
    assert all(p.requires_grad for p in m.unet.parameters())
    assert not any(p.requires_grad for p in (*m.vae.parameters(), *m.text_encoder.parameters()))


@pytest.mark.parametrize("scale,lr", [(16, 16), (32, 8)])
def test_exact_shapes_nfe_and_lr_start(scale, lr):
    torch.manual_seed(0)
    m = build(scale, TINY).eval()
    b = map_batch(1, 256, lr)
    b.pop("hr")
    calls = []
    h = m.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = m.super_resolve(b, Conditions(), torch.Generator().manual_seed(0))
        assert out.shape == (1, 3, 256, 256) and 0 <= out.min() and out.max() <= 1
        assert len(calls) == m.nfe(Conditions()) == 3
        calls.clear()
        cond = Conditions(steps=10, start_t=400)
        out2 = m.super_resolve(b, cond, torch.Generator().manual_seed(0))
        assert out2.shape == (1, 3, 256, 256) and len(calls) == m.nfe(cond) == 4  # 333, 222, 111, 0
    finally:
        h.remove()
    assert build(scale, SD, device="meta").nfe(Conditions()) == 50  # the official 50-step DDPM by default


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = build(16, TINY).train()
    opts = m.configure_optimizers(train_config(m.settings.train, lr=2e-3))
    assert isinstance(opts["main"], torch.optim.AdamW) and opts["main"].defaults["weight_decay"] == 0.01
    assert sum(p.numel() for g in opts["main"].param_groups for p in g["params"]) == m.parameter_counts()[1]
    assert m.parameter_counts()[1] == sum(p.numel() for p in m.unet.parameters())
    frozen = m.vae.encoder.conv_in.weight.clone()
    batch, ctx = map_batch(1, 64, 4), train_context(opts)
    losses = []
    for _ in range(5):
        torch.manual_seed(123)  # same t, noise and posterior sample every step: a fixed objective
        losses.append(m.training_step(batch, ctx)["l_eps"])
    assert all(np.isfinite(losses)) and losses[-1] < 0.85 * losses[0], losses
    assert torch.equal(m.vae.encoder.conv_in.weight, frozen)
    assert m.unet.conv_in.weight[:, 4:].abs().sum() > 0  # the LR-latent channels learn


def test_default_optimizer_is_official():
    m = build(32, TINY)
    opt = m.configure_optimizers(train_config(m.settings.train))["main"]
    assert opt.defaults["lr"] == 1e-5
    cfg = registry.get("ldm").default_config()
    assert cfg["train"]["lr"] == 1e-5 and cfg["train"]["keep_best"] == "lpips" and cfg["sampler"]["steps"] == 50


def test_per_image_seeding_gives_the_same_sr_at_batch_1_and_3():
    torch.manual_seed(0)
    m = build(16, TINY).eval()
    # let the LR latent matter: random weights on the channels widening set to zero
    with torch.no_grad():
        m.unet.conv_in.weight[:, 4:].normal_(0, 0.1)
    b = map_batch(3, 64, 4)
    b.pop("hr")
    cond = Conditions(steps=2)
    joint = m.super_resolve(b, cond, seeded_generators(7, [0, 1, 2]))
    alone = [
        m.super_resolve({k: v[i : i + 1] for k, v in b.items()}, cond, seeded_generators(7, [i])) for i in range(3)
    ]
    assert torch.allclose(joint, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])


def test_shipped_configs_pass_the_train_key_check():
    from benchmark.train import check_train_keys

    method = build(32, TINY, device="meta")
    for overlay in ("ldm-tiny.yaml", None):
        cfg = registry.get("ldm").default_config()
        if overlay:
            cfg = registry.merge_config(cfg, registry.load_yaml(registry.CONFIG_DIR / overlay))
        check_train_keys(cfg["train"], method)
    with pytest.raises(InputError, match="train.gradient_checkpoint.*did you mean `?gradient_checkpointing"):
        check_train_keys({"gradient_checkpoint": True}, method)


def test_shared_trainer_checkpoint_round_trips(tiny_dataset, tmp_path, caplog):
    """`cmsrd-bench train --method ldm` through benchmark.train, then the export loads back bit-identically."""
    from baselines.checkpoint import read_metadata
    from benchmark.train import train

    cfg = {
        **TINY,
        "train": two_step_train(lr=1e-3),
    }
    res = train("ldm", tiny_dataset, tmp_path / "run", config=cfg, progress=False)
    assert res["step"] == 2 and np.isfinite(res["val"]["psnr_y"])
    path = tmp_path / "run" / "model.safetensors"
    meta = read_metadata(path)
    assert meta["method"] == "ldm" and meta["network"]["backbone"]["geometry"] == "tiny"
    torch.manual_seed(99)  # another random init underneath: everything trained must come from the file
    m = build(16, {**TINY, "checkpoint": str(path)}).eval()
    assert m.loaded_from == path
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert set(saved) == {f"unet.{k}" for k in m.unet.state_dict()}
    assert all(torch.equal(v, saved[f"unet.{k}"]) for k, v in m.unet.state_dict().items())
    # VAE and text tower come from the backbone source (here random init: the same seed gives the same ones)
    b = map_batch(1, 64, 4)
    b.pop("hr")
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        loaded = build(16, {**TINY, "checkpoint": str(path)}).eval()
        outs.append(loaded.super_resolve(b, Conditions(steps=2), torch.Generator().manual_seed(5)))
    o1, o2 = outs
    assert torch.equal(o1, o2)
    with caplog.at_level("WARNING", logger="baselines.ldm"):
        build(32, {**TINY, "checkpoint": str(path)})
    assert "trained at x16, used here at x32" in caplog.text  # same network: allowed, but said
    # the run folder benchmarks as is (`--weights ldm=RUN`: the recorded geometry), with steps= and start=lr@t
    import pandas as pd
    from click.testing import CliRunner

    from benchmark.cli import cli

    args = ["run", "--data", str(tiny_dataset), "--methods", "ldm", "--weights", f"ldm={tmp_path / 'run'}"]
    args += ["--conditions", "steps=4;start=lr@400", "--metrics", "psnr_y", "--device", "cpu", "--limit", "2"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "bench")])
    assert res.exit_code == 0, res.output
    board = pd.read_csv(tmp_path / "bench" / "leaderboard.csv")
    assert list(board.status) == ["ok", "ok"] and board.psnr_y.notna().all()
    assert sorted(board.nfe) == [4, 20]  # steps=4; start=lr@400 keeps the 20 of the default 50 steps below 400


# ---- the SGDM repo's SRLDM Lightning checkpoints -------------------------------------------------------------


def test_converter_maps_every_key_of_the_srldm_layout(srldm_keys):
    from diffusers import UNet2DConditionModel

    from baselines.sgdm.backbone import SD21_UNET

    assert len(srldm_keys) == 686 and srldm_keys["model.diffusion_model.input_blocks.0.0.weight"] == [320, 8, 3, 3]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**SD21_UNET, "in_channels": 8})
    converted = convert_official_unet(_fake_state(srldm_keys), unet, Path("SRLDM.ckpt"))
    assert set(converted) == set(unet.state_dict())
    assert tuple(converted["conv_in.weight"].shape) == (320, 8, 3, 3)


def test_lightning_file_loads_into_the_method(srldm_keys, tmp_path):
    """A Lightning file with the SRLDM UNet, the DDPM buffers and the validation LPIPS net (skipped on purpose)."""
    state = _fake_state(srldm_keys)
    state.update({"betas": torch.zeros(1000), "lpips_metric.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)})
    path = tmp_path / "SRLDM.ckpt"
    torch.save({"state_dict": state, "global_step": 199999, "epoch": 3}, path)
    m = build(32, SD, device="meta")
    m.load_checkpoint(path)
    assert m.loaded_from == path


def _raises_naming(path: Path, *patterns: str):
    return pytest.raises(InputError, match=r"(?s)" + str(path).replace(".", r"\.") + ".*" + ".*".join(patterns))


def test_wrong_layouts_are_one_error_naming_file_keys_and_fix(srldm_keys, tmp_path):
    m = build(32, SD, device="meta")
    # keys renamed or missing: the differing keys are named, in the file's own names
    shapes = dict(srldm_keys)
    shapes.pop("model.diffusion_model.output_blocks.2.1.conv.weight")
    shapes["model.diffusion_model.input_blocks.1.7.weight"] = [320]
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": _fake_state(shapes)}, bad)
    with _raises_naming(bad, "input_blocks.1.7.weight", "missing.*up_blocks.0.upsamplers.0.conv.weight", "SRLDM"):
        m.load_checkpoint(bad)
    # a plain SD2.1 UNet (4-channel conv_in) given as checkpoint: the widening rule is the fix
    sd = tmp_path / "v2-1_512-ema-pruned.ckpt"
    torch.save(
        {"state_dict": _fake_state({**srldm_keys, "model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3]})}, sd
    )
    with _raises_naming(sd, "4-channel conv_in", "network.backbone.pretrained"):
        m.load_checkpoint(sd)
    # an SGDM checkpoint (adapter tensors)
    sgdm = tmp_path / "SGDM-syn.ckpt"
    torch.save({"state_dict": {**_fake_state(srldm_keys), "adapter.conv_in.weight": torch.zeros(1)}}, sgdm)
    with _raises_naming(sgdm, "SGDM checkpoint", "sgdm"):
        m.load_checkpoint(sgdm)
    # given as `checkpoint:` the same errors come at build, before any backbone is built
    with _raises_naming(sgdm, "SGDM checkpoint"):
        build(32, {**TINY, "checkpoint": str(sgdm)})


def test_our_exports_of_other_methods_or_geometries_are_refused(tmp_path):
    sgdm = registry.build("sgdm", 32, {**TINY, "network": {**TINY["network"], "cond_channels": 64}})
    path = tmp_path / "sgdm.safetensors"
    save_file({k: v.contiguous() for k, v in sgdm.trainable_state_dict().items()}, str(path))
    with _raises_naming(path, "SGDM checkpoint"):
        build(32, TINY).load_checkpoint(path)
    m = build(32, TINY)
    state = {k: v.contiguous() for k, v in m.trainable_state_dict().items()}
    state["unet.conv_out.weight"] = torch.zeros(4, 64, 3, 3)
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong))
    with _raises_naming(wrong, "conv_out.weight", "network"):
        m.load_checkpoint(wrong)


def test_truncated_files_and_pickled_code_are_one_clear_error(srldm_keys, tmp_path):
    from test_sgdm_convert import _Payload

    m = build(32, TINY)
    good = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.trainable_state_dict().items()}, str(good))
    ckpt = tmp_path / "SRLDM.ckpt"
    torch.save({"state_dict": {k: torch.zeros(s) for k, s in list(srldm_keys.items())[:50]}}, ckpt)
    for src in (good, ckpt):
        cut = tmp_path / f"cut{src.suffix}"
        cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        with _raises_naming(cut, "(truncated|cannot be read|damaged|not a readable)"):
            m.load_checkpoint(cut)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _fake_state(srldm_keys), "callbacks": {"x": _Payload(marker)}}, evil)
    with _raises_naming(evil, "system.*refusing"):
        m.load_checkpoint(evil)
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_srldm(srldm_keys, tmp_path_factory):
    """(source method, SRLDM.ckpt with UNet + VAE + OpenCLIP text tower in the original layout, tokenizer)."""
    torch.manual_seed(3)
    src = build(32, {"network": LPB2_NET, "sampler": {"steps": 2}})
    with torch.no_grad():
        src.unet.conv_in.weight[:, 4:].normal_(0, 0.1)  # a trained SRLDM uses its LR channels
    state = unet_to_ldm(src.unet, list(srldm_keys))
    state.update(vae_to_ldm(src.vae))
    state.update(text_to_open_clip(src.text_encoder))
    state["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    folder = tmp_path_factory.mktemp("srldm")
    src.tokenizer.save_pretrained(str(folder / "tokenizer"))
    torch.save({"state_dict": state, "global_step": 199999}, folder / "SRLDM.ckpt")
    return src, folder / "SRLDM.ckpt", folder / "tokenizer"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_whole_srldm_file_builds_the_backbone_and_samples_as_the_source(tiny_srldm):
    src, ckpt, tok = tiny_srldm
    net = {
        "backbone": {
            **LPB2_NET["backbone"],
            "pretrained": "stabilityai/stable-diffusion-2-1-base",
            "tokenizer": str(tok),
        }
    }
    m = build(32, {"network": net, "sampler": {"steps": 2}, "checkpoint": str(ckpt)})
    assert m.loaded_from == ckpt and m.backbone_source == f"official:{ckpt}"
    assert _same(m.unet, src.unet) and _same(m.vae, src.vae) and _same(m.text_encoder, src.text_encoder)
    b = map_batch(1, 64, 2)
    b.pop("hr")
    cond = Conditions(steps=2)
    a = src.eval().super_resolve(b, cond, torch.Generator().manual_seed(1))
    assert torch.allclose(m.eval().super_resolve(b, cond, torch.Generator().manual_seed(1)), a, atol=1e-5)
    # the same file over an already built model (load_checkpoint): UNet, VAE and text tower replaced
    other = build(32, {"network": {**LPB2_NET, "backbone": {**LPB2_NET["backbone"], "tokenizer": str(tok)}}})
    other.load_checkpoint(ckpt)
    assert _same(other.unet, src.unet) and _same(other.vae, src.vae) and _same(other.text_encoder, src.text_encoder)


def test_misspelt_config_keys_are_refused_with_the_close_match():
    """The typed config (`LDMConfig`, SGDM's backbone and sampler blocks) refuses an unknown key at any level,
    naming the closest valid one, before anything is built."""
    for override, message in (
        ({"network": {"backbone": {"geometri": "tiny"}}}, r"^network.backbone.geometri: unknown key .*`geometry`"),
        ({"sampler": {"step": 3}}, r"^sampler.step: unknown key \(did you mean `steps`\?\)"),
        ({"sampelr": {"steps": 3}}, r"^sampelr: is not a key of the ldm config \(did you mean `sampler`\?\)"),
        ({"train": {"weight_decy": 0.0}}, r"^train.weight_decy: .*\(did you mean `weight_decay`\?\)"),
    ):
        with pytest.raises(InputError, match=message):
            build(16, registry.merge_config(TINY, override), device="meta")
    m = build(16, registry.merge_config(TINY, {"train": {"weight_decay": 0.0}}), device="meta")
    assert (m.sampler_name, m.default_steps, m.settings.train.weight_decay, m.settings.train.lr) == (
        "ddpm",
        3,
        0.0,
        1e-5,
    )
