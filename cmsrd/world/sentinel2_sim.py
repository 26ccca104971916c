"""A Sentinel-2 L2A-like product of the world: what the 10 m sensor would have seen on given dates.

Per date the simulator renders surface reflectance in B02/B03/B04/B08 on a 2 m UTM grid straight
from the vector features (material spectra, per-field and per-date variation, texture, trees),
displaced by a known sub-pixel shift, then degrades it the way the instrument and atmosphere do:
residual haze (Angstrom-like, strongest in blue) and per-band gain, a Gaussian PSF tuned to an
MTF of ~0.25 at Nyquist, integration over 10 m detectors, signal-dependent noise, an optional
cloud patch with its displaced shadow and a swath-edge no-data corner outside the world. SCL is
derived at 20 m from the simulated data with the real L2A class codes; TCI is the usual 0-2000 ->
0-255 true-colour stretch. Files are COGs in the UTM zone's CRS on a 60 m-aligned grid like real
tiles.

Sign convention of the shift: (dx, dy) metres, +x east, +y north, is where the S2 image content
sits relative to the truth (the HR): a feature at true (E, N) appears in the S2 raster at
(E + dx, N + dy). To register S2 onto the HR, move it by (-dx, -dy). In S2 pixel units, columns
move by dx/10 and rows by -dy/10.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy
from shapely.geometry import Polygon, box

from .config import WorldConfig
from .features import WorldFeatures
from .hr_render import _rasterize, fractal_noise
from .materials import INDEX, MATERIALS, S2_BANDS

FINE_M = 2.0  # simulation grid
OVERSAMPLE = 5  # 10 m / FINE_M
WAVELENGTH_UM = {"B02": 0.49, "B03": 0.56, "B04": 0.665, "B08": 0.842}
PSF_SIGMA_M = {"B02": 4.4, "B03": 4.4, "B04": 4.5, "B08": 4.9}
CLOUD_REFL = {"B02": 0.56, "B03": 0.54, "B04": 0.53, "B08": 0.55}
# SCL codes of the L2A scene classification
SCL = {
    "NO_DATA": 0,
    "SATURATED_OR_DEFECTIVE": 1,
    "DARK_AREA_PIXELS": 2,
    "CLOUD_SHADOWS": 3,
    "VEGETATION": 4,
    "NOT_VEGETATED": 5,
    "WATER": 6,
    "UNCLASSIFIED": 7,
    "CLOUD_MEDIUM_PROBABILITY": 8,
    "CLOUD_HIGH_PROBABILITY": 9,
    "THIN_CIRRUS": 10,
    "SNOW": 11,
}
COG_BLOCK = 128  # small blocks so even small worlds get internal tiling and an overview


def mgrs_square(lon: float, lat: float) -> str:
    """MGRS grid zone + 100 km square (e.g. '32UPU') of a point: the Sentinel-2 tile name.

    The lettering rule is a dozen lines (zone sets of column letters, row letters offset by five
    in even zones); not worth a new dependency.
    """
    zone = int((lon + 180.0) // 6) % 60 + 1
    band = "CDEFGHJKLMNPQRSTUVWX"[min(int((lat + 80) // 8), 19)]
    epsg = (32600 if lat >= 0 else 32700) + zone
    e, n = Transformer.from_crs(4326, epsg, always_xy=True).transform(lon, lat)
    col = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")[(zone - 1) % 3][int(e // 100000) - 1]
    row_letters = "ABCDEFGHJKLMNPQRSTUV"
    row = row_letters[(int(n // 100000) + (5 if zone % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{col}{row}"


@dataclass
class S2Grid:
    epsg: int
    transform: Affine  # 10 m
    shape: tuple[int, int]  # 10 m rows, cols

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return t.c, t.f - self.shape[0] * 10.0, t.c + self.shape[1] * 10.0, t.f


def s2_grid(cfg: WorldConfig) -> tuple[S2Grid, Polygon]:
    """The S2 crop: the world's UTM footprint + margin, snapped to the 60 m tile grid."""
    to_utm = Transformer.from_crs(3857, cfg.utm_epsg, always_xy=True)
    world = shapely.segmentize(box(*cfg.bounds_3857), 50.0)
    world_utm = shapely.transform(world, lambda c: np.c_[to_utm.transform(c[:, 0], c[:, 1])])
    x0, y0, x1, y1 = world_utm.bounds
    m = cfg.s2_margin_m
    x0, y0 = math.floor((x0 - m) / 60) * 60, math.floor((y0 - m) / 60) * 60
    x1, y1 = math.ceil((x1 + m) / 60) * 60, math.ceil((y1 + m) / 60) * 60
    shape = (int((y1 - y0) // 10), int((x1 - x0) // 10))
    return S2Grid(cfg.utm_epsg, Affine(10.0, 0, x0, 0, -10.0, y1), shape), world_utm


def write_cog(path: Path, data: np.ndarray, transform: Affine, epsg: int, nodata: int | None) -> None:
    """Write a COG (DEFLATE, internal tiles, overviews) via an in-memory GTiff + GDAL's COG driver."""
    bands = data[None] if data.ndim == 2 else data
    prof = {
        "driver": "GTiff",
        "width": bands.shape[2],
        "height": bands.shape[1],
        "count": bands.shape[0],
        "dtype": bands.dtype.name,
        "crs": f"EPSG:{epsg}",
        "transform": transform,
        "nodata": nodata,
    }
    with MemoryFile() as mem:
        with mem.open(**prof) as ds:
            ds.write(bands)
        rio_copy(
            mem.name,
            str(path),
            driver="COG",
            COMPRESS="DEFLATE",
            PREDICTOR="2",
            BLOCKSIZE=str(COG_BLOCK),
            OVERVIEWS="AUTO",
            RESAMPLING="AVERAGE" if nodata is not None and bands.dtype != np.uint8 else "NEAREST",
        )


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f, a.shape[1] // f
    return a[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3), dtype=np.float32)


def _item_id(platform: str, mgrs: str, date: str) -> str:
    return f"S2{platform[-1].upper()}_{mgrs}_{date.replace('-', '')}_0_L2A"


def simulate_s2(world: WorldFeatures, cfg: WorldConfig, out_root: Path) -> list[dict]:
    """Write sentinel2/<item_id>/{B02,B03,B04,B08,SCL,TCI}.tif (the sentinel-2-l2a files) and
    sentinel2-c1/<c1_id>/{B02,B03,B04,B08}.tif (Collection 1 DNs; SCL and TCI are shared) under `out_root`;
    return item records."""
    grid, world_utm = s2_grid(cfg)
    lon_c, lat_c = cfg.center_lon, cfg.center_lat
    mgrs = mgrs_square(lon_c, lat_c)
    to_utm = Transformer.from_crs(3857, grid.epsg, always_xy=True)
    fshape = (grid.shape[0] * OVERSAMPLE, grid.shape[1] * OVERSAMPLE)
    ftrans = Affine(FINE_M, 0, grid.transform.c, 0, -FINE_M, grid.transform.f)

    def utm(g):
        return shapely.transform(g, lambda c: np.c_[to_utm.transform(c[:, 0], c[:, 1])])

    order = [i for i, _ in world.draw_list()]
    geoms_utm = [utm(world.area_geometry(world.features[i])) for i in order]
    trees = [f for f in world.features if f.kind == "node" and f.tags.get("natural") == "tree"]
    tree_geoms = [utm(f.geometry).buffer(f.attrs["crown_m"], quad_segs=4) for f in trees]
    mat_lut = np.array(
        [0] + [INDEX[world.features[i].material] for i in order] + [INDEX[f.material] for f in trees], np.int32
    )
    refl_m = np.array([m.refl for m in MATERIALS], np.float32)  # (materials, 4)
    veg_m = np.array([m.vegetation for m in MATERIALS])

    records = []
    rng_all = np.random.default_rng([cfg.seed, 404])
    cloud_world = box(*world_utm.bounds)
    swath_item = cfg.s2_dates[-1] if cfg.s2_swath_edge else None
    # One geolocation bias of the S2 product against the HR, shared by all dates (S2 dates are
    # co-registered to each other far better than to an aerial survey).
    if cfg.s2_shift_px is not None:
        sx_px, sy_px = cfg.s2_shift_px
    else:
        sx_px, sy_px = (float(rng_all.uniform(0.15, 0.45) * rng_all.choice([-1, 1])) for _ in range(2))
    for k, date in enumerate(cfg.s2_dates):
        rng = np.random.default_rng([cfg.seed, 405, k])
        platform = "sentinel-2a" if (rng_all.integers(0, 2) == 0) else "sentinel-2b"
        item_id = _item_id(platform, mgrs, date)
        dx, dy = 10.0 * sx_px, 10.0 * sy_px
        shifted = [shapely.affinity.translate(g, dx, dy) for g in geoms_utm + tree_geoms]
        fid = _rasterize([(g, n + 1) for n, g in enumerate(shifted)], fshape, ftrans)
        mat = mat_lut[fid]

        # surface reflectance with per-field, per-date variation and texture
        n_feat = len(mat_lut)
        field_gain = rng.normal(1.0, 0.05, (n_feat, 4)).astype(np.float32)
        dryness = 0.04 * k  # later dates: vegetation a little drier (red up, NIR down)
        tex = 1 + 0.08 * fractal_noise(fshape, rng, 40.0 / FINE_M, 3)
        surf = np.empty((4,) + fshape, np.float32)
        for b in range(4):
            veg_adj = np.where(veg_m, {0: 1.0, 1: 1.0, 2: 1 + dryness, 3: 1 - dryness}[b], 1.0).astype(np.float32)
            base = refl_m[:, b] * veg_adj
            surf[b] = base[mat] * field_gain[fid, b] * tex
        del tex

        # cloud patch + shadow (only on cloudy dates)
        cloudy = date in cfg.cloudy_dates
        alpha = np.zeros(fshape, np.float32)
        shadow = np.zeros(fshape, np.float32)
        cloud_info = None
        sun_az, sun_el = float(rng.uniform(145, 160)), float(rng.uniform(58, 64))
        if cloudy:
            wx0, wy0, wx1, wy1 = cloud_world.bounds
            side = min(wx1 - wx0, wy1 - wy0)
            r = max(0.32 * side, 140.0)
            cx, cy = (
                rng.uniform(wx0 + 0.25 * side, wx1 - 0.25 * side),
                rng.uniform(wy0 + 0.25 * side, wy1 - 0.25 * side),
            )
            cols = (np.arange(fshape[1], dtype=np.float32) + 0.5) * FINE_M + ftrans.c
            rows = ftrans.f - (np.arange(fshape[0], dtype=np.float32) + 0.5) * FINE_M
            d2 = ((cols[None, :] - cx) / r) ** 2 + ((rows[:, None] - cy) / (0.8 * r)) ** 2
            alpha = np.clip(1.6 * (1 - d2) + 0.35 * fractal_noise(fshape, rng, 60.0 / FINE_M, 3), 0, 1)
            alpha = cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), 4.0)
            cloud_h = float(rng.uniform(400, 700))
            off = cloud_h / math.tan(math.radians(sun_el))
            sdx = -off * math.sin(math.radians(sun_az)) / FINE_M  # shadow falls away from the sun
            sdy = off * math.cos(math.radians(sun_az)) / FINE_M
            M = np.float32([[1, 0, sdx], [0, 1, sdy]])
            shadow = cv2.warpAffine(alpha, M, (fshape[1], fshape[0]), flags=cv2.INTER_LINEAR, borderValue=0)
            ys, xs = np.nonzero(alpha > 0.25)
            sys_, sxs = np.nonzero((shadow > 0.3) & (alpha < 0.25))

            def bbox(yy, xx):
                if yy.size == 0:
                    return None
                return [
                    float(ftrans.c + xx.min() * FINE_M),
                    float(ftrans.f - (yy.max() + 1) * FINE_M),
                    float(ftrans.c + (xx.max() + 1) * FINE_M),
                    float(ftrans.f - yy.min() * FINE_M),
                ]

            cloud_info = {
                "center_utm": [float(cx), float(cy)],
                "radius_m": float(r),
                "cloud_height_m": cloud_h,
                "bbox_utm": bbox(ys, xs),
                "shadow_bbox_utm": bbox(sys_, sxs),
                "shadow_offset_m": [float(sdx * FINE_M), float(-sdy * FINE_M)],
            }
        surf *= (1 - 0.65 * np.clip(shadow, 0, 1))[None]

        # atmosphere + instrument
        haze0 = float(rng.uniform(0.012, 0.02) if cloudy else rng.uniform(0.005, 0.01))
        haze_field = 1 + 0.3 * fractal_noise(fshape, rng, 400.0 / FINE_M, 2)
        gains = {bn: float(rng.normal(1.0, 0.03)) for bn in S2_BANDS}
        hazes = {bn: haze0 * (0.49 / WAVELENGTH_UM[bn]) ** 1.3 for bn in S2_BANDS}
        obs10 = np.empty((4,) + grid.shape, np.float32)
        for b, bn in enumerate(S2_BANDS):
            top = gains[bn] * surf[b] + hazes[bn] * haze_field
            top = (1 - alpha) * top + alpha * CLOUD_REFL[bn]
            top = cv2.GaussianBlur(top, (0, 0), PSF_SIGMA_M[bn] / FINE_M)
            o = _block_mean(top, OVERSAMPLE)
            o += rng.standard_normal(o.shape, dtype=np.float32) * (0.0015 + 0.01 * np.abs(o))
            obs10[b] = o
        del surf
        alpha20 = _block_mean(alpha, 2 * OVERSAMPLE)
        shadow20 = _block_mean(shadow, 2 * OVERSAMPLE)

        # swath edge: a no-data corner in the margin, outside the world
        valid10 = np.ones(grid.shape, bool)
        if date == swath_item:
            rr, cc = np.mgrid[0 : grid.shape[0], 0 : grid.shape[1]]
            valid10 = (rr + cc) * 10.0 >= 0.8 * cfg.s2_margin_m
        valid20 = _block_mean(valid10.astype(np.float32), 2) > 0.99

        # DN encoding
        add = 0 if cfg.s2_boa_offset_applied else 1000
        item_dir = out_root / "sentinel2" / item_id
        item_dir.mkdir(parents=True, exist_ok=True)
        for b, bn in enumerate(S2_BANDS):
            dn = np.clip(np.round(obs10[b] * 10000 + add), 1, 32767).astype(np.uint16)
            dn[~valid10] = 0
            write_cog(item_dir / f"{bn}.tif", dn, grid.transform, grid.epsg, 0)

        # SCL from the simulated data at 20 m
        o20 = np.stack([_block_mean(obs10[b], 2) for b in range(4)])
        blue, green, red, nir = o20
        ndvi = (nir - red) / np.maximum(nir + red, 1e-4)
        ndwi = (green - nir) / np.maximum(green + nir, 1e-4)
        scl = np.full(o20.shape[1:], SCL["NOT_VEGETATED"], np.uint8)
        scl[ndvi > 0.4] = SCL["VEGETATION"]
        scl[(nir + red) < 0.06] = SCL["DARK_AREA_PIXELS"]
        scl[(ndwi > 0.1) & (nir < 0.06)] = SCL["WATER"]
        scl[shadow20 > 0.3] = SCL["CLOUD_SHADOWS"]
        scl[(alpha20 > 0.06) & (alpha20 <= 0.25)] = SCL["THIN_CIRRUS"]
        scl[(alpha20 > 0.25) & (alpha20 <= 0.55)] = SCL["CLOUD_MEDIUM_PROBABILITY"]
        scl[alpha20 > 0.55] = SCL["CLOUD_HIGH_PROBABILITY"]
        scl[~valid20] = SCL["NO_DATA"]
        scl_t = Affine(20.0, 0, grid.transform.c, 0, -20.0, grid.transform.f)
        write_cog(item_dir / "SCL.tif", scl, scl_t, grid.epsg, 0)

        tci = np.clip(np.round(obs10[[2, 1, 0]] * 10000 / 2000 * 255), 1, 255).astype(np.uint8)
        tci[:, ~valid10] = 0
        write_cog(item_dir / "TCI.tif", tci, grid.transform, grid.epsg, 0)

        nvalid = int(valid20.sum())
        cloudy_px = int(np.isin(scl, [8, 9, 10]).sum())
        counts = {name: int((scl == code).sum()) for name, code in SCL.items()}
        hhmm = 10.5 - lon_c / 15.0 + float(rng.uniform(-0.05, 0.05))
        t = dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC) + dt.timedelta(hours=hhmm)
        t = t.replace(microsecond=(t.microsecond // 1000) * 1000)
        # Earth Search Collection 1 (sentinel-2-c1-l2a): ESA's DNs, BOA_ADD_OFFSET kept (baseline >= 04.00)
        c1_id = f"S2{platform[-1].upper()}_T{mgrs}_{t:%Y%m%dT%H%M%S}_L2A"
        c1_dir = out_root / "sentinel2-c1" / c1_id
        c1_dir.mkdir(parents=True, exist_ok=True)
        for b, bn in enumerate(S2_BANDS):
            dn = np.clip(np.round(obs10[b] * 10000 + 1000), 1, 32767).astype(np.uint16)
            dn[~valid10] = 0
            write_cog(c1_dir / f"{bn}.tif", dn, grid.transform, grid.epsg, 0)
        records.append(
            {
                "id": item_id,
                "date": date,
                "datetime": t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "platform": platform,
                "mgrs": mgrs,
                "epsg": grid.epsg,
                "transform10": list(grid.transform)[:6],
                "shape10": list(grid.shape),
                "transform20": list(scl_t)[:6],
                "shape20": list(scl.shape),
                "bounds_utm": list(grid.bounds),
                "cloudy": cloudy,
                "eo:cloud_cover": round(100.0 * cloudy_px / max(nvalid, 1), 6),
                "scl_counts": counts,
                "valid_fraction": round(float(valid10.mean()), 6),
                "nodata_corner": date == swath_item,
                "nodata_cut_m": 0.8 * cfg.s2_margin_m if date == swath_item else 0.0,
                "shift_m": [dx, dy],
                "shift_px": [dx / 10.0, dy / 10.0],
                "sun_azimuth_deg": round(sun_az, 4),
                "sun_elevation_deg": round(sun_el, 4),
                "haze_reflectance": {bn: round(v, 6) for bn, v in hazes.items()},
                "gain": {bn: round(v, 6) for bn, v in gains.items()},
                "psf_sigma_m": dict(PSF_SIGMA_M),
                "detector_m": 10.0,
                "noise_sigma": "0.0015 + 0.01 * reflectance",
                "vegetation_dryness": dryness,
                "cloud": cloud_info,
                "dn_offset_added": add,
                "boa_offset_flag": (add == 0) if cfg.s2_boa_offset_flag is None else bool(cfg.s2_boa_offset_flag),
                "c1_id": c1_id,
            }
        )
    return records
