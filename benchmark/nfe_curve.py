"""Quality versus NFE (seeds/000's claim: LR-start sampling keeps quality at a fraction of the steps).

From a report group's rows: every successful row whose condition sets `steps=` or `start=` is a point at its
measured NFE (the `nfe` column), on the line of its method, start mode (`noise`, `lr@T`, or `default` when the
condition leaves the start to the method) and remaining condition (map/style). Methods of the group without
such rows (bicubic, regression models) are flat reference lines at their default condition. The points go to
a CSV beside the figure, so the numbers behind each line can be read back.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from baselines.conditions import Conditions
from cmsrd.io import atomic_path

COLUMNS = ["run", "method", "start", "other_conditions", "condition", "nfe", "psnr_y", "lpips"]


def _split(condition: str) -> tuple[str, str, bool]:
    """(start mode, the condition without steps/start, whether it sets steps or start)."""
    c = Conditions.parse(condition)
    start = f"lr@{c.start_t}" if c.start_t is not None else "noise" if c.noise_start else "default"
    other = Conditions(map=c.map, style=c.style).name
    return start, other, bool({"steps", "start"} & c.keys_used)


def nfe_points(board: pd.DataFrame) -> pd.DataFrame:
    """One row per point (`start` = the line's start mode) and per reference (`start` = "reference")."""
    if "nfe" not in board.columns or "psnr_y" not in board.columns:
        return pd.DataFrame(columns=COLUMNS)
    ok = board[(board.status == "ok") & board.nfe.notna()]
    rows, swept = [], set()
    for _, r in ok.iterrows():
        start, other, sets = _split(str(r.condition))
        if sets:
            swept.add((r.run, r.method))
            rows.append((r.run, r.method, start, other, r.condition, int(r.nfe), r.psnr_y, r.get("lpips")))
    for _, r in ok.iterrows():
        if (r.run, r.method) not in swept and r.condition == "default":
            rows.append((r.run, r.method, "reference", "default", r.condition, int(r.nfe), r.psnr_y, r.get("lpips")))
    if not swept:
        return pd.DataFrame(columns=COLUMNS)
    points = pd.DataFrame(rows, columns=COLUMNS)
    return points.sort_values(["run", "method", "start", "other_conditions", "nfe"], kind="stable").reset_index(
        drop=True
    )


def quality_vs_nfe(board: pd.DataFrame, png: Path, csv: Path, title: str = "Quality vs NFE") -> bool:
    """Write the figure (LPIPS and PSNR-Y against NFE) and its points CSV; False when no row sweeps NFE."""
    points = nfe_points(board)
    if points.empty:
        return False
    with atomic_path(csv) as tmp:
        points.to_csv(tmp, index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("lpips", "psnr_y") if points[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), dpi=120, squeeze=False)
    with_run = points.run.nunique() > 1
    curves = points[points.start != "reference"]
    for ax, metric in zip(axes[0], metrics):
        for key, line in curves.groupby(["run", "method", "start", "other_conditions"], sort=False):
            run, method, start, other = key
            label = (f"{run}: " if with_run else "") + f"{method} start={start}"
            label += "" if other == "default" else f" [{other}]"
            ax.plot(line.nfe, line[metric], marker="o", label=label)
        for _, r in points[points.start == "reference"].iterrows():
            ax.axhline(r[metric], linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"{r.method} (NFE {r.nfe})", (0.01, r[metric]), xycoords=("axes fraction", "data"), fontsize=7)
        if curves.nfe.max() >= 8 * max(curves.nfe.min(), 1):
            ax.set_xscale("log")
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel("LPIPS ↓ better" if metric == "lpips" else "PSNR-Y (dB) ↑ better")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True
