"""A loopback server speaking Sentinel Hub's OAuth token endpoint and Process API over the offline world.

Test and demo infrastructure only. It answers what `sentinelhub-py` sends for the toolkit's Sentinel-2
evalscript (`cmsrd.sources.sentinelhub_backend.EVALSCRIPT`): the client-credentials token request
(`/oauth/token`, and the CDSE path), and `POST /api/v1/process` with a bbox + CRS, a
`sentinel-2-l2a` data filter (timeRange, mosaickingOrder, maxCloudCoverage) and width/height. It does
not run JavaScript: it renders the five outputs that evalscript asks for (B04, B03, B02 as
reflectance, SCL, dataMask) from the world's L2A COGs, choosing the scene like `leastCC` does, and
returns a TIFF, or a tar of `default.tif` + `userdata.json` when two responses are requested.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from ..errors import InputError
from .faults import FaultConfig
from .loopback import HTTPError, LoopbackServer, Request, Response, json_response

TOKEN_PATHS = (r"/oauth/token", r"/auth/realms/CDSE/protocol/openid-connect/token")


def _parse_time(text: str) -> datetime:
    dt = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class SentinelHubServer(LoopbackServer):
    """Process API + OAuth over a world directory. `client_id` / `client_secret` are the only accepted
    credentials; `token_url` and `base_url` are what an `SHConfig` needs."""

    def __init__(
        self,
        world_dir: str | Path,
        client_id: str = "cmsrd-test-client",
        client_secret: str = "cmsrd-test-secret",
        token_ttl_s: int = 3600,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultConfig | None = None,
    ):
        root = Path(world_dir)
        items_dir = root / "stac" / "items"
        if not items_dir.is_dir():
            raise InputError(f"world directory {root}", "has no stac/items", "generate it with `cmsrd world generate`")
        self.root = root.resolve()
        # one item per acquisition (the world also serves each as sentinel-2-c1-l2a, from other DN files)
        items = [json.loads(p.read_text()) for p in sorted(items_dir.glob("*.json"))]
        self.items = [it for it in items if it.get("collection", "sentinel-2-l2a") == "sentinel-2-l2a"]
        truth = root / "truth" / "truth.json"
        recs = json.loads(truth.read_text()).get("s2_items", {}) if truth.is_file() else {}
        # the offset truly in each item's DNs (its earthsearch flag may lie on purpose, see WorldConfig)
        self._dn_offset = {k: float(v.get("dn_offset_added", 0)) for k, v in recs.items()}
        super().__init__(host, port, faults)
        self.client_id, self.client_secret, self.token_ttl_s = client_id, client_secret, token_ttl_s
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        self.requests_log: list[dict[str, Any]] = []  # parsed Process API bodies, for tests
        for i, path in enumerate(TOKEN_PATHS):
            self.add_route(f"token{i}", "POST", path, self._token)
        self.add_route("process", "POST", r"/api/v1/process", self._process)

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATHS[0]

    # -- OAuth client credentials --------------------------------------------------------------
    def _token(self, req: Request) -> Response:
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        cid, secret = form.get("client_id"), form.get("client_secret")
        auth = req.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                pass
        if form.get("grant_type") != "client_credentials":
            raise HTTPError(400, "unsupported_grant_type", body={"error": "unsupported_grant_type"})
        if cid != self.client_id or secret != self.client_secret:
            raise HTTPError(
                401,
                "invalid_client",
                body={"error": "invalid_client", "error_description": "Invalid client or Invalid client credentials"},
            )
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.time() + self.token_ttl_s
        return json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.token_ttl_s,
                "expires_at": time.time() + self.token_ttl_s,
            }
        )

    def _authorised(self, req: Request) -> None:
        auth = req.headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        with self._lock:
            exp = self._tokens.get(token)
        if exp is None or exp < time.time():
            raise HTTPError(
                401,
                "Unauthorized",
                body={"error": {"status": 401, "reason": "Unauthorized", "message": "You are not authorized!"}},
            )

    # -- Process API ---------------------------------------------------------------------------
    def _process(self, req: Request) -> Response:
        self._authorised(req)
        spec = req.json()
        try:
            bounds = spec["input"]["bounds"]
            bbox = [float(v) for v in bounds["bbox"]]
            crs = bounds.get("properties", {}).get("crs", "http://www.opengis.net/def/crs/OGC/1.3/CRS84")
            data = spec["input"]["data"][0]
            out = spec["output"]
            width, height = int(out["width"]), int(out["height"])
            evalscript = spec["evalscript"]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise HTTPError(400, f"malformed Process API request: {e!r}") from None
        if data.get("type", "").lower() not in ("sentinel-2-l2a", "s2l2a"):
            raise HTTPError(400, f"data type {data.get('type')!r} is not served here (only sentinel-2-l2a)")
        if "evaluatePixel" not in evalscript or "dataMask" not in evalscript:
            raise HTTPError(400, "this server renders only the cmsrd Sentinel-2 evalscript")
        self.requests_log.append(spec)
        filt = data.get("dataFilter", {})
        tr = filt.get("timeRange", {})
        t0, t1 = _parse_time(tr.get("from", "1970-01-01T00:00:00Z")), _parse_time(tr.get("to", "2100-01-01T00:00:00Z"))
        maxcc = float(filt.get("maxCloudCoverage", 100))
        chosen = [
            it
            for it in self.items
            if t0 <= _parse_time(it["properties"]["datetime"]) <= t1
            and float(it["properties"].get("eo:cloud_cover", 0)) <= maxcc
        ]
        order = filt.get("mosaickingOrder", "mostRecent")
        if order == "leastCC":
            chosen.sort(key=lambda it: (float(it["properties"].get("eo:cloud_cover", 0)), it["properties"]["datetime"]))
        else:
            chosen.sort(key=lambda it: it["properties"]["datetime"], reverse=True)
        epsg = crs.rstrip("/").split("/")[-1]
        dst_crs = "EPSG:4326" if epsg.upper() == "CRS84" else f"EPSG:{epsg}"
        arr = np.zeros((5, height, width), np.float32)
        tiles = []
        if chosen:
            it = chosen[0]
            arr = self._render(it, bbox, dst_crs, width, height)
            tiles.append(
                {
                    "date": it["properties"]["datetime"],
                    "cloudCoverage": it["properties"].get("eo:cloud_cover"),
                    "tileId": it["id"],
                    "dataPath": f"s3://sentinel-s2-l2a/tiles/{it['id']}",
                }
            )
        tif = self._tiff(arr)
        responses = out.get("responses") or [{"identifier": "default"}]
        if len(responses) == 1:
            return Response(body=tif, content_type="image/tiff")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, payload in (
                ("default.tif", tif),
                ("userdata.json", json.dumps({"tiles": tiles, "serviceVersion": "loopback"}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return Response(body=buf.getvalue(), content_type="application/x-tar")

    def _render(self, item: dict, bbox: list[float], crs: str, width: int, height: int) -> np.ndarray:
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.transform import from_bounds
        from rasterio.vrt import WarpedVRT

        transform = from_bounds(*bbox, width=width, height=height)
        out = np.zeros((5, height, width), np.float32)
        applied = bool(item["properties"].get("earthsearch:boa_offset_applied", True))
        offset = self._dn_offset.get(item["id"], 0.0 if applied else 1000.0) / 10000.0
        for i, key in enumerate(("red", "green", "blue", "scl")):
            path = self.root / item["assets"][key]["href"]
            with (
                rasterio.open(path) as src,
                WarpedVRT(
                    src,
                    crs=crs,
                    transform=transform,
                    width=width,
                    height=height,
                    src_nodata=0,
                    nodata=0,
                    resampling=Resampling.nearest if key == "scl" else Resampling.cubic,
                ) as vrt,
            ):
                band = vrt.read(1).astype(np.float32)
            if key != "scl":
                valid = band > 0
                # harmonised reflectance, as Sentinel Hub returns by default
                band = np.where(valid, band / 10000.0 - offset, 0.0)
            out[i] = band
        out[4] = (out[3] > 0).astype(np.float32)
        return out

    @staticmethod
    def _tiff(arr: np.ndarray) -> bytes:
        from rasterio.io import MemoryFile

        with MemoryFile() as mem:
            with mem.open(
                driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype="float32"
            ) as dst:
                dst.write(arr)
            return mem.read()
