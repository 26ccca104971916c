"""LR/HR co-registration: the sub-pixel shift of a (real) LR against its HR, measured on the LR grid.

Model: each LR band is an affine mix of the HR bands brought to the LR grid with the same MATLAB bicubic
(antialiased, i.e. area-weighted) operator that makes synthetic LR (`cmsrd.degrade.imresize`), with that
operator's sampling grid moved by the shift (`cmsrd.degrade.contributions(offset=...)`). For every trial
shift the mix (3 x 3 gains + offsets for RGB) is solved by least squares and the shift minimising the
residual wins: first a 1 LR px grid over +-`max_shift`, then a 1/4 px grid around the best cell, then a
bounded Powell search. Comparisons use the LR interior whose taps stay inside the HR.

Why a fitted mix and not one luminance band: an aerial RGB camera and Sentinel-2 B04/B03/B02 see the same
surfaces with different spectral responses, so a field that is brighter than its neighbour in the HR's
luminance can be darker in the LR's. A fixed luminance turns such edges into anti-correlated ones and
pulls the fit sideways (on the offline world: median error 0.67 LR px, most windows "unreliable"); the
fitted mix absorbs the colour mapping and leaves the geometry (median ~0.1 LR px). Why a bounded grid and
not the global phase-correlation peak: farmland is a near-periodic lattice of fields and the global peak
lands on a neighbouring period (~20 LR px away) in a fair share of windows; real LR/HR misregistration is
a few metres, so the search is limited to `max_shift` LR px (default: an eighth of the LR side).

Convention: `Shift(dx, dy)` in LR pixels says where the LR content lies relative to the HR footprint:
+dx = the LR shows the scene moved east, +dy = moved south (image rows grow southwards). So the LR pixel
(row, col) sees what the HR shows at (row - dy, col - dx); resample the LR by (-dx, -dy) to align it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, sparse

from .degrade import contributions
from .errors import InputError

MAX_BANDS = 3  # RGB: the bands both sensors share


@dataclass(frozen=True)
class Shift:
    """LR-vs-HR shift in LR pixels (+x east, +y south), with quality figures.

    correlation: Pearson correlation of the LR (its compared bands, each centred) with the fitted shifted-HR
    model on the overlap (1 = perfect; below ~0.6 the shift is unreliable); error: the RMS difference of the
    two once standardised, sqrt(2 (1 - correlation)) (0 = identical, ~1.4 = unrelated).
    """

    dx: float
    dy: float
    error: float
    correlation: float

    def to_record(self) -> dict[str, float]:
        """Manifest columns (`shift_dx_lr_px`, ...)."""
        return {f"shift_{k}" + ("_lr_px" if k in ("dx", "dy") else ""): float(v) for k, v in asdict(self).items()}

    @property
    def magnitude(self) -> float:
        return math.hypot(self.dx, self.dy)


def _bands(img: np.ndarray, band: int | None, what: str) -> np.ndarray:
    """H x W x C float: the chosen band, or the first `MAX_BANDS` bands."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 2:
        return a[..., None]
    if a.ndim != 3:
        raise InputError(what, f"shape {a.shape} is not HxW or HxWxC", "pass an image array")
    if band is not None:
        if not 0 <= band < a.shape[2]:
            raise InputError(f"band {band}", f"{what} has {a.shape[2]} bands", "pick an existing band index")
        return a[..., band : band + 1]
    return a[..., :MAX_BANDS]


def _sparse_rows(in_len: int, out_len: int, offset: float, margin: int) -> sparse.csr_matrix:
    """The kept rows (interior, `margin` cut each side) of the shifted resize matrix
    (`cmsrd.degrade.weight_matrix(..., offset)`) as CSR, built from the taps directly
    (~18 of 256 per row; a tap mirrored onto a pixel already used stays a duplicate entry, which CSR
    products add up as the dense matrix does)."""
    idx, wts = contributions(in_len, out_len, out_len / in_len, True, offset)
    idx, wts = idx[margin:-margin], wts[margin:-margin]
    indptr = np.arange(0, idx.size + 1, idx.shape[1])
    return sparse.csr_matrix((wts.ravel(), idx.ravel(), indptr), shape=(idx.shape[0], in_len))


