"""Sentinel-2 L2A LR through Sentinel Hub's Process API (sentinelhub-py), as an alternative to STAC + COGs.

One Process API request per footprint: collection SENTINEL2_L2A, `leastCC` mosaicking over the date window
around the HR date, output on the footprint in EPSG:3857 at ~10 m ground spacing, FLOAT32 bands
B04, B03, B02 (units REFLECTANCE, harmonised by Sentinel Hub so the baseline >= 04.00 BOA offset is
already removed), SCL and dataMask, plus `userdata.json` naming the tile(s) the mosaic used. The LR is
then made exactly as in `cmsrd.sources.sentinel2` (fixed gain, MATLAB bicubic), so both backends give
the same `LRResult`.

Credentials come from an `SHConfig` (sentinelhub's config file or the SH_CLIENT_ID / SH_CLIENT_SECRET
environment variables). The Copernicus Data Space Ecosystem is supported with `cdse=True` (or by
setting sh_base_url / sh_token_url on the config).
"""

from __future__ import annotations

import logging
import os
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CredentialsError, InputError, SampleError
from .base import HRResult, LRResult, check_tile, tile_bounds_3857
from .http import install_log_redaction, redact
from .sentinel2 import GAIN, NATIVE_GSD_M, SCL_BAD, Sentinel2STAC, _parse_day, _parse_iso, native_size, to_uint8

if TYPE_CHECKING:
    from ..config import DatasetConfig

log = logging.getLogger(__name__)

CDSE_BASE_URL = "https://sh.dataspace.copernicus.eu"
CDSE_TOKEN_URL = "https://identity.dataspace.copernicus.eu/auth/realms/CDSE/protocol/openid-connect/token"

EVALSCRIPT = """//VERSION=3
function setup() {
  return {
    input: [{bands: ["B04", "B03", "B02", "SCL", "dataMask"],
             units: ["REFLECTANCE", "REFLECTANCE", "REFLECTANCE", "DN", "DN"]}],
    output: {id: "default", bands: 5, sampleType: "FLOAT32"},
    mosaicking: "SIMPLE"
  };
}
function updateOutputMetadata(scenes, inputMetadata, outputMetadata) {
  outputMetadata.userData = {
    tiles: (scenes.tiles || []).map(function (t) {
      return {date: t.date, cloudCoverage: t.cloudCoverage, tileId: t.tileOriginalId || t.shId,
              dataPath: t.dataPath};
    }),
    serviceVersion: inputMetadata.serviceVersion
  };
}
function evaluatePixel(s) {
  return [s.B04, s.B03, s.B02, s.SCL, s.dataMask];
}
"""

RADIOMETRY = (
    "reflectance = Sentinel Hub Process API SENTINEL2_L2A units=REFLECTANCE (harmonizeValues=true: the "
    "BOA_ADD_OFFSET of baseline >= 04.00 removed server-side); dataMask 0 = no data; "
    "uint8 = clip(round(255 * {gain:g} * reflectance), 0, 255)"
)


# What a refusal of the credentials looks like in sentinelhub-py / oauthlib error texts (token endpoint or
# Process API): 401, 403 (the account may not use this collection or has no processing units left), OAuth.
REFUSED = ("invalid_client", "unauthorized", "401", "403", "forbidden", "invalid client", "oauth")


def _credentials_error(problem: str) -> CredentialsError:
    return CredentialsError(
        "Sentinel Hub credentials (SH_CLIENT_ID / SH_CLIENT_SECRET or the sentinelhub config)",
        problem,
        "create an OAuth client in your Sentinel Hub / Copernicus Data Space dashboard and "
        "export SH_CLIENT_ID and SH_CLIENT_SECRET, or run `sentinelhub.config --sh_client_id ... "
        "--sh_client_secret ...`",
    )


