"""The dataset build: stages as plain functions, run as Dask tasks, streamed, journalled and resumable.

    plan row --> fetch_hr --> make_lr (bicubic | Sentinel-2) --> render_map --> coregister + QA --> write

`process_sample` chains the stages for one sample and never raises: it returns the sample's manifest
row with `qa_status` ok / rejected (a named QA reason) / failed (the source's named reason). The
driver (`run_build`) submits samples partition by partition to a `distributed` client -- a
`LocalCluster` of worker processes on 127.0.0.1 by default, or `--scheduler ADDRESS` -- keeping at most
`max_in_flight` futures alive, so memory does not grow with the plan. Catalogue searches run once per
(partition, spatial block) as their own tasks whose result feeds every sample task of that block.
Each finished sample is appended to the fsync'd journal (`cmsrd.journal`) only after its files were
written atomically, so a killed build resumes exactly where it stopped. The manifest and dataset.json
are written at the end from the journal, streamed in chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import qa
from .classes import CLASSES, palette
from .config import DatasetConfig
from .errors import InputError, SampleError
from .io import atomic_path, sha256_file, write_png
from .journal import BuildState, Journal
from .layout import IMAGE_KINDS, MANIFEST_COLUMNS, SPLITS, DatasetLayout, conform_manifest, write_dataset_json
from .plan import make_plan, write_plan

log = logging.getLogger(__name__)

# Manifest columns beyond the layout's schema that every row carries (fixed, so streamed chunks agree).
EXTRA_COLUMNS = (
    "aoi",
    "block",
    "lr_collection",
    "lr_baseline",
    "lr_scene_cloud_cover",
    "shift_correlation",
    "path_geo_hr",
    "sha256_geo_hr",
    "path_geo_lr",
    "sha256_geo_lr",
)
EXTRA_DTYPES = {
    c: ("float64" if c in ("lr_scene_cloud_cover", "shift_correlation") else "string") for c in EXTRA_COLUMNS
}
ROW_COLUMNS = tuple(MANIFEST_COLUMNS) + EXTRA_COLUMNS
# Source reasons that are quality verdicts, not failures -> the QA reason they are recorded under.
SOURCE_QA_REASONS = {"hr_placeholder": "hr_placeholder", "lr_cloudy": "cloud", "lr_nodata": "nodata"}


def redact(text: str | None) -> str:
    """Strip credentials from URLs and messages before they reach logs or records (the HTTP client's rules)."""
    from .sources.http import redact as redact_secrets

    return redact_secrets(text or "")


# ---- build spec and worker-side sources -------------------------------------------------------------


@dataclass(frozen=True)
class BuildSpec:
    """Everything a worker needs for any sample: picklable and small (sent with every task)."""

    cfg: DatasetConfig
    root: str
    osm: dict[str, str] = field(default_factory=dict)  # aoi name -> features GeoParquet
    cache_dir: str | None = None  # HR tile cache (None: no cache)

    @property
    def layout(self) -> DatasetLayout:
        return DatasetLayout(Path(self.root), self.cfg.hr_px, self.cfg.lr_px)

    @property
    def key(self) -> str:
        return hashlib.sha1(repr((self.cfg, self.root, sorted(self.osm.items()), self.cache_dir)).encode()).hexdigest()


_SOURCES: dict[str, dict[str, Any]] = {}  # per worker process: spec.key -> constructed sources


def _sources(spec: BuildSpec) -> dict[str, Any]:
    """HR/LR clients and OSM features, built once per worker process and reused by every task."""
    got = _SOURCES.get(spec.key)
    if got is None:
        got = {"osm": {}}
        _SOURCES.clear()  # one build per worker at a time; drop the previous build's objects
        _SOURCES[spec.key] = got
    return got


def _hr_source(spec: BuildSpec):
    src = _sources(spec)
    if "hr" not in src:
        cfg = spec.cfg.hr
        if cfg.source == "raster":
            from .sources.hr_raster import RasterHR

            src["hr"] = RasterHR(str(spec.cfg.resolve(cfg.raster)))
        else:
            from .sources.worldimagery import WorldImageryHR

            b = spec.cfg.build
            src["hr"] = WorldImageryHR(
                cfg.url,
                cache_dir=spec.cache_dir,
                identify_url=cfg.identify_url,
                timeout=(10.0, b.timeout_s),
                retry=_retry_policy(spec),
                rate=b.rate_per_worker or None,
                attribution=cfg.attribution,
                terms=cfg.terms,
            )
    return src["hr"]


def _retry_policy(spec: BuildSpec):
    from .sources.http import RetryPolicy

    return RetryPolicy(retries=spec.cfg.build.http_retries, backoff=spec.cfg.build.http_backoff_s)


def sentinelhub_source(cfg: DatasetConfig):
    """Sentinel Hub LR (credentials from SH_CLIENT_ID / SH_CLIENT_SECRET; checked when constructed)."""
    from .sources.sentinelhub_backend import SentinelHubLR

    return SentinelHubLR(
        window_days=int(cfg.qa.max_days_from_hr),
        max_cloud=cfg.lr.max_scene_cloud,
        max_footprint_cloud=cfg.qa.max_cloud_fraction,
    )


def _uses_catalogue(cfg: DatasetConfig) -> bool:
    """Whether LR scenes come from a STAC search that one block of samples can share."""
    return cfg.lr.source == "sentinel-2" and cfg.lr.backend == "stac"


def _lr_fetch(spec: BuildSpec, z: int, x: int, y: int, lr_px: int, hr_date: str | None, items):
    src = _lr_source(spec)
    if _uses_catalogue(spec.cfg):
        return src.fetch(z, x, y, lr_px, hr_date, items)
    return src.fetch(z, x, y, lr_px, hr_date)


def _lr_source(spec: BuildSpec):
    src = _sources(spec)
    if "lr" not in src:
        cfg = spec.cfg.lr
        if cfg.backend == "sentinelhub":
            src["lr"] = sentinelhub_source(spec.cfg)
        else:
            from .sources.sentinel2 import Sentinel2STAC

            qa_cfg = spec.cfg.qa
            # The QA thresholds drive scene selection: the source tries the next-best scene before giving up.
            src["lr"] = Sentinel2STAC(
                cfg.stac_url,
                cfg.collection,
                window_days=int(qa_cfg.max_days_from_hr),
                max_cloud=cfg.max_scene_cloud,
                max_footprint_cloud=qa_cfg.max_cloud_fraction,
                timeout=(10.0, spec.cfg.build.timeout_s),
                retry=_retry_policy(spec),
                rate=spec.cfg.build.rate_per_worker or None,
            )
    return src["lr"]


def _osm_features(spec: BuildSpec, aoi: str):
    src = _sources(spec)
    if aoi not in src["osm"]:
        from .sources.osm import OSMFeatures

        path = spec.osm.get(aoi)
        if path is None:
            raise SampleError("map_unavailable", f"no OSM features prepared for AOI {aoi!r}")
        src["osm"][aoi] = OSMFeatures.from_parquet(path)
    return src["osm"][aoi]


# ---- stages ----------------------------------------------------------------------------------------


def search_catalogue(spec: BuildSpec, bbox_lonlat: tuple[float, float, float, float]) -> dict[str, Any]:
    """One STAC search for a whole block of samples; failures are returned, not raised, so the
    samples depending on it are recorded as failed with the catalogue's reason."""
    try:
        items = _lr_source(spec).search_area(bbox_lonlat, spec.cfg.lr.start, spec.cfg.lr.end)
        return {"items": items, "reason": None, "detail": ""}
    except SampleError as e:
        return {"items": None, "reason": e.reason, "detail": redact(e.detail)}
    except Exception as e:  # a client bug must not take the block down silently
        return {"items": None, "reason": "catalogue_error", "detail": redact(f"{type(e).__name__}: {e}")}


def fetch_hr(spec: BuildSpec, task: dict):
    res = _hr_source(spec).fetch(task["z"], task["x"], task["y"], spec.cfg.hr_px)
    img = np.asarray(res.image)
    if img.shape != (spec.cfg.hr_px, spec.cfg.hr_px, 3) or img.dtype != np.uint8:
        raise SampleError("hr_bad_image", f"HR source returned {img.dtype} {img.shape}")
    return res


def make_lr(spec: BuildSpec, task: dict, hr, search: dict | None):
    """(lr uint8 LxLx3, LRResult or None)."""
    from .degrade import synthetic_lr

    if spec.cfg.lr.source == "bicubic":
        return synthetic_lr(hr.image, spec.cfg.scale), None
    if search is not None and search.get("reason"):
        raise SampleError(search["reason"], search.get("detail", ""))
    items = search.get("items") if search else None
    res = _lr_fetch(spec, task["z"], task["x"], task["y"], spec.cfg.lr_px, hr.date, items)
    img = np.asarray(res.image)
    if img.shape != (spec.cfg.lr_px, spec.cfg.lr_px, 3) or img.dtype != np.uint8:
        raise SampleError("lr_bad_image", f"LR source returned {img.dtype} {img.shape}")
    return img, res


def render_footprint(spec: BuildSpec, task: dict) -> tuple[np.ndarray, np.ndarray]:
    from .render import render_map

    feats = _osm_features(spec, task["aoi"])
    bounds = (task["minx"], task["miny"], task["maxx"], task["maxy"])
    return render_map(feats, bounds, spec.cfg.hr_px)


CONTEXT_LEVELS = 2  # co-registration window: the ancestor tile 2 zooms up (4 x 4 footprints, ~40 S2 pixels)
# Shift search bound on the ground: Sentinel-2 L2A geolocation is good to ~1 pixel and survey HR to a few
# metres, so 2 S2 pixels cover real misregistration; a wider search only finds the neighbouring period of
# a field lattice (see cmsrd.align). Never below twice the QA threshold, so rejections stay possible.
SHIFT_SEARCH_M = 20.0


def coregister(
    spec: BuildSpec, task: dict, hr, lr: np.ndarray, lr_res, search: dict | None
) -> tuple[float, float, float, float] | None:
    """Measured (dx, dy, error, correlation), LR pixels (+x east, +y south), or None for synthetic LR (bicubic from
    the HR itself: aligned by construction).

    One 100 m footprint holds ~10 Sentinel-2 pixels, too little texture for a sub-pixel measurement, so
    the shift is measured on the ancestor tile `CONTEXT_LEVELS` zooms up, in the *same scene* and at the
    same LR pixel size, and shared by every footprint of that window and scene (cached per worker).
    An unmeasurable window (flat, cloudy, outside the data) gives NaN, which is not a rejection.
    """
    if lr_res is None:
        return None
    from .align import measure_shift
    from .sources.base import ground_gsd_m

    nan = (float("nan"),) * 4
    k = min(CONTEXT_LEVELS, task["z"])
    zc, xc, yc = task["z"] - k, task["x"] >> k, task["y"] >> k
    cache = _sources(spec).setdefault("shift", {})
    key = (lr_res.scene_id, zc, xc, yc)
    if key not in cache:
        items = [i for i in (search or {}).get("items") or [] if _item_id(i) == lr_res.scene_id]
        try:
            hr_ctx = _hr_source(spec).fetch(zc, xc, yc, spec.cfg.hr_px)
            lr_ctx = _lr_fetch(spec, zc, xc, yc, spec.cfg.lr_px << k, hr.date, items or None)
            if lr_ctx.scene_id != lr_res.scene_id:
                raise SampleError("scene_mismatch", lr_ctx.scene_id)
            size = spec.cfg.lr_px << k
            limit = max(SHIFT_SEARCH_M / ground_gsd_m(zc, yc, size), 2.0 * spec.cfg.qa.max_shift_lrpx)
            sh = measure_shift(lr_ctx.image, hr_ctx.image, max_shift=min(limit, size / 8.0))
            cache[key] = (float(sh.dx), float(sh.dy), float(sh.error), float(sh.correlation))
        except (SampleError, InputError):
            cache[key] = nan
        if len(cache) > 4096:
            cache.pop(next(iter(cache)))
    return cache[key]


def _item_id(item: Any) -> str:
    return str(item.get("id")) if isinstance(item, dict) else str(getattr(item, "id", ""))


def write_sample(spec: BuildSpec, task: dict, images: dict[str, np.ndarray], geo: bool) -> dict[str, str]:
    """Atomic PNG writes into the split folders (+ optional GeoTIFFs); returns path/sha columns."""
    layout = spec.layout
    sid, split = task["id"], task["split"]
    out: dict[str, str] = {}
    for kind in IMAGE_KINDS:
        path = layout.image_path(split, kind, sid)
        write_png(path, images[kind], palette=palette() if kind == "mask" else None)
        out[f"path_{kind}"] = layout.relpath(path)
        out[f"sha256_{kind}"] = sha256_file(path)
    if geo:
        bounds = (task["minx"], task["miny"], task["maxx"], task["maxy"])
        for which in ("hr", "lr"):
            path = layout.geotiff_path(sid, which)
            write_geotiff(path, images[which], bounds)
            out[f"path_geo_{which}"] = layout.relpath(path)
            out[f"sha256_geo_{which}"] = sha256_file(path)
    return out


def write_geotiff(path: Path, image: np.ndarray, bounds_3857: tuple[float, float, float, float]) -> None:
    import rasterio
    from affine import Affine

    h, w = image.shape[:2]
    minx, miny, maxx, maxy = bounds_3857
    transform = Affine((maxx - minx) / w, 0.0, minx, 0.0, -(maxy - miny) / h, maxy)
    profile = dict(
        driver="GTiff",
        width=w,
        height=h,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=transform,
        compress="deflate",
        photometric="RGB",
    )
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(np.moveaxis(image, -1, 0))


def base_row(spec: BuildSpec, task: dict) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in ROW_COLUMNS}
    for k in ("id", "split", "z", "x", "y", "lon", "lat", "minx", "miny", "maxx", "maxy", "hr_gsd_m", "aoi", "block"):
        row[k] = task.get(k)
    cfg = spec.cfg
    row["hr_source"] = "raster" if cfg.hr.source == "raster" else "worldimagery"
    row["lr_source"] = cfg.lr.source
    row["map_source"] = cfg.map.source
    return row


