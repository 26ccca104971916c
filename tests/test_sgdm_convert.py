"""Converting the authors' SGDM checkpoints: every UNet/adapter/flow tensor name and shape from
`../shared/reference/sgdm-official-keys.json` must load into our modules with nothing missing, unexpected
or mis-shaped; plus our own safetensors round trip. The SD-size UNet stays on the meta device and the
fake checkpoints are expanded zeros (one shared storage), so this is cheap."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from baselines.method_config import train_config
from baselines.sgdm import build
from baselines.sgdm.adapter import SGDMAdapter
from baselines.sgdm.backbone import SD21_UNET, char_tokenizer, load_original_parts
from baselines.sgdm.convert import _Inert, _metadata_stubs, adapter_state, detect_variant, load_strict, load_torch_state
from baselines.sgdm.flows import create_flow
from cmsrd.errors import InputError

KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "sgdm-official-keys.json"
SD = {"network": {"backbone": {"pretrained": None, "geometry": "sd21-base"}}}
TINY = {"network": {"backbone": {"pretrained": None, "geometry": "tiny"}, "cond_channels": 64}, "sampler": {"steps": 4}}
pytestmark = pytest.mark.filterwarnings("ignore:.*non-meta parameter.*:UserWarning")
METHOD = {"real": ("sgdm+", 16), "simu": ("sgdm", 32), "simu_nomap": ("sgdm-nomap", 32)}


@pytest.fixture(scope="module")
def official_keys() -> dict:
    if not KEYS.is_file():
        pytest.skip(f"{KEYS} not present")
    return json.loads(KEYS.read_text())


def _fake_state(shapes: dict, random_prefix: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Zero views of one shared scalar (no memory) or, under `random_prefix`, real random tensors."""
    zero = torch.zeros(())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if random_prefix and k.startswith(random_prefix) and "num_batches_tracked" not in k:
            out[k] = torch.randn(shape, generator=g) if shape else torch.tensor(0.0)
        elif "num_batches_tracked" in k:
            out[k] = torch.tensor(7, dtype=torch.long)
        else:
            out[k] = zero.expand(shape) if shape else zero.clone()
    return out


@pytest.mark.parametrize("variant", ["real", "simu", "simu_nomap"])
def test_official_keys_convert_and_load_strictly(official_keys, variant):
    shapes = official_keys[variant]
    state = _fake_state(shapes, random_prefix="adapter.")
    assert detect_variant(state) == variant
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
    # the load path an official .ckpt takes (every UNet key, no extra, shapes equal: else one InputError)
    assert load_original_parts(unet, None, None, state, "key list", required=False) == ["UNet"]

    adapter = SGDMAdapter(variant)
    load_strict(adapter, adapter_state(state), "adapter")
    sd = adapter.state_dict()
    for k in ("conv_in.weight", "body.3.block2.weight"):
        assert torch.equal(sd[k], state[f"adapter.{k}"])
    if variant == "real":
        k = "merge_encoder.SR_Ref_Encoder.spade2.param_free_norm.running_var"
        assert torch.equal(sd[k], state[f"adapter.{k}"])


@pytest.mark.parametrize("variant", ["real", "simu", "simu_nomap"])
def test_lightning_checkpoint_file_loads_into_the_method(official_keys, variant, tmp_path):
    path = tmp_path / "SGDM.ckpt"
    torch.save({"state_dict": _fake_state(official_keys[variant]), "global_step": 119999, "epoch": 3}, path)
    assert path.stat().st_size < 2_000_000  # views of one storage
    name, scale = METHOD[variant]
    m = build(name, scale, SD, device="meta")
    m.load_checkpoint(path)
    assert m.loaded_from == path
    other = "simu" if variant == "real" else "real"
    with pytest.raises(InputError, match=f"official {variant!r}"):
        build(*METHOD[other], SD, device="meta").load_checkpoint(path)


def _fake_flow_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith(".perm"):
            perm = torch.randperm(shape[0], generator=g)
            out[k], out[k[: -len("perm")] + "inv_perm"] = perm, torch.argsort(perm)
        elif not k.endswith("inv_perm"):
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def test_style_flow_state_dict_loads(official_keys, tmp_path):
    shapes = official_keys["style_flow"]
    state = _fake_flow_state(shapes, 0)
    assert set(state) == set(shapes)
    torch.save(state, tmp_path / "flow_mean.pt")
    flow = create_flow()
    load_strict(flow, load_torch_state(tmp_path / "flow_mean.pt"), "flow")
    assert torch.equal(flow.q0.loc, state["q0.loc"]) and torch.equal(flow.flows[3].perm, state["flows.3.perm"])


