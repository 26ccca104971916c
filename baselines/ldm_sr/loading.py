"""Where an `ldm-sr` method's weights come from: ours, the CompVis Lightning checkpoint, diffusers' layout.

- ours: `model.safetensors` from the trainer (the UNet under diffusers' names, metadata method/scale);
- CompVis bsr_sr `model.ckpt`: `state_dict` with `model.diffusion_model.*` (the UNet), `model_ema.*` (its EMA,
  names without dots, used by default as the official sampling does) and `first_stage_model.*` (the VQ-f4);
- diffusers `CompVis/ldm-super-resolution-4x-openimages`: a folder with `unet/` and `vqvae/`, or one of them,
  or the weights file inside it.
Every file is read weights-only (`baselines.checkpoint.read_state_dict`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cmsrd.errors import InputError

from ..archs.vqf4 import convert_ldm_vq, is_ldm_layout
from ..archs.vqf4 import load_vq_f4 as _load_vq
from ..checkpoint import load_strict, read_metadata, read_state_dict
from .unet import convert_ldm_unet, name_table

if TYPE_CHECKING:
    from .model import LDMSR

log = logging.getLogger(__name__)

UNET_PREFIX, EMA_PREFIX, VQ_PREFIX = "model.diffusion_model.", "model_ema.", "first_stage_model."
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LAYOUTS = (
    "ours (model.safetensors), the CompVis bsr_sr Lightning model.ckpt (model.diffusion_model.*, model_ema.*, "
    "first_stage_model.*) or diffusers' LDMSuperResolutionPipeline folder (unet/, vqvae/)"
)
PARTS = ("net_g", "autoencoder")
FIX = "use the CompVis bsr_sr model.ckpt, the diffusers ldm-super-resolution-4x-openimages folder or an ldm-sr run"


def diffusers_file(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


def load_checkpoint(m: LDMSR, path: str | Path) -> None:
    """Any of the layouts above into `m` (the UNet, and the autoencoder where the source carries it). All or
    nothing: a source whose second part fails (the VQ of a folder or .ckpt) leaves `m` as it was."""
    path = Path(path).expanduser()
    saved = {n: {k: v.detach().to("cpu", copy=True) for k, v in getattr(m, n).state_dict().items()} for n in PARTS}
    source = m.autoencoder_source
    try:
        if path.is_dir():
            _load_folder(m, path)
        else:
            _load_file(m, path)
    except BaseException:
        for name, state in saved.items():
            getattr(m, name).load_state_dict(state)
        m.autoencoder_source = source
        raise
    m.loaded_from = path


def _load_folder(m: LDMSR, folder: Path) -> None:
    unet_file = diffusers_file(folder / "unet") or diffusers_file(folder)
    vq_file = diffusers_file(folder / "vqvae")
    if unet_file is None:
        raise InputError(
            f"checkpoint folder {folder}",
            f"holds no UNet weights ({' or '.join(WEIGHT_FILES)} in it or in unet/)",
            f"point it at the diffusers pipeline folder or a weights file; {FIX}",
        )
    _load_file(m, unet_file)
    if vq_file is not None:
        _load_vq(m.autoencoder, vq_file)
        m.autoencoder_source = str(vq_file)


def _load_file(m: LDMSR, path: Path) -> None:
    meta = read_metadata(path)
    what = f"checkpoint {path}"
    if meta.get("method") not in (None, m.spec.name):
        raise InputError(
            what, f"was saved by method {meta['method']!r}, not {m.spec.name!r}", "load it with that method"
        )
    if meta.get("scale") not in (None, m.scale):
        raise InputError(
            what,
            f"was trained at x{meta['scale']}, this method is built at x{m.scale}",
            f"use --scale {meta['scale']}, or fine-tune x{m.scale} from the official x4 weights",
        )
    if meta.get("schedule") not in (None, m.schedule):
        raise InputError(
            what,
            f"was trained with schedule {meta['schedule']}, the method is built with {m.schedule}",
            f"set `schedule:` in the config to {meta['schedule']}",
        )
    state = read_state_dict(path, strip_module=False)
    if any(k.startswith(UNET_PREFIX) for k in state):
        _load_lightning(m, state, path)
        return
    if (
        is_ldm_layout(state)
        or is_ldm_layout(state, VQ_PREFIX)
        or any(k.startswith("encoder.down_blocks.") for k in state)
    ):
        raise InputError(
            what,
            "is a VQ autoencoder, not the LDM-SR UNet",
            "give it as `autoencoder.weights`; `checkpoint:` is the UNet (or the whole CompVis model.ckpt)",
        )
    if "input_blocks.0.0.weight" in state:  # the CompVis UNet alone, without the Lightning prefixes
        state = _convert(m, state, what)
    load_strict(m.net_g, state, what, "use an LDM-SR UNet of the configured `network.geometry`", LAYOUTS)
    log.info("%s: UNet loaded from %s", m.spec.name, path)


def _convert(m: LDMSR, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    try:
        return convert_ldm_unet(state, m.net_g)
    except ValueError as e:
        raise InputError(what, f"is not the CompVis LDM-SR (bsr_sr) UNet of this geometry: {e}", FIX) from e


def ema_names(m: LDMSR) -> dict[str, str]:
    """LitEma's dotless names (`model_ema.diffusion_modelinput_blocks00weight`) -> the official names."""
    out = {}
    for name, _ in name_table(m.net_g).values():
        out[EMA_PREFIX + ("diffusion_model." + name).replace(".", "")] = name
    return out


def _load_lightning(m: LDMSR, state: dict[str, torch.Tensor], path: Path) -> None:
    what = f"checkpoint {path}"
    unet = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    source = "model.diffusion_model"
    if m.settings.ema_weights and any(k.startswith(EMA_PREFIX) for k in state):
        names = ema_names(m)
        ema = {names[k]: v for k, v in state.items() if k in names}
        if len(ema) != len(names):
            lacking = sorted(set(names) - set(state))
            raise InputError(
                what,
                f"has model_ema.* but not for every UNet tensor ({len(lacking)} missing, e.g. {lacking[:2]})",
                "set `ema_weights: false` to load model.diffusion_model.* instead",
            )
        unet, source = ema, "model_ema"
    load_strict(m.net_g, _convert(m, unet, what), what, "use an LDM-SR UNet of the configured geometry", LAYOUTS)
    parts = [f"UNet ({source})"]
    if is_ldm_layout(state, VQ_PREFIX):
        try:
            vq = convert_ldm_vq(state, VQ_PREFIX)
        except ValueError as e:
            raise InputError(what, f"first_stage_model: {e}", FIX) from e
        load_strict(m.autoencoder, vq, f"{what} (first_stage_model)", "use autoencoder.geometry vq-f4")
        m.autoencoder_source = f"{path}:first_stage_model"
        parts.append("VQ-f4 autoencoder")
    log.info("%s: %s loaded from %s", m.spec.name, ", ".join(parts), path)
