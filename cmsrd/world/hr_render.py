"""Render aerial-looking HR imagery (and the class truth) from the world's vector features.

The image is made on the native z18 XYZ pixel grid (0.597 m in EPSG:3857 units, ~0.4 m on the
ground at 48 deg N) the way an orthophoto looks, not a map: per-material colour with patchy and
fine texture, crop rows and plough furrows, hipped roofs lit from the sun (a height model from the
footprints' distance transform), tree crowns (a canopy height model from crown impulses), shadows
cast by buildings and trees (ray-marched over the surface model), lane markings and rails,
water darkening away from the shore, a slight atmospheric veil, optical blur and sensor noise.

Everything is whole-array numpy/OpenCV (no per-pixel Python) because the default world is ~26 Mpx
and the generator must stay under a minute on one core. There is no rendering library for
"aerial imagery from OSM vectors"; the pieces (rasterize, distance transforms, Gaussian blurs) are
the standard ones from rasterio and OpenCV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from affine import Affine
from rasterio import features as rfeatures
from shapely.ops import substring

from ..classes import BY_NAME
from .config import WorldConfig
from .features import MAJOR_HIGHWAYS, WorldFeatures
from .materials import INDEX, MATERIALS


@dataclass
class HRResult:
    rgb: np.ndarray  # (H, W, 3) uint8
    classes: np.ndarray  # (H, W) uint8 ids of cmsrd.classes
    transform: Affine
    params: dict  # sun, blur, noise: recorded in truth.json


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator, cell_px: float, octaves: int = 3) -> np.ndarray:
    """Smooth value noise (~N(0,1)) with features of about `cell_px` pixels and finer octaves."""
    h, w = shape
    acc = np.zeros(shape, np.float32)
    total = 0.0
    for o in range(octaves):
        cell = max(cell_px / 2**o, 2.0)
        gh, gw = int(math.ceil(h / cell)) + 3, int(math.ceil(w / cell)) + 3
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        up = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
        acc += up[:h, :w] * (0.5**o)
        total += 0.25**o
    acc /= math.sqrt(total)
    return acc


def hr_transform(cfg: WorldConfig) -> Affine:
    minx, _, _, maxy = cfg.bounds_3857
    g = cfg.hr_gsd_3857
    return Affine(g, 0.0, minx, 0.0, -g, maxy)


def _rasterize(shapes, shape, transform, dtype=np.int32, all_touched=False) -> np.ndarray:
    shapes = [(g, v) for g, v in shapes if g is not None and not g.is_empty]
    if not shapes:
        return np.zeros(shape, dtype)
    return rfeatures.rasterize(
        shapes, out_shape=shape, transform=transform, fill=0, dtype=dtype, all_touched=all_touched
    )


def feature_index_raster(world: WorldFeatures, shape, transform) -> tuple[np.ndarray, list[int]]:
    """Raster of 1 + index into `order` (0 = background) painted in the legend's draw order."""
    order = [i for i, _ in world.draw_list()]
    shapes = [(world.area_geometry(world.features[i]), n + 1) for n, i in enumerate(order)]
    return _rasterize(shapes, shape, transform), order


def classes_from_index(world: WorldFeatures, fid: np.ndarray, order: list[int]) -> np.ndarray:
    lut = np.zeros(len(order) + 1, np.uint8)
    for n, i in enumerate(order):
        c = world.features[i].cls
        lut[n + 1] = BY_NAME[c].id if c is not None else 0
    return lut[fid]


