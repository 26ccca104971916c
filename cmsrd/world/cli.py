"""`cmsrd world`: generate an offline world, and serve one on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from ..errors import InputError
from .config import WorldConfig


def _center(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lon, lat = (float(v) for v in value.split(","))
    except ValueError:
        raise InputError("--center", f"{value!r} is not LON,LAT", "e.g. --center 11.70,48.40") from None
    return lon, lat


def _ints(opt: str, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise InputError(opt, f"{value!r} is not a comma-separated list of integers", "e.g. 16,17,18") from None


def _strs(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


@click.group("world")
def world() -> None:
    """Offline synthetic world: HR imagery, Sentinel-2-like L2A, OSM PBF, STAC (tests and demo)."""


@world.command("generate")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Directory to create.")
@click.option("--seed", type=int, default=None, help="Seed (default 0); same seed -> identical files.")
@click.option("--name", default=None, help="World name.")
@click.option("--center", default=None, help="LON,LAT of the world centre (default 11.70,48.40, Freising).")
@click.option("--extent-m", type=float, default=None, help="Ground size in metres (rounded to whole z16 tiles).")
@click.option("--zooms", default=None, help="XYZ zooms, consecutive, ending at the HR zoom (default 16,17,18).")
@click.option("--hr-zoom", type=int, default=None, help="HR pixel grid zoom, 18 or 19 (default 18).")
@click.option("--hr-date", default=None, help="HR capture date YYYY-MM-DD.")
@click.option("--s2-dates", default=None, help="Comma-separated Sentinel-2 dates.")
@click.option("--cloudy-dates", default=None, help="Which S2 dates get a cloud patch ('' for none).")
@click.option("--s2-margin-m", type=float, default=None, help="S2 crop margin beyond the world, metres.")
@click.option("--shift-px", default=None, help="Fixed S2 shift 'EAST,NORTH' in S2 pixels (default: from seed).")
@click.option("--small", is_flag=True, help="Start from the small test world instead of the default one.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate_command(
    out: Path,
    seed,
    name,
    center,
    extent_m,
    zooms,
    hr_zoom,
    hr_date,
    s2_dates,
    cloudy_dates,
    s2_margin_m,
    shift_px,
    small,
    quiet,
) -> None:
    """Generate a deterministic offline world into OUT (atomic; reuses OUT if it holds the same world)."""
    from .generate import generate_world

    kw: dict = {}
    if seed is not None:
        kw["seed"] = seed
    if name is not None:
        kw["name"] = name
    c = _center(center)
    if c is not None:
        kw["center_lon"], kw["center_lat"] = c
    if extent_m is not None:
        kw["extent_m"] = extent_m
    if (z := _ints("--zooms", zooms)) is not None:
        kw["zooms"] = z
    if hr_zoom is not None:
        kw["hr_zoom"] = hr_zoom
    if hr_date is not None:
        kw["hr_capture_date"] = hr_date
    if (d := _strs(s2_dates)) is not None:
        kw["s2_dates"] = d
        kw.setdefault("cloudy_dates", d[:1])
    if (d := _strs(cloudy_dates)) is not None:
        kw["cloudy_dates"] = d
    if s2_margin_m is not None:
        kw["s2_margin_m"] = s2_margin_m
    if shift_px is not None:
        try:
            kw["s2_shift_px"] = tuple(float(v) for v in shift_px.split(","))
        except ValueError:
            raise InputError("--shift-px", f"{shift_px!r} is not EAST,NORTH", "e.g. --shift-px 0.3,-0.2") from None
    cfg = WorldConfig.small(**kw) if small else WorldConfig(**kw)
    t0 = time.perf_counter()
    path = generate_world(cfg, out, progress=not quiet)
    meta = json.loads((path / "world.json").read_text())
    click.echo(f"world '{meta['name']}' (seed {meta['seed']}) at {path} in {time.perf_counter() - t0:.1f} s")
    click.echo(f"  bounds lon/lat {meta['bounds_lonlat']}  zooms {meta['zooms']}  UTM EPSG:{meta['utm_epsg']}")
    click.echo(f"  Sentinel-2 items: {', '.join(meta['s2_items'])}")


@world.command("serve")
@click.argument("world_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=0, show_default=True, help="TCP port; 0 picks a free one.")
@click.option(
    "--latency", "latency_s", default=0.0, help="Seconds added to every request (under --fault-path, if given)."
)
@click.option("--error-rate", default=0.0, help="Share of requests answered 429/500/503.")
@click.option("--error-codes", default="429,500,503", show_default=True, help="Statuses for errors.")
@click.option("--timeout-rate", default=0.0, help="Share of requests held without an answer.")
@click.option("--timeout-s", default=30.0, show_default=True, help="How long a held request is held.")
@click.option("--corrupt-rate", default=0.0, help="Share of bodies with altered bytes.")
@click.option("--truncate-rate", default=0.0, help="Share of bodies cut short.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fault sequence.")
@click.option("--fault-path", "paths", multiple=True, help="Fault only URL paths with this prefix.")
def serve_command(
    world_dir: Path, host: str, port: int, error_codes: str, paths: tuple[str, ...], **rates: Any
) -> None:
    """Serve WORLD_DIR on loopback: Esri-shaped tiles + identify, STAC API, ranged files, Geofabrik.

    Test and demo infrastructure only; real runs talk to the real services.
    """
    from .faults import FaultConfig
    from .servers import WorldServer

    try:
        codes = tuple(int(c) for c in error_codes.split(",") if c.strip())
    except ValueError:
        raise InputError(
            "--error-codes", f"{error_codes!r} is not a comma-separated list of statuses", "e.g. --error-codes 429,503"
        ) from None
    faults = FaultConfig(error_codes=codes, paths=paths or None, **rates)

    srv = WorldServer(world_dir, host=host, port=port, faults=faults if faults.active else None)
    click.echo(f"serving {world_dir} at {srv.base_url}  (Ctrl-C stops)")
    for label, url in (
        ("tiles", srv.tile_template),
        ("identify", srv.identify_url),
        ("stac", srv.stac_url),
        ("geofabrik", srv.geofabrik_index_url),
        ("files", srv.files_url),
    ):
        click.echo(f"  {label:9s} {url}")
    srv.serve_forever()
