"""Deterministic synthesis of a small town edge as vector features with OpenStreetMap semantics.

Layout (all from the seed): a town on a rotated street grid (residential / unclassified / service
streets, houses with gardens, apartment slabs, industrial halls, a park with footways), a primary,
a secondary and a tertiary road crossing the world, a railway, a meandering river (waterway=river
centre line + riverbank area), a lake with an island (multipolygon with an inner ring), a forest, a
few woods, farmland parcels with tracks, a farmyard, and street/garden/park trees (natural=tree).

Geometry is laid out in a local ground-metre frame (x east, y north, origin at the world's SW
corner) so object sizes are real metres at any latitude, then mapped to EPSG:3857 (conformal: a
uniform 1/cos(lat) scale over a few km). Every feature carries a `material` (roof tile, asphalt,
young wheat, ...): the HR renderer maps it to aerial RGB and the Sentinel-2 simulator to a
reflectance spectrum, so the two sensors see the same physical scene through different radiometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
from shapely.ops import unary_union

from ..classes import DRAW_ORDER
from .config import WorldConfig

# Ground widths (m) of linear features when they are turned into areas (maps, truth, rendering).
LINE_WIDTH_M: dict[str, float] = {
    "primary": 10.0,
    "secondary": 8.5,
    "tertiary": 7.5,
    "residential": 6.0,
    "unclassified": 5.5,
    "living_street": 5.0,
    "service": 4.0,
    "track": 3.0,
    "footway": 2.0,
    "rail": 4.5,
    "river": 16.0,
}
MAJOR_HIGHWAYS = {"motorway", "trunk", "primary", "secondary", "tertiary"}


@dataclass
class Feature:
    """One mapped object. `geometry` is in EPSG:3857; `kind` is node | line | area."""

    kind: str
    geometry: object
    tags: dict[str, str]
    cls: str | None  # cmsrd.classes name, None for objects outside the legend (trees)
    material: str
    attrs: dict = field(default_factory=dict)  # render hints: width_m, height_m, pitch_deg, ...


@dataclass
class WorldFeatures:
    features: list[Feature]
    bounds_3857: tuple[float, float, float, float]
    mercator_scale: float  # EPSG:3857 m per ground m

    def by_class(self, cls: str) -> list[Feature]:
        return [f for f in self.features if f.cls == cls]

    def counts(self) -> dict[str, int]:
        """OSM objects per legend class (+ 'tree' nodes): what the PBF must read back."""
        out: dict[str, int] = {c: 0 for c in DRAW_ORDER}
        out["tree"] = 0
        for f in self.features:
            key = f.cls if f.cls is not None else ("tree" if f.tags.get("natural") == "tree" else None)
            if key is not None:
                out[key] += 1
        return out

    def area_geometry(self, f: Feature):
        """The feature as an area in EPSG:3857 (lines buffered by their ground width)."""
        if f.kind == "area":
            return f.geometry
        if f.kind == "line":
            return f.geometry.buffer(f.attrs["width_m"] / 2 * self.mercator_scale, cap_style="flat")
        return f.geometry.buffer(f.attrs.get("crown_m", 3.0) * self.mercator_scale, quad_segs=4)

    def draw_list(self) -> list[tuple[int, Feature]]:
        """(index, feature) of areas and lines in draw order (later paints over earlier); areas outside
        the legend (landuse=residential) come first and count as class land."""
        rank = {c: i for i, c in enumerate(DRAW_ORDER)}
        items = [(i, f) for i, f in enumerate(self.features) if f.cls is not None or f.kind == "area"]
        return sorted(items, key=lambda t: (rank.get(t[1].cls, -1), t[1].attrs.get("z", 0), t[0]))


# ----------------------------------------------------------------------------- shapes
def _blob(cx: float, cy: float, r: float, rng: np.random.Generator, rough: float = 0.18, n: int = 64) -> Polygon:
    """A smooth irregular closed shape: radius modulated by a few random low harmonics."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones_like(t)
    for k in range(2, 6):
        rad += rough / k * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.45, 1.6) * r
    return Polygon(np.c_[cx + rad * np.cos(t), cy + rad * np.sin(t)])


