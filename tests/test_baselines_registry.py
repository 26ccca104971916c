"""Registry metadata, bicubic against the dataset's own MATLAB bicubic, shared batched inference,
and `cmsrd-bench list`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from baselines import registry
from baselines.cli import WEIGHT_STATES, count_all, list_command, method_rows, recorded_parameter_counts
from baselines.conditions import Conditions, UnsupportedCondition
from baselines.inference import method_inputs, super_resolve_batch, super_resolve_loader
from cmsrd.data import CMSRDDataset
from cmsrd.errors import InputError


@pytest.mark.parametrize(
    "name,kind,nfe,licence",
    [("bicubic", "interp", 0, "n/a"), ("esrgan", "gan", 1, "Apache-2.0"), ("swinir", "regression", 1, "Apache-2.0")],
)
def test_specs(name, kind, nfe, licence):
    spec = registry.get(name)
    assert spec.kind == kind and spec.nfe == nfe and spec.license.startswith(licence)
    assert {16, 32} <= set(spec.scales) and spec.inputs == ("lr",) and spec.citation
    assert spec.default_config()  # a YAML config ships with every method


def test_config_type_selects_architecture_and_scale_follows_method():
    m = registry.build("esrgan", 32, {"network": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}})
    assert type(m.net_g).__name__ == "RRDBNet" and m.net_g.num_up == 5
    with pytest.raises(InputError, match="disagrees with the requested scale x16"):
        registry.build("esrgan", 16, {"network": {"scale": 4}})
    with pytest.raises(InputError, match="unknown architecture"):
        registry.build("swinir", 16, {"network": {"type": "NoSuchNet"}})
    with pytest.raises(InputError, match="not supported"):
        registry.build("esrgan", 3)


@pytest.mark.parametrize(
    "name,network,match",
    [
        (
            "esrgan",
            {"num_feats": 32},
            r"network\.num_feats: is not a parameter of RRDBNet \(did you mean `num_feat`\?\).*num_grow_ch",
        ),
        (
            "esrgan",
            {"num_block": "x"},
            r"network \(RRDBNet\): invalid value: RRDBNet num_block must be a positive integer",
        ),
        ("esrgan", {"num_feat": 0}, r"num_feat must be a positive integer"),
        (
            "swinir",
            {"upsampler": "nearest+conv"},
            r"network \(SwinIR\): invalid value: .*'nearest\+conv'.*parameters of SwinIR: upscale",
        ),
        ("swinir", {"depths": 6}, r"network \(SwinIR\): invalid value"),
        ("swinir", {"window": 8}, r"network\.window: is not a parameter of SwinIR \(did you mean `window_size`\?\)"),
    ],
)
def test_network_config_mistakes_are_one_clear_error(name, network, match):
    with pytest.raises(InputError, match=match):
        registry.build(name, 16, {"network": network})


def test_bicubic_matches_dataset_bicubic(tiny_dataset):
    ds = CMSRDDataset(tiny_dataset, "test", inputs=("lr", "sr", "hr"))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    method = registry.build("bicubic", ds.scale)
    seen = []
    for ids, sr, batch in super_resolve_loader(method, loader, device="cpu", progress=False):
        assert sr.shape == batch["hr"].shape and sr.dtype == torch.float32
        # the dataset's sr_4_64 PNGs are MATLAB bicubic of the uint8 LR, rounded to uint8
        diff = (sr * 255).round() - batch["sr"] * 255
        assert diff.abs().max() <= 1.0
        seen += ids
    assert seen == ds.ids


def test_inference_moves_only_declared_inputs_and_checks_conditions():
    method = registry.build("bicubic", 16)
    batch = {
        "lr": torch.rand(2, 3, 4, 4),
        "hr": torch.rand(2, 3, 64, 64),
        "map": torch.rand(2, 3, 64, 64),
        "id": ["a", "b"],
    }
    assert set(method_inputs(method, batch, Conditions())) == {"lr"}
    with pytest.raises(InputError, match=r"lacks \['lr'\]"):
        super_resolve_batch(method, {"hr": batch["hr"]})
    with pytest.raises(UnsupportedCondition, match="map"):
        super_resolve_batch(method, batch, Conditions.parse("map=shuffle"))
    out = super_resolve_batch(method, batch, precision="bf16")
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32


def test_list_table_and_json():
    r = CliRunner().invoke(list_command, [], catch_exceptions=False)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split()[:5] == ["name", "kind", "scales", "inputs", "NFE"]
    esrgan = next(line for line in lines if line.startswith("esrgan"))
    assert "gan" in esrgan and "Apache-2.0" in esrgan and "train" in esrgan and "16.8M" in esrgan
    rows = {r["name"]: r for r in method_rows(with_params=False)}
    assert rows["swinir"]["weights"] == {"16": "train", "32": "train"}
    assert rows["bicubic"]["weights"] == {"16": "none needed", "32": "none needed"}
    assert rows["sgdm+"]["weights"] == {"16": "train", "32": "-"}  # no published x16 checkpoint: it needs one
    assert rows["sgdm"]["weights"]["32"] in ("download", "present")  # MEGA only: `weights fetch` cannot get it
    states = {s for r in rows.values() for s in r["weights"].values()}
    assert states <= set(WEIGHT_STATES)


def test_recorded_parameter_counts_match_the_models():
    """One source of truth: `param_counts.json` (what `list` prints without torch) equals each class built at
    every scale its light spec declares, so a spec whose scales, or a file whose counts, disagree with the
    method classes fails here."""
    recorded = recorded_parameter_counts()
    assert set(recorded) == {n for n in registry.names() if not n.startswith("test_")}  # tests register test_*
    for name in recorded:
        assert set(recorded[name]) == {str(s) for s in registry.get(name).scales}, name
    assert recorded == count_all()
    assert recorded["esrgan"]["16"] == {"total": 16_771_843, "trainable": 16_771_843}


def test_light_specs_are_the_method_classes_specs():
    """The spec a method module or package exposes is the registry's object (defined once), and it names the
    class that is built."""
    import importlib

    from baselines.base import SRMethod

    for name in registry.names():
        spec = registry.get(name)
        if not spec.target.startswith("baselines."):
            continue
        cls = registry.resolve_class(spec)
        assert issubclass(cls, SRMethod) and spec.target == f"{cls.__module__}:{cls.__name__}", name
        exposed = []
        for mod in {cls.__module__, cls.__module__.rpartition(".")[0]} - {"baselines"}:
            m = importlib.import_module(mod)
            exposed += [getattr(m, "SPEC", None), *getattr(m, "SPECS", {}).values()]
        same = [s for s in exposed if isinstance(s, registry.MethodSpec) and s.name == name]
        assert same and all(s is spec for s in same), name


def test_list_reads_plain_data_and_imports_no_torch():
    """`cmsrd-bench list` (text and --json) answers from specs and recorded counts: no torch import (it cost
    ~4 s a call), the method modules are imported only when a method is built."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from baselines.cli import list_command\n"
        "for args in ([], ['--json']):\n"
        "    r = CliRunner().invoke(list_command, args, catch_exceptions=False)\n"
        "    assert r.exit_code == 0 and 'esrgan' in r.output, r.output\n"
        "heavy = ('torch', 'diffusers', 'baselines.esrgan', 'baselines.sgdm.model')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    repo = str(Path(registry.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env, cwd=repo)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_list_json_parameter_counts(monkeypatch):
    import baselines.cli as cli

    monkeypatch.setattr(registry, "names", lambda: ["bicubic", "esrgan", "swinir"])  # keep to this module's methods
    r = CliRunner().invoke(cli.list_command, ["--json"], catch_exceptions=False)
    data = {m["name"]: m for m in json.loads(r.output)["methods"]}
    assert data["esrgan"]["params"] == {"scale": 16, "total": 16_771_843, "trainable": 16_771_843}
    assert data["swinir"]["params"]["total"] == 11_900_199 + 2 * 147_712
    assert data["bicubic"]["params"]["total"] == 0
    assert np.isclose(data["esrgan"]["nfe"], 1)
    assert data["swinir"]["params_by_scale"]["32"]["total"] == 12_343_335  # the x32 upsampler
    live = CliRunner().invoke(cli.list_command, ["--json", "--recount"], catch_exceptions=False)
    assert json.loads(live.output) == json.loads(r.output)  # the recorded counts are the built models'


