"""OpenStreetMap features per map class, read from a `.osm.pbf` with osmium, kept as indexed GeoParquet.

Reading goes through pyosmium's `FileProcessor` with area assembly, so areas come from closed ways *and*
multipolygon relations exactly as libosmium assembles them (the same code as the `osmium` C++ tool);
highways, railways and waterways are kept as lines. Each feature gets one class of `cmsrd.classes` from its
tags (`classify_area` / `classify_line`, rules below), its geometry in EPSG:3857, and the tag value
(`kind`) that `cmsrd.render` turns into a line width. The features of a region are a GeoDataFrame with a
spatial index, stored as GeoParquet, so a sample only reads its neighbourhood (`OSMFeatures.query`).

Tag rules (first match wins, following the descriptions in `cmsrd.classes`):

* areas: `building=*` (not `no`) -> building; `natural=water`, `water=*`, `waterway=riverbank` -> water;
  `landuse=forest` -> forest; `natural=wood` -> wood; `leisure=park/garden`,
  `landuse=grass/meadow/recreation_ground` -> park; `landuse=farmland/farmyard/orchard` -> farmland;
  `highway=<road>` with `area=yes` -> road / major_road (pedestrian squares);
* lines: `highway=` MAJOR_HIGHWAYS -> major_road, ROAD_HIGHWAYS -> road; `railway=` RAILWAYS -> railway;
  `waterway=river/stream/canal` -> water. Lines in tunnels (`tunnel` other than `no`) and features
  with `area=yes` are not lines: they are not visible from above / they are drawn as areas.
* sea: the open sea is no OSM area, it is implied by ways tagged `natural=coastline`, which by OSM
  convention have the land on their LEFT and the water on their RIGHT (closed rings around islands run
  counter-clockwise). The ingest derives the sea as class `water`, kind `sea` areas (`osm_type`
  "coastline", negative `osm_id`s) inside the working extent (the asked `bbox_lonlat` grown by
  `margin_deg` and kept inside the file's header box; without a bbox the header box, else the data
  bounds): the coastline ways are merged (`shapely.line_merge`, keeping their direction), the extent box
  is split into faces by the coastlines (`shapely.polygonize`), and each face is classified by the
  right-hand rule: every coastline segment inside the extent puts a probe `SEA_PROBE_M` to its right (a
  sea vote) and one to its left (a land vote) at its midpoint; a face is sea when its sea votes outnumber
  its land votes (`sea_polygons`). Extracts cut coastline ways at their edge (the nodes outside are
  absent): a coastline end within `COAST_SNAP_M` ground metres of the extent's edge is joined straight to
  the nearest edge. Coastline pieces that neither close nor reach the edge that way dangle: they are
  counted (`IngestStats.coastlines_dangling`), not fatal: a face that a gap leaves unsplit holds the
  votes of both sides and takes the side with more coastline segments. Limitation: faces without votes
  are land, so a region entirely at sea, whose extract holds no coastline in the extent, is taken as land.

Invalid areas are skipped and counted: multipolygon relations / closed ways that carry a class but that
libosmium could not assemble (broken rings, missing members), and assembled geometries that shapely finds
invalid or empty.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import osmium
import pandas as pd
import pyproj
import shapely
from shapely.geometry import box
from tqdm.auto import tqdm

from ..classes import BY_NAME
from ..errors import InputError
from ..io import atomic_path

log = logging.getLogger(__name__)

CRS = "EPSG:3857"
MAJOR_HIGHWAYS = frozenset(
    f"{k}{s}" for k in ("motorway", "trunk", "primary", "secondary", "tertiary") for s in ("", "_link")
)
ROAD_HIGHWAYS = frozenset(
    {
        "residential",
        "service",
        "unclassified",
        "living_street",
        "track",
        "footway",
        "path",
        "cycleway",
        "pedestrian",
        "steps",
        "bridleway",
        "road",
        "busway",
    }
)
RAILWAYS = frozenset({"rail", "light_rail", "tram", "narrow_gauge"})
WATER_LINES = frozenset({"river", "stream", "canal"})
PARK = {"leisure": {"park", "garden"}, "landuse": {"grass", "meadow", "recreation_ground"}}
FARMLAND = frozenset({"farmland", "farmyard", "orchard"})
KEYS = ("building", "highway", "railway", "waterway", "natural", "landuse", "leisure", "water")
COLUMNS = ["class", "kind", "osm_type", "osm_id", "geometry"]
SEA_PROBE_M = 0.05  # EPSG:3857 metres beside a coastline segment's midpoint where its side votes
COAST_SNAP_M = 300.0  # ground metres: coastline ends this close to the extent's edge are joined to it


def classify_area(tags) -> tuple[str, str] | None:
    """(class, kind) of an area from its tags, or None when no map class applies."""
    b = tags.get("building")
    if b is not None and b != "no":
        return "building", b
    natural, landuse, leisure = tags.get("natural"), tags.get("landuse"), tags.get("leisure")
    if natural == "water" or tags.get("water") is not None or tags.get("waterway") == "riverbank":
        return "water", tags.get("water") or natural or "riverbank"
    if landuse == "forest":
        return "forest", "forest"
    if natural == "wood":
        return "wood", "wood"
    if leisure in PARK["leisure"]:
        return "park", leisure
    if landuse in PARK["landuse"]:
        return "park", landuse
    if landuse in FARMLAND:
        return "farmland", landuse
    hw = tags.get("highway")
    if hw is not None and tags.get("area") == "yes":
        if hw in MAJOR_HIGHWAYS:
            return "major_road", hw
        if hw in ROAD_HIGHWAYS:
            return "road", hw
    return None


def classify_line(tags) -> tuple[str, str] | None:
    """(class, kind) of a way drawn as a line, or None."""
    hw = tags.get("highway")
    if hw in MAJOR_HIGHWAYS:
        cl = "major_road", hw
    elif hw in ROAD_HIGHWAYS:
        cl = "road", hw
    else:
        rw = tags.get("railway")
        if rw in RAILWAYS:
            cl = "railway", rw
        else:
            ww = tags.get("waterway")
            if ww not in WATER_LINES:
                return None  # the common case (buildings, areas): no area/tunnel lookups
            cl = "water", ww
    if tags.get("area") == "yes" or tags.get("tunnel", "no") != "no":
        return None
    return cl


@dataclass
class IngestStats:
    """What an ingest saw: kept features per class and areas skipped as invalid, with the reason."""

    invalid_areas: int = 0
    unassembled_relations: int = 0
    unassembled_ways: int = 0
    invalid_geometries: int = 0
    clipped_lines: int = 0  # lines cut by the extract boundary: kept as the parts whose nodes are present
    lines_without_nodes: int = 0  # lines with fewer than two located nodes: skipped
    coastline_ways: int = 0  # natural=coastline ways seen
    sea_polygons: int = 0  # water/sea areas derived from the coastlines (connected parts)
    coastlines_dangling: int = 0  # merged coastline pieces with an end inside the extent, away from its edge
    coastline_ends_snapped: int = 0  # coastline ends (cut by the extract) joined to the extent's edge
    seconds: float = 0.0


def _located_runs(way) -> tuple[list[list[tuple[float, float]]], bool]:
    """Runs of consecutive located nodes (lon, lat) of a way with two nodes or more, and whether any was missing."""
    runs: list[list[tuple[float, float]]] = [[]]
    missing = False
    for n in way.nodes:
        loc = n.location
        if loc.valid():
            runs[-1].append((loc.lon, loc.lat))
        else:
            missing = True
            if runs[-1]:
                runs.append([])
    return [r for r in runs if len(r) >= 2], missing


_WKB = osmium.geom.WKBFactory()


def _line_wkb(way) -> tuple[bytes, bool] | None:
    """WKB of a way's located parts (extracts cut ways at their edge), and whether nodes were missing.

    Runs of consecutive located nodes become the parts of a MultiLineString; None when no run has two.
    A way whose nodes are all located (nearly all) is written by libosmium's WKB factory with every node
    kept (`use_nodes.ALL`: the same coordinates as the Python path, ~10x less time per way).
    """
    try:
        return bytes.fromhex(_WKB.create_linestring(way, osmium.geom.use_nodes.ALL)), False
    except (RuntimeError, osmium.InvalidLocationError):  # a node outside the extract, or fewer than 2 nodes
        pass
    parts, missing = _located_runs(way)
    if not parts:
        return None
    geom = shapely.LineString(parts[0]) if len(parts) == 1 else shapely.MultiLineString(parts)
    return shapely.to_wkb(geom), missing


_TO_3857 = pyproj.Transformer.from_crs("EPSG:4326", CRS, always_xy=True)


def lonlat_to_3857(lon, lat) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 degrees -> EPSG:3857 metres (vectorised; the same pyproj transform as `GeoDataFrame.to_crs`)."""
    x, y = _TO_3857.transform(np.asarray(lon, float), np.asarray(lat, float))
    return np.asarray(x), np.asarray(y)


