"""HR imagery from an XYZ tile service: Esri World Imagery by default, any `{z}/{x}/{y}` template otherwise.

CMSRD's HR images are Esri World Imagery tiles (seeds/001, Section 4.1). A sample's footprint is one XYZ
tile (z, x, y); for an output of `size` px the tiles at zoom z + log2(size/256) covering it are fetched,
mosaicked and cropped (resampled only when size is not 256 * 2**k). Tiles go through the shared polite
client (`cmsrd.sources.http`) and an on-disk cache keyed `z/x/y`, so a rebuild never refetches.

Esri answers tiles it has no imagery for with a grey "Map data not yet available" image; requests carry
`?blankTile=false` (Esri then answers 404) and decoded tiles are also checked for that grey placeholder.
The capture date comes from the service's `identify` endpoint (attribute SRC_DATE, YYYYMMDD).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from ..errors import InputError, SampleError
from ..io import atomic_write_bytes, atomic_write_text
from .base import HRResult, check_tile, ground_gsd_m, subtile_zoom, tile_bounds_3857
from .http import CorruptBody, HttpClient, HTTPFetchError, RetryPolicy, redact

if TYPE_CHECKING:
    from ..config import DatasetConfig

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/{z}/{y}/{x}"
DEFAULT_IDENTIFY = "https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/identify"
ESRI_ATTRIBUTION = "Source: Esri, Maxar, Earthstar Geographics, and the GIS User Community"
ESRI_TERMS = (
    "Esri World Imagery is provided under the Esri Master License Agreement / Terms of Use "
    "(https://www.esri.com/en-us/legal/terms/full-master-agreement); tiles may be used for research with "
    "the attribution shown, must not be redistributed as a tile service or bulk cache, and an ArcGIS "
    "account may be required for production use. Check the current terms before publishing a dataset."
)
TILE_PX = 256

# Placeholder detection: share of pixels close to the dominant colour, and what counts as "grey".
_PLACEHOLDER_SHARE = 0.85
_PLACEHOLDER_TOL = 8
_PLACEHOLDER_GREY_SPREAD = 12
_PLACEHOLDER_LEVELS = (150, 240)


def validate_template(template: str) -> str:
    """Check an XYZ URL template: it must contain {z}, {x} and {y} and be http(s) or file."""
    if not isinstance(template, str) or not template:
        raise InputError("tile template", "is empty", f"use e.g. {DEFAULT_TEMPLATE}")
    missing = [k for k in ("{z}", "{x}", "{y}") if k not in template]
    if missing:
        raise InputError(
            f"tile template {redact(template)!r}",
            f"lacks {', '.join(missing)}",
            "write the URL with {z}, {x} and {y} placeholders, e.g. " + DEFAULT_TEMPLATE,
        )
    scheme = urlsplit(template).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise InputError(
            f"tile template {redact(template)!r}",
            f"scheme {scheme or '(none)'!r} is not supported",
            "use an http(s):// or file:// URL",
        )
    try:
        template.format(z=0, x=0, y=0)
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(
            f"tile template {redact(template)!r}",
            f"has an unknown placeholder ({e})",
            "only {z}, {x} and {y} may appear in braces",
        ) from None
    return template


def is_esri_template(template: str) -> bool:
    """ArcGIS REST tile endpoints (`.../MapServer/tile/{z}/{y}/{x}`) understand `blankTile=false`."""
    return "/mapserver/tile/" in template.lower()


def is_placeholder(tile: np.ndarray) -> bool:
    """True for Esri's grey 'no data' tile: almost every pixel one mid grey (text may cover the rest)."""
    if tile.dtype == np.uint8 and not _one_grey_possible(tile):
        return False
    flat = tile.reshape(-1, tile.shape[-1]).astype(np.int16)
    med = np.median(flat, axis=0)
    if med.max() - med.min() > _PLACEHOLDER_GREY_SPREAD:
        return False
    if not (_PLACEHOLDER_LEVELS[0] <= med.mean() <= _PLACEHOLDER_LEVELS[1]):
        return False
    close = np.all(np.abs(flat - med) <= _PLACEHOLDER_TOL, axis=1)
    return float(close.mean()) >= _PLACEHOLDER_SHARE