def process_sample(spec: BuildSpec, task: dict, search: dict | None = None) -> dict[str, Any]:
    """All stages for one sample -> its manifest row (never raises; reasons go into the row).

    A rejected or failed sample writes nothing; files an earlier attempt may have left are pruned by
    `finalize` (never here: a stale task of a killed driver must not delete a resumed build's files).
    """
    row = base_row(spec, task)
    timing: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timing[name] = round(now - t, 5)
        t = now

    cfg = spec.cfg
    try:
        hr = fetch_hr(spec, task)
        row["hr_date"] = hr.date or ""
        lap("hr_fetch")
        qa.check_hr(hr.image, cfg.qa)
        lr, lr_res = make_lr(spec, task, hr, search)
        if lr_res is not None:
            row.update(
                lr_scene_id=lr_res.scene_id,
                lr_datetime=lr_res.datetime,
                lr_cloud_fraction=lr_res.cloud_fraction,
                lr_days_from_hr=lr_res.days_from_hr,
                lr_radiometry=lr_res.radiometry,
                lr_collection=lr_res.collection,
                lr_baseline=lr_res.baseline,
                lr_scene_cloud_cover=lr_res.scene_cloud_cover,
            )
        else:
            row["lr_radiometry"] = f"MATLAB bicubic x{cfg.scale} (antialiased) of the HR"
        lap("lr")
        if lr_res is not None:
            qa.check_lr(lr, lr_res.cloud_fraction, lr_res.days_from_hr, cfg.qa)
        from .degrade import upsample

        sr = upsample(lr, cfg.hr_px)
        map_rgb, mask = render_footprint(spec, task)
        for name, v in qa.map_fractions(mask).items():
            row[f"frac_{name}"] = v
        lap("map")
        qa.check_map(mask, cfg.qa)
        shift = coregister(spec, task, hr, lr, lr_res, search)
        if shift is not None:
            row["shift_x_lrpx"], row["shift_y_lrpx"], row["shift_error"], row["shift_correlation"] = shift
            qa.check_shift(shift[0], shift[1], shift[3], cfg.qa)
        else:
            row["shift_x_lrpx"], row["shift_y_lrpx"], row["shift_error"], row["shift_correlation"] = 0.0, 0.0, 0.0, 1.0
        lap("coregister")
        files = write_sample(
            spec, task, {"hr": hr.image, "lr": lr, "sr": sr, "map": map_rgb, "mask": mask}, cfg.output.geotiff
        )
        row.update(files)
        lap("write")
        row.update(qa_status="ok", qa_reason="", qa_detail="")
    except qa.QARejected as e:
        row.update(qa_status="rejected", qa_reason=e.reason, qa_detail=redact(e.detail))
    except SampleError as e:
        if e.reason in SOURCE_QA_REASONS:  # the source found data, but none that passes the QA thresholds
            row.update(qa_status="rejected", qa_reason=SOURCE_QA_REASONS[e.reason], qa_detail=redact(e.detail)[:500])
        else:
            row.update(qa_status="failed", qa_reason=e.reason, qa_detail=redact(e.detail)[:500])
    except Exception as e:  # any other bug in a stage is this sample's failure, never the build's
        row.update(qa_status="failed", qa_reason="error", qa_detail=redact(f"{type(e).__name__}: {e}")[:500])
    row["_timing"] = timing
    return row


