"""Weights manifest and offline cache: resolve/status/verify, hash rules, fetch against a loopback server
(good files, a mirror override, a corrupt payload, 503 then success, 404)."""

from __future__ import annotations

import hashlib
import http.server
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from baselines import weights as w
from cmsrd.errors import InputError, MissingWeightsError


def _manifest(tmp_path: Path, entries: dict) -> Path:
    p = tmp_path / "weights.yaml"
    p.write_text(yaml.safe_dump({"weights": entries}))
    return p


class _Server:
    """Loopback HTTP server with per-path payloads and scripted failures."""

    def __init__(self, files: dict[str, bytes], fail_first: dict[str, int] | None = None):
        self.files, self.fail_first, self.hits = files, dict(fail_first or {}), []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append(self.path)
                if outer.fail_first.get(self.path, 0) > 0:
                    outer.fail_first[self.path] -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_shipped_manifest_covers_metrics_and_methods():
    m = w.load_manifest(w.MANIFEST_PATH)
    files = {e.file for e in m.values()}
    for f in (
        "alexnet-owt-7be5be79.pth",
        "vgg16-397923af.pth",
        "vgg19-dcbb9e9d.pth",
        "LPIPS_v0.1_alex-df73285e.pth",
        "DISTS_weights-f5e65c96.pth",
        "musiq_koniq_ckpt-e95806b9.pth",
        "RN50.pt",
        "pt_inception-2015-12-05-6726825d.pth",
        "weights-inception-2015-12-05-6726825d.pth",
    ):
        assert f in files
    # torch.hub file-name convention: the -xxxxxxxx suffix is the sha256 prefix that gets checked
    assert m["tv_alexnet"].sha256_prefix == "7be5be79" and m["tv_alexnet"].subdir == "checkpoints"
    assert m["clip_rn50"].sha256 and m["clip_rn50"].sha256 in m["clip_rn50"].url
    assert (
        m["fidelity_inception"].subdir == "checkpoints"
        and m["dists"].subdir == "pyiqa"
        and m["clip_rn50"].subdir == "clip"
    )
    for k in ("esrgan_x16", "esrgan_x32", "swinir_x16", "swinir_x32"):
        assert m[k].url is None and "not published" in m[k].note.lower()
    assert w.method_weights_key("esrgan", 32, m) == "esrgan_x32"
    # LPIPS heads ship inside the lpips wheel; the recorded full sha256 matches that bundled copy
    assert w.status("lpips_alex_v0.1", m) == "present"


def test_resolve_status_respect_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    data = b"weights-bytes"
    digest = hashlib.sha256(data).hexdigest()
    m = w.load_manifest(
        _manifest(
            tmp_path,
            {
                "full": {"file": "a.pth", "subdir": "checkpoints", "sha256": digest, "url": "http://127.0.0.1:9/a.pth"},
                "prefix": {"file": f"b-{digest[:8]}.pth", "subdir": "pyiqa", "sha256_prefix": digest[:8]},
                "nohash": {"file": "c.ckpt", "subdir": "cmsrd"},
            },
        )
    )
    with pytest.raises(MissingWeightsError) as e:
        w.resolve("full", m)
    assert "a.pth" in str(e.value) and str(tmp_path / "th" / "hub" / "checkpoints" / "a.pth") in str(e.value)
    assert "http://127.0.0.1:9/a.pth" in str(e.value)
    for k in m:
        assert w.status(k, m) == "missing"
        p = m[k].expected_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        assert w.status(k, m) == "present" and w.resolve(k, m) == p
    assert w.check("nohash", m).verified is False and w.check("full", m).verified is True
    # a changed file is re-hashed (cache keyed on size/mtime) and reported corrupt
    m["prefix"].expected_path().write_bytes(b"tampered!")
    assert w.status("prefix", m) == "corrupt"
    with pytest.raises(InputError, match="weights fetch prefix"):
        w.resolve("prefix", m)
    assert (tmp_path / "th" / "hub" / w.HASH_CACHE_NAME).exists()
    with pytest.raises(InputError, match="not in the weights manifest"):
        w.resolve("nope", m)