def test_official_flow_files_next_to_checkpoint_are_found(official_keys, tmp_path):
    m = build("sgdm+", 16, TINY)
    torch.save(_fake_flow_state(official_keys["style_flow"], 1), tmp_path / "flow_mean.pt")
    torch.save(_fake_flow_state(official_keys["style_flow"], 2), tmp_path / "flow_std.pt")
    save_file({k: v.contiguous() for k, v in m.trainable_state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = build("sgdm+", 16, TINY)
    assert not bool(fresh.flows.trained)
    fresh.load_checkpoint(tmp_path / "model.safetensors")
    assert bool(fresh.flows.trained)
    mean, std = fresh.flows.sample(3, torch.Generator().manual_seed(0))
    assert mean.shape == std.shape == (3, 32) and torch.isfinite(mean).all()


def test_released_flow_names_and_config_named_flows(official_keys, tmp_path, caplog):
    """The authors ship `flow_tanh_mini_mean` / `_std` without an extension; `flows: {mean, std}` names any pair."""
    m = build("sgdm+", 16, TINY)
    save_file({k: v.contiguous() for k, v in m.trainable_state_dict().items()}, str(tmp_path / "model.safetensors"))
    mean, std = _fake_flow_state(official_keys["style_flow"], 1), _fake_flow_state(official_keys["style_flow"], 2)
    torch.save(mean, tmp_path / "flow_tanh_mini_mean")
    torch.save(std, tmp_path / "flow_tanh_mini_std")
    with caplog.at_level("INFO", logger="baselines.sgdm"):
        fresh = build("sgdm+", 16, {**TINY, "checkpoint": str(tmp_path / "model.safetensors")})
    assert bool(fresh.flows.trained) and torch.equal(fresh.flows.std.q0.loc, std["q0.loc"])
    assert "flow_tanh_mini_mean" in caplog.text
    named = tmp_path / "elsewhere"
    named.mkdir()
    torch.save(std, named / "m")
    torch.save(mean, named / "s")
    # the config's files win over those next to the checkpoint, with or without a checkpoint
    for extra in ({"checkpoint": str(tmp_path / "model.safetensors")}, {}):
        cfg = {**TINY, **extra, "flows": {"epochs": 3, "mean": str(named / "m"), "std": str(named / "s")}}
        b = build("sgdm+", 16, cfg)
        assert bool(b.flows.trained) and torch.equal(b.flows.mean.q0.loc, std["q0.loc"])
    with pytest.raises(InputError, match="mean/std"):
        build("sgdm+", 16, {**TINY, "flows": {"mean": str(named / "m")}})


def test_our_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    a = build("sgdm", 32, TINY)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in a.trainable_state_dict().items()}
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    b = build("sgdm", 32, {**TINY, "checkpoint": str(tmp_path / "model.safetensors")})
    for k, v in b.trainable_state_dict().items():
        assert torch.equal(v, state[k]), k
    # a checkpoint of another variant is refused with a clear message
    with pytest.raises(InputError, match="does not match"):
        build("sgdm-nomap", 32, TINY).load_checkpoint(tmp_path / "model.safetensors")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        a.load_checkpoint(bad)


def test_missing_backbone_weights_name_what_to_put_where(tmp_path):
    from baselines.sgdm.backbone import load_backbone
    from cmsrd.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="v2-1_512-ema-pruned.ckpt"):
        load_backbone(str(tmp_path / "v2-1_512-ema-pruned.ckpt"))
    with pytest.raises(MissingWeightsError, match="stable-diffusion-2-1-base"):
        load_backbone("stabilityai/stable-diffusion-2-1-base")  # tests run with HF_HUB_OFFLINE=1
    ckpt = tmp_path / "sd" / "v2-1_512-ema-pruned.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match="tokenizer"):
        load_backbone(str(ckpt))  # a single-file checkpoint has no tokenizer: it must be named first


