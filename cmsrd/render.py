"""Rasterise OSM features onto the HR grid: a palette RGB map (SGDM colours) and a class-index mask.

Lines are buffered to their real ground width before rasterising, so a road is as wide on the map as on
the HR image whatever the latitude: a ground distance d covers d / cos(lat) EPSG:3857 metres (Web
Mercator's scale factor), taken at the centre of the footprint. Classes are burnt in `DRAW_ORDER`
(later ones paint over earlier ones) with `rasterio.features.rasterize` onto the footprint's grid (pixel
centres, `all_touched=False`); pixels no feature reaches are `land`. RGB is the `cmsrd.classes` palette
looked up from the mask, so every map colour is exactly a palette entry and SGDM's prompt rule works.

Ground widths (full width, metres; `LINE_WIDTHS_M`, keyed by the OSM tag value, class default otherwise):

=================  =====  ==================================================================
class / kind        m     why
=================  =====  ==================================================================
motorway            22    2 x 2-3 lanes + shoulders
trunk               18    dual carriageway
primary             14    4 lanes
secondary           12    3-4 lanes
tertiary            10    2 lanes + parking
*_link               8    single ramp
residential          8    2 lanes
unclassified         7
living_street        6
pedestrian           6
service              5    1-2 lanes
busway               6
road                 6    unknown type
track                3.5  unpaved, single vehicle
footway/path/...     2.5  footway, path, cycleway, steps, bridleway
rail                 5    standard gauge + ballast bed
light_rail           4
narrow_gauge         3.5
tram                 3    one track set in the street
river               20    (riverbank polygons give the real extent where mapped)
canal               10
stream               3
=================  =====  ==================================================================
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import geopandas as gpd
import numpy as np
from affine import Affine
from rasterio.features import rasterize
from shapely.geometry import box

from .classes import BY_NAME, CLASSES, DRAW_ORDER, legend, palette
from .errors import InputError
from .io import atomic_write_text, write_png

EARTH_RADIUS = 6378137.0
LINE_WIDTHS_M: dict[str, float] = {
    "motorway": 22,
    "trunk": 18,
    "primary": 14,
    "secondary": 12,
    "tertiary": 10,
    "motorway_link": 8,
    "trunk_link": 8,
    "primary_link": 8,
    "secondary_link": 8,
    "tertiary_link": 8,
    "residential": 8,
    "unclassified": 7,
    "living_street": 6,
    "pedestrian": 6,
    "service": 5,
    "busway": 6,
    "road": 6,
    "track": 3.5,
    "footway": 2.5,
    "path": 2.5,
    "cycleway": 2.5,
    "steps": 2.5,
    "bridleway": 2.5,
    "rail": 5,
    "light_rail": 4,
    "narrow_gauge": 3.5,
    "tram": 3,
    "river": 20,
    "canal": 10,
    "stream": 3,
}
CLASS_DEFAULT_WIDTH_M: dict[str, float] = {"road": 5, "major_road": 12, "railway": 4, "water": 5}
MAX_WIDTH_M = max(LINE_WIDTHS_M.values())

_LUT = np.zeros((256, 3), np.uint8)
for _c in CLASSES:
    _LUT[_c.id] = _c.rgb


def mercator_scale(bounds_3857: tuple[float, float, float, float]) -> float:
    """EPSG:3857 metres per ground metre at the centre of `bounds_3857` (1 / cos(latitude))."""
    y = (bounds_3857[1] + bounds_3857[3]) / 2.0
    lat = math.atan(math.sinh(y / EARTH_RADIUS))
    return 1.0 / math.cos(lat)


def line_width_m(cls: str, kind: str | None) -> float:
    """Ground width in metres drawn for a line of class `cls` and OSM tag value `kind`."""
    return float(LINE_WIDTHS_M.get(kind or "", CLASS_DEFAULT_WIDTH_M.get(cls, 4.0)))


def _check_bounds(bounds_3857) -> tuple[float, float, float, float]:
    try:
        left, bottom, right, top = (float(v) for v in bounds_3857)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"map bounds {bounds_3857!r}",
            "not (left, bottom, right, top)",
            "pass EPSG:3857 metres, e.g. cmsrd.sources.base.tile_bounds_3857(z, x, y)",
        ) from exc
    lim = math.pi * EARTH_RADIUS
    if not (left < right and bottom < top and -lim <= left and right <= lim and -lim <= bottom and top <= lim):
        raise InputError(
            f"map bounds {bounds_3857!r}",
            "not a valid EPSG:3857 box",
            "pass (left, bottom, right, top) in Web Mercator metres",
        )
    return left, bottom, right, top


def render_map(features_gdf, bounds_3857, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Render features (GeoDataFrame in EPSG:3857 with `class`/`kind`, or `OSMFeatures`) over a footprint.

    Returns (rgb uint8 size x size x 3, mask uint8 size x size of `cmsrd.classes` ids).
    """
    left, bottom, right, top = _check_bounds(bounds_3857)
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"map size {size!r}", "must be a positive number of pixels", "use e.g. 256")
    k = mercator_scale((left, bottom, right, top))
    margin = MAX_WIDTH_M * k
    if hasattr(features_gdf, "query") and hasattr(features_gdf, "gdf"):  # OSMFeatures: use its spatial index
        gdf = features_gdf.query((left, bottom, right, top), margin=margin)
    else:
        gdf = features_gdf
        if not isinstance(gdf, gpd.GeoDataFrame) or not {"class", "geometry"} <= set(gdf.columns):
            raise InputError(
                "map features",
                "not a GeoDataFrame with 'class' and geometry columns",
                "pass cmsrd.sources.osm.OSMFeatures or its .gdf",
            )
        if gdf.crs is not None and gdf.crs.to_epsg() != 3857:
            gdf = gdf.to_crs(3857)
        if len(gdf):
            gdf = gdf.iloc[
                gdf.sindex.query(
                    box(left - margin, bottom - margin, right + margin, top + margin), predicate="intersects"
                )
            ]
    unknown = set(gdf["class"]) - set(BY_NAME)
    if unknown:
        raise InputError(
            "map features",
            f"unknown classes {sorted(unknown)}",
            f"use the class names of cmsrd.classes: {sorted(BY_NAME)}",
        )
    shapes = []
    geoms = gdf.geometry.to_numpy()
    classes = gdf["class"].to_numpy()
    kinds = gdf["kind"].to_numpy() if "kind" in gdf.columns else np.full(len(gdf), None)
    is_line = np.asarray(gdf.geom_type.isin(["LineString", "MultiLineString"]))
    for name in DRAW_ORDER:
        sel = np.flatnonzero(classes == name)
        if not len(sel):
            continue
        cid = BY_NAME[name].id
        for i in sel:
            g = geoms[i]
            if is_line[i]:
                g = g.buffer(line_width_m(name, kinds[i]) / 2.0 * k, quad_segs=4)
            elif g.geom_type not in ("Polygon", "MultiPolygon"):
                continue  # points carry no extent
            shapes.append((g, cid))
    mask = np.full((size, size), BY_NAME["land"].id, np.uint8)
    if shapes:
        rasterize(
            shapes,
            out=mask,
            transform=Affine((right - left) / size, 0, left, 0, -(top - bottom) / size, top),
            all_touched=False,
            dtype=np.uint8,
        )
    return np.take(_LUT, mask, axis=0), mask  # = _LUT[mask], without fancy indexing's overhead


