"""XYZ tile geometry and sample planning: which tiles a dataset holds and which split each belongs to.

Tile math comes from `mercantile` (scalar) and is vectorised with numpy for planning, because a
real preset enumerates millions of candidate tiles and a Python loop over `mercantile.tiles` would
dominate the plan time.

The train/test split is *spatially blocked*: the grid is cut into square blocks of `block_tiles`
x `block_tiles` tiles and whole blocks go to test. Train tiles that touch a test block (edge or
corner) are dropped as a buffer ring, so no test tile shares a border with a train tile. The official
SGDM split is a random draw over tiles, which lets adjacent, nearly identical tiles leak across splits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import mercantile
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from .errors import InputError
from .layout import tile_id

EARTH_RADIUS_M = 6378137.0
MAX_LAT = 85.0511287798066
WORLD_M = 2 * math.pi * EARTH_RADIUS_M


def tile_bounds_3857(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) of an XYZ tile in EPSG:3857 metres."""
    b = mercantile.xy_bounds(int(x), int(y), int(z))
    return (b.left, b.bottom, b.right, b.top)


def tile_center_lonlat(z: int, x: int, y: int) -> tuple[float, float]:
    b = mercantile.bounds(int(x), int(y), int(z))
    return ((b.west + b.east) / 2.0, (b.south + b.north) / 2.0)


def ground_gsd_m(z: int, lat: float, px: int = 256) -> float:
    """Ground sample distance (m) of a `px`-pixel image of a zoom-`z` tile at latitude `lat`."""
    return WORLD_M / (2**z) / px * math.cos(math.radians(lat))


def zoom_for_gsd(gsd_m: float, lat: float, px: int = 256) -> int:
    """The zoom whose `px`-pixel tiles come closest to `gsd_m` on the ground at `lat`."""
    if gsd_m <= 0:
        raise InputError(f"gsd {gsd_m}", "must be positive", "give the ground pixel size in metres, e.g. 0.6")
    z = math.log2(WORLD_M * math.cos(math.radians(lat)) / (px * gsd_m))
    return int(min(max(round(z), 0), 24))


# ---- vectorised tile math -------------------------------------------------------------------------