def test_merge_config_replaces_a_dict_whose_type_changes():
    base = {"train": {"scheduler": {"type": "MultiStepLR", "milestones": [5], "gamma": 0.5}, "lr": 1e-3}}
    same = registry.merge_config(base, {"train": {"scheduler": {"type": "MultiStepLR", "gamma": 0.1}}})
    assert same["train"]["scheduler"] == {"type": "MultiStepLR", "milestones": [5], "gamma": 0.1}
    other = registry.merge_config(base, {"train": {"scheduler": {"type": "CosineAnnealingLR", "T_max": 9}}})
    assert other["train"] == {"scheduler": {"type": "CosineAnnealingLR", "T_max": 9}, "lr": 1e-3}
    assert base["train"]["scheduler"]["milestones"] == [5]  # inputs untouched


def test_registered_adds_methods_for_a_block_only():
    import dataclasses

    spec = dataclasses.replace(registry.get("bicubic"), name="test_tmp")
    before = registry.names()
    with registry.registered(spec):
        assert registry.get("test_tmp") is spec and "test_tmp" in registry.names()
    assert registry.names() == before
    with pytest.raises(ValueError, match="registered twice"), registry.registered(dataclasses.replace(spec, nfe=3)):
        with registry.registered(spec):  # the same name for another method: refused, and nothing is removed
            pass
    assert registry.names() == before and registry.get("bicubic").nfe == 0


