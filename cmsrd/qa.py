"""Sample quality filters with named reasons.

Each check looks at one stage's output and raises `QARejected(reason, detail)` when a threshold of
`QAConfig` is exceeded. The pipeline records the reason in the manifest (`qa_status = rejected`) and
keeps the sample's files out of the split folders, so users can see exactly what was filtered and
why, and loosen a threshold without re-planning.

Reasons (stable strings, used in manifests and dataset.json counts):
    hr_placeholder  the HR is mostly one flat colour (tile services' "map data not yet available")
    hr_blank        the HR has almost no texture at all (grey-level std below a floor)
    nodata          HR pixels of pure black / white fill, or LR pixels outside the scene's swath
    cloud           cloud or cloud-shadow fraction of the LR footprint over the threshold
    empty_map       the rendered map has (too little) mapped content
    misregistered   the measured LR/HR shift is above the threshold (LR pixels)
    shift_unmeasured the LR/HR shift of a real LR could not be measured (flat, cloudy or no-data window):
                    alignment is unknown, so the pair is not passed as if it were aligned
    time_gap        the LR scene is too many days from the HR capture
    lr_radiometry_implausible  the LR scene's DNs contradict the BOA offset its item declares (offset applied
                    twice: land pushed to reflectance <= 0; or never: everything 0.1 too bright)
"""

from __future__ import annotations

import math

import numpy as np

from .classes import BY_NAME, CLASSES
from .config import QAConfig
from .errors import SampleError

REASONS = (
    "hr_placeholder",
    "hr_blank",
    "nodata",
    "cloud",
    "empty_map",
    "misregistered",
    "shift_unmeasured",
    "time_gap",
    "lr_radiometry_implausible",
)
BOA_OFFSET_DN = 1000  # ESA's BOA_ADD_OFFSET (-1000 DN) of processing baselines >= 04.00


class QARejected(SampleError):
    """A sample that was produced but fails a quality threshold (kept in the manifest as rejected)."""


def _dominant_colour_fraction(img: np.ndarray) -> float:
    """Share of pixels equal to the single most frequent RGB value."""
    flat = img.reshape(-1, img.shape[-1]).astype(np.uint32)
    packed = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    _, counts = np.unique(packed, return_counts=True)
    return float(counts.max()) / len(packed)


def grey_level(img: np.ndarray) -> np.ndarray:
    """Mean of the channels in float32; the same values as `img.astype(np.float32).mean(axis=-1)`, without
    numpy's slow reduction along a length-3 axis (this runs on every HR tile of a build)."""
    f = img.astype(np.float32)
    total = f[..., 0].copy()
    for c in range(1, img.shape[-1]):
        total += f[..., c]
    return total / np.float32(img.shape[-1])


def _all_channels(img: np.ndarray, value: int) -> np.ndarray:
    """`np.all(img == value, axis=-1)`, channel by channel (elementwise ops, not a short-axis reduction)."""
    out = img[..., 0] == value
    for c in range(1, img.shape[-1]):
        out &= img[..., c] == value
    return out


def check_hr(hr: np.ndarray, qa: QAConfig) -> None:
    """Placeholder, blank and nodata HR tiles."""
    grey = grey_level(hr)
    fill = _all_channels(hr, 0) | _all_channels(hr, 255)
    nodata = float(fill.mean())
    if nodata > qa.max_nodata_fraction and nodata > 0:
        raise QARejected(
            "nodata", f"{nodata:.1%} of the HR is pure black/white fill (max {qa.max_nodata_fraction:.1%})"
        )
    # The most frequent colour is at most as frequent as its red (green, blue) value: three 256-bin counts
    # bound it, and only a tile that passes the bound pays for the exact count (a full sort of the pixels).
    bound = min(float(np.bincount(hr[..., c].ravel(), minlength=256).max()) for c in range(3)) / grey.size
    flat = _dominant_colour_fraction(hr) if bound > qa.max_placeholder_fraction else 0.0
    if flat > qa.max_placeholder_fraction:
        raise QARejected(
            "hr_placeholder", f"{flat:.1%} of the HR is one colour (max {qa.max_placeholder_fraction:.1%})"
        )
    std = float(grey.std())
    if std < qa.min_hr_std:
        raise QARejected("hr_blank", f"HR grey-level std {std:.2f} < {qa.min_hr_std}")


def check_lr(lr_image: np.ndarray, cloud_fraction: float | None, days_from_hr: float | None, qa: QAConfig) -> None:
    """Real LR: swath-edge nodata, cloud/shadow, and date distance to the HR."""
    nodata = float(np.all(lr_image == 0, axis=-1).mean())
    if nodata > qa.max_nodata_fraction and nodata > 0:
        raise QARejected("nodata", f"{nodata:.1%} of the LR is outside the scene (max {qa.max_nodata_fraction:.1%})")
    if cloud_fraction is not None and cloud_fraction > qa.max_cloud_fraction:
        raise QARejected("cloud", f"cloud/shadow fraction {cloud_fraction:.1%} > {qa.max_cloud_fraction:.1%}")
    if days_from_hr is not None and abs(days_from_hr) > qa.max_days_from_hr:
        raise QARejected(
            "time_gap", f"LR scene is {abs(days_from_hr):.0f} days from the HR (max {qa.max_days_from_hr:.0f})"
        )


