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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
import shapely.validation
import yaml
from shapely.geometry import shape

from .errors import InputError, unknown_name
from .grid import AOI, MAX_LAT
from .typed import INTERNAL
from .typed import build as _build

REPO_MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
PRESETS_DIR = REPO_MANIFESTS / "presets"
AOIS_DIR = REPO_MANIFESTS / "aois"
# A plan is built in one go and lives in memory (plan rows, tile sets); beyond this, split the area into
# several presets. Far above CMSRD's ~7,000 samples and any single-machine build.
MAX_SAMPLES = 10_000_000
# AOI names become file names (the build's per-AOI map features): letters, digits, `._- `, no path parts.
AOI_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


def check_aoi_name(name: object, where: str) -> str:
    """An AOI name that is safe as a file name (no `/`, `..`, leading dot), else one InputError."""
    text = str(name)
    if not AOI_NAME.match(text) or ".." in text:
        raise InputError(
            where,
            f"AOI name {text!r} is not a plain name (it is used as a file name)",
            "use letters, digits, '.', '_', '-' or spaces (at most 100), starting with a letter or digit",
        )
    return text


WORLD_IMAGERY_TILES = "https://services.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/{z}/{y}/{x}"
WORLD_IMAGERY_IDENTIFY = "https://services.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/identify"
EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"
GEOFABRIK_INDEX = "https://download.geofabrik.de/index-v1.json"
LR_RADIOMETRY = ("tci", "boa")
SR_UPSAMPLE = ("official", "bicubic")


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
    # Earth Search Collection 1: ESA's DNs with BOA_ADD_OFFSET kept for every item, stated in raster:bands
    # (the older `sentinel-2-l2a` removed it at ingest for some items and flags it, not always correctly)
    collection: str = "sentinel-2-c1-l2a"
    # tci: the scene's `visual` asset (ESA's 8-bit true colour), as the official CMSRD LR (Satlas TCI chips);
    # boa: B04/B03/B02 BOA reflectance x GAIN (2.5), Sentinel Hub's true-colour look
    radiometry: str = "boa"
    start: str = "2018-01-01"
    end: str = "2025-12-31"
    max_scene_cloud: float = 30.0  # percent, catalogue-level prefilter
    attribution: str = "Contains modified Copernicus Sentinel data"
    terms: str = "Copernicus Sentinel data terms: https://sentinels.copernicus.eu/documents/247904/690755/Sentinel_Data_Legal_Notice"


@dataclass(frozen=True)
class SRConfig:
    """The `sr_<L>_<H>` images (the LR brought to the HR size, SGDM's input)."""

    # official: bilinear (half-pixel centres, no antialias), what the authors' prepare_lr.py does (its
    # cv2.resize gets INTER_CUBIC in the `dst` slot, so OpenCV's default INTER_LINEAR runs); bicubic:
    # MATLAB imresize bicubic, what the paper says
    upsample: str = "bicubic"


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
    max_shift_lrpx: float = 1.5  # measured LR/HR shift, LR pixels (16 px/z18: 1.5 px = 14.3 cos(lat) m, ~1 S2 px)
    min_shift_correlation: float = 0.6  # below this the shift measurement is unreliable and cannot reject
    max_days_from_hr: float = 730.0  # |LR scene date - HR capture date|
    # DN plausibility of a baseline >= 04.00 L2A scene against its declared BOA offset (cmsrd.qa.check_lr_radiometry)
    max_lr_negative_fraction: float = 0.2  # share of DNs below the offset (reflectance < 0) when it is in the DNs
    min_lr_dark_fraction: float = 0.01  # share of pixels darker than 0.1 when the offset is declared removed


