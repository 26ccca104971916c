"""One polite HTTP client for every network source (tiles, identify, STAC, Sentinel Hub, SAS tokens).

Why one client: public services (Esri World Imagery, Earth Search, Planetary Computer) throttle or ban
clients that hammer them, and a dataset build makes tens of thousands of requests. Everything here is
built on `requests.Session` + `concurrent.futures`; what requests/urllib3 do not give out of the box and
is therefore added here:

* retries with exponential backoff and jitter that *honour* `Retry-After` on 429/503 (urllib3's Retry
  does honour it but cannot re-validate a body, so truncated or corrupt payloads would not be retried);
* a token-bucket rate limit shared by all threads (no maintained library fits a thread-shared
  blocking bucket without pulling in an async stack);
* `Content-Length` checks, so a truncated body is retried instead of becoming a broken tile;
* redaction of credentials, tokens and signatures from every URL or message that reaches a log or error.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter

from ..errors import CMSRDError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # an old editable install may expose cmsrd as a namespace package
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("cmsrd")
        except PackageNotFoundError:
            return "0+unknown"


__version__ = _version()
USER_AGENT = (
    f"cmsrd/{__version__} (remote-sensing super-resolution dataset builder; python-requests/{requests.__version__})"
)

# Query parameters and header-ish keys whose values are secrets (SAS tokens, S3 signatures, API keys).
SECRET_KEYS = (
    "sig",
    "signature",
    "se",
    "st",
    "sp",
    "sv",
    "skoid",
    "sktid",
    "skt",
    "ske",
    "sks",
    "skv",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "apikey",
    "api_key",
    "key",
    "client_secret",
    "password",
    "passwd",
    "secret",
    "code",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "awsaccesskeyid",
    "subscription-key",
)
_SECRET_PARAM = re.compile(r"(?i)([?&;]|\b)(" + "|".join(re.escape(k) for k in SECRET_KEYS) + r")=([^&\s'\"<>#]+)")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:'\"]+(?::[^/\s@'\"]*)?@")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_JSON_SECRET = re.compile(
    r"(?i)([\"']?(?:client_secret|access_token|refresh_token|password|token)[\"']?\s*[:=]\s*[\"']?)([^\"',\s}&]+)"
)

REDACTED = "REDACTED"


def redact(text: object, secrets: Iterable[str] = ()) -> str:
    """Return `text` with URL credentials, signature/token query values, bearer tokens and the given
    literal `secrets` replaced by REDACTED. Use on every URL or exception message before logging it."""
    s = str(text)
    for secret in secrets:
        if secret and len(str(secret)) >= 4:
            s = s.replace(str(secret), REDACTED)
    s = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", s)
    s = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}", s)
    s = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", s)
    s = _JSON_SECRET.sub(lambda m: m.group(1) + REDACTED, s)
    return s


class RedactingFilter(logging.Filter):
    """Logging filter that redacts secrets from a record's final message (urllib3 logs full URLs at
    DEBUG, signatures and SAS tokens included)."""

    def __init__(self, secrets: set[str] | None = None):
        super().__init__()
        self.secrets = secrets if secrets is not None else set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_GLOBAL_FILTER = RedactingFilter()
_FILTERED_LOGGERS = (
    "urllib3.connectionpool",
    "urllib3.util.retry",
    "requests_oauthlib.oauth2_session",
    "oauthlib",
    "sentinelhub.download.client",
    "sentinelhub.download.sentinelhub_client",
    # rasterio logs dataset names, i.e. signed /vsicurl/ URLs, at DEBUG
    "rasterio",
    "rasterio._base",
    "rasterio._env",
    "rasterio.env",
    "rasterio._io",
    "rasterio.vrt",
    "rasterio._warp",
    "rasterio._filepath",
    "rasterio._err",
    "rasterio.session",
)


def install_log_redaction(secrets: Iterable[str] = ()) -> None:
    """Attach the redacting filter to third-party loggers that print URLs or tokens (idempotent)."""
    _GLOBAL_FILTER.secrets.update(s for s in secrets if s and len(s) >= 4)
    known = [n for n in logging.root.manager.loggerDict if n.startswith(("rasterio", "sentinelhub", "urllib3"))]
    for name in (*_FILTERED_LOGGERS, *known, __name__):
        lg = logging.getLogger(name)
        if _GLOBAL_FILTER not in lg.filters:
            lg.addFilter(_GLOBAL_FILTER)


class HTTPFetchError(CMSRDError):
    """A request failed for good (after retries, or with a non-retryable status). URL is redacted."""

    def __init__(self, url: str, problem: str, status: int | None = None, attempts: int = 1):
        self.url, self.problem, self.status, self.attempts = redact(url), redact(problem), status, attempts
        super().__init__(f"{self.url}: {self.problem} (after {attempts} attempt{'s' * (attempts != 1)})")


class CorruptBody(ValueError):
    """Raise from a `validate` callback when a body arrived complete but is not what it should be."""


class TokenBucket:
    """Thread-shared token bucket: at most `rate` requests/s on average, bursts of up to `burst`."""

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if rate <= 0:
            raise ValueError("rate must be > 0 requests per second")
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else max(1, int(rate)))
        self._tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; returns the seconds waited.

        Reservation style: the token is taken at once (the balance may go negative) and the caller
        sleeps off the debt outside the lock, so waiting threads are served in arrival order.
        """
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


