"""The benchmark-run contract on disk: leaderboard.csv, per_image.csv, run.json (DESIGN.md).

    <run>/leaderboard.csv   one row per method x condition (failed and unsupported ones too, with reason)
    <run>/per_image.csv     one row per method x condition x image with every image-level metric
    <run>/run.json          provenance: versions, git sha, device, seeds, dataset id + manifest hash,
                            metric definitions and directions, weights hashes, command line
    <run>/leaderboard.columns.csv   column, direction, definition for every leaderboard.csv column, so the
                            CSV (what people paste into papers) never stands without its definitions
    <run>/sr/<method>/<condition>/<id>.png   the SR images

Writers are atomic; readers (`read_run`) are what `cmsrd-bench report` uses.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from cmsrd.errors import InputError
from cmsrd.io import atomic_path, atomic_write_text

LEADERBOARD_CSV = "leaderboard.csv"
COLUMNS_CSV = "leaderboard.columns.csv"
PER_IMAGE_CSV = "per_image.csv"
RUN_JSON = "run.json"
SR_DIR = "sr"

HEAD_COLUMNS = ["method", "condition", "split", "n_images", "scale", "status", "reason"]
TAIL_COLUMNS = [
    "images_per_s",
    "sec_per_image",
    "peak_mem_gb",
    "nfe",
    "params_m",
    "trainable_params_m",
    "weights_sha256",
    "n_timed",
    "final_batch_size",
    "oom_halvings",
    "metric_errors",
]
TIMING_DIRECTIONS = {"images_per_s": "higher", "sec_per_image": "lower", "peak_mem_gb": "lower"}
# What the timer holds; the one text behind both run.json's definitions.timing and the columns sidecar.
TIMED_WINDOW = (
    "model_seconds is the wall time of the method's super-resolve call (baselines.inference.super_resolve_batch: "
    "autocast, no-grad, the method, output shape check and clamp) summed over batches, with CUDA synchronisation "
    "before and after each call. Outside the timer: batch assembly, PNG reads (including the partner maps/styles "
    "of shuffle conditions), the host-to-device copy of the method's inputs, writing the SR PNGs, and the untimed "
    "warm-up batch (repeated after each out-of-memory halving)."
)
TIMING_COLUMNS = {
    "images_per_s": f"Images per second: n_timed / model_seconds. {TIMED_WINDOW}",
    "sec_per_image": "Seconds per image: model_seconds / n_timed (model_seconds as for images_per_s).",
    "peak_mem_gb": (
        "torch.cuda.max_memory_allocated since the last out-of-memory halving, GB (1e9 bytes); empty on CPU."
    ),
    "n_timed": "Images inside the timer, super-resolved by the session that finished the row: fewer than n_images "
    "when a killed run was resumed; a rerun that finds every image made keeps that session's timing when "
    "it covered the same images, else reports 0.",
    "final_batch_size": "Inference batch size after any out-of-memory halving.",
    "oom_halvings": "How many times the batch size was halved after running out of memory.",
}
COLUMN_DEFINITIONS = {
    "run": "Benchmark run folder the row comes from (merged report).",
    "group": "Comparability group of the merged report: rows are ranked only against rows of the same group "
    "(same dataset manifest, split, scale, images and metric definitions); timing columns only against "
    "rows that also ran on the same device (GPU name, or CPU) and precision.",
    "method": "Method name in the baselines registry.",
    "condition": "Inference condition (default, or e.g. map=shuffle / style=shuffle ablations).",
    "split": "Dataset split the images come from.",
    "n_images": "Number of images scored (0 when the method did not run).",
    "scale": "Super-resolution factor (HR side / LR side).",
    "status": "ok | reference (the `hr` row: HR tiles as the output, never ranked) | failed | unsupported | skipped; "
    "metric cells are empty unless ok or reference.",
    "reason": "Why the method did not run (empty when ok).",
    "nfe": "Network function evaluations per image (denoising steps for diffusion methods, 1 for feed-forward).",
    "params_m": "Parameters of the method's networks, millions.",
    "trainable_params_m": "Trainable parameters, millions.",
    "weights_sha256": "SHA-256 of the weights file the method loaded (empty: no weights file).",
    "metric_errors": "Metrics that failed for this row and why (their cells are empty); see run.json metrics_failed.",
    **TIMING_COLUMNS,
}
PACKAGES = (
    "cmsrd",
    "torch",
    "torchvision",
    "numpy",
    "lpips",
    "pyiqa",
    "torch-fidelity",
    "opencv-python-headless",
    "scikit-image",
    "diffusers",
    "spandrel",
)


def condition_slug(condition: str) -> str:
    """Folder-safe name of a condition (`map=shuffle,steps=20` -> `map-shuffle_steps-20`)."""
    return condition.replace("=", "-").replace(",", "_").replace("@", "at").replace("/", "_") or "default"


def sr_dir(run: str | Path, method: str, condition: str) -> Path:
    return Path(run) / SR_DIR / method / condition_slug(condition)


def leaderboard_columns(metric_names: Sequence[str]) -> list[str]:
    return HEAD_COLUMNS + list(metric_names) + TAIL_COLUMNS


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_leaderboard(run: str | Path, rows: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> Path:
    cols = leaderboard_columns(metric_names)
    extra = sorted({k for r in rows for k in r} - set(cols))
    df = pd.DataFrame(list(rows), columns=cols + extra)
    path = Path(run) / LEADERBOARD_CSV
    _write_csv(path, df)
    return path


def columns_path(csv: str | Path) -> Path:
    """The sidecar describing a leaderboard CSV's columns (`leaderboard.csv` -> `leaderboard.columns.csv`)."""
    csv = Path(csv)
    return csv.with_name(f"{csv.stem}.columns.csv")


