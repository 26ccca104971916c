"""Real Sentinel-2 L2A LR for a footprint, from a STAC API (Earth Search v1 by default, Planetary Computer
as an option) and Cloud-Optimized GeoTIFFs.

Steps for one footprint (an XYZ tile):

1. search: the STAC API is queried once per area and date window (pystac-client, results cached in
   memory and optionally on disk), then each footprint picks the items that cover it;
2. rank: scenes by scene-wide `eo:cloud_cover`, then days from the HR capture date; the SCL layer is read
   inside the footprint for the best few and the first whose cloud/shadow/no-data fraction is at most
   `max_footprint_cloud` wins (otherwise SampleError lr_cloudy / lr_nodata);
3. read: only the footprint window of B04/B03/B02 (rasterio over /vsicurl/ or local paths, `WarpedVRT`
   onto the footprint in EPSG:3857 at ~10 m ground spacing, cubic; SCL nearest);
4. radiometry (`radiometry`): `boa`: DN -> BOA reflectance with the recipe the item calls for
   (`reflectance_recipe`), the DNs checked against that recipe (`cmsrd.qa.check_lr_radiometry`: a BOA offset
   applied twice or never is `lr_radiometry_implausible`, and the next scene is tried), then
   uint8 = clip(round(255 * GAIN * reflectance)), GAIN fixed and recorded; `tci`: the item's `visual` asset
   (ESA's 8-bit true colour, the official CMSRD LR's kind), read the same way, no offset involved;
5. LR: the native values resampled to lr_px x lr_px with MATLAB-compatible antialiased bicubic
   (`cmsrd.degrade.imresize`, Keys a=-0.5), the same kernel as the synthetic LR, then mapped to 8 bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, SampleError
from ..io import atomic_write_text
from ..qa import QARejected, check_lr_radiometry
from .base import WEB_MERCATOR, HRResult, LRResult, check_tile, tile_bounds_3857, tile_bounds_lonlat
from .http import USER_AGENT, HttpClient, HTTPFetchError, RetryPolicy, install_log_redaction, redact

if TYPE_CHECKING:
    from ..config import DatasetConfig

log = logging.getLogger(__name__)

EARTH_SEARCH_V1 = "https://earth-search.aws.element84.com/v1"
PLANETARY_COMPUTER = "https://planetarycomputer.microsoft.com/api/stac/v1"
PC_SAS_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"

GAIN = 2.5  # uint8 = 255 * GAIN * reflectance: reflectance 0..0.4 spans 0..255 (Sentinel Hub true colour)
# ESA's L2A TCI (the `visual` asset): B04/B03/B02 BOA reflectance 0..0.2 coded 1..255 (0 = no data), i.e.
# 255 * 5 * reflectance; the official CMSRD LR are TCI chips (of L1C, where 255 is reflectance 0.3558)
TCI_GAIN = 5.0
TCI_TEXT = (
    "TCI: the item's `visual` asset (ESA's 8-bit true colour, B04/B03/B02 BOA reflectance 0..0.2 -> 1..255, "
    "0 = no data), warped cubic onto the footprint and resized in 8-bit units"
)
NATIVE_GSD_M = 10.0
# SCL classes that make a pixel unusable: no data, saturated/defective, cloud shadow, cloud medium and
# high probability, thin cirrus (ESA L2A product definition).
SCL_BAD = (0, 1, 3, 8, 9, 10)

# Asset keys per catalog family: Earth Search uses common names, Planetary Computer band names.
ASSET_KEYS = {
    "earth-search": {"red": "red", "green": "green", "blue": "blue", "scl": "scl", "visual": "visual"},
    "planetary-computer": {"red": "B04", "green": "B03", "blue": "B02", "scl": "SCL", "visual": "visual"},
}
GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing round trips on /vsicurl/
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_USERAGENT": USER_AGENT,
    "VSI_CACHE": "TRUE",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
}


# ----------------------------------------------------------------------------------------------------
# Radiometry


@dataclass(frozen=True)
class Recipe:
    """DN -> reflectance as `DN * scale + offset` with a human-readable statement of why."""

    scale: float
    offset: float
    why: str

    def apply(self, dn: np.ndarray, nodata: int | None = 0) -> np.ndarray:
        refl = dn.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
        if nodata is not None:
            refl[dn == nodata] = np.nan
        return refl

    def text(self, gain: float = GAIN) -> str:
        off = f" - {abs(self.offset):g}" if self.offset < 0 else (f" + {self.offset:g}" if self.offset else "")
        return (
            f"reflectance = DN * {self.scale:g}{off} ({self.why}); DN 0 = no data; "
            f"uint8 = clip(round(255 * {gain:g} * reflectance), 0, 255)"
        )


def _baseline_tuple(baseline: str | None) -> tuple[int, int] | None:
    m = re.match(r"^\s*(\d+)\.(\d+)", str(baseline or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def reflectance_recipe(
    properties: dict[str, Any],
    collection: str | None,
    catalog: str = "earth-search",
    asset: dict[str, Any] | None = None,
) -> Recipe:
    """The DN -> BOA reflectance recipe of one L2A item.

    From processing baseline 04.00 (Jan 2022) ESA adds BOA_ADD_OFFSET = -1000 to the DNs, so
    reflectance = DN/10000 - 0.1; before it there is no offset. Earth Search `sentinel-2-l2a` shifted the
    DNs of such products at ingest (`earthsearch:boa_offset_applied: true`) although the asset's
    `raster:bands` still says offset -0.1, so the offset must not be applied twice. `sentinel-2-c1-l2a`
    (Collection 1) and Planetary Computer keep ESA's DNs.
    """
    baseline = properties.get("s2:processing_baseline")
    bt = _baseline_tuple(baseline)
    scale = 1e-4
    if asset is not None:
        bands = asset.get("raster:bands") or [{}]
        scale = float(bands[0].get("scale", scale) or scale)
    coll = (collection or "").lower()
    if bt is None:
        raise SampleError(
            "lr_unknown_baseline", f"item has no usable s2:processing_baseline ({baseline!r}); cannot choose the offset"
        )
    if bt < (4, 0):
        return Recipe(scale, 0.0, f"baseline {baseline} < 04.00: no BOA offset")
    if catalog == "earth-search" and coll == "sentinel-2-l2a" and properties.get("earthsearch:boa_offset_applied"):
        return Recipe(
            scale,
            0.0,
            f"Earth Search {coll}, baseline {baseline}: BOA offset already applied "
            "at ingest (earthsearch:boa_offset_applied=true)",
        )
    return Recipe(scale, -0.1, f"{catalog} {coll or 'L2A'}, baseline {baseline} >= 04.00: BOA_ADD_OFFSET -1000")


def to_uint8(refl: np.ndarray, gain: float = GAIN) -> np.ndarray:
    """Reflectance -> uint8 with the fixed gain; NaN (no data) -> 0."""
    v = np.nan_to_num(refl, nan=0.0) * (255.0 * gain)
    return np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Planetary Computer signing


class SasSigner:
    """Appends a Planetary Computer SAS token (from `{sas_url}/{collection}`) to asset hrefs.

    Tokens are cached per collection until shortly before `msft:expiry`; they are registered with the
    HTTP client as secrets so they never reach a log or an error message.
    """

    def __init__(self, client: HttpClient, sas_url: str = PC_SAS_URL, margin_s: float = 300.0):
        self.client, self.sas_url, self.margin_s = client, sas_url.rstrip("/"), margin_s
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def token(self, collection: str) -> str:
        with self._lock:
            tok = self._tokens.get(collection)
            if tok and tok[1] - self.margin_s > time.time():
                return tok[0]
        try:
            resp = self.client.get(f"{self.sas_url}/{collection}")
            doc = resp.json()
            token = str(doc["token"])
        except (HTTPFetchError, ValueError, KeyError, TypeError) as e:
            raise SampleError("lr_signing_failed", f"SAS token for {collection}: {redact(e)}") from None
        self.client.add_secret(token)
        for part in token.split("&"):  # the signature alone must not leak either
            if part.startswith("sig="):
                self.client.add_secret(part[4:])
        expiry = _parse_iso(doc.get("msft:expiry")) if doc.get("msft:expiry") else None
        exp_ts = expiry.timestamp() if expiry else time.time() + 45 * 60
        with self._lock:
            self._tokens[collection] = (token, exp_ts)
        return token

    def sign(self, href: str, collection: str) -> str:
        if not re.match(r"(?i)^https?://", href) or "sig=" in href:
            return href
        return href + ("&" if "?" in href else "?") + self.token(collection)


# ----------------------------------------------------------------------------------------------------
# Helpers


def _parse_iso(text: str) -> datetime:
    t = str(text).strip().replace("Z", "+00:00")
    dt = datetime.fromisoformat(t)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _parse_day(value: str | date | datetime, what: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        raise InputError(what, f"{value!r} is not a date", "use YYYY-MM-DD") from None


def _gdal_path(href: str) -> str:
    if re.match(r"(?i)^https?://", href):
        return "/vsicurl/" + href
    if href.startswith("file://"):
        return href[7:]
    if href.startswith("s3://"):
        return "/vsis3/" + href[5:]
    return href


REMOTE_PREFIXES = ("/vsicurl/", "/vsis3/")


def transient_gdal_error(message: str) -> bool:
    """Whether a GDAL read error may go away on retry: anything but a definite 4xx answer (a damaged or
    cut-off body reads as "not a TIFF" or a decode error, which a fresh request fixes)."""
    m = re.search(r"HTTP (?:response )?code:?\s*(\d{3})", message)
    if m is None:
        return True
    code = int(m.group(1))
    return code >= 500 or code in (408, 425, 429)


_CLEAR: list[Callable[[bytes], None] | None] = []


def _gdal_partial_clear_cache() -> Callable[[bytes], None] | None:
    """GDAL's `VSICurlPartialClearCache` from the libgdal rasterio loaded (rasterio does not wrap it);
    None where that library cannot be found (then `forget_remote` falls back to CPL_VSIL_CURL_NON_CACHED)."""
    if _CLEAR:
        return _CLEAR[0]
    import ctypes

    import rasterio._env  # noqa: F401 - loads libgdal, so its path is in the process map

    fn = None
    cands: list[str] = []
    maps = Path("/proc/self/maps")
    if maps.exists():
        cands = sorted({ln.split()[-1] for ln in maps.read_text().splitlines() if "libgdal" in ln and "/" in ln})
    if not cands:
        import glob

        base = Path(rasterio._env.__file__).parent
        cands = sorted(glob.glob(str(base.parent / "rasterio*libs" / "libgdal*")))
        cands += sorted(glob.glob(str(base / ".dylibs" / "libgdal*")))
    for c in cands:
        try:
            lib = ctypes.CDLL(c)  # the already loaded library: dlopen hands back the same instance
            fn = lib.VSICurlPartialClearCache
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_char_p], None
        break
    _CLEAR.append(fn)
    return fn


def forget_remote(path: str) -> bool:
    """Drop what GDAL cached of one /vsicurl/ URL (data blocks, size, existence) so the next open asks
    the server again. False when the clear function is unavailable (see `_gdal_partial_clear_cache`)."""
    fn = _gdal_partial_clear_cache()
    if fn is None:
        return False
    fn(path.encode())
    return True


def expected_grid(item: dict, asset: dict) -> dict[str, Any] | None:
    """The pixel grid the STAC item promises for one asset (proj extension: per-asset shape/transform as
    Earth Search v1 and Planetary Computer give them, EPSG from the asset or the item); None without one."""
    props = item.get("properties") or {}
    grid: dict[str, Any] = {}
    shape = asset.get("proj:shape") or props.get("proj:shape")
    transform = asset.get("proj:transform") or props.get("proj:transform")
    epsg = asset.get("proj:epsg") or props.get("proj:epsg")
    code = asset.get("proj:code") or props.get("proj:code")
    if epsg is None and isinstance(code, str) and code.upper().startswith("EPSG:"):
        epsg = code[5:]
    if shape and len(shape) == 2:
        grid["shape"] = (int(shape[0]), int(shape[1]))
    if transform and len(transform) >= 6:
        grid["transform"] = tuple(float(v) for v in transform[:6])
    if epsg is not None and str(epsg).isdigit():
        grid["epsg"] = int(epsg)
    return grid or None


def grid_mismatch(src: Any, grid: dict[str, Any] | None) -> str:
    """What of an opened raster's grid differs from `grid` ("" when nothing, or nothing to check)."""
    if not grid:
        return ""
    wrong = []
    if "shape" in grid and (src.height, src.width) != grid["shape"]:
        wrong.append(f"shape {(src.height, src.width)} vs {grid['shape']}")
    if "transform" in grid:
        t = src.transform
        got = (t.a, t.b, t.c, t.d, t.e, t.f)
        if not np.allclose(got, grid["transform"], rtol=1e-9, atol=1e-6):
            wrong.append(f"transform {got} vs {grid['transform']}")
    if "epsg" in grid and (src.crs is None or src.crs.to_epsg() != grid["epsg"]):
        wrong.append(f"CRS {src.crs} vs EPSG:{grid['epsg']}")
    return "; ".join(wrong)