@dataclass
class RetryPolicy:
    """How failures are retried. Delay of attempt n (0-based) is min(max_backoff, backoff * 2**n) times a
    random factor in [1, 1 + jitter]; a server's Retry-After (seconds or HTTP date) is used when longer,
    capped at `max_retry_after` (a longer demand makes the request fail instead of stalling the build)."""

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.5
    max_retry_after: float = 120.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({408, 425, 429, 500, 502, 503, 504}))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        d = min(self.max_backoff, self.backoff * (2**attempt)) * (1.0 + self.jitter * random.random())
        if retry_after is not None:
            d = max(d, retry_after)
        return d


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After header -> seconds (it may be delta-seconds or an HTTP date); None when absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


class HttpClient:
    """Polite, retrying, rate-limited HTTP client shared by the sources.

    `rate` (requests/s, None = unlimited) and `max_workers` bound the load put on a service;
    `timeout` is (connect, read) seconds. `secrets` are literal strings (client secrets, tokens) that
    must never appear in logs or errors. Pass `session` to reuse a configured `requests.Session`.
    """

    def __init__(
        self,
        *,
        user_agent: str | None = None,
        timeout: float | tuple[float, float] = (10.0, 60.0),
        retry: RetryPolicy | None = None,
        rate: float | None = 8.0,
        burst: int | None = None,
        max_workers: int = 4,
        session: requests.Session | None = None,
        headers: dict[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        secrets: Iterable[str] = (),
    ):
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_workers = max(1, int(max_workers))
        self.bucket = TokenBucket(rate, burst, sleep=sleep) if rate else None
        self._sleep = sleep
        self.secrets: set[str] = {s for s in secrets if s}
        install_log_redaction(self.secrets)
        self._headers = {"User-Agent": user_agent or USER_AGENT, **(headers or {})}
        self._shared = session  # a caller's session is used as given: it must be safe to share
        if session is not None:
            session.headers.update(self._headers)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "waited_s": 0.0}
        self._stats_lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        """This thread's session. A `requests.Session` is not thread-safe (its cookie jar and connection
        pools change without locks: "dictionary changed size during iteration" when a worker's threads
        share one), so each thread that uses the client gets its own, with the same headers."""
        if self._shared is not None:
            return self._shared
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(10, self.max_workers * 2), max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers.update(self._headers)
            self._local.session = s
            with self._sessions_lock:
                self._sessions.append(s)
        return s

    # -- public API -----------------------------------------------------------------------------
    def add_secret(self, secret: str | None) -> None:
        """Register a literal secret (token, key) to redact from everything this client logs/raises."""
        if secret:
            self.secrets.add(str(secret))
            install_log_redaction([str(secret)])

    def redact(self, text: object) -> str:
        return redact(text, self.secrets)

    def get(self, url: str, **kw: Any) -> requests.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> requests.Response:
        return self.request("POST", url, **kw)

    def request(
        self,
        method: str,
        url: str,
        *,
        ok: Sequence[int] = (200,),
        validate: Callable[[requests.Response], None] | None = None,
        timeout: float | tuple[float, float] | None = None,
        consume: Callable[[requests.Response], None] | None = None,
        **kw: Any,
    ) -> requests.Response:
        """Send a request, retrying transient failures; return the fully read response.

        A status in `ok` is success; a retryable status (429, 5xx, ...) or a connection error, timeout,
        truncated body or a `validate` callback raising `CorruptBody` is retried per the policy; any
        other status fails at once. Raises `HTTPFetchError` (redacted) when it finally fails.

        With `consume`, a successful response is streamed (`stream=True`) and handed to `consume`
        instead of being read into memory (large files; see `download`); whatever it raises that is
        retryable here (a connection error mid-body, `CorruptBody`, a truncated body) is retried.
        """
        attempts = self.retry.retries + 1
        problem = "no attempt made"
        status: int | None = None
        for attempt in range(attempts):
            if self.bucket is not None:
                waited = self.bucket.acquire()
                if waited:
                    self._count("waited_s", waited)
            self._count("requests")
            retry_after: float | None = None
            try:
                resp = self.session.request(
                    method,
                    url,
                    timeout=timeout or self.timeout,
                    **({"stream": True} if consume is not None else {}),
                    **kw,
                )
                status = resp.status_code
                if consume is not None and status in ok:
                    with resp:
                        consume(resp)
                    return resp
                _ = resp.content  # read the whole body now, inside the retry loop
                if status in ok:
                    _check_length(resp)
                    if validate is not None:
                        validate(resp)
                    return resp
                problem = f"HTTP {status} {resp.reason or ''}".strip()
                if status not in self.retry.retry_statuses:
                    self._count("failures")
                    raise HTTPFetchError(url, self.redact(problem), status, attempt + 1)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                if retry_after is not None and retry_after > self.retry.max_retry_after:
                    self._count("failures")
                    raise HTTPFetchError(
                        url,
                        f"{problem}; server asks to wait {retry_after:.0f} s "
                        f"(more than max_retry_after={self.retry.max_retry_after:.0f} s)",
                        status,
                        attempt + 1,
                    )
            except HTTPFetchError:
                raise
            except CorruptBody as e:
                problem = f"corrupt body: {e}"
            except _TruncatedBody as e:
                problem = f"truncated body: {e}"
            except requests.exceptions.Timeout as e:
                problem = f"timeout: {type(e).__name__}"
                status = None
            except (
                requests.exceptions.ConnectionError,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as e:
                problem = f"connection error: {type(e).__name__}: {e}"
                status = None
            if attempt + 1 < attempts:
                delay = self.retry.delay(attempt, retry_after)
                self._count("retries")
                log.warning(
                    "retry %d/%d in %.2fs for %s %s: %s",
                    attempt + 1,
                    self.retry.retries,
                    delay,
                    method,
                    self.redact(url),
                    self.redact(problem),
                )
                self._sleep(delay)
        self._count("failures")
        raise HTTPFetchError(url, self.redact(problem), status, attempts)

    def download(
        self,
        url: str,
        dest: str | Path,
        *,
        verify: Callable[[Path], None] | None = None,
        on_progress: Callable[[int, int | None], None] | None = None,
        chunk_size: int = 1 << 20,
        **kw: Any,
    ) -> Path:
        """Stream a GET of `url` into `dest` atomically (a `.part` file renamed on success) with the
        retry policy of `request`; the body never sits in memory (multi-GB checkpoints).

        A body shorter than its Content-Length is retried from the start. `verify(tmp_path)` runs on the
        complete file before the rename: raising `CorruptBody` retries, anything else fails at once and
        leaves nothing under `dest`. `on_progress(bytes_so_far, total_or_None)` follows every chunk
        (restarting at 0 on a retry).
        """
        from ..io import atomic_path

        dest = Path(dest)

        def consume(resp: requests.Response) -> None:
            total = _declared_length(resp)
            n = 0
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as f:
                    if on_progress is not None:
                        on_progress(0, total)
                    for chunk in resp.iter_content(chunk_size=chunk_size):
                        f.write(chunk)
                        n += len(chunk)
                        if on_progress is not None:
                            on_progress(n, total)
                    f.flush()
                    os.fsync(f.fileno())
                if total is not None and n < total:
                    raise _TruncatedBody(f"got {n} of {total} bytes")
                if verify is not None:
                    verify(tmp)

        self.request("GET", url, consume=consume, **kw)
        return dest

    def map(
        self, fn: Callable[[T], R], items: Iterable[T], *, desc: str | None = None, progress: bool = False
    ) -> list[R | BaseException]:
        """Run `fn` over `items` with at most `max_workers` threads; results in input order.

        An item whose call raises yields the exception object in its slot instead of stopping the rest,
        so the caller can record a failure per item.
        """
        items = list(items)
        out: list[R | BaseException] = [None] * len(items)  # type: ignore[list-item]

        def run(i: int) -> None:
            try:
                out[i] = fn(items[i])
            except Exception as e:  # noqa: BLE001 - collected per item on purpose
                out[i] = e

        if len(items) <= 1 or self.max_workers == 1:
            for i in range(len(items)):
                run(i)
            return out
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=desc, unit="req", leave=False)
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items)), thread_name_prefix="cmsrd-http") as pool:
            for _ in pool.map(run, range(len(items))):
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return out

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()
        self._local = threading.local()
        if self._shared is not None:
            self._shared.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, key: str, n: float = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n


class _TruncatedBody(Exception):
    pass


def _declared_length(resp: requests.Response) -> int | None:
    """Content-Length of an identity-encoded body (None when absent, encoded, or a HEAD response)."""
    declared = resp.headers.get("Content-Length")
    if declared is None or resp.request is None or resp.request.method == "HEAD":
        return None
    if resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
        return None
    try:
        return int(declared)
    except ValueError:
        return None


def _check_length(resp: requests.Response) -> None:
    """Compare the body with Content-Length (only meaningful for identity-encoded bodies)."""
    n = _declared_length(resp)
    if n is None:
        return
    if len(resp.content) < n:
        raise _TruncatedBody(f"got {len(resp.content)} of {n} bytes")
