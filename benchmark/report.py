"""`cmsrd-bench report RUN... --out DIR`: merge benchmark runs into a published leaderboard.

Writes into DIR only: `report.md`, `index.html` (inline CSS, figures embedded as data: URIs, nothing remote,
so the single file can be moved or attached), `leaderboard.csv` (merged, with `run` and `group` columns) and
its `leaderboard.columns.csv` (direction and definition of every column), `figures/perception_distortion*.png`
(PSNR-Y vs LPIPS, Blau & Michaeli's perception-distortion plane), `figures/grid*_<id>.png`
(LR | map | each method | HR) and, for runs with `steps=`/`start=` conditions (`cmsrd-bench run --sweep`),
`figures/quality_vs_nfe*.png` with its points in `quality_vs_nfe*.csv` (`benchmark.nfe_curve`).

Numbers are ranked only where they are comparable: runs are grouped by dataset manifest, split, scale, the
scored images and the definition of every metric they share (crop border, FID settings, ...). Each group
gets its own table, header, plot and image grids, and the best value of a metric column is marked only
among the successful rows of its group; the best throughput and memory (`TIMING_DIRECTIONS`) only among
those that also ran on the same device and precision. Every header carries the metric's direction; definitions from
run.json are printed under each table, so the page is never ambiguous.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from cmsrd.errors import InputError
from cmsrd.io import atomic_path, atomic_write_text, read_png

from . import leaderboard as lb
from .nfe_curve import quality_vs_nfe


@dataclass
class Group:
    """Runs whose rows may be ranked together: same dataset manifest, split, scale and images, and no
    metric defined differently (a metric only one of them computed is fine)."""

    number: int
    key: tuple[Any, ...]
    apart: str = ""  # why these runs are not ranked with an earlier group
    infos: list[dict[str, Any]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)  # metric -> "<run>: Failed: …" per run without numbers

    @property
    def info(self) -> dict[str, Any]:
        return self.infos[0]

    @property
    def n_images(self) -> int:
        return len(self.info.get("ids") or []) or int(self.info.get("n_images") or 0)

    def conflicts(self, metrics: dict[str, dict[str, Any]]) -> list[str]:
        """Metrics that `metrics` defines differently from this group."""

        def meaning(m: dict[str, Any]) -> tuple[Any, Any]:
            return m.get("direction"), m.get("definition")

        return [n for n, m in metrics.items() if n in self.metrics and meaning(m) != meaning(self.metrics[n])]

    def add(self, run: str, info: dict[str, Any]) -> None:
        self.infos.append(info)
        self.runs.append(run)
        for n, m in info.get("metrics", {}).items():
            # meaning only (equal within a group, see `conflicts`); why a run has no numbers is in `notes`
            self.metrics.setdefault(n, {"direction": m.get("direction"), "definition": m.get("definition")})
            if lb.status_note(m):  # kept per run: another run's numbers must not hide why this run's cells are empty
                self.notes.setdefault(n, []).append(f"{run}: {lb.status_note(m)}")

    def note(self, metric: str) -> str:
        return "; ".join(self.notes.get(metric, []))

    def hardware(self, run: str) -> tuple[Any, Any]:
        """(GPU name or device, precision) of a run: throughput and memory are ranked only among equal ones."""
        info = self.infos[self.runs.index(run)]
        device = info.get("device") or {}
        return device.get("gpu") or device.get("device"), info.get("precision")

    def header(self) -> str:
        d = self.info.get("dataset", {})
        sha = d.get("manifest_sha256")
        return (
            f"{d.get('name')} v{d.get('version')}, x{d.get('scale')}, split {self.info.get('split')}, "
            f"{self.n_images} images; dataset manifest sha256 {sha[:12] + '…' if sha else 'unknown'}; "
            f"runs: {', '.join(self.runs)}" + (f". Not ranked with {self.apart}" if self.apart else "")
        )


def comparability_key(info: dict[str, Any]) -> tuple[Any, ...]:
    """What must be equal for two runs' numbers to be comparable (metric definitions are checked apart)."""
    d = info.get("dataset", {})
    dataset = d.get("manifest_sha256") or ("root", d.get("root"), d.get("name"), d.get("version"))
    images = tuple(info.get("ids") or ()) or info.get("n_images")
    return dataset, info.get("split"), d.get("scale"), images