def native_size(z: int, x: int, y: int, gsd_m: float = NATIVE_GSD_M) -> int:
    """Pixels across the footprint at `gsd_m` ground spacing (Mercator scale corrected at its centre)."""
    left, bottom, right, top = tile_bounds_3857(z, x, y)
    lat = math.degrees(math.atan(math.sinh((bottom + top) / 2.0 / 6378137.0)))
    return max(2, int(round((right - left) * math.cos(math.radians(lat)) / gsd_m)))


def _item_dict(item: Any) -> dict[str, Any]:
    return item.to_dict(transform_hrefs=False) if hasattr(item, "to_dict") else dict(item)


class _OpenRasters:
    """COG handles kept open per thread (rasterio datasets are not thread-safe), checked once against the
    STAC grid when opened. Every footprint of a scene reads the same four assets: re-opening them per read
    cost ~2 ms each with the GIL held (header parse, grid check), a third of a real build's LR time. A
    handle whose read failed is dropped (`drop`), so a retry opens afresh; a source object (one build) owns
    its handles, so a later build never sees them."""

    MAX_PER_THREAD = 32

    def __init__(self) -> None:
        self._local = threading.local()

    def _cache(self) -> dict[str, Any]:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = {}
        return cache

    def open(self, path: str, grid: dict[str, Any] | None) -> Any:
        """The open dataset of `path` (call inside the read's `rasterio.Env`)."""
        import rasterio

        cache = self._cache()
        key = (path, repr(grid))
        src = cache.pop(key, None)
        if src is None or src.closed:
            src = rasterio.open(path)
            wrong = grid_mismatch(src, grid)
            if wrong:
                src.close()
                raise rasterio.errors.RasterioIOError(f"header differs from the STAC item's grid (damaged?): {wrong}")
            while len(cache) >= self.MAX_PER_THREAD:
                cache.pop(next(iter(cache))).close()
        cache[key] = src  # most recently used last
        return src

    def drop(self, path: str) -> None:
        cache = self._cache()
        for key in [k for k in cache if k[0] == path]:
            cache.pop(key).close()