@dataclass(frozen=True)
class OutputConfig:
    geotiff: bool = False  # also write geo/<id>_{hr,lr}.tif in EPSG:3857
    jpeg_hr: bool = False  # reserved for sources that only serve JPEG; PNG is always written
    # zlib level of the dataset PNGs (lossless at any level). 1: measured on demo tiles, 12.7 ms and 120 kB per
    # sample vs 37.6 ms and 101 kB at Pillow's default 6 (3x less CPU for +18% bytes); 9 for the smallest files.
    png_level: int = 1


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
    sr: SRConfig = field(default_factory=SRConfig)
    map: MapConfig = field(default_factory=MapConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    world: WorldRef | None = None
    base_dir: str = field(default="", metadata=INTERNAL)  # directory relative paths resolve against (the loader's)

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


# ---- validation ------------------------------------------------------------------------------------


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise unknown_name(where, f"unknown value {value!r}", value, choices)


def validate_config(cfg: DatasetConfig) -> DatasetConfig:
    """Cross-field checks (types were checked while loading)."""
    if not 1 <= cfg.samples <= MAX_SAMPLES:
        raise InputError(
            "samples",
            f"is {cfg.samples}",
            f"ask for 1 to {MAX_SAMPLES:,} samples (split a larger area into several presets)",
        )
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
    from .sources.registry import hr_spec, lr_spec

    hr_spec(cfg.hr.source)  # unknown names: one error with the closest registered name
    if cfg.hr.source == "raster" and not cfg.hr.raster:
        raise InputError("hr.raster", "is required when hr.source is raster", "give the path of a GeoTIFF")
    if cfg.hr.source == "worldimagery" and not all(t in cfg.hr.url for t in ("{z}", "{x}", "{y}")):
        raise InputError(
            "hr.url", f"{cfg.hr.url!r} lacks {{z}}/{{x}}/{{y}}", "give an XYZ template such as .../tile/{z}/{y}/{x}"
        )
    lr_spec(cfg.lr.source, cfg.lr.backend)
    _check_choice("lr.radiometry", cfg.lr.radiometry, LR_RADIOMETRY)
    _check_choice("sr.upsample", cfg.sr.upsample, SR_UPSAMPLE)
    if cfg.lr.source == "sentinel-2" and cfg.lr.backend == "sentinelhub" and cfg.lr.radiometry == "tci":
        raise InputError(
            "lr.radiometry",
            "tci needs the scene's TCI (`visual`) file, which the Sentinel Hub backend does not read "
            "(its Process API output is reflectance, rendered as boa)",
            "use lr.backend: stac for tci, or lr.radiometry: boa with lr.backend: sentinelhub",
        )
    _check_choice("map.source", cfg.map.source, ("osm",))
    if not (0.0 <= cfg.split.test_fraction < 1.0):
        raise InputError("split.test_fraction", f"is {cfg.split.test_fraction}", "use a fraction in [0, 1), e.g. 0.1")
    if cfg.split.block_tiles < 1:
        raise InputError(
            "split.block_tiles", f"is {cfg.split.block_tiles}", "use a positive block edge in tiles, e.g. 8"
        )
    if cfg.lr.radiometry == "tci" and cfg.lr.source != "sentinel-2":
        raise InputError(
            "lr.radiometry: tci",
            f"needs the Sentinel-2 STAC source (got lr.source {cfg.lr.source}, backend {cfg.lr.backend})",
            "use lr.radiometry: boa, or lr.source: sentinel-2 with backend: stac",
        )
    if not (0 <= cfg.output.png_level <= 9):
        raise InputError("output.png_level", f"is {cfg.output.png_level}", "use a zlib level 0-9 (1 fast, 9 smallest)")
    if cfg.build.abort_after_failures < 0:
        raise InputError(
            "build.abort_after_failures", f"is {cfg.build.abort_after_failures}", "use 0 (never) or a positive count"
        )
    b = cfg.build
    if not (math.isfinite(b.timeout_s) and b.timeout_s > 0):
        raise InputError("build.timeout_s", f"is {b.timeout_s}", "use a positive read timeout in seconds, e.g. 30")
    if b.http_retries < 0 or b.http_retries > 50:
        raise InputError("build.http_retries", f"is {b.http_retries}", "use 0 (no retries) to 50, e.g. 5")
    for key in ("http_backoff_s", "rate_per_worker"):
        v = getattr(b, key)
        if not (math.isfinite(v) and v >= 0):
            raise InputError(f"build.{key}", f"is {v}", "use a non-negative number")
    if b.max_in_flight < 0:
        raise InputError("build.max_in_flight", f"is {b.max_in_flight}", "use 0 (automatic) or a positive count")
    if cfg.world is not None and cfg.world.faults:
        from .world.faults import FaultConfig

        FaultConfig.from_mapping(cfg.world.faults, "world.faults")
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
        if not path.is_file():
            raise InputError(f"preset {source}", "is a folder, not a YAML file", "give the path of a preset .yaml")
        try:
            data = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise InputError(f"preset {path}", "is not a text file", "give a YAML preset") from None
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
    if not isinstance(doc, dict):
        raise InputError(
            f"AOI file {path}", f"holds a JSON {type(doc).__name__}, not a GeoJSON object", "give a FeatureCollection"
        )
    feats = []
    if doc.get("type") == "FeatureCollection":
        feats = doc.get("features", [])
        if not isinstance(feats, list):
            raise InputError(f"AOI file {path}", "`features` is not a list", "give a list of Polygon features")
    elif doc.get("type") == "Feature":
        feats = [doc]
    else:
        feats = [{"type": "Feature", "properties": {}, "geometry": doc}]
    out = []
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise InputError(f"AOI file {path}", f"feature {i} is a {type(f).__name__}, not a GeoJSON object")
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise InputError(f"AOI file {path}", f"feature {i} has properties that are not an object")
        name = check_aoi_name(props.get("name") or f"{Path(path).stem}-{i}", f"AOI file {path} feature {i}")
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
