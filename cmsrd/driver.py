"""The build driver: plan, resume, run the stages (in-process or as Dask tasks), journalled, then finalize.

`run_build` runs the samples on a thread pool in this process on small machines (`workers=0`, the default
below 4 cores: measured with `perf/build_bench.py`, worker processes cost more CPU than they win there), or
submits them partition by partition to a `distributed` client -- a `LocalCluster` of worker processes on
127.0.0.1, or `--scheduler ADDRESS` -- keeping at most `max_in_flight` samples in flight either way, so
memory does not grow with the plan. An LR source whose search is a catalogue query searches once per
(partition, spatial block), and that result feeds every sample of the block. Each finished sample is
appended to the fsync'd journal (`cmsrd.journal`) only after its files were written atomically, so a
killed build resumes exactly where it stopped; the manifest and dataset.json are written at the end
(`cmsrd.manifest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import DatasetConfig
from .demo import default_cache_dir, resolved_sources
from .errors import CredentialsError, InputError
from .journal import BuildState, Journal
from .layout import SPLITS, DatasetLayout
from .manifest import finalize, versions
from .plan import make_plan, write_plan
from .sources.registry import lr_spec
from .stages import (
    CREDENTIALS_REJECTED,
    BuildSpec,
    SampleTask,
    failed_row,
    plan_tasks,
    process_sample,
    search_block,
)


@dataclass
class BuildReport:
    root: Path
    planned: int
    skipped: int  # already done in an earlier run
    processed: int
    counts: dict[str, int]
    seconds: float

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


# Below this many cores the build runs in-process by default: measured with perf/build_bench.py on 2 cores,
# two worker processes cost more CPU per triplet than they gain in parallelism (see default_workers).
MIN_CORES_FOR_WORKERS = 4


def default_workers() -> int:
    """Worker processes when none are asked for: 0 (in-process) on small machines, where the cluster's
    start-up, serialisation and scheduler cost more CPU than a second process wins; else half the cores
    (the stages are partly I/O-bound, each worker runs 2 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < MIN_CORES_FOR_WORKERS else cores // 2


def plan_fingerprint(plan: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for sid, split in zip(plan["id"].astype(str), plan["split"].astype(str)):
        h.update(f"{sid}:{split}\n".encode())
    return h.hexdigest()[:16]


def _open_client(workers: int, threads: int, scheduler: str | None, processes: bool = True):
    import importlib.util

    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client, cluster = Client(scheduler, timeout="20s"), None
        except OSError as e:
            raise InputError(
                f"--scheduler {scheduler}",
                f"cannot connect ({e})",
                "start one with `dask scheduler` + `dask worker ADDRESS`, or omit --scheduler",
            ) from None
    else:
        # The dashboard where bokeh (optional) is installed; distributed's always-on HTTP endpoint and the
        # dashboard are bound to loopback on a free port.
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=processes,
            **({"host": "127.0.0.1"} if processes else {}),  # threads: in-process transport, no socket
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"dashboard": importlib.util.find_spec("bokeh") is not None},
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)

    def serves_dashboard() -> bool:  # runs on the scheduler (pickled by value: cmsrd need not be installed there)
        import sys

        return "distributed.dashboard.scheduler" in sys.modules  # imported only when its dashboard started

    try:
        served = bool(client.run_on_scheduler(serves_dashboard))
    except Exception:  # noqa: BLE001 - a scheduler that cannot answer has no link to print, the build goes on
        served = False
    link = client.dashboard_link if served else None
    print(f"dask dashboard: {link}" if link else "dask dashboard: none (needs bokeh on the scheduler)", file=sys.stderr)
    return client, cluster


def _partitions(todo: pd.DataFrame, size: int) -> Iterator[list[SampleTask]]:
    for start in range(0, len(todo), size):
        yield plan_tasks(todo.iloc[start : start + size])


