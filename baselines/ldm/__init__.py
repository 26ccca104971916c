"""`ldm`: the LDM baseline of SGDM's Table 2 (the SGDM repo's SRLDM). Registration only: the spec is data,
torch and diffusers load when the method is built (`model.py`)."""

from __future__ import annotations

from ..registry import MethodSpec, register

SPEC = register(
    MethodSpec(
        name="ldm",
        target="baselines.ldm.model:LDM",
        kind="diffusion",
        scales=(16, 32),
        inputs=("sr", "map"),
        nfe=50,
        license="no LICENSE file in the SGDM repo (SRLDM code); backbone Stable Diffusion 2.1-base under "
        "CreativeML Open RAIL++-M",
        citation="Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, CVPR 2022; as the "
        "SRLDM baseline of Wang et al., ISPRS J. Photogramm. Remote Sens., 2025 (github.com/wwangcece/SGDM)",
        conditions=("map", "steps", "start"),
        config="ldm.yaml",
        description="LDM (SGDM's SRLDM): SD2.1-base UNet on noisy + LR latents (8 channels), map prompt, 50-step DDPM",
    )
)
