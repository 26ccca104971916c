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
ROAD_HIGHWAYS = frozenset({
    "residential", "service", "unclassified", "living_street", "track", "footway", "path", "cycleway",
    "pedestrian", "steps", "bridleway", "road", "busway",
})
RAILWAYS = frozenset({"rail", "light_rail", "tram", "narrow_gauge"})
WATER_LINES = frozenset({"river", "stream", "canal"})
PARK = {"leisure": {"park", "garden"}, "landuse": {"grass", "meadow", "recreation_ground"}}
FARMLAND = frozenset({"farmland", "farmyard", "orchard"})
KEYS = ("building", "highway", "railway", "waterway", "natural", "landuse", "leisure", "water")
COLUMNS = ["class", "kind", "osm_type", "osm_id", "geometry"]


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
    if tags.get("area") == "yes" or tags.get("tunnel", "no") != "no":
        return None
    hw = tags.get("highway")
    if hw in MAJOR_HIGHWAYS:
        return "major_road", hw
    if hw in ROAD_HIGHWAYS:
        return "road", hw
    rw = tags.get("railway")
    if rw in RAILWAYS:
        return "railway", rw
    ww = tags.get("waterway")
    if ww in WATER_LINES:
        return "water", ww
    return None


@dataclass
class IngestStats:
    """What an ingest saw: kept features per class and areas skipped as invalid, with the reason."""

    invalid_areas: int = 0
    unassembled_relations: int = 0
    unassembled_ways: int = 0
    invalid_geometries: int = 0
    clipped_lines: int = 0  # lines cut by the extract boundary: kept as the parts whose nodes are present
    lines_without_nodes: int = 0  # lines with fewer than two located nodes: skipped
    seconds: float = 0.0


def _line_wkb(way) -> tuple[bytes, bool] | None:
    """WKB of a way's located parts (extracts cut ways at their edge), and whether nodes were missing.

    Runs of consecutive located nodes become the parts of a MultiLineString; None when no run has two.
    """
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
    parts = [r for r in runs if len(r) >= 2]
    if not parts:
        return None
    geom = shapely.LineString(parts[0]) if len(parts) == 1 else shapely.MultiLineString(parts)
    return shapely.to_wkb(geom), missing


def _read_bbox(path: Path) -> tuple[float, float, float, float] | None:
    """(west, south, east, north) from the PBF header; raises InputError if the file is unreadable."""
    try:
        reader = osmium.io.Reader(str(path), osmium.osm.osm_entity_bits.NOTHING)
        try:
            b = reader.header().box()
        finally:
            reader.close()
    except Exception as exc:  # libosmium raises RuntimeError / osmium.io errors on bad input
        raise InputError(f"OSM file {path}", f"cannot be read as OSM data ({exc})",
                         "re-download the extract (e.g. `cmsrd.sources.geofabrik`) and check its md5") from exc
    if not b.valid():
        return None
    return (b.bottom_left.lon, b.bottom_left.lat, b.top_right.lon, b.top_right.lat)