def _block_bbox(tasks: list[SampleTask]) -> tuple[float, float, float, float]:
    from pyproj import Transformer

    tr = Transformer.from_crs(3857, 4326, always_xy=True)
    minx = min(t.minx for t in tasks)
    miny = min(t.miny for t in tasks)
    maxx = max(t.maxx for t in tasks)
    maxy = max(t.maxy for t in tasks)
    w, s = tr.transform(minx, miny)
    e, n = tr.transform(maxx, maxy)
    return (w, s, e, n)


def run_build(
    cfg: DatasetConfig,
    out: str | os.PathLike,
    *,
    plan: pd.DataFrame | None = None,
    workers: int | None = None,
    threads: int = 2,
    scheduler: str | None = None,
    force: bool = False,
    limit: int | None = None,
    progress: bool = True,
    faults: Any = None,
    processes: bool = True,
) -> BuildReport:
    """Build (or resume) a dataset into `out`.

    `workers=0` runs the stages in this process; N > 0 starts a LocalCluster of N worker processes (`threads`
    each; `processes=False`: one process, N x `threads` threads); `scheduler` uses an existing cluster.
    `workers=None` picks `default_workers()`."""
    if workers is None:
        workers = default_workers()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    state = BuildState(root)
    state.lock()
    t0 = time.perf_counter()
    try:
        state.precheck(cfg.fingerprint(), force)
        with resolved_sources(cfg, faults) as (rcfg, world_bounds):
            if plan is None:
                plan = make_plan(cfg, world_bounds)
            # An LR source that cannot be built (e.g. missing credentials): one clear error before any work.
            lr_spec(rcfg.lr.source, rcfg.lr.backend).build(rcfg)
            fp = f"{cfg.fingerprint()}-{plan_fingerprint(plan)}"
            resuming = state.check_identity(cfg.name, fp, cfg.content_dict(), force)
            layout = DatasetLayout(root, cfg.hr_px, cfg.lr_px)
            if force or not resuming:
                state.reset(
                    [root / s for s in SPLITS]
                    + [
                        root / "geo",
                        layout.manifest_parquet,
                        layout.manifest_csv,
                        layout.dataset_json,
                        state.dir / "osm",
                        state.dir / "shift",
                    ]
                )
            state.write_identity(cfg.name, fp, cfg.content_dict(), versions())
            write_plan(plan, state.dir / "plan.parquet")
            _remove_temp_files(root)
            osm = prepare_osm(rcfg, plan, state.dir)
            spec = BuildSpec(rcfg, str(root), osm, cache_dir=None, shift_dir=str(state.dir / "shift"))
            with Journal(state.journal_path) as journal:
                done = {sid for sid, (_, status) in journal.index().items() if status in ("ok", "rejected")}
                selected = plan if limit is None else plan.iloc[: int(limit)]
                todo = selected[~selected["id"].astype(str).isin(done)]
                processed = _execute(
                    spec,
                    todo,
                    journal,
                    workers,
                    threads,
                    scheduler,
                    progress,
                    skipped=len(selected) - len(todo),
                    processes=processes,
                )
            counts = finalize(spec, cfg, plan, state)
        return BuildReport(root, len(selected), len(selected) - len(todo), processed, counts, time.perf_counter() - t0)
    finally:
        state.unlock()


