"""RVSA classifier/segmenter: exact sizes, official key layouts, official outputs, official-file loaders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark.downstream.checkpoints import (
    load_classifier,
    load_classifier_state,
    load_segmenter,
    load_segmenter_state,
)
from benchmark.downstream.rvsa import RVSABackbone, RVSAClassifier, count_parameters
from benchmark.downstream.uperhead import RVSASegmenter
from cmsrd.errors import InputError

DATA = Path(__file__).parent / "data"


def _keys(name: str) -> dict[str, list[int]]:
    return json.loads((DATA / "official_keys" / f"{name}.json").read_text())["keys"]


def _shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def full():
    with torch.device("meta"):
        return RVSAClassifier(), RVSASegmenter()


def test_exact_parameter_counts(full):
    cls, seg = full
    assert count_parameters(cls) == 86_198_869
    assert count_parameters(seg.backbone) == 93_945_664
    assert count_parameters(seg.decode_head) == 32_259_591


def test_state_dicts_match_official_key_lists(full):
    cls, seg = full
    assert _shapes(cls) == _keys("rvsa_ucm_vit_b")
    assert _shapes(seg.backbone, "backbone.") == _keys("rvsa_loveda_backbone")
    heads = _keys("rvsa_loveda_heads")
    assert _shapes(seg.decode_head, "decode_head.") == {k: v for k, v in heads.items() if k.startswith("decode_head.")}


def _meta_state(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in keys.items()}


def test_loaders_accept_the_official_layouts(full, tmp_path):
    """The conversion an official file takes (kind check, class count, prefix strip, strict load), at full size."""
    cls, seg = full
    load_classifier_state(cls, _meta_state(_keys("rvsa_ucm_vit_b")), tmp_path / "ucm.pth")
    mmseg = _meta_state({**_keys("rvsa_loveda_backbone"), **_keys("rvsa_loveda_heads")})
    load_segmenter_state(seg, mmseg, tmp_path / "loveda.pth")  # auxiliary_head.* dropped


def _tiny(prefix: str, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v.float() for k, v in ref.items() if k.startswith(prefix)}


def _sin(shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.37).float().reshape(shape)


def test_outputs_match_the_official_implementation():
    """Reference outputs of the official modules on the same (tiny) weights: window sampling, rotation,
    padding of a token grid that is not a multiple of 7, decomposed relative positions, fpn1-4."""
    ref = load_file(str(DATA / "rvsa_tiny_official_outputs.safetensors"))
    cls = RVSAClassifier(num_classes=3, img_size=224, dim=16, heads=2).eval()
    state = _tiny("cls.", ref)
    assert torch.equal(cls.blocks[0].attn.relative_position_index, ref["official.relative_position_index"].long())
    for k, v in cls.state_dict().items():
        state.setdefault(k, v)  # relative_position_index buffers (checked above)
    cls.load_state_dict(state, strict=True)
    bb = RVSABackbone(img_size=128, dim=16, heads=2).eval()
    bstate = _tiny("bb.", ref)
    for k, v in bb.state_dict().items():
        bstate.setdefault(k, v)
    bb.load_state_dict(bstate, strict=True)
    with torch.no_grad():
        logits = cls(_sin((2, 3, 224, 224)))
        feats = bb(_sin((1, 3, 128, 128)))
    torch.testing.assert_close(logits, ref["out.cls_logits"], atol=1e-5, rtol=1e-4)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 32, 32), (1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4)]
    for i, f in enumerate(feats):
        torch.testing.assert_close(f, ref[f"out.bb_feat{i}"], atol=1e-4, rtol=1e-4)


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _tiny_classifier(classes: int = 21) -> RVSAClassifier:
    return RVSAClassifier(num_classes=classes, img_size=112, dim=16, heads=2)


def _tiny_segmenter(classes: int = 7) -> RVSASegmenter:
    return RVSASegmenter(num_classes=classes, img_size=112, dim=16, heads=2, channels=8)


def test_classifier_file_with_namespace_args_loads_weights_only(tmp_path):
    src = _tiny_classifier()
    args = argparse.Namespace(model="vit_base_win_rvsa", nb_classes=21, input_size=224, dataset="ucm")
    path = _save(
        tmp_path / "ucm.pth",
        {"model": src.state_dict(), "optimizer": {}, "max_accuracy": 99.5, "epoch": 3, "args": args},
    )
    got = load_classifier(path, model=_tiny_classifier())
    x = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(got(x), src.eval()(x))


def test_segmenter_mmseg_file_loads_and_drops_the_auxiliary_head(tmp_path):
    src = _tiny_segmenter()
    state = {k: v for k, v in src.state_dict().items()}
    state["auxiliary_head.conv_seg.weight"] = torch.zeros(7, 4, 1, 1)
    path = _save(tmp_path / "loveda.pth", {"meta": {"CLASSES": ["background"] * 7}, "state_dict": state})
    got = load_segmenter(path, model=_tiny_segmenter())
    x = torch.rand(1, 3, 112, 112)
    with torch.no_grad():
        out = got(x)
        torch.testing.assert_close(out, src.eval()(x))
    assert out.shape == (1, 7, 112, 112)


def test_wrong_class_count_is_one_clear_error(tmp_path):
    path = _save(tmp_path / "aid.pth", {"model": _tiny_classifier(30).state_dict()})
    with pytest.raises(InputError, match=r"aid\.pth.*has 30 classes.*UCM"):
        load_classifier(path, model=_tiny_classifier())
    seg = _save(tmp_path / "isaid.pth", {"state_dict": _tiny_segmenter(16).state_dict()})
    with pytest.raises(InputError, match=r"isaid\.pth.*has 16 classes.*LoveDA"):
        load_segmenter(seg, model=_tiny_segmenter())


def test_wrong_checkpoint_kind_is_one_clear_error(tmp_path):
    seg = _save(tmp_path / "loveda.pth", {"state_dict": _tiny_segmenter().state_dict()})
    with pytest.raises(InputError, match=r"loveda\.pth.*mmseg segmentation checkpoint.*rvsa_ucm_vit_b"):
        load_classifier(seg, model=_tiny_classifier())
    cls = _save(tmp_path / "ucm.pth", {"model": _tiny_classifier().state_dict()})
    with pytest.raises(InputError, match=r"ucm\.pth.*scene-classification.*rvsa_loveda_upernet"):
        load_segmenter(cls, model=_tiny_segmenter())
    sr = _save(tmp_path / "esrgan.pth", {"params_ema": {"conv_first.weight": torch.zeros(4, 3, 3, 3)}})
    with pytest.raises(InputError, match=r"esrgan\.pth.*not an RVSA checkpoint"):
        load_classifier(sr, model=_tiny_classifier())


def test_truncated_and_missing_files_are_clear_errors(tmp_path):
    good = _save(tmp_path / "ucm.pth", {"model": _tiny_classifier().state_dict()})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.pth.*truncated or corrupt"):
        load_classifier(cut, model=_tiny_classifier())
    with pytest.raises(InputError, match=r"absent\.pth.*file not found"):
        load_segmenter(tmp_path / "absent.pth", model=_tiny_segmenter())


def test_a_pickle_with_code_is_refused(tmp_path):
    """Only argparse.Namespace is allowed besides tensors: any other object in the file is not unpickled."""
    path = _save(tmp_path / "evil.pth", {"model": _tiny_classifier().state_dict(), "args": Path("/etc")})
    with pytest.raises(InputError, match=r"evil\.pth.*not weights-only"):
        load_classifier(path, model=_tiny_classifier())


def test_size_mismatch_names_the_architecture(tmp_path):
    other = RVSAClassifier(num_classes=21, img_size=112, dim=32, heads=2)
    path = _save(tmp_path / "vitae.pth", {"model": other.state_dict()})
    with pytest.raises(InputError, match=r"vitae\.pth.*does not match the model.*ViT-B \+ RVSA"):
        load_classifier(path, model=_tiny_classifier())
