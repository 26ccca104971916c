"""Find and download the smallest Geofabrik OSM extract that covers an AOI, cached on disk.

Geofabrik publishes its extracts as a GeoJSON `index-v1.json` (one feature per region: `id`, `name`,
`parent`, `urls.pbf`, the region's real boundary as geometry) and an `.md5` file next to every PBF. We
pick, among the regions whose boundary *covers* the AOI box, the one with the smallest area (in
cos(latitude)-weighted square degrees, proportional to ground area at the region's latitude), so a city
AOI gets its state/country extract rather than the continent. Downloads go through the shared polite
client (`cmsrd.sources.http.HttpClient`: retries, backoff honouring Retry-After, rate limit, user agent);
a body whose md5 differs from the published one is retried like any corrupt body. Files are written
atomically to `<cache>/<id>-latest.osm.pbf` with a JSON sidecar (url, md5, size, time) and reused when
they still match the sidecar's md5.

The shared client reads a body into memory before validating it, so this suits sub-region extracts (tens
to hundreds of MB) — the ones an AOI normally needs — rather than whole continents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapely.geometry import box, shape
from shapely.geometry.base import BaseGeometry

from ..errors import InputError
from ..io import atomic_path, atomic_write_text
from .http import CorruptBody, HttpClient, HTTPFetchError

log = logging.getLogger(__name__)

DEFAULT_INDEX_URL = "https://download.geofabrik.de/index-v1.json"
INDEX_MAX_AGE_S = 24 * 3600  # Geofabrik rebuilds extracts daily


@dataclass(frozen=True)
class Extract:
    """One Geofabrik region: id, name, PBF url, parent id and boundary (EPSG:4326)."""

    id: str
    name: str
    pbf_url: str
    parent: str | None
    geometry: BaseGeometry

    @property
    def md5_url(self) -> str:
        return self.pbf_url + ".md5"

    @property
    def ground_area(self) -> float:
        """Area in square degrees weighted by cos(latitude) of the centroid (comparable across regions)."""
        return self.geometry.area * math.cos(math.radians(self.geometry.centroid.y))

    @property
    def filename(self) -> str:
        return self.id.replace("/", "_") + "-latest.osm.pbf"


def parse_index(doc: dict[str, Any], source: str = "index-v1.json") -> list[Extract]:
    """Extracts of a Geofabrik `index-v1.json` document (features without a PBF url are skipped)."""
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection" or not isinstance(doc.get("features"), list):
        raise InputError(
            f"Geofabrik index {source}",
            "is not a GeoJSON FeatureCollection",
            f"point index_url at Geofabrik's index-v1.json (default {DEFAULT_INDEX_URL})",
        )
    out = []
    for f in doc["features"]:
        props = f.get("properties") or {}
        url = (props.get("urls") or {}).get("pbf")
        if not url or not f.get("geometry") or not props.get("id"):
            continue
        out.append(
            Extract(
                str(props["id"]),
                str(props.get("name", props["id"])),
                str(url),
                props.get("parent"),
                shape(f["geometry"]),
            )
        )
    if not out:
        raise InputError(f"Geofabrik index {source}", "lists no region with a PBF url", "check the index URL")
    return out


def load_index(
    index_url: str = DEFAULT_INDEX_URL,
    client: HttpClient | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_age_s: float = INDEX_MAX_AGE_S,
) -> list[Extract]:
    """Fetch (or reuse a cached copy younger than `max_age_s` of) the index and parse it."""
    key = hashlib.sha1(index_url.encode()).hexdigest()[:12]  # one cached index per mirror
    cached = Path(cache_dir) / f"index-v1.{key}.json" if cache_dir else None
    if cached is not None and cached.is_file() and time.time() - cached.stat().st_mtime < max_age_s:
        try:
            return parse_index(json.loads(cached.read_text()), str(cached))
        except (ValueError, InputError):
            log.warning("cached Geofabrik index %s unreadable; fetching again", cached)

    def _is_json(resp):
        try:
            resp.json()
        except ValueError as exc:
            raise CorruptBody(f"index is not JSON: {exc}") from exc

    own = client is None
    client = client or HttpClient()
    try:
        resp = client.get(index_url, validate=_is_json)
    except HTTPFetchError as exc:
        raise InputError(
            f"Geofabrik index {client.redact(index_url)}",
            f"could not be fetched ({exc.problem})",
            "check the network or pass index_url of a reachable mirror",
        ) from exc
    finally:
        if own:
            client.close()
    extracts = parse_index(resp.json(), index_url)
    if cached is not None:
        atomic_write_text(cached, resp.text)
    return extracts


def find_extract(aoi_lonlat: tuple[float, float, float, float], extracts: list[Extract]) -> Extract:
    """Smallest region whose boundary covers the AOI box (west, south, east, north in degrees)."""
    w, s, e, n = (float(v) for v in aoi_lonlat)
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise InputError(
            f"AOI {tuple(aoi_lonlat)}",
            "is not (west, south, east, north) in degrees",
            "pass e.g. (24.93, 60.16, 24.96, 60.18)",
        )
    aoi = box(w, s, e, n)
    covering = [x for x in extracts if x.geometry.covers(aoi)]
    if not covering:
        raise InputError(
            f"AOI {tuple(aoi_lonlat)}",
            "is not covered by any single Geofabrik extract",
            "split the AOI, or use a larger extract (e.g. from planet.openstreetmap.org)",
        )
    return min(covering, key=lambda x: (x.ground_area, x.id))


def _md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _parse_md5(text: str, filename: str) -> str | None:
    """`<32 hex>  <name>` -> the hex digest, None if the line is not that."""
    parts = text.split()
    if len(parts) >= 1 and len(parts[0]) == 32 and all(c in "0123456789abcdef" for c in parts[0].lower()):
        if len(parts) == 1 or parts[1].lstrip("*").endswith(filename.split("/")[-1]):
            return parts[0].lower()
    return None


def _published_md5(client: HttpClient, extract: Extract) -> str | None:
    """The md5 Geofabrik publishes next to the PBF, or None when there is none (the check is skipped)."""
    name = extract.pbf_url.rsplit("/", 1)[-1]

    def _check(resp):
        if _parse_md5(resp.text, name) is None:
            raise CorruptBody(f"not an md5 line for {name}")

    try:
        return _parse_md5(client.get(extract.md5_url, validate=_check).text, name)
    except HTTPFetchError as exc:
        if exc.status == 404:
            log.warning("no published md5 for %s; download not verified", extract.pbf_url)
            return None
        raise


def download_extract(
    extract: Extract,
    cache_dir: str | os.PathLike,
    client: HttpClient | None = None,
    refresh: bool = False,
    verify_md5: bool = True,
) -> Path:
    """Download `extract`'s PBF into `cache_dir` (atomically, md5-checked); reuse a matching cached copy."""
    cache = Path(cache_dir)
    target = cache / extract.filename
    sidecar = target.with_name(target.name + ".json")
    if target.is_file() and sidecar.is_file() and not refresh:
        try:
            meta = json.loads(sidecar.read_text())
        except ValueError:
            meta = {}
        if meta.get("url") == extract.pbf_url and meta.get("md5") == _md5_of(target):
            log.info("using cached %s", target)
            return target
        log.warning("cached %s does not match its record; downloading again", target)

    own = client is None
    client = client or HttpClient()
    try:
        expected = _published_md5(client, extract) if verify_md5 else None

        def _check(resp):
            if expected is not None and hashlib.md5(resp.content).hexdigest() != expected:
                raise CorruptBody(f"md5 differs from {extract.md5_url}")

        resp = client.get(extract.pbf_url, validate=_check)
    except HTTPFetchError as exc:
        raise InputError(
            f"Geofabrik extract {extract.id}",
            f"download failed: {exc}",
            "retry later, or download the file by hand into " + str(target),
        ) from exc
    finally:
        if own:
            client.close()
    body = resp.content
    with atomic_path(target) as tmp:
        tmp.write_bytes(body)
    md5 = hashlib.md5(body).hexdigest()
    atomic_write_text(
        sidecar,
        json.dumps(
            {
                "id": extract.id,
                "name": extract.name,
                "url": extract.pbf_url,
                "md5": md5,
                "bytes": len(body),
                "md5_verified": expected is not None,
                "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        + "\n",
    )
    log.info(
        "downloaded %s (%d bytes, md5 %s)", extract.pbf_url, len(body), "verified" if expected else "not published"
    )
    return target


def extract_for_aoi(
    aoi_lonlat: tuple[float, float, float, float],
    cache_dir: str | os.PathLike,
    index_url: str = DEFAULT_INDEX_URL,
    client: HttpClient | None = None,
    refresh: bool = False,
) -> tuple[Extract, Path]:
    """Index -> smallest covering extract -> cached download; returns the extract and the local PBF path."""
    extracts = load_index(index_url, client=client, cache_dir=cache_dir)
    ext = find_extract(aoi_lonlat, extracts)
    return ext, download_extract(ext, cache_dir, client=client, refresh=refresh)
