"""The offline world over loopback: Esri World Imagery tiles and identify, the STAC API of
`cmsrd.world.stac_api`, `/files` with byte ranges, and a Geofabrik-like PBF download (see `cmsrd.world`).

Built on the generic `cmsrd.world.loopback.LoopbackServer`; `cmsrd world serve` (`cmsrd.world.cli`) runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError
from .faults import FaultConfig
from .loopback import HTTPError, LoopbackServer, Request, Response, json_response
from .stac_api import StacApi, StacCatalog

ESRI_SERVICE = "/arcgis/rest/services/World_Imagery/MapServer"
PLACEHOLDER_RGB = (204, 204, 204)  # Esri answers tiles it lacks with a uniform grey image
IDENTIFY_LAYER = {"layerId": 0, "layerName": "World Imagery Metadata"}
_WEB_MERCATOR_WKIDS = {3857, 102100, 102113, 900913}


def placeholder_tile(size: int = 256) -> bytes:
    """The grey placeholder JPEG (HTTP 200) served for tiles outside the world, as Esri does."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), PLACEHOLDER_RGB).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "world"


def _lonlat_to_3857(lon: float, lat: float) -> tuple[float, float]:
    from pyproj import Transformer

    return Transformer.from_crs(4326, 3857, always_xy=True).transform(lon, lat)


