"""The LDM-SR denoiser as diffusers' `UNet2DModel`, and the CompVis `openaimodel.UNetModel` key converter.

At the bsr_sr geometry (model_channels 160, channel_mult [1, 2, 2, 4], 2 ResBlocks per level, attention at
the 8x level and in the middle block, 32 channels per head, in 6 / out 3) `UNet2DModel` has exactly the
official 113,622,563 parameters, one tensor per official tensor except attention: CompVis stores q, k and v
as one fused 1x1 conv (`qkv`, laid out head by head: [q_h, k_h, v_h] for each head h, the "legacy" order),
diffusers as three linear layers. The name map is derived from the built network's own keys, so the same
converter serves the tiny test geometry and names every tensor it cannot place.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from cmsrd.errors import InputError

GEOMETRIES: dict[str, dict[str, Any]] = {
    "bsr-sr": {"block_out_channels": (160, 320, 320, 640), "layers_per_block": 2},
    "tiny": {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1},
}
HEAD_CHANNELS = 32  # official num_head_channels
DOWNSAMPLES = 3  # four levels: the latent side must be a multiple of 8

_RES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_ATTN = {"group_norm": "norm", "to_q": "qkv", "to_k": "qkv", "to_v": "qkv", "to_out.0": "proj_out"}
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}


def build_unet(geometry: str = "bsr-sr", in_channels: int = 6, out_channels: int = 3, sample_size: int = 64):
    """A randomly initialised LDM-SR UNet (`diffusers.UNet2DModel`) of a named geometry; attention only at the
    deepest level (official attention_resolutions [16, 8]: 16x is never reached with four levels)."""
    from diffusers import UNet2DModel

    if geometry not in GEOMETRIES:
        raise InputError(f"network.geometry {geometry!r}", f"unknown; choose from {sorted(GEOMETRIES)}")
    g = GEOMETRIES[geometry]
    n = len(g["block_out_channels"])
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(g["block_out_channels"]),
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        layers_per_block=g["layers_per_block"],
        attention_head_dim=HEAD_CHANNELS,
        flip_sin_to_cos=True,  # ldm's timestep_embedding puts cos first
        freq_shift=0,
        norm_num_groups=32,
        norm_eps=1e-5,
        downsample_padding=1,
        act_fn="silu",
        time_embedding_type="positional",
    )


def official_name(key: str, layers: int, up_has_attention: set[int]) -> tuple[str, int | None] | None:
    """diffusers UNet2DModel name -> (CompVis UNetModel name, q/k/v part of the fused `qkv` or None)."""
    simple = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    m = re.match(r"(.+)\.(weight|bias)$", key)
    if m is None:
        return None
    body, p = m.groups()
    if body in simple:
        return f"{simple[body]}.{p}", None
    stride = layers + 1  # ResBlocks per level plus the resampler
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", body)
    if m:
        where, level, kind, j, sub = m.groups()
        if where == "down_blocks":
            block = f"input_blocks.{1 + int(level) * stride + int(j)}"
        else:
            block = f"output_blocks.{int(level) * stride + int(j)}"
        return _sub(block, kind, sub, p)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", body)
    if m:
        kind, j, sub = m.groups()
        index = 1 if kind == "attentions" else 2 * int(j)
        return _sub(f"middle_block.{index}", kind, sub, p)
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", body)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * stride}.0.op.{p}", None
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", body)
    if m:
        level = int(m.group(1))
        slot = 2 if level in up_has_attention else 1
        return f"output_blocks.{level * stride + layers}.{slot}.conv.{p}", None
    return None


def _sub(block: str, kind: str, sub: str, p: str) -> tuple[str, int | None] | None:
    """Input/output blocks hold [ResBlock, AttentionBlock, resampler]; middle_block's slots are the modules."""
    if not block.startswith("middle_block"):
        block = f"{block}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        return (f"{block}.{_RES[sub]}.{p}", None) if sub in _RES else None
    return (f"{block}.{_ATTN[sub]}.{p}", _QKV.get(sub)) if sub in _ATTN else None


def name_table(unet: torch.nn.Module) -> dict[str, tuple[str, int | None]]:
    """Every tensor of `unet` (diffusers names) -> its CompVis name and fused-qkv part."""
    cfg = unet.config
    up_attn = {i for i, t in enumerate(cfg.up_block_types) if t.startswith("Attn")}
    table = {}
    for key in unet.state_dict():
        found = official_name(key, cfg.layers_per_block, up_attn)
        if found is None:
            raise ValueError(f"UNet tensor {key!r} has no CompVis counterpart")  # a geometry this module never builds
        table[key] = found
    return table


def official_shapes(unet: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The CompVis tensor names and shapes of `unet` (what an official checkpoint of that geometry holds)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, (name, part) in name_table(unet).items():
        shape = tuple(unet.state_dict()[key].shape)
        if part is not None:
            shape = (3 * shape[0], *shape[1:])
        if name.endswith((".qkv.weight", ".proj_out.weight")):
            shape = (*shape, 1)  # 1x1 conv1d
        out[name] = shape
    return out


def convert_ldm_unet(state: dict[str, torch.Tensor], unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CompVis UNetModel tensors (names without `model.diffusion_model.`) -> `unet`'s diffusers names.

    Raises ValueError naming the official tensors that have no place in `unet` and the ones it lacks (another
    architecture or geometry); shapes are left to the strict load, which names those that differ."""
    table = name_table(unet)
    heads = {}
    for key, (name, part) in table.items():
        if part is not None:
            heads[name] = unet.state_dict()[key].shape[0] // HEAD_CHANNELS
    wanted = {name for name, _ in table.values()}
    foreign = sorted(set(state) - wanted)
    missing = sorted(wanted - set(state))
    if foreign or missing:
        parts = []
        if foreign:
            parts.append(f"{len(foreign)} tensor(s) this UNet does not have (e.g. {foreign[:3]})")
        if missing:
            parts.append(f"{len(missing)} of its tensor(s) missing (e.g. {missing[:3]})")
        raise ValueError("; ".join(parts))
    out = {}
    for key, (name, part) in table.items():
        value = state[name]
        if part is not None:
            h = heads[name]
            rest = value.shape[1:]
            if value.shape[0] % (3 * h):
                raise ValueError(f"tensor {name!r} of shape {tuple(value.shape)} is not a fused q/k/v of {h} heads")
            value = value.reshape(h, 3, value.shape[0] // (3 * h), *rest)[:, part].reshape(-1, *rest)
        if value.ndim == 3 and value.shape[-1] == 1 and ("to_" in key):
            value = value[..., 0]
        out[key] = value
    return out


def to_ldm_unet(state: dict[str, torch.Tensor], unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `convert_ldm_unet`: `unet`'s tensors under their CompVis names (q/k/v fused per head)."""
    table = name_table(unet)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, (name, part) in table.items():
        value = state[key]
        if name.endswith((".qkv.weight", ".proj_out.weight")):
            value = value[..., None]
        if part is None:
            out[name] = value
        else:
            fused.setdefault(name, [None, None, None])[part] = value
    for name, (q, k, v) in fused.items():
        h = q.shape[0] // HEAD_CHANNELS
        rest = q.shape[1:]
        out[name] = torch.stack([t.reshape(h, -1, *rest) for t in (q, k, v)], 1).reshape(-1, *rest)
    return out
