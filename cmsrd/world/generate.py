"""Generate an offline world directory (layout: `cmsrd.world` docstring) from a `WorldConfig`.

The whole world is written into a hidden temp dir next to `out` and renamed into place at the end,
so `out` either holds a complete world or nothing (individual files inside the temp dir are not
fsynced one by one: the final rename is the commit point). An `out` that already holds the same
world (same config hash) is returned untouched; an `out` holding anything else is refused.
Same config -> byte-identical files: no clock time reaches GeoTIFF, JPEG, PBF or JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import rasterio
from PIL import Image
from pyproj import Transformer
from rasterio.enums import Resampling
from tqdm import tqdm

from ..classes import CLASSES, legend
from ..errors import InputError
from .config import GENERATOR_VERSION, WorldConfig, pixel_size_3857
from .features import LINE_WIDTH_M, synthesize
from .hr_render import render_hr
from .osm_writer import mercator_to_lonlat, write_pbf
from .sentinel2_sim import SCL, simulate_s2
from .stac_items import COLLECTIONS, collection_dict, item_dict

SHIFT_CONVENTION = (
    "shift (dx, dy) in metres, +x east, +y north: where S2 content sits relative to the "
    "truth/HR; a feature at true (E, N) appears in S2 at (E+dx, N+dy). Register S2 onto the HR "
    "by moving it (-dx, -dy). In S2 pixels: columns +dx/10, rows -dy/10."
)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _check_out(out: Path, cfg: WorldConfig) -> bool:
    """True when `out` already holds this exact world; raises when it holds something else."""
    if out.exists() and not out.is_dir():
        raise InputError(f"world output {out}", "is a file, not a directory", "choose a directory path for --out")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    meta = out / "world.json"
    if meta.is_file():
        try:
            have = json.loads(meta.read_text()).get("config_hash")
        except (OSError, ValueError):
            have = None
        if have == cfg.config_hash():
            return True
        raise InputError(
            f"world output {out}",
            "already holds a different world (other seed or settings)",
            "delete it or choose another --out directory",
        )
    raise InputError(
        f"world output {out}", "is not empty and is not an offline world", "choose an empty or new directory for --out"
    )


def _write_hr(path: Path, rgb: np.ndarray, transform, cfg: WorldConfig) -> None:
    h, w, _ = rgb.shape
    prof = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:3857",
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "JPEG",
        "photometric": "YCBCR",
        "jpeg_quality": cfg.jpeg_quality,
        "interleave": "pixel",
    }
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(np.moveaxis(rgb, 2, 0))
        ds.update_tags(SOURCE="cmsrd offline world (synthetic aerial)", CAPTURE_DATE=cfg.hr_capture_date)
        levels = [f for f in (2, 4, 8, 16) if min(h, w) // f >= 128]
        if levels:
            ds.build_overviews(levels, Resampling.average)
            ds.update_tags(ns="rio_overview", resampling="average")


def _write_classes(path: Path, classes: np.ndarray, transform) -> None:
    h, w = classes.shape
    prof = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:3857",
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "DEFLATE",
    }
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(classes, 1)
        ds.update_tags(LEGEND=json.dumps({c.name: c.id for c in CLASSES}))


def _write_tiles(root: Path, rgb: np.ndarray, cfg: WorldConfig) -> int:
    """XYZ pyramid: the HR is exactly the hr_zoom tile grid; coarser zooms are area-averaged."""
    x0, y0, _, _ = cfg.tile_range
    zmin = cfg.zooms[0]
    n = 0
    for z in cfg.zooms:
        f = 2 ** (cfg.hr_zoom - z)
        img = rgb if f == 1 else cv2.resize(rgb, (rgb.shape[1] // f, rgb.shape[0] // f), interpolation=cv2.INTER_AREA)
        X0, Y0 = x0 * 2 ** (z - zmin), y0 * 2 ** (z - zmin)
        for ty in range(img.shape[0] // 256):
            for tx in range(img.shape[1] // 256):
                p = root / "tiles" / str(z) / str(X0 + tx) / f"{Y0 + ty}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256]).save(
                    p, format="JPEG", quality=cfg.jpeg_quality
                )
                n += 1
    return n


def _bbox_lonlat(bbox_utm, epsg: int):
    if bbox_utm is None:
        return None
    tf = Transformer.from_crs(epsg, 4326, always_xy=True)
    xs, ys = tf.transform(
        [bbox_utm[0], bbox_utm[2], bbox_utm[0], bbox_utm[2]], [bbox_utm[1], bbox_utm[1], bbox_utm[3], bbox_utm[3]]
    )
    return [min(xs), min(ys), max(xs), max(ys)]


@contextlib.contextmanager
def _single_thread_cv2():
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)


def generate_world(config: WorldConfig, out: str | os.PathLike, progress: bool = True) -> Path:
    """Generate the world described by `config` into `out` (atomically). Returns `out`."""
    out = Path(out).absolute()
    if _check_out(out, config):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        with _single_thread_cv2(), tqdm(total=7, desc="world", unit="stage", disable=not progress) as bar:
            _build(config, tmp, bar)
        if out.is_dir():
            out.rmdir()  # empty (checked above); a race that filled it makes this fail loudly
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build(cfg: WorldConfig, root: Path, bar: tqdm) -> None:
    bar.set_postfix_str("features")
    world = synthesize(cfg)
    bar.update()

    bar.set_postfix_str("osm")
    (root / "osm").mkdir()
    osm_counts = write_pbf(world, root / "osm" / "world.osm.pbf", cfg.seed)
    bar.update()

    bar.set_postfix_str("hr render")
    hr = render_hr(world, cfg)
    bar.update()

    bar.set_postfix_str("hr geotiff")
    (root / "hr").mkdir()
    (root / "truth").mkdir()
    _write_hr(root / "hr" / "hr.tif", hr.rgb, hr.transform, cfg)
    _write_classes(root / "truth" / "classes.tif", hr.classes, hr.transform)
    hist = np.bincount(hr.classes.ravel(), minlength=len(CLASSES)) / hr.classes.size
    del hr.classes
    bar.update()

    bar.set_postfix_str("xyz tiles")
    n_tiles = _write_tiles(root, hr.rgb, cfg)
    del hr.rgb
    bar.update()

    bar.set_postfix_str("sentinel-2")
    records = simulate_s2(world, cfg, root)
    bar.update()

    bar.set_postfix_str("stac + truth")
    for coll in COLLECTIONS:
        items = []
        for rec in records:
            valid = sum(v for k, v in rec["scl_counts"].items() if k != "NO_DATA")
            pct = {k: round(100.0 * rec["scl_counts"][k] / max(valid, 1), 6) for k in SCL}
            item = item_dict(rec, pct, coll)
            items.append(item)
            _json(root / "stac" / "items" / f"{item['id']}.json", item)
        _json(root / "stac" / "collections" / f"{coll}.json", collection_dict(items, coll))

    minx, miny, maxx, maxy = cfg.bounds_3857
    (w, e), (s, n) = mercator_to_lonlat(np.array([minx, maxx]), np.array([miny, maxy]))
    bounds_ll = [float(w), float(s), float(e), float(n)]
    for rec in records:
        if rec["cloud"]:
            rec["cloud"]["bbox_lonlat"] = _bbox_lonlat(rec["cloud"]["bbox_utm"], rec["epsg"])
            rec["cloud"]["shadow_bbox_lonlat"] = _bbox_lonlat(rec["cloud"]["shadow_bbox_utm"], rec["epsg"])
    truth = {
        "world": cfg.name,
        "seed": cfg.seed,
        "config_hash": cfg.config_hash(),
        "feature_counts": world.counts(),
        "osm_objects": osm_counts,
        "class_pixel_fractions": {c.name: round(float(hist[c.id]), 6) for c in CLASSES},
        "line_widths_m": LINE_WIDTH_M,
        "legend": legend(),
        "hr": {
            "capture_date": cfg.hr_capture_date,
            "crs": "EPSG:3857",
            "zoom": cfg.hr_zoom,
            "pixel_size_3857_m": pixel_size_3857(cfg.hr_zoom),
            "shape": list(cfg.hr_shape),
            **hr.params,
        },
        "hr_capture_date": cfg.hr_capture_date,
        "s2_shift_convention": SHIFT_CONVENTION,
        "s2_shift": {
            "east_m": records[0]["shift_m"][0],
            "north_m": records[0]["shift_m"][1],
            "east_px": records[0]["shift_px"][0],
            "north_px": records[0]["shift_px"][1],
            "convention": SHIFT_CONVENTION,
        },
        "s2_dn_to_reflectance": (
            "sentinel-2-l2a: "
            + (
                "reflectance = DN / 10000 (the pixels already hold reflectance x 10000; do not apply the "
                "raster:bands offset again)"
                if cfg.s2_boa_offset_applied
                else "reflectance = DN / 10000 - 0.1 (raster:bands scale/offset apply)"
            )
            + f"; items say earthsearch:boa_offset_applied={records[0]['boa_offset_flag']}"
            + "; sentinel-2-c1-l2a: reflectance = DN / 10000 - 0.1 (raster:bands scale/offset apply)"
        ),
        # keyed by the sentinel-2-l2a id, then by the same acquisition's sentinel-2-c1-l2a id
        "s2_items": {
            **{rec["id"]: rec for rec in records},
            **{rec["c1_id"]: {**rec, "collection": "sentinel-2-c1-l2a"} for rec in records},
        },
        "n_tiles": n_tiles,
    }
    _json(root / "truth" / "truth.json", truth)
    _json(
        root / "world.json",
        {
            "name": cfg.name,
            "seed": cfg.seed,
            "center_lon": cfg.center_lon,
            "center_lat": cfg.center_lat,
            "bounds_lonlat": bounds_ll,
            "bounds_3857": list(cfg.bounds_3857),
            "hr_gsd_m": pixel_size_3857(cfg.hr_zoom),
            "hr_ground_gsd_m": pixel_size_3857(cfg.hr_zoom) / cfg.mercator_scale,
            "zooms": list(cfg.zooms),
            "tile_range": {"z": cfg.zooms[0], "x0_y0_x1_y1": list(cfg.tile_range)},
            "utm_epsg": cfg.utm_epsg,
            "hr_capture_date": cfg.hr_capture_date,
            "s2_items": [rec["id"] for rec in records],  # sentinel-2-l2a
            "s2_items_c1": [rec["c1_id"] for rec in records],  # sentinel-2-c1-l2a, same acquisitions
            "attribution": cfg.attribution,
            "generator": f"cmsrd.world {GENERATOR_VERSION}",
            "config": cfg.to_dict(),
            "config_hash": cfg.config_hash(),
        },
    )
    bar.update()
