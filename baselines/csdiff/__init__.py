"""csdiff (Miao et al., IEEE JSTARS 18, 2025, seeds/000): registration only; torch loads when it is built."""

from __future__ import annotations

from ..registry import MethodSpec, register

DOI = "10.1109/JSTARS.2025.3590687"

SPEC = register(
    MethodSpec(
        name="csdiff",
        target="baselines.csdiff.model:CSDiff",
        kind="diffusion",
        scales=(16, 32),
        inputs=("sr",),
        nfe=20,
        license="no code released (reconstruction from the paper's abstract; this implementation: the project's)",
        citation=(
            "R. Miao et al., Research on Cross-Sensor Remote Sensing Image Super-Resolution Method Based on "
            f"Diffusion Models, IEEE JSTARS 18, 2025, doi:{DOI}"
        ),
        conditions=("steps", "start"),
        config="csdiff.yaml",
        description=(
            "Pixel-space eps-UNet with a prior feature module (LR encoder, SFT injection at every resolution); "
            "LR-start sampler: DDIM from q(x_t | upsampled LR), steps spread over t..1"
        ),
        extra={"default_scale": 16, "doi": DOI, "lr_start": "respace", "lr_start_t": 400},
    )
)