def _one_grey_possible(tile: np.ndarray) -> bool:
    """A necessary condition of `is_placeholder`, from three 256-bin histograms: a placeholder has at least
    `_PLACEHOLDER_SHARE` of its pixels within +-TOL of the median in *every* channel, so some window of
    2*TOL+1 grey levels holds that share of each channel (a median ending in .5 only narrows the window).
    Almost every real tile fails this, and skips the median (a full partition of the pixels)."""
    width = 2 * _PLACEHOLDER_TOL + 1
    need = _PLACEHOLDER_SHARE * tile.shape[0] * tile.shape[1]
    for c in range(tile.shape[-1]):
        cum = np.concatenate(([0], np.cumsum(np.bincount(tile[..., c].ravel(), minlength=256))))
        if (cum[width:] - cum[:-width]).max() < need:
            return False
    return True


def decode_tile(data: bytes) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> uint8 256x256x3 (other tile sizes are resampled to 256)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptBody(f"not a decodable image ({type(e).__name__})") from None
    if rgb.size != (TILE_PX, TILE_PX):
        rgb = rgb.resize((TILE_PX, TILE_PX), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def parse_src_date(value: Any) -> str | None:
    """Esri SRC_DATE (YYYYMMDD, as text or number; some layers give epoch milliseconds) -> YYYY-MM-DD."""
    if value is None:
        return None
    text = str(value).strip()
    if re.fullmatch(r"\d{8}", text):
        y, m, d = int(text[:4]), int(text[4:6]), int(text[6:])
        if 1900 < y < 2200 and 1 <= m <= 12 and 1 <= d <= 31:
            return f"{y:04d}-{m:02d}-{d:02d}"
        return None
    if re.fullmatch(r"-?\d{10,14}", text):  # epoch milliseconds
        from datetime import datetime

        return datetime.fromtimestamp(int(text) / 1000, tz=UTC).strftime("%Y-%m-%d")
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2}).*", text)
    return f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else None


