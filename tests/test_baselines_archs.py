"""Architectures: exact x16/x32 shapes, parameter counts at the authors' geometry, numerical
agreement with the reference implementations spandrel ships (official key layouts), losses."""

from __future__ import annotations

import pytest
import torch

from baselines.archs.discriminator import VGGStyleDiscriminator
from baselines.archs.rrdbnet import RRDBNet, convert_old_esrgan_keys
from baselines.archs.swinir import SwinIR, official_img_size, official_state_dict, strip_derived_buffers
from baselines.losses import RelativisticGANLoss

TINY_RRDB = dict(num_feat=8, num_block=2, num_grow_ch=4)
TINY_SWIN = dict(
    embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=8, num_feat=64, img_size=16
)  # official code fixes num_feat at 64


def to_old_esrgan_layout(state: dict[str, torch.Tensor], n_up: int) -> dict[str, torch.Tensor]:
    """BasicSR keys -> the original ESRGAN flat-Sequential keys (written independently of the loader)."""
    nb = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if p[0] == "body":
            out[f"model.1.sub.{p[1]}.{p[2].upper()}.{p[3]}.0.{p[4]}"] = v
        elif p[0] == "conv_first":
            out[f"model.0.{p[1]}"] = v
        elif p[0] == "conv_body":
            out[f"model.1.sub.{nb}.{p[1]}"] = v
        elif p[0].startswith("conv_up"):
            out[f"model.{3 * int(p[0][7:])}.{p[1]}"] = v
        elif p[0] == "conv_hr":
            out[f"model.{3 * n_up + 2}.{p[1]}"] = v
        elif p[0] == "conv_last":
            out[f"model.{3 * n_up + 4}.{p[1]}"] = v
    return out


@pytest.mark.parametrize("scale,lr_px,stages", [(16, 16, 4), (32, 8, 5)])
def test_rrdbnet_exact_shapes_and_stages(scale, lr_px, stages):
    net = RRDBNet(scale=scale, **TINY_RRDB).eval()
    assert net.num_up == stages
    assert sum(1 for n, _ in net.named_children() if n.startswith("conv_up")) == stages
    with torch.no_grad():
        assert net(torch.rand(2, 3, lr_px, lr_px)).shape == (2, 3, 256, 256)
        assert net(torch.rand(1, 3, 5, 7)).shape == (1, 3, 5 * scale, 7 * scale)


def test_rrdbnet_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        RRDBNet(scale=12, **TINY_RRDB)


def test_parameter_counts_at_authors_geometry():
    with torch.device("meta"):
        counts = {s: sum(p.numel() for p in RRDBNet(scale=s).parameters()) for s in (4, 16, 32)}
        swin = {s: sum(p.numel() for p in SwinIR(upscale=s).parameters()) for s in (4, 16, 32)}
    # nf64/nb23/gc32 at x4 = 16,697,987; each extra x2 stage is one 64->64 3x3 conv (36,928)
    assert counts == {4: 16_697_987, 16: 16_771_843, 32: 16_808_771}
    # SwinIR-M (classical) x4 = 11.9 M; each extra pixel-shuffle stage adds conv 64->256 (147,712)
    assert swin[4] == 11_900_199
    assert swin[16] - swin[4] == 2 * 147_712 and swin[32] - swin[16] == 147_712


