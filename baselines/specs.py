"""Specs of the methods that live in one module each (`bicubic.py`, `esrgan.py`, `swinir.py`, `ttst.py`,
`ediffsr.py`), as plain data: importing this module imports no torch, so `cmsrd-bench list` and name checks
stay fast; each method module takes its `SPEC` from here and the registry imports it only to build the method.
(Methods that are packages keep their spec in the package's light `__init__`, e.g. `baselines.sgdm`.)
"""

from __future__ import annotations

from .registry import MethodSpec, register

BICUBIC = register(
    MethodSpec(
        name="bicubic",
        target="baselines.bicubic:Bicubic",
        kind="interp",
        scales=(2, 4, 8, 16, 32),
        inputs=("lr",),
        nfe=0,
        license="n/a (classical interpolation; MATLAB imresize semantics)",
        citation="R. Keys, Cubic convolution interpolation for digital image processing, IEEE TASSP 29(6), 1981",
        config="bicubic.yaml",
        description="MATLAB-compatible bicubic upsampling of the LR (antialiasing kernel, a = -0.5).",
    )
)

ESRGAN = register(
    MethodSpec(
        name="esrgan",
        target="baselines.esrgan:ESRGAN",
        kind="gan",
        scales=(4, 8, 16, 32),
        inputs=("lr",),
        nfe=1,
        license="Apache-2.0 (xinntao/ESRGAN; RRDBNet via BasicSR)",
        citation=(
            "X. Wang et al., ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks, ECCV Workshops 2018"
        ),
        config="esrgan.yaml",
        description=(
            "RRDBNet (nf 64, nb 23, gc 32) with log2(scale) nearest+conv stages; "
            "L1 pre-training then RaGAN + VGG19 conv5_4."
        ),
        extra={"default_scale": 16, "stages": ("psnr", "gan")},
    )
)

SWINIR = register(
    MethodSpec(
        name="swinir",
        target="baselines.swinir:SwinIRMethod",
        kind="regression",
        scales=(2, 4, 8, 16, 32),
        inputs=("lr",),
        nfe=1,
        license="Apache-2.0 (JingyunLiang/SwinIR)",
        citation="J. Liang et al., SwinIR: Image Restoration Using Swin Transformer, ICCV Workshops 2021",
        config="swinir.yaml",
        description=(
            "Classical SwinIR (embed 180, 6x6 RSTB, window 8, heads 6, mlp 2) "
            "with log2(scale) pixel-shuffle stages; L1."
        ),
        extra={"default_scale": 16},
    )
)

TTST = register(
    MethodSpec(
        name="ttst",
        target="baselines.ttst:TTSTMethod",
        kind="regression",
        scales=(2, 4, 8, 16, 32),
        inputs=("lr",),
        nfe=1,
        license="no LICENSE file in the official repo (XY-boy/TTST)",
        citation="Y. Xiao et al., TTST: A Top-k Token Selective Transformer for Remote Sensing Image "
        "Super-Resolution, IEEE TIP 2024",
        config="ttst.yaml",
        description="HAT-based TTST as released (embed 180, 6x6 blocks, window 8, overlap 0.5, top-k "
        "selective attention k=C/2..4C/5) with log2(scale) pixel-shuffle stages; L1.",
        extra={"default_scale": 16},
    )
)

EDIFFSR = register(
    MethodSpec(
        name="ediffsr",
        target="baselines.ediffsr:EDiffSR",
        kind="diffusion",
        scales=(4, 8, 16, 32),
        inputs=("lr",),
        nfe=100,
        license=(
            "no LICENSE file in the official repo, so no licence is granted; "
            "its IR-SDE code comes from MIT-licensed Algolzw/image-restoration-sde"
        ),
        citation=(
            "Y. Xiao et al., EDiffSR: An Efficient Diffusion Probabilistic Model for Remote Sensing Image "
            "Super-Resolution, IEEE TGRS 62, 2024 (github.com/XY-boy/EDiffSR)"
        ),
        conditions=("steps",),
        config="ediffsr.yaml",
        description=(
            "ConditionalNAFNet (width 64, enc [14,1,1,1], RCAB prior) on the IR-SDE (sigma 50/255, T 100, cosine) "
            "from the bicubic LR; 100 reverse-SDE steps at HR size; steps=N: IR-SDE posterior sampler on N steps"
        ),
        extra={"default_scale": 16},
    )
)
