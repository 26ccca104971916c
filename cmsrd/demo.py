"""Demo presets' offline world: generated once under the cache dir and served on 127.0.0.1 for a build.

A preset with a `world:` section names no real endpoint; `resolved_sources` swaps in the loopback URLs of
the served world, so the rest of the build runs exactly as against the real services.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config import DatasetConfig
from .errors import InputError

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CMSRD_CACHE", Path.home() / ".cache" / "cmsrd"))


def ensure_world(cfg: DatasetConfig) -> Path:
    """The demo preset's offline world directory, generated once under the cache dir."""
    from .world.config import WorldConfig

    ref = cfg.world
    if ref.path:
        path = cfg.resolve(ref.path)
        if not (path / "world.json").exists():
            raise InputError(f"world.path {ref.path}", f"{path} holds no world.json", "generate one with `cmsrd world`")
        return path
    wcfg = WorldConfig.from_dict(dict(ref.config))
    base = Path(os.path.expanduser(ref.cache_dir)) if ref.cache_dir else default_cache_dir() / "worlds"
    path = base / f"{wcfg.name}-{wcfg.config_hash()[:12]}"
    if not (path / "world.json").exists():
        from .world.generate import generate_world

        log.info("generating offline world %s (first use)", path)
        generate_world(wcfg, path)
    return path


def world_identity(cfg: DatasetConfig) -> str | None:
    """What dataset.json records instead of the served world's loopback URLs (a new port every build): the
    world's name and config hash, so identical builds write identical dataset.json. None without a world."""
    if cfg.world is None:
        return None
    meta = json.loads((ensure_world(cfg) / "world.json").read_text())
    return f"cmsrd offline world {meta['name']} (config {meta['config_hash'][:12]}, {meta['generator']})"


@contextlib.contextmanager
def resolved_sources(cfg: DatasetConfig, faults: Any = None) -> Iterator[tuple[DatasetConfig, tuple | None]]:
    """Yield (config with live endpoints, world lon/lat bounds or None).

    Demo presets generate (if absent) and serve the offline world on 127.0.0.1 for the duration.
    """
    if cfg.world is None:
        yield cfg, None
        return
    from .world.servers import serve_world

    world = ensure_world(cfg)
    if faults is None and cfg.world.faults:
        from .world.faults import FaultConfig

        faults = FaultConfig(**cfg.world.faults)
    meta = json.loads((world / "world.json").read_text())
    with serve_world(world, host="127.0.0.1", port=0, faults=faults) as srv:
        hr = dataclasses.replace(
            cfg.hr,
            source="worldimagery",
            url=srv.tile_template,
            identify_url=srv.identify_url,
            attribution=meta.get("attribution", cfg.hr.attribution),
            terms="synthetic offline world (no real data)",
        )
        lr = dataclasses.replace(
            cfg.lr,
            stac_url=srv.stac_url,
            attribution="synthetic Sentinel-2-like product of the offline world (no Copernicus data)",
            terms="synthetic offline world (no real data)",
        )
        mp = dataclasses.replace(
            cfg.map,
            pbf=cfg.map.pbf or str(world / "osm" / "world.osm.pbf"),
            attribution="synthetic OSM data of the offline world",
        )
        yield dataclasses.replace(cfg, hr=hr, lr=lr, map=mp), tuple(meta["bounds_lonlat"])
