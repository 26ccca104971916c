"""`cmsrd plan | build | sample | validate | info`: the dataset half's command line."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import click

from .errors import InputError
from .journal import JOURNAL, STATE_DIR


def _load(preset: str, **overrides):
    from .config import load_config

    return load_config(preset, **{k: v for k, v in overrides.items() if v is not None})


@click.command("plan")
@click.argument("preset")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="Plan Parquet to write.")
@click.option("--samples", type=int, default=None, help="Override the preset's sample count.")
@click.option("--seed", type=int, default=None, help="Override the preset's seed.")
def plan_command(preset: str, out: str, samples: int | None, seed: int | None) -> None:
    """Sample tiles of PRESET's AOIs with a spatially blocked split and write the editable plan (GeoParquet).

    Example: `cmsrd plan demo-real --out plan.parquet`"""
    from .plan import make_plan, write_plan

    cfg = _load(preset, samples=samples, seed=seed)
    if cfg.world is not None:
        from .demo import ensure_world

        meta = json.loads((ensure_world(cfg) / "world.json").read_text())
        df = make_plan(cfg, tuple(meta["bounds_lonlat"]))
    else:
        df = make_plan(cfg)
    write_plan(df, out)
    counts = df["split"].value_counts().to_dict()
    click.echo(
        f"planned {len(df)} samples ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) "
        f"in {df['aoi'].nunique()} AOIs, {df['block'].nunique()} blocks -> {out}"
    )


@click.command("build")
@click.argument("preset")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Dataset directory.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="LocalCluster worker processes (0: in-process, a thread pool). Default: in-process below 4 cores, "
    "else cores / 2.",
)
@click.option(
    "--threads",
    type=int,
    default=2,
    show_default=True,
    help="Threads per worker, or of the in-process pool (the stages release the GIL in encoding and I/O).",
)
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler (tcp://host:port).")
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Use this (edited) plan instead of sampling from the preset.",
)
@click.option("--force", is_flag=True, help="Discard a previous build in --out and redo everything.")
@click.option("--limit", type=int, default=None, help="Build only the first N planned samples.")
@click.option("--samples", type=int, default=None, help="Override the preset's sample count.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_command(preset, out, workers, threads, scheduler, plan_path, force, limit, samples, quiet) -> None:
    """Build (or resume) the dataset of PRESET (a name under manifests/presets or a YAML path).

    Example: `cmsrd build demo-real --out out/demo/demo-real`"""
    from .driver import run_build
    from .plan import read_plan

    if (workers is not None and workers < 0) or threads < 1:
        raise InputError("--workers/--threads", "must be >= 0 and >= 1", "use e.g. --workers 2 --threads 2")
    if limit is not None and limit < 1:
        raise InputError("--limit", f"is {limit}", "give a positive number of samples")
    cfg = _load(preset, samples=samples)
    check_out_dir(Path(out))
    plan = read_plan(plan_path) if plan_path else None
    if cfg.world is None and plan is None:
        from .config import load_aois

        load_aois(cfg)  # a bad AOI file is one error before the output dir is touched
    if cfg.world is None and not quiet:
        click.echo(needs(cfg), err=True)
    with discard_if_new(Path(out)):
        rep = run_build(
            cfg,
            out,
            plan=plan,
            workers=workers,
            threads=threads,
            scheduler=scheduler,
            force=force,
            limit=limit,
            progress=not quiet,
        )
    st = rep.counts.get("by_status", {})
    click.echo(
        f"{cfg.name}: {rep.processed} processed ({rep.skipped} already done) in {rep.seconds:.1f}s "
        f"({rep.rate:.2f} samples/s); manifest: ok {st.get('ok', 0)}, rejected {st.get('rejected', 0)}, "
        f"failed {st.get('failed', 0)} -> {out}"
    )
    reasons = rep.counts.get("by_reason", {})
    if reasons:
        click.echo("reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    if not st.get("ok", 0):
        click.echo(
            "error: no sample is ok: the dataset is empty (see the reasons above; fix the cause and run the "
            "build again: it resumes and retries failed samples)",
            err=True,
        )
        click.get_current_context().exit(1)


def check_out_dir(out: Path) -> None:
    """--out must be a folder or creatable as one (no file at it or on the way to it)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is an existing file" if p == out else f"lies under {p}, which is a file"
                raise InputError(f"--out {out}", what, "give a folder path for the dataset")
            return


