"""Per-sample stages of the dataset build, as plain functions of (BuildSpec, SampleTask).

    plan row --> fetch_hr --> make_lr (search once per block, then fetch) --> render_map --> coregister + QA --> write

`process_sample` chains the stages for one sample and never raises: it returns the sample's manifest
row with `qa_status` ok / rejected (a named QA reason) / failed (the source's named reason). Sources are
resolved by name (`cmsrd.sources.registry`), built once per worker process and reused by every task
(`BuildSpec.key` names one build); no stage knows which source it talks to. The driver (`cmsrd.driver`)
decides where and when these functions run.
"""

from __future__ import annotations

import dataclasses
import errno
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
from .errors import CredentialsError, InputError, SampleError
from .io import atomic_path, sha256_file, write_png
from .layout import BUILD_COLUMNS, IMAGE_KINDS, DatasetLayout
from .plan import PLAN_COLUMNS
from .sources.base import HRResult, HRSource, LRResult, LRSource
from .sources.registry import hr_spec, lr_spec

# Source reasons that are quality verdicts, not failures -> the QA reason they are recorded under.
SOURCE_QA_REASONS = {"hr_placeholder": "hr_placeholder", "lr_cloudy": "cloud", "lr_nodata": "nodata"}
SOURCE_QA_REASONS["lr_radiometry_implausible"] = "lr_radiometry_implausible"  # raised by the source (cmsrd.qa)
# Causes no other sample can escape (refused credentials, a full or read-only disk): the row carries the
# error to the driver (`row["_stop"]`), which stops the build with it instead of recording the sample.
CREDENTIALS_REJECTED = "credentials_rejected"
DISK_FULL = "disk_full"
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}


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
    shift_dir: str | None = None  # co-registration results shared by the build's processes (cmsrd.shiftcache)

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


def hr_source(spec: BuildSpec) -> HRSource:
    """The HR source `hr.source` names (`cmsrd.sources.registry`)."""
    src = _sources(spec)
    if "hr" not in src:
        src["hr"] = hr_spec(spec.cfg.hr.source).build(spec.cfg, spec.cache_dir)
    return src["hr"]


def lr_source(spec: BuildSpec) -> LRSource:
    """The LR source `lr.source` / `lr.backend` name (`cmsrd.sources.registry`)."""
    src = _sources(spec)
    if "lr" not in src:
        src["lr"] = lr_spec(spec.cfg.lr.source, spec.cfg.lr.backend).build(spec.cfg, spec.cache_dir)
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


def search_block(spec: BuildSpec, bbox_lonlat: tuple[float, float, float, float]) -> dict[str, Any]:
    """The LR source's search step, once for a whole block of samples; failures are returned, not raised:
    each sample of the block then repeats the same search itself (`make_lr`), so a search that failed here
    costs only the samples whose own search fails too. Refused credentials are raised: they stop the build."""
    bbox = tuple(float(v) for v in bbox_lonlat)
    try:
        found = lr_source(spec).search(bbox, spec.cfg.lr.start, spec.cfg.lr.end)
        return {"found": found, "reason": None, "detail": "", "bbox": bbox}
    except CredentialsError:
        raise
    except SampleError as e:
        return {"found": None, "reason": e.reason, "detail": redact(e.detail), "bbox": bbox}
    except Exception as e:  # a client bug must not take the block down silently
        detail = redact(f"{type(e).__name__}: {e}")
        return {"found": None, "reason": "catalogue_error", "detail": detail, "bbox": bbox}


def fetch_hr(spec: BuildSpec, task: SampleTask):
    res = hr_source(spec).fetch(task.z, task.x, task.y, spec.cfg.hr_px)
    img = np.asarray(res.image)
    if img.shape != (spec.cfg.hr_px, spec.cfg.hr_px, 3) or img.dtype != np.uint8:
        raise SampleError("hr_bad_image", f"HR source returned {img.dtype} {img.shape}")
    return res


