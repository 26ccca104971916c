"""Loopback HTTP servers that speak the real services' protocols, with deterministic fault injection.

Why the standard library (`http.server.ThreadingHTTPServer`) and no web framework: these servers are
test and demo infrastructure, the protocol shapes they speak (XYZ tiles, ArcGIS identify, a STAC API,
static files with byte ranges) are small, and a framework would add a dependency plus its own
buffering, which would hide exactly the wire-level faults (truncated bodies, hung connections) the
clients must be tested against.

Two layers:

`LoopbackServer` -- a reusable base: route registration, request parsing, static files with HTTP
Range/HEAD/ETag, thread-safe `stats`, and the fault layer of `cmsrd.world.faults`. Build another
protocol on it like this::

    from cmsrd.world.servers import LoopbackServer, HTTPError, json_response

    class ProcessApiServer(LoopbackServer):
        def __init__(self, world_dir, **kw):
            super().__init__(**kw)
            self.add_route("process", "POST", r"/api/v1/process", self._process)

        def _process(self, req):          # req: Request (method, path, query, headers, body, params)
            spec = req.json()             # 400 with a clear message when the body is not JSON
            if "input" not in spec:
                raise HTTPError(400, "missing 'input'")
            return Response(body=tiff_bytes, content_type="image/tiff")

    with ProcessApiServer(world_dir, faults=FaultConfig(error_rate=0.2)) as srv:
        requests.post(srv.base_url + "/api/v1/process", json=...)

Handlers return a `Response` (bytes or a `FileSlice` body) or raise `HTTPError`. Faults are applied
around every routed request before the handler runs (latency, error statuses, timeouts) and to the
body on the wire (corrupt, truncate); `stats` counts requests per route name, statuses, faults per
kind, byte ranges and full bodies served.

`WorldServer` / `serve_world` -- the offline world (see `cmsrd.world`): Esri World Imagery tiles and
identify, the STAC API of `cmsrd.world.stac_api`, `/files` with byte ranges, and a Geofabrik-like
PBF download.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import mimetypes
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import click

from ..errors import InputError
from .faults import BodyFaulter, FaultConfig, FaultDecision, FaultPlan

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


# ----------------------------------------------------------------------------------------------------
# Requests, responses, errors


class HTTPError(Exception):
    """Raise from a handler to answer with `status`; `body` (JSON-able) replaces the default error body
    ``{"error": {"code": status, "message": message}}`` (the ArcGIS REST shape)."""

    def __init__(self, status: int, message: str, body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
        self.body = body if body is not None else {"error": {"code": status, "message": message, "details": []}}


@dataclass(frozen=True)
class FileSlice:
    """A byte range of a file on disk, streamed in chunks rather than read into memory."""

    path: Path
    start: int
    length: int

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = self.length
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    return
                left -= len(block)
                yield block


@dataclass
class Response:
    """What a handler returns. `served` marks file bodies for the stats: "range" or "full"."""

    status: int = 200
    body: bytes | FileSlice = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    served: str | None = None

    @property
    def length(self) -> int:
        return self.body.length if isinstance(self.body, FileSlice) else len(self.body)

    def chunks(self) -> Iterator[bytes]:
        if isinstance(self.body, FileSlice):
            yield from self.body.chunks()
        else:
            for i in range(0, len(self.body), CHUNK):
                yield self.body[i : i + CHUNK]


def json_response(
    obj: Any, status: int = 200, content_type: str = "application/json", headers: dict[str, str] | None = None
) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode(), content_type, dict(headers or {}))


@dataclass
class Request:
    """A parsed request. `query` keeps the last value per key, `query_all` every value;
    `params` holds the named groups of the matched route pattern."""

    method: str
    path: str
    query: dict[str, str]
    query_all: dict[str, list[str]]
    headers: Any
    body: bytes
    params: dict[str, str]
    server: LoopbackServer

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None

    def form(self) -> dict[str, str]:
        """An application/x-www-form-urlencoded body as a dict (ArcGIS endpoints accept POSTed forms)."""
        return {k: v[-1] for k, v in parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True).items()}


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    name: str
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Handler


# ----------------------------------------------------------------------------------------------------
# Stats


class ServerStats:
    """Thread-safe counters. Each property returns a `Counter` copy (a missing key reads 0):
    `requests` per route name, `statuses` per HTTP status, `faults` per kind ("error", "error:429",
    "timeout", "corrupt", "truncate", "latency"), `ranges` (206 bodies) and `full_downloads` (200 file
    bodies) per route, `bytes_sent` per route."""

    _fields = ("requests", "statuses", "faults", "ranges", "full_downloads", "bytes_sent")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._c: dict[str, Counter] = {f: Counter() for f in self._fields}

    def add(self, field_name: str, key: Any, n: int = 1) -> None:
        with self._lock:
            self._c[field_name][key] += n

    def _get(self, name: str) -> Counter:
        with self._lock:
            return Counter(self._c[name])

    requests = property(lambda self: self._get("requests"))
    statuses = property(lambda self: self._get("statuses"))
    faults = property(lambda self: self._get("faults"))
    ranges = property(lambda self: self._get("ranges"))
    full_downloads = property(lambda self: self._get("full_downloads"))
    bytes_sent = property(lambda self: self._get("bytes_sent"))

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {f: dict(c) for f, c in self._c.items()}


# ----------------------------------------------------------------------------------------------------
# The base server


def _parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """One `bytes=` range -> (start, end inclusive); None to ignore the header (multi-range or
    malformed: RFC 9110 lets a server answer 200 with the full body); "unsatisfiable" for a 416."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as GDAL and requests expect
    server_version = "cmsrd-loopback/1"
    timeout = 120  # idle keep-alive connections do not hold a thread forever
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid the 40 ms delayed-ACK stall
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.app._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.app._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self.server.app._dispatch(self)

    do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = do_GET

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = io.BytesIO()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out.getvalue()
                out.write(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    app: LoopbackServer


class LoopbackServer:
    """A threaded HTTP server on loopback with named routes, static files and fault injection.

    Use as a context manager (`with LoopbackServer(...) as srv:`) or call `start()`/`stop()`.
    `port=0` picks a free ephemeral port; a port in use raises `InputError` naming it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, faults: FaultConfig | None = None):
        if faults is not None and not isinstance(faults, FaultConfig):
            raise InputError("faults", f"expected a FaultConfig or None, got {type(faults).__name__}")
        self.stats = ServerStats()
        self._routes: list[Route] = []
        self._plan = FaultPlan(faults)
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        try:
            self._httpd = _HTTPServer((host, int(port)), _Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InputError(
                    f"port {port}", f"already in use on {host}", "choose a free port, or 0 for an ephemeral one"
                ) from None
            if e.errno == errno.EACCES:
                raise InputError(
                    f"port {port}",
                    f"permission denied binding on {host}",
                    "use a port above 1023, or 0 for an ephemeral one",
                ) from None
            raise InputError(
                f"host {host!r} port {port}", f"cannot listen: {e.strerror or e}", "use host 127.0.0.1 and port 0"
            ) from None
        self._httpd.app = self
        self.host, self.port = self._httpd.server_address[:2]

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> LoopbackServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{type(self).__name__}:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: releases held (timeout/latency) requests and closes open connections."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block serving until interrupted (Ctrl-C), then stop cleanly. For `cmsrd world serve`."""
        self.start()
        try:
            while not self._stopping.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # -- configuration ---------------------------------------------------------------------------

    @property
    def faults(self) -> FaultConfig | None:
        return self._plan.config

    def set_faults(self, faults: FaultConfig | None) -> None:
        """Replace the fault config at run time; the deterministic sequence restarts at request 0."""
        if faults is not None and not isinstance(faults, FaultConfig):
            raise InputError("faults", f"expected a FaultConfig or None, got {type(faults).__name__}")
        self._plan = FaultPlan(faults)

    def add_route(self, name: str, methods: str | tuple[str, ...], pattern: str, handler: Handler) -> None:
        """Route requests whose path fully matches the regex `pattern` to `handler`.
        GET routes also answer HEAD (same headers, no body). `name` keys the stats."""
        ms = {methods} if isinstance(methods, str) else set(methods)
        if "GET" in ms:
            ms.add("HEAD")
        self._routes.append(Route(name, frozenset(m.upper() for m in ms), re.compile(pattern), handler))

    # -- static files ----------------------------------------------------------------------------

    def file_response(
        self, req: Request, path: Path, content_type: str | None = None, cache_control: str = "public, max-age=3600"
    ) -> Response:
        """Serve a file with Accept-Ranges, a single byte range (206/416), ETag and If-None-Match."""
        try:
            st = path.stat()
        except OSError:
            raise HTTPError(404, f"not found: {req.path}") from None
        if not path.is_file():
            raise HTTPError(404, f"not found: {req.path}")
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        ctype = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Cache-Control": cache_control,
            "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(st.st_mtime)),
        }
        if etag in [t.strip() for t in req.headers.get("If-None-Match", "").split(",")]:
            return Response(304, b"", ctype, headers)
        rng_header = req.headers.get("Range")
        if_range = req.headers.get("If-Range")
        if rng_header and (if_range is None or if_range.strip() == etag):
            rng = _parse_range(rng_header, size)
            if rng == "unsatisfiable":
                return Response(416, b"", ctype, {**headers, "Content-Range": f"bytes */{size}"})
            if rng is not None:
                start, end = rng  # type: ignore[misc]
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return Response(206, FileSlice(path, start, end - start + 1), ctype, headers, served="range")
        return Response(200, FileSlice(path, 0, size), ctype, headers, served="full")

    # -- dispatch --------------------------------------------------------------------------------

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: set[str] = set()
        for route in self._routes:
            m = route.pattern.fullmatch(path)
            if m:
                if method in route.methods:
                    return route, {k: v for k, v in m.groupdict().items() if v is not None}
                allowed |= route.methods
        if allowed:
            raise HTTPError(
                405, f"method {method} not allowed on {path}", headers={"Allow": ", ".join(sorted(allowed))}
            )
        raise HTTPError(404, f"no such resource: {path}")

    def _dispatch(self, h: _Handler) -> None:
        method = h.command.upper()
        url = urlsplit(h.path)
        path = unquote(url.path)
        query_all = parse_qs(url.query, keep_blank_values=True)
        try:
            body = h.read_body()
        except (ValueError, OSError):
            h.close_connection = True
            self._send(h, method, "-", json_response({"error": {"code": 400, "message": "bad request body"}}, 400))
            return
        try:
            route, params = self._match(method, path)
        except HTTPError as e:
            self.stats.add("requests", "-")
            self._send(h, method, "-", self._error_response(e))
            return
        self.stats.add("requests", route.name)
        decision = self._plan.decide(path)
        if decision is not None and self._pre_faults(h, method, route.name, decision):
            return
        req = Request(method, path, {k: v[-1] for k, v in query_all.items()}, query_all, h.headers, body, params, self)
        try:
            resp = route.handler(req)
        except HTTPError as e:
            resp = self._error_response(e)
        except Exception:  # a handler bug must answer 500, not kill the connection thread silently
            log.exception("handler %s failed on %s", route.name, h.path)
            resp = json_response({"error": {"code": 500, "message": "internal server error"}}, 500)
        self._send(h, method, route.name, resp, decision)

    @staticmethod
    def _error_response(e: HTTPError) -> Response:
        return json_response(e.body, e.status, headers=e.headers)

    def _pre_faults(self, h: _Handler, method: str, route: str, d: FaultDecision) -> bool:
        """Latency, timeouts and error statuses; True when the request has been dealt with."""
        if d.latency_s > 0:
            self.stats.add("faults", "latency")
            if self._stopping.wait(d.latency_s):
                h.close_connection = True
                return True
        if d.kind == "timeout":
            self.stats.add("faults", "timeout")
            cfg = self._plan.config
            self._stopping.wait(cfg.timeout_s if cfg else 0)
            h.close_connection = True  # drop without answering
            return True
        if d.kind == "error":
            self.stats.add("faults", "error")
            self.stats.add("faults", f"error:{d.status}")
            headers = {}
            if d.status in (429, 503):
                cfg = self._plan.config
                headers["Retry-After"] = str(int(math.ceil(cfg.retry_after_s if cfg else 1)))
            phrase = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
            msg = phrase.get(d.status, "error") + " (injected fault)"
            self._send(
                h,
                method,
                route,
                json_response({"error": {"code": d.status, "message": msg}}, d.status or 500, headers=headers),
            )
            return True
        return False

    def _send(self, h: _Handler, method: str, route: str, resp: Response, d: FaultDecision | None = None) -> None:
        length = resp.length if resp.status not in (204, 304) else 0
        faulter = BodyFaulter.for_decision(d if method != "HEAD" else None, length)
        try:
            h.send_response(resp.status)
            h.send_header("Content-Type", resp.content_type)
            h.send_header("Content-Length", str(length))
            for k, v in resp.headers.items():
                h.send_header(k, v)
            if h.close_connection:
                h.send_header("Connection", "close")
            h.end_headers()
            if faulter.truncates:  # cut the body short, then drop the connection (no warning header)
                h.close_connection = True
            self.stats.add("statuses", resp.status)
            if method == "HEAD" or length == 0:
                return
            if faulter.positions:
                self.stats.add("faults", "corrupt")
            if faulter.truncates:
                self.stats.add("faults", "truncate")
            if resp.served == "range":
                self.stats.add("ranges", route)
            elif resp.served == "full":
                self.stats.add("full_downloads", route)
            sent = 0
            for chunk in faulter.apply(resp.chunks()):
                h.wfile.write(chunk)
                sent += len(chunk)
            h.wfile.flush()
            self.stats.add("bytes_sent", route, sent)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True