@contextlib.contextmanager
def discard_if_new(out: Path):
    """An output dir this command created is removed again when the build stops with an error before it
    recorded any sample (bad config, credentials, a refused plan): a failed start leaves nothing behind,
    not even `.cmsrd/lock`. A dir that existed, or one holding journalled samples, is kept (it resumes)."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir():
            journal = out / STATE_DIR / JOURNAL
            if not (journal.exists() and journal.stat().st_size > 0):
                shutil.rmtree(out, ignore_errors=True)
        raise


def needs(cfg) -> str:
    """What a real (non-demo) build reaches out to, printed before it starts."""
    from urllib.parse import urlsplit

    from .sources.registry import hr_spec, lr_spec
    from .stages import redact

    hosts = hr_spec(cfg.hr.source).load().needs(cfg) + lr_spec(cfg.lr.source, cfg.lr.backend).load().needs(cfg)
    hosts.append(f"local OSM file {cfg.map.pbf}" if cfg.map.pbf else urlsplit(cfg.map.geofabrik_index).netloc)
    return redact(f"{cfg.name}: needs network access to " + ", ".join(hosts))


@click.command("sample")
@click.argument("tile")
@click.option("--config", "preset", required=True, help="Preset name or YAML path.")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for the one-sample dataset (created; a folder of the same tile and config resumes).",
)
@click.option("--force", is_flag=True, help="Replace what --out holds.")
def sample_command(tile: str, preset: str, out: str, force: bool) -> None:
    """Build the single triplet Z_X_Y through the build's own stages (preview / debugging).

    Example: `cmsrd sample 18_139586_90683 --config demo-real --out out/one`"""
    import numpy as np

    from .driver import run_build
    from .grid import assign_split
    from .layout import parse_tile_id, read_manifest
    from .plan import plan_from_tiles

    z, x, y = parse_tile_id(tile)
    cfg = _load(preset)
    if z != cfg.zoom:
        raise InputError(
            f"tile {tile}",
            f"is at zoom {z} but preset {cfg.name} builds zoom {cfg.zoom}",
            f"give a zoom-{cfg.zoom} tile id",
        )
    _, _, split = assign_split(np.array([x]), np.array([y]), cfg.split.block_tiles, cfg.split.test_fraction, cfg.seed)
    split = np.where(split == "test", "test", "train")
    aoi = "world" if cfg.world is not None else _aoi_of(cfg, z, x, y)
    plan = plan_from_tiles(z, np.array([x]), np.array([y]), split, np.array([aoi]), cfg.split.block_tiles, cfg.hr_px)
    if not force and (Path(out) / "manifest.parquet").exists():
        held = sorted(read_manifest(out)["id"].astype(str))
        if held != [tile]:  # say so plainly rather than the build's "different config"
            raise InputError(
                f"--out {out}",
                f"holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}, not tile {tile}",
                "use another --out, or pass --force to replace it",
            )
    run_build(cfg, out, plan=plan, workers=0, force=force, progress=False)
    row = read_manifest(out).iloc[0]
    click.echo(
        f"{tile}: {row['qa_status']}"
        + (
            f" ({row['qa_reason']}: {row['qa_detail']})"
            if row["qa_status"] != "ok"
            else f" -> {Path(out) / str(row['path_hr'])}"
        )
    )
    if row["qa_status"] == "failed":  # a source fault, not a QA verdict: the triplet was not built
        click.get_current_context().exit(1)


def _aoi_of(cfg, z: int, x: int, y: int) -> str:
    from shapely.geometry import Point

    from .config import load_aois
    from .grid import tile_center_lonlat

    lon, lat = tile_center_lonlat(z, x, y)
    for a in load_aois(cfg):
        if a.geometry.contains(Point(lon, lat)):
            return a.name
    raise InputError(
        f"tile {z}_{x}_{y}",
        f"lies outside every AOI of preset {cfg.name}",
        "pick a tile inside an AOI (see `cmsrd plan`)",
    )


@click.command("validate")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
def validate_command(root: str) -> None:
    """Recompute checksums and check sizes, georeference and split disjointness of a built dataset.

    Example: `cmsrd validate out/demo/demo-real`"""
    from .validate import validate_dataset

    problems, summary = validate_dataset(root)
    click.echo(summary)
    if problems:
        for p in problems[:50]:
            click.echo(f"  problem: {p}", err=True)
        if len(problems) > 50:
            click.echo(f"  ... and {len(problems) - 50} more", err=True)
        raise click.exceptions.Exit(1)
    click.echo("valid")


@click.command("info")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print dataset.json.")
def info_command(root: str, as_json: bool) -> None:
    """Summarise a built dataset: geometry, sources, counts per split and QA reason.

    Example: `cmsrd info out/demo/demo-real --json`"""
    from .layout import read_dataset_json, read_manifest

    meta = read_dataset_json(root)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    df = read_manifest(root)
    click.echo(
        f"{meta['name']} v{meta['version']}: x{meta['scale']} ({meta['lr_px']} -> {meta['hr_px']} px), "
        f"zoom {meta.get('zoom')}, {meta['crs']}"
    )
    for k, s in meta["sources"].items():
        s = s if isinstance(s, dict) else {"source": s}  # a hand-made dataset.json may name a source only
        note = s.get("attribution") or s.get("method")  # a bicubic LR has no attribution: say how it was made
        click.echo(f"  {k}: {s.get('source')}" + (f"  ({note})" if note else ""))
    tab = df.groupby(["split", "qa_status"]).size().unstack(fill_value=0)
    click.echo(tab.to_string())
    reasons = df[df["qa_status"] != "ok"]["qa_reason"].value_counts()
    if len(reasons):
        click.echo("reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    ok = df[df["qa_status"] == "ok"]
    if len(ok):
        for line in ground_summary(ok, int(meta["scale"])):
            click.echo(line)
        click.echo(f"map building fraction {ok['frac_building'].mean():.3f} mean")


# (column, label, number format, unit) of the ground-resolution lines of `cmsrd info`
_GROUND = (
    ("hr_gsd_m", "HR ground resolution", "{:.3f}", "m/px"),
    ("lr_native_gsd_m", "LR native resolution", "{:.2f}", "m/px"),
    ("lr_native_px", "native LR pixels across", "{:.1f}", "px"),
    ("effective_scale", "effective scale", "x{:.1f}", ""),
)


def ground_summary(ok, nominal_scale: int) -> list[str]:
    """Median [min - max] of the true ground resolutions over the ok samples; the nominal x`scale` is the pixel
    ratio, the effective scale the ground one (they differ for a real LR: a z18 tile is not 16 x 10 m wide)."""
    lines = [f"ground resolution over {len(ok)} ok samples: median [min - max]"]
    for col, label, fmt, unit in _GROUND:
        if col not in ok.columns or ok[col].isna().all():  # a dataset built before the column existed
            continue
        v = ok[col].astype(float)
        note = f"(nominal x{nominal_scale})" if col == "effective_scale" else unit
        lines.append(f"  {label:<24} {fmt.format(v.median())} [{fmt.format(v.min())} - {fmt.format(v.max())}] {note}")
    return lines if len(lines) > 1 else []
