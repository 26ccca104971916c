"""Per-sample stages of the dataset build, as plain functions of (BuildSpec, SampleTask).

    plan row --> fetch_hr --> make_lr (bicubic | Sentinel-2) --> render_map --> coregister + QA --> write

`process_sample` chains the stages for one sample and never raises: it returns the sample's manifest
row with `qa_status` ok / rejected (a named QA reason) / failed (the source's named reason). Sources are
built once per worker process and reused by every task (`BuildSpec.key` names one build). The driver
(`cmsrd.driver`) decides where and when these functions run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import qa
from .classes import palette
from .config import DatasetConfig
from .errors import InputError, SampleError
from .io import atomic_path, sha256_file, write_png
from .layout import BUILD_COLUMNS, IMAGE_KINDS, DatasetLayout
from .plan import PLAN_COLUMNS

# Source reasons that are quality verdicts, not failures -> the QA reason they are recorded under.
SOURCE_QA_REASONS = {"hr_placeholder": "hr_placeholder", "lr_cloudy": "cloud", "lr_nodata": "nodata"}


def redact(text: str | None) -> str:
    """Strip credentials from URLs and messages before they reach logs or records (the HTTP client's rules)."""
    from .sources.http import redact as redact_secrets

    return redact_secrets(text or "")


# ---- the task: one plan row ----------------------------------------------------------------------------

_CAST = {"string": str, "int32": int, "int64": int, "float64": float}


@dataclass(frozen=True)
class SampleTask:
    """One plan row (`cmsrd.plan.PLAN_COLUMNS`, same names and order) as plain Python values: small and
    picklable, it travels with every Dask task."""

    id: str
    z: int
    x: int
    y: int
    lon: float
    lat: float
    minx: float
    miny: float
    maxx: float
    maxy: float
    hr_gsd_m: float
    block: str
    split: str
    aoi: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SampleTask:
        return cls(**{c: _CAST[dt](row[c]) for c, dt in PLAN_COLUMNS.items()})

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Footprint (minx, miny, maxx, maxy) in EPSG:3857 metres."""
        return (self.minx, self.miny, self.maxx, self.maxy)

    def columns(self) -> dict[str, Any]:
        """The plan columns, for the sample's manifest row."""
        return {c: getattr(self, c) for c in PLAN_COLUMNS}


def plan_tasks(plan: pd.DataFrame) -> list[SampleTask]:
    """Tasks of plan rows, in plan order."""
    return [SampleTask.from_row(r) for r in plan[list(PLAN_COLUMNS)].to_dict("records")]


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


def fetch_hr(spec: BuildSpec, task: SampleTask):
    res = _hr_source(spec).fetch(task.z, task.x, task.y, spec.cfg.hr_px)
    img = np.asarray(res.image)
    if img.shape != (spec.cfg.hr_px, spec.cfg.hr_px, 3) or img.dtype != np.uint8:
        raise SampleError("hr_bad_image", f"HR source returned {img.dtype} {img.shape}")
    return res


def make_lr(spec: BuildSpec, task: SampleTask, hr, search: dict | None):
    """(lr uint8 LxLx3, LRResult or None)."""
    from .degrade import synthetic_lr

    if spec.cfg.lr.source == "bicubic":
        return synthetic_lr(hr.image, spec.cfg.scale), None
    if search is not None and search.get("reason"):
        raise SampleError(search["reason"], search.get("detail", ""))
    items = search.get("items") if search else None
    res = _lr_fetch(spec, task.z, task.x, task.y, spec.cfg.lr_px, hr.date, items)
    img = np.asarray(res.image)
    if img.shape != (spec.cfg.lr_px, spec.cfg.lr_px, 3) or img.dtype != np.uint8:
        raise SampleError("lr_bad_image", f"LR source returned {img.dtype} {img.shape}")
    return img, res


def render_footprint(spec: BuildSpec, task: SampleTask) -> tuple[np.ndarray, np.ndarray]:
    from .render import render_map

    feats = _osm_features(spec, task.aoi)
    return render_map(feats, task.bounds, spec.cfg.hr_px)


CONTEXT_LEVELS = 2  # co-registration window: the ancestor tile 2 zooms up (4 x 4 footprints, ~40 S2 pixels)
# Shift search bound on the ground: Sentinel-2 L2A geolocation is good to ~1 pixel and survey HR to a few
# metres, so 2 S2 pixels cover real misregistration; a wider search only finds the neighbouring period of
# a field lattice (see cmsrd.align). Never below twice the QA threshold, so rejections stay possible.
SHIFT_SEARCH_M = 20.0


def coregister(
    spec: BuildSpec, task: SampleTask, hr, lr: np.ndarray, lr_res, search: dict | None
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
    k = min(CONTEXT_LEVELS, task.z)
    zc, xc, yc = task.z - k, task.x >> k, task.y >> k
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


def write_sample(spec: BuildSpec, task: SampleTask, images: dict[str, np.ndarray], geo: bool) -> dict[str, str]:
    """Atomic PNG writes into the split folders (+ optional GeoTIFFs); returns path/sha columns."""
    layout = spec.layout
    sid, split = task.id, task.split
    out: dict[str, str] = {}
    for kind in IMAGE_KINDS:
        path = layout.image_path(split, kind, sid)
        write_png(path, images[kind], palette=palette() if kind == "mask" else None)
        out[f"path_{kind}"] = layout.relpath(path)
        out[f"sha256_{kind}"] = sha256_file(path)
    if geo:
        for which in ("hr", "lr"):
            path = layout.geotiff_path(sid, which)
            write_geotiff(path, images[which], task.bounds)
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


def base_row(spec: BuildSpec, task: SampleTask) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(BUILD_COLUMNS)
    row.update(task.columns())
    cfg = spec.cfg
    row["hr_source"] = "raster" if cfg.hr.source == "raster" else "worldimagery"
    row["lr_source"] = cfg.lr.source
    row["map_source"] = cfg.map.source
    return row


def process_sample(spec: BuildSpec, task: SampleTask, search: dict | None = None) -> dict[str, Any]:
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


def failed_row(spec: BuildSpec, task: SampleTask, reason: str, detail: str) -> dict[str, Any]:
    """The row of a sample whose task died outside `process_sample` (a killed worker, a cancelled future)."""
    row = base_row(spec, task)
    row.update(qa_status="failed", qa_reason=reason, qa_detail=redact(detail)[:500], _timing={})
    return row
