"""The benchmark-run contract on disk: leaderboard.csv, per_image.csv, run.json (DESIGN.md).

    <run>/leaderboard.csv   one row per method x condition (failed and unsupported ones too, with reason)
    <run>/per_image.csv     one row per method x condition x image with every image-level metric
    <run>/run.json          provenance: versions, git sha, device, seeds, dataset id + manifest hash,
                            metric definitions and directions, weights hashes, command line
    <run>/sr/<method>/<condition>/<id>.png   the SR images

Writers are atomic; readers (`read_run`) are what `cmsrd-bench report` uses.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from cmsrd.errors import InputError
from cmsrd.io import atomic_path, atomic_write_text

LEADERBOARD_CSV = "leaderboard.csv"
PER_IMAGE_CSV = "per_image.csv"
RUN_JSON = "run.json"
SR_DIR = "sr"

HEAD_COLUMNS = ["method", "condition", "split", "n_images", "scale", "status", "reason"]
TAIL_COLUMNS = ["images_per_s", "sec_per_image", "peak_mem_gb", "nfe", "params_m", "trainable_params_m", "weights_sha256"]
PACKAGES = ("cmsrd", "torch", "torchvision", "numpy", "lpips", "pyiqa", "torch-fidelity", "opencv-python-headless",
            "scikit-image", "diffusers", "spandrel")


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


def write_per_image(run: str | Path, rows: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> Path:
    cols = ["method", "condition", "split", "id"] + [m for m in metric_names]
    df = pd.DataFrame(list(rows), columns=cols)
    path = Path(run) / PER_IMAGE_CSV
    _write_csv(path, df)
    return path


def write_run_json(run: str | Path, info: dict[str, Any]) -> Path:
    path = Path(run) / RUN_JSON
    atomic_write_text(path, json.dumps(info, indent=2, default=str, allow_nan=True) + "\n")
    return path


def read_run(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(leaderboard, per_image, run.json) of a finished run."""
    run = Path(run)
    if not (run / LEADERBOARD_CSV).exists() or not (run / RUN_JSON).exists():
        raise InputError(f"benchmark run {run}", f"has no {LEADERBOARD_CSV} / {RUN_JSON}", "point at an output folder of `cmsrd-bench run`")
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
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=20).stdout.strip() != ""
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 2), capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def command_line() -> list[str]:
    return list(sys.argv)