# ---- world (demo presets) --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("CMSRD_CACHE", Path.home() / ".cache" / "cmsrd"))


def ensure_world(cfg: DatasetConfig) -> Path:
    """The demo preset's offline world directory, generated once under the cache dir."""
    from .world.config import WorldConfig

    ref = cfg.world
    if ref.path:
        path = cfg.resolve(ref.path)
        if not (path / "world.json").exists():
            raise InputError(f"world.path {ref.path}", f"{path} holds no world.json", "generate one with `cmsrd world`")
        return path
    wcfg = WorldConfig.from_dict(dict(ref.config))
    base = Path(os.path.expanduser(ref.cache_dir)) if ref.cache_dir else default_cache_dir() / "worlds"
    path = base / f"{wcfg.name}-{wcfg.config_hash()[:12]}"
    if not (path / "world.json").exists():
        from .world.generate import generate_world

        log.info("generating offline world %s (first use)", path)
        generate_world(wcfg, path)
    return path


@contextlib.contextmanager
def resolved_sources(cfg: DatasetConfig, faults: Any = None) -> Iterator[tuple[DatasetConfig, tuple | None]]:
    """Yield (config with live endpoints, world lon/lat bounds or None).

    Demo presets generate (if absent) and serve the offline world on 127.0.0.1 for the duration.
    """
    if cfg.world is None:
        yield cfg, None
        return
    from .world.servers import serve_world

    world = ensure_world(cfg)
    if faults is None and cfg.world.faults:
        from .world.faults import FaultConfig

        faults = FaultConfig(**cfg.world.faults)
    meta = json.loads((world / "world.json").read_text())
    with serve_world(world, host="127.0.0.1", port=0, faults=faults) as srv:
        hr = dataclasses.replace(
            cfg.hr,
            source="worldimagery",
            url=srv.tile_template,
            identify_url=srv.identify_url,
            attribution=meta.get("attribution", cfg.hr.attribution),
            terms="synthetic offline world (no real data)",
        )
        lr = dataclasses.replace(cfg.lr, stac_url=srv.stac_url)
        mp = dataclasses.replace(
            cfg.map,
            pbf=cfg.map.pbf or str(world / "osm" / "world.osm.pbf"),
            attribution="synthetic OSM data of the offline world",
        )
        yield dataclasses.replace(cfg, hr=hr, lr=lr, map=mp), tuple(meta["bounds_lonlat"])


