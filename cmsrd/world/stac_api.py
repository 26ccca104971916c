"""A STAC API over the offline world's items, in the shape of Earth Search v1 (stac-server).

Enough of STAC API 1.0 for pystac-client and for the project's Sentinel-2 source: landing page with
conformance classes and links, `/conformance`, `/collections[/{id}[/items[/{item_id}]]]`, and `/search`
over GET and POST with bbox, intersects, datetime (instants and open or closed intervals), collections,
ids, the `query` extension (eq/neq/lt/lte/gt/gte/in/startsWith/endsWith/contains), `sortby`, `limit`, and
`next`-link paging (a GET href carrying the token; for POST a body ``{"next": token}`` with
``merge: true``). CQL2 `filter` is not implemented and is refused with a 400 naming `query` instead, so
the landing page does not claim the filter conformance class.

Items are read once from ``<world>/stac/items/*.json``; their world-relative asset hrefs are rewritten
to absolute ``{base}/files/<relpath>`` URLs (served with byte ranges), so /vsicurl/ reads work.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from ..errors import InputError
from .loopback import HTTPError, LoopbackServer, Request, Response, json_response

STAC_VERSION = "1.0.0"
CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/ogcapi-features#sort",
    "https://api.stacspec.org/v1.0.0/ogcapi-features#query",
    "https://api.stacspec.org/v1.0.0/item-search#sort",
    "https://api.stacspec.org/v1.0.0/item-search#query",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]
GEOJSON = "application/geo+json"
DEFAULT_LIMIT = 10
MAX_LIMIT = 10000
_QUERY_OPS = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "startsWith": lambda a, b: str(a).startswith(str(b)),
    "endsWith": lambda a, b: str(a).endswith(str(b)),
    "contains": lambda a, b: str(b) in str(a),
}


def bad_request(message: str) -> HTTPError:
    """A 400 in the stac-fastapi/stac-server error shape."""
    return HTTPError(400, message, body={"code": "BadRequest", "description": message})


def not_found(message: str) -> HTTPError:
    return HTTPError(404, message, body={"code": "NotFoundError", "description": message})


# ----------------------------------------------------------------------------------------------------
# Parsing search parameters


def parse_datetime(text: str) -> datetime:
    """RFC 3339 (``Z`` or offset; fractional seconds) -> aware UTC datetime."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise bad_request(f"datetime {text!r} is not RFC 3339 (e.g. 2023-06-01T00:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def parse_interval(text: str) -> tuple[datetime | None, datetime | None]:
    """An instant, ``start/end``, or a half-open interval (``../end``, ``start/..``, empty side)."""
    if "/" not in text:
        if len(text.strip()) == 10:  # a bare date means that whole day
            start = parse_datetime(text + "T00:00:00Z")
            return start, start + timedelta(days=1) - timedelta(microseconds=1)
        t = parse_datetime(text)
        return t, t
    a, _, b = text.partition("/")
    start = None if a.strip() in ("", "..") else parse_datetime(a)
    end = None if b.strip() in ("", "..") else parse_datetime(b)
    if start is None and end is None:
        raise bad_request(f"datetime {text!r}: both ends of the interval are open")
    if start and end and end < start:
        raise bad_request(f"datetime {text!r}: the interval ends before it starts")
    return start, end


def _bbox_geometry(bbox: list[float]) -> BaseGeometry:
    if len(bbox) not in (4, 6):
        raise bad_request(f"bbox must have 4 or 6 numbers, got {len(bbox)}")
    w, s, e, n = (bbox[0], bbox[1], bbox[3], bbox[4]) if len(bbox) == 6 else bbox
    if s > n:
        raise bad_request(f"bbox {bbox}: south {s} > north {n}")
    if w > e:  # crosses the antimeridian
        return box(w, s, 180.0, n).union(box(-180.0, s, e, n))
    return box(w, s, e, n)


def _as_list(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise bad_request(f"{name} must be a list of strings or a comma-separated string")


def _parse_sortby(value: Any) -> list[tuple[str, bool]]:
    """GET ``-properties.datetime,+id`` or POST ``[{"field":..,"direction":"desc"}]`` -> [(field, desc)]."""
    if value is None:
        return []
    out: list[tuple[str, bool]] = []
    if isinstance(value, str):
        for part in filter(None, (p.strip() for p in value.split(","))):
            desc = part.startswith("-")
            out.append((part.lstrip("+- "), desc))
        return out
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, dict) or "field" not in item:
                raise bad_request("sortby entries must be objects with 'field' and 'direction'")
            direction = str(item.get("direction", "asc")).lower()
            if direction not in ("asc", "desc"):
                raise bad_request(f"sortby direction {direction!r} must be 'asc' or 'desc'")
            out.append((item["field"], direction == "desc"))
        return out
    raise bad_request("sortby must be a string or a list of {field, direction}")


@dataclass
class SearchParams:
    """A parsed item search. `token` is the paging offset token (None on the first page)."""

    bbox: list[float] | None = None
    intersects: dict | None = None
    datetime: str | None = None
    collections: list[str] | None = None
    ids: list[str] | None = None
    query: dict[str, dict[str, Any]] | None = None
    sortby: list[tuple[str, bool]] = field(default_factory=list)
    limit: int = DEFAULT_LIMIT
    token: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchParams:
        """From a POST body, or a GET query whose JSON-valued fields were already decoded."""
        if not isinstance(d, dict):
            raise bad_request("the search body must be a JSON object")
        if d.get("filter") is not None:
            raise bad_request(
                "CQL2 'filter' is not supported by this server; use the 'query' extension, "
                'e.g. {"query": {"eo:cloud_cover": {"lt": 20}}}'
            )
        bbox = d.get("bbox")
        if isinstance(bbox, str):
            try:
                bbox = [float(v) for v in bbox.split(",")]
            except ValueError:
                raise bad_request(f"bbox {bbox!r} must be comma-separated numbers") from None
        if bbox is not None:
            if not isinstance(bbox, list) or not all(isinstance(v, (int, float)) for v in bbox):
                raise bad_request("bbox must be a list of numbers")
            _bbox_geometry(bbox)
        intersects = d.get("intersects")
        if intersects is not None:
            if bbox is not None:
                raise bad_request("bbox and intersects are mutually exclusive")
            try:
                shape(intersects)
            except Exception as e:  # shapely raises several types for malformed GeoJSON
                raise bad_request(f"intersects is not a valid GeoJSON geometry: {e}") from None
        dt = d.get("datetime")
        if dt is not None:
            parse_interval(str(dt))
        query = d.get("query")
        if query is not None:
            if not isinstance(query, dict) or not all(isinstance(v, dict) for v in query.values()):
                raise bad_request('query must look like {"eo:cloud_cover": {"lt": 20}}')
            for prop, ops in query.items():
                for op in ops:
                    if op not in _QUERY_OPS:
                        raise bad_request(f"query operator {op!r} on {prop!r} is not one of {sorted(_QUERY_OPS)}")
        limit = d.get("limit", DEFAULT_LIMIT)
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise bad_request(f"limit {limit!r} must be an integer") from None
        if limit < 1:
            raise bad_request(f"limit {limit} must be >= 1")
        return cls(
            bbox=bbox,
            intersects=intersects,
            datetime=None if dt is None else str(dt),
            collections=_as_list(d.get("collections"), "collections"),
            ids=_as_list(d.get("ids"), "ids"),
            query=query,
            sortby=_parse_sortby(d.get("sortby")),
            limit=min(limit, MAX_LIMIT),
            token=d.get("next") or d.get("token"),
        )

    @classmethod
    def from_query_string(cls, q: dict[str, str]) -> SearchParams:
        d: dict[str, Any] = dict(q)
        for key in ("intersects", "query"):
            if key in d and isinstance(d[key], str):
                try:
                    d[key] = json.loads(d[key])
                except ValueError:
                    raise bad_request(f"{key} must be JSON in a GET search") from None
        return cls.from_dict(d)

    def digest(self) -> str:
        """Identifies the search (not the page), so a token cannot be replayed on another search."""
        key = json.dumps(
            [self.bbox, self.intersects, self.datetime, self.collections, self.ids, self.query, self.sortby],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(key.encode()).hexdigest()[:12]

    def to_query_string(self, token: str | None, with_collections: bool = True) -> str:
        """GET parameters of this search (the next page's href when `token` is given)."""
        q: dict[str, str] = {}
        if self.bbox is not None:
            q["bbox"] = ",".join(repr(float(v)) for v in self.bbox)
        if self.intersects is not None:
            q["intersects"] = json.dumps(self.intersects, separators=(",", ":"))
        if self.datetime:
            q["datetime"] = self.datetime
        if self.collections and with_collections:
            q["collections"] = ",".join(self.collections)
        if self.ids:
            q["ids"] = ",".join(self.ids)
        if self.query:
            q["query"] = json.dumps(self.query, separators=(",", ":"))
        if self.sortby:
            q["sortby"] = ",".join(("-" if desc else "+") + f for f, desc in self.sortby)
        q["limit"] = str(self.limit)
        if token:
            q["next"] = token
        return urlencode(q)


def encode_token(offset: int, digest: str) -> str:
    return base64.urlsafe_b64encode(f"{offset}:{digest}".encode()).decode().rstrip("=")


def decode_token(token: str, digest: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        off, _, dig = raw.partition(":")
        offset = int(off)
    except Exception:
        raise bad_request(f"next token {token!r} is not one this server issued") from None
    if dig != digest or offset < 0:
        raise bad_request("next token belongs to a different search; repeat the search's parameters with it")
    return offset


# ----------------------------------------------------------------------------------------------------
# The catalog


def _item_interval(item: dict) -> tuple[datetime | None, datetime | None]:
    p = item.get("properties", {})
    if p.get("datetime"):
        t = parse_datetime(p["datetime"])
        return t, t
    s, e = p.get("start_datetime"), p.get("end_datetime")
    return (parse_datetime(s) if s else None), (parse_datetime(e) if e else None)


def _field_value(item: dict, name: str) -> Any:
    if name in ("id", "collection"):
        return item.get(name)
    if name.startswith("properties."):
        name = name[len("properties.") :]
    return item.get("properties", {}).get(name)


def _sort_key(value: Any, desc: bool = False) -> tuple:
    """Comparable key across types; items lacking the field sort last in either direction."""
    if value is None:
        return (-1, "") if desc else (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


class StacCatalog:
    """The world's items and collections, with STAC item search over them."""

    def __init__(self, world_dir: str | Path):
        self.root = Path(world_dir)
        items_dir = self.root / "stac" / "items"
        self.items: list[dict] = []
        for p in sorted(items_dir.glob("*.json")) if items_dir.is_dir() else []:
            try:
                item = json.loads(p.read_text())
            except ValueError as e:
                raise InputError(
                    f"STAC item {p}", f"not valid JSON: {e}", "regenerate the world with `cmsrd world generate`"
                ) from None
            self.items.append(item)
        self._geoms = {it["id"]: shape(it["geometry"]) if it.get("geometry") else None for it in self.items}
        self.collections: dict[str, dict] = {}
        coll_dir = self.root / "stac" / "collections"
        for p in sorted(coll_dir.glob("*.json")) if coll_dir.is_dir() else []:
            c = json.loads(p.read_text())
            self.collections[c["id"]] = c
        for cid in sorted({it.get("collection") for it in self.items if it.get("collection")}):
            self.collections.setdefault(cid, self._synth_collection(cid))

    def _synth_collection(self, cid: str) -> dict:
        """A minimal collection document when the world ships none for `cid`."""
        members = [it for it in self.items if it.get("collection") == cid]
        bboxes = [it["bbox"] for it in members if it.get("bbox")]
        spatial = (
            [
                [
                    min(b[0] for b in bboxes),
                    min(b[1] for b in bboxes),
                    max(b[2] for b in bboxes),
                    max(b[3] for b in bboxes),
                ]
            ]
            if bboxes
            else [[-180, -90, 180, 90]]
        )
        times = [t for it in members for t in _item_interval(it) if t]
        temporal = (
            [[min(times).strftime("%Y-%m-%dT%H:%M:%SZ"), max(times).strftime("%Y-%m-%dT%H:%M:%SZ")]]
            if times
            else [[None, None]]
        )
        return {
            "type": "Collection",
            "stac_version": STAC_VERSION,
            "id": cid,
            "title": cid,
            "description": f"{cid} items of the cmsrd offline world",
            "license": "proprietary",
            "extent": {"spatial": {"bbox": spatial}, "temporal": {"interval": temporal}},
            "links": [],
        }

    def search(self, p: SearchParams) -> list[dict]:
        """All items matching `p`, sorted (default: datetime descending, then id)."""
        geom = _bbox_geometry(p.bbox) if p.bbox is not None else (shape(p.intersects) if p.intersects else None)
        t0, t1 = parse_interval(p.datetime) if p.datetime else (None, None)
        out = []
        for it in self.items:
            if p.collections is not None and it.get("collection") not in p.collections:
                continue
            if p.ids is not None and it["id"] not in p.ids:
                continue
            if geom is not None:
                g = self._geoms.get(it["id"])
                if g is None or not g.intersects(geom):
                    continue
            if p.datetime:
                s, e = _item_interval(it)
                if (t1 is not None and s is not None and s > t1) or (t0 is not None and e is not None and e < t0):
                    continue
            if p.query and not self._query_matches(it, p.query):
                continue
            out.append(it)
        out.sort(key=lambda it: it["id"])
        sortby = p.sortby or [("properties.datetime", True)]
        for name, desc in reversed(sortby):  # stable sorts, least significant key first
            out.sort(key=lambda it, n=name, d=desc: _sort_key(_field_value(it, n), d), reverse=desc)
        return out

    @staticmethod
    def _query_matches(item: dict, query: dict[str, dict[str, Any]]) -> bool:
        props = item.get("properties", {})
        for prop, ops in query.items():
            value = item.get(prop) if prop in ("id", "collection") else props.get(prop)
            if value is None:
                return False
            for op, arg in ops.items():
                try:
                    if not _QUERY_OPS[op](value, arg):
                        return False
                except TypeError:
                    raise bad_request(f"query {prop} {op} {arg!r}: cannot compare with {value!r}") from None
        return True


# ----------------------------------------------------------------------------------------------------
# Routes


class StacApi:
    """Registers the STAC API routes under `prefix` on a `LoopbackServer`."""

    def __init__(
        self, server: LoopbackServer, catalog: StacCatalog, prefix: str = "/stac/v1", title: str = "cmsrd offline world"
    ):
        self.server, self.catalog, self.prefix, self.title = server, catalog, prefix.rstrip("/"), title
        pre = re.escape(self.prefix)
        server.add_route("stac_landing", "GET", pre + r"/?", self.landing)
        server.add_route("stac_conformance", "GET", pre + r"/conformance", self.conformance)
        server.add_route("stac_collections", "GET", pre + r"/collections", self.list_collections)
        server.add_route("stac_collection", "GET", pre + r"/collections/(?P<cid>[^/]+)", self.get_collection)
        server.add_route("stac_items", "GET", pre + r"/collections/(?P<cid>[^/]+)/items", self.collection_items)
        server.add_route("stac_item", "GET", pre + r"/collections/(?P<cid>[^/]+)/items/(?P<iid>[^/]+)", self.get_item)
        server.add_route("stac_search", ("GET", "POST"), pre + r"/search", self.search)

    @property
    def url(self) -> str:
        return self.server.base_url + self.prefix

    # -- documents -------------------------------------------------------------------------------

    def landing(self, req: Request) -> Response:
        u = self.url
        links = [
            {"rel": "self", "type": "application/json", "href": u},
            {"rel": "root", "type": "application/json", "href": u},
            {"rel": "conformance", "type": "application/json", "href": f"{u}/conformance"},
            {"rel": "data", "type": "application/json", "href": f"{u}/collections"},
            {"rel": "search", "type": GEOJSON, "href": f"{u}/search", "method": "GET"},
            {"rel": "search", "type": GEOJSON, "href": f"{u}/search", "method": "POST"},
        ] + [
            {"rel": "child", "type": "application/json", "href": f"{u}/collections/{quote(cid)}"}
            for cid in self.catalog.collections
        ]
        return json_response(
            {
                "stac_version": STAC_VERSION,
                "type": "Catalog",
                "id": "cmsrd-offline-world",
                "title": self.title,
                "description": "A STAC API over the cmsrd offline world (loopback test and demo infrastructure)",
                "conformsTo": CONFORMANCE,
                "links": links,
            }
        )

    def conformance(self, req: Request) -> Response:
        return json_response({"conformsTo": CONFORMANCE})

    def _collection_doc(self, cid: str) -> dict:
        c = copy.deepcopy(self.catalog.collections[cid])
        u = self.url
        keep = [lk for lk in c.get("links", []) if lk.get("rel") not in ("self", "root", "parent", "items")]
        c["links"] = keep + [
            {"rel": "self", "type": "application/json", "href": f"{u}/collections/{quote(cid)}"},
            {"rel": "parent", "type": "application/json", "href": u},
            {"rel": "root", "type": "application/json", "href": u},
            {"rel": "items", "type": GEOJSON, "href": f"{u}/collections/{quote(cid)}/items"},
        ]
        return c

    def list_collections(self, req: Request) -> Response:
        u = self.url
        return json_response(
            {
                "collections": [self._collection_doc(c) for c in self.catalog.collections],
                "links": [
                    {"rel": "self", "type": "application/json", "href": f"{u}/collections"},
                    {"rel": "root", "type": "application/json", "href": u},
                ],
            }
        )

    def get_collection(self, req: Request) -> Response:
        cid = req.params["cid"]
        if cid not in self.catalog.collections:
            raise not_found(f"collection {cid!r} not found")
        return json_response(self._collection_doc(cid))

    def item_doc(self, item: dict) -> dict:
        """The item as served: world-relative asset hrefs made absolute, links pointing at this API."""
        it = copy.deepcopy(item)
        files = self.server.base_url + "/files/"
        for asset in it.get("assets", {}).values():
            href = asset.get("href", "")
            if href and "://" not in href and not href.startswith("/"):
                asset["href"] = files + quote(href.lstrip("./"))
        u, cid = self.url, it.get("collection", "")
        keep = [
            lk
            for lk in it.get("links", [])
            if lk.get("rel") not in ("self", "root", "parent", "collection") and "://" in str(lk.get("href", ""))
        ]
        it["links"] = keep + [
            {"rel": "self", "type": GEOJSON, "href": f"{u}/collections/{quote(cid)}/items/{quote(it['id'])}"},
            {"rel": "parent", "type": "application/json", "href": f"{u}/collections/{quote(cid)}"},
            {"rel": "collection", "type": "application/json", "href": f"{u}/collections/{quote(cid)}"},
            {"rel": "root", "type": "application/json", "href": u},
        ]
        return it

    def get_item(self, req: Request) -> Response:
        cid, iid = req.params["cid"], req.params["iid"]
        for it in self.catalog.items:
            if it["id"] == iid and it.get("collection") == cid:
                return json_response(self.item_doc(it), content_type=GEOJSON)
        raise not_found(f"item {iid!r} not found in collection {cid!r}")

    # -- search ----------------------------------------------------------------------------------

    def _page(self, p: SearchParams, next_link, extra_links: Iterable[dict] = ()) -> Response:
        matched = self.catalog.search(p)
        digest = p.digest()
        offset = decode_token(p.token, digest) if p.token else 0
        page = matched[offset : offset + p.limit]
        links = [{"rel": "root", "type": "application/json", "href": self.url}, *extra_links]
        if offset + p.limit < len(matched):
            links.insert(0, next_link(encode_token(offset + p.limit, digest)))
        return json_response(
            {
                "type": "FeatureCollection",
                "stac_version": STAC_VERSION,
                "stac_extensions": [],
                "context": {"limit": p.limit, "matched": len(matched), "returned": len(page)},
                "numberMatched": len(matched),
                "numberReturned": len(page),
                "features": [self.item_doc(it) for it in page],
                "links": links,
            },
            content_type=GEOJSON,
        )

    def search(self, req: Request) -> Response:
        href = f"{self.url}/search"
        if req.method == "POST":
            p = SearchParams.from_dict(req.json())

            def next_link(token: str) -> dict:
                return {
                    "rel": "next",
                    "title": "Next page of Items",
                    "type": GEOJSON,
                    "method": "POST",
                    "href": href,
                    "merge": True,
                    "body": {"next": token},
                }
        else:
            p = SearchParams.from_query_string(req.query)

            def next_link(token: str) -> dict:
                return {
                    "rel": "next",
                    "title": "Next page of Items",
                    "type": GEOJSON,
                    "method": "GET",
                    "href": f"{href}?{p.to_query_string(token)}",
                }

        return self._page(p, next_link)

    def collection_items(self, req: Request) -> Response:
        cid = req.params["cid"]
        if cid not in self.catalog.collections:
            raise not_found(f"collection {cid!r} not found")
        q = {k: v for k, v in req.query.items() if k in ("bbox", "datetime", "limit", "next")}
        p = SearchParams.from_query_string(q)
        p.collections = [cid]
        href = f"{self.url}/collections/{quote(cid)}/items"

        def next_link(token: str) -> dict:
            qs = p.to_query_string(token, with_collections=False)
            return {"rel": "next", "type": GEOJSON, "method": "GET", "href": f"{href}?{qs}"}

        return self._page(
            p,
            next_link,
            [{"rel": "collection", "type": "application/json", "href": f"{self.url}/collections/{quote(cid)}"}],
        )