def _apart(key: tuple[Any, ...], metrics: dict[str, dict[str, Any]], groups: Sequence[Group]) -> str:
    """Why a run with `key` and `metrics` starts a new group: what differs from the first earlier group."""
    if not groups:
        return ""
    same = next((g for g in groups if g.key == key), None)
    if same is not None:
        return f"group {same.number}: different metric definitions ({', '.join(same.conflicts(metrics))})"
    fields = [f for f, a, b in zip(("dataset manifest", "split", "scale", "images"), key, groups[0].key) if a != b]
    return f"group {groups[0].number}: different {', '.join(fields)}"


def group_runs(names: Sequence[str], infos: Sequence[dict[str, Any]]) -> tuple[list[Group], list[int]]:
    """Groups in order of first appearance, and the group number of each run."""
    groups: list[Group] = []
    of_run: list[int] = []
    for name, info in zip(names, infos):
        key, metrics = comparability_key(info), info.get("metrics", {})
        group = next((g for g in groups if g.key == key and not g.conflicts(metrics)), None)
        if group is None:
            group = Group(len(groups) + 1, key, _apart(key, metrics, groups))
            groups.append(group)
        group.add(name, info)
        of_run.append(group.number)
    return groups, of_run


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """The shortest path suffix that tells each run apart (`exp_cpu/bench`, `exp_gpu/bench`; a lone name stays
    `bench`): rows, notes and the per-device timing ranking are keyed by it, so two runs must never share one."""
    paths = [Path(r).resolve() for r in runs]
    seen: dict[Path, int] = {}
    for i, p in enumerate(paths):
        if p in seen:
            raise InputError("RUN", f"{runs[i]} is given twice (also as {runs[seen[p]]})", "pass each run folder once")
        seen[p] = i

    def suffix(p: Path, k: int) -> str:
        return "/".join(p.parts[-k:])

    labels = []
    for p in paths:
        k = 1
        while k < len(p.parts) and sum(suffix(q, k) == suffix(p, k) for q in paths) > 1:
            k += 1
        labels.append(suffix(p, k))
    return labels


def load_runs(runs: Sequence[str | Path]) -> tuple[pd.DataFrame, list[Group]]:
    """Merged leaderboard (with `run` and `group` columns) and the comparability groups."""
    if not runs:
        raise InputError("RUN", "no runs given", "pass one or more folders written by `cmsrd-bench run`")
    labels = run_labels(runs)
    frames, infos = [], []
    for r, label in zip(runs, labels):
        board, _, info = lb.read_run(r)
        board.insert(0, "run", label)
        board["_run_dir"] = str(Path(r).resolve())
        frames.append(board)
        infos.append(info)
    groups, of_run = group_runs(labels, infos)
    for frame, g in zip(frames, of_run):
        frame.insert(1, "group", g)
    return pd.concat(frames, ignore_index=True), groups


def merged_metrics(groups: Sequence[Group]) -> dict[str, dict[str, Any]]:
    """One definition per metric for the merged CSV's sidecar; where groups differ, each is named."""
    out: dict[str, dict[str, Any]] = {}
    for n in dict.fromkeys(n for g in groups for n in g.metrics):
        defs = {g.number: g.metrics[n] for g in groups if n in g.metrics}
        first = next(iter(defs.values()))
        if len({m.get("definition") for m in defs.values()}) == 1:
            out[n] = {"direction": first.get("direction"), "definition": first.get("definition")}
        else:
            text = " | ".join(f"group {k}: {m.get('definition')}" for k, m in defs.items())
            out[n] = {"direction": first.get("direction"), "definition": text}
        out[n]["notes"] = [note for g in groups for note in g.notes.get(n, [])]
    return out


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
    cols += [(c, d) for c, d in lb.TIMING_DIRECTIONS.items() if c in board.columns and board[c].notna().any()]
    cols += [(c, None) for c in ("nfe", "params_m") if c in board.columns]
    return cols