def lonlat_to_tile_xy(lon: np.ndarray, lat: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Fractional tile coordinates of lon/lat arrays at zoom z."""
    n = 2.0**z
    lat = np.clip(np.asarray(lat, float), -MAX_LAT, MAX_LAT)
    x = (np.asarray(lon, float) + 180.0) / 360.0 * n
    y = (1.0 - np.log(np.tan(np.radians(lat)) + 1.0 / np.cos(np.radians(lat))) / math.pi) / 2.0 * n
    return x, y


def tile_xy_to_lonlat(x: np.ndarray, y: np.ndarray, z: int) -> tuple[np.ndarray, np.ndarray]:
    """lon/lat of fractional tile coordinates (x + 0.5 gives tile centres)."""
    n = 2.0**z
    lon = np.asarray(x, float) / n * 360.0 - 180.0
    lat = np.degrees(np.arctan(np.sinh(math.pi * (1.0 - 2.0 * np.asarray(y, float) / n))))
    return lon, lat


def tile_bounds_3857_arrays(z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 4) array of EPSG:3857 bounds (minx, miny, maxx, maxy) of tiles (z, x, y)."""
    size = WORLD_M / 2**z
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    minx = -WORLD_M / 2 + x * size
    maxy = WORLD_M / 2 - y * size
    return np.stack([minx, maxy - size, minx + size, maxy], axis=1)


def tiles_in_polygon(geom: BaseGeometry, z: int, max_tiles: int = 50_000_000) -> np.ndarray:
    """(N, 2) int64 array of (x, y) of the zoom-z tiles whose centre lies inside `geom` (lon/lat).

    Centre-inside keeps a tile in exactly one of two AOIs that share a border.
    """
    if geom.is_empty:
        return np.empty((0, 2), np.int64)
    w, s, e, n = geom.bounds
    x0, y1 = lonlat_to_tile_xy(np.array([w]), np.array([s]), z)
    x1, y0 = lonlat_to_tile_xy(np.array([e]), np.array([n]), z)
    xs = np.arange(max(int(math.floor(x0[0])), 0), min(int(math.ceil(x1[0])), 2**z), dtype=np.int64)
    ys = np.arange(max(int(math.floor(y0[0])), 0), min(int(math.ceil(y1[0])), 2**z), dtype=np.int64)
    if len(xs) * len(ys) > max_tiles:
        raise InputError(
            f"AOI with bounds {tuple(round(v, 4) for v in geom.bounds)}",
            f"spans {len(xs) * len(ys):,} zoom-{z} tiles, more than the planner's limit of {max_tiles:,}",
            "split it into smaller AOIs or lower the zoom",
        )
    out = []
    shapely.prepare(geom)
    # Row by row keeps memory at one row of candidates for very wide AOIs.
    chunk = max(1, 2_000_000 // max(len(xs), 1))
    for i in range(0, len(ys), chunk):
        yy, xx = np.meshgrid(ys[i : i + chunk], xs, indexing="ij")
        lon, lat = tile_xy_to_lonlat(xx.ravel() + 0.5, yy.ravel() + 0.5, z)
        inside = shapely.contains_xy(geom, lon, lat)
        out.append(np.stack([xx.ravel()[inside], yy.ravel()[inside]], axis=1))
    return np.concatenate(out) if out else np.empty((0, 2), np.int64)


# ---- blocked split --------------------------------------------------------------------------------


def _mix64(v: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-mixed, platform-independent hash of uint64 values."""
    v = v.astype(np.uint64)
    with np.errstate(over="ignore"):
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        v = v ^ (v >> np.uint64(31))
    return v


def block_uniform(bx: np.ndarray, by: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic U[0, 1) per block, from (seed, bx, by); independent of which tiles are planned."""
    with np.errstate(over="ignore"):
        key = (
            (np.asarray(bx, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
            ^ (np.asarray(by, np.int64).astype(np.uint64) + np.uint64(0x632BE59BD9B4E019))
            ^ (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD1B54A32D192ED03))
        )
    return (_mix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_test_block(bx: np.ndarray, by: np.ndarray, seed: int, test_fraction: float) -> np.ndarray:
    return block_uniform(bx, by, seed) < test_fraction


def assign_split(
    x: np.ndarray, y: np.ndarray, block_tiles: int, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tile: block id string parts (bx, by) and split label "train" | "test" | "buffer".

    A tile is "buffer" when it lies in a train block and one of its 8 neighbours lies in a test block;
    buffer tiles are never sampled, so test tiles never share an edge or corner with train tiles.
    """
    if block_tiles < 1:
        raise InputError("split.block_tiles", f"is {block_tiles}", "use a positive number of tiles, e.g. 8")
    x = np.asarray(x, np.int64)
    y = np.asarray(y, np.int64)
    bx, by = x // block_tiles, y // block_tiles
    test = is_test_block(bx, by, seed, test_fraction)
    near_test = np.zeros(len(x), bool)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            if dx == 0 and dy == 0:
                continue
            nbx, nby = (x + dx) // block_tiles, (y + dy) // block_tiles
            near_test |= is_test_block(nbx, nby, seed, test_fraction)
    split = np.where(test, "test", np.where(near_test, "buffer", "train"))
    return bx, by, split


# ---- sampling --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AOI:
    """A named area of interest: a lon/lat polygon or multipolygon."""

    name: str
    geometry: BaseGeometry


def candidate_tiles(aois: Sequence[AOI], z: int) -> tuple[np.ndarray, np.ndarray]:
    """All tiles inside any AOI, deduplicated (first AOI wins), sorted by (x, y).

    Returns ((N, 2) int64 x/y, (N,) int32 index of the AOI each tile is assigned to).
    """
    xy_parts, aoi_parts = [], []
    for i, aoi in enumerate(aois):
        xy = tiles_in_polygon(aoi.geometry, z)
        xy_parts.append(xy)
        aoi_parts.append(np.full(len(xy), i, np.int32))
    if not xy_parts:
        return np.empty((0, 2), np.int64), np.empty(0, np.int32)
    xy = np.concatenate(xy_parts)
    idx = np.concatenate(aoi_parts)
    key = (xy[:, 0] << 32) | xy[:, 1]
    # np.unique returns the first occurrence after a stable sort: sort by key, then by AOI order.
    order = np.lexsort((idx, key))
    key_sorted = key[order]
    first = np.ones(len(order), bool)
    first[1:] = key_sorted[1:] != key_sorted[:-1]
    keep = order[first]
    return xy[keep], idx[keep]


def sample_tiles(
    aois: Sequence[AOI],
    z: int,
    n: int,
    seed: int,
    block_tiles: int = 8,
    test_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Draw `n` distinct tiles inside the AOIs, deterministic from `seed`, with a blocked split.

    `round(n * test_fraction)` tiles come from test blocks and the rest from train blocks (buffer
    tiles excluded). Returns arrays x, y, aoi (index), bx, by, split, in a stable order (split, then
    the seeded draw order).
    """
    xy, aoi_idx = candidate_tiles(aois, z)
    bx, by, split = assign_split(xy[:, 0], xy[:, 1], block_tiles, test_fraction, seed)
    n_test = int(round(n * test_fraction))
    n_train = n - n_test
    pools = {"train": np.flatnonzero(split == "train"), "test": np.flatnonzero(split == "test")}
    want = {"train": n_train, "test": n_test}
    for name in ("train", "test"):
        if want[name] > len(pools[name]):
            raise InputError(
                "samples",
                f"{n} samples need {want[name]} {name} tiles but the AOIs hold only {len(pools[name])} at zoom {z} "
                f"({len(xy)} tiles in all; block_tiles={block_tiles}, test_fraction={test_fraction})",
                "lower `samples`, add or enlarge AOIs, or change the split settings",
            )
    rng = np.random.default_rng(seed)
    chosen = []
    for name in ("train", "test"):
        pool = pools[name]
        pick = rng.choice(len(pool), size=want[name], replace=False) if want[name] else np.empty(0, np.int64)
        chosen.append(pool[np.asarray(pick, np.int64)])
    sel = np.concatenate(chosen)
    return {
        "x": xy[sel, 0],
        "y": xy[sel, 1],
        "aoi": aoi_idx[sel],
        "bx": bx[sel],
        "by": by[sel],
        "split": split[sel],
    }


def tiles_touch(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> bool:
    """True when any tile of `a` equals or shares an edge or corner with a tile of `b` (same zoom)."""
    bset = set(map(tuple, b))
    for x, y in a:
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                if (x + dx, y + dy) in bset:
                    return True
    return False


__all__ = [
    "AOI",
    "assign_split",
    "candidate_tiles",
    "ground_gsd_m",
    "lonlat_to_tile_xy",
    "sample_tiles",
    "tile_bounds_3857",
    "tile_bounds_3857_arrays",
    "tile_center_lonlat",
    "tile_id",
    "tile_xy_to_lonlat",
    "tiles_in_polygon",
    "tiles_touch",
    "zoom_for_gsd",
]