def _contains(outer, inner, tol: float = 1e-7) -> bool:
    return (outer[0] - tol <= inner[0] and outer[1] - tol <= inner[1]
            and outer[2] + tol >= inner[2] and outer[3] + tol >= inner[3])


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
    ) -> OSMFeatures:
        """Read every map-class feature of `path`; with `bbox_lonlat` (W, S, E, N) keep only those touching it.

        Features within `margin_deg` of the bbox are kept too, so buffered lines just outside still reach it.
        `progress` shows a tqdm counter of OSM objects read (country extracts take minutes).

        Raises InputError naming the file when it is not readable OSM data, or does not cover the bbox.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"OSM file {path}", "does not exist", "pass the path of a .osm.pbf extract")
        if bbox_lonlat is not None:
            w, s, e, n = (float(v) for v in bbox_lonlat)
            if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
                raise InputError(f"AOI bbox {bbox_lonlat}", "is not (west, south, east, north) in degrees",
                                 "pass e.g. (24.94, 60.165, 24.95, 60.17)")
        t0 = time.perf_counter()
        header_bbox = _read_bbox(path)
        if bbox_lonlat is not None and header_bbox is not None and not _contains(header_bbox, bbox_lonlat):
            raise InputError(f"OSM file {path}", f"covers {tuple(round(v, 5) for v in header_bbox)}, "
                             f"not the AOI {tuple(bbox_lonlat)}", "use an extract that covers the AOI "
                             "(cmsrd.sources.geofabrik.find_extract picks one)")
        stats = IngestStats()
        rows: list[tuple] = []
        wkb = osmium.geom.WKBFactory()
        area_candidates = {"w": set(), "r": set()}
        assembled = {"w": set(), "r": set()}
        try:
            fp = (osmium.FileProcessor(str(path))
                  .with_areas()
                  .with_filter(osmium.filter.KeyFilter(*KEYS)))
            objects = tqdm(fp, desc=f"reading {path.name}", unit=" obj", mininterval=1.0) if progress else fp
            for obj in objects:
                if obj.is_way():
                    tags = obj.tags
                    if obj.is_closed() and classify_area(tags) is not None:
                        area_candidates["w"].add(obj.id)
                    cl = classify_line(tags)
                    if cl is None:
                        continue
                    geom = _line_wkb(obj)
                    if geom is None:
                        stats.lines_without_nodes += 1
                        continue
                    stats.clipped_lines += int(geom[1])
                    rows.append((cl[0], cl[1], "way", obj.id, geom[0]))
                elif obj.is_relation():
                    if obj.tags.get("type") in ("multipolygon", "boundary") and classify_area(obj.tags):
                        area_candidates["r"].add(obj.id)
                elif obj.is_area():
                    ca = classify_area(obj.tags)
                    if ca is None:
                        continue
                    kind = "w" if obj.from_way() else "r"
                    oid = obj.orig_id()
                    assembled[kind].add(oid)
                    try:
                        geom = wkb.create_multipolygon(obj)
                    except (RuntimeError, osmium.InvalidLocationError):
                        stats.invalid_geometries += 1
                        continue
                    rows.append((ca[0], ca[1], "way" if kind == "w" else "relation", oid, geom))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"OSM file {path}", f"is corrupt or truncated ({exc})",
                             "re-download the extract and verify its md5") from exc
        stats.unassembled_ways = len(area_candidates["w"] - assembled["w"])
        stats.unassembled_relations = len(area_candidates["r"] - assembled["r"])

        if rows:
            df = pd.DataFrame(rows, columns=COLUMNS)
            geoms = shapely.from_wkb(df["geometry"].map(lambda g: bytes.fromhex(g) if isinstance(g, str) else g))
            gdf = gpd.GeoDataFrame(df.drop(columns="geometry"), geometry=geoms, crs="EPSG:4326")
        else:
            gdf = gpd.GeoDataFrame({c: [] for c in COLUMNS[:-1]}, geometry=[], crs="EPSG:4326")
        bad = gdf.geometry.is_empty | ~gdf.geometry.is_valid
        stats.invalid_geometries += int(bad.sum())
        gdf = gdf.loc[~bad]
        if bbox_lonlat is not None:
            if header_bbox is None:  # no header box: the data extent must cover the AOI
                if gdf.empty or not _contains(tuple(gdf.total_bounds), bbox_lonlat, tol=1e-3):
                    raise InputError(f"OSM file {path}", f"has no data over the AOI {tuple(bbox_lonlat)}",
                                     "use an extract that covers the AOI")
            w, s, e, n = bbox_lonlat
            near = box(w - margin_deg, s - margin_deg, e + margin_deg, n + margin_deg)
            gdf = gdf.iloc[np.sort(gdf.sindex.query(near, predicate="intersects"))]
        gdf = gdf.to_crs(CRS).reset_index(drop=True)
        gdf["class"] = gdf["class"].astype(str)
        stats.invalid_areas = stats.unassembled_ways + stats.unassembled_relations + stats.invalid_geometries
        stats.seconds = time.perf_counter() - t0
        feats = cls(gdf, stats, source=str(path))
        log.info("read %s: %s, %d invalid areas skipped in %.2fs", path.name, feats.counts,
                 stats.invalid_areas, stats.seconds)
        return feats

    # -- storage ------------------------------------------------------------------------------
    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the features as GeoParquet (atomically)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            self.gdf.to_parquet(tmp, index=False, write_covering_bbox=True)  # lets readers skip by bbox
        return path

    @classmethod
    def from_parquet(cls, path: str | os.PathLike, bounds_3857: tuple[float, float, float, float] | None = None
                     ) -> OSMFeatures:
        """Read features written by `to_parquet`; with `bounds_3857` read only the row groups touching it."""
        path = Path(path)
        try:
            gdf = gpd.read_parquet(path, bbox=bounds_3857) if bounds_3857 else gpd.read_parquet(path)
        except Exception as exc:
            raise InputError(f"OSM features {path}", f"not readable as GeoParquet ({exc})",
                             "rebuild it with OSMFeatures.from_pbf(...).to_parquet(...)") from exc
        missing = set(COLUMNS) - set(gdf.columns)
        if missing:
            raise InputError(f"OSM features {path}", f"missing columns {sorted(missing)}",
                             "rebuild it with OSMFeatures.from_pbf(...).to_parquet(...)")
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
