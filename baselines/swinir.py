"""SwinIR (Liang et al., ICCVW 2021), classical SR with a 2^n pixel-shuffle upsampler for x16/x32.

L1 training with the authors' Adam + MultiStepLR settings (`configs/swinir.yaml`). Loads our
safetensors and the official checkpoints (`params` or `params_ema` inside a `.pth`, official key
names; geometry-derived buffers `attn_mask` / `relative_position_index` are dropped and rebuilt).
"""

from __future__ import annotations

import re

import torch

from .archs.swinir import strip_derived_buffers
from .feedforward import FeedForwardMethod
from .registry import MethodSpec, register

SPEC = register(MethodSpec(
    name="swinir",
    target="baselines.swinir:SwinIRMethod",
    kind="regression",
    scales=(2, 4, 8, 16, 32),
    inputs=("lr",),
    nfe=1,
    license="Apache-2.0 (JingyunLiang/SwinIR)",
    citation="J. Liang et al., SwinIR: Image Restoration Using Swin Transformer, ICCV Workshops 2021",
    config="swinir.yaml",
    description="Classical SwinIR (embed 180, 6x6 RSTB, window 8, heads 6, mlp 2) with log2(scale) pixel-shuffle stages; L1.",
    extra={"default_scale": 16},
))

_UP = re.compile(r"^upsample\.(\d+)\.weight$")


class SwinIRMethod(FeedForwardMethod):
    scale_arg = "upscale"

    def convert_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return strip_derived_buffers(state)

    def checkpoint_scale(self, state: dict[str, torch.Tensor]) -> int | None:
        n = sum(1 for k in state if _UP.match(k))
        return 2**n if n else None