def test_fetch_from_loopback_server(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    good, other = b"A" * 5000, b"B" * 3000
    srv = _Server(
        {"/x/good.pth": good, "/mirror/flaky.pth": other, "/x/bad.pth": b"not the right bytes"},
        fail_first={"/mirror/flaky.pth": 2},
    )
    try:
        sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
        mpath = _manifest(
            tmp_path,
            {
                "good": {
                    "file": "good.pth",
                    "subdir": "checkpoints",
                    "sha256": sha(good),
                    "url": f"{srv.url}/x/good.pth",
                },
                "flaky": {
                    "file": "flaky.pth",
                    "subdir": "pyiqa",
                    "sha256_prefix": sha(other)[:8],
                    "url": f"{srv.url}/x/flaky.pth",
                },
                "bad": {"file": "bad.pth", "subdir": "pyiqa", "sha256": sha(good), "url": f"{srv.url}/x/bad.pth"},
                "gone": {"file": "gone.pth", "subdir": "pyiqa", "url": f"{srv.url}/x/gone.pth"},
                "unpublished": {"file": "u.safetensors", "subdir": "cmsrd", "url": None},
            },
        )
        m = w.load_manifest(mpath)
        old_umask = os.umask(0o022)
        try:
            res = {
                r.key: r for r in w.fetch(["good", "bad", "gone", "unpublished"], manifest=m, timeout=5, progress=False)
            }
        finally:
            os.umask(old_umask)
        assert res["good"].outcome == "fetched" and m["good"].expected_path().read_bytes() == good
        # a shared cache must be readable by others: the usual mode under the umask, not mkstemp's 0600
        assert stat.S_IMODE(m["good"].expected_path().stat().st_mode) == 0o644
        assert res["bad"].outcome == "failed" and "does not match" in res["bad"].detail
        assert not m["bad"].expected_path().exists()  # nothing half-written under the final name
        assert not list(m["bad"].expected_path().parent.glob("*.part"))
        assert res["gone"].outcome == "failed" and "404" in res["gone"].detail
        assert res["unpublished"].outcome == "not-downloadable"
        # mirror override + retries on 503
        r = w.fetch(["flaky"], base_url_override=f"{srv.url}/mirror", manifest=m, timeout=5, progress=False)[0]
        assert r.outcome == "fetched" and w.status("flaky", m) == "present"
        assert srv.hits.count("/mirror/flaky.pth") == 3
        # already present -> not downloaded again
        n = len(srv.hits)
        assert w.fetch(["good"], manifest=m, progress=False)[0].outcome == "already-present" and len(srv.hits) == n

        # the CLI: verify reports per user, fetch exits non-zero on failure
        from benchmark.cli import cli

        monkeypatch.setenv(w.MANIFEST_ENV, str(mpath))
        out = CliRunner().invoke(cli, ["weights", "verify"])
        assert "present" in out.output and "missing  bad.pth" in out.output and "put it at" in out.output
        out = CliRunner().invoke(cli, ["weights", "fetch", "gone"])
        assert out.exit_code == 1 and "failed" in out.output
        out = CliRunner().invoke(cli, ["weights", "list"])
        assert out.exit_code == 0 and "good.pth" in out.output and "not downloadable" in out.output
    finally:
        srv.close()


def test_verify_cli_on_shipped_manifest_names_paths(tmp_path, monkeypatch):
    from benchmark.cli import cli

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv(w.MANIFEST_ENV, raising=False)
    out = CliRunner().invoke(cli, ["weights", "verify"])
    assert out.exit_code == 1  # metric weights are absent in a fresh cache
    assert "metric:lpips: NOT ready" in out.output
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in out.output
    assert "method:esrgan" in out.output


class _ScriptedServer(_Server):
    """`_Server` whose paths first play scripted faults: ("429", retry_after_s) or ("short", n_bytes)."""

    def __init__(self, files: dict[str, bytes], script: dict[str, list[tuple[str, int]]]):
        super().__init__(files)
        self.script, self.times = script, []
        outer = self
        handler = self.httpd.RequestHandlerClass
        plain_get = handler.do_GET

        def do_get(h):  # noqa: N802
            path = h.path.split("?")[0]
            outer.times.append(time.monotonic())
            steps = outer.script.get(path) or []
            if not steps:
                h.path = path
                return plain_get(h)
            kind, arg = steps.pop(0)
            outer.hits.append(path)
            if kind == "429":
                h.send_response(429)
                h.send_header("Retry-After", str(arg))
                h.send_header("Content-Length", "0")
                h.end_headers()
            elif kind == "short":  # declares the whole file, sends `arg` bytes, closes: a truncated download
                body = outer.files[path]
                h.send_response(200)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body[:arg])
                h.wfile.flush()
                h.close_connection = True

        handler.do_GET = do_get