# ----------------------------------------------------------------------------------------------------
# The offline world

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
        from .stac_api import StacApi, StacCatalog  # stac_api builds on this module

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


@click.command("serve")
@click.argument("world_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=0, show_default=True, help="TCP port; 0 picks a free one.")
@click.option(
    "--latency", "latency_s", default=0.0, help="Seconds added to every request (under --fault-path, if given)."
)
@click.option("--error-rate", default=0.0, help="Share of requests answered 429/500/503.")
@click.option("--error-codes", default="429,500,503", show_default=True, help="Statuses for errors.")
@click.option("--timeout-rate", default=0.0, help="Share of requests held without an answer.")
@click.option("--timeout-s", default=30.0, show_default=True, help="How long a held request is held.")
@click.option("--corrupt-rate", default=0.0, help="Share of bodies with altered bytes.")
@click.option("--truncate-rate", default=0.0, help="Share of bodies cut short.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fault sequence.")
@click.option("--fault-path", "paths", multiple=True, help="Fault only URL paths with this prefix.")
def serve_command(
    world_dir: Path, host: str, port: int, error_codes: str, paths: tuple[str, ...], **rates: Any
) -> None:
    """Serve WORLD_DIR on loopback: Esri-shaped tiles + identify, STAC API, ranged files, Geofabrik.

    Test and demo infrastructure only; real runs talk to the real services.
    """
    try:
        codes = tuple(int(c) for c in error_codes.split(",") if c.strip())
    except ValueError:
        raise InputError(
            "--error-codes", f"{error_codes!r} is not a comma-separated list of statuses", "e.g. --error-codes 429,503"
        ) from None
    faults = FaultConfig(error_codes=codes, paths=paths or None, **rates)
    srv = WorldServer(world_dir, host=host, port=port, faults=faults if faults.active else None)
    click.echo(f"serving {world_dir} at {srv.base_url}  (Ctrl-C stops)")
    for label, url in (
        ("tiles", srv.tile_template),
        ("identify", srv.identify_url),
        ("stac", srv.stac_url),
        ("geofabrik", srv.geofabrik_index_url),
        ("files", srv.files_url),
    ):
        click.echo(f"  {label:9s} {url}")
    srv.serve_forever()