def status_note(metric: dict[str, Any]) -> str:
    """'Skipped: …' / 'Failed: …' for a run.json metric entry that did not produce numbers everywhere ('' when
    it ran): why some cells of its column are empty."""
    status = metric.get("status")
    return f"{status.capitalize()}: {metric.get('reason')}" if status in ("skipped", "failed") else ""


def column_table(columns: Sequence[str], metrics: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """column, direction (higher/lower better, empty when not a score) and definition of each column.

    `metrics` is run.json's `metrics` mapping (name -> direction, definition, status, reason); a merged
    report's entry carries `notes` instead (one `status_note` per run that did not compute it)."""
    rows = []
    for c in columns:
        if c in metrics:
            m = metrics[c]
            note = "; ".join(m.get("notes") or []) or status_note(m)
            rows.append((c, m.get("direction", ""), m.get("definition", "") + (f" {note}." if note else "")))
        else:
            rows.append((c, TIMING_DIRECTIONS.get(c, ""), COLUMN_DEFINITIONS.get(c, "See run.json.")))
    return pd.DataFrame(rows, columns=["column", "direction", "definition"])


def write_columns(csv: str | Path, columns: Sequence[str], metrics: dict[str, dict[str, Any]]) -> Path:
    """Write the column sidecar next to the leaderboard CSV `csv`."""
    path = columns_path(csv)
    _write_csv(path, column_table(columns, metrics))
    return path


def write_per_image(run: str | Path, rows: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> Path:
    cols = ["method", "condition", "split", "id"] + [m for m in metric_names]
    df = pd.DataFrame(list(rows), columns=cols)
    path = Path(run) / PER_IMAGE_CSV
    _write_csv(path, df)
    return path


def write_run_json(run: str | Path, info: dict[str, Any]) -> Path:
    """Write run.json and, when the run has a leaderboard.csv, its column sidecar (the metric
    definitions, crop border included, are known only here)."""
    path = Path(run) / RUN_JSON
    atomic_write_text(path, json.dumps(info, indent=2, default=str, allow_nan=True) + "\n")
    board = Path(run) / LEADERBOARD_CSV
    if board.exists():
        write_columns(board, list(pd.read_csv(board, nrows=0).columns), info.get("metrics", {}))
    return path


def read_run(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(leaderboard, per_image, run.json) of a finished run."""
    run = Path(run)
    if not (run / LEADERBOARD_CSV).exists() or not (run / RUN_JSON).exists():
        raise InputError(
            f"benchmark run {run}",
            f"has no {LEADERBOARD_CSV} / {RUN_JSON}",
            "point at an output folder of `cmsrd-bench run`",
        )
    lb = pd.read_csv(run / LEADERBOARD_CSV, keep_default_na=True)
    pi = pd.read_csv(run / PER_IMAGE_CSV) if (run / PER_IMAGE_CSV).exists() else pd.DataFrame()
    info = json.loads((run / RUN_JSON).read_text())
    return lb, pi, info


# ---- provenance ------------------------------------------------------------------------------------


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_info(repo: Path | None = None) -> dict[str, Any]:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            != ""
        )
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        info.update(
            gpu=p.name,
            gpu_memory_gb=round(p.total_memory / 1e9, 2),
            capability=f"{p.major}.{p.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def command_line() -> list[str]:
    return list(sys.argv)
