"""Small built datasets in the real layout, for tests of the method and benchmark halves.

The images are procedural aerial-like scenes (roofs, roads, vegetation texture) with maps and masks
that agree with them, so losses and metrics see structured content rather than white noise.
The dataset half's own tests build from the offline world instead (`cmsrd.world`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .classes import BY_NAME, CLASSES
from .grid import tile_bounds_3857
from .io import sha256_file, write_png
from .layout import DatasetLayout, tile_id, write_dataset_json, write_manifest


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A random scene: class mask and matching RGB 'aerial' image."""
    mask = np.full((size, size), BY_NAME["park"].id, np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    # a forest blob
    cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 6, size / 3)]
    mask[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = BY_NAME["forest"].id
    # water strip
    if rng.random() < 0.5:
        x0 = int(rng.uniform(0, size * 0.8))
        mask[:, x0 : x0 + size // 10] = BY_NAME["water"].id
    # roads
    for _ in range(2):
        w = max(2, size // 32)
        if rng.random() < 0.5:
            y0 = int(rng.uniform(0, size - w))
            mask[y0 : y0 + w, :] = BY_NAME["road"].id
        else:
            x0 = int(rng.uniform(0, size - w))
            mask[:, x0 : x0 + w] = BY_NAME["major_road"].id
    # buildings
    for _ in range(int(rng.integers(3, 9))):
        w, h = (int(v) for v in rng.integers(size // 16, size // 6, 2))
        x0, y0 = (int(v) for v in rng.integers(0, size - max(w, h), 2))
        mask[y0 : y0 + h, x0 : x0 + w] = BY_NAME["building"].id
    base = {
        "park": (96, 128, 70),
        "forest": (45, 75, 40),
        "water": (40, 70, 95),
        "road": (150, 148, 140),
        "major_road": (120, 118, 112),
        "building": (170, 110, 90),
    }
    img = np.zeros((size, size, 3), np.float32)
    for name, rgb in base.items():
        img[mask == BY_NAME[name].id] = rgb
    img += rng.normal(0, 12, (size, size, 1)) + rng.normal(0, 4, (size, size, 3))
    return mask, np.clip(img, 0, 255).astype(np.uint8)


def make_tiny_dataset(
    root: str | Path,
    n_train: int = 6,
    n_test: int = 4,
    hr_px: int = 64,
    lr_px: int = 4,
    seed: int = 0,
    z: int = 18,
) -> DatasetLayout:
    """Write a complete dataset (PNG folders, manifest, dataset.json) and return its layout."""
    from .degrade import imresize

    layout = DatasetLayout(Path(root), hr_px, lr_px)
    palette = np.zeros((256, 3), np.uint8)
    for c in CLASSES:
        palette[c.id] = c.rgb
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        x, y = 137000 + i, 91000 + 2 * i
        sid = tile_id(z, x, y)
        mask, hr = _scene(rng, hr_px)
        lr = imresize(hr, output_shape=(lr_px, lr_px))
        images = {
            "hr": hr,
            "lr": lr,
            "sr": imresize(lr, output_shape=(hr_px, hr_px)),
            "map": palette[mask],
            "mask": mask,
        }
        row = {
            "id": sid,
            "split": split,
            "z": z,
            "x": x,
            "y": y,
            **dict(zip(("minx", "miny", "maxx", "maxy"), tile_bounds_3857(z, x, y))),
            "qa_status": "ok",
            "qa_reason": "",
            "hr_source": "testing",
            "lr_source": "bicubic",
            "map_source": "testing",
        }
        for kind, arr in images.items():
            path = layout.image_path(split, kind, sid)
            write_png(path, arr)
            row[f"path_{kind}"] = layout.relpath(path)
            row[f"sha256_{kind}"] = sha256_file(path)
        for c in CLASSES:
            row[f"frac_{c.name}"] = float((mask == c.id).mean())
        rows.append(row)
    write_manifest(layout.root, rows)
    write_dataset_json(
        layout.root,
        {
            "name": "tiny-test",
            "version": "0",
            "scale": layout.scale,
            "hr_px": hr_px,
            "lr_px": lr_px,
            "crs": "EPSG:3857",
            "sources": {"hr": "testing", "lr": "bicubic", "map": "testing"},
            "counts": {"train": n_train, "test": n_test},
            "config": {"seed": seed},
        },
    )
    return layout


SCRIPT_MODULES = {"cmsrd": "cmsrd.cli", "cmsrd-bench": "benchmark.cli"}


def run_console_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run console script `name` (cmsrd or cmsrd-bench) as a user does: a fresh process (the venv's
    installed script where there is one, else `python -m`), this checkout first on PYTHONPATH, so exit
    statuses are the real ones (CliRunner hides how `run_cli` turns a status into the exit code)."""
    repo = Path(__file__).resolve().parents[1]
    script = Path(sys.executable).parent / name
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", SCRIPT_MODULES[name]]
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        cmd + list(args), capture_output=True, text=True, env=env, cwd=repo, timeout=timeout, check=False
    )


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed run; asserts there is exactly one and no traceback."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]
