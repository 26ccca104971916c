"""`cmsrd-bench report RUN... --out DIR`: merge benchmark runs into a published leaderboard.

Writes into DIR only: `report.md`, `index.html` (inline CSS, images referenced by relative paths inside
DIR, nothing remote), `leaderboard.csv` (merged), `figures/perception_distortion.png` (PSNR-Y vs LPIPS,
Blau & Michaeli's perception-distortion plane) and `figures/grid_<id>.png` (LR | map | each method | HR).
The best value of each metric column among successful rows is marked, and every header carries the
metric's direction; definitions from run.json are printed under the table, so the page is never ambiguous.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import pandas as pd

from cmsrd.errors import InputError
from cmsrd.io import atomic_path, atomic_write_text, read_png

from . import leaderboard as lb

NUMERIC_TAIL = {"images_per_s": "higher", "sec_per_image": "lower", "peak_mem_gb": "lower"}


def load_runs(runs: Sequence[str | Path]) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Merged leaderboard (with a `run` column), metric info by name, and each run's run.json."""
    frames, metrics, infos = [], {}, []
    for r in runs:
        board, _, info = lb.read_run(r)
        board.insert(0, "run", Path(r).name)
        board["_run_dir"] = str(Path(r).resolve())
        frames.append(board)
        infos.append(info)
        for name, m in info.get("metrics", {}).items():
            if name not in metrics:
                metrics[name] = dict(m)
            elif m.get("definition") != metrics[name].get("definition") and m.get("definition") not in metrics[name]["definition"]:
                # runs differ in settings (e.g. crop border): say so instead of hiding it
                metrics[name]["definition"] += f" | in run {Path(r).name}: {m.get('definition')}"
    if not frames:
        raise InputError("RUN", "no runs given", "pass one or more folders written by `cmsrd-bench run`")
    return pd.concat(frames, ignore_index=True), metrics, infos


def metric_columns(board: pd.DataFrame, metrics: dict[str, dict[str, Any]]) -> list[str]:
    return [m for m in metrics if m in board.columns and board[m].notna().any()]


def best_rows(board: pd.DataFrame, column: str, direction: str) -> set[int]:
    ok = board[(board["status"] == "ok") & board[column].notna()]
    vals = ok[column].astype(float)
    vals = vals[np.isfinite(vals)] if direction == "lower" else vals
    if vals.empty:
        return set()
    target = vals.max() if direction == "higher" else vals.min()
    return set(vals.index[vals == target])


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        if math.isinf(v):
            return "∞"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _columns(board: pd.DataFrame, metrics: dict[str, dict[str, Any]]) -> list[tuple[str, str | None]]:
    cols: list[tuple[str, str | None]] = [(c, None) for c in ("run", "method", "condition", "n_images", "status")]
    cols += [(m, metrics[m]["direction"]) for m in metric_columns(board, metrics)]
    cols += [(c, d) for c, d in NUMERIC_TAIL.items() if c in board.columns and board[c].notna().any()]
    cols += [(c, None) for c in ("nfe", "params_m") if c in board.columns]
    return cols