def test_fetch_uses_the_polite_client_retry_after_truncation_redaction(tmp_path, monkeypatch):
    """429 + Retry-After is waited out, a truncated body is retried from the start, secrets in URLs never
    reach the recorded details."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    body = bytes(range(256)) * 40
    sha = hashlib.sha256(body).hexdigest()
    srv = _ScriptedServer(
        {"/w/slow.pth": body, "/w/cut.pth": body},
        {"/w/slow.pth": [("429", 1)], "/w/cut.pth": [("short", 1000), ("short", 10)]},
    )
    try:
        m = w.load_manifest(
            _manifest(
                tmp_path,
                {
                    "slow": {
                        "file": "slow.pth",
                        "subdir": "checkpoints",
                        "sha256": sha,
                        "url": f"{srv.url}/w/slow.pth",
                    },
                    "cut": {"file": "cut.pth", "subdir": "checkpoints", "sha256": sha, "url": f"{srv.url}/w/cut.pth"},
                    "secret": {
                        "file": "s.pth",
                        "subdir": "checkpoints",
                        "url": f"{srv.url}/w/missing.pth?sig=SeCrEtSiGnAtUrE",
                    },
                },
            )
        )
        res = {r.key: r for r in w.fetch(["slow", "cut", "secret"], manifest=m, timeout=5, progress=False)}
        assert res["slow"].outcome == "fetched" and m["slow"].expected_path().read_bytes() == body
        assert srv.times[1] - srv.times[0] >= 0.95  # waited for Retry-After: 1 (own backoff is < 0.8 s)
        assert res["cut"].outcome == "fetched" and m["cut"].expected_path().read_bytes() == body
        assert srv.hits.count("/w/cut.pth") == 3
        assert not list(m["cut"].expected_path().parent.glob("*.part"))
        assert res["secret"].outcome == "failed" and "404" in res["secret"].detail
        assert "SeCrEtSiGnAtUrE" not in res["secret"].detail and "REDACTED" in res["secret"].detail
    finally:
        srv.close()


def test_fetch_gives_up_on_a_retry_after_longer_than_allowed(tmp_path, monkeypatch):
    """A server demanding a wait beyond the client's cap fails that file at once instead of stalling."""
    from cmsrd.sources.http import HttpClient, RetryPolicy

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    srv = _ScriptedServer({"/w/a.pth": b"abc"}, {"/w/a.pth": [("429", 3600)]})
    slept: list[float] = []
    try:
        m = w.load_manifest(
            _manifest(tmp_path, {"a": {"file": "a.pth", "subdir": "checkpoints", "url": f"{srv.url}/w/a.pth"}})
        )
        client = HttpClient(rate=None, retry=RetryPolicy(retries=2, max_retry_after=60), sleep=slept.append)
        r = w.fetch(["a"], manifest=m, progress=False, client=client)[0]
        assert r.outcome == "failed" and "429" in r.detail and "3600" in r.detail and slept == []
        assert not m["a"].expected_path().exists()
    finally:
        srv.close()


def test_manifest_metric_users_equal_METRICS():
    """One source of truth: the manifest's `metric:` tags are exactly the weights METRICS declares."""
    from benchmark.metrics import METRICS

    m = w.load_manifest(w.MANIFEST_PATH)
    tagged = {u.split(":", 1)[1] for e in m.values() for u in e.used_by if u.startswith("metric:")}
    assert tagged == {n for n, metric in METRICS.items() if metric.weights}
    for n, metric in METRICS.items():
        assert set(w.keys_for(f"metric:{n}", m)) == set(metric.weights), n
    kinds = {u.split(":", 1)[0] for e in m.values() for u in e.used_by}
    assert kinds <= {"metric", "method", "crosscheck"}
    assert m["pyiqa_pt_inception"].used_by == ("crosscheck:pyiqa_fid",)