# A PyTorch-Lightning 1.4 trainer file as the authors' SGDM-*.ckpt are: callback states keyed by the callback
# class, an omegaconf-like config (NEWOBJ + BUILD, a dataclass, an Enum via REDUCE, typing.Any, builtins.dict),
# optimizer and scheduler states. The classes live in temporary modules that are gone when the file is read.
_FAKE_MODULES = {
    "pytorch_lightning/__init__.py": "",
    "pytorch_lightning/callbacks/__init__.py": "",
    "pytorch_lightning/callbacks/model_checkpoint.py": "class ModelCheckpoint:\n    pass\n",
    "omegaconf/__init__.py": "",
    "omegaconf/dictconfig.py": """
import enum, typing
from dataclasses import dataclass, field

class Flag(enum.Enum):
    READONLY = 1

@dataclass
class ContainerMetadata:
    ref_type: typing.Any = typing.Any
    object_type: typing.Any = dict
    flags: dict = field(default_factory=dict)

class DictConfig:
    def __init__(self, content):
        self.__dict__["_content"] = content
        self.__dict__["_metadata"] = ContainerMetadata(flags={Flag.READONLY: False})
    def __getstate__(self):
        return dict(self.__dict__)
    def __setstate__(self, state):
        raise AssertionError("real omegaconf code must not run while loading")
""",
}


def _write_lightning_14_checkpoint(path: Path, state: dict, tmp_path: Path, monkeypatch) -> None:
    import importlib
    import sys

    src = tmp_path / "fake_modules"
    for rel, text in _FAKE_MODULES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    monkeypatch.syspath_prepend(str(src))
    mc = importlib.import_module("pytorch_lightning.callbacks.model_checkpoint")
    oc = importlib.import_module("omegaconf.dictconfig")
    ckpt = {
        "epoch": 3,
        "global_step": 119999,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {
            mc.ModelCheckpoint: {
                "monitor": "val_lpips",
                "best_model_score": torch.tensor(0.515),
                "best_model_path": "step=119999-val_lpips=0.515.ckpt",
                "dirpath": "ckpts",
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(2)}},
                "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "lr_schedulers": [{"base_lrs": [5e-5], "last_epoch": 5, "_last_lr": [5e-5]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"unet_config": oc.DictConfig({"in_channels": 4})},
    }
    torch.save(ckpt, path)
    for name in [m for m in sys.modules if m.split(".")[0] in ("pytorch_lightning", "omegaconf")]:
        monkeypatch.delitem(sys.modules, name)
    sys.path.remove(str(src))


def test_lightning_1_4_checkpoint_with_training_metadata_loads(official_keys, tmp_path, monkeypatch):
    import sys

    path = tmp_path / "step=119999-val_lpips=0.515.ckpt"
    state = _fake_state(official_keys["simu_nomap"], random_prefix="adapter.")
    _write_lightning_14_checkpoint(path, state, tmp_path, monkeypatch)
    assert "pytorch_lightning" not in sys.modules and "omegaconf" not in sys.modules
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.dictconfig.Flag",
        "typing.Any",
        "builtins.dict",
    } <= unsafe
    with pytest.raises(Exception, match="Unsupported global"):  # what plain weights_only does with this file
        torch.load(path, weights_only=True)
    loaded = load_torch_state(path)
    assert set(loaded) == set(state)
    assert torch.equal(loaded["adapter.conv_in.weight"], state["adapter.conv_in.weight"])
    assert "pytorch_lightning" not in sys.modules  # nothing was imported to read it
    m = build("sgdm-nomap", 32, SD, device="meta")
    m.load_checkpoint(path)
    assert m.loaded_from == path


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_checkpoint_calling_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callbacks": {"x": _Payload(marker)}}, path)
    with pytest.raises(InputError, match="system.*refusing"):
        load_torch_state(path)
    assert not marker.exists()


# ---- an official-layout checkpoint at a tiny geometry (UNet, VAE, OpenCLIP text tower, adapter) ----------------
# Two resnets per level and widths changing where SD2.1's do give the UNet SD2.1's ldm key names (those in
# sgdm-official-keys.json) at tiny widths.
LPB2 = {
    "network": {
        "backbone": {
            "pretrained": None,
            "geometry": "tiny",
            "overrides": {"unet": {"layers_per_block": 2, "block_out_channels": [32, 64, 128, 128]}},
        },
        "cond_channels": 64,
    },
    "sampler": {"steps": 2},
}


