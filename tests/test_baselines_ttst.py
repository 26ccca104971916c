"""TTST: parameter counts at the authors' geometry, exact x16/x32 shapes, agreement with the released
code, the released key layout, fine-tuning from another scale, bad checkpoints, training, round trips
and a benchmark run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import dataset_batch, train_cfg

from baselines import registry
from baselines.archs.swinir import official_state_dict as swinir_official_state_dict
from baselines.archs.ttst import TTST, TopKAttention, official_state_dict, topk_sizes
from baselines.checkpoint import save_weights
from baselines.cli import parameter_counts
from baselines.inference import super_resolve_batch
from benchmark.train import train
from cmsrd.errors import InputError

DATA = Path(__file__).parent / "data"
TINY = {"embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4, "num_feat": 8}
NET = {"network": TINY}
ADAM = {"type": "Adam", "lr": 1e-3, "betas": [0.9, 0.999]}  # TTST's official betas

# agreement with the released code: tiny width, deterministic weights (tests/data/ttst_official_outputs.json
# holds the released TTST class's outputs for these, sampled every `stride` pixels)
GOLDEN_NET = {"embed_dim": 24, "depths": (2, 2), "num_heads": (2, 2), "window_size": 8}
GOLDEN_CASES = [
    {"scale": 4, "img_size": 16, "lr_px": 16, "stride": 4},  # 2 x 2 windows, odd blocks shifted
    {"scale": 32, "img_size": 8, "lr_px": 8, "stride": 16},  # one unshifted window
]


def fill_deterministic(net: torch.nn.Module) -> None:
    """Every floating tensor from a hash of (sorted-name index, element index): no RNG, so any torch version
    gives the same weights; weights of unit gain, bias tables and the TTSA mixing weights large
    enough that a wrong index or k changes the output."""
    named = {**dict(net.named_parameters()), **{k: v for k, v in net.named_buffers() if v.is_floating_point()}}
    with torch.no_grad():
        for i, name in enumerate(sorted(named)):
            t = named[name]
            n = torch.arange(t.numel(), dtype=torch.float64)
            h = torch.sin(12.9898 * n + 78.233 * i) * 43758.5453
            wave = (2 * (h - h.floor()) - 1).view(t.shape)  # uniform-like in [-1, 1)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("temperature", "attn1", "attn2", "attn3", "attn4"):
                value = 1 + 0.5 * wave
            elif leaf == "relative_position_bias_table":
                value = 2 * wave
            elif "norm" in name and leaf == "weight":
                value = 1 + 0.2 * wave
            elif t.ndim >= 2:
                value = wave * (3 * t.shape[0] / t.numel()) ** 0.5
            else:
                value = 0.1 * wave
            t.copy_(value.to(t.dtype))


def deterministic_input(px: int) -> torch.Tensor:
    return (0.5 + 0.4 * torch.sin(0.37 * torch.arange(3 * px * px, dtype=torch.float64))).view(1, 3, px, px).float()


def build(scale: int, seed: int = 0, net: dict | None = None):
    torch.manual_seed(seed)
    return registry.build("ttst", scale, {"network": {**TINY, **(net or {})}})


def official_file(path: Path, model: TTST) -> Path:
    """The model saved as the released file is: a DataParallel state dict (`module.` keys, geometry buffers)."""
    torch.save({f"module.{k}": v for k, v in official_state_dict(model).items()}, path)
    return path


def same_output(a, b, lr_px: int) -> None:
    batch = {"lr": torch.rand(2, 3, lr_px, lr_px)}
    torch.testing.assert_close(super_resolve_batch(a, batch), super_resolve_batch(b, batch))


# ---- architecture ---------------------------------------------------------------------------------


def test_parameter_counts_at_authors_geometry():
    with torch.device("meta"):
        assert sum(p.numel() for p in TTST(upscale=4).parameters()) == 18_366_555
    assert parameter_counts("ttst", 4)[0] == 18_366_555  # the registry's default config is the released network
    assert parameter_counts("ttst", 16) == (18_661_979, 18_661_979)  # what `cmsrd-bench list --json` reports
    assert parameter_counts("ttst", 32) == (18_809_691, 18_809_691)


@pytest.mark.parametrize("scale,lr_px,window,shift", [(16, 16, 4, 2), (32, 8, 8, 0)])
def test_exact_shapes_x16_x32(scale, lr_px, window, shift):
    """256 px HR: x16 from 16 px LR (shifted 4 px windows here), x32 from 8 px LR (one whole window, as
    `img_size` 8 <= window 8 gives in the released code)."""
    net = TTST(upscale=scale, img_size=lr_px, **{**TINY, "window_size": 8 if scale == 32 else 4}).eval()
    blocks = net.layers[0].residual_group.blocks
    assert (blocks[0].window, blocks[1].window, blocks[0].shift, blocks[1].shift) == (window, window, 0, shift)
    assert len(net.upsample) == 2 * int(math.log2(scale))
    with torch.no_grad():
        assert net(torch.rand(2, 3, lr_px, lr_px)).shape == (2, 3, 256, 256)
        assert net(torch.rand(1, 3, 5, 7)).shape == (1, 3, 5 * scale, 7 * scale)  # padded to windows, cropped


def test_rejects_scales_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        TTST(upscale=3, **TINY)
    with pytest.raises(InputError, match="scale x3"):
        registry.build("ttst", 3, NET)


def test_topk_sizes_and_attention_match_masked_softmaxes():
    assert topk_sizes(30) == (15, 20, 22, 24)  # 180 channels / 6 heads, as released
    torch.manual_seed(0)
    attn = TopKAttention(12, 2)
    with torch.no_grad():
        for i, w in enumerate((0.1, 0.2, 0.3, 0.4), 1):
            getattr(attn, f"attn{i}").fill_(w)
    x = torch.randn(2, 12, 5, 3)
    # reference: the released formulation, one -inf-masked softmax per k, each applied to v
    b, c, h, w = x.shape
    q, k, v = attn.qkv_dwconv(attn.qkv(x)).chunk(3, dim=1)
    q, k, v = (t.reshape(b, 2, c // 2, h * w) for t in (q, k, v))
    scores = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
    scores = scores * attn.temperature
    out = 0
    for n, weight in zip(topk_sizes(6), (0.1, 0.2, 0.3, 0.4)):
        keep = torch.zeros_like(scores).scatter_(-1, scores.topk(n, dim=-1).indices, 1.0)
        out = out + weight * (scores.masked_fill(keep == 0, float("-inf")).softmax(-1) @ v)
    expected = attn.project_out(out.reshape(b, c, h, w))
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda c: f"x{c['scale']}")
def test_matches_the_released_code(case):
    golden = json.loads((DATA / "ttst_official_outputs.json").read_text())
    ref = next(c for c in golden["cases"] if c["scale"] == case["scale"] and c["lr_px"] == case["lr_px"])
    net = TTST(upscale=case["scale"], img_size=case["img_size"], num_feat=64, **GOLDEN_NET).eval()
    fill_deterministic(net)
    with torch.no_grad():
        y = net(deterministic_input(case["lr_px"]))
    assert list(y.shape) == ref["shape"]
    sample = y[0, :, :: case["stride"], :: case["stride"]].flatten()
    expected = torch.tensor(ref["sample"])
    # float32 summation order differs (~1e-6 of the range); a wrong k or bias index moves it by >4e-4
    torch.testing.assert_close(sample, expected, rtol=0, atol=3e-5 * expected.abs().max().item())


# ---- the released checkpoint layout ---------------------------------------------------------------


def test_released_key_list_maps_onto_every_parameter(tmp_path):
    """Every key of the released ttst_4x.pth (shapes included) loads strictly into the default x4 network;
    only the two geometry buffers are dropped."""
    official = json.loads((DATA / "official_keys" / "ttst_x4.json").read_text())["keys"]
    # zero tensors stored as 1-element expansions: the file stays tiny, the shapes are the released ones
    state = {f"module.{k}": torch.zeros(1).expand(*shape) for k, shape in official.items()}
    path = tmp_path / "ttst_4x.pth"
    torch.save(state, path)
    torch.manual_seed(0)
    method = registry.build("ttst", 4)
    expected = method.net_g.state_dict()
    assert set(official) - set(expected) == {"relative_position_index_SA", "relative_position_index_OCA"}
    assert set(expected) <= set(official)
    assert sum(math.prod(official[k]) for k in expected) == 18_366_555
    method.load_checkpoint(path)
    assert method.loaded_from == path
    assert all(float(v.abs().max()) == 0 for v in method.net_g.state_dict().values() if v.is_floating_point())


def test_released_layout_round_trips_and_our_export_too(tmp_path):
    src, dst = build(16, seed=1), build(16, seed=2)
    dst.load_checkpoint(official_file(tmp_path / "ttst_16x.pth", src.net_g))
    same_output(src, dst, 4)
    exported = save_weights(tmp_path / "m.safetensors", src.trainable_state_dict(), src.export_metadata())
    again = build(16, seed=3)
    again.load_checkpoint(exported)
    same_output(src, again, 4)


# ---- fine-tuning from another scale ---------------------------------------------------------------


def test_start_from_x4_names_new_and_dropped_keys(tmp_path, caplog):
    x4 = build(4, seed=1)
    path = official_file(tmp_path / "ttst_4x.pth", x4.net_g)
    x16 = build(16, seed=2)
    initial = {k: v.clone() for k, v in x16.net_g.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="baselines.ttst"):
        report = x16.load_pretrained(path)
    stages4 = ["upsample.0.weight", "upsample.0.bias", "upsample.2.weight", "upsample.2.bias"]
    stages16 = stages4 + ["upsample.4.weight", "upsample.4.bias", "upsample.6.weight", "upsample.6.bias"]
    assert report["new"] == stages16 and report["dropped"] == stages4
    got, source = x16.net_g.state_dict(), x4.net_g.state_dict()
    assert set(report["loaded"]) == set(got) - set(stages16)
    assert all(torch.equal(got[k], source[k]) for k in report["loaded"])  # conv_last, conv_before_upsample included
    assert all(torch.equal(got[k], initial[k]) for k in stages16)
    message = caplog.text
    assert "x16 start from x4 checkpoint" in message and all(k in message for k in stages16)
    assert x16.loaded_from is None  # start weights, not a checkpoint of this model


def test_a_x4_checkpoint_is_not_silently_run_at_x16(tmp_path):
    path = official_file(tmp_path / "ttst_4x.pth", build(4).net_g)
    with pytest.raises(InputError) as e:
        build(16).load_checkpoint(path)
    msg = str(e.value)
    assert "x4 TTST" in msg and "upsample.2.weight" in msg and "train.pretrain_network_g" in msg
    x4 = build(4)
    ours = save_weights(tmp_path / "x4.safetensors", x4.trainable_state_dict(), x4.export_metadata())
    with pytest.raises(InputError, match=r"x4 TTST \(by its metadata\).*train\.pretrain_network_g"):
        build(16).load_checkpoint(ours)
    stages4 = ["upsample.0.weight", "upsample.0.bias", "upsample.2.weight", "upsample.2.bias"]
    assert build(16).load_pretrained(ours)["dropped"] == stages4  # stage order, though safetensors sorts names


def test_unsupported_scale_and_other_architectures_are_one_clear_error(tmp_path):
    source = build(4).net_g.state_dict()
    x3 = {k: v for k, v in source.items() if not k.startswith("upsample.")}
    x3["upsample.0.weight"] = torch.zeros(9 * 8, 8, 3, 3)  # HAT's x3: one 3x pixel shuffle
    x3["upsample.0.bias"] = torch.zeros(9 * 8)
    torch.save(x3, tmp_path / "x3.pth")
    x64 = dict(source)
    for i in range(4, 12, 2):
        x64[f"upsample.{i}.weight"], x64[f"upsample.{i}.bias"] = source["upsample.0.weight"], source["upsample.0.bias"]
    torch.save(x64, tmp_path / "x64.pth")
    method = build(16)
    for name, pattern in (
        ("x3.pth", r"upsample\.0\.weight \(72, 8, 3, 3\)"),
        ("x64.pth", r"upsample\.10\.weight\), a x64 model"),
    ):
        with pytest.raises(InputError, match=pattern):
            method.load_pretrained(tmp_path / name)
        with pytest.raises(InputError, match=pattern):
            method.load_checkpoint(tmp_path / name)
    torch.manual_seed(0)
    swinir = registry.build("swinir", 16, {"network": {"embed_dim": 12, "depths": [2], "num_heads": [2]}})
    torch.save({"params": swinir_official_state_dict(swinir.net_g)}, tmp_path / "swinir.pth")
    method = registry.build("ttst", 16, {**NET, "path": {"param_key": "params"}})
    for load in (method.load_pretrained, method.load_checkpoint):
        with pytest.raises(
            InputError, match=r"relative_position_index'\), so it is another architecture.*missing keys: .*conv_block"
        ):
            load(tmp_path / "swinir.pth")
    ours = save_weights(tmp_path / "s.safetensors", swinir.trainable_state_dict(), swinir.export_metadata())
    with pytest.raises(InputError, match="saved by method 'swinir'"):
        method.load_pretrained(ours)
    wider = build(4, net={"embed_dim": 16})
    with pytest.raises(InputError, match=r"shape mismatches.*conv_first\.weight"):
        build(16).load_pretrained(official_file(tmp_path / "wide.pth", wider.net_g))


# ---- training and the benchmark -------------------------------------------------------------------


def test_training_lowers_the_loss_and_the_run_benchmarks(tiny_dataset, tmp_path):
    config = train_cfg(NET, optim_g=ADAM)
    batch = dataset_batch(tiny_dataset)
    before = build(16)
    l_before = torch.nn.functional.l1_loss(super_resolve_batch(before, batch), batch["hr"]).item()
    res = train("ttst", tiny_dataset, tmp_path / "run", config=config, max_steps=12, progress=False)
    assert res["step"] == 12
    after = registry.build("ttst", 16, NET)
    after.load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert after.net_g.img_size == 4  # followed the data: 4 px LR patches, one window
    l_after = torch.nn.functional.l1_loss(super_resolve_batch(after, batch), batch["hr"]).item()
    assert l_after < 0.8 * l_before

    from benchmark.cli import cli

    out = tmp_path / "bench"
    args = ["run", "--data", str(tiny_dataset), "--methods", "ttst", "--weights", f"ttst={tmp_path / 'run'}"]
    r = CliRunner().invoke(cli, [*args, "--out", str(out), "--metrics", "psnr_y", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board.method) == ["ttst"] and 5 < float(board.psnr_y.iloc[0]) < 60


def test_training_starts_from_the_x4_release_and_resume_does_not_reread_it(tiny_dataset, tmp_path, caplog):
    start = official_file(tmp_path / "ttst_4x.pth", build(4, seed=5).net_g)
    config = train_cfg(NET, optim_g=ADAM, pretrain_network_g=str(start))
    with caplog.at_level(logging.WARNING, logger="baselines.ttst"):
        train("ttst", tiny_dataset, tmp_path / "run", config=config, max_steps=2, progress=False)
    assert "x16 start from x4 checkpoint" in caplog.text and "upsample.6.weight" in caplog.text
    start.unlink()  # a resumed run restores its own weights: the start file may be gone
    res = train("ttst", tiny_dataset, tmp_path / "run", config=config, max_steps=4, resume=True, progress=False)
    assert res["step"] == 4
    official_file(start, build(4, seed=5).net_g)
    both = {**config, "checkpoint": str(tmp_path / "run" / "model.safetensors")}
    with pytest.raises(InputError, match="both name the network's start weights"):
        train("ttst", tiny_dataset, tmp_path / "both", config=both, progress=False)