class WorldServer(LoopbackServer):
    """Serves a generated world directory (see `cmsrd.world`) over loopback.

    URLs: `tile_template` (Esri's `.../tile/{z}/{y}/{x}`, row before column), `identify_url`,
    `stac_url`, `geofabrik_index_url`, `files_url`. Route names in `stats`: "tile", "identify",
    "stac_*", "files", "geofabrik_index", "geofabrik_pbf", "geofabrik_md5".
    """

    def __init__(
        self, world_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, faults: FaultConfig | None = None
    ):
        root = Path(world_dir)
        meta_path = root / "world.json"
        if not meta_path.is_file():
            raise InputError(
                f"world directory {root}", "has no world.json", "generate one with `cmsrd world generate --out DIR`"
            )
        try:
            self.world = json.loads(meta_path.read_text())
        except ValueError as e:
            raise InputError(f"{meta_path}", f"not valid JSON: {e}", "regenerate the world") from None
        missing = [k for k in ("bounds_lonlat", "hr_capture_date") if k not in self.world]
        if missing:
            raise InputError(f"{meta_path}", f"lacks {missing}", "regenerate the world with this version")

        self.root = root.resolve()
        self._catalog = StacCatalog(self.root)  # reads items before binding, so bad input fails first
        super().__init__(host, port, faults)
        self._placeholder = placeholder_tile()
        self._placeholder_etag = '"' + hashlib.sha1(self._placeholder).hexdigest()[:16] + '"'
        self._md5: str | None = None
        self._md5_lock = threading.Lock()
        tile_re = ESRI_SERVICE + r"/tile/(?P<z>\d+)/(?P<y>\d+)/(?P<x>\d+)(?:\.\w+)?"
        self.add_route("tile", "GET", tile_re, self._tile)
        self.add_route("identify", ("GET", "POST"), ESRI_SERVICE + r"/identify", self._identify)
        self.add_route("files", "GET", r"/files/(?P<rel>.+)", self._files)
        self.add_route("geofabrik_index", "GET", r"/geofabrik/index-v1\.json", self._geofabrik_index)
        self.add_route("geofabrik_pbf", "GET", r"/geofabrik/(?P<rid>[a-z0-9-]+)-latest\.osm\.pbf", self._pbf)
        self.add_route("geofabrik_md5", "GET", r"/geofabrik/(?P<rid>[a-z0-9-]+)-latest\.osm\.pbf\.md5", self._md5_file)
        self.stac = StacApi(self, self._catalog, "/stac/v1", title=f"cmsrd offline world {self.world.get('name', '')}")

    # -- URLs ------------------------------------------------------------------------------------

    @property
    def tile_template(self) -> str:
        return f"{self.base_url}{ESRI_SERVICE}/tile/{{z}}/{{y}}/{{x}}"

    @property
    def identify_url(self) -> str:
        return f"{self.base_url}{ESRI_SERVICE}/identify"

    @property
    def stac_url(self) -> str:
        return f"{self.base_url}/stac/v1"

    @property
    def geofabrik_index_url(self) -> str:
        return f"{self.base_url}/geofabrik/index-v1.json"

    @property
    def files_url(self) -> str:
        return f"{self.base_url}/files"

    @property
    def pbf_path(self) -> Path:
        return self.root / "osm" / "world.osm.pbf"

    # -- tiles -----------------------------------------------------------------------------------

    def _tile(self, req: Request) -> Response:
        z, y, x = int(req.params["z"]), int(req.params["y"]), int(req.params["x"])
        if z > 30 or x >= 2**z or y >= 2**z:
            raise HTTPError(400, f"tile {z}/{y}/{x} is outside the tiling scheme")
        path = self.root / "tiles" / str(z) / str(x) / f"{y}.jpg"
        if path.is_file():
            return self.file_response(req, path, "image/jpeg", cache_control="public, max-age=86400")
        if req.query.get("blankTile", "true").strip().lower() == "false":
            raise HTTPError(404, "Tile not found")
        headers = {"Cache-Control": "public, max-age=86400", "ETag": self._placeholder_etag}
        if self._placeholder_etag in req.headers.get("If-None-Match", ""):
            return Response(304, b"", "image/jpeg", headers)
        return Response(200, self._placeholder, "image/jpeg", headers)

    # -- identify --------------------------------------------------------------------------------

    def _identify(self, req: Request) -> Response:
        """ArcGIS MapServer identify for a point: the capture metadata of the world's imagery."""
        q = dict(req.query)
        if req.method == "POST":
            q.update(req.form())
        fmt = q.get("f", "json").lower()
        if fmt not in ("json", "pjson"):
            raise HTTPError(400, f"f={fmt!r} is not supported here; use f=json")
        gtype = q.get("geometryType", "esriGeometryPoint")
        if gtype != "esriGeometryPoint":
            raise HTTPError(400, f"geometryType {gtype!r} is not supported; use esriGeometryPoint")
        x, y, wkid = self._identify_point(q)
        if wkid in _WEB_MERCATOR_WKIDS:
            w, s, e, n = self.world.get("bounds_3857") or (
                *_lonlat_to_3857(*self.world["bounds_lonlat"][:2]),
                *_lonlat_to_3857(*self.world["bounds_lonlat"][2:]),
            )
        elif wkid == 4326:
            w, s, e, n = self.world["bounds_lonlat"]
        else:
            raise HTTPError(400, f"sr {wkid} is not supported; use 4326 or 3857")
        pad = self._tolerance_units(q)
        results = []
        if w - pad <= x <= e + pad and s - pad <= y <= n + pad and self._layer_wanted(q.get("layers", "top")):
            date = str(self.world["hr_capture_date"]).replace("-", "")
            gsd = float(self.world.get("hr_gsd_m", 0.5))
            name = self.world.get("name", "offline world")
            attrs = {
                "OBJECTID": 1,
                "SRC_DATE": date,
                "SRC_DATE2": date,
                "SRC_RES": round(gsd, 3),
                "SRC_ACC": round(gsd * 10, 2),
                "SRC_DESC": "Synthetic aerial imagery (cmsrd offline world)",
                "NICE_NAME": name,
                "NICE_DESC": self.world.get("attribution", "cmsrd offline world"),
                "MinMapLevel": min(self.world.get("zooms", [16])),
                "MaxMapLevel": max(self.world.get("zooms", [18])),
            }
            res: dict[str, Any] = {**IDENTIFY_LAYER, "value": date, "displayFieldName": "SRC_DATE", "attributes": attrs}
            if q.get("returnGeometry", "true").lower() != "false":
                res["geometryType"] = "esriGeometryPolygon"
                res["geometry"] = {
                    "rings": [[[w, s], [e, s], [e, n], [w, n], [w, s]]],
                    "spatialReference": {"wkid": 102100 if wkid in _WEB_MERCATOR_WKIDS else 4326},
                }
            results.append(res)
        return json_response({"results": results})

    @staticmethod
    def _identify_point(q: dict[str, str]) -> tuple[float, float, int]:
        raw = q.get("geometry")
        if not raw:
            raise HTTPError(400, "identify needs geometry=x,y (or an esriGeometryPoint JSON object)")
        sr_raw = q.get("sr") or ""
        try:
            if raw.lstrip().startswith("{"):
                g = json.loads(raw)
                x, y = float(g["x"]), float(g["y"])
                sr_raw = sr_raw or str(g.get("spatialReference", {}).get("wkid", ""))
            else:
                x, y = (float(v) for v in raw.split(","))
        except (ValueError, KeyError, TypeError):
            raise HTTPError(400, f'geometry {raw!r} is not a point (x,y or {{"x":..,"y":..}})') from None
        if sr_raw.lstrip().startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                sr_raw = str(json.loads(sr_raw).get("wkid", ""))
        try:
            wkid = int(sr_raw) if sr_raw else 4326
        except ValueError:
            raise HTTPError(400, f"sr {sr_raw!r} is not a WKID (4326 or 3857)") from None
        return x, y, wkid

    @staticmethod
    def _tolerance_units(q: dict[str, str]) -> float:
        """Esri's tolerance is in screen pixels: convert with mapExtent / imageDisplay when both are given."""
        try:
            tol = float(q.get("tolerance") or 0)
            ext = [float(v) for v in q["mapExtent"].split(",")]
            width_px = float(q["imageDisplay"].split(",")[0])
            return tol * (ext[2] - ext[0]) / width_px if width_px > 0 else 0.0
        except (KeyError, ValueError, IndexError):
            return 0.0

    @staticmethod
    def _layer_wanted(layers: str) -> bool:
        """`top`, `visible`, `all`, optionally with `:id,id`: is layer 0 among them?"""
        _, _, ids = layers.partition(":")
        if not ids.strip():
            return True
        try:
            return IDENTIFY_LAYER["layerId"] in {int(v) for v in ids.split(",") if v.strip()}
        except ValueError:
            raise HTTPError(400, f"layers {layers!r} must look like all:0") from None

    # -- files -----------------------------------------------------------------------------------

    def _files(self, req: Request) -> Response:
        rel = req.params["rel"]
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root) or any(part == ".." for part in Path(rel).parts):
            raise HTTPError(403, f"path {rel!r} leaves the world directory")
        return self.file_response(req, target)

    # -- geofabrik -------------------------------------------------------------------------------

    def _regions(self) -> list[dict]:
        """A large parent region around the world and the world's own region, both with its PBF."""
        w, s, e, n = (float(v) for v in self.world["bounds_lonlat"])
        child = _slug(str(self.world.get("name", "world")))
        parent = f"{child}-region"
        pw, ps, pe, pn = max(w - 2, -180), max(s - 2, -85), min(e + 2, 180), min(n + 2, 85)
        return [
            {
                "id": parent,
                "name": f"{self.world.get('name', 'world')} region",
                "bbox": (pw, ps, pe, pn),
                "parent": None,
            },
            {"id": child, "name": str(self.world.get("name", "world")), "bbox": (w, s, e, n), "parent": parent},
        ]

    def _geofabrik_index(self, req: Request) -> Response:
        feats = []
        for r in self._regions():
            w, s, e, n = r["bbox"]
            props: dict[str, Any] = {
                "id": r["id"],
                "name": r["name"],
                "urls": {"pbf": f"{self.base_url}/geofabrik/{r['id']}-latest.osm.pbf"},
            }
            if r["parent"]:
                props["parent"] = r["parent"]
            feats.append(
                {
                    "type": "Feature",
                    "properties": props,
                    "geometry": {"type": "MultiPolygon", "coordinates": [[[[w, s], [e, s], [e, n], [w, n], [w, s]]]]},
                }
            )
        return json_response({"type": "FeatureCollection", "features": feats})

    def _region_pbf(self, rid: str) -> Path:
        if rid not in {r["id"] for r in self._regions()}:
            raise HTTPError(404, f"no region {rid!r}; see {self.geofabrik_index_url}")
        if not self.pbf_path.is_file():
            raise HTTPError(404, "the world has no osm/world.osm.pbf")
        return self.pbf_path

    def _pbf(self, req: Request) -> Response:
        return self.file_response(req, self._region_pbf(req.params["rid"]), "application/octet-stream")

    def _md5_file(self, req: Request) -> Response:
        path = self._region_pbf(req.params["rid"])
        with self._md5_lock:
            if self._md5 is None:
                h = hashlib.md5()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                self._md5 = h.hexdigest()
        text = f"{self._md5}  {req.params['rid']}-latest.osm.pbf\n"
        return Response(200, text.encode(), "text/plain; charset=utf-8")


@contextlib.contextmanager
def serve_world(
    world_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, faults: FaultConfig | None = None
) -> Iterator[WorldServer]:
    """Serve a world directory on loopback for the duration of the `with` block."""
    srv = WorldServer(world_dir, host=host, port=port, faults=faults)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