def _metric_files_present(tmp_path: Path, monkeypatch) -> tuple[Path, set[str]]:
    """Shipped manifest with stand-in bytes (full sha256 recorded) for every file a metric loads."""
    from benchmark.metrics import METRICS

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    data = yaml.safe_load(w.MANIFEST_PATH.read_text())
    keys = {k for metric in METRICS.values() for k in metric.weights}
    for k in keys:
        body = f"stand-in {k}".encode()
        entry = data["weights"][k]
        entry.pop("sha256_prefix", None)
        entry["sha256"] = hashlib.sha256(body).hexdigest()
        p = tmp_path / "th" / "hub" / entry["subdir"] / entry["file"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv(w.MANIFEST_ENV, str(path))
    return path, keys


def test_verify_passes_when_every_metric_file_is_present(tmp_path, monkeypatch):
    """Cross-check and method weights are reported but do not fail the offline preflight."""
    from benchmark.cli import cli

    _metric_files_present(tmp_path, monkeypatch)
    out = CliRunner().invoke(cli, ["weights", "verify"])
    assert out.exit_code == 0, out.output
    assert "metric:lpips: ready" in out.output and "metric:fid: ready" in out.output
    assert "NOT ready" not in "\n".join(ln for ln in out.output.splitlines() if ln.startswith("metric:"))
    assert "crosscheck:pyiqa_fid: NOT ready" in out.output and "method:esrgan: NOT ready" in out.output
    assert "metric:pyiqa_fid" not in out.output
    # one metric file gone -> exit 1 again
    (tmp_path / "th" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").unlink()
    out = CliRunner().invoke(cli, ["weights", "verify"])
    assert out.exit_code == 1 and "metric:fid: NOT ready" in out.output


def test_fetch_default_selects_exactly_the_metric_weights(tmp_path, monkeypatch):
    from benchmark.cli import cli

    _, keys = _metric_files_present(tmp_path, monkeypatch)
    out = CliRunner().invoke(cli, ["weights", "fetch"])  # everything present: nothing is downloaded
    assert out.exit_code == 0, out.output
    listed = {line.split()[1].rstrip(":") for line in out.output.splitlines() if line.strip()}
    assert listed == keys and "pyiqa_pt_inception" not in listed
    out = CliRunner().invoke(cli, ["weights", "fetch", "--metrics-only"])
    assert out.exit_code == 2 and "No such option" in out.output  # the dead flag is gone


def test_verify_and_fetch_fail_when_a_custom_manifest_lacks_a_metric_entry(tmp_path, monkeypatch):
    """A $CMSRD_WEIGHTS_MANIFEST without `fidelity_inception` cannot run fid/kid/patch_fid: the preflight says
    so (exit 1) instead of passing and leaving `cmsrd-bench run` to fail."""
    from benchmark.cli import cli

    path, _ = _metric_files_present(tmp_path, monkeypatch)
    data = yaml.safe_load(path.read_text())
    del data["weights"]["fidelity_inception"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = CliRunner().invoke(cli, ["weights", "verify"])
    assert out.exit_code == 1, out.output
    for n in ("fid", "kid", "patch_fid"):
        assert f"metric:{n}: NOT ready" in out.output
    gap = next(line for line in out.output.splitlines() if "fidelity_inception: not in the manifest" in line)
    assert str(path) in gap and "metric:lpips: ready" in out.output
    out = CliRunner().invoke(cli, ["weights", "fetch"])  # the other metric files are present: nothing downloaded
    assert out.exit_code == 1 and "failed           fidelity_inception: not in the manifest" in out.output
    text = gap.split(None, 1)[1]  # `verify` and `fetch` word the gap (and its fix) the same way
    assert f"failed           {text}" in out.output.splitlines()
    assert "present" in out.output