# ----------------------------------------------------------------------------------------------------
# The source


class Sentinel2STAC:
    """Sentinel-2 L2A LR from a STAC API + COGs. See the module docstring for the method.

    `url`: STAC API root (Earth Search v1 by default; `PLANETARY_COMPUTER` switches asset keys and URL
    signing on). `collection`: `sentinel-2-l2a` or `sentinel-2-c1-l2a`. `window_days`: +- days around the
    HR date searched. `max_cloud`: scene `eo:cloud_cover` ceiling (percent) sent with the search.
    `max_footprint_cloud`: share of bad SCL pixels tolerated inside the footprint. `cache_dir`: search
    results on disk. `href_map`: rewrites asset hrefs before reading (e.g. to local copies or a mirror).
    `radiometry`: "boa" | "tci" (step 4). `qa`: the `QAConfig` of the DN check (None: defaults).
    `catalog`: "earth-search" | "planetary-computer" (guessed from the URL). `sas_url`: token endpoint
    for signing (Planetary Computer's by default when that catalog is used). `search_zoom`: without
    `items`, `fetch` searches the enclosing XYZ tile at this zoom (10: ~39 km), cached, so neighbouring
    footprints with the same HR date share one search.
    """

    def __init__(
        self,
        url: str = EARTH_SEARCH_V1,
        collection: str = "sentinel-2-l2a",
        window_days: int = 30,
        max_cloud: float = 60.0,
        cache_dir: str | os.PathLike | None = None,
        session: Any = None,
        *,
        params: dict[str, Any] | None = None,
        client: HttpClient | None = None,
        max_footprint_cloud: float = 0.05,
        max_candidates: int = 6,
        max_items: int = 500,
        gain: float = GAIN,
        catalog: str | None = None,
        sas_url: str | None = None,
        href_map: Callable[[str], str] | None = None,
        timeout: float | tuple[float, float] = (10.0, 60.0),
        retry: RetryPolicy | None = None,
        rate: float | None = 5.0,
        search_zoom: int = 10,
        radiometry: str = "boa",
        qa: Any = None,
    ):
        if not re.match(r"(?i)^https?://", str(url or "")):
            raise InputError(f"STAC URL {url!r}", "is not an http(s) URL", f"use e.g. {EARTH_SEARCH_V1}")
        if not 0 <= max_footprint_cloud <= 1:
            raise InputError("max_footprint_cloud", f"{max_footprint_cloud} is not in [0, 1]", "use e.g. 0.05")
        self.url = url.rstrip("/")
        self.collection = collection
        self.window_days = int(window_days)
        self.max_cloud = float(max_cloud)
        self.max_footprint_cloud = float(max_footprint_cloud)
        self.max_candidates = int(max_candidates)
        self.max_items = int(max_items)
        self.search_zoom = int(search_zoom)
        self.gain = float(gain)
        if radiometry not in ("tci", "boa"):
            raise InputError("lr.radiometry", f"unknown value {radiometry!r}", "use tci or boa")
        self.radiometry = radiometry
        from ..config import QAConfig

        self.qa = qa if qa is not None else QAConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.catalog = catalog or ("planetary-computer" if "planetarycomputer" in self.url.lower() else "earth-search")
        if self.catalog not in ASSET_KEYS:
            raise InputError(f"catalog {self.catalog!r}", "unknown", f"use one of {sorted(ASSET_KEYS)}")
        self.keys = ASSET_KEYS[self.catalog]
        self.sas_url = sas_url or (PC_SAS_URL if self.catalog == "planetary-computer" else None)
        self.href_map = href_map
        self.params = dict(params or {})
        self._client_kw = dict(timeout=timeout, retry=retry, rate=rate)
        self._session = session
        self._client = client
        self._searches: dict[str, list[dict]] = {}
        self._lock = threading.Lock()
        self._signer: SasSigner | None = None
        self._handles = _OpenRasters()

    @classmethod
    def from_config(cls, cfg: DatasetConfig, cache_dir: str | None = None) -> Sentinel2STAC:
        """The build's source: the QA thresholds drive scene selection, so the source tries the next-best
        scene before giving up."""
        from .registry import http_options

        return cls(
            cfg.lr.stac_url,
            cfg.lr.collection,
            window_days=int(cfg.qa.max_days_from_hr),
            max_cloud=cfg.lr.max_scene_cloud,
            max_footprint_cloud=cfg.qa.max_cloud_fraction,
            radiometry=cfg.lr.radiometry,
            qa=cfg.qa,
            **http_options(cfg),
        )

    @staticmethod
    def provenance(cfg: DatasetConfig) -> dict[str, Any]:
        """dataset.json `sources.lr` entries beyond the source name (shared by the Sentinel Hub backend)."""
        return {
            "attribution": cfg.lr.attribution,
            "terms": cfg.lr.terms,
            "backend": cfg.lr.backend,
            "catalogue": redact(cfg.lr.stac_url or ""),
            "collection": cfg.lr.collection,
            "radiometry": cfg.lr.radiometry,
        }

    def __getstate__(self) -> dict[str, Any]:
        s = self.__dict__.copy()
        s.update(_client=None, _session=None, _signer=None, _lock=None, _handles=None)
        return s

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._handles = _OpenRasters()

    @property
    def client(self) -> HttpClient:
        if self._client is None:
            self._client = HttpClient(session=self._session, **self._client_kw)
        return self._client

    @property
    def signer(self) -> SasSigner | None:
        if self.sas_url and self._signer is None:
            self._signer = SasSigner(self.client, self.sas_url)
        return self._signer

    def describe(self) -> dict[str, Any]:
        return {
            "type": "stac",
            "url": redact(self.url),
            "catalog": self.catalog,
            "collection": self.collection,
            "window_days": self.window_days,
            "max_cloud": self.max_cloud,
            "max_footprint_cloud": self.max_footprint_cloud,
            "gain": self.gain,
            "radiometry": self.radiometry,
            "attribution": "Contains modified Copernicus Sentinel data",
        }

    # -- search ---------------------------------------------------------------------------------
    def search_area(self, bbox_lonlat: Sequence[float], start: str | date, end: str | date) -> list[dict]:
        """All items of the collection over `bbox_lonlat` (w, s, e, n) between start and end (inclusive).

        One STAC search per distinct (bbox, dates); results are kept in memory (and under
        `cache_dir/stac/` when given) so every footprint of an area reuses them. Returns item dicts.
        """
        w, s, e, n = (float(v) for v in bbox_lonlat)
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            raise InputError(
                f"bbox {list(bbox_lonlat)}",
                "is not west < east, south < north in degrees",
                "give (west, south, east, north) in EPSG:4326",
            )
        d0, d1 = _parse_day(start, "search start"), _parse_day(end, "search end")
        if d1 < d0:
            raise InputError("search dates", f"end {d1} is before start {d0}", "swap them")
        body = {
            "bbox": [round(v, 6) for v in (w, s, e, n)],
            "datetime": f"{d0}T00:00:00Z/{d1}T23:59:59Z",
            "collections": [self.collection],
            "max_cloud": self.max_cloud,
            "url": self.url,
        }
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
        with self._lock:
            if key in self._searches:
                return self._searches[key]
        disk = self.cache_dir / "stac" / f"{key}.json" if self.cache_dir else None
        if disk is not None and disk.is_file():
            try:
                items = json.loads(disk.read_text())
                with self._lock:
                    self._searches[key] = items
                return items
            except ValueError:
                pass
        items = self._search(body["bbox"], body["datetime"])
        with self._lock:
            self._searches[key] = items
        if disk is not None:
            atomic_write_text(disk, json.dumps(items))
        return items

    @staticmethod
    def needs(cfg: DatasetConfig) -> list[str]:
        """What a build with this source reaches out to (printed before a real build starts)."""
        from urllib.parse import urlsplit

        return [urlsplit(cfg.lr.stac_url).netloc + " (STAC) + the scenes' COG hosts"]

    def search(self, bbox_lonlat: Sequence[float], start: str | date, end: str | date) -> list[dict]:
        """`LRSource` search step: the items of a block's area (`search_area`)."""
        return self.search_area(bbox_lonlat, start, end)

    def _stac_client(self) -> Any:
        from pystac_client import Client
        from pystac_client.stac_api_io import StacApiIO
        from urllib3.util.retry import Retry

        pol = self.client.retry  # the same policy as every other request of the toolkit
        retry = Retry(
            total=pol.retries,
            backoff_factor=pol.backoff,
            backoff_max=pol.max_backoff,
            backoff_jitter=pol.jitter,
            status_forcelist=tuple(sorted(pol.retry_statuses)),
            allowed_methods=None,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        io = StacApiIO(
            headers={"User-Agent": USER_AGENT},
            parameters=self.params or None,
            timeout=self.client.timeout,
            max_retries=retry,
        )
        return Client.open(self.url, stac_io=io)

    def _search(self, bbox: list[float], dt: str) -> list[dict]:
        """One area search, retried as a whole with backoff: urllib3 retries statuses, but a body cut off
        mid-page or damaged (invalid JSON) surfaces from pystac-client as an exception after the
        response, so the whole search (all pages) is repeated. An HTTP error status is final here: urllib3
        already spent the retry budget on it (or it is a definite 4xx)."""
        pol = self.client.retry
        attempts = pol.retries + 1
        for attempt in range(attempts):
            try:
                items = self._search_once(bbox, dt)
                break
            except Exception as e:  # noqa: BLE001 - requests/urllib3/pystac raise many types; all mean the same
                status = getattr(e, "status_code", None)
                final = attempt + 1 >= attempts or isinstance(status, int)
                if final:
                    what = "" if type(e).__name__ == "APIError" else f"{type(e).__name__}: "
                    raise SampleError(
                        "lr_search_failed",
                        f"{redact(self.url)}: {what}{redact(e)[:300]}"
                        + (f" (after {attempt + 1} attempts)" if attempt else ""),
                    ) from None
                wait = pol.delay(attempt)
                log.warning(
                    "retry %d/%d in %.2fs for STAC search %s: %s",
                    attempt + 1,
                    attempts - 1,
                    wait,
                    bbox,
                    redact(e)[:200],
                )
                time.sleep(wait)
        log.info("STAC search %s %s: %d item(s)", bbox, dt, len(items))
        return items

    def _search_once(self, bbox: list[float], dt: str) -> list[dict]:
        from pystac_client.conformance import ConformanceClasses

        client = self._stac_client()
        query = {"eo:cloud_cover": {"lte": self.max_cloud}} if client.conforms_to(ConformanceClasses.QUERY) else None
        search = client.search(
            collections=[self.collection],
            bbox=bbox,
            datetime=dt,
            query=query,
            max_items=self.max_items,
            limit=min(100, self.max_items),
        )
        items = [it.to_dict(transform_hrefs=False) for it in search.items()]
        # also filter here: a catalog without the query extension returns every cloud cover
        return [it for it in items if float(it["properties"].get("eo:cloud_cover", 0) or 0) <= self.max_cloud]

    # -- per footprint --------------------------------------------------------------------------
    def candidates(self, z: int, x: int, y: int, items: Iterable[Any], hr_date: str | None) -> list[dict]:
        """Items covering the footprint, ordered by scene cloud cover then days from the HR date."""
        from shapely.geometry import box, shape

        fp = box(*tile_bounds_lonlat(z, x, y))
        hr = _parse_day(hr_date, "HR date") if hr_date else None
        out = []
        for it in items:
            d = _item_dict(it)
            if d.get("collection") not in (None, self.collection):
                continue
            try:
                geom = shape(d["geometry"]) if d.get("geometry") else box(*d["bbox"])
            except Exception:  # noqa: BLE001 - a malformed item is skipped, not fatal
                continue
            if not geom.buffer(1e-9).covers(fp):
                continue
            when = _parse_iso(d["properties"]["datetime"])
            days = abs((when.date() - hr).days) if hr else None
            if hr is not None and days > self.window_days:
                continue
            cc = d["properties"].get("eo:cloud_cover")
            out.append((float(cc) if cc is not None else 100.0, days if days is not None else 0, d["id"], d))
        out.sort(key=lambda t: t[:3])
        return [t[3] for t in out]

    def fetch(
        self, z: int, x: int, y: int, lr_px: int = 16, hr_date: str | None = None, items: Iterable[Any] | None = None
    ) -> LRResult:
        """The real LR of footprint (z, x, y): best scene, reflectance, 8-bit lr_px x lr_px image."""
        check_tile(z, x, y)
        if not isinstance(lr_px, int) or lr_px < 1:
            raise InputError(f"lr_px {lr_px!r}", "must be a positive integer", "use e.g. 16")
        if items is None:
            if not hr_date:
                raise InputError(
                    "hr_date",
                    "is needed to search scenes when no items are given",
                    "pass hr_date='YYYY-MM-DD' or items from search_area()",
                )
            d = _parse_day(hr_date, "HR date")
            # Search the enclosing tile at `search_zoom` so neighbouring footprints share one search.
            zs = min(self.search_zoom, z)
            area = tile_bounds_lonlat(zs, x >> (z - zs), y >> (z - zs))
            items = self.search_area(area, d - timedelta(days=self.window_days), d + timedelta(days=self.window_days))
        cands = self.candidates(z, x, y, items, hr_date)
        if not cands:
            raise SampleError(
                "lr_no_scene",
                f"no {self.collection} scene covers tile {z}/{x}/{y}"
                + (f" within {self.window_days} days of {hr_date}" if hr_date else ""),
            )
        n = native_size(z, x, y)
        tried: list[dict[str, Any]] = []
        implausible: QARejected | None = None
        for d in cands[: self.max_candidates]:
            try:
                frac = self._bad_fraction(d, z, x, y, n)
            except SampleError as e:
                tried.append({"id": d["id"], "error": e.reason, "detail": e.detail[:200]})
                continue
            tried.append(
                {
                    "id": d["id"],
                    "bad_fraction": round(frac["bad"], 4),
                    "nodata": round(frac["nodata"], 4),
                    "eo:cloud_cover": d["properties"].get("eo:cloud_cover"),
                }
            )
            if frac["bad"] <= self.max_footprint_cloud:
                try:
                    return self._build(d, z, x, y, n, lr_px, hr_date, frac["bad"], tried)
                except QARejected as e:  # this scene's DNs contradict its item: try the next one
                    tried[-1].update(error=e.reason, detail=e.detail[:200])
                    implausible = implausible or e
        if implausible is not None:
            raise QARejected(implausible.reason, f"tile {z}/{x}/{y}: {implausible.detail}; candidates: {tried}")
        if tried and all("error" in t for t in tried):
            raise SampleError(tried[0]["error"], f"tile {z}/{x}/{y}: every candidate failed to read: {tried}")
        if tried and all(t.get("nodata", 0) > 0.5 for t in tried if "nodata" in t):
            raise SampleError("lr_nodata", f"tile {z}/{x}/{y} is outside the data of every scene: {tried}")
        raise SampleError(
            "lr_cloudy",
            f"tile {z}/{x}/{y}: no scene has <= {self.max_footprint_cloud:.0%} "
            f"cloud/shadow/no-data inside the footprint: {tried}",
        )

    def fetch_footprint(
        self, z: int, x: int, y: int, lr_px: int, hr: HRResult, found: list[dict] | None = None
    ) -> LRResult:
        """`LRSource` fetch step: `fetch` from the block's items (None: search around the HR date)."""
        return self.fetch(z, x, y, lr_px, hr.date, found)

    # -- reading --------------------------------------------------------------------------------
    def _href(self, d: dict, role: str) -> tuple[str, dict]:
        key = self.keys[role]
        asset = d.get("assets", {}).get(key)
        if asset is None:
            raise SampleError("lr_missing_asset", f"item {d['id']} has no asset {key!r} ({role})")
        href = asset["href"]
        if self.href_map is not None:
            href = self.href_map(href)
        if self.signer is not None:
            href = self.signer.sign(href, d.get("collection") or self.collection)
        return href, asset

    def _read(
        self,
        href: str,
        z: int,
        x: int,
        y: int,
        n: int,
        resampling: str,
        grid: dict[str, Any] | None = None,
        indexes: int | list[int] = 1,
    ) -> np.ndarray:
        """The footprint window of one COG band, retried with backoff while the failure looks transient.

        GDAL's /vsicurl/ keeps what it once received (a corrupt header, a cut-off block, "file does not
        exist" after a 503) for the life of the process, so a plain retry would fail again without a new
        request; every failed attempt therefore drops GDAL's cache of that URL (`forget_remote`) and the
        next one opens a fresh handle that asks the server again. GDAL's own retries
        (GDAL_HTTP_MAX_RETRY) cover 429/5xx inside one attempt; this loop covers damaged bodies and
        hung connections too. Local files are read once: their errors do not go away.

        `grid` (the asset's STAC `proj:shape` / `proj:transform` / `proj:epsg`, see `expected_grid`) is
        checked against the file: a damaged header can still parse, with a shifted or rescaled
        georeference that would put the scene's pixels in the wrong place without any error.
        """
        import rasterio

        path = _gdal_path(href)
        remote = path.startswith(REMOTE_PREFIXES)
        pol = self.client.retry
        attempts = pol.retries + 1 if remote else 1
        install_log_redaction(self.client.secrets)
        env = dict(GDAL_ENV)
        read_timeout = self.client.timeout[1] if isinstance(self.client.timeout, tuple) else self.client.timeout
        if read_timeout:  # a hung connection costs the build's read timeout, not GDAL's 60 s default
            env["GDAL_HTTP_TIMEOUT"] = str(max(1, int(math.ceil(float(read_timeout)))))
        err: Exception | None = None
        for attempt in range(attempts):
            try:
                return self._read_once(path, env, z, x, y, n, resampling, grid, indexes)
            except rasterio.errors.RasterioError as e:
                err = e
                self._handles.drop(path)  # the next attempt opens a fresh handle
                if remote and not forget_remote(path):
                    env["CPL_VSIL_CURL_NON_CACHED"] = "/vsicurl/"  # fallback: no cache across opens
                if attempt + 1 >= attempts or not transient_gdal_error(str(e)):
                    break
                wait = pol.delay(attempt)
                log.warning(
                    "retry %d/%d in %.2fs for COG read %s: %s",
                    attempt + 1,
                    attempts - 1,
                    wait,
                    redact(href, self.client.secrets),
                    redact(e, self.client.secrets)[:200],
                )
                time.sleep(wait)
        raise SampleError(
            "lr_read_failed",
            f"{redact(href, self.client.secrets)}: {redact(err, self.client.secrets)[:300]}"
            + (f" (after {attempt + 1} attempts)" if attempt else ""),
        )

    def _read_once(
        self,
        path: str,
        env: dict[str, str],
        z: int,
        x: int,
        y: int,
        n: int,
        resampling: str,
        grid: dict[str, Any] | None,
        indexes: int | list[int] = 1,
    ) -> np.ndarray:
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.transform import from_bounds
        from rasterio.vrt import WarpedVRT

        transform = from_bounds(*tile_bounds_3857(z, x, y), width=n, height=n)
        with rasterio.Env(**env):
            src = self._handles.open(path, grid)
            nodata = src.nodata if src.nodata is not None else 0
            with WarpedVRT(
                src,
                crs=WEB_MERCATOR,
                transform=transform,
                width=n,
                height=n,
                resampling=Resampling[resampling],
                src_nodata=nodata,
                nodata=nodata,
            ) as vrt:
                return vrt.read(indexes)

    def _bad_fraction(self, d: dict, z: int, x: int, y: int, n: int) -> dict[str, float]:
        href, asset = self._href(d, "scl")
        scl = self._read(href, z, x, y, n, "nearest", expected_grid(d, asset))
        return {"bad": float(np.isin(scl, SCL_BAD).mean()), "nodata": float((scl == 0).mean())}

    def _build(
        self, d: dict, z: int, x: int, y: int, n: int, lr_px: int, hr_date: str | None, bad: float, tried: list[dict]
    ) -> LRResult:
        from ..degrade import imresize

        props = d["properties"]
        hrefs: dict[str, str] = {}
        extra: dict[str, Any] = {}
        if self.radiometry == "tci":
            href, asset = self._href(d, "visual")
            tci = self._read(href, z, x, y, n, "cubic", expected_grid(d, asset), indexes=[1, 2, 3])
            hrefs["visual"] = redact(href, self.client.secrets)
            native = np.moveaxis(tci, 0, -1).astype(np.float32) / 255.0  # TCI units in [0, 1], not reflectance
            native[np.all(tci == 0, axis=0)] = np.nan
            radiometry = TCI_TEXT + "; uint8 = clip(round(resized TCI), 0, 255)"
            out_gain = 1.0
        else:
            bands, dns, recipe = [], [], None
            for role in ("red", "green", "blue"):
                href, asset = self._href(d, role)
                recipe = reflectance_recipe(props, d.get("collection") or self.collection, self.catalog, asset)
                dn = self._read(href, z, x, y, n, "cubic", expected_grid(d, asset))
                dns.append(dn)
                bands.append(recipe.apply(dn, nodata=0))
                hrefs[role] = redact(href, self.client.secrets)
            assert recipe is not None
            bt = _baseline_tuple(props.get("s2:processing_baseline"))
            if bt is not None and bt >= (4, 0):  # the BOA offset exists: do the DNs agree with the item?
                extra["dn_check"] = check_lr_radiometry(np.stack(dns, axis=-1), recipe.offset < 0, self.qa)
            native = np.stack(bands, axis=-1).astype(np.float32)
            radiometry = recipe.text(self.gain)
            out_gain = self.gain
        if np.isnan(native).all():
            raise SampleError("lr_nodata", f"scene {d['id']} has no data in tile {z}/{x}/{y}")
        filled = native.copy()
        if np.isnan(filled).any():  # fill the few no-data pixels with the band mean before resampling
            means = np.nanmean(filled.reshape(-1, 3), axis=0)
            idx = np.where(np.isnan(filled))
            filled[idx] = means[idx[2]]
        lr_refl = imresize(filled, output_shape=(lr_px, lr_px), antialias=True)
        when = _parse_iso(props["datetime"])
        days = float(abs((when.date() - _parse_day(hr_date, "HR date")).days)) if hr_date else None
        return LRResult(
            image=to_uint8(lr_refl, out_gain),
            native=native,
            scene_id=d["id"],
            datetime=when.isoformat().replace("+00:00", "Z"),
            cloud_fraction=bad,
            scene_cloud_cover=props.get("eo:cloud_cover"),
            days_from_hr=days,
            baseline=props.get("s2:processing_baseline"),
            radiometry=radiometry,
            collection=d.get("collection") or self.collection,
            info={
                "catalog": self.catalog,
                "stac_url": redact(self.url),
                "native_px": n,
                "native_gsd_m": NATIVE_GSD_M,
                "gain": self.gain,
                "assets": hrefs,
                "candidates": tried,
                "radiometry": self.radiometry,
                "lr_resampling": "MATLAB imresize bicubic (Keys a=-0.5), antialiased, on float "
                + ("TCI values" if self.radiometry == "tci" else "reflectance"),
                "warp_resampling": "cubic (bands), nearest (SCL)",
                "scl_bad_classes": list(SCL_BAD),
                "boa_offset_applied": props.get("earthsearch:boa_offset_applied"),
                **extra,
            },
        )