def _remove_temp_files(root: Path) -> None:
    """Half-written temp files of a killed build (never under a final name, see cmsrd.io)."""
    for sub in list(SPLITS) + ["geo", ""]:
        d = root / sub
        if not d.is_dir():
            continue
        it = d.rglob(".*.part") if sub else d.glob(".*.part")
        for p in it:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _execute(
    spec: BuildSpec,
    todo: pd.DataFrame,
    journal: Journal,
    workers: int,
    threads: int,
    scheduler: str | None,
    progress: bool,
    skipped: int,
    processes: bool = True,
) -> int:
    from tqdm import tqdm

    stats = {"ok": 0, "rejected": 0, "failed": 0}
    bar = tqdm(
        total=len(todo),
        disable=not progress,
        unit="sample",
        desc=f"build {spec.cfg.name}",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    if skipped:
        bar.write(f"resuming: {skipped} samples already done")

    first_failures: list[SampleTask] = []
    abort_after = spec.cfg.build.abort_after_failures

    def record(row: dict) -> None:
        stop = row.get("_stop")
        if stop:  # refused credentials, a full disk: every further sample would meet it too
            cls = CredentialsError if row.get("qa_reason") == CREDENTIALS_REJECTED else InputError
            raise cls(stop["what"], stop["problem"], stop.get("fix"))
        row["_done_at"] = round(time.time(), 3)  # journal only (not a manifest column): rates and profiles
        journal.append(row)
        stats[row["qa_status"]] += 1
        bar.set_postfix(ok=stats["ok"], rejected=stats["rejected"], failed=stats["failed"], refresh=False)
        bar.update(1)
        if abort_after and stats["ok"] == stats["rejected"] == 0:
            first_failures.append(row)
            if len(first_failures) >= abort_after:
                raise systematic_failure(spec.cfg.name, first_failures)

    searches = lr_spec(spec.cfg.lr.source, spec.cfg.lr.backend).block_search
    try:
        if workers == 0 and not scheduler:
            _run_in_process(spec, todo, threads, searches, record)
            return len(todo)
        _run_distributed(spec, todo, workers, threads, scheduler, record, processes)
        return len(todo)
    finally:
        bar.close()


def systematic_failure(name: str, rows: list[SampleTask]) -> InputError:
    """The first samples of a run all failed: almost always one cause (no network, bad credentials, a
    wrong URL). Stop instead of failing every remaining sample after its retries; the failures are in the
    journal and are retried when the build is run again."""
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["qa_reason"]] = reasons.get(r["qa_reason"], 0) + 1
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return InputError(
        f"build {name}",
        f"the first {len(rows)} samples all failed ({summary}); e.g. {rows[-1]['qa_detail']}",
        "fix that cause (network, credentials, source URLs) and run the build again: it resumes and retries "
        "failed samples (set build.abort_after_failures: 0 to never stop early)",
    )


def _group_by_block(part: list[SampleTask]) -> list[tuple[str, list[SampleTask]]]:
    groups: dict[str, list[SampleTask]] = {}
    for t in part:
        groups.setdefault(t.block, []).append(t)
    return list(groups.items())


def _run_in_process(
    spec: BuildSpec, todo: pd.DataFrame, threads: int, searches: bool, record: Callable[[dict], None]
) -> None:
    """The stages on a pool of `threads` threads in this process (no scheduler, no serialisation).

    The stages spend most of their time where the GIL is released (zlib/PNG and GeoTIFF encoding, GDAL
    reads, numpy, sockets), so threads use the cores of a small machine without the memory and CPU of
    worker processes. Each block's LR search runs once, in the thread of the block's first sample, and
    the block's other samples wait for it. At most `max_in_flight` samples are queued (memory does not
    grow with the plan); rows are recorded here, in this thread, in completion order (the manifest is
    written in plan order)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    limit = spec.cfg.build.max_in_flight or 4 * threads
    queue = _queued_tasks(spec, todo, searches)
    running: dict[Any, SampleTask] = {}
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cmsrd-sample")
    try:
        while True:
            for task, search in queue:
                running[pool.submit(_sample_in_thread, spec, task, search)] = task
                if len(running) >= limit:
                    break
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                task = running.pop(f)
                try:
                    row = f.result()
                except CredentialsError:  # the block's search: stops the build
                    raise
                except Exception as e:  # outside process_sample's guard
                    row = failed_row(spec, task, "error", f"{type(e).__name__}: {e}")
                record(row)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _BlockSearch:
    """One block's LR search, run once by whichever of its samples needs it first."""

    def __init__(self, spec: BuildSpec, tasks: list[SampleTask]) -> None:
        self._spec, self._bbox = spec, _block_bbox(tasks)
        self._lock = threading.Lock()
        self._result: dict | None = None

    def get(self) -> dict:
        with self._lock:
            if self._result is None:
                self._result = search_block(self._spec, self._bbox)
            return self._result


