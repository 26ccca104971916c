"""The VQ-f4 autoencoder of CompVis LDM-SR and ResShift (VQ-regularised, 4x downsampling, 3 latent channels).

Built as diffusers' `VQModel`: at the official geometry (ch 128, ch_mult [1, 2, 4], 2 ResBlocks per level,
mid-block attention, embed_dim 3, n_embed 8192) it has exactly the official 55,322,782 parameters and one
tensor per official tensor, so the CompVis / ResShift checkpoints (`autoencoder_vq_f4.pth`, LDM
`first_stage_model.*`) load after a key rename (`convert_ldm_vq`), and the diffusers layout (`vqvae/`) loads
as it is. `encode` gives the pre-quantisation latent (encoder + quant_conv), `decode` quantises to the
codebook first, as the official `VQModelTorch.decode` does by default.

A `tiny` geometry (the same tensor names, narrow: widths 32/64/128, 64 codes) serves CPU tests.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from cmsrd.errors import InputError

log = logging.getLogger(__name__)

GEOMETRIES: dict[str, dict[str, Any]] = {
    "vq-f4": {"block_out_channels": (128, 256, 512), "num_vq_embeddings": 8192, "norm_num_groups": 32},
    "tiny": {"block_out_channels": (32, 64, 128), "num_vq_embeddings": 64, "norm_num_groups": 32},
}
FACTOR = 4  # spatial downsampling of every geometry here (three levels)
LATENT_CHANNELS = 3
LAYOUTS = (
    "the CompVis/ResShift VQ-f4 layout (`encoder.down.*`, optionally under `first_stage_model.`) or diffusers' VQModel"
)


def build_vq_f4(geometry: str = "vq-f4"):
    """A randomly initialised VQ-f4 `diffusers.VQModel` of a named geometry (`GEOMETRIES`)."""
    from diffusers import VQModel

    if geometry not in GEOMETRIES:
        raise InputError(f"autoencoder geometry {geometry!r}", f"unknown; choose from {sorted(GEOMETRIES)}")
    g = GEOMETRIES[geometry]
    n = len(g["block_out_channels"])
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(g["block_out_channels"]),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=LATENT_CHANNELS,
        vq_embed_dim=LATENT_CHANNELS,
        num_vq_embeddings=g["num_vq_embeddings"],
        norm_num_groups=g["norm_num_groups"],
    )


_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def is_ldm_layout(state: dict[str, torch.Tensor], prefix: str = "") -> bool:
    return any(k.startswith(f"{prefix}encoder.down.") for k in state)


def convert_ldm_vq(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """CompVis/ResShift VQ-f4 names (`prefix` + `encoder.down.I.block.J`, `decoder.up.I...`, `mid.attn_1.q`)
    -> diffusers VQModel names. Decoder `up` indices run the other way in diffusers; the 1x1-conv attention
    projections become linear weights. Keys outside `prefix` are ignored; a key under it that has no
    counterpart raises ValueError naming it (another architecture, not a VQ-f4 autoencoder)."""
    ups = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}decoder\.up\.(\d+)\.", k))}
    n_up = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        new = _rename(key[len(prefix) :], n_up)
        if new is None:
            raise ValueError(f"tensor {key!r} has no counterpart in the VQ-f4 autoencoder")
        if re.search(r"attentions\.0\.(to_[qkv]|to_out\.0)\.weight$", new) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _rename(key: str, n_up: int) -> str | None:
    if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
        return key
    if key == "quantize.embedding.weight":
        return key
    m = re.match(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)$", key)
    if m:
        part, name, p = m.groups()
        return f"{part}.{'conv_norm_out' if name == 'norm_out' else name}.{p}"
    m = re.match(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)$", key)
    if m:
        part, i, name, p = m.groups()
        return f"{part}.mid_block.resnets.{int(i) - 1}.{_RESNET.get(name, name)}.{p}"
    m = re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key)
    if m and m.group(2) in _ATTN:
        part, name, p = m.groups()
        return f"{part}.mid_block.attentions.0.{_ATTN[name]}.{p}"
    m = re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", key)
    if m:
        i, j, name, p = m.groups()
        return f"encoder.down_blocks.{i}.resnets.{j}.{_RESNET.get(name, name)}.{p}"
    m = re.match(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$", key)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    m = re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", key)
    if m:
        i, j, name, p = m.groups()
        return f"decoder.up_blocks.{n_up - 1 - int(i)}.resnets.{j}.{_RESNET.get(name, name)}.{p}"
    m = re.match(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$", key)
    if m:
        return f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    return None


def load_vq_f4(model: torch.nn.Module, path: str | Path, prefix: str = "first_stage_model.") -> None:
    """Load VQ-f4 weights strictly from `path`: the official layout (plain or under `prefix`, e.g. an LDM
    Lightning checkpoint's `first_stage_model.`) or diffusers' (a `vqvae/` safetensors or .bin). One
    InputError naming the file and the differing keys otherwise."""
    from ..checkpoint import load_strict, read_state_dict

    path = Path(path)
    state = read_state_dict(path)
    what = f"autoencoder checkpoint {path}"
    try:
        if is_ldm_layout(state, prefix):
            state = convert_ldm_vq(state, prefix)
        elif is_ldm_layout(state):
            state = convert_ldm_vq(state)
    except ValueError as e:
        raise InputError(what, str(e), f"use a VQ-f4 autoencoder checkpoint in {LAYOUTS}") from e
    load_strict(model, state, what, "use the VQ-f4 autoencoder of the same geometry (autoencoder.geometry)", LAYOUTS)
    log.info("VQ-f4 autoencoder loaded from %s", path)