def class_fractions(mask: np.ndarray) -> dict[str, float]:
    """Fraction of the mask per class name (for the manifest's per-class map fractions)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return {c.name: float(counts[c.id]) / mask.size for c in CLASSES}


def _parse_tile(tile: str) -> tuple[int, int, int]:
    parts = tile.replace("/", "_").split("_")
    try:
        z, x, y = (int(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"{tile!r} is not Z_X_Y (e.g. 17_74633_37920)", param_hint="--tile") from None
    return z, x, y


@click.command("map")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--tile", required=True, help="XYZ tile id Z_X_Y of the footprint, e.g. 17_74633_37920.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(1, 8192), help="Map size in pixels.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
def map_command(source: str, tile: str, size: int, out_dir: str) -> None:
    """Render the OSM map of one XYZ tile from SOURCE (.osm.pbf, or GeoParquet from OSMFeatures).

    Writes <id>_map.png (palette RGB), <id>_mask.png (class ids) and legend.json into --out.
    """
    from .sources.base import tile_bounds_3857, tile_bounds_lonlat
    from .sources.osm import OSMFeatures

    z, x, y = _parse_tile(tile)
    bounds = tile_bounds_3857(z, x, y)
    t0 = time.perf_counter()
    if source.endswith(".parquet"):
        feats = OSMFeatures.from_parquet(source)
    else:
        feats = OSMFeatures.from_pbf(source, bbox_lonlat=tile_bounds_lonlat(z, x, y))
    t1 = time.perf_counter()
    rgb, mask = render_map(feats, bounds, size=size)
    t2 = time.perf_counter()
    out = Path(out_dir)
    sid = f"{z}_{x}_{y}"
    write_png(out / f"{sid}_map.png", rgb)
    write_png(out / f"{sid}_mask.png", mask, palette=palette())
    atomic_write_text(out / "legend.json", json.dumps(legend(), indent=2) + "\n")
    fr = {k: round(v, 4) for k, v in class_fractions(mask).items() if v > 0}
    click.echo(
        f"{sid}: {len(feats)} features read in {t1 - t0:.2f}s, rendered {size}px in {t2 - t1:.3f}s; "
        f"fractions {fr}; wrote {out}"
    )
