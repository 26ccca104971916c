"""Checkpoints: our safetensors, BasicSR, original-ESRGAN and ESRGAN-repository layouts, official SwinIR
`params`, and one clear error for truncated files, code-carrying pickles, and architecture/scale mismatches."""

from __future__ import annotations

import re

import pytest
import torch
from test_baselines_archs import to_old_esrgan_layout

from baselines import registry
from baselines.archs.swinir import official_state_dict
from baselines.checkpoint import read_state_dict, save_weights
from baselines.inference import super_resolve_batch
from cmsrd.errors import InputError

ESR_NET = {"network": {"num_feat": 8, "num_block": 2, "num_grow_ch": 4}}
SWIN_NET = {"network": {"embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4}}


def _esrgan(scale=16, cfg=ESR_NET, seed=0):
    torch.manual_seed(seed)
    return registry.build("esrgan", scale, cfg)


def _same_output(a, b, lr_px):
    batch = {"lr": torch.rand(2, 3, lr_px, lr_px)}
    torch.testing.assert_close(super_resolve_batch(a, batch), super_resolve_batch(b, batch))


@pytest.mark.parametrize("layout", ["ours", "basicsr_params_ema", "basicsr_params", "original"])
def test_esrgan_loads_every_layout(tmp_path, layout):
    src, dst = _esrgan(seed=1), _esrgan(seed=2)
    sd = src.net_g.state_dict()
    if layout == "ours":
        path = save_weights(tmp_path / "m.safetensors", src.trainable_state_dict(), src.export_metadata())
    elif layout == "original":
        path = tmp_path / "RRDB_x16.pth"
        torch.save(to_old_esrgan_layout(sd, n_up=4), path)
    else:
        key = layout.removeprefix("basicsr_")
        other = {k: torch.zeros_like(v) for k, v in sd.items()}  # a decoy under the other key
        path = tmp_path / "net_g_5000.pth"
        torch.save({key: sd, ("params" if key == "params_ema" else "params_ema_unused"): other}, path)
    dst.load_checkpoint(path)
    _same_output(src, dst, 8)


def to_esrgan_repo_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original flat-Sequential keys -> the names of xinntao/ESRGAN's RRDBNet_arch.py (RRDB_trunk, trunk_conv,
    upconvN, HRconv), as its transer_RRDB_models.py renames them; written independently of the loader."""
    nb = 1 + max(int(k.split(".")[3]) for k in old if ".RDB" in k)
    seq = sorted({int(k.split(".")[1]) for k in old if re.fullmatch(r"model\.\d+\.(weight|bias)", k)} - {0})
    *ups, hr, last = seq
    names = {0: "conv_first", hr: "HRconv", last: "conv_last", **{idx: f"upconv{i}" for i, idx in enumerate(ups, 1)}}
    out = {}
    for k, v in old.items():
        p = k.split(".")
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.(RDB\d)\.(conv\d)\.0\.(weight|bias)", k):
            out[f"RRDB_trunk.{m[1]}.{m[2]}.{m[3]}.{m[4]}"] = v
        elif k.startswith(f"model.1.sub.{nb}."):
            out[f"trunk_conv.{p[-1]}"] = v
        else:
            out[f"{names[int(p[1])]}.{p[2]}"] = v
    return out


def test_esrgan_loads_repository_release_layout_from_official_code(tmp_path):
    """The files the ESRGAN README links (RRDB_ESRGAN_x4.pth) use RRDB_trunk/trunk_conv/upconvN/HRconv names
    and the legacy (non-zip) pickle format. Weights come from the official old-arch network spandrel vendors."""
    spandrel = pytest.importorskip("spandrel")
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet as OfficialRRDBNet

    torch.manual_seed(0)
    official = OfficialRRDBNet(num_filters=8, num_blocks=2, scale=4).eval()
    repo = to_esrgan_repo_layout(official.state_dict())
    assert {
        "RRDB_trunk.1.RDB3.conv5.bias",
        "trunk_conv.weight",
        "upconv2.weight",
        "HRconv.weight",
        "conv_last.bias",
    } <= set(repo)
    desc = spandrel.ModelLoader().load_from_state_dict(
        dict(repo)
    )  # spandrel reads this layout too: the renaming is the real one
    assert desc.architecture.name == "ESRGAN" and desc.scale == 4
    path = tmp_path / "RRDB_ESRGAN_x4.pth"
    torch.save(repo, path, _use_new_zipfile_serialization=False)
    ours = registry.build("esrgan", 4, {"network": {"num_feat": 8, "num_block": 2, "num_grow_ch": 32}})
    ours.load_checkpoint(path)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours.net_g.eval()(x), official(x), rtol=1e-5, atol=1e-5)


def test_unknown_key_layout_is_not_called_a_size_mismatch(tmp_path):
    m = _esrgan()
    renamed = {k.replace("body.", "trunk.blocks."): v for k, v in m.net_g.state_dict().items()}
    torch.save(renamed, tmp_path / "other.pth")
    with pytest.raises(InputError) as e:
        m.load_checkpoint(tmp_path / "other.pth")
    msg = str(e.value)
    assert (
        "another architecture or a key layout this loader does not know" in msg
        and "'trunk.blocks.0.rdb1.conv1.weight'" in msg
    )
    assert "RRDB_trunk" in msg and "same network size" not in msg  # names the layouts it reads, not a size problem


def test_swinir_loads_official_params_checkpoint(tmp_path):
    torch.manual_seed(0)
    src = registry.build("swinir", 16, SWIN_NET)
    torch.manual_seed(1)
    dst = registry.build("swinir", 16, SWIN_NET)
    path = tmp_path / "001_classicalSR_SwinIR-M_x16.pth"
    full = official_state_dict(src.net_g)
    assert any(k.endswith("attn_mask") for k in full) and any(k.endswith("relative_position_index") for k in full)
    torch.save({"params": full}, path)
    dst.load_checkpoint(path)
    _same_output(src, dst, 4)


def test_truncated_files_are_one_clear_error(tmp_path):
    m = _esrgan()
    good = save_weights(tmp_path / "m.safetensors", m.trainable_state_dict(), m.export_metadata())
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        m.load_checkpoint(tmp_path / "cut.safetensors")
    torch.save(m.net_g.state_dict(), tmp_path / "m.pth")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="truncated or corrupt"):
        m.load_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        m.load_checkpoint(tmp_path / "empty.pth")


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_torch_pickles_at_any_offset_are_one_clear_error(tmp_path, zip_format):
    """Legacy (pre-1.6, non-zip) pickles, the format of the 2018 ESRGAN releases, cut inside the header
    used to escape as IndexError / struct.error."""
    sd = {"model.0.weight": torch.rand(4, 3, 3, 3), "model.0.bias": torch.rand(4)}
    torch.save(sd, tmp_path / "full.pth", _use_new_zipfile_serialization=zip_format)
    data = (tmp_path / "full.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    for n in sorted({1, 2, 5, 11, 18, 40, 100, 200, len(data) // 2, len(data) - 1}):
        cut.write_bytes(data[:n])
        with pytest.raises(InputError, match="truncated|corrupt"):
            read_state_dict(cut)


class _Payload:
    """Stands in for any object whose unpickling would run code."""


def test_pickle_that_is_not_weights_only_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"params": {"conv_first.weight": torch.zeros(1)}, "hook": _Payload()}, path)
    with pytest.raises(InputError, match="not weights-only"):
        read_state_dict(path)


def test_scale_mismatch_names_both_scales(tmp_path):
    x16 = _esrgan(16)
    x32 = _esrgan(32)
    path = tmp_path / "RRDB_x16.pth"
    torch.save(x16.net_g.state_dict(), path)  # no metadata: the upsampler tells the scale
    with pytest.raises(InputError, match=r"x16 model but the method was built for x32"):
        x32.load_checkpoint(path)
    ours = save_weights(tmp_path / "m.safetensors", x16.trainable_state_dict(), x16.export_metadata())
    with pytest.raises(InputError, match=r"trained for x16 but the method was built for x32"):
        x32.load_checkpoint(ours)


def test_architecture_mismatch_names_keys_and_shapes(tmp_path):
    small = _esrgan(cfg=ESR_NET)
    wider = _esrgan(cfg={"network": {"num_feat": 16, "num_block": 3, "num_grow_ch": 4}})
    path = tmp_path / "m.pth"
    torch.save(small.net_g.state_dict(), path)
    with pytest.raises(InputError) as e:
        wider.load_checkpoint(path)
    msg = str(e.value)
    assert (
        "missing keys: body.2." in msg
        and "shape mismatches" in msg
        and "conv_first.weight: checkpoint (8, 3, 3, 3) vs model (16, 3, 3, 3)" in msg
    )
    with pytest.raises(InputError, match="saved by method 'esrgan'"):
        registry.build("swinir", 16, SWIN_NET).load_checkpoint(
            save_weights(tmp_path / "e.safetensors", small.trainable_state_dict(), small.export_metadata())
        )


def test_bicubic_has_no_checkpoint(tmp_path):
    with pytest.raises(InputError, match="no weights"):
        registry.build("bicubic", 16).load_checkpoint(tmp_path / "x.safetensors")
