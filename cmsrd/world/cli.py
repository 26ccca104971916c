"""`cmsrd world`: generate an offline world, and serve one on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


# `cmsrd world serve` is engineer B's command (cmsrd.world.servers): prints the loopback URLs and blocks.
from .servers import serve_command  # noqa: E402

world.add_command(serve_command, "serve")
