"""Build throughput of both demo variants, in-process and distributed side by side in one run.

    python perf/build_bench.py [--samples 256] [--repeats 1] [--modes inprocess,threads,processes]

Each build runs in a fresh subprocess over the offline demo world (generated once, before timing). Per
build it prints triplets/s (processed samples / build seconds, start-up included), the steady rate (after
the first quarter of the samples), the start-up seconds (build start to the first finished sample), CPU
seconds per triplet (user + system of the whole process tree: driver, scheduler, workers), peak RSS summed
over the tree, and the per-stage split (mean ms per sample inside the sample tasks, from the journal's
timings). Modes are interleaved (every mode of a round before the next round) so a busy machine slows
them alike: compare ratios within one run, and prefer CPU s/triplet when the machine is shared.

    inprocess  workers=0: the stages run in the driver process
    threads    one LocalCluster process, 2 x 2 threads (processes=False)
    processes  LocalCluster of 2 worker processes x 2 threads (the former default)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "inprocess": {"workers": 0, "threads": 2, "processes": True},
    "inprocess3": {"workers": 0, "threads": 3, "processes": True},
    "threads": {"workers": 2, "threads": 2, "processes": False},
    "processes": {"workers": 2, "threads": 2, "processes": True},
}

_BUILD = """
import json, threading, time
import psutil
from cmsrd.config import load_config
from cmsrd.driver import run_build

peak = [0]
stop = threading.Event()

def sample_rss():  # summed over this process and every descendant (workers, nannies)
    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        stop.wait(0.05)

threading.Thread(target=sample_rss, daemon=True).start()
d = load_config("demo-{variant}").to_dict()
d.update(samples={samples}, world={{"path": {world!r}}})
for dotted, value in {overrides!r}.items():
    *parents, leaf = dotted.split(".")
    node = d
    for k in parents:
        node = node.setdefault(k, {{}})
    node[leaf] = value
cfg = load_config(d)
t0 = time.time()
rep = run_build(cfg, {out!r}, progress=False, **{mode!r})
stop.set()
stages, done = {{}}, []
for line in open({out!r} + "/.cmsrd/journal.jsonl"):
    rec = json.loads(line)
    done.append(rec["_done_at"])
    for k, v in rec.get("_timing", {{}}).items():
        stages[k] = stages.get(k, 0.0) + v
n = max(rep.processed, 1)
done.sort()
late = done[len(done) // 4:]  # steady state: every worker started and warm
steady = (len(late) - 1) / (late[-1] - late[0]) if len(late) > 1 and late[-1] > late[0] else 0.0
print(json.dumps({{"processed": rep.processed, "seconds": rep.seconds, "startup_s": done[0] - t0, "steady": steady,
                  "peak_rss_mb": peak[0] / 2**20, "counts": rep.counts.get("by_status"),
                  "stage_ms": {{k: 1000 * v / n for k, v in stages.items()}}}}))
"""


def _python(code: str) -> tuple[dict, float]:
    """Run `code` in a fresh interpreter -> (its last JSON line, CPU seconds of it and its descendants)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(res.stdout.strip().splitlines()[-1]), cpu


def world_dir() -> str:
    """The default demo world (generated once under the cache, as `cmsrd build` does)."""
    code = (
        "import json\nfrom cmsrd.config import load_config\nfrom cmsrd.demo import ensure_world\n"
        'print(json.dumps({"world": str(ensure_world(load_config("demo-real")))}))'
    )
    return _python(code)[0]["world"]


def build(variant: str, mode: str, samples: int, world: str, overrides: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = _BUILD.format(
            variant=variant, samples=samples, world=world, out=tmp + "/ds", mode=MODES[mode], overrides=overrides or {}
        )
        r, cpu = _python(code)
    n = max(r["processed"], 1)
    return {
        "variant": variant,
        "mode": mode,
        "triplets": r["processed"],
        "triplets_per_s": r["processed"] / r["seconds"],
        "steady_triplets_per_s": r["steady"],
        "startup_s": r["startup_s"],
        "cpu_s_per_triplet": cpu / n,
        "peak_rss_mb": r["peak_rss_mb"],
        "counts": r["counts"],
        "stage_ms": r["stage_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds (report the median yourself)")
    ap.add_argument("--modes", default="inprocess,threads,processes", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--variants", default="synthetic,real")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=YAML",
        help="override a preset key for every build, e.g. --set output.geotiff=false",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every result here")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: use KEY=VALUE, e.g. output.geotiff=false")
        overrides[key] = yaml.safe_load(value)
    world = world_dir()
    results = []
    head = f"{'variant':10} {'mode':10} {'trip/s':>7} {'steady':>7} {'start s':>7} {'CPU s/trip':>10} {'RSS MB':>7}"
    print(head + "  stages ms/sample")
    for _ in range(args.repeats):
        for variant in args.variants.split(","):
            for mode in modes:
                r = build(variant, mode, args.samples, world, overrides)
                results.append(r)
                stages = " ".join(f"{k}={v:.1f}" for k, v in r["stage_ms"].items())
                print(
                    f"{variant:10} {mode:10} {r['triplets_per_s']:7.2f} {r['steady_triplets_per_s']:7.2f} "
                    f"{r['startup_s']:7.2f} "
                    f"{r['cpu_s_per_triplet']:10.4f} {r['peak_rss_mb']:7.0f}  {stages}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
