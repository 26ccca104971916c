"""Seconds per metric of the benchmark's metric suite over N image pairs: `python -m perf.metrics_bench`.

Pairs: with `--data DIR` (a dataset built by `cmsrd build`), the HR images of DIR/{train,test}/hr_<H>/ and
as "SR" each one degraded by the dataset scale with the toolkit's MATLAB bicubic and brought back up
(`cmsrd.degrade.synthetic_lr` + `upsample`), plus the 8 dihedral flips/rotations of every HR when the
dataset has fewer than N images; without `--data`, seeded procedural HR images (smooth random fields,
field/building edges, roads, fine texture) degraded the same way, so the script runs anywhere.

Each metric of `benchmark.metrics.METRICS` (or `--metrics`) is built (timed on its own) and run over all
pairs the way `cmsrd-bench run` scores (image metrics through `build_image_metric` on every pair at once,
set metrics through `compute_set_metrics`), with CUDA synchronisation around every timed span. A row per
metric: status `ran`, `skipped` (weights missing: the MissingWeightsError message) or `failed` (any other
exception, type and message; the other metrics go on), build s, run s, ms/image, images/s, mean value.

    image      one SR image scored (with its HR for full-reference metrics); ms/image = run s / pairs
    set rows   FID/KID/patch-FID: torch-fidelity builds its Inception inside each call, so their run s
               includes that build (their build s times the same construction on its own); each metric
               is run alone, so kid repeats fid's Inception pass (`cmsrd-bench run` shares it)

`--stand-in-weights` writes the random stand-ins of `benchmark.testing` (same shapes, so the same FLOPs as
the published networks) into a temporary TORCH_HOME and points CMSRD_WEIGHTS_MANIFEST at their
manifest: every metric's real code path runs and its timing is real, and every row says
`values: "stand-in weights, timing only"`. Without it the real cached weights are used where present.

Imports only numpy/scipy/PIL/yaml/torch, the metric libraries and, with `--data`, pandas (no rasterio,
geopandas, osmium or dask), so it runs on a GPU machine that has none of the geo stack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python perf/metrics_bench.py` from any directory
    sys.path.insert(0, str(REPO))

STAND_IN_NOTE = "stand-in weights, timing only"
REAL_NOTE = "real weights where needed"


# ---- image pairs -----------------------------------------------------------------------------------


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations (k = 0 is the image itself)."""
    out = np.rot90(img, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k % 8 >= 4 else out)


def degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """The "SR" of a pair: MATLAB-bicubic x`scale` downscale, then bicubic back up to the HR size."""
    from cmsrd.degrade import synthetic_lr, upsample

    return upsample(synthetic_lr(hr, scale), hr.shape[:2])