def unet_to_ldm(unet, ldm_names: list[str]) -> dict[str, torch.Tensor]:
    """Inverse of diffusers' UNet converter, found by converting numbered placeholders (it only renames)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    probe = convert_ldm_unet_checkpoint({k: torch.tensor(float(i)) for i, k in enumerate(ldm_names)}, unet.config)
    own = unet.state_dict()
    assert set(probe) == set(own)
    return {ldm_names[int(v)]: own[k].clone() for k, v in probe.items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    import re

    n = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in vae.state_dict().items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if ".mid_block.attentions.0." in k:
            head, _, tail = k.partition(".mid_block.attentions.0.")
            name, _, param = tail.rpartition(".")
            k, v = f"{head}.mid.attn_1.{attn[name]}.{param}", v[:, :, None, None] if v.ndim == 2 else v
        out["first_stage_model." + k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")] = (
            v.clone()
        )
    return out


def text_to_open_clip(text) -> dict[str, torch.Tensor]:
    p = "cond_stage_model.model."
    sd = {
        k if k.startswith("text_model.") else f"text_model.{k}": v  # transformers 5 dropped that level
        for k, v in text.state_dict().items()
        if "position_ids" not in k
    }
    out = {
        p + "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        p + "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        p + "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        p + "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
    }
    for i in range(text.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{x}_proj.{kind}") for x in "qkv"])
            for a, b in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    assert not sd, sorted(sd)
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny_official(official_keys, tmp_path_factory):
    """(source method, SGDM-syn.ckpt path, tokenizer folder) with every backbone part in the original layout."""
    torch.manual_seed(3)
    src = build("sgdm", 32, LPB2)
    state = unet_to_ldm(src.unet, [k for k in official_keys["simu"] if k.startswith("model.diffusion_model.")])
    state.update(vae_to_ldm(src.vae))
    state.update(text_to_open_clip(src.text_encoder))
    state.update({f"adapter.{k}": v.clone() for k, v in src.adapter.state_dict().items()})
    folder = tmp_path_factory.mktemp("official")
    src.tokenizer.save_pretrained(str(folder / "tokenizer"))
    torch.save({"state_dict": state, "global_step": 124999}, folder / "SGDM-syn.ckpt")
    return src, folder / "SGDM-syn.ckpt", folder / "tokenizer"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_ckpt_as_checkpoint_builds_the_backbone_from_that_file(tiny_official, caplog):
    """Only the tokenizer is needed: `pretrained` (here a hub id, unreachable offline) is not read, and there
    is no random-init warning."""
    src, ckpt, tok = tiny_official
    cfg = {
        **LPB2,
        "checkpoint": str(ckpt),
        "network": {
            **LPB2["network"],
            "backbone": {
                **LPB2["network"]["backbone"],
                "pretrained": "stabilityai/stable-diffusion-2-1-base",
                "tokenizer": str(tok),
            },
        },
    }
    with caplog.at_level("WARNING"):
        m = build("sgdm", 32, cfg)
    assert "random init" not in caplog.text
    assert m.backbone_source == f"official:{ckpt}" and m.loaded_from == ckpt
    for part in ("unet", "vae", "text_encoder", "adapter"):
        assert _same(getattr(m, part), getattr(src, part)), part
    assert m.tokenizer("water, ").input_ids == src.tokenizer("water, ").input_ids


def test_runner_builds_the_backbone_from_the_authors_ckpt(tiny_official, tmp_path):
    """`cmsrd-bench run --weights sgdm=SGDM-syn.ckpt` needs only a tokenizer folder: the runner hands the
    weights to the build as `checkpoint:`, so the default hub id (unreachable here) is never resolved."""
    from benchmark.runner import RunConfig, run_benchmark
    from cmsrd.testing import make_tiny_dataset

    src, ckpt, tok = tiny_official
    make_tiny_dataset(tmp_path / "x32", n_train=2, n_test=2, hr_px=64, lr_px=2)
    user = tmp_path / "sgdm.yaml"
    net = {
        **LPB2["network"],
        "backbone": {
            **LPB2["network"]["backbone"],
            "pretrained": "stabilityai/stable-diffusion-2-1-base",
            "tokenizer": str(tok),
        },
    }
    user.write_text(yaml.safe_dump({**LPB2, "network": net}))
    info = run_benchmark(
        RunConfig(
            data=tmp_path / "x32",
            out=tmp_path / "run",
            methods=["sgdm"],
            metrics=["psnr_y"],
            weights={"sgdm": ckpt},
            configs={"sgdm": user},
            device="cpu",
        )
    )
    m = info["methods"]["sgdm|default"]
    assert m["status"] == "ok", m
    assert m["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_partial_official_text_tower_is_refused(tiny_official, tmp_path):
    _, ckpt, tok = tiny_official
    state = load_torch_state(ckpt)
    del state["cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight"]
    bad = tmp_path / "partial.ckpt"
    torch.save({"state_dict": state}, bad)
    net = {**LPB2["network"], "backbone": {**LPB2["network"]["backbone"], "tokenizer": str(tok)}}
    with pytest.raises(InputError, match="1 text encoder tensors missing.*layers.1.mlp.fc1.weight"):
        build("sgdm", 32, {**LPB2, "network": net}).load_checkpoint(bad)  # over a built backbone
    with pytest.raises(InputError, match="1 text encoder tensors missing"):
        build("sgdm", 32, {**LPB2, "network": net, "checkpoint": str(bad)})  # backbone from the file


def _net(**backbone) -> dict:
    return {**LPB2, "network": {**LPB2["network"], "backbone": {**LPB2["network"]["backbone"], **backbone}}}


def test_official_ckpt_takes_the_tokenizer_from_pretrained(tiny_official, tmp_path, monkeypatch):
    """Regression: with `tokenizer: null`, a `pretrained` diffusers folder or a cached hub id supplies the
    tokenizer (only the tokenizer: the weights come from the .ckpt); with none of them one error names
    `network.backbone.tokenizer` and every place looked in."""
    import shutil

    import huggingface_hub.constants

    from cmsrd.errors import MissingWeightsError

    src, ckpt, tok = tiny_official
    lone = tmp_path / "lone" / "SGDM-syn.ckpt"  # no tokenizer folder beside it
    lone.parent.mkdir()
    lone.symlink_to(ckpt)
    ids = src.tokenizer("water, land, ").input_ids
    shutil.copytree(tok, tmp_path / "sd21" / "tokenizer")
    m = build("sgdm", 32, {**_net(pretrained=str(tmp_path / "sd21"), tokenizer=None), "checkpoint": str(lone)})
    assert m.backbone_source == f"official:{lone}" and m.tokenizer("water, land, ").input_ids == ids
    assert _same(m.unet, src.unet)
    # `pretrained:` as a single-file SD checkpoint: its folder's tokenizer/ (as load_backbone uses it)
    (tmp_path / "sd21" / "v2-1_512-ema-pruned.ckpt").write_bytes(b"not read")
    m = build(
        "sgdm",
        32,
        {
            **_net(pretrained=str(tmp_path / "sd21" / "v2-1_512-ema-pruned.ckpt"), tokenizer=None),
            "checkpoint": str(lone),
        },
    )
    assert m.tokenizer("water, land, ").input_ids == ids

    repo = tmp_path / "hub" / "models--stabilityai--stable-diffusion-2-1-base"
    shutil.copytree(tok, repo / "snapshots" / "abc" / "tokenizer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = _net(pretrained="stabilityai/stable-diffusion-2-1-base", tokenizer=None)
    m = build("sgdm", 32, {**hub, "checkpoint": str(lone)})
    assert m.tokenizer("water, land, ").input_ids == ids

    shutil.rmtree(repo / "snapshots" / "abc" / "tokenizer")
    with pytest.raises(MissingWeightsError, match=r"network\.backbone\.tokenizer") as err:
        build("sgdm", 32, {**hub, "checkpoint": str(lone)})
    assert "hub id stabilityai/stable-diffusion-2-1-base" in str(err.value) and str(lone.parent / "tokenizer") in str(
        err.value
    )
    assert "weights fetch" not in str(err.value)  # the weights manifest has no tokenizer
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="network.backbone.tokenizer = .*empty"):  # no vocab.json
        build("sgdm", 32, {**_net(tokenizer=str(tmp_path / "empty")), "checkpoint": str(ckpt)})


def test_incomplete_tokenizer_folder_is_refused_at_build(tiny_official, tmp_path):
    """Regression: vocab.json + merges.txt alone loaded with model_max_length 1e30 and <|endoftext|> padding,
    and the first super_resolve died with OverflowError; the folder is now refused when the model is built."""
    import shutil

    _, ckpt, _ = tiny_official
    import os
    import tempfile

    char = char_tokenizer()  # writes its vocab.json + merges.txt there
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(Path(tempfile.gettempdir()) / f"cmsrd-char-tokenizer-{os.getuid()}" / f, tmp_path / f)
    with pytest.raises(InputError, match=r"incomplete \(no tokenizer_config.json.*special_tokens_map.json"):
        build("sgdm", 32, {**_net(tokenizer=str(tmp_path)), "checkpoint": str(ckpt)})
    char.model_max_length = int(1e30)
    char.save_pretrained(str(tmp_path / "long"))
    with pytest.raises(InputError, match="model_max_length 1000000000000000019884624838656 \\(expected 77"):
        build("sgdm", 32, {**_net(tokenizer=str(tmp_path / "long")), "checkpoint": str(ckpt)})


def test_official_ckpt_of_another_variant_fails_before_the_tokenizer_and_the_conversion(tiny_official, tmp_path):
    """Regression: SGDM-syn.ckpt given to sgdm+ first asked for a tokenizer, then converted the whole backbone,
    and only then said it was the wrong variant."""
    _, ckpt, _ = tiny_official
    lone = tmp_path / "SGDM-syn.ckpt"  # no tokenizer anywhere
    lone.symlink_to(ckpt)
    with pytest.raises(InputError, match="is an official 'simu' model, this method is 'real'"):
        build("sgdm+", 16, {**_net(pretrained=None, tokenizer=None), "checkpoint": str(lone)})


def test_local_tokenizer_beside_the_ckpt_is_used_before_the_hub(tiny_official, tmp_path, monkeypatch):
    """Regression: with the default hub id as `pretrained`, every build went to the network (about 47 s of
    retries offline) before using the tokenizer/ folder beside the .ckpt."""
    from baselines.sgdm import backbone

    src, ckpt, tok = tiny_official
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(backbone, "_hub_tokenizer_folder", lambda *a, **k: pytest.fail("hub tried before local"))
    m = build(
        "sgdm",
        32,
        {**_net(pretrained="stabilityai/stable-diffusion-2-1-base", tokenizer=None), "checkpoint": str(ckpt)},
    )
    assert m.tokenizer("water, ").input_ids == src.tokenizer("water, ").input_ids


@pytest.mark.parametrize(
    "override,part",
    [({"unet": {"block_out_channels": [32, 64, 128, 256]}}, "UNet"), ({"vae": {"latent_channels": 8}}, "VAE")],
)
def test_official_ckpt_of_another_geometry_is_one_input_error(tiny_official, override, part):
    """Regression: a shape mismatch raised torch's RuntimeError (load_state_dict raises it even with
    strict=False); now load_strict names the part and the mismatched tensors."""
    _, ckpt, tok = tiny_official
    overrides = {**LPB2["network"]["backbone"]["overrides"], **override}
    if "unet" in override:
        overrides["unet"] = {**LPB2["network"]["backbone"]["overrides"]["unet"], **override["unet"]}
    with pytest.raises(InputError, match=rf"\({part}\): does not match the model.*shape mismatches \['"):
        build("sgdm", 32, {**_net(tokenizer=str(tok), overrides=overrides), "checkpoint": str(ckpt)})


def test_resumed_build_still_takes_the_frozen_backbone_from_the_official_ckpt(tiny_official):
    """`registry.build(load_checkpoint=False)` (a resumed training run) restores only trained tensors and
    buffers from the run; the frozen UNet body, VAE and text tower exist only in the official file, so SGDM
    reads it anyway (with `pretrained: null` a skip would resume on a random backbone)."""
    from baselines import registry
    from benchmark.train import resumable_state

    src, ckpt, tok = tiny_official
    m = registry.build("sgdm", 32, {**_net(tokenizer=str(tok)), "checkpoint": str(ckpt)}, load_checkpoint=False)
    assert m.loaded_from == ckpt
    for part in ("unet", "vae", "text_encoder"):
        assert _same(getattr(m, part), getattr(src, part)), part
    saved = resumable_state(m, m.configure_optimizers(train_config(m.settings.train)))
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in saved)  # what a resume cannot restore
    assert "unet.conv_in.weight" not in saved


def test_meta_build_reads_no_file_and_named_flows_need_sgdm_plus(tmp_path):
    """Regression: a meta build (parameter counts) read the whole checkpoint (an official one also needed the
    tokenizer); `flows: {mean, std}` was silently ignored by the variants without flows."""
    gone = {
        "checkpoint": str(tmp_path / "absent.ckpt"),
        "flows": {"mean": str(tmp_path / "m"), "std": str(tmp_path / "s")},
    }
    m = build("sgdm+", 16, {**TINY, **gone}, device="meta")
    assert m.loaded_from is None and m.parameter_counts()[0] > 0
    for name in ("sgdm", "sgdm-nomap"):
        with pytest.raises(InputError, match=rf"config flows.mean: {name} has no style flows"):
            build(name, 32, {**TINY, "flows": gone["flows"]})


@pytest.mark.parametrize("zip_format", [True, False])
def test_metadata_the_safe_loader_cannot_rebuild_says_how_to_extract_the_weights(tmp_path, zip_format):
    """Regression: a non-empty dict subclass in the metadata (weights_only refuses SETITEMS on it) or a legacy
    non-zip file surfaced torch's advice to set weights_only=False, and the fix named the file just given."""
    import collections

    path = tmp_path / "it's odd.ckpt"  # a quote in the path must not break the suggested command
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "callbacks": collections.defaultdict(list, {"a": [1]})},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(InputError, match="training metadata this loader cannot rebuild safely") as err:
        load_torch_state(path)
    msg = str(err.value)
    assert "weights_only` set to `False`" not in msg and "extract its weights once" in msg
    assert ("legacy non-zip torch format" in msg) != zip_format
    assert "collections.defaultdict" in msg
    import shlex

    argv = shlex.split(msg.split("once: ")[1].split(" (or save")[0])  # the suggested command, as a shell parses it
    assert argv[:2] == ["python", "-c"]
    exec(argv[2])  # on this trusted file
    assert list(load_torch_state(f"{path}.weights.pt")) == ["w"]


