"""The shared HTTP client against a loopback server with injected faults (429/503, truncation, timeouts)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cmsrd.sources.http import (
    USER_AGENT,
    CorruptBody,
    HttpClient,
    HTTPFetchError,
    RetryPolicy,
    TokenBucket,
    parse_retry_after,
    redact,
)

pytestmark = pytest.mark.timeout(60)


class Script:
    """Per-path list of responses to give, in order; the last one repeats."""

    def __init__(self):
        self.plan: dict[str, list[tuple]] = {}
        self.seen: list[tuple[str, str, float]] = []  # (path, user agent, time)
        self.lock = threading.Lock()

    def next(self, path: str) -> tuple:
        with self.lock:
            steps = self.plan.get(path.split("?")[0], [(200, {}, b"ok")])
            return steps.pop(0) if len(steps) > 1 else steps[0]


@pytest.fixture()
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep test output clean
            pass

        def do_GET(self):
            script.seen.append((self.path, self.headers.get("User-Agent"), time.monotonic()))
            status, headers, body = script.next(self.path)
            if status == "sleep":
                time.sleep(headers)
                status, headers = 200, {}
            self.send_response(status)
            declared = headers.pop("_declared_length", None)
            self.send_header("Content-Length", str(declared if declared is not None else len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass
            if declared is not None:
                self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield script
    httpd.shutdown()
    httpd.server_close()


def client(sleeps=None, **kw) -> HttpClient:
    kw.setdefault("rate", None)
    kw.setdefault("retry", RetryPolicy(retries=3, backoff=0.01, jitter=0.0))
    return HttpClient(sleep=(sleeps.append if sleeps is not None else time.sleep), **kw)


def test_user_agent_names_cmsrd_and_version(server):
    from cmsrd.sources.http import __version__

    r = client().get(server.url + "/a")
    assert r.content == b"ok"
    assert server.seen[0][1] == USER_AGENT
    assert f"cmsrd/{__version__}" in USER_AGENT


def test_429_retry_after_is_honoured(server):
    server.plan["/t"] = [(429, {"Retry-After": "7"}, b"slow down"), (200, {}, b"tile")]
    sleeps: list[float] = []
    c = client(sleeps)
    assert c.get(server.url + "/t").content == b"tile"
    assert sleeps == [7.0]  # the server's demand, not the (0.01 s) backoff
    assert c.stats["retries"] == 1


def test_retry_after_http_date_and_cap():
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


def test_retry_after_beyond_cap_fails_instead_of_stalling(server):
    server.plan["/t"] = [(429, {"Retry-After": "3600"}, b"")]
    c = client([], retry=RetryPolicy(retries=3, max_retry_after=60))
    with pytest.raises(HTTPFetchError, match="3600"):
        c.get(server.url + "/t")


def test_503_retried_with_exponential_backoff_then_gives_up(server):
    server.plan["/t"] = [(503, {}, b"busy")]
    sleeps: list[float] = []
    c = client(sleeps, retry=RetryPolicy(retries=3, backoff=0.5, jitter=0.0))
    with pytest.raises(HTTPFetchError) as ei:
        c.get(server.url + "/t")
    assert ei.value.status == 503 and ei.value.attempts == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_jitter_stays_within_bounds():
    p = RetryPolicy(backoff=1.0, jitter=0.5, max_backoff=4.0)
    ds = [p.delay(5) for _ in range(200)]
    assert all(4.0 <= d <= 6.0 for d in ds) and len(set(ds)) > 1


def test_404_is_not_retried(server):
    server.plan["/missing"] = [(404, {}, b"nope")]
    sleeps: list[float] = []
    with pytest.raises(HTTPFetchError) as ei:
        client(sleeps).get(server.url + "/missing")
    assert ei.value.status == 404 and sleeps == []


def test_truncated_body_is_retried(server):
    server.plan["/t"] = [(200, {"_declared_length": 100}, b"x" * 40), (200, {}, b"y" * 100)]
    c = client([])
    assert c.get(server.url + "/t").content == b"y" * 100
    assert c.stats["retries"] == 1


def test_corrupt_body_retried_via_validator_then_recorded(server):
    server.plan["/t"] = [(200, {}, b"garbage")]

    def must_be_png(resp):
        if not resp.content.startswith(b"\x89PNG"):
            raise CorruptBody("not a PNG")

    with pytest.raises(HTTPFetchError, match="corrupt body: not a PNG") as ei:
        client([]).get(server.url + "/t", validate=must_be_png)
    assert ei.value.attempts == 4


def test_timeout_is_retried(server):
    server.plan["/slow"] = [("sleep", 1.0, b"late"), (200, {}, b"fast")]
    c = client([], timeout=(1.0, 0.2))
    assert c.get(server.url + "/slow").content == b"fast"
    assert c.stats["retries"] == 1


def test_token_bucket_limits_rate():
    clock = [0.0]
    slept: list[float] = []

    def sleep(s):
        slept.append(s)
        clock[0] += s

    b = TokenBucket(rate=10, burst=2, clock=lambda: clock[0], sleep=sleep)
    for _ in range(12):
        b.acquire()
    # 2 free (burst), then 10 more at 10/s -> about 1 s of waiting
    assert sum(slept) == pytest.approx(1.0, rel=1e-6)


def test_rate_limit_applies_to_real_requests(server):
    c = client(rate=20, burst=1)
    t0 = time.monotonic()
    for _ in range(6):
        c.get(server.url + "/a")
    assert time.monotonic() - t0 >= 0.24  # 5 gaps of 50 ms


def test_map_bounded_concurrency_and_per_item_failures(server):
    server.plan["/bad"] = [(404, {}, b"")]
    c = client([], max_workers=3)
    active, peak, lock = [0], [0], threading.Lock()

    def fetch(path):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.02)
            return c.get(server.url + path).content
        finally:
            with lock:
                active[0] -= 1

    paths = ["/a"] * 8 + ["/bad"] + ["/a"] * 3
    out = c.map(fetch, paths)
    assert out[:8] == [b"ok"] * 8 and out[9:] == [b"ok"] * 3
    assert isinstance(out[8], HTTPFetchError) and out[8].status == 404
    assert peak[0] <= 3


def test_redaction_of_tokens_signatures_and_userinfo():
    url = (
        "https://user:hunter22@example.com/a.tif?st=2024&se=2025&sp=rl&sig=AbCdEf%2Bsecret&X-Amz-Signature=deadbeef&x=1"
    )
    red = redact(url)
    for secret in ("hunter22", "AbCdEf%2Bsecret", "deadbeef"):
        assert secret not in red
    assert "x=1" in red and "example.com/a.tif" in red
    assert "tok123456" not in redact('{"access_token": "tok123456", "expires_in": 3600}')
    assert "abcdef123" not in redact("Authorization: Bearer abcdef123")
    assert "my-literal-secret" not in redact("boom my-literal-secret boom", secrets=["my-literal-secret"])


def test_signed_urls_never_reach_logs_or_errors(server, caplog):
    server.plan["/s.tif"] = [(503, {}, b"")]
    c = client([])
    c.add_secret("SECRETSAS")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HTTPFetchError) as ei:
        c.get(server.url + "/s.tif?sv=2021&sig=SECRETSAS&token=SECRETSAS")
    assert "SECRETSAS" not in str(ei.value)
    assert caplog.records and all("SECRETSAS" not in r.getMessage() for r in caplog.records)


def test_connection_refused_is_an_error_not_a_hang():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(HTTPFetchError, match="connection error"):
        client([], retry=RetryPolicy(retries=1, backoff=0.0)).get(f"http://127.0.0.1:{port}/x?sig=zzzz1234")


def test_one_client_hammered_from_many_threads(server):
    """A worker's threads share one client: every request succeeds, each thread on its own session (a
    shared requests.Session races in its cookie jar: "dictionary changed size during iteration")."""
    for i in range(8):
        server.plan[f"/c{i}"] = [(200, {"Set-Cookie": f"k{i}=v{i}; Path=/"}, f"body{i}".encode())]
    c = client(max_workers=8)
    sessions: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def hammer(i: int) -> None:
        start.wait()
        try:
            for n in range(40):
                assert c.get(f"{server.url}/c{(i + n) % 8}?n={n}").content == f"body{(i + n) % 8}".encode()
            sessions[i] = c.session
        except BaseException as e:  # noqa: BLE001 - reported below with the thread that raised it
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({id(s) for s in sessions.values()}) == 8
    assert c.stats["requests"] == 320 and c.stats["failures"] == 0
    assert all(ua.startswith("cmsrd/") for _, ua, _ in server.seen[-320:])  # headers reach every session
    c.close()
    assert c._sessions == []
