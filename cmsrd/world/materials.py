"""Surface materials of the offline world: how each looks to the aerial camera and to Sentinel-2.

The two sensors deliberately disagree in the way real ones do: the aerial RGB is a colour-graded
camera rendition (sRGB 0-255), while Sentinel-2 sees surface reflectance in B02/B03/B04/B08 with
typical library values (vegetation dark in red and bright in NIR, water dark in NIR, roofs and
asphalt flat). The HR is *not* derived from the S2 spectra or vice versa; both are derived from
the same vector scene, so an LR->HR model has to bridge a genuine cross-sensor gap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Material:
    name: str
    rgb: tuple[int, int, int]  # aerial camera colour (sRGB)
    refl: tuple[float, float, float, float]  # surface reflectance B02, B03, B04, B08
    tex_big: float = 0.06  # relative brightness variation at ~50 m (patchiness)
    tex_mid: float = 0.05  # relative variation at ~5 m
    grain: float = 4.0  # per-pixel texture, DN
    rows: float = 0.0  # strength of crop rows / plough furrows
    vegetation: bool = False


MATERIALS: tuple[Material, ...] = (
    # index 0 is the background (unmapped land: meadow, verges, gardens)
    Material("land", (110, 124, 76), (0.045, 0.075, 0.060, 0.30), 0.10, 0.08, 6.0, vegetation=True),
    Material("garden", (102, 120, 70), (0.050, 0.080, 0.070, 0.28), 0.08, 0.10, 7.0, vegetation=True),
    Material("roof_terracotta", (168, 88, 66), (0.060, 0.080, 0.160, 0.25), 0.02, 0.03, 4.0),
    Material("roof_red_brown", (124, 70, 58), (0.050, 0.060, 0.100, 0.18), 0.02, 0.03, 4.0),
    Material("roof_anthracite", (72, 74, 80), (0.050, 0.050, 0.055, 0.07), 0.02, 0.03, 3.0),
    Material("roof_grey", (138, 138, 134), (0.120, 0.130, 0.140, 0.17), 0.02, 0.04, 3.0),
    Material("roof_flat_light", (186, 184, 178), (0.200, 0.210, 0.220, 0.25), 0.03, 0.05, 4.0),
    Material("roof_flat_dark", (100, 100, 98), (0.080, 0.085, 0.090, 0.11), 0.03, 0.05, 4.0),
    Material("roof_metal", (166, 172, 176), (0.180, 0.200, 0.210, 0.24), 0.02, 0.02, 2.0),
    Material("asphalt", (98, 99, 101), (0.070, 0.080, 0.090, 0.11), 0.04, 0.04, 4.0),
    Material("asphalt_dark", (76, 77, 80), (0.050, 0.060, 0.065, 0.08), 0.03, 0.03, 3.0),
    Material("gravel", (160, 150, 128), (0.120, 0.140, 0.160, 0.20), 0.05, 0.08, 8.0),
    Material("ballast", (118, 110, 98), (0.080, 0.090, 0.100, 0.13), 0.03, 0.06, 10.0),
    Material("water", (34, 58, 62), (0.040, 0.050, 0.030, 0.015), 0.04, 0.02, 1.5),
    Material("conifer", (40, 60, 40), (0.020, 0.040, 0.025, 0.22), 0.08, 0.10, 5.0, vegetation=True),
    Material("broadleaf", (60, 86, 46), (0.030, 0.060, 0.035, 0.35), 0.08, 0.10, 5.0, vegetation=True),
    Material("lawn", (98, 132, 64), (0.040, 0.080, 0.050, 0.38), 0.06, 0.05, 4.0, rows=0.04, vegetation=True),
    Material("meadow", (120, 132, 74), (0.040, 0.070, 0.050, 0.32), 0.10, 0.08, 7.0, vegetation=True),
    Material("crop_green", (90, 120, 56), (0.035, 0.070, 0.040, 0.42), 0.08, 0.04, 4.0, rows=0.10, vegetation=True),
    Material("crop_ripe", (188, 168, 108), (0.070, 0.100, 0.130, 0.30), 0.06, 0.04, 5.0, rows=0.08, vegetation=True),
    Material("crop_maize", (104, 112, 72), (0.060, 0.080, 0.090, 0.25), 0.06, 0.05, 5.0, rows=0.25, vegetation=True),
    Material("bare_soil", (138, 114, 90), (0.080, 0.110, 0.140, 0.20), 0.10, 0.05, 6.0, rows=0.18),
    Material("farmyard", (134, 124, 104), (0.090, 0.110, 0.130, 0.20), 0.08, 0.08, 8.0),
)

INDEX: dict[str, int] = {m.name: i for i, m in enumerate(MATERIALS)}
S2_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08")


def material_id(name: str) -> int:
    return INDEX[name]