def geoms_to_3857(geoms: np.ndarray) -> np.ndarray:
    """WGS84 geometries -> EPSG:3857, all coordinates in one pyproj call (what `GeoSeries.to_crs` does)."""
    coords = shapely.get_coordinates(geoms)
    x, y = _TO_3857.transform(coords[:, 0], coords[:, 1])
    return shapely.set_coordinates(geoms.copy(), np.stack([x, y], axis=1))


# Only ways, relations and areas reach Python (tagged nodes are dropped in C++: none is a map feature), only
# those with a key of KEYS, and only relations with such a key are assembled as areas (libosmium's first pass).
_TO_PYTHON = osmium.osm.WAY | osmium.osm.RELATION | osmium.osm.AREA


def feature_objects(path: str | os.PathLike) -> osmium.FileProcessor:
    """The pyosmium reader of `OSMFeatures.from_pbf`: node locations, areas, and the C++ filters above."""
    return (
        osmium.FileProcessor(str(path))
        .with_areas(osmium.filter.KeyFilter(*KEYS))
        .with_filter(osmium.filter.EntityFilter(_TO_PYTHON))
        .with_filter(osmium.filter.KeyFilter(*KEYS))
    )


def _segments_in_box(coords: np.ndarray, box_: tuple[float, float, float, float]):
    """Per segment of the polylines' vertex array `coords` (n, 2): midpoint of its part inside the box and its
    unit direction, for the segments that cross the box (Liang-Barsky clipping, vectorised)."""
    p0, d = coords[:-1], coords[1:] - coords[:-1]
    length = np.hypot(d[:, 0], d[:, 1])
    ok = length > 0
    p0, d, length = p0[ok], d[ok], length[ok]
    t0, t1 = np.zeros(len(p0)), np.ones(len(p0))
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, lo, hi in ((0, box_[0], box_[2]), (1, box_[1], box_[3])):
            dd, pp = d[:, axis], p0[:, axis]
            ta, tb = (lo - pp) / dd, (hi - pp) / dd
            par = dd == 0
            t0 = np.where(par, t0, np.maximum(t0, np.minimum(ta, tb)))
            t1 = np.where(par, t1, np.minimum(t1, np.maximum(ta, tb)))
            outside = par & ((pp < lo) | (pp > hi))
            t1 = np.where(outside, -1.0, t1)
    keep = t1 > t0
    mid = p0[keep] + d[keep] * ((t0[keep] + t1[keep]) / 2)[:, None]
    return mid, d[keep] / length[keep, None]


