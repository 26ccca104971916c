"""SGDM architecture: exact official parameter counts at SD2.1-base geometry (meta device, no weights),
encoder/adapter shapes, the six injection points, and the map-colour prompt rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.sgdm import build
from baselines.sgdm.adapter import FeatureInjector, SGDMAdapter, injection_modules
from baselines.sgdm.backbone import TINY_UNET, random_backbone, set_trainable
from baselines.sgdm.prompt import PromptEncoder, prompt_from_map, prompts_from_maps
from cmsrd.classes import BY_NAME

SD = {"network": {"backbone": {"pretrained": None, "geometry": "sd21-base"}}}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "name,scale,trainable,adapter",
    [
        ("sgdm+", 16, 148_127_904, 48_201_504),
        ("sgdm", 32, 152_913_408, 52_987_008),
        ("sgdm-nomap", 32, 149_682_944, 49_756_544),
    ],
)
def test_official_parameter_counts_at_sd21_geometry(name, scale, trainable, adapter):
    m = build(name, scale, device="meta")  # default config (SD2.1-base from the hub): meta needs no weights
    assert sum(p.numel() for p in m.unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in m.adapter.parameters()) == adapter
    assert m.parameter_counts()[1] == trainable
    # only attention projections of the UNet train; VAE, text encoder (and flows) are frozen
    names = [n for n, p in m.unet.named_parameters() if p.requires_grad]
    assert len(names) == 32 * 5  # 32 attention modules x (q, k, v, out weights + out bias)
    assert all(".attn1." in n or ".attn2." in n for n in names)
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert not any(p.requires_grad for p in m.text_encoder.parameters())
    assert sum(p.numel() for n, p in m.unet.named_parameters() if p.requires_grad) == 99_926_400


def test_sd21_text_encoder_is_the_penultimate_openclip_layer():
    bb = random_backbone("sd21-base", device="meta")
    assert bb.text_encoder.config.num_hidden_layers == 23 and bb.text_encoder.config.hidden_size == 1024
    assert bb.vae.config.scaling_factor == 0.18215 and bb.unet.config.cross_attention_dim == 1024


@pytest.mark.parametrize("variant", ["real", "simu", "simu_nomap"])
def test_adapter_feature_shapes_at_sd21_geometry(variant):
    with torch.device("meta"):
        a = SGDMAdapter(variant)
        x = torch.empty(2, 3, 256, 256)
        feats = a(x, x, style=x) if variant == "real" else a(x, x)
    assert [tuple(f.shape) for f in feats] == [(2, 320, 32, 32), (2, 640, 16, 16), (2, 1280, 8, 8)]


def test_real_encoder_style_paths():
    a = SGDMAdapter("real", channels=(32, 64, 64)).eval()
    g = torch.Generator().manual_seed(0)
    sr, ref, style = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1 for _ in range(3))
    with torch.no_grad():
        by_image = a(sr, ref, style=style)
        stats = a.merge_encoder.HR_Style_Encoder.stats(style)
        by_stats = a(sr, ref, style_stats=stats)
        other = a(sr, ref, style_stats=(stats[0] + 0.5, stats[1] * 2))
        enc = a.merge_encoder.HR_Style_Encoder(style)
    assert enc.shape == (2, 32, 8, 8) and enc.abs().max() < 1  # tanh output
    assert stats[0].shape == (2, 32, 1, 1)
    for f, g_ in zip(by_image, by_stats):
        assert torch.allclose(f, g_, atol=1e-6)
    assert not torch.allclose(by_image[0], other[0])
    with pytest.raises(ValueError, match="style"):
        a(sr, ref)


def test_synthetic_encoder_uses_map_and_nomap_ignores_it():
    torch.manual_seed(0)
    simu, nomap = SGDMAdapter("simu", (32, 64, 64), 48).eval(), SGDMAdapter("simu_nomap", (32, 64, 64), 48).eval()
    sr, ref1, ref2 = (torch.rand(1, 3, 32, 32) for _ in range(3))
    with torch.no_grad():
        assert not torch.allclose(simu(sr, ref1)[0], simu(sr, ref2)[0])
        assert torch.equal(nomap(sr, ref1)[0], nomap(sr, ref2)[0])


# ---- injection points ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**TINY_UNET).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 32, generator=g)


def test_injection_modules_are_the_official_six(tiny_unet):
    pairs = injection_modules(tiny_unet)
    u = tiny_unet
    assert [(m, i) for m, i in pairs] == [
        (u.down_blocks[0].attentions[0], 0),
        (u.down_blocks[1].attentions[0], 1),
        (u.down_blocks[2].attentions[0], 2),
        (u.up_blocks[1].attentions[0], 2),
        (u.up_blocks[2].attentions[0], 1),
        (u.up_blocks[3].attentions[0], 0),
    ]


def test_zero_features_equal_plain_unet_and_features_add_exactly_at_the_six_points(tiny_unet):
    z, t, ctx = _inputs()
    with torch.no_grad():
        plain = tiny_unet(z, t, encoder_hidden_states=ctx).sample
    pairs = injection_modules(tiny_unet)
    before: dict[int, torch.Tensor] = {}
    after: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, out, k=k: before.__setitem__(k, out[0].clone()))
        for k, (m, _) in enumerate(pairs)
    ]
    inj = FeatureInjector(tiny_unet)
    hooks += [
        m.register_forward_hook(lambda mod, a, out, k=k: after.__setitem__(k, out[0].clone()))
        for k, (m, _) in enumerate(pairs)
    ]
    try:
        zeros = [torch.zeros(1, 32, 8, 8), torch.zeros(1, 64, 4, 4), torch.zeros(1, 64, 2, 2)]
        with torch.no_grad(), inj.inject(zeros):
            out0 = tiny_unet(z, t, encoder_hidden_states=ctx).sample
        assert torch.equal(out0, plain)
        g = torch.Generator().manual_seed(2)
        feats = [torch.randn(f.shape, generator=g) for f in zeros]
        with torch.no_grad(), inj.inject(feats):
            out1 = tiny_unet(z, t, encoder_hidden_states=ctx).sample
        assert not torch.allclose(out1, plain)
        for k, (_, idx) in enumerate(pairs):
            assert torch.allclose(after[k] - before[k], feats[idx], atol=1e-5), k
        # outside `inject` the hooks are inert
        with torch.no_grad():
            assert torch.equal(tiny_unet(z, t, encoder_hidden_states=ctx).sample, plain)
    finally:
        inj.remove()
        for h in hooks:
            h.remove()


def test_deepest_feature_changes_only_what_depends_on_it(tiny_unet):
    """f2 enters at down level 2 and up level 1: levels 0-1 of the encoder must not change."""
    z, t, ctx = _inputs()
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        tiny_unet.down_blocks[i].register_forward_hook(
            lambda m, a, out, i=i: outs.__setitem__(f"down{i}", out[0].clone())
        )
        for i in range(4)
    ]
    inj = FeatureInjector(tiny_unet)
    try:
        with torch.no_grad():
            tiny_unet(z, t, encoder_hidden_states=ctx)
            ref = dict(outs)
            with inj.inject([None, None, torch.ones(1, 64, 2, 2)]):
                y = tiny_unet(z, t, encoder_hidden_states=ctx).sample
        assert torch.equal(outs["down0"], ref["down0"]) and torch.equal(outs["down1"], ref["down1"])
        assert not torch.allclose(outs["down2"], ref["down2"]) and not torch.allclose(outs["down3"], ref["down3"])
        assert y.shape == z.shape
    finally:
        inj.remove()
        for h in hooks:
            h.remove()


def test_trainable_selection_on_tiny_unet(tiny_unet):
    import copy

    u = copy.deepcopy(tiny_unet)
    n = set_trainable(u)
    expected = sum(
        p.numel()
        for name, p in u.named_parameters()
        if any(f".{a}.{q}." in f".{name}" for a in ("attn1", "attn2") for q in ("to_q", "to_k", "to_v", "to_out.0"))
    )
    assert n == expected > 0
    assert not any(p.requires_grad for name, p in u.named_parameters() if ".ff." in name or "resnets" in name)


# ---- prompt rule ----------------------------------------------------------------------------------------


def _map(*names: str, size: int = 16) -> np.ndarray:
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = BY_NAME["land"].rgb
    for i, name in enumerate(names):
        arr[i, :] = BY_NAME[name].rgb
    return arr


@pytest.mark.parametrize(
    "names,prompt",
    [
        ((), "land, "),
        (("water",), "land, water area, "),
        (("major_road",), "land, road, "),
        (("park",), "land, woods, "),
        (("water", "building", "forest", "road"), "land, building of regular shape, road, woods, water area, "),
        (("railway", "farmland"), "land, "),  # classes the official rule does not know
    ],
)
def test_prompt_rule_exact_colours_and_fixed_order(names, prompt):
    assert prompt_from_map(_map(*names)) == prompt
    as_tensor = torch.from_numpy(_map(*names)).permute(2, 0, 1).float() / 255
    assert prompt_from_map(as_tensor) == prompt


def test_prompt_needs_exact_colour_match():
    arr = _map()
    arr[0, 0] = np.array(BY_NAME["water"].rgb) + np.array([1, 0, 0], np.uint8)  # off by one
    assert prompt_from_map(arr) == "land, "
    assert prompts_from_maps(None, 2) == ["land, ", "land, "]


def test_prompt_embeddings_are_cached_per_distinct_prompt():
    bb = random_backbone("tiny")
    calls = []
    bb.text_encoder.register_forward_hook(lambda m, a, o: calls.append(1))
    enc = PromptEncoder(bb.tokenizer, bb.text_encoder)
    e1 = enc(["land, ", "land, water area, ", "land, "], "cpu")
    e2 = enc(["land, water area, "], "cpu")
    assert e1.shape == (3, 77, 32) and len(calls) == 2
    assert torch.equal(e1[1], e2[0]) and torch.equal(e1[0], e1[2]) and not torch.equal(e1[0], e1[1])


@pytest.mark.parametrize("geometry,widths", [("small", (64, 128, 256)), ("tiny", (32, 64, 64))])
def test_adapter_channels_follow_the_unet_geometry(geometry, widths):
    m = build("sgdm", 32, {"network": {"backbone": {"pretrained": None, "geometry": geometry}}}, device="meta")
    assert m.adapter.conv_in.out_channels == widths[0]
    assert (m.adapter.body[1].block2.out_channels, m.adapter.body[3].block2.out_channels) == widths[1:]
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size