def _queued_tasks(spec: BuildSpec, todo: pd.DataFrame, searches: bool) -> Iterator[tuple[SampleTask, Any]]:
    """(task, its block's search), partition by partition, block by block."""
    for part in _partitions(todo, spec.cfg.build.partition_size):
        for _, tasks in _group_by_block(part):
            search = _BlockSearch(spec, tasks) if searches else None
            for task in tasks:
                yield task, search


def _sample_in_thread(spec: BuildSpec, task: SampleTask, search: _BlockSearch | None) -> dict:
    return process_sample(spec, task, search.get() if search is not None else None)


def _run_distributed(
    spec: BuildSpec,
    todo: pd.DataFrame,
    workers: int,
    threads: int,
    scheduler: str | None,
    record: Callable[[dict], None],
    processes: bool = True,
) -> None:
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    client, cluster = _open_client(workers, threads, scheduler, processes)
    try:
        nthreads = max(sum(client.nthreads().values()), 1)
        limit = spec.cfg.build.max_in_flight or 4 * nthreads
        spec_f = client.scatter(spec, broadcast=True)
        searches = lr_spec(spec.cfg.lr.source, spec.cfg.lr.backend).block_search
        parts = _partitions(todo, spec.cfg.build.partition_size)
        ac = as_completed()
        tasks_of: dict[Any, SampleTask] = {}
        pending: list[tuple[SampleTask, Any]] = []  # (task, search future) not yet submitted

        def refill() -> None:
            while len(tasks_of) < limit:
                if not pending:
                    part = next(parts, None)
                    if part is None:
                        return
                    for _, tasks in _group_by_block(part):
                        sf = client.submit(search_block, spec_f, _block_bbox(tasks), pure=False) if searches else None
                        pending.extend((t, sf) for t in tasks)
                task, sf = pending.pop(0)
                f = client.submit(process_sample, spec_f, task, sf, key=f"sample-{task.id}-{time.time_ns()}")
                tasks_of[f] = task
                ac.add(f)

        refill()
        while tasks_of:
            f = next(ac)
            task = tasks_of.pop(f)
            try:
                row = f.result()
            except CredentialsError:  # raised by the block's search task: stops the build
                raise
            except KilledWorker as e:
                row = failed_row(spec, task, "worker_died", str(e))
            except FutureCancelledError as e:
                row = failed_row(spec, task, "cancelled", str(e))
            except Exception as e:  # an error outside process_sample's guard (e.g. unpicklable result)
                row = failed_row(spec, task, "error", f"{type(e).__name__}: {e}")
            f.release()
            record(row)
            refill()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def prepare_osm(cfg: DatasetConfig, plan: pd.DataFrame, state_dir: Path) -> dict[str, str]:
    """Per-AOI map features as GeoParquet (done once per build; workers read them by AOI)."""
    from .grid import tile_xy_to_lonlat
    from .sources.osm import OSMFeatures

    out: dict[str, str] = {}
    for aoi, rows in plan.groupby("aoi", sort=True):
        path = state_dir / "osm" / f"{aoi}.parquet"
        out[str(aoi)] = str(path)
        if path.exists():
            continue
        z = int(rows["z"].iloc[0])
        w, n = tile_xy_to_lonlat(np.array([rows["x"].min()]), np.array([rows["y"].min()]), z)
        e, s = tile_xy_to_lonlat(np.array([rows["x"].max() + 1]), np.array([rows["y"].max() + 1]), z)
        bbox = (float(w[0]), float(s[0]), float(e[0]), float(n[0]))
        if cfg.map.pbf:
            pbf = cfg.resolve(cfg.map.pbf)
        else:
            from .sources.geofabrik import extract_for_aoi

            _, pbf = extract_for_aoi(bbox, default_cache_dir() / "osm", index_url=cfg.map.geofabrik_index)
        OSMFeatures.from_pbf(pbf, bbox).to_parquet(path)
    return out
