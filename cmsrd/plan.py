"""The sampling plan: which tiles a dataset holds, as an editable Parquet file.

One row per sample: id (`z_x_y`), z, x, y, lon, lat (footprint centre), minx..maxy (EPSG:3857
bounds), hr_gsd_m, block, split and aoi. This is the "sampling points" file the CMSRD authors
published, plus the spatial block each tile belongs to. Users may drop rows, add rows, or reuse a
plan with a different preset: `read_plan` re-checks every row, so an edited plan is as safe as a
generated one. Rows are ordered block by block so a partition of consecutive rows covers a compact
area (one catalogue search serves many samples).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DatasetConfig, check_aoi_name, load_aois
from .errors import InputError
from .grid import WORLD_M, sample_tiles, tile_bounds_3857_arrays, tile_xy_to_lonlat
from .io import atomic_path
from .layout import GEOMETRY, write_geoparquet

PLAN_COLUMNS: dict[str, str] = {
    "id": "string",
    "z": "int32",
    "x": "int64",
    "y": "int64",
    "lon": "float64",
    "lat": "float64",
    "minx": "float64",
    "miny": "float64",
    "maxx": "float64",
    "maxy": "float64",
    "hr_gsd_m": "float64",
    "block": "string",
    "split": "string",
    "aoi": "string",
}
PLAN_SPLITS = ("train", "test")


def plan_from_tiles(
    z: int, x: np.ndarray, y: np.ndarray, split: np.ndarray, aoi: np.ndarray, block_tiles: int, hr_px: int
) -> pd.DataFrame:
    """Plan rows for explicit tiles (all columns derived from z/x/y)."""
    x = np.asarray(x, np.int64)
    y = np.asarray(y, np.int64)
    lon, lat = tile_xy_to_lonlat(x + 0.5, y + 0.5, z)
    b = tile_bounds_3857_arrays(z, x, y)
    gsd = WORLD_M / 2**z / hr_px * np.cos(np.radians(lat))
    bx, by = x // block_tiles, y // block_tiles
    df = pd.DataFrame(
        {
            "id": pd.array([f"{z}_{a}_{c}" for a, c in zip(x.tolist(), y.tolist())], dtype="string"),
            "z": np.full(len(x), z, np.int32),
            "x": x,
            "y": y,
            "lon": lon,
            "lat": lat,
            "minx": b[:, 0],
            "miny": b[:, 1],
            "maxx": b[:, 2],
            "maxy": b[:, 3],
            "hr_gsd_m": gsd,
            "block": pd.array([f"{z}/{block_tiles}/{p}_{q}" for p, q in zip(bx.tolist(), by.tolist())], dtype="string"),
            "split": pd.array(np.asarray(split, str), dtype="string"),
            "aoi": pd.array(np.asarray(aoi, str), dtype="string"),
        }
    )
    return df


def make_plan(cfg: DatasetConfig, world_bounds_lonlat: tuple[float, float, float, float] | None = None) -> pd.DataFrame:
    """Sample `cfg.samples` tiles in the AOIs with the blocked split; deterministic from `cfg.seed`."""
    aois = load_aois(cfg, world_bounds_lonlat)
    s = sample_tiles(aois, cfg.zoom, cfg.samples, cfg.seed, cfg.split.block_tiles, cfg.split.test_fraction)
    names = np.array([a.name for a in aois], dtype=object)
    aoi_names = names[s["aoi"]] if len(s["aoi"]) else np.empty(0, object)
    df = plan_from_tiles(cfg.zoom, s["x"], s["y"], s["split"], aoi_names, cfg.split.block_tiles, cfg.hr_px)
    order = np.lexsort((df["x"].to_numpy(), df["y"].to_numpy(), s["bx"], s["by"], s["aoi"]))
    return df.iloc[order].reset_index(drop=True)


def write_plan(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    path = Path(path)
    df = check_plan(df, str(path))
    with atomic_path(path) as tmp:
        write_geoparquet(df, tmp)  # GeoParquet: footprints and CRS for GIS tools
    return path


def check_plan(df: pd.DataFrame, where: str = "plan") -> pd.DataFrame:
    """Validate (possibly user-edited) plan rows and re-derive geometry from z/x/y."""
    missing = [c for c in ("z", "x", "y", "split") if c not in df.columns]
    if missing:
        raise InputError(where, f"lacks column(s) {missing}", "keep at least z, x, y and split (see `cmsrd plan`)")
    if len(df) == 0:
        raise InputError(where, "has no rows", "plan at least one sample")
    try:
        z = df["z"].astype("int64").to_numpy()
        x = df["x"].astype("int64").to_numpy()
        y = df["y"].astype("int64").to_numpy()
    except (ValueError, TypeError):
        raise InputError(where, "z, x, y must be integers", "fix the edited rows") from None
    if len(set(z.tolist())) != 1:
        raise InputError(where, f"mixes zooms {sorted(set(z.tolist()))}", "one dataset has one zoom; split the plan")
    zz = int(z[0])
    bad = (x < 0) | (y < 0) | (x >= 2**zz) | (y >= 2**zz)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{where} row {i}", f"tile {zz}/{x[i]}/{y[i]} is outside zoom {zz}", "fix x/y")
    split = df["split"].astype(str).to_numpy()
    wrong = sorted(set(split.tolist()) - set(PLAN_SPLITS))
    if wrong:
        raise InputError(where, f"unknown split value(s) {wrong}", f"use {list(PLAN_SPLITS)}")
    ids = pd.Series([f"{zz}_{a}_{b}" for a, b in zip(x.tolist(), y.tolist())])
    if ids.duplicated().any():
        raise InputError(
            where, f"duplicate tiles {sorted(ids[ids.duplicated()].unique())[:5]}", "drop the repeated rows"
        )
    block_tiles = 8
    if "block" in df.columns and isinstance(df["block"].iloc[0], str) and df["block"].iloc[0].count("/") == 2:
        zb, bt, _ = df["block"].iloc[0].split("/")
        if not (bt.isdigit() and int(bt) >= 1):
            raise InputError(
                f"{where} row 0",
                f"block {df['block'].iloc[0]!r} is not ZOOM/BLOCK_TILES/BX_BY",
                "keep the block column as `cmsrd plan` wrote it, or drop the column",
            )
        block_tiles = int(bt)
    hr_px = 256
    aoi = df["aoi"].astype(str).to_numpy() if "aoi" in df.columns else np.full(len(df), "user")
    for name in sorted(set(aoi.tolist())):
        check_aoi_name(name, f"{where} column aoi")
    out = plan_from_tiles(zz, x, y, split, aoi, block_tiles, hr_px)
    if "hr_gsd_m" in df.columns:  # keep the plan's pixel-size basis (hr_px) as written
        out["hr_gsd_m"] = pd.to_numeric(df["hr_gsd_m"], errors="coerce").fillna(out["hr_gsd_m"]).to_numpy()
    if "block" in df.columns:
        out["block"] = pd.array(df["block"].astype(str).to_numpy(), dtype="string")
    return out


def read_plan(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise InputError(f"plan {path}", "not found", "create one with `cmsrd plan PRESET --out plan.parquet`")
    try:
        df = pd.read_parquet(path).drop(columns=[GEOMETRY], errors="ignore")
    except Exception as e:  # pyarrow raises several types for non-Parquet input
        raise InputError(
            f"plan {path}", f"is not a readable Parquet file ({e})", "regenerate it with `cmsrd plan`"
        ) from None
    return check_plan(df, f"plan {path}")
