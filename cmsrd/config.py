"""Dataset presets: YAML -> a validated, frozen `DatasetConfig`.

A preset names everything that decides a dataset's content (AOIs, sample count, zoom, sizes, seed,
sources, split, QA thresholds), so the same YAML always plans and builds the same dataset. Every
mistake is caught here with one `InputError` naming the key and the fix, before any work starts:
unknown keys (with the closest valid key suggested), wrong types, AOIs that are not valid lon/lat
polygons or that wrap across the antimeridian, inconsistent sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import shapely
import shapely.validation
import yaml
from shapely.geometry import shape

from .errors import InputError, unknown_name
from .grid import AOI, MAX_LAT

REPO_MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
PRESETS_DIR = REPO_MANIFESTS / "presets"
AOIS_DIR = REPO_MANIFESTS / "aois"

WORLD_IMAGERY_TILES = "https://services.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/{z}/{y}/{x}"
WORLD_IMAGERY_IDENTIFY = "https://services.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/identify"
EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"
GEOFABRIK_INDEX = "https://download.geofabrik.de/index-v1.json"


@dataclass(frozen=True)
class HRConfig:
    """HR imagery: an XYZ tile service (Esri World Imagery by default) or a local raster."""

    source: str = "worldimagery"  # worldimagery | raster
    url: str = WORLD_IMAGERY_TILES
    identify_url: str | None = WORLD_IMAGERY_IDENTIFY
    raster: str | None = None  # path of a GeoTIFF when source == raster
    attribution: str = "Source: Esri, Maxar, Earthstar Geographics, and the GIS User Community"
    terms: str = "Esri World Imagery terms of use: https://www.esri.com/en-us/legal/terms/full-master-agreement"


@dataclass(frozen=True)
class LRConfig:
    """LR: bicubic from the HR (synthetic) or a real Sentinel-2 L2A crop (STAC or Sentinel Hub)."""

    source: str = "bicubic"  # bicubic | sentinel-2
    backend: str = "stac"  # stac | sentinelhub (only for sentinel-2)
    stac_url: str = EARTH_SEARCH
    collection: str = "sentinel-2-l2a"
    start: str = "2018-01-01"
    end: str = "2025-12-31"
    max_scene_cloud: float = 30.0  # percent, catalogue-level prefilter
    attribution: str = "Contains modified Copernicus Sentinel data"
    terms: str = "Copernicus Sentinel data terms: https://sentinels.copernicus.eu/documents/247904/690755/Sentinel_Data_Legal_Notice"


@dataclass(frozen=True)
class MapConfig:
    """Map: OpenStreetMap features rendered with the `cmsrd.classes` legend."""

    source: str = "osm"
    pbf: str | None = None  # a local .osm.pbf; None -> smallest Geofabrik extract covering each AOI
    geofabrik_index: str = GEOFABRIK_INDEX
    attribution: str = "© OpenStreetMap contributors"
    terms: str = "ODbL 1.0: https://www.openstreetmap.org/copyright"


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = 0.1
    block_tiles: int = 8  # block edge in tiles; whole blocks go to test, a buffer ring separates them


@dataclass(frozen=True)
class QAConfig:
    """Thresholds of `cmsrd.qa`; a sample beyond any of them is kept in the manifest as rejected."""

    min_hr_std: float = 3.0  # grey std below this = blank / "map data not yet available" placeholder
    max_placeholder_fraction: float = 0.5  # share of the HR in one flat colour
    max_nodata_fraction: float = 0.01  # share of pure-black/white nodata HR pixels or LR nodata
    max_cloud_fraction: float = 0.1  # SCL cloud/shadow fraction inside the LR footprint
    min_map_fraction: float = 0.0  # share of non-land map pixels; 0 keeps all-land maps
    reject_empty_map: bool = False  # reject maps with no mapped feature at all
    max_shift_lrpx: float = 1.5  # measured LR/HR misregistration, LR pixels (1.5 = ~1 S2 pixel at 16 px/z18)
    min_shift_correlation: float = 0.6  # below this the shift measurement is unreliable and cannot reject
    max_days_from_hr: float = 730.0  # |LR scene date - HR capture date|


@dataclass(frozen=True)
class OutputConfig:
    geotiff: bool = False  # also write geo/<id>_{hr,lr}.tif in EPSG:3857
    jpeg_hr: bool = False  # reserved for sources that only serve JPEG; PNG is always written


@dataclass(frozen=True)
class BuildConfig:
    partition_size: int = 64  # samples per partition (one catalogue search per area per partition)
    max_in_flight: int = 0  # futures in flight; 0 -> 4 x worker threads
    timeout_s: float = 30.0  # read timeout per HTTP request
    http_retries: int = 5  # retries of a failed request (429/5xx/timeouts/damaged bodies), with backoff
    http_backoff_s: float = 0.5  # first backoff; doubles per retry (a server's Retry-After wins when longer)
    rate_per_worker: float = 8.0  # requests/s per source per worker process (politeness); 0 = unlimited
    abort_after_failures: int = 32  # stop when the first N samples of a run all failed (a systematic cause); 0 = never


@dataclass(frozen=True)
class WorldRef:
    """Demo presets: the offline world to generate (if absent) and serve on loopback."""

    config: dict = field(default_factory=dict)  # keyword arguments of cmsrd.world.config.WorldConfig
    cache_dir: str | None = None  # default: $CMSRD_CACHE or ~/.cache/cmsrd/worlds
    path: str | None = None  # use this existing world directory instead
    faults: dict = field(default_factory=dict)  # cmsrd.world.faults.FaultConfig keywords (latency, errors)


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    samples: int
    aois: tuple[str, ...] = ()  # GeoJSON paths (relative to the preset or manifests/aois) or "world"
    description: str = ""
    version: str = "1.0"
    seed: int = 0
    zoom: int = 18
    hr_px: int = 256
    lr_px: int = 16
    hr: HRConfig = field(default_factory=HRConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    map: MapConfig = field(default_factory=MapConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    world: WorldRef | None = None
    base_dir: str = ""  # directory relative paths resolve against (set by the loader)

    @property
    def scale(self) -> int:
        return self.hr_px // self.lr_px

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        d["aois"] = list(self.aois)
        return d

    def content_dict(self) -> dict[str, Any]:
        """What decides the dataset's content (not how fast it is built): the resume fingerprint."""
        d = self.to_dict()
        d.pop("build")
        d.pop("description")
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.content_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def resolve(self, p: str) -> Path:
        """A path from the preset: absolute, relative to the preset file, or relative to the repo."""
        path = Path(os.path.expanduser(p))
        if path.is_absolute():
            return path
        for base in (Path(self.base_dir) if self.base_dir else None, REPO_MANIFESTS.parent, AOIS_DIR):
            if base is not None and (base / path).exists():
                return base / path
        return (Path(self.base_dir) if self.base_dir else Path.cwd()) / path

    def with_overrides(self, **changes: Any) -> DatasetConfig:
        return dataclasses.replace(self, **changes)


