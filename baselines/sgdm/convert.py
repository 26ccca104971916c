"""Convert the authors' SGDM checkpoints (PyTorch Lightning, original SD layout) to our modules.

`SGDM-syn.ckpt` / `SGDM-real.ckpt` hold `state_dict` with
- `model.diffusion_model.*`: the ldm UNet -> diffusers `UNet2DConditionModel` keys via diffusers' own
  `convert_ldm_unet_checkpoint` (the SD converter; the UNet is plain SD2.1 with fine-tuned attention);
- `adapter.*`: our `SGDMAdapter` uses the authors' attribute names, so only the prefix is stripped;
- `first_stage_model.*` / `cond_stage_model.*`: SD2.1's VAE and OpenCLIP text tower (see `backbone.py`).
The style flows are separate files, `flow_mean.pt` / `flow_std.pt` (normflows state dicts, same names).
Everything loads with `weights_only=True`: no pickled code runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmsrd.errors import InputError

UNET_PREFIX = "model.diffusion_model."
ADAPTER_PREFIX = "adapter."
FLOW_FILES = (("flow_mean.pt", "flow_std.pt"), ("flow_tanh_mini_mean.pt", "flow_tanh_mini_std.pt"))


def load_torch_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .ckpt/.pt/.pth (Lightning `state_dict` unwrapped) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}", "file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        raise InputError(f"checkpoint {path}", f"cannot be read as a tensor state dict ({type(e).__name__}: {e})",
                         "pass the authors' .ckpt, a flow .pt state dict, or a .safetensors file") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path}", f"holds a {type(state).__name__}, not a state dict")
    return state


def is_official(state: dict[str, Any]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in state) and any(k.startswith(ADAPTER_PREFIX) for k in state)


def detect_variant(state: dict[str, Any]) -> str:
    """'real' (SGDM+), 'simu' (SGDM) or 'simu_nomap' from the adapter keys."""
    if any(k.startswith("adapter.merge_encoder.HR_Style_Encoder.") for k in state):
        return "real"
    if any(k.startswith("adapter.merge_encoder.spade1.") for k in state):
        return "simu"
    if any(k.startswith("adapter.merge_encoder.layer1_sr.") for k in state):
        return "simu_nomap"
    raise InputError("checkpoint", "has no recognisable SGDM adapter (adapter.merge_encoder.*)")


def convert_official(state: dict[str, torch.Tensor], unet_config: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Official Lightning state -> {"unet": diffusers UNet keys, "adapter": SGDMAdapter keys}."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not is_official(state):
        raise InputError("checkpoint", "is not an SGDM Lightning checkpoint (needs model.diffusion_model.* and adapter.*)")
    unet = convert_ldm_unet_checkpoint({k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}, unet_config)
    adapter = {k[len(ADAPTER_PREFIX):]: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
    return {"unet": unet, "adapter": adapter}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that names missing/unexpected/mis-shaped keys in one InputError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise InputError(what, f"does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), shape mismatches {shapes[:3]}",
                         "check the checkpoint variant (sgdm / sgdm+ / sgdm-nomap) and backbone geometry")
    module.load_state_dict(state, strict=True)


def find_flow_files(directory: Path) -> tuple[Path, Path] | None:
    for mean_name, std_name in FLOW_FILES:
        if (directory / mean_name).is_file() and (directory / std_name).is_file():
            return directory / mean_name, directory / std_name
    return None
