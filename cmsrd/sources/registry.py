"""Name -> HR / LR source, as `baselines.registry` does for methods (BasicSR's pattern).

`hr.source` and `lr.source` (+ `lr.backend` for a source with several backends) of a preset name a
registered `SourceSpec`; the build constructs the class with `cls.from_config(cfg, cache_dir)` and reads
its static `provenance(cfg)` (LR: dataset.json entries) and `needs(cfg)` (hosts, printed before a build). Specs are
plain data with a lazy "module:Class" target, so checking a preset's names imports no source client.
Adding a source (NAIP, a local GeoTIFF mosaic, Planet) is one module holding a class with `from_config`
and the protocol of `cmsrd.sources.base` (`HRSource`, or `LRSource`: search then fetch_footprint), plus
one `register(...)` line below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import unknown_name

ROLES = ("hr", "lr")


@dataclass(frozen=True)
class SourceSpec:
    """One registered source: what a preset names and where its class lives."""

    role: str  # "hr" | "lr"
    name: str  # the value of hr.source / lr.source
    target: str  # "module:Class"; the class has `from_config(cfg, cache_dir)`
    backend: str | None = None  # the value of lr.backend, for a source with several backends
    block_search: bool = False  # LR: its `search` is a catalogue query worth running once per block of samples
    # LR: the sensor's native ground sample distance (m), recorded per sample with the effective scale
    # (`cmsrd.sources.base.footprint_resolution`); None: computed from the HR (the LR pixel is tile / lr_px).
    native_gsd_m: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"source {self.name!r}: role {self.role!r} not in {ROLES}")
        if ":" not in self.target:
            raise ValueError(f"source {self.name!r}: target {self.target!r} is not 'module:Class'")

    def load(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)

    def build(self, cfg: Any, cache_dir: str | None = None) -> Any:
        """The source for a `DatasetConfig` (typed `Any`: `cmsrd.config` imports this module)."""
        return self.load().from_config(cfg, cache_dir)


def http_options(cfg: Any) -> dict[str, Any]:
    """`timeout`, `retry` and `rate` of an HTTP-backed source, from the preset's `build:` section."""
    from .http import RetryPolicy

    b = cfg.build
    return {
        "timeout": (10.0, b.timeout_s),
        "retry": RetryPolicy(retries=b.http_retries, backoff=b.http_backoff_s),
        "rate": b.rate_per_worker or None,
    }


_SPECS: dict[tuple[str, str, str | None], SourceSpec] = {}


def register(spec: SourceSpec) -> SourceSpec:
    key = (spec.role, spec.name, spec.backend)
    if key in _SPECS and _SPECS[key] != spec:
        raise ValueError(f"{spec.role} source {spec.name!r} (backend {spec.backend!r}) registered twice")
    _SPECS[key] = spec
    return spec


def names(role: str) -> list[str]:
    return sorted({s.name for s in _SPECS.values() if s.role == role})


def backends(role: str = "lr") -> list[str]:
    return sorted({s.backend for s in _SPECS.values() if s.role == role and s.backend})


def hr_spec(name: str) -> SourceSpec:
    """The spec `hr.source` names; an unknown name is one error with the closest registered name."""
    spec = _SPECS.get(("hr", name, None))
    if spec is None:
        raise unknown_name("hr.source", f"unknown value {name!r}", name, names("hr"))
    return spec


def lr_spec(name: str, backend: str) -> SourceSpec:
    """The spec `lr.source` (+ `lr.backend`) names. The backend is checked against every registered
    backend even for a single-backend source, so a typo is caught before the source is switched."""
    found = [s for s in _SPECS.values() if s.role == "lr" and s.name == name]
    if not found:
        raise unknown_name("lr.source", f"unknown value {name!r}", name, names("lr"))
    if backend not in backends("lr"):
        raise unknown_name("lr.backend", f"unknown value {backend!r}", backend, backends("lr"))
    for s in found:
        if s.backend in (None, backend):
            return s
    raise unknown_name(
        "lr.backend", f"{name} has no backend {backend!r}", backend, [s.backend for s in found if s.backend]
    )


register(SourceSpec("hr", "worldimagery", "cmsrd.sources.worldimagery:WorldImageryHR", description="XYZ tiles"))
register(SourceSpec("hr", "raster", "cmsrd.sources.hr_raster:RasterHR", description="a local raster or COG"))
register(SourceSpec("lr", "bicubic", "cmsrd.sources.bicubic:BicubicLR", description="synthetic, from the HR"))
register(
    SourceSpec(
        "lr",
        "sentinel-2",
        "cmsrd.sources.sentinel2:Sentinel2STAC",
        backend="stac",
        block_search=True,
        native_gsd_m=10.0,  # = cmsrd.sources.sentinel2.NATIVE_GSD_M (a test holds them equal)
        description="Sentinel-2 L2A from a STAC API + COGs",
    )
)
register(
    SourceSpec(
        "lr",
        "sentinel-2",
        "cmsrd.sources.sentinelhub_backend:SentinelHubLR",
        backend="sentinelhub",
        native_gsd_m=10.0,
        description="Sentinel-2 L2A from Sentinel Hub's Process API",
    )
)
