"""Synthetic LR: the MATLAB-compatible antialiased bicubic downscale of the footprint's own HR.

The SR literature's degradation (`cmsrd.degrade.synthetic_lr`), behind the same `LRSource` protocol as the
real sources: no catalogue to search, and the result is marked `synthetic` (aligned by construction, so
the build neither QAs a scene nor co-registers it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .base import HRResult, LRResult

if TYPE_CHECKING:
    from ..config import DatasetConfig


class BicubicLR:
    """LR = bicubic x`scale` of the HR image."""

    def __init__(self, scale: int):
        self.scale = int(scale)

    @classmethod
    def from_config(cls, cfg: DatasetConfig, cache_dir: str | None = None) -> BicubicLR:
        return cls(cfg.scale)

    @staticmethod
    def provenance(cfg: DatasetConfig) -> dict[str, Any]:
        """dataset.json `sources.lr` entries beyond the source name."""
        return {"attribution": "", "terms": "", "method": f"MATLAB bicubic x{cfg.scale}, antialiased"}

    @staticmethod
    def needs(cfg: DatasetConfig) -> list[str]:
        """Nothing: the LR is computed from the HR."""
        return []

    def search(self, bbox_lonlat: tuple[float, float, float, float], start: str, end: str) -> None:
        return None

    def fetch_footprint(self, z: int, x: int, y: int, lr_px: int, hr: HRResult, found: Any = None) -> LRResult:
        from ..degrade import synthetic_lr

        image = synthetic_lr(hr.image, self.scale)
        return LRResult(
            image=image,
            native=image.astype(np.float32) / 255.0,
            scene_id="",
            datetime="",
            cloud_fraction=0.0,
            scene_cloud_cover=None,
            days_from_hr=None,
            baseline=None,
            radiometry=f"MATLAB bicubic x{self.scale} (antialiased) of the HR",
            collection="",
            synthetic=True,
        )
