"""What every HR and LR source returns, and the footprint geometry they share.

The build's stages code against `HRSource` / `LRSource` and the two result records below, so any XYZ tile
server, local raster, STAC catalog or Sentinel Hub can stand behind a sample without the stages knowing;
`cmsrd.sources.registry` maps a preset's source names to the classes.
A footprint is always an XYZ tile (z, x, y) in Web Mercator (EPSG:3857), the sample id of the dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import mercantile
import numpy as np

from .. import grid
from ..errors import InputError

WEB_MERCATOR = "EPSG:3857"


@dataclass
class HRResult:
    """One HR footprint: `image` is uint8 HxWx3 exactly covering `bounds_3857` (left, bottom, right, top)."""

    image: np.ndarray
    bounds_3857: tuple[float, float, float, float]
    source: str
    date: str | None = None  # capture date YYYY-MM-DD when the source knows it
    attribution: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LRResult:
    """One real LR footprint.

    `image` is the uint8 lxlx3 LR; `native` is float32 reflectance (HxWx3, RGB) of the 10 m data resampled
    onto the footprint in EPSG:3857, kept for co-registration. `radiometry` is the exact DN -> reflectance
    -> 8-bit recipe applied, so the numbers can be redone from the scene.
    """

    image: np.ndarray
    native: np.ndarray
    scene_id: str
    datetime: str
    cloud_fraction: float  # cloud/shadow/nodata fraction inside the footprint (0..1)
    scene_cloud_cover: float | None  # scene-wide eo:cloud_cover (percent) from the catalog
    days_from_hr: float | None
    baseline: str | None  # Sentinel-2 processing baseline, e.g. "05.09"
    radiometry: str
    collection: str
    info: dict[str, Any] = field(default_factory=dict)
    # Computed from the HR itself (bicubic): aligned by construction, no scene to QA or co-register, and
    # only `image` and `radiometry` are meaningful.
    synthetic: bool = False


@runtime_checkable
class HRSource(Protocol):
    """Anything that can produce the HR image of an XYZ footprint."""

    attribution: str

    def fetch(self, z: int, x: int, y: int, size: int = 256) -> HRResult: ...


@runtime_checkable
class LRSource(Protocol):
    """Anything that can produce the LR image of an XYZ footprint, in two steps.

    `search` runs once per block of neighbouring footprints (a catalogue query shared by the block; None
    for a source without one) and `fetch_footprint` turns one footprint plus what the search found into
    an `LRResult`. `hr` is the footprint's HR: its date ranks scenes, a synthetic source degrades its image.
    """

    def search(self, bbox_lonlat: tuple[float, float, float, float], start: str, end: str) -> Any: ...

    def fetch_footprint(self, z: int, x: int, y: int, lr_px: int, hr: HRResult, found: Any = None) -> LRResult: ...


def check_tile(z: int, x: int, y: int) -> None:
    """Reject tile ids outside the XYZ pyramid with one clear error."""
    if not (0 <= int(z) <= 30):
        raise InputError(f"tile zoom {z}", "must be between 0 and 30", "use a zoom such as 17 or 18")
    n = 2 ** int(z)
    if not (0 <= int(x) < n and 0 <= int(y) < n):
        raise InputError(f"tile {z}/{x}/{y}", f"x and y must be in [0, {n}) at zoom {z}", "check the tile id")


def tile_bounds_3857(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of an XYZ tile in EPSG:3857 metres (`cmsrd.grid`'s, with the id checked)."""
    check_tile(z, x, y)
    return grid.tile_bounds_3857(z, x, y)


def tile_bounds_lonlat(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(west, south, east, north) of an XYZ tile in degrees."""
    check_tile(z, x, y)
    b = mercantile.bounds(int(x), int(y), int(z))
    return (b.west, b.south, b.east, b.north)


def tile_center_lonlat(z: int, x: int, y: int) -> tuple[float, float]:
    check_tile(z, x, y)
    return grid.tile_center_lonlat(z, x, y)


def ground_gsd_m(z: int, y: int, size: int = 256) -> float:
    """Ground sample distance (m) of a `size` px image of tile (z, *, y), at the latitude of the tile's centre."""
    return grid.ground_gsd_m(z, tile_center_lonlat(z, 0, y)[1], size)


def footprint_resolution(z: int, y: int, hr_px: int, lr_px: int, lr_native_gsd_m: float | None) -> dict[str, float]:
    """True ground resolutions of a sample of tile (z, *, y), for its manifest row.

    A Web Mercator tile spans 40075016.686 cos(lat) / 2**z m on the ground (lat of its centre), so a preset's
    nominal scale hr_px / lr_px is not the ratio of ground pixel sizes when the LR has a sensor's native GSD
    (Sentinel-2: 10 m; z18 at 48.85 N is ~25x, not 16x). `lr_native_gsd_m` None: the LR is computed from the HR
    (synthetic), so its pixels are the tile's width / lr_px and the effective scale is the nominal one.
    """
    tile_m = ground_gsd_m(z, y, 1)
    hr_gsd = tile_m / hr_px
    lr_gsd = float(lr_native_gsd_m) if lr_native_gsd_m else tile_m / lr_px
    return {
        "hr_gsd_m": hr_gsd,
        "lr_native_gsd_m": lr_gsd,
        "lr_native_px": tile_m / lr_gsd,
        "effective_scale": lr_gsd / hr_gsd,
    }


def subtile_zoom(z: int, size: int) -> int:
    """Zoom whose 256 px tiles give at least `size` px across tile z: z + ceil(log2(size/256)), >= z.

    Sizes of 256 * 2**k are mosaicked exactly; other sizes are resampled from the next finer mosaic.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"HR size {size!r}", "must be a positive integer number of pixels", "use e.g. 256")
    return int(z) + max(0, math.ceil(math.log2(size / 256) - 1e-12))