def prepare_osm(cfg: DatasetConfig, plan: pd.DataFrame, state_dir: Path) -> dict[str, str]:
    """Per-AOI map features as GeoParquet (done once per build; workers read them by AOI)."""
    from .grid import tile_xy_to_lonlat
    from .sources.osm import OSMFeatures

    out: dict[str, str] = {}
    for aoi, rows in plan.groupby("aoi", sort=True):
        path = state_dir / "osm" / f"{aoi}.parquet"
        out[str(aoi)] = str(path)
        if path.exists():
            continue
        z = int(rows["z"].iloc[0])
        w, n = tile_xy_to_lonlat(np.array([rows["x"].min()]), np.array([rows["y"].min()]), z)
        e, s = tile_xy_to_lonlat(np.array([rows["x"].max() + 1]), np.array([rows["y"].max() + 1]), z)
        bbox = (float(w[0]), float(s[0]), float(e[0]), float(n[0]))
        if cfg.map.pbf:
            pbf = cfg.resolve(cfg.map.pbf)
        else:
            from .sources.geofabrik import extract_for_aoi

            _, pbf = extract_for_aoi(bbox, default_cache_dir() / "osm", index_url=cfg.map.geofabrik_index)
        OSMFeatures.from_pbf(pbf, bbox).to_parquet(path)
    return out