def sea_polygons(
    coastlines: list[np.ndarray],
    extent_3857: tuple[float, float, float, float],
    snap: float = 0.0,
    probe: float = SEA_PROBE_M,
) -> tuple[list, int, int]:
    """Sea polygons of the extent box from directed coastline polylines (EPSG:3857 vertex arrays).

    Coastline ends inside the extent and within `snap` of its edge are joined to the nearest edge; the box is
    split into faces by the coastlines and each face classified by the right-hand rule (see the module
    docstring). Returns (sea polygons, dangling pieces, snapped ends).
    """
    left, bottom, right, top = extent_3857
    ext = box(left, bottom, right, top)
    lines = [c for c in coastlines if len(c) >= 2]
    if not lines:
        return [], 0, 0
    merged = shapely.line_merge(shapely.MultiLineString(lines), directed=True)
    pieces = [g for g in shapely.get_parts(merged) if not g.is_empty]
    coords = [shapely.get_coordinates(g) for g in pieces]

    # ends of open pieces: shared with another piece's end (merge refused a direction conflict), outside the
    # extent (the piece reaches the edge), near the edge (cut by the extract: joined to it), or dangling
    pad = max(1.0, 1e-6 * max(right - left, top - bottom))
    open_ = [i for i, c in enumerate(coords) if not (len(c) > 2 and np.array_equal(c[0], c[-1]))]
    ends = np.array([c[k] for i in open_ for c in (coords[i],) for k in (0, -1)]).reshape(-1, 2)
    owner = np.repeat(np.array(open_, int), 2)
    _, inv, cnt = np.unique(ends, axis=0, return_inverse=True, return_counts=True)
    shared = cnt[inv.ravel()] > 1
    x, y = (ends[:, 0], ends[:, 1]) if len(ends) else (np.zeros(0), np.zeros(0))
    gaps = np.stack([x - left, right - x, y - bottom, top - y], axis=1) if len(ends) else np.zeros((0, 4))
    inside = (gaps > 0).all(axis=1)
    edge_dist = gaps.min(axis=1) if len(ends) else np.zeros(0)
    free = inside & ~shared
    to_snap = free & (edge_dist <= snap)
    connectors = []
    for i in np.flatnonzero(to_snap):
        side = int(np.argmin(gaps[i]))
        tx, ty = x[i], y[i]
        if side == 0:
            tx = left - pad
        elif side == 1:
            tx = right + pad
        elif side == 2:
            ty = bottom - pad
        else:
            ty = top + pad
        connectors.append(shapely.LineString([(x[i], y[i]), (tx, ty)]))
    dangling = len(set(owner[free & ~to_snap].tolist()))

    in_ext = shapely.intersects(np.array(pieces + connectors, dtype=object), ext)
    if not in_ext.any():
        return [], dangling, int(to_snap.sum())
    clipped = shapely.clip_by_rect(
        np.array(pieces + connectors, dtype=object)[in_ext], left - pad, bottom - pad, right + pad, top + pad
    )
    noded = shapely.union_all(np.concatenate([[ext.boundary], clipped]))
    faces = shapely.get_parts(shapely.polygonize([noded]))
    faces = faces[shapely.within(shapely.point_on_surface(faces), ext)] if len(faces) else faces
    if not len(faces):
        return [], dangling, int(to_snap.sum())

    # right-hand rule: probes beside the midpoints of the coastline segments, as the ways run in OSM
    mids, dirs = _segments_in_box(
        np.concatenate([np.vstack([c, [np.nan, np.nan]]) for c in lines]), (left, bottom, right, top)
    )
    ok = np.isfinite(mids).all(axis=1)
    mids, dirs = mids[ok], dirs[ok]
    normal_right = np.stack([dirs[:, 1], -dirs[:, 0]], axis=1)
    tree = shapely.STRtree(faces)
    shapely.prepare(faces)  # indexed point-in-polygon: faces can have many thousand vertices
    votes = []
    for sign in (1.0, -1.0):  # right of the way: sea; left: land
        pts = shapely.points(mids + sign * probe * normal_right)
        ip, iface = tree.query(pts)  # bounding-box candidates, then the exact test on the prepared faces
        iface = iface[shapely.contains(faces[iface], pts[ip])]
        votes.append(np.bincount(iface, minlength=len(faces)))
    sea = faces[votes[0] > votes[1]]
    if not len(sea):
        return [], dangling, int(to_snap.sum())
    parts = shapely.get_parts(shapely.union_all(sea))
    parts = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    return parts, dangling, int(to_snap.sum())


