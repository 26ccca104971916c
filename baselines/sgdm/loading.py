"""Where an SGDM method's weights come from: the backbone source at build, then its checkpoint and flows.

Kept apart from the network (`model.py`) because a checkpoint decides parts the network only holds: an
official `.ckpt` carries the whole SD2.1 backbone, our safetensors only the trained tensors, and the style
flows of `sgdm+` live in files next to either.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cmsrd.errors import InputError
from cmsrd.io import sha256_file

from .backbone import (
    Backbone,
    backbone_from_original_state,
    load_backbone,
    load_original_parts,
    random_backbone,
    resolve_tokenizer,
)
from .convert import (
    adapter_state,
    detect_variant,
    find_flow_files,
    has_backbone,
    is_official,
    load_strict,
    load_torch_state,
)
from .prompt import PromptEncoder

if TYPE_CHECKING:
    from .config import BackboneConfig, FlowsConfig
    from .model import SGDMBase

log = logging.getLogger(__name__)
FLOWS_FILE = "flows.safetensors"
FLOW_HINT = "`flows: {mean: PATH, std: PATH}` in the config, or flow_tanh_mini_mean/_std next to the checkpoint"


def read_build_checkpoint(ckpt: Any, on_meta: bool) -> tuple[dict[str, torch.Tensor] | None, bool]:
    """(state, whether it holds the whole backbone) of a `checkpoint:` read once at build: an official
    `.ckpt` supplies the backbone, so it must be read before the backbone is built, and not twice."""
    if on_meta or not ckpt or Path(ckpt).suffix == ".safetensors":
        return None, False
    state = load_torch_state(Path(ckpt))
    return state, has_backbone(state)


def build_backbone(name: str, bcfg: BackboneConfig, ckpt: Any, official: dict | None, on_meta: bool) -> Backbone:
    """The UNet/VAE/text tower from the first source that applies: structure only on meta, the official
    `.ckpt` (then `pretrained` is read for the tokenizer only), else `pretrained` (None: random init)."""
    if on_meta:  # structure only (parameter counts): no weights are read, whatever the source
        return random_backbone(bcfg.geometry, bcfg.overrides)
    if official is not None:  # the authors' .ckpt holds the whole SD2.1 backbone
        tok = resolve_tokenizer(bcfg.tokenizer, bcfg.pretrained, ckpt)
        if bcfg.pretrained is not None:
            log.info(
                "%s: backbone weights from %s; backbone.pretrained (%s) not read for weights",
                name,
                ckpt,
                bcfg.pretrained,
            )
        return backbone_from_original_state(official, bcfg.geometry, tok, f"official:{Path(ckpt)}", bcfg.overrides)
    return load_backbone(bcfg.pretrained, bcfg.geometry, bcfg.tokenizer, bcfg.overrides)


def load_checkpoint(
    m: SGDMBase, path: str | Path, state: dict[str, torch.Tensor] | None = None, backbone_loaded: bool = False
) -> None:
    """Our safetensors (from the trainer) or the authors' Lightning `.ckpt` into `m` (`state`: that file,
    already read; `backbone_loaded`: its backbone was built from it, so only the adapter is left); flows
    found next to it unless the config names them (`flows: {mean, std}`)."""
    path = Path(path)
    state = load_torch_state(path) if state is None else state
    if is_official(state):
        check_variant(m, state, path)
        if not backbone_loaded:
            _load_official_backbone(m, state, path)
        load_strict(m.adapter, adapter_state(state), f"checkpoint {path} (adapter)")
    else:
        _load_ours(m, state, path)
    if m.flows is not None and not (m.settings.flows.mean or m.settings.flows.std):
        load_flows_near(m, path)
    m.loaded_from = path


def check_variant(m: SGDMBase, state: dict[str, torch.Tensor], path: Path) -> None:
    """An official checkpoint of another variant (SGDM-syn.ckpt given to sgdm+) is one clear error."""
    found = detect_variant(state)
    if found != m.variant:
        raise InputError(
            f"checkpoint {path}",
            f"is an official {found!r} model, this method is {m.variant!r}",
            "use SGDM-real.ckpt with sgdm+, SGDM-syn.ckpt with sgdm, the no-map one with sgdm-nomap",
        )


def _load_official_backbone(m: SGDMBase, state: dict[str, torch.Tensor], path: Path) -> None:
    """The UNet, and the VAE and text tower when present, of an official checkpoint over a built backbone."""
    if m.backbone_source.startswith("random:") and any(k.startswith("cond_stage_model.model.") for k in state):
        bcfg = m.settings.network.backbone  # real text weights need the real vocabulary
        m.tokenizer = resolve_tokenizer(bcfg.tokenizer, bcfg.pretrained, path)
        m.prompt_encoder = PromptEncoder(m.tokenizer, m.text_encoder)
    parts = load_original_parts(m.unet, m.vae, m.text_encoder, state, str(path), required=False)
    m.prompt_encoder.clear()
    log.info("%s: %s loaded from %s", m.spec.name, ", ".join(parts), path)
    m.backbone_source = f"official:{path}"


def _load_ours(m: SGDMBase, state: dict[str, torch.Tensor], path: Path) -> None:
    groups: dict[str, dict[str, torch.Tensor]] = {"adapter": {}, "unet": {}, "flows": {}}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head not in groups or (head == "flows" and m.flows is None):
            raise InputError(
                f"checkpoint {path}",
                f"unexpected tensor {k!r} for {m.spec.name}",
                "load a checkpoint trained for this method",
            )
        groups[head][rest] = v
    load_strict(m.adapter, groups["adapter"], f"checkpoint {path} (adapter)")
    unet_own = dict(m.unet.named_parameters())
    want = {k for k, p in unet_own.items() if p.requires_grad}
    if set(groups["unet"]) != want:
        raise InputError(f"checkpoint {path}", "UNet attention tensors do not match this backbone geometry")
    with torch.no_grad():
        for k, v in groups["unet"].items():
            if v.shape != unet_own[k].shape:
                raise InputError(
                    f"checkpoint {path}", f"{k} has shape {tuple(v.shape)}, expected {tuple(unet_own[k].shape)}"
                )
            unet_own[k].copy_(v)
    if groups["flows"]:
        load_strict(m.flows, groups["flows"], f"checkpoint {path} (flows)")


def load_flows_near(m: SGDMBase, checkpoint: Path) -> None:
    """Stage-2 `flows.safetensors`, else the official flow files (`convert.FLOW_FILES`), next to `checkpoint`.
    Our flows are fitted to one stage-1 file's style encoder (recorded as `stage1_weights`): loading them
    with another checkpoint is allowed (the style space drifts, not the shapes) but logged as a warning."""
    directory = checkpoint.parent
    ours = directory / FLOWS_FILE
    if ours.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        load_strict(m.flows, load_file(str(ours)), f"flows {ours}")
        with safe_open(str(ours), "pt") as f:
            fitted_to = json.loads((f.metadata() or {}).get("stage1_weights", "null"))
        # the bytes decide, not the name: a copied or renamed stage-1 file is the same style encoder
        if fitted_to and fitted_to.get("sha256") != sha256_file(checkpoint):
            log.warning(
                "%s: %s were fitted to the style encoder of %s (sha256 %.12s), not of %s; run that "
                "file, or re-run stage 2 for this one",
                m.spec.name,
                ours,
                fitted_to.get("name"),
                fitted_to.get("sha256"),
                checkpoint.name,
            )
        log.info("%s: style flows from %s", m.spec.name, ours)
        return
    official = find_flow_files(directory)
    if official:
        load_official_flows(m, *official)


def load_named_flows(m: SGDMBase, cfg: FlowsConfig) -> None:
    """`flows: {mean: PATH, std: PATH}`: the official flow state dicts named in the config (both: checked
    when the config is parsed)."""
    load_official_flows(m, Path(cfg.mean).expanduser(), Path(cfg.std).expanduser())


def load_official_flows(m: SGDMBase, mean: Path, std: Path) -> None:
    load_strict(m.flows.mean, load_torch_state(mean), f"flow {mean}")
    load_strict(m.flows.std, load_torch_state(std), f"flow {std}")
    m.flows.trained.fill_(True)
    log.info("%s: style flows from %s and %s", m.spec.name, mean, std)