# ---- driver -----------------------------------------------------------------------------------------


@dataclass
class BuildReport:
    root: Path
    planned: int
    skipped: int  # already done in an earlier run
    processed: int
    counts: dict[str, int]
    seconds: float

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "cmsrd",
        "numpy",
        "pandas",
        "pyarrow",
        "dask",
        "distributed",
        "rasterio",
        "shapely",
        "geopandas",
        "osmium",
        "mercantile",
        "pystac-client",
        "pillow",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def plan_fingerprint(plan: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for sid, split in zip(plan["id"].astype(str), plan["split"].astype(str)):
        h.update(f"{sid}:{split}\n".encode())
    return h.hexdigest()[:16]


def _open_client(workers: int, threads: int, scheduler: str | None):
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except OSError as e:
            raise InputError(
                f"--scheduler {scheduler}",
                f"cannot connect ({e})",
                "start one with `dask scheduler` + `dask worker ADDRESS`, or omit --scheduler",
            ) from None
    # No dashboard; distributed's always-on HTTP endpoint is bound to loopback on a free port.
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.ERROR,
    )
    return Client(cluster), cluster


def _partitions(todo: pd.DataFrame, size: int) -> Iterator[list[dict]]:
    cols = ["id", "split", "z", "x", "y", "lon", "lat", "minx", "miny", "maxx", "maxy", "hr_gsd_m", "aoi", "block"]
    for start in range(0, len(todo), size):
        chunk = todo.iloc[start : start + size][cols]
        recs = chunk.to_dict("records")
        for r in recs:
            for k in ("z", "x", "y"):
                r[k] = int(r[k])
            for k in ("id", "split", "aoi", "block"):
                r[k] = str(r[k])
        yield recs


def _block_bbox(tasks: list[dict]) -> tuple[float, float, float, float]:
    from pyproj import Transformer

    tr = Transformer.from_crs(3857, 4326, always_xy=True)
    minx = min(t["minx"] for t in tasks)
    miny = min(t["miny"] for t in tasks)
    maxx = max(t["maxx"] for t in tasks)
    maxy = max(t["maxy"] for t in tasks)
    w, s = tr.transform(minx, miny)
    e, n = tr.transform(maxx, maxy)
    return (w, s, e, n)


def _failed_row(spec: BuildSpec, task: dict, reason: str, detail: str) -> dict[str, Any]:
    row = base_row(spec, task)
    row.update(qa_status="failed", qa_reason=reason, qa_detail=redact(detail)[:500], _timing={})
    return row