class _Fit:
    """Residual of the LR against the best affine band mix of the HR resampled with a trial shift.

    Both resampling passes are sparse products (scipy's CSR kernels, single-threaded C loops): 1.7x faster
    than dense BLAS products on a 64 px window, and the same result whatever the core count, where the
    dense BLAS products moved refined shifts by ~1e-7 px between 1 and 2 BLAS threads."""

    def __init__(self, lr: np.ndarray, hr: np.ndarray, margin: int):
        self.hr, self.m, self.shape = hr, margin, lr.shape[:2]
        self._hr_rows = np.ascontiguousarray(hr).reshape(hr.shape[0], -1)  # H x (W*C)
        y = lr[margin:-margin, margin:-margin].reshape(-1, lr.shape[2])
        self.y = y - y.mean(axis=0)
        self.total = float((self.y**2).sum())
        self._rows: dict[float, np.ndarray] = {}

    def rows(self, dy: float) -> np.ndarray:
        """HR bands resampled along rows ((bands x kept LR rows) x HR cols), cached per grid value."""
        got = self._rows.get(dy)
        if got is None:
            h, w, c = self.hr.shape
            my = _sparse_rows(h, self.shape[0], dy, self.m)
            got = np.ascontiguousarray((my @ self._hr_rows).reshape(-1, w, c).transpose(2, 0, 1)).reshape(-1, w)
            if len(self._rows) < 64:
                self._rows[dy] = got
        return got

    def residual(self, dy: float, dx: float) -> float:
        """Unexplained share of the LR variance (0 = perfect fit, 1 = nothing explained)."""
        c = self.hr.shape[2]
        mx = _sparse_rows(self.hr.shape[1], self.shape[1], dx, self.m)
        cols = mx @ self.rows(dy).T  # kept LR cols x (bands x kept LR rows)
        x = cols.reshape(cols.shape[0], c, -1).transpose(1, 2, 0).reshape(c, -1).T  # pixels (row-major) x bands
        x = x - x.mean(axis=0)
        coef, *_ = np.linalg.lstsq(x, self.y, rcond=None)
        return float(((self.y - x @ coef) ** 2).sum() / self.total)

    def correlation(self, dy: float, dx: float) -> float:
        """sqrt of the adjusted R^2 (per band: n compared pixels, the HR bands + 2 shift parameters fitted),
        so a 3-band mix fitted by chance on a small window does not look better than one band would."""
        n, p = self.y.shape[0], self.hr.shape[2] + 2
        r2 = 1.0 - min(1.0, self.residual(dy, dx)) * (n - 1) / max(1, n - p - 1)
        return math.sqrt(max(0.0, r2))


def measure_shift(
    lr: np.ndarray, hr: np.ndarray, band: int | None = None, refine: bool = True, max_shift: float | None = None
) -> Shift:
    """Shift of `lr` against `hr` (same footprint, any size ratio) in LR pixels; see the module docstring.

    `band` picks one band of both images (e.g. NIR); default: the first three bands of each, related by a
    fitted affine colour mix. `max_shift` (LR px) bounds the search; default an eighth of the LR side (at
    least 1.5). `refine=False` stops at the 1/4 px grid.
    """
    lr_b = _bands(lr, band, "LR image")
    hr_b = _bands(hr, band, "HR image")
    h, w = lr_b.shape[:2]
    if min(h, w) < 8:
        raise InputError("LR image", f"{h}x{w} px is too small to measure a shift", "use at least 8 x 8 px")
    if hr_b.shape[0] < h or hr_b.shape[1] < w:
        raise InputError(
            "HR image", f"{hr_b.shape[:2]} is smaller than the LR {lr_b.shape[:2]}", "pass the HR of the LR"
        )
    if not (lr_b.reshape(-1, lr_b.shape[2]).std(axis=0).max() > 0 and hr_b.std() > 0):
        raise InputError("LR/HR pair", "one image is flat: no texture to correlate", "skip this sample's shift")
    limit = float(max_shift) if max_shift is not None else max(1.5, min(h, w) / 8.0)
    if not (math.isfinite(limit) and 0 < limit):
        raise InputError(f"max_shift {max_shift!r}", "is not a positive number of LR pixels", "use e.g. 2")
    m = int(math.ceil(limit)) + 1  # bicubic taps of a shifted LR pixel reach ~2 px further
    if min(h, w) - 2 * m < 6:
        raise InputError(
            f"max_shift {limit:g}",
            f"leaves no interior of the {h}x{w} LR to compare",
            f"use at most {max(0, (min(h, w) - 6) // 2 - 2)} LR px or a larger LR",
        )
    fit = _Fit(lr_b, hr_b, m)
    dy, dx = _search(fit, limit, refine)
    corr = fit.correlation(dy, dx)
    return Shift(dx=dx, dy=dy, error=math.sqrt(2.0 * (1.0 - corr)), correlation=corr)


def _search(fit: _Fit, limit: float, refine: bool) -> tuple[float, float]:
    """Best (dy, dx): 1 px grid over +-limit, 1/4 px grid around its best cell, bounded Powell."""
    coarse = np.arange(-math.floor(limit), math.floor(limit) + 0.5, 1.0)
    scores = {(py, px): fit.residual(py, px) for py in coarse for px in coarse}
    cy, cx = min(scores, key=scores.get)
    fine = np.arange(-0.75, 0.76, 0.25)
    for py in cy + fine:
        for px in cx + fine:
            if max(abs(py), abs(px)) <= limit and (py, px) not in scores:
                scores[(py, px)] = fit.residual(py, px)
    best = min(scores, key=scores.get)
    if not refine:
        return float(best[0]), float(best[1])
    bounds = [(max(-limit, b - 0.25), min(limit, b + 0.25)) for b in best]
    res = optimize.minimize(
        lambda p: fit.residual(p[0], p[1]),
        x0=list(best),
        method="Powell",
        bounds=bounds,
        options={"xtol": 1e-4, "ftol": 1e-10},
    )
    if res.fun <= scores[best]:
        return float(res.x[0]), float(res.x[1])
    return float(best[0]), float(best[1])
