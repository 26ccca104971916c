"""The GPU runbook as one device call with a deadline: throughput, metric-suite speed, then (if time is left)
sgdm vs sgdm-nomap trained for equal minutes. Run there through `bash perf/gpu/session.sh fast` (README.md).

    python perf/gpu/runbook.py --deadline EPOCH_S --out $OUT [--train-data .gpu/synthetic]

Steps, each a subprocess with a timeout cut to what is left before the deadline (minus --reserve-s for
writing the report), so the script ends on its own inside the device call's limit:

1. `perf.throughput` for every diffusion method of --methods that is in the registry (fp32-eager, bf16-eager,
   fast), SD2.1-base geometry by default, 50 steps, 256 px; each method alone (one failing or running out
   of time does not lose the others);
2. `perf/metrics_bench.py` on --pairs procedural pairs with stand-in weights (every metric's real code path,
   real timings; values are not meaningful);
3. only when at least --min-train-s is left: `sgdm` and `sgdm-nomap` at --train-config's geometry, trained
   for the same minutes each (what is left, halved), validated at two equal times; `collect.py` summarises.

The report is rewritten after every step: `runbook.json` (every figure, versions, the command, the times)
and `runbook.md` (the tables) in --out, plus `sgdm.png` when step 3 ran. The log is the caller's (`tee`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DIFFUSION = ("sgdm", "ldm", "resshift", "ediffsr", "csdiff")


def registered(names: list[str]) -> list[str]:
    """The names of `names` that the registry knows (methods merged later join automatically)."""
    from baselines.registry import names as known

    have = set(known())
    return [n for n in names if n in have]


class Runbook:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.runs = Path(args.runs)
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.report: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "deadline_in_s": round(args.deadline - time.time(), 1),
            "versions": versions(),
            "steps": [],
        }

    def left(self) -> float:
        return self.args.deadline - time.time() - self.args.reserve_s

    def step(self, name: str, cmd: list[str], cap_s: float, result: Path | None = None) -> dict[str, Any]:
        """Run `cmd` with a timeout of min(cap_s, time left); record status, seconds and its JSON result."""
        timeout = min(cap_s, self.left())
        rec: dict[str, Any] = {"step": name, "cmd": " ".join(cmd)}
        if timeout < 5:
            rec.update(status="skipped", why=f"{self.left():.0f} s left before the deadline")
            return self._add(rec)
        env = {
            **os.environ,
            "TQDM_MININTERVAL": "30",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, capture_output=True, text=True)
            rec["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            rec["status"] = f"timed out after {timeout:.0f} s"
            tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
        rec["seconds"] = round(time.time() - t0, 1)
        print(f"== {name}: {rec['status']} in {rec['seconds']} s\n{tail}", flush=True)
        if rec["status"] != "ok":
            rec["log_tail"] = tail[-1500:]
        if result is not None and result.is_file():
            rec["result"] = json.loads(result.read_text())
        return self._add(rec)

    def _add(self, rec: dict[str, Any]) -> dict[str, Any]:
        self.report["steps"].append(rec)
        self.write()
        return rec

    def write(self) -> None:
        from cmsrd.io import atomic_write_text

        self.report["elapsed_s"] = round(time.time() - (self.args.deadline - self.report["deadline_in_s"]), 1)
        atomic_write_text(self.out / "runbook.json", json.dumps(self.report, indent=1))
        atomic_write_text(self.out / "runbook.md", markdown(self.report))

    def run(self) -> int:
        a, py = self.args, sys.executable
        for m in registered(a.methods):
            res = self.runs / f"throughput-{m}.json"
            cmd = [py, "-m", "perf.throughput", "--method", m, *a.throughput_args.split()]
            self.step(f"throughput {m}", [*cmd, "--device", a.device, "--out", str(res)], a.throughput_cap_s, res)
        res = self.runs / "metrics.json"
        cmd = [py, "perf/metrics_bench.py", "--n", str(a.pairs), "--metrics", a.metrics, "--device", a.device]
        self.step("metric suite", [*cmd, "--stand-in-weights", "--out", str(res)], a.metrics_cap_s, res)
        if a.train_data and self.left() >= a.min_train_s:
            minutes = max(0.05, (self.left() - 2 * a.train_overhead_s - 20) / 2 / 60)
            for m in ("sgdm", "sgdm-nomap"):
                cmd = [py, "-m", "benchmark.cli", "train", "--method", m, "--data", a.train_data]
                cmd += ["--out", str(self.runs / m), "--device", a.device, "--max-minutes", f"{minutes:.3f}"]
                cmd += ["--config", a.train_config, "--set", f"train.val_every_minutes={minutes / 2:.3f}"]
                cmd += ["--set", "train.save_every=1000000", *a.train_args.split()]
                self.step(f"train {m} {minutes:.2f} min", cmd, minutes * 60 + a.train_overhead_s)
            res = self.out / "sgdm.json"
            cmd = [py, "perf/gpu/collect.py", "--name", "sgdm", "--runs", str(self.runs / "sgdm")]
            self.step("collect sgdm", [*cmd, str(self.runs / "sgdm-nomap"), "--out", str(self.out)], 60, res)
            if res.is_file():
                res.unlink()  # folded into runbook.json; sgdm.md too (the device call brings back 8 files)
                (self.out / "sgdm.md").unlink(missing_ok=True)
        else:
            why = "no --train-data" if not a.train_data else f"{self.left():.0f} s left < --min-train-s {a.min_train_s}"
            self._add({"step": "train sgdm vs sgdm-nomap", "status": "skipped", "why": why})
        self.report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.write()
        return 0 if all(s["status"] in ("ok", "skipped") for s in self.report["steps"]) else 1


def versions() -> dict[str, Any]:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        out["git"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git"] = None  # the device copy carries no .git
    return out


def markdown(report: dict[str, Any]) -> str:
    v = report["versions"]
    lines = [
        f"# GPU runbook ({v['device']}, torch {v['torch']}, CUDA {v['cuda']}, {report['started_utc']})",
        "",
        f"`{report['command']}`, {report.get('elapsed_s', 0)} s",
        "",
        "| step | status | s |",
        "|---|---|---|",
    ]
    lines += [f"| {s['step']} | {s['status']} | {s.get('seconds', '')} |" for s in report["steps"]]
    rows = [
        (r, m)
        for s in report["steps"]
        if s["step"].startswith("throughput") and "result" in s
        for r in s["result"]["results"]
        for m in r["modes"]
    ]
    if rows:
        lines += [
            "",
            "## Sampling throughput",
            "",
            "| method | mode | batch | images/s | s/image | peak GiB | TFLOP/s | of bf16 bound | max diff vs fp32 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r, m in rows:
            frac = "n/a" if m["flop_bound_fraction"] is None else f"{100 * m['flop_bound_fraction']:.1f}%"
            lines.append(
                f"| {r['method']} | {m['mode']} | {m['batch']} | {m['images_per_s']} | {m['seconds_per_image']} | "
                f"{m['peak_mem_gib']} | {m['achieved_tflops']} | {frac} | {m['max_abs_diff_vs_fp32']} |"
            )
        lines += [""] + [
            f"- {r['method']}: {r['gflop_per_image']} GFLOP/image ({r['nfe']} evaluations, {r['size']} px), "
            + (
                f"bound {r['bound_images_per_s']} images/s at {r['peak_bf16_tflops']} TFLOP/s dense bf16"
                if r["peak_bf16_tflops"]
                else "no FLOP bound known for this device"
            )
            for r in {id(r): r for r, _ in rows}.values()
        ]
    met = next((s for s in report["steps"] if s["step"] == "metric suite" and "result" in s), None)
    if met:
        lines += ["", "## Metric suite (stand-in weights: timings real, values not)", "", "```"]
        lines += [json.dumps(r) for r in met["result"].get("rows", [])][:40]
        lines += ["```"]
    col = next((s for s in report["steps"] if s["step"] == "collect sgdm" and "result" in s), None)
    if col:
        lines += [
            "",
            "## sgdm vs sgdm-nomap, equal minutes",
            "",
            "| method | steps | val (elapsed s: PSNR-Y / LPIPS) |",
        ]
        lines += ["|---|---|---|"]
        for r in col["result"]["runs"]:
            curve = "; ".join(
                f"{v['elapsed_s']:.0f} s: {_num(v.get('psnr_y'))} / {_num(v.get('lpips'), 4)}"
                for v in r.get("val_curve", [])
            )
            lines.append(f"| {r['method']} | {r.get('steps', r.get('error'))} | {curve} |")
    return "\n".join(lines) + "\n"


def _num(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds by which the script has ended")
    ap.add_argument("--reserve-s", type=float, default=10, help="kept back for the last report write")
    ap.add_argument("--out", default="out/gpu")
    ap.add_argument("--runs", default="runs/gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", nargs="+", default=list(DIFFUSION))
    ap.add_argument("--throughput-args", default="--repeats 1", help="extra perf.throughput arguments")
    ap.add_argument("--throughput-cap-s", type=float, default=100)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--metrics", default="all")
    ap.add_argument("--metrics-cap-s", type=float, default=90)
    ap.add_argument("--train-data", help="x32 dataset for sgdm vs sgdm-nomap (e.g. .gpu/synthetic)")
    ap.add_argument("--train-config", default="baselines/configs/sgdm-small.yaml")
    ap.add_argument("--train-args", default="", help="extra trainer arguments, e.g. '--set train.batch_size=2'")
    ap.add_argument("--min-train-s", type=float, default=90, help="skip training with less time than this left")
    ap.add_argument("--train-overhead-s", type=float, default=30, help="start-up + validation of one training run")
    return ap


def main(argv: list[str] | None = None) -> int:
    return Runbook(build_parser().parse_args(argv)).run()


if __name__ == "__main__":
    raise SystemExit(main())