class SentinelHubLR:
    """Real LR from Sentinel Hub's Process API. Returns the same `LRResult` as `Sentinel2STAC`.

    `config`: an `SHConfig` (None: `SHConfig()` plus SH_CLIENT_ID / SH_CLIENT_SECRET from the
    environment). `cdse=True` points it at the Copernicus Data Space Ecosystem. `window_days`: +- days
    around the HR date given to leastCC mosaicking. `max_cloud`: maxCloudCoverage (percent) per tile.
    `max_footprint_cloud`: tolerated SCL cloud/shadow/no-data share inside the footprint.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        cdse: bool = False,
        window_days: int = 30,
        max_cloud: float = 60.0,
        max_footprint_cloud: float = 0.05,
        gain: float = GAIN,
        max_attempts: int = 4,
        retry_sleep_s: float = 5.0,
    ):
        from sentinelhub import SHConfig

        cfg = config.copy() if config is not None else SHConfig()
        cfg.sh_client_id = cfg.sh_client_id or os.environ.get("SH_CLIENT_ID", "")
        cfg.sh_client_secret = cfg.sh_client_secret or os.environ.get("SH_CLIENT_SECRET", "")
        if cdse:
            cfg.sh_base_url, cfg.sh_token_url = CDSE_BASE_URL, CDSE_TOKEN_URL
        if not cfg.sh_client_id or not cfg.sh_client_secret:
            missing = [
                n for n, v in (("SH_CLIENT_ID", cfg.sh_client_id), ("SH_CLIENT_SECRET", cfg.sh_client_secret)) if not v
            ]
            raise _credentials_error(f"{' and '.join(missing)} not set")
        cfg.max_download_attempts = int(max_attempts)
        cfg.download_sleep_time = float(retry_sleep_s)
        self.config = cfg
        self.window_days = int(window_days)
        self.max_cloud = float(max_cloud)
        self.max_footprint_cloud = float(max_footprint_cloud)
        self.gain = float(gain)
        install_log_redaction([cfg.sh_client_secret])

    @classmethod
    def from_config(cls, cfg: DatasetConfig, cache_dir: str | None = None) -> SentinelHubLR:
        """The build's source (credentials from SH_CLIENT_ID / SH_CLIENT_SECRET, checked here)."""
        return cls(
            window_days=int(cfg.qa.max_days_from_hr),
            max_cloud=cfg.lr.max_scene_cloud,
            max_footprint_cloud=cfg.qa.max_cloud_fraction,
        )

    provenance = staticmethod(Sentinel2STAC.provenance)

    @staticmethod
    def needs(cfg: DatasetConfig) -> list[str]:
        """What a build with this source reaches out to (printed before a real build starts)."""
        return ["Sentinel Hub (SH_CLIENT_ID / SH_CLIENT_SECRET must be set)"]

    def search(self, bbox_lonlat: tuple[float, float, float, float], start: str, end: str) -> None:
        """No catalogue step: the Process API mosaics the least cloudy scene per request."""
        return None

    def fetch_footprint(self, z: int, x: int, y: int, lr_px: int, hr: HRResult, found: Any = None) -> LRResult:
        return self.fetch(z, x, y, lr_px, hr.date)

    def __repr__(self) -> str:  # never print the secret
        return f"SentinelHubLR(base_url={self.config.sh_base_url!r}, client_id={self.config.sh_client_id[:4]}...)"

    def describe(self) -> dict[str, Any]:
        return {
            "type": "sentinelhub",
            "base_url": self.config.sh_base_url,
            "token_url": self.config.sh_token_url,
            "collection": "SENTINEL2_L2A",
            "mosaicking": "leastCC",
            "window_days": self.window_days,
            "max_cloud": self.max_cloud,
            "gain": self.gain,
            "attribution": "Contains modified Copernicus Sentinel data",
        }

    def _collection(self) -> Any:
        from sentinelhub import DataCollection

        base = DataCollection.SENTINEL2_L2A
        if self.config.sh_base_url.rstrip("/") != "https://services.sentinel-hub.com":
            return base.define_from(
                f"SENTINEL2_L2A_{abs(hash(self.config.sh_base_url)) % 10**8}", service_url=self.config.sh_base_url
            )
        return base

    def request(self, z: int, x: int, y: int, start: date, end: date, n: int) -> tuple[np.ndarray, dict]:
        """Run the Process API request; returns (n x n x 5 float32 array, userdata dict)."""
        from sentinelhub import CRS, BBox, MimeType, MosaickingOrder, SentinelHubRequest

        req = SentinelHubRequest(
            evalscript=EVALSCRIPT,
            input_data=[
                SentinelHubRequest.input_data(
                    data_collection=self._collection(),
                    time_interval=(start.isoformat(), end.isoformat()),
                    mosaicking_order=MosaickingOrder.LEAST_CC,
                    maxcc=self.max_cloud / 100.0,
                )
            ],
            responses=[
                SentinelHubRequest.output_response("default", MimeType.TIFF),
                SentinelHubRequest.output_response("userdata", MimeType.JSON),
            ],
            bbox=BBox(tile_bounds_3857(z, x, y), crs=CRS.POP_WEB),
            size=(n, n),
            config=self.config,
        )
        try:
            out = req.get_data()[0]
        except Exception as e:  # noqa: BLE001 - sentinelhub/oauthlib raise many types; sort them below
            text = redact(e, [self.config.sh_client_secret])
            low = text.lower()
            if any(k in low for k in REFUSED):
                raise _credentials_error(f"rejected by {self.config.sh_token_url} ({text[:200]})") from None
            raise SampleError("lr_fetch_failed", f"Sentinel Hub Process API: {text[:300]}") from None
        arr = np.asarray(out["default.tif"], dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] != 5:
            raise SampleError("lr_fetch_failed", f"Process API returned shape {arr.shape}, expected (n, n, 5)")
        return arr, out.get("userdata.json") or {}

    def fetch(self, z: int, x: int, y: int, lr_px: int = 16, hr_date: str | None = None) -> LRResult:
        """The real LR of footprint (z, x, y) from the least cloudy scene within the window."""
        from ..degrade import imresize

        check_tile(z, x, y)
        if not hr_date:
            raise InputError("hr_date", "is needed to choose the Sentinel Hub time window", "pass hr_date='YYYY-MM-DD'")
        d = _parse_day(hr_date, "HR date")
        n = native_size(z, x, y)
        arr, user = self.request(z, x, y, d - timedelta(days=self.window_days), d + timedelta(days=self.window_days), n)
        tiles = list(user.get("tiles") or [])
        mask = arr[..., 4] > 0
        if not tiles or not mask.any():
            raise SampleError(
                "lr_no_scene",
                f"Sentinel Hub has no SENTINEL2_L2A data for tile {z}/{x}/{y} "
                f"within {self.window_days} days of {hr_date}",
            )
        scl = np.rint(arr[..., 3]).astype(np.int16)
        bad = float((np.isin(scl, SCL_BAD) | ~mask).mean())
        if bad > self.max_footprint_cloud:
            raise SampleError(
                "lr_cloudy", f"least-cloudy mosaic still has {bad:.0%} cloud/shadow/no-data inside tile {z}/{x}/{y}"
            )
        native = arr[..., :3].copy()
        native[~mask] = np.nan
        filled = np.where(np.isnan(native), np.nanmean(native.reshape(-1, 3), axis=0), native).astype(np.float32)
        lr = imresize(filled, output_shape=(lr_px, lr_px), antialias=True)
        first = tiles[0]
        when = _parse_iso(first.get("date")) if first.get("date") else None
        return LRResult(
            image=to_uint8(lr, self.gain),
            native=native.astype(np.float32),
            scene_id=str(first.get("tileId") or first.get("dataPath") or "unknown"),
            datetime=when.isoformat().replace("+00:00", "Z") if when else "",
            cloud_fraction=bad,
            scene_cloud_cover=first.get("cloudCoverage"),
            days_from_hr=float(abs((when.date() - d).days)) if when else None,
            baseline=None,
            radiometry=RADIOMETRY.format(gain=self.gain),
            collection="SENTINEL2_L2A",
            info={
                "backend": "sentinelhub",
                "base_url": self.config.sh_base_url,
                "mosaicking": "leastCC",
                "tiles": tiles,
                "native_px": n,
                "native_gsd_m": NATIVE_GSD_M,
                "gain": self.gain,
                "lr_resampling": "MATLAB imresize bicubic (Keys a=-0.5), antialiased, on float reflectance",
            },
        )
