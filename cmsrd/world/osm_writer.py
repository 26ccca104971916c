"""Write the world's features as a real OpenStreetMap PBF with osmium's SimpleWriter.

Nodes are shared wherever ways meet at the same coordinate (street-grid crossings, closed rings),
ids are positive and increasing per type, every object has a version, changeset, user and a
timestamp derived from the seed (never the clock, so the file is byte-identical per seed).
Simple areas become closed ways; areas with holes or several parts (the lake and its island, a
clipped parcel) become `type=multipolygon` relations with `outer`/`inner` way members.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import osmium
from shapely.geometry import MultiPolygon, Polygon

from .features import WorldFeatures

R = 6378137.0
BASE_TIME = dt.datetime(2023, 3, 1, tzinfo=dt.UTC)


def mercator_to_lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EPSG:3857 -> WGS84 degrees (exact spherical inverse)."""
    lon = np.degrees(np.asarray(x, float) / R)
    lat = np.degrees(2 * np.arctan(np.exp(np.asarray(y, float) / R)) - math.pi / 2)
    return lon, lat


class _Ids:
    """Allocates OSM objects with deterministic metadata; shares nodes by 1e-7 degree location."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, 202])
        self.nodes: dict[tuple[int, int], int] = {}
        self.node_list: list[tuple[int, int, int, dict]] = []  # id, lon7, lat7, tags
        self.ways: list[tuple[int, list[int], dict]] = []
        self.relations: list[tuple[int, list[tuple[str, int, str]], dict]] = []

    def meta(self) -> dict:
        return {
            "version": int(self.rng.integers(1, 6)),
            "changeset": int(self.rng.integers(1_000_000, 9_000_000)),
            "uid": int(self.rng.integers(1000, 99999)),
            "user": "cmsrd-world",
            "timestamp": BASE_TIME + dt.timedelta(seconds=int(self.rng.integers(0, 60 * 86400))),
        }

    def node(self, lon: float, lat: float, tags: dict | None = None) -> int:
        key = (int(round(lon * 1e7)), int(round(lat * 1e7)))
        if tags is None and key in self.nodes:
            return self.nodes[key]
        nid = len(self.node_list) + 1
        self.node_list.append((nid, key[0], key[1], tags or {}))
        if tags is None:
            self.nodes[key] = nid
        return nid

    def way_from_coords(self, coords: np.ndarray, tags: dict) -> int:
        lon, lat = mercator_to_lonlat(coords[:, 0], coords[:, 1])
        refs: list[int] = []
        for a, b in zip(lon, lat):
            nid = self.node(float(a), float(b))
            if not refs or refs[-1] != nid:
                refs.append(nid)
        wid = len(self.ways) + 1
        self.ways.append((wid, refs, tags))
        return wid


def _ring_ways(ids: _Ids, ring: np.ndarray, split: bool) -> list[int]:
    """One closed way for a ring, or two ways sharing their end nodes when `split`."""
    if not split or len(ring) < 8:
        return [ids.way_from_coords(ring, {})]
    mid = len(ring) // 2
    return [ids.way_from_coords(ring[: mid + 1], {}), ids.way_from_coords(ring[mid:], {})]


def write_pbf(world: WorldFeatures, path: str | Path, seed: int) -> dict[str, int]:
    """Write `world` to `path` (.osm.pbf). Returns object counts {nodes, ways, relations}."""
    ids = _Ids(seed)
    for f in world.features:
        g = f.geometry
        if f.kind == "node":
            lon, lat = mercator_to_lonlat(np.array([g.x]), np.array([g.y]))
            ids.node(float(lon[0]), float(lat[0]), dict(f.tags))
        elif f.kind == "line":
            ids.way_from_coords(np.asarray(g.coords), dict(f.tags))
        else:
            polys = list(g.geoms) if isinstance(g, MultiPolygon) else [g]
            simple = len(polys) == 1 and not polys[0].interiors and not f.attrs.get("split_outer")
            if simple:
                tags = {k: v for k, v in f.tags.items() if k != "type"}
                ids.way_from_coords(np.asarray(polys[0].exterior.coords), tags)
                continue
            members: list[tuple[str, int, str]] = []
            for p in polys:
                assert isinstance(p, Polygon)
                for wid in _ring_ways(ids, np.asarray(p.exterior.coords), bool(f.attrs.get("split_outer"))):
                    members.append(("w", wid, "outer"))
                for hole in p.interiors:
                    members.append(("w", ids.way_from_coords(np.asarray(hole.coords), {}), "inner"))
            tags = dict(f.tags)
            tags["type"] = "multipolygon"
            ids.relations.append((len(ids.relations) + 1, members, tags))

    path = Path(path)
    minx, miny, maxx, maxy = world.bounds_3857
    (w, e), (s, n) = mercator_to_lonlat(np.array([minx, maxx]), np.array([miny, maxy]))
    header = osmium.io.Header()
    header.set("generator", "cmsrd-world")
    header.add_box(osmium.osm.Box(osmium.osm.Location(float(w), float(s)), osmium.osm.Location(float(e), float(n))))
    writer = osmium.SimpleWriter(str(path), header=header, overwrite=True)
    try:
        for nid, lon7, lat7, tags in ids.node_list:
            writer.add_node(osmium.osm.mutable.Node(id=nid, location=(lon7 / 1e7, lat7 / 1e7), tags=tags, **ids.meta()))
        for wid, refs, tags in ids.ways:
            writer.add_way(osmium.osm.mutable.Way(id=wid, nodes=refs, tags=tags, **ids.meta()))
        for rid, members, tags in ids.relations:
            writer.add_relation(osmium.osm.mutable.Relation(id=rid, members=members, tags=tags, **ids.meta()))
    finally:
        writer.close()
    return {"nodes": len(ids.node_list), "ways": len(ids.ways), "relations": len(ids.relations)}