def _read_bbox(path: Path) -> tuple[float, float, float, float] | None:
    """(west, south, east, north) from the PBF header; raises InputError if the file is unreadable."""
    try:
        reader = osmium.io.Reader(str(path), osmium.osm.osm_entity_bits.NOTHING)
        try:
            b = reader.header().box()
        finally:
            reader.close()
    except Exception as exc:  # libosmium raises RuntimeError / osmium.io errors on bad input
        raise InputError(
            f"OSM file {path}",
            f"cannot be read as OSM data ({exc})",
            "re-download the extract (e.g. `cmsrd.sources.geofabrik`) and check its md5",
        ) from exc
    if not b.valid():
        return None
    return (b.bottom_left.lon, b.bottom_left.lat, b.top_right.lon, b.top_right.lat)


def _sea_features(
    coast, stats: IngestStats, bbox_lonlat, margin_deg: float, header_bbox, data_bounds
) -> gpd.GeoDataFrame:
    """Water/sea rows (EPSG:3857) from the coastline runs inside the working extent; fills the sea stats."""
    if bbox_lonlat is not None:
        w, s, e, n = bbox_lonlat
        extent = (w - margin_deg, s - margin_deg, e + margin_deg, n + margin_deg)
        if header_bbox is not None:
            extent = (
                max(extent[0], header_bbox[0]),
                max(extent[1], header_bbox[1]),
                min(extent[2], header_bbox[2]),
                min(extent[3], header_bbox[3]),
            )
    elif header_bbox is not None:
        extent = header_bbox
    else:
        pts = np.array([p for run in coast for p in run])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        if data_bounds is not None:
            lo, hi = np.minimum(lo, data_bounds[:2]), np.maximum(hi, data_bounds[2:])
        extent = (lo[0], lo[1], hi[0], hi[1])
    empty = gpd.GeoDataFrame({c: [] for c in COLUMNS[:-1]}, geometry=[], crs=CRS)
    if not (extent[0] < extent[2] and extent[1] < extent[3]):
        return empty
    (x0, x1), (y0, y1) = lonlat_to_3857([extent[0], extent[2]], [extent[1], extent[3]])
    lines = []
    for run in coast:
        a = np.asarray(run, float)
        x, y = lonlat_to_3857(a[:, 0], a[:, 1])
        lines.append(np.stack([x, y], axis=1))
    scale = 1.0 / np.cos(np.radians((extent[1] + extent[3]) / 2))  # 3857 metres per ground metre
    polys, dangling, snapped = sea_polygons(lines, (x0, y0, x1, y1), snap=COAST_SNAP_M * scale)
    stats.coastlines_dangling += dangling
    stats.coastline_ends_snapped += snapped
    polys = [p for p in polys if p.is_valid and not p.is_empty]
    stats.sea_polygons += len(polys)
    if not polys:
        return empty
    return gpd.GeoDataFrame(
        {
            "class": "water",
            "kind": "sea",
            "osm_type": "coastline",
            "osm_id": -np.arange(1, len(polys) + 1, dtype=np.int64),
        },
        geometry=[shapely.MultiPolygon([p]) for p in polys],
        crs=CRS,
    )


