"""ResShift (Yue et al., NeurIPS 2023; TPAMI 2024) in the registry. Registration only: the spec is data, torch
and diffusers load when the method is built (`baselines.resshift.model`)."""

from __future__ import annotations

from ..registry import MethodSpec, register

LICENSE = "S-Lab License 1.0, non-commercial use only (zsyOAOA/ResShift: code and released weights)"

SPEC = register(
    MethodSpec(
        name="resshift",
        target="baselines.resshift.model:ResShift",
        kind="diffusion",
        scales=(16, 32),
        inputs=("lr",),
        nfe=15,
        license=LICENSE,
        citation=(
            "Z. Yue, J. Wang, C. C. Loy, ResShift: Efficient Diffusion Model for Image Super-resolution by "
            "Residual Shifting, NeurIPS 2023 (github.com/zsyOAOA/ResShift)"
        ),
        config="resshift.yaml",
        description=(
            "Residual-shifting chain from the LR latent (15 steps, kappa 2), UNetModelSwin (118,593,583) on the "
            "VQ-f4 autoencoder; the LR is bicubic-upsampled to HR/4 so the official x4 weights load at x16/x32"
        ),
    )
)