# ---- generic typed loading ------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is type(None) or tp is type(None):
        return None
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise InputError(where, f"must be a list, got {type(value).__name__}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(where, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(where, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(where, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(where, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(where, f"must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(where, f"must be a mapping of keys, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "base_dir"}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_name(f"{where}.{key}" if where else str(key), "unknown key", key, fields)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(where or "config", f"missing required key(s) {missing}", "add them to the preset")
    return cls(**kwargs)


# ---- validation ------------------------------------------------------------------------------------


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise unknown_name(where, f"unknown value {value!r}", value, choices)


def validate_config(cfg: DatasetConfig) -> DatasetConfig:
    """Cross-field checks (types were checked while loading)."""
    if cfg.samples < 1:
        raise InputError("samples", f"is {cfg.samples}", "ask for at least one sample")
    if not (0 <= cfg.zoom <= 22):
        raise InputError("zoom", f"is {cfg.zoom}", "use a zoom between 0 and 22 (18 = ~0.6 m pixels as in CMSRD)")
    for key in ("hr_px", "lr_px"):
        if getattr(cfg, key) < 1:
            raise InputError(key, f"is {getattr(cfg, key)}", "use a positive pixel size")
    if cfg.hr_px % cfg.lr_px:
        raise InputError(
            "lr_px",
            f"hr_px {cfg.hr_px} is not a multiple of lr_px {cfg.lr_px}",
            "use e.g. hr_px 256 with lr_px 16 (x16) or 8 (x32)",
        )
    _check_choice("hr.source", cfg.hr.source, ("worldimagery", "raster"))
    if cfg.hr.source == "raster" and not cfg.hr.raster:
        raise InputError("hr.raster", "is required when hr.source is raster", "give the path of a GeoTIFF")
    if cfg.hr.source == "worldimagery" and not all(t in cfg.hr.url for t in ("{z}", "{x}", "{y}")):
        raise InputError(
            "hr.url", f"{cfg.hr.url!r} lacks {{z}}/{{x}}/{{y}}", "give an XYZ template such as .../tile/{z}/{y}/{x}"
        )
    _check_choice("lr.source", cfg.lr.source, ("bicubic", "sentinel-2"))
    _check_choice("lr.backend", cfg.lr.backend, ("stac", "sentinelhub"))
    _check_choice("map.source", cfg.map.source, ("osm",))
    if not (0.0 <= cfg.split.test_fraction < 1.0):
        raise InputError("split.test_fraction", f"is {cfg.split.test_fraction}", "use a fraction in [0, 1), e.g. 0.1")
    if cfg.split.block_tiles < 1:
        raise InputError(
            "split.block_tiles", f"is {cfg.split.block_tiles}", "use a positive block edge in tiles, e.g. 8"
        )
    if cfg.build.abort_after_failures < 0:
        raise InputError(
            "build.abort_after_failures", f"is {cfg.build.abort_after_failures}", "use 0 (never) or a positive count"
        )
    if cfg.build.partition_size < 1:
        raise InputError("build.partition_size", f"is {cfg.build.partition_size}", "use a positive number, e.g. 64")
    for f in dataclasses.fields(QAConfig):
        v = getattr(cfg.qa, f.name)
        if isinstance(v, float) and (math.isnan(v) or v < 0):
            raise InputError(f"qa.{f.name}", f"is {v}", "use a non-negative threshold")
    for key in ("start", "end"):
        import datetime as _dt

        try:
            _dt.date.fromisoformat(getattr(cfg.lr, key))
        except ValueError:
            raise InputError(f"lr.{key}", f"{getattr(cfg.lr, key)!r} is not a date", "use YYYY-MM-DD") from None
    if not cfg.aois:
        raise InputError("aois", "is empty", "list GeoJSON files under manifests/aois/ (or `world` for demo presets)")
    if "world" in cfg.aois and cfg.world is None:
        raise InputError(
            "aois", "`world` is only valid in presets with a `world:` section", "add `world: {}` or list GeoJSON AOIs"
        )
    return cfg


def load_config(source: str | os.PathLike | dict, **overrides: Any) -> DatasetConfig:
    """A preset name (`demo-real`), a YAML path, or a dict -> validated `DatasetConfig`."""
    base_dir = ""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.exists() and not path.suffix:
            cand = PRESETS_DIR / f"{source}.yaml"
            if cand.exists():
                path = cand
        if not path.exists():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
            raise InputError(f"preset {source}", "not found", f"give a YAML path or one of {known}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise InputError(f"preset {path}", f"is not valid YAML ({e})", "fix the syntax") from None
        if not isinstance(data, dict):
            raise InputError(f"preset {path}", "must be a YAML mapping", "see manifests/presets/demo-real.yaml")
        base_dir = str(path.resolve().parent)
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = _build(DatasetConfig, data, "")
    cfg = dataclasses.replace(cfg, base_dir=base_dir)
    return validate_config(cfg)


# ---- AOIs ------------------------------------------------------------------------------------------


def check_aoi_geometry(geom: Any, where: str) -> None:
    """Polygon/MultiPolygon, valid, in lon/lat range and not wrapped across the antimeridian."""
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise InputError(where, f"is a {geom.geom_type}, not a Polygon or MultiPolygon", "draw the area as a polygon")
    if geom.is_empty:
        raise InputError(where, "is empty", "give a non-empty polygon")
    if not geom.is_valid:
        raise InputError(
            where,
            f"is not a valid polygon ({shapely.validation.explain_validity(geom)})",
            "fix self-intersections, e.g. with shapely.make_valid or QGIS 'Fix geometries'",
        )
    w, s, e, n = geom.bounds
    if w < -180 or e > 180 or s < -90 or n > 90:
        raise InputError(
            where,
            f"has coordinates outside lon/lat range (bounds {geom.bounds})",
            "give WGS84 longitude/latitude (GeoJSON order: lon, lat); wrap longitudes into [-180, 180]",
        )
    if s < -MAX_LAT or n > MAX_LAT:
        raise InputError(
            where,
            f"reaches latitude beyond ±{MAX_LAT:.2f}, outside Web Mercator tiles",
            "clip the AOI to the tiled latitude range",
        )
    parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
    for p in parts:
        pw, _, pe, _ = p.bounds
        if pe - pw > 180:
            raise InputError(
                where,
                f"spans {pe - pw:.1f}° of longitude, i.e. it wraps the wrong way across the antimeridian",
                "split it at ±180° into a MultiPolygon of two parts, one on each side",
            )


def load_aoi_file(path: Path) -> list[AOI]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(
            f"AOI file {path}", f"cannot be read as GeoJSON ({e})", "give a GeoJSON FeatureCollection"
        ) from None
    feats = []
    if doc.get("type") == "FeatureCollection":
        feats = doc.get("features", [])
    elif doc.get("type") == "Feature":
        feats = [doc]
    else:
        feats = [{"type": "Feature", "properties": {}, "geometry": doc}]
    out = []
    for i, f in enumerate(feats):
        name = (f.get("properties") or {}).get("name") or f"{Path(path).stem}-{i}"
        where = f"AOI {name!r} in {path}"
        try:
            geom = shape(f["geometry"])
        except Exception as e:  # shapely raises several types for bad geometry JSON
            raise InputError(where, f"has an unreadable geometry ({e})", "give GeoJSON Polygon coordinates") from None
        check_aoi_geometry(geom, where)
        out.append(AOI(str(name), geom))
    if not out:
        raise InputError(f"AOI file {path}", "has no features", "add at least one Polygon feature")
    return out


def load_aois(cfg: DatasetConfig, world_bounds_lonlat: tuple[float, float, float, float] | None = None) -> list[AOI]:
    """The config's AOIs as lon/lat geometries; `world` is the served world's bounds (demo presets)."""
    from shapely.geometry import box

    aois: list[AOI] = []
    for entry in cfg.aois:
        if entry == "world":
            if world_bounds_lonlat is None:
                raise InputError(
                    "aois: world", "needs the offline world's bounds", "build demo presets with `cmsrd build`"
                )
            aois.append(AOI("world", box(*world_bounds_lonlat)))
            continue
        path = cfg.resolve(entry)
        if not path.exists():
            raise InputError(
                f"AOI {entry}",
                f"file not found (looked at {path})",
                "give a GeoJSON path relative to the preset or one of "
                f"{sorted(p.name for p in AOIS_DIR.glob('*.geojson'))}",
            )
        aois.extend(load_aoi_file(path))
    names = [a.name for a in aois]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError("aois", f"duplicate AOI names {dup}", "give every feature a unique `name` property")
    return aois