def _lap(timings: dict[str, float] | None, step: str, since: float) -> float:
    now = time.perf_counter()
    if timings is not None:
        timings[step] = timings.get(step, 0.0) + now - since
    return now


def _contains(outer, inner, tol: float = 1e-7) -> bool:
    return (
        outer[0] - tol <= inner[0]
        and outer[1] - tol <= inner[1]
        and outer[2] + tol >= inner[2]
        and outer[3] + tol >= inner[3]
    )


class OSMFeatures:
    """Map-class features of a region in EPSG:3857, with a spatial index for per-sample reads."""

    def __init__(self, gdf: gpd.GeoDataFrame, stats: IngestStats | None = None, source: str = ""):
        self.gdf = gdf
        self.stats = stats or IngestStats()
        self.source = source

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pbf(
        cls,
        path: str | os.PathLike,
        bbox_lonlat: tuple[float, float, float, float] | None = None,
        margin_deg: float = 0.001,
        progress: bool = False,
        timings: dict[str, float] | None = None,
    ) -> OSMFeatures:
        """Read every map-class feature of `path`; with `bbox_lonlat` (W, S, E, N) keep only those touching it.

        Features within `margin_deg` of the bbox are kept too, so buffered lines just outside still reach it.
        `progress` shows a tqdm counter of OSM objects read (country extracts take minutes); `timings`, when
        given, receives the seconds of each step (`perf/osm_bench.py` prints them).

        Raises InputError naming the file when it is not readable OSM data, or does not cover the bbox.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"OSM file {path}", "does not exist", "pass the path of a .osm.pbf extract")
        if bbox_lonlat is not None:
            w, s, e, n = (float(v) for v in bbox_lonlat)
            if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
                raise InputError(
                    f"AOI bbox {bbox_lonlat}",
                    "is not (west, south, east, north) in degrees",
                    "pass e.g. (24.94, 60.165, 24.95, 60.17)",
                )
        t0 = time.perf_counter()
        header_bbox = _read_bbox(path)
        if bbox_lonlat is not None and header_bbox is not None and not _contains(header_bbox, bbox_lonlat):
            raise InputError(
                f"OSM file {path}",
                f"covers {tuple(round(v, 5) for v in header_bbox)}, not the AOI {tuple(bbox_lonlat)}",
                "use an extract that covers the AOI (cmsrd.sources.geofabrik.find_extract picks one)",
            )
        stats = IngestStats()
        cls_, kinds, types, ids, wkbs = [], [], [], [], []  # one list per column: no per-feature tuples/dicts
        area_candidates = {"w": set(), "r": set()}
        assembled = {"w": set(), "r": set()}
        coast: list[list[tuple[float, float]]] = []  # located runs of natural=coastline ways, (lon, lat)
        create_multipolygon = osmium.geom.WKBFactory().create_multipolygon
        lap = time.perf_counter()
        try:
            fp = feature_objects(path)
            objects = tqdm(fp, desc=f"reading {path.name}", unit=" obj", mininterval=1.0) if progress else fp
            for obj in objects:
                kind = obj.type_str()
                tags = obj.tags
                if kind == "w":
                    if tags.get("natural") == "coastline":
                        stats.coastline_ways += 1
                        coast.extend(_located_runs(obj)[0])
                    if obj.is_closed() and classify_area(tags) is not None:
                        area_candidates["w"].add(obj.id)
                    cl = classify_line(tags)
                    if cl is None:
                        continue
                    geom = _line_wkb(obj)
                    if geom is None:
                        stats.lines_without_nodes += 1
                        continue
                    stats.clipped_lines += geom[1]
                    cls_.append(cl[0])
                    kinds.append(cl[1])
                    types.append("way")
                    ids.append(obj.id)
                    wkbs.append(geom[0])
                elif kind == "a":
                    ca = classify_area(tags)
                    if ca is None:
                        continue
                    k = "w" if obj.from_way() else "r"
                    oid = obj.orig_id()
                    assembled[k].add(oid)
                    try:
                        geom = create_multipolygon(obj)
                    except (RuntimeError, osmium.InvalidLocationError):
                        stats.invalid_geometries += 1
                        continue
                    cls_.append(ca[0])
                    kinds.append(ca[1])
                    types.append("way" if k == "w" else "relation")
                    ids.append(oid)
                    wkbs.append(bytes.fromhex(geom))  # GEOS parses binary WKB ~10x faster than hex
                elif kind == "r":
                    if tags.get("type") in ("multipolygon", "boundary") and classify_area(tags):
                        area_candidates["r"].add(obj.id)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"OSM file {path}", f"is corrupt or truncated ({exc})", "re-download the extract and verify its md5"
            ) from exc
        stats.unassembled_ways = len(area_candidates["w"] - assembled["w"])
        stats.unassembled_relations = len(area_candidates["r"] - assembled["r"])
        lap = _lap(timings, "read+filter+classify (pyosmium loop)", lap)

        geoms = shapely.from_wkb(np.array(wkbs, dtype=object)) if wkbs else np.array([], dtype=object)
        lap = _lap(timings, "WKB->shapely", lap)
        bad = shapely.is_empty(geoms) | ~shapely.is_valid(geoms)
        stats.invalid_geometries += int(bad.sum())
        keep = ~bad
        geoms = geoms[keep]
        lap = _lap(timings, "validity", lap)
        if bbox_lonlat is not None and header_bbox is None:  # no header box: the data extent must cover the AOI
            if not len(geoms) or not _contains(tuple(shapely.total_bounds(geoms)), bbox_lonlat, tol=1e-3):
                raise InputError(
                    f"OSM file {path}",
                    f"has no data over the AOI {tuple(bbox_lonlat)}",
                    "use an extract that covers the AOI",
                )
        data_bounds = tuple(shapely.total_bounds(geoms)) if len(geoms) else None
        if bbox_lonlat is not None:
            w, s, e, n = bbox_lonlat
            near = box(w - margin_deg, s - margin_deg, e + margin_deg, n + margin_deg)
            hit = np.sort(shapely.STRtree(geoms).query(near, predicate="intersects"))
            keep[keep] = np.isin(np.arange(len(geoms)), hit)
            geoms = geoms[hit]
            lap = _lap(timings, "bbox", lap)
        geoms = geoms_to_3857(geoms)
        lap = _lap(timings, "reprojection", lap)
        gdf = gpd.GeoDataFrame(
            {
                "class": np.array(cls_, dtype=object)[keep],
                "kind": np.array(kinds, dtype=object)[keep],
                "osm_type": np.array(types, dtype=object)[keep],
                "osm_id": np.array(ids, dtype=np.int64)[keep],
            },
            geometry=gpd.GeoSeries(geoms, crs=CRS),
            crs=CRS,
        )
        lap = _lap(timings, "GeoDataFrame", lap)
        if coast:
            sea = _sea_features(coast, stats, bbox_lonlat, margin_deg, header_bbox, data_bounds)
            if len(sea):
                gdf = pd.concat([gdf, sea], ignore_index=True)
            lap = _lap(timings, "sea from coastlines", lap)
        gdf["class"] = gdf["class"].astype(str)
        stats.invalid_areas = stats.unassembled_ways + stats.unassembled_relations + stats.invalid_geometries
        stats.seconds = time.perf_counter() - t0
        feats = cls(gdf, stats, source=str(path))
        log.info(
            "read %s: %s, %d invalid areas skipped in %.2fs",
            path.name,
            feats.counts,
            stats.invalid_areas,
            stats.seconds,
        )
        return feats

    # -- storage ------------------------------------------------------------------------------
    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the features as GeoParquet (atomically)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            self.gdf.to_parquet(tmp, index=False, write_covering_bbox=True)  # lets readers skip by bbox
        return path

    @classmethod
    def from_parquet(
        cls, path: str | os.PathLike, bounds_3857: tuple[float, float, float, float] | None = None
    ) -> OSMFeatures:
        """Read features written by `to_parquet`; with `bounds_3857` read only the row groups touching it."""
        path = Path(path)
        try:
            gdf = gpd.read_parquet(path, bbox=bounds_3857) if bounds_3857 else gpd.read_parquet(path)
        except Exception as exc:
            raise InputError(
                f"OSM features {path}",
                f"not readable as GeoParquet ({exc})",
                "rebuild it with OSMFeatures.from_pbf(...).to_parquet(...)",
            ) from exc
        missing = set(COLUMNS) - set(gdf.columns)
        if missing:
            raise InputError(
                f"OSM features {path}",
                f"missing columns {sorted(missing)}",
                "rebuild it with OSMFeatures.from_pbf(...).to_parquet(...)",
            )
        return cls(gdf.to_crs(CRS), source=str(path))

    # -- access -------------------------------------------------------------------------------
    def query(self, bounds_3857: tuple[float, float, float, float], margin: float = 0.0) -> gpd.GeoDataFrame:
        """Features intersecting (left, bottom, right, top) in EPSG:3857, grown by `margin` metres."""
        left, bottom, right, top = bounds_3857
        q = box(left - margin, bottom - margin, right + margin, top + margin)
        idx = self.gdf.sindex.query(q, predicate="intersects")
        return self.gdf.iloc[np.sort(idx)]

    @property
    def counts(self) -> dict[str, int]:
        """Number of features per class (every class of the legend but land, zeros included)."""
        vc = self.gdf["class"].value_counts()
        return {name: int(vc.get(name, 0)) for name in BY_NAME if name != "land"}

    def __len__(self) -> int:
        return len(self.gdf)
