"""Summarise training runs and benchmark runs of a GPU session into one JSON, one Markdown page and a plot.

    python perf/gpu/collect.py --name ff --runs runs/gpu/esrgan runs/gpu/swinir \
        --bench runs/gpu/bench-ff [--cpu-bench runs/gpu/bench-ff-cpu] --out OUT

Per training run: steps, training minutes, median training images/s (the first log row, which holds
warm-up, left out), the loss and validation curves (step, elapsed_s, PSNR-Y, LPIPS). Per benchmark: the
leaderboard rows (metrics, images/s, seconds per image, peak GPU memory). The device tool brings back at
most 8 files, so everything lands in <name>.json, <name>.md and <name>.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cmsrd.io import atomic_write_text


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _finite(v) for k, v in row.items()} for row in df.to_dict("records")]


def summarise_run(run: Path) -> dict[str, Any]:
    """What a training run folder says about itself (missing logs are reported, not fatal)."""
    out: dict[str, Any] = {"run": str(run), "method": run.name}
    train_log, val_log = run / "train_log.csv", run / "val_log.csv"
    if not train_log.is_file():
        out["error"] = f"no {train_log.name} (the run failed; see {run}.log)"
        return out
    tl = pd.read_csv(train_log)
    losses = [c for c in tl.columns if c.startswith("l_")]
    steady = tl["images_per_s"].iloc[1:] if len(tl) > 1 else tl["images_per_s"]
    out.update(
        steps=int(tl["step"].iloc[-1]),
        train_minutes=round(float(tl["elapsed_s"].iloc[-1]) / 60, 2),
        train_images_per_s=round(float(steady.median()), 2),
        losses=losses,
        final_loss={c: _finite(round(float(tl[c].iloc[-1]), 5)) for c in losses},
        train_curve=_records(tl[["step", "elapsed_s", *losses, "images_per_s"]]),
    )
    if val_log.is_file():
        vl = pd.read_csv(val_log)
        keep = [
            c
            for c in ("step", "elapsed_s", "condition", "psnr_y", "lpips", "n_images", "images_per_s")
            if c in vl.columns
        ]
        out["val_curve"] = _records(vl[keep])
    return out


def summarise_bench(folder: Path | None) -> list[dict[str, Any]]:
    if folder is None:
        return []
    board = folder / "leaderboard.csv"
    if not board.is_file():
        return [{"error": f"no {board} (the benchmark run failed)"}]
    return _records(pd.read_csv(board))


def _fmt_lpips(v: float | None) -> str:
    return "n/a (no LPIPS weights)" if v is None else f"{v:.4f}"


def markdown(
    name: str, runs: list[dict[str, Any]], bench: list[dict[str, Any]], cpu: list[dict[str, Any]], env: dict[str, Any]
) -> str:
    lines = [f"# GPU session part `{name}`", "", f"device: {env.get('device')}; torch {env.get('torch')}", ""]
    lines += [
        "| method | steps | train min | train img/s | final loss | last val PSNR-Y | last val LPIPS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} | | | | | |")
            continue
        last = (r.get("val_curve") or [{}])[-1]
        loss = ", ".join(f"{k} {v:.4g}" for k, v in r["final_loss"].items() if v is not None)
        lp = last.get("lpips")
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['train_minutes']} | {r['train_images_per_s']} | {loss} | "
            f"{last.get('psnr_y', float('nan')):.2f} | {_fmt_lpips(lp)} |"
        )
    for title, rows in (("Inference (benchmark runner)", bench), ("Same checkpoints on CPU", cpu)):
        if not rows:
            continue
        lines += ["", f"## {title}", ""]
        cols = [
            c
            for c in (
                "method",
                "condition",
                "n_images",
                "psnr_y",
                "ssim_y",
                "lpips",
                "images_per_s",
                "sec_per_image",
                "peak_mem_gb",
                "nfe",
                "params_m",
                "error",
            )
            if any(c in row for row in rows)
        ]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in rows:
            cells = [row.get(c) for c in cols]
            lines.append(
                "| "
                + " | ".join("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells)
                + " |"
            )
    for r in runs:
        if r.get("val_curve"):
            lines += [
                "",
                f"## Validation curve: {r['method']}",
                "",
                "| step | train s | PSNR-Y | LPIPS |",
                "|---|---|---|---|",
            ]
            for v in r["val_curve"]:
                psnr = v.get("psnr_y", float("nan"))
                lines.append(f"| {v['step']} | {v.get('elapsed_s')} | {psnr:.3f} | {_fmt_lpips(v.get('lpips'))} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in runs if "train_curve" in r]
    if not ok:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in ok:
        t = [p["elapsed_s"] / 60 for p in r["train_curve"]]
        ax1.plot(t, [p[r["losses"][0]] for p in r["train_curve"]], label=f"{r['method']} {r['losses'][0]}")
        if r.get("val_curve"):
            ax2.plot(
                [p["elapsed_s"] / 60 for p in r["val_curve"]],
                [p["psnr_y"] for p in r["val_curve"]],
                "o-",
                label=r["method"],
            )
    ax1.set(xlabel="training minutes", ylabel="training loss", yscale="log", title="loss")
    ax2.set(xlabel="training minutes", ylabel="PSNR-Y (dB)", title="validation (test split)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def environment() -> dict[str, Any]:
    import torch

    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device)",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--runs", nargs="*", type=Path, default=[])
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--cpu-bench", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    runs = [summarise_run(r) for r in args.runs]
    bench, cpu = summarise_bench(args.bench), summarise_bench(args.cpu_bench)
    report = {"name": args.name, "environment": env, "runs": runs, "bench": bench, "cpu_bench": cpu}
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(report, indent=1, default=str))
    md = markdown(args.name, runs, bench, cpu, env)
    atomic_write_text(args.out / f"{args.name}.md", md)
    plot(runs, args.out / f"{args.name}.png")
    print(md)


if __name__ == "__main__":
    main()