def run_build(
    cfg: DatasetConfig,
    out: str | os.PathLike,
    *,
    plan: pd.DataFrame | None = None,
    workers: int = 2,
    threads: int = 2,
    scheduler: str | None = None,
    force: bool = False,
    limit: int | None = None,
    progress: bool = True,
    faults: Any = None,
) -> BuildReport:
    """Build (or resume) a dataset into `out`. `workers=0` runs the stages in this process (debugging)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    state = BuildState(root)
    state.lock()
    t0 = time.perf_counter()
    try:
        state.precheck(cfg.fingerprint(), force)
        with resolved_sources(cfg, faults) as (rcfg, world_bounds):
            if plan is None:
                plan = make_plan(cfg, world_bounds)
            if rcfg.lr.source == "sentinel-2" and rcfg.lr.backend == "sentinelhub":
                sentinelhub_source(rcfg)  # missing credentials: one clear error before any work
            fp = f"{cfg.fingerprint()}-{plan_fingerprint(plan)}"
            resuming = state.check_identity(cfg.name, fp, cfg.content_dict(), force)
            layout = DatasetLayout(root, cfg.hr_px, cfg.lr_px)
            if force or not resuming:
                state.reset(
                    [root / s for s in SPLITS]
                    + [
                        root / "geo",
                        layout.manifest_parquet,
                        layout.manifest_csv,
                        layout.dataset_json,
                        state.dir / "osm",
                    ]
                )
            state.write_identity(cfg.name, fp, cfg.content_dict(), versions())
            write_plan(plan, state.dir / "plan.parquet")
            _remove_temp_files(root)
            osm = prepare_osm(rcfg, plan, state.dir)
            spec = BuildSpec(rcfg, str(root), osm, cache_dir=None)
            with Journal(state.journal_path) as journal:
                done = {sid for sid, (_, status) in journal.index().items() if status in ("ok", "rejected")}
                selected = plan if limit is None else plan.iloc[: int(limit)]
                todo = selected[~selected["id"].astype(str).isin(done)]
                processed = _execute(
                    spec, todo, journal, workers, threads, scheduler, progress, skipped=len(selected) - len(todo)
                )
            counts = finalize(spec, cfg, plan, state)
        return BuildReport(root, len(selected), len(selected) - len(todo), processed, counts, time.perf_counter() - t0)
    finally:
        state.unlock()


def _remove_temp_files(root: Path) -> None:
    """Half-written temp files of a killed build (never under a final name, see cmsrd.io)."""
    for sub in list(SPLITS) + ["geo", ""]:
        d = root / sub
        if not d.is_dir():
            continue
        it = d.rglob(".*.part") if sub else d.glob(".*.part")
        for p in it:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _execute(
    spec: BuildSpec,
    todo: pd.DataFrame,
    journal: Journal,
    workers: int,
    threads: int,
    scheduler: str | None,
    progress: bool,
    skipped: int,
) -> int:
    from tqdm import tqdm

    stats = {"ok": 0, "rejected": 0, "failed": 0}
    bar = tqdm(
        total=len(todo),
        disable=not progress,
        unit="sample",
        desc=f"build {spec.cfg.name}",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    if skipped:
        bar.write(f"resuming: {skipped} samples already done")

    first_failures: list[dict] = []
    abort_after = spec.cfg.build.abort_after_failures

    def record(row: dict) -> None:
        row["_done_at"] = round(time.time(), 3)  # journal only (not a manifest column): rates and profiles
        journal.append(row)
        stats[row["qa_status"]] += 1
        bar.set_postfix(ok=stats["ok"], rejected=stats["rejected"], failed=stats["failed"], refresh=False)
        bar.update(1)
        if abort_after and stats["ok"] == stats["rejected"] == 0:
            first_failures.append(row)
            if len(first_failures) >= abort_after:
                raise systematic_failure(spec.cfg.name, first_failures)

    real = _uses_catalogue(spec.cfg)
    try:
        if workers == 0 and not scheduler:
            for part in _partitions(todo, spec.cfg.build.partition_size):
                for block, tasks in _group_by_block(part):
                    search = search_catalogue(spec, _block_bbox(tasks)) if real else None
                    for task in tasks:
                        record(process_sample(spec, task, search))
            return len(todo)
        _run_distributed(spec, todo, workers, threads, scheduler, record)
        return len(todo)
    finally:
        bar.close()


def systematic_failure(name: str, rows: list[dict]) -> InputError:
    """The first samples of a run all failed: almost always one cause (no network, bad credentials, a
    wrong URL). Stop instead of failing every remaining sample after its retries; the failures are in the
    journal and are retried when the build is run again."""
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["qa_reason"]] = reasons.get(r["qa_reason"], 0) + 1
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return InputError(
        f"build {name}",
        f"the first {len(rows)} samples all failed ({summary}); e.g. {rows[-1]['qa_detail']}",
        "fix that cause (network, credentials, source URLs) and run the build again: it resumes and retries "
        "failed samples (set build.abort_after_failures: 0 to never stop early)",
    )


def _group_by_block(part: list[dict]) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = {}
    for t in part:
        groups.setdefault(t["block"], []).append(t)
    return list(groups.items())


def _run_distributed(
    spec: BuildSpec,
    todo: pd.DataFrame,
    workers: int,
    threads: int,
    scheduler: str | None,
    record: Callable[[dict], None],
) -> None:
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    client, cluster = _open_client(workers, threads, scheduler)
    try:
        nthreads = max(sum(client.nthreads().values()), 1)
        limit = spec.cfg.build.max_in_flight or 4 * nthreads
        spec_f = client.scatter(spec, broadcast=True)
        real = _uses_catalogue(spec.cfg)
        parts = _partitions(todo, spec.cfg.build.partition_size)
        ac = as_completed()
        tasks_of: dict[Any, dict] = {}
        pending: list[tuple[dict, Any]] = []  # (task, search future) not yet submitted

        def refill() -> None:
            while len(tasks_of) < limit:
                if not pending:
                    part = next(parts, None)
                    if part is None:
                        return
                    for _, tasks in _group_by_block(part):
                        sf = client.submit(search_catalogue, spec_f, _block_bbox(tasks), pure=False) if real else None
                        pending.extend((t, sf) for t in tasks)
                task, sf = pending.pop(0)
                f = client.submit(process_sample, spec_f, task, sf, key=f"sample-{task['id']}-{time.time_ns()}")
                tasks_of[f] = task
                ac.add(f)

        refill()
        while tasks_of:
            f = next(ac)
            task = tasks_of.pop(f)
            try:
                row = f.result()
            except KilledWorker as e:
                row = _failed_row(spec, task, "worker_died", str(e))
            except FutureCancelledError as e:
                row = _failed_row(spec, task, "cancelled", str(e))
            except Exception as e:  # an error outside process_sample's guard (e.g. unpicklable result)
                row = _failed_row(spec, task, "error", f"{type(e).__name__}: {e}")
            f.release()
            record(row)
            refill()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---- manifest + dataset.json -------------------------------------------------------------------------


def finalize(spec: BuildSpec, cfg: DatasetConfig, plan: pd.DataFrame, state: BuildState, chunk: int = 5000) -> dict:
    """Manifest (Parquet + CSV, streamed in plan order, last journal record per id) and dataset.json;
    files of samples that are not ok in their split are removed from the split folders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = spec.layout
    journal = Journal(state.journal_path)
    try:
        index = journal.index()
        ids = [sid for sid in plan["id"].astype(str) if sid in index]
        counts: dict[str, Any] = {"total": 0, "by_status": {}, "by_split": {}, "by_reason": {}}
        ok_ids: dict[str, set[str]] = {s: set() for s in SPLITS}
        with atomic_path(layout.manifest_parquet) as ptmp, atomic_path(layout.manifest_csv) as ctmp:
            writer = None
            for start in range(0, max(len(ids), 1), chunk):
                recs = list(journal.read_at([index[s][0] for s in ids[start : start + chunk]]))
                rows = [{k: r.get(k) for k in ROW_COLUMNS} for r in recs]
                df = conform_manifest(pd.DataFrame(rows, columns=list(ROW_COLUMNS)))
                for c, dt in EXTRA_DTYPES.items():  # fixed dtypes: every streamed chunk has one schema
                    df[c] = (pd.to_numeric(df[c], errors="coerce") if dt == "float64" else df[c]).astype(dt)
                for r in rows:
                    st, sp, reason = r["qa_status"], r["split"], r["qa_reason"] or ""
                    counts["total"] += 1
                    counts["by_status"][st] = counts["by_status"].get(st, 0) + 1
                    counts["by_split"].setdefault(sp, {}).setdefault(st, 0)
                    counts["by_split"][sp][st] += 1
                    if st != "ok":
                        counts["by_reason"][reason] = counts["by_reason"].get(reason, 0) + 1
                    if st == "ok":
                        ok_ids[sp].add(r["id"])
                table = pa.Table.from_pandas(df, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(ptmp, table.schema)
                writer.write_table(table)
                df.to_csv(ctmp, mode="a" if start else "w", header=(start == 0), index=False)
            if writer is not None:
                writer.close()
    finally:
        journal.close()
    _prune_split_folders(layout, ok_ids)
    meta = dataset_meta(cfg, spec.cfg, counts)
    write_dataset_json(layout.root, meta)
    return counts


def _prune_split_folders(layout: DatasetLayout, ok_ids: dict[str, set[str]]) -> None:
    """Only ok samples of a split may have files in that split's folders."""
    for split in SPLITS:
        for kind in IMAGE_KINDS:
            d = layout.image_dir(split, kind)
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.suffix == ".png" and p.stem not in ok_ids[split]:
                    p.unlink()
    geo = layout.root / "geo"
    if geo.is_dir():
        ok_all = set().union(*ok_ids.values())
        for p in geo.glob("*.tif"):
            if p.stem.rsplit("_", 1)[0] not in ok_all:
                p.unlink()


def dataset_meta(cfg: DatasetConfig, rcfg: DatasetConfig, counts: dict) -> dict[str, Any]:
    sources = {
        "hr": {
            "source": rcfg.hr.source,
            "url": redact(rcfg.hr.url),
            "attribution": rcfg.hr.attribution,
            "terms": rcfg.hr.terms,
        },
        "lr": {
            "source": rcfg.lr.source,
            "attribution": rcfg.lr.attribution if rcfg.lr.source != "bicubic" else "",
            "terms": rcfg.lr.terms if rcfg.lr.source != "bicubic" else "",
            **(
                {"backend": rcfg.lr.backend, "catalogue": redact(rcfg.lr.stac_url), "collection": rcfg.lr.collection}
                if rcfg.lr.source == "sentinel-2"
                else {"method": f"MATLAB bicubic x{cfg.scale}, antialiased"}
            ),
        },
        "map": {
            "source": rcfg.map.source,
            "attribution": rcfg.map.attribution,
            "terms": rcfg.map.terms,
            "legend": {c.name: {"id": c.id, "rgb": list(c.rgb)} for c in CLASSES},
        },
    }
    return {
        "name": cfg.name,
        "version": cfg.version,
        "description": cfg.description,
        "scale": cfg.scale,
        "hr_px": cfg.hr_px,
        "lr_px": cfg.lr_px,
        "zoom": cfg.zoom,
        "crs": "EPSG:3857",
        "sources": sources,
        "counts": counts,
        "config": cfg.content_dict(),
        "fingerprint": cfg.fingerprint(),
        "versions": versions(),
        "official_layout": "SGDM LRHRRefDataset: <split>/hr_<H>, ref_<H>, sr_<L>_<H> paired by sorted z_x_y names",
    }


# ---- validation --------------------------------------------------------------------------------------


def validate_dataset(root: str | os.PathLike, progress: bool = False) -> tuple[list[str], str]:
    """Recompute every checksum and check sizes, georeference and split disjointness.

    Returns (problems, one-line summary); an empty problem list means the dataset is valid.
    """
    from PIL import Image
    from tqdm import tqdm

    from .grid import tile_bounds_3857
    from .layout import read_dataset_json, read_manifest, validate_manifest_schema

    root = Path(root)
    meta = read_dataset_json(root)
    layout = DatasetLayout(root, int(meta["hr_px"]), int(meta["lr_px"]))
    df = read_manifest(root)
    problems = list(validate_manifest_schema(df))
    sizes = {"hr": layout.hr_px, "lr": layout.lr_px, "sr": layout.hr_px, "map": layout.hr_px, "mask": layout.hr_px}
    ok = df[df["qa_status"] == "ok"]
    expected: set[str] = set()
    n_files = 0
    for r in tqdm(ok.itertuples(index=False), total=len(ok), disable=not progress, desc="validate", unit="sample"):
        r = r._asdict()
        sid, split = str(r["id"]), str(r["split"])
        if split not in SPLITS:
            problems.append(f"{sid}: unknown split {split!r}")
            continue
        if sid != f"{r['z']}_{r['x']}_{r['y']}":
            problems.append(f"{sid}: id does not match z/x/y {r['z']}/{r['x']}/{r['y']}")
        else:
            tb = tile_bounds_3857(int(r["z"]), int(r["x"]), int(r["y"]))
            got = (r["minx"], r["miny"], r["maxx"], r["maxy"])
            if not np.allclose(tb, got, rtol=0, atol=1e-3):
                problems.append(f"{sid}: bounds {got} are not the tile's EPSG:3857 bounds {tb}")
        for kind in IMAGE_KINDS:
            path = layout.image_path(split, kind, sid)
            expected.add(str(path))
            if r.get(f"path_{kind}") != layout.relpath(path):
                problems.append(f"{sid}: path_{kind} {r.get(f'path_{kind}')!r} != {layout.relpath(path)!r}")
            if not path.exists():
                problems.append(f"{sid}: missing {layout.relpath(path)}")
                continue
            n_files += 1
            if sha256_file(path) != r.get(f"sha256_{kind}"):
                problems.append(f"{sid}: checksum mismatch for {layout.relpath(path)}")
            with Image.open(path) as im:
                if im.size != (sizes[kind], sizes[kind]):
                    problems.append(f"{sid}: {layout.relpath(path)} is {im.size}, expected {sizes[kind]}x{sizes[kind]}")
        for which in ("hr", "lr"):
            rel = r.get(f"path_geo_{which}")
            if isinstance(rel, str) and rel:
                problems.extend(_check_geotiff(layout, sid, which, rel, r, sizes[which]))
                n_files += 1
    for split in SPLITS:
        for kind in IMAGE_KINDS:
            d = layout.image_dir(split, kind)
            if d.is_dir():
                for p in d.glob("*.png"):
                    if str(p) not in expected:
                        problems.append(f"{layout.relpath(p)}: file of a sample that is not ok in split {split}")
    tr = {(int(a), int(b)) for a, b in zip(ok.loc[ok["split"] == "train", "x"], ok.loc[ok["split"] == "train", "y"])}
    touching = 0
    for a, b in zip(ok.loc[ok["split"] == "test", "x"], ok.loc[ok["split"] == "test", "y"]):
        if any((int(a) + dx, int(b) + dy) in tr for dx in (-1, 0, 1) for dy in (-1, 0, 1)):
            touching += 1
    if touching:
        problems.append(f"split: {touching} test tiles touch (share an edge or corner with) train tiles")
    counts = df.groupby("qa_status").size().to_dict()
    summary = (
        f"{meta['name']}: {len(df)} samples ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), "
        f"{n_files} files checked, {len(problems)} problems"
    )
    return problems, summary


def _check_geotiff(layout: DatasetLayout, sid: str, which: str, rel: str, r: dict, size: int) -> list[str]:
    import rasterio

    path = layout.root / rel
    if not path.exists():
        return [f"{sid}: missing {rel}"]
    out = []
    if sha256_file(path) != r.get(f"sha256_geo_{which}"):
        out.append(f"{sid}: checksum mismatch for {rel}")
    with rasterio.open(path) as ds:
        if ds.crs is None or ds.crs.to_epsg() != 3857:
            out.append(f"{sid}: {rel} has CRS {ds.crs}, expected EPSG:3857")
        b = ds.bounds
        if not np.allclose((b.left, b.bottom, b.right, b.top), (r["minx"], r["miny"], r["maxx"], r["maxy"]), atol=1e-3):
            out.append(f"{sid}: {rel} bounds {tuple(b)} differ from the footprint")
        if (ds.width, ds.height) != (size, size):
            out.append(f"{sid}: {rel} is {ds.width}x{ds.height}, expected {size}x{size}")
    return out
