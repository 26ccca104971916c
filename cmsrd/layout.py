"""The built-dataset contract of DESIGN.md as code: folder names, file paths, manifest schema.

Writers (`cmsrd.stages`, `cmsrd.manifest`) and readers (`cmsrd.data`, the benchmark, the official SGDM code's folder
convention) all go through this module, so the layout is defined once.

    <root>/dataset.json
    <root>/manifest.parquet (+ manifest.csv)
    <root>/<split>/hr_<H>/<id>.png
    <root>/<split>/lr_<L>/<id>.png
    <root>/<split>/sr_<L>_<H>/<id>.png
    <root>/<split>/ref_<H>/<id>.png        (kind "map": the rendered map)
    <root>/<split>/mask_<H>/<id>.png
    <root>/geo/<id>_{hr,lr}.tif
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .classes import CLASSES
from .errors import InputError

LAYOUT_VERSION = "1.0"
DATASET_JSON = "dataset.json"
MANIFEST_PARQUET = "manifest.parquet"
MANIFEST_CSV = "manifest.csv"
SPLITS = ("train", "test")
# Kinds of per-sample image files and whether they are part of every dataset.
IMAGE_KINDS = ("hr", "lr", "sr", "map", "mask")  # "map" lives in the official `ref_<H>` folder

_ID_RE = re.compile(r"^(\d{1,2})_(\d+)_(\d+)$")


def tile_id(z: int, x: int, y: int) -> str:
    """Sample id: the HR footprint's XYZ tile `z_x_y`, as in the official SGDM code."""
    return f"{z}_{x}_{y}"


def parse_tile_id(sample_id: str) -> tuple[int, int, int]:
    m = _ID_RE.match(sample_id)
    if not m:
        raise InputError(f"sample id {sample_id!r}", "is not of the form Z_X_Y", "use e.g. 18_41518_92090")
    z, x, y = (int(g) for g in m.groups())
    if x >= 2**z or y >= 2**z:
        raise InputError(f"sample id {sample_id!r}", f"x/y outside zoom {z}", "check the tile id")
    return z, x, y