def make_lr(spec: BuildSpec, task: SampleTask, hr: HRResult, search: dict | None) -> tuple[np.ndarray, LRResult]:
    """(lr uint8 LxLx3, its LRResult) from the block's search result (None: the source has no search)."""
    found = search.get("found") if search else None
    if search is not None and search.get("reason"):
        if not search.get("bbox"):
            raise SampleError(search["reason"], search.get("detail", ""))
        # the block's search failed: this sample asks again (same area and dates, so the same scenes as a
        # build without the fault; the source keeps a success in memory for the worker's other samples)
        found = lr_source(spec).search(search["bbox"], spec.cfg.lr.start, spec.cfg.lr.end)
    res = lr_source(spec).fetch_footprint(task.z, task.x, task.y, spec.cfg.lr_px, hr, found)
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
    spec: BuildSpec, task: SampleTask, hr: HRResult, lr: np.ndarray, lr_res: LRResult, search: dict | None
) -> tuple[float, float, float, float] | None:
    """Measured (dx, dy, error, correlation), LR pixels (+x east, +y south), or None for synthetic LR (computed
    from the HR itself: aligned by construction).

    One 100 m footprint holds ~10 Sentinel-2 pixels, too little texture for a sub-pixel measurement, so
    the shift is measured on the ancestor tile `CONTEXT_LEVELS` zooms up, in the *same scene* and at the
    same LR pixel size, and shared by every footprint of that window and scene (`cmsrd.shiftcache`: once per
    build, in memory and on disk beside the journal).
    An unmeasurable window (flat, cloudy, outside the data, another scene) gives NaN, which QA rejects as
    `shift_unmeasured`. A window that could not be *fetched* (the source's retries ran out) is not
    cached: the sample fails with the source's reason and a resumed build tries it again.
    """
    if lr_res.synthetic:
        return None
    from .align import measure_shift
    from .shiftcache import shared_shift
    from .sources.base import ground_gsd_m

    nan = (float("nan"),) * 4
    k = min(CONTEXT_LEVELS, task.z)
    zc, xc, yc = task.z - k, task.x >> k, task.y >> k
    key = (lr_res.scene_id, zc, xc, yc)

    def measure() -> tuple[float, float, float, float]:
        # The window is read from the sample's scene only: the block's candidates narrowed to it, ranked by
        # the sample's HR date (the window's own capture date may differ).
        same = [i for i in (search or {}).get("found") or [] if _item_id(i) == lr_res.scene_id]
        try:
            hr_ctx = hr_source(spec).fetch(zc, xc, yc, spec.cfg.hr_px)
            ranked_by = dataclasses.replace(hr_ctx, date=hr.date)
            lr_ctx = lr_source(spec).fetch_footprint(zc, xc, yc, spec.cfg.lr_px << k, ranked_by, same or None)
            if lr_ctx.scene_id != lr_res.scene_id:
                raise SampleError("scene_mismatch", lr_ctx.scene_id)
            size = spec.cfg.lr_px << k
            limit = max(SHIFT_SEARCH_M / ground_gsd_m(zc, yc, size), 2.0 * spec.cfg.qa.max_shift_lrpx)
            sh = measure_shift(lr_ctx.image, hr_ctx.image, max_shift=min(limit, size / 8.0))
            return (float(sh.dx), float(sh.dy), float(sh.error), float(sh.correlation))
        except CredentialsError:
            raise
        except SampleError as e:
            if e.reason not in SOURCE_QA_REASONS and e.reason != "scene_mismatch":
                raise SampleError(e.reason, f"co-registration window {zc}/{xc}/{yc}: {e.detail}") from None
            return nan
        except InputError:  # measure_shift: no texture, or too small a window to compare
            return nan

    return shared_shift(spec.shift_dir, (spec.key, *key), measure)


def _item_id(item: Any) -> str:
    return str(item.get("id")) if isinstance(item, dict) else str(getattr(item, "id", ""))


def write_sample(spec: BuildSpec, task: SampleTask, images: dict[str, np.ndarray], geo: bool) -> dict[str, str]:
    """Atomic PNG writes into the split folders (+ optional GeoTIFFs); returns path/sha columns."""
    layout = spec.layout
    sid, split = task.id, task.split
    out: dict[str, str] = {}
    for kind in IMAGE_KINDS:
        path = layout.image_path(split, kind, sid)
        pal = palette() if kind == "mask" else None
        write_png(path, images[kind], palette=pal, compress_level=spec.cfg.output.png_level)
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
    row["hr_source"] = cfg.hr.source
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
        if not lr_res.synthetic:
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
            row["lr_radiometry"] = lr_res.radiometry
        lap("lr")
        if not lr_res.synthetic:
            qa.check_lr(lr, lr_res.cloud_fraction, lr_res.days_from_hr, cfg.qa)
        from .degrade import upsample

        sr = upsample(lr, cfg.hr_px, cfg.sr.upsample)
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
    except CredentialsError as e:  # not this sample's failure: the driver stops the build with it
        row.update(qa_status="failed", qa_reason=CREDENTIALS_REJECTED, qa_detail=redact(str(e))[:500])
        row["_stop"] = {"what": e.what, "problem": redact(e.problem), "fix": e.fix}
    except qa.QARejected as e:
        row.update(qa_status="rejected", qa_reason=e.reason, qa_detail=redact(e.detail))
    except SampleError as e:
        if e.reason in SOURCE_QA_REASONS:  # the source found data, but none that passes the QA thresholds
            row.update(qa_status="rejected", qa_reason=SOURCE_QA_REASONS[e.reason], qa_detail=redact(e.detail)[:500])
        else:
            row.update(qa_status="failed", qa_reason=e.reason, qa_detail=redact(e.detail)[:500])
    except OSError as e:
        row.update(qa_status="failed", qa_reason="error", qa_detail=redact(f"{type(e).__name__}: {e}")[:500])
        if e.errno in DISK_ERRNOS:
            row["qa_reason"] = DISK_FULL
            row["_stop"] = {
                "what": f"output dir {spec.root}",
                "problem": f"{DISK_ERRNOS[e.errno]} ({e.filename or 'writing a sample'})",
                "fix": "free space or write elsewhere, then run the build again: it resumes",
            }
    except Exception as e:  # any other bug in a stage is this sample's failure, never the build's
        row.update(qa_status="failed", qa_reason="error", qa_detail=redact(f"{type(e).__name__}: {e}")[:500])
    row["_timing"] = timing
    return row


def failed_row(spec: BuildSpec, task: SampleTask, reason: str, detail: str) -> dict[str, Any]:
    """The row of a sample whose task died outside `process_sample` (a killed worker, a cancelled future)."""
    row = base_row(spec, task)
    row.update(qa_status="failed", qa_reason=reason, qa_detail=redact(detail)[:500], _timing={})
    return row