class WorldImageryHR:
    """HR footprints from an XYZ tile service (default: Esri World Imagery).

    `template`: URL with {z}, {x}, {y} (Esri's is row-major `{z}/{y}/{x}`). `cache_dir`: on-disk tile
    cache `<cache_dir>/<z>/<x>/<y>.<ext>` (None: no cache). `identify_url`: ArcGIS identify endpoint for
    the capture date; None skips it, and the Esri default is only used with an Esri template.
    `rate` (requests/s) and `max_workers` bound the load on the service; pass `client` to share one
    `HttpClient` (and its rate limit) between sources, or `session` to reuse a `requests.Session`.
    """

    def __init__(
        self,
        template: str = DEFAULT_TEMPLATE,
        cache_dir: str | os.PathLike | None = None,
        identify_url: str | None = DEFAULT_IDENTIFY,
        session: Any = None,
        *,
        client: HttpClient | None = None,
        rate: float | None = 8.0,
        max_workers: int = 4,
        timeout: float | tuple[float, float] = (10.0, 30.0),
        retry: RetryPolicy | None = None,
        blank_tile_false: bool = True,
        detect_placeholders: bool = True,
        attribution: str | None = None,
        terms: str | None = None,
        name: str | None = None,
    ):
        self.template = validate_template(template)
        esri = is_esri_template(self.template)
        if identify_url == DEFAULT_IDENTIFY and template != DEFAULT_TEMPLATE and not esri:
            identify_url = None  # Esri's capture dates say nothing about another service's tiles
        self.identify_url = identify_url
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.blank_tile_false = blank_tile_false and esri
        self.detect_placeholders = detect_placeholders
        self.attribution = attribution if attribution is not None else (ESRI_ATTRIBUTION if esri else "")
        self.terms = terms if terms is not None else (ESRI_TERMS if esri else "")
        self.name = name or ("esri-world-imagery" if esri else "xyz-tiles")
        self._client_kw = dict(rate=rate, max_workers=max_workers, timeout=timeout, retry=retry)
        self._session = session
        self._client = client
        self._identify_memo: dict[tuple[int, int, int], dict[str, Any]] = {}

    @classmethod
    def from_config(cls, cfg: DatasetConfig, cache_dir: str | None = None) -> WorldImageryHR:
        """The build's source: `hr.url` / `identify_url` / attribution / terms, HTTP policy from `build:`."""
        from .registry import http_options

        return cls(
            cfg.hr.url,
            cache_dir=cache_dir,
            identify_url=cfg.hr.identify_url,
            attribution=cfg.hr.attribution,
            terms=cfg.hr.terms,
            **http_options(cfg),
        )

    @staticmethod
    def needs(cfg: DatasetConfig) -> list[str]:
        """What a build with this source reaches out to (printed before a real build starts)."""
        return [urlsplit(cfg.hr.url).netloc]

    # Dask ships sources to workers: drop the live client (locks, sockets) and rebuild it there.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_session"] = None
        state["_identify_memo"] = {}
        return state

    @property
    def client(self) -> HttpClient:
        if self._client is None:
            self._client = HttpClient(session=self._session, **self._client_kw)
        return self._client

    def describe(self) -> dict[str, Any]:
        """What dataset.json records about this source (URLs redacted)."""
        return {
            "type": "xyz",
            "name": self.name,
            "template": redact(self.template),
            "identify_url": redact(self.identify_url) if self.identify_url else None,
            "attribution": self.attribution,
            "terms": self.terms,
        }

    # -- tiles ----------------------------------------------------------------------------------
    def tile_url(self, z: int, x: int, y: int) -> str:
        url = self.template.format(z=z, x=x, y=y)
        if self.blank_tile_false:
            url += ("&" if "?" in url else "?") + "blankTile=false"
        return url

    def _cache_path(self, z: int, x: int, y: int) -> Path | None:
        if self.cache_dir is None:
            return None
        folder = self.cache_dir / str(z) / str(x)
        for ext in ("jpg", "png", "webp"):
            p = folder / f"{y}.{ext}"
            if p.is_file():
                return p
        return folder / f"{y}.jpg"

    def get_tile(self, z: int, x: int, y: int) -> tuple[np.ndarray, bool]:
        """One 256 px tile as uint8 RGB and whether it came from the cache.

        Raises SampleError hr_placeholder (no imagery) or hr_fetch_failed (after retries).
        """
        cached = self._cache_path(z, x, y)
        if cached is not None and cached.is_file():
            try:
                tile = decode_tile(cached.read_bytes())
                self._check_placeholder(tile, z, x, y)
                return tile, True
            except CorruptBody:
                log.warning("cached tile %s is unreadable; fetching it again", cached)
        url = self.tile_url(z, x, y)
        try:
            resp = self.client.get(url, validate=lambda r: decode_tile(r.content))
        except HTTPFetchError as e:
            if e.status == 404:
                raise SampleError(
                    "hr_placeholder", f"no imagery at tile {z}/{x}/{y} (HTTP 404 with blankTile=false)"
                ) from None
            raise SampleError("hr_fetch_failed", f"tile {z}/{x}/{y}: {e}") from None
        tile = decode_tile(resp.content)
        if cached is not None:
            ctype = resp.headers.get("Content-Type", "").lower()
            ext = "png" if "png" in ctype else "webp" if "webp" in ctype else "jpg"
            atomic_write_bytes(cached.with_suffix("." + ext), resp.content)
        self._check_placeholder(tile, z, x, y)
        return tile, False

    def _check_placeholder(self, tile: np.ndarray, z: int, x: int, y: int) -> None:
        if self.detect_placeholders and is_placeholder(tile):
            raise SampleError("hr_placeholder", f"tile {z}/{x}/{y} is the service's grey 'no data' image")

    # -- footprints -----------------------------------------------------------------------------
    def fetch(self, z: int, x: int, y: int, size: int = 256) -> HRResult:
        """The HR image of footprint tile (z, x, y) at exactly size x size px, with its capture date."""
        check_tile(z, x, y)
        zz = subtile_zoom(z, size)
        n = 2 ** (zz - z)
        coords = [(zz, x * n + i, y * n + j) for j in range(n) for i in range(n)]
        results = self.client.map(lambda c: self.get_tile(*c), coords) if n > 1 else [self._one(coords[0])]
        mosaic = np.empty((n * TILE_PX, n * TILE_PX, 3), np.uint8)
        hits = 0
        for (tz, tx, ty), res in zip(coords, results):
            if isinstance(res, BaseException):
                if isinstance(res, SampleError):
                    raise res
                raise SampleError("hr_fetch_failed", f"tile {tz}/{tx}/{ty}: {redact(res)}")
            tile, hit = res
            hits += hit
            r, c = (ty - y * n) * TILE_PX, (tx - x * n) * TILE_PX
            mosaic[r : r + TILE_PX, c : c + TILE_PX] = tile
        image = mosaic if mosaic.shape[0] == size else _resize(mosaic, size)
        date, ident = self.capture_date(z, x, y)
        info = {
            "tile_zoom": zz,
            "tiles": len(coords),
            "cache_hits": hits,
            "gsd_m": ground_gsd_m(z, y, size),
            "template": redact(self.template),
            "resampled": mosaic.shape[0] != size,
        }
        info.update(ident)
        return HRResult(
            image=image,
            bounds_3857=tile_bounds_3857(z, x, y),
            source=self.name,
            date=date,
            attribution=self.attribution,
            info=info,
        )

    def _one(self, c: tuple[int, int, int]) -> Any:
        try:
            return self.get_tile(*c)
        except Exception as e:  # noqa: BLE001 - reported like the threaded path
            return e

    def fetch_many(
        self, footprints: Iterable[tuple[int, int, int]], size: int = 256, progress: bool = True
    ) -> list[HRResult | SampleError]:
        """Fetch many footprints with bounded concurrency; a failed one yields its SampleError in place."""
        from tqdm.auto import tqdm

        fps = list(footprints)
        out: list[HRResult | SampleError] = [None] * len(fps)  # type: ignore[list-item]

        def run(i: int) -> None:
            try:
                out[i] = self.fetch(*fps[i], size=size)
            except SampleError as e:
                out[i] = e

        with ThreadPoolExecutor(max_workers=self.client.max_workers, thread_name_prefix="cmsrd-hr") as pool:
            for _ in tqdm(
                pool.map(run, range(len(fps))),
                total=len(fps),
                desc="HR tiles",
                unit="fp",
                disable=not progress,
                leave=False,
            ):
                pass
        return out

    # -- capture date ---------------------------------------------------------------------------
    def capture_date(self, z: int, x: int, y: int) -> tuple[str | None, dict[str, Any]]:
        """(YYYY-MM-DD or None, extra info) from the identify endpoint at the footprint centre.

        A failed identify never fails the sample: the date is then unknown and the reason recorded.
        """
        if not self.identify_url:
            return None, {}
        key = (z, x, y)
        if key in self._identify_memo:
            d = self._identify_memo[key]
            return d.get("date"), d
        cache = self.cache_dir / "identify" / str(z) / str(x) / f"{y}.json" if self.cache_dir else None
        if cache is not None and cache.is_file():
            try:
                d = json.loads(cache.read_text())
                self._identify_memo[key] = d
                return d.get("date"), d
            except ValueError:
                pass
        left, bottom, right, top = tile_bounds_3857(z, x, y)
        params = {
            "geometry": f"{(left + right) / 2:.3f},{(bottom + top) / 2:.3f}",
            "geometryType": "esriGeometryPoint",
            "sr": "3857",
            "layers": "all",
            "tolerance": "0",
            "mapExtent": f"{left:.3f},{bottom:.3f},{right:.3f},{top:.3f}",
            "imageDisplay": "256,256,96",
            "returnGeometry": "false",
            "f": "json",
        }
        try:
            resp = self.client.get(self.identify_url, params=params, validate=_json_body)
            results = resp.json().get("results") or []
        except (HTTPFetchError, ValueError, AttributeError) as e:
            return None, {"date_error": f"identify failed: {redact(e)}"}
        attrs = _pick_identify(results, z)
        date = parse_src_date(attrs.get("SRC_DATE")) if attrs else None
        d: dict[str, Any] = {"date": date}
        if attrs:
            d.update({k: attrs[k] for k in ("SRC_RES", "SRC_ACC", "SRC_DESC", "NICE_NAME") if k in attrs})
        else:
            d["date_error"] = "identify returned no imagery metadata"
        self._identify_memo[key] = d
        if cache is not None:
            atomic_write_text(cache, json.dumps(d))
        return date, d


def _json_body(resp: Any) -> None:
    try:
        resp.json()
    except ValueError as e:
        raise CorruptBody(f"identify answer is not JSON ({e})") from None


def _pick_identify(results: list[dict], z: int) -> dict[str, Any] | None:
    """The metadata layer valid at zoom z (World Imagery has one per scale range), else the first with a date."""
    with_date = [r.get("attributes") or {} for r in results if (r.get("attributes") or {}).get("SRC_DATE")]
    for a in with_date:
        try:
            if int(a.get("MinMapLevel", -1)) <= z <= int(a.get("MaxMapLevel", 99)):
                return a
        except (TypeError, ValueError):
            continue
    return with_date[0] if with_date else None


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize (PIL Lanczos) for sizes that are not 256 * 2**k."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
