"""Checkpoints of `ldm`: our safetensors (every UNet tensor) and the SGDM repo's SRLDM Lightning `.ckpt`.

Both are read by SGDM's weights-only loader (`baselines.sgdm.convert.load_torch_state`). The official UNet is
converted by diffusers' ldm converter, which silently skips what it does not know, so every source tensor
must come out of it (checked by identity) and every model tensor must be filled: a file of another layout
is one error naming the keys that differ, never a half-loaded network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmsrd.errors import InputError

from ..checkpoint import describe_mismatch, read_metadata
from ..sgdm.convert import load_torch_state

log = logging.getLogger(__name__)
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
OURS_PREFIX = "unet."
CONV_IN = "input_blocks.0.0.weight"  # the ldm name of diffusers' conv_in.weight
LATENT_CHANNELS = 4
# What a Lightning SRLDM file carries besides weights we use: the DDPM schedule buffers, the validation
# LPIPS network (`SRLDM.lpips_metric`), EMA copies and the latent scale; skipped on purpose.
IGNORED_PREFIXES = ("lpips_metric.", "model_ema.")
IGNORED_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
        "scale_factor",
    }
)
SRLDM_FIX = (
    "give `checkpoint:` an SRLDM checkpoint of the SGDM repo (8-channel model.diffusion_model.input_blocks.0.0) or "
    "a model.safetensors trained here with --method ldm"
)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors; a truncated safetensors file is the same clear error as a truncated `.ckpt`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        read_metadata(path)  # a cut or damaged header is an InputError naming the file
        try:
            return load_torch_state(path)
        except InputError:
            raise
        except Exception as e:  # the header was fine, the data is not
            raise InputError(
                f"checkpoint {path}", f"is truncated or damaged ({type(e).__name__}: {e})", "export or copy it again"
            ) from e
    return load_torch_state(path)


def is_official(state: dict[str, Any]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in state)


def check_layout(state: dict[str, torch.Tensor], path: Path, method: str) -> None:
    """Refuse another method's files by what they hold: SGDM's adapter, a plain SD2.1 UNet (4-channel
    conv_in), tensors of no known part."""
    if any(k.startswith("adapter.") for k in state):
        raise InputError(
            f"checkpoint {path}",
            f"is an SGDM checkpoint (it holds adapter.* tensors), not an {method} one",
            f"load it with sgdm / sgdm+ / sgdm-nomap; {SRLDM_FIX}",
        )
    conv_in = state.get(UNET_PREFIX + CONV_IN, state.get(OURS_PREFIX + "conv_in.weight"))
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == LATENT_CHANNELS:
        raise InputError(
            f"checkpoint {path}",
            f"holds a UNet with a {LATENT_CHANNELS}-channel conv_in (plain Stable Diffusion 2.1), and `checkpoint:` "
            f"is loaded as is; {method} needs 8 input channels (noisy latent + LR latent)",
            "give an SD2.1 backbone as network.backbone.pretrained instead: its conv_in is widened to 8 channels, "
            f"the 4 new ones zero; or {SRLDM_FIX}",
        )
    if is_official(state):
        known = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", *IGNORED_PREFIXES)
        odd = sorted(k for k in state if not k.startswith(known) and k not in IGNORED_KEYS)
        if odd:
            raise InputError(
                f"checkpoint {path}",
                f"holds {len(odd)} tensors of no SRLDM part, e.g. {odd[:4]}",
                SRLDM_FIX,
            )


def convert_official_unet(state: dict[str, torch.Tensor], unet: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*` -> diffusers UNet keys. Every source tensor must be used and every UNet
    tensor filled with its shape; otherwise one InputError naming the keys (in the file's own names)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    source = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    try:
        converted = convert_ldm_unet_checkpoint(source, unet.config)
    except (KeyError, IndexError, RuntimeError) as e:
        raise InputError(
            f"checkpoint {path}", f"its UNet does not follow the SD2.1 ldm layout ({type(e).__name__}: {e})", SRLDM_FIX
        ) from e
    used = {id(v) for v in converted.values()}
    unused = sorted(k for k, v in source.items() if id(v) not in used)
    problem = describe_mismatch(unet.state_dict(), converted)
    if unused or problem:
        detail = "; ".join(filter(None, [f"{len(unused)} keys not in the layout: {', '.join(unused[:6])}", problem]))
        raise InputError(
            f"checkpoint {path}", f"does not match the {geometry_hint(unet)} SRLDM UNet: {detail}", SRLDM_FIX
        )
    return converted


def geometry_hint(unet: nn.Module) -> str:
    widths = list(unet.config.block_out_channels)
    return "SD2.1-base" if widths == [320, 640, 1280, 1280] else f"configured (block_out_channels {widths})"


def ours_unet_state(state: dict[str, torch.Tensor], unet: nn.Module, path: Path, method: str, scale: int) -> dict:
    """Our export: `unet.*` = every UNet tensor. Another method's export (by its metadata or names) or
    another geometry is one InputError; another scale only a warning (the network is the same at x16 and x32,
    so cross-scale evaluation is allowed, but rarely what was meant)."""
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("scale") not in (None, scale):
        log.warning("%s: %s was trained at x%s, used here at x%s", method, path, meta["scale"], scale)
    if meta.get("method") not in (None, method):
        raise InputError(
            f"checkpoint {path}",
            f"was exported by method {meta['method']!r}, not {method!r}",
            f"load it with --method {meta['method']}, or {SRLDM_FIX}",
        )
    odd = sorted(k for k in state if not k.startswith(OURS_PREFIX))
    if odd:
        raise InputError(
            f"checkpoint {path}", f"holds tensors that are not ldm UNet tensors, e.g. {odd[:4]}", SRLDM_FIX
        )
    own = {k[len(OURS_PREFIX) :]: v for k, v in state.items()}
    problem = describe_mismatch(unet.state_dict(), own)
    if problem:
        raise InputError(
            f"checkpoint {path}",
            f"does not match the {geometry_hint(unet)} UNet of this config: {problem}",
            "build with the network the checkpoint was trained with (the runner reads it from the file's metadata)",
        )
    return own
