"""Reliability benchmark of the dataset build (a rerunnable script, not a test): `make reliability`, or

    python perf/reliability.py [--samples 200] [--fault-rate 0.2] [--kills 5] [--out out/reliability]

Against the offline world (served on loopback with `world.faults`), each build a real `cmsrd build`
process:

    clean      demo-real and demo-synthetic without faults: the reference datasets
    faults     the same presets with `--fault-rate` of the requests (tiles, identify, STAC, COG reads, OSM)
               meeting a fault, split evenly between HTTP errors (429/500/503), hung connections (held
               past the read timeout), corrupt bodies and bodies cut off mid-way
    kill       demo-real under faults, killed with SIGKILL `--kills` times at random moments and resumed
    worker     demo-real under faults with one Dask worker process killed (SIGKILL) mid-build

Every faulted dataset is compared with its clean reference sample by sample: status, reason, and the
bytes of every file of every ok sample (PNGs and GeoTIFFs). Prints ok/failed counts with reasons and the
differences; writes summary.json into --out. Exit status 1 when a target is missed (real >= 97.5% ok,
synthetic all ok, every ok sample identical, kill/resume and worker loss identical to the faulted build's
reference).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cmsrd_command() -> list[str]:
    script = Path(sys.executable).parent / "cmsrd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cmsrd.cli"]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return e


def faults(rate: float, seed: int) -> dict:
    """`rate` of the requests meet a fault, a quarter each of errors, hangs, corrupt and cut-off bodies."""
    q = rate / 4.0
    return {
        "error_rate": q,
        "error_codes": [429, 500, 503],
        "retry_after_s": 1,
        "timeout_rate": q,
        "timeout_s": 8.0,  # held longer than the build's read timeout below: the client's timeout fires
        "corrupt_rate": q,
        "truncate_rate": q,
        "seed": seed,
    }


def write_preset(out: Path, variant: str, samples: int, fault: dict | None) -> Path:
    d = yaml.safe_load((REPO / "manifests" / "presets" / f"demo-{variant}.yaml").read_text())
    d["samples"] = samples
    d["world"] = {**(d.get("world") or {}), "faults": fault or {}}
    d["build"] = {**(d.get("build") or {}), "timeout_s": 5.0, "abort_after_failures": 0}
    tag = "faults" if fault else "clean"
    path = out / "presets" / f"demo-{variant}-{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(d))
    return path


def build(preset: Path, dest: Path, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [*cmsrd_command(), "build", str(preset), "--out", str(dest), "--quiet", *extra]
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True)


def run_build(preset: Path, dest: Path, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = build(preset, dest, log).wait()
    return rc, time.perf_counter() - t0


def journal_lines(dest: Path) -> int:
    j = dest / ".cmsrd" / "journal.jsonl"
    return len(j.read_bytes().splitlines()) if j.exists() else 0


def killed_and_resumed(preset: Path, dest: Path, log: Path, kills: int, samples: int, rng: random.Random) -> dict:
    """SIGKILL the build process group `kills` times at random progress points, then let it finish."""
    done_at = []
    t0 = time.perf_counter()
    for k in range(kills):
        target = int(samples * (k + rng.random()) / (kills + 1))
        p = build(preset, dest, log)
        while p.poll() is None and journal_lines(dest) < target:
            time.sleep(0.2)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        done_at.append(journal_lines(dest))
    rc = build(preset, dest, log).wait()
    return {"rc": rc, "journal_lines_at_kills": done_at, "seconds": round(time.perf_counter() - t0, 1)}


def worker_killed(preset: Path, dest: Path, log: Path, samples: int) -> dict:
    """Kill one Dask worker process (a grandchild of the build) once a third of the samples are done."""
    import psutil

    t0 = time.perf_counter()
    p = build(preset, dest, log, ("--workers", "2"))
    killed = None
    while p.poll() is None and killed is None:
        if journal_lines(dest) >= samples // 3:
            workers = []  # the nannies' worker processes (multiprocessing spawn), not the resource tracker
            for c in psutil.Process(p.pid).children(recursive=True):
                try:
                    if "spawn_main" in " ".join(c.cmdline()):
                        workers.append(c)
                except psutil.Error:
                    pass
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    rc = p.wait()
    return {"rc": rc, "killed_pid": killed, "seconds": round(time.perf_counter() - t0, 1)}


def retries_logged(log: Path) -> int:
    """Client-side retries the build logged (one line per retried request): faults it met and survived."""
    return (
        sum(1 for ln in log.read_text(errors="replace").splitlines() if ln.startswith("retry ")) if log.exists() else 0
    )


def compare(ref: Path, got: Path) -> dict:
    """Per sample: status of both builds, and whether every file of an ok sample has the same bytes."""
    import pandas as pd

    from cmsrd.layout import read_manifest

    a, b = read_manifest(ref).set_index("id"), read_manifest(got).set_index("id")
    counts = b["qa_status"].value_counts().to_dict()
    reasons = b.loc[b["qa_status"] != "ok", "qa_reason"].value_counts().to_dict()
    files = [c for c in b.columns if c.startswith("path_")]
    differ, status_changed = [], []
    for sid, row in b.iterrows():
        if sid not in a.index:
            status_changed.append(f"{sid}: not in the reference")
            continue
        if row["qa_status"] != a.loc[sid, "qa_status"]:
            status_changed.append(f"{sid}: {a.loc[sid, 'qa_status']} -> {row['qa_status']} ({row['qa_reason']})")
        if row["qa_status"] != "ok":
            continue
        for c in files:
            rel = row[c]
            if not isinstance(rel, str) or not rel or pd.isna(rel):
                continue
            if a.loc[sid, c] != rel or (ref / rel).read_bytes() != (got / rel).read_bytes():
                differ.append(f"{sid}: {rel}")
    return {
        "samples": int(len(b)),
        "ok": int(counts.get("ok", 0)),
        "rejected": int(counts.get("rejected", 0)),
        "failed": int(counts.get("failed", 0)),
        "reasons": {str(k): int(v) for k, v in reasons.items()},
        "status_changed": status_changed,
        "ok_files_differing": differ,
        "reference_ok": int((a["qa_status"] == "ok").sum()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--fault-rate", type=float, default=0.2)
    ap.add_argument("--fault-seed", type=int, default=7)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "reliability")
    ap.add_argument("--only", default="clean,faults,kill,worker", help="comma-separated parts to run")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.fault_seed)
    fault = faults(args.fault_rate, args.fault_seed)
    summary: dict = {"samples": args.samples, "faults": fault, "kills": args.kills, "results": {}}
    res = summary["results"]

    def fresh(name: str) -> Path:
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        return d

    def log(variant: str, part: str) -> Path:
        p = out / "logs" / f"{variant}-{part}.log"
        p.unlink(missing_ok=True)
        return p

    for variant in ("real", "synthetic"):
        clean = out / f"{variant}-clean"
        if "clean" in parts or not (clean / "manifest.parquet").exists():
            rc, s = run_build(
                write_preset(out, variant, args.samples, None), fresh(f"{variant}-clean"), log(variant, "clean")
            )
            res[f"{variant}-clean"] = {"rc": rc, "seconds": round(s, 1), **compare(clean, clean)}
            res[f"{variant}-clean"]["retries_logged"] = retries_logged(out / "logs" / f"{variant}-clean.log")
        faulty = write_preset(out, variant, args.samples, fault)
        if "faults" in parts:
            rc, s = run_build(faulty, fresh(f"{variant}-faults"), log(variant, "faults"))
            res[f"{variant}-faults"] = {"rc": rc, "seconds": round(s, 1), **compare(clean, out / f"{variant}-faults")}
            res[f"{variant}-faults"]["retries_logged"] = retries_logged(out / "logs" / f"{variant}-faults.log")
        if variant == "real" and "kill" in parts:
            r = killed_and_resumed(faulty, fresh("real-kill"), log(variant, "kill"), args.kills, args.samples, rng)
            res["real-kill-resume"] = {**r, **compare(clean, out / "real-kill")}
            res["real-kill-resume"]["retries_logged"] = retries_logged(out / "logs" / "real-kill.log")
        if variant == "real" and "worker" in parts:
            r = worker_killed(faulty, fresh("real-worker"), log(variant, "worker"), args.samples)
            res["real-worker-killed"] = {**r, **compare(clean, out / "real-worker")}
            res["real-worker-killed"]["retries_logged"] = retries_logged(out / "logs" / "real-worker.log")

    misses = []
    for name, r in res.items():
        line = (
            f"{name:20s} ok {r['ok']:4d}  rejected {r['rejected']:3d}  failed {r['failed']:3d}  "
            f"(clean ok {r['reference_ok']})  ok files differing {len(r['ok_files_differing'])}  "
            f"status changed {len(r['status_changed'])}  exit {r['rc']}  {r.get('seconds', '')} s  "
            f"retries {r.get('retries_logged', 0)}"
        )
        print(line)
        if r["reasons"]:
            print(" " * 22 + "reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())))
        for d in (r["status_changed"] + r["ok_files_differing"])[:10]:
            print(" " * 22 + d)
        if r["ok_files_differing"]:
            misses.append(f"{name}: ok samples differ from the clean build")
        need = r["reference_ok"] if ("synthetic" in name or "clean" in name) else int(0.975 * r["reference_ok"])
        if r["ok"] < need:
            misses.append(f"{name}: {r['ok']} ok < {need}")
    summary["misses"] = misses
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("targets met" if not misses else "MISSED: " + "; ".join(misses))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
