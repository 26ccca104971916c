"""`cmsrd validate`: recompute every checksum of a built dataset and check sizes, georeference and splits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .io import sha256_file
from .layout import IMAGE_KINDS, SPLITS, DatasetLayout


def validate_dataset(root: str | os.PathLike, progress: bool = False) -> tuple[list[str], str]:
    """Recompute every checksum and check sizes, georeference and split disjointness.

    Returns (problems, one-line summary); an empty problem list means the dataset is valid.
    """
    from PIL import Image
    from tqdm import tqdm

    from .grid import tile_bounds_3857
    from .layout import read_dataset_json, read_manifest, validate_manifest_schema

    root = Path(root)
    meta = read_dataset_json(root)
    layout = DatasetLayout(root, int(meta["hr_px"]), int(meta["lr_px"]))
    df = read_manifest(root)
    problems = list(validate_manifest_schema(df))
    sizes = {kind: layout.image_size(kind) for kind in IMAGE_KINDS}
    ok = df[df["qa_status"] == "ok"]
    expected: set[str] = set()
    n_files = 0
    for r in tqdm(ok.itertuples(index=False), total=len(ok), disable=not progress, desc="validate", unit="sample"):
        r = r._asdict()
        sid, split = str(r["id"]), str(r["split"])
        if split not in SPLITS:
            problems.append(f"{sid}: unknown split {split!r}")
            continue
        if sid != f"{r['z']}_{r['x']}_{r['y']}":
            problems.append(f"{sid}: id does not match z/x/y {r['z']}/{r['x']}/{r['y']}")
        else:
            tb = tile_bounds_3857(int(r["z"]), int(r["x"]), int(r["y"]))
            got = (r["minx"], r["miny"], r["maxx"], r["maxy"])
            if not np.allclose(tb, got, rtol=0, atol=1e-3):
                problems.append(f"{sid}: bounds {got} are not the tile's EPSG:3857 bounds {tb}")
        for kind in IMAGE_KINDS:
            path = layout.image_path(split, kind, sid)
            expected.add(str(path))
            if r.get(f"path_{kind}") != layout.relpath(path):
                problems.append(f"{sid}: path_{kind} {r.get(f'path_{kind}')!r} != {layout.relpath(path)!r}")
            if not path.exists():
                problems.append(f"{sid}: missing {layout.relpath(path)}")
                continue
            n_files += 1
            if sha256_file(path) != r.get(f"sha256_{kind}"):
                problems.append(f"{sid}: checksum mismatch for {layout.relpath(path)}")
            try:  # decoded, not only opened: a truncated or damaged PNG is a problem, not a traceback
                with Image.open(path) as im:
                    im.load()
                    size = im.size
            except (OSError, SyntaxError, ValueError) as e:
                problems.append(f"{sid}: {layout.relpath(path)} cannot be read as an image ({type(e).__name__}: {e})")
                continue
            if size != (sizes[kind], sizes[kind]):
                problems.append(f"{sid}: {layout.relpath(path)} is {size}, expected {sizes[kind]}x{sizes[kind]}")
        for which in ("hr", "lr"):
            rel = r.get(f"path_geo_{which}")
            if isinstance(rel, str) and rel:
                problems.extend(_check_geotiff(layout, sid, which, rel, r, sizes[which]))
                n_files += 1
    for split in SPLITS:
        for kind in IMAGE_KINDS:
            d = layout.image_dir(split, kind)
            if d.is_dir():
                for p in d.glob("*.png"):
                    if str(p) not in expected:
                        problems.append(f"{layout.relpath(p)}: file of a sample that is not ok in split {split}")
    tr = {(int(a), int(b)) for a, b in zip(ok.loc[ok["split"] == "train", "x"], ok.loc[ok["split"] == "train", "y"])}
    touching = 0
    for a, b in zip(ok.loc[ok["split"] == "test", "x"], ok.loc[ok["split"] == "test", "y"]):
        if any((int(a) + dx, int(b) + dy) in tr for dx in (-1, 0, 1) for dy in (-1, 0, 1)):
            touching += 1
    if touching:
        problems.append(f"split: {touching} test tiles touch (share an edge or corner with) train tiles")
    counts = df.groupby("qa_status").size().to_dict()
    summary = (
        f"{meta['name']}: {len(df)} samples ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}), "
        f"{n_files} files checked, {len(problems)} problems"
    )
    return problems, summary


def _check_geotiff(layout: DatasetLayout, sid: str, which: str, rel: str, r: dict, size: int) -> list[str]:
    import rasterio

    want = layout.relpath(layout.geotiff_path(sid, which))
    if rel != want:  # never follow a manifest path elsewhere (../ traversal)
        return [f"{sid}: path_geo_{which} {rel!r} != {want!r}"]
    path = layout.root / rel
    if not path.exists():
        return [f"{sid}: missing {rel}"]
    out = []
    if sha256_file(path) != r.get(f"sha256_geo_{which}"):
        out.append(f"{sid}: checksum mismatch for {rel}")
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioError as e:
        return [*out, f"{sid}: {rel} cannot be read as a GeoTIFF ({e})"]
    with ds:
        if ds.crs is None or ds.crs.to_epsg() != 3857:
            out.append(f"{sid}: {rel} has CRS {ds.crs}, expected EPSG:3857")
        b = ds.bounds
        if not np.allclose((b.left, b.bottom, b.right, b.top), (r["minx"], r["miny"], r["maxx"], r["maxy"]), atol=1e-3):
            out.append(f"{sid}: {rel} bounds {tuple(b)} differ from the footprint")
        if (ds.width, ds.height) != (size, size):
            out.append(f"{sid}: {rel} is {ds.width}x{ds.height}, expected {size}x{size}")
    return out