def _overlay_method(stem: str, methods: list[str]) -> str | None:
    """The method a shipped overlay config (`ldm-sr-tiny.yaml`) merges over: the longest name it extends."""
    owners = [n for n in methods if stem.startswith((n + "-", n + "_"))]
    return max(owners, key=len) if owners else None


def test_every_method_has_a_typed_config_and_its_shipped_configs_parse():
    """A method without `config_type` would read an unchecked dict (misspelt keys silently ignored): every
    registered method declares one, its train block extends the trainer's, its train keys are derived from it,
    and its default YAML, with each shipped overlay merged over it, parses."""
    from baselines.method_config import MethodConfig, TrainConfig, method_train_keys, parse_config, train_type

    # the toolkit's own methods (other tests register throwaway ones from their modules)
    methods = [n for n in registry.names() if registry.get(n).target.startswith("baselines.")]
    own = {registry.get(n).config for n in methods}
    overlays = {}
    for path in sorted(registry.CONFIG_DIR.glob("*.yaml")):
        owner = _overlay_method(path.stem, methods)
        if path.name not in own and owner is not None:
            overlays.setdefault(owner, []).append(path)
    for name in methods:
        cls = registry.resolve_class(registry.get(name))
        assert cls.config_type is not None and issubclass(cls.config_type, MethodConfig), name
        assert issubclass(train_type(cls.config_type), TrainConfig), name
        assert cls.train_keys == method_train_keys(cls.config_type), name
        default = registry.get(name).default_config()
        assert isinstance(parse_config(cls.config_type, default, name), cls.config_type)
        for path in overlays.get(name, []):
            parse_config(
                cls.config_type, registry.merge_config(default, registry.load_yaml(path)), f"{name} {path.name}"
            )
    assert {"ediffsr", "ldm", "resshift"} <= set(methods)
    assert {n: len(p) for n, p in overlays.items()} == {
        "csdiff": 1,
        "ediffsr": 1,
        "esrgan": 2,
        "ldm-sr": 1,
        "ldm": 1,
        "resshift": 2,
        "sgdm": 2,
    }
