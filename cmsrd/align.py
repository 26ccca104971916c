"""LR/HR co-registration: the sub-pixel shift of a (real) LR against its HR, measured on the LR grid.

The HR is brought to the LR grid with the same MATLAB bicubic (antialiased, i.e. area-weighted) operator
that makes synthetic LR (`cmsrd.degrade.imresize`), both images are reduced to one band (BT.601 luminance
for RGB; a chosen band, e.g. NIR, otherwise) and standardised, so sensor radiometry does not matter. The
shift is found by phase correlation (scikit-image `phase_cross_correlation`, upsampled to 1/100 px) and
then refined by least squares on the overlapping interior (Fourier-shifted LR vs HR), because at 16 x 16 px
the circular-wrap assumption of phase correlation biases the estimate by up to a few tenths of a pixel.

Convention: `Shift(dx, dy)` in LR pixels says where the LR content lies relative to the HR footprint:
+dx = the LR shows the scene moved east, +dy = moved south (image rows grow southwards). So the LR pixel
(row, col) sees what the HR shows at (row - dy, col - dx); resample the LR by (-dx, -dy) to align it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize
from skimage.registration import phase_cross_correlation

from .degrade import contributions, imresize
from .errors import InputError

_Y601 = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Shift:
    """LR-vs-HR shift in LR pixels (+x east, +y south), with quality figures.

    error: RMS difference of the standardised LR and shifted-HR model on the overlap (0 = identical,
    ~1.4 = unrelated); correlation: their Pearson correlation (1 = perfect; below ~0.6 the shift is
    unreliable). A shift so large that less than half the LR overlaps gets error=inf, correlation=0.
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


def _band(img: np.ndarray, band: int | None, what: str) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise InputError(what, f"shape {a.shape} is not HxW or HxWxC", "pass an image array")
    if band is not None:
        if not 0 <= band < a.shape[2]:
            raise InputError(f"band {band}", f"{what} has {a.shape[2]} bands", "pick an existing band index")
        return a[..., band]
    if a.shape[2] >= 3:
        return a[..., :3] @ _Y601
    return a[..., 0]


def _standardise(a: np.ndarray) -> np.ndarray:
    sd = a.std()
    return (a - a.mean()) / sd if sd > 0 else a - a.mean()


def measure_shift(lr: np.ndarray, hr: np.ndarray, band: int | None = None, refine: bool = True) -> Shift:
    """Shift of `lr` against `hr` (same footprint, any size ratio) in LR pixels; see the module docstring.

    `band` picks one band of both images (e.g. NIR); default: BT.601 luminance of the first three bands.
    """
    lr_b = _band(lr, band, "LR image")
    hr_b = _band(hr, band, "HR image")
    h, w = lr_b.shape
    if min(h, w) < 8:
        raise InputError("LR image", f"{h}x{w} px is too small to measure a shift", "use at least 8 x 8 px")
    if hr_b.shape[0] < h or hr_b.shape[1] < w:
        raise InputError("HR image", f"{hr_b.shape} is smaller than the LR {lr_b.shape}", "pass the HR of the LR")
    ref = _standardise(imresize(hr_b, output_shape=(h, w)))
    mov = _standardise(lr_b)
    if not (ref.std() > 0 and mov.std() > 0):
        raise InputError("LR/HR pair", "one image is flat: no texture to correlate", "skip this sample's shift")
    # skimage returns the shift that registers `moving` onto `reference`: with reference=LR, moving=HR that
    # is how far the HR must move to look like the LR, i.e. where the LR content lies.
    (sy, sx), _, _ = phase_cross_correlation(mov, ref, upsample_factor=100, normalization="phase")
    dy, dx = float(sy), float(sx)
    if refine:
        dy, dx = _refine(hr_b, lr_b, dy, dx)
    err, corr = _quality(hr_b, lr_b, dy, dx)
    return Shift(dx=dx, dy=dy, error=err, correlation=corr)


def _matrix(in_len: int, out_len: int, offset: float) -> np.ndarray:
    """Resize matrix with the sampling grid moved by `offset` output px (not cached: offsets vary)."""
    idx, wts = contributions(in_len, out_len, out_len / in_len, True, offset)
    rows = np.repeat(np.arange(out_len), idx.shape[1])
    return np.bincount(rows * in_len + idx.ravel(), weights=wts.ravel(), minlength=out_len * in_len).reshape(
        out_len, in_len)  # taps mirrored onto one pixel add up


def _margin(shape: tuple[int, int], dy: float, dx: float) -> int:
    """LR border left out of comparisons: shifted taps reach outside the HR footprint there."""
    m = int(math.ceil(max(abs(dy), abs(dx)))) + 2
    return m if min(shape) - 2 * m >= 4 else max(1, (min(shape) - 4) // 2)


def _model(hr: np.ndarray, shape: tuple[int, int], dy: float, dx: float, m: int) -> np.ndarray:
    my = _matrix(hr.shape[0], shape[0], dy)[m:-m]
    mx = _matrix(hr.shape[1], shape[1], dx)[m:-m]
    return my @ hr @ mx.T


def _quality(hr: np.ndarray, lr: np.ndarray, dy: float, dx: float) -> tuple[float, float]:
    """(error, correlation) on the overlap; (inf, 0) when the shift leaves less than half the LR to compare."""
    m = int(math.ceil(max(abs(dy), abs(dx)))) + 2
    if min(lr.shape) - 2 * m < max(4, min(lr.shape) // 2):
        return float("inf"), 0.0
    a, b = _standardise(_model(hr, lr.shape, dy, dx, m)), _standardise(lr[m:-m, m:-m])
    return float(np.sqrt(np.mean((a - b) ** 2))), float(np.mean(a * b))


def _refine(hr: np.ndarray, lr: np.ndarray, dy: float, dx: float) -> tuple[float, float]:
    """Least-squares fit of the shift with the exact forward model, started from the phase-correlation peak.

    The model is the LR = MATLAB-bicubic downscale of the HR with the sampling grid moved by (dy, dx) LR
    px (`cmsrd.degrade.contributions(offset=...)`), compared on the LR interior whose taps stay inside the
    HR. Resampling the HR (oversampled) instead of interpolating the tiny LR keeps the model exact and free
    of the wrap-around that biases phase correlation at 16 x 16 px. A 1/4 px grid within +-1 px of the peak
    picks the start, so a biased peak does not trap the local search in a side lobe.
    """
    m = _margin(lr.shape, abs(dy) + 1, abs(dx) + 1)
    b = _standardise(lr[m:-m, m:-m])

    def cost(p):
        return float(np.mean((_standardise(_model(hr, lr.shape, p[0], p[1], m)) - b) ** 2))

    grid = np.arange(-1.0, 1.01, 0.25)
    rows = [(dy + g, _matrix(hr.shape[0], lr.shape[0], dy + g)[m:-m] @ hr) for g in grid]  # 9 + 9 matrices
    cols = [(dx + g, _matrix(hr.shape[1], lr.shape[1], dx + g)[m:-m]) for g in grid]
    scores = {(py, px): float(np.mean((_standardise(a @ mx.T) - b) ** 2)) for py, a in rows for px, mx in cols}
    best = min(scores, key=scores.get)
    res = optimize.minimize(cost, x0=list(best), method="Powell",
                            bounds=[(best[0] - 0.5, best[0] + 0.5), (best[1] - 0.5, best[1] + 0.5)],
                            options={"xtol": 1e-4, "ftol": 1e-10})
    return (float(res.x[0]), float(res.x[1])) if res.fun <= cost(best) else (float(best[0]), float(best[1]))
