"""Figures of the dataset build (not timed tests): run `python perf/pipeline_bench.py all`.

    rate      samples/s of the demo builds (synthetic, real) at 0 and 100 ms tile/STAC latency
    plan-rss  peak RSS and time of planning 1k / 10k / 100k samples over the default AOIs
    build-rss peak RSS of a build's driver and workers as the plan grows (1k / 10k / 100k planned,
              a fixed number processed: what grows with the plan is the driver's bookkeeping)
    profile   where the time goes: per-stage seconds from the journal + cProfile of an in-process build

Every measurement runs in a fresh subprocess so peak RSS (ru_maxrss) is that measurement's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _world_cfg_snippet(variant: str, samples: int, latency: float, world: str) -> str:
    return f"""
    from cmsrd.config import load_config
    d = load_config("demo-{variant}").to_dict()
    faults = {{"latency_s": {latency}}} if {latency} else {{}}
    d.update(samples={samples}, world={{"path": {world!r}, "faults": faults}})
    cfg = load_config(d)
    """


def world_dir() -> str:
    """The default demo world (generated once under the cache, as `cmsrd build` does)."""
    return _run("""
    import json
    from cmsrd.config import load_config
    from cmsrd.demo import ensure_world
    print(json.dumps({"world": str(ensure_world(load_config("demo-real")))}))
    """)["world"]


def rate(samples: int = 96, workers: int = 2, threads: int = 2) -> list[dict]:
    world = world_dir()
    out = []
    for variant in ("synthetic", "real"):
        for latency in (0.0, 0.1):
            with tempfile.TemporaryDirectory() as tmp:
                r = _run(
                    _world_cfg_snippet(variant, samples, latency, world)
                    + f"""
    import json, resource, time
    from cmsrd.driver import run_build
    rep = run_build(cfg, {tmp!r} + "/ds", workers={workers}, threads={threads}, progress=False)
    done = sorted(json.loads(l)["_done_at"] for l in open({tmp!r} + "/ds/.cmsrd/journal.jsonl"))
    half = done[len(done) // 4:]  # steady state: after the cluster has started and every worker is warm
    print(json.dumps({{"variant": "{variant}", "latency_s": {latency}, "samples": rep.processed,
                      "total_seconds": round(rep.seconds, 2), "overall_samples_per_s": round(rep.rate, 3),
                      "steady_samples_per_s": round((len(half) - 1) / (half[-1] - half[0]), 3),
                      "counts": rep.counts["by_status"]}}))
    """
                )
            print(r, flush=True)
            out.append(r)
    return out


def plan_rss() -> list[dict]:
    out = []
    for n in (1_000, 10_000, 100_000):
        r = _run(f"""
    import json, resource, time
    from cmsrd.config import load_config
    from cmsrd.plan import make_plan, write_plan
    d = load_config("cmsrd-real").to_dict()
    d.update(samples={n}, zoom=19)  # z19: the default AOIs hold ~340k tiles, enough for 100k
    cfg = load_config(d)
    t = time.perf_counter()
    df = make_plan(cfg)
    write_plan(df, "/tmp/_bench_plan.parquet")
    print(json.dumps({{"planned": len(df), "seconds": round(time.perf_counter() - t, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
    """)
        print(r, flush=True)
        out.append(r)
    return out


def build_rss(processed: int = 48) -> list[dict]:
    """Plans of N tiles around the demo world; only the first `processed` are built (--limit)."""
    world = world_dir()
    out = []
    for n in (1_000, 10_000, 100_000):
        with tempfile.TemporaryDirectory() as tmp:
            r = _run(
                _world_cfg_snippet("synthetic", n, 0.0, world)
                + f"""
    import json, resource, time
    import numpy as np
    from cmsrd.plan import plan_from_tiles
    from cmsrd.driver import run_build
    from cmsrd.grid import lonlat_to_tile_xy
    meta = json.load(open({world!r} + "/world.json"))
    w, s, e, n_ = meta["bounds_lonlat"]
    import cmsrd.driver as driver
    # Harness shortcut: the planned tiles reach far beyond the world, whose OSM extract covers only the
    # world; map features are prepared from the world's part of the plan (tiles outside render empty and
    # their HR is the service's placeholder, so they are rejected quickly).
    _prepare = driver.prepare_osm
    driver.prepare_osm = lambda c, p, d: _prepare(c, p[p["lon"].between(w, e) & p["lat"].between(s, n_)], d)
    meta = json.load(open({world!r} + "/world.json"))
    w, s, e, n_ = meta["bounds_lonlat"]
    fx, fy = lonlat_to_tile_xy(np.array([w, e]), np.array([n_, s]), 18)
    x0, y0 = int(np.ceil(fx[0])), int(np.ceil(fy[0]))
    side = int(np.ceil(np.sqrt({n})))
    xs, ys = np.meshgrid(np.arange(x0, x0 + side), np.arange(y0, y0 + side))
    xs, ys = xs.ravel()[:{n}], ys.ravel()[:{n}]
    order = np.lexsort((xs, ys))  # tiles of the world first (row-major from its north-west corner)
    plan = plan_from_tiles(18, xs[order], ys[order], np.full({n}, "train"), np.full({n}, "world"), 4, 256)
    t = time.perf_counter()
    rep = run_build(cfg, {tmp!r} + "/ds", plan=plan, workers=2, threads=2, limit={processed}, progress=False)
    print(json.dumps({{"planned": {n}, "processed": rep.processed, "seconds": round(time.perf_counter() - t, 2),
                      "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}}))
    """
            )
        print(r, flush=True)
        out.append(r)
    return out


def profile(samples: int = 48) -> dict:
    world = world_dir()
    with tempfile.TemporaryDirectory() as tmp:
        r = _run(
            _world_cfg_snippet("real", samples, 0.0, world)
            + f"""
    import cProfile, io, json, pstats
    from cmsrd.driver import run_build
    prof = cProfile.Profile()
    prof.enable()
    rep = run_build(cfg, {tmp!r} + "/ds", workers=0, progress=False)
    prof.disable()
    stages = {{}}
    for line in open({tmp!r} + "/ds/.cmsrd/journal.jsonl"):
        for k, v in json.loads(line).get("_timing", {{}}).items():
            stages[k] = stages.get(k, 0.0) + v
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
    total = sum(stages.values())
    print(json.dumps({{"samples": rep.processed, "seconds": round(rep.seconds, 2),
                      "stage_seconds": {{k: round(v, 2) for k, v in stages.items()}},
                      "stage_share": {{k: round(v / total, 3) for k, v in stages.items()}},
                      "top": s.getvalue()[-5000:]}}))
    """
        )
    print(r.pop("top"), flush=True)
    print(r, flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["rate", "plan-rss", "build-rss", "profile", "all"])
    args = ap.parse_args()
    if args.what in ("rate", "all"):
        rate()
    if args.what in ("plan-rss", "all"):
        plan_rss()
    if args.what in ("build-rss", "all"):
        build_rss()
    if args.what in ("profile", "all"):
        profile()


if __name__ == "__main__":
    main()