def procedural_hr(size: int, rng: np.random.Generator) -> np.ndarray:
    """One remote-sensing-like uint8 HR image: smooth colour fields, sharp-edged parcels and buildings,
    a road, fine texture. Seeded by `rng`."""
    from cmsrd.degrade import imresize

    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for c in range(3):  # smooth field: a few random low-frequency waves + a bicubic-upsampled 6x6 noise
        f = imresize(rng.normal(0, 1, (6, 6)), output_shape=(size, size))
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            f = f + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        img[..., c] = 110 + 25 * f
    for _ in range(int(rng.integers(2, 5))):  # parcels: flat colour shifts with sharp straight edges
        y0, x0 = rng.integers(0, size, 2)
        h, w = rng.integers(size // 8, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] += rng.normal(0, 30, 3)
    for _ in range(int(rng.integers(4, 12))):  # buildings: small bright/dark rectangles
        y0, x0 = rng.integers(0, size, 2)
        h, w = rng.integers(max(2, size // 40), max(3, size // 10), 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(40, 230, 3)
    # a road: a straight band of grey at a random angle
    ang, off = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8)
    d = np.abs((xx - off) * np.sin(ang) - (yy - 0.5) * np.cos(ang))
    img[d < max(1.5, size / 80) / size] = 95.0
    img += rng.normal(0, 6, img.shape)  # texture finer than any LR pixel
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def procedural_pairs(n: int, size: int, scale: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from cmsrd.errors import InputError

    if size % scale:
        raise InputError(f"--size {size}", f"is not a multiple of --scale {scale}", "pick e.g. --size 256 --scale 16")
    rng = np.random.default_rng(seed)
    hr = [procedural_hr(size, rng) for _ in range(n)]
    return [degrade(h, scale) for h in hr], hr


def dataset_hr_paths(root: Path, split: str) -> tuple[list[Path], int]:
    """Sorted HR PNG paths of a built dataset (one split or both) and the dataset's scale."""
    from cmsrd.errors import InputError
    from cmsrd.layout import SPLITS, DatasetLayout

    layout = DatasetLayout.open(root)
    paths = [
        p for s in (SPLITS if split == "all" else (split,)) for p in sorted(layout.image_dir(s, "hr").glob("*.png"))
    ]
    if not paths:
        raise InputError(
            f"--data {root}",
            f"has no HR images under {split if split != 'all' else '{train,test}'}/{layout.folder('hr')}",
            "build it with `cmsrd build` first",
        )
    return paths, layout.scale


def dataset_pairs(root: Path, n: int, split: str = "all") -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """N pairs from a built dataset: HR images, then their dihedral variants (k = 1..7) when there are
    fewer than N; past 8 x the images the list repeats (`unique_pairs` says how many differ)."""
    from cmsrd.io import read_png

    paths, scale = dataset_hr_paths(root, split)
    base = [read_png(p) for p in paths[:n]]
    hr = [dihedral(base[i % len(base)], (i // len(base)) % 8) for i in range(n)]
    cache: dict[int, np.ndarray] = {}  # a repeated pair is degraded once
    sr = []
    for i in range(n):
        key = i % (8 * len(base))
        if key not in cache:
            cache[key] = degrade(hr[i], scale)
        sr.append(cache[key])
    info = {
        "source": str(root),
        "split": split,
        "hr_images": len(paths),
        "scale": scale,
        "unique_pairs": min(n, 8 * len(base)),
        "augment": "dihedral (8 flips/rotations)" if n > len(base) else "none",
    }
    return sr, hr, info


# ---- environment, weights ----------------------------------------------------------------------------


@contextlib.contextmanager
def stand_in_weights(metric_names: Sequence[str]) -> Iterator[list[str]]:
    """Stand-ins for every weights key the metrics use (that has a maker) in a temporary TORCH_HOME, and
    CMSRD_WEIGHTS_MANIFEST pointing at their manifest; both variables restored afterwards."""
    from benchmark import metrics as M
    from benchmark.testing import MAKERS, write_fake_weights

    keys = list(dict.fromkeys(k for n in metric_names for k in M.get(n).weights if k in MAKERS))
    with (
        tempfile.TemporaryDirectory(prefix="cmsrd-standin-") as tmp,
        mock.patch.dict(os.environ, {"TORCH_HOME": str(Path(tmp) / "torch")}),
    ):
        os.environ["CMSRD_WEIGHTS_MANIFEST"] = str(write_fake_weights(keys, Path(tmp) / "weights.yaml"))
        yield keys


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("torch", "torchvision", "numpy", "lpips", "pyiqa", "torch-fidelity", "openai-clip"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def environment(device: str) -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "device": str(dev),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": _versions(),
        "git_sha": sha,
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---- timing ------------------------------------------------------------------------------------------


def _clock(device: str) -> float:
    """perf_counter after every queued kernel has finished (CUDA is asynchronous)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _mean(values: Sequence[float]) -> float | None:
    finite = [float(v) for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _build_set_extractor(device: str) -> Any:
    """torch-fidelity's Inception extractor as `fid_kid` gets it (the part of a set metric's run that
    does not scale with N), built alone to time it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from baselines.weights import resolve
    from benchmark.metrics.distribution import FEATURE_EXTRACTOR, FEATURE_LAYER

    net = FeatureExtractorInceptionV3(
        FEATURE_EXTRACTOR, [FEATURE_LAYER], feature_extractor_weights_path=str(resolve("fidelity_inception"))
    )
    return net.to(device)


def bench_metric(
    name: str,
    sr: Sequence[np.ndarray],
    hr: Sequence[np.ndarray],
    device: str,
    batch_size: int | None,
    crop_border: int,
    warmup: bool,
) -> dict[str, Any]:
    """Build and run one metric; never raises (status ran / skipped / failed)."""
    from benchmark import metrics as M
    from cmsrd.errors import MissingWeightsError

    m = M.get(name)
    n = len(sr)
    row: dict[str, Any] = {
        "metric": name,
        "level": m.level,
        "direction": m.direction,
        "status": "ran",
        "device": device,
        "n_pairs": n,
        "image_size": list(sr[0].shape[:2]),
        "weights": list(m.weights),
        "batch_size": None,
        "build_s": None,
        "warmup_s": None,
        "run_s": None,
        "ms_per_image": None,
        "images_per_s": None,
        "mean": None,
    }
    try:
        if m.level == "image":
            t0 = _clock(device)
            fn = M.build_image_metric(name, device=device, crop_border=crop_border)
            row["build_s"] = _clock(device) - t0
            if hasattr(fn, "batch_size"):
                if batch_size:
                    fn.batch_size = batch_size
                row["batch_size"] = fn.batch_size
            if warmup:  # first batch alone: lazy CUDA/cuDNN set-up is not per-image cost
                k = row["batch_size"] or 1
                t0 = _clock(device)
                fn(sr[:k], hr[:k])
                row["warmup_s"] = _clock(device) - t0
            t0 = _clock(device)
            vals = fn(sr, hr)
            row["run_s"] = _clock(device) - t0
            row["mean"] = _mean(vals)
            row["n_nonfinite"] = int(sum(not np.isfinite(v) for v in vals))
        else:
            t0 = _clock(device)
            extractor = _build_set_extractor(device)
            row["build_s"] = _clock(device) - t0
            del extractor
            t0 = _clock(device)
            res = M.compute_set_metrics([name], sr, hr, device=device)
            row["run_s"] = _clock(device) - t0
            row["mean"] = float(res[name])
            row["settings"] = {k: v for k, v in res.items() if k != name}
            row["note"] = "run s includes torch-fidelity's own Inception build"
    except MissingWeightsError as e:
        row.update(status="skipped", reason=str(e))
    except Exception as e:  # one metric's failure is recorded; the others still run
        row.update(status="failed", reason=f"{type(e).__name__}: {e}")
    if row["run_s"]:
        row["ms_per_image"] = 1000.0 * row["run_s"] / n
        row["images_per_s"] = n / row["run_s"]
    return row


# ---- output ------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3, small: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not np.isfinite(v):
            return str(v)
        tiny = small and v != 0 and abs(v) < 1e-2  # a value such as KID ~1e-5 keeps its digits
        return f"{v:.4g}" if tiny or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| metric | status | pairs | build s | run s | ms/image | images/s | mean value |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ran" else f"{r['status']}: {r.get('reason', '')[:120]}"
        arrow = "↑" if r["direction"] == "higher" else "↓"
        cells = [f"{r['metric']} {arrow}", status, r["n_pairs"], _fmt(r["build_s"], 2), _fmt(r["run_s"], 2)]
        cells += [_fmt(r["ms_per_image"], 1), _fmt(r["images_per_s"], 2), _fmt(r["mean"], 4, small=True)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_limits(items: Sequence[str]) -> dict[str, int]:
    from benchmark import metrics as M
    from cmsrd.errors import InputError

    out: dict[str, int] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, _, num = part.partition("=")
            if not num.isdigit() or int(num) < 1:
                raise InputError(f"--limit {part}", "expected NAME=N with N >= 1", "e.g. --limit musiq=50,patch_fid=20")
            M.get(name)
            out[name] = int(num)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmark import metrics as M

    names = M.parse_names(args.metrics)
    limits = parse_limits(args.limit)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    if args.data:
        sr, hr, pairs_info = dataset_pairs(Path(args.data), args.n, args.split)
    else:
        sr, hr = procedural_pairs(args.n, args.size, args.scale, args.seed)
        pairs_info = {"source": "procedural", "seed": args.seed, "scale": args.scale, "unique_pairs": args.n}
    pairs_info["seconds_to_make"] = round(time.perf_counter() - t0, 2)
    env = environment(device)
    env.update(
        n_pairs=len(sr),
        image_size=list(hr[0].shape[:2]),
        pairs=pairs_info,
        crop_border=args.crop_border,
        stand_in_weights=bool(args.stand_in_weights),
        metrics=names,
        limits=limits,
        args=vars(args),
    )
    rows: list[dict[str, Any]] = []
    with stand_in_weights(names) if args.stand_in_weights else contextlib.nullcontext([]) as keys:
        env["stand_in_keys"] = keys
        for name in names:
            k = limits.get(name, len(sr))
            row = bench_metric(name, sr[:k], hr[:k], device, args.batch_size, args.crop_border, not args.no_warmup)
            row["values"] = STAND_IN_NOTE if args.stand_in_weights else REAL_NOTE
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    env["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {"environment": env, "rows": rows}
    if args.out:
        from cmsrd.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=2, default=str) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="built dataset folder (DIR/{train,test}/hr_<H>/*.png); default: procedural pairs")
    ap.add_argument(
        "--split", default="all", choices=["all", "train", "test"], help="HR images of which split (with --data)"
    )
    ap.add_argument("--n", type=int, default=300, help="number of image pairs (default 300)")
    ap.add_argument("--size", type=int, default=256, help="procedural image side in px (default 256)")
    ap.add_argument(
        "--scale", type=int, default=16, help="procedural degradation factor (default 16; --data uses the dataset's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", default="all", help="comma list, 'default' or 'all' (default: all)")
    ap.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=N",
        help="score NAME on its first N pairs only (slow metrics on CPU), e.g. musiq=50; repeatable",
    )
    ap.add_argument("--device", default=None, help="cuda / cuda:1 / cpu (default: cuda if available, else cpu)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size of the metrics that batch (lpips, dists, musiq, clipiqa); default: each metric's own",
    )
    ap.add_argument(
        "--crop-border", type=int, default=0, help="PSNR/SSIM border crop (default 0, as `cmsrd-bench run`)"
    )
    ap.add_argument("--no-warmup", action="store_true", help="do not run one untimed batch before timing image metrics")
    ap.add_argument(
        "--stand-in-weights",
        action="store_true",
        help="random stand-in weights in a temp TORCH_HOME: real code paths and timings, values meaningless",
    )
    ap.add_argument("--out", help="write environment + rows as JSON (atomically)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        build_parser().error("--n must be >= 1")
    from cmsrd.errors import InputError

    try:
        report = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = report["environment"]
    print()
    weights = "stand-in weights, timing only" if env["stand_in_weights"] else "real weights"
    size = f"{env['image_size'][0]}x{env['image_size'][1]}"
    print(
        f"{env['n_pairs']} pairs of {size} on {env['device']} ({env['device_name']}), "
        f"torch {env['versions']['torch']}, {weights}"
    )
    print(markdown_table(report["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