@dataclass(frozen=True)
class DatasetLayout:
    """Paths of one built dataset. `hr_px` and `lr_px` fix the folder names (hr_256, lr_16, sr_16_256)."""

    root: Path
    hr_px: int = 256
    lr_px: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.hr_px % self.lr_px:
            raise InputError("dataset geometry", f"hr_px {self.hr_px} is not a multiple of lr_px {self.lr_px}")

    @property
    def scale(self) -> int:
        return self.hr_px // self.lr_px

    def folder(self, kind: str) -> str:
        h, lo = self.hr_px, self.lr_px
        names = {"hr": f"hr_{h}", "lr": f"lr_{lo}", "sr": f"sr_{lo}_{h}", "map": f"ref_{h}", "mask": f"mask_{h}"}
        if kind not in names:
            raise InputError(f"image kind {kind!r}", f"unknown; expected one of {sorted(names)}")
        return names[kind]

    def image_size(self, kind: str) -> int:
        """Side in pixels of a `kind` image: the LR is lr_px, everything else hr_px."""
        self.folder(kind)  # unknown kinds: one clear error
        return self.lr_px if kind == "lr" else self.hr_px

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def image_dir(self, split: str, kind: str) -> Path:
        return self.root / split / self.folder(kind)

    def image_path(self, split: str, kind: str, sample_id: str) -> Path:
        return self.image_dir(split, kind) / f"{sample_id}.png"

    def geotiff_path(self, sample_id: str, which: str) -> Path:
        return self.root / "geo" / f"{sample_id}_{which}.tif"

    def relpath(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    @property
    def dataset_json(self) -> Path:
        return self.root / DATASET_JSON

    @property
    def manifest_parquet(self) -> Path:
        return self.root / MANIFEST_PARQUET

    @property
    def manifest_csv(self) -> Path:
        return self.root / MANIFEST_CSV

    @classmethod
    def open(cls, root: str | os.PathLike) -> DatasetLayout:
        """Layout of an existing dataset, read from its dataset.json."""
        meta = read_dataset_json(root)
        return cls(Path(root), int(meta["hr_px"]), int(meta["lr_px"]))


# ---- manifest schema -------------------------------------------------------------------------------

# column -> pandas dtype. Per-class map fractions and per-file checksums are added by name below.
MANIFEST_COLUMNS: dict[str, str] = {
    "id": "string",
    "split": "string",
    "z": "Int32",  # nullable ints: a failed sample may lack nothing but its id
    "x": "Int64",
    "y": "Int64",
    "lon": "float64",  # footprint centre, EPSG:4326
    "lat": "float64",
    "minx": "float64",  # footprint bounds, EPSG:3857 metres
    "miny": "float64",
    "maxx": "float64",
    "maxy": "float64",
    "hr_gsd_m": "float64",  # HR metres per pixel on the ground: 40075016.686 cos(lat) / (2**z hr_px), lat of centre
    "hr_source": "string",
    "hr_date": "string",  # YYYY-MM-DD or empty when unknown
    "lr_source": "string",  # "bicubic" | "sentinel-2"
    "lr_scene_id": "string",
    "lr_datetime": "string",  # ISO 8601 UTC
    "lr_cloud_fraction": "float64",  # SCL cloud/shadow/nodata fraction inside the footprint
    "lr_days_from_hr": "float64",
    "lr_radiometry": "string",  # the exact DN -> reflectance -> 8 bit recipe
    "map_source": "string",
    "shift_x_lrpx": "float64",  # measured LR-vs-HR shift, LR pixels (+x east, +y south)
    "shift_y_lrpx": "float64",
    "shift_error": "float64",
    "qa_status": "string",  # "ok" | "rejected" | "failed"
    "qa_reason": "string",  # named reason, empty when ok
    "qa_detail": "string",
}
for _c in CLASSES:
    MANIFEST_COLUMNS[f"frac_{_c.name}"] = "float64"
for _k in IMAGE_KINDS:
    MANIFEST_COLUMNS[f"sha256_{_k}"] = "string"
    MANIFEST_COLUMNS[f"path_{_k}"] = "string"

# Columns a build's manifest carries after the schema columns, with fixed dtypes so that every streamed chunk
# of the manifest has one schema: the sample's AOI and block, LR scene provenance, the co-registration
# correlation and the optional GeoTIFF copies.
BUILD_EXTRA_COLUMNS: dict[str, str] = {
    "aoi": "string",
    "block": "string",
    "lr_collection": "string",
    "lr_baseline": "string",
    "lr_scene_cloud_cover": "float64",
    "shift_correlation": "float64",
    "path_geo_hr": "string",
    "sha256_geo_hr": "string",
    "path_geo_lr": "string",
    "sha256_geo_lr": "string",
    # True ground resolutions (`cmsrd.sources.base.footprint_resolution`): a Web Mercator tile is
    # 40075016.686 cos(lat) / 2**z m wide, so the nominal hr_px / lr_px is not the real ratio for a real LR.
    "lr_native_gsd_m": "float64",  # the LR source's native GSD (Sentinel-2: 10 m; synthetic: tile width / lr_px)
    "lr_native_px": "float64",  # native LR pixels across the tile (tile ground width / lr_native_gsd_m)
    "effective_scale": "float64",  # lr_native_gsd_m / hr_gsd_m (z18, 48.85 N, Sentinel-2: ~25.4, nominal 16)
}
# Every column of a built manifest row, in order.
BUILD_COLUMNS: tuple[str, ...] = tuple(MANIFEST_COLUMNS) + tuple(BUILD_EXTRA_COLUMNS)

QA_STATUSES = ("ok", "rejected", "failed")


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MANIFEST_COLUMNS.items()})


