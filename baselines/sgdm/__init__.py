"""SGDM / SGDM+ (Wang et al., ISPRS J. 2025; seeds/001) on diffusers. Registration only: specs are data,
the modules (torch, diffusers) load when a method is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..registry import MethodSpec, load_yaml, merge_config, register, resolve_class

_CITATION = (
    "Wang et al., Semantic Guided Large Scale Factor Remote Sensing Image Super-resolution with "
    "Generative Diffusion Prior, ISPRS J. Photogramm. Remote Sens., 2025 (github.com/wwangcece/SGDM)"
)
SPECS: dict[str, MethodSpec] = {}


def _register(spec: MethodSpec) -> None:
    SPECS[spec.name] = register(spec)


_LICENSE = "no LICENSE file in the official repo; backbone Stable Diffusion 2.1-base under CreativeML Open RAIL++-M"
_COMMON: dict[str, Any] = dict(kind="diffusion", nfe=50, license=_LICENSE, citation=_CITATION)
# the synthetic x32 variants (SGDM and its no-map ablation) take and honour the same inputs
_X32: dict[str, Any] = dict(scales=(32,), inputs=("sr", "map"), conditions=("map", "steps", "start"), **_COMMON)

_register(
    MethodSpec(
        name="sgdm",
        target="baselines.sgdm.model:SGDM",
        config="sgdm.yaml",
        description="SGDM, synthetic CMSRD x32: map-SPADE CS-encoder + adapter on SD2.1-base, 50-step DDPM",
        **_X32,
    )
)
_register(
    MethodSpec(
        name="sgdm+",
        target="baselines.sgdm.model:SGDMPlus",
        scales=(16,),
        inputs=("sr", "map", "style"),
        conditions=("map", "style", "steps", "start"),
        config="sgdm+.yaml",
        description="SGDM+, real CMSRD x16: content-style encoder with AdaIN, style flows, SD2.1-base",
        **_COMMON,
    )
)
_register(
    MethodSpec(
        name="sgdm-nomap",
        target="baselines.sgdm.model:SGDMNoMap",
        config="sgdm-nomap.yaml",
        description="SGDM ablation without the map encoder (map used only for the text prompt)",
        **_X32,
    )
)


def build(name: str, scale: int, config: dict[str, Any] | str | Path | None = None, device: Any = "cpu"):
    """Build one SGDM variant without importing the rest of the registry (same merge rules as
    `baselines.registry.build`); `device="meta"` builds without allocating (parameter counting)."""
    spec = SPECS[name]
    cfg = spec.default_config()
    if config is not None:
        cfg = merge_config(cfg, load_yaml(config) if isinstance(config, (str, Path)) else config)
    return resolve_class(spec)(spec=spec, scale=scale, config=cfg, device=device)