def map_fractions(mask: np.ndarray) -> dict[str, float]:
    """Per-class pixel fraction of a class-index mask, for every class of the legend."""
    counts = np.bincount(mask.ravel(), minlength=len(CLASSES))[: len(CLASSES)]
    total = max(int(mask.size), 1)
    return {c.name: float(counts[c.id]) / total for c in CLASSES}


def check_map(mask: np.ndarray, qa: QAConfig) -> None:
    land = BY_NAME["land"].id
    mapped = float((mask != land).mean())
    if qa.reject_empty_map and mapped == 0.0:
        raise QARejected("empty_map", "the map has no mapped feature")
    if mapped < qa.min_map_fraction:
        raise QARejected("empty_map", f"mapped fraction {mapped:.1%} < {qa.min_map_fraction:.1%}")


def check_shift(dx: float | None, dy: float | None, correlation: float | None, qa: QAConfig) -> None:
    """Misregistration in LR pixels (called for real LR only; synthetic LR is aligned by construction).

    No measurement at all (None/NaN) is `shift_unmeasured`: an unknown alignment is not a pass. A weak one
    (correlation of the registered pair below `qa.min_shift_correlation`) cannot reject the sample: the
    shift was measured, but its value says too little to call the pair misregistered."""
    if dx is None or dy is None or not (math.isfinite(dx) and math.isfinite(dy)):
        raise QARejected(
            "shift_unmeasured",
            "the LR/HR shift could not be measured (no texture, cloud or no data in the co-registration window)",
        )
    if correlation is None or not math.isfinite(correlation) or correlation < qa.min_shift_correlation:
        return
    mag = math.hypot(dx, dy)
    if mag > qa.max_shift_lrpx:
        raise QARejected(
            "misregistered",
            f"LR/HR shift {mag:.2f} LR px ({dx:+.2f}, {dy:+.2f}) > {qa.max_shift_lrpx} (correlation {correlation:.2f})",
        )


def check_lr_radiometry(dn: np.ndarray, offset_in_dn: bool, qa: QAConfig) -> dict[str, float]:
    """Whether a baseline >= 04.00 L2A scene's raw DNs agree with the BOA offset its item declares.

    `dn`: the footprint's raw B04/B03/B02 DNs (any shape, last axis the bands; 0 = no data). `offset_in_dn`:
    the recipe subtracts BOA_ADD_OFFSET (the item says the DNs still hold it). Returns the two statistics.

    * offset in the DNs: real BOA reflectance of land is almost never below 0, so DN < 1000 is rare (deep
      shadow, dark water, noise: a few % at most). If the offset was already removed, every band of vegetation
      (~0.02-0.08) and most of urban land (< 0.1 in blue/green) falls below 1000: a share above
      `qa.max_lr_negative_fraction` (0.2) of valid values means the offset would be applied twice.
    * offset declared removed: then some pixel in the footprint is darker than 0.1 in at least one visible band
      (vegetation, water, shadow, asphalt) unless it is snow or bright desert; if not even
      `qa.min_lr_dark_fraction` (0.01) of the pixels is, the offset is most likely still in the DNs. Set it to 0
      where bright surfaces are expected.
    """
    arr = np.asarray(dn)
    px = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1 else arr.reshape(-1, 1)
    valid = np.all(px > 0, axis=1)
    stats = {"dn_below_offset_fraction": 0.0, "dark_pixel_fraction": 1.0}
    if not valid.any():
        return stats
    v = px[valid]
    stats["dn_below_offset_fraction"] = float((v < BOA_OFFSET_DN).mean())
    dark = 2 * BOA_OFFSET_DN if offset_in_dn else BOA_OFFSET_DN  # DN of reflectance 0.1 under the declared recipe
    stats["dark_pixel_fraction"] = float((v.min(axis=1) < dark).mean())
    if offset_in_dn and stats["dn_below_offset_fraction"] > qa.max_lr_negative_fraction:
        raise QARejected(
            "lr_radiometry_implausible",
            f"{stats['dn_below_offset_fraction']:.0%} of the DNs are below the BOA offset ({BOA_OFFSET_DN}), i.e. "
            f"negative reflectance (max {qa.max_lr_negative_fraction:.0%}): the offset was most likely removed "
            "already and would be applied twice",
        )
    if not offset_in_dn and stats["dark_pixel_fraction"] < qa.min_lr_dark_fraction:
        raise QARejected(
            "lr_radiometry_implausible",
            f"only {stats['dark_pixel_fraction']:.1%} of the pixels have a band below reflectance 0.1 "
            f"(min {qa.min_lr_dark_fraction:.1%}): the BOA offset (+{BOA_OFFSET_DN} DN) is most likely still in "
            "DNs the item declares offset-free",
        )
    return stats