def conform_manifest(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows -> DataFrame with every schema column (missing -> NA) in schema order and dtype.

    Extra columns are kept after the schema columns, so producers may record more than the minimum.
    """
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    out = {}
    for col, dtype in MANIFEST_COLUMNS.items():
        s = df[col] if col in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)
        if dtype == "float64":
            out[col] = pd.to_numeric(s, errors="coerce").astype("float64")
        elif dtype.startswith("Int"):
            out[col] = pd.to_numeric(s, errors="coerce").astype(dtype)
        else:
            out[col] = s.astype(dtype)
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    res = pd.DataFrame(out, index=df.index)
    for c in extra:
        res[c] = df[c]
    return res.reset_index(drop=True)


def validate_manifest_schema(df: pd.DataFrame) -> list[str]:
    """Problems with a manifest's columns (empty list = conforms)."""
    problems = []
    for col, dtype in MANIFEST_COLUMNS.items():
        if col not in df.columns:
            problems.append(f"missing column {col}")
        elif str(df[col].dtype) != dtype and not (dtype == "string" and df[col].dtype == object):
            problems.append(f"column {col} has dtype {df[col].dtype}, expected {dtype}")
    if "qa_status" in df.columns:
        bad = set(df["qa_status"].dropna().unique()) - set(QA_STATUSES)
        if bad:
            problems.append(f"unknown qa_status values {sorted(bad)}")
    if "id" in df.columns and df["id"].duplicated().any():
        problems.append("duplicate sample ids")
    return problems


GEOMETRY = "geometry"  # GeoParquet's column; the tables themselves keep minx..maxy
FOOTPRINT_CRS = "EPSG:3857"


def geoparquet_table(df: pd.DataFrame):
    """`df` as an Arrow table with each tile footprint (minx..maxy) as a WKB polygon `geometry` column and
    GeoParquet 1.0 `geo` metadata (CRS EPSG:3857), so `geopandas.read_parquet` and GIS tools get the footprints
    while `pd.read_parquet` still reads it (WKB bytes). One function for whole files and streamed chunks (the
    build's manifest is written chunk by chunk with one schema). Without the bounds columns: plain Parquet."""
    import pyarrow as pa

    cols = ["minx", "miny", "maxx", "maxy"]
    table = pa.Table.from_pandas(df.drop(columns=[GEOMETRY], errors="ignore"), preserve_index=False)
    if not set(cols) <= set(df.columns):
        return table
    import shapely
    from pyproj import CRS

    geom = shapely.to_wkb(shapely.box(*(pd.to_numeric(df[c], errors="coerce").to_numpy(float) for c in cols)))
    table = table.append_column(GEOMETRY, pa.array(geom, pa.binary()))
    geo = {
        "version": "1.0.0",
        "primary_column": GEOMETRY,
        "columns": {
            GEOMETRY: {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": CRS(FOOTPRINT_CRS).to_json_dict()}
        },
    }
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"geo": json.dumps(geo).encode()})


def write_geoparquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Parquet of `geoparquet_table(df)`: tile footprints with their CRS, readable by pandas and geopandas."""
    import pyarrow.parquet as pq

    pq.write_table(geoparquet_table(df), path)


def read_manifest(root: str | os.PathLike) -> pd.DataFrame:
    path = Path(root) / MANIFEST_PARQUET
    if not path.exists():
        raise InputError(
            f"dataset {root}", f"has no {MANIFEST_PARQUET}", "build it with `cmsrd build` or point at a built dataset"
        )
    try:
        return pd.read_parquet(path).drop(columns=[GEOMETRY], errors="ignore")
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file; all mean the same
        raise InputError(
            f"{path}",
            f"is not a readable Parquet manifest ({type(e).__name__}: {str(e)[:200]})",
            "rebuild the dataset with `cmsrd build` (it resumes) or restore the file",
        ) from None


def write_manifest(root: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write manifest.parquet and manifest.csv atomically."""
    from .io import atomic_path

    df = conform_manifest(df)
    with atomic_path(Path(root) / MANIFEST_PARQUET) as tmp:
        write_geoparquet(df, tmp)
    with atomic_path(Path(root) / MANIFEST_CSV) as tmp:
        df.to_csv(tmp, index=False)


# ---- dataset.json ----------------------------------------------------------------------------------

DATASET_JSON_REQUIRED = ("name", "version", "scale", "hr_px", "lr_px", "crs", "sources", "counts", "config")


def read_dataset_json(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / DATASET_JSON
    if not path.exists():
        raise InputError(f"dataset {root}", f"has no {DATASET_JSON}", "point at a dataset built by `cmsrd build`")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path}", f"is not valid JSON ({e})", "rebuild the dataset with `cmsrd build` or restore the file"
        ) from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}", f"holds a JSON {type(meta).__name__}, not an object", "restore the file")
    missing = [k for k in DATASET_JSON_REQUIRED if k not in meta]
    if missing:
        raise InputError(f"{path}", f"missing keys {missing}", "rebuild the dataset with this version of cmsrd")
    return meta


def write_dataset_json(root: str | os.PathLike, meta: dict[str, Any]) -> None:
    from .io import atomic_write_text

    missing = [k for k in DATASET_JSON_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"dataset.json is missing required keys {missing}")
    meta = {"layout_version": LAYOUT_VERSION, **meta}
    atomic_write_text(Path(root) / DATASET_JSON, json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n")