def _canopy(shape, px_m, rng, stands, singles) -> tuple[np.ndarray, np.ndarray]:
    """Canopy height model (m) and crown type (material index, 0 = none) from crown impulses.

    `stands`: list of (mask, material) forest areas filled with a jittered grid of trees;
    `singles`: list of (row, col, crown_m, height_m, material) individual trees.
    """
    h, w = shape
    chm = np.zeros(shape, np.float32)
    kind = np.zeros(shape, np.uint8)
    passes = []
    for mask, mat in stands:
        spacing = 5.0 / px_m
        rr, cc = np.meshgrid(np.arange(spacing / 2, h, spacing), np.arange(spacing / 2, w, spacing), indexing="ij")
        rr = (rr + rng.uniform(-0.4, 0.4, rr.shape) * spacing).astype(int).clip(0, h - 1).ravel()
        cc = (cc + rng.uniform(-0.4, 0.4, cc.shape) * spacing).astype(int).clip(0, w - 1).ravel()
        keep = mask[rr, cc]
        n = int(keep.sum())
        if n:
            passes.append((rr[keep], cc[keep], rng.uniform(16, 24, n), 2.9, mat, mask))
    for mat in sorted({s[4] for s in singles}):
        for lo, hi in ((0, 3.2), (3.2, 99)):
            sel = [s for s in singles if s[4] == mat and lo <= s[2] < hi]
            if sel:
                a = np.array([s[:4] for s in sel], float)
                passes.append((a[:, 0].astype(int), a[:, 1].astype(int), a[:, 3], float(a[:, 2].mean()), mat, None))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    for rr, cc, heights, crown_m, mat, mask in passes:
        # crowns are smooth: build the field at half resolution and upsample (4x cheaper blurs)
        imp = np.zeros((h2, w2), np.float32)
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        np.maximum.at(imp, (rr[ok] // 2, cc[ok] // 2), heights[ok].astype(np.float32))
        sigma = 0.6 * crown_m / px_m / 2
        small = cv2.GaussianBlur(imp, (0, 0), sigma) * np.float32(2 * math.pi * sigma * sigma)
        field = cv2.resize(small, (w2 * 2, h2 * 2), interpolation=cv2.INTER_LINEAR)[:h, :w]
        if mask is not None:  # closed canopy inside a stand
            field = np.where(mask, np.maximum(field, np.float32(9.0)), field)
        field[field < 2.0] = 0
        upd = field > chm
        chm[upd] = field[upd]
        kind[upd] = mat
    return chm, kind


def _shadows(dsm: np.ndarray, px_m: float, sun_az: float, sun_el: float) -> np.ndarray:
    """Fraction in shadow (0..1) by marching towards the sun over the surface model (half res)."""
    h, w = dsm.shape
    h2, w2 = h // 2, w // 2
    d2 = dsm[: h2 * 2, : w2 * 2].reshape(h2, 2, w2, 2).max(axis=(1, 3))
    p2 = 2 * px_m
    tan_el = math.tan(math.radians(sun_el))
    dc, dr = math.sin(math.radians(sun_az)), -math.cos(math.radians(sun_az))  # towards the sun
    steps = int(math.ceil(float(d2.max(initial=0.0)) / (tan_el * p2))) + 1
    acc = np.full_like(d2, -1e9)
    seen = set()
    for s in range(1, steps + 1):
        dx, dy = int(round(s * dc)), int(round(s * dr))
        if (dx, dy) in seen:
            continue
        seen.add((dx, dy))
        drop = math.hypot(dx, dy) * p2 * tan_el
        ys, yd = (slice(dy, h2), slice(0, h2 - dy)) if dy >= 0 else (slice(0, h2 + dy), slice(-dy, h2))
        xs, xd = (slice(dx, w2), slice(0, w2 - dx)) if dx >= 0 else (slice(0, w2 + dx), slice(-dx, w2))
        np.maximum(acc[yd, xd], d2[ys, xs] - np.float32(drop), out=acc[yd, xd])
    sh = (acc > d2 + 0.3).astype(np.float32)
    sh = cv2.resize(sh, (w2 * 2, h2 * 2), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((h, w), np.float32)
    out[: h2 * 2, : w2 * 2] = cv2.GaussianBlur(sh, (0, 0), 1.2)
    return out


def _markings(world: WorldFeatures, shape, transform) -> np.ndarray:
    """1 = white lane paint on major roads, 2 = steel rails."""
    k = world.mercator_scale
    paint, rails = [], []
    for f in world.features:
        if f.kind != "line":
            continue
        ln = f.geometry
        if f.tags.get("highway") in MAJOR_HIGHWAYS:
            for d in np.arange(0, ln.length, 9.0 * k):
                seg = substring(ln, d, min(d + 3.0 * k, ln.length))
                if seg.length > 0:
                    paint.append(seg.buffer(0.15 * k, cap_style="flat"))
            half = (f.attrs["width_m"] / 2 - 0.5) * k
            for off in (-half, half):
                paint.append(ln.offset_curve(off).buffer(0.12 * k, cap_style="flat"))
        elif f.tags.get("railway") == "rail":
            for off in (-0.72 * k, 0.72 * k):
                rails.append(ln.offset_curve(off).buffer(0.1 * k, cap_style="flat"))
    shapes = [(g, 1) for g in paint] + [(g, 2) for g in rails]
    return _rasterize(shapes, shape, transform, dtype=np.uint8, all_touched=True)


def render_hr(world: WorldFeatures, cfg: WorldConfig) -> HRResult:
    """Render the world's HR RGB and class truth on the z`hr_zoom` grid of `cfg`."""
    rng = np.random.default_rng([cfg.seed, 303])
    shape = cfg.hr_shape
    h, w = shape
    transform = hr_transform(cfg)
    px_m = cfg.hr_gsd_3857 / cfg.mercator_scale  # ground metres per pixel
    sun_az, sun_el = float(rng.uniform(130, 165)), float(rng.uniform(48, 60))

    fid, order = feature_index_raster(world, shape, transform)
    classes = classes_from_index(world, fid, order)
    n = len(order) + 1
    mat_lut = np.zeros(n, np.uint8)
    tint_lut = np.ones((n, 3), np.float32)
    height_lut = np.zeros(n, np.float32)
    pitch_lut = np.zeros(n, np.float32)
    rowang_lut = np.zeros(n, np.float32)
    rowper_lut = np.full(n, 1e9, np.float32)
    for j, i in enumerate(order):
        f = world.features[i]
        mat_lut[j + 1] = INDEX[f.material]
        spread = 0.10 if f.cls == "building" else 0.05
        tint_lut[j + 1] = 1.0 + rng.normal(0, spread) + rng.normal(0, spread / 3, 3)
        height_lut[j + 1] = f.attrs.get("height_m", 0.0)
        pitch_lut[j + 1] = f.attrs.get("pitch_deg", 0.0)
        rowang_lut[j + 1] = f.attrs.get("row_angle", 0.0)
        rowper_lut[j + 1] = f.attrs.get("row_period_m", 1e9) / px_m
    mat = mat_lut[fid]

    # --- surface model: hipped/flat roofs from the footprint distance transform, then trees
    bmask = (classes == BY_NAME["building"].id).astype(np.uint8)
    dist = cv2.distanceTransform(bmask, cv2.DIST_L2, 3)  # px to the nearest non-building pixel
    dsm = np.zeros(shape, np.float32)
    bi = np.nonzero(bmask.ravel())[0]
    if bi.size:
        fb = fid.ravel()[bi]
        pitch = np.tan(np.radians(pitch_lut[fb]))
        roof = np.minimum(dist.ravel()[bi] * px_m, 7.0) * pitch
        rim = (pitch == 0) & (dist.ravel()[bi] <= 1.0)
        dsm.ravel()[bi] = height_lut[fb] + roof + rim * 0.4
    del dist
    stands = [((mat == INDEX["conifer"]), INDEX["conifer"]), ((mat == INDEX["broadleaf"]), INDEX["broadleaf"])]
    inv = ~transform
    singles = []
    for f in world.features:
        if f.kind == "node" and f.tags.get("natural") == "tree":
            c, r = inv @ (f.geometry.x, f.geometry.y)
            singles.append((r, c, f.attrs["crown_m"], f.attrs["height_m"], INDEX[f.material]))
    chm, crown_kind = _canopy(shape, px_m, rng, stands, singles)
    del stands
    np.maximum(dsm, chm, out=dsm)

    # --- light: hillshade of the surface model, and cast shadows
    gx = cv2.Sobel(dsm, cv2.CV_32F, 1, 0, ksize=3) / np.float32(8 * px_m)
    gy = cv2.Sobel(dsm, cv2.CV_32F, 0, 1, ksize=3) / np.float32(8 * px_m)
    az, el = math.radians(sun_az), math.radians(sun_el)
    sx, sy, sz = math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)
    # normal (east, north, up) = (-dz/dx, +dz/drow, 1); rows run south
    shade = (-gx * sx + gy * sy + sz) / np.sqrt(gx * gx + gy * gy + 1) / np.float32(sz)
    del gx, gy
    shade = np.clip(shade, 0.3, 1.45)
    shadow = _shadows(dsm, px_m, sun_az, sun_el)
    elevated = dsm > 0.3

    # --- textures
    n_big = fractal_noise(shape, rng, 50.0 / px_m, 3)
    n_mid = fractal_noise(shape, rng, 5.0 / px_m, 2)
    water = mat == INDEX["water"]
    wdist = cv2.distanceTransform(water.astype(np.uint8), cv2.DIST_L2, 3)
    marks = _markings(world, shape, transform)

    # per-feature lookup tables, so the strip loop gathers by feature index only
    rgb_m = np.array([m.rgb for m in MATERIALS], np.float32)
    f_rgb = rgb_m[mat_lut] * tint_lut
    f_big = np.array([m.tex_big for m in MATERIALS], np.float32)[mat_lut]
    f_mid = np.array([m.tex_mid for m in MATERIALS], np.float32)[mat_lut]
    f_grain = np.array([m.grain for m in MATERIALS], np.float32)[mat_lut]
    f_rows = np.array([m.rows for m in MATERIALS], np.float32)[mat_lut]
    f_kx = (np.cos(rowang_lut) * 2 * np.pi / rowper_lut).astype(np.float32)
    f_ky = (-np.sin(rowang_lut) * 2 * np.pi / rowper_lut).astype(np.float32)
    deep = np.array([18, 36, 44], np.float32)
    shallow = np.array([58, 84, 74], np.float32)
    shadow_tint = np.array([0.38, 0.42, 0.52], np.float32)
    veil = np.array([10, 12, 16], np.float32)
    paint, steel = np.float32(0.75 * 235), np.float32(0.6 * 55)
    out = np.empty((h, w, 3), np.uint8)
    strip = 512
    cols = np.arange(w, dtype=np.float32)[None, :]
    for r0 in range(0, h, strip):
        r1 = min(h, r0 + strip)
        sl = slice(r0, r1)
        f_ = fid[sl]
        rows = np.arange(r0, r1, dtype=np.float32)[:, None]
        tex = 1 + f_big[f_] * n_big[sl] + f_mid[f_] * n_mid[sl]
        tex -= f_rows[f_] * (0.5 + 0.5 * np.sin(cols * f_kx[f_] + rows * f_ky[f_]))
        tex += f_grain[f_] * rng.standard_normal(f_.shape, dtype=np.float32) / np.float32(110.0)
        col = f_rgb[f_]
        col *= tex[..., None]
        wt = water[sl]
        if wt.any():
            a = 1 - np.exp(-wdist[sl][wt] * px_m / 12.0)
            ripple = 1 + 0.05 * n_mid[sl][wt]
            col[wt] = (shallow[None] * (1 - a[:, None]) + deep[None] * a[:, None]) * ripple[:, None]
        ck = crown_kind[sl]
        ct = ck > 0
        if ct.any():
            col[ct] = rgb_m[ck[ct]] * (0.85 + 0.12 * n_mid[sl][ct] + 0.06 * n_big[sl][ct])[:, None]
        mk = marks[sl]
        if mk.any():
            m1, m2 = mk == 1, mk == 2
            col[m1] = col[m1] * np.float32(0.25) + paint
            col[m2] = col[m2] * np.float32(0.4) + steel
        light = np.where(elevated[sl], shade[sl], np.float32(1.0)) * np.float32(0.94)
        s_ = shadow[sl][..., None]
        col *= light[..., None] * (1 - s_ * (1 - shadow_tint))
        col += veil
        np.clip(col, 0, 255, out=col)
        out[sl] = col.astype(np.uint8)
    del n_big, n_mid, fid, mat, chm, shade, shadow, wdist
    out = cv2.GaussianBlur(out, (0, 0), 0.55)
    for r0 in range(0, h, strip):
        r1 = min(h, r0 + strip)
        noise = rng.standard_normal((r1 - r0, w, 3), dtype=np.float32) * np.float32(1.8)
        noise += out[r0:r1]
        np.clip(noise, 0, 255, out=noise)
        out[r0:r1] = noise.astype(np.uint8)
    params = {
        "sun_azimuth_deg": round(sun_az, 3),
        "sun_elevation_deg": round(sun_el, 3),
        "optical_blur_sigma_px": 0.55,
        "noise_sigma_dn": 1.8,
        "ground_px_m": round(px_m, 4),
    }
    return HRResult(out, classes, transform, params)
