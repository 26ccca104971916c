"""CompVis LDM-SR (Rombach et al., CVPR 2022; bsr_sr) in the registry. Registration only: the spec is data, torch
and diffusers load when the method is built (`baselines.ldm_sr.model`)."""

from __future__ import annotations

from ..registry import MethodSpec, register

LICENSE = (
    "MIT (CompVis/latent-diffusion code and the bsr_sr release); the diffusers model card of "
    "CompVis/ldm-super-resolution-4x-openimages says apache-2.0"
)

SPEC = register(
    MethodSpec(
        name="ldm-sr",
        target="baselines.ldm_sr.model:LDMSR",
        kind="diffusion",
        scales=(16, 32),
        inputs=("lr",),
        nfe=100,
        license=LICENSE,
        citation=(
            "R. Rombach, A. Blattmann, D. Lorenz, P. Esser, B. Ommer, High-Resolution Image Synthesis with Latent "
            "Diffusion Models, CVPR 2022 (github.com/CompVis/latent-diffusion, bsr_sr)"
        ),
        conditions=("steps", "start"),
        config="ldm-sr.yaml",
        description=(
            "LR-conditioned latent diffusion: UNet (113,622,563) on the VQ-f4 latent with the LR concatenated, "
            "DDIM 100 steps eta 1; the LR is bicubic-upsampled to HR/4 so the official x4 weights load at x16/x32"
        ),
    )
)