def _meander(p0, p1, amp: float, waves: float, rng, n: int = 80) -> LineString:
    """A line from p0 to p1 that wanders sideways (rivers, country roads)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    t = np.linspace(0, 1, n)
    d = p1 - p0
    nrm = np.array([-d[1], d[0]]) / np.hypot(*d)
    ph = rng.uniform(0, 2 * np.pi)
    off = amp * (np.sin(2 * np.pi * waves * t + ph) + 0.35 * np.sin(2 * np.pi * 2.3 * waves * t + 2 * ph))
    off *= np.sin(np.pi * t) ** 0.3  # pinned near the ends
    pts = p0[None] + t[:, None] * d[None] + off[:, None] * nrm[None]
    return LineString(pts)


def _rect(cx, cy, w, d, ang) -> np.ndarray:
    """Corners of a w x d rectangle centred at (cx, cy) rotated by ang (rad)."""
    c, s = math.cos(ang), math.sin(ang)
    pts = np.array([[-w / 2, -d / 2], [w / 2, -d / 2], [w / 2, d / 2], [-w / 2, d / 2]])
    return np.c_[cx + pts[:, 0] * c - pts[:, 1] * s, cy + pts[:, 0] * s + pts[:, 1] * c]


def _house_shape(cx, cy, w, d, ang, kind: str) -> Polygon:
    """Footprint of a house: rectangle, L-shape or T-shape (in a frame rotated by ang)."""
    if kind == "rect":
        pts = np.array([[-w / 2, -d / 2], [w / 2, -d / 2], [w / 2, d / 2], [-w / 2, d / 2]])
    elif kind == "L":
        a, b = 0.55 * w, 0.5 * d
        pts = np.array(
            [
                [-w / 2, -d / 2],
                [w / 2, -d / 2],
                [w / 2, -d / 2 + b],
                [-w / 2 + a, -d / 2 + b],
                [-w / 2 + a, d / 2],
                [-w / 2, d / 2],
            ]
        )
    else:  # T
        a = 0.4 * w
        pts = np.array(
            [
                [-w / 2, -d / 2],
                [w / 2, -d / 2],
                [w / 2, 0.0],
                [a / 2, 0.0],
                [a / 2, d / 2],
                [-a / 2, d / 2],
                [-a / 2, 0.0],
                [-w / 2, 0.0],
            ]
        )
    c, s = math.cos(ang), math.sin(ang)
    return Polygon(np.c_[cx + pts[:, 0] * c - pts[:, 1] * s, cy + pts[:, 0] * s + pts[:, 1] * c])


def _parts(g) -> list[Polygon]:
    if g.is_empty:
        return []
    if isinstance(g, Polygon):
        return [g]
    if isinstance(g, MultiPolygon):
        return list(g.geoms)
    return [p for p in getattr(g, "geoms", []) if isinstance(p, Polygon)]


def _lines(g) -> list[LineString]:
    if g.is_empty:
        return []
    if isinstance(g, LineString):
        return [g]
    return [p for p in getattr(g, "geoms", []) if isinstance(p, LineString)]


# ----------------------------------------------------------------------------- synthesis
class _Builder:
    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, 101])
        minx, miny, maxx, maxy = cfg.bounds_3857
        self.k = cfg.mercator_scale
        self.origin = (minx, miny)
        self.L = (maxx - minx) / self.k  # world side, ground metres
        self.world = box(0, 0, self.L, self.L)
        self.data = box(-40, -40, self.L + 40, self.L + 40)  # OSM data extends a bit past the world
        self.out: list[tuple] = []  # (kind, local geometry, tags, cls, material, attrs)

    def add(self, kind, geom, tags, cls, material, **attrs):
        self.out.append((kind, geom, tags, cls, material, attrs))

    def add_line(self, geom, tags, cls, material, width_key, **attrs):
        for ln in _lines(geom.intersection(self.data)):
            if ln.length > 5:
                self.add("line", ln, dict(tags), cls, material, width_m=LINE_WIDTH_M[width_key], **attrs)

    def run(self) -> None:
        L, rng = self.L, self.rng
        # --- town extent and grid orientation
        tcx, tcy = L * rng.uniform(0.5, 0.6), L * rng.uniform(0.42, 0.55)
        town = _blob(tcx, tcy, 0.3 * L, rng, rough=0.15).intersection(box(0.25 * L, 0.12 * L, 0.95 * L, 0.9 * L))
        theta = math.radians(rng.uniform(-22, 22))
        # unmapped in the legend (class land) but real OSM: the gardens' ground cover comes from it
        self.add("area", town, {"landuse": "residential"}, None, "garden")

        # --- corridors: river, railway, major roads
        river = _meander((0.17 * L, L + 60), (0.12 * L + rng.uniform(0, 0.1) * L, -60), 0.05 * L, 1.3, rng)
        rail = LineString([(-60, L * rng.uniform(0.12, 0.22)), (L + 60, L * rng.uniform(0.25, 0.35))])
        primary = _meander(
            (-60, tcy + rng.uniform(-0.05, 0.05) * L), (L + 60, tcy + rng.uniform(-0.1, 0.1) * L), 0.03 * L, 0.8, rng
        )
        secondary = _meander(
            (tcx + rng.uniform(-0.08, 0.0) * L, L + 60), (tcx + rng.uniform(0.0, 0.1) * L, -60), 0.02 * L, 0.7, rng
        )
        tertiary = _meander((tcx, tcy), (L + 60, 0.92 * L), 0.02 * L, 0.6, rng)
        bank = river.buffer(LINE_WIDTH_M["river"] / 2 + rng.uniform(0, 3))
        self.add("area", bank.intersection(self.data), {"waterway": "riverbank"}, "water", "water")
        self.add_line(river, {"waterway": "river", "name": "Mühlbach"}, "water", "water", "river", z=-1)
        self.add_line(
            rail,
            {"railway": "rail", "gauge": "1435", "electrified": "contact_line"},
            "railway",
            "ballast",
            "rail",
            rails=True,
        )
        for ln, hw, name in (
            (primary, "primary", "B 301"),
            (secondary, "secondary", "St 2084"),
            (tertiary, "tertiary", "Moosweg"),
        ):
            self.add_line(
                ln, {"highway": hw, "name": name, "surface": "asphalt"}, "major_road", "asphalt_dark", hw, markings=True
            )
        corridors = unary_union(
            [
                bank.buffer(4),
                rail.buffer(LINE_WIDTH_M["rail"] / 2 + 3),
                primary.buffer(8),
                secondary.buffer(7),
                tertiary.buffer(7),
            ]
        )

        # --- town street grid
        su, sv = rng.uniform(85, 115), rng.uniform(60, 80)
        c, s = math.cos(theta), math.sin(theta)

        def to_xy(u, v):
            return tcx + u * c - v * s, tcy + u * s + v * c

        R = 0.45 * L
        us = np.arange(-R, R + 1e-6, su) + rng.uniform(-6, 6, size=len(np.arange(-R, R + 1e-6, su)))
        vs = np.arange(-R, R + 1e-6, sv) + rng.uniform(-6, 6, size=len(np.arange(-R, R + 1e-6, sv)))
        streets = []
        for i, u in enumerate(us):
            pts = [to_xy(u, v) for v in np.r_[-R - sv, vs, R + sv]]
            streets.append(("u", i, LineString(pts)))
        for j, v in enumerate(vs):
            pts = [to_xy(u, v) for u in np.r_[-R - su, us, R + su]]
            streets.append(("v", j, LineString(pts)))
        street_lines = []
        for axis, i, ln in streets:
            hw = (
                "unclassified"
                if (axis == "u" and i % 4 == 1)
                else ("living_street" if rng.random() < 0.12 else "residential")
            )
            clipped = ln.intersection(town)
            for part in _lines(clipped):
                if part.length > 40:
                    self.add_line(
                        part,
                        {
                            "highway": hw,
                            "name": f"{'Ahorn Birken Eichen Linden Ulmen'.split()[i % 5]}"
                            f"{'straße' if axis == 'u' else 'weg'}",
                        },
                        "road",
                        "asphalt",
                        hw,
                    )
                    street_lines.append(part.buffer(LINE_WIDTH_M[hw] / 2 + 0.5))
        street_union = unary_union(street_lines) if street_lines else Polygon()
        blocked = unary_union([corridors, street_union])

        # --- blocks: houses, apartments, industry, park
        cells = []
        for i in range(len(us) - 1):
            for j in range(len(vs) - 1):
                u0, u1, v0, v1 = us[i], us[i + 1], vs[j], vs[j + 1]
                cell = Polygon([to_xy(u0, v0), to_xy(u1, v0), to_xy(u1, v1), to_xy(u0, v1)])
                if cell.intersection(town).area > 0.5 * cell.area:
                    cells.append((i, j, u0, u1, v0, v1, cell))
        if cells:
            dists = [math.hypot((a[2] + a[3]) / 2, (a[4] + a[5]) / 2) for a in cells]
            order = np.argsort(dists)
            park_ids = set(int(k) for k in order[:1]) | ({int(order[3])} if len(order) > 6 else set())
            ind_u = max(a[3] for a in cells) - 1.6 * su
        buildings: list[tuple[Polygon, dict, str]] = []
        house_roofs = ["roof_terracotta"] * 5 + ["roof_red_brown"] * 3 + ["roof_anthracite"] * 3 + ["roof_grey"]
        for n, (_i, _j, u0, u1, v0, v1, cell) in enumerate(cells):
            block = cell.intersection(town).difference(blocked)
            block_parts = [p for p in _parts(block) if p.area > 300]
            if not block_parts:
                continue
            block = unary_union(block_parts)
            if n in park_ids:
                self.add("area", block, {"leisure": "park", "name": "Stadtpark"}, "park", "lawn")
                cu, cv = (u0 + u1) / 2, (v0 + v1) / 2
                path = LineString([to_xy(u0 + 4, cv - 10), to_xy(cu, cv + 8), to_xy(u1 - 4, cv - 4)])
                self.add_line(
                    path.intersection(block), {"highway": "footway", "surface": "gravel"}, "road", "gravel", "footway"
                )
                for _ in range(rng.integers(14, 26)):
                    self._tree(block, rng, "park")
                continue
            kind = "industrial" if u0 >= ind_u else ("apartments" if rng.random() < 0.22 else "houses")
            inner = block.buffer(-2.0)
            if kind == "houses":
                for vv, side in ((v0, 1), (v1, -1)):
                    lot = rng.uniform(17, 23)
                    uu = u0 + 6 + lot / 2
                    while uu < u1 - 6 - lot / 2:
                        w, d = rng.uniform(9, 13), rng.uniform(9, 14)
                        shape = rng.choice(["rect", "rect", "rect", "L", "T"])
                        setback = rng.uniform(5.5, 8.5) + d / 2
                        hx, hy = to_xy(uu, vv + side * setback)
                        poly = _house_shape(hx, hy, w, d, theta + (0 if side > 0 else math.pi), shape)
                        roof = str(rng.choice(house_roofs))
                        buildings.append(
                            (
                                poly,
                                {
                                    "building": "house",
                                    "roof:shape": "hipped",
                                    "building:levels": str(int(rng.integers(1, 3))),
                                },
                                roof,
                            )
                        )
                        if rng.random() < 0.35:
                            gx, gy = to_xy(uu + side * (w / 2 + 2.2), vv + side * (setback - d / 2 + 3.5))
                            buildings.append(
                                (
                                    Polygon(_rect(gx, gy, 3.2, 6.0, theta)),
                                    {"building": "garage", "roof:shape": "flat"},
                                    "roof_flat_dark",
                                )
                            )
                        tx, ty = to_xy(uu + rng.uniform(-5, 5), vv + side * (setback + d / 2 + rng.uniform(4, 9)))
                        if rng.random() < 0.8:
                            self._tree_at(tx, ty, rng, "garden")
                        uu += lot
            elif kind == "apartments":
                nslab = int(rng.integers(2, 4))
                span = (u1 - u0 - 20) / nslab
                for k in range(nslab):
                    cu = u0 + 10 + span * (k + 0.5)
                    hx, hy = to_xy(cu, (v0 + v1) / 2 + rng.uniform(-4, 4))
                    w, d = min(span - 6, rng.uniform(12, 16)), min(v1 - v0 - 22, rng.uniform(30, 50))
                    buildings.append(
                        (
                            Polygon(_rect(hx, hy, w, d, theta)),
                            {
                                "building": "apartments",
                                "roof:shape": "flat",
                                "building:levels": str(int(rng.integers(3, 6))),
                            },
                            str(rng.choice(["roof_flat_light", "roof_grey", "roof_flat_dark"])),
                        )
                    )
                for _ in range(6):
                    self._tree(inner, rng, "garden")
            else:
                nh = int(rng.integers(1, 3))
                span = (u1 - u0 - 12) / nh
                for k in range(nh):
                    cu = u0 + 6 + span * (k + 0.5)
                    hx, hy = to_xy(cu, (v0 + v1) / 2)
                    w, d = span - 8, v1 - v0 - 20
                    buildings.append(
                        (
                            Polygon(_rect(hx, hy, w, d, theta)),
                            {"building": "industrial", "roof:shape": "flat"},
                            str(rng.choice(["roof_metal", "roof_flat_light"])),
                        )
                    )
                sx0, sy0 = to_xy((u0 + u1) / 2, v0 - 2)
                sx1, sy1 = to_xy((u0 + u1) / 2, v0 + 9)
                self.add_line(
                    LineString([(sx0, sy0), (sx1, sy1)]),
                    {"highway": "service", "service": "driveway"},
                    "road",
                    "asphalt",
                    "service",
                )
            # keep buildings fully inside their block (corridors, streets and neighbours excluded)
            if buildings:
                polys = np.array([b[0] for b in buildings], dtype=object)
                ok = shapely.contains(inner, polys)
                for keep, b in zip(ok, buildings):
                    if keep:
                        self.add(
                            "area",
                            b[0],
                            b[1],
                            "building",
                            b[2],
                            height_m=self._height(b[1]),
                            pitch_deg=35.0 if b[1].get("roof:shape") == "hipped" else 0.0,
                        )
                buildings = []

        # --- street trees
        for _, _, ln in streets:
            part = ln.intersection(town)
            for seg in _lines(part):
                for dist in np.arange(10, seg.length - 10, rng.uniform(14, 20)):
                    p = seg.interpolate(dist)
                    if rng.random() < 0.55:
                        off = 6.5 if rng.random() < 0.5 else -6.5
                        self._tree_at(p.x - s * off, p.y + c * off, rng, "street")

        # --- lake with an island (multipolygon, inner ring)
        r = float(np.clip(0.09 * L, 55, 180))
        lake = None
        for _ in range(200):
            cx, cy = rng.uniform(0.2 * L, 0.85 * L), rng.uniform(0.62 * L, 0.88 * L)
            cand = _blob(cx, cy, r, rng, rough=0.25)
            if (
                cand.buffer(15).disjoint(corridors)
                and cand.buffer(25).disjoint(town)
                and self.world.buffer(-10).contains(cand)
            ):
                lake = cand
                break
        if lake is None:  # tiny worlds: carve the lake free of everything else
            cx, cy = 0.72 * L, 0.82 * L
            lake = _blob(cx, cy, r, rng, rough=0.2).difference(corridors.buffer(10)).difference(town.buffer(10))
            lake = max(_parts(lake), key=lambda p: p.area)
        ctr = lake.representative_point()
        island = _blob(ctr.x, ctr.y, 0.22 * r, rng, rough=0.15)
        if not lake.buffer(-6).contains(island):
            island = _blob(ctr.x, ctr.y, 0.12 * r, rng, rough=0.05).intersection(lake.buffer(-5))
        lake_poly = Polygon(lake.exterior.coords, [island.exterior.coords])
        self.add(
            "area",
            lake_poly,
            {"type": "multipolygon", "natural": "water", "water": "lake", "name": "Weiher"},
            "water",
            "water",
            split_outer=True,
        )
        for _ in range(int(rng.integers(3, 6))):
            self._tree(island.buffer(-2), rng, "park")
        lake_zone = lake.buffer(12)

        # --- forest (a corner), woods, farmland parcels, tracks, farmyard
        fx, fy = (0.0, 0.0) if rng.random() < 0.5 else (L, 0.0)
        forest = _blob(fx, fy + 0.05 * L, 0.42 * L, rng, rough=0.2)
        rural = self.world.buffer(30).difference(town.buffer(8)).difference(corridors).difference(lake_zone)
        forest_area = forest.intersection(rural)
        for p in _parts(forest_area):
            if p.area > 2000:
                self.add("area", p, {"landuse": "forest", "leaf_type": "needleleaved"}, "forest", "conifer")
        rural = rural.difference(forest.buffer(3))
        woods = []
        for _ in range(int(rng.integers(2, 4))):
            pt = self._sample_in(rural.buffer(-40), rng)
            if pt is not None:
                w = _blob(pt.x, pt.y, rng.uniform(25, 55), rng, rough=0.3).intersection(rural)
                for p in _parts(w):
                    if p.area > 500:
                        self.add("area", p, {"natural": "wood", "leaf_type": "broadleaved"}, "wood", "broadleaf")
                        woods.append(p)
        if woods:
            rural = rural.difference(unary_union(woods).buffer(3))
        phi = math.radians(rng.uniform(-40, 40))
        pc, ps = math.cos(phi), math.sin(phi)
        pw, ph = rng.uniform(70, 110), rng.uniform(120, 200)
        tracks = []
        farmyard_done = False
        crops = ["crop_green", "crop_green", "crop_ripe", "crop_maize", "bare_soil"]
        for a in np.arange(-0.8 * L, 1.8 * L, pw):
            for b in np.arange(-0.8 * L, 1.8 * L, ph):
                corners = [(a, b), (a + pw, b), (a + pw, b + ph), (a, b + ph)]
                cell = Polygon([(L / 2 + x * pc - y * ps, L / 2 + x * ps + y * pc) for x, y in corners])
                if not cell.intersects(rural):
                    continue
                for p in _parts(cell.buffer(-2.5).intersection(rural)):
                    if p.area < 1500:
                        continue
                    roll = rng.random()
                    if not farmyard_done and p.area > 6000 and roll < 0.3:
                        self._farmyard(p, rng, theta=phi)
                        farmyard_done = True
                    elif roll < 0.08:
                        self.add("area", p, {"landuse": "meadow"}, "park", "meadow")
                    elif roll < 0.15:
                        continue  # unmapped land (background)
                    else:
                        crop = str(rng.choice(crops))
                        self.add(
                            "area",
                            p,
                            {"landuse": "farmland", "crop": crop.replace("crop_", "")},
                            "farmland",
                            crop,
                            row_angle=float(phi + (math.pi / 2 if rng.random() < 0.5 else 0)),
                            row_period_m=float(rng.uniform(1.6, 3.2)),
                        )
                if rng.random() < 0.25:
                    x0, y0 = (L / 2 + a * pc - b * ps, L / 2 + a * ps + b * pc)
                    x1, y1 = (L / 2 + a * pc - (b + ph) * ps, L / 2 + a * ps + (b + ph) * pc)
                    tr = LineString([(x0, y0), (x1, y1)]).intersection(rural)
                    tracks.extend(_lines(tr))
        for tr in tracks:
            if tr.length > 60:
                self.add_line(tr, {"highway": "track", "tracktype": "grade2"}, "road", "gravel", "track")

    def _height(self, tags: dict) -> float:
        b = tags.get("building")
        if b == "house":
            return float(self.rng.uniform(5.5, 8.5))
        if b == "apartments":
            return 3.0 * int(tags.get("building:levels", "4")) + 1.0
        if b == "industrial":
            return float(self.rng.uniform(7, 12))
        if b in ("barn", "farm_auxiliary"):
            return float(self.rng.uniform(6, 9))
        return float(self.rng.uniform(2.5, 3.2))

    def _sample_in(self, poly, rng, tries: int = 60):
        if poly.is_empty:
            return None
        x0, y0, x1, y1 = poly.bounds
        for _ in range(tries):
            p = Point(rng.uniform(x0, x1), rng.uniform(y0, y1))
            if poly.contains(p):
                return p
        return None

    def _tree(self, poly, rng, where: str) -> None:
        p = self._sample_in(poly, rng, tries=20)
        if p is not None:
            self._tree_at(p.x, p.y, rng, where)

    def _tree_at(self, x, y, rng, where: str) -> None:
        crown = float(rng.uniform(2.2, 4.5))
        height = float(rng.uniform(7, 17))
        leaf = "needleleaved" if rng.random() < 0.2 else "broadleaved"
        self.add(
            "node",
            Point(x, y),
            {"natural": "tree", "leaf_type": leaf},
            None,
            "conifer" if leaf == "needleleaved" else "broadleaf",
            crown_m=crown,
            height_m=height,
            where=where,
        )

    def _farmyard(self, parcel: Polygon, rng, theta: float) -> None:
        c = parcel.representative_point()
        yard = Polygon(_rect(c.x, c.y, 70, 55, theta)).intersection(parcel.buffer(-3))
        if yard.is_empty or yard.area < 1500:
            return
        self.add("area", yard, {"landuse": "farmyard"}, "farmland", "farmyard")
        specs = [
            (0, 8, 14, 24, "house", "roof_terracotta"),
            (-18, -10, 16, 36, "barn", "roof_metal"),
            (20, -10, 12, 22, "farm_auxiliary", "roof_red_brown"),
        ]
        inner = yard.buffer(-2)
        for du, dv, w, d, b, roof in specs:
            cs, sn = math.cos(theta), math.sin(theta)
            x, y = c.x + du * cs - dv * sn, c.y + du * sn + dv * cs
            poly = Polygon(_rect(x, y, w, d, theta))
            if inner.contains(poly):
                tags = {"building": b, "roof:shape": "hipped" if b != "barn" else "gabled"}
                self.add(
                    "area",
                    poly,
                    tags,
                    "building",
                    roof,
                    height_m=self._height(tags),
                    pitch_deg=35.0 if b != "barn" else 25.0,
                )

    def to_3857(self) -> list[Feature]:
        ox, oy = self.origin
        k = self.k

        def tf(coords):
            return coords * k + np.array([ox, oy])

        feats = []
        for kind, geom, tags, cls, mat, attrs in self.out:
            if geom.is_empty:
                continue
            g = shapely.transform(geom, tf)
            if kind == "area":
                g = shapely.make_valid(g) if not g.is_valid else g
                polys = [p for p in _parts(g) if p.area > 0]
                if not polys:
                    continue
                g = polys[0] if len(polys) == 1 else MultiPolygon(polys)
            feats.append(Feature(kind, g, tags, cls, mat, attrs))
        return feats


def synthesize(cfg: WorldConfig) -> WorldFeatures:
    """Lay out the world's features (deterministic from `cfg.seed`), in EPSG:3857."""
    b = _Builder(cfg)
    b.run()
    return WorldFeatures(b.to_3857(), cfg.bounds_3857, cfg.mercator_scale)
