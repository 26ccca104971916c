"""A local raster or COG as the HR source (aerial orthophotos, NAIP from a STAC catalog, a Gaofen-2 scene).

Any CRS GDAL knows is accepted: the footprint (an XYZ tile in EPSG:3857) is read through a rasterio
`WarpedVRT` whose grid *is* the output grid, so only the needed window of the source is read (COG
overviews included) and reprojection and resampling happen in one GDAL warp.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, SampleError
from .base import WEB_MERCATOR, HRResult, check_tile, ground_gsd_m, tile_bounds_3857

if TYPE_CHECKING:
    from ..config import DatasetConfig


def _gdal_path(path: str | os.PathLike) -> str:
    s = str(path)
    if re.match(r"(?i)^https?://", s):
        return "/vsicurl/" + s
    return s


class RasterHR:
    """HR footprints cut from one georeferenced raster.

    `bands`: 1-based band indexes read as R, G, B (one band is repeated as grey). Non-uint8 data is
    mapped to 8 bits with the fixed linear `value_range=(lo, hi)`; without it the range is the
    0.2-99.8 percentiles of the raster's coarsest overview, computed once and recorded in `info`.
    `resampling`: a rasterio Resampling name (default lanczos, antialiased by GDAL when reducing).
    `min_coverage`: share of the footprint that must hold valid data, else SampleError hr_outside_raster.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bands: Sequence[int] = (1, 2, 3),
        value_range: tuple[float, float] | None = None,
        resampling: str = "lanczos",
        min_coverage: float = 0.99,
        date: str | None = None,
        attribution: str = "",
        name: str | None = None,
    ):
        import rasterio
        from rasterio.enums import Resampling

        self.path = str(path)
        self._gdal = _gdal_path(path)
        if not re.match(r"(?i)^https?://", self.path) and not Path(self.path).is_file():
            raise InputError(f"HR raster {self.path}", "file not found", "give the path of a GeoTIFF/COG")
        try:
            with rasterio.open(self._gdal) as src:
                crs, count, dtype = src.crs, src.count, src.dtypes[0]
                tags = src.tags()
                self.native_res = src.res
        except rasterio.errors.RasterioIOError as e:
            raise InputError(
                f"HR raster {self.path}", f"cannot be opened ({e})", "give a readable GeoTIFF/COG"
            ) from None
        if crs is None:
            raise InputError(
                f"HR raster {self.path}", "has no CRS", "georeference it (e.g. gdal_edit.py -a_srs EPSG:xxxx)"
            )
        try:
            from pyproj import CRS

            CRS.from_user_input(crs.to_wkt())
        except Exception:  # noqa: BLE001 - pyproj raises several types for unusable CRSs
            raise InputError(
                f"HR raster {self.path}", f"has an unknown CRS ({crs})", "reproject it to a known CRS"
            ) from None
        bands = tuple(int(b) for b in bands)
        if len(bands) not in (1, 3) or any(b < 1 or b > count for b in bands):
            raise InputError(
                f"HR raster bands {bands}",
                f"the raster has {count} band(s)",
                "give 3 band indexes (R, G, B) or 1 for grey, 1-based",
            )
        try:
            self.resampling = Resampling[resampling]
        except KeyError:
            raise InputError(
                f"resampling {resampling!r}", "unknown", f"use one of {[r.name for r in Resampling][:10]}"
            ) from None
        self.crs = crs.to_string()
        self.bands = bands
        self.dtype = dtype
        self.min_coverage = float(min_coverage)
        self.value_range = tuple(value_range) if value_range is not None else None
        self.date = date or _tiff_date(tags)
        self.attribution = attribution
        self.name = name or f"raster:{Path(self.path).name}"
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: DatasetConfig, cache_dir: str | None = None) -> RasterHR:
        """The build's source: `hr.raster`, relative to the preset."""
        return cls(str(cfg.resolve(cfg.hr.raster)))

    @staticmethod
    def needs(cfg: DatasetConfig) -> list[str]:
        """What a build with this source reaches out to (printed before a real build starts)."""
        return [f"raster {cfg.hr.raster}"]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "raster",
            "name": self.name,
            "path": self.path,
            "crs": self.crs,
            "bands": list(self.bands),
            "value_range": self.value_range,
            "attribution": self.attribution,
        }

    def _range(self) -> tuple[float, float]:
        if self.value_range is None:
            import rasterio

            with self._lock, rasterio.open(self._gdal) as src:
                step = max(1, max(src.width, src.height) // 1024)
                data = src.read(
                    list(self.bands),
                    out_shape=(len(self.bands), src.height // step or 1, src.width // step or 1),
                    masked=True,
                )
                valid = data.compressed()
                if valid.size == 0:
                    raise SampleError("hr_empty_raster", f"{self.path} holds no valid pixels")
                lo, hi = np.percentile(valid, [0.2, 99.8])
                self.value_range = (float(lo), float(max(hi, lo + 1)))
        return self.value_range  # type: ignore[return-value]

    def fetch(self, z: int, x: int, y: int, size: int = 256) -> HRResult:
        """The footprint tile (z, x, y) reprojected to EPSG:3857 at size x size px."""
        import rasterio
        from rasterio.transform import from_bounds
        from rasterio.vrt import WarpedVRT

        check_tile(z, x, y)
        bounds = tile_bounds_3857(z, x, y)
        transform = from_bounds(*bounds, width=size, height=size)
        with (
            rasterio.open(self._gdal) as src,
            WarpedVRT(
                src, crs=WEB_MERCATOR, transform=transform, width=size, height=size, resampling=self.resampling
            ) as vrt,
        ):
            data = vrt.read(list(self.bands))
            mask = vrt.dataset_mask() > 0
        coverage = float(mask.mean())
        if coverage < self.min_coverage:
            reason = "hr_outside_raster" if coverage == 0 else "hr_partial_coverage"
            raise SampleError(reason, f"{self.name} covers {coverage:.1%} of tile {z}/{x}/{y}")
        info: dict[str, Any] = {
            "coverage": coverage,
            "gsd_m": ground_gsd_m(z, y, size),
            "src_crs": self.crs,
            "src_res": list(self.native_res),
            "resampling": self.resampling.name,
        }
        if data.dtype != np.uint8:
            lo, hi = self._range()
            data = np.clip((data.astype(np.float32) - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
            info["value_range"] = [lo, hi]
        if data.shape[0] == 1:
            data = np.repeat(data, 3, axis=0)
        image = np.ascontiguousarray(np.moveaxis(data, 0, -1))
        return HRResult(
            image=image, bounds_3857=bounds, source=self.name, date=self.date, attribution=self.attribution, info=info
        )


def _tiff_date(tags: dict[str, str]) -> str | None:
    """An acquisition-date metadata tag ('YYYY:MM:DD ...' or 'YYYY-MM-DD') -> YYYY-MM-DD."""
    for key in ("ACQUISITION_DATE", "ACQUISITIONDATE"):  # not TIFFTAG_DATETIME: that is the file time
        m = re.match(r"(\d{4})[:-](\d{2})[:-](\d{2})", tags.get(key, ""))
        if m:
            return f"{m.group(1)}-{m.group(2)}-{m.group(3)}"
    return None