def test_rrdbnet_matches_original_esrgan_layout_via_spandrel():
    spandrel = pytest.importorskip("spandrel")
    torch.manual_seed(0)
    net = RRDBNet(scale=16, num_feat=8, num_block=2, num_grow_ch=32).eval()  # spandrel assumes gc 32
    old = to_old_esrgan_layout(net.state_dict(), n_up=4)
    assert convert_old_esrgan_keys(old).keys() == net.state_dict().keys()
    desc = spandrel.ModelLoader().load_from_state_dict(old)
    desc.model.eval()
    assert desc.architecture.name == "ESRGAN" and desc.scale == 16
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), desc.model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale,lr_px", [(16, 16), (32, 8)])
def test_swinir_shapes_and_matches_official_implementation(scale, lr_px):
    spandrel = pytest.importorskip("spandrel")
    torch.manual_seed(0)
    net = SwinIR(upscale=scale, **TINY_SWIN).eval()
    desc = spandrel.ModelLoader().load_from_state_dict(official_state_dict(net))
    ref = desc.model.eval()
    assert desc.architecture.name == "SwinIR" and desc.scale == scale
    with torch.no_grad():
        x = torch.rand(2, 3, lr_px, lr_px)
        out = net(x)
        assert out.shape == (2, 3, 256, 256)
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
        # not a window multiple: padded, then cropped to exactly scale x the input
        y = torch.rand(1, 3, lr_px + 3, lr_px + 5)
        out = net(y)
        assert out.shape == (1, 3, (lr_px + 3) * scale, (lr_px + 5) * scale)
        torch.testing.assert_close(out, ref(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("img_size", [8, 4])
def test_swinir_single_window_patch_matches_official_code(img_size):
    """x32 at 256 px HR trains on 8 px LR: one window, so the official blocks never shift (and a 4 px patch
    shrinks the window to 4). Weights and buffers come from the official code spandrel vendors."""
    pytest.importorskip("spandrel")
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR as OfficialSwinIR

    kw = dict(
        embed_dim=12,
        depths=(2, 2),
        num_heads=(2, 2),
        window_size=8,
        mlp_ratio=2.0,
        upsampler="pixelshuffle",
        resi_connection="1conv",
    )
    torch.manual_seed(0)
    official = OfficialSwinIR(upscale=32, in_chans=3, img_size=img_size, **kw).eval()
    with torch.no_grad():  # sharpen attention (a trained model is far from uniform) so a masked-out window shows
        for name, p in official.named_parameters():
            if "qkv.weight" in name:
                p.mul_(20)
            if "relative_position_bias_table" in name:
                p.normal_(0, 2)
    ours = SwinIR(upscale=32, img_size=img_size, **kw).eval()
    ours.load_state_dict(strip_derived_buffers(official.state_dict()), strict=True)
    assert [b.shift for layer in ours.layers for b in layer.residual_group.blocks] == [0, 0, 0, 0]
    assert {b.window for layer in ours.layers for b in layer.residual_group.blocks} == {img_size}
    with torch.no_grad():
        for size in ((8, 8), (5, 11)):
            x = torch.rand(1, 3, *size)
            torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-5)
    # the export is what the official code writes at this img_size: no attn_mask (no shifted block)
    exported, reference = official_state_dict(ours), official.state_dict()
    assert exported.keys() == reference.keys() and not any(k.endswith("attn_mask") for k in exported)
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    assert official_img_size(exported) == img_size


def test_official_img_size_reads_the_attn_mask():
    net = SwinIR(upscale=32, **TINY_SWIN)  # img_size 16 > window 8: odd blocks shifted, masks of 2 x 2 windows
    assert official_img_size(official_state_dict(net)) == 16
    assert official_img_size(net.state_dict()) is None  # our files keep no derived buffers: nothing to read


def test_swinir_single_window_input_x32():
    net = SwinIR(upscale=32, **{**TINY_SWIN, "window_size": 8}).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 8, 8)).shape == (1, 3, 256, 256)
        assert net(torch.rand(1, 3, 4, 4)).shape == (1, 3, 128, 128)  # smaller than a window


def test_discriminator_256_has_basicsr_layout():
    d = VGGStyleDiscriminator(num_feat=8, input_size=256)
    names = set(d.state_dict())
    assert {
        "conv0_0.weight",
        "conv0_0.bias",
        "conv5_1.weight",
        "bn5_1.running_mean",
        "linear1.weight",
        "linear2.bias",
    } <= names
    assert "conv0_1.bias" not in names  # strided convs have no bias (followed by BatchNorm)
    assert d.linear1.in_features == 8 * 8 * 4 * 4
    assert d(torch.rand(2, 3, 256, 256)).shape == (2, 1)
    with pytest.raises(ValueError, match="expects 256x256"):
        d(torch.rand(2, 3, 128, 128))


def test_relativistic_loss_direction():
    gan = RelativisticGANLoss(weight=1.0)
    real, fake = torch.full((4, 1), 3.0), torch.full((4, 1), -3.0)
    # D is rewarded when real looks more realistic than fake, G when the opposite holds
    assert gan.discriminator_loss(real, fake) < gan.discriminator_loss(fake, real)
    assert gan.generator_loss(real, fake) > gan.generator_loss(fake, real)
    assert RelativisticGANLoss(weight=5e-3).generator_loss(real, fake) == pytest.approx(
        5e-3 * gan.generator_loss(real, fake).item()
    )
    # G's loss reaches the generated logits (and only them: real logits are treated as constants)
    f = fake.clone().requires_grad_(True)
    r = real.clone().requires_grad_(True)
    gan.generator_loss(r, f).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0 and r.grad is None


def test_rrdbnet_global_skip_adds_the_bilinear_lr_and_no_parameters():
    plain = RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4)
    skip = RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4, global_skip=True)
    assert plain.state_dict().keys() == skip.state_dict().keys()  # ESRGAN checkpoints load either way
    skip.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 6, 6)
    up = torch.nn.functional.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(skip(x), plain(x) + up, atol=1e-6)
        torch.nn.init.zeros_(skip.conv_last.weight)
        torch.nn.init.zeros_(skip.conv_last.bias)
        assert torch.allclose(skip(x), up, atol=1e-6)  # a zero residual reproduces the LR's colours and layout
