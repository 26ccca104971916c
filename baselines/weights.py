"""Offline weight cache: the manifest of every file the metrics and methods load, where it lives, its hash.

Metric libraries (torchvision, lpips, pyiqa, CLIP, torch-fidelity) download on first use into
`torch.hub.get_dir()` ($TORCH_HOME/hub). Compute nodes often have no network, so the toolkit describes
those files once (`manifests/weights.yaml`), checks them (`status`, `resolve`) and fetches them with hash
checks on a machine that has network (`fetch`). Code that needs a file calls `resolve(key)`, which fails
with one `MissingWeightsError` naming the file, the expected path and the URL.

Hash rule: entries with `sha256` are checked in full; entries with only `sha256_prefix` (the torch.hub
file-name convention: `name-<first 8 hex of sha256>.pth`) are checked on that prefix; entries with
neither are reported present but unverified. Hashes of large files are cached per (path, size, mtime)
in `<hub>/.cmsrd-sha256.json`, so `verify` is cheap after the first run.

`CMSRD_WEIGHTS_MANIFEST` points at another manifest (tests use one describing their own small files).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cmsrd.errors import InputError, MissingWeightsError
from cmsrd.io import atomic_write_text

MANIFEST_PATH = Path(__file__).resolve().parents[1] / "manifests" / "weights.yaml"
MANIFEST_ENV = "CMSRD_WEIGHTS_MANIFEST"
HASH_CACHE_NAME = ".cmsrd-sha256.json"

Status = Literal["present", "missing", "corrupt"]


@dataclass(frozen=True)
class WeightEntry:
    """One weights file: where it comes from, where it is cached, how to check it, who uses it."""

    key: str
    file: str
    subdir: str
    url: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    size_mb: float | None = None
    library: str = ""
    used_by: tuple[str, ...] = ()
    licence: str = ""
    note: str = ""
    published: bool = True
    method: str | None = None
    scale: int | None = None
    bundled: str | None = None  # "package:relative/path" shipped inside an installed wheel
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verifiable(self) -> bool:
        return bool(self.sha256 or self.sha256_prefix)

    def expected_path(self, hub: Path | None = None) -> Path:
        return (hub or hub_dir()) / self.subdir / self.file

    def source(self) -> str:
        if self.url:
            return self.url
        return "not published for download" + (f"; {self.note}" if self.note else "")

    def origin(self) -> str:
        """Where the file comes from, as a clause that reads after a path: `from URL`, or why there is none."""
        if self.url:
            return f"from {self.url}"
        return "not downloadable" + (f": {' '.join(self.note.split())}" if self.note else "")

    def hash_matches(self, digest: str) -> bool:
        if self.sha256:
            return digest.lower() == self.sha256.lower()
        if self.sha256_prefix:
            return digest.lower().startswith(self.sha256_prefix.lower())
        return True


_KNOWN_FIELDS = {f for f in WeightEntry.__dataclass_fields__} - {"key", "extra"}


def hub_dir() -> Path:
    """`torch.hub.get_dir()`: $TORCH_HOME/hub (read at call time, so TORCH_HOME set later is honoured).

    Without torch imported, `torch.hub.set_dir` cannot have been called, so torch's documented default
    ($TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch; + /hub) is computed here instead of
    importing torch (seconds) for a path: `cmsrd-bench list` reports weight states without torch."""
    if "torch" in sys.modules:
        import torch.hub

        return Path(torch.hub.get_dir())
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(xdg, "torch")))) / "hub"


def manifest_path() -> Path:
    return Path(os.environ.get(MANIFEST_ENV) or MANIFEST_PATH)


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, WeightEntry]:
    """Parse a weights manifest (default: $CMSRD_WEIGHTS_MANIFEST or manifests/weights.yaml)."""
    path = Path(path) if path else manifest_path()
    if not path.exists():
        raise InputError(
            f"weights manifest {path}", "file not found", f"unset {MANIFEST_ENV} or point it at a weights YAML"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"weights manifest {path}", f"is not valid YAML ({e})") from e
    items = data.get("weights")
    if not isinstance(items, dict):
        raise InputError(f"weights manifest {path}", "needs a top-level `weights:` mapping of key -> entry")
    out: dict[str, WeightEntry] = {}
    for key, raw in items.items():
        if not isinstance(raw, dict) or "file" not in raw or "subdir" not in raw:
            raise InputError(f"weights manifest {path}, entry {key!r}", "needs at least `file` and `subdir`")
        known = {k: v for k, v in raw.items() if k in _KNOWN_FIELDS}
        known["used_by"] = tuple(known.get("used_by") or ())
        for h in ("sha256", "sha256_prefix"):
            if known.get(h) is not None:
                known[h] = str(known[h]).lower()
        out[str(key)] = WeightEntry(
            key=str(key), extra={k: v for k, v in raw.items() if k not in _KNOWN_FIELDS}, **known
        )
    return out


def _entry(key: str, manifest: dict[str, WeightEntry] | None) -> WeightEntry:
    manifest = manifest if manifest is not None else load_manifest()
    if key not in manifest:
        raise InputError(
            f"weights key {key!r}",
            "not in the weights manifest",
            f"choose from {sorted(manifest)} (`cmsrd-bench weights list`)",
        )
    return manifest[key]


def bundled_path(entry: WeightEntry) -> Path | None:
    """Path of a copy shipped inside an installed package (e.g. lpips' linear heads), if any."""
    if not entry.bundled:
        return None
    package, _, rel = entry.bundled.partition(":")
    try:
        import importlib.util

        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.exists() else None


# ---- hashing with a per-file cache -----------------------------------------------------------------

_hash_lock = threading.Lock()
_mem_cache: dict[tuple[str, int, int], str] = {}


def _hash_cache_file() -> Path:
    return hub_dir() / HASH_CACHE_NAME


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, cached per (path, size, mtime_ns) in memory and in `<hub>/.cmsrd-sha256.json`."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _mem_cache:
            return _mem_cache[key]
        disk: dict[str, Any] = {}
        cache_file = _hash_cache_file()
        try:
            disk = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            disk = {}
        rec = disk.get(str(path))
        if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
            _mem_cache[key] = rec["sha256"]
            return rec["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    with _hash_lock:
        _mem_cache[key] = digest
        try:
            try:
                disk = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                disk = {}
            disk[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            atomic_write_text(cache_file, json.dumps(disk, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only cache is still usable; the hash is just recomputed next time
    return digest


# ---- status / resolve ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """Result of checking one entry: status, the path looked at, and whether a hash was compared."""

    key: str
    status: Status
    path: Path
    verified: bool
    sha256: str | None
    detail: str = ""


def check(key: str, manifest: dict[str, WeightEntry] | None = None) -> Check:
    entry = _entry(key, manifest)
    path = entry.expected_path()
    if not path.exists():
        alt = bundled_path(entry)
        if alt is None:
            return Check(key, "missing", path, False, None, f"expected at {path}")
        path = alt
    digest = file_sha256(path)
    if not entry.hash_matches(digest):
        want = entry.sha256 or f"{entry.sha256_prefix}..."
        return Check(key, "corrupt", path, True, digest, f"sha256 {digest[:16]}... does not match {want}")
    return Check(
        key, "present", path, entry.verifiable, digest, "" if entry.verifiable else "hash unknown, not verified"
    )


def status(key: str, manifest: dict[str, WeightEntry] | None = None) -> Status:
    """present | missing | corrupt for one manifest key (sha256 compared, cached per file mtime/size)."""
    return check(key, manifest).status


def resolve(key: str, manifest: dict[str, WeightEntry] | None = None, verify: bool = True) -> Path:
    """Path of a cached weights file; `MissingWeightsError` (file, expected path, URL) when absent.

    With `verify`, a file whose hash does not match raises `InputError` saying to re-fetch it.
    """
    entry = _entry(key, manifest)
    if not verify:
        path = entry.expected_path()
        if path.exists():
            return path
        alt = bundled_path(entry)
        if alt is not None:
            return alt
        raise _missing(entry, path)
    res = check(key, manifest)
    if res.status == "missing":
        raise _missing(entry, entry.expected_path())
    if res.status == "corrupt":
        raise InputError(
            f"weights '{entry.file}' at {res.path}",
            res.detail,
            f"delete it and run `cmsrd-bench weights fetch {key}` (or copy a good file from {entry.source()})",
        )
    return res.path


def keys_for(user: str, manifest: dict[str, WeightEntry] | None = None) -> list[str]:
    """Manifest keys used by `user` ("metric:lpips", "method:esrgan")."""
    manifest = manifest if manifest is not None else load_manifest()
    return [k for k, e in manifest.items() if user in e.used_by]


def _missing(entry: WeightEntry, path: Path) -> MissingWeightsError:
    """`weights fetch` is suggested only for files that have a download URL."""
    if entry.url:
        return MissingWeightsError(entry.file, str(path), entry.url)
    return MissingWeightsError(entry.file, str(path), why_none=entry.origin())


def method_weights_key(method: str, scale: int, manifest: dict[str, WeightEntry] | None = None) -> str | None:
    """The manifest entry holding a method's weights for a scale (entries with `method` and `scale`)."""
    manifest = manifest if manifest is not None else load_manifest()
    for k, e in manifest.items():
        if e.method == method and e.scale == scale:
            return k
    return None


def missing_report(keys: Iterable[str], manifest: dict[str, WeightEntry] | None = None) -> list[Check]:
    """Checks of `keys` that are not present (missing or corrupt)."""
    manifest = manifest if manifest is not None else load_manifest()
    return [c for c in (check(k, manifest) for k in dict.fromkeys(keys)) if c.status != "present"]


# ---- fetch -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    key: str
    outcome: str  # fetched | already-present | not-downloadable | failed
    path: Path
    detail: str = ""


def _client(timeout: float, retries: int):
    """The toolkit's one HTTP client (`cmsrd.sources.http.HttpClient`): retries with backoff that honour
    Retry-After, truncated-body detection, credential redaction. No request throttle: a fetch is a few
    large files, not thousands of tiles."""
    from cmsrd.sources.http import HttpClient, RetryPolicy

    return HttpClient(timeout=timeout, retry=RetryPolicy(retries=retries, backoff=0.5), rate=None, max_workers=1)


def _download(client, url: str, dest: Path, entry: WeightEntry, progress: bool) -> str:
    """Stream `url` into `dest` atomically through `client`; raise ValueError on a hash mismatch (the
    partial file is removed, nothing appears under the final name)."""
    from tqdm import tqdm

    digest = ""

    def verify(tmp: Path) -> None:
        nonlocal digest
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        digest = h.hexdigest()
        if not entry.hash_matches(digest):
            raise ValueError(f"sha256 {digest[:16]}... does not match {entry.sha256 or entry.sha256_prefix + '...'}")

    with tqdm(unit="B", unit_scale=True, desc=entry.file, disable=not progress, leave=False) as bar:

        def on_progress(done: int, total: int | None) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        client.download(url, dest, verify=verify, on_progress=on_progress)
    return digest


def fetch(
    keys: Iterable[str],
    base_url_override: str | None = None,
    manifest: dict[str, WeightEntry] | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    force: bool = False,
    progress: bool = True,
    on_result: Callable[[FetchResult], None] | None = None,
    client: Any = None,
) -> list[FetchResult]:
    """Download manifest entries into the cache with hash checks; one failure never stops the others.

    `base_url_override` replaces every URL by `<base>/<file>` (a mirror holding the files by name).
    Files already present with a good hash are not downloaded again unless `force`. Downloads go through
    `client` (a `cmsrd.sources.http.HttpClient`; default: one with `timeout` and `retries`); URLs in
    the recorded details are redacted.
    """
    from cmsrd.sources.http import redact

    manifest = manifest if manifest is not None else load_manifest()
    entries = [_entry(k, manifest) for k in dict.fromkeys(keys)]
    client = client if client is not None else _client(timeout, retries)
    results = []
    for entry in entries:
        dest = entry.expected_path()
        if not force and dest.exists() and check(entry.key, manifest).status == "present":
            res = FetchResult(entry.key, "already-present", dest)
        elif not base_url_override and not entry.url:
            res = FetchResult(entry.key, "not-downloadable", dest, entry.source())
        else:
            url = f"{base_url_override.rstrip('/')}/{entry.file}" if base_url_override else entry.url
            try:
                _download(client, url, dest, entry, progress)
                res = FetchResult(entry.key, "fetched", dest, redact(url))
            except Exception as e:  # network errors, HTTP errors, hash mismatch: recorded per file
                res = FetchResult(entry.key, "failed", dest, redact(f"{url}: {type(e).__name__}: {e}"))
        results.append(res)
        if on_result:
            on_result(res)
    return results