class _System:
    def __reduce__(self):
        return (__import__("os").system, ("true",))


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_code_in_any_pickle_format_is_refused_without_weights_only_false_advice(tmp_path, kind):
    """Regression: a legacy torch file or a raw pickle calling os.system was called "training metadata" and the
    fix suggested torch.load(weights_only=False); every format is now scanned (pickletools runs nothing) first."""
    import pickle

    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"w": torch.zeros(1)}, "x": _System()}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(
        InputError, match=r"references .*(posix|os|nt)\.system.*not checkpoint metadata; refusing"
    ) as err:
        load_torch_state(path)
    assert "weights_only=False" not in str(err.value) and "training metadata" not in str(err.value)


def _with_metadata(path: Path, ops: bytes) -> None:
    """A torch.save zip whose pickle also sets top-level "meta" to the result of the raw pickle opcodes `ops`."""
    import zipfile

    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with zipfile.ZipFile(path) as z:
        data = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in data if n.endswith("data.pkl"))
    assert data[pkl].endswith(b".")
    data[pkl] = data[pkl][:-1] + b"X\x04\x00\x00\x00meta" + ops + b"s."  # SETITEM on the top dict, STOP
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, b in data.items():
            z.writestr(n, b)


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw  # BINUNICODE


@pytest.mark.parametrize("call", ["numpy\nsave", "numpy\nsavetxt", "pathlib\nPosixPath", "collections\nnamedtuple"])
def test_importable_metadata_callables_are_never_run(tmp_path, call):
    """Names from the metadata modules are importable (numpy.save would write a file): the loader must bind
    them to inert stubs, never to the real objects. The REDUCE below would create `marker` if it ran."""
    marker = tmp_path / "marker"
    path = tmp_path / "m.ckpt"
    _with_metadata(path, b"c" + call.encode() + b"\n" + _str(str(marker)) + _str("x") + b"\x86R")  # f(marker, "x")
    state = load_torch_state(path)
    assert list(state) == ["w"]
    with torch.serialization.safe_globals(_metadata_stubs(path)):  # what the loader binds, seen directly
        assert isinstance(torch.load(path, weights_only=True)["meta"], _Inert)  # a real PosixPath would pass the rest
    assert not list(tmp_path.glob("marker*")), "a metadata callable ran"
