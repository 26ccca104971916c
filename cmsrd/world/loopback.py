"""A small loopback HTTP server that speaks whatever protocol its routes define, with deterministic faults.

Why the standard library (`http.server.ThreadingHTTPServer`) and no web framework: these servers are
test and demo infrastructure, the protocol shapes they speak (XYZ tiles, ArcGIS identify, a STAC API,
static files with byte ranges) are small, and a framework would add a dependency plus its own
buffering, which would hide exactly the wire-level faults (truncated bodies, hung connections) the
clients must be tested against.

`LoopbackServer` -- route registration, request parsing, static files with HTTP Range/HEAD/ETag,
thread-safe `stats`, and the fault layer of `cmsrd.world.faults`. Build a protocol on it like this::

    from cmsrd.world.loopback import LoopbackServer, HTTPError, Response

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
kind, byte ranges and full bodies served. The world's servers (`cmsrd.world.servers`, `.stac_api`,
`.sentinelhub_server`) are built on it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import mimetypes
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
