"""The end of a build: the manifest (Parquet + CSV) and dataset.json, written from the journal.

The manifest is streamed in plan order in chunks (last journal record per id), so its size does not bound
memory; its columns are the layout's (`cmsrd.layout.BUILD_COLUMNS`) with fixed dtypes.
"""

from __future__ import annotations

import platform
from typing import Any

import pandas as pd

from .classes import CLASSES
from .config import DatasetConfig
from .demo import world_identity
from .io import atomic_path
from .journal import BuildState, Journal
from .layout import (
    BUILD_COLUMNS,
    BUILD_EXTRA_COLUMNS,
    IMAGE_KINDS,
    SPLITS,
    DatasetLayout,
    conform_manifest,
    geoparquet_table,
    write_dataset_json,
)
from .sources.registry import lr_spec
from .stages import BuildSpec, redact


def finalize(spec: BuildSpec, cfg: DatasetConfig, plan: pd.DataFrame, state: BuildState, chunk: int = 5000) -> dict:
    """Manifest (Parquet + CSV, streamed in plan order, last journal record per id) and dataset.json;
    files of samples that are not ok in their split are removed from the split folders."""
    import pyarrow.parquet as pq

    layout = spec.layout
    journal = Journal(state.journal_path)
    try:
        index = journal.index()
        ids = [sid for sid in plan["id"].astype(str) if sid in index]
        counts: dict[str, Any] = {"total": 0, "by_status": {}, "by_split": {}, "by_reason": {}}
        ok_ids: dict[str, set[str]] = {s: set() for s in SPLITS}
        with atomic_path(layout.manifest_parquet) as ptmp, atomic_path(layout.manifest_csv) as ctmp:
            writer = None
            for start in range(0, max(len(ids), 1), chunk):
                recs = list(journal.read_at([index[s][0] for s in ids[start : start + chunk]]))
                rows = [{k: r.get(k) for k in BUILD_COLUMNS} for r in recs]
                df = conform_manifest(pd.DataFrame(rows, columns=list(BUILD_COLUMNS)))
                for c, dt in BUILD_EXTRA_COLUMNS.items():  # fixed dtypes: every streamed chunk has one schema
                    df[c] = (pd.to_numeric(df[c], errors="coerce") if dt == "float64" else df[c]).astype(dt)
                for r in rows:
                    st, sp, reason = r["qa_status"], r["split"], r["qa_reason"] or ""
                    counts["total"] += 1
                    counts["by_status"][st] = counts["by_status"].get(st, 0) + 1
                    counts["by_split"].setdefault(sp, {}).setdefault(st, 0)
                    counts["by_split"][sp][st] += 1
                    if st != "ok":
                        counts["by_reason"][reason] = counts["by_reason"].get(reason, 0) + 1
                    if st == "ok":
                        ok_ids[sp].add(r["id"])
                table = geoparquet_table(df)  # GeoParquet: footprints and CRS for GIS tools
                if writer is None:
                    writer = pq.ParquetWriter(ptmp, table.schema)
                writer.write_table(table)
                df.to_csv(ctmp, mode="a" if start else "w", header=(start == 0), index=False)
            if writer is not None:
                writer.close()
    finally:
        journal.close()
    _prune_split_folders(layout, ok_ids)
    meta = dataset_meta(cfg, spec.cfg, counts)
    write_dataset_json(layout.root, meta)
    return counts


def _prune_split_folders(layout: DatasetLayout, ok_ids: dict[str, set[str]]) -> None:
    """Only ok samples of a split may have files in that split's folders."""
    for split in SPLITS:
        for kind in IMAGE_KINDS:
            d = layout.image_dir(split, kind)
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.suffix == ".png" and p.stem not in ok_ids[split]:
                    p.unlink()
    geo = layout.root / "geo"
    if geo.is_dir():
        ok_all = set().union(*ok_ids.values())
        for p in geo.glob("*.tif"):
            if p.stem.rsplit("_", 1)[0] not in ok_all:
                p.unlink()


def dataset_meta(cfg: DatasetConfig, rcfg: DatasetConfig, counts: dict) -> dict[str, Any]:
    sources = {
        "hr": {
            "source": rcfg.hr.source,
            "url": redact(rcfg.hr.url),
            "attribution": rcfg.hr.attribution,
            "terms": rcfg.hr.terms,
        },
        "lr": {"source": rcfg.lr.source, **lr_spec(rcfg.lr.source, rcfg.lr.backend).load().provenance(rcfg)},
        "sr": {
            "upsample": rcfg.sr.upsample,
            "method": (
                "cv2.resize INTER_LINEAR (bilinear), as the authors' prepare_lr.py runs"
                if rcfg.sr.upsample == "official"
                else "MATLAB imresize bicubic (Keys a=-0.5)"
            ),
        },
        "map": {
            "source": rcfg.map.source,
            "attribution": rcfg.map.attribution,
            "terms": rcfg.map.terms,
            "legend": {c.name: {"id": c.id, "rgb": list(c.rgb)} for c in CLASSES},
        },
    }
    world = world_identity(cfg)
    if world:  # the world's loopback URLs die with the build: name the world instead
        sources["hr"]["url"] = world
        if "catalogue" in sources["lr"]:
            sources["lr"]["catalogue"] = world
    return {
        "name": cfg.name,
        "version": cfg.version,
        "description": cfg.description,
        "scale": cfg.scale,
        "hr_px": cfg.hr_px,
        "lr_px": cfg.lr_px,
        "zoom": cfg.zoom,
        "crs": "EPSG:3857",
        "sources": sources,
        "counts": counts,
        "config": cfg.content_dict(),
        "fingerprint": cfg.fingerprint(),
        "versions": versions(),
        "official_layout": "SGDM LRHRRefDataset: <split>/hr_<H>, ref_<H>, sr_<L>_<H> paired by sorted z_x_y names",
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "cmsrd",
        "numpy",
        "pandas",
        "pyarrow",
        "dask",
        "distributed",
        "rasterio",
        "shapely",
        "geopandas",
        "osmium",
        "mercantile",
        "pystac-client",
        "pillow",
        "opencv-python-headless",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