def _label(r: pd.Series, with_run: bool, sep: str = " ") -> str:
    """`method [condition]`, prefixed with the run when a group merges several runs."""
    text = (f"{r.run}: " if with_run else "") + r.method
    return text + ("" if r.condition == "default" else f"{sep}[{r.condition}]")


def perception_distortion_plot(board: pd.DataFrame, path: Path, title: str = "Perception–distortion") -> bool:
    """PSNR-Y (x, higher better) vs LPIPS (y, lower better) per method x condition of one comparability
    group; False if not computed."""
    if not {"psnr_y", "lpips"} <= set(board.columns):
        return False
    ok = board[(board.status == "ok") & board.psnr_y.notna() & board.lpips.notna()]
    if ok.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_run = board.run.nunique() > 1
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for _, r in ok.iterrows():
        ax.scatter(r.psnr_y, r.lpips, s=36)
        ax.annotate(_label(r, with_run), (r.psnr_y, r.lpips), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("PSNR-Y (dB) → better")
    ax.set_ylabel("LPIPS ↓ better")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def iou_bars(group: Group, board: pd.DataFrame, path: Path, which: str = "map") -> bool:
    """Per-class IoU bars (map agreement: per class group) of each row with `downstream_iou` in run.json
    (`which`: "map" or "seg_vs_hr"); False if there is none."""
    bars: list[tuple[str, dict[str, Any]]] = []
    with_run = board.run.nunique() > 1
    for _, r in board[board.status.isin(SHOWN)].iterrows():
        info = group.infos[group.runs.index(r.run)] if r.run in group.runs else {}
        iou = info.get("methods", {}).get(f"{r.method}|{r.condition}", {}).get("downstream_iou", {}).get(which)
        if iou:
            bars.append((_label(r, with_run), iou))
    if not bars:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(bars[0][1])
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(classes) + 1), 3.6), dpi=120)
    for k, (label, iou) in enumerate(bars):
        xs = [i + k * width for i in range(len(classes))]
        ax.bar(xs, [iou.get(c) if iou.get(c) is not None else 0.0 for c in classes], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU ↑")
    ax.set_title("Map agreement IoU per class group" if which == "map" else "IoU vs HR per class", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _upsample_nearest(img: np.ndarray, size: int) -> np.ndarray:
    f = max(1, size // img.shape[0])
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def image_grid(sample_id: str, board: pd.DataFrame, info: dict[str, Any], path: Path) -> bool:
    """One row: LR (nearest, at HR size) | map | every successful method x condition | HR, for the dataset
    of `info` (one run.json of the group `board` belongs to)."""
    from cmsrd.layout import DatasetLayout

    root = Path(info["dataset"]["root"])
    layout = DatasetLayout(root, int(info["dataset"]["hr_px"]), int(info["dataset"]["lr_px"]))
    split = info["split"]
    try:
        hr = read_png(layout.image_path(split, "hr", sample_id))
        panels = [
            ("LR (nearest)", _upsample_nearest(read_png(layout.image_path(split, "lr", sample_id)), hr.shape[0])),
            ("map", read_png(layout.image_path(split, "map", sample_id))),
        ]
    except (FileNotFoundError, OSError):
        return False
    with_run = board.run.nunique() > 1
    for _, r in board[board.status == "ok"].iterrows():
        p = lb.sr_dir(r["_run_dir"], r.method, r.condition) / f"{sample_id}.png"
        if p.exists():
            panels.append((_label(r, with_run, sep="\n"), read_png(p)))
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


def segmentation_grid(sample_id: str, board: pd.DataFrame, info: dict[str, Any], path: Path, kind: str) -> bool:
    """One row of a tile's segmentations side by side, as the runner kept them (`benchmark.downstream.bench`):
    `kind` "map" (map segmenter; the OSM mask first) or "seg" (RVSA LoveDA segmenter); False if none kept."""
    from PIL import Image

    from benchmark.downstream.bench import SEG_DIR

    panels = []
    if kind == "map":
        from cmsrd.classes import palette
        from cmsrd.layout import DatasetLayout

        root = Path(info["dataset"]["root"])
        layout = DatasetLayout(root, int(info["dataset"]["hr_px"]), int(info["dataset"]["lr_px"]))
        try:
            mask = read_png(layout.image_path(info["split"], "mask", sample_id), indices=True)
            panels.append(("OSM mask", np.asarray(palette(), dtype=np.uint8).reshape(256, 3)[mask]))
        except (FileNotFoundError, OSError):
            pass
    with_run = board.run.nunique() > 1
    for _, r in board[board.status.isin(SHOWN)].iterrows():
        p = lb.sr_dir(r["_run_dir"], r.method, r.condition) / SEG_DIR / f"{sample_id}_{kind}.png"
        if p.exists():
            with Image.open(p) as img:
                panels.append((_label(r, with_run, sep="\n"), np.asarray(img.convert("RGB"))))
    if len(panels) < 1 + (kind == "map"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.5), dpi=110)
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{sample_id}: {'map segmenter' if kind == 'map' else 'RVSA LoveDA segmenter'}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


@dataclass
class Section:
    """What one comparability group contributes to the page: its rows, columns, best cells and figures."""

    group: Group
    board: pd.DataFrame
    cols: list[tuple[str, str | None]]
    best: set[tuple[str, int]]
    plot: str | None  # file name under figures/
    grids: list[str]
    bars: list[str] = field(default_factory=list)  # downstream figures: per-class IoU bars, segmentations
    nfe_plot: str | None = None  # quality_vs_nfe*.png under figures/ (its points: the .csv of the same stem)

    def title(self, n_groups: int) -> str:
        return f"Group {self.group.number}" if n_groups > 1 else "Leaderboard"


SHOWN = ("ok", "reference")  # row statuses with numbers; "reference" rows (the `hr` row) are never ranked


def downstream_notes(sec: Section) -> list[str]:
    """Which downstream models produced the agreement columns of a group (run.json `downstream`), and what
    the `hr` reference row is."""
    notes = []
    for name, info in zip(sec.group.runs, sec.group.infos):
        rec = info.get("downstream") or {}
        for key, label in (("rvsa_classifier", "RVSA classifier"), ("rvsa_segmenter", "RVSA segmenter")):
            if key in rec:
                r = rec[key]
                sha = f", sha256 {r['sha256']}" if r.get("sha256") else ""
                notes.append(f"{name}: {label}: {r.get('weights')}{sha}. {r.get('input', '')}")
        if "map_segmenter" in rec:
            notes.append(f"{name}: {rec['map_segmenter']['description']}")
    if notes and (sec.board.status == "reference").any():
        notes.append(
            "The `hr` row runs the same models on the HR tiles themselves: agreement 1.0 by construction, and its "
            "map agreement is the segmenter's ceiling; a reference, not ranked."
        )
    return notes


def _section(
    group: Group, board: pd.DataFrame, figures: Path, n_groups: int, samples: int, ids: Sequence[str] | None
) -> Section:
    rows = board[board["group"] == group.number]
    cols = _columns(rows, group.metrics)
    best = {(c, i) for c, d in cols if d and c not in lb.TIMING_DIRECTIONS for i in best_rows(rows, c, d)}
    hardware = rows["run"].map(group.hardware)
    for hw in hardware.unique():  # throughput and memory: the best per device and precision
        best |= {(c, i) for c, d in cols if c in lb.TIMING_DIRECTIONS for i in best_rows(rows[hardware == hw], c, d)}
    tag = f"_group{group.number}" if n_groups > 1 else ""
    plot = f"perception_distortion{tag}.png"
    title = "Perception–distortion" + (f" (group {group.number})" if n_groups > 1 else "")
    plot = plot if perception_distortion_plot(rows, figures / plot, title) else None
    known = list(group.info.get("ids") or [])
    chosen = [i for i in ids if not known or i in known] if ids else known[:samples]
    grids = [f"grid{tag}_{sid}.png" for sid in chosen]
    grids = [g for g, sid in zip(grids, chosen) if image_grid(sid, rows, group.info, figures / g)]
    bars = [f"{w}_iou{tag}.png" for w in ("map", "seg_vs_hr")]
    bars = [b for b, w in zip(bars, ("map", "seg_vs_hr")) if iou_bars(group, rows, figures / b, w)]
    segs = [(f"{k}_seg{tag}_{sid}.png", sid, k) for k in ("map", "seg") for sid in chosen]
    bars += [f for f, sid, k in segs if segmentation_grid(sid, rows, group.info, figures / f, k)]
    nfe = f"quality_vs_nfe{tag}.png"
    nfe = nfe if quality_vs_nfe(rows, figures / nfe, (figures / nfe).with_suffix(".csv"), "Quality vs NFE") else None
    return Section(group, rows, cols, best, plot, grids, bars, nfe)


_INTRO = (
    "Rows are ranked only within a comparability group (same dataset manifest, split, scale, images and "
    "metric definitions); the best value per column within its group is {best}. Throughput and memory "
    "(images_per_s, sec_per_image, peak_mem_gb) are marked only among rows of the same device (GPU name, "
    "or CPU) and precision. ↑ higher is better, ↓ lower is better."
)


def _markdown(sections: Sequence[Section]) -> str:
    lines = ["# CMSRD benchmark leaderboard", "", _INTRO.format(best="in **bold**")]
    for sec in sections:
        head = [f"{c} {'↑' if d == 'higher' else '↓'}" if d else c for c, d in sec.cols]
        lines += [
            "",
            f"## {sec.title(len(sections))}",
            "",
            f"Dataset {sec.group.header()}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for i, r in sec.board.iterrows():
            cells = []
            for c, _ in sec.cols:
                v = _fmt(r.get(c))
                cells.append(f"**{v}**" if (c, i) in sec.best else v)
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "### Metric definitions", ""]
        lines += [
            f"- **{n}** ({'↑' if m['direction'] == 'higher' else '↓'}): {m['definition']}"
            + (f" *{sec.group.note(n)}*" if sec.group.note(n) else "")
            for n, m in sec.group.metrics.items()
        ]
        failed = sec.board[~sec.board.status.isin(SHOWN)]
        if not failed.empty:
            lines += ["", "### Not run", ""] + [
                f"- {r.run}: {r.method} [{r.condition}]: {r.status} — {r.reason}" for _, r in failed.iterrows()
            ]
        if down := downstream_notes(sec):
            lines += ["", "### Downstream agreement", ""] + [f"- {t}" for t in down]
            lines += [f"\n![{b}](figures/{b})" for b in sec.bars]
        if sec.plot:
            lines += ["", "### Perception–distortion", "", f"![PSNR-Y vs LPIPS](figures/{sec.plot})"]
        if sec.nfe_plot:
            csv = sec.nfe_plot.replace(".png", ".csv")
            lines += ["", "### Quality vs NFE", "", f"![LPIPS and PSNR-Y vs NFE](figures/{sec.nfe_plot})"]
            lines += ["", f"Points: [figures/{csv}](figures/{csv})"]
        if sec.grids:
            lines += ["", "### Samples (LR | map | methods | HR)", ""] + [f"![{g}](figures/{g})" for g in sec.grids]
    lines += ["", "## Provenance", ""]
    for sec in sections:
        for name, info in zip(sec.group.runs, sec.group.infos):
            lines.append(
                f"- {name} (group {sec.group.number}): `{' '.join(info.get('command', []))}` — "
                f"git {info.get('git', {}).get('sha')}, "
                f"device {info.get('device', {}).get('gpu') or info.get('device', {}).get('device')}, "
                f"torch {info.get('versions', {}).get('torch')}, seed {info.get('seeds', {}).get('seed')}"
            )
    return "\n".join(lines) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td.t{text-align:left}"
    "td.best{font-weight:bold;background:#e6f4ea}"
    "tr.reference td{font-style:italic;background:#f7f7fb}"
    "tr.failed td{color:#999}img{max-width:100%}code{font-size:12px}"
)


def _data_uri(path: Path) -> str:
    """A PNG as a data: URI, so index.html carries its figures and can be moved or attached alone."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html(sections: Sequence[Section], figures: Path) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>CMSRD benchmark leaderboard</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<h1>CMSRD benchmark leaderboard</h1>",
        f"<p>{e(_INTRO.format(best='highlighted'))}</p>",
    ]
    for sec in sections:
        out += [
            f"<h2>{e(sec.title(len(sections)))}</h2>",
            f"<p>Dataset {e(sec.group.header())}.</p>",
            "<table>",
            "<thead>",
            "<tr>",
        ]
        for c, d in sec.cols:
            arrow = ("↑" if d == "higher" else "↓") if d else ""
            title = f' title="{e(sec.group.metrics[c]["definition"])}"' if c in sec.group.metrics else ""
            out.append(f"<th{title}>{e(c)} {arrow}</th>")
        out += ["</tr>", "</thead>", "<tbody>"]
        for i, r in sec.board.iterrows():
            out.append(f'<tr class="{r.status if r.status in SHOWN else "failed"}">')
            for c, d in sec.cols:
                cls = "best" if (c, i) in sec.best else ("t" if d is None else "")
                title = f' title="{e(str(r.reason))}"' if c == "status" and r.status != "ok" else ""
                out.append(f'<td class="{cls}"{title}>{e(_fmt(r.get(c)))}</td>')
            out.append("</tr>")
        out += ["</tbody>", "</table>", "<h3>Metric definitions</h3>", "<ul>"]
        for n, m in sec.group.metrics.items():
            note = f" <em>{e(sec.group.note(n))}</em>" if sec.group.note(n) else ""
            arrow = "↑" if m["direction"] == "higher" else "↓"
            out.append(f"<li><strong>{e(n)}</strong> ({arrow}): {e(m['definition'])}{note}</li>")
        out.append("</ul>")
        failed = sec.board[~sec.board.status.isin(SHOWN)]
        if not failed.empty:
            out += (
                ["<h3>Not run</h3>", "<ul>"]
                + [
                    f"<li>{e(r.run)}: {e(r.method)} [{e(r.condition)}]: {e(r.status)} — {e(str(r.reason))}</li>"
                    for _, r in failed.iterrows()
                ]
                + ["</ul>"]
            )
        if down := downstream_notes(sec):
            out += ["<h3>Downstream agreement</h3>", "<ul>"] + [f"<li>{e(t)}</li>" for t in down] + ["</ul>"]
            out += [f'<p><img src="{_data_uri(figures / b)}" alt="{e(b)}"></p>' for b in sec.bars]
        if sec.plot:
            out += [
                "<h3>Perception–distortion</h3>",
                f'<img src="{_data_uri(figures / sec.plot)}" alt="PSNR-Y vs LPIPS">',
            ]
        if sec.nfe_plot:
            out += [
                "<h3>Quality vs NFE</h3>",
                f'<img src="{_data_uri(figures / sec.nfe_plot)}" alt="LPIPS and PSNR-Y vs NFE">',
                f"<p>Points: <code>figures/{e(sec.nfe_plot.replace('.png', '.csv'))}</code></p>",
            ]
        if sec.grids:
            out.append("<h3>Samples (LR | map | methods | HR)</h3>")
            out += [f'<p><img src="{_data_uri(figures / g)}" alt="{e(g)}"></p>' for g in sec.grids]
    out += ["<h2>Provenance</h2>", "<ul>"]
    for sec in sections:
        for name, info in zip(sec.group.runs, sec.group.infos):
            out.append(
                f"<li>{e(name)} (group {sec.group.number}): <code>{e(' '.join(info.get('command', [])))}</code> — "
                f"git {e(str(info.get('git', {}).get('sha')))}, torch {e(str(info.get('versions', {}).get('torch')))}, "
                f"seed {e(str(info.get('seeds', {}).get('seed')))}</li>"
            )
    out += ["</ul>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


def render_report(
    runs: Sequence[str | Path], out: str | Path, samples: int = 3, ids: Sequence[str] | None = None
) -> Path:
    """Merge runs and write report.md, index.html, leaderboard.csv (+ its columns sidecar) and figures/ into `out`."""
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    board, groups = load_runs(runs)
    sections = [_section(g, board, figures, len(groups), samples, ids) for g in groups]
    public = board.drop(columns=["_run_dir"])
    with atomic_path(out / lb.LEADERBOARD_CSV) as tmp:
        public.to_csv(tmp, index=False)
    lb.write_columns(out / lb.LEADERBOARD_CSV, list(public.columns), merged_metrics(groups))
    atomic_write_text(out / "report.md", _markdown(sections))
    atomic_write_text(out / "index.html", _html(sections, figures))
    return out / "index.html"


def text_leaderboard(runs: Sequence[str | Path]) -> str:
    """The report's tables as aligned terminal text: same columns, arrows and number format; `*` marks the
    best value per column within its group (as bold does in the report)."""
    board, groups = load_runs(runs)
    out = []
    for g in groups:
        rows = board[board["group"] == g.number]
        cols = [(c, d) for c, d in _columns(rows, g.metrics) if c != "run" or len(g.runs) > 1]
        best = {(c, i) for c, d in cols if d and c not in lb.TIMING_DIRECTIONS for i in best_rows(rows, c, d)}
        table = [[f"{c} {'↑' if d == 'higher' else '↓'}" if d else c for c, d in cols]]
        table += [[_fmt(r.get(c)) + ("*" if (c, i) in best else "") for c, _ in cols] for i, r in rows.iterrows()]
        widths = [max(len(row[k]) for row in table) for k in range(len(cols))]
        if len(groups) > 1:
            out.append(f"group {g.number}: {g.header()}")
        for n, row in enumerate(table):
            out.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append("")
    return "\n".join(out + ["* best in its column (within a comparability group); ↑ higher / ↓ lower is better"])


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Report folder (Markdown, HTML, figures).")
@click.option(
    "--samples", default=3, show_default=True, help="Number of image grids per group (first N ids of its first run)."
)
@click.option("--ids", default=None, help="Comma-separated sample ids for the image grids.")
@click.option("--print", "print_table", is_flag=True, help="Also print the leaderboard tables as terminal text.")
def report_command(runs, out, samples, ids, print_table) -> None:
    """Merge benchmark runs into report.md and a self-contained index.html (one table per comparable group).

    Example: `cmsrd-bench report out/bench --out out/report --print`"""
    page = render_report(runs, out, samples=samples, ids=[s for s in ids.split(",") if s] if ids else None)
    if print_table:
        click.echo(text_leaderboard(runs))
    click.echo(f"wrote {page}")