def perception_distortion_plot(board: pd.DataFrame, path: Path) -> bool:
    """PSNR-Y (x, higher better) vs LPIPS (y, lower better) per method x condition; False if not computed."""
    if not {"psnr_y", "lpips"} <= set(board.columns):
        return False
    ok = board[(board.status == "ok") & board.psnr_y.notna() & board.lpips.notna()]
    if ok.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for _, r in ok.iterrows():
        ax.scatter(r.psnr_y, r.lpips, s=36)
        ax.annotate(f"{r.method}" + ("" if r.condition == "default" else f" [{r.condition}]"), (r.psnr_y, r.lpips),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("PSNR-Y (dB) → better")
    ax.set_ylabel("LPIPS ↓ better")
    ax.set_title("Perception–distortion")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _upsample_nearest(img: np.ndarray, size: int) -> np.ndarray:
    f = max(1, size // img.shape[0])
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def image_grid(sample_id: str, board: pd.DataFrame, infos: list[dict[str, Any]], path: Path) -> bool:
    """One row: LR (nearest, at HR size) | map | every successful method x condition | HR."""
    from cmsrd.layout import DatasetLayout

    info = infos[0]
    root = Path(info["dataset"]["root"])
    layout = DatasetLayout(root, int(info["dataset"]["hr_px"]), int(info["dataset"]["lr_px"]))
    split = info["split"]
    try:
        hr = read_png(layout.image_path(split, "hr", sample_id))
        panels = [("LR (nearest)", _upsample_nearest(read_png(layout.image_path(split, "lr", sample_id)), hr.shape[0])),
                  ("map", read_png(layout.image_path(split, "map", sample_id)))]
    except (FileNotFoundError, OSError):
        return False
    for _, r in board[board.status == "ok"].iterrows():
        p = lb.sr_dir(r["_run_dir"], r.method, r.condition) / f"{sample_id}.png"
        if p.exists():
            panels.append((r.method + ("" if r.condition == "default" else f"\n[{r.condition}]"), read_png(p)))
    panels.append(("HR", hr))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.5), dpi=110)
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(sample_id, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _markdown(board, cols, metrics, best, figures, grids, infos) -> str:
    head = [f"{c} {'↑' if d == 'higher' else '↓'}" if d else c for c, d in cols]
    lines = ["# CMSRD benchmark leaderboard", "",
             f"Dataset: {infos[0]['dataset'].get('name')} v{infos[0]['dataset'].get('version')} "
             f"(x{infos[0]['dataset'].get('scale')}, split `{infos[0]['split']}`). Best per column in **bold**; "
             "↑ higher is better, ↓ lower is better.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in board.iterrows():
        cells = []
        for c, d in cols:
            v = _fmt(r.get(c))
            cells.append(f"**{v}**" if (c, i) in best else v)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Metric definitions", ""]
    lines += [f"- **{n}** ({'↑' if m['direction'] == 'higher' else '↓'}): {m['definition']}"
              + (f" *Skipped: {m.get('reason')}*" if m.get("status") == "skipped" else "") for n, m in metrics.items()]
    failed = board[board.status != "ok"]
    if not failed.empty:
        lines += ["", "## Not run", ""] + [f"- {r.method} [{r.condition}]: {r.status} — {r.reason}" for _, r in failed.iterrows()]
    if figures:
        lines += ["", "## Perception–distortion", "", "![PSNR-Y vs LPIPS](figures/perception_distortion.png)"]
    if grids:
        lines += ["", "## Samples (LR | map | methods | HR)", ""] + [f"![{g}](figures/{g})" for g in grids]
    lines += ["", "## Provenance", ""]
    for info in infos:
        lines.append(f"- `{' '.join(info.get('command', []))}` — git {info.get('git', {}).get('sha')}, "
                     f"device {info.get('device', {}).get('gpu') or info.get('device', {}).get('device')}, "
                     f"torch {info.get('versions', {}).get('torch')}, seed {info.get('seeds', {}).get('seed')}")
    return "\n".join(lines) + "\n"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td.t{text-align:left}"
        "td.best{font-weight:bold;background:#e6f4ea}tr.failed td{color:#999}img{max-width:100%}code{font-size:12px}")


def _html(board, cols, metrics, best, figures, grids, infos) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', "<title>CMSRD benchmark leaderboard</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>", "<h1>CMSRD benchmark leaderboard</h1>",
           f"<p>Dataset {e(str(infos[0]['dataset'].get('name')))} (x{e(str(infos[0]['dataset'].get('scale')))}, split "
           f"<code>{e(str(infos[0]['split']))}</code>). Best per column highlighted; ↑ higher is better, ↓ lower is better.</p>",
           "<table>", "<thead>", "<tr>"]
    for c, d in cols:
        arrow = ("↑" if d == "higher" else "↓") if d else ""
        title = f' title="{e(metrics[c]["definition"])}"' if c in metrics else ""
        out.append(f"<th{title}>{e(c)} {arrow}</th>")
    out += ["</tr>", "</thead>", "<tbody>"]
    for i, r in board.iterrows():
        out.append(f'<tr class="{"ok" if r.status == "ok" else "failed"}">')
        for c, d in cols:
            cls = "best" if (c, i) in best else ("t" if d is None else "")
            title = f' title="{e(str(r.reason))}"' if c == "status" and r.status != "ok" else ""
            out.append(f'<td class="{cls}"{title}>{e(_fmt(r.get(c)))}</td>')
        out.append("</tr>")
    out += ["</tbody>", "</table>", "<h2>Metric definitions</h2>", "<ul>"]
    for n, m in metrics.items():
        skipped = f" <em>Skipped: {e(str(m.get('reason')))}</em>" if m.get("status") == "skipped" else ""
        out.append(f"<li><strong>{e(n)}</strong> ({'↑' if m['direction'] == 'higher' else '↓'}): {e(m['definition'])}{skipped}</li>")
    out.append("</ul>")
    failed = board[board.status != "ok"]
    if not failed.empty:
        out += ["<h2>Not run</h2>", "<ul>"] + [f"<li>{e(r.method)} [{e(r.condition)}]: {e(r.status)} — {e(str(r.reason))}</li>"
                                               for _, r in failed.iterrows()] + ["</ul>"]
    if figures:
        out += ["<h2>Perception–distortion</h2>", '<img src="figures/perception_distortion.png" alt="PSNR-Y vs LPIPS">']
    if grids:
        out.append("<h2>Samples (LR | map | methods | HR)</h2>")
        out += [f'<p><img src="figures/{e(g)}" alt="{e(g)}"></p>' for g in grids]
    out += ["<h2>Provenance</h2>", "<ul>"]
    for info in infos:
        out.append(f"<li><code>{e(' '.join(info.get('command', [])))}</code> — git {e(str(info.get('git', {}).get('sha')))}, "
                   f"torch {e(str(info.get('versions', {}).get('torch')))}, seed {e(str(info.get('seeds', {}).get('seed')))}</li>")
    out += ["</ul>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


def render_report(runs: Sequence[str | Path], out: str | Path, samples: int = 3, ids: Sequence[str] | None = None) -> Path:
    """Merge runs and write report.md, index.html, leaderboard.csv and figures/ into `out`."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    board, metrics, infos = load_runs(runs)
    cols = _columns(board, metrics)
    best = {(c, i) for c, d in cols if d for i in best_rows(board, c, d)}
    figures = perception_distortion_plot(board, out / "figures" / "perception_distortion.png")
    chosen = list(ids) if ids else list(infos[0].get("ids", []))[:samples]
    grids = []
    for sid in chosen:
        name = f"grid_{sid}.png"
        if image_grid(sid, board, infos, out / "figures" / name):
            grids.append(name)
    public = board.drop(columns=["_run_dir"])
    with atomic_path(out / "leaderboard.csv") as tmp:
        public.to_csv(tmp, index=False)
    atomic_write_text(out / "report.md", _markdown(board, cols, metrics, best, figures, grids, infos))
    atomic_write_text(out / "index.html", _html(board, cols, metrics, best, figures, grids, infos))
    return out / "index.html"


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Report folder (Markdown, HTML, figures).")
@click.option("--samples", default=3, show_default=True, help="Number of image grids (first N ids of the first run).")
@click.option("--ids", default=None, help="Comma-separated sample ids for the image grids.")
def report_command(runs, out, samples, ids) -> None:
    """Merge benchmark runs into report.md and a self-contained index.html."""
    page = render_report(runs, out, samples=samples, ids=[s for s in ids.split(",") if s] if ids else None)
    click.echo(f"wrote {page}")
